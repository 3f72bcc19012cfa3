//! The flush thread: cuts epochs and writes each frozen epoch to permanent storage.
//!
//! A cut happens every `flush_interval_ms` when the active epoch has changes, early when the
//! SSD cache crosses its high watermark, and on request (`deltavol snapshot`, `del`). Then:
//! walk the frozen bitmap in LBA order → coalesce runs into extents → read them from the
//! frozen mirror → write them to the backing file (zero extents: punch) and hand them to the
//! [`DeltaSink`] → `fdatasync` the backing file → commit the sink's snapshot → persist
//! `flushed_epoch` → invalidate the read cache → retire the epoch (wait out its readers) →
//! punch the frozen mirror. A flush always ends before the next cut, which reuses the mirror.
//!
//! The walk goes in batches (at most [`batch::BATCH_OPS_MAX`] runs and 4 MiB): the batch's
//! runs are read from the frozen mirror with one `io_uring_enter` (runs a few blocks apart
//! share one read: the mirror's holes between them are read and dropped, never written or
//! shipped), its data extents written to the backing file with another, and handed to the
//! sink together ([`DeltaSink::extents`]: the data plane's frames are gathered from the
//! batch's buffer, no copy). An epoch of random 4k writes costs a few syscalls per batch
//! instead of two per extent (`bench/src/bin/flush`).
//!
//! ## Pacing
//! With pacing on (`--flush-pacing on`), a flush the interval's timer started is spread over
//! half the interval: after each batch the thread waits until the share of that window
//! earned by the bytes done so far has passed, so the backing disk, the data plane and the
//! CPU see a steady trickle rather than a burst, and the flush still ends well before the
//! next cut. Never paced: a cut requested by `snapshot`, `del` or a consistency group, a
//! flush the SSD watermark forced, a frozen epoch left by a crash or a failed attempt, and a
//! volume hydrating (the flush holds the hydration's lock). A request, a stop or the
//! watermark arriving during a paced flush turns the rest of it to full speed at once.
//!
//! A failing flush (backing-file I/O error, sink error) is retried with backoff; the data
//! stays in the cache meanwhile, and writes wait once the cache is full. [`FlushStatus`]
//! shows the last error, when it happened, and how many attempts failed (in a row and in all).
//!
//! Tests inject backing-file faults with [`Flusher::inject_faults`] (see [`crate::fault`]).

mod batch;

use crate::cache::meta::{BLOCK_SHIFT, BLOCK_SIZE};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::fault::{FaultFile, FaultOp, FaultPlan};
use crate::label::BackingState;
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest extent the flush reads and ships at once.
pub const FLUSH_EXTENT_BLOCKS_MAX: u64 = 256;
/// Runs at least this long are first checked for data with `SEEK_DATA` (see
/// [`for_each_subextent`]).
const SEEK_DATA_MIN_BLOCKS: u64 = 64;
/// The flush reads the frozen mirror and writes the backing file in batches of at most this
/// many bytes of buffer and [`batch::BATCH_OPS_MAX`] runs: one `io_uring_enter` for the reads
/// of a batch, one for its writes.
const BATCH_BYTES_MAX: usize = 4 << 20;
/// Two dirty runs at most this many blocks apart are read from the frozen mirror with one read
/// (the blocks between them, holes of the mirror, are read and dropped: never written or
/// shipped); a read never spans more than [`FLUSH_EXTENT_BLOCKS_MAX`] blocks.
const READ_GAP_BLOCKS_MAX: u64 = 4;
/// A paced flush (see the module doc) is spread over this share of the flush interval, so it
/// ends well before the next cut is due.
const PACE_SHARE_NUM: u32 = 1;
const PACE_SHARE_DEN: u32 = 2;
/// How often the flush thread looks at the watermark flag.
const POLL: Duration = Duration::from_millis(10);
/// How often the flush thread of a volume with nothing dirty looks again (a cut is due only
/// once something is written; cut requests and stops wake it at once).
const POLL_IDLE: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Failed attempts at one flush before a waiting `cut_and_wait` gets the error.
const FAILURES_BEFORE_REPORT: u32 = 3;
static ZERO_BLOCK: [u8; BLOCK_SIZE as usize] = [0u8; BLOCK_SIZE as usize];

/// Where a flushed epoch's changes go besides the backing file (the data plane, in time).
pub trait DeltaSink: Send {
    /// Starts snapshot `snap` (the flushed epoch number). The sink chains it onto the newest
    /// snapshot it holds. `full`: the snapshot carries every block of the volume (a base),
    /// not only the epoch's changes. `cut_unix_ms`: the wall-clock time of the epoch's cut
    /// (0 when unknown), which the snapshot keeps wherever and whenever it is stored.
    fn begin(&mut self, snap: u64, full: bool, volume_size: u64, cut_unix_ms: u64) -> Result<()>;
    /// One extent of `nblocks` blocks at block `lba`; `None` means zeros.
    fn extent(&mut self, lba: u64, nblocks: u64, data: Option<&[u8]>) -> Result<()>;
    /// Several extents of one batch of the flush, in block order: `(lba, nblocks, at)`, the
    /// extent's bytes at `buf[at..]`, or zeros when `at` is `None`. The same as
    /// [`DeltaSink::extent`] for each; a sink may take them together.
    fn extents(&mut self, buf: &[u8], exts: &[(u64, u64, Option<usize>)]) -> Result<()> {
        for &(lba, n, at) in exts {
            let data = at.map(|a| &buf[a..a + (n << BLOCK_SHIFT) as usize]);
            self.extent(lba, n, data)?;
        }
        Ok(())
    }
    /// Makes snapshot `snap` durable wherever the sink keeps it.
    fn commit(&mut self, snap: u64) -> Result<()>;
    /// The newest snapshot id this sink has made durable (0 for none); persisted with each
    /// flush so the chain continues after a restart.
    fn head(&self) -> u64 {
        0
    }
    /// Whether the sink's chain lacks epochs the backing file already holds (a volume flushed
    /// before shipping was set up): then the flush first ships the whole backing file as a
    /// full snapshot numbered `flushed_epoch` (every block, data or zero).
    fn base_needed(&mut self, _flushed_epoch: u64) -> Result<bool> {
        Ok(false)
    }
    /// What the backing file holds from now on, made durable where it survives the loss of
    /// the SSD cache (the backing label, [`crate::label`]): `Writing(e)` before the first
    /// block of epoch `e` is written, `Clean(e)` / `Partial(e)` once `e` is flushed and
    /// committed. An error before the writes stops this flush attempt.
    fn backing_state(&mut self, _state: BackingState) -> Result<()> {
        Ok(())
    }
    /// When [`DeltaSink::base_needed`] said yes: the snapshot the sink's chain ends at, if
    /// the base may be a delta against it (then only the blocks whose checksum differs from
    /// it are shipped, chained onto it); `None` ships every block as a full snapshot.
    fn base_parent(&mut self) -> Option<u64> {
        None
    }
    /// The crc32c of blocks `[lba, lba + n)` as of the sink's snapshot `snap`.
    fn parent_checksums(&mut self, _snap: u64, _lba: u64, _n: u64) -> Result<Vec<u32>> {
        Err(Error::invalid("this sink has no checksums"))
    }
}

/// A sink that keeps nothing (no data plane configured).
pub struct NullSink;

impl DeltaSink for NullSink {
    fn begin(&mut self, _: u64, _: bool, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn extent(&mut self, _: u64, _: u64, _: Option<&[u8]>) -> Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
}

/// What one flush did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlushReport {
    pub epoch: u64,
    pub extents: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub finished_unix_ms: u64,
    pub duration_ms: u64,
}

#[derive(Default)]
struct State {
    /// Cuts asked for (`request_cut`), and how many of them are done.
    wanted: u64,
    done: u64,
    /// The newest cut request whose epoch switch has happened, and that epoch (the one cut,
    /// now frozen): [`Flusher::cut`] returns once its ticket is here.
    cut: u64,
    cut_epoch: u64,
    stop: bool,
    /// Simulated crash (tests): stop at once, commit nothing more.
    abort: bool,
    stopped: bool,
    last: Option<FlushReport>,
    last_error: Option<String>,
    last_error_unix_ms: Option<u64>,
    failed_attempts: u64,
    consecutive_failures: u64,
    flushes: u64,
    data_bytes_total: u64,
    zero_bytes_total: u64,
}

struct Ctl {
    st: Mutex<State>,
    cv: Condvar,
    /// Fault injection (tests); unset in production.
    faults: std::sync::OnceLock<Arc<FaultPlan>>,
    /// Held for the whole of each flush; [`Flusher::pause`] holds it to keep the backing
    /// file still (scrub).
    gate: Mutex<()>,
}

/// Handle to a volume's flush thread.
pub struct Flusher {
    ctl: Arc<Ctl>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Status of the flush thread, for `deltavol status`.
#[derive(Debug, Clone, Serialize)]
pub struct FlushStatus {
    pub last: Option<FlushReport>,
    /// The error of the last failed attempt, cleared by the next successful flush.
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
    /// Failed flush attempts since the volume was attached (each one is retried).
    pub failed_attempts: u64,
    /// Failed attempts since the last successful flush (0 when healthy).
    pub consecutive_failures: u64,
    pub flushes: u64,
    /// Since the daemon started: bytes of dirty blocks written to the backing file, and of
    /// discarded/zeroed blocks punched there (no data written). Together: the dirty bytes.
    pub data_bytes_total: u64,
    pub zero_bytes_total: u64,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Flusher {
    pub fn start(
        cache: Arc<Cache>,
        sink: Box<dyn DeltaSink>,
        interval: Duration,
        pacing: bool,
    ) -> std::io::Result<Flusher> {
        let ctl = Arc::new(Ctl {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            faults: std::sync::OnceLock::new(),
            gate: Mutex::new(()),
        });
        let c2 = ctl.clone();
        let t = std::thread::Builder::new()
            .name(format!("dv-flush-{}", cache.name))
            .spawn(move || {
                FlushThread {
                    cache,
                    sink,
                    ctl: c2,
                    interval,
                    pacing,
                    buf: Vec::new(),
                    batch: Batch::default(),
                    io: None,
                    io_tried: false,
                }
                .run()
            })?;
        Ok(Flusher {
            ctl,
            thread: Mutex::new(Some(t)),
        })
    }

    /// Cuts the active epoch now and waits until it is flushed; returns that flush's report.
    pub fn cut_and_wait(&self) -> Result<FlushReport> {
        let ticket = self.request_cut()?;
        self.wait_flushed(ticket)
    }

    fn request_cut(&self) -> Result<u64> {
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        if st.stop || st.stopped {
            return Err(Error::new(
                crate::error::ErrorKind::ShuttingDown,
                "volume is shutting down",
            ));
        }
        st.wanted += 1;
        self.ctl.cv.notify_all();
        Ok(st.wanted)
    }

    /// Cuts the active epoch now and returns as soon as the switch has happened (a flush of
    /// an earlier epoch still in progress is waited for first): `(ticket, epoch)`, the epoch
    /// cut being the snapshot that holds every write completed before this call.
    /// [`Flusher::wait_flushed`] with the ticket waits for its flush. This is what a
    /// consistency group needs: the filesystems stay frozen only until the switch.
    ///
    /// Past `timeout` (an earlier epoch's flush failing, say) it returns an error; the cut
    /// still happens later, as an ordinary one.
    pub fn cut(&self, timeout: Duration) -> Result<(u64, u64)> {
        let ticket = self.request_cut()?;
        let deadline = Instant::now() + timeout;
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        while st.cut < ticket && !st.stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    crate::error::ErrorKind::Io,
                    format!(
                        "the cut did not happen within {} ms (the flush of an earlier epoch is still running or failing: {})",
                        timeout.as_millis(),
                        st.last_error.as_deref().unwrap_or("no error reported yet")
                    ),
                ));
            }
            st = self
                .ctl
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.cut < ticket {
            return Err(Error::new(
                crate::error::ErrorKind::ShuttingDown,
                "volume stopped before the cut",
            ));
        }
        Ok((ticket, st.cut_epoch))
    }

    /// Waits until the cut of `ticket` (from [`Flusher::cut`]) is flushed; returns the report
    /// of the newest flush.
    pub fn wait_flushed(&self, ticket: u64) -> Result<FlushReport> {
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        while st.done < ticket && !st.stopped {
            st = self.ctl.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.done < ticket {
            return Err(Error::new(
                crate::error::ErrorKind::ShuttingDown,
                "volume stopped before the flush",
            ));
        }
        match (&st.last, &st.last_error) {
            (_, Some(e)) => Err(Error::new(crate::error::ErrorKind::Io, e.clone())),
            (Some(r), None) => Ok(r.clone()),
            (None, None) => Ok(FlushReport::default()),
        }
    }

    pub fn status(&self) -> FlushStatus {
        let st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        FlushStatus {
            last: st.last.clone(),
            last_error: st.last_error.clone(),
            last_error_unix_ms: st.last_error_unix_ms,
            failed_attempts: st.failed_attempts,
            consecutive_failures: st.consecutive_failures,
            flushes: st.flushes,
            data_bytes_total: st.data_bytes_total,
            zero_bytes_total: st.zero_bytes_total,
        }
    }

    /// Keeps the flush thread from writing the backing file until the guard is dropped (a
    /// flush in progress is waited for): the backing file then holds exactly the volume as
    /// of [`Cache::flushed_epoch`]. Foreground I/O goes on meanwhile (into the cache).
    pub fn pause(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ctl.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes the flush thread's backing-file writes, punches and syncs, and its mirror
    /// reads, through `plan` from now on (tests). Returns false if a plan was already set.
    pub fn inject_faults(&self, plan: Arc<FaultPlan>) -> bool {
        self.ctl.faults.set(plan).is_ok()
    }

    /// Stops at once without flushing, as a crash would (host-level crash tests): a flush in
    /// progress is abandoned before its next step.
    pub fn abort(&self) {
        {
            let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
            st.abort = true;
            st.stop = true;
            self.ctl.cv.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// Flushes everything still dirty, then stops the thread. Call once no I/O can arrive.
    pub fn stop(&self) {
        {
            let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
            st.stop = true;
            self.ctl.cv.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

struct FlushThread {
    cache: Arc<Cache>,
    sink: Box<dyn DeltaSink>,
    ctl: Arc<Ctl>,
    interval: Duration,
    /// Spread timed flushes over the interval (see "Pacing" in the module doc).
    pacing: bool,
    /// For the base snapshot's reads of the backing file.
    buf: Vec<u8>,
    batch: Batch,
    /// The flush thread's io_uring (`None`: plain syscalls, one per extent), made at the
    /// first flush.
    io: Option<batch::BatchIo>,
    io_tried: bool,
}

impl FlushThread {
    fn run(mut self) {
        let mut last_cut = Instant::now();
        let mut backoff = Duration::from_millis(100);
        // The cut requests the frozen epoch answers, credited when its flush succeeds.
        let mut pending_ticket: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            if self.aborted() {
                break;
            }
            // A frozen epoch left by a crash or a failed flush goes first.
            if self.cache.epochs.frozen() != 0 {
                // Background work, unless writers are (about to be) waiting for this flush.
                crate::prio::background(self.cache.under_pressure());
                match self.flush_frozen(false) {
                    Ok(r) => {
                        backoff = Duration::from_millis(100);
                        failures = 0;
                        self.finish(pending_ticket.take(), Some(r), None);
                    }
                    Err(_) if self.aborted() => break,
                    Err(e) => {
                        tracing::error!(volume = %self.cache.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "flush failed; data stays in the cache and the flush is retried");
                        failures += 1;
                        // Waiters get the error after a few attempts rather than hang; the
                        // flush goes on being retried in the background.
                        let give_up = if failures >= FAILURES_BEFORE_REPORT {
                            pending_ticket.take()
                        } else {
                            None
                        };
                        self.finish(give_up, None, Some(e.to_string()));
                        let st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
                        if st.stop {
                            // Stopping with an unflushable epoch: it stays in the cache
                            // (durable there) and is flushed on the next attach.
                            drop(st);
                            break;
                        }
                        let _ = self.ctl.cv.wait_timeout(st, backoff);
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                        continue;
                    }
                }
            }
            let (ticket, stop) = {
                let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let due = last_cut.elapsed() >= self.interval;
                    let dirty = self.cache.dirty_blocks() > 0;
                    if st.stop
                        || st.wanted > st.done
                        || (dirty && (due || self.cache.watermark_hit.load(SeqCst)))
                    {
                        break;
                    }
                    if due {
                        last_cut = Instant::now();
                    }
                    // Dirty: the cut may come due, or the watermark be hit, at any moment.
                    let poll = if dirty { POLL } else { POLL_IDLE };
                    st = self
                        .ctl
                        .cv
                        .wait_timeout(st, poll)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                (st.wanted, st.stop)
            };
            let dirty = self.cache.dirty_blocks() > 0;
            let requested = ticket > self.done();
            if dirty || requested {
                // Someone waits for this flush (a cut request, the SSD watermark, a stop):
                // full speed; else paced if asked.
                let forced =
                    self.cache.watermark_hit.swap(false, SeqCst) || self.cache.under_pressure();
                let urgent = requested || forced || stop;
                // The snapshot's point in time: the switch, before the drain of the writes
                // still in flight in the old epoch (they were issued before it).
                let cut_ms = crate::cache::now_unix_ms();
                let e = self.cache.cut();
                self.cache.record_cut(e, cut_ms);
                {
                    let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
                    st.cut = ticket;
                    st.cut_epoch = e;
                    self.ctl.cv.notify_all();
                }
                last_cut = Instant::now();
                tracing::debug!(volume = %self.cache.name, epoch = e, "epoch cut");
                match self.flush_frozen(self.pacing && !urgent) {
                    Ok(r) => self.finish(Some(ticket), Some(r), None),
                    Err(_) if self.aborted() => break,
                    Err(e) => {
                        tracing::warn!(volume = %self.cache.name, error = %e, "flush failed; retrying");
                        failures = 1;
                        pending_ticket = Some(ticket);
                        self.finish(None, None, Some(e.to_string()));
                        continue;
                    }
                }
            } else {
                self.finish(Some(ticket), None, None);
            }
            if stop && self.cache.epochs.frozen() == 0 && self.cache.dirty_blocks() == 0 {
                break;
            }
        }
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        st.stopped = true;
        self.ctl.cv.notify_all();
    }

    fn faults(&self) -> Option<&FaultPlan> {
        self.ctl.faults.get().map(|p| &**p)
    }

    fn aborted(&self) -> bool {
        self.ctl.st.lock().unwrap_or_else(|p| p.into_inner()).abort
    }

    fn check_abort(&self) -> Result<()> {
        if self.aborted() {
            return Err(Error::new(
                crate::error::ErrorKind::ShuttingDown,
                "flush aborted",
            ));
        }
        Ok(())
    }

    fn done(&self) -> u64 {
        self.ctl.st.lock().unwrap_or_else(|p| p.into_inner()).done
    }

    fn finish(&self, ticket: Option<u64>, report: Option<FlushReport>, err: Option<String>) {
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = ticket {
            st.done = st.done.max(t);
        }
        if let Some(r) = report {
            st.flushes += 1;
            st.data_bytes_total += r.data_bytes;
            st.zero_bytes_total += r.zero_bytes;
            st.last = Some(r);
            st.last_error = None;
            st.consecutive_failures = 0;
        }
        if err.is_some() {
            st.last_error = err;
            st.last_error_unix_ms = Some(now_unix_ms());
            st.failed_attempts += 1;
            st.consecutive_failures += 1;
        }
        self.ctl.cv.notify_all();
    }

    /// Flushes the frozen epoch (see the module doc for the steps and their order), spread
    /// over the interval when `paced`.
    fn flush_frozen(&mut self, paced: bool) -> Result<FlushReport> {
        let ctl = self.ctl.clone();
        let _gate = ctl.gate.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let c = self.cache.clone();
        let f = c.epochs.frozen();
        assert_ne!(f, 0);
        let s = (f % 2) as usize;
        let mut rep = FlushReport {
            epoch: f,
            ..Default::default()
        };
        if self.buf.len() < (FLUSH_EXTENT_BLOCKS_MAX * BLOCK_SIZE) as usize {
            self.buf = vec![0u8; (FLUSH_EXTENT_BLOCKS_MAX * BLOCK_SIZE) as usize];
        }
        if self.batch.buf.len() < BATCH_BYTES_MAX {
            self.batch.buf = vec![0u8; BATCH_BYTES_MAX];
        }
        if self.io.is_none() && !self.io_tried {
            self.io_tried = true;
            match batch::BatchIo::new() {
                Ok(io) => self.io = Some(io),
                Err(e) => {
                    tracing::warn!(volume = %self.cache.name, error = %e, "no io_uring for the flush: one read and one write syscall per extent")
                }
            }
        }
        // The backing file holds exactly epoch f - 1 now: ship it whole if the chain needs it.
        if self.sink.base_needed(f - 1)? {
            self.ship_base(f - 1)?;
        }
        self.sink.begin(f, false, c.size_bytes, c.cut_time(f))?;
        // From here on the backing holds a mix of f - 1 and f: say so where it survives a
        // lost SSD before the first block is written.
        self.sink.backing_state(BackingState::Writing(f))?;
        // While hydrating, hydration must not write a block of this epoch after we do (and
        // waits on the lock we hold: never paced then).
        let hyd_lock = c
            .hydrating()
            .map(|_| c.backing_lock.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pace = match (paced, hyd_lock.is_none()) {
            (true, true) => Some(Pace {
                start: Instant::now(),
                window: self.interval * PACE_SHARE_NUM / PACE_SHARE_DEN,
                total_bytes: c.slots[s].bits.count() << BLOCK_SHIFT,
                done_bytes: 0,
            }),
            _ => None,
        };
        let mut b = std::mem::take(&mut self.batch);
        b.clear();
        let mirror = MirrorSrc {
            s,
            path: c.cache_dir.join(format!("mirror.{s}")),
        };
        let mut err = None;
        c.slots[s]
            .bits
            .for_each_run(FLUSH_EXTENT_BLOCKS_MAX, |start, len| {
                let r = (|| {
                    if !b.fits(start, len) {
                        self.check_abort()?;
                        self.flush_batch(&mirror, &mut b, &mut rep)?;
                        self.pace(&mut pace, &mut b);
                    }
                    self.add_run(&mirror, &mut b, start, len);
                    Ok(())
                })();
                match r {
                    Ok(()) => true,
                    Err(e) => {
                        err = Some(e);
                        false
                    }
                }
            });
        if err.is_none() {
            err = self
                .check_abort()
                .and_then(|_| self.flush_batch(&mirror, &mut b, &mut rep))
                .err();
        }
        self.batch = b;
        if let Some(e) = err {
            return Err(e);
        }
        self.check_abort()?;
        FaultPlan::gate(self.faults(), FaultFile::Backing, FaultOp::Sync, || {
            c.backing.sync_data()
        })
        .map_err(|e| Error::io("fdatasync", &c.backing_path, e))?;
        drop(hyd_lock);
        // The blocks of this epoch are local: that must be durable before the epoch is
        // committed, or a restart would hydrate old data over them.
        crate::hydrate::persist_local(&c)?;
        self.check_abort()?;
        self.sink.commit(f)?;
        self.check_abort()?;
        c.commit_flushed(f, self.sink.head())?;
        self.check_abort()?;
        let done = if c.hydrating().is_some() {
            BackingState::Partial(f)
        } else {
            BackingState::Clean(f)
        };
        if let Err(e) = self.sink.backing_state(done) {
            // The label still says Writing(f): after a lost SSD the volume resynchronises
            // from the data plane rather than trusting the backing. Nothing is wrong now.
            tracing::warn!(volume = %c.name, epoch = f, error = %e, "could not record the flushed epoch in the backing label");
        }
        c.rcache.bump_generation();
        c.slots[s].bits.for_each_run(u64::MAX, |start, len| {
            c.rcache.remove_range(start, len);
            true
        });
        c.epochs.retire_frozen();
        c.reclaim_slot(s)?;
        rep.duration_ms = t0.elapsed().as_millis() as u64;
        rep.finished_unix_ms = now_unix_ms();
        tracing::info!(
            volume = %c.name, epoch = f, extents = rep.extents, data_bytes = rep.data_bytes,
            zero_bytes = rep.zero_bytes, duration_ms = rep.duration_ms, "epoch flushed"
        );
        Ok(rep)
    }

    /// Ships the backing file (the volume as of epoch `snap`) as a base snapshot: a full one,
    /// or, when the sink's chain ends at a snapshot it can compare against, only the blocks
    /// whose crc32c differs from that snapshot's (a resync by checksums), chained onto it.
    fn ship_base(&mut self, snap: u64) -> Result<()> {
        let c = self.cache.clone();
        let parent = self.sink.base_parent();
        match parent {
            Some(p) => {
                tracing::info!(volume = %c.name, snapshot = snap, parent = p, "the sink's chain lacks epochs the backing file holds: shipping the blocks that differ from its newest snapshot")
            }
            None => {
                tracing::info!(volume = %c.name, snapshot = snap, "shipping a full base snapshot of the backing file")
            }
        }
        self.sink
            .begin(snap, parent.is_none(), c.size_bytes, c.cut_time(snap))?;
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.ship_base_extents(&c, &mut buf, parent);
        self.buf = buf;
        r?;
        self.sink.commit(snap)
    }

    fn ship_base_extents(&mut self, c: &Cache, buf: &mut [u8], parent: Option<u64>) -> Result<()> {
        let zero_crc = crc32c::crc32c(&ZERO_BLOCK);
        let mut lba = 0u64;
        while lba < c.nblocks {
            self.check_abort()?;
            let n = (c.nblocks - lba).min(FLUSH_EXTENT_BLOCKS_MAX);
            let theirs = match parent {
                Some(p) => Some(self.sink.parent_checksums(p, lba, n)?),
                None => None,
            };
            let faults = self.ctl.faults.get().cloned();
            let src = (&c.backing, FaultFile::Backing, faults.as_deref());
            let sink = &mut self.sink;
            for_each_subextent(src, &c.backing_path, lba, n, buf, |l, k, data| {
                let Some(theirs) = &theirs else {
                    return sink.extent(l, k, data);
                };
                // Runs of blocks that differ from the parent snapshot.
                let same = |i: u64| {
                    let ours = data.map_or(zero_crc, |d| {
                        crc32c::crc32c(
                            &d[(i << BLOCK_SHIFT) as usize..((i + 1) << BLOCK_SHIFT) as usize],
                        )
                    });
                    theirs.get((l - lba + i) as usize) == Some(&ours)
                };
                let mut i = 0u64;
                while i < k {
                    if same(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < k && !same(j) {
                        j += 1;
                    }
                    let part =
                        data.map(|d| &d[(i << BLOCK_SHIFT) as usize..(j << BLOCK_SHIFT) as usize]);
                    sink.extent(l + i, j - i, part)?;
                    i = j;
                }
                Ok(())
            })?;
            lba += n;
        }
        Ok(())
    }

    /// Adds dirty run `[lba, lba + n)` to batch `b` (which [`Batch::fits`] it): read together
    /// with the batch's last read when it is close enough behind it, else with a read of its
    /// own; a long run that is all hole in the mirror (a discard) is not read at all.
    fn add_run(&self, m: &MirrorSrc, b: &mut Batch, lba: u64, n: u64) {
        if n >= SEEK_DATA_MIN_BLOCKS {
            let f = &self.cache.mirrors[m.s];
            let off = lba << BLOCK_SHIFT;
            // SAFETY: lseek on a valid fd with integer arguments.
            let data_at =
                unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
            if data_at < 0 || data_at as u64 >= off + (n << BLOCK_SHIFT) {
                b.runs.push(Run { lba, n, at: None });
                return;
            }
        }
        let bytes = (n << BLOCK_SHIFT) as usize;
        if let Some(r) = b.reads.last_mut() {
            let r_lba = r.off >> BLOCK_SHIFT;
            let r_end = r_lba + (r.len as u64 >> BLOCK_SHIFT);
            if lba >= r_end
                && lba - r_end <= READ_GAP_BLOCKS_MAX
                && lba + n - r_lba <= FLUSH_EXTENT_BLOCKS_MAX
            {
                let gap = ((lba - r_end) << BLOCK_SHIFT) as usize;
                r.len += gap + bytes;
                b.used += gap;
                b.runs.push(Run {
                    lba,
                    n,
                    at: Some(b.used),
                });
                b.used += bytes;
                return;
            }
        }
        b.reads.push(batch::Op {
            off: lba << BLOCK_SHIFT,
            at: b.used,
            len: bytes,
        });
        b.runs.push(Run {
            lba,
            n,
            at: Some(b.used),
        });
        b.used += bytes;
    }

    /// Reads batch `b` from the frozen mirror, writes its data extents to the backing file
    /// (zero extents: punched) and hands every extent to the sink, in block order; empties it.
    fn flush_batch(&mut self, m: &MirrorSrc, b: &mut Batch, rep: &mut FlushReport) -> Result<()> {
        if b.runs.is_empty() {
            return Ok(());
        }
        let c = self.cache.clone();
        let faults = self.ctl.faults.get().cloned();
        let faults = faults.as_deref();
        let mirror = &c.mirrors[m.s];
        // Reads: one submission for the batch (each read may be short: finished synchronously).
        let direct = faults.is_none() && self.io.is_some();
        if let (true, Some(io)) = (direct, self.io.as_mut()) {
            io.run(mirror.as_raw_fd(), false, &mut b.buf, &b.reads, &mut b.res);
        }
        for (i, r) in b.reads.iter().enumerate() {
            let dst = &mut b.buf[r.at..r.at + r.len];
            let done = if direct { b.res[i] } else { 0 };
            if done < 0 {
                return Err(Error::io_at(
                    "read",
                    &m.path,
                    r.off,
                    std::io::Error::from_raw_os_error(-done),
                ));
            }
            let done = done as usize;
            if done < r.len {
                let got = FaultPlan::gate(faults, FaultFile::Mirror(m.s), FaultOp::Read, || {
                    crate::cache::meta::read_full_at(mirror, &mut dst[done..], r.off + done as u64)
                })
                .map_err(|e| Error::io_at("read", &m.path, r.off, e))?;
                if done + got != r.len {
                    return Err(Error::corrupt(format!(
                        "{} is shorter than the volume",
                        m.path.display()
                    )));
                }
            }
        }
        // Split each run into extents of data and of zeros (a discard); punch the zeros.
        b.exts.clear();
        b.writes.clear();
        for run in &b.runs {
            let Some(at) = run.at else {
                b.exts.push((run.lba, run.n, None));
                continue;
            };
            let blk = |i: u64| {
                let o = at + (i << BLOCK_SHIFT) as usize;
                &b.buf[o..o + BLOCK_SIZE as usize]
            };
            let mut i = 0u64;
            while i < run.n {
                let z = blk(i) == ZERO_BLOCK;
                let mut j = i + 1;
                while j < run.n && (blk(j) == ZERO_BLOCK) == z {
                    j += 1;
                }
                let ext_at = at + (i << BLOCK_SHIFT) as usize;
                let len = ((j - i) << BLOCK_SHIFT) as usize;
                b.exts.push((run.lba + i, j - i, (!z).then_some(ext_at)));
                if !z {
                    b.writes.push(batch::Op {
                        off: (run.lba + i) << BLOCK_SHIFT,
                        at: ext_at,
                        len,
                    });
                }
                i = j;
            }
        }
        for &(lba, n, at) in &b.exts {
            if at.is_none() {
                punch_or_zero(
                    faults,
                    &c.backing,
                    &c.backing_path,
                    lba << BLOCK_SHIFT,
                    n << BLOCK_SHIFT,
                )?;
            }
        }
        // Writes: one submission for the batch; a short one is finished synchronously.
        if let (true, Some(io)) = (direct, self.io.as_mut()) {
            io.run(
                c.backing.as_raw_fd(),
                true,
                &mut b.buf,
                &b.writes,
                &mut b.res,
            );
        }
        for (i, w) in b.writes.iter().enumerate() {
            let done = if direct { b.res[i] } else { 0 };
            if done < 0 {
                return Err(Error::io_at(
                    "write",
                    &c.backing_path,
                    w.off,
                    std::io::Error::from_raw_os_error(-done),
                ));
            }
            let done = done as usize;
            if done < w.len {
                let off = w.off + done as u64;
                FaultPlan::write_all_at(
                    faults,
                    FaultFile::Backing,
                    &c.backing,
                    &b.buf[w.at + done..w.at + w.len],
                    off,
                )
                .map_err(|e| Error::io_at("write", &c.backing_path, off, e))?;
            }
        }
        // The sink, in block order.
        for &(_, n, at) in &b.exts {
            match at {
                Some(_) => rep.data_bytes += n << BLOCK_SHIFT,
                None => rep.zero_bytes += n << BLOCK_SHIFT,
            }
        }
        rep.extents += b.exts.len() as u64;
        self.sink.extents(&b.buf, &b.exts)?;
        b.dirty_bytes_done += b.runs.iter().map(|r| r.n << BLOCK_SHIFT).sum::<u64>();
        b.runs.clear();
        b.reads.clear();
        b.used = 0;
        Ok(())
    }

    /// A paced flush: waits until the share of the pace window that the bytes done so far
    /// earn has passed. Goes to full speed for the rest of the flush when something waits for
    /// it (a cut request, a stop, the SSD watermark).
    fn pace(&self, pace: &mut Option<Pace>, b: &mut Batch) {
        let Some(p) = pace else {
            return;
        };
        p.done_bytes += std::mem::take(&mut b.dirty_bytes_done);
        if p.total_bytes == 0 {
            return;
        }
        let due = p
            .window
            .mul_f64((p.done_bytes as f64 / p.total_bytes as f64).min(1.0));
        let mut st = self.ctl.st.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.stop
                || st.abort
                || st.wanted > st.done
                || self.cache.watermark_hit.load(SeqCst)
                || self.cache.under_pressure()
            {
                tracing::debug!(volume = %self.cache.name, "paced flush: something waits for it, full speed from here");
                *pace = None;
                return;
            }
            let left = due.saturating_sub(p.start.elapsed());
            if left.is_zero() {
                return;
            }
            st = self
                .ctl
                .cv
                .wait_timeout(st, left.min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The frozen mirror a flush reads.
struct MirrorSrc {
    s: usize,
    path: std::path::PathBuf,
}

/// One dirty run of a batch: where its blocks are in the batch's buffer (`None`: a hole of
/// the mirror, found by `SEEK_DATA`, not read: zeros).
struct Run {
    lba: u64,
    n: u64,
    at: Option<usize>,
}

/// The runs the flush reads, writes and ships together, and the buffers for them (kept from
/// one flush to the next).
#[derive(Default)]
struct Batch {
    runs: Vec<Run>,
    reads: Vec<batch::Op>,
    writes: Vec<batch::Op>,
    /// Extents of the runs: `(lba, nblocks, where the data is; None: zeros)`.
    exts: Vec<(u64, u64, Option<usize>)>,
    res: Vec<i32>,
    buf: Vec<u8>,
    /// Bytes of `buf` the reads fill.
    used: usize,
    /// Dirty bytes flushed since the pacing last looked.
    dirty_bytes_done: u64,
}

impl Batch {
    fn clear(&mut self) {
        self.runs.clear();
        self.reads.clear();
        self.used = 0;
        self.dirty_bytes_done = 0;
    }

    /// Whether run `[lba, lba + n)` fits in the batch (a run is at most
    /// [`FLUSH_EXTENT_BLOCKS_MAX`] blocks, the buffer at least [`BATCH_BYTES_MAX`]).
    fn fits(&self, _lba: u64, n: u64) -> bool {
        self.runs.len() < batch::BATCH_OPS_MAX
            && self.used + ((READ_GAP_BLOCKS_MAX + n) << BLOCK_SHIFT) as usize <= self.buf.len()
    }
}

/// A flush being spread over `window`.
struct Pace {
    start: Instant,
    window: Duration,
    total_bytes: u64,
    done_bytes: u64,
}

/// Reads blocks `[lba, lba + n)` of `f` (at most `buf` long) and calls `f_ext` for each run of
/// data blocks (`Some(data)`) and of zero blocks (`None`), in order. A range of
/// [`SEEK_DATA_MIN_BLOCKS`] or more that is all hole (a discard) is not read at all
/// (`SEEK_DATA`); a shorter one is read (its zeros are found all the same), which saves the
/// `lseek` of every small run — most runs of a random-write epoch are a block or two.
fn for_each_subextent(
    (f, which, faults): (&std::fs::File, FaultFile, Option<&FaultPlan>),
    path: &std::path::Path,
    lba: u64,
    n: u64,
    buf: &mut [u8],
    mut f_ext: impl FnMut(u64, u64, Option<&[u8]>) -> Result<()>,
) -> Result<()> {
    let off = lba << BLOCK_SHIFT;
    let bytes = n << BLOCK_SHIFT;
    if n >= SEEK_DATA_MIN_BLOCKS {
        // SAFETY: lseek on a valid fd with integer arguments.
        let data_at = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data_at < 0 || data_at as u64 >= off + bytes {
            return f_ext(lba, n, None);
        }
    }
    let b = &mut buf[..bytes as usize];
    let got = FaultPlan::gate(faults, which, FaultOp::Read, || {
        crate::cache::meta::read_full_at(f, b, off)
    })
    .map_err(|e| Error::io_at("read", path, off, e))?;
    if got != b.len() {
        return Err(Error::corrupt(format!(
            "{} is shorter than the volume",
            path.display()
        )));
    }
    let blk = |i: u64| &b[(i << BLOCK_SHIFT) as usize..((i + 1) << BLOCK_SHIFT) as usize];
    let mut i = 0u64;
    while i < n {
        let z = blk(i) == ZERO_BLOCK;
        let mut j = i + 1;
        while j < n && (blk(j) == ZERO_BLOCK) == z {
            j += 1;
        }
        let data = (!z).then(|| &b[(i << BLOCK_SHIFT) as usize..(j << BLOCK_SHIFT) as usize]);
        f_ext(lba + i, j - i, data)?;
        i = j;
    }
    Ok(())
}

/// Makes `[off, off+len)` of `f` read as zeros: punch a hole, else write zeros.
fn punch_or_zero(
    faults: Option<&FaultPlan>,
    f: &std::fs::File,
    path: &std::path::Path,
    off: u64,
    len: u64,
) -> Result<()> {
    FaultPlan::gate(faults, FaultFile::Backing, FaultOp::Punch, || Ok(()))
        .map_err(|e| Error::io_at("punch hole in", path, off, e))?;
    // SAFETY: fallocate on a valid fd with integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    ) {
        return Err(Error::io_at("punch hole in", path, off, e));
    }
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let k = (len - done).min(zeros.len() as u64) as usize;
        FaultPlan::write_all_at(faults, FaultFile::Backing, f, &zeros[..k], off + done)
            .map_err(|e| Error::io_at("write", path, off + done, e))?;
        done += k as u64;
    }
    Ok(())
}
