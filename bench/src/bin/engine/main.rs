//! `deltavol-bench-engine`: the engine's write and read paths, driven as the ublk queues drive
//! them, against a plain io_uring loop on the same files at the same depth; and the resident
//! memory of a big sparse volume against its budget. See `bench/README.md`.

mod data;
#[path = "../common/machine.rs"]
mod machine;
mod memory;
#[path = "../common/results.rs"]
mod results;
mod ring;
mod workload;

use anyhow::{bail, Context};
use clap::Parser;
use machine::Machine;
use memory::{mib, MemoryReport};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use workload::{Case, Limit, RunResult, Side};

/// What the baseline does, recorded in the output.
const BASELINE: &str = "raw: one thread per queue, a plain io_uring loop (no executor, no \
engine) keeping `iodepth` Read/Write SQEs in flight on the same open file the engine uses \
(the active SSD mirror; the backing file for the miss cases), registered as a fixed file, \
buffered I/O (the engine opens its mirrors and backing file O_RDWR|O_CLOEXEC, no O_DIRECT), \
all SQEs of a round submitted in one io_uring_enter";

#[derive(Parser, Debug)]
#[command(
    name = "deltavol-bench-engine",
    about = "The engine's I/O paths against raw io_uring on the same files, and a volume's memory"
)]
struct Args {
    /// CI smoke: a small volume, short runs, 1 repeat, every block read checked whole, a small
    /// memory phase; no JSON unless --out.
    #[arg(long)]
    quick: bool,
    /// Directory for the volume (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Bench volume size (half is written into the mirror, half only into the backing file).
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "512MiB")]
    size: u64,
    /// The bench volume's read cache (small: the miss cases should miss).
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "1MiB")]
    read_cache: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    runtime: f64,
    /// Runs per (case, side), interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Only these cases (comma-separated names, see --list).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Only this side (engine or raw).
    #[arg(long)]
    side: Option<String>,
    /// Stop each run after this many requests (for callgrind: a fixed op count).
    #[arg(long)]
    ops: Option<u64>,
    /// Print the case names and exit.
    #[arg(long)]
    list: bool,
    /// Skip the memory measurement.
    #[arg(long)]
    no_memory: bool,
    /// Only the memory measurement.
    #[arg(long)]
    memory_only: bool,
    /// Memory measurement: the sparse volume's size.
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "64GiB")]
    memory_size: u64,
    /// Memory measurement: the configured read cache.
    #[arg(long, value_parser = deltavol::size::parse_size, default_value = "64MiB")]
    memory_read_cache: u64,
    /// Internal: run the memory measurement in this process and print its JSON.
    #[arg(long, hide = true)]
    memory_child: bool,
    /// Test of the bench itself: flip a byte of a block in the mirror file and one in the
    /// backing file behind the engine's back after the fill; the run must then fail.
    #[arg(long, hide = true)]
    sabotage: bool,
    /// Results file (default bench/results/engine-<date>.json; --quick: none).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Summary {
    case: String,
    engine_iops_median: Option<f64>,
    raw_iops_median: Option<f64>,
    engine_mb_s_median: Option<f64>,
    raw_mb_s_median: Option<f64>,
    /// engine / raw, medians.
    ratio: Option<f64>,
    engine_cpu_us_per_op_median: Option<f64>,
    raw_cpu_us_per_op_median: Option<f64>,
    /// engine / raw CPU per request, medians: steadier than IOPS on a shared machine.
    cpu_ratio: Option<f64>,
    /// Largest (max − min) / median of the two sides.
    spread: f64,
}

#[derive(Debug, Serialize)]
struct Params {
    volume_bytes: u64,
    read_cache_bytes: u64,
    runtime_s: f64,
    repeats: usize,
    ops_max: Option<u64>,
    verify_full_blocks: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    command: Vec<String>,
    git_rev: String,
    machine: Machine,
    quick: bool,
    baseline: &'static str,
    params: Params,
    cases: Vec<Case>,
    summaries: Vec<Summary>,
    runs: Vec<RunResult>,
    verified_blocks: u64,
    memory: Option<MemoryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_error: Option<String>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("deltavol-bench-engine: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.size = args.size.min(64 << 20);
        args.runtime = args.runtime.min(0.15);
        args.repeats = 1;
        args.memory_size = args.memory_size.min(4 << 30);
        args.memory_read_cache = args.memory_read_cache.min(8 << 20);
    }
    if args.memory_child {
        let base = tempfile::Builder::new()
            .prefix("deltavol-bench-memory-")
            .tempdir_in(&args.dir)
            .with_context(|| format!("a temp dir in {}", args.dir.display()))?;
        let r = memory::measure(base.path(), args.memory_size, args.memory_read_cache)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mut cases = workload::all_cases();
    if args.list {
        for c in &cases {
            println!("{}", c.name);
        }
        return Ok(());
    }
    if !args.cases.is_empty() {
        for n in &args.cases {
            if !cases.iter().any(|c| &c.name == n) {
                bail!("unknown case {n:?} (see --list)");
            }
        }
        cases.retain(|c| args.cases.contains(&c.name));
    }
    let sides: Vec<Side> = match args.side.as_deref() {
        None => vec![Side::Engine, Side::Raw],
        Some("engine") => vec![Side::Engine],
        Some("raw") => vec![Side::Raw],
        Some(s) => bail!("--side {s:?}: use engine or raw"),
    };
    if args.repeats == 0 || !args.runtime.is_finite() || args.runtime <= 0.0 {
        bail!("--repeats and --runtime must be positive");
    }
    let machine = Machine::probe(&args.dir);
    if machine.dir_is_tmpfs {
        eprintln!(
            "warning: {} is tmpfs: the mirror and backing files live in memory, not on a disk",
            args.dir.display()
        );
    }
    let fixed_ops = args.ops.is_some();
    let limit = Limit {
        runtime: if fixed_ops {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs_f64(args.runtime)
        },
        ops_max: args.ops.unwrap_or(u64::MAX),
    };

    let mut runs = Vec::new();
    let mut verified = 0;
    if !args.memory_only {
        let base = tempfile::Builder::new()
            .prefix("deltavol-bench-engine-")
            .tempdir_in(&args.dir)
            .with_context(|| format!("a temp dir in {}", args.dir.display()))?;
        let nq = cases.iter().map(|c| c.queues).max().unwrap_or(1);
        eprintln!(
            "engine: {:.0} MiB volume in {} (fs magic {}), read cache {:.1} MiB, {} cases × {} sides × {} repeats, {}",
            mib(args.size),
            base.path().display(),
            machine.dir_fs_magic,
            mib(args.read_cache),
            cases.len(),
            sides.len(),
            args.repeats,
            match args.ops {
                Some(n) => format!("{n} requests a run"),
                None => format!("{:.2} s a run", args.runtime),
            }
        );
        eprintln!("baseline: {BASELINE}");
        let bench = workload::setup(base.path(), args.size, args.read_cache, nq, args.quick)
            .context("setting up the volume")?;
        if args.sabotage {
            let (m, k) = bench.sabotage().context("sabotage")?;
            eprintln!(
                "sabotage: flipped a byte of block {m} in the mirror file and of block {k} in the backing file"
            );
        }
        for repeat in 0..args.repeats {
            for case in &cases {
                // Alternate which side goes first, so neither always runs on a warmer cache.
                let mut order = sides.clone();
                if repeat % 2 == 1 {
                    order.reverse();
                }
                for side in order {
                    let r = bench.run(case, side, repeat, limit)?;
                    eprintln!(
                        "[{}/{}] {:<26} {:<6} {:>10.0} IOPS {:>8.1} MB/s  {:>6.2} µs CPU/op  {} ops in {:.2} s{}",
                        repeat + 1,
                        args.repeats,
                        case.name,
                        side.name(),
                        r.iops,
                        r.mb_s,
                        r.cpu_us_per_op,
                        r.ops,
                        r.wall_s,
                        match (r.rcache_hits, r.rcache_misses) {
                            (Some(h), Some(m)) if h + m > 0 =>
                                format!("  (read cache: {h} hits, {m} misses)"),
                            _ => String::new(),
                        }
                    );
                    runs.push(r);
                }
            }
        }
        verified = bench.verify_all().context("final read-back")?;
        eprintln!("verified: all {verified} blocks read back through the engine byte-exact");
        bench.vol.shutdown();
    }

    // A failed memory measurement still leaves the throughput results written.
    let (memory, memory_error) = if args.no_memory || fixed_ops {
        (None, None)
    } else {
        match memory_in_child(&args) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    };

    let summaries = summarise(&cases, &runs);
    let report = Report {
        bench: "engine",
        command: std::env::args().collect(),
        git_rev: git_rev(),
        machine,
        quick: args.quick,
        baseline: BASELINE,
        params: Params {
            volume_bytes: args.size,
            read_cache_bytes: args.read_cache,
            runtime_s: args.runtime,
            repeats: args.repeats,
            ops_max: args.ops,
            verify_full_blocks: args.quick,
        },
        cases,
        summaries,
        runs,
        verified_blocks: verified,
        memory,
        memory_error,
    };
    print!("{}", table(&report));
    results::write(
        &report,
        report.bench,
        report.machine.date(),
        args.out.as_deref(),
        (args.quick || fixed_ops).then_some("--quick or --ops"),
    )?;
    if let Some(e) = report.memory_error {
        bail!("{e}");
    }
    Ok(())
}

/// Runs the memory measurement in a child process (this binary, `--memory-child`).
fn memory_in_child(args: &Args) -> anyhow::Result<MemoryReport> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    eprintln!(
        "memory: a {:.0} GiB sparse volume with a {:.0} MiB read cache, in a child process",
        args.memory_size as f64 / f64::from(1 << 30),
        mib(args.memory_read_cache)
    );
    let out = std::process::Command::new(exe)
        .arg("--memory-child")
        .arg("--dir")
        .arg(&args.dir)
        .arg("--memory-size")
        .arg(args.memory_size.to_string())
        .arg("--memory-read-cache")
        .arg(args.memory_read_cache.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("start the memory child")?;
    if !out.status.success() {
        bail!("the memory measurement failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("no output from the memory child")?;
    serde_json::from_str(line).with_context(|| format!("parse the memory child's {line:?}"))
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn summarise(cases: &[Case], runs: &[RunResult]) -> Vec<Summary> {
    cases
        .iter()
        .filter_map(|c| {
            let pick = |side: Side, f: fn(&RunResult) -> f64| -> Vec<f64> {
                runs.iter()
                    .filter(|r| r.case == c.name && r.side == side)
                    .map(f)
                    .collect()
            };
            let mut ei = pick(Side::Engine, |r| r.iops);
            let mut ri = pick(Side::Raw, |r| r.iops);
            if ei.is_empty() && ri.is_empty() {
                return None;
            }
            let spread = |v: &mut Vec<f64>| -> f64 {
                match median(v) {
                    Some(m) if m > 0.0 => (v[v.len() - 1] - v[0]) / m,
                    _ => 0.0,
                }
            };
            let e = median(&mut ei);
            let r = median(&mut ri);
            let ec = median(&mut pick(Side::Engine, |r| r.cpu_us_per_op));
            let rc = median(&mut pick(Side::Raw, |r| r.cpu_us_per_op));
            Some(Summary {
                case: c.name.clone(),
                engine_iops_median: e,
                raw_iops_median: r,
                engine_mb_s_median: median(&mut pick(Side::Engine, |r| r.mb_s)),
                raw_mb_s_median: median(&mut pick(Side::Raw, |r| r.mb_s)),
                ratio: e.zip(r).map(|(e, r)| e / r),
                engine_cpu_us_per_op_median: ec,
                raw_cpu_us_per_op_median: rc,
                cpu_ratio: ec.zip(rc).map(|(e, r)| e / r),
                spread: spread(&mut ei).max(spread(&mut ri)),
            })
        })
        .collect()
}

/// The markdown tables printed at the end (and pasted into the README).
fn table(r: &Report) -> String {
    let f = |v: Option<f64>, d: usize| v.map_or("–".into(), |x| format!("{x:.d$}"));
    let mut s = String::new();
    if !r.summaries.is_empty() {
        s += "\n| case | engine IOPS | raw IOPS | engine / raw | engine MB/s | raw MB/s | engine CPU µs/op | raw CPU µs/op | CPU engine / raw | spread |\n";
        s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for x in &r.summaries {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} % |\n",
                x.case,
                f(x.engine_iops_median, 0),
                f(x.raw_iops_median, 0),
                x.ratio.map_or("–".into(), |v| format!("{v:.2}×")),
                f(x.engine_mb_s_median, 1),
                f(x.raw_mb_s_median, 1),
                f(x.engine_cpu_us_per_op_median, 2),
                f(x.raw_cpu_us_per_op_median, 2),
                x.cpu_ratio.map_or("–".into(), |v| format!("{v:.2}×")),
                x.spread * 100.0
            );
        }
    }
    if let Some(m) = &r.memory {
        s += &format!(
            "\nmemory: {:.0} GiB sparse volume, read cache {:.0} MiB, {} bitmaps × {:.2} MiB, fixed allowance {:.0} MiB → budget {:.1} MiB (process before open: {:.1} MiB)\n\n",
            m.volume_bytes as f64 / f64::from(1 << 30),
            mib(m.read_cache_bytes),
            m.bitmaps,
            mib(m.bitmap_bytes_each),
            mib(m.fixed_allowance_bytes),
            mib(m.budget_bytes),
            mib(m.baseline_rss_bytes)
        );
        s += "| phase | VmRSS MiB | VmHWM MiB | VmRSS / budget |\n| --- | ---: | ---: | ---: |\n";
        for p in &m.phases {
            s += &format!(
                "| {} | {:.1} | {:.1} | {:.2} |\n",
                p.phase,
                mib(p.vm_rss_bytes),
                mib(p.vm_hwm_bytes),
                p.vm_rss_bytes as f64 / m.budget_bytes as f64
            );
        }
        s += &format!(
            "\nVmHWM / budget: {:.2} ({}); beyond the process baseline, the read cache and the bitmaps: {:.1} MiB\n",
            m.ratio_hwm,
            if m.within_budget { "within" } else { "OVER budget" },
            m.volume_overhead_bytes as f64 / f64::from(1 << 20)
        );
    }
    s
}
