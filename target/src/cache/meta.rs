//! On-disk metadata of a volume's cache dir: the superblock and the persisted epoch maps.
//!
//! Everything here is versioned and checksummed (STYLE: magic, format version, feature mask,
//! volume id, sequence, crc32c), and every record is written twice-buffered (A/B copies, the
//! newer valid copy wins), so a torn write never loses what was durable before it.
//!
//! ## Superblock (`superblock`)
//! Two 4096-byte copies at offsets 0 and 4096. Fields (little endian):
//! `magic[8] "DVOLSUPR" | version u32 | hdr_len u32 | features u64 | volume_id [16] |
//!  size_bytes u64 | block_size u32 | name_len u16 | pad u16 | name [64] | flushed_epoch u64 |
//!  seq u64 | created_unix_ms u64 | snap_head u64 | generation u64 | hydrating u64 |
//!  hydrate_snap u64 | fenced_generation u64 | cut[2] { epoch u64, unix_ms u64 } | ... |
//!  crc32c u32 (last 4 bytes, over the rest)`.
//! `cut[e % 2]` is the wall-clock time of the cut of epoch `e` (the epoch switch whose state
//! snapshot `e` holds), recorded at the cut so that a flush after a restart still ships the
//! cut's own time; an epoch that does not match (a superblock written before cut times, or a
//! crash between the cut and its record) has an unknown cut time (0). Older builds ignore
//! these bytes (they were zero), so no version bump.
//! `fenced_generation` is non-zero once the data plane refused this writer because the volume
//! moved to that newer generation (recovered elsewhere): the device stays read-only.
//! `generation` is the volume's writer generation on the data plane (fencing); `hydrating` is 1
//! while the volume is still being filled from snapshot `hydrate_snap` of the data plane.
//! `snap_head` is the newest snapshot of this volume made durable by the delta sink (committed on
//! the data plane or spooled to its outbox), 0 for none: the parent of the next snapshot.
//! `flushed_epoch` is the newest epoch whose data is durable in the backing file: the only
//! epoch number that must be persisted (see `cache::Cache::open` for how the live epochs are
//! derived from it and from the map pages).
//!
//! ## Encryption record (`encryption`)
//! Present only in the cache dir of a volume encrypted on the data plane (client-side,
//! `crate::crypt`): `magic[8] "DVOLCRYP" | version u32 | cipher u32 (1: XChaCha20-Poly1305
//! envelopes) | key_id [8] | reserved [40] | crc32c u32` (64 bytes). Written when the volume
//! is created, before its superblock (temp file, fsync, rename, fsync dir), so a volume never
//! exists here without it; from then on every attach must give the key with this id, and a
//! volume without the record (unencrypted) refuses a key. The key itself is never here.
//!
//! ## Epoch maps (`map.0`, `map.1`)
//! One file per mirror slot. Page `i` of slot `s` covers blocks `[i * PAGE_BITS, (i+1) *
//! PAGE_BITS)` and has two copies (at `2i * 4096` and `(2i+1) * 4096`). A page carries the
//! epoch it belongs to: pages of older epochs are ignored, so reusing a slot for a new epoch
//! needs no erase. Within one epoch bits only ever get set, and the syncer always writes the
//! copy that is *not* the newest valid one, so the newest valid copy of a page always holds
//! every bit acknowledged by a completed FLUSH.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const BLOCK_SIZE: u64 = 4096;
pub const BLOCK_SHIFT: u32 = 12;
pub const SUPER_MAGIC: [u8; 8] = *b"DVOLSUPR";
pub const MAP_MAGIC: u32 = 0x4d50_4c44; // "DLPM"
pub const FORMAT_VERSION: u32 = 1;
/// Feature bits this build understands; anything else in a superblock is refused.
pub const FEATURES_SUPPORTED: u64 = 0;
pub const NAME_LEN_MAX: usize = 64;
const SUPER_COPY_BYTES: usize = 4096;
pub const MAP_PAGE_BYTES: usize = 4096;
pub const MAP_HDR_BYTES: usize = 64;
/// Blocks covered by one map page.
pub const PAGE_BITS: u64 = ((MAP_PAGE_BYTES - MAP_HDR_BYTES) * 8) as u64;
const PAGE_WORDS: usize = (MAP_PAGE_BYTES - MAP_HDR_BYTES) / 8;

pub type VolumeId = [u8; 16];

/// The encryption record's file in the cache dir (see the module doc).
pub const KEY_RECORD_FILE: &str = "encryption";
const KEY_RECORD_MAGIC: &[u8; 8] = b"DVOLCRYP";
const KEY_RECORD_VERSION: u32 = 1;
/// Cipher 1: 4096-byte blocks sealed in 64-byte XChaCha20-Poly1305 envelopes.
const KEY_RECORD_CIPHER_XCHACHA: u32 = 1;
const KEY_RECORD_BYTES: usize = 64;

/// The key id an encrypted volume's cache dir records; `None` for an unencrypted volume (no
/// record). A record that fails its checks is refused, never taken for "unencrypted".
pub fn read_key_record(cache_dir: &Path) -> Result<Option<[u8; 8]>> {
    let path = cache_dir.join(KEY_RECORD_FILE);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let bad = |why: &str| {
        Error::corrupt(format!(
            "{} (the record that this volume is encrypted, and under which key id) {why}: restore it from a copy of the cache dir, or recover the volume onto a new --cache-dir with its key",
            path.display()
        ))
    };
    if b.len() != KEY_RECORD_BYTES || &b[0..8] != KEY_RECORD_MAGIC {
        return Err(bad("is not an encryption record"));
    }
    let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    if le32(KEY_RECORD_BYTES - 4) != crc32c::crc32c(&b[..KEY_RECORD_BYTES - 4]) {
        return Err(bad("fails its checksum"));
    }
    if le32(8) != KEY_RECORD_VERSION || le32(12) != KEY_RECORD_CIPHER_XCHACHA {
        return Err(Error::corrupt(format!(
            "{}: version {} / cipher {} unknown to this deltavol (knows version {KEY_RECORD_VERSION}, cipher {KEY_RECORD_CIPHER_XCHACHA}): written by a newer deltavol; use that release",
            path.display(),
            le32(8),
            le32(12)
        )));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[16..24]);
    Ok(Some(id))
}

/// Records (`Some`) or removes (`None`) the key id of the volume about to be created in
/// `cache_dir`, durably.
pub fn write_key_record(cache_dir: &Path, key_id: Option<&[u8; 8]>) -> Result<()> {
    let path = cache_dir.join(KEY_RECORD_FILE);
    let sync_dir = || {
        File::open(cache_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("fsync", cache_dir, e))
    };
    let Some(id) = key_id else {
        return match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
        };
    };
    let mut b = [0u8; KEY_RECORD_BYTES];
    b[0..8].copy_from_slice(KEY_RECORD_MAGIC);
    b[8..12].copy_from_slice(&KEY_RECORD_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&KEY_RECORD_CIPHER_XCHACHA.to_le_bytes());
    b[16..24].copy_from_slice(id);
    let crc = crc32c::crc32c(&b[..KEY_RECORD_BYTES - 4]);
    b[KEY_RECORD_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    let tmp = cache_dir.join(format!("{KEY_RECORD_FILE}.tmp"));
    std::fs::write(&tmp, b)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
    sync_dir()
}

/// The durable identity and progress of a volume's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub flushed_epoch: u64,
    pub seq: u64,
    pub created_unix_ms: u64,
    pub snap_head: u64,
    pub generation: u64,
    pub hydrating: bool,
    pub hydrate_snap: u64,
    /// The newer generation that fenced this writer, 0 if none.
    pub fenced_generation: u64,
    /// `cuts[e % 2] = (e, unix_ms)`: when epoch `e` was cut (see the module doc).
    pub cuts: [(u64, u64); 2],
}

pub fn volume_id_hex(id: &VolumeId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Superblock {
    fn encode(&self) -> [u8; SUPER_COPY_BYTES] {
        let mut b = [0u8; SUPER_COPY_BYTES];
        b[0..8].copy_from_slice(&SUPER_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SUPER_COPY_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&FEATURES_SUPPORTED.to_le_bytes());
        b[24..40].copy_from_slice(&self.volume_id);
        b[40..48].copy_from_slice(&self.size_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        let name = self.name.as_bytes();
        b[52..54].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[56..56 + name.len()].copy_from_slice(name);
        b[120..128].copy_from_slice(&self.flushed_epoch.to_le_bytes());
        b[128..136].copy_from_slice(&self.seq.to_le_bytes());
        b[136..144].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        b[144..152].copy_from_slice(&self.snap_head.to_le_bytes());
        b[152..160].copy_from_slice(&self.generation.to_le_bytes());
        b[160..168].copy_from_slice(&u64::from(self.hydrating).to_le_bytes());
        b[168..176].copy_from_slice(&self.hydrate_snap.to_le_bytes());
        b[176..184].copy_from_slice(&self.fenced_generation.to_le_bytes());
        for (i, (e, ms)) in self.cuts.iter().enumerate() {
            b[184 + 16 * i..192 + 16 * i].copy_from_slice(&e.to_le_bytes());
            b[192 + 16 * i..200 + 16 * i].copy_from_slice(&ms.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..SUPER_COPY_BYTES - 4]);
        b[SUPER_COPY_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one copy. `Ok(None)` for an all-zero (never written) copy.
    fn decode(b: &[u8], path: &Path, copy: usize) -> Result<Option<Superblock>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let what = || format!("{} (copy {copy})", path.display());
        if b[0..8] != SUPER_MAGIC {
            return Err(Error::corrupt(format!(
                "{} is not a deltavol superblock (bad magic): is this the right --cache-dir?",
                what()
            )));
        }
        let crc = u32::from_le_bytes(b[SUPER_COPY_BYTES - 4..].try_into().unwrap_or_default());
        if crc != crc32c::crc32c(&b[..SUPER_COPY_BYTES - 4]) {
            return Err(Error::corrupt(format!("{}: checksum mismatch", what())));
        }
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let le64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let version = le32(8);
        if version != FORMAT_VERSION {
            return Err(Error::corrupt(format!(
                "{}: format version {version} is not supported by this deltavol (supports {FORMAT_VERSION}); use a matching release",
                what()
            )));
        }
        let features = le64(16);
        if features & !FEATURES_SUPPORTED != 0 {
            return Err(Error::corrupt(format!(
                "{}: unknown feature bits {:#x}; written by a newer deltavol",
                what(),
                features & !FEATURES_SUPPORTED
            )));
        }
        let bs = le32(48);
        if u64::from(bs) != BLOCK_SIZE {
            return Err(Error::corrupt(format!(
                "{}: block size {bs} unsupported",
                what()
            )));
        }
        let name_len = usize::from(u16::from_le_bytes([b[52], b[53]]));
        if name_len > NAME_LEN_MAX {
            return Err(Error::corrupt(format!(
                "{}: name length {name_len} invalid",
                what()
            )));
        }
        let name = String::from_utf8(b[56..56 + name_len].to_vec())
            .map_err(|_| Error::corrupt(format!("{}: name is not UTF-8", what())))?;
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[24..40]);
        Ok(Some(Superblock {
            volume_id,
            name,
            size_bytes: le64(40),
            flushed_epoch: le64(120),
            seq: le64(128),
            created_unix_ms: le64(136),
            snap_head: le64(144),
            generation: le64(152),
            hydrating: le64(160) != 0,
            hydrate_snap: le64(168),
            fenced_generation: le64(176),
            cuts: [(le64(184), le64(192)), (le64(200), le64(208))],
        }))
    }

    /// Reads the newest valid copy. A torn or corrupt copy is tolerated when the other is
    /// valid; both invalid is an error.
    pub fn read(file: &File, path: &Path) -> Result<Superblock> {
        let mut buf = vec![0u8; 2 * SUPER_COPY_BYTES];
        let n = read_full_at(file, &mut buf, 0).map_err(|e| Error::io("read", path, e))?;
        if n < SUPER_COPY_BYTES {
            return Err(Error::corrupt(format!(
                "{} is truncated ({n} bytes): not a deltavol superblock",
                path.display()
            )));
        }
        let a = Superblock::decode(&buf[..SUPER_COPY_BYTES], path, 0);
        let b = if n >= 2 * SUPER_COPY_BYTES {
            Superblock::decode(&buf[SUPER_COPY_BYTES..], path, 1)
        } else {
            Ok(None)
        };
        match (a, b) {
            (Ok(Some(x)), Ok(Some(y))) => {
                if x.volume_id != y.volume_id {
                    return Err(Error::corrupt(format!(
                        "{}: the two superblock copies name different volumes",
                        path.display()
                    )));
                }
                Ok(if y.seq > x.seq { y } else { x })
            }
            (Ok(Some(x)), _) | (_, Ok(Some(x))) => Ok(x),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e),
            (Ok(None), Ok(None)) => Err(Error::corrupt(format!(
                "{} is empty: not a deltavol superblock",
                path.display()
            ))),
        }
    }

    /// Writes the next sequence number to the copy it selects and fsyncs.
    pub fn write_next(&mut self, file: &File, path: &Path) -> Result<()> {
        self.seq += 1;
        let off = (self.seq % 2) * SUPER_COPY_BYTES as u64;
        file.write_all_at(&self.encode(), off)
            .map_err(|e| Error::io_at("write", path, off, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", path, e))
    }
}

/// Reads until `buf` is full or EOF; returns bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Header of one persisted map page.
#[derive(Debug, Clone, Copy)]
pub struct PageHdr {
    pub page: u32,
    pub slot: u8,
    pub epoch: u64,
    pub seq: u64,
}

/// Encodes a map page: header + the page's bitmap words.
pub fn encode_page(hdr: &PageHdr, volume_id: &VolumeId, words: &[u64], out: &mut [u8]) {
    assert_eq!(out.len(), MAP_PAGE_BYTES);
    assert!(words.len() <= PAGE_WORDS);
    out.fill(0);
    out[0..4].copy_from_slice(&MAP_MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
    out[6] = hdr.slot;
    out[8..12].copy_from_slice(&hdr.page.to_le_bytes());
    out[16..24].copy_from_slice(&hdr.epoch.to_le_bytes());
    out[24..32].copy_from_slice(&hdr.seq.to_le_bytes());
    out[32..48].copy_from_slice(volume_id);
    for (i, w) in words.iter().enumerate() {
        let o = MAP_HDR_BYTES + i * 8;
        out[o..o + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[..48]);
    let crc = crc32c::crc32c_append(crc, &out[MAP_HDR_BYTES..]);
    out[48..52].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a page copy; `None` when it is blank, torn, or not ours (wrong volume, slot or
/// page index). Wrong-volume pages cannot occur in a cache dir whose superblock matched, so
/// they are treated like torn ones.
pub fn decode_page(
    buf: &[u8],
    volume_id: &VolumeId,
    slot: u8,
    page: u32,
    words: &mut [u64],
) -> Option<PageHdr> {
    if buf.len() != MAP_PAGE_BYTES || buf[0..4] != MAP_MAGIC.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(buf[48..52].try_into().ok()?);
    let calc = crc32c::crc32c_append(crc32c::crc32c(&buf[..48]), &buf[MAP_HDR_BYTES..]);
    if crc != calc || u16::from_le_bytes([buf[4], buf[5]]) as u32 != FORMAT_VERSION {
        return None;
    }
    if &buf[32..48] != volume_id || buf[6] != slot {
        return None;
    }
    let hdr = PageHdr {
        slot,
        page: u32::from_le_bytes(buf[8..12].try_into().ok()?),
        epoch: u64::from_le_bytes(buf[16..24].try_into().ok()?),
        seq: u64::from_le_bytes(buf[24..32].try_into().ok()?),
    };
    if hdr.page != page {
        return None;
    }
    for (i, w) in words.iter_mut().enumerate() {
        let o = MAP_HDR_BYTES + i * 8;
        *w = u64::from_le_bytes(buf[o..o + 8].try_into().ok()?);
    }
    Some(hdr)
}

/// Words per map page.
pub const fn page_words() -> usize {
    PAGE_WORDS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            volume_id: [7; 16],
            name: "vol-a".into(),
            size_bytes: 1 << 30,
            flushed_epoch: 9,
            seq: 0,
            created_unix_ms: 1,
            snap_head: 0,
            generation: 0,
            hydrating: false,
            hydrate_snap: 0,
            fenced_generation: 0,
            cuts: [(3, 1_700_000_000_000), (0, 0)],
        }
    }

    #[test]
    fn superblock_roundtrip_and_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sb");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut s = sb();
        s.write_next(&f, &p).unwrap();
        s.flushed_epoch = 10;
        s.write_next(&f, &p).unwrap();
        assert_eq!(Superblock::read(&f, &p).unwrap(), s);
        // Tear the newest copy: the older one is used.
        let off = (s.seq % 2) * 4096 + 100;
        f.write_all_at(&[0xff; 8], off).unwrap();
        let r = Superblock::read(&f, &p).unwrap();
        assert_eq!(r.flushed_epoch, 9);
    }

    #[test]
    fn superblock_refuses_garbage_and_future_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sb");
        std::fs::write(&p, vec![0x55u8; 8192]).unwrap();
        let f = File::open(&p).unwrap();
        let e = Superblock::read(&f, &p).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");

        let mut b = sb().encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, b).unwrap();
        let f = File::open(&p).unwrap();
        let e = Superblock::read(&f, &p).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");

        std::fs::write(&p, [0u8; 10]).unwrap();
        let f = File::open(&p).unwrap();
        assert!(Superblock::read(&f, &p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn key_record_roundtrip_and_damage_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_key_record(dir.path()).unwrap(), None);
        write_key_record(dir.path(), Some(&[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
        assert_eq!(
            read_key_record(dir.path()).unwrap(),
            Some([1, 2, 3, 4, 5, 6, 7, 8])
        );
        let p = dir.path().join(KEY_RECORD_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[17] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = read_key_record(dir.path()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        write_key_record(dir.path(), None).unwrap();
        assert_eq!(read_key_record(dir.path()).unwrap(), None);
        write_key_record(dir.path(), None).unwrap();
    }

    #[test]
    fn page_roundtrip_and_torn_detection() {
        let id = [3u8; 16];
        let words: Vec<u64> = (0..page_words() as u64).map(|i| i * 0x9e37_79b9).collect();
        let mut buf = vec![0u8; MAP_PAGE_BYTES];
        encode_page(
            &PageHdr {
                page: 5,
                slot: 1,
                epoch: 42,
                seq: 3,
            },
            &id,
            &words,
            &mut buf,
        );
        let mut out = vec![0u64; page_words()];
        let h = decode_page(&buf, &id, 1, 5, &mut out).unwrap();
        assert_eq!((h.epoch, h.seq), (42, 3));
        assert_eq!(out, words);
        assert!(
            decode_page(&buf, &id, 0, 5, &mut out).is_none(),
            "wrong slot"
        );
        assert!(
            decode_page(&buf, &[4u8; 16], 1, 5, &mut out).is_none(),
            "wrong volume"
        );
        buf[2000] ^= 1;
        assert!(decode_page(&buf, &id, 1, 5, &mut out).is_none(), "torn");
    }
}
