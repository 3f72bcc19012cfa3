//! A volume's snapshot chain: each snapshot's layer built from its segments, listing the
//! chain, and deleting a snapshot (merged into its successor, which keeps every later
//! snapshot's content).

use std::collections::HashMap;
use std::rc::Rc;

use super::clones::find_clone_of;
use super::error::{StoreError, StoreErrorKind};
use super::format::{RetentionCounts, SegExtent, SnapEntry, KIND_ZERO, LABEL_BYTES_MAX};
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
    /// takes over its parent. The chain head and pinned snapshots cannot be deleted. Returns
    /// the absorbing snapshot.
    pub async fn delete_snapshot(&self, snap_id: u64) -> Result<u64, StoreError> {
        let merged = self.delete_snapshots(&[snap_id]).await?;
        Ok(merged.first().map_or(0, |m| m.1))
    }

    /// Deletes several snapshots in one manifest replacement (retention): each merges into
    /// the next snapshot of the chain as [`Volume::delete_snapshot`] does, in chain order.
    /// All or nothing: a head, a pinned snapshot, an unknown id or a clone's source (asked of
    /// the store when several servers share it) refuses the whole batch. Returns each deleted
    /// snapshot with the one that absorbed it.
    pub async fn delete_snapshots(&self, ids: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        self.check_damaged()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.backend.loads_lazily() {
            // Several servers: a clone of this snapshot may be loaded by another server only,
            // so ask the store rather than this server's clone registry.
            let volume_id = self.state.borrow().manifest.volume_id;
            for &snap_id in ids {
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
        }
        let _guard = self.meta_lock.lock().await;
        let (new_manifest, layers, merged) = {
            let st = self.state.borrow();
            let mut nm = st.manifest.clone();
            let mut layers = st.layers.clone();
            let mut merged = Vec::with_capacity(ids.len());
            let mut sorted = ids.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            for snap_id in sorted {
                let idx = nm
                    .snapshots
                    .iter()
                    .position(|s| s.snap_id == snap_id)
                    .ok_or_else(|| {
                        StoreError::new(
                            StoreErrorKind::NoSuchSnapshot,
                            format!("volume {} has no snapshot {snap_id}", self.name),
                        )
                    })?;
                if idx + 1 == nm.snapshots.len() {
                    return Err(StoreError::new(
                        StoreErrorKind::DeleteHead,
                        format!("snapshot {snap_id} is the chain head (the next snapshot's parent): it cannot be deleted"),
                    ));
                }
                if nm.snapshots[idx].pinned {
                    return Err(StoreError::new(
                        StoreErrorKind::InUse,
                        format!(
                            "snapshot {snap_id} of volume {} is pinned{}: unpin it first",
                            self.name,
                            label_note(&nm.snapshots[idx].label)
                        ),
                    ));
                }
                let gone = nm.snapshots.remove(idx);
                let child = &mut nm.snapshots[idx];
                child.parent_id = gone.parent_id;
                let mut segs = gone.segments;
                segs.extend_from_slice(&child.segments);
                child.segments = segs;
                child.bytes += gone.bytes;
                child.extent_count += gone.extent_count;
                merged.push((snap_id, child.snap_id));
                let mut layer = Layer::clone(&layers[idx]);
                layer.overlay(&layers[idx + 1]);
                layers.remove(idx);
                layers[idx] = Rc::new(layer);
            }
            nm.sequence += 1;
            (nm, layers, merged)
        };
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&new_manifest, &tags).await?;
        let mut st = self.state.borrow_mut();
        st.layers = layers;
        st.manifest = new_manifest;
        for (snap_id, merged_into) in &merged {
            tracing::info!(volume = %self.name, snap_id, merged_into, "snapshot deleted");
        }
        Ok(merged)
    }

    /// Pins or unpins committed snapshot `snap_id` (durable). `label`: `Some` sets it (empty
    /// clears it), `None` keeps the one it has. Returns the snapshot as it is then.
    pub async fn pin(
        &self,
        snap_id: u64,
        pinned: bool,
        label: Option<&str>,
    ) -> Result<SnapEntry, StoreError> {
        self.check_damaged()?;
        if let Some(l) = label {
            if l.len() > LABEL_BYTES_MAX || l.chars().any(char::is_control) {
                return Err(StoreError::new(
                    StoreErrorKind::Invalid,
                    format!("a label is at most {LABEL_BYTES_MAX} bytes of printable text"),
                ));
            }
        }
        let _guard = self.meta_lock.lock().await;
        let (nm, entry) = {
            let st = self.state.borrow();
            let mut nm = st.manifest.clone();
            let e = nm
                .snapshots
                .iter_mut()
                .find(|s| s.snap_id == snap_id)
                .ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::NoSuchSnapshot,
                        format!("volume {} has no snapshot {snap_id}", self.name),
                    )
                })?;
            e.pinned = pinned;
            if let Some(l) = label {
                e.label = l.to_string();
            }
            let entry = e.clone();
            nm.sequence += 1;
            (nm, entry)
        };
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&nm, &tags).await?;
        self.state.borrow_mut().manifest = nm;
        tracing::info!(volume = %self.name, snap_id, pinned, label = %entry.label, "snapshot pin");
        Ok(entry)
    }

    /// Replaces the retention policy (durable).
    pub async fn set_retention(&self, policy: RetentionCounts) -> Result<(), StoreError> {
        self.check_damaged()?;
        let _guard = self.meta_lock.lock().await;
        let nm = {
            let st = self.state.borrow();
            if st.manifest.retention == policy {
                return Ok(());
            }
            let mut nm = st.manifest.clone();
            nm.retention = policy;
            nm.sequence += 1;
            nm
        };
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&nm, &tags).await?;
        self.state.borrow_mut().manifest = nm;
        Ok(())
    }

    pub fn retention(&self) -> RetentionCounts {
        self.state.borrow().manifest.retention
    }

    /// What snapshot `snap_id`'s data is to the chain: (own, shared) bytes. Own: the blocks of
    /// its delta the next snapshot overwrote, which deleting it gives back (after compaction);
    /// shared: the rest, which later snapshots still read. The head owns nothing: everything
    /// it holds is the volume's newest content. `None` for an unknown snapshot.
    pub fn usage(&self, snap_id: u64) -> Option<(u64, u64)> {
        let st = self.state.borrow();
        let idx = st
            .manifest
            .snapshots
            .iter()
            .position(|s| s.snap_id == snap_id)?;
        let bs = u64::from(st.manifest.block_size);
        let layer = &st.layers[idx];
        let next = st.layers.get(idx + 1);
        let (mut data, mut own) = (0u64, 0u64);
        for p in layer.pieces() {
            if !matches!(p.src, super::layer::Src::Data { .. }) {
                continue;
            }
            data += p.end - p.start;
            if let Some(next) = next {
                next.for_each_in(p.start, p.end, |q| own += q.end - q.start);
            }
        }
        Some((own * bs, (data - own) * bs))
    }

    /// Every snapshot of the chain, oldest first.
    pub fn chain(&self) -> Vec<SnapEntry> {
        self.state.borrow().manifest.snapshots.clone()
    }

    /// Records that snapshot `snap_id` was read now (a hydration, a verify, an export): it
    /// is protected from retention for a while ([`Volume::read_within`]).
    pub fn note_read(&self, snap_id: u64) {
        self.reads
            .borrow_mut()
            .insert(snap_id, std::time::Instant::now());
    }

    /// Whether snapshot `snap_id` was read within `window`.
    pub fn read_within(&self, snap_id: u64, window: std::time::Duration) -> bool {
        self.reads
            .borrow()
            .get(&snap_id)
            .is_some_and(|t| t.elapsed() < window)
    }
}

fn label_note(label: &str) -> String {
    if label.is_empty() {
        String::new()
    } else {
        format!(" ({label})")
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
