//! Clones: the read-only view of a clone's source that the clone's reads fall through to, and
//! finding the clones of a volume (the snapshot a clone depends on cannot be deleted).

use std::collections::HashMap;
use std::rc::Rc;

use super::backend::Backend;
use super::chain::build_layer;
use super::error::{StoreError, StoreErrorKind};
use super::format::{CloneSourceData, VolumeId};
use super::layer::Layer;
use super::manifest::{read_manifest, read_manifest_full};
use super::segment_reader::{open_segments, Segment};
use super::volume::Volume;

/// Local disk: a clone's view of its source is reopened this long after it was opened, so
/// that the segment files a compaction of the source removed are closed.
const LOCAL_VIEW_REFRESH: std::time::Duration = std::time::Duration::from_secs(600);

/// Cap on the depth of a clone chain (a clone of a clone of ...), bounding a read's fall-through.
pub const CLONE_DEPTH_MAX: usize = 16;

/// A read-only view of a clone's source as of the source snapshot, opened by the clone's
/// shard from the source's files: the content of the source snapshot and of every one before
/// it never changes (a deleted predecessor merges into the next snapshot, which keeps the
/// content as of the source snapshot; compaction rewrites segments into new ones with the
/// same content), and the source snapshot itself cannot be deleted while a clone depends on
/// it. So the view, once built, stays exact without coordination with the source's owner
/// shard, as long as the segments it opened exist: on local disk an open file outlives its
/// removal (the view is still rebuilt every 10 minutes, to give that space back); on an
/// object store a replaced segment object stays for the retired grace period, so the view is
/// rebuilt from the current manifest after half of it.
#[derive(Debug)]
pub(super) struct SourceView {
    /// The source's layers up to and including the source snapshot, oldest first.
    pub(super) layers: Vec<Rc<Layer>>,
    pub(super) segments: HashMap<u64, Rc<Segment>>,
    /// The source's own clone source, if the source is itself a clone.
    pub(super) next: Option<Rc<SourceView>>,
    loaded_at: std::time::Instant,
}

impl SourceView {
    pub(super) async fn load(
        backend: &Backend,
        src: &CloneSourceData,
        depth: usize,
    ) -> Result<Rc<SourceView>, StoreError> {
        if depth >= CLONE_DEPTH_MAX {
            return Err(StoreError::new(
                StoreErrorKind::Damaged,
                format!("clone chain deeper than {CLONE_DEPTH_MAX} volumes"),
            ));
        }
        let damaged = |why: String| {
            StoreError::new(
                StoreErrorKind::Damaged,
                format!("clone source {}@{}: {why}", src.volume, src.snap_id),
            )
        };
        let (m, tags) = read_manifest_full(backend, &src.volume)
            .await
            .map_err(|e| damaged(e.to_string()))?
            .ok_or_else(|| damaged("the source volume is gone".into()))?;
        if m.volume_id != src.volume_id {
            return Err(damaged(
                "the source volume was replaced by another volume of the same name".into(),
            ));
        }
        let idx = m
            .snapshots
            .iter()
            .position(|s| s.snap_id == src.snap_id)
            .ok_or_else(|| damaged("the source snapshot is gone".into()))?;
        let ids: std::collections::BTreeSet<u64> = m.snapshots[..=idx]
            .iter()
            .flat_map(|s| s.segments.iter().copied())
            .collect();
        let opened = open_segments(backend, &src.volume, &m, &tags, ids).await;
        let mut segments = HashMap::new();
        for (id, res) in opened {
            let seg = res.map_err(|e| damaged(format!("segment {id}: {e}")))?;
            segments.insert(id, Rc::new(seg));
        }
        let layers = m.snapshots[..=idx]
            .iter()
            .map(|s| Rc::new(build_layer(&s.segments, &segments)))
            .collect();
        let next = match &m.clone_source {
            Some(c) => Some(Box::pin(SourceView::load(backend, c, depth + 1)).await?),
            None => None,
        };
        Ok(Rc::new(SourceView {
            layers,
            segments,
            next,
            loaded_at: std::time::Instant::now(),
        }))
    }

    /// [`SourceView::load`], tried again when a segment went away between the manifest read
    /// and its open (a compaction of the source replaced it).
    async fn load_retrying(
        backend: &Backend,
        src: &CloneSourceData,
    ) -> Result<Rc<SourceView>, StoreError> {
        let mut tries = 0;
        loop {
            match SourceView::load(backend, src, 1).await {
                Err(e) if tries < 3 && e.kind() == StoreErrorKind::Damaged => {
                    tries += 1;
                    tracing::info!(source = %src.volume, error = %e, "clone source changed while opening it: again");
                }
                r => return r,
            }
        }
    }
}

impl Volume {
    /// The clone's source view, opened on first use.
    pub(super) async fn source_view(&self) -> Result<Option<Rc<SourceView>>, StoreError> {
        // Object store: before the replaced objects it opened are deleted. Local disk: its
        // open files read on after their removal, but hold the space a compaction of the
        // source gave back until the view lets them go.
        let refresh_after = match self.backend {
            Backend::Local { .. } => LOCAL_VIEW_REFRESH,
            Backend::Object(_) => super::compaction::Tuning::current().retired_grace / 2,
        };
        if let Some(v) = self.source_view.borrow().as_ref() {
            if v.loaded_at.elapsed() < refresh_after {
                return Ok(Some(Rc::clone(v)));
            }
        }
        let Some(src) = self.clone_source() else {
            return Ok(None);
        };
        let view = SourceView::load_retrying(&self.backend, &src).await?;
        *self.source_view.borrow_mut() = Some(Rc::clone(&view));
        Ok(Some(view))
    }
}

/// A volume of the store that is a clone of any snapshot of `volume` (id `volume_id`).
pub async fn find_any_clone_of(
    backend: &Backend,
    volume: &str,
    volume_id: &VolumeId,
) -> Result<Option<(String, u64)>, StoreError> {
    for name in backend.list_volumes().await? {
        if name == volume || !deltavol_schemas::valid_volume_name(&name) {
            continue;
        }
        let Some(m) = read_manifest(backend, &name).await? else {
            continue;
        };
        if let Some(c) = m
            .clone_source
            .as_ref()
            .filter(|c| c.volume == volume && &c.volume_id == volume_id)
        {
            return Ok(Some((name, c.snap_id)));
        }
    }
    Ok(None)
}

/// A volume of the store that is a clone of `volume@snap_id`, if any (reads every manifest).
pub(super) async fn find_clone_of(
    backend: &Backend,
    volume: &str,
    volume_id: &VolumeId,
    snap_id: u64,
) -> Result<Option<String>, StoreError> {
    for name in backend.list_volumes().await? {
        if name == volume {
            continue;
        }
        let Some(m) = read_manifest(backend, &name).await? else {
            continue;
        };
        if m.clone_source.as_ref().is_some_and(|c| {
            c.volume == volume && &c.volume_id == volume_id && c.snap_id == snap_id
        }) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}
