//! Where a store keeps its segments and manifests: the local filesystem (the embedded default)
//! or an S3-compatible object store through the `object_store` crate.
//!
//! * **Local** keeps the file layout of [`mod@super::format`] with its fsync discipline
//!   (segments and manifests written through tokio-uring, fsynced, renamed, directory
//!   fsynced). `object_store::local::LocalFileSystem` does not fsync, so the local backend does
//!   not go through it.
//! * **Object** (S3, Ceph RGW, MinIO, SeaweedFS, moto ...): under `PREFIX/volumes/<name>/`
//!   - `seg/<snap id:020>-<tag:032x>.seg`: immutable segment objects in the segment format
//!     (header, batches, crc'd index footer, trailer), uploaded in parts of [`PART_BYTES`] (a
//!     part is buffered in memory, never the whole snapshot); the random tag makes every upload
//!     its own object, so two servers racing on one snapshot never overwrite each other;
//!   - `manifest/<sequence:020>.dvm`: numbered manifests, each committed with a create-if-absent
//!     put (`PutMode::Create`) of the next number. The object is an envelope ([`ObjManifest`])
//!     around the usual manifest: the writer's generation, a random nonce (read back after an
//!     ambiguous error to learn whether this writer's put landed) and the segment tags. The
//!     highest number is the truth; exactly one writer can create each number, so no two
//!     servers both commit snapshot N and no chain forks.
//!
//! `object_store` runs on tokio: every call is spawned on a small multi-thread runtime owned by
//! [`ObjBackend`], and the shard awaits its `JoinHandle`, so a shard's tokio-uring loop never
//! blocks on the network.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{
    MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::{StoreError, StoreErrorKind};

/// Size of one multipart-upload part (S3 wants at least 5 MiB for all but the last).
pub const PART_BYTES: usize = 8 * 1024 * 1024;
/// Worker threads of the runtime that runs object-store calls.
pub const OBJECT_RUNTIME_THREADS: usize = 2;
/// Cap on an object manifest (envelope included).
pub const OBJ_MANIFEST_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Bytes of extent data the object backend keeps in memory for repeated reads (segments are
/// immutable and uniquely named, so a cached extent is never stale; crcs are checked on
/// every read all the same).
pub const EXTENT_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest extent read that goes into the cache.
pub const EXTENT_CACHE_ITEM_BYTES_MAX: usize = 1024 * 1024;

/// Cap on the segment tags one manifest carries.
pub const OBJ_MANIFEST_TAGS_MAX: usize = 16 * 1024 * 1024;

/// S3-compatible store settings.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible endpoint; `None` for AWS S3 itself.
    /// Plain `http://` is accepted only for a loopback host.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Key prefix inside the bucket (lets several deployments share one bucket).
    pub prefix: String,
    /// File with `access_key_id = ...` and `secret_access_key = ...` lines (optionally
    /// `session_token`; AWS-style `aws_` names and `[section]` lines accepted). Without it
    /// the standard `AWS_*` environment variables are used.
    pub credentials_file: Option<PathBuf>,
    /// Several servers share the store: refuse to start unless the start-up probe shows that
    /// create-if-absent puts hold.
    pub multi_server: bool,
    /// Multi-server: this server's name in lease objects (default: host, pid and a random
    /// suffix).
    pub server_id: Option<String>,
    /// Multi-server: lease duration (0: [`super::lease::LEASE_MS_DEFAULT`]).
    pub lease_ms: u64,
    /// Skip the start-up probe of conditional creates (test stores only).
    pub skip_create_probe: bool,
}

/// Which backend to use.
#[derive(Debug, Clone, Default)]
pub enum BackendConfig {
    /// Files under `DATA_DIR/volumes` (the default).
    #[default]
    Local,
    S3(S3Config),
}

/// A store backend, cheap to clone and shared by the shards.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `volumes_dir` = `DATA_DIR/volumes`.
    Local {
        volumes_dir: PathBuf,
    },
    Object(Arc<ObjBackend>),
}

impl Backend {
    /// Opens the backend `cfg` names; `data_dir` is the local directory (volumes for the
    /// local backend).
    pub fn open(cfg: &BackendConfig, data_dir: &Path) -> Result<Backend, StoreError> {
        match cfg {
            BackendConfig::Local => {
                let volumes_dir = data_dir.join("volumes");
                std::fs::create_dir_all(&volumes_dir)
                    .map_err(|e| StoreError::io(format!("create {}", volumes_dir.display()), e))?;
                Ok(Backend::Local { volumes_dir })
            }
            BackendConfig::S3(s3) => {
                let obj = Arc::new(ObjBackend::s3(s3)?);
                let probe = if s3.skip_create_probe {
                    tracing::warn!(
                        "start-up probe of conditional creates skipped (--no-create-probe)"
                    );
                    Ok(())
                } else {
                    obj.block_on(obj.probe_conditional_put())
                };
                match probe {
                    Ok(()) => tracing::info!(store = %obj.describe, "conditional create holds"),
                    Err(e) if s3.multi_server => return Err(e),
                    Err(e) if e.kind() == StoreErrorKind::Unsupported => tracing::warn!(
                        error = %e,
                        "single-server mode only: do not point a second server at this store"
                    ),
                    Err(e) => return Err(e),
                }
                super::lease::Leases::start_renewal(&obj);
                Ok(Backend::Object(obj))
            }
        }
    }

    /// Names of every volume in the store (unsorted).
    pub async fn list_volumes(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Backend::Local { volumes_dir } => {
                let rd = std::fs::read_dir(volumes_dir)
                    .map_err(|e| StoreError::io(format!("list {}", volumes_dir.display()), e))?;
                let mut out = Vec::new();
                for ent in rd {
                    let ent = ent.map_err(|e| StoreError::io("list volumes", e))?;
                    // Hidden entries are not volumes (a deleted volume on its way out).
                    if let Some(n) = ent.file_name().to_str().filter(|n| !n.starts_with('.')) {
                        out.push(n.to_string());
                    }
                }
                Ok(out)
            }
            Backend::Object(o) => o.list_dirs("volumes").await,
        }
    }

    /// Whether volumes are loaded when a connection asks for them, under a lease (several
    /// servers share the store), rather than all at start-up.
    pub fn loads_lazily(&self) -> bool {
        matches!(self, Backend::Object(o) if o.leases().is_some())
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Local { volumes_dir } => format!("local {}", volumes_dir.display()),
            Backend::Object(o) => o.describe.clone(),
        }
    }
}

/// An object store and the tokio runtime its calls run on.
pub struct ObjBackend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    describe: String,
    handle: tokio::runtime::Handle,
    /// Shut down in the background on drop (a runtime may not be dropped inside another).
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    /// Multi-server mode: the volume leases this server holds.
    leases: Option<super::lease::Leases>,
    /// Hot extents: (object key, offset) → bytes, least recently used out first.
    extent_cache: Mutex<ExtentCache>,
}

/// A byte-bounded LRU of extent reads.
struct ExtentCache {
    map: lru::LruCache<(String, u64), Bytes>,
    bytes: usize,
}

impl std::fmt::Debug for ObjBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjBackend")
            .field("store", &self.describe)
            .finish()
    }
}

impl Drop for ObjBackend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().ok().and_then(|mut g| g.take()) {
            rt.shutdown_background();
        }
    }
}

/// True when `host` (from a URL) is a loopback name or address.
fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    }
}

/// Checks an endpoint URL: https anywhere, http only on loopback. Returns whether it is http.
pub fn check_endpoint(endpoint: &str) -> Result<bool, StoreError> {
    let invalid = |why: String| StoreError::new(StoreErrorKind::Invalid, why);
    let u = url::Url::parse(endpoint)
        .map_err(|e| invalid(format!("object store endpoint {endpoint:?}: {e}")))?;
    let host = u
        .host()
        .ok_or_else(|| invalid(format!("object store endpoint {endpoint:?} has no host")))?;
    match u.scheme() {
        "https" => Ok(false),
        "http" if is_loopback_host(&host) => Ok(true),
        "http" => Err(invalid(format!(
            "object store endpoint {endpoint:?} uses plain http to a non-loopback host: \
             credentials and data would cross the network unencrypted; use https \
             (plain http is allowed only for 127.0.0.0/8, ::1 and localhost)"
        ))),
        s => Err(invalid(format!(
            "object store endpoint {endpoint:?}: scheme {s:?} is not http or https"
        ))),
    }
}

/// Credentials read from a file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Parses `name = value` lines (`#`/`;` comments and `[section]` lines ignored).
pub fn parse_credentials(text: &str) -> Result<FileCredentials, String> {
    let mut c = FileCredentials::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected `name = value`", i + 1))?;
        let v = v.trim().to_string();
        match k.trim().trim_start_matches("aws_") {
            "access_key_id" => c.access_key_id = v,
            "secret_access_key" => c.secret_access_key = v,
            "session_token" => c.session_token = Some(v),
            other => return Err(format!("line {}: unknown key {other:?}", i + 1)),
        }
    }
    if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
        return Err("access_key_id and secret_access_key are both required".into());
    }
    Ok(c)
}

/// `host-pid-random`: unique per server process.
fn default_server_id() -> Result<String, StoreError> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).map_err(|e| StoreError::io("getrandom", io::Error::other(e)))?;
    Ok(format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        u32::from_le_bytes(r)
    ))
}

/// The outcome of a create-if-absent put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// Another writer created the object first.
    Exists,
}

fn obj_err(ctx: impl Into<String>, e: object_store::Error) -> StoreError {
    StoreError::io(ctx, io::Error::other(e))
}

impl ObjBackend {
    /// An S3-compatible backend.
    pub fn s3(cfg: &S3Config) -> Result<ObjBackend, StoreError> {
        let invalid = |why: String| StoreError::new(StoreErrorKind::Invalid, why);
        if cfg.bucket.is_empty() {
            return Err(invalid(
                "the object store needs a bucket (--s3-bucket)".into(),
            ));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(if cfg.region.is_empty() {
                "us-east-1"
            } else {
                &cfg.region
            });
        if let Some(ep) = &cfg.endpoint {
            let http = check_endpoint(ep)?;
            b = b
                .with_endpoint(ep)
                .with_allow_http(http)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(path) = &cfg.credentials_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
            let c = parse_credentials(&text)
                .map_err(|e| invalid(format!("credentials file {}: {e}", path.display())))?;
            b = b
                .with_access_key_id(c.access_key_id)
                .with_secret_access_key(c.secret_access_key);
            if let Some(t) = c.session_token {
                b = b.with_token(t);
            }
        }
        let store = b
            .build()
            .map_err(|e| invalid(format!("object store configuration: {e}")))?;
        let prefix = cfg.prefix.trim_matches('/').to_string();
        let describe = format!(
            "s3 bucket {} at {}{}",
            cfg.bucket,
            cfg.endpoint.as_deref().unwrap_or("AWS"),
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" prefix {prefix}")
            }
        );
        let mut obj = Self::with_store(Arc::new(store), prefix, describe)?;
        if cfg.multi_server {
            let duration_ms = if cfg.lease_ms == 0 {
                super::lease::LEASE_MS_DEFAULT
            } else {
                cfg.lease_ms
            };
            if duration_ms < super::lease::LEASE_MS_MIN {
                return Err(invalid(format!(
                    "lease duration {duration_ms} ms is below the minimum of {} ms",
                    super::lease::LEASE_MS_MIN
                )));
            }
            let server_id = match &cfg.server_id {
                Some(id) if !id.is_empty() => id.clone(),
                _ => default_server_id()?,
            };
            tracing::info!(
                server_id,
                duration_ms,
                "multi-server mode: volumes are served under leases"
            );
            obj.leases = Some(super::lease::Leases::new(super::lease::LeaseSettings {
                server_id,
                duration_ms,
            }));
        }
        Ok(obj)
    }

    /// The leases of this server (multi-server mode only).
    pub fn leases(&self) -> Option<&super::lease::Leases> {
        self.leases.as_ref()
    }

    /// Wraps any object store (tests use `InMemory`).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        describe: String,
    ) -> Result<ObjBackend, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(OBJECT_RUNTIME_THREADS)
            .thread_name("dp-objstore")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the object-store runtime", e))?;
        Ok(ObjBackend {
            store,
            prefix,
            describe,
            handle: rt.handle().clone(),
            rt: Mutex::new(Some(rt)),
            leases: None,
            extent_cache: Mutex::new(ExtentCache {
                map: lru::LruCache::unbounded(),
                bytes: 0,
            }),
        })
    }

    /// The object path of `rel` (relative to the prefix).
    pub fn key(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Runs `f` on the object-store runtime and awaits it from any executor.
    pub async fn run<F, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.handle
            .spawn(f)
            .await
            .map_err(|e| StoreError::io("object-store task", io::Error::other(e)))
    }

    /// Runs `f` to completion from a thread outside any runtime (start-up, CLI tools).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Spawns `f` on the object-store runtime without waiting (best-effort clean-ups).
    pub fn spawn_detached<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(f);
    }

    /// Deletes `key` in the background, best effort (an object no manifest names; a failure
    /// leaves garbage that `gc` removes).
    pub fn delete_detached(&self, key: ObjPath) {
        let store = self.store();
        self.spawn_detached(async move {
            let _ = object_store::ObjectStoreExt::delete(store.as_ref(), &key).await;
        });
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// Creates `key` with `bytes` unless it exists. A create the store reports done is read
    /// back and compared: a store whose conditional put is not atomic (two racing creates
    /// both "succeed", the later overwriting) is caught here by the writer whose bytes were
    /// overwritten, which then reports `Exists` instead of a false win.
    pub async fn put_create(
        &self,
        key: &ObjPath,
        bytes: Vec<u8>,
    ) -> Result<CreateOutcome, StoreError> {
        let expect = Bytes::from(bytes);
        match self.put_create_once(key, expect.clone()).await? {
            CreateOutcome::Exists => Ok(CreateOutcome::Exists),
            CreateOutcome::Created => match self.get(key).await? {
                Some(b) if b == expect => Ok(CreateOutcome::Created),
                Some(_) => {
                    tracing::warn!(key = %key, "a create reported done was overwritten by a racing writer: the store's conditional put is not atomic");
                    Ok(CreateOutcome::Exists)
                }
                None => Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!("create {key}: the object is gone right after its creation"),
                )),
            },
        }
    }

    async fn put_create_once(
        &self,
        key: &ObjPath,
        bytes: Bytes,
    ) -> Result<CreateOutcome, StoreError> {
        let store = self.store();
        let k = key.clone();
        let res = self
            .run(async move {
                store
                    .put_opts(
                        &k,
                        PutPayload::from(bytes),
                        PutOptions {
                            mode: PutMode::Create,
                            ..Default::default()
                        },
                    )
                    .await
            })
            .await?;
        match res {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(CreateOutcome::Exists),
            Err(e) => Err(obj_err(format!("create {key}"), e)),
        }
    }

    /// Overwrites `key` with `bytes`.
    pub async fn put(&self, key: &ObjPath, bytes: Vec<u8>) -> Result<(), StoreError> {
        let store = self.store();
        let k = key.clone();
        self.run(async move { store.put(&k, PutPayload::from(bytes)).await })
            .await?
            .map(|_| ())
            .map_err(|e| obj_err(format!("put {key}"), e))
    }

    /// The whole object, or `None` if there is none.
    pub async fn get(&self, key: &ObjPath) -> Result<Option<Bytes>, StoreError> {
        let store = self.store();
        let k = key.clone();
        let res = self
            .run(async move {
                match store.get(&k).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        res.map_err(|e| obj_err(format!("get {key}"), e))
    }

    /// Bytes `range` of `key` (exactly: a short answer is an error).
    pub async fn get_range(&self, key: &ObjPath, range: Range<u64>) -> Result<Bytes, StoreError> {
        let store = self.store();
        let k = key.clone();
        let r = range.clone();
        let b = self
            .run(async move { store.get_range(&k, r).await })
            .await?
            .map_err(|e| obj_err(format!("get {key} bytes {}..{}", range.start, range.end), e))?;
        if b.len() as u64 != range.end - range.start {
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "get {key} bytes {}..{}: the store answered {} bytes",
                    range.start,
                    range.end,
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// Like [`ObjBackend::get_range`], through the hot-extent cache.
    pub async fn get_range_cached(
        &self,
        key: &ObjPath,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let id = (key.to_string(), range.start);
        let hit = {
            let mut c = self.extent_cache.lock().unwrap_or_else(|p| p.into_inner());
            c.map
                .get(&id)
                .filter(|b| b.len() as u64 == range.end - range.start)
                .cloned()
        };
        if let Some(b) = hit {
            return Ok(b);
        }
        let b = self.get_range(key, range).await?;
        if b.len() <= EXTENT_CACHE_ITEM_BYTES_MAX {
            let mut c = self.extent_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = c.map.put(id, b.clone()) {
                c.bytes -= old.len();
            }
            c.bytes += b.len();
            while c.bytes > EXTENT_CACHE_BYTES_MAX {
                match c.map.pop_lru() {
                    Some((_, old)) => c.bytes -= old.len(),
                    None => break,
                }
            }
        }
        Ok(b)
    }

    /// Metadata of `key`.
    pub async fn head(&self, key: &ObjPath) -> Result<Option<ObjectMeta>, StoreError> {
        let store = self.store();
        let k = key.clone();
        let res = self
            .run(async move {
                match store.head(&k).await {
                    Ok(m) => Ok(Some(m)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        res.map_err(|e| obj_err(format!("head {key}"), e))
    }

    pub async fn delete(&self, key: &ObjPath) -> Result<(), StoreError> {
        let store = self.store();
        let k = key.clone();
        let res = self.run(async move { store.delete(&k).await }).await?;
        match res {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(obj_err(format!("delete {key}"), e)),
        }
    }

    /// Every object under `rel/` (recursively).
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let store = self.store();
        let p = self.key(rel);
        let ctx = format!("list {p}");
        self.run(async move { store.list(Some(&p)).try_collect::<Vec<_>>().await })
            .await?
            .map_err(|e| obj_err(ctx, e))
    }

    /// Objects under `rel` whose keys sort after `rel`/`after` (S3's `start-after`).
    pub async fn list_after(&self, rel: &str, after: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let store = self.store();
        let p = self.key(rel);
        let offset = self.key(&format!("{rel}/{after}"));
        let ctx = format!("list {p} after {offset}");
        self.run(async move {
            store
                .list_with_offset(Some(&p), &offset)
                .try_collect::<Vec<_>>()
                .await
        })
        .await?
        .map_err(|e| obj_err(ctx, e))
    }

    /// Names of the "directories" right under `rel/`.
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>, StoreError> {
        let store = self.store();
        let p = self.key(rel);
        let ctx = format!("list {p}");
        let res = self
            .run(async move { store.list_with_delimiter(Some(&p)).await })
            .await?
            .map_err(|e| obj_err(ctx, e))?;
        Ok(res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Starts a multipart upload to `key`.
    pub async fn start_multipart(
        &self,
        key: &ObjPath,
    ) -> Result<Box<dyn MultipartUpload>, StoreError> {
        let store = self.store();
        let k = key.clone();
        self.run(async move { store.put_multipart(&k).await })
            .await?
            .map_err(|e| obj_err(format!("start multipart upload {key}"), e))
    }

    /// Start-up probe: does a create-if-absent put hold (the second create of one key fails,
    /// and of two racing creates exactly one wins)? Multi-server mode depends on it.
    pub async fn probe_conditional_put(&self) -> Result<(), StoreError> {
        let mut tag = [0u8; 16];
        getrandom::getrandom(&mut tag)
            .map_err(|e| StoreError::io("getrandom", io::Error::other(e)))?;
        let tag = u128::from_le_bytes(tag);
        let k1 = self.key(&format!("probe/{tag:032x}-a"));
        let unsupported = |why: String| {
            StoreError::new(
                StoreErrorKind::Unsupported,
                format!(
                    "{}: conditional create does not hold ({why}); several servers cannot \
                     share this store safely",
                    self.describe
                ),
            )
        };
        let first = self.put_create(&k1, b"probe-1".to_vec()).await?;
        let second = self.put_create(&k1, b"probe-2".to_vec()).await;
        let kept = self.get(&k1).await?;
        let _ = self.delete(&k1).await;
        if first != CreateOutcome::Created {
            return Err(unsupported("a fresh key was reported as existing".into()));
        }
        match second {
            Ok(CreateOutcome::Exists) => {}
            Ok(CreateOutcome::Created) => {
                return Err(unsupported("a second create of one key succeeded".into()))
            }
            Err(e) => return Err(unsupported(format!("a second create failed oddly: {e}"))),
        }
        if kept.as_deref() != Some(&b"probe-1"[..]) {
            return Err(unsupported("the first object was overwritten".into()));
        }
        // A race: 8 creates of one key at once, exactly one may win.
        let k2 = self.key(&format!("probe/{tag:032x}-b"));
        let store = self.store();
        let k = k2.clone();
        let wins = self
            .run(async move {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..8u8 {
                    let store = Arc::clone(&store);
                    let k = k.clone();
                    set.spawn(async move {
                        store
                            .put_opts(
                                &k,
                                PutPayload::from(vec![i]),
                                PutOptions {
                                    mode: PutMode::Create,
                                    ..Default::default()
                                },
                            )
                            .await
                            .is_ok()
                    });
                }
                let mut wins = 0;
                while let Some(r) = set.join_next().await {
                    wins += usize::from(r.unwrap_or(false));
                }
                wins
            })
            .await?;
        let _ = self.delete(&k2).await;
        if wins != 1 {
            return Err(unsupported(format!(
                "{wins} of 8 racing creates of one key won"
            )));
        }
        Ok(())
    }
}

// -------------------------------------------------------------------------------------------
// Object layout: keys and the manifest envelope
// -------------------------------------------------------------------------------------------

/// `volumes/<name>/manifest/<seq>.dvm`
pub fn manifest_rel(volume: &str, seq: u64) -> String {
    format!("volumes/{volume}/manifest/{seq:020}.dvm")
}

/// A random tag naming one upload's segment object (every upload its own object).
pub fn random_tag() -> Result<u128, StoreError> {
    let mut t = [0u8; 16];
    getrandom::getrandom(&mut t)
        .map_err(|e| StoreError::io("segment tag from getrandom", io::Error::other(e)))?;
    Ok(u128::from_le_bytes(t))
}

/// `volumes/<name>/floor.dvf`: every manifest numbered below the floor was deleted (trimmed).
pub fn floor_rel(volume: &str) -> String {
    format!("volumes/{volume}/floor.dvf")
}

pub const FLOOR_MAGIC: [u8; 8] = *b"DVFLOOR1";

/// The floor object: magic 8 | floor 8 | crc32c 4 (of the first 16 bytes).
pub fn encode_floor(floor: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&FLOOR_MAGIC);
    out.extend_from_slice(&floor.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_floor(buf: &[u8], what: &str) -> Result<u64, StoreError> {
    if buf.len() != 20
        || buf[..8] != FLOOR_MAGIC
        || crc32c::crc32c(&buf[..16]).to_le_bytes() != buf[16..20]
    {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("{what}: not a manifest floor (bad length, magic or crc32c)"),
        ));
    }
    Ok(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")))
}

/// The name of manifest number `seq` inside `volumes/<name>/manifest/`.
pub fn manifest_file_name(seq: u64) -> String {
    format!("{seq:020}.dvm")
}

/// `volumes/<name>/seg/<snap>-<tag>.seg`
pub fn segment_rel(volume: &str, snap_id: u64, tag: u128) -> String {
    format!("volumes/{volume}/seg/{snap_id:020}-{tag:032x}.seg")
}

/// Parses a segment object's file name back into (snap id, tag).
pub fn parse_segment_name(name: &str) -> Option<(u64, u128)> {
    let stem = name.strip_suffix(".seg")?;
    let (snap, tag) = stem.split_once('-')?;
    Some((snap.parse().ok()?, u128::from_str_radix(tag, 16).ok()?))
}

/// Parses a manifest object's file name back into its sequence number.
pub fn parse_manifest_name(name: &str) -> Option<u64> {
    name.strip_suffix(".dvm")?.parse().ok()
}

pub const OBJ_MANIFEST_MAGIC: [u8; 8] = *b"DVOMANI\x01";
pub const OBJ_MANIFEST_VERSION: u32 = 1;
const OBJ_MANIFEST_HEADER_BYTES: usize = 56;
const OBJ_TAG_BYTES: usize = 24;
const OBJ_RETIRED_BYTES: usize = 32;
/// Envelope feature bit: a retired-segment section follows the tags.
pub const OBJ_FEATURE_RETIRED: u32 = 1;
/// Cap on the retired segments one manifest carries.
pub const OBJ_MANIFEST_RETIRED_MAX: usize = 1 << 20;

/// A segment object no snapshot names any more (compaction replaced it), kept until the grace
/// period after `retired_ms` has passed: a reader that loaded an older manifest (a clone's view
/// on another server, a read in flight) may still fetch it. Then the server deletes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    pub id: u64,
    pub tag: u128,
    pub retired_ms: u64,
}

/// A numbered manifest object: who wrote it, and the segment tags, around the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjManifest {
    pub nonce: [u8; 16],
    pub writer_generation: u64,
    /// Segment id (its snapshot id) → upload tag naming its object.
    pub tags: HashMap<u64, u128>,
    /// Segment objects replaced by compaction, waiting for their grace period to end.
    pub retired: Vec<Retired>,
    /// The manifest in the format of [`super::format::encode_manifest`].
    pub manifest: Vec<u8>,
}

/// Envelope: magic 8 | version 4 | features 4 | nonce 16 | writer generation 8 | tag count 4 |
/// retired count 4 | manifest length 8 | tags (seg id 8, tag 16)* | retired (seg id 8, tag 16,
/// retired ms 8)* | manifest | crc32c 4 (of all before). The retired section is there only with
/// feature bit [`OBJ_FEATURE_RETIRED`] (set when it is not empty, so an envelope without one
/// stays readable by older builds).
pub fn encode_obj_manifest(m: &ObjManifest) -> Vec<u8> {
    let mut tags: Vec<(u64, u128)> = m.tags.iter().map(|(k, v)| (*k, *v)).collect();
    tags.sort_unstable();
    let features = if m.retired.is_empty() {
        0
    } else {
        OBJ_FEATURE_RETIRED
    };
    let mut out = Vec::with_capacity(
        OBJ_MANIFEST_HEADER_BYTES
            + tags.len() * OBJ_TAG_BYTES
            + m.retired.len() * OBJ_RETIRED_BYTES
            + m.manifest.len()
            + 4,
    );
    out.extend_from_slice(&OBJ_MANIFEST_MAGIC);
    out.extend_from_slice(&OBJ_MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&features.to_le_bytes());
    out.extend_from_slice(&m.nonce);
    out.extend_from_slice(&m.writer_generation.to_le_bytes());
    out.extend_from_slice(&(tags.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.retired.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.manifest.len() as u64).to_le_bytes());
    for (id, tag) in tags {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&tag.to_le_bytes());
    }
    for r in &m.retired {
        out.extend_from_slice(&r.id.to_le_bytes());
        out.extend_from_slice(&r.tag.to_le_bytes());
        out.extend_from_slice(&r.retired_ms.to_le_bytes());
    }
    out.extend_from_slice(&m.manifest);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks an object manifest envelope (size caps first, then crc, then fields).
pub fn decode_obj_manifest(buf: &[u8], what: &str) -> Result<ObjManifest, StoreError> {
    let corrupt = |why: &str| StoreError::new(StoreErrorKind::Corrupt, format!("{what}: {why}"));
    if buf.len() > OBJ_MANIFEST_MAX_BYTES {
        return Err(corrupt("larger than the manifest cap"));
    }
    if buf.len() < OBJ_MANIFEST_HEADER_BYTES + 4 || buf[..8] != OBJ_MANIFEST_MAGIC {
        return Err(corrupt("not a manifest object (bad magic or too short)"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(corrupt("crc32c mismatch"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    let features = u32_at(12);
    if version != OBJ_MANIFEST_VERSION || features & !OBJ_FEATURE_RETIRED != 0 {
        return Err(StoreError::new(
            StoreErrorKind::Unsupported,
            format!(
                "{what}: envelope version {version} features {features:#x}; this build reads \
                 version {OBJ_MANIFEST_VERSION} with features {OBJ_FEATURE_RETIRED:#x} at most"
            ),
        ));
    }
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&body[16..32]);
    let writer_generation = u64_at(32);
    let ntags = u32_at(40) as usize;
    let nretired = u32_at(44) as usize;
    let mlen = u64_at(48);
    if ntags > OBJ_MANIFEST_TAGS_MAX {
        return Err(corrupt("too many segment tags"));
    }
    if nretired > OBJ_MANIFEST_RETIRED_MAX {
        return Err(corrupt("too many retired segments"));
    }
    if (nretired != 0) != (features & OBJ_FEATURE_RETIRED != 0) {
        return Err(corrupt("retired count and feature bit disagree"));
    }
    let retired_at = OBJ_MANIFEST_HEADER_BYTES + ntags * OBJ_TAG_BYTES;
    let tags_end = retired_at + nretired * OBJ_RETIRED_BYTES;
    if tags_end as u64 + mlen != body.len() as u64 {
        return Err(corrupt("lengths do not add up"));
    }
    let mut tags = HashMap::with_capacity(ntags);
    for i in 0..ntags {
        let at = OBJ_MANIFEST_HEADER_BYTES + i * OBJ_TAG_BYTES;
        let id = u64_at(at);
        let tag = u128::from_le_bytes(body[at + 8..at + 24].try_into().expect("16 bytes"));
        if tags.insert(id, tag).is_some() {
            return Err(corrupt("a segment has two tags"));
        }
    }
    let retired = (0..nretired)
        .map(|i| {
            let at = retired_at + i * OBJ_RETIRED_BYTES;
            Retired {
                id: u64_at(at),
                tag: u128::from_le_bytes(body[at + 8..at + 24].try_into().expect("16 bytes")),
                retired_ms: u64_at(at + 24),
            }
        })
        .collect();
    Ok(ObjManifest {
        nonce,
        writer_generation,
        tags,
        retired,
        manifest: body[tags_end..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_rules() {
        assert!(check_endpoint("http://127.0.0.1:9000").unwrap());
        assert!(check_endpoint("http://localhost:9000").unwrap());
        assert!(check_endpoint("http://[::1]:9000").unwrap());
        assert!(!check_endpoint("https://s3.example.com").unwrap());
        let e = check_endpoint("http://10.0.0.5:9000").unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Invalid);
        assert!(e.to_string().contains("plain http"), "{e}");
        assert!(check_endpoint("ftp://127.0.0.1").is_err());
        assert!(check_endpoint("not a url").is_err());
    }

    #[test]
    fn credentials_file() {
        let c = parse_credentials(
            "[default]\n# comment\naws_access_key_id = AK\naws_secret_access_key=SK\n",
        )
        .unwrap();
        assert_eq!(c.access_key_id, "AK");
        assert_eq!(c.secret_access_key, "SK");
        assert_eq!(c.session_token, None);
        assert!(parse_credentials("access_key_id = AK\n").is_err());
        assert!(parse_credentials("access_key_id AK\n").is_err());
        assert!(parse_credentials("password = x\n").is_err());
    }

    #[test]
    fn obj_manifest_round_trip_and_corruption() {
        let m = ObjManifest {
            nonce: [7; 16],
            writer_generation: 42,
            tags: [(3u64, 0xdead_beefu128), (9, u128::MAX)]
                .into_iter()
                .collect(),
            retired: Vec::new(),
            manifest: b"manifest bytes".to_vec(),
        };
        let enc = encode_obj_manifest(&m);
        assert_eq!(decode_obj_manifest(&enc, "m").unwrap(), m);
        // Without retired segments the envelope has no feature bit (older builds read it).
        assert_eq!(enc[12..16], [0, 0, 0, 0]);
        let mut with_retired = m.clone();
        with_retired.retired = vec![
            Retired {
                id: 1 << 63 | 5,
                tag: 0xabcd,
                retired_ms: 1_700_000_000_000,
            },
            Retired {
                id: 4,
                tag: 1,
                retired_ms: 2,
            },
        ];
        let enc2 = encode_obj_manifest(&with_retired);
        assert_eq!(decode_obj_manifest(&enc2, "m").unwrap(), with_retired);
        assert_eq!(enc2[12..16], OBJ_FEATURE_RETIRED.to_le_bytes());
        for i in [0, 9, 20, 40, enc.len() - 20, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_obj_manifest(&bad, "m").is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(decode_obj_manifest(&enc[..enc.len() - 1], "m").is_err());
    }

    #[test]
    fn names_round_trip() {
        let rel = segment_rel("vol", 12, 0xabc);
        let name = rel.rsplit('/').next().unwrap();
        assert_eq!(parse_segment_name(name), Some((12, 0xabc)));
        let rel = manifest_rel("vol", 77);
        assert_eq!(
            parse_manifest_name(rel.rsplit('/').next().unwrap()),
            Some(77)
        );
        assert_eq!(parse_segment_name("junk"), None);
    }
}
