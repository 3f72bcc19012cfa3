//! Per-volume credentials and their roles.
//!
//! A credential is issued by `deltavol-dataplane credentials issue` and handed to a compute
//! node as one line, `dvc1.<id>.<secret>` (the id is 16 hex digits, the secret 64). It grants
//! roles on volumes:
//!
//! * `read` on a volume pattern: describe the volume, list its snapshots, read its blocks and
//!   checksums (a clone's source, a verify from elsewhere);
//! * `write` on a pattern: all of `read`, and create the volume, ship snapshots, set its
//!   retention, pin, prune and delete its snapshots, create it as a clone (which also needs
//!   `read` on the source);
//! * `admin`: everything on every volume, and what only an operator may do: start a new
//!   generation (`recover`, which fences the running writer) and delete a volume. The
//!   server's `--auth-token-file` token is an admin credential too.
//!
//! A pattern is a volume name, a prefix ending in `*` (`team-a-*`), or `*` (every volume).
//!
//! The server keeps only `StoredKey = SHA-256(HMAC-SHA256(secret, "deltavol client key"))`
//! per credential, in the credentials file (JSON, mode 0600). The client proves it holds the
//! secret SCRAM-style (RFC 5802, without salt and iterations: the secret is 32 random bytes,
//! not a password): `proof = ClientKey XOR HMAC-SHA256(StoredKey, auth message)`, where the
//! auth message binds the server's nonce, the volume and the credential id. The server
//! recovers `ClientKey` from the proof and checks its hash. So neither the file nor a
//! recorded handshake lets anyone authenticate (the file alone does not give `ClientKey`;
//! a proof is good for one nonce only).
//!
//! The server re-reads the file when it changes ([`CredentialStore::refresh`], at every
//! handshake and every second): an issued credential works on its next connection, a revoked
//! one is refused on its next connection and its open connections are closed at their next
//! request. Rotation without downtime: `credentials rotate ID` issues a second credential with
//! the same grants; switch the client to it, then revoke the old one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};

use crate::filewatch::{stamp, FileStamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// How a credential handed to a client starts.
pub const CREDENTIAL_PREFIX: &str = "dvc1.";
/// Hex digits of a credential id.
pub const ID_HEX_DIGITS: usize = 16;
/// Bytes of a credential's secret (hex-encoded in the credential string).
pub const SECRET_BYTES: usize = 32;
/// Bytes of a proof (a SHA-256 output).
pub const PROOF_BYTES: usize = 32;
/// Cap on a credentials file: about 20,000 credentials.
pub const FILE_MAX_BYTES: u64 = 8 << 20;
/// Cap on a credential's label.
pub const LABEL_MAX_BYTES: usize = 128;
/// How often the server looks for a changed credentials file (besides at every handshake).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Version of the credentials file format.
const FILE_VERSION: u32 = 1;

/// What a credential may do on one volume; ordered, each level including the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Read,
    Write,
    Admin,
}

impl Access {
    /// The role's name as `credentials list` and the refusals say it.
    pub fn name(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Read => "read",
            Access::Write => "write",
            Access::Admin => "admin",
        }
    }
}

/// A role on volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
}

/// One grant: a role on the volumes a pattern matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// A volume name, a prefix ending in `*`, or `*`.
    pub volume: String,
    pub role: Role,
}

impl Grant {
    /// Whether the grant covers `volume`.
    pub fn matches(&self, volume: &str) -> bool {
        match self.volume.strip_suffix('*') {
            Some(prefix) => volume.starts_with(prefix),
            None => self.volume == volume,
        }
    }
}

/// Checks a volume pattern: a volume name (1-64 bytes of `[A-Za-z0-9._-]`, not starting with
/// `.`), optionally ending in `*`, or `*` alone.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let base = p.strip_suffix('*').unwrap_or(p);
    let ok_chars = base
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if base.is_empty() || base.len() > 64 || !ok_chars || base.starts_with('.') {
        return Err(format!(
            "invalid volume pattern {p:?}: a volume name (1-64 bytes of [A-Za-z0-9._-], not \
             starting with '.'), a prefix ending in '*', or '*'"
        ));
    }
    Ok(())
}

/// What an authenticated connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The credential's id; `None` for the server's admin token.
    pub id: Option<String>,
    pub admin: bool,
    pub grants: Vec<Grant>,
}

impl Authorized {
    /// The admin token's rights.
    pub fn admin_token() -> Authorized {
        Authorized {
            id: None,
            admin: true,
            grants: Vec::new(),
        }
    }

    /// The most this credential may do on `volume`.
    pub fn access(&self, volume: &str) -> Access {
        if self.admin {
            return Access::Admin;
        }
        let mut best = Access::None;
        for g in self.grants.iter().filter(|g| g.matches(volume)) {
            best = best.max(match g.role {
                Role::Read => Access::Read,
                Role::Write => Access::Write,
            });
        }
        best
    }

    /// Who this is, for logs and refusals: "credential ID" or "the admin token".
    pub fn who(&self) -> String {
        match &self.id {
            Some(id) => format!("credential {id}"),
            None => "the admin token".to_string(),
        }
    }
}

/// One credential as the file keeps it (no secret: only its stored key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Hex of SHA-256(ClientKey).
    pub stored_key: String,
    pub created_ms: u64,
    /// When it was revoked (ms since the epoch); revoked credentials stay listed.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    /// The credential this one was issued to replace (`credentials rotate`).
    #[serde(default)]
    pub rotated_from: Option<String>,
}

impl Entry {
    /// The rights this credential gives.
    pub fn authorized(&self) -> Authorized {
        Authorized {
            id: Some(self.id.clone()),
            admin: self.admin,
            grants: self.grants.clone(),
        }
    }

    /// "admin" or the grants, e.g. "write db, read base-*".
    pub fn describe_grants(&self) -> String {
        if self.admin {
            return "admin".to_string();
        }
        let g: Vec<String> = self
            .grants
            .iter()
            .map(|g| {
                let role = match g.role {
                    Role::Read => "read",
                    Role::Write => "write",
                };
                format!("{role} {}", g.volume)
            })
            .collect();
        g.join(", ")
    }
}

/// The credentials file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    pub version: u32,
    pub credentials: Vec<Entry>,
}

impl Default for CredentialFile {
    fn default() -> Self {
        CredentialFile {
            version: FILE_VERSION,
            credentials: Vec::new(),
        }
    }
}

/// A credential file that cannot be used, or a request the file cannot satisfy.
#[derive(Debug, thiserror::Error)]
pub enum CredError {
    #[error("credentials file {path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Usage(String),
}

fn file_err(path: &Path, msg: impl Into<String>) -> CredError {
    CredError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(std::io::Error::other)?;
    Ok(b)
}

impl CredentialFile {
    /// Reads `path`; a missing file is an empty set when `missing_ok`.
    pub fn load(path: &Path, missing_ok: bool) -> Result<CredentialFile, CredError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => {
                return Ok(CredentialFile::default())
            }
            Err(e) => return Err(file_err(path, format!("cannot read it: {e}"))),
        };
        if meta.len() > FILE_MAX_BYTES {
            return Err(file_err(
                path,
                format!("{} bytes, over the cap of {FILE_MAX_BYTES}", meta.len()),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_err(path, format!("cannot read it: {e}")))?;
        let f: CredentialFile = serde_json::from_str(&text)
            .map_err(|e| file_err(path, format!("not a credentials file: {e}")))?;
        if f.version != FILE_VERSION {
            return Err(file_err(
                path,
                format!(
                    "format version {} (this build reads {FILE_VERSION})",
                    f.version
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &f.credentials {
            let key_ok = unhex(&e.stored_key).is_some_and(|k| k.len() == 32);
            let id_ok = e.id.len() == ID_HEX_DIGITS && e.id.bytes().all(|b| b.is_ascii_hexdigit());
            if !id_ok || !key_ok {
                return Err(file_err(path, format!("credential {:?} is damaged", e.id)));
            }
            if !seen.insert(e.id.as_str()) {
                return Err(file_err(path, format!("credential {} appears twice", e.id)));
            }
            for g in &e.grants {
                check_pattern(&g.volume)
                    .map_err(|m| file_err(path, format!("credential {}: {m}", e.id)))?;
            }
        }
        Ok(f)
    }

    /// Writes the file atomically (a temporary file, fsync, rename, fsync of the directory).
    /// A new file is mode 0600; a replaced one keeps its owner, group and mode (so that a
    /// file made readable to the server's user, e.g. `chgrp deltavol` and `0640`, stays so
    /// after every `credentials` command run as root).
    pub fn save(&self, path: &Path) -> Result<(), CredError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("creds")
        ));
        let text = serde_json::to_string_pretty(self).expect("serializes");
        let io = |what: &str, e: std::io::Error| file_err(path, format!("{what}: {e}"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("cannot create its temporary file", e))?;
        if let Ok(old) = std::fs::metadata(path) {
            std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()))
                .and_then(|()| {
                    f.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777))
                })
                .map_err(|e| io("cannot give the new copy the file's owner and mode", e))?;
        }
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| io("cannot write it", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io("cannot replace it", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync its directory", e))?;
        Ok(())
    }

    /// The credential `id` (revoked or not).
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.credentials.iter().find(|e| e.id == id)
    }

    /// Adds a new credential and returns it with the credential string to hand out (shown
    /// once: the file keeps only its stored key).
    pub fn issue(
        &mut self,
        label: &str,
        admin: bool,
        grants: Vec<Grant>,
    ) -> Result<(Entry, String), CredError> {
        if label.len() > LABEL_MAX_BYTES || label.chars().any(char::is_control) {
            return Err(CredError::Usage(format!(
                "a label is at most {LABEL_MAX_BYTES} bytes without control characters"
            )));
        }
        if admin && !grants.is_empty() {
            return Err(CredError::Usage(
                "an admin credential has every right on every volume: give --admin or grants, \
                 not both"
                    .into(),
            ));
        }
        if !admin && grants.is_empty() {
            return Err(CredError::Usage(
                "a credential needs a role: --write VOLUME, --read VOLUME (repeatable) or --admin"
                    .into(),
            ));
        }
        for g in &grants {
            check_pattern(&g.volume).map_err(CredError::Usage)?;
        }
        let rnd = |e| CredError::Usage(format!("no randomness for a new credential: {e}"));
        let id = loop {
            let id = hex(&random::<{ ID_HEX_DIGITS / 2 }>().map_err(rnd)?);
            if self.get(&id).is_none() {
                break id;
            }
        };
        let secret = random::<SECRET_BYTES>().map_err(rnd)?;
        let entry = Entry {
            id: id.clone(),
            label: label.to_string(),
            admin,
            grants,
            stored_key: hex(&stored_key(&client_key(&secret))),
            created_ms: now_ms(),
            revoked_ms: None,
            rotated_from: None,
        };
        self.credentials.push(entry.clone());
        Ok((entry, format!("{CREDENTIAL_PREFIX}{id}.{}", hex(&secret))))
    }

    /// Issues a credential with the same rights and label as `id` (which stays valid until
    /// revoked).
    pub fn rotate(&mut self, id: &str) -> Result<(Entry, String), CredError> {
        let old = self
            .get(id)
            .ok_or_else(|| CredError::Usage(format!("no credential {id}")))?
            .clone();
        if old.revoked_ms.is_some() {
            return Err(CredError::Usage(format!(
                "credential {id} is revoked: issue a new one instead"
            )));
        }
        let (mut entry, secret) = self.issue(&old.label, old.admin, old.grants.clone())?;
        entry.rotated_from = Some(old.id.clone());
        if let Some(e) = self.credentials.iter_mut().find(|e| e.id == entry.id) {
            e.rotated_from = Some(old.id);
        }
        Ok((entry, secret))
    }

    /// Revokes `id`; revoking a revoked credential is no error (and keeps the first time).
    pub fn revoke(&mut self, id: &str) -> Result<&Entry, CredError> {
        let e = self
            .credentials
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or_else(|| CredError::Usage(format!("no credential {id}")))?;
        if e.revoked_ms.is_none() {
            e.revoked_ms = Some(now_ms());
        }
        Ok(e)
    }
}

/// Holds the credentials file's lock (a `flock` on `FILE.lock`) while a command edits it, so
/// that two `credentials` commands never lose each other's change.
pub struct FileLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock, CredError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| file_err(path, format!("cannot open its lock file: {e}")))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| file_err(path, format!("cannot lock it: {e}")))?;
        Ok(FileLock { _lock: lock })
    }
}

// ---------------------------------------------------------------------------------------
// The proof (client and server)
// ---------------------------------------------------------------------------------------

fn client_key(secret: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(b"deltavol client key");
    mac.finalize().into_bytes().into()
}

fn stored_key(client_key: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(client_key).into()
}

fn client_signature(stored_key: &[u8], nonce: &[u8], volume: &str, id: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(stored_key).expect("HMAC takes any key");
    mac.update(b"deltavol-auth-v1");
    for part in [nonce, volume.as_bytes(), id.as_bytes()] {
        mac.update(&(part.len() as u32).to_le_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// A credential as the client holds it.
pub struct ClientCredential {
    pub id: String,
    secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredential")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ClientCredential {
    /// Parses the contents of a credential file (trailing whitespace ignored). `None`: not a
    /// credential (`dvc1.` does not start it), i.e. an admin token; `Some(Err)`: it starts as
    /// one but is damaged.
    pub fn parse(bytes: &[u8]) -> Option<Result<ClientCredential, String>> {
        let text = std::str::from_utf8(bytes).ok()?.trim_end();
        let rest = text.strip_prefix(CREDENTIAL_PREFIX)?;
        let bad = || {
            format!(
                "a damaged credential: expected {CREDENTIAL_PREFIX}<{ID_HEX_DIGITS} hex \
                 digits>.<{} hex digits> as `deltavol-dataplane credentials issue` prints it",
                SECRET_BYTES * 2
            )
        };
        Some((|| {
            let (id, secret) = rest.split_once('.').ok_or_else(bad)?;
            if id.len() != ID_HEX_DIGITS || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let secret = unhex(secret)
                .and_then(|s| <[u8; SECRET_BYTES]>::try_from(s).ok())
                .ok_or_else(bad)?;
            Ok(ClientCredential {
                id: id.to_ascii_lowercase(),
                secret,
            })
        })())
    }

    /// The proof for the server's `nonce` on `volume`.
    pub fn proof(&self, nonce: &[u8], volume: &str) -> [u8; PROOF_BYTES] {
        let ck = client_key(&self.secret);
        let sig = client_signature(&stored_key(&ck), nonce, volume, &self.id);
        std::array::from_fn(|i| ck[i] ^ sig[i])
    }
}

/// Checks a proof against a stored key, in constant time as to where it differs.
pub fn verify_proof(stored: &[u8; 32], nonce: &[u8], volume: &str, id: &str, proof: &[u8]) -> bool {
    if proof.len() != PROOF_BYTES {
        return false;
    }
    let sig = client_signature(stored, nonce, volume, id);
    let ck: [u8; 32] = std::array::from_fn(|i| proof[i] ^ sig[i]);
    let got = stored_key(&ck);
    got.iter()
        .zip(stored)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

// ---------------------------------------------------------------------------------------
// The server's live view
// ---------------------------------------------------------------------------------------

/// The server's credentials: the file as last read, re-read when it changes.
pub struct CredentialStore {
    path: PathBuf,
    inner: RwLock<Loaded>,
    /// Bumped at every reload that changed the table: a connection that saw an older value
    /// re-checks its credential at its next request.
    generation: AtomicU64,
}

struct Loaded {
    stamp: Option<FileStamp>,
    by_id: BTreeMap<String, (Entry, [u8; 32])>,
}

/// Why a credential was refused (the message the client gets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl CredentialStore {
    /// Opens the store on `path`. A missing file is no credential yet (a warning): issuing
    /// the first one creates it and the server picks it up. A damaged file is an error.
    pub fn open(path: &Path) -> Result<Arc<CredentialStore>, CredError> {
        let s = CredentialStore {
            path: path.to_path_buf(),
            inner: RwLock::new(Loaded {
                stamp: None,
                by_id: BTreeMap::new(),
            }),
            generation: AtomicU64::new(0),
        };
        if !path.exists() {
            tracing::warn!(path = %path.display(), "credentials file does not exist (yet): only the admin token authenticates until `deltavol-dataplane credentials issue` creates it");
        }
        s.reload(true)?;
        Ok(Arc::new(s))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed since the last read. A file that cannot be read or
    /// parsed keeps the table as it was (logged): a half-copied file must not lock every
    /// client out, nor let a revoked credential back in.
    pub fn refresh(&self) {
        if let Err(e) = self.reload(false) {
            tracing::warn!(error = %e, "credentials file not reloaded: keeping the credentials as last read");
        }
    }

    fn reload(&self, first: bool) -> Result<(), CredError> {
        let st = stamp(&self.path);
        if !first && self.inner.read().unwrap_or_else(|p| p.into_inner()).stamp == st {
            return Ok(());
        }
        let file = CredentialFile::load(&self.path, true)?;
        let mut by_id = BTreeMap::new();
        for e in file.credentials {
            let key: [u8; 32] = unhex(&e.stored_key)
                .and_then(|k| k.try_into().ok())
                .expect("checked by load");
            by_id.insert(e.id.clone(), (e, key));
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let changed = inner.by_id.len() != by_id.len()
            || inner
                .by_id
                .iter()
                .zip(&by_id)
                .any(|((_, (a, _)), (_, (b, _)))| a != b);
        inner.stamp = st;
        inner.by_id = by_id;
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if !first {
                tracing::info!(path = %self.path.display(), credentials = inner.by_id.len(), "credentials reloaded");
            }
        }
        Ok(())
    }

    /// Bumped whenever the credentials changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Checks a credential's proof for `volume` and returns its rights; the volume must be
    /// one it has a role on.
    pub fn authenticate(
        &self,
        id: &str,
        nonce: &[u8],
        volume: &str,
        proof: &[u8],
    ) -> Result<Authorized, Refused> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        // One answer for an unknown id and a wrong proof: ids are not secret, but there is no
        // need to confirm which exist.
        let failed = || {
            Refused(format!(
                "authentication failed: credential {id} unknown or its secret wrong"
            ))
        };
        let (entry, key) = inner.by_id.get(id).ok_or_else(failed)?;
        if !verify_proof(key, nonce, volume, id, proof) {
            return Err(failed());
        }
        if entry.revoked_ms.is_some() {
            return Err(Refused(format!("credential {id} is revoked")));
        }
        let auth = entry.authorized();
        if auth.access(volume) == Access::None {
            return Err(Refused(format!(
                "credential {id} has no role on volume {volume} (it has: {})",
                entry.describe_grants()
            )));
        }
        Ok(auth)
    }

    /// The current rights of credential `id`: `None` when it was revoked or removed.
    pub fn current(&self, id: &str) -> Option<Authorized> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let (e, _) = inner.by_id.get(id)?;
        e.revoked_ms.is_none().then(|| e.authorized())
    }

    /// Re-reads the file every [`REFRESH_INTERVAL`] on a thread of its own, until the store
    /// is dropped.
    pub fn watch(self: &Arc<Self>) -> std::io::Result<()> {
        crate::filewatch::every("dp-credentials", REFRESH_INTERVAL, self, Self::refresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(spec: &[(&str, Role)]) -> Vec<Grant> {
        spec.iter()
            .map(|(v, r)| Grant {
                volume: v.to_string(),
                role: *r,
            })
            .collect()
    }

    #[test]
    fn proof_verifies_only_for_its_nonce_volume_and_id() {
        let mut f = CredentialFile::default();
        let (e, cred) = f
            .issue("node", false, grants(&[("db", Role::Write)]))
            .unwrap();
        let c = ClientCredential::parse(cred.as_bytes()).unwrap().unwrap();
        assert_eq!(c.id, e.id);
        let key: [u8; 32] = unhex(&e.stored_key).unwrap().try_into().unwrap();
        let p = c.proof(b"nonce-1", "db");
        assert!(verify_proof(&key, b"nonce-1", "db", &e.id, &p));
        assert!(
            !verify_proof(&key, b"nonce-2", "db", &e.id, &p),
            "replay on another nonce"
        );
        assert!(
            !verify_proof(&key, b"nonce-1", "db2", &e.id, &p),
            "another volume"
        );
        assert!(!verify_proof(
            &key,
            b"nonce-1",
            "db",
            "0000000000000000",
            &p
        ));
        assert!(!verify_proof(&key, b"nonce-1", "db", &e.id, &p[..31]));
        // The stored key alone does not make a proof: a proof built with it as the secret
        // (what a thief of the file could try) fails.
        let thief = ClientCredential {
            id: e.id.clone(),
            secret: key,
        };
        assert!(!verify_proof(
            &key,
            b"nonce-1",
            "db",
            &e.id,
            &thief.proof(b"nonce-1", "db")
        ));
        // The secret appears nowhere in the file.
        let text = serde_json::to_string(&f).unwrap();
        let secret_hex = cred.rsplit('.').next().unwrap();
        assert!(!text.contains(secret_hex));
    }

    #[test]
    fn access_follows_grants_and_patterns() {
        let a = Authorized {
            id: Some("x".into()),
            admin: false,
            grants: grants(&[
                ("db", Role::Write),
                ("base-*", Role::Read),
                ("db", Role::Read),
            ]),
        };
        assert_eq!(a.access("db"), Access::Write);
        assert_eq!(a.access("base-1"), Access::Read);
        assert_eq!(a.access("base-"), Access::Read);
        assert_eq!(a.access("db2"), Access::None);
        assert_eq!(a.access("base"), Access::None);
        let all = Authorized {
            id: None,
            admin: false,
            grants: grants(&[("*", Role::Read)]),
        };
        assert_eq!(all.access("anything"), Access::Read);
        assert_eq!(Authorized::admin_token().access("x"), Access::Admin);
    }

    #[test]
    fn patterns_and_issue_arguments_are_checked() {
        for bad in ["", "a/b", ".x", "a*b", "**", &"x".repeat(65)] {
            assert!(check_pattern(bad).is_err(), "{bad:?}");
        }
        for good in ["*", "db", "db-*", "a.b_c-d"] {
            check_pattern(good).unwrap();
        }
        let mut f = CredentialFile::default();
        assert!(f.issue("x", false, vec![]).is_err(), "no role");
        assert!(
            f.issue("x", true, grants(&[("db", Role::Read)])).is_err(),
            "admin and grants"
        );
        assert!(f.issue("x\n", true, vec![]).is_err(), "control character");
        assert!(f.issue("x", false, grants(&[("a/b", Role::Read)])).is_err());
        assert!(f.credentials.is_empty(), "nothing issued by the refusals");
    }

    #[test]
    fn parse_tells_tokens_from_credentials() {
        assert!(ClientCredential::parse(b"some-admin-token").is_none());
        assert!(ClientCredential::parse(&[0xff, 0x00]).is_none());
        for bad in [
            "dvc1.",
            "dvc1.0123456789abcdef",
            "dvc1.0123456789abcde.00",
            &format!("dvc1.0123456789abcdeg.{}", "00".repeat(32)),
            &format!("dvc1.0123456789abcdef.{}", "00".repeat(31)),
            &format!("dvc1.0123456789abcdef.{}z", "00".repeat(32)),
        ] {
            assert!(
                matches!(ClientCredential::parse(bad.as_bytes()), Some(Err(_))),
                "{bad:?}"
            );
        }
        let ok = format!("dvc1.0123456789ABCDEF.{}\n", "ab".repeat(32));
        let c = ClientCredential::parse(ok.as_bytes()).unwrap().unwrap();
        assert_eq!(c.id, "0123456789abcdef");
    }

    #[test]
    fn store_reloads_revocations_and_keeps_the_table_over_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.json");
        let mut f = CredentialFile::default();
        let (e, cred) = f.issue("n", false, grants(&[("db", Role::Write)])).unwrap();
        f.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let store = CredentialStore::open(&path).unwrap();
        let c = ClientCredential::parse(cred.as_bytes()).unwrap().unwrap();
        let ok = store.authenticate(&c.id, b"n1", "db", &c.proof(b"n1", "db"));
        assert_eq!(ok.unwrap().access("db"), Access::Write);
        let other = store.authenticate(&c.id, b"n1", "other", &c.proof(b"n1", "other"));
        assert!(other.unwrap_err().0.contains("no role on volume other"));
        let g0 = store.generation();

        // Revoked in the file: refused after the refresh, and the generation moved.
        let mut f = CredentialFile::load(&path, false).unwrap();
        f.revoke(&e.id).unwrap();
        f.save(&path).unwrap();
        store.refresh();
        assert!(store.generation() > g0);
        let r = store.authenticate(&c.id, b"n2", "db", &c.proof(b"n2", "db"));
        assert!(r.unwrap_err().0.contains("revoked"));
        assert!(store.current(&e.id).is_none());

        // A replaced file keeps the mode it was given (e.g. 0640 for the server's group).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        f.save(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );

        // A damaged file keeps the last table (the revocation stays in force).
        std::fs::write(&path, b"{ not json").unwrap();
        store.refresh();
        assert!(store.current(&e.id).is_none());
        assert!(CredentialFile::load(&path, false)
            .unwrap_err()
            .to_string()
            .contains("not a credentials file"));
    }

    #[test]
    fn rotate_keeps_rights_and_both_work_until_revoked() {
        let mut f = CredentialFile::default();
        let (old, _) = f.issue("n", false, grants(&[("db", Role::Write)])).unwrap();
        let (new, cred) = f.rotate(&old.id).unwrap();
        assert_ne!(new.id, old.id);
        assert_eq!(new.grants, old.grants);
        assert_eq!(new.rotated_from.as_deref(), Some(old.id.as_str()));
        assert!(cred.starts_with(CREDENTIAL_PREFIX));
        f.revoke(&old.id).unwrap();
        assert!(
            f.rotate(&old.id).is_err(),
            "a revoked credential is not rotated"
        );
        assert!(f.revoke("ffffffffffffffff").is_err());
    }
}
