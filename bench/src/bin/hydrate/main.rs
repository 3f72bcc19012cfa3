//! `deltavol-bench-hydrate`: recovery from a data-plane snapshot — how soon a recovered volume
//! is usable, what a read of a block not yet local costs, and background hydration throughput
//! against a plain sequential copy of the same bytes over the same loopback, in the same run.
//!
//! 1. The real `deltavol-dataplane` binary ([`server`]) on 127.0.0.1:0; a source volume
//!    written with seeded random data ([`data`]) through the volume's handler, snapshotted
//!    (`cut_and_flush`) and shut down.
//! 2. Per repeat, interleaved, each in fresh directories under one temp directory in `--dir`
//!    (default `/var/tmp`: a real disk, fsync must mean something):
//!    * `latency`: a volume recovered from the snapshot with background hydration held back
//!      (1 byte/s: one extent a second); `Volume::open` timed, then 4k reads of blocks not yet
//!      local, each in its own extent, each timed (the first one is "the first read");
//!    * `hydrate`: a volume recovered with no rate limit, timed from the open until
//!      `hydrating()` is `None` (the hydrator's last map persist and the superblock update
//!      included);
//!    * `hydrate-serial`: the same with one batch in flight at a time (`Hydrator::tune(1, 0)`,
//!      stop-and-wait as before the pipeline): what pipelining gains, in the same run;
//!    * `seq-read`, `seq-read-no-ra`: a volume recovered with background hydration held back,
//!      read in order in 128 KiB reads from a quarter of the way in, with readahead (the
//!      default) and without (`Hydrator::tune(_, 0)`); MB/s of the reads' own time;
//!    * `hot-set`, `hot-set-lba`: the source read a working set (one region of 2 MiB in
//!      16) and its heat map went to the data plane; a volume recovered at full speed reads
//!      that working set at once (4k reads at random in its regions): how many reads find
//!      their block local, their latency, and the time until all are done, with the hottest
//!      regions hydrated first (the default) and in block order (`hydrate_hot_first` off);
//!    * `copy`: [`copy`], the source's backing file streamed over 127.0.0.1 in extent-sized
//!      chunks into a file, fsynced.
//!
//! With `--encrypt`, a second source holds the same data encrypted client-side
//! (`deltavol::crypt`: sealed as it is shipped, opened as it is fetched), and every latency
//! phase and hydration run is made on both, interleaved (`held-back-enc`, `hydrate-enc`, ...):
//! the cost of encryption is `hydrate-enc` over `hydrate`, measured in the same run.
//!
//! Before each timed run the page cache is synced and, unless `--warm`, the source side's
//! files (the data plane's data directory, the source backing file) are dropped from it, so
//! both hydration and copy read their source from disk. Every read is compared with the
//! source; after each hydration and copy the whole result is read back and compared. Any
//! failure ends the bench with a non-zero status, `--quick` too.

mod copy;
mod data;
#[path = "../common/machine.rs"]
mod machine;
mod report;
#[path = "../common/results.rs"]
mod results;
#[path = "../common/server.rs"]
mod server;
#[path = "../common/stats.rs"]
mod stats;
mod volume;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use deltavol::cache::io::UBLK_IO_OP_READ;
use deltavol::hydrate::HYDRATE_EXTENT_BLOCKS;
use deltavol::size::parse_size;
use deltavol::volume::Volume;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

use data::{Data, BLOCK_BYTES};
use report::{LatencyRun, Machine, Params, Report, Run};
use server::ServerProcess;
use volume::{Plane, Variant, EXTENT_BYTES};

/// How long a hydration may take before the bench gives up on it.
const HYDRATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often the bench looks whether hydration is done.
const HYDRATE_POLL: Duration = Duration::from_millis(2);
/// The latency phases: name and background hydration rate. `held-back`: 1 byte/s, the
/// smallest limit the hydrator takes (it then hydrates one extent a second), so reads find
/// blocks not local and the fetcher is otherwise idle; `full-speed`: no limit, so every read
/// also competes with background hydration (as right after a `recover`).
const LATENCY_MODES: [(&str, u64); 2] = [("held-back", 1), ("full-speed", 0)];
/// Blocks read back through a hydrated volume (besides the whole backing file).
const VERIFY_SAMPLE_BLOCKS: usize = 256;
/// Bytes read at a time when comparing whole files.
const VERIFY_CHUNK_BYTES: usize = 4 << 20;
/// The sequential reads' size (the kernel's default readahead for a block device).
const SEQ_READ_BYTES: usize = 128 << 10;
/// At most this much is read in order in a `seq-read` run.
const SEQ_READ_MAX: u64 = 64 << 20;
/// One region in this many is in the source's working set.
const HOT_ONE_IN: u64 = 16;
/// 4k reads of each working-set region in a `hot-set` run.
const HOT_READS_PER_REGION: usize = 32;

/// Hydration of a recovered volume against a plain sequential copy over the same loopback,
/// and the latency of reads that must be fetched, in the same run.
#[derive(Debug, Parser)]
#[command(name = "deltavol-bench-hydrate", version)]
struct Args {
    /// Volume size (suffix K, M or G: KiB, MiB, GiB; a multiple of 256 KiB)
    /// [default: 256M, --quick: 16M].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Percentage of the source's blocks written with random data (the rest stay zeros).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    fill_percent: u8,
    /// 4k reads of blocks not yet local per latency phase [default: 200, --quick: 20].
    #[arg(long)]
    reads: Option<usize>,
    /// Latency, hydration and copy runs (interleaved; medians reported) [default: 3,
    /// --quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Threads of the data-plane server.
    #[arg(long, default_value_t = 2)]
    dp_threads: usize,
    /// Leave the source side's files in the page cache between runs (default: dropped).
    #[arg(long)]
    warm: bool,
    /// JSON results [default: bench/results/hydrate-<date>.json; none with --quick].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory for the temp data (volumes, copies, data-plane data dir): a real disk.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The `deltavol-dataplane` binary [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Seed of the data and of the blocks read.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// CI smoke test: tiny sizes, one repeat; still fails on any error.
    #[arg(long)]
    quick: bool,
    /// Also measure a source encrypted client-side (same data), interleaved with the plain
    /// one, and report encrypted / plain.
    #[arg(long)]
    encrypt: bool,
}

fn main() -> anyhow::Result<()> {
    run(Args::parse())
}

/// Everything a run needs.
struct Bench {
    size: u64,
    nblocks: u64,
    data: Data,
    plane: Plane,
    /// The sources to recover from (the plain one first) and their snapshots.
    sources: Vec<(Variant, u64)>,
    base: PathBuf,
    /// Files whose page cache is dropped before each timed run (the source side).
    source_files: Vec<PathBuf>,
    data_dir: PathBuf,
    cold: bool,
}

fn run(args: Args) -> anyhow::Result<()> {
    let size = args
        .size
        .unwrap_or(if args.quick { 16 << 20 } else { 256 << 20 });
    let reads = args.reads.unwrap_or(if args.quick { 20 } else { 200 });
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(
        size >= EXTENT_BYTES as u64 && size % EXTENT_BYTES as u64 == 0,
        "--size must be a positive multiple of {} KiB",
        EXTENT_BYTES >> 10
    );
    ensure!(reads >= 1, "--reads must be at least 1");
    ensure!(repeats >= 1, "--repeats must be at least 1");
    ensure!(args.dp_threads >= 1, "--dp-threads must be at least 1");
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("deltavol-dataplane"),
    };
    ensure!(
        server_bin.is_file(),
        "no data-plane server at {}: build it next to this bench \
         (cargo build --release -p deltavol-dataplane -p deltavol-bench) or pass --server-bin",
        server_bin.display()
    );

    let base = tempfile::Builder::new()
        .prefix("deltavol-bench-hydrate-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a temp directory in {}", args.dir.display()))?;
    let machine = Machine::probe(base.path());
    if machine.dir_is_tmpfs {
        eprintln!(
            "warning: {} is tmpfs: fsync and disk reads cost nothing there, so the figures say little; pass --dir on a disk",
            args.dir.display()
        );
    }
    let nextents = size / EXTENT_BYTES as u64;
    if reads as u64 > nextents {
        eprintln!(
            "note: {reads} reads but only {nextents} extents: some reads share an extent (the later ones find it local and are skipped)"
        );
    }

    // The data plane, for the whole bench.
    let mut token = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut token);
    let token: Vec<u8> = token
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    let token_file = base.path().join("token");
    File::create(&token_file)
        .and_then(|mut f| f.write_all(&token))
        .with_context(|| format!("write {}", token_file.display()))?;
    let data_dir = base.path().join("dp");
    let mut server = ServerProcess::start(
        &server_bin,
        &server::serve_args(&data_dir, args.dp_threads, &token_file),
        &base.path().join("server.log"),
        server::START_TIMEOUT,
    )?;
    let plane = Plane {
        addr: server.addr().to_string(),
        token,
    };

    // The source.
    let data = Data {
        seed: args.seed,
        fill_percent: args.fill_percent,
    };
    eprintln!(
        "hydrate: {:.1} MiB volume, {}% random data, {} KiB extents; {repeats} repeats of latency ({reads} reads), hydrate, copy; data plane {} with {} threads; temp dir {}",
        size as f64 / f64::from(1 << 20),
        args.fill_percent,
        EXTENT_BYTES >> 10,
        server.addr(),
        args.dp_threads,
        base.path().display()
    );
    let mut variants = vec![Variant::plain()];
    if args.encrypt {
        variants.push(Variant::encrypted());
    }
    // The working set the source reads (and its heat map records): one region in 16.
    let region_bytes = u64::from(deltavol::heat::region_blocks_for(size / BLOCK_BYTES as u64))
        * BLOCK_BYTES as u64;
    let nregions = size.div_ceil(region_bytes);
    let mut hot: Vec<u64> = (0..nregions).collect();
    hot.shuffle(&mut StdRng::seed_from_u64(args.seed ^ 0x686f74));
    hot.truncate((nregions / HOT_ONE_IN).max(1) as usize);
    hot.sort_unstable();
    let mut made = Vec::new();
    for v in &variants {
        let src_dir = base.path().join(format!("source{}", v.suffix()));
        let source = volume::make_source(&src_dir, size, &plane, v, &data, &hot)
            .with_context(|| server.failure("making the source volume failed"))?;
        server.check_alive()?;
        eprintln!(
            "source{}: {} blocks written in {:.2} s, cut_and_flush {:.2} s, committed on the data plane {:.2} s later: snapshot {}",
            v.suffix(), source.blocks_written, source.fill_s, source.cut_and_flush_s, source.ship_commit_s, source.snapshot
        );
        made.push((src_dir.join("backing.img"), source));
    }
    let source_backing = made[0].0.clone();
    let bench = Bench {
        size,
        nblocks: size / BLOCK_BYTES as u64,
        data,
        plane,
        sources: variants
            .iter()
            .cloned()
            .zip(made.iter().map(|m| m.1.snapshot))
            .collect(),
        base: base.path().to_path_buf(),
        source_files: made.iter().map(|m| m.0.clone()).collect(),
        data_dir,
        cold: !args.warm,
    };
    let mut made = made.into_iter().map(|m| m.1);
    let source = made.next().context("the plain source")?;
    let source_encrypted = made.next();
    // The source's backing file is what the copy streams: it must be the snapshot's bytes.
    let n = compare_file(&source_backing, &data, size).context("checking the source")?;
    eprintln!("source: backing file checked ({n} blocks)");

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x0068_7964_7261_7465);
    let mut latency_runs = Vec::with_capacity(repeats);
    let mut hot_runs = Vec::with_capacity(2 * repeats);
    let mut runs = Vec::with_capacity(2 * repeats);
    let mut modes = Vec::new();
    for (v, _) in &bench.sources {
        for (mode, _) in LATENCY_MODES {
            modes.push(format!("{mode}{}", v.suffix()));
        }
    }
    for repeat in 0..repeats {
        for (si, (mode, rate)) in bench
            .sources
            .iter()
            .enumerate()
            .flat_map(|(si, _)| LATENCY_MODES.map(|m| (si, m)))
        {
            let mode = format!("{mode}{}", bench.sources[si].0.suffix());
            let l = latency_phase(&bench, si, &mode, rate, repeat, reads, &mut rng).with_context(
                || server.failure(&format!("latency phase {mode}, run {}", repeat + 1)),
            )?;
            eprintln!(
                "[{}/{repeats}] latency {mode}: open {:.1} ms, first read {:.0} µs; {} reads: median {:.0} µs, p99 {:.0} µs, max {:.0} µs ({} fetched on demand, {:.1} MiB local at the end)",
                repeat + 1,
                l.open_ms,
                l.first_read_us,
                l.reads_us.len(),
                l.median_us,
                l.p99_us,
                l.max_us,
                l.fetched_on_demand,
                l.local_bytes_at_end as f64 / f64::from(1 << 20)
            );
            latency_runs.push(l);
            server.check_alive()?;
        }

        let hydrations = (0..bench.sources.len())
            .map(|si| (si, false))
            .chain([(0, true)]);
        for (si, serial) in hydrations {
            let h = hydrate_run(&bench, si, serial, &server, repeat, &mut rng)
                .with_context(|| server.failure(&format!("hydration, run {}", repeat + 1)))?;
            eprintln!(
                "[{}/{repeats}] {}: {:.1} MiB in {:.3} s = {:.1} MB/s (open {:.1} ms, server CPU {}), {} blocks verified",
                repeat + 1,
                h.config,
                h.bytes as f64 / f64::from(1 << 20),
                h.wall_s,
                h.mb_s,
                h.open_ms.unwrap_or(f64::NAN),
                h.server_cpu_s
                    .map_or("?".into(), |c| format!("{c:.2} s")),
                h.verified_blocks
            );
            runs.push(h);
            server.check_alive()?;
        }

        for hot_first in [true, false] {
            let h =
                hot_set_run(&bench, &source, hot_first, repeat, &mut rng).with_context(|| {
                    server.failure(&format!("working set reads, run {}", repeat + 1))
                })?;
            eprintln!(
                "[{}/{repeats}] {}: {} reads of the working set ({} regions) done {:.0} ms after the open, {:.0}% found local, median {:.0} µs, p99 {:.0} µs ({} extents fetched on demand)",
                repeat + 1,
                h.mode,
                h.reads,
                source.hot_regions.len(),
                h.done_ms,
                h.local_share * 100.0,
                h.median_us,
                h.p99_us,
                h.fetched_on_demand
            );
            hot_runs.push(h);
            server.check_alive()?;
        }

        for readahead in [true, false] {
            let s = seq_read_run(&bench, readahead, repeat).with_context(|| {
                server.failure(&format!("sequential reads, run {}", repeat + 1))
            })?;
            eprintln!(
                "[{}/{repeats}] {}: {:.1} MiB in {:.3} s of reads = {:.1} MB/s, {} blocks verified",
                repeat + 1,
                s.config,
                s.bytes as f64 / f64::from(1 << 20),
                s.wall_s,
                s.mb_s,
                s.verified_blocks
            );
            runs.push(s);
            server.check_alive()?;
        }

        let c = copy_run(&bench, &source_backing, repeat)
            .with_context(|| format!("copy, run {}", repeat + 1))?;
        eprintln!(
            "[{}/{repeats}] copy: {:.1} MiB in {:.3} s = {:.1} MB/s, {} blocks verified",
            repeat + 1,
            c.bytes as f64 / f64::from(1 << 20),
            c.wall_s,
            c.mb_s,
            c.verified_blocks
        );
        runs.push(c);
    }
    server.check_alive()?;

    let configs: Vec<String> = bench
        .sources
        .iter()
        .map(|(v, _)| format!("hydrate{}", v.suffix()))
        .chain(["hydrate-serial", "seq-read", "seq-read-no-ra", "copy"].map(String::from))
        .collect();
    let configs: Vec<&str> = configs.iter().map(String::as_str).collect();
    let summaries = report::summarise(&configs, &runs);
    let ratio = summaries[0].ratio_vs_copy;
    let ratio_encrypted_vs_plain = summaries
        .iter()
        .find(|s| s.config == "hydrate-enc")
        .map(|s| s.mb_s_median / summaries[0].mb_s_median);
    let median_of = |c: &str| {
        summaries
            .iter()
            .find(|s| s.config == c)
            .map_or(f64::NAN, |s| s.mb_s_median)
    };
    let ratio_pipelined_vs_serial = median_of("hydrate") / median_of("hydrate-serial");
    let ratio_readahead = median_of("seq-read") / median_of("seq-read-no-ra");
    let report = Report {
        bench: "hydrate",
        command: std::env::args().collect(),
        machine,
        params: Params {
            size_bytes: size,
            fill_percent: args.fill_percent,
            extent_bytes: EXTENT_BYTES,
            reads_per_phase: reads,
            repeats,
            dataplane_threads: args.dp_threads,
            cold_source: bench.cold,
            seed: args.seed,
        },
        quick: args.quick,
        source,
        source_encrypted,
        latency: report::summarise_latency(
            &modes.iter().map(String::as_str).collect::<Vec<_>>(),
            &latency_runs,
        ),
        summaries,
        ratio_hydrate_vs_copy: ratio,
        ratio_encrypted_vs_plain,
        ratio_pipelined_vs_serial,
        ratio_readahead,
        hot: report::summarise_hot(&["hot-set", "hot-set-lba"], &hot_runs),
        hot_runs,
        latency_runs,
        runs,
    };
    print!("{}", report::table(&report));
    results::write(
        &report,
        report.bench,
        report.machine.date(),
        args.out.as_deref(),
        args.quick.then_some("--quick"),
    )?;
    drop(server);
    Ok(())
}

impl Bench {
    /// A fresh directory for one run.
    fn run_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.base.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Before a timed run: dirty data written back (earlier runs' files), and unless `--warm`
    /// the source side's files dropped from the page cache.
    fn settle(&self) -> anyhow::Result<()> {
        nix::unistd::sync();
        if !self.cold {
            return Ok(());
        }
        let mut files = self.source_files.clone();
        collect_files(&self.data_dir, &mut files)?;
        for p in files {
            let f = File::open(&p).with_context(|| format!("open {}", p.display()))?;
            nix::fcntl::posix_fadvise(
                f.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .with_context(|| format!("posix_fadvise(DONTNEED) {}", p.display()))?;
        }
        Ok(())
    }
}

/// Every regular file under `dir`.
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let e = e.with_context(|| format!("list {}", dir.display()))?;
        let t = e.file_type().context("file type")?;
        if t.is_dir() {
            collect_files(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Opens a volume recovered from the snapshot of source `si` in `dir`; returns it and the
/// open's wall time.
fn open_recovered(
    b: &Bench,
    si: usize,
    dir: &Path,
    rate: u64,
) -> anyhow::Result<(Volume, Duration)> {
    let (v, snap) = &b.sources[si];
    let cfg = volume::recovered_config(dir, b.size, &b.plane, v, *snap, rate)?;
    let t0 = Instant::now();
    let vol = Volume::open(&cfg).context("opening a recovered volume")?;
    let open = t0.elapsed();
    ensure!(
        vol.cache.hydrating().is_some(),
        "a volume recovered from snapshot {snap} of {} is not hydrating",
        v.name
    );
    Ok((vol, open))
}

fn latency_phase(
    b: &Bench,
    si: usize,
    mode: &str,
    rate: u64,
    repeat: usize,
    reads: usize,
    rng: &mut StdRng,
) -> anyhow::Result<LatencyRun> {
    let dir = b.run_dir(&format!("latency-{mode}-{repeat}"))?;
    b.settle()?;
    // The extents to read, in a random order; past extent 0, which the hydrator takes first.
    // Blocks found local when their turn comes (hydrated meanwhile) are skipped.
    let nextents = b.nblocks / HYDRATE_EXTENT_BLOCKS;
    let mut order: Vec<u64> = (1..nextents).collect();
    order.shuffle(rng);
    if order.is_empty() {
        order.push(0);
    }
    let (vol, open) = open_recovered(b, si, &dir, rate)?;
    let ring = vol.host_ring(0).context("a host ring")?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut scratch = vec![0u8; BLOCK_BYTES];
    let mut reads_us = Vec::with_capacity(reads);
    let mut candidates = order.iter().cycle().take(order.len().max(reads) * 2);
    while reads_us.len() < reads {
        let Some(&ext) = candidates.next() else {
            break;
        };
        let block = ext * HYDRATE_EXTENT_BLOCKS + rng.gen_range(0..HYDRATE_EXTENT_BLOCKS);
        if volume::is_local(&vol, block) {
            continue;
        }
        let t0 = Instant::now();
        volume::io(&vol, &ring, UBLK_IO_OP_READ, block, &mut buf)?;
        reads_us.push(t0.elapsed().as_secs_f64() * 1e6);
        if b.data.first_mismatch(block, &buf, &mut scratch).is_some() {
            bail!("a read of block {block} (fetched on demand) differs from the source");
        }
    }
    ensure!(
        !reads_us.is_empty(),
        "no block was left to read before it was local"
    );
    if reads_us.len() < reads {
        eprintln!(
            "note: {mode}: only {} of {reads} reads found a block not yet local",
            reads_us.len()
        );
    }
    let st = vol.status().hydration.unwrap_or_default();
    drop(ring);
    vol.shutdown();
    drop(vol);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(LatencyRun {
        mode: mode.to_string(),
        hydrate_rate_bytes_per_s: rate,
        repeat,
        open_ms: open.as_secs_f64() * 1e3,
        first_read_us: reads_us[0],
        median_us: stats::median(&reads_us),
        p99_us: stats::percentile(&reads_us, 99.0),
        max_us: report::max(&reads_us),
        reads_us,
        fetched_on_demand: st.fetched_on_demand,
        local_bytes_at_end: st.local_bytes,
    })
}

fn hydrate_run(
    b: &Bench,
    si: usize,
    serial: bool,
    server: &ServerProcess,
    repeat: usize,
    rng: &mut StdRng,
) -> anyhow::Result<Run> {
    let config = if serial {
        "hydrate-serial".to_string()
    } else {
        format!("hydrate{}", b.sources[si].0.suffix())
    };
    let dir = b.run_dir(&format!("{config}-{repeat}"))?;
    b.settle()?;
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let (vol, open) = open_recovered(b, si, &dir, 0)?;
    if serial {
        // Taken at the worker's next turn: the first batches may still go in parallel.
        vol.hydrator
            .as_ref()
            .context("a hydrating volume has a hydrator")?
            .tune(1, 0);
    }
    while vol.cache.hydrating().is_some() {
        if t0.elapsed() > HYDRATE_TIMEOUT {
            bail!(
                "hydration not done in {HYDRATE_TIMEOUT:?}: {:?}",
                vol.status().hydration
            );
        }
        std::thread::sleep(HYDRATE_POLL);
    }
    let wall = t0.elapsed();
    let cpu = server.cpu_seconds().zip(cpu0).map(|(a, z)| a - z);
    let st = vol.status().hydration.unwrap_or_default();
    if let Some(e) = &st.last_error {
        eprintln!("note: the hydrator reported an error on the way: {e}");
    }
    // Read back through the volume: a sample, the first and the last block.
    let ring = vol.host_ring(0).context("a host ring")?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut scratch = vec![0u8; BLOCK_BYTES];
    let mut sample: Vec<u64> = (0..VERIFY_SAMPLE_BLOCKS)
        .map(|_| rng.gen_range(0..b.nblocks))
        .collect();
    sample.extend([0, b.nblocks - 1]);
    for &block in &sample {
        volume::io(&vol, &ring, UBLK_IO_OP_READ, block, &mut buf)?;
        if b.data.first_mismatch(block, &buf, &mut scratch).is_some() {
            bail!("after hydration, block {block} reads back different from the source");
        }
    }
    drop(ring);
    vol.shutdown();
    drop(vol);
    // And the whole local copy.
    let n = compare_file(&dir.join("backing.img"), &b.data, b.size)
        .context("checking the hydrated backing file")?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    let wall_s = wall.as_secs_f64();
    Ok(Run {
        config,
        repeat,
        bytes: b.size,
        wall_s,
        mb_s: b.size as f64 / 1e6 / wall_s,
        open_ms: Some(open.as_secs_f64() * 1e3),
        server_cpu_s: cpu,
        verified_blocks: sample.len() as u64 + n,
    })
}

/// Reads the plain source's volume, recovered with background hydration held back, in order
/// from a quarter of the way in: `SEQ_READ_MAX` (at most half the volume) in 128 KiB reads,
/// with or without readahead. Times the reads only; every read is compared with the source.
fn seq_read_run(b: &Bench, readahead: bool, repeat: usize) -> anyhow::Result<Run> {
    let config = if readahead {
        "seq-read"
    } else {
        "seq-read-no-ra"
    };
    let dir = b.run_dir(&format!("{config}-{repeat}"))?;
    b.settle()?;
    let (vol, _open) = open_recovered(b, 0, &dir, 1)?;
    let h = vol
        .hydrator
        .as_ref()
        .context("a hydrating volume has a hydrator")?;
    if !readahead {
        h.tune(deltavol::hydrate::HYDRATE_PIPELINE_BATCHES, 0);
    }
    let ring = vol.host_ring(0).context("a host ring")?;
    let per_read = (SEQ_READ_BYTES / BLOCK_BYTES) as u64;
    let start = (b.nblocks / 4) / per_read * per_read;
    let bytes = SEQ_READ_MAX.min(b.size / 2) / SEQ_READ_BYTES as u64 * SEQ_READ_BYTES as u64;
    ensure!(bytes > 0, "the volume is too small for sequential reads");
    let mut buf = vec![0u8; SEQ_READ_BYTES];
    let mut scratch = vec![0u8; BLOCK_BYTES];
    let mut busy = Duration::ZERO;
    let mut block = start;
    while block < start + bytes / BLOCK_BYTES as u64 {
        let t0 = Instant::now();
        volume::io(&vol, &ring, UBLK_IO_OP_READ, block, &mut buf)?;
        busy += t0.elapsed();
        if let Some(bad) = b.data.first_mismatch(block, &buf, &mut scratch) {
            bail!("{config}: a read of block {bad} differs from the source");
        }
        block += per_read;
    }
    let st = vol.status().hydration.unwrap_or_default();
    if readahead && st.extents_read_ahead == 0 {
        bail!("{config}: nothing was read ahead: {st:?}");
    }
    drop(ring);
    vol.shutdown();
    drop(vol);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    let wall_s = busy.as_secs_f64();
    Ok(Run {
        config: config.into(),
        repeat,
        bytes,
        wall_s,
        mb_s: bytes as f64 / 1e6 / wall_s,
        open_ms: None,
        server_cpu_s: None,
        verified_blocks: bytes / BLOCK_BYTES as u64,
    })
}

/// A volume recovered from the plain source at full speed reads the source's working set at
/// once: `HOT_READS_PER_REGION` 4k reads at random in each of its regions, shuffled. Notes
/// which reads found their block local, times each, and the whole from the open on.
fn hot_set_run(
    b: &Bench,
    source: &volume::Source,
    hot_first: bool,
    repeat: usize,
    rng: &mut StdRng,
) -> anyhow::Result<report::HotRun> {
    let mode = if hot_first { "hot-set" } else { "hot-set-lba" };
    ensure!(
        !source.hot_regions.is_empty(),
        "the source shipped no heat map"
    );
    let rb = u64::from(source.heat_region_blocks);
    let mut blocks: Vec<u64> = source
        .hot_regions
        .iter()
        .flat_map(|&r| (0..HOT_READS_PER_REGION).map(move |_| r))
        .map(|r| (r * rb + rng.gen_range(0..rb)).min(b.nblocks - 1))
        .collect();
    blocks.shuffle(rng);
    let dir = b.run_dir(&format!("{mode}-{repeat}"))?;
    b.settle()?;
    let (v, snap) = &b.sources[0];
    let mut cfg = volume::recovered_config(&dir, b.size, &b.plane, v, *snap, 0)?;
    cfg.hydrate_hot_first = hot_first;
    let t0 = Instant::now();
    let vol = Volume::open(&cfg).context("opening a recovered volume")?;
    let ring = vol.host_ring(0).context("a host ring")?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut scratch = vec![0u8; BLOCK_BYTES];
    let mut reads_us = Vec::with_capacity(blocks.len());
    let mut local = 0usize;
    for &block in &blocks {
        local += usize::from(volume::is_local(&vol, block));
        let t = Instant::now();
        volume::io(&vol, &ring, UBLK_IO_OP_READ, block, &mut buf)?;
        reads_us.push(t.elapsed().as_secs_f64() * 1e6);
        if b.data.first_mismatch(block, &buf, &mut scratch).is_some() {
            bail!("{mode}: a read of block {block} differs from the source");
        }
    }
    let done_ms = t0.elapsed().as_secs_f64() * 1e3;
    let st = vol.status().hydration.unwrap_or_default();
    drop(ring);
    vol.shutdown();
    drop(vol);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(report::HotRun {
        mode: mode.into(),
        repeat,
        reads: blocks.len(),
        local_share: local as f64 / blocks.len() as f64,
        done_ms,
        median_us: stats::median(&reads_us),
        p99_us: stats::percentile(&reads_us, 99.0),
        fetched_on_demand: st.fetched_on_demand,
    })
}

fn copy_run(b: &Bench, source_backing: &Path, repeat: usize) -> anyhow::Result<Run> {
    let dir = b.run_dir(&format!("copy-{repeat}"))?;
    b.settle()?;
    let dst = dir.join("copy.img");
    let c = copy::copy(source_backing, &dst, b.size, EXTENT_BYTES)?;
    let n = compare_file(&dst, &b.data, b.size).context("checking the copy")?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    let wall_s = c.wall.as_secs_f64();
    Ok(Run {
        config: "copy".into(),
        repeat,
        bytes: c.bytes,
        wall_s,
        mb_s: c.bytes as f64 / 1e6 / wall_s,
        open_ms: None,
        server_cpu_s: None,
        verified_blocks: n,
    })
}

/// Compares the whole file `path` (`size` bytes) with the source data; returns the blocks
/// compared.
fn compare_file(path: &Path, data: &Data, size: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    ensure!(
        len == size,
        "{} is {len} bytes, {size} expected",
        path.display()
    );
    let mut buf = vec![0u8; VERIFY_CHUNK_BYTES];
    let mut scratch = vec![0u8; BLOCK_BYTES];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(VERIFY_CHUNK_BYTES as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .with_context(|| format!("read {} at {off}", path.display()))?;
        let first = off / BLOCK_BYTES as u64;
        if let Some(bad) = data.first_mismatch(first, &buf[..n], &mut scratch) {
            bail!("{}: block {bad} differs from the source", path.display());
        }
        off += n as u64;
    }
    Ok(size / BLOCK_BYTES as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
    }
}
