//! The in-memory LRU read cache of clean blocks, bounded in bytes.
//!
//! Sharded by a hash of the block number (so strided access patterns spread over every shard)
//! and queues rarely contend; each shard is a short `Mutex` section (never held across an
//! await). A full shard reuses the evicted entry's list node and buffer for the new entry
//! (`LruCache::push` plus one spare buffer), so a warm cache allocates nothing per I/O.
//!
//! ## Staleness (DESIGN: "the LRU must not resurrect stale data")
//! Entries are only inserted from backing-file reads, and only if no flush invalidated blocks
//! since the read began: a reader samples [`ReadCache::generation`] before it looks at the
//! bitmaps, and [`ReadCache::insert_if_current`] compares it under the shard lock. The flush
//! bumps the generation *before* it removes the blocks it wrote, then retires the frozen
//! epoch; so an insert either happens before the removal (and is removed) or sees the bump.

use super::meta::BLOCK_SIZE;
use lru::LruCache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const SHARDS: usize = 16;
const _: () = assert!(
    SHARDS.is_power_of_two(),
    "shard() takes the hash's top bits"
);
type Block = Box<[u8; BLOCK_SIZE as usize]>;

struct Shard {
    lru: LruCache<u64, Block>,
    /// The buffer of the last evicted entry, for the next insert.
    spare: Option<Block>,
}

pub struct ReadCache {
    shards: Vec<Mutex<Shard>>,
    generation: AtomicU64,
    enabled: bool,
}

impl ReadCache {
    /// A cache holding at most `bytes` of block data (0 disables it).
    pub fn new(bytes: u64) -> ReadCache {
        let blocks = bytes / BLOCK_SIZE;
        let per = (blocks / SHARDS as u64).max(1) as usize;
        let cap = std::num::NonZeroUsize::new(per).unwrap_or(std::num::NonZeroUsize::MIN);
        ReadCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::new(cap),
                        spare: None,
                    })
                })
                .collect(),
            generation: AtomicU64::new(0),
            enabled: blocks >= SHARDS as u64,
        }
    }

    fn shard(&self, block: u64) -> &Mutex<Shard> {
        // Fibonacci hashing: the top bits of block * 2^64/φ.
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros());
        &self.shards[h as usize]
    }

    /// Whether the cache holds anything at all (a size too small for its shards disables it).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Copies block `block` into `out` if cached.
    pub fn get(&self, block: u64, out: &mut [u8]) -> bool {
        if !self.enabled {
            return false;
        }
        let mut s = self.shard(block).lock().unwrap_or_else(|p| p.into_inner());
        match s.lru.get(&block) {
            Some(b) => {
                out.copy_from_slice(&b[..]);
                true
            }
            None => false,
        }
    }

    /// Inserts a clean block read from the backing file, unless a flush happened since `gen`.
    pub fn insert_if_current(&self, block: u64, data: &[u8], gen: u64) {
        if !self.enabled {
            return;
        }
        let mut s = self.shard(block).lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != gen {
            return;
        }
        if let Some(b) = s.lru.get_mut(&block) {
            b.copy_from_slice(data);
            return;
        }
        let mut buf = s
            .spare
            .take()
            .unwrap_or_else(|| Box::new([0u8; BLOCK_SIZE as usize]));
        buf.copy_from_slice(data);
        // At capacity, `push` moves the least recently used entry's node to the new key and
        // hands back its buffer, kept for the next insert.
        if let Some((_, old)) = s.lru.push(block, buf) {
            s.spare = Some(old);
        }
    }

    /// Starts an invalidation: readers that began before it will not insert.
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Drops `[start, start + len)` from the cache.
    pub fn remove_range(&self, start: u64, len: u64) {
        if !self.enabled {
            return;
        }
        if len >= 4 * SHARDS as u64 * 64 {
            // Large ranges: scan each shard once instead of probing every block.
            for sh in &self.shards {
                let mut s = sh.lock().unwrap_or_else(|p| p.into_inner());
                let stale: Vec<u64> = s
                    .lru
                    .iter()
                    .map(|(k, _)| *k)
                    .filter(|k| (start..start + len).contains(k))
                    .collect();
                for k in stale {
                    s.lru.pop(&k);
                }
            }
            return;
        }
        for b in start..start + len {
            self.shard(b)
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lru
                .pop(&b);
        }
    }

    pub fn len_blocks(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).lru.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_generation_checked() {
        let c = ReadCache::new(64 * BLOCK_SIZE);
        let blk = [1u8; 4096];
        for b in 0..1000 {
            c.insert_if_current(b, &blk, c.generation());
        }
        assert!(c.len_blocks() <= 64);
        let mut out = [0u8; 4096];
        assert!(c.get(999, &mut out) && out == blk);
        let g = c.generation();
        c.bump_generation();
        c.insert_if_current(5000, &blk, g);
        assert!(
            !c.get(5000, &mut out),
            "stale insert after a flush must be dropped"
        );
        c.remove_range(990, 10);
        assert!(!c.get(999, &mut out));
    }

    /// Any stride fills the whole capacity (a `block % shards` layout would use only the
    /// shards the stride hits: half of them for an even stride).
    #[test]
    fn strided_blocks_use_every_shard() {
        let c = ReadCache::new(256 * BLOCK_SIZE);
        let blk = [7u8; 4096];
        for stride in [1u64, 2, 16, 64] {
            for i in 0..10_000 {
                c.insert_if_current(i * stride, &blk, c.generation());
            }
            let held = c.len_blocks();
            assert!(
                held >= 240,
                "stride {stride}: only {held} of 256 blocks held"
            );
            c.remove_range(0, 10_000 * stride);
        }
    }

    #[test]
    fn disabled_when_zero() {
        let c = ReadCache::new(0);
        c.insert_if_current(1, &[0u8; 4096], c.generation());
        assert!(!c.get(1, &mut [0u8; 4096]));
    }
}
