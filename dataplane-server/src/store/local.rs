//! The local backend's files under `DATA_DIR/volumes/<name>/`: their names (`MANIFEST`,
//! `snap-<id>.seg`, temp files ending in `.tmp`), the atomic replace (temp file, fsync,
//! rename, directory fsync), and the removal of files no manifest names.

use std::collections::HashSet;
use std::path::Path;

use super::error::{io_at, StoreError};

pub(super) fn segment_name(snap_id: u64) -> String {
    format!("snap-{snap_id}.seg")
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

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync dir.
pub(super) async fn write_atomic(dir: &Path, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let f = tokio_uring::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .await
        .map_err(io_at("create", &tmp))?;
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
        } else if let Some(id) = fname
            .strip_prefix("snap-")
            .and_then(|s| s.strip_suffix(".seg"))
        {
            id.parse::<u64>()
                .map_or(true, |id| !referenced.contains(&id))
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
