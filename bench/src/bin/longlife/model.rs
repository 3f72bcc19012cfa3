//! The workload and the bench's model of the volume.
//!
//! Snapshot `s` (ids 1, 2, ...; parent `s - 1`) writes `writes_per_snapshot` random extents
//! (random LBA, 1 ..= `max_extent_blocks` blocks) drawn from one seeded RNG, so every store
//! gets the same snapshots. Like the compute node's shipper, which sends a cut's dirty blocks
//! once each, the snapshot ships the union of its extents' blocks, as runs of consecutive
//! blocks: a block two extents of one snapshot overlap is sent and counted once.
//!
//! A block's content is a function of (seed, snapshot id, LBA) ([`block_data`]): the model
//! keeps, per block, only the ids of the snapshots that wrote it, oldest first, and
//! regenerates any version of any block on demand. Its first 24 bytes say which version it
//! is (snapshot id, LBA, seed, little-endian), so a mismatch names what was read instead.

use rand::rngs::StdRng;
use rand::Rng;

/// Block size of the bench volume (the ublk target's).
pub const BLOCK_SIZE_BYTES: u32 = 4096;
const BLOCK: usize = BLOCK_SIZE_BYTES as usize;

/// splitmix64: a fast, well-mixed 64-bit generator for block contents.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The content snapshot `snap` wrote to block `lba` (`out`: one block).
pub fn block_data(seed: u64, snap: u64, lba: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK, "block_data fills one block");
    out[0..8].copy_from_slice(&snap.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    out[16..24].copy_from_slice(&seed.to_le_bytes());
    let mut s = seed
        ^ snap.wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ lba.wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(17);
    for w in out[24..].chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix64(&mut s).to_le_bytes());
    }
}

/// What a block read back holds, for error messages.
pub fn describe_block(buf: &[u8]) -> String {
    if buf.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let word = |i: usize| {
        u64::from_le_bytes(
            buf[i * 8..i * 8 + 8]
                .try_into()
                .expect("eight bytes of a block"),
        )
    };
    format!(
        "a block stamped snapshot {}, block {}, seed {}",
        word(0),
        word(1),
        word(2)
    )
}

/// One snapshot's writes: runs `(lba, nblocks)` of distinct blocks, in LBA order.
pub fn snapshot_runs(
    rng: &mut StdRng,
    volume_blocks: u64,
    writes: u32,
    max_extent_blocks: u32,
) -> Vec<(u64, u32)> {
    let mut blocks = Vec::with_capacity(writes as usize * max_extent_blocks as usize);
    for _ in 0..writes {
        let n = u64::from(rng.gen_range(1..=max_extent_blocks)).min(volume_blocks);
        let lba = rng.gen_range(0..=volume_blocks - n);
        blocks.extend(lba..lba + n);
    }
    blocks.sort_unstable();
    blocks.dedup();
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for b in blocks {
        match runs.last_mut() {
            Some((start, n)) if *start + u64::from(*n) == b => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// The data of a run as snapshot `snap` writes it.
pub fn run_data(seed: u64, snap: u64, lba: u64, nblocks: u32, out: &mut Vec<u8>) {
    out.resize(nblocks as usize * BLOCK, 0);
    for (i, b) in out.chunks_exact_mut(BLOCK).enumerate() {
        block_data(seed, snap, lba + i as u64, b);
    }
}

/// Per block, the snapshots that wrote it.
#[derive(Debug)]
pub struct Model {
    seed: u64,
    /// `history[lba]`: ids of the snapshots that wrote block `lba`, ascending.
    history: Vec<Vec<u32>>,
    /// Block writes recorded (a block counted once per snapshot).
    pub block_writes: u64,
}

impl Model {
    pub fn new(seed: u64, volume_blocks: u64) -> Model {
        Model {
            seed,
            history: vec![Vec::new(); volume_blocks as usize],
            block_writes: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.history.len() as u64
    }

    /// Snapshot `snap` (newer than every one recorded so far) wrote `nblocks` at `lba`.
    pub fn record(&mut self, snap: u64, lba: u64, nblocks: u32) {
        let snap = u32::try_from(snap).expect("snapshot ids fit in u32");
        for h in &mut self.history[lba as usize..lba as usize + nblocks as usize] {
            if h.last() != Some(&snap) {
                debug_assert!(h.last().is_none_or(|&l| l < snap));
                h.push(snap);
                self.block_writes += 1;
            }
        }
    }

    /// The snapshot whose write block `lba` shows as of snapshot `snap`, if any wrote it.
    pub fn writer_as_of(&self, lba: u64, snap: u64) -> Option<u64> {
        let h = &self.history[lba as usize];
        let i = h.partition_point(|&s| u64::from(s) <= snap);
        (i > 0).then(|| u64::from(h[i - 1]))
    }

    /// Block `lba` as of snapshot `snap` (zeros if no snapshot up to it wrote it).
    pub fn expected(&self, lba: u64, snap: u64, out: &mut [u8]) {
        match self.writer_as_of(lba, snap) {
            Some(w) => block_data(self.seed, w, lba, out),
            None => out.fill(0),
        }
    }

    /// Whether block `lba` was written by a snapshot in `(after, upto]`.
    fn written_in(&self, lba: u64, after: u64, upto: u64) -> bool {
        let h = &self.history[lba as usize];
        let i = h.partition_point(|&s| u64::from(s) <= after);
        i < h.len() && u64::from(h[i]) <= upto
    }

    /// Blocks written by a snapshot in `(after, upto]`: the delta a retained snapshot `upto`
    /// whose retained predecessor is `after` must hold.
    pub fn delta_blocks(&self, after: u64, upto: u64) -> Vec<u64> {
        (0..self.blocks())
            .filter(|&b| self.written_in(b, after, upto))
            .collect()
    }

    /// The minimum a chain of deltas keeps for the `retained` snapshots (ascending, the head
    /// last): for each retained `r_i`, the blocks written in `(r_{i-1}, r_i]` (`r_0` = 0);
    /// returns the block count of each delta, in order.
    pub fn needed_blocks(&self, retained: &[u64]) -> Vec<u64> {
        let mut counts = vec![0u64; retained.len()];
        for h in &self.history {
            // Walk the block's history and the retained ids together.
            let mut j = 0;
            let mut prev = 0u64;
            for (i, &r) in retained.iter().enumerate() {
                while j < h.len() && u64::from(h[j]) <= prev {
                    j += 1;
                }
                if j < h.len() && u64::from(h[j]) <= r {
                    counts[i] += 1;
                }
                prev = r;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn block_data_is_a_function_of_seed_snapshot_and_lba() {
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        block_data(1, 2, 3, &mut a);
        block_data(1, 2, 3, &mut b);
        assert_eq!(a, b);
        for (seed, snap, lba) in [(2, 2, 3), (1, 3, 3), (1, 2, 4)] {
            block_data(seed, snap, lba, &mut b);
            assert_ne!(a[24..], b[24..]);
        }
        assert_eq!(
            describe_block(&a),
            "a block stamped snapshot 2, block 3, seed 1"
        );
        assert_eq!(describe_block(&[0u8; BLOCK]), "zeros");
    }

    #[test]
    fn runs_are_distinct_sorted_and_in_the_volume() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let runs = snapshot_runs(&mut rng, 64, 32, 4);
            let mut last_end = None;
            for &(lba, n) in &runs {
                assert!(n >= 1 && lba + u64::from(n) <= 64);
                if let Some(e) = last_end {
                    assert!(lba > e, "runs must be coalesced and apart: {runs:?}");
                }
                last_end = Some(lba + u64::from(n));
            }
        }
        // A one-block volume.
        assert_eq!(snapshot_runs(&mut rng, 1, 3, 4), vec![(0, 1)]);
    }

    #[test]
    fn model_answers_as_of_a_snapshot_and_counts_deltas() {
        let mut m = Model::new(9, 8);
        m.record(1, 0, 2); // blocks 0, 1
        m.record(2, 1, 1); // block 1
        m.record(3, 5, 1); // block 5
        m.record(3, 5, 1); // the same snapshot again: counted once
        m.record(5, 0, 1); // block 0
        assert_eq!(m.block_writes, 5);
        assert_eq!(m.writer_as_of(0, 4), Some(1));
        assert_eq!(m.writer_as_of(0, 5), Some(5));
        assert_eq!(m.writer_as_of(1, 1), Some(1));
        assert_eq!(m.writer_as_of(5, 2), None);
        let mut buf = vec![1u8; BLOCK];
        m.expected(7, 5, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        m.expected(1, 9, &mut buf);
        let mut want = vec![0u8; BLOCK];
        block_data(9, 2, 1, &mut want);
        assert_eq!(buf, want);
        // Retained 2, 5: (0,2] has blocks 0, 1; (2,5] has blocks 0, 5.
        assert_eq!(m.needed_blocks(&[2, 5]), vec![2, 2]);
        // Retained 1, 3, 5: (0,1] 0, 1; (1,3] 1, 5; (3,5] 0.
        assert_eq!(m.needed_blocks(&[1, 3, 5]), vec![2, 2, 1]);
        // Only the head: the live blocks.
        assert_eq!(m.needed_blocks(&[5]), vec![3]);
        assert_eq!(m.delta_blocks(2, 5), vec![0, 5]);
    }
}
