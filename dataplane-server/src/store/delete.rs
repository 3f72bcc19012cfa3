//! Deleting a whole volume ([`Volume::delete_volume`]), and the local tombstones a deletion
//! interrupted by a crash leaves behind. (Deleting one snapshot is the chain's: `chain.rs`.)

use std::io;
use std::path::Path;

use super::backend::{self, Backend};
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::VolumeId;
use super::local::sync_dir;
use super::volume::{volume_id_hex, Volume};

impl Volume {
    /// Deletes the whole volume from the store, after checking that `confirm_id` is its id
    /// (so that a volume created meanwhile under the same name is never deleted). The caller
    /// checked that no clone depends on it. An upload in progress is abandoned.
    ///
    /// Crash-safe: local, the directory is renamed to a hidden tombstone (`.deleted-…`,
    /// never a valid volume name) and the parent synced before it is removed, so the volume
    /// is either whole or gone; a tombstone left by a crash is removed at the next start.
    /// Object store: the heat map, the manifest trim floor, then every manifest but the
    /// newest, then the newest (from then on the volume does not exist), then the segments; a
    /// crash leaves either the volume at its newest state (without its heat map) or
    /// unreferenced segments that a repeated delete or `gc` removes.
    pub async fn delete_volume(&self, confirm_id: &VolumeId) -> Result<(), StoreError> {
        let _guard = self.meta_lock.lock().await;
        let _heat = self.heat_lock.lock().await;
        let summary = self.summary();
        if &summary.volume_id != confirm_id {
            return Err(StoreError::new(
                StoreErrorKind::IdentityMismatch,
                format!(
                    "volume {} has id {}, not {}: nothing deleted",
                    self.name,
                    volume_id_hex(&summary.volume_id),
                    volume_id_hex(confirm_id)
                ),
            ));
        }
        self.upload.set(None);
        match &self.backend {
            Backend::Local { volumes_dir } => {
                let mut nonce = [0u8; 8];
                getrandom::getrandom(&mut nonce)
                    .map_err(|e| StoreError::io("getrandom", io::Error::other(e)))?;
                let tomb = volumes_dir.join(format!(
                    "{DELETED_PREFIX}{}-{:016x}",
                    self.name,
                    u64::from_le_bytes(nonce)
                ));
                std::fs::rename(&self.dir, &tomb).map_err(io_at("rename", &self.dir))?;
                sync_dir(volumes_dir).await?;
                if let Err(e) = std::fs::remove_dir_all(&tomb) {
                    tracing::warn!(path = %tomb.display(), error = %e, "could not remove a deleted volume's files; removed at the next start");
                }
            }
            Backend::Object(obj) => {
                // The heat map before the manifests: once the newest manifest is gone, only
                // unreferenced segments may be left.
                self.delete_heat_obj().await?;
                // Then the trim floor: a new volume of this name starts numbering at 1.
                obj.delete(&obj.key(&backend::floor_rel(&self.name)))
                    .await?;
                let mut manifests: Vec<(u64, object_store::path::Path)> = obj
                    .list(&format!("volumes/{}/manifest", self.name))
                    .await?
                    .into_iter()
                    .filter_map(|m| {
                        let seq = m
                            .location
                            .filename()
                            .and_then(backend::parse_manifest_name)?;
                        Some((seq, m.location))
                    })
                    .collect();
                manifests.sort_by_key(|m| m.0);
                for (_, key) in &manifests {
                    obj.delete(key).await?;
                }
                for m in obj.list(&format!("volumes/{}/seg", self.name)).await? {
                    obj.delete(&m.location).await?;
                }
            }
        }
        self.state.borrow_mut().damaged = Some("deleted".into());
        tracing::info!(volume = %self.name, id = %volume_id_hex(confirm_id), snapshots = summary.snapshot_count, "volume deleted");
        Ok(())
    }
}

/// Local store: directory names of deleted volumes on their way out.
pub const DELETED_PREFIX: &str = ".deleted-";

/// Local store: removes what deletions interrupted by a crash left behind.
pub fn remove_deleted_leftovers(volumes_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(volumes_dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(DELETED_PREFIX) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "could not remove a deleted volume's files");
            }
        }
    }
}
