//! `deltavol-bench-ingest`: the data plane's ingest rate against a plain TCP sink writing to
//! the same disk, measured in the same run.
//!
//! Configurations, run interleaved (`sink`, `dp-1t`, `dp-2t`, `sink`, ...) so that drift on a
//! shared machine hits each of them alike; each run gets a fresh directory under one temp
//! directory in `--dir` (default `/var/tmp`, a real disk: fsync must mean something):
//! * `sink`: [`sink`], one fsync per snapshot;
//! * `dp-Nt`: the real `deltavol-dataplane` binary with `--threads N` ([`server`]), the client
//!   volumes named so that they spread over the shards;
//! * `dp-Nt-enc` (with `--encrypt`): the same, every extent sealed on the client as an
//!   encrypted volume's ship path seals it (`deltavol::crypt`: 64-byte XChaCha20-Poly1305
//!   envelopes per 4 KiB block, the volume stored with 4160-byte blocks), so the cost of
//!   client-side encryption is `dp-Nt-enc` over `dp-Nt`, measured in the same run. Rates count
//!   the volume's (plaintext) bytes; the wire and the disk carry 64/4096 more.
//! * `dp-Nt-tls` (with `--tls`): the same as `dp-Nt` over TLS (the server with a certificate
//!   of a CA made for the run, `deltavol_dataplane::tls::generate`; the clients verify it), so
//!   the cost of TLS is `dp-Nt-tls` over `dp-Nt`, measured in the same run.
//!
//! Every run ships the same [`workload`] over the same number of connections and is checked
//! afterwards (every byte acknowledged, one seeded extent per client read back and compared);
//! any failure ends the bench with a non-zero status.

#[path = "../common/machine.rs"]
mod machine;
mod report;
#[path = "../common/results.rs"]
mod results;
#[path = "../common/server.rs"]
mod server;
mod sink;
#[path = "../common/stats.rs"]
mod stats;
mod workload;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use deltavol::crypt::{BlockCodec, VolumeKey};
use deltavol::size::parse_size;
use deltavol_dataplane::server::shard_of;
use deltavol_dataplane::{Client, ClientAccess, Timeouts};
use rand::RngCore;

use report::{Machine, Report, Run};
use server::ServerProcess;
use sink::Sink;
use workload::{ClientData, Shipped, Workload, BLOCK_SIZE_BYTES};

/// Largest extent the bench ships.
const EXTENT_KIB_MAX: u32 = 64 * 1024;
/// Most parallel clients.
const CLIENTS_MAX: usize = 64;
/// The client's per-call timeout (a commit's fsyncs included).
const CLIENT_IO_TIMEOUT_S: u64 = 120;

/// Data-plane ingest rate against a plain TCP sink on the same disk, in the same run.
#[derive(Debug, Parser)]
#[command(name = "deltavol-bench-ingest", version)]
struct Args {
    /// Bytes shipped per run, all clients together (suffix K, M or G: KiB, MiB, GiB)
    /// [default: 256M, --quick: 16M].
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// Size of each data extent, KiB (a multiple of 4).
    #[arg(long, default_value_t = 256)]
    extent_kib: u32,
    /// Parallel clients, one connection and one volume each.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Snapshots each client ships per run [default: 8, --quick: 4].
    #[arg(long)]
    snapshots: Option<u32>,
    /// Runs of each configuration (interleaved; the median is reported) [default: 3,
    /// --quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Data-plane thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// JSON results [default: bench/results/ingest-<date>.json; none with --quick].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory for the temp data (sink files, data-plane data dir): a real disk, not tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The `deltavol-dataplane` binary [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Seed of the data and of the sampled read-backs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// CI smoke test: tiny sizes, one repeat; still fails on any error.
    #[arg(long)]
    quick: bool,
    /// Also measure every data-plane configuration with client-side encryption
    /// (`dp-Nt-enc`, interleaved with the others) and report encrypted / plain.
    #[arg(long)]
    encrypt: bool,
    /// Also measure every data-plane configuration over TLS (`dp-Nt-tls`, interleaved with
    /// the others) and report TLS / plain TCP.
    #[arg(long)]
    tls: bool,
}

/// The key of the `-enc` runs (a fixed one: the bench measures sealing, not key handling).
fn bench_codec() -> BlockCodec {
    BlockCodec::sealed(VolumeKey::from_bytes(&[0x5e; 32]))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run(args)
}

fn run(args: Args) -> anyhow::Result<()> {
    let bytes = args
        .bytes
        .unwrap_or(if args.quick { 16 << 20 } else { 256 << 20 });
    let snapshots = args.snapshots.unwrap_or(if args.quick { 4 } else { 8 });
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(
        args.extent_kib >= 4 && args.extent_kib % 4 == 0 && args.extent_kib <= EXTENT_KIB_MAX,
        "--extent-kib must be a multiple of 4 between 4 and {EXTENT_KIB_MAX}"
    );
    ensure!(
        (1..=CLIENTS_MAX).contains(&args.clients),
        "--clients must be between 1 and {CLIENTS_MAX}"
    );
    ensure!(snapshots >= 1, "--snapshots must be at least 1");
    ensure!(repeats >= 1, "--repeats must be at least 1");
    ensure!(
        !args.threads.is_empty() && args.threads.iter().all(|&t| t >= 1),
        "--threads must list thread counts of at least 1"
    );
    let extent_bytes = args.extent_kib as usize * 1024;
    let per_snapshot_unit = args.clients as u64 * u64::from(snapshots) * extent_bytes as u64;
    let extents_per_snapshot = bytes / per_snapshot_unit;
    ensure!(
        extents_per_snapshot >= 1,
        "--bytes {bytes} is less than one {} KiB extent per snapshot per client ({per_snapshot_unit} bytes)",
        args.extent_kib
    );
    let w = Workload {
        clients: args.clients,
        snapshots_per_client: snapshots,
        extents_per_snapshot: u32::try_from(extents_per_snapshot)
            .context("too many extents per snapshot")?,
        extent_bytes,
        seed: args.seed,
    };
    if w.total_bytes() != bytes {
        eprintln!(
            "note: shipping {} bytes per run (--bytes rounded down to whole extents per snapshot)",
            w.total_bytes()
        );
    }

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
        .prefix("deltavol-bench-ingest-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a temp directory in {}", args.dir.display()))?;
    let machine = Machine::probe(base.path());
    if machine.dir_is_tmpfs {
        eprintln!(
            "warning: {} is tmpfs: fsync costs nothing there, so the figures say little; pass --dir on a disk",
            args.dir.display()
        );
    }

    let datas: Vec<ClientData> = (0..w.clients)
        .map(|c| ClientData::generate(&w, c))
        .collect();
    let mut configs = vec!["sink".to_string()];
    for t in &args.threads {
        configs.push(format!("dp-{t}t"));
        if args.encrypt {
            configs.push(format!("dp-{t}t-enc"));
        }
        if args.tls {
            configs.push(format!("dp-{t}t-tls"));
        }
    }
    // One CA and server certificate for every `-tls` run.
    let certs = base.path().join("tls");
    if args.tls {
        deltavol_dataplane::tls::generate(&certs, &["127.0.0.1".to_string()], &[])
            .context("making the TLS certificates")?;
    }
    eprintln!(
        "ingest: {} clients x {} snapshots x {} extents of {} KiB = {:.1} MiB per run; {} runs each of {}; temp dir {}",
        w.clients,
        w.snapshots_per_client,
        w.extents_per_snapshot,
        args.extent_kib,
        w.total_bytes() as f64 / f64::from(1 << 20),
        repeats,
        configs.join(", "),
        base.path().display()
    );

    let total_runs = repeats * configs.len();
    let mut runs = Vec::with_capacity(total_runs);
    for repeat in 0..repeats {
        for (ci, config) in configs.iter().enumerate() {
            let dir = base.path().join(format!("{config}-{repeat}"));
            std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
            // Start every run from a clean page cache of dirty data (earlier runs' deletes).
            nix::unistd::sync();
            let (timing, server_cpu_s) = if ci == 0 {
                let t = run_sink(&w, &datas, &dir, repeat)
                    .with_context(|| format!("{config}, run {}", repeat + 1))?;
                (t, None)
            } else {
                let threads: usize = config
                    .trim_start_matches("dp-")
                    .trim_end_matches("-enc")
                    .trim_end_matches("-tls")
                    .trim_end_matches('t')
                    .parse()
                    .context("thread count of a configuration")?;
                let codec = if config.ends_with("-enc") {
                    bench_codec()
                } else {
                    BlockCodec::plain()
                };
                let tls = config.ends_with("-tls").then_some(certs.as_path());
                run_dataplane(&w, &codec, tls, &datas, &dir, threads, &server_bin, repeat)
                    .with_context(|| format!("{config}, run {}", repeat + 1))?
            };
            let wall_s = timing.wall.as_secs_f64();
            let run = Run {
                config: config.clone(),
                repeat,
                bytes: w.total_bytes(),
                wall_s,
                mb_s: w.total_bytes() as f64 / 1e6 / wall_s,
                commit_wait_s: timing.commit_wait.as_secs_f64(),
                server_cpu_s,
            };
            eprintln!(
                "[{}/{total_runs}] {config} run {}/{repeats}: {:.1} MiB in {:.3} s = {:.1} MB/s, {:.3} s waiting for commits{}",
                runs.len() + 1,
                repeat + 1,
                w.total_bytes() as f64 / f64::from(1 << 20),
                wall_s,
                run.mb_s,
                run.commit_wait_s,
                server_cpu_s.map_or(String::new(), |c| format!(" (server CPU {c:.2} s)"))
            );
            runs.push(run);
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }

    let summaries = report::summarise(&configs, &runs);
    let median_of = |c: &str| {
        summaries
            .iter()
            .find(|s| s.config == c)
            .map(|s| s.mb_s_median)
    };
    let ratio_2_threads_vs_1 = median_of("dp-2t")
        .zip(median_of("dp-1t"))
        .map(|(two, one)| two / one);
    let encrypted_vs_plain = args
        .threads
        .iter()
        .filter_map(|t| {
            let enc = median_of(&format!("dp-{t}t-enc"))?;
            let plain = median_of(&format!("dp-{t}t"))?;
            Some(report::EncryptedRatio {
                threads: *t,
                ratio: enc / plain,
            })
        })
        .collect();
    let tls_vs_plain = args
        .threads
        .iter()
        .filter_map(|t| {
            let tls = median_of(&format!("dp-{t}t-tls"))?;
            let plain = median_of(&format!("dp-{t}t"))?;
            Some(report::EncryptedRatio {
                threads: *t,
                ratio: tls / plain,
            })
        })
        .collect();
    let report = Report {
        bench: "ingest",
        command: std::env::args().collect(),
        machine,
        workload: w,
        total_bytes_per_run: w.total_bytes(),
        repeats,
        quick: args.quick,
        summaries,
        ratio_2_threads_vs_1,
        encrypted_vs_plain,
        tls_vs_plain,
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
    Ok(())
}

/// What a run measured.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// From the common start to the last client's last commit.
    wall: Duration,
    /// Mean over the clients of the time each waited for its commits.
    commit_wait: Duration,
}

/// Runs the clients' shippers in parallel from a common start.
fn timed<S: Send>(
    w: &Workload,
    datas: &[ClientData],
    conns: &mut [S],
    ship: impl Fn(&Workload, &ClientData, &mut S, &Barrier) -> anyhow::Result<Shipped> + Sync,
) -> anyhow::Result<Timing> {
    let barrier = Barrier::new(conns.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .zip(datas)
            .enumerate()
            .map(|(c, (conn, data))| {
                let (barrier, ship) = (&barrier, &ship);
                s.spawn(move || ship(w, data, conn, barrier).with_context(|| format!("client {c}")))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut end = start;
        let mut commit_wait = Duration::ZERO;
        let mut first_err = None;
        let n = handles.len() as u32;
        for h in handles {
            match h.join() {
                Ok(Ok(t)) => {
                    end = end.max(t.end);
                    commit_wait += t.commit_wait;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow::anyhow!("a client thread panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(Timing {
                wall: end - start,
                commit_wait: commit_wait / n.max(1),
            }),
        }
    })
}

fn run_sink(
    w: &Workload,
    datas: &[ClientData],
    dir: &Path,
    repeat: usize,
) -> anyhow::Result<Timing> {
    let sink = Sink::start(dir, w.clients)?;
    let mut conns = (0..w.clients)
        .map(|c| sink::connect(sink.addr(), c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timing = timed(w, datas, &mut conns, workload::ship_sink)?;
    drop(conns);
    let mut done = sink.finish()?;
    done.sort_unstable();
    let expected: Vec<(usize, u64)> = (0..w.clients).map(|c| (c, w.client_bytes())).collect();
    ensure!(
        done == expected,
        "the sink made {done:?} (client, bytes) durable, {expected:?} expected"
    );
    for (c, data) in datas.iter().enumerate() {
        let i = workload::sample_extent(w, c, repeat);
        let path = sink::sink_file(dir, c);
        let mut f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let mut buf = vec![0u8; w.extent_bytes];
        f.seek(SeekFrom::Start(i as u64 * w.extent_bytes as u64))
            .and_then(|_| f.read_exact(&mut buf))
            .with_context(|| format!("read back extent {i} from {}", path.display()))?;
        ensure!(
            buf == data.extent(i),
            "sink: extent {i} of client {c} reads back different"
        );
    }
    Ok(timing)
}

/// A volume name for client `c` that the server with `threads` shards gives to shard
/// `c % threads`, so the clients spread evenly over the cores.
fn volume_name(c: usize, threads: usize) -> String {
    (0..)
        .map(|k| format!("bench-{c}-{k}"))
        .find(|n| shard_of(n, threads) == c % threads)
        .expect("some name lands on every shard")
}

/// One run against the real server; `tls`: the directory of its certificates (TLS on).
#[allow(clippy::too_many_arguments)]
fn run_dataplane(
    w: &Workload,
    codec: &BlockCodec,
    tls: Option<&Path>,
    datas: &[ClientData],
    dir: &Path,
    threads: usize,
    bin: &Path,
    repeat: usize,
) -> anyhow::Result<(Timing, Option<f64>)> {
    let mut token = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut token);
    let token: Vec<u8> = token
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    let token_file = dir.join("token");
    File::create(&token_file)
        .and_then(|mut f| f.write_all(&token))
        .with_context(|| format!("write {}", token_file.display()))?;
    let data_dir = dir.join("data");
    let mut serve = server::serve_args(&data_dir, threads, &token_file);
    let mut access = ClientAccess::new(&token);
    if let Some(certs) = tls {
        serve.extend([
            "--tls-cert".into(),
            certs.join("server.pem").into(),
            "--tls-key".into(),
            certs.join("server.key").into(),
        ]);
        let client_tls = deltavol_dataplane::tls::ClientTls::load(&certs.join("ca.pem"), None)
            .context("loading the run's CA")?;
        access = access.with_tls(client_tls, None);
    }
    let mut server =
        ServerProcess::start(bin, &serve, &dir.join("server.log"), server::START_TIMEOUT)?;
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(CLIENT_IO_TIMEOUT_S),
    };
    let mut clients = Vec::with_capacity(w.clients);
    for c in 0..w.clients {
        let name = volume_name(c, threads);
        let mut client = Client::connect(server.addr(), &access, &name, timeouts)
            .with_context(|| server.failure(&format!("client {c} could not connect")))?;
        client
            .create_volume(
                codec.dp_size_bytes(w.volume_size_bytes()),
                codec.dp_block_size(),
            )
            .with_context(|| format!("creating volume {name}"))?;
        clients.push(client);
    }
    let cpu_before = server.cpu_seconds();
    let timing = timed(w, datas, &mut clients, |w, data, client, start| {
        workload::ship_dataplane(w, codec, data, client, start)
    });
    let cpu = server
        .cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let timing = timing.map_err(|e| e.context(server.failure("a run failed")))?;
    server.check_alive()?;
    for (c, (client, data)) in clients.iter_mut().zip(datas).enumerate() {
        let snaps = client
            .list_snapshots()
            .with_context(|| format!("client {c}: listing snapshots"))?;
        let ids: Vec<u64> = snaps.iter().map(|s| s.snap_id).collect();
        let want: Vec<u64> = (0..w.snapshots_per_client).map(workload::snap_id).collect();
        ensure!(
            ids == want,
            "client {c}: the data plane lists snapshots {ids:?}, {want:?} expected"
        );
        let i = workload::sample_extent(w, c, repeat);
        let s = (i / w.extents_per_snapshot as usize) as u32;
        let blocks = (w.extent_bytes / BLOCK_SIZE_BYTES as usize) as u64;
        let mut buf = vec![0u8; w.extent_bytes];
        codec
            .read_exact(
                client,
                workload::snap_id(s),
                i as u64 * blocks,
                &mut buf,
                &mut Vec::new(),
            )
            .with_context(|| format!("client {c}: reading back extent {i}"))?;
        if buf != data.extent(i) {
            bail!("data plane: extent {i} of client {c} reads back different from what was sent");
        }
    }
    drop(clients);
    server.check_alive()?;
    Ok((timing, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn volume_names_spread_over_shards() {
        for threads in 1..=4 {
            for c in 0..8 {
                assert_eq!(shard_of(&volume_name(c, threads), threads), c % threads);
            }
        }
    }
}
