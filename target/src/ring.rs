//! The one place that pushes SQEs.
//!
//! The engine's I/O handler (`cache::Cache::handle`) is written once, against [`Ring`], and
//! runs on two kinds of ring:
//! - [`UblkRing`]: a ublk queue's own io_uring (libublk's per-queue ring), so target file I/O
//!   shares the ring with the ublk commands, as libublk's `loop` example does;
//! - [`HostRing`]: a private io_uring per thread, used by host-level tests and benchmarks that
//!   drive the same handler without a kernel ublk driver.
//!
//! ## Buffer contract
//! An SQE carries raw pointers (data buffers, `timespec`s). Whoever calls [`Ring::submit`]
//! promises that everything the SQE points at stays valid, and is not otherwise accessed,
//! until the returned future resolves, and that the future is driven to completion (not
//! dropped early). The handler upholds this because each ublk tag's buffer lives for the whole
//! queue and a tag's task awaits every SQE it issues before committing the ublk I/O: a ublk I/O
//! is never completed while an SSD or HDD SQE still points at its buffer.
//!
//! ## Registered files
//! Both rings register the volume's files at the same fixed indices ([`FILE_MIRROR`],
//! [`FILE_BACKING`]); slot 0 is `/dev/ublkcN` on a ublk ring and unused on a host ring.

use io_uring::{opcode, squeue, types, IoUring};
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// Fixed-file index of mirror slot `s` (0 or 1).
pub const FILE_MIRROR: [u32; 2] = [1, 2];
/// Fixed-file index of the backing file.
pub const FILE_BACKING: u32 = 3;
/// Number of fixed-file slots the volume uses (including slot 0).
pub const NR_FIXED_FILES: usize = 4;

/// Something that runs io_uring operations for the engine.
pub trait Ring {
    /// Submits `sqe` and resolves to its CQE result (bytes or `-errno`).
    ///
    /// # Safety
    /// See the module's buffer contract: every buffer, `timespec` and fd the SQE refers to must
    /// stay valid until the returned future resolves, and the future must be driven to
    /// completion.
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32>;

    /// Submits `first` and `second` as a linked pair: `second` starts only after `first`
    /// completed with exactly `first_len`; if `first` fails or is short, `second` does not run
    /// and resolves to `-ECANCELED`. Resolves to both results.
    ///
    /// The default runs them one after the other; rings that can, link them in the kernel
    /// (`IOSQE_IO_LINK`), which saves a round trip through the event loop per pair.
    ///
    /// # Safety
    /// As [`Ring::submit`], for both SQEs.
    unsafe fn submit_linked(
        &self,
        first: squeue::Entry,
        first_len: i32,
        second: squeue::Entry,
    ) -> impl Future<Output = (i32, i32)> {
        async move {
            // SAFETY: forwarded from the caller.
            let a = unsafe { self.submit(first) }.await;
            if a != first_len {
                return (a, -libc::ECANCELED);
            }
            // SAFETY: forwarded from the caller.
            let b = unsafe { self.submit(second) }.await;
            (a, b)
        }
    }

    /// Waits without blocking the thread's other tasks.
    fn sleep(&self, dur: Duration) -> impl Future<Output = ()>;

    /// The handle other threads use to wake tasks waiting on this ring.
    fn kicker(&self) -> Option<Arc<Kicker>>;

    /// Index of the queue (or host thread) this ring belongs to.
    fn queue_index(&self) -> usize;
}

/// Wakes a ring whose thread is parked in `io_uring_enter`: a future woken from another thread
/// only runs once the ring completes something, so the waker side also writes this eventfd,
/// on which the queue keeps a read posted (DESIGN: "wake queue threads through an eventfd").
pub struct Kicker {
    fd: OwnedFd,
    /// Target of the posted read; owned here so it outlives the queue's ring.
    buf: Box<std::cell::UnsafeCell<u64>>,
}

// SAFETY: `buf` is only ever written by the kernel through the read SQE posted by the owning
// queue thread (one at a time) and never read by Rust code; `fd` is a plain eventfd.
unsafe impl Sync for Kicker {}
// SAFETY: as above; nothing in Kicker is tied to the creating thread.
unsafe impl Send for Kicker {}

impl Kicker {
    pub fn new() -> std::io::Result<Kicker> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Kicker {
            fd,
            buf: Box::new(std::cell::UnsafeCell::new(0)),
        })
    }

    /// Makes the posted read complete, so the ring's thread wakes and runs woken tasks.
    pub fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid local to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// The read SQE the owning queue keeps posted.
    pub fn read_sqe(&self) -> squeue::Entry {
        opcode::Read::new(types::Fd(self.fd.as_raw_fd()), self.buf.get().cast(), 8).build()
    }
}

/// A ublk queue's ring (libublk's per-queue io_uring), usable only on that queue's thread.
pub struct UblkRing<'a> {
    pub queue: &'a libublk::io::UblkQueue<'a>,
    pub index: usize,
    pub kicker: Arc<Kicker>,
}

impl Ring for UblkRing<'_> {
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        self.queue.ublk_submit_sqe(sqe)
    }

    unsafe fn submit_linked(
        &self,
        first: squeue::Entry,
        first_len: i32,
        second: squeue::Entry,
    ) -> impl Future<Output = (i32, i32)> {
        // Both SQEs must land in one submission, or the kernel would end the chain at the
        // batch boundary and run `second` unordered: make room for two first. (The queue's
        // ring is sized 4 SQEs per tag, more than a tag ever has pending, so this is a guard.)
        let _ = libublk::io::ublk_init_task_ring(|cell| {
            if let Some(r) = cell.get() {
                let mut r = r.borrow_mut();
                let room = {
                    let sq = r.submission();
                    sq.capacity() - sq.len()
                };
                if room < 2 {
                    r.submit().map_err(libublk::UblkError::IOError)?;
                }
            }
            Ok(())
        });
        let a = self
            .queue
            .ublk_submit_sqe(first.flags(squeue::Flags::IO_LINK));
        let b = self.queue.ublk_submit_sqe(second);
        async move {
            let ra = a.await;
            let rb = b.await;
            // A short `first` fails the link in the kernel; report it the way the default does.
            linked_results(first_len, ra, rb)
        }
    }

    async fn sleep(&self, dur: Duration) {
        let ts = types::Timespec::from(dur);
        let sqe = opcode::Timeout::new(&ts).build();
        // SAFETY: `ts` lives in this future's frame, which is awaited to completion below.
        let _ = unsafe { self.submit(sqe) }.await;
    }

    fn kicker(&self) -> Option<Arc<Kicker>> {
        Some(self.kicker.clone())
    }

    fn queue_index(&self) -> usize {
        self.index
    }
}

/// A private io_uring for one thread. Each submission is pushed and waited for at once, so the
/// returned future is already complete (the buffer contract is trivially met).
pub struct HostRing {
    ring: RefCell<IoUring>,
    index: usize,
}

impl HostRing {
    /// Creates a ring for thread `index` with the volume's files registered at the fixed
    /// indices (`mirrors[s]` at [`FILE_MIRROR`]`[s]`, `backing` at [`FILE_BACKING`]).
    pub fn new(index: usize, mirrors: [RawFd; 2], backing: RawFd) -> std::io::Result<HostRing> {
        let ring = IoUring::new(8)?;
        ring.submitter()
            .register_files(&[-1, mirrors[0], mirrors[1], backing])?;
        Ok(HostRing {
            ring: RefCell::new(ring),
            index,
        })
    }

    fn run(&self, sqe: squeue::Entry) -> i32 {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the caller of `Ring::submit` guarantees the SQE's buffers are valid; we wait
        // for the CQE before returning, so they are no longer referenced afterwards.
        unsafe {
            if ring.submission().push(&sqe.user_data(0x5eed)).is_err() {
                return -libc::EBUSY;
            }
        }
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return -(e.raw_os_error().unwrap_or(libc::EIO)),
            }
            if let Some(cqe) = ring.completion().next() {
                return cqe.result();
            }
        }
    }

    /// Both SQEs of a linked pair in one submission; waits for both CQEs.
    fn run_linked(
        &self,
        first: squeue::Entry,
        first_len: i32,
        second: squeue::Entry,
    ) -> (i32, i32) {
        const FIRST: u64 = 0x5eed_0001;
        const SECOND: u64 = 0x5eed_0002;
        let mut ring = self.ring.borrow_mut();
        let pair = [
            first.flags(squeue::Flags::IO_LINK).user_data(FIRST),
            second.user_data(SECOND),
        ];
        // SAFETY: as in `run`; both CQEs are reaped below before returning.
        if unsafe { ring.submission().push_multiple(&pair) }.is_err() {
            return (-libc::EBUSY, -libc::ECANCELED);
        }
        let (mut a, mut b) = (None, None);
        while a.is_none() || b.is_none() {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // The SQEs were consumed by the kernel or not at all; with nothing in flight
                    // that we could still wait for, report the error for both.
                    let r = -(e.raw_os_error().unwrap_or(libc::EIO));
                    return (a.unwrap_or(r), b.unwrap_or(-libc::ECANCELED));
                }
            }
            for cqe in ring.completion() {
                match cqe.user_data() {
                    FIRST => a = Some(cqe.result()),
                    SECOND => b = Some(cqe.result()),
                    _ => {}
                }
            }
        }
        let (a, b) = (a.unwrap_or(-libc::EIO), b.unwrap_or(-libc::ECANCELED));
        linked_results(first_len, a, b)
    }
}

impl Ring for HostRing {
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        std::future::ready(self.run(sqe))
    }

    unsafe fn submit_linked(
        &self,
        first: squeue::Entry,
        first_len: i32,
        second: squeue::Entry,
    ) -> impl Future<Output = (i32, i32)> {
        std::future::ready(self.run_linked(first, first_len, second))
    }

    fn sleep(&self, dur: Duration) -> impl Future<Output = ()> {
        std::thread::sleep(dur);
        std::future::ready(())
    }

    fn kicker(&self) -> Option<Arc<Kicker>> {
        None
    }

    fn queue_index(&self) -> usize {
        self.index
    }
}

/// The results of a linked pair as [`Ring::submit_linked`] reports them: the kernel fails the
/// link when the first SQE is short or fails, so `second` counts only after a full `first`.
pub fn linked_results(first_len: i32, first: i32, second: i32) -> (i32, i32) {
    (
        first,
        if first == first_len {
            second
        } else {
            -libc::ECANCELED
        },
    )
}

/// `opcode::Read` of `len` bytes at `off` from a registered file into `buf`.
pub fn read_sqe(file: u32, buf: *mut u8, len: u32, off: u64) -> squeue::Entry {
    opcode::Read::new(types::Fixed(file), buf, len)
        .offset(off)
        .build()
}

/// `opcode::Write` of `len` bytes at `off` to a registered file from `buf`.
pub fn write_sqe(file: u32, buf: *const u8, len: u32, off: u64) -> squeue::Entry {
    opcode::Write::new(types::Fixed(file), buf, len)
        .offset(off)
        .build()
}

/// `opcode::Write` of `len` bytes at `off` to a plain (unregistered) fd from `buf`.
pub fn fd_write_sqe(fd: RawFd, buf: *const u8, len: u32, off: u64) -> squeue::Entry {
    opcode::Write::new(types::Fd(fd), buf, len)
        .offset(off)
        .build()
}

/// Punches a hole (reads back as zeros, frees the space) in a registered file.
pub fn punch_sqe(file: u32, off: u64, len: u64) -> squeue::Entry {
    opcode::Fallocate::new(types::Fixed(file), len)
        .offset(off)
        .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        .build()
}
