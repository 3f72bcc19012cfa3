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

use super::epoch::Padded;
use super::meta::VolumeId;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

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

/// The open journals of one run: one file per (slot, queue), appended by that queue only.
pub struct Journals {
    files: [Vec<File>; 2],
    next: [Box<[Padded<AtomicU64>]>; 2],
}

impl Journals {
    /// Starts fresh journals for `nr_queues` queues (call after [`replay`] and after the
    /// replayed membership is persisted), removing any others.
    pub fn create(dir: &Path, volume_id: &VolumeId, nr_queues: usize) -> Result<Journals> {
        let boot = boot_id().unwrap_or([0; 16]);
        let h = header(volume_id, &boot);
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("journal.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
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
        Ok(Journals { files, next })
    }

    /// Where queue `q`'s next record in slot `s` goes, and the file.
    pub fn reserve(&self, s: usize, q: usize) -> (&File, u64) {
        let q = q % self.files[s].len();
        let off = self.next[s][q].0.fetch_add(RECORD_BYTES, SeqCst);
        (&self.files[s][q], off)
    }

    /// Slot `s`'s epoch is flushed and retired: its journals start over (older records in
    /// them carry older epochs and are ignored at replay).
    pub fn reset(&self, s: usize) {
        for n in self.next[s].iter() {
            n.0.store(HDR_BYTES, SeqCst);
        }
    }
}
