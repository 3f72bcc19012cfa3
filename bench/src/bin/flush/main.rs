//! `deltavol-bench-flush`: what one flush of a random-4k-write epoch costs the compute node:
//! the flush thread's CPU, wall time and syscalls, per extent and per byte, with the epoch
//! shipped to a real `deltavol-dataplane` on 127.0.0.1 (or to no data plane, `--sink null`).
//!
//! Each round makes the volume's active epoch dirty with `--writes` random 4 KiB writes into
//! the first `--region` bytes of the volume (through `Volume::handle`, as a ublk queue
//! does; the shape of the in-VM busy bench: tens of thousands of runs of one or two blocks),
//! then cuts and flushes it (`Volume::cut_and_flush`, the path `deltavol snapshot` takes) and
//! reads the flush thread's counters around it: CPU time (`/proc/self/task/TID/schedstat`)
//! and read- and write-class syscalls (`/proc/self/task/TID/io`: `syscr`, `syscw`). Rounds
//! are repeated and the medians printed (and written as JSON with `--out`).
//!
//! For instruction counts run one round under callgrind, collecting only inside the flush:
//!
//! ```sh
//! valgrind --tool=callgrind --toggle-collect='*FlushThread*flush_frozen*' \
//!     build/release/deltavol-bench-flush --rounds 1
//! ```
//!
//! and for the flush thread's syscalls by name, `strace -f -o FILE` with `--rounds 1`, then
//! the lines of the thread id printed as `threads: flush TID` (`bench/flush-syscalls.sh`).

#[path = "../common/machine.rs"]
mod machine;
#[path = "../common/results.rs"]
mod results;
#[path = "../common/server.rs"]
mod server;
#[path = "../common/stats.rs"]
mod stats;

use anyhow::{bail, ensure, Context};
use clap::Parser;
use deltavol::cache::io::UBLK_IO_OP_WRITE;
use deltavol::cache::CacheConfig;
use deltavol::flush::NullSink;
use deltavol::ship::{DataPlaneAddrs, ShipConfig};
use deltavol::volume::{Volume, VolumeConfig};
use serde::Serialize;
use server::ServerProcess;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BLOCK_BYTES: u64 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK_BYTES / 512;
const TOKEN: &[u8] = b"bench-flush-secret";

#[derive(Parser, Debug)]
#[command(
    name = "deltavol-bench-flush",
    about = "The cost of flushing and shipping one epoch of random 4k writes"
)]
struct Args {
    /// Directory for the volume and the data plane's store.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Volume size.
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "256MiB")]
    size: u64,
    /// The writes land in the first this many bytes of the volume.
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "128MiB")]
    region: u64,
    /// Random 4 KiB writes per epoch.
    #[arg(long, default_value_t = 15_000)]
    writes: u64,
    /// Epochs written and flushed (medians reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where the epoch goes besides the backing file: `dp` (a data plane on 127.0.0.1) or
    /// `null`.
    #[arg(long, default_value = "dp")]
    sink: String,
    /// The data-plane binary (default: `deltavol-dataplane` next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Write the epochs but do not flush them (for a syscall count of the writes alone).
    #[arg(long)]
    no_flush: bool,
    /// Cut on a timer every this many ms, as the flush interval does (0: each round cuts on
    /// request, as `deltavol snapshot` does, which is never paced).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Pace the timed flushes over the interval (`--flush-pacing on`; needs --interval-ms).
    #[arg(long)]
    pacing: bool,
    /// Results file (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the write offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Round {
    extents: u64,
    data_bytes: u64,
    /// From the end of the writes to the end of the flush.
    wall_ms: f64,
    /// The flush's own duration (its report).
    flush_ms: f64,
    flush_cpu_ms: f64,
    ship_cpu_ms: f64,
    server_cpu_ms: Option<f64>,
    flush_syscr: u64,
    flush_syscw: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: machine::Machine,
    sink: String,
    writes: u64,
    region_bytes: u64,
    rounds: Vec<Round>,
    median: Round,
    flush_cpu_ns_per_extent: f64,
    flush_cpu_ns_per_kib: f64,
    flush_syscalls_rw_per_extent: f64,
}

/// A thread of this process by its name's prefix (as the kernel keeps it: 15 bytes).
fn thread_id(prefix: &str) -> Option<String> {
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// CPU nanoseconds the thread has run.
fn thread_cpu_ns(tid: Option<&str>) -> u64 {
    tid.and_then(|t| std::fs::read_to_string(format!("/proc/self/task/{t}/schedstat")).ok())
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The thread's `(syscr, syscw)`.
fn thread_syscalls(tid: Option<&str>) -> (u64, u64) {
    let Some(s) = tid.and_then(|t| std::fs::read_to_string(format!("/proc/self/task/{t}/io")).ok())
    else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("syscr:"), field("syscw:"))
}

struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

fn dirty_epoch(vol: &Volume, args: &Args, rng: &mut SplitMix, round: u64) -> anyhow::Result<()> {
    let ring = vol.host_ring(0).context("a host ring")?;
    let blocks = args.region / BLOCK_BYTES;
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    for i in 0..args.writes {
        let b = rng.below(blocks);
        // Incompressible-looking, never all zeros.
        for (k, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(b ^ (round << 40) ^ ((k as u64) << 20) ^ i).to_le_bytes());
        }
        buf[0] |= 1;
        let r = smol::block_on(vol.handle(
            &ring,
            UBLK_IO_OP_WRITE,
            0,
            b * SECTORS_PER_BLOCK,
            SECTORS_PER_BLOCK as u32,
            &mut buf,
        ));
        ensure!(r == BLOCK_BYTES as i32, "write at block {b}: {r}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        !args.pacing || args.interval_ms > 0,
        "--pacing needs --interval-ms"
    );
    ensure!(
        args.region <= args.size && args.region >= BLOCK_BYTES,
        "--region must be at most --size"
    );
    let top = tempfile::Builder::new()
        .prefix("deltavol-bench-flush-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("a temp dir in {}", args.dir.display()))?;
    let machine = machine::Machine::probe(&args.dir);
    let server = match args.sink.as_str() {
        "dp" => {
            let bin = match &args.server_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?
                    .with_file_name("deltavol-dataplane")
                    .clone(),
            };
            let tok = top.path().join("token");
            std::fs::write(&tok, TOKEN)?;
            let data = top.path().join("dp");
            std::fs::create_dir_all(&data)?;
            Some(ServerProcess::start(
                &bin,
                &server::serve_args(&data, 1, &tok),
                &top.path().join("dp.log"),
                server::START_TIMEOUT,
            )?)
        }
        "null" => None,
        s => bail!("--sink {s}: give dp or null"),
    };
    let ship = server.as_ref().map(|s| ShipConfig {
        retention: None,
        addrs: DataPlaneAddrs::one(s.addr().to_string()),
        access: deltavol_dataplane::ClientAccess::new(TOKEN),
        outbox_dir: top.path().join("outbox"),
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(60),
        codec: Default::default(),
    });
    let cfg = VolumeConfig {
        cache: CacheConfig {
            name: "benchflush".into(),
            size_bytes: Some(args.size),
            cache_dir: top.path().join("cache"),
            backing: top.path().join("backing.img"),
            cache_limit_bytes: 4 * args.size,
            read_cache_bytes: 1 << 20,
            nr_queues: 1,
            create_as: None,
            journal: Default::default(),
        },
        flush_interval: match args.interval_ms {
            0 => Duration::from_secs(24 * 3600),
            ms => Duration::from_millis(ms),
        },
        flush_pacing: args.pacing,
        ship,
        hydrate_rate_bytes_per_s: 0,
        hydrate_readahead_bytes: deltavol::volume::HYDRATE_READAHEAD_BYTES,
        hydrate_hot_first: true,
        heat_interval: Duration::ZERO,
        fetch_timeout: Duration::from_secs(5),
    };
    let vol = match &cfg.ship {
        Some(_) => Volume::open(&cfg),
        None => Volume::open_with_sink(&cfg, Box::new(NullSink)),
    }
    .context("open the volume")?;
    // A thread names itself once it runs: give them a moment.
    let named = Instant::now() + Duration::from_secs(5);
    while (thread_id("dv-flush-").is_none()
        || (server.is_some() && thread_id("dv-ship-").is_none()))
        && Instant::now() < named
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let flush_tid = thread_id("dv-flush-");
    let ship_tid = thread_id("dv-ship-");
    eprintln!(
        "threads: flush {} shipper {}",
        flush_tid.as_deref().unwrap_or("-"),
        ship_tid.as_deref().unwrap_or("-")
    );
    ensure!(flush_tid.is_some(), "no flush thread found");
    let mut rng = SplitMix(args.seed);
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        // The flush thread's counters over the whole round (it only polls during the writes;
        // a timed cut may come while they go on).
        let (r0, w0) = thread_syscalls(flush_tid.as_deref());
        let c0 = thread_cpu_ns(flush_tid.as_deref());
        let s0 = thread_cpu_ns(ship_tid.as_deref());
        let sv0 = server.as_ref().and_then(|s| s.cpu_seconds());
        let n0 = vol.flusher.status().flushes;
        dirty_epoch(&vol, &args, &mut rng, round as u64)?;
        if args.no_flush {
            continue;
        }
        let t0 = Instant::now();
        let rep = if args.interval_ms > 0 {
            // A timed cut, as the interval makes it: wait for the next flush to end.
            let limit = Instant::now() + Duration::from_secs(120);
            while vol.flusher.status().flushes == n0 {
                ensure!(Instant::now() < limit, "no timed flush within 120 s");
                std::thread::sleep(Duration::from_millis(1));
            }
            vol.flusher.status().last.context("a flush report")?
        } else {
            vol.cut_and_flush()?
        };
        let wall = t0.elapsed();
        let (r1, w1) = thread_syscalls(flush_tid.as_deref());
        let r = Round {
            extents: rep.extents,
            data_bytes: rep.data_bytes,
            wall_ms: wall.as_secs_f64() * 1e3,
            flush_ms: rep.duration_ms as f64,
            flush_cpu_ms: (thread_cpu_ns(flush_tid.as_deref()) - c0) as f64 / 1e6,
            ship_cpu_ms: (thread_cpu_ns(ship_tid.as_deref()) - s0) as f64 / 1e6,
            server_cpu_ms: server
                .as_ref()
                .and_then(|s| s.cpu_seconds())
                .zip(sv0)
                .map(|(a, b)| (a - b) * 1e3),
            flush_syscr: r1 - r0,
            flush_syscw: w1 - w0,
        };
        eprintln!(
            "round {round}: {} extents, {} KiB, flush {:.0} ms ({:.1} ms wall), flush thread {:.1} ms CPU, {} read + {} write syscalls, shipper {:.1} ms, server {:?} ms",
            r.extents,
            r.data_bytes >> 10,
            r.flush_ms,
            r.wall_ms,
            r.flush_cpu_ms,
            r.flush_syscr,
            r.flush_syscw,
            r.ship_cpu_ms,
            r.server_cpu_ms
        );
        rounds.push(r);
    }
    vol.shutdown();
    if let Some(s) = server {
        s.stop()?;
    }
    if rounds.is_empty() {
        return Ok(());
    }
    let med = |f: &dyn Fn(&Round) -> f64| stats::median(&rounds.iter().map(f).collect::<Vec<_>>());
    let median = Round {
        extents: med(&|r| r.extents as f64) as u64,
        data_bytes: med(&|r| r.data_bytes as f64) as u64,
        wall_ms: med(&|r| r.wall_ms),
        flush_ms: med(&|r| r.flush_ms),
        flush_cpu_ms: med(&|r| r.flush_cpu_ms),
        ship_cpu_ms: med(&|r| r.ship_cpu_ms),
        server_cpu_ms: rounds
            .iter()
            .map(|r| r.server_cpu_ms)
            .collect::<Option<Vec<_>>>()
            .map(|v| stats::median(&v)),
        flush_syscr: med(&|r| r.flush_syscr as f64) as u64,
        flush_syscw: med(&|r| r.flush_syscw as f64) as u64,
    };
    let per_extent = |x: f64| x / median.extents.max(1) as f64;
    let report = Report {
        bench: "flush",
        machine,
        sink: args.sink.clone(),
        writes: args.writes,
        region_bytes: args.region,
        flush_cpu_ns_per_extent: per_extent(median.flush_cpu_ms * 1e6),
        flush_cpu_ns_per_kib: median.flush_cpu_ms * 1e6
            / (median.data_bytes.max(1) as f64 / 1024.0),
        flush_syscalls_rw_per_extent: per_extent((median.flush_syscr + median.flush_syscw) as f64),
        median,
        rounds,
    };
    println!(
        "median: {} extents, {} KiB; flush {:.0} ms, wall {:.1} ms; flush thread CPU {:.1} ms = {:.0} ns/extent, {:.0} ns/KiB; read+write syscalls {:.2}/extent; shipper {:.1} ms; server {:?} ms",
        report.median.extents,
        report.median.data_bytes >> 10,
        report.median.flush_ms,
        report.median.wall_ms,
        report.median.flush_cpu_ms,
        report.flush_cpu_ns_per_extent,
        report.flush_cpu_ns_per_kib,
        report.flush_syscalls_rw_per_extent,
        report.median.ship_cpu_ms,
        report.median.server_cpu_ms
    );
    if let Some(out) = &args.out {
        results::write(
            &report,
            "flush",
            &report.machine.date_utc,
            Some(out.as_path()),
            None,
        )?;
    }
    drop(top);
    Ok(())
}
