//! The membership journal: every completed write survives a crash of the daemon.
//!
//! The map pages (see [`super::meta`]) make the membership of FLUSH-acknowledged writes durable
//! against power loss. A daemon crash (`kill -9`, a panic) loses no page cache, so the data of
//! every *completed* write is still in the mirror; what would be lost is the in-memory bit that
//! says so. A block device must not forget an acknowledged write because its server process
//! died — above all when the kernel keeps the device and the mounted filesystem alive for a
//! successor (user recovery). So before a write (or discard) is acknowledged, its membership is
//! appended, as a 32-byte checksummed record, to the journal of its epoch's slot and its queue
//! (`journal.<slot>.<queue>`, written through the page cache, never synced).
//!
//! At open, journals whose header carries the *current* boot id (`/proc/sys/kernel/random/
//! boot_id`) are replayed: same boot, so the page cache — the mirrors' data included — is
//! intact. Journals of another boot are ignored: after a reboot or power cut only what the map
//! pages persisted counts, as a FLUSH promised. The replayed bits are then persisted like a
//! FLUSH before the journals are started afresh.
//!
//! Record: `magic u32 | kind u8 (0 data, 1 zero) | pad [3] | epoch u64 | lba u64 |
//! nblocks u32 | crc32c u32`. File header (64 bytes): `magic "DVJOURNL" | version u32 | pad |
//! volume_id [16] | boot_id [16] | ... | crc32c u32`.
//!
//! ## The bitmap journal (the default where it is safe)
//!
//! A record per write costs a second write (a syscall, or a hop to an io_uring worker on a
//! filesystem that cannot take it inline) for 32 bytes that only have to reach the page cache.
//! The epoch's dirty bitmap already says the same thing, and a write sets its bits only once
//! its data is all in the mirror. So, where the cache directory's filesystem allows it, each
//! slot's bitmap lives in a **shared file mapping** of `journal.<slot>.bits`: setting a bit
//! *is* the journal record — a store into the page cache, no syscall — and it survives a
//! daemon crash exactly as a record written through the page cache does, in the same order
//! (data first, then the bit). The file: a 4096-byte header page (`magic "DVJBITS1" | version
//! u32 | pad | volume_id [16] | boot_id [16] | nblocks u64 | pad | crc32c u32` in its first 64
//! bytes, then at byte 64 the epoch the slot holds, an aligned u64 the flush thread stores at
//! each cut before any write of the new epoch sets a bit), then the bitmap's words. Replay ORs
//! the words of a file of this boot and volume whose epoch is the one its slot may hold.
//!
//! Only on filesystems where a store into the mapped, preallocated file cannot fail (tmpfs,
//! ext4, xfs: [`Kind::Auto`]). Elsewhere — btrfs, say, whose copy-on-write needs new space
//! for every write back, so a full disk would turn a store into SIGBUS — the records above.
//! `DELTAVOL_JOURNAL=records|bits` chooses by hand (benchmarks, tests).

use super::epoch::Padded;
use super::meta::VolumeId;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

pub const RECORD_BYTES: u64 = 32;
const HDR_BYTES: u64 = 64;
const HDR_MAGIC: &[u8; 8] = b"DVJOURNL";
const REC_MAGIC: u32 = 0x524a_5644; // "DVJR"
const VERSION: u32 = 1;

/// The kernel's id of this boot, or `None` if it cannot be read (then nothing is replayed).
pub fn boot_id() -> Option<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = s.trim().chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

fn path(dir: &Path, slot: usize, q: usize) -> PathBuf {
    dir.join(format!("journal.{slot}.{q}"))
}

fn header(volume_id: &VolumeId, boot: &[u8; 16]) -> [u8; HDR_BYTES as usize] {
    let mut h = [0u8; HDR_BYTES as usize];
    h[0..8].copy_from_slice(HDR_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..32].copy_from_slice(volume_id);
    h[32..48].copy_from_slice(boot);
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Encodes one record.
pub fn record(epoch: u64, lba: u64, nblocks: u64, zero: bool) -> [u8; RECORD_BYTES as usize] {
    let mut r = [0u8; RECORD_BYTES as usize];
    r[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    r[4] = u8::from(zero);
    r[8..16].copy_from_slice(&epoch.to_le_bytes());
    r[16..24].copy_from_slice(&lba.to_le_bytes());
    r[24..28].copy_from_slice(&(nblocks as u32).to_le_bytes());
    let crc = crc32c::crc32c(&r[..28]);
    r[28..32].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Calls `f(slot, epoch, lba, nblocks)` for every valid record of every journal of this boot
/// in `dir` (any queue count), skipping torn or foreign records.
pub fn replay(
    dir: &Path,
    volume_id: &VolumeId,
    mut f: impl FnMut(usize, u64, u64, u64),
) -> Result<u64> {
    let Some(boot) = boot_id() else { return Ok(0) };
    let want = header(volume_id, &boot);
    let mut n = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("read", dir, e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("journal.") else {
            continue;
        };
        if rest.ends_with(".bits") || rest.ends_with(".new") {
            continue; // bitmap journals: replay_bits
        }
        let Some(slot) = rest
            .split('.')
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| *s < 2)
        else {
            continue;
        };
        let bytes = std::fs::read(e.path()).map_err(|err| Error::io("read", e.path(), err))?;
        if bytes.len() < HDR_BYTES as usize || bytes[..HDR_BYTES as usize] != want {
            continue; // another boot (or volume): only FLUSHed membership counts
        }
        for r in bytes[HDR_BYTES as usize..].chunks_exact(RECORD_BYTES as usize) {
            if r[0..4] != REC_MAGIC.to_le_bytes()
                || r[28..32] != crc32c::crc32c(&r[..28]).to_le_bytes()
            {
                continue;
            }
            let le64 = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap_or_default());
            let nb = u64::from(u32::from_le_bytes(r[24..28].try_into().unwrap_or_default()));
            f(slot, le64(8), le64(16), nb);
            n += 1;
        }
    }
    Ok(n)
}

/// How the membership of completed writes is journaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    /// Bits where the cache directory's filesystem allows it, else records; the environment's
    /// `DELTAVOL_JOURNAL=records|bits` overrides.
    #[default]
    Auto,
    /// A 32-byte record per write or discard.
    Records,
    /// The epoch's bitmap in a shared file mapping.
    Bits,
}

impl Kind {
    /// What `Auto` (and the environment) come to for a cache in `dir`.
    pub fn resolve(self, dir: &Path) -> Kind {
        match self {
            Kind::Records | Kind::Bits => self,
            Kind::Auto => match std::env::var("DELTAVOL_JOURNAL").as_deref() {
                Ok("records") => Kind::Records,
                Ok("bits") => Kind::Bits,
                other => {
                    if let Ok(v) = other {
                        if !v.is_empty() && v != "auto" {
                            tracing::warn!(
                                value = v,
                                "DELTAVOL_JOURNAL is records, bits or auto: using auto"
                            );
                        }
                    }
                    if bits_safe_on(dir) {
                        Kind::Bits
                    } else {
                        Kind::Records
                    }
                }
            },
        }
    }
}

/// Whether a store into a preallocated shared mapping of a file in `dir` cannot fail for want
/// of space: filesystems that write a preallocated block in place.
fn bits_safe_on(dir: &Path) -> bool {
    use nix::sys::statfs::{EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC};
    nix::sys::statfs::statfs(dir).is_ok_and(|st| {
        [TMPFS_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC].contains(&st.filesystem_type())
    })
}

const BITS_MAGIC: &[u8; 8] = b"DVJBITS1";
const BITS_HDR_BYTES: usize = 4096;
/// Where the slot's epoch is kept in the header page.
const BITS_EPOCH_AT: usize = 64;
const PAGE: usize = 4096;

fn bits_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("journal.{slot}.bits"))
}

fn bits_header(volume_id: &VolumeId, boot: &[u8; 16], nblocks: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(BITS_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..32].copy_from_slice(volume_id);
    h[32..48].copy_from_slice(boot);
    h[48..56].copy_from_slice(&nblocks.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One slot's bitmap journal: `journal.<slot>.bits`, mapped shared for the life of the run.
pub struct BitsFile {
    base: std::ptr::NonNull<u8>,
    len: usize,
    nwords: usize,
}

// SAFETY: the mapping is only reached through `AtomicU64`s (the epoch and the words), which
// are safe to share between threads; the pointer itself is never handed out mutably.
unsafe impl Send for BitsFile {}
// SAFETY: as above.
unsafe impl Sync for BitsFile {}

impl BitsFile {
    /// Creates slot `slot`'s bitmap journal afresh (zero bits, epoch 0) under a temporary name,
    /// preallocated and mapped, then renames it into place (so a mapping of an older file is
    /// never truncated under its owner).
    fn create(
        dir: &Path,
        slot: usize,
        volume_id: &VolumeId,
        boot: &[u8; 16],
        nblocks: u64,
    ) -> Result<BitsFile> {
        use std::os::fd::AsRawFd;
        let nwords = nblocks.div_ceil(64) as usize;
        let len = BITS_HDR_BYTES + (nwords * 8).div_ceil(PAGE) * PAGE;
        let tmp = dir.join(format!("journal.{slot}.bits.new"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        // Preallocate: a store into the mapping must never need space the disk lacks.
        match nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            len as libc::off_t,
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut off = 0usize;
                while off < len {
                    let n = zeros.len().min(len - off);
                    f.write_all_at(&zeros[..n], off as u64)
                        .map_err(|e| Error::io("write", &tmp, e))?;
                    off += n;
                }
            }
            Err(e) => return Err(Error::io("fallocate", &tmp, e.into())),
        }
        f.write_all_at(&bits_header(volume_id, boot, nblocks), 0)
            .map_err(|e| Error::io("write", &tmp, e))?;
        // SAFETY: a fresh shared mapping of `len` bytes of a file we just sized to `len` and
        // own (the cache directory is locked); no other mapping of this file exists. It is
        // unmapped in `Drop`, and nothing truncates the file meanwhile (a new journal is
        // always a new file, renamed over this one).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io("mmap", &tmp, std::io::Error::last_os_error()));
        }
        let Some(base) = std::ptr::NonNull::new(p.cast::<u8>()) else {
            return Err(Error::invalid("mmap returned a null mapping"));
        };
        let b = BitsFile { base, len, nwords };
        let to = bits_path(dir, slot);
        std::fs::rename(&tmp, &to).map_err(|e| Error::io("rename", &to, e))?;
        Ok(b)
    }

    /// The epoch whose membership the slot's bits record (0: none).
    pub fn epoch(&self) -> &AtomicU64 {
        // SAFETY: offset 64 of a page-aligned mapping of at least one page is in bounds and
        // 8-byte aligned; the mapping lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(BITS_EPOCH_AT).cast::<AtomicU64>() }
    }
}

impl super::bitmap::WordStore for BitsFile {
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the words start at the page after the header and `nwords * 8` bytes fit in
        // the mapping (sized so in `create`); page-aligned, so aligned for `AtomicU64`; the
        // mapping lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(BITS_HDR_BYTES).cast::<AtomicU64>(),
                self.nwords,
            )
        }
    }
}

impl Drop for BitsFile {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `create`, unmapped only here.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Calls `f(slot, epoch, words)` for the bitmap journal of each slot in `dir` that belongs to
/// this boot, this volume and a volume of `nblocks` blocks. Returns the bits set in them.
pub fn replay_bits(
    dir: &Path,
    volume_id: &VolumeId,
    nblocks: u64,
    mut f: impl FnMut(usize, u64, &[u64]),
) -> Result<u64> {
    let Some(boot) = boot_id() else { return Ok(0) };
    let want = bits_header(volume_id, &boot, nblocks);
    let nwords = nblocks.div_ceil(64) as usize;
    let mut n = 0;
    for s in 0..2 {
        let p = bits_path(dir, s);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        if bytes.len() < BITS_HDR_BYTES + nwords * 8 || bytes[..64] != want {
            continue; // another boot, volume or size: only FLUSHed membership counts
        }
        let le64 = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
        let epoch = le64(BITS_EPOCH_AT);
        let words: Vec<u64> = (0..nwords).map(|i| le64(BITS_HDR_BYTES + 8 * i)).collect();
        n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        f(s, epoch, &words);
    }
    Ok(n)
}

/// The open journals of one run: one file per (slot, queue), appended by that queue only; or,
/// as a bitmap journal, one mapped file per slot.
pub struct Journals {
    files: [Vec<File>; 2],
    next: [Box<[Padded<AtomicU64>]>; 2],
    bits: Option<[Arc<BitsFile>; 2]>,
}

impl Journals {
    /// Starts fresh journals of kind `kind` (resolved: records or bits) for `nr_queues`
    /// queues and a volume of `nblocks` blocks (call after [`replay`] / [`replay_bits`] and
    /// after the replayed membership is persisted), removing any others. Bitmap journals
    /// start with no bits and epoch 0: the caller moves the slots' bitmaps into them
    /// ([`Journals::bits_file`]) and sets their epochs ([`Journals::begin_epoch`]).
    pub fn create(
        dir: &Path,
        volume_id: &VolumeId,
        nr_queues: usize,
        kind: Kind,
        nblocks: u64,
    ) -> Result<Journals> {
        let boot = boot_id().unwrap_or([0; 16]);
        let h = header(volume_id, &boot);
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("journal.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if kind == Kind::Bits {
            let bits = [
                Arc::new(BitsFile::create(dir, 0, volume_id, &boot, nblocks)?),
                Arc::new(BitsFile::create(dir, 1, volume_id, &boot, nblocks)?),
            ];
            return Ok(Journals {
                files: [Vec::new(), Vec::new()],
                next: [Box::new([]), Box::new([])],
                bits: Some(bits),
            });
        }
        let mut files: [Vec<File>; 2] = [Vec::new(), Vec::new()];
        for (s, fs) in files.iter_mut().enumerate() {
            for q in 0..nr_queues.max(1) {
                let p = path(dir, s, q);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .map_err(|e| Error::io("create", &p, e))?;
                f.write_all_at(&h, 0)
                    .map_err(|e| Error::io("write", &p, e))?;
                fs.push(f);
            }
        }
        let next = [0, 1].map(|_| {
            (0..nr_queues.max(1))
                .map(|_| Padded(AtomicU64::new(HDR_BYTES)))
                .collect()
        });
        Ok(Journals {
            files,
            next,
            bits: None,
        })
    }

    /// Whether writes need records ([`Journals::reserve`]); `false` for a bitmap journal,
    /// where setting the epoch's bits is the record.
    pub fn takes_records(&self) -> bool {
        self.bits.is_none()
    }

    /// Slot `s`'s bitmap journal, for the slot's bitmap to move into.
    pub fn bits_file(&self, s: usize) -> Option<Arc<BitsFile>> {
        self.bits.as_ref().map(|b| b[s].clone())
    }

    /// Slot `s` holds epoch `epoch` from now on (0: none). Called at a cut before any write of
    /// the new epoch can set a bit, and after the slot's bits were cleared.
    pub fn begin_epoch(&self, s: usize, epoch: u64) {
        if let Some(b) = &self.bits {
            b[s].epoch().store(epoch, SeqCst);
        }
    }

    /// Where queue `q`'s next record in slot `s` goes, and the file (record journals only).
    pub fn reserve(&self, s: usize, q: usize) -> (&File, u64) {
        let q = q % self.files[s].len();
        let off = self.next[s][q].0.fetch_add(RECORD_BYTES, SeqCst);
        (&self.files[s][q], off)
    }

    /// Slot `s`'s epoch is flushed and retired: its journals start over (older records in
    /// them carry older epochs and are ignored at replay; a bitmap journal's bits were
    /// cleared with the slot's bitmap, and it holds no epoch until the next cut).
    pub fn reset(&self, s: usize) {
        for n in self.next[s].iter() {
            n.0.store(HDR_BYTES, SeqCst);
        }
        self.begin_epoch(s, 0);
    }
}
