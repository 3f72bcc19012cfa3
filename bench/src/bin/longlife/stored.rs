//! What the data plane keeps for the bench volume, read from the store itself:
//! * local: every file under `DATA_DIR/volumes/<name>/` (segment files `*.seg`, the
//!   `MANIFEST`, anything else such as temp files);
//! * s3: every object under `PREFIX/volumes/<name>/` (`seg/` segments, `manifest/` numbered
//!   manifests, anything else), listed with the data plane's own object-store client.
//!
//! Sizes are the files' and objects' lengths (not the blocks a filesystem allocates).

use std::path::{Path, PathBuf};

use anyhow::Context;
use deltavol_dataplane::store::backend::ObjBackend;
use serde::Serialize;

/// Bytes and count of each kind of file or object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stored {
    pub segment_bytes: u64,
    pub segment_count: u64,
    pub manifest_bytes: u64,
    pub manifest_count: u64,
    pub other_bytes: u64,
    pub other_count: u64,
}

impl Stored {
    pub fn total_bytes(&self) -> u64 {
        self.segment_bytes + self.manifest_bytes + self.other_bytes
    }

    fn add(&mut self, kind: Kind, bytes: u64) {
        let (b, c) = match kind {
            Kind::Segment => (&mut self.segment_bytes, &mut self.segment_count),
            Kind::Manifest => (&mut self.manifest_bytes, &mut self.manifest_count),
            Kind::Other => (&mut self.other_bytes, &mut self.other_count),
        };
        *b += bytes;
        *c += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Segment,
    Manifest,
    Other,
}

/// Where the volume's files or objects are.
pub enum Where {
    Local {
        volume_dir: PathBuf,
    },
    Object {
        obj: Box<ObjBackend>,
        rel: String,
        describe: String,
    },
}

impl std::fmt::Debug for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Local { volume_dir } => write!(f, "{}", volume_dir.display()),
            Where::Object { rel, describe, .. } => write!(f, "{describe}: {rel}/"),
        }
    }
}

impl Where {
    pub fn local(data_dir: &Path, volume: &str) -> Where {
        Where::Local {
            volume_dir: data_dir.join("volumes").join(volume),
        }
    }

    /// `describe`: the store, for messages (bucket, endpoint, prefix).
    pub fn object(obj: ObjBackend, describe: String, volume: &str) -> Where {
        Where::Object {
            obj: Box::new(obj),
            rel: format!("volumes/{volume}"),
            describe,
        }
    }

    pub fn measure(&self) -> anyhow::Result<Stored> {
        let mut s = Stored::default();
        match self {
            Where::Local { volume_dir } => walk(volume_dir, &mut s)?,
            Where::Object { obj, rel, .. } => {
                let objects = obj
                    .block_on(obj.list(rel))
                    .with_context(|| format!("listing {self:?}"))?;
                for o in objects {
                    let key = o.location.to_string();
                    let kind = if key.contains("/seg/") {
                        Kind::Segment
                    } else if key.contains("/manifest/") {
                        Kind::Manifest
                    } else {
                        Kind::Other
                    };
                    s.add(kind, o.size);
                }
            }
        }
        Ok(s)
    }
}

/// Adds every file under `dir` (none if it does not exist yet). Files may vanish while it
/// walks (compaction, retention): those are skipped.
fn walk(dir: &Path, s: &mut Stored) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("read {}", dir.display()))?;
        let path = e.path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("stat {}", path.display())),
        };
        if meta.is_dir() {
            walk(&path, s)?;
            continue;
        }
        let name = e.file_name();
        let name = name.to_string_lossy();
        let kind = if name.ends_with(".seg") {
            Kind::Segment
        } else if name == "MANIFEST" {
            Kind::Manifest
        } else {
            Kind::Other
        };
        s.add(kind, meta.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_are_sorted_by_kind() {
        let d = tempfile::tempdir().expect("tempdir");
        let w = Where::local(d.path(), "v");
        assert_eq!(w.measure().expect("missing dir"), Stored::default());
        let vol = d.path().join("volumes/v");
        std::fs::create_dir_all(vol.join("sub")).expect("mkdir");
        std::fs::write(vol.join("snap-1.seg"), [0u8; 100]).expect("write");
        std::fs::write(vol.join("sub/snap-2.seg"), [0u8; 50]).expect("write");
        std::fs::write(vol.join("MANIFEST"), [0u8; 7]).expect("write");
        std::fs::write(vol.join("MANIFEST.tmp"), [0u8; 3]).expect("write");
        let s = w.measure().expect("measure");
        assert_eq!((s.segment_bytes, s.segment_count), (150, 2));
        assert_eq!((s.manifest_bytes, s.manifest_count), (7, 1));
        assert_eq!((s.other_bytes, s.other_count), (3, 1));
        assert_eq!(s.total_bytes(), 160);
    }
}
