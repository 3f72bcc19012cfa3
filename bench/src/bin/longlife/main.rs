//! `deltavol-bench-longlife`: a volume's long life on the data plane (issue 13, item 5) —
//! thousands of small snapshots under a retention policy, then what the store keeps against
//! what it must keep, whether a commit costs the same late as early, and how long a restarted
//! server takes to serve the volume again.
//!
//! Per store (`--store local`, `s3` against moto, or `both`), in a fresh directory under one
//! temp directory in `--dir`:
//! 1. the real `deltavol-dataplane` binary ([`server`]) on 127.0.0.1:0, with any
//!    `--server-arg`s passed through; for s3, moto's server ([`moto`]) with one bucket;
//! 2. one volume, the retention policy set, then `--snapshots` snapshots: each begun with a
//!    simulated cut time (`--interval` apart, the last one at the last UTC midnight, so that
//!    hourly and daily buckets come into play, the same way in every run),
//!    `--writes-per-snapshot` random extents ([`model`]), committed; every
//!    commit timed from its begin until it is acknowledged; a progress line every ~5 %;
//! 3. the store left to settle (background work after retention: polled every second until
//!    unchanged for `--settle-secs`);
//! 4. measured: the bytes stored ([`stored`]: segments, manifests, the rest) against the bytes
//!    needed (the live data plus each retained snapshot's delta), commit latency around
//!    snapshot 100 against the last 20; checked: retained snapshots read back and compared
//!    with the model, byte for byte;
//! 5. the server stopped (SIGTERM) and started again on the same data dir or bucket, timed from
//!    spawn until a client has connected to the volume and listed its snapshots; the list must
//!    be the same and the oldest and newest retained snapshots read back the same.
//!
//! Any failure (a server that does not start, a refused commit, a mismatch) ends the bench with
//! a non-zero status, `--quick` too. The goals (stored segments ≤ 1.2× needed, late commits as
//! fast as early ones) are reported, not enforced.

#[path = "../common/machine.rs"]
mod machine;
mod model;
mod moto;
mod report;
#[path = "../common/results.rs"]
mod results;
#[path = "../common/server.rs"]
mod server;
mod server_spec;
#[path = "../common/stats.rs"]
mod stats;
mod stored;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use clap::{Parser, ValueEnum};
use deltavol::size::parse_size;
use deltavol_dataplane::retention::{self, Candidate, Policy};
use deltavol_dataplane::{BeginOutcome, Client, Timeouts};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use model::{Model, BLOCK_SIZE_BYTES};
use moto::Moto;
use report::{Latency, Load, Machine, Params, Progress, Report, Settle, StoreResult, Verify};
use server::ServerProcess;
use server_spec::ServerSpec;
use stored::{Stored, Where};

/// The bench volume's name.
const VOLUME: &str = "longlife";
/// The bucket in moto.
const BUCKET: &str = "deltavol-longlife";
/// The client's per-call timeout (a commit's fsyncs or uploads included).
const CLIENT_IO_TIMEOUT_S: u64 = 120;
/// The early latency window: snapshots 91 ..= 110.
const EARLY_FIRST: u64 = 91;
const EARLY_LAST: u64 = 110;
/// The late window: the last 20 snapshots.
const LATE_WINDOW: u64 = 20;
/// Fewest snapshots: the early window and a late one after it.
const SNAPSHOTS_MIN: u64 = EARLY_LAST + LATE_WINDOW;
/// Retained snapshots read back besides the oldest and the newest.
const VERIFY_RANDOM_SNAPSHOTS: usize = 8;
/// Progress lines over the run.
const PROGRESS_STEPS: u64 = 20;
const DAY_MS: u64 = 86_400_000;
/// Largest extent a write may have, blocks.
const EXTENT_BLOCKS_MAX: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    /// Files under the data dir.
    Local,
    /// moto's S3 server (moto_server on PATH, or DELTAVOL_MOTO_SERVER).
    S3,
    /// Local, then s3.
    Both,
}

/// A volume's long life on the data plane: bytes stored against bytes needed under
/// retention, commit latency early and late, load time.
#[derive(Debug, Parser)]
#[command(name = "deltavol-bench-longlife", version)]
struct Args {
    /// Store(s) to run against.
    #[arg(long, value_enum, default_value_t = StoreChoice::Local)]
    store: StoreChoice,
    /// Snapshots to ship (at least 130) [default: 10000, --quick: 300].
    #[arg(long)]
    snapshots: Option<u64>,
    /// Volume size (suffix K, M or G: KiB, MiB, GiB; a multiple of 4 KiB)
    /// [default: 256M, --quick: 64M].
    #[arg(long, value_parser = parse_size)]
    volume_size: Option<u64>,
    /// Random extents written per snapshot.
    #[arg(long, default_value_t = 32)]
    writes_per_snapshot: u32,
    /// Largest extent, blocks of 4 KiB (each extent is 1 ..= this many).
    #[arg(long, default_value_t = 4)]
    max_extent_blocks: u32,
    /// Simulated time between two snapshots' cuts (ms, s, m or h; bare: seconds).
    #[arg(long, default_value = "15s", value_parser = parse_duration_ms)]
    interval: u64,
    /// Retention policy set on the volume before the first snapshot.
    #[arg(long, default_value = "last=50,hourly=24,daily=7", value_parser = Policy::parse)]
    retention: Policy,
    /// After the last commit, the store must stay unchanged this long to count as settled.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Give up waiting for the store to settle after this long (measured anyway, flagged).
    #[arg(long, default_value_t = 120)]
    settle_timeout_secs: u64,
    /// Random blocks read back from each sampled retained snapshot.
    #[arg(long, default_value_t = 256)]
    verify_blocks: usize,
    /// Data-plane shard threads.
    #[arg(long, default_value_t = 2)]
    dp_threads: usize,
    /// An extra argument for the data-plane server, passed through as given (repeat it:
    /// `--server-arg=--retired-grace-secs --server-arg=10`).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// JSON results [default: bench/results/longlife-<date>.json; none with --quick].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory for the temp data (data-plane data dirs, logs): a real disk, not tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The `deltavol-dataplane` binary [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Seed of the writes, their data and the sampled read-backs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the temp directory (data dirs, server and moto logs) instead of removing it.
    #[arg(long)]
    keep_dir: bool,
    /// CI smoke test: 300 snapshots on a 64 MiB volume; still fails on any error.
    #[arg(long)]
    quick: bool,
    /// Do not let the store settle before each latency window. By default the bench waits,
    /// before snapshot 91 and before the last 20, until the store is unchanged for
    /// `--settle-secs`: the bench commits hundreds of times faster than a real 15 s interval,
    /// so background compaction runs behind during the burst, and a window measured then
    /// says how far behind, not what a commit costs with that much history.
    #[arg(long)]
    no_quiesce: bool,
}

/// `15s`, `500ms`, `2m`, `1h`; a bare number is seconds. Returns milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 15s, 500ms, 2m"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h)")),
    };
    n.checked_mul(mult)
        .filter(|&ms| ms > 0)
        .ok_or_else(|| format!("{s:?}: must be more than zero and less than 584 million years"))
}

/// The value given to server flag `flag` in `args` (`--flag V` or `--flag=V`), if any.
fn server_arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().rev().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag).and_then(|r| r.strip_prefix('='))
        }
    })
}

/// Everything a store's run needs.
struct Config {
    params: Params,
    policy: Policy,
    server_bin: PathBuf,
    /// Simulated cut time of snapshot 0 (ms since the epoch); snapshot `s` is cut at
    /// `clock_start_ms + s * interval_ms`.
    clock_start_ms: u64,
}

impl Config {
    fn cut_ms(&self, snap: u64) -> u64 {
        self.clock_start_ms + snap * self.params.interval_ms
    }

    fn volume_blocks(&self) -> u64 {
        self.params.volume_size_bytes / u64::from(BLOCK_SIZE_BYTES)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run(args)
}

fn run(args: Args) -> anyhow::Result<()> {
    let snapshots = args
        .snapshots
        .unwrap_or(if args.quick { 300 } else { 10_000 });
    let volume_size = args
        .volume_size
        .unwrap_or(if args.quick { 64 << 20 } else { 256 << 20 });
    ensure!(
        (SNAPSHOTS_MIN..=u64::from(u32::MAX)).contains(&snapshots),
        "--snapshots must be at least {SNAPSHOTS_MIN} (the latency windows are snapshots \
         {EARLY_FIRST}-{EARLY_LAST} and the last {LATE_WINDOW})"
    );
    ensure!(
        (1..=EXTENT_BLOCKS_MAX).contains(&args.max_extent_blocks),
        "--max-extent-blocks must be between 1 and {EXTENT_BLOCKS_MAX}"
    );
    ensure!(
        volume_size % u64::from(BLOCK_SIZE_BYTES) == 0
            && volume_size >= u64::from(args.max_extent_blocks) * u64::from(BLOCK_SIZE_BYTES),
        "--volume-size must be a multiple of {BLOCK_SIZE_BYTES} and hold one extent of \
         --max-extent-blocks"
    );
    ensure!(
        args.writes_per_snapshot >= 1,
        "--writes-per-snapshot must be at least 1"
    );
    ensure!(
        args.verify_blocks >= 1,
        "--verify-blocks must be at least 1"
    );
    ensure!(args.dp_threads >= 1, "--dp-threads must be at least 1");
    ensure!(args.settle_secs >= 1, "--settle-secs must be at least 1");
    // The simulated clock ends at the last UTC midnight, so that the hour and day buckets of
    // the retention policy fall the same way in every run (the same seed keeps the same
    // snapshots, whatever the time of day).
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let now_ms = now_ms - now_ms % DAY_MS;
    let span_ms = snapshots
        .checked_mul(args.interval)
        .filter(|&ms| ms < now_ms)
        .context("--snapshots x --interval reaches back before 1970")?;

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
    let stores: Vec<&str> = match args.store {
        StoreChoice::Local => vec!["local"],
        StoreChoice::S3 => vec!["s3"],
        StoreChoice::Both => vec!["local", "s3"],
    };
    if stores.contains(&"s3") && moto::moto_bin().is_none() {
        bail!(
            "--store s3 needs moto's S3 server: moto_server (PyPI moto[s3,server]) is not on \
             PATH, in ~/.cache/deltavol/venv/bin or ~/.local/bin: run scripts/install-deps, \
             or set DELTAVOL_MOTO_SERVER"
        );
    }

    if stores.contains(&"s3") {
        match server_arg_value(&args.server_args, "--retired-grace-secs")
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(g) if g < args.settle_secs => {}
            given => eprintln!(
                "note: on s3 the data plane deletes segment objects that compaction replaced \
                 only after its --retired-grace-secs ({}); the store settles when unchanged for \
                 --settle-secs {}: to measure after those deletions pass a shorter grace, e.g. \
                 --server-arg=--retired-grace-secs --server-arg=2",
                given.map_or("the server's default".to_string(), |g| format!("{g} s")),
                args.settle_secs
            ),
        }
    }
    let base = tempfile::Builder::new()
        .prefix("deltavol-bench-longlife-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a temp directory in {}", args.dir.display()))?;
    let machine = Machine::probe(base.path());
    if machine.dir_is_tmpfs {
        eprintln!(
            "warning: {} is tmpfs: fsync costs nothing there, so the latencies say little; pass --dir on a disk",
            args.dir.display()
        );
    }
    let cfg = Config {
        params: Params {
            snapshots,
            volume_size_bytes: volume_size,
            block_size: BLOCK_SIZE_BYTES,
            writes_per_snapshot: args.writes_per_snapshot,
            max_extent_blocks: args.max_extent_blocks,
            interval_ms: args.interval,
            retention: args.retention.to_string(),
            seed: args.seed,
            settle_secs: args.settle_secs,
            settle_timeout_secs: args.settle_timeout_secs,
            verify_blocks: args.verify_blocks,
            dp_threads: args.dp_threads,
            server_args: args.server_args.clone(),
            stores: stores.iter().map(|s| s.to_string()).collect(),
            quiesce_before_windows: !args.no_quiesce,
        },
        policy: args.retention,
        server_bin,
        clock_start_ms: now_ms - span_ms,
    };
    eprintln!(
        "longlife: {snapshots} snapshots of {} writes of 1-{} blocks on a {:.0} MiB volume, \
         retention {}, cuts every {} ms of simulated time from {} to {}; stores {}; temp dir {}",
        args.writes_per_snapshot,
        args.max_extent_blocks,
        volume_size as f64 / f64::from(1 << 20),
        cfg.params.retention,
        args.interval,
        machine::utc_timestamp(cfg.clock_start_ms / 1000),
        machine::utc_timestamp(now_ms / 1000),
        stores.join(", "),
        base.path().display()
    );

    let mut results = Vec::with_capacity(stores.len());
    for store in &stores {
        let dir = base.path().join(store);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let r = run_store(&cfg, store, &dir).with_context(|| format!("store {store}"));
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                if args.keep_dir {
                    let kept = base.keep();
                    eprintln!("kept {}", kept.display());
                }
                return Err(e);
            }
        };
        results.push(r);
        if !args.keep_dir {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }
    if args.keep_dir {
        let kept = base.keep();
        eprintln!("kept {}", kept.display());
    }

    let report = Report {
        bench: "longlife",
        command: std::env::args().collect(),
        machine,
        params: cfg.params.clone(),
        quick: args.quick,
        stores: results,
    };
    print!("{}", report::table(&report));
    results::write(
        &report,
        report.bench,
        report.machine.date(),
        args.out.as_deref(),
        args.quick.then_some("--quick"),
    )?;
    Ok(())
}

/// A fresh random token in `dir/token`; returns it.
fn write_token(dir: &Path) -> anyhow::Result<(Vec<u8>, PathBuf)> {
    let mut token = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut token);
    let token: Vec<u8> = token
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    let path = dir.join("token");
    File::create(&path)
        .and_then(|mut f| f.write_all(&token))
        .with_context(|| format!("write {}", path.display()))?;
    Ok((token, path))
}

fn connect(server: &ServerProcess, token: &[u8]) -> anyhow::Result<Client> {
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(CLIENT_IO_TIMEOUT_S),
    };
    Client::connect(server.addr(), token, VOLUME, timeouts)
        .with_context(|| server.failure(&format!("connecting to volume {VOLUME}")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// One store's whole run: ship, settle, measure, check, restart.
fn run_store(cfg: &Config, store: &str, dir: &Path) -> anyhow::Result<StoreResult> {
    let (token, token_file) = write_token(dir)?;
    let data_dir = dir.join("data");
    let mut moto: Option<Moto> = None;
    let (store_args, place) = if store == "s3" {
        let bin = moto::moto_bin().context("moto_server not found")?;
        let m = Moto::start(&bin, dir)?;
        m.create_bucket(BUCKET)?;
        let describe = format!(
            "moto at {} bucket {BUCKET} prefix {}",
            m.endpoint,
            moto::S3_PREFIX
        );
        eprintln!("{store}: {describe} ({})", bin.display());
        let place = Where::object(m.objects(BUCKET)?, describe, VOLUME);
        let args = m.store_args(BUCKET);
        moto = Some(m);
        (args, place)
    } else {
        (Vec::new(), Where::local(&data_dir, VOLUME))
    };
    let spec = ServerSpec {
        bin: cfg.server_bin.clone(),
        data_dir: data_dir.clone(),
        threads: cfg.params.dp_threads,
        token_file,
        store_args,
        extra_args: cfg.params.server_args.clone(),
    };
    let mut server = spec.start(&dir.join("server.log"))?;
    eprintln!(
        "{store}: data plane pid {} on {}: {}",
        server.pid(),
        server.addr(),
        spec.command_line().join(" ")
    );

    let mut client = connect(&server, &token)?;
    client
        .create_volume(cfg.params.volume_size_bytes, BLOCK_SIZE_BYTES)
        .with_context(|| format!("creating volume {VOLUME}"))?;
    let info = client
        .set_retention(&cfg.policy)
        .context("setting the retention policy")?;
    ensure!(
        info.retention == cfg.policy,
        "the data plane took retention {} for {}",
        info.retention,
        cfg.policy
    );

    let mut model = Model::new(cfg.params.seed, cfg.volume_blocks());
    let shipped = ship(cfg, store, &mut client, &mut model, &place)
        .map_err(|e| e.context(server.failure("shipping failed")))?;
    drop(client);
    server.check_alive()?;
    if let Some(m) = moto.as_mut() {
        m.check_alive()?;
    }

    let settle = settle(cfg, store, &place, &mut server)?;
    let stored = place.measure()?;

    let mut client = connect(&server, &token)?;
    let listed = client
        .list_snapshots()
        .with_context(|| server.failure("listing the snapshots"))?;
    let retained: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    let n = cfg.params.snapshots;
    ensure!(
        retained.last() == Some(&n) && retained.iter().all(|&id| (1..=n).contains(&id)),
        "the data plane lists snapshots {retained:?}: ids in 1..={n} ending with {n} expected"
    );
    for s in &listed {
        ensure!(
            s.cut_time_ms == cfg.cut_ms(s.snap_id),
            "snapshot {} lists cut time {} ms, {} was sent",
            s.snap_id,
            s.cut_time_ms,
            cfg.cut_ms(s.snap_id)
        );
    }
    let chain: Vec<Candidate> = (1..=n)
        .map(|s| Candidate {
            snap_id: s,
            time_ms: cfg.cut_ms(s),
            pinned: false,
            protected: None,
        })
        .collect();
    let expected: Vec<u64> = retention::select(&cfg.policy, &chain)
        .into_iter()
        .filter(|d| d.keep())
        .map(|d| d.snap_id)
        .collect();
    if expected != retained {
        eprintln!(
            "{store}: warning: {} snapshots retained, the policy keeps {} of the chain \
             (retained {retained:?}, policy {expected:?})",
            retained.len(),
            expected.len()
        );
    }

    let needed_blocks = model.needed_blocks(&retained);
    let bs = u64::from(BLOCK_SIZE_BYTES);
    let needed_bytes = needed_blocks.iter().sum::<u64>() * bs;
    let live_bytes = model.needed_blocks(&[n])[0] * bs;

    let mut rng = StdRng::seed_from_u64(cfg.params.seed ^ 0x7665_7269_6679);
    let mut picks: Vec<usize> = vec![0];
    if retained.len() > 2 {
        let others = rand::seq::index::sample(
            &mut rng,
            retained.len() - 2,
            VERIFY_RANDOM_SNAPSHOTS.min(retained.len() - 2),
        );
        let mut others: Vec<usize> = others.into_iter().map(|i| i + 1).collect();
        others.sort_unstable();
        picks.extend(others);
    }
    if retained.len() > 1 {
        picks.push(retained.len() - 1);
    }
    let t = Instant::now();
    let mut verify = Verify {
        snapshots: picks.iter().map(|&i| retained[i]).collect(),
        blocks_read: 0,
        delta_blocks_read: 0,
        blocks_read_after_restart: 0,
        mismatches: 0,
    };
    let mut mismatches = Vec::new();
    for &i in &picks {
        let prev = if i == 0 { 0 } else { retained[i - 1] };
        let (read, delta) = verify_snapshot(
            &mut client,
            &model,
            retained[i],
            prev,
            cfg.params.verify_blocks,
            &mut rng,
            &mut mismatches,
        )
        .with_context(|| server.failure(&format!("reading snapshot {}", retained[i])))?;
        verify.blocks_read += read;
        verify.delta_blocks_read += delta;
    }
    eprintln!(
        "{store}: read back {} blocks of {} retained snapshots ({} of them from the snapshots' \
         own deltas) in {:.1} s: {} mismatches",
        verify.blocks_read,
        picks.len(),
        verify.delta_blocks_read,
        t.elapsed().as_secs_f64(),
        mismatches.len()
    );
    fail_on_mismatches(store, &mismatches)?;
    drop(client);

    // Restart on the same data dir / bucket, timed until the volume is served.
    let (status, stop) = server.stop()?;
    let t0 = Instant::now();
    let server = spec.start(&dir.join("server-restart.log"))?;
    let listening = t0.elapsed();
    let mut client = connect(&server, &token)?;
    let relisted = client
        .list_snapshots()
        .with_context(|| server.failure("listing the snapshots after the restart"))?;
    let ready = t0.elapsed();
    let load = Load {
        stop_s: stop.as_secs_f64(),
        listening_s: listening.as_secs_f64(),
        ready_s: ready.as_secs_f64(),
    };
    eprintln!(
        "{store}: stopped in {:.3} s ({status}); restarted: listening after {:.3} s, volume \
         connected and {} snapshots listed after {:.3} s",
        load.stop_s,
        load.listening_s,
        relisted.len(),
        load.ready_s
    );
    let ids: Vec<u64> = relisted.iter().map(|s| s.snap_id).collect();
    ensure!(
        ids == retained,
        "after the restart the data plane lists {ids:?}, {retained:?} before"
    );
    let again = cfg.params.verify_blocks.div_ceil(4).max(16);
    let ends: Vec<usize> = if retained.len() > 1 {
        vec![0, retained.len() - 1]
    } else {
        vec![0]
    };
    for i in ends {
        let prev = if i == 0 { 0 } else { retained[i - 1] };
        let (read, _) = verify_snapshot(
            &mut client,
            &model,
            retained[i],
            prev,
            again,
            &mut rng,
            &mut mismatches,
        )
        .with_context(|| {
            server.failure(&format!(
                "reading snapshot {} after the restart",
                retained[i]
            ))
        })?;
        verify.blocks_read_after_restart += read;
    }
    fail_on_mismatches(store, &mismatches)?;
    drop(client);
    let stored_after_restart = place.measure()?;
    server.stop()?;
    if let Some(m) = moto.as_mut() {
        m.check_alive()?;
    }
    drop(moto);

    let commit_ms = shipped.commit_ms;
    let late_first = n - LATE_WINDOW + 1;
    let early = report::window(&commit_ms, EARLY_FIRST, EARLY_LAST);
    let late = report::window(&commit_ms, late_first, n);
    let latency = Latency {
        early,
        late,
        ratio_median: late.median_ms / early.median_ms,
        ratio_p99: late.p99_ms / early.p99_ms,
        all_median_ms: stats::median(&commit_ms),
        all_p99_ms: stats::percentile(&commit_ms, 99.0),
        all_max_ms: commit_ms.iter().copied().fold(0.0, f64::max),
    };
    Ok(StoreResult {
        store: store.to_string(),
        server_command: spec.command_line(),
        snapshots: n,
        shipped_bytes: shipped.bytes,
        ship_wall_s: shipped.wall.as_secs_f64(),
        commits_per_s: n as f64 / shipped.wall.as_secs_f64(),
        settle,
        stored,
        stored_total_bytes: stored.total_bytes(),
        stored_after_restart,
        needed_bytes,
        live_bytes,
        ratio_segments: stored.segment_bytes as f64 / needed_bytes as f64,
        ratio_total: stored.total_bytes() as f64 / needed_bytes as f64,
        retained_count: retained.len() as u64,
        retained_expected_count: expected.len() as u64,
        retained_matches_policy: expected == retained,
        retained,
        needed_blocks_per_retained: needed_blocks,
        latency,
        load,
        verify: Verify {
            mismatches: mismatches.len() as u64,
            ..verify
        },
        progress: shipped.progress,
        quiesce_waits_s: shipped.quiesce_waits,
        commit_ms,
    })
}

/// What shipping the snapshots took.
struct Shipped {
    commit_ms: Vec<f64>,
    bytes: u64,
    wall: Duration,
    progress: Vec<Progress>,
    /// Seconds the store took to settle before each latency window.
    quiesce_waits: Vec<f64>,
}

/// Ships every snapshot, recording each in `model` once committed.
fn ship(
    cfg: &Config,
    store: &str,
    client: &mut Client,
    model: &mut Model,
    place: &Where,
) -> anyhow::Result<Shipped> {
    let p = &cfg.params;
    let n = p.snapshots;
    let step = (n / PROGRESS_STEPS).max(1);
    let mut rng = StdRng::seed_from_u64(p.seed);
    let mut commit_ms = Vec::with_capacity(n as usize);
    let mut progress = Vec::with_capacity(PROGRESS_STEPS as usize + 1);
    let mut payload = Vec::new();
    let mut run = Vec::new();
    let mut shipped = 0u64;
    // Time spent on the snapshots themselves (generating the data included, the progress
    // measurements not).
    let mut wall = Duration::ZERO;
    let mut step_busy = Duration::ZERO;
    let start = Instant::now();
    let mut step_first = 1u64;
    let mut quiesce_waits = Vec::new();
    for s in 1..=n {
        if p.quiesce_before_windows && (s == EARLY_FIRST || s == n - LATE_WINDOW + 1) {
            quiesce_waits.push(quiesce(cfg, store, place, s)?);
        }
        let t_snapshot = Instant::now();
        let runs = model::snapshot_runs(
            &mut rng,
            cfg.volume_blocks(),
            p.writes_per_snapshot,
            p.max_extent_blocks,
        );
        // The data first, so the clock covers only the data plane.
        payload.clear();
        for &(lba, nb) in &runs {
            model::run_data(p.seed, s, lba, nb, &mut run);
            payload.extend_from_slice(&run);
        }
        let t = Instant::now();
        match client
            .begin_snapshot_cut_at(s, s - 1, p.volume_size_bytes, cfg.cut_ms(s))
            .with_context(|| format!("begin snapshot {s}"))?
        {
            BeginOutcome::Started => {}
            BeginOutcome::AlreadyCommitted(_) => {
                bail!("snapshot {s} is already committed on a fresh store")
            }
        }
        let mut off = 0usize;
        for &(lba, nb) in &runs {
            let len = nb as usize * BLOCK_SIZE_BYTES as usize;
            client
                .put_extent(lba, nb, &payload[off..off + len])
                .with_context(|| format!("put {nb} blocks at {lba} in snapshot {s}"))?;
            off += len;
        }
        let info = client
            .commit()
            .with_context(|| format!("commit snapshot {s}"))?;
        commit_ms.push(ms(t.elapsed()));
        wall += t_snapshot.elapsed();
        step_busy += t_snapshot.elapsed();
        ensure!(
            info.bytes == payload.len() as u64 && info.parent_id == s - 1,
            "snapshot {s} committed as {info:?}, {} bytes on parent {} expected",
            payload.len(),
            s - 1
        );
        for &(lba, nb) in &runs {
            model.record(s, lba, nb);
        }
        shipped += payload.len() as u64;

        if s % step == 0 || s == n {
            let span = step_busy.as_secs_f64();
            let recent = &commit_ms[(step_first - 1) as usize..];
            let stored = place.measure()?.total_bytes();
            let count = client
                .volume_info()
                .context("asking for the volume's state")?
                .snapshot_count;
            let point = Progress {
                snapshots: s,
                elapsed_s: start.elapsed().as_secs_f64(),
                commits_per_s: recent.len() as f64 / span,
                median_commit_ms: stats::median(recent),
                stored_bytes: stored,
                snapshot_count: count,
            };
            eprintln!(
                "{store}: [{s:>6}/{n} {:>3}%] {:.1} commits/s, commit median {:.1} ms, stored {}, \
                 {count} snapshots kept, shipped {}",
                s * 100 / n,
                point.commits_per_s,
                point.median_commit_ms,
                mib(stored),
                mib(shipped)
            );
            progress.push(point);
            step_busy = Duration::ZERO;
            step_first = s + 1;
        }
    }
    Ok(Shipped {
        commit_ms,
        bytes: shipped,
        wall,
        progress,
        quiesce_waits,
    })
}

/// Waits until the store is unchanged for `--settle-secs` (at most `--settle-timeout-secs`)
/// before snapshot `next`; returns the seconds waited.
fn quiesce(cfg: &Config, store: &str, place: &Where, next: u64) -> anyhow::Result<f64> {
    let quiet = Duration::from_secs(cfg.params.settle_secs);
    let timeout = Duration::from_secs(cfg.params.settle_timeout_secs);
    let start = Instant::now();
    let mut last = place.measure()?;
    let mut since = Instant::now();
    while since.elapsed() < quiet && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(500));
        let now = place.measure()?;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    let waited = start.elapsed().as_secs_f64();
    eprintln!(
        "{store}: before snapshot {next}: the store settled in {waited:.1} s ({} segments, {})",
        last.segment_count,
        mib(last.total_bytes())
    );
    Ok(waited)
}

/// Polls the store every second until it stays unchanged for `settle_secs` (or the timeout).
fn settle(
    cfg: &Config,
    store: &str,
    place: &Where,
    server: &mut ServerProcess,
) -> anyhow::Result<Settle> {
    let quiet = Duration::from_secs(cfg.params.settle_secs);
    let timeout = Duration::from_secs(cfg.params.settle_timeout_secs);
    let start = Instant::now();
    let mut last = place.measure()?;
    let at_commit = last.total_bytes();
    let mut since = Instant::now();
    let mut last_change = Duration::ZERO;
    eprintln!(
        "{store}: settling: stored {} ({} segments, {} manifests, {} other)",
        mib(at_commit),
        last.segment_count,
        last.manifest_count,
        last.other_count
    );
    let settled = loop {
        std::thread::sleep(Duration::from_secs(1));
        server.check_alive()?;
        let now: Stored = place.measure()?;
        if now != last {
            eprintln!(
                "{store}: settling, {:.0} s: stored {} ({} segments, {} manifests, {} other)",
                start.elapsed().as_secs_f64(),
                mib(now.total_bytes()),
                now.segment_count,
                now.manifest_count,
                now.other_count
            );
            last = now;
            since = Instant::now();
            last_change = start.elapsed();
        } else if since.elapsed() >= quiet {
            break true;
        }
        if start.elapsed() >= timeout {
            eprintln!(
                "{store}: warning: the store still changed {} s after the last commit; measuring it as it is",
                cfg.params.settle_timeout_secs
            );
            break false;
        }
    };
    eprintln!(
        "{store}: {}: last change {:.0} s after the last commit, stored {}",
        if settled { "settled" } else { "not settled" },
        last_change.as_secs_f64(),
        mib(last.total_bytes())
    );
    Ok(Settle {
        settled,
        last_change_s: last_change.as_secs_f64(),
        waited_s: start.elapsed().as_secs_f64(),
        stored_bytes_at_last_commit: at_commit,
    })
}

/// Reads `blocks` blocks of snapshot `snap` (half of them, when it has that many, from its
/// own delta: blocks written after `prev`, the retained snapshot before it) and compares each
/// with the model; returns (blocks read, of them from the delta). Mismatches are appended.
fn verify_snapshot(
    client: &mut Client,
    model: &Model,
    snap: u64,
    prev: u64,
    blocks: usize,
    rng: &mut StdRng,
    mismatches: &mut Vec<String>,
) -> anyhow::Result<(u64, u64)> {
    let delta = model.delta_blocks(prev, snap);
    let from_delta = (blocks / 2).min(delta.len());
    let mut lbas: Vec<u64> = rand::seq::index::sample(rng, delta.len(), from_delta)
        .into_iter()
        .map(|i| delta[i])
        .collect();
    while lbas.len() < blocks {
        lbas.push(rng.gen_range(0..model.blocks()));
    }
    let bs = BLOCK_SIZE_BYTES as usize;
    let mut got = vec![0u8; bs];
    let mut want = vec![0u8; bs];
    for &lba in &lbas {
        client
            .read_extents(snap, lba, 1, &mut got)
            .with_context(|| format!("reading block {lba} as of snapshot {snap}"))?;
        model.expected(lba, snap, &mut want);
        if got != want {
            mismatches.push(format!(
                "snapshot {snap}, block {lba}: read {}, expected {}",
                model::describe_block(&got),
                match model.writer_as_of(lba, snap) {
                    Some(w) => format!("the data of snapshot {w}"),
                    None => "zeros".into(),
                }
            ));
        }
    }
    Ok((lbas.len() as u64, from_delta as u64))
}

fn fail_on_mismatches(store: &str, mismatches: &[String]) -> anyhow::Result<()> {
    if mismatches.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = mismatches.iter().take(10).map(String::as_str).collect();
    bail!(
        "{store}: {} blocks read back different from what was written:\n  {}{}",
        mismatches.len(),
        shown.join("\n  "),
        if mismatches.len() > shown.len() {
            "\n  ..."
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("15s"), Ok(15_000));
        assert_eq!(parse_duration_ms("15"), Ok(15_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("3d").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        let a = Args::try_parse_from([
            "deltavol-bench-longlife",
            "--store",
            "both",
            "--retention",
            "last=5,daily=2",
            "--server-arg",
            "--compact-live-ratio",
            "--server-arg=0.5",
        ])
        .expect("parses");
        assert_eq!(a.store, StoreChoice::Both);
        assert_eq!(a.retention.last, 5);
        assert_eq!(a.retention.daily, 2);
        assert_eq!(a.server_args, ["--compact-live-ratio", "0.5"]);
        assert_eq!(a.interval, 15_000);
        let d = Args::try_parse_from(["deltavol-bench-longlife"]).expect("parses");
        assert_eq!(d.retention.to_string(), "last=50,hourly=24,daily=7");
        assert!(Args::try_parse_from(["x", "--retention", "yearly=1"]).is_err());
        let v = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            server_arg_value(&a, "--retired-grace-secs").map(str::to_string)
        };
        assert_eq!(v(&["--retired-grace-secs", "3"]).as_deref(), Some("3"));
        assert_eq!(v(&["--x", "--retired-grace-secs=4"]).as_deref(), Some("4"));
        assert_eq!(v(&["--retired-grace-secs"]), None);
        assert_eq!(v(&["--retired-grace-secsx=1"]), None);
    }
}
