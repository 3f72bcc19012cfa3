//! Reads as of a snapshot: [`Volume::plan_read`] resolves a block range through the chain's
//! layers (and, on a clone, its source's) into a [`ReadPlan`] of pieces, each zeros or a
//! record of a segment.

use std::collections::HashMap;
use std::rc::Rc;

use super::error::{StoreError, StoreErrorKind};
use super::layer::{self, Layer, Src};
use super::segment_reader::Segment;
use super::volume::Volume;

/// Cap on the blocks one `ReadExtents` request may ask for, in bytes.
pub const READ_REQUEST_MAX_BYTES: u64 = 1 << 30;

/// Resolves `holes` through `layers` (newest last); appends what they hold to `out` and
/// returns in `holes` what none of them writes.
fn resolve_level(
    layers: &[Rc<Layer>],
    segments: &HashMap<u64, Rc<Segment>>,
    holes: &mut Vec<(u64, u64)>,
    out: &mut Vec<(u64, u64, PlanSrc)>,
) -> Result<(), StoreError> {
    let mut resolved = Vec::new();
    let mut left = Vec::new();
    for &(hs, he) in holes.iter() {
        layer::resolve(
            layers.iter().rev().map(|l| l.as_ref()),
            hs,
            he,
            &mut resolved,
        );
        for (s, e, src) in resolved.drain(..) {
            match src {
                None => left.push((s, e)),
                Some(Src::Zero) => out.push((s, e, PlanSrc::Zero)),
                Some(Src::Data { seg, rec, rec_lba }) => {
                    let seg = segments.get(&seg).cloned().ok_or_else(|| {
                        StoreError::new(
                            StoreErrorKind::Damaged,
                            format!("segment {seg} is missing"),
                        )
                    })?;
                    out.push((s, e, PlanSrc::Data { seg, rec, rec_lba }));
                }
            }
        }
    }
    *holes = left;
    Ok(())
}

/// One piece of a read plan.
#[derive(Debug, Clone)]
pub enum PlanSrc {
    Zero,
    Data {
        seg: Rc<Segment>,
        rec: u32,
        rec_lba: u64,
    },
}

/// A read "as of" a snapshot, resolved to pieces covering the range exactly, in block order.
#[derive(Debug)]
pub struct ReadPlan {
    pub block_size: u32,
    pub pieces: Vec<(u64, u64, PlanSrc)>,
}

impl Volume {
    /// Plans a read of `[lba, lba + nblocks)` as of `snap_id`. On a clone, blocks the clone's
    /// own chain does not hold fall through to the source as of the source snapshot, and
    /// `snap_id = 0` reads the clone's base (the source alone).
    pub async fn plan_read(
        &self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
    ) -> Result<ReadPlan, StoreError> {
        self.check_damaged()?;
        let view = self.source_view().await?;
        let st = self.state.borrow();
        let m = &st.manifest;
        let bs = m.block_size;
        let volume_blocks = m.size_bytes / u64::from(bs);
        let end = lba.checked_add(nblocks).filter(|e| *e <= volume_blocks && nblocks > 0).ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::OutOfRange,
                format!("read of lba {lba} + {nblocks} blocks is outside the volume ({volume_blocks} blocks)"),
            )
        })?;
        if nblocks * u64::from(bs) > READ_REQUEST_MAX_BYTES {
            return Err(StoreError::new(
                StoreErrorKind::TooLarge,
                format!("read of {nblocks} blocks exceeds the cap of {READ_REQUEST_MAX_BYTES} bytes a request"),
            ));
        }
        let own = if snap_id == 0 && view.is_some() {
            0
        } else {
            m.snapshots
                .iter()
                .position(|s| s.snap_id == snap_id)
                .ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::NoSuchSnapshot,
                        format!("volume {} has no snapshot {snap_id}", self.name),
                    )
                })?
                + 1
        };
        let mut holes = vec![(lba, end)];
        let mut found = Vec::new();
        resolve_level(&st.layers[..own], &st.segments, &mut holes, &mut found)?;
        let mut level = view;
        while let Some(v) = level {
            if holes.is_empty() {
                break;
            }
            resolve_level(&v.layers, &v.segments, &mut holes, &mut found)?;
            level = v.next.clone();
        }
        found.extend(holes.into_iter().map(|(s, e)| (s, e, PlanSrc::Zero)));
        found.sort_unstable_by_key(|p| p.0);
        let mut pieces: Vec<(u64, u64, PlanSrc)> = Vec::with_capacity(found.len());
        for (s, e, p) in found {
            // Merge adjacent zero pieces.
            if let (PlanSrc::Zero, Some((_, pe, PlanSrc::Zero))) = (&p, pieces.last_mut()) {
                if *pe == s {
                    *pe = e;
                    continue;
                }
            }
            pieces.push((s, e, p));
        }
        drop(st);
        // A snapshot that exists and is read: retention keeps it for a while.
        self.note_read(snap_id);
        Ok(ReadPlan {
            block_size: bs,
            pieces,
        })
    }
}
