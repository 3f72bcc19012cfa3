//! The backing label: which volume the permanent storage belongs to, and which epoch it holds.
//!
//! The SSD cache can be lost while the backing file survives (a dead SSD, a cache dir wiped by
//! mistake, a node rebuilt with its HDD kept). The superblock that said which volume and which
//! epoch the backing file holds is then gone. The label keeps that promise next to the backing
//! file, in the outbox dir (on the same disk as the backing, by design): the volume's id,
//! name and size, its writer generation, the chain head, and the backing's state:
//!
//! - [`BackingState::Clean`]`(E)`: the backing holds exactly epoch E, which is snapshot E (or an
//!   earlier snapshot plus outbox entries up to E) — written after the flush of E is durable in
//!   the backing file and made durable by the delta sink;
//! - [`BackingState::Writing`]`(E)`: the flush of epoch E is writing into the backing (written,
//!   and synced, before the first block of E is): the backing holds E-1 plus some of E, a mix
//!   that is no point in time;
//! - [`BackingState::Partial`]`(E)`: the volume is still hydrating from the data plane: the
//!   backing lacks blocks that only the data plane (and the lost hydration map) knew.
//!
//! `deltavol add` on a new cache dir over a labelled backing resumes the volume under its own
//! identity instead of starting a stranger under the same name (see [`crate::resume`]).
//!
//! File `<outbox>/backing.label`: two 512-byte copies (the newer valid one wins, so a torn
//! write never loses the one before it): `magic "DVBLABEL" | version u32 | features u32 |
//! volume_id [16] | size_bytes u64 | state u32 | name_len u16 | pad u16 | epoch u64 |
//! snap_head u64 | generation u64 | seq u64 | written_unix_ms u64 | name [64] | ... |
//! crc32c u32 (last 4 bytes, over the rest)`.

use crate::cache::meta::{self, VolumeId, NAME_LEN_MAX};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DVBLABEL";
const VERSION: u32 = 1;
const FEATURES_SUPPORTED: u32 = 0;
const COPY_BYTES: usize = 512;
/// File name of the label in the outbox dir.
pub const LABEL_FILE: &str = "backing.label";

/// What the backing file holds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "epoch", rename_all = "lowercase")]
pub enum BackingState {
    Clean(u64),
    Writing(u64),
    Partial(u64),
}

impl BackingState {
    fn encode(self) -> (u32, u64) {
        match self {
            BackingState::Clean(e) => (0, e),
            BackingState::Writing(e) => (1, e),
            BackingState::Partial(e) => (2, e),
        }
    }

    fn decode(state: u32, epoch: u64) -> Option<Self> {
        match state {
            0 => Some(BackingState::Clean(epoch)),
            1 => Some(BackingState::Writing(epoch)),
            2 => Some(BackingState::Partial(epoch)),
            _ => None,
        }
    }
}

/// The label's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub volume_id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub state: BackingState,
    /// The newest snapshot made durable by the delta sink (committed or in the outbox).
    pub snap_head: u64,
    pub generation: u64,
    pub seq: u64,
    pub written_unix_ms: u64,
}

pub fn path(outbox_dir: &Path) -> PathBuf {
    outbox_dir.join(LABEL_FILE)
}

impl Label {
    fn encode(&self) -> [u8; COPY_BYTES] {
        let mut b = [0u8; COPY_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&FEATURES_SUPPORTED.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..40].copy_from_slice(&self.size_bytes.to_le_bytes());
        let (state, epoch) = self.state.encode();
        b[40..44].copy_from_slice(&state.to_le_bytes());
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_LEN_MAX);
        b[44..46].copy_from_slice(&(n as u16).to_le_bytes());
        b[48..56].copy_from_slice(&epoch.to_le_bytes());
        b[56..64].copy_from_slice(&self.snap_head.to_le_bytes());
        b[64..72].copy_from_slice(&self.generation.to_le_bytes());
        b[72..80].copy_from_slice(&self.seq.to_le_bytes());
        b[80..88].copy_from_slice(&self.written_unix_ms.to_le_bytes());
        b[88..88 + n].copy_from_slice(&name[..n]);
        let crc = crc32c::crc32c(&b[..COPY_BYTES - 4]);
        b[COPY_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// One copy: `Ok(None)` when blank or torn (bad checksum); `Err` for a valid copy this
    /// build cannot read (another version or feature bits) or that is not a label at all.
    fn decode(b: &[u8], path: &Path) -> Result<Option<Label>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if &b[0..8] != MAGIC {
            return Err(Error::corrupt(format!(
                "{} is not a deltavol backing label (bad magic)",
                path.display()
            )));
        }
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let le64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        if le32(COPY_BYTES - 4) != crc32c::crc32c(&b[..COPY_BYTES - 4]) {
            return Ok(None);
        }
        if le32(8) != VERSION {
            return Err(Error::corrupt(format!(
                "{}: label version {} is not supported (this deltavol reads {VERSION})",
                path.display(),
                le32(8)
            )));
        }
        if le32(12) & !FEATURES_SUPPORTED != 0 {
            return Err(Error::corrupt(format!(
                "{}: unknown feature bits {:#x}: written by a newer deltavol",
                path.display(),
                le32(12)
            )));
        }
        let n = usize::from(u16::from_le_bytes([b[44], b[45]]));
        if n == 0 || n > NAME_LEN_MAX {
            return Err(Error::corrupt(format!(
                "{}: name length {n} invalid",
                path.display()
            )));
        }
        let name = String::from_utf8(b[88..88 + n].to_vec())
            .map_err(|_| Error::corrupt(format!("{}: name is not UTF-8", path.display())))?;
        let state = BackingState::decode(le32(40), le64(48)).ok_or_else(|| {
            Error::corrupt(format!(
                "{}: unknown backing state {}",
                path.display(),
                le32(40)
            ))
        })?;
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[16..32]);
        Ok(Some(Label {
            volume_id,
            name,
            size_bytes: le64(32),
            state,
            snap_head: le64(56),
            generation: le64(64),
            seq: le64(72),
            written_unix_ms: le64(80),
        }))
    }

    /// Reads the newest valid copy; `Ok(None)` when there is no label (no file, or never
    /// completely written).
    pub fn read(path: &Path) -> Result<Option<Label>> {
        let buf = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let copy = |i: usize| -> Result<Option<Label>> {
            match buf.get(i * COPY_BYTES..(i + 1) * COPY_BYTES) {
                Some(b) => Label::decode(b, path),
                None => Ok(None),
            }
        };
        let (a, b) = (copy(0)?, copy(1)?);
        Ok(match (a, b) {
            (Some(x), Some(y)) => Some(if y.seq > x.seq { y } else { x }),
            (x, y) => x.or(y),
        })
    }
}

/// The label file of one volume, kept open by whoever writes it (the delta sink).
pub struct LabelWriter {
    file: File,
    path: PathBuf,
    label: Label,
}

impl LabelWriter {
    /// Opens (creating) the label in `outbox_dir` for volume `volume_id`. An existing label
    /// of this volume continues its sequence; one of another volume is an error (this outbox
    /// dir, and so this backing disk's files, belong to another volume).
    pub fn open(
        outbox_dir: &Path,
        volume_id: VolumeId,
        name: &str,
        size_bytes: u64,
    ) -> Result<LabelWriter> {
        let path = path(outbox_dir);
        let old = Label::read(&path)?;
        if let Some(l) = &old {
            if l.volume_id != volume_id {
                return Err(Error::mismatch(format!(
                    "{} labels the backing as volume {:?} (id {}), not {name:?} (id {}): this outbox dir belongs to another volume; give this volume its own --backing and --outbox-dir",
                    path.display(),
                    l.name,
                    meta::volume_id_hex(&l.volume_id),
                    meta::volume_id_hex(&volume_id)
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let label = old.unwrap_or(Label {
            volume_id,
            name: name.to_string(),
            size_bytes,
            // Until this process writes it: the backing may hold anything.
            state: BackingState::Writing(u64::MAX),
            snap_head: 0,
            generation: 0,
            seq: 0,
            written_unix_ms: 0,
        });
        Ok(LabelWriter { file, path, label })
    }

    pub fn label(&self) -> &Label {
        &self.label
    }

    /// Records `state`, `snap_head` and `generation` durably (the older copy is overwritten,
    /// then synced) before returning.
    pub fn write(&mut self, state: BackingState, snap_head: u64, generation: u64) -> Result<()> {
        let mut next = self.label.clone();
        next.state = state;
        next.snap_head = snap_head;
        next.generation = generation;
        next.seq += 1;
        next.written_unix_ms = crate::cache::now_unix_ms();
        let off = (next.seq % 2) * COPY_BYTES as u64;
        self.file
            .write_all_at(&next.encode(), off)
            .map_err(|e| Error::io_at("write", &self.path, off, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))?;
        if next.seq == 1 {
            // A new file: its directory entry must be durable too.
            if let Some(dir) = self.path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io("fsync", dir, e))?;
            }
        }
        self.label = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_newest_copy_wins_and_a_torn_copy_is_survived() {
        let dir = tempfile::tempdir().unwrap();
        let id = [7u8; 16];
        let mut w = LabelWriter::open(dir.path(), id, "v1", 1 << 20).unwrap();
        w.write(BackingState::Writing(1), 0, 0).unwrap();
        w.write(BackingState::Clean(1), 1, 0).unwrap();
        let l = Label::read(&path(dir.path())).unwrap().unwrap();
        assert_eq!(
            (l.state, l.snap_head, l.name.as_str()),
            (BackingState::Clean(1), 1, "v1")
        );
        // Tear the newest copy: the one before it is read.
        let f = OpenOptions::new()
            .write(true)
            .open(path(dir.path()))
            .unwrap();
        f.write_all_at(&[0xff; 16], (l.seq % 2) * COPY_BYTES as u64 + 100)
            .unwrap();
        let l = Label::read(&path(dir.path())).unwrap().unwrap();
        assert_eq!(l.state, BackingState::Writing(1));
        // Another volume's writer is refused; the same volume continues the sequence.
        let e = LabelWriter::open(dir.path(), [8u8; 16], "v2", 1 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("belongs to another volume"), "{e}");
        let mut w = LabelWriter::open(dir.path(), id, "v1", 1 << 20).unwrap();
        w.write(BackingState::Partial(3), 2, 1).unwrap();
        let l = Label::read(&path(dir.path())).unwrap().unwrap();
        assert_eq!((l.state, l.generation), (BackingState::Partial(3), 1));
        // Not a label at all: refused, never guessed.
        std::fs::write(path(dir.path()), vec![1u8; 1024]).unwrap();
        assert!(Label::read(&path(dir.path())).is_err());
    }
}
