//! The source volume's contents, derived from the seed so that any block can be regenerated
//! to check a read (no copy of the volume is kept in memory).
//!
//! Block `b` is *filled* (random bytes of its own seeded generator) when a hash of the seed and
//! `b` falls under `fill_percent`, zeros otherwise (never written: the data plane returns zeros
//! for it).

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Block size of the volume (the ublk target's).
pub const BLOCK_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct Data {
    pub seed: u64,
    /// 1..=100.
    pub fill_percent: u8,
}

/// splitmix64's finaliser: a good 64-bit mix of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Data {
    pub fn filled(&self, block: u64) -> bool {
        self.fill_percent >= 100 || mix(self.seed ^ mix(block)) % 100 < u64::from(self.fill_percent)
    }

    /// Writes block `block`'s contents into `out` (one block).
    pub fn block(&self, block: u64, out: &mut [u8]) {
        debug_assert_eq!(out.len(), BLOCK_BYTES);
        if self.filled(block) {
            StdRng::seed_from_u64(mix(self.seed.wrapping_add(mix(block)))).fill_bytes(out);
        } else {
            out.fill(0);
        }
    }

    /// Writes the contents of blocks `first..` into `out` (whole blocks).
    pub fn blocks(&self, first: u64, out: &mut [u8]) {
        for (i, b) in out.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            self.block(first + i as u64, b);
        }
    }

    /// Index of the first block of `got` (blocks `first..`) that differs from the source.
    pub fn first_mismatch(&self, first: u64, got: &[u8], scratch: &mut [u8]) -> Option<u64> {
        got.chunks_exact(BLOCK_BYTES)
            .enumerate()
            .find(|(i, g)| {
                self.block(first + *i as u64, &mut scratch[..BLOCK_BYTES]);
                *g != &scratch[..BLOCK_BYTES]
            })
            .map(|(i, _)| first + i as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_deterministic_and_distinct() {
        let d = Data {
            seed: 7,
            fill_percent: 100,
        };
        let (mut a, mut b, mut c) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
        d.block(3, &mut a);
        d.block(3, &mut b);
        d.block(4, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut two = vec![0u8; 8192];
        d.blocks(3, &mut two);
        assert_eq!(&two[..4096], &a[..]);
        assert_eq!(&two[4096..], &c[..]);
        assert_eq!(d.first_mismatch(3, &two, &mut a), None);
        two[5000] ^= 1;
        assert_eq!(d.first_mismatch(3, &two, &mut a), Some(4));
    }

    #[test]
    fn fill_percent_is_roughly_kept() {
        let d = Data {
            seed: 1,
            fill_percent: 30,
        };
        let n = (0..10_000).filter(|&b| d.filled(b)).count();
        assert!((2_700..3_300).contains(&n), "{n}");
        let mut z = vec![1u8; 4096];
        let b = (0..).find(|&b| !d.filled(b)).unwrap();
        d.block(b, &mut z);
        assert!(z.iter().all(|&x| x == 0));
    }
}
