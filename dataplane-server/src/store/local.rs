//! The local backend's files under `DATA_DIR/volumes/<name>/`: their names (`MANIFEST`,
//! `snap-<id>.seg`, temp files ending in `.tmp`), the atomic replace (temp file, fsync,
//! rename, directory fsync), and the removal of files no manifest names.

use std::collections::HashSet;
use std::path::Path;

use super::compaction::COMPACT_ID_BIT;
use super::error::{io_at, StoreError};

/// The file of segment `id`: `snap-<id>.seg` for a snapshot's own segment, `compact-<n>.seg`
/// for one written by compaction (id [`super::compaction::COMPACT_ID_BIT`] | n).
pub(super) fn segment_name(id: u64) -> String {
    if id & COMPACT_ID_BIT != 0 {
        format!("compact-{}.seg", id & !COMPACT_ID_BIT)
    } else {
        format!("snap-{id}.seg")
    }
}

/// The segment id a file name stands for (the inverse of [`segment_name`]).
pub(super) fn parse_segment_file(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    if let Some(n) = stem.strip_prefix("snap-") {
        n.parse::<u64>().ok().filter(|id| id & COMPACT_ID_BIT == 0)
    } else {
        stem.strip_prefix("compact-")?
            .parse::<u64>()
            .ok()
            .filter(|n| n & COMPACT_ID_BIT == 0)
            .map(|n| n | COMPACT_ID_BIT)
    }
}

pub(super) const MANIFEST_NAME: &str = "MANIFEST";
pub(super) const TMP_SUFFIX: &str = ".tmp";

/// fsyncs a directory (after a rename in it).
pub(super) async fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = tokio_uring::fs::File::open(dir)
        .await
        .map_err(io_at("open dir", dir))?;
    f.sync_all().await.map_err(io_at("fsync dir", dir))?;
    f.close().await.map_err(io_at("close dir", dir))
}

/// Creates (or truncates) `path` for writing: a temp file about to be filled.
pub(super) async fn create_file(path: &Path) -> Result<tokio_uring::fs::File, StoreError> {
    tokio_uring::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .await
        .map_err(io_at("create", path))
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync dir.
pub(super) async fn write_atomic(dir: &Path, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let f = create_file(&tmp).await?;
    let (res, _) = f.write_all_at(bytes, 0).await;
    res.map_err(io_at("write", &tmp))?;
    f.sync_all().await.map_err(io_at("fsync", &tmp))?;
    f.close().await.map_err(io_at("close", &tmp))?;
    tokio_uring::fs::rename(&tmp, &dst)
        .await
        .map_err(io_at("rename", &tmp))?;
    sync_dir(dir).await
}

/// Removes `*.tmp` files and segment files not in `referenced`.
pub(super) fn remove_stray_files(dir: &Path, referenced: &HashSet<u64>) -> Result<(), StoreError> {
    let rd = std::fs::read_dir(dir).map_err(io_at("list", dir))?;
    for ent in rd {
        let ent = ent.map_err(io_at("list", dir))?;
        let fname = ent.file_name();
        let Some(fname) = fname.to_str() else {
            continue;
        };
        let stray = if fname.ends_with(TMP_SUFFIX) {
            true
        } else if fname.ends_with(".seg")
            && (fname.starts_with("snap-") || fname.starts_with("compact-"))
        {
            parse_segment_file(fname).is_none_or(|id| !referenced.contains(&id))
        } else {
            false
        };
        if stray {
            let path = ent.path();
            tracing::info!(path = %path.display(), "removing uncommitted file");
            std::fs::remove_file(&path).map_err(io_at("remove", &path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        for id in [1, 42, COMPACT_ID_BIT - 1, COMPACT_ID_BIT | 7, u64::MAX] {
            assert_eq!(parse_segment_file(&segment_name(id)), Some(id), "{id}");
        }
        assert_eq!(segment_name(COMPACT_ID_BIT | 7), "compact-7.seg");
        assert_eq!(parse_segment_file("snap-x.seg"), None);
        assert_eq!(parse_segment_file("snap-9223372036854775808.seg"), None);
        assert_eq!(parse_segment_file("MANIFEST"), None);
    }
}
