//! Crash trials: a seeded workload runs in a child process (this test binary re-executed with
//! `DELTAVOL_CRASH_CHILD` set) that drives a real volume through the same handler the ublk
//! queues call, on host io_urings, shipping to a real data-plane server on 127.0.0.1. The
//! parent kills it with SIGKILL at a random moment — in "data-plane" trials it first kills the
//! data plane (also SIGKILL) mid-stream and restarts it — then reattaches the volume and checks:
//!
//! - every write acknowledged before an acknowledged FLUSH is present;
//! - every block holds its last acknowledged write, or a write that was in flight at the kill
//!   (the journal's promise for a daemon crash on the same boot; it implies the weaker "last or
//!   an earlier acknowledged write"): never garbage, never a write that was not made;
//! - every snapshot committed on the data plane is byte-exact against the model at its cut,
//!   the chain has no gap, every cut that returned has its snapshot: nothing partial visible.
//!
//! The child reports each write / FLUSH / cut on stdout *before* issuing it and again once it
//! completed, so the parent knows exactly what may and what must be there.
//!
//! In half of the trials the child's disks are also faulty ([`deltavol::fault`]): backing-file
//! writes fail with EIO (5%), its fdatasyncs with EIO (30%), outbox writes with ENOSPC (10%),
//! so flushes fail and are retried while the kill lands; the faults injected are counted.
//!
//! Every fourth trial loses the SSD cache dir with the kill (the backing file and the outbox
//! beside it are kept): the volume must resume at a point in time — exactly the model at the
//! cut of the epoch it resumed at (continued from the backing, resynchronised from the data
//! plane, or back to the empty volume) — and the chain go on with every snapshot exact.
//!
//! The oracle checks itself: `DELTAVOL_CRASH_SABOTAGE=journal` deletes the journals before
//! each reattach (acknowledged, un-FLUSHed writes are then lost) and the trials must fail;
//! `DELTAVOL_CRASH_SABOTAGE=label` deletes the backing label in lost-cache trials, and those
//! must fail.
//!
//! Default tier: 20 trials. Long tier: `DELTAVOL_CRASH_TRIALS=100 cargo test -p deltavol
//! --test crash_trials -- --nocapture`. Seeds: `DELTAVOL_SEED=N` sets the base seed (trial i
//! uses N+i); `DELTAVOL_CRASH_SEED=S` replays the single trial with seed S.

mod common;
use common::dp::*;
use common::*;
use deltavol::fault::{FaultCounts, FaultFile, FaultKind, FaultOp, FaultPlan, Rule};
use deltavol::volume::{Volume, VolumeConfig};
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "DELTAVOL_CRASH_CHILD";
const NBLOCKS: u64 = 512;
const TRIALS_DEFAULT: u64 = 20;

fn trial_cfg(dir: &Path, name: &str, addr: &str) -> VolumeConfig {
    let mut cfg = config(dir, NBLOCKS * BS as u64, 2);
    cfg.cache.name = name.to_string();
    cfg.cache.cache_limit_bytes = 256 << 20;
    cfg.flush_interval = Duration::from_secs(3600);
    let mut sc = ship_cfg(dir, addr);
    sc.connect_timeout = Duration::from_millis(300);
    sc.io_timeout = Duration::from_secs(2);
    cfg.ship = Some(sc);
    cfg
}

/// Whether trial `seed` runs on faulty disks.
fn faulty_disks(seed: u64) -> bool {
    (seed / 3) % 2 == 1
}

fn chance(p: f64, file: FaultFile, op: FaultOp, kind: FaultKind) -> Rule {
    Rule {
        probability: p,
        ..Rule::always(file, op, kind)
    }
}

/// The child: opens the volume and runs the seeded workload until it is killed (or, as a
/// guard, for a bounded number of operations).
fn child_main(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (dir, addr, name, seed) = (
        Path::new(parts[0]),
        parts[1],
        parts[2],
        parts[3].parse::<u64>().unwrap(),
    );
    let cfg = trial_cfg(dir, name, addr);
    let vol = Volume::open(&cfg).expect("child: open volume");
    let faulty = faulty_disks(seed);
    let plan = FaultPlan::new(seed);
    if faulty {
        plan.add(chance(
            0.05,
            FaultFile::Backing,
            FaultOp::Write,
            FaultKind::Eio,
        ));
        plan.add(chance(
            0.3,
            FaultFile::Backing,
            FaultOp::Sync,
            FaultKind::Eio,
        ));
        plan.add(chance(
            0.1,
            FaultFile::Outbox,
            FaultOp::Write,
            FaultKind::Enospc,
        ));
        vol.flusher.inject_faults(plan.clone());
        if let Some(s) = &vol.ship {
            s.inject_faults(plan.clone());
        }
    }
    let mut d = Driver::new(&vol, 2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u64; NBLOCKS as usize];
    let mut tag = seed.wrapping_mul(1_000_000) % (1 << 40) + 1;
    let mut cuts = 0u64;
    println!("@@ READY");
    for op in 0..200_000u64 {
        let q = rng.gen_range(0..2);
        let n = rng.gen_range(1..=8u64);
        let b = rng.gen_range(0..=NBLOCKS - n);
        match rng.gen_range(0..100) {
            0..=64 => {
                println!("@@ W {op} {b} {n} {tag}");
                let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                let r = d.write_tags(q, b, &tags, rng.gen_bool(0.05));
                assert_eq!(r, (n as usize * BS) as i32, "child: write");
                println!("@@ A {op}");
                model[b as usize..(b + n) as usize].copy_from_slice(&tags);
                tag += n;
            }
            65..=69 => {
                println!("@@ Z {op} {b} {n}");
                assert_eq!(d.discard(q, b, n), 0, "child: discard");
                println!("@@ A {op}");
                model[b as usize..(b + n) as usize].fill(0);
            }
            70..=79 => {
                println!("@@ F {op}");
                assert_eq!(d.flush(q), 0, "child: flush");
                println!("@@ A {op}");
            }
            80..=82 => {
                cuts += 1;
                println!("@@ C {op} {cuts}");
                match vol.cut_and_flush() {
                    Ok(r) => println!("@@ CD {op} {cuts} {}", r.epoch),
                    // Faulty disks: the flush is retried in the background.
                    Err(_) if faulty => println!("@@ CE {op} {cuts}"),
                    Err(e) => panic!("child: cut: {e}"),
                }
                let c = plan.counts();
                println!("@@ FC {} {} {} {}", c.eio, c.enospc, c.short, c.torn);
            }
            _ => {
                let got = d.read_tags(q, b, n);
                for i in 0..n as usize {
                    if got[i] != Some(model[b as usize + i]) {
                        println!(
                            "@@ BAD read block {} {:?} {}",
                            b as usize + i,
                            got[i],
                            model[b as usize + i]
                        );
                        std::process::exit(3);
                    }
                }
            }
        }
    }
    println!("@@ END");
    drop(d);
    vol.shutdown();
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    Compute,
    DataPlane,
    /// The compute node is killed and its SSD cache dir lost; the backing and outbox kept.
    CacheLost,
}

/// What the parent learned from the child's reports.
#[derive(Default)]
struct Oracle {
    /// Per block: the value of its last acknowledged write.
    acked: Vec<u64>,
    /// Per block: the value made durable by the last acknowledged FLUSH (its floor).
    floor: Vec<u64>,
    /// Report sequence number at which that FLUSH was issued.
    floor_seq: u64,
    /// Per block: every value a write (acknowledged or not) gave it, with its sequence.
    writes: Vec<Vec<(u64, u64)>>,
    /// A write in flight at the kill: (block, n, first tag or 0 for a discard).
    in_flight: Option<(u64, u64, u64)>,
    /// Model (acknowledged values) at each cut's start, by cut number.
    at_cut: Vec<Vec<u64>>,
    /// Cut numbers that returned.
    cuts_done: Vec<u64>,
    ops: u64,
    flushes_acked: u64,
    /// Faults the child had injected by its last report.
    faults: FaultCounts,
}

fn parse(lines: &[String]) -> Result<Oracle, String> {
    let nb = NBLOCKS as usize;
    let mut o = Oracle {
        acked: vec![0; nb],
        floor: vec![0; nb],
        writes: vec![Vec::new(); nb],
        at_cut: vec![Vec::new()],
        ..Default::default()
    };
    // Acked values as of the FLUSH in flight, and its sequence (the floor once acked).
    let mut pending_flush: Option<(u64, Vec<u64>)> = None;
    let mut pending: Option<(&str, u64, u64, u64)> = None;
    for (seq, l) in lines.iter().enumerate() {
        let seq = seq as u64;
        // libtest may print its own words before ours on the first line.
        let Some(l) = l.find("@@ ").map(|i| &l[i + 3..]) else {
            continue;
        };
        let f: Vec<&str> = l.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<u64>().unwrap();
        match f[0] {
            "READY" | "END" => {}
            "BAD" => return Err(format!("child saw a bad read: {l}")),
            "W" | "Z" => {
                let (b, n) = (num(2), num(3));
                let t = if f[0] == "W" { num(4) } else { 0 };
                pending = Some((f[0], b, n, t));
                for i in 0..n {
                    let v = if t == 0 { 0 } else { t + i };
                    o.writes[(b + i) as usize].push((seq, v));
                }
            }
            "F" => {
                pending = Some(("F", 0, 0, 0));
                pending_flush = Some((seq, o.acked.clone()));
            }
            "A" => {
                match pending.take() {
                    Some(("F", ..)) => {
                        if let Some((fseq, snap)) = pending_flush.take() {
                            o.floor = snap;
                            o.floor_seq = fseq;
                        }
                        o.flushes_acked += 1;
                    }
                    Some((_, b, n, t)) => {
                        for i in 0..n {
                            o.acked[(b + i) as usize] = if t == 0 { 0 } else { t + i };
                        }
                    }
                    None => return Err(format!("ack without an intent: {l}")),
                }
                o.ops += 1;
            }
            "C" => {
                let k = num(2) as usize;
                if o.at_cut.len() != k {
                    return Err(format!("cut {k} out of order"));
                }
                o.at_cut.push(o.acked.clone());
            }
            "CD" => o.cuts_done.push(num(2)),
            "CE" => {}
            "FC" => {
                o.faults = FaultCounts {
                    eio: num(1),
                    enospc: num(2),
                    short: num(3),
                    torn: num(4),
                }
            }
            _ => return Err(format!("unknown report {l}")),
        }
    }
    if let Some((k, b, n, t)) = pending {
        if k != "F" {
            o.in_flight = Some((b, n, t));
        }
    }
    Ok(o)
}

/// Reads snapshot `snap` of volume `vol` from the data plane as block tags.
fn snapshot_tags_of(addr: &str, vol: &str, snap: u64) -> Vec<Option<u64>> {
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    let mut c = deltavol_dataplane::Client::connect(addr, TOKEN, vol, t).expect("connect");
    let mut buf = vec![0u8; 128 * BS];
    let mut out = Vec::new();
    let mut lba = 0;
    while lba < NBLOCKS {
        let n = (NBLOCKS - lba).min(128);
        c.read_extents(snap, lba, n, &mut buf[..n as usize * BS])
            .unwrap();
        out.extend((0..n as usize).map(|i| tag_of(&buf[i * BS..(i + 1) * BS])));
        lba += n;
    }
    out
}

struct TrialResult {
    /// How a lost-cache trial resumed (the volume's `resumed` note).
    resumed: Option<String>,
    faults: FaultCounts,
    ops: u64,
    cuts: usize,
    snapshots: usize,
}

fn run_trial(
    seed: u64,
    kind: Kill,
    root: &Path,
    dp: &mut Dp,
    dp_dir: &Path,
) -> Result<TrialResult, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
    let dir = root.join(format!("trial-{seed}"));
    let name = format!("trial-{seed}");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = format!("{}|{}|{}|{}", dir.display(), dp.addr, name, seed);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_trials", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn child: {e}"))?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (lines, ready) = (lines.clone(), ready.clone());
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if l.ends_with("@@ READY") {
                    ready.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                lines.lock().unwrap().push(l);
            }
        })
    };
    let t0 = Instant::now();
    while !ready.load(std::sync::atomic::Ordering::SeqCst) {
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("child did not get ready".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match kind {
        Kill::Compute | Kill::CacheLost => {
            std::thread::sleep(Duration::from_millis(rng.gen_range(30..700)));
        }
        Kill::DataPlane => {
            std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
            dp.kill9();
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..500)));
            *dp = Dp::start(dp_dir, &dp.addr.clone());
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        }
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    let o = parse(&lines)?;

    // Self-check of the oracle (never in a normal run): DELTAVOL_CRASH_SABOTAGE=journal
    // deletes the membership journals before the reattach, losing every acknowledged write
    // not yet FLUSHed; the trials must then fail.
    if std::env::var("DELTAVOL_CRASH_SABOTAGE").as_deref() == Ok("journal") {
        for e in std::fs::read_dir(dir.join("cache")).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("journal.") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    if kind == Kill::CacheLost {
        std::fs::remove_dir_all(dir.join("cache")).map_err(|e| format!("lose the cache: {e}"))?;
        // Self-check: without the backing label the volume would start as a stranger over
        // the kept backing; DELTAVOL_CRASH_SABOTAGE=label makes the lost-cache trials fail.
        if std::env::var("DELTAVOL_CRASH_SABOTAGE").as_deref() == Ok("label") {
            let _ = std::fs::remove_file(dir.join("outbox").join("backing.label"));
        }
    }
    // Reattach and check every block.
    let cfg = trial_cfg(&dir, &name, &dp.addr);
    let vol = Volume::open(&cfg).map_err(|e| format!("reattach: {e}"))?;
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, NBLOCKS);
    if kind == Kill::CacheLost {
        // The acknowledged writes only the SSD held are gone with it: the volume resumes at a
        // point in time, the epoch its backing holds or the data plane's head, exactly.
        let e = vol.status().flushed_epoch as usize;
        let want: Vec<Option<u64>> = match o.at_cut.get(e) {
            Some(m) if e > 0 => m.iter().map(|t| Some(*t)).collect(),
            Some(_) => vec![Some(0); NBLOCKS as usize],
            None => return Err(format!("resumed at epoch {e}, which was never cut")),
        };
        if let Some(b) = (0..NBLOCKS as usize).find(|b| got[*b] != want[*b]) {
            return Err(format!(
                "lost cache: resumed at epoch {e} ({:?}) but block {b} is {:?}, the model at that cut has {:?}",
                vol.resumed, got[b], want[b]
            ));
        }
    }
    for (b, g) in got.iter().enumerate() {
        if kind == Kill::CacheLost {
            break;
        }
        let in_flight = o.in_flight.and_then(|(fb, n, t)| {
            (fb..fb + n)
                .contains(&(b as u64))
                .then(|| if t == 0 { 0 } else { t + (b as u64 - fb) })
        });
        let Some(v) = *g else {
            return Err(format!(
                "block {b}: garbage (no acknowledged or in-flight write)"
            ));
        };
        // The documented floor: the FLUSH-acknowledged value or a write issued after it.
        let later = o.writes[b]
            .iter()
            .any(|(seq, x)| *seq > o.floor_seq && *x == v);
        if v != o.floor[b] && !later {
            return Err(format!(
                "block {b}: holds {v}, neither its FLUSHed value {} nor a later write",
                o.floor[b]
            ));
        }
        // The journal's promise: the last acknowledged write, or the one in flight.
        if v != o.acked[b] && Some(v) != in_flight {
            return Err(format!(
                "block {b}: holds {v}, not its last acknowledged write {} (in flight: {in_flight:?})",
                o.acked[b]
            ));
        }
    }
    // Snapshots: after the re-flush of any frozen epoch and the outbox drained.
    let t0 = Instant::now();
    loop {
        let st = vol.status();
        let ob = st.shipping.as_ref().map_or(0, |s| s.outbox_entries);
        if st.frozen_epoch == 0 && ob == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("outbox not drained: {:?}", st.shipping));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    let listed = match deltavol_dataplane::Client::connect(&dp.addr, TOKEN, &name, t)
        .and_then(|mut c| c.list_snapshots())
    {
        Ok(l) => l,
        // Killed before its first snapshot reached the data plane.
        Err(e) if e.server_code() == Some(deltavol_dataplane::ErrorCode::NoSuchVolume) => {
            Vec::new()
        }
        Err(e) => return Err(format!("list snapshots: {e}")),
    };
    let mut prev = 0;
    for s in &listed {
        if s.parent_id != prev {
            return Err(format!(
                "snapshot {} has parent {}, {prev} expected",
                s.snap_id, s.parent_id
            ));
        }
        prev = s.snap_id;
        let k = s.snap_id as usize;
        if k >= o.at_cut.len() {
            return Err(format!(
                "snapshot {k} was never cut (cuts begun: {})",
                o.at_cut.len() - 1
            ));
        }
        let snap = snapshot_tags_of(&dp.addr, &name, s.snap_id);
        for (b, g) in snap.iter().enumerate() {
            if *g != Some(o.at_cut[k][b]) {
                return Err(format!(
                    "snapshot {k}: block {b} is {g:?}, the model at its cut has {}",
                    o.at_cut[k][b]
                ));
            }
        }
    }
    for k in &o.cuts_done {
        if !listed.iter().any(|s| s.snap_id == *k) {
            return Err(format!(
                "cut {k} returned but its snapshot is not on the data plane"
            ));
        }
    }
    drop(d);
    let resumed = vol.resumed.clone();
    vol.shutdown();
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(TrialResult {
        resumed,
        faults: o.faults,
        ops: o.ops,
        cuts: o.at_cut.len() - 1,
        snapshots: listed.len(),
    })
}

#[test]
fn crash_trials() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(&spec);
        return;
    }
    let trials: u64 = std::env::var("DELTAVOL_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(TRIALS_DEFAULT);
    let replay: Option<u64> = std::env::var("DELTAVOL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let base = seed("crash_trials");
    let root = tempfile::tempdir().unwrap();
    let dp_dir = root.path().join("dp");
    let mut dp = Dp::start(&dp_dir, "127.0.0.1:0");
    let seeds: Vec<u64> = match replay {
        Some(s) => vec![s],
        None => (0..trials).map(|i| base.wrapping_add(i)).collect(),
    };
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let mut by_kind = [(0u64, 0u64); 3];
    let (mut ops, mut cuts, mut snaps) = (0u64, 0usize, 0usize);
    let mut faults = FaultCounts::default();
    let mut faulty = (0u64, 0u64);
    // Lost-cache trials by how they resumed: continued, resynchronised, back to empty, new.
    let mut resumes = [0u64; 4];
    for s in &seeds {
        // Every third trial kills the data plane first; every fourth loses the SSD cache.
        let kind = if s % 4 == 3 {
            Kill::CacheLost
        } else if s % 3 == 2 {
            Kill::DataPlane
        } else {
            Kill::Compute
        };
        let k = kind as usize;
        by_kind[k].0 += 1;
        faulty.0 += u64::from(faulty_disks(*s));
        match run_trial(*s, kind, root.path(), &mut dp, &dp_dir) {
            Ok(r) => {
                by_kind[k].1 += 1;
                faulty.1 += u64::from(faulty_disks(*s));
                faults.eio += r.faults.eio;
                faults.enospc += r.faults.enospc;
                ops += r.ops;
                cuts += r.cuts;
                snaps += r.snapshots;
                if kind == Kill::CacheLost {
                    let i = match r.resumed.as_deref() {
                        Some(n) if n.contains("continued") => 0,
                        Some(n) if n.contains("resynchronising") => 1,
                        Some(_) => 2,
                        None => 3,
                    };
                    resumes[i] += 1;
                }
            }
            Err(e) => {
                eprintln!("crash trial FAILED: seed {s} ({kind:?} kill, faulty disks: {}): {e} (replay: DELTAVOL_CRASH_SEED={s})", faulty_disks(*s));
                failures.push(*s);
            }
        }
    }
    let run = seeds.len();
    let passed = run - failures.len();
    eprintln!(
        "crash trials: {run} run, {passed} passed in {:.1} s (compute kills {}/{} passed, data-plane kills + compute kills {}/{} passed, compute kills with the SSD cache lost {}/{} passed); {ops} operations acknowledged, {cuts} cuts, {snaps} snapshots checked byte-exact",
        t0.elapsed().as_secs_f64(),
        by_kind[0].1,
        by_kind[0].0,
        by_kind[1].1,
        by_kind[1].0,
        by_kind[2].1,
        by_kind[2].0
    );
    eprintln!(
        "lost-cache trials: {} continued from the backing, {} resynchronised from the data plane, {} back to the empty volume, {} lost before the volume was first labelled",
        resumes[0], resumes[1], resumes[2], resumes[3]
    );
    eprintln!(
        "crash trials on faulty disks: {}/{} passed; disk faults injected (reported before the kills): {faults}",
        faulty.1, faulty.0
    );
    assert!(failures.is_empty(), "failed seeds: {failures:?}");
}
