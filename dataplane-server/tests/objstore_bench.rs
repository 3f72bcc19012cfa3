//! Ingest throughput and on-demand read latency of the data plane, local disk vs an
//! S3-compatible store (moto on 127.0.0.1), measured in one run. Ignored by default:
//!
//! ```text
//! cargo test -p deltavol-dataplane --release --test objstore_bench -- --ignored --nocapture
//! ```
//!
//! Sizes via `DELTAVOL_BENCH_MIB` (snapshot size, default 128) and `DELTAVOL_BENCH_READS`
//! (reads per size class, default 100; every read goes to an extent not read before, so the
//! snapshot needs at least 4 x reads extents of 256 KiB).

mod common;
mod moto;

use std::time::{Duration, Instant};

use common::*;
use moto::{Moto, S3Server};

const BS: usize = 4096;
const EXTENT_BLOCKS: u32 = 64;
const READ_SIZES_KIB: [u64; 4] = [4, 16, 64, 256];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    ingest_mib_s: f64,
    commit_ms: f64,
    /// (what, p50 ms, p99 ms) per read size.
    reads: Vec<(String, f64, f64)>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn run(addr: std::net::SocketAddr, mib: u64, reads: u64) -> Figures {
    let blocks = mib * 1024 * 1024 / BS as u64;
    let size = blocks * BS as u64;
    let mut c = connect(addr, "bench");
    c.create_volume(size, BS as u32).expect("create");
    let mut rng = Rng::new(0xbe7c);
    let mut data = vec![0u8; EXTENT_BLOCKS as usize * BS];
    // Ingest: one snapshot writing the whole volume in 256 KiB extents.
    let t0 = Instant::now();
    c.begin_snapshot(1, 0, size).expect("begin");
    let mut lba = 0;
    while lba < blocks {
        rng.fill(&mut data);
        c.put_extent(lba, EXTENT_BLOCKS, &data).expect("put");
        lba += u64::from(EXTENT_BLOCKS);
    }
    let t_commit = Instant::now();
    c.commit().expect("commit");
    let ingest = t0.elapsed();
    let commit = t_commit.elapsed();
    drop(c);
    // On-demand reads from a fresh connection, each inside an extent no earlier read touched
    // (cold: nothing of it cached anywhere in the data plane), at a random offset in it.
    let mut c = connect(addr, "bench");
    let extents = blocks / u64::from(EXTENT_BLOCKS);
    let mut order: Vec<u64> = (0..extents).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next = order.into_iter();
    let mut out = Vec::new();
    let mut warm_lbas = Vec::new();
    for kib in READ_SIZES_KIB {
        let n = kib * 1024 / BS as u64;
        let mut buf = vec![0u8; (n as usize) * BS];
        let mut lat = Vec::with_capacity(reads as usize);
        for _ in 0..reads {
            let e = next
                .next()
                .expect("DELTAVOL_BENCH_MIB too small for the reads asked");
            let lba = e * u64::from(EXTENT_BLOCKS) + rng.below(u64::from(EXTENT_BLOCKS) - n + 1);
            if kib == 256 {
                warm_lbas.push(lba);
            }
            let t = Instant::now();
            c.read_extents(1, lba, n, &mut buf).expect("read");
            lat.push(t.elapsed());
        }
        lat.sort_unstable();
        out.push((
            format!("{kib:>3} KiB cold"),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
        ));
    }
    // 4 KiB reads inside the extents the 256 KiB reads just fetched (the hot-extent cache of
    // the object backend; the page cache for local files).
    let mut buf = vec![0u8; BS];
    let mut lat = Vec::with_capacity(warm_lbas.len());
    for lba in warm_lbas {
        let t = Instant::now();
        c.read_extents(1, lba, 1, &mut buf).expect("read");
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    out.push(("  4 KiB warm".to_string(), pct(&lat, 0.5), pct(&lat, 0.99)));
    Figures {
        ingest_mib_s: mib as f64 / ingest.as_secs_f64(),
        commit_ms: commit.as_secs_f64() * 1000.0,
        reads: out,
    }
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<8} ingest {:7.1} MiB/s (commit {:6.1} ms)",
        f.ingest_mib_s, f.commit_ms
    );
    for (what, p50, p99) in &f.reads {
        println!("{name:<8} read {what}  p50 {p50:7.2} ms  p99 {p99:7.2} ms");
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_local_vs_object_store() {
    let Some(moto) = Moto::start("bench_local_vs_object_store") else {
        return;
    };
    let mib = env_u64("DELTAVOL_BENCH_MIB", 128);
    let reads = env_u64("DELTAVOL_BENCH_READS", 100);
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    let local = ChildServer::spawn(&dir.path().join("local"), &token);
    let fl = run(local.addr, mib, reads);
    drop(local);
    let bucket = moto.bucket("bench");
    let s3 = S3Server::spawn(&moto, &bucket, &dir.path().join("s3"), &token, &[]);
    let fs = run(s3.addr, mib, reads);
    // The store's own floor: ranged GETs of 256 KiB straight from this process.
    let obj = moto.objects(&bucket);
    let seg = obj
        .block_on(obj.list("volumes/bench/seg"))
        .expect("list")
        .pop()
        .expect("the bench segment");
    let mut rng = Rng::new(0xf100);
    let mut lat = Vec::new();
    for _ in 0..reads {
        let off = 64 + rng.below(seg.size - 64 - 262_144);
        let t = Instant::now();
        obj.block_on(obj.get_range(&seg.location, off..off + 262_144))
            .expect("get range");
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    println!(
        "\ndata plane: one {mib} MiB snapshot in 256 KiB extents, then {reads} cold reads per size (each in an extent not read before) and the 4 KiB ones again (warm), same run ({})",
        if cfg!(debug_assertions) { "debug build" } else { "release build" }
    );
    print("local", &fl);
    print("moto-s3", &fs);
    println!(
        "moto-s3  raw ranged GET 256 KiB of the {} MiB segment object  p50 {:7.2} ms  p99 {:7.2} ms",
        seg.size >> 20,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    assert!(fl.ingest_mib_s > 0.0 && fs.ingest_mib_s > 0.0);
}
