//! The cases and the two ways of running them: the engine (`Volume::handle` on a queue-like
//! thread, one task per tag) and the baseline (a plain io_uring loop on the same file).
//!
//! The volume's blocks are split in two regions: the first half is written through the engine
//! before any run (its blocks are in the SSD mirror: writes and cache-hit reads go there), the
//! second half is written into the backing file before the volume is opened (its blocks are in
//! no epoch: reads of it take the engine's miss path, through the read cache to the backing
//! file). Every write stamps each block's header with a new seq and records it in the model;
//! every read checks the header (and with `--quick` the whole block) against the model.

use crate::data::{self, Model, Rng, BLOCK_BYTES};
use crate::ring::{run_tasks, AsyncRing};
use anyhow::{bail, ensure, Context};
use deltavol::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::cache::CacheConfig;
use deltavol::flush::NullSink;
use deltavol::volume::{Volume, VolumeConfig};
use io_uring::{opcode, types, IoUring};
use serde::Serialize;
use std::cell::Cell;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const SECTORS_PER_BLOCK: u64 = (BLOCK_BYTES / 512) as u64;
/// Flush interval of the bench volume: no cut may happen during the bench (the baseline
/// writes the active mirror file directly, and an epoch change would move the engine's
/// writes to the other mirror).
const FLUSH_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The fill and the final check move this much per request.
const FILL_BYTES: usize = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Random writes into the mirror region.
    RandWrite,
    /// Random reads of the mirror region (blocks in the SSD mirror).
    RandReadHit,
    /// Random reads of the backing region (blocks in no epoch: read cache, else backing).
    RandReadMiss,
    /// Sequential writes over the mirror region.
    SeqWrite,
}

impl Kind {
    pub fn is_write(self) -> bool {
        matches!(self, Kind::RandWrite | Kind::SeqWrite)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: String,
    pub kind: Kind,
    pub block_bytes: usize,
    pub iodepth: usize,
    pub queues: usize,
}

impl Case {
    fn new(kind: Kind, block_bytes: usize, iodepth: usize, queues: usize) -> Case {
        let k = match kind {
            Kind::RandWrite => "randwrite",
            Kind::RandReadHit => "randread-hit",
            Kind::RandReadMiss => "randread-miss",
            Kind::SeqWrite => "seqwrite",
        };
        Case {
            name: format!("{k}-{}k-qd{iodepth}-{queues}q", block_bytes >> 10),
            kind,
            block_bytes,
            iodepth,
            queues,
        }
    }
}

/// Every case of a full run, in run order.
pub fn all_cases() -> Vec<Case> {
    use Kind::*;
    vec![
        Case::new(RandWrite, 4096, 32, 1),
        Case::new(RandWrite, 4096, 1, 1),
        Case::new(RandWrite, 4096, 32, 2),
        Case::new(RandReadHit, 4096, 32, 1),
        Case::new(RandReadHit, 4096, 1, 1),
        Case::new(RandReadHit, 4096, 32, 2),
        Case::new(RandReadMiss, 4096, 32, 1),
        Case::new(RandReadMiss, 4096, 1, 1),
        Case::new(RandReadMiss, 4096, 32, 2),
        Case::new(SeqWrite, 128 << 10, 32, 1),
    ]
}

/// Engine or baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Engine,
    Raw,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Engine => "engine",
            Side::Raw => "raw",
        }
    }
}

/// When a run stops: at the deadline or once `ops_max` requests were issued, whichever
/// comes first (callgrind runs use a fixed count).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub runtime: Duration,
    pub ops_max: u64,
}

/// The volume and its model.
pub struct Bench {
    pub vol: Volume,
    pub nblocks: u64,
    /// Blocks `[0, mirror_blocks)` are in the mirror; the rest only in the backing file.
    pub mirror_blocks: u64,
    /// The mirror slot of the active epoch (where writes land).
    pub slot: usize,
    pub epoch: u64,
    pub model: Model,
    pub body: Vec<u8>,
    /// Compare whole blocks on every read (else headers only).
    pub verify_full: bool,
    run_id: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub case: String,
    pub side: Side,
    pub repeat: usize,
    pub ops: u64,
    pub bytes: u64,
    pub wall_s: f64,
    pub iops: f64,
    /// 10^6 bytes per second.
    pub mb_s: f64,
    /// Process CPU (user + system, every thread) during the run, per request.
    pub cpu_us_per_op: f64,
    /// Engine runs: read-cache hits and misses counted by the volume during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcache_hits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcache_misses: Option<u64>,
}

/// Creates the volume in `dir`: the backing region written into the backing file, then the
/// volume opened and the mirror region written through the engine.
pub fn setup(
    dir: &Path,
    size_bytes: u64,
    read_cache_bytes: u64,
    nr_queues: usize,
    verify_full: bool,
) -> anyhow::Result<Bench> {
    let nblocks = size_bytes / BLOCK_BYTES as u64;
    ensure!(
        nblocks >= 2 * 64 * 32 && size_bytes % FILL_BYTES as u64 == 0,
        "--size must be a multiple of 128 KiB and at least 32 MiB"
    );
    let mirror_blocks = nblocks / 2;
    let body = data::body();
    let model = Model::new(nblocks);
    let backing = dir.join("backing.img");
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&backing)
            .with_context(|| format!("create {}", backing.display()))?;
        f.set_len(size_bytes)
            .with_context(|| format!("size {}", backing.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let per = (buf.len() / BLOCK_BYTES) as u64;
        let mut b = mirror_blocks;
        while b < nblocks {
            let k = per.min(nblocks - b);
            let chunk = &mut buf[..k as usize * BLOCK_BYTES];
            data::fill_blocks(chunk, b, data::SEQ_BACKING, &body);
            f.write_all_at(chunk, b * BLOCK_BYTES as u64)
                .with_context(|| format!("write {}", backing.display()))?;
            b += k;
        }
    }
    let cfg = VolumeConfig {
        cache: CacheConfig {
            name: "bench-engine".into(),
            size_bytes: Some(size_bytes),
            cache_dir: dir.join("cache"),
            backing,
            // Far above what the bench writes: no early cut, no backpressure.
            cache_limit_bytes: 4 * size_bytes,
            read_cache_bytes,
            nr_queues,
            create_as: None,
            journal: Default::default(),
        },
        flush_interval: FLUSH_INTERVAL,
        flush_pacing: false,
        ship: None,
        hydrate_rate_bytes_per_s: 0,
        hydrate_readahead_bytes: deltavol::volume::HYDRATE_READAHEAD_BYTES,
        hydrate_hot_first: true,
        heat_interval: deltavol::volume::HEAT_INTERVAL_DEFAULT,
        fetch_timeout: Duration::from_secs(5),
    };
    let vol = Volume::open_with_sink(&cfg, Box::new(NullSink)).context("open the volume")?;
    let epoch = vol.cache.epochs.current();
    let bench = Bench {
        vol,
        nblocks,
        mirror_blocks,
        slot: (epoch % 2) as usize,
        epoch,
        model,
        body,
        verify_full,
        run_id: AtomicU64::new(1),
    };
    // The mirror region, through the engine.
    let ring = bench.vol.host_ring(0).context("a host ring")?;
    let mut buf = vec![0u8; FILL_BYTES];
    let per = (FILL_BYTES / BLOCK_BYTES) as u64;
    let mut b = 0;
    while b < mirror_blocks {
        data::fill_blocks(&mut buf, b, data::SEQ_FILL, &bench.body);
        let r = smol::block_on(bench.vol.handle(
            &ring,
            UBLK_IO_OP_WRITE,
            0,
            b * SECTORS_PER_BLOCK,
            (per * SECTORS_PER_BLOCK) as u32,
            &mut buf,
        ));
        ensure!(r == FILL_BYTES as i32, "fill write at block {b}: {r}");
        for k in b..b + per {
            bench.model.set(k, data::SEQ_FILL);
        }
        b += per;
    }
    Ok(bench)
}

impl Bench {
    /// Reads the whole volume through the engine and compares every block with the model.
    pub fn verify_all(&self) -> anyhow::Result<u64> {
        self.check_epoch()?;
        let ring = self.vol.host_ring(0).context("a host ring")?;
        let mut buf = vec![0u8; FILL_BYTES];
        let per = (FILL_BYTES / BLOCK_BYTES) as u64;
        let mut b = 0;
        while b < self.nblocks {
            let r = smol::block_on(self.vol.handle(
                &ring,
                UBLK_IO_OP_READ,
                0,
                b * SECTORS_PER_BLOCK,
                (per * SECTORS_PER_BLOCK) as u32,
                &mut buf,
            ));
            ensure!(r == FILL_BYTES as i32, "read at block {b}: {r}");
            for (i, blk) in buf.chunks_exact(BLOCK_BYTES).enumerate() {
                data::check_block(blk, b + i as u64, &self.model, &self.body, true)
                    .map_err(|e| anyhow::anyhow!("read back through the engine: {e}"))?;
            }
            b += per;
        }
        Ok(self.nblocks)
    }

    /// Flips one body byte of a block in the middle of the mirror region, in the mirror file,
    /// and one of a block of the backing region, in the backing file (behind the engine's
    /// back, not in the model): what a torn write or a bad disk would leave. The write cases
    /// may rewrite the mirror block; nothing rewrites the backing one. Returns both blocks.
    pub fn sabotage(&self) -> anyhow::Result<(u64, u64)> {
        let flip = |f: &std::fs::File, b: u64| -> anyhow::Result<()> {
            let off = b * BLOCK_BYTES as u64 + 100;
            let mut x = [0u8; 1];
            f.read_exact_at(&mut x, off).context("read")?;
            x[0] ^= 0x5a;
            f.write_all_at(&x, off).context("write")?;
            Ok(())
        };
        let m = self.mirror_blocks / 2 + 1;
        let k = self.mirror_blocks + (self.nblocks - self.mirror_blocks) / 2 + 1;
        flip(&self.vol.cache.mirrors[self.slot], m).context("the mirror")?;
        flip(&self.vol.cache.backing, k).context("the backing file")?;
        Ok((m, k))
    }

    /// The baseline writes the active mirror file directly: the epoch must not have moved.
    pub fn check_epoch(&self) -> anyhow::Result<()> {
        let (a, f) = (
            self.vol.cache.epochs.current(),
            self.vol.cache.epochs.frozen(),
        );
        ensure!(
            a == self.epoch && f == 0,
            "the volume cut an epoch during the bench (epoch {} → {a}, frozen {f})",
            self.epoch
        );
        Ok(())
    }

    /// One timed run of `case` on `side`.
    pub fn run(
        &self,
        case: &Case,
        side: Side,
        repeat: usize,
        limit: Limit,
    ) -> anyhow::Result<RunResult> {
        let run_id = self.run_id.fetch_add(1, Relaxed);
        let (lo, hi) = match case.kind {
            Kind::RandReadMiss => (self.mirror_blocks, self.nblocks),
            _ => (0, self.mirror_blocks),
        };
        let bs_blocks = (case.block_bytes / BLOCK_BYTES) as u64;
        ensure!(
            (hi - lo) / bs_blocks >= (case.queues * case.iodepth) as u64 * 4,
            "volume too small for {}",
            case.name
        );
        let works: Vec<Work> = (0..case.queues)
            .map(|q| Work {
                kind: case.kind,
                bs_blocks,
                qd: case.iodepth,
                q,
                nq: case.queues,
                lo,
                hi,
                run_id,
                ops_max: limit.ops_max.div_ceil(case.queues as u64),
                runtime: limit.runtime,
            })
            .collect();
        let (h0, m0) = self.rcache_counts();
        let cpu0 = cpu_seconds();
        let barrier = Barrier::new(case.queues);
        let results: Vec<anyhow::Result<(u64, Duration)>> = std::thread::scope(|s| {
            let handles: Vec<_> = works
                .iter()
                .map(|w| {
                    let barrier = &barrier;
                    s.spawn(move || -> anyhow::Result<(u64, Duration)> {
                        match side {
                            Side::Engine => {
                                let c = &self.vol.cache;
                                let ring = AsyncRing::new(
                                    w.q,
                                    ring_entries(w.qd),
                                    [c.mirrors[0].as_raw_fd(), c.mirrors[1].as_raw_fd()],
                                    c.backing.as_raw_fd(),
                                )
                                .context("engine ring")?;
                                barrier.wait();
                                let t0 = Instant::now();
                                let ops = engine_measured(self, &ring, w)?;
                                let el = t0.elapsed();
                                if w.q == 0 {
                                    let c = ring.inline().counts();
                                    eprintln!(
                                        "  queue 0 inline ({:?}): reads {} inline / {} ring, writes {} inline / {} ring, {} records in {} batch writes",
                                        ring.inline().mode(),
                                        c.reads_inline,
                                        c.reads_ring,
                                        c.writes_inline,
                                        c.writes_ring,
                                        c.batched,
                                        c.batch_writes
                                    );
                                }
                                Ok((ops, el))
                            }
                            Side::Raw => {
                                let fd = match w.kind {
                                    Kind::RandReadMiss => self.vol.cache.backing.as_raw_fd(),
                                    _ => self.vol.cache.mirrors[self.slot].as_raw_fd(),
                                };
                                let mut ring =
                                    IoUring::new(ring_entries(w.qd)).context("raw ring")?;
                                ring.submitter()
                                    .register_files(&[fd])
                                    .context("register the file")?;
                                barrier.wait();
                                let t0 = Instant::now();
                                let ops = raw_measured(self, &mut ring, w)?;
                                Ok((ops, t0.elapsed()))
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a bench thread panicked")))
                })
                .collect()
        });
        let cpu = cpu_seconds() - cpu0;
        let (h1, m1) = self.rcache_counts();
        let mut ops = 0;
        let mut wall = Duration::ZERO;
        for r in results {
            let (o, w) = r.with_context(|| format!("{} {}", case.name, side.name()))?;
            ops += o;
            wall = wall.max(w);
        }
        self.check_epoch()?;
        ensure!(
            ops > 0,
            "{} {}: no request completed",
            case.name,
            side.name()
        );
        let wall_s = wall.as_secs_f64();
        let bytes = ops * case.block_bytes as u64;
        Ok(RunResult {
            case: case.name.clone(),
            side,
            repeat,
            ops,
            bytes,
            wall_s,
            iops: ops as f64 / wall_s,
            mb_s: bytes as f64 / 1e6 / wall_s,
            cpu_us_per_op: cpu * 1e6 / ops as f64,
            rcache_hits: (side == Side::Engine).then_some(h1 - h0),
            rcache_misses: (side == Side::Engine).then_some(m1 - m0),
        })
    }

    fn rcache_counts(&self) -> (u64, u64) {
        let c = &self.vol.cache;
        (
            c.stats_sum(|s| &s.rcache_hits),
            c.stats_sum(|s| &s.rcache_misses),
        )
    }
}

/// SQ entries for a depth (the daemon sizes its queue rings 4 per tag, at least 64).
fn ring_entries(qd: usize) -> u32 {
    (qd * 4).max(64).next_power_of_two() as u32
}

/// Process CPU seconds (user + system, all threads).
pub fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into `u`, which outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage succeeded, so `u` is initialised (and all-zero is valid anyway).
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// What one thread (one queue) does in a run.
struct Work {
    kind: Kind,
    bs_blocks: u64,
    qd: usize,
    q: usize,
    nq: usize,
    /// The region `[lo, hi)` in blocks.
    lo: u64,
    hi: u64,
    run_id: u64,
    ops_max: u64,
    runtime: Duration,
}

/// Per-thread state shared by its tasks (or the baseline's slots).
struct Issuer {
    deadline: Instant,
    issued: Cell<u64>,
    /// Next write's seq counter.
    seq: Cell<u64>,
    /// Sequential writes: the next chunk index of this thread.
    cursor: Cell<u64>,
}

impl Work {
    fn issuer(&self) -> Issuer {
        Issuer {
            deadline: Instant::now() + self.runtime,
            issued: Cell::new(0),
            seq: Cell::new(0),
            cursor: Cell::new(0),
        }
    }

    /// The first block of the next request of tag `t`, or `None` when the run is over.
    /// Random writes: tag `t` of queue `q` owns the blocks `≡ q * qd + t (mod nq * qd)`, so no
    /// two requests in flight touch one block and the model stays exact. Sequential writes:
    /// queue `q` owns the chunks `≡ q (mod nq)`, in order.
    #[inline]
    fn next(&self, t: usize, rng: &mut Rng, is: &Issuer) -> Option<u64> {
        let n = is.issued.get();
        if n >= self.ops_max || Instant::now() >= is.deadline {
            return None;
        }
        is.issued.set(n + 1);
        let len = self.hi - self.lo;
        Some(match self.kind {
            Kind::RandWrite => {
                let owners = (self.nq * self.qd) as u64;
                let owner = (self.q * self.qd + t) as u64;
                self.lo + rng.below(len / owners) * owners + owner
            }
            Kind::RandReadHit | Kind::RandReadMiss => self.lo + rng.below(len),
            Kind::SeqWrite => {
                let chunks = len / self.bs_blocks;
                let mut j = is.cursor.get();
                if j * self.nq as u64 + self.q as u64 >= chunks {
                    j = 0;
                }
                is.cursor.set(j + 1);
                self.lo + (j * self.nq as u64 + self.q as u64) * self.bs_blocks
            }
        })
    }

    #[inline]
    fn next_seq(&self, is: &Issuer) -> u64 {
        let s = is.seq.get() + 1;
        is.seq.set(s);
        (self.run_id << 40) | ((self.q as u64) << 32) | s
    }

    fn seed(&self, t: usize) -> u64 {
        (self.run_id << 20) ^ ((self.q as u64) << 10) ^ t as u64
    }
}

/// Before a write: stamps each block's header. After it: records the seqs.
#[inline]
fn stamp_all(buf: &mut [u8], b0: u64, seq: u64) {
    for (i, blk) in buf.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        data::stamp(blk, b0 + i as u64, seq);
    }
}

#[inline]
fn after_io(bench: &Bench, kind: Kind, buf: &[u8], b0: u64, seq: u64) -> Result<(), String> {
    if kind.is_write() {
        for i in 0..(buf.len() / BLOCK_BYTES) as u64 {
            bench.model.set(b0 + i, seq);
        }
        Ok(())
    } else {
        for (i, blk) in buf.chunks_exact(BLOCK_BYTES).enumerate() {
            data::check_block(
                blk,
                b0 + i as u64,
                &bench.model,
                &bench.body,
                bench.verify_full,
            )?;
        }
        Ok(())
    }
}

/// The engine side of one thread: one task per tag on a local executor over [`AsyncRing`],
/// each looping `Volume::handle` as a ublk queue's tag task does. Returns the requests done.
/// (Not inlined: `valgrind --tool=callgrind --toggle-collect` names it.)
#[inline(never)]
fn engine_measured(bench: &Bench, ring: &AsyncRing, w: &Work) -> anyhow::Result<u64> {
    let is = w.issuer();
    let ex = smol::LocalExecutor::new();
    let bytes = (w.bs_blocks as usize) * BLOCK_BYTES;
    let op = if w.kind.is_write() {
        UBLK_IO_OP_WRITE
    } else {
        UBLK_IO_OP_READ
    };
    let tasks: Vec<_> = (0..w.qd)
        .map(|t| {
            let is = &is;
            ex.spawn(async move {
                let mut buf = vec![0u8; bytes];
                data::fill_blocks(&mut buf, 0, 0, &bench.body);
                let mut rng = Rng::new(w.seed(t));
                let mut done = 0u64;
                while let Some(b0) = w.next(t, &mut rng, is) {
                    let seq = if w.kind.is_write() {
                        let s = w.next_seq(is);
                        stamp_all(&mut buf, b0, s);
                        s
                    } else {
                        0
                    };
                    let r = bench
                        .vol
                        .handle(
                            ring,
                            op,
                            0,
                            b0 * SECTORS_PER_BLOCK,
                            (w.bs_blocks * SECTORS_PER_BLOCK) as u32,
                            &mut buf,
                        )
                        .await;
                    if r != bytes as i32 {
                        return Err(format!("request at block {b0} returned {r}"));
                    }
                    after_io(bench, w.kind, &buf, b0, seq)?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut ops = 0;
    for r in run_tasks(ring, &ex, tasks)? {
        ops += r.map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    }
    Ok(ops)
}

/// The baseline side of one thread: a plain io_uring loop keeping `qd` requests in flight
/// on the file the engine would use (the active mirror, or the backing file for misses):
/// `Read`/`Write` on a registered fd, the file opened as the engine opens it (buffered,
/// `O_RDWR | O_CLOEXEC`: the very same open file), all SQEs of a round submitted together.
#[inline(never)]
fn raw_measured(bench: &Bench, ring: &mut IoUring, w: &Work) -> anyhow::Result<u64> {
    let is = w.issuer();
    let bytes = (w.bs_blocks as usize) * BLOCK_BYTES;
    let mut bufs: Vec<Vec<u8>> = (0..w.qd)
        .map(|_| {
            let mut b = vec![0u8; bytes];
            data::fill_blocks(&mut b, 0, 0, &bench.body);
            b
        })
        .collect();
    let mut rngs: Vec<Rng> = (0..w.qd).map(|t| Rng::new(w.seed(t))).collect();
    let mut state: Vec<(u64, u64)> = vec![(0, 0); w.qd];
    let mut in_flight = 0usize;
    let mut done = 0u64;
    let mut cqes: Vec<(usize, i32)> = Vec::with_capacity(w.qd);
    let issue = |t: usize,
                 ring: &mut IoUring,
                 bufs: &mut [Vec<u8>],
                 rngs: &mut [Rng],
                 state: &mut [(u64, u64)]|
     -> anyhow::Result<bool> {
        let Some(b0) = w.next(t, &mut rngs[t], &is) else {
            return Ok(false);
        };
        let off = b0 * BLOCK_BYTES as u64;
        let buf = &mut bufs[t];
        let sqe = if w.kind.is_write() {
            let s = w.next_seq(&is);
            stamp_all(buf, b0, s);
            state[t] = (b0, s);
            opcode::Write::new(types::Fixed(0), buf.as_ptr(), bytes as u32)
                .offset(off)
                .build()
        } else {
            state[t] = (b0, 0);
            opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), bytes as u32)
                .offset(off)
                .build()
        };
        // SAFETY: `bufs[t]` is not touched again until this SQE's CQE is reaped below, and
        // the loop returns only once nothing is in flight, or leaks `bufs` when it cannot
        // know (an `io_uring_enter` error).
        unsafe { ring.submission().push(&sqe.user_data(t as u64)) }
            .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        Ok(true)
    };
    for t in 0..w.qd {
        if issue(t, ring, &mut bufs, &mut rngs, &mut state)? {
            in_flight += 1;
        }
    }
    let mut failure = None;
    while in_flight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // SQEs may still be in the kernel: their buffers must never be freed.
                std::mem::forget(bufs);
                return Err(e).context("io_uring_enter");
            }
        }
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(t, r) in &cqes {
            in_flight -= 1;
            let (b0, seq) = state[t];
            if r != bytes as i32 {
                failure.get_or_insert(format!("request at block {b0} returned {r}"));
                continue;
            }
            if let Err(e) = after_io(bench, w.kind, &bufs[t], b0, seq) {
                failure.get_or_insert(e);
                continue;
            }
            done += 1;
            if failure.is_none() && issue(t, ring, &mut bufs, &mut rngs, &mut state)? {
                in_flight += 1;
            }
        }
    }
    if let Some(e) = failure {
        bail!("raw: {e}");
    }
    Ok(done)
}
