//! A volume's snapshot chain: each snapshot's layer built from its segments, listing the
//! chain, and deleting a snapshot (merged into its successor, which keeps every later
//! snapshot's content).

use std::collections::HashMap;
use std::rc::Rc;

use super::clones::find_clone_of;
use super::error::{StoreError, StoreErrorKind};
use super::format::{SegExtent, SnapEntry, KIND_ZERO};
use super::layer::{Layer, Src};
use super::segment_reader::Segment;
use super::volume::Volume;

impl Volume {
    /// Snapshots with id > `after`, oldest first, at most `max`; and whether more follow.
    pub fn list(&self, after: u64, max: usize) -> (Vec<SnapEntry>, bool) {
        let st = self.state.borrow();
        let mut it = st.manifest.snapshots.iter().filter(|s| s.snap_id > after);
        let page: Vec<SnapEntry> = it.by_ref().take(max).cloned().collect();
        (page, it.next().is_some())
    }

    /// Deletes snapshot `snap_id`: its extents merge into the next snapshot of the chain, which
    /// takes over its parent. The chain head cannot be deleted. Returns the absorbing snapshot.
    pub async fn delete_snapshot(&self, snap_id: u64) -> Result<u64, StoreError> {
        self.check_damaged()?;
        if self.backend.loads_lazily() {
            // Several servers: a clone of this snapshot may be loaded by another server only,
            // so ask the store rather than this server's clone registry.
            let volume_id = self.state.borrow().manifest.volume_id;
            if let Some(clone) =
                find_clone_of(&self.backend, &self.name, &volume_id, snap_id).await?
            {
                return Err(StoreError::new(
                    StoreErrorKind::InUse,
                    format!(
                        "snapshot {snap_id} of volume {} is the source of clone {clone}: delete the clone first",
                        self.name
                    ),
                ));
            }
        }
        let _guard = self.meta_lock.lock().await;
        let (new_manifest, idx) = {
            let st = self.state.borrow();
            let m = &st.manifest;
            let idx = m
                .snapshots
                .iter()
                .position(|s| s.snap_id == snap_id)
                .ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::NoSuchSnapshot,
                        format!("volume {} has no snapshot {snap_id}", self.name),
                    )
                })?;
            if idx + 1 == m.snapshots.len() {
                return Err(StoreError::new(
                    StoreErrorKind::DeleteHead,
                    format!("snapshot {snap_id} is the chain head (the next snapshot's parent): it cannot be deleted"),
                ));
            }
            let mut nm = m.clone();
            let gone = nm.snapshots.remove(idx);
            let child = &mut nm.snapshots[idx];
            child.parent_id = gone.parent_id;
            let mut segs = gone.segments;
            segs.extend_from_slice(&child.segments);
            child.segments = segs;
            child.bytes += gone.bytes;
            child.extent_count += gone.extent_count;
            nm.sequence += 1;
            (nm, idx)
        };
        let merged_into = new_manifest.snapshots[idx].snap_id;
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&new_manifest, &tags).await?;
        let mut st = self.state.borrow_mut();
        let mut merged = Layer::clone(&st.layers[idx]);
        merged.overlay(&st.layers[idx + 1]);
        st.layers.remove(idx);
        st.layers[idx] = Rc::new(merged);
        st.manifest = new_manifest;
        tracing::info!(volume = %self.name, snap_id, merged_into, "snapshot deleted");
        Ok(merged_into)
    }
}

/// Builds a snapshot's layer from its segments (oldest first; within a segment, later records
/// win). Missing segments (damaged volume) are skipped: the volume refuses reads then.
pub(super) fn build_layer(segment_ids: &[u64], segments: &HashMap<u64, Rc<Segment>>) -> Layer {
    let mut layer = Layer::new();
    for id in segment_ids {
        let Some(seg) = segments.get(id) else {
            continue;
        };
        add_segment(&mut layer, seg.snap_id, &seg.extents);
    }
    layer
}

pub(super) fn add_segment(layer: &mut Layer, seg_id: u64, extents: &[SegExtent]) {
    for (i, e) in extents.iter().enumerate() {
        let src = if e.kind == KIND_ZERO {
            Src::Zero
        } else {
            Src::Data {
                seg: seg_id,
                rec: i as u32,
                rec_lba: e.lba,
            }
        };
        layer.insert(e.lba, e.lba + u64::from(e.nblocks), src);
    }
}
