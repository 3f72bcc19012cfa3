//! Block contents the bench can check byte for byte: a 16-byte header `block u64 LE | seq u64
//! LE` and a fixed pseudo-random body. Each write stamps only the header (so the data costs
//! the engine and the baseline the same and next to nothing); the model keeps, per block, the
//! seq of the last completed write.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub const BLOCK_BYTES: usize = 4096;
pub const HDR_BYTES: usize = 16;
/// The seq of the blocks written into the backing file before the volume is opened.
pub const SEQ_BACKING: u64 = 0;
/// The seq of the blocks written through the engine when the mirror region is filled.
pub const SEQ_FILL: u64 = 1;

/// The common body of every block.
pub fn body() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES - HDR_BYTES];
    let mut x: u64 = 0x6465_6c74_6176_6f6c;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

/// Fills `buf` (whole blocks) with blocks `first..` carrying `seq`.
pub fn fill_blocks(buf: &mut [u8], first: u64, seq: u64, body: &[u8]) {
    for (i, blk) in buf.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        stamp(blk, first + i as u64, seq);
        blk[HDR_BYTES..].copy_from_slice(body);
    }
}

/// Writes the header of one block.
#[inline]
pub fn stamp(blk: &mut [u8], block: u64, seq: u64) {
    blk[..8].copy_from_slice(&block.to_le_bytes());
    blk[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// The header of one block.
#[inline]
pub fn header(blk: &[u8]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&blk[..8]);
    b.copy_from_slice(&blk[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// Per block, the seq of the last completed write (one writer per block at a time).
pub struct Model {
    seqs: Vec<AtomicU64>,
}

impl Model {
    pub fn new(nblocks: u64) -> Model {
        Model {
            seqs: (0..nblocks).map(|_| AtomicU64::new(SEQ_BACKING)).collect(),
        }
    }

    #[inline]
    pub fn set(&self, block: u64, seq: u64) {
        self.seqs[block as usize].store(seq, Relaxed);
    }

    #[inline]
    pub fn get(&self, block: u64) -> u64 {
        self.seqs[block as usize].load(Relaxed)
    }
}

/// Checks one block read back: `Err` says what differs. With `full`, the body too.
#[inline]
pub fn check_block(
    blk: &[u8],
    block: u64,
    model: &Model,
    body: &[u8],
    full: bool,
) -> Result<(), String> {
    let (b, s) = header(blk);
    let want = model.get(block);
    if b != block || s != want {
        return Err(format!(
            "block {block}: header says block {b} seq {s}, expected seq {want}"
        ));
    }
    if full && blk[HDR_BYTES..] != *body {
        let at = blk[HDR_BYTES..]
            .iter()
            .zip(body)
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        return Err(format!(
            "block {block}: body differs at byte {}",
            at + HDR_BYTES
        ));
    }
    Ok(())
}

/// A small fast PRNG (xorshift64*), the same for the engine and the baseline.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_catches_wrong_block_seq_and_body() {
        let body = body();
        let model = Model::new(8);
        model.set(3, 7);
        let mut blk = vec![0u8; BLOCK_BYTES];
        fill_blocks(&mut blk, 3, 7, &body);
        assert!(check_block(&blk, 3, &model, &body, true).is_ok());
        // Another block's data.
        assert!(check_block(&blk, 2, &model, &body, true).is_err());
        // A stale write.
        model.set(3, 8);
        assert!(check_block(&blk, 3, &model, &body, false).is_err());
        model.set(3, 7);
        // A flipped body byte is seen only by the full check.
        blk[100] ^= 1;
        assert!(check_block(&blk, 3, &model, &body, false).is_ok());
        assert!(check_block(&blk, 3, &model, &body, true).is_err());
        // Zeros (a hole) are never a valid block other than block 0 seq 0 with a zero body.
        let zeros = vec![0u8; BLOCK_BYTES];
        model.set(0, 0);
        assert!(check_block(&zeros, 0, &model, &body, true).is_err());
    }

    #[test]
    fn rng_stays_below_bound() {
        let mut r = Rng::new(42);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
