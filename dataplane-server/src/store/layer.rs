//! The in-memory index of one snapshot: a map of non-overlapping block ranges to where their
//! content lives (an extent record of a segment, or zeros).
//!
//! Invariant: pieces never overlap and are never empty; a later [`Layer::insert`] wins over
//! what it covers (earlier pieces are trimmed or split).

use std::collections::BTreeMap;

/// Where a piece's blocks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// The blocks were written as zeros (a discard).
    Zero,
    /// Record `rec` of segment `seg` (whose extent starts at `rec_lba`).
    Data { seg: u64, rec: u32, rec_lba: u64 },
}

/// A range `[start, end)` of blocks and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub src: Src,
}

/// Non-overlapping block ranges of one snapshot, keyed by start block.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    map: BTreeMap<u64, (u64, Src)>,
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Maps `[start, end)` to `src`, replacing whatever it covered.
    pub fn insert(&mut self, start: u64, end: u64, src: Src) {
        assert!(start < end, "empty piece {start}..{end}");
        // A piece starting before `start` that reaches into the new range: trim it, and keep
        // its tail beyond `end` if it has one.
        if let Some((&s, &(e, old))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, old));
                if e > end {
                    self.map.insert(end, (e, old));
                }
            }
        }
        // Pieces starting inside the new range: drop them, keeping a tail beyond `end`.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, old)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, old));
                }
            }
        }
        self.map.insert(start, (end, src));
    }

    /// Overlays every piece of `newer` on top of `self`.
    pub fn overlay(&mut self, newer: &Layer) {
        for (&s, &(e, src)) in &newer.map {
            self.insert(s, e, src);
        }
    }

    /// Calls `f` for each piece overlapping `[start, end)`, clipped to it, in block order.
    pub fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(Piece)) {
        if let Some((_, &(e, src))) = self.map.range(..start).next_back() {
            if e > start {
                f(Piece {
                    start,
                    end: e.min(end),
                    src,
                });
            }
        }
        for (&s, &(e, src)) in self.map.range(start..end) {
            f(Piece {
                start: s,
                end: e.min(end),
                src,
            });
        }
    }

    /// All pieces, in block order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        self.map
            .iter()
            .map(|(&start, &(end, src))| Piece { start, end, src })
    }
}

/// Resolves `[start, end)` through `layers` (newest first): each block comes from the newest
/// layer that maps it; blocks no layer maps are `None` (never written: zeros). The result
/// covers the range exactly, in block order (`out` is cleared first).
pub fn resolve<'a>(
    layers: impl Iterator<Item = &'a Layer>,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64, Option<Src>)>,
) {
    out.clear();
    let mut holes: Vec<(u64, u64)> = vec![(start, end)];
    let mut next: Vec<(u64, u64)> = Vec::new();
    for layer in layers {
        if holes.is_empty() {
            break;
        }
        next.clear();
        for &(hs, he) in &holes {
            let mut cursor = hs;
            layer.for_each_in(hs, he, |p| {
                if p.start > cursor {
                    next.push((cursor, p.start));
                }
                out.push((p.start, p.end, Some(p.src)));
                cursor = p.end;
            });
            if cursor < he {
                next.push((cursor, he));
            }
        }
        std::mem::swap(&mut holes, &mut next);
    }
    for (hs, he) in holes {
        out.push((hs, he, None));
    }
    out.sort_unstable_by_key(|p| p.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seg: u64) -> Src {
        Src::Data {
            seg,
            rec: 0,
            rec_lba: 0,
        }
    }

    #[test]
    fn insert_splits_and_trims() {
        let mut l = Layer::new();
        l.insert(0, 100, d(1));
        l.insert(10, 20, d(2));
        l.insert(90, 120, Src::Zero);
        l.insert(5, 12, d(3));
        let p: Vec<_> = l.pieces().map(|p| (p.start, p.end, p.src)).collect();
        assert_eq!(
            p,
            vec![
                (0, 5, d(1)),
                (5, 12, d(3)),
                (12, 20, d(2)),
                (20, 90, d(1)),
                (90, 120, Src::Zero)
            ]
        );
    }

    #[test]
    fn resolve_walks_layers() {
        let mut old = Layer::new();
        old.insert(0, 10, d(1));
        let mut new = Layer::new();
        new.insert(4, 6, Src::Zero);
        let mut out = Vec::new();
        resolve([&new, &old].into_iter(), 2, 14, &mut out);
        assert_eq!(
            out,
            vec![
                (2, 4, Some(d(1))),
                (4, 6, Some(Src::Zero)),
                (6, 10, Some(d(1))),
                (10, 14, None)
            ]
        );
    }

    #[test]
    fn random_against_model() {
        // A flat array of "which write" per block, compared with the layer after random inserts.
        let mut seed = 0x1234_5678_u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut model = [0u64; 256];
        let mut l = Layer::new();
        for w in 1..500u64 {
            let s = rnd() % 256;
            let n = 1 + rnd() % 40;
            let e = (s + n).min(256);
            l.insert(s, e, d(w));
            for b in s..e {
                model[b as usize] = w;
            }
        }
        let mut got = [0u64; 256];
        for p in l.pieces() {
            let Src::Data { seg, .. } = p.src else {
                unreachable!("only data inserted")
            };
            for b in p.start..p.end {
                assert_eq!(got[b as usize], 0, "overlap at {b}");
                got[b as usize] = seg;
            }
        }
        assert_eq!(got, model);
    }
}
