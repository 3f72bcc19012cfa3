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
//!
//! ## Registered buffers (zero copy)
//! Under zero copy ([`crate::zerocopy`]) the ublk driver registers each request's pages in a
//! ublk ring's buffer table at the tag's index; the engine moves the request's data with
//! READ_FIXED / WRITE_FIXED on that ring ([`read_fixed_sqe`], [`write_fixed_sqe`], [`ReqBuf`]),
//! never inline (there is no user memory to copy from or to).
//!
//! ## Inline first attempts
//! A plain read or write may first be tried synchronously on the ring's own thread
//! ([`Ring::try_read`], [`Ring::try_write`]), the way a synchronous engine serves it, which
//! saves the SQE, the trip through the event loop and — on files whose buffered I/O io_uring
//! cannot issue without blocking (ext4 buffered writes, everything on tmpfs) — the hop to an
//! io-wq worker thread and back. Such an attempt never blocks the queue thread ([`Inline`]):
//! - `RWF_NOWAIT` (`preadv2`/`pwritev2`): a page-cache hit completes at once; anything that
//!   would wait (a miss, a lock, dirty throttling) returns `EAGAIN` or a short count with
//!   nothing issued, and the rest goes on the ring as before. A file that refuses the flag
//!   (`EOPNOTSUPP`/`EINVAL`: buffered `RWF_NOWAIT` writes need `FOP_BUFFER_WASYNC` — xfs,
//!   btrfs — and tmpfs has no `FMODE_NOWAIT`) is remembered, so no failing syscall is paid
//!   per I/O;
//! - plain `pread`/`pwrite` on a regular file of a memory filesystem (tmpfs, ramfs): a copy
//!   to or from page cache that waits on no device (the queue thread's own memory can be
//!   reclaimed the same way). This is what lets the test VM's tmpfs medium run at the speed
//!   of a synchronous engine; it changes nothing for a cache on an SSD filesystem.
//!
//! An attempt only ever does part of the work: errors (and the fault injection of
//! [`crate::fault::FaultRing`], which has no inline path) are always the ring's. The
//! environment variable `DELTAVOL_INLINE_IO` selects the [`InlineMode`] (`off`: every I/O on
//! the ring; `nowait`: no plain copies on memory filesystems; default `auto`: both), so one
//! build can be measured and tested either way.

use io_uring::{opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
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

    /// Reads up to `buf.len()` bytes at `off` from registered file `file` at once, on this
    /// thread, without blocking (see the module's "Inline first attempts"). `Some(n)`: `n > 0`
    /// bytes were read; `None`: nothing was done (not attempted, would block, end of file or
    /// an error), the caller submits on the ring.
    fn try_read(&self, _file: u32, _buf: &mut [u8], _off: u64) -> Option<usize> {
        None
    }

    /// Writes up to `buf.len()` bytes at `off` at once, without blocking; as
    /// [`Ring::try_read`]. `Some(n)`: the first `n > 0` bytes are written (in page cache).
    fn try_write(&self, _file: InlineFile, _buf: &[u8], _off: u64) -> Option<usize> {
        None
    }

    /// Defers a journal record (`rec` at `off` in journal `fd`) to the batch this ring writes
    /// once every task of the current round has run, in one write per run of contiguous
    /// records ([`Inline::write_batch`]). The future resolves to `Some(bytes)` once written,
    /// `None` if the batch could not write it (the caller then writes it on the ring).
    /// `None` here: this ring does not batch (write it now).
    fn defer_write(
        &self,
        _fd: RawFd,
        _rec: &[u8; BATCH_REC_BYTES],
        _off: u64,
    ) -> Option<Deferred<'_>> {
        None
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

/// Which inline I/O a ring may do (`DELTAVOL_INLINE_IO`, see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineMode {
    /// Every read and write goes on the ring.
    Off,
    /// `RWF_NOWAIT` attempts only.
    NoWait,
    /// `RWF_NOWAIT` attempts, and plain copies on memory filesystems (the default).
    Auto,
}

impl InlineMode {
    /// The mode `DELTAVOL_INLINE_IO` asks for (read once per process).
    pub fn from_env() -> InlineMode {
        static MODE: std::sync::OnceLock<InlineMode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| {
            let v = std::env::var("DELTAVOL_INLINE_IO").unwrap_or_default();
            match v.as_str() {
                "" | "auto" => InlineMode::Auto,
                "nowait" => InlineMode::NoWait,
                "off" | "0" => InlineMode::Off,
                other => {
                    tracing::warn!(
                        value = other,
                        "DELTAVOL_INLINE_IO: unknown value (use off, nowait or auto); using auto"
                    );
                    InlineMode::Auto
                }
            }
        })
    }
}

/// The file of an inline write: a registered one, or a journal (a plain fd).
#[derive(Debug, Clone, Copy)]
pub enum InlineFile {
    Fixed(u32),
    Journal(RawFd),
}

/// How a file class is tried inline, per operation.
const HOW_UNKNOWN: u8 = 0;
const HOW_NOWAIT: u8 = 1;
const HOW_PLAIN: u8 = 2;
const HOW_RING: u8 = 3;
/// The journals' class, after the registered slots.
const CLASS_JOURNAL: usize = NR_FIXED_FILES;
const OP_READ: usize = 0;
const OP_WRITE: usize = 1;

/// Inline I/O done and ring fallbacks of one ring, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineCounts {
    pub reads_inline: u64,
    pub reads_ring: u64,
    pub writes_inline: u64,
    pub writes_ring: u64,
    /// Small writes deferred to their round's batch ([`Inline::write_batch`]), and the
    /// syscalls that wrote them.
    pub batched: u64,
    pub batch_writes: u64,
}

/// The size of a batched write (a journal record).
pub const BATCH_REC_BYTES: usize = 32;
/// Records a batch holds at most (more wait for the next round's batch).
const BATCH_MAX: usize = 256;

/// One deferred write of a round.
enum BatchSlot {
    Free,
    /// Waiting for the round's batch; the task to wake then.
    Pending {
        fd: RawFd,
        off: u64,
        rec: [u8; BATCH_REC_BYTES],
        waker: Option<std::task::Waker>,
    },
    /// Written (`Some(bytes)`) or not (`None`: the caller writes it on the ring).
    Done(Option<usize>),
    /// Its future was dropped while pending: written with the batch, then freed.
    Orphan {
        fd: RawFd,
        off: u64,
        rec: [u8; BATCH_REC_BYTES],
    },
}

/// The deferred writes of one ring round (see [`Ring::defer_write`]).
struct Batch {
    slots: Vec<BatchSlot>,
    free: Vec<usize>,
    /// Scratch for one run of contiguous records (allocated once).
    buf: Vec<u8>,
    order: Vec<(RawFd, u64, usize)>,
}

/// A deferred write's result: `Some(bytes)` once its batch wrote it, `None` if it did not.
pub struct Deferred<'a> {
    inline: &'a Inline,
    key: usize,
    done: bool,
}

impl std::future::Future for Deferred<'_> {
    type Output = Option<usize>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<usize>> {
        let mut b = self.inline.batch.borrow_mut();
        let slot = &mut b.slots[self.key];
        match slot {
            BatchSlot::Done(r) => {
                let r = *r;
                *slot = BatchSlot::Free;
                b.free.push(self.key);
                drop(b);
                self.done = true;
                std::task::Poll::Ready(r)
            }
            BatchSlot::Pending { waker, .. } => {
                *waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
            _ => {
                // Never expected (the slot is this future's until it completes): report it
                // not written, so the caller writes it on the ring, and leave the slot alone.
                drop(b);
                self.done = true;
                std::task::Poll::Ready(None)
            }
        }
    }
}

impl Drop for Deferred<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut b = self.inline.batch.borrow_mut();
        let key = self.key;
        match std::mem::replace(&mut b.slots[key], BatchSlot::Free) {
            BatchSlot::Pending { fd, off, rec, .. } => {
                b.slots[key] = BatchSlot::Orphan { fd, off, rec };
            }
            _ => b.free.push(key),
        }
    }
}

/// One thread's inline I/O state: the raw fds behind the registered slots, how each file
/// class is tried (learned: a file that refuses `RWF_NOWAIT` is not asked again), and counts.
/// Used by one thread only (no atomics on the I/O path).
pub struct Inline {
    mode: InlineMode,
    fds: [RawFd; NR_FIXED_FILES],
    how: [[Cell<u8>; 2]; NR_FIXED_FILES + 1],
    counts: Cell<InlineCounts>,
    /// Whether journal records are deferred to a per-round batch (the owner's event loop
    /// calls [`Inline::write_batch`] once its tasks have run).
    batching: Cell<bool>,
    batch: RefCell<Batch>,
}

/// What a memory filesystem reports in `statfs.f_type`.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

impl Inline {
    /// For the volume's files (`mirrors[s]` behind [`FILE_MIRROR`]`[s]`, `backing` behind
    /// [`FILE_BACKING`]).
    pub fn new(mode: InlineMode, mirrors: [RawFd; 2], backing: RawFd) -> Inline {
        let mut fds = [-1; NR_FIXED_FILES];
        fds[FILE_MIRROR[0] as usize] = mirrors[0];
        fds[FILE_MIRROR[1] as usize] = mirrors[1];
        fds[FILE_BACKING as usize] = backing;
        let inline = Inline {
            mode,
            fds,
            how: Default::default(),
            counts: Cell::new(InlineCounts::default()),
            batching: Cell::new(false),
            batch: RefCell::new(Batch {
                slots: Vec::new(),
                free: Vec::new(),
                buf: Vec::new(),
                order: Vec::new(),
            }),
        };
        for (class, &fd) in fds.iter().enumerate() {
            if fd >= 0 {
                inline.classify(class, fd);
            } else {
                for h in &inline.how[class] {
                    h.set(HOW_RING);
                }
            }
        }
        inline
    }

    /// Everything on the ring (rings without inline I/O).
    pub fn off() -> Inline {
        Inline::new(InlineMode::Off, [-1, -1], -1)
    }

    pub fn mode(&self) -> InlineMode {
        self.mode
    }

    /// Defers journal records to a per-round batch from now on: only for an owner whose event
    /// loop calls [`Inline::write_batch`] after running its tasks, every round (else a task
    /// waiting for its record would never wake). Buffers for `depth` records are allocated
    /// here, once.
    pub fn enable_batching(&self, depth: usize) {
        let n = depth.clamp(1, BATCH_MAX);
        let mut b = self.batch.borrow_mut();
        b.slots = (0..n).map(|_| BatchSlot::Free).collect();
        b.free = (0..n).rev().collect();
        b.buf = Vec::with_capacity(n * BATCH_REC_BYTES);
        b.order = Vec::with_capacity(n);
        self.batching.set(true);
    }

    /// Queues journal record `rec` for `off` in `fd` into this round's batch, if batching is
    /// on, the journals can be written inline and the batch has room.
    pub fn defer(&self, fd: RawFd, rec: &[u8; BATCH_REC_BYTES], off: u64) -> Option<Deferred<'_>> {
        if !self.batching.get() {
            return None;
        }
        if self.how[CLASS_JOURNAL][OP_WRITE].get() == HOW_UNKNOWN {
            self.classify(CLASS_JOURNAL, fd);
        }
        if !matches!(
            self.how[CLASS_JOURNAL][OP_WRITE].get(),
            HOW_NOWAIT | HOW_PLAIN
        ) {
            return None;
        }
        let mut b = self.batch.borrow_mut();
        let key = b.free.pop()?;
        b.slots[key] = BatchSlot::Pending {
            fd,
            off,
            rec: *rec,
            waker: None,
        };
        drop(b);
        self.count(|c| c.batched += 1);
        Some(Deferred {
            inline: self,
            key,
            done: false,
        })
    }

    /// Writes this round's deferred records: each run of records contiguous in one file with
    /// one inline write (as the journal class says: `RWF_NOWAIT` or plain), then wakes their
    /// tasks. Records not written (would block, an error, a short write) resolve to `None`:
    /// their tasks write them on the ring. Returns how many records were settled (0: none
    /// were pending).
    pub fn write_batch(&self) -> usize {
        let mut guard = self.batch.borrow_mut();
        let b = &mut *guard;
        b.order.clear();
        for (k, s) in b.slots.iter().enumerate() {
            if let BatchSlot::Pending { fd, off, .. } | BatchSlot::Orphan { fd, off, .. } = s {
                b.order.push((*fd, *off, k));
            }
        }
        if b.order.is_empty() {
            return 0;
        }
        b.order.sort_unstable();
        let mut wakers: smallvec::SmallVec<[std::task::Waker; 64]> = smallvec::SmallVec::new();
        let mut syscalls = 0u64;
        let mut i = 0;
        while i < b.order.len() {
            let (fd, off0, _) = b.order[i];
            let mut j = i + 1;
            while j < b.order.len()
                && b.order[j].0 == fd
                && b.order[j].1 == off0 + ((j - i) * BATCH_REC_BYTES) as u64
            {
                j += 1;
            }
            b.buf.clear();
            for &(_, _, k) in &b.order[i..j] {
                if let BatchSlot::Pending { rec, .. } | BatchSlot::Orphan { rec, .. } = &b.slots[k]
                {
                    b.buf.extend_from_slice(rec);
                }
            }
            let iov = libc::iovec {
                iov_base: b.buf.as_ptr().cast_mut().cast(),
                iov_len: b.buf.len(),
            };
            let how = &self.how[CLASS_JOURNAL][OP_WRITE];
            if matches!(how.get(), HOW_NOWAIT | HOW_PLAIN) {
                syscalls += 1;
            }
            let written = self
                .attempt(how, |f| {
                    // SAFETY: `iov` describes `b.buf`, alive and unchanged for this
                    // synchronous call, which only reads it.
                    unsafe { libc::pwritev2(fd, &iov, 1, off0 as libc::off_t, f) }
                })
                .unwrap_or(0);
            for (n, &(_, _, k)) in b.order[i..j].iter().enumerate() {
                let ok = (n + 1) * BATCH_REC_BYTES <= written;
                let res = ok.then_some(BATCH_REC_BYTES);
                match std::mem::replace(&mut b.slots[k], BatchSlot::Done(res)) {
                    BatchSlot::Pending { waker, .. } => {
                        if let Some(w) = waker {
                            wakers.push(w);
                        }
                    }
                    _ => {
                        // An orphan: nobody waits for it.
                        b.slots[k] = BatchSlot::Free;
                        b.free.push(k);
                    }
                }
            }
            i = j;
        }
        let settled = b.order.len();
        drop(guard);
        self.count(|c| c.batch_writes += syscalls);
        for w in wakers {
            w.wake();
        }
        settled
    }

    pub fn counts(&self) -> InlineCounts {
        self.counts.get()
    }

    /// How each file class is tried, for logs: `[mirror0, mirror1, backing, journal]` as
    /// `(read, write)`, each "nowait", "plain", "ring" or "unknown" (not used yet).
    pub fn describe(&self) -> String {
        let name = |h: u8| match h {
            HOW_NOWAIT => "nowait",
            HOW_PLAIN => "plain",
            HOW_RING => "ring",
            _ => "unknown",
        };
        let classes = [
            ("mirror0", FILE_MIRROR[0] as usize),
            ("mirror1", FILE_MIRROR[1] as usize),
            ("backing", FILE_BACKING as usize),
            ("journal", CLASS_JOURNAL),
        ];
        classes
            .iter()
            .map(|(n, c)| {
                format!(
                    "{n}: read {} write {}",
                    name(self.how[*c][OP_READ].get()),
                    name(self.how[*c][OP_WRITE].get())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Decides how class `class` (file `fd`) is tried: plain copies on a regular file of a
    /// memory filesystem (mode `Auto`), else `RWF_NOWAIT` (unless the mode is `Off`).
    fn classify(&self, class: usize, fd: RawFd) {
        let how = match self.mode {
            InlineMode::Off => HOW_RING,
            InlineMode::NoWait => HOW_NOWAIT,
            InlineMode::Auto if is_memory_file(fd) => HOW_PLAIN,
            InlineMode::Auto => HOW_NOWAIT,
        };
        for h in &self.how[class] {
            h.set(how);
        }
    }

    fn count(&self, f: impl FnOnce(&mut InlineCounts)) {
        let mut c = self.counts.get();
        f(&mut c);
        self.counts.set(c);
    }

    /// The inline read behind [`Ring::try_read`].
    pub fn read(&self, file: u32, buf: &mut [u8], off: u64) -> Option<usize> {
        let class = file as usize;
        let r = match (self.fds.get(class), self.how.get(class)) {
            (Some(&fd), Some(how)) => {
                let iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                self.attempt(&how[OP_READ], |flags| {
                    // SAFETY: `iov` describes `buf`, writable and borrowed for this call;
                    // the syscall is synchronous, nothing refers to `buf` afterwards.
                    unsafe { libc::preadv2(fd, &iov, 1, off as libc::off_t, flags) }
                })
            }
            _ => None,
        };
        self.count(|c| match r {
            Some(_) => c.reads_inline += 1,
            None => c.reads_ring += 1,
        });
        r
    }

    /// The inline write behind [`Ring::try_write`].
    pub fn write(&self, file: InlineFile, buf: &[u8], off: u64) -> Option<usize> {
        let (class, fd) = match file {
            InlineFile::Fixed(i) => (i as usize, self.fds.get(i as usize).copied()),
            InlineFile::Journal(fd) => {
                if self.how[CLASS_JOURNAL][OP_WRITE].get() == HOW_UNKNOWN {
                    self.classify(CLASS_JOURNAL, fd);
                }
                (CLASS_JOURNAL, Some(fd))
            }
        };
        let r = match (fd, self.how.get(class)) {
            (Some(fd), Some(how)) if fd >= 0 => {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr().cast_mut().cast(),
                    iov_len: buf.len(),
                };
                self.attempt(&how[OP_WRITE], |flags| {
                    // SAFETY: `iov` describes `buf`, readable and borrowed for this call; the
                    // kernel only reads it (a write), synchronously.
                    unsafe { libc::pwritev2(fd, &iov, 1, off as libc::off_t, flags) }
                })
            }
            _ => None,
        };
        self.count(|c| match r {
            Some(_) => c.writes_inline += 1,
            None => c.writes_ring += 1,
        });
        r
    }

    /// Runs `io(flags)` as `how` says; learns from a refused `RWF_NOWAIT`.
    fn attempt(&self, how: &Cell<u8>, io: impl Fn(libc::c_int) -> isize) -> Option<usize> {
        let flags = match how.get() {
            HOW_NOWAIT => libc::RWF_NOWAIT,
            HOW_PLAIN => 0,
            _ => return None,
        };
        let r = io(flags);
        if r > 0 {
            return Some(r as usize);
        }
        if r < 0 && flags != 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EOPNOTSUPP) || e == Some(libc::EINVAL) {
                // The file cannot do it without blocking: the ring from now on.
                tracing::debug!(
                    errno = e,
                    "RWF_NOWAIT refused: this file's I/O goes on the ring"
                );
                how.set(HOW_RING);
            }
        }
        None
    }
}

/// A regular file on tmpfs or ramfs (`/dev` is devtmpfs: a block device there is not one).
pub fn is_memory_file(fd: RawFd) -> bool {
    // SAFETY: fstat/fstatfs write only into the zeroed structs passed, whose results are
    // read only when the call succeeded.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd, &mut fs) != 0 {
            return false;
        }
        let t = fs.f_type as i64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    }
}

/// A ublk queue's ring (libublk's per-queue io_uring), usable only on that queue's thread.
pub struct UblkRing<'a> {
    pub queue: &'a libublk::io::UblkQueue<'a>,
    pub index: usize,
    pub kicker: Arc<Kicker>,
    /// The queue's inline I/O (shared by its tags' tasks, all on the queue's thread).
    pub inline: &'a Inline,
}

impl Ring for UblkRing<'_> {
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
    inline: Inline,
}

impl HostRing {
    /// Creates a ring for thread `index` with the volume's files registered at the fixed
    /// indices (`mirrors[s]` at [`FILE_MIRROR`]`[s]`, `backing` at [`FILE_BACKING`]).
    /// Inline I/O as `DELTAVOL_INLINE_IO` says ([`InlineMode::from_env`]).
    pub fn new(index: usize, mirrors: [RawFd; 2], backing: RawFd) -> std::io::Result<HostRing> {
        HostRing::with_inline(index, mirrors, backing, InlineMode::from_env())
    }

    /// As [`HostRing::new`], with inline I/O in mode `mode`.
    pub fn with_inline(
        index: usize,
        mirrors: [RawFd; 2],
        backing: RawFd,
        mode: InlineMode,
    ) -> std::io::Result<HostRing> {
        let ring = IoUring::new(8)?;
        ring.submitter()
            .register_files(&[-1, mirrors[0], mirrors[1], backing])?;
        Ok(HostRing {
            ring: RefCell::new(ring),
            index,
            inline: Inline::new(mode, mirrors, backing),
        })
    }

    /// Registers `len` bytes at `addr` as fixed buffer 0 of this ring, standing in for the
    /// request buffer the ublk driver registers under zero copy (host tests of [`ReqBuf`]).
    ///
    /// # Safety
    /// The memory must stay valid, and be accessed only through the ring or [`ReqBuf`] user
    /// copy, until this ring is dropped.
    pub unsafe fn register_buffer(&self, addr: *mut u8, len: usize) -> std::io::Result<()> {
        let iov = libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        };
        // SAFETY: forwarded from the caller: the memory outlives the registration.
        unsafe { self.ring.borrow().submitter().register_buffers(&[iov]) }
    }

    /// This ring's inline I/O state (counts, how each file is tried).
    pub fn inline(&self) -> &Inline {
        &self.inline
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
    fn try_read(&self, file: u32, buf: &mut [u8], off: u64) -> Option<usize> {
        self.inline.read(file, buf, off)
    }

    fn try_write(&self, file: InlineFile, buf: &[u8], off: u64) -> Option<usize> {
        self.inline.write(file, buf, off)
    }

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

/// `opcode::ReadFixed` of `len` bytes at `off` from a registered file into registered buffer
/// `index`, starting `at` bytes into it (see [`ReqBuf`]).
pub fn read_fixed_sqe(file: u32, index: u16, at: u64, len: u32, off: u64) -> squeue::Entry {
    opcode::ReadFixed::new(types::Fixed(file), at as *mut u8, len, index)
        .offset(off)
        .build()
}

/// `opcode::WriteFixed` of `len` bytes at `off` to a registered file from registered buffer
/// `index`, starting `at` bytes into it (see [`ReqBuf`]).
pub fn write_fixed_sqe(file: u32, index: u16, at: u64, len: u32, off: u64) -> squeue::Entry {
    opcode::WriteFixed::new(types::Fixed(file), at as *const u8, len, index)
        .offset(off)
        .build()
}

/// A zero-copy request's data: the request's own pages, which the kernel registered in the
/// queue ring's buffer table (`UBLK_F_AUTO_BUF_REG`, see [`crate::zerocopy`]), plus the tag's
/// user memory for what has to pass through memory (read-cache hits and fills, blocks fetched
/// from the data plane), which reaches the request by user copy (`pwrite`/`pread` on
/// `/dev/ublkcN`, `UBLK_F_USER_COPY`).
///
/// Buffer contract: the kernel keeps the request's buffer registered until the tag commits
/// the request, and a tag's task awaits every SQE it issued before committing (as for the copy
/// path), so a READ_FIXED/WRITE_FIXED never outlives the buffer it names.
pub struct ReqBuf<'a> {
    /// Index of the request's buffer in the ring's buffer table.
    pub index: u16,
    /// The buffer-table address of the request's byte 0: 0 for a buffer the ublk driver
    /// registered (the kernel addresses those by offset), the buffer's user address for one
    /// registered from user memory (tests).
    pub addr0: u64,
    /// Where user copy reads and writes the request: `/dev/ublkcN` (or, in tests, a file
    /// mapped as the registered buffer).
    pub copy_fd: RawFd,
    /// The user-copy position of the request's byte 0 (`ublk_user_copy_pos(q, tag, 0)`).
    pub copy_pos: u64,
    /// The tag's user memory, as large as the largest request.
    pub scratch: &'a mut [u8],
}

impl ReqBuf<'_> {
    /// The buffer-table address of byte `at` of the request.
    pub fn addr(&self, at: usize) -> u64 {
        self.addr0 + at as u64
    }

    /// Copies `src` into the request from byte `at` on (user copy). 0 or `-errno`.
    pub fn copy_in(&self, at: usize, src: &[u8]) -> i32 {
        user_copy(src.len(), |done| {
            let rest = &src[done..];
            // SAFETY: `rest` is a valid readable slice for the duration of this synchronous
            // call; the kernel copies from it into the request's pages and keeps no reference.
            unsafe {
                libc::pwrite(
                    self.copy_fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    (self.copy_pos + (at + done) as u64) as libc::off_t,
                )
            }
        })
    }

    /// Copies the request's bytes from `at` on into `dst` (user copy). 0 or `-errno`.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) -> i32 {
        user_copy(dst.len(), |done| {
            let rest = &mut dst[done..];
            // SAFETY: `rest` is a valid writable slice, borrowed mutably for this synchronous
            // call; the kernel copies the request's pages into it and keeps no reference.
            unsafe {
                libc::pread(
                    self.copy_fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (self.copy_pos + (at + done) as u64) as libc::off_t,
                )
            }
        })
    }
}

/// Calls `io(done)` — a `pread`/`pwrite` of what is left from byte `done` on — until `len`
/// bytes are done: 0, or `-errno` (`-EIO` for a transfer of nothing); `EINTR` is retried.
fn user_copy(len: usize, mut io: impl FnMut(usize) -> isize) -> i32 {
    let mut done = 0usize;
    while done < len {
        match io(done) {
            r if r > 0 => done += r as usize,
            0 => return -libc::EIO,
            _ => match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                e => return -e.unwrap_or(libc::EIO),
            },
        }
    }
    0
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
