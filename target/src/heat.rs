//! The read heat map: which regions of the volume the application reads most.
//!
//! Every READ the volume serves bumps a saturating one-byte counter of the region it starts in
//! ([`HeatMap::record`]; regions of [`HeatMap::region_blocks`] blocks, 2 MiB or more so that
//! the map stays at most [`HEAT_ENTRIES_MAX`] bytes). Each queue has its own counters, so
//! queue threads never write one cache line together; a read costs a load and a store.
//!
//! The shipper sends the map to the data plane every `--heat-interval` next to the snapshots
//! ([`HeatMap::take`]: the queues' counters summed, then halved, so the map follows what is
//! read now rather than ever since the start). After losing the machine, `recover` fetches it
//! and the background hydration fills the hottest regions first ([`hot_order`]), so the
//! application's working set is local sooner and fewer of its reads wait on the network.
//!
//! A heat map is a hint, never data: a wrong or missing one changes the order of hydration,
//! not what a read returns. An encrypted volume's map is not shipped (which regions are read
//! is something the data plane's host need not learn).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use crate::hydrate::{HYDRATE_BATCH_EXTENTS, HYDRATE_EXTENT_BLOCKS};

/// The most entries a map has (the data plane takes up to 4 MiB).
pub const HEAT_ENTRIES_MAX: u64 = 1 << 20;

/// Blocks per region for a volume of `nblocks` blocks: a hydration batch (512 blocks, 2 MiB)
/// or the smallest power of two above it that keeps the map within [`HEAT_ENTRIES_MAX`].
pub fn region_blocks_for(nblocks: u64) -> u32 {
    let mut r = HYDRATE_BATCH_EXTENTS * HYDRATE_EXTENT_BLOCKS;
    while nblocks.div_ceil(r) > HEAT_ENTRIES_MAX {
        r *= 2;
    }
    u32::try_from(r).unwrap_or(1 << 31)
}

pub struct HeatMap {
    region_shift: u32,
    entries: usize,
    /// One map per queue (the host rings' indices wrap onto them).
    queues: Vec<Box<[AtomicU8]>>,
}

impl HeatMap {
    pub fn new(nblocks: u64, nqueues: usize) -> HeatMap {
        let rb = region_blocks_for(nblocks);
        let entries = nblocks.div_ceil(u64::from(rb)) as usize;
        HeatMap {
            region_shift: rb.trailing_zeros(),
            entries,
            queues: (0..nqueues.max(1))
                .map(|_| (0..entries).map(|_| AtomicU8::new(0)).collect())
                .collect(),
        }
    }

    pub fn region_blocks(&self) -> u32 {
        1 << self.region_shift
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// A read at block `lba` on queue `q`.
    #[inline]
    pub fn record(&self, q: usize, lba: u64) {
        let m = &self.queues[q % self.queues.len()];
        if let Some(c) = m.get((lba >> self.region_shift) as usize) {
            let v = c.load(Relaxed);
            if v < u8::MAX {
                c.store(v + 1, Relaxed);
            }
        }
    }

    /// The map as it is now (the queues' counters summed, saturating), then every counter
    /// halved (old reads fade). `None` if nothing was read since it faded out.
    pub fn take(&self) -> Option<Vec<u8>> {
        let mut out = vec![0u8; self.entries];
        for m in &self.queues {
            for (o, c) in out.iter_mut().zip(m.iter()) {
                let v = c.load(Relaxed);
                c.store(v / 2, Relaxed);
                *o = o.saturating_add(v);
            }
        }
        out.iter().any(|&v| v > 0).then_some(out)
    }
}

/// The extents of the regions of `heat` that were read, hottest first (ties in LBA order),
/// for a volume of `nextents` extents; `None` if the map does not fit the volume (another
/// size: the map is ignored). Cold regions are not listed: the LBA pass takes them.
pub fn hot_order(region_blocks: u32, heat: &[u8], nextents: u64) -> Option<Vec<u64>> {
    let rb = u64::from(region_blocks);
    if rb == 0 || !rb.is_power_of_two() || rb % HYDRATE_EXTENT_BLOCKS != 0 {
        return None;
    }
    let nblocks = nextents * HYDRATE_EXTENT_BLOCKS;
    if heat.len() as u64 != nblocks.div_ceil(rb) {
        return None;
    }
    let mut regions: Vec<(u8, usize)> = heat
        .iter()
        .enumerate()
        .filter(|(_, &h)| h > 0)
        .map(|(i, &h)| (h, i))
        .collect();
    regions.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let per = rb / HYDRATE_EXTENT_BLOCKS;
    Some(
        regions
            .into_iter()
            .flat_map(|(_, i)| i as u64 * per..((i as u64 + 1) * per).min(nextents))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_keep_the_map_small() {
        assert_eq!(region_blocks_for(1), 512);
        assert_eq!(region_blocks_for(512 << 20), 512); // 2 TiB: 1 Mi regions of 2 MiB
        assert_eq!(region_blocks_for((512 << 20) + 1), 1024);
        let m = HeatMap::new(1 << 40 >> 12, 2); // 1 TiB
        assert_eq!(m.entries(), 1 << 19);
    }

    #[test]
    fn counts_saturate_sum_over_queues_and_fade() {
        let m = HeatMap::new(4096, 2); // 8 regions
        assert_eq!(m.take(), None);
        for _ in 0..300 {
            m.record(0, 0);
        }
        for _ in 0..10 {
            m.record(1, 0);
            m.record(3, 1024 + 7); // queue 3 wraps onto queue 1
        }
        m.record(0, 4096 * 10); // past the end: ignored
        let t = m.take().unwrap();
        assert_eq!(t[0], 255); // 255 + 10, saturated
        assert_eq!(t[2], 10);
        assert_eq!(t.iter().filter(|&&v| v > 0).count(), 2);
        let t = m.take().unwrap(); // halved once
        assert_eq!((t[0], t[2]), (127 + 5, 5));
        for _ in 0..8 {
            m.take();
        }
        assert_eq!(m.take(), None);
    }

    #[test]
    fn hottest_regions_first() {
        // 20 extents, regions of 8 extents (512 blocks): 3 regions, the last one short.
        let heat = [3u8, 0, 9];
        let o = hot_order(512, &heat, 20).unwrap();
        assert_eq!(o, vec![16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(hot_order(512, &[1, 2], 20), None); // another size
        assert_eq!(hot_order(100, &heat, 20), None);
        assert_eq!(hot_order(0, &heat, 20), None);
        assert_eq!(hot_order(512, &[0, 0, 0], 20), Some(vec![]));
    }
}
