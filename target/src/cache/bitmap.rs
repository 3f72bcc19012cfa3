//! Atomic dirty bitmaps, one bit per 4096-byte block.
//!
//! Writers on any queue thread set bits with `fetch_or`; the flush thread walks a frozen bitmap
//! (no writer touches it any more) and clears it only after the epoch's data is durable in the
//! backing file and no reader can still be looking at it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Memory that holds a bitmap's words somewhere other than the heap (a shared file mapping,
/// see [`super::journal::BitsFile`]).
pub trait WordStore: Send + Sync {
    fn words(&self) -> &[AtomicU64];
}

enum Words {
    Heap(Box<[AtomicU64]>),
    /// The store's first `.1` words.
    Store(Arc<dyn WordStore>, usize),
}

impl std::ops::Deref for Words {
    type Target = [AtomicU64];
    #[inline]
    fn deref(&self) -> &[AtomicU64] {
        match self {
            Words::Heap(w) => w,
            Words::Store(s, n) => &s.words()[..*n],
        }
    }
}

/// A fixed-size bitmap of atomic words.
pub struct Bitmap {
    words: Words,
    nbits: u64,
}

impl Bitmap {
    pub fn new(nbits: u64) -> Self {
        let nwords = nbits.div_ceil(64) as usize;
        Bitmap {
            words: Words::Heap((0..nwords).map(|_| AtomicU64::new(0)).collect()),
            nbits,
        }
    }

    /// Moves the bitmap's words into `store`, which must hold at least as many words, all
    /// zero (only the non-zero words are written: the pages of a fresh file mapping that
    /// stay zero are never touched). Every later change goes to `store`. Only while nobody
    /// else uses the bitmap (it takes `&mut self`).
    pub fn move_to(&mut self, store: Arc<dyn WordStore>) {
        let dst = store.words();
        assert!(
            dst.len() >= self.words.len(),
            "word store of {} words for a bitmap of {}",
            dst.len(),
            self.words.len()
        );
        for (d, s) in dst.iter().zip(self.words.iter()) {
            let v = s.load(Ordering::SeqCst);
            if v != 0 {
                d.store(v, Ordering::SeqCst);
            }
        }
        let n = self.words.len();
        self.words = Words::Store(store, n);
    }

    pub fn len_bits(&self) -> u64 {
        self.nbits
    }

    #[inline]
    pub fn get(&self, bit: u64) -> bool {
        debug_assert!(bit < self.nbits);
        let w = self.words[(bit / 64) as usize].load(Ordering::SeqCst);
        w & (1u64 << (bit % 64)) != 0
    }

    /// Sets bits `[start, start + len)`; returns how many were newly set.
    pub fn set_range(&self, start: u64, len: u64) -> u64 {
        assert!(
            start + len <= self.nbits,
            "bitmap range {start}+{len} past {}",
            self.nbits
        );
        let mut newly = 0u64;
        let mut bit = start;
        let end = start + len;
        while bit < end {
            let w = bit / 64;
            let lo = bit % 64;
            let n = (64 - lo).min(end - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let word = &self.words[w as usize];
            // Rewrites of blocks already in the epoch (the common case under a hot working
            // set) need no read-modify-write of a shared cache line.
            if word.load(Ordering::SeqCst) & mask != mask {
                let old = word.fetch_or(mask, Ordering::SeqCst);
                newly += u64::from((mask & !old).count_ones());
            }
            bit += n;
        }
        newly
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Loads word `i` (64 blocks starting at block `64 * i`).
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::SeqCst)
    }

    pub fn nwords(&self) -> usize {
        self.words.len()
    }

    /// ORs `value` into word `i` (used when loading a persisted map).
    pub fn or_word(&self, i: usize, value: u64) {
        self.words[i].fetch_or(value, Ordering::SeqCst);
    }

    /// Calls `f(start, len)` for each run of set bits, in block order, each run at most
    /// `max_run` blocks long.
    pub fn for_each_run(&self, max_run: u64, mut f: impl FnMut(u64, u64) -> bool) -> bool {
        let mut run_start: Option<u64> = None;
        let mut i = 0usize;
        while i < self.words.len() {
            let w = self.word(i);
            if w == 0 && run_start.is_none() {
                i += 1;
                continue;
            }
            if w == u64::MAX && run_start.is_some() {
                let s = run_start.unwrap_or(0);
                let end = (i as u64 + 1) * 64;
                if end - s < max_run {
                    i += 1;
                    continue;
                }
            }
            for b in 0..64u64 {
                let bit = i as u64 * 64 + b;
                if bit >= self.nbits {
                    break;
                }
                let set = w & (1u64 << b) != 0;
                match (set, run_start) {
                    (true, None) => run_start = Some(bit),
                    (true, Some(s)) if bit - s == max_run => {
                        if !f(s, bit - s) {
                            return false;
                        }
                        run_start = Some(bit);
                    }
                    (false, Some(s)) => {
                        if !f(s, bit - s) {
                            return false;
                        }
                        run_start = None;
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        if let Some(s) = run_start {
            return f(s, self.nbits - s);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(b: &Bitmap, max: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        b.for_each_run(max, |s, l| {
            v.push((s, l));
            true
        });
        v
    }

    struct HeapStore(Box<[AtomicU64]>);
    impl WordStore for HeapStore {
        fn words(&self) -> &[AtomicU64] {
            &self.0
        }
    }

    #[test]
    fn moved_words_keep_their_bits_and_take_later_changes() {
        let mut b = Bitmap::new(1000);
        b.set_range(3, 70);
        b.set_range(900, 5);
        // A larger store (a mapping is rounded up to pages): the bitmap keeps its own length.
        let store = Arc::new(HeapStore((0..40).map(|_| AtomicU64::new(0)).collect()));
        b.move_to(store.clone());
        assert_eq!(b.nwords(), 16);
        assert_eq!(b.count(), 75);
        assert!(b.get(3) && b.get(72) && !b.get(73) && b.get(904));
        assert_eq!(b.set_range(500, 2), 2);
        assert_eq!(store.0[500 / 64].load(Ordering::SeqCst), 0b11 << (500 % 64));
        b.clear_all();
        assert!(store.0.iter().all(|w| w.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn set_and_count() {
        let b = Bitmap::new(1000);
        assert_eq!(b.set_range(10, 100), 100);
        assert_eq!(b.set_range(50, 100), 40);
        assert_eq!(b.count(), 140);
        assert!(b.get(10) && b.get(149) && !b.get(150) && !b.get(9));
    }

    #[test]
    fn runs_are_split_and_ordered() {
        let b = Bitmap::new(1000);
        b.set_range(0, 3);
        b.set_range(60, 10);
        b.set_range(128, 300);
        b.set_range(999, 1);
        assert_eq!(runs(&b, 1000), vec![(0, 3), (60, 10), (128, 300), (999, 1)]);
        assert_eq!(
            runs(&b, 128),
            vec![
                (0, 3),
                (60, 10),
                (128, 128),
                (256, 128),
                (384, 44),
                (999, 1)
            ]
        );
    }

    #[test]
    fn runs_match_naive_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let n = rng.gen_range(1..2000);
            let b = Bitmap::new(n);
            let mut model = vec![false; n as usize];
            for _ in 0..rng.gen_range(0..20) {
                let s = rng.gen_range(0..n);
                let l = rng.gen_range(1..=(n - s).min(300));
                b.set_range(s, l);
                model[s as usize..(s + l) as usize]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
            let max = rng.gen_range(1..200);
            let mut rebuilt = vec![false; n as usize];
            let mut last_end = 0;
            for (s, l) in runs(&b, max) {
                assert!(l <= max && l > 0 && s >= last_end);
                last_end = s + l;
                rebuilt[s as usize..(s + l) as usize]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
            assert_eq!(rebuilt, model);
        }
    }
}
