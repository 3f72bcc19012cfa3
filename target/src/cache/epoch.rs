//! Epochs: the point-in-time cut between "writes that belong to snapshot N" and later ones.
//!
//! Epoch `e` writes go to mirror slot `e % 2`. At most two epochs are live: the *active* one,
//! taking writes, and the *frozen* one, read-only, being flushed. The protocol (all `SeqCst`):
//!
//! - a writer [`Epochs::enter_write`]s: loads `current`, increments `inflight[e % 2]`, and
//!   re-checks `current`; if a cut slipped in between it backs out and retries. So once the
//!   cut has bumped `current`, every writer still counted in `inflight[old % 2]` is one that
//!   saw the old epoch before the bump, and the cut waits for exactly those to finish.
//! - the cut sets `frozen = old` *before* `current = old + 1`, so at every instant an epoch
//!   whose slot still holds its data is either `current` or `frozen`;
//! - readers of a mirror slot hold a per-queue reader count on that slot ([`ReadGuard`]) and
//!   re-check that the epoch they saw still owns the slot; the flush retires the frozen epoch
//!   (`frozen = 0`) and then waits for every queue's count on that slot to drop to zero before
//!   it punches the slot's mirror, so a read that saw a block there finishes first.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// A counter alone on its cache line(s), so queues don't false-share.
#[repr(align(128))]
#[derive(Default)]
pub struct Padded<T>(pub T);

pub struct Epochs {
    current: AtomicU64,
    frozen: AtomicU64,
    inflight: [Padded<AtomicU64>; 2],
    /// `readers[q][s]`: reads on queue `q` currently using mirror slot `s`.
    readers: Box<[Padded<[AtomicU64; 2]>]>,
}

impl Epochs {
    pub fn new(active: u64, frozen: u64, nr_queues: usize) -> Epochs {
        assert!(active >= 1 && (frozen == 0 || frozen + 1 == active));
        Epochs {
            current: AtomicU64::new(active),
            frozen: AtomicU64::new(frozen),
            inflight: Default::default(),
            readers: (0..nr_queues.max(1)).map(|_| Padded::default()).collect(),
        }
    }

    pub fn current(&self) -> u64 {
        self.current.load(SeqCst)
    }

    /// The frozen epoch, or 0.
    pub fn frozen(&self) -> u64 {
        self.frozen.load(SeqCst)
    }

    pub fn nr_queues(&self) -> usize {
        self.readers.len()
    }

    /// Registers a write in the active epoch; the write must land in `guard.epoch % 2`.
    pub fn enter_write(&self) -> WriteGuard<'_> {
        loop {
            let e = self.current.load(SeqCst);
            self.inflight[(e % 2) as usize].0.fetch_add(1, SeqCst);
            if self.current.load(SeqCst) == e {
                return WriteGuard {
                    epochs: self,
                    epoch: e,
                };
            }
            self.inflight[(e % 2) as usize].0.fetch_sub(1, SeqCst);
        }
    }

    /// Cuts the active epoch: it becomes frozen and a new one starts. Returns the frozen epoch
    /// once every write that entered it has finished. Blocks (flush thread only).
    pub fn cut(&self) -> u64 {
        assert_eq!(
            self.frozen(),
            0,
            "cut while the previous epoch is still being flushed"
        );
        let old = self.current.load(SeqCst);
        self.frozen.store(old, SeqCst);
        self.current.store(old + 1, SeqCst);
        let slot = (old % 2) as usize;
        let mut spins = 0u32;
        while self.inflight[slot].0.load(SeqCst) != 0 {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        old
    }

    /// Retires the frozen epoch after its flush, then waits until no read uses its slot.
    /// Blocks (flush thread only).
    pub fn retire_frozen(&self) {
        let f = self.frozen();
        assert_ne!(f, 0, "retire without a frozen epoch");
        self.frozen.store(0, SeqCst);
        let slot = (f % 2) as usize;
        for q in self.readers.iter() {
            while q.0[slot].load(SeqCst) != 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Whether epoch `e` still owns its slot (is active or frozen).
    pub fn owns_slot(&self, e: u64) -> bool {
        self.current.load(SeqCst) == e || self.frozen.load(SeqCst) == e
    }

    /// Takes a reader count on `e`'s slot for queue `q`, if `e` still owns it.
    pub fn read_guard(&self, q: usize, e: u64) -> Option<ReadGuard<'_>> {
        let q = q % self.readers.len();
        let slot = (e % 2) as usize;
        self.readers[q].0[slot].fetch_add(1, SeqCst);
        let g = ReadGuard {
            epochs: self,
            q,
            slot,
        };
        if self.owns_slot(e) {
            Some(g)
        } else {
            None
        }
    }
}

pub struct WriteGuard<'a> {
    epochs: &'a Epochs,
    pub epoch: u64,
}

impl WriteGuard<'_> {
    pub fn slot(&self) -> usize {
        (self.epoch % 2) as usize
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.epochs.inflight[(self.epoch % 2) as usize]
            .0
            .fetch_sub(1, SeqCst);
    }
}

pub struct ReadGuard<'a> {
    epochs: &'a Epochs,
    q: usize,
    slot: usize,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.epochs.readers[self.q].0[self.slot].fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cut_waits_for_writers_of_the_old_epoch() {
        let e = Arc::new(Epochs::new(1, 0, 1));
        let g = e.enter_write();
        assert_eq!(g.epoch, 1);
        let e2 = e.clone();
        let t = std::thread::spawn(move || e2.cut());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "cut must wait for the write in flight");
        assert_eq!(
            e.enter_write().epoch,
            2,
            "new writes go to the new epoch at once"
        );
        drop(g);
        assert_eq!(t.join().unwrap(), 1);
        assert_eq!((e.current(), e.frozen()), (2, 1));
    }

    #[test]
    fn retire_waits_for_readers() {
        let e = Arc::new(Epochs::new(1, 0, 2));
        e.cut();
        let r = e.read_guard(1, 1).expect("frozen epoch readable");
        let e2 = e.clone();
        let t = std::thread::spawn(move || e2.retire_frozen());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        assert!(
            e.read_guard(0, 1).is_none(),
            "a retired epoch is not readable"
        );
        drop(r);
        t.join().unwrap();
    }
}
