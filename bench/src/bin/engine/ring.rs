//! An asynchronous host io_uring for the engine, driven the way a ublk queue thread drives its
//! ring: one thread, one `smol::LocalExecutor`, one task per tag, SQEs pushed as the tasks ask
//! and submitted in one batch when every runnable task has run, then one `io_uring_enter` that
//! waits for a completion, whose CQEs wake their tasks.
//!
//! `deltavol::ring::HostRing` (what the host-level tests use) waits for each SQE as it is
//! submitted, so it can only ever have one request in flight per thread: fine for tests, not
//! for a queue depth. This ring implements the same public [`Ring`] trait with real depth.
//!
//! Buffer contract: as `deltavol::ring`'s. The engine awaits every SQE it submits, and a
//! future dropped before its CQE arrived leaves its slot marked orphaned (never reused until
//! the CQE is reaped), so a late completion never wakes the wrong task.

use deltavol::ring::{
    Deferred, Inline, InlineFile, InlineMode, Kicker, Ring, BATCH_REC_BYTES, FILE_BACKING,
    FILE_MIRROR, NR_FIXED_FILES,
};
use io_uring::{opcode, squeue, types, IoUring};
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

enum Op {
    Free,
    /// Submitted; the task to wake when its CQE arrives.
    Waiting(Option<Waker>),
    Done(i32),
    /// Its future was dropped before the CQE: freed when the CQE is reaped.
    Orphan,
}

struct Ops {
    slots: Vec<Op>,
    free: Vec<usize>,
    in_flight: usize,
}

pub struct AsyncRing {
    ring: RefCell<IoUring>,
    ops: RefCell<Ops>,
    index: usize,
    /// The engine's inline first attempts, as a ublk queue makes them (`DELTAVOL_INLINE_IO`).
    inline: Inline,
}

impl AsyncRing {
    /// A ring of `entries` SQEs for thread `index`, with the volume's files registered at the
    /// engine's fixed indices (as `HostRing::new` and the ublk queue do).
    pub fn new(
        index: usize,
        entries: u32,
        mirrors: [RawFd; 2],
        backing: RawFd,
    ) -> std::io::Result<AsyncRing> {
        let ring = IoUring::new(entries)?;
        let mut files = [-1; NR_FIXED_FILES];
        files[FILE_MIRROR[0] as usize] = mirrors[0];
        files[FILE_MIRROR[1] as usize] = mirrors[1];
        files[FILE_BACKING as usize] = backing;
        ring.submitter().register_files(&files)?;
        Ok(AsyncRing {
            ring: RefCell::new(ring),
            ops: RefCell::new(Ops {
                slots: Vec::with_capacity(entries as usize),
                free: Vec::with_capacity(entries as usize),
                in_flight: 0,
            }),
            index,
            inline: {
                let inline = Inline::new(InlineMode::from_env(), mirrors, backing);
                if std::env::var("DELTAVOL_JOURNAL_BATCH").as_deref() != Ok("off") {
                    inline.enable_batching(entries as usize);
                }
                inline
            },
        })
    }

    /// The inline I/O state (counts, how each file is tried).
    pub fn inline(&self) -> &Inline {
        &self.inline
    }

    /// SQEs submitted whose CQE has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.ops.borrow().in_flight
    }

    fn push(&self, sqe: squeue::Entry) -> Result<usize, i32> {
        let mut ops = self.ops.borrow_mut();
        let key = match ops.free.pop() {
            Some(k) => k,
            None => {
                ops.slots.push(Op::Free);
                ops.slots.len() - 1
            }
        };
        let mut ring = self.ring.borrow_mut();
        let sqe = sqe.user_data(key as u64);
        // SAFETY: the caller of `Ring::submit` keeps every buffer the SQE points at valid until
        // the returned future resolves (module contract); an orphaned slot is not reused before
        // its CQE is reaped.
        let mut pushed = unsafe { ring.submission().push(&sqe) }.is_ok();
        if !pushed {
            // SQ full: hand the queued SQEs to the kernel and retry once.
            if let Err(e) = ring.submit() {
                ops.free.push(key);
                return Err(-(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            // SAFETY: as above.
            pushed = unsafe { ring.submission().push(&sqe) }.is_ok();
        }
        if !pushed {
            ops.free.push(key);
            return Err(-libc::EBUSY);
        }
        ops.slots[key] = Op::Waiting(None);
        ops.in_flight += 1;
        Ok(key)
    }

    /// Submits what is queued and waits for at least `want` completions (0: just submit),
    /// then reaps every CQE and wakes its task. Returns the CQEs reaped.
    pub fn submit_and_wait(&self, want: usize) -> std::io::Result<usize> {
        {
            let ring = self.ring.borrow_mut();
            loop {
                match ring.submitter().submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(self.reap())
    }

    fn reap(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        let mut n = 0;
        for cqe in ring.completion() {
            n += 1;
            let key = cqe.user_data() as usize;
            let Some(slot) = ops.slots.get_mut(key) else {
                continue;
            };
            match std::mem::replace(slot, Op::Done(cqe.result())) {
                Op::Waiting(w) => {
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                Op::Orphan => {
                    *slot = Op::Free;
                    ops.free.push(key);
                }
                other => *slot = other,
            }
            ops.in_flight -= 1;
        }
        n
    }
}

/// The future of one submitted SQE.
pub struct OpFuture<'a> {
    ring: &'a AsyncRing,
    key: Result<usize, i32>,
    done: bool,
}

impl Future for OpFuture<'_> {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let key = match self.key {
            Ok(k) => k,
            Err(e) => {
                self.done = true;
                return Poll::Ready(e);
            }
        };
        let mut ops = self.ring.ops.borrow_mut();
        match &mut ops.slots[key] {
            Op::Done(r) => {
                let r = *r;
                ops.slots[key] = Op::Free;
                ops.free.push(key);
                drop(ops);
                self.done = true;
                Poll::Ready(r)
            }
            Op::Waiting(w) => {
                match w {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Op::Free | Op::Orphan => Poll::Ready(-libc::EIO),
        }
    }
}

impl Drop for OpFuture<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(key) = self.key {
            let mut ops = self.ring.ops.borrow_mut();
            match ops.slots[key] {
                Op::Done(_) => {
                    ops.slots[key] = Op::Free;
                    ops.free.push(key);
                }
                Op::Waiting(_) => ops.slots[key] = Op::Orphan,
                _ => {}
            }
        }
    }
}

impl Ring for AsyncRing {
    fn try_read(&self, file: u32, buf: &mut [u8], off: u64) -> Option<usize> {
        self.inline.read(file, buf, off)
    }

    fn try_write(&self, file: InlineFile, buf: &[u8], off: u64) -> Option<usize> {
        self.inline.write(file, buf, off)
    }

    fn defer_write(
        &self,
        fd: RawFd,
        rec: &[u8; BATCH_REC_BYTES],
        off: u64,
    ) -> Option<Deferred<'_>> {
        self.inline.defer(fd, rec, off)
    }

    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        OpFuture {
            ring: self,
            key: self.push(sqe),
            done: false,
        }
    }

    unsafe fn submit_linked(
        &self,
        first: squeue::Entry,
        first_len: i32,
        second: squeue::Entry,
    ) -> impl Future<Output = (i32, i32)> {
        // As the ublk queue's ring does: both SQEs in one submission (else the kernel ends
        // the chain at the batch boundary), `first` flagged IO_LINK.
        let room_err = {
            let mut ring = self.ring.borrow_mut();
            let room = {
                let sq = ring.submission();
                sq.capacity() - sq.len()
            };
            if room < 2 {
                ring.submit()
                    .err()
                    .map(|e| -(e.raw_os_error().unwrap_or(libc::EIO)))
            } else {
                None
            }
        };
        let a = match room_err {
            Some(e) => Err(e),
            None => self.push(first.flags(squeue::Flags::IO_LINK)),
        };
        // Never submit `second` on its own: unlinked, it could run before `first`.
        let b = match a {
            Ok(_) => self.push(second),
            Err(_) => Err(-libc::ECANCELED),
        };
        let fa = OpFuture {
            ring: self,
            key: a,
            done: false,
        };
        let fb = OpFuture {
            ring: self,
            key: b,
            done: false,
        };
        async move {
            let ra = fa.await;
            let rb = fb.await;
            deltavol::ring::linked_results(first_len, ra, rb)
        }
    }

    async fn sleep(&self, dur: Duration) {
        let ts = types::Timespec::from(dur);
        let sqe = opcode::Timeout::new(&ts).build();
        // SAFETY: `ts` lives in this future's frame, which is awaited to completion below.
        let _ = unsafe { self.submit(sqe) }.await;
    }

    fn kicker(&self) -> Option<Arc<Kicker>> {
        None
    }

    fn queue_index(&self) -> usize {
        self.index
    }
}

/// Runs `tasks` on a local executor over `ring` until all are done, the way a ublk queue
/// thread runs its tag tasks: run every runnable task, then submit the batch and wait.
pub fn run_tasks<T: 'static>(
    ring: &AsyncRing,
    ex: &smol::LocalExecutor<'_>,
    tasks: Vec<smol::Task<T>>,
) -> anyhow::Result<Vec<T>> {
    loop {
        // As a ublk queue's loop: run every task, then write the journal records they
        // deferred to this round's batch, until a round defers none.
        loop {
            while ex.try_tick() {}
            if ring.inline.write_batch() == 0 {
                break;
            }
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        if ring.in_flight() == 0 {
            // Tasks pending with nothing in flight could wait forever (no kicker here).
            while ex.try_tick() {}
            if tasks.iter().all(|t| t.is_finished()) {
                break;
            }
            if ring.in_flight() == 0 {
                anyhow::bail!("tasks stalled: none runnable and no I/O in flight");
            }
        }
        ring.submit_and_wait(1)?;
    }
    Ok(tasks.into_iter().map(|t| smol::block_on(t)).collect())
}
