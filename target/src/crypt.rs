//! Client-side encryption, opt-in per volume: what a volume ships to the data plane is sealed
//! on this node, so neither the data plane nor the object store behind it ever holds the
//! volume's plaintext, and the key never leaves this node.
//!
//! ## Where
//! A layer at the data-plane client's edge, nothing deeper: the ship path seals each extent
//! right before `put_extent`, and every path that reads the data plane opens what
//! `read_extents` returned right after it — hydration and the reads it serves, `recover
//! --at`'s way back, `verify`, `export` — all through one handle, [`BlockCodec`]. The SSD
//! cache, the backing file and the outbox hold plaintext: they are on this node, as the key is.
//!
//! ## The envelope
//! An encrypted volume is stored on the data plane with block size 4096 + [`ENVELOPE_BYTES`]
//! (4160) and the same block count; the data plane stores, checksums and compacts such blocks
//! like any others, and never learns more. Each data-plane block is one envelope:
//! `[0..4) magic "DVE1" | [4..12) key id | [12..36) nonce (24 random bytes) |
//!  [36..52) Poly1305 tag | [52..64) zero | [64..4160) ciphertext`,
//! sealed with XChaCha20-Poly1305 under associated data `magic | key id | LBA (u64 LE)`: a
//! block moved to another LBA, or sealed under another key, fails to open. Every write of a
//! block gets a fresh random 192-bit nonce from the OS (a repeat under one key has odds of
//! about 2^-96 after 2^48 sealed blocks), so nonces need no state and survive any crash.
//!
//! ## The key
//! 32 random bytes in a file of 64 hex digits (and an optional newline), mode 0600 or
//! tighter (`deltavol keygen FILE` writes one). It is read on this node and used here only:
//! never logged, never sent. Its *key id*, the first 8 bytes of HMAC-SHA256(key,
//! `"deltavol key id v1"`), names it without revealing it: in every envelope, in the volume's
//! cache dir (`encryption`), in `status` and in errors.
//!
//! ## What the data plane can and cannot do
//! It cannot read a block, nor make one read as other data: a changed byte anywhere in an
//! envelope, a block moved to another LBA, or a block of another key fails to open, and the
//! read is an error (EIO, [`CryptError`]), never data. What it still can:
//! - make a block read as zeros: an all-zero data-plane block (never written, or the zero
//!   extent of a discard / write-zeroes) opens to zeros, as it must for the data plane to keep
//!   zero extents without data;
//! - serve an older version of a block, or of the whole volume (a rollback): an envelope does
//!   not name its snapshot; and swap blocks at the same LBA between volumes sealed with the
//!   same key (a clone shares its source's key by design);
//! - see the metadata: the volume's name, size and snapshots, which LBAs each snapshot writes
//!   and when, which are zero, and how much changes.

use crate::cache::meta::BLOCK_SIZE;
use crate::error::{Error, ErrorKind, Result};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use deltavol_dataplane::{Client, ClientError, VolumeInfo};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

/// Bytes an envelope adds to each block on the data plane (header: magic, key id, nonce, tag,
/// reserved). The data plane accepts a block size that is a power of two plus this.
pub const ENVELOPE_BYTES: u32 = 64;
/// The first bytes of every envelope.
pub const ENVELOPE_MAGIC: &[u8; 4] = b"DVE1";
/// What `status` and errors call the cipher.
pub const CIPHER_NAME: &str = "xchacha20poly1305";
/// The block size of an encrypted volume on the data plane.
pub const SEALED_BLOCK_BYTES: u32 = BLOCK_SIZE as u32 + ENVELOPE_BYTES;
/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a key id.
pub const KEY_ID_BYTES: usize = 8;
/// Blocks sealed (or opened) per round trip through the scratch buffer: a bounded buffer
/// (about 1 MiB sealing, 2 MiB opening) whatever the extent.
const SEAL_CHUNK_BLOCKS: u64 = 256;
const OPEN_CHUNK_BLOCKS: u64 = 512;
/// How far into a snapshot [`BlockCodec::check_remote`] looks for a block to check the key
/// against (1 GiB of the volume, 1 MiB of checksums).
pub const SAMPLE_SCAN_BLOCKS_MAX: u64 = 1 << 18;

const KEY_ID_CONTEXT: &[u8] = b"deltavol key id v1";
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const OFF_KEY_ID: usize = 4;
const OFF_NONCE: usize = OFF_KEY_ID + KEY_ID_BYTES;
const OFF_TAG: usize = OFF_NONCE + NONCE_BYTES;
const OFF_RESERVED: usize = OFF_TAG + TAG_BYTES;
const HDR: usize = ENVELOPE_BYTES as usize;

/// A key's public name (see the module doc).
pub type KeyId = [u8; KEY_ID_BYTES];

/// A key id as 16 hex digits.
pub fn key_id_hex(id: &KeyId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a data-plane block size is that of an encrypted volume: a power of two in the data
/// plane's range plus [`ENVELOPE_BYTES`].
pub fn is_sealed_block_size(block_size: u32) -> bool {
    block_size
        .checked_sub(ENVELOPE_BYTES)
        .is_some_and(|b| b.is_power_of_two() && (512..=64 * 1024).contains(&b))
}

/// Why a block read from the data plane was refused. Never retried into data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptError {
    /// The block was sealed under another key.
    #[error("block {lba} was sealed with key id {got}, not with this volume's key (id {expected}): give the key the volume was created with", got = key_id_hex(got_id), expected = key_id_hex(expected_id))]
    WrongKey {
        lba: u64,
        expected_id: KeyId,
        got_id: KeyId,
    },
    /// The envelope fails authentication: changed on the data plane or on the way, or moved
    /// from another LBA.
    #[error("block {lba} failed authentication: its envelope on the data plane was changed or damaged, or belongs to another block; refused (never returned as data)")]
    Tampered { lba: u64 },
    /// The OS gave no random bytes for a nonce: nothing is sealed.
    #[error("no random bytes for a nonce: {0}")]
    Random(String),
}

impl CryptError {
    /// The block it is about, if any.
    pub fn lba(&self) -> Option<u64> {
        match self {
            CryptError::WrongKey { lba, .. } | CryptError::Tampered { lba } => Some(*lba),
            CryptError::Random(_) => None,
        }
    }
}

/// A failed exchange with the data plane through a [`BlockCodec`].
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The data plane (or the connection) failed: retry.
    #[error(transparent)]
    DataPlane(#[from] ClientError),
    /// What it returned does not open: never data.
    #[error(transparent)]
    Crypt(#[from] CryptError),
}

/// A volume key (see the module doc). Its `Debug` shows the key id only.
pub struct VolumeKey {
    cipher: XChaCha20Poly1305,
    id: KeyId,
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeKey(id {})", key_id_hex(&self.id))
    }
}

fn key_file_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("encryption key file {}: {what}", path.display()))
}

impl VolumeKey {
    /// The key of these bytes (tests, benchmarks; a volume's key comes from a file).
    pub fn from_bytes(key: &[u8; KEY_BYTES]) -> VolumeKey {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .expect("HMAC takes a key of any length");
        mac.update(KEY_ID_CONTEXT);
        let full = mac.finalize().into_bytes();
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&full[..KEY_ID_BYTES]);
        VolumeKey {
            cipher: XChaCha20Poly1305::new(Key::from_slice(key)),
            id,
        }
    }

    /// Reads a key file: 64 hex digits and an optional newline, readable by its owner only
    /// (mode 0600 or tighter). Anything else is refused, saying what is wrong.
    pub fn load(path: &Path) -> Result<VolumeKey> {
        let md = std::fs::metadata(path).map_err(|e| Error::io("read encryption key", path, e))?;
        if !md.is_file() {
            return Err(key_file_err(path, "is not a regular file"));
        }
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_file_err(
                path,
                format_args!(
                    "is open to group or others (mode {mode:04o}): `chmod 600 {}` (the key must be readable by its owner only)",
                    path.display()
                ),
            ));
        }
        let want = KEY_BYTES * 2;
        if md.len() != want as u64 && md.len() != want as u64 + 1 {
            return Err(key_file_err(
                path,
                format_args!(
                    "holds {} bytes, not a key: it must hold {want} hex digits (a 256-bit key, as `deltavol keygen` writes) and an optional newline",
                    md.len()
                ),
            ));
        }
        let text = std::fs::read(path).map_err(|e| Error::io("read encryption key", path, e))?;
        let digits = match text.as_slice() {
            [d @ .., b'\n'] if d.len() == want => d,
            d if d.len() == want => d,
            _ => {
                return Err(key_file_err(
                    path,
                    format_args!(
                        "must hold {want} hex digits and an optional newline ({} bytes read)",
                        text.len()
                    ),
                ))
            }
        };
        let mut key = [0u8; KEY_BYTES];
        for (i, pair) in digits.chunks(2).enumerate() {
            let nib = |c: u8, at: usize| {
                (c as char).to_digit(16).ok_or_else(|| {
                    key_file_err(
                        path,
                        format_args!("byte {at} is not a hex digit: it must hold {want} hex digits (as `deltavol keygen` writes)"),
                    )
                })
            };
            key[i] = (nib(pair[0], 2 * i)? << 4 | nib(pair[1], 2 * i + 1)?) as u8;
        }
        let k = VolumeKey::from_bytes(&key);
        key.fill(0);
        Ok(k)
    }

    /// Makes a new random key in a new file `path` (mode 0600, synced). Never overwrites: a
    /// file already there may be the only key of a volume.
    pub fn generate(path: &Path) -> Result<VolumeKey> {
        let mut key = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut key)
            .map_err(|e| Error::new(ErrorKind::Io, format!("no random bytes for a key: {e}")))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(key_file_err(
                    path,
                    "exists already: keygen never overwrites a key file (a volume sealed with that key could never be read again); give a new path",
                ))
            }
            Err(e) => return Err(Error::io("create encryption key file", path, e)),
        };
        let mut text: String = key.iter().map(|b| format!("{b:02x}")).collect();
        text.push('\n');
        let r = f
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|_| f.write_all(text.as_bytes()))
            .and_then(|_| f.sync_all());
        // The hex copy is wiped before it is freed (the key is kept nowhere but the cipher).
        let mut bytes = text.into_bytes();
        bytes.fill(0);
        if let Err(e) = r {
            let _ = std::fs::remove_file(path);
            return Err(Error::io("write encryption key file", path, e));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("fsync", dir, e))?;
        let k = VolumeKey::from_bytes(&key);
        key.fill(0);
        Ok(k)
    }

    /// The key's public name.
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    fn aad(&self, lba: u64) -> [u8; 20] {
        let mut a = [0u8; 20];
        a[..4].copy_from_slice(ENVELOPE_MAGIC);
        a[4..12].copy_from_slice(&self.id);
        a[12..20].copy_from_slice(&lba.to_le_bytes());
        a
    }

    /// Seals the block at device `lba` (`plain`: one 4096-byte block) into `out` (one
    /// [`SEALED_BLOCK_BYTES`] envelope) with a fresh random nonce.
    pub fn seal_block(&self, lba: u64, plain: &[u8], out: &mut [u8]) -> Result<(), CryptError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::getrandom(&mut nonce).map_err(|e| CryptError::Random(e.to_string()))?;
        self.seal_with(lba, &nonce, plain, out);
        Ok(())
    }

    fn seal_with(&self, lba: u64, nonce: &[u8], plain: &[u8], out: &mut [u8]) {
        assert_eq!(plain.len(), BLOCK_SIZE as usize, "seal: one block");
        assert_eq!(out.len(), SEALED_BLOCK_BYTES as usize, "seal: one envelope");
        let (hdr, body) = out.split_at_mut(HDR);
        hdr[..OFF_KEY_ID].copy_from_slice(ENVELOPE_MAGIC);
        hdr[OFF_KEY_ID..OFF_NONCE].copy_from_slice(&self.id);
        hdr[OFF_NONCE..OFF_TAG].copy_from_slice(nonce);
        hdr[OFF_RESERVED..].fill(0);
        body.copy_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(nonce), &self.aad(lba), body)
            .expect("XChaCha20-Poly1305 seals any block-sized buffer");
        hdr[OFF_TAG..OFF_RESERVED].copy_from_slice(&tag);
    }

    /// Seals `plain` (whole blocks from device block `lba` on) into `out` (one envelope per
    /// block), with one call to the OS for every nonce.
    pub fn seal_extent(&self, lba: u64, plain: &[u8], out: &mut [u8]) -> Result<(), CryptError> {
        let bs = BLOCK_SIZE as usize;
        let n = plain.len() / bs;
        assert_eq!(plain.len(), n * bs, "seal: whole blocks");
        assert_eq!(out.len(), n * SEALED_BLOCK_BYTES as usize, "seal: room");
        let mut nonces = [0u8; NONCE_BYTES * SEAL_CHUNK_BLOCKS as usize];
        for (c, (p, o)) in plain
            .chunks(bs * SEAL_CHUNK_BLOCKS as usize)
            .zip(out.chunks_mut(SEALED_BLOCK_BYTES as usize * SEAL_CHUNK_BLOCKS as usize))
            .enumerate()
        {
            let k = p.len() / bs;
            let nonces = &mut nonces[..k * NONCE_BYTES];
            getrandom::getrandom(nonces).map_err(|e| CryptError::Random(e.to_string()))?;
            for (i, (pb, ob)) in p
                .chunks(bs)
                .zip(o.chunks_mut(SEALED_BLOCK_BYTES as usize))
                .enumerate()
            {
                let b = lba + (c * SEAL_CHUNK_BLOCKS as usize + i) as u64;
                self.seal_with(b, &nonces[i * NONCE_BYTES..(i + 1) * NONCE_BYTES], pb, ob);
            }
        }
        Ok(())
    }

    /// Opens the envelope of device block `lba` into `out` (one block). An all-zero envelope
    /// (never written, or zeroed by a discard) opens to zeros. On an error `out` is zeros.
    pub fn open_block(&self, lba: u64, env: &[u8], out: &mut [u8]) -> Result<(), CryptError> {
        assert_eq!(env.len(), SEALED_BLOCK_BYTES as usize, "open: one envelope");
        assert_eq!(out.len(), BLOCK_SIZE as usize, "open: one block");
        let r = self.open_inner(lba, env, out);
        if r.is_err() {
            out.fill(0);
        }
        r
    }

    fn open_inner(&self, lba: u64, env: &[u8], out: &mut [u8]) -> Result<(), CryptError> {
        let (hdr, body) = env.split_at(HDR);
        if &hdr[..OFF_KEY_ID] != ENVELOPE_MAGIC {
            if env.iter().all(|&b| b == 0) {
                out.fill(0);
                return Ok(());
            }
            return Err(CryptError::Tampered { lba });
        }
        let mut got_id = [0u8; KEY_ID_BYTES];
        got_id.copy_from_slice(&hdr[OFF_KEY_ID..OFF_NONCE]);
        if got_id != self.id {
            return Err(CryptError::WrongKey {
                lba,
                expected_id: self.id,
                got_id,
            });
        }
        if hdr[OFF_RESERVED..].iter().any(|&b| b != 0) {
            return Err(CryptError::Tampered { lba });
        }
        out.copy_from_slice(body);
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&hdr[OFF_NONCE..OFF_TAG]),
                &self.aad(lba),
                out,
                Tag::from_slice(&hdr[OFF_TAG..OFF_RESERVED]),
            )
            .map_err(|_| CryptError::Tampered { lba })
    }
}

/// How a volume's blocks cross to and from the data plane: as they are, or sealed in
/// envelopes under the volume's key. The one handle the ship, hydration, verify and CLI paths
/// hold (cheap to clone); `Default` is plain. Its `Debug` shows the key id only.
#[derive(Clone, Default)]
pub struct BlockCodec {
    key: Option<Arc<VolumeKey>>,
}

impl std::fmt::Debug for BlockCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockCodec({})", self.describe())
    }
}

impl BlockCodec {
    /// Blocks go as they are (an unencrypted volume).
    pub fn plain() -> BlockCodec {
        BlockCodec::default()
    }

    /// Blocks go sealed under `key`.
    pub fn sealed(key: VolumeKey) -> BlockCodec {
        BlockCodec {
            key: Some(Arc::new(key)),
        }
    }

    /// `--encryption-key-file`: sealed under the key in `path`, plain without one.
    pub fn from_key_file(path: Option<&Path>) -> Result<BlockCodec> {
        Ok(match path {
            Some(p) => BlockCodec::sealed(VolumeKey::load(p)?),
            None => BlockCodec::plain(),
        })
    }

    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// The key's id, for an encrypted volume.
    pub fn key_id(&self) -> Option<KeyId> {
        self.key.as_ref().map(|k| k.key_id())
    }

    /// `none`, or `xchacha20poly1305 (key id …)` (as `status` shows it).
    pub fn describe(&self) -> String {
        describe_key_id(self.key_id().as_ref())
    }

    /// The volume's block size on the data plane.
    pub fn dp_block_size(&self) -> u32 {
        if self.is_encrypted() {
            SEALED_BLOCK_BYTES
        } else {
            BLOCK_SIZE as u32
        }
    }

    /// The volume's size on the data plane, for a device of `device_bytes`: the same blocks.
    pub fn dp_size_bytes(&self, device_bytes: u64) -> u64 {
        device_bytes / BLOCK_SIZE * u64::from(self.dp_block_size())
    }

    /// Adds an extent of plaintext blocks (`plain`, from device block `lba` on) to the
    /// snapshot `c` is uploading: sealed first when the volume is encrypted (in chunks,
    /// through `scratch`, which keeps its capacity for the next call).
    pub fn put_extent(
        &self,
        c: &mut Client,
        lba: u64,
        plain: &[u8],
        scratch: &mut Vec<u8>,
    ) -> std::result::Result<(), RemoteError> {
        let n = plain.len() as u64 / BLOCK_SIZE;
        let Some(key) = &self.key else {
            return Ok(c.put_extent(lba, n as u32, plain)?);
        };
        let mut done = 0u64;
        while done < n {
            let k = (n - done).min(SEAL_CHUNK_BLOCKS);
            let p = &plain[(done * BLOCK_SIZE) as usize..((done + k) * BLOCK_SIZE) as usize];
            scratch.resize((k * u64::from(SEALED_BLOCK_BYTES)) as usize, 0);
            key.seal_extent(lba + done, p, scratch)?;
            c.put_extent(lba + done, k as u32, scratch)?;
            done += k;
        }
        Ok(())
    }

    /// Reads blocks `[lba, lba + n)` of snapshot `snap` as plaintext into `out` (`n` blocks),
    /// opening each envelope of an encrypted volume. A block that does not open is listed in
    /// the answer (its bytes in `out` are zeros and must not be used); the others are good.
    /// Fails as a whole only when the data plane does.
    pub fn read_blocks(
        &self,
        c: &mut Client,
        snap: u64,
        lba: u64,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> std::result::Result<Vec<CryptError>, ClientError> {
        let bs = BLOCK_SIZE as usize;
        let n = (out.len() / bs) as u64;
        let Some(key) = &self.key else {
            c.read_extents(snap, lba, n, out)?;
            return Ok(Vec::new());
        };
        let sbs = SEALED_BLOCK_BYTES as usize;
        let mut bad = Vec::new();
        let mut done = 0u64;
        while done < n {
            let k = (n - done).min(OPEN_CHUNK_BLOCKS);
            scratch.resize(k as usize * sbs, 0);
            c.read_extents(snap, lba + done, k, scratch)?;
            for i in 0..k as usize {
                let b = done as usize + i;
                let o = &mut out[b * bs..(b + 1) * bs];
                if let Err(e) = key.open_block(lba + b as u64, &scratch[i * sbs..(i + 1) * sbs], o)
                {
                    bad.push(e);
                }
            }
            done += k;
        }
        Ok(bad)
    }

    /// [`BlockCodec::read_blocks`] where any block that does not open fails the read.
    pub fn read_exact(
        &self,
        c: &mut Client,
        snap: u64,
        lba: u64,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> std::result::Result<(), RemoteError> {
        let mut bad = self.read_blocks(c, snap, lba, out, scratch)?;
        match bad.is_empty() {
            true => Ok(()),
            false => Err(RemoteError::Crypt(bad.swap_remove(0))),
        }
    }

    /// Checks that the data plane's volume `volume` (as `info` describes it) is read and
    /// written with this codec: refuses, saying what to do, a volume encrypted on the data
    /// plane without a key, an unencrypted one with a key, and block sizes this build does
    /// not know. A missing volume passes (it is created with this codec's geometry).
    pub fn check_geometry(&self, volume: &str, info: &VolumeInfo) -> Result<()> {
        if !info.exists {
            return Ok(());
        }
        let bs = info.block_size;
        let sealed = is_sealed_block_size(bs);
        match (sealed, self.is_encrypted()) {
            (true, false) => Err(Error::mismatch(format!(
                "volume {volume} is encrypted on the data plane: give --encryption-key-file with the key it was created with"
            ))),
            (false, true) if bs == BLOCK_SIZE as u32 => Err(Error::mismatch(format!(
                "volume {volume} is not encrypted on the data plane (its blocks are stored as they are): leave out --encryption-key-file; encryption is chosen when a volume is created (to encrypt this data, copy it into a new volume created with the key)"
            ))),
            _ if bs != self.dp_block_size() => Err(Error::mismatch(format!(
                "volume {volume} has block size {bs} on the data plane; this deltavol reads {} ({}): use a matching release",
                self.dp_block_size(),
                if self.is_encrypted() { "4096-byte blocks sealed in 64-byte envelopes" } else { "4096-byte blocks" }
            ))),
            _ => Ok(()),
        }
    }

    /// [`BlockCodec::check_geometry`], then, for an encrypted volume, checks the key against
    /// the first block of snapshot `snap` that is not all zero (found by checksums within
    /// the first [`SAMPLE_SCAN_BLOCKS_MAX`] blocks): a volume sealed under another key is
    /// refused, naming both key ids, before anything is created or changed. `c` is connected
    /// to the volume.
    pub fn check_remote(
        &self,
        c: &mut Client,
        volume: &str,
        info: &VolumeInfo,
        snap: u64,
    ) -> Result<()> {
        self.check_geometry(volume, info)?;
        let Some(key) = &self.key else {
            return Ok(());
        };
        if !info.exists || snap == 0 {
            return Ok(());
        }
        let dp = |e: ClientError| {
            Error::new(
                ErrorKind::Io,
                format!("data plane: checking the key against volume {volume}@{snap}: {e}"),
            )
        };
        let nblocks = (info.size_bytes / u64::from(SEALED_BLOCK_BYTES)).min(SAMPLE_SCAN_BLOCKS_MAX);
        let zero_crc = crc32c::crc32c(&[0u8; SEALED_BLOCK_BYTES as usize]);
        let mut lba = 0u64;
        while lba < nblocks {
            let n = (nblocks - lba).min(deltavol_schemas::CHECKSUM_BLOCKS_MAX);
            let crcs = c.read_checksums(snap, lba, n).map_err(dp)?;
            if let Some(i) = crcs.iter().position(|&x| x != zero_crc) {
                let b = lba + i as u64;
                let mut env = vec![0u8; SEALED_BLOCK_BYTES as usize];
                c.read_extents(snap, b, 1, &mut env).map_err(dp)?;
                let mut plain = vec![0u8; BLOCK_SIZE as usize];
                return match key.open_block(b, &env, &mut plain) {
                    Err(CryptError::WrongKey {
                        expected_id,
                        got_id,
                        ..
                    }) => Err(Error::mismatch(format!(
                        "volume {volume} is encrypted with key id {}, but the key given (--encryption-key-file) has key id {}: give the key it was created with",
                        key_id_hex(&got_id),
                        key_id_hex(&expected_id)
                    ))),
                    Err(e) => {
                        tracing::warn!(volume, snapshot = snap, error = %e, "a block of the volume fails authentication: reads of it will fail (EIO)");
                        Ok(())
                    }
                    Ok(()) => Ok(()),
                };
            }
            lba += n;
        }
        Ok(())
    }
}

/// `none`, or `xchacha20poly1305 (key id …)`.
pub fn describe_key_id(id: Option<&KeyId>) -> String {
    match id {
        Some(id) => format!("{CIPHER_NAME} (key id {})", key_id_hex(id)),
        None => "none".to_string(),
    }
}

/// The size of the device of a data-plane volume: its stored size, less the envelopes of an
/// encrypted one (the same block count, each block 64 bytes smaller).
pub fn device_size_bytes(info: &VolumeInfo) -> u64 {
    device_bytes(info.block_size, info.size_bytes)
}

/// `dp_bytes` of a data-plane volume of block size `block_size` as the device's bytes: the
/// same for a plain volume, without the envelopes for an encrypted one.
pub fn device_bytes(block_size: u32, dp_bytes: u64) -> u64 {
    if is_sealed_block_size(block_size) {
        dp_bytes / u64::from(block_size) * u64::from(block_size - ENVELOPE_BYTES)
    } else {
        dp_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_bytes(&[b; KEY_BYTES])
    }

    fn block(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE as usize)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn round_trip_and_envelope_layout() {
        let k = key(1);
        let plain = block(7);
        let mut env = vec![0u8; SEALED_BLOCK_BYTES as usize];
        k.seal_block(42, &plain, &mut env).unwrap();
        assert_eq!(&env[..4], ENVELOPE_MAGIC);
        assert_eq!(&env[4..12], &k.key_id());
        assert!(
            env[52..64].iter().all(|&b| b == 0),
            "reserved bytes are zero"
        );
        assert_ne!(&env[64..], &plain[..], "the body is ciphertext");
        let mut out = vec![0u8; BLOCK_SIZE as usize];
        k.open_block(42, &env, &mut out).unwrap();
        assert_eq!(out, plain);
        // A fresh nonce each time: the same block seals differently.
        let mut env2 = vec![0u8; SEALED_BLOCK_BYTES as usize];
        k.seal_block(42, &plain, &mut env2).unwrap();
        assert_ne!(env, env2);
        // An extent seals block by block at consecutive LBAs.
        let plain3: Vec<u8> = [block(1), block(2), block(3)].concat();
        let mut env3 = vec![0u8; 3 * SEALED_BLOCK_BYTES as usize];
        k.seal_extent(100, &plain3, &mut env3).unwrap();
        for i in 0..3 {
            let e = &env3[i * 4160..(i + 1) * 4160];
            k.open_block(100 + i as u64, e, &mut out).unwrap();
            assert_eq!(out, plain3[i * 4096..(i + 1) * 4096]);
        }
    }

    #[test]
    fn the_lba_is_bound_and_every_changed_byte_is_refused() {
        let k = key(2);
        let plain = block(9);
        let mut env = vec![0u8; SEALED_BLOCK_BYTES as usize];
        k.seal_block(5, &plain, &mut env).unwrap();
        let mut out = vec![0xaau8; BLOCK_SIZE as usize];
        // Moved to another LBA: refused, and nothing of it is left in `out`.
        assert_eq!(
            k.open_block(6, &env, &mut out),
            Err(CryptError::Tampered { lba: 6 })
        );
        assert!(out.iter().all(|&b| b == 0));
        // One flipped bit anywhere except the key id: tampered. In the key id: another key.
        for at in [0usize, 3, 12, 35, 36, 51, 52, 63, 64, 2000, 4159] {
            let mut e = env.clone();
            e[at] ^= 0x10;
            assert_eq!(
                k.open_block(5, &e, &mut out),
                Err(CryptError::Tampered { lba: 5 }),
                "byte {at}"
            );
        }
        let mut e = env.clone();
        e[7] ^= 1;
        assert!(matches!(
            k.open_block(5, &e, &mut out),
            Err(CryptError::WrongKey { lba: 5, .. })
        ));
    }

    #[test]
    fn another_key_is_named() {
        let (a, b) = (key(3), key(4));
        assert_ne!(a.key_id(), b.key_id());
        let mut env = vec![0u8; SEALED_BLOCK_BYTES as usize];
        a.seal_block(1, &block(1), &mut env).unwrap();
        let mut out = vec![0u8; BLOCK_SIZE as usize];
        let e = b.open_block(1, &env, &mut out).unwrap_err();
        assert_eq!(
            e,
            CryptError::WrongKey {
                lba: 1,
                expected_id: b.key_id(),
                got_id: a.key_id()
            }
        );
        let msg = e.to_string();
        assert!(msg.contains(&key_id_hex(&a.key_id())) && msg.contains(&key_id_hex(&b.key_id())));
    }

    #[test]
    fn an_all_zero_envelope_opens_to_zeros_and_little_else_does() {
        let k = key(5);
        let zero = vec![0u8; SEALED_BLOCK_BYTES as usize];
        let mut out = vec![0xffu8; BLOCK_SIZE as usize];
        k.open_block(9, &zero, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        // A zeroed header over a body that is not zero is no envelope.
        let mut e = zero.clone();
        e[100] = 1;
        assert_eq!(
            k.open_block(9, &e, &mut out),
            Err(CryptError::Tampered { lba: 9 })
        );
    }

    #[test]
    fn key_ids_are_stable_and_geometry_is_recognised() {
        // HMAC-SHA256(key, "deltavol key id v1"), first 8 bytes (Python's hmac module agrees).
        assert_eq!(key_id_hex(&key(0).key_id()), "590b4e7fcf9c8634");
        assert_eq!(key_id_hex(&key(1).key_id()), "9312af97fe955a7e");
        assert!(is_sealed_block_size(4160));
        assert!(is_sealed_block_size(576));
        assert!(!is_sealed_block_size(4096));
        assert!(!is_sealed_block_size(4161));
        assert!(!is_sealed_block_size(64));
        let c = BlockCodec::sealed(key(1));
        assert_eq!(c.dp_block_size(), 4160);
        assert_eq!(c.dp_size_bytes(10 * 4096), 10 * 4160);
        assert_eq!(BlockCodec::plain().dp_size_bytes(10 * 4096), 10 * 4096);
        assert!(
            !format!("{c:?}").contains("0101"),
            "Debug shows no key bytes"
        );
    }

    #[test]
    fn key_files_are_parsed_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &[u8], mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let good = write("good", format!("{hex}\n").as_bytes(), 0o600);
        let k = VolumeKey::load(&good).unwrap();
        let mut raw = [0u8; 32];
        for i in 0..32 {
            raw[i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        assert_eq!(k.key_id(), VolumeKey::from_bytes(&raw).key_id());
        let bare = write("bare", hex.as_bytes(), 0o400);
        assert!(
            VolumeKey::load(&bare).is_ok(),
            "no newline, read-only: fine"
        );
        let cases: [(&str, Vec<u8>, u32, &str); 5] = [
            (
                "short",
                hex.as_bytes()[..62].to_vec(),
                0o600,
                "holds 62 bytes",
            ),
            (
                "long",
                format!("{hex}00").into_bytes(),
                0o600,
                "holds 66 bytes",
            ),
            ("crlf", format!("{hex}\r").into_bytes(), 0o600, "hex digits"),
            (
                "nothex",
                format!("{}zz\n", &hex[..62]).into_bytes(),
                0o600,
                "byte 62 is not a hex digit",
            ),
            ("open", format!("{hex}\n").into_bytes(), 0o644, "mode 0644"),
        ];
        for (name, body, mode, want) in cases {
            let p = write(name, &body, mode);
            let e = VolumeKey::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert!(
                !e.contains(&hex[..16]),
                "{name}: the error shows no key bytes: {e}"
            );
        }
        let e = VolumeKey::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn keygen_makes_a_private_file_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vol.key");
        let k = VolumeKey::generate(&p).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), 65);
        assert_eq!(VolumeKey::load(&p).unwrap().key_id(), k.key_id());
        let before = std::fs::read(&p).unwrap();
        let e = VolumeKey::generate(&p).unwrap_err();
        assert!(e.to_string().contains("never overwrites"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "the key is untouched");
        let other = VolumeKey::generate(&dir.path().join("other.key")).unwrap();
        assert_ne!(other.key_id(), k.key_id(), "each key is new");
    }
}
