//! Defined behaviour under faults, one test per fault: SSD write errors, a full SSD, a failing
//! backing file, corrupt data from the data plane, a data plane that vanishes mid-stream or
//! answers slowly, a corrupt outbox entry, a damaged hydration map, torn journal records.
//! Faults come from [`deltavol::fault`] (file I/O) and a fault proxy on 127.0.0.1 (network);
//! each test prints what it injected, by kind.

mod common;
use common::dp::*;
use common::proxy::{Mode, Proxy};
use common::*;
use deltavol::cache::io::{UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::fault::{FaultFile, FaultKind, FaultOp, FaultPlan, FaultRing, Rule};
use deltavol::ring::{HostRing, Ring};
use deltavol::volume::{Volume, VolumeConfig};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// One request through the handler on `ring`; `buf` holds the data (write) or gets it (read).
fn io<R: Ring>(vol: &Volume, ring: &R, op: u32, block: u64, buf: &mut [u8]) -> i32 {
    let n = (buf.len() / BS) as u64;
    smol::block_on(vol.handle(ring, op, 0, block * 8, (n * 8) as u32, buf))
}

fn write_tags<R: Ring>(vol: &Volume, ring: &R, block: u64, tags: &[u64]) -> i32 {
    let mut buf = vec![0u8; tags.len() * BS];
    for (i, t) in tags.iter().enumerate() {
        fill(*t, &mut buf[i * BS..(i + 1) * BS]);
    }
    io(vol, ring, UBLK_IO_OP_WRITE, block, &mut buf)
}

fn read_tags<R: Ring>(vol: &Volume, ring: &R, block: u64, n: u64) -> Vec<Option<u64>> {
    let mut buf = vec![0u8; n as usize * BS];
    let r = io(vol, ring, UBLK_IO_OP_READ, block, &mut buf);
    assert_eq!(r, buf.len() as i32, "read of {n} blocks at {block}");
    buf.chunks(BS).map(tag_of).collect()
}

fn faulty_ring(vol: &Volume, plan: &std::sync::Arc<FaultPlan>) -> FaultRing<HostRing> {
    FaultRing::new(vol.host_ring(0).unwrap(), plan.clone())
}

fn both_mirrors(plan: &FaultPlan, rule: impl Fn(FaultFile) -> Rule) {
    plan.add(rule(FaultFile::Mirror(0)));
    plan.add(rule(FaultFile::Mirror(1)));
}

fn quiet_cfg(dir: &Path, nblocks: u64) -> VolumeConfig {
    let mut cfg = config(dir, nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg
}

fn backing_tags(path: &Path, nblocks: u64) -> Vec<Option<u64>> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; BS];
    (0..nblocks)
        .map(|i| {
            f.read_exact_at(&mut b, i * BS as u64).unwrap();
            tag_of(&b)
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SSD write error: the write fails with EIO and nothing acknowledged is lost, before or after
/// a crash. A torn write (one block of four landed) leaves each block of its range holding its
/// old or its new contents; a short write is completed by the handler.
#[test]
fn ssd_write_error_fails_the_io_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let cfg = quiet_cfg(dir.path(), nblocks);
    let plan = FaultPlan::new(1);
    let mut model = vec![0u64; nblocks as usize];
    {
        let vol = open(&cfg);
        let ring = faulty_ring(&vol, &plan);
        let tags: Vec<u64> = (1..=32).collect();
        assert_eq!(write_tags(&vol, &ring, 0, &tags), 32 * BS as i32);
        model[..32].copy_from_slice(&tags);
        assert_eq!(io(&vol, &ring, UBLK_IO_OP_FLUSH, 0, &mut []), 0);
        // Acknowledged but not FLUSHed: must survive too.
        assert_eq!(write_tags(&vol, &ring, 40, &[41, 42]), 2 * BS as i32);
        model[40..42].copy_from_slice(&[41, 42]);

        both_mirrors(&plan, |f| Rule::always(f, FaultOp::Write, FaultKind::Eio));
        assert_eq!(write_tags(&vol, &ring, 5, &[500]), -libc::EIO);
        assert_eq!(write_tags(&vol, &ring, 100, &[1000, 1001]), -libc::EIO);
        plan.clear();
        let got = read_tags(&vol, &ring, 0, nblocks);
        for (b, g) in got.iter().enumerate() {
            assert_eq!(*g, Some(model[b]), "block {b} after failed writes");
        }

        // Torn: the first block of a four-block overwrite lands, then EIO.
        plan.add(Rule {
            torn_bytes: BS as u64,
            ..Rule::times(FaultFile::Mirror(1), FaultOp::Write, FaultKind::Torn, 1)
        });
        plan.add(Rule {
            torn_bytes: BS as u64,
            ..Rule::times(FaultFile::Mirror(0), FaultOp::Write, FaultKind::Torn, 1)
        });
        assert_eq!(
            write_tags(&vol, &ring, 8, &[800, 801, 802, 803]),
            -libc::EIO
        );
        plan.clear();
        let got = read_tags(&vol, &ring, 8, 4);
        for (i, g) in got.iter().enumerate() {
            let old = model[8 + i];
            let new = 800 + i as u64;
            assert!(
                *g == Some(old) || *g == Some(new),
                "block {} after a torn write: {g:?} is neither old {old} nor new {new}",
                8 + i
            );
            model[8 + i] = g.unwrap();
        }

        // Short: half lands per submission; the handler finishes the rest.
        both_mirrors(&plan, |f| {
            Rule::times(f, FaultOp::Write, FaultKind::Short, 1)
        });
        let tags: Vec<u64> = (2000..2016).collect();
        assert_eq!(write_tags(&vol, &ring, 64, &tags), 16 * BS as i32);
        model[64..80].copy_from_slice(&tags);
        plan.clear();
        assert_eq!(
            read_tags(&vol, &ring, 64, 16),
            tags.iter().map(|t| Some(*t)).collect::<Vec<_>>()
        );
        vol.crash();
    }
    // After a crash of the daemon: every acknowledged write is there.
    let vol = open(&cfg);
    let ring = vol.host_ring(0).unwrap();
    let got = read_tags(&vol, &ring, 0, nblocks);
    for (b, g) in got.iter().enumerate() {
        assert_eq!(*g, Some(model[b]), "block {b} after the crash");
    }
    let c = plan.counts();
    assert!(c.eio >= 2 && c.torn == 1 && c.short >= 1, "{c}");
    eprintln!("faults injected (ssd write errors): {c}");
    vol.shutdown();
}

/// SSD full (ENOSPC from the cache filesystem): the write waits for the flush (backpressure)
/// and then completes; it does not fail, and its data is exact.
#[test]
fn ssd_full_writes_wait_for_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let cfg = quiet_cfg(dir.path(), nblocks);
    let vol = open(&cfg);
    let plan = FaultPlan::new(2);
    let ring = faulty_ring(&vol, &plan);
    assert_eq!(write_tags(&vol, &ring, 0, &[1, 2, 3]), 3 * BS as i32);
    let epoch0 = vol.status().epoch;
    let waits0 = vol.status().backpressure_waits;
    both_mirrors(&plan, |f| {
        Rule::times(f, FaultOp::Write, FaultKind::Enospc, 20)
    });
    let t0 = Instant::now();
    assert_eq!(
        write_tags(&vol, &ring, 10, &[10, 11]),
        2 * BS as i32,
        "the write waits out ENOSPC and completes"
    );
    let waited = t0.elapsed();
    let st = vol.status();
    assert!(
        st.backpressure_waits > waits0,
        "counted as backpressure: {st:?}"
    );
    assert!(
        st.epoch > epoch0,
        "the wait asked for a flush (epoch {epoch0} -> {})",
        st.epoch
    );
    assert_eq!(
        read_tags(&vol, &ring, 0, 12),
        vec![
            Some(1),
            Some(2),
            Some(3),
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(10),
            Some(11)
        ]
    );
    let c = plan.counts();
    assert!(c.enospc >= 1, "{c}");
    eprintln!("faults injected (ssd full): {c}; the write waited {waited:?}");
    vol.shutdown();
}

/// Backing-file errors (EIO, ENOSPC, a failed fdatasync): the flush retries with backoff, the
/// cache keeps the data (reads stay exact), `status` shows the error and the failed attempts;
/// once the disk is back the flush completes and the backing file is exact.
#[test]
fn backing_file_error_is_retried_and_shown_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let cfg = quiet_cfg(dir.path(), nblocks);
    let vol = open(&cfg);
    let plan = FaultPlan::new(3);
    assert!(vol.flusher.inject_faults(plan.clone()));
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    for b in 0..64u64 {
        assert!(d.write_tags(0, b, &[b + 1], false) > 0);
        model[b as usize] = b + 1;
    }
    // Two failed attempts, then success: the waiter sees success, status counts both.
    plan.add(Rule::times(
        FaultFile::Backing,
        FaultOp::Write,
        FaultKind::Eio,
        1,
    ));
    plan.add(Rule::times(
        FaultFile::Backing,
        FaultOp::Write,
        FaultKind::Enospc,
        1,
    ));
    vol.cut_and_flush().expect("flush succeeds after retries");
    let st = vol.status().flush;
    assert_eq!(st.failed_attempts, 2, "{st:?}");
    assert_eq!(st.consecutive_failures, 0);
    assert!(st.last_error.is_none());
    assert_eq!(
        backing_tags(&cfg.cache.backing, nblocks),
        model.iter().map(|t| Some(*t)).collect::<Vec<_>>()
    );

    // The backing disk keeps failing its fdatasync: the flush reports, the data stays.
    plan.add(Rule::always(
        FaultFile::Backing,
        FaultOp::Sync,
        FaultKind::Eio,
    ));
    for b in 100..140u64 {
        assert!(d.write_tags(0, b, &[b + 5000], false) > 0);
        model[b as usize] = b + 5000;
    }
    let e = vol.cut_and_flush().expect_err("the flush cannot complete");
    assert!(e.to_string().contains("fdatasync"), "{e}");
    let st = vol.status();
    assert!(st.flush.consecutive_failures >= 3, "{:?}", st.flush);
    assert!(st
        .flush
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("fdatasync"));
    assert!(st.flush.last_error_unix_ms.is_some());
    assert!(
        st.dirty_bytes >= 40 * BS as u64,
        "the cache keeps the data: {st:?}"
    );
    let got = d.read_tags(0, 0, nblocks);
    assert!(
        got.iter().zip(&model).all(|(g, m)| *g == Some(*m)),
        "reads exact while the disk fails"
    );
    // The disk is back: the background retry completes the flush.
    plan.clear();
    wait_until("flush recovers", Duration::from_secs(20), || {
        let s = vol.status();
        s.flush.consecutive_failures == 0 && s.frozen_epoch == 0
    });
    assert_eq!(
        backing_tags(&cfg.cache.backing, nblocks),
        model.iter().map(|t| Some(*t)).collect::<Vec<_>>()
    );
    let st = vol.status().flush;
    assert!(st.last_error.is_none(), "{st:?}");
    let c = plan.counts();
    eprintln!(
        "faults injected (backing file): {c}; flush attempts failed: {}",
        st.failed_attempts
    );
    drop(d);
    vol.shutdown();
}

/// Writes `model` into a fresh volume shipped to `addr`, takes a snapshot; returns its id.
fn make_source(dir: &Path, addr: &str, model: &mut [u64]) -> u64 {
    let nblocks = model.len() as u64;
    let mut cfg = quiet_cfg(&dir.join("src"), nblocks);
    cfg.ship = Some(ship_cfg(&dir.join("src"), addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    for b in 0..nblocks {
        if b % 5 != 3 {
            model[b as usize] = 1_000_000 + b;
            assert!(d.write_tags(0, b, &[model[b as usize]], false) > 0);
        }
    }
    let snap = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(snap, Duration::from_secs(30)));
    drop(d);
    vol.shutdown();
    snap
}

fn recovered_cfg(dir: &Path, sub: &str, addr: &str, nblocks: u64, snap: u64) -> VolumeConfig {
    let mut cfg = quiet_cfg(&dir.join(sub), nblocks);
    let mut sc = ship_cfg(&dir.join(sub), addr);
    sc.io_timeout = Duration::from_secs(2);
    cfg.ship = Some(sc);
    cfg.hydrate_rate_bytes_per_s = 256 << 10;
    cfg.fetch_timeout = Duration::from_secs(3);
    cfg.cache.create_as = Some(hydrating_from(snap, addr));
    cfg
}

/// Corrupt data from the data plane while hydrating (a byte flipped on the wire): refused by
/// its crc32c, retried, never returned; a read gets the right data once an answer is intact,
/// and EIO (never wrong data) while every answer is corrupt.
#[test]
fn corrupt_data_from_the_data_plane_is_refused_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 1024u64;
    let mut model = vec![0u64; nblocks as usize];
    let snap = make_source(dir.path(), &dp.addr, &mut model);
    let proxy = Proxy::start(&dp.addr);
    // The first three connections get one byte flipped 20 KiB into the answers (inside the
    // first 256 KiB extent read).
    proxy.set_mode(Mode::Corrupt {
        at: 20 << 10,
        conns: 3,
    });
    let cfg = recovered_cfg(dir.path(), "rec", &proxy.addr, nblocks, snap);
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    for b in (0..nblocks).step_by(97) {
        let got = d.read_tags(0, b, 1)[0];
        assert_eq!(got, Some(model[b as usize]), "block {b}");
    }
    let pc = proxy.counts();
    assert!(pc.corrupted_bytes >= 1, "{pc:?}");
    let h = vol.status().hydration.unwrap();
    assert!(
        h.last_error.as_deref().unwrap_or("").contains("checksum")
            || h.last_error.as_deref().unwrap_or("").contains("crc"),
        "{h:?}"
    );
    drop(d);
    vol.shutdown();

    // Every answer corrupt: a read of a block not yet local fails with EIO after the fetch
    // timeout, and returns nothing.
    proxy.set_mode(Mode::Corrupt {
        at: 20 << 10,
        conns: u64::MAX,
    });
    let cfg = recovered_cfg(dir.path(), "rec2", &proxy.addr, nblocks, snap);
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let t0 = Instant::now();
    let r = d.op(0, UBLK_IO_OP_READ, 0, 500, 1);
    assert_eq!(
        r,
        -libc::EIO,
        "read of a block whose every fetch is corrupt"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "retried for the fetch timeout first"
    );
    let pc2 = proxy.counts();
    assert!(pc2.corrupted_bytes > pc.corrupted_bytes);
    eprintln!(
        "faults injected (corrupt answers): {} corrupted bytes over {} connections",
        pc2.corrupted_bytes, pc2.connections
    );
    drop(d);
    vol.crash();
}

fn wait_outbox_empty(vol: &Volume, limit: Duration) {
    wait_until("outbox drained", limit, || {
        vol.ship.as_ref().unwrap().status().outbox_entries == 0
    });
}

/// The data plane vanishes in the middle of a snapshot upload, and later answers slowly: no
/// partial snapshot is ever visible, the delta goes to the outbox, foreground writes never
/// wait, and shipping resumes (in order, exact) when the data plane is back.
#[test]
fn data_plane_vanishing_mid_stream_commits_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let proxy = Proxy::start(&dp.addr);
    let nblocks = 4096u64; // 16 MiB
    let mut cfg = quiet_cfg(dir.path(), nblocks);
    cfg.cache.cache_limit_bytes = 1 << 30;
    let mut sc = ship_cfg(dir.path(), &proxy.addr);
    sc.io_timeout = Duration::from_millis(800);
    cfg.ship = Some(sc);
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    let mut cuts = Vec::new();
    let mut tag = 1u64;
    let mut round = |d: &mut Driver, model: &mut Vec<u64>, step: u64| {
        for b in (0..nblocks).step_by(step as usize) {
            let tags: Vec<u64> = (0..8).map(|i| tag + i).collect();
            tag += 8;
            let t0 = Instant::now();
            assert!(d.write_tags(0, b, &tags, false) > 0);
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "a write waited on the network"
            );
            model[b as usize..b as usize + 8].copy_from_slice(&tags);
        }
    };
    round(&mut d, &mut model, 8);
    let s1 = vol.cut_and_flush().unwrap().epoch;
    cuts.push((s1, model.clone()));
    wait_outbox_empty(&vol, Duration::from_secs(10));
    // Vanish after 2 MiB of the next 16 MiB upload.
    round(&mut d, &mut model, 8);
    proxy.vanish_after(2 << 20);
    let s2 = vol.cut_and_flush().unwrap().epoch;
    cuts.push((s2, model.clone()));
    let listed: Vec<u64> = client(&dp.addr)
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(listed, vec![s1], "nothing partial committed");
    assert_eq!(vol.ship.as_ref().unwrap().status().outbox_entries, 1);
    // Slow: every answer chunk waits longer than the client's I/O timeout.
    proxy.set_mode(Mode::Stall(Duration::from_millis(1500)));
    round(&mut d, &mut model, 64);
    let s3 = vol.cut_and_flush().unwrap().epoch;
    cuts.push((s3, model.clone()));
    std::thread::sleep(Duration::from_secs(2));
    let listed: Vec<u64> = client(&dp.addr)
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(listed, vec![s1], "nothing committed through a stalled link");
    assert!(vol.ship.as_ref().unwrap().status().last_error.is_some());
    // Back to normal: the outbox drains in order; each snapshot is exact.
    proxy.set_mode(Mode::Pass);
    wait_outbox_empty(&vol, Duration::from_secs(60));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    assert_eq!(
        ids,
        cuts.iter().map(|c| c.0).collect::<Vec<_>>(),
        "every snapshot, in order"
    );
    for (snap, m) in &cuts {
        let got = snapshot_tags(&dp.addr, *snap, nblocks);
        assert!(
            got.iter().zip(m).all(|(g, m)| *g == Some(*m)),
            "snapshot {snap} exact"
        );
    }
    let pc = proxy.counts();
    assert!(pc.cut >= 1 && pc.stalled_chunks >= 1, "{pc:?}");
    eprintln!("faults injected (network): {pc:?}");
    drop(d);
    vol.shutdown();
}

/// A corrupt outbox entry (a byte flipped on the backing disk): detected by its checksums
/// before it is committed, reported clearly in `status`, and nothing wrong is shipped; the
/// entry is set aside, and the next flush ships a full base so the chain goes on, exact.
#[test]
fn corrupt_outbox_entry_is_detected_and_nothing_wrong_is_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let nblocks = 256u64;
    let mut cfg = quiet_cfg(dir.path(), nblocks);
    cfg.ship = Some(ship_cfg(dir.path(), &addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    for b in 0..64u64 {
        assert!(d.write_tags(0, b, &[b + 1], false) > 0);
        model[b as usize] = b + 1;
    }
    let s1 = vol.cut_and_flush().unwrap().epoch;
    let at_s1 = model.clone();
    // The deltas (the backing label lives beside them).
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".delta"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // Flip one byte of the first record's data.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&entries[0])
        .unwrap();
    let mut b = [0u8; 1];
    // header 64 B, cut block 32 B, first record header 32 B, then its data.
    f.read_exact_at(&mut b, 64 + 32 + 32 + 1000).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, 64 + 32 + 32 + 1000).unwrap();
    drop(f);
    let dp = Dp::start(&dir.path().join("dp"), &addr);
    wait_until(
        "the shipper reports the corrupt entry",
        Duration::from_secs(20),
        || {
            vol.ship
                .as_ref()
                .unwrap()
                .status()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("checksum mismatch"))
        },
    );
    let st = vol.ship.as_ref().unwrap().status();
    let e = st.last_error.clone().unwrap();
    assert!(
        e.contains(&entries[0].display().to_string()),
        "the error names the entry: {e}"
    );
    assert_eq!(st.outbox_entries, 0, "{st:?}");
    let aside = entries[0].with_extension("delta.corrupt");
    assert!(
        aside.exists(),
        "the entry is kept aside for inspection: {aside:?}"
    );
    let listed = client(&dp.addr).list_snapshots().unwrap();
    assert!(listed.is_empty(), "nothing shipped: {listed:?}");
    // The chain goes on: the next flush ships the backing file whole (as of s1), then its delta.
    for b in 100..110u64 {
        assert!(d.write_tags(0, b, &[b + 7000], false) > 0);
        model[b as usize] = b + 7000;
    }
    let s2 = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(s2, Duration::from_secs(30)));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    assert_eq!(ids, vec![s1, s2], "a full base of s1, then s2");
    for (snap, m) in [(s1, &at_s1), (s2, &model)] {
        let got = snapshot_tags(&dp.addr, snap, nblocks);
        assert!(
            got.iter().zip(m).all(|(g, m)| *g == Some(*m)),
            "snapshot {snap} exact"
        );
    }
    eprintln!("faults injected (outbox): 1 flipped byte; reported: {e}");
    drop(d);
    vol.shutdown();
}

/// A torn or corrupt journal record (daemon crash): skipped by its crc32c at replay; every
/// other acknowledged write comes back; the damaged one's block holds an earlier
/// acknowledged value, never garbage.
#[test]
fn torn_and_corrupt_journal_records_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let mut cfg = quiet_cfg(dir.path(), nblocks);
    cfg.cache.journal = deltavol::cache::journal::Kind::Records;
    let mut model = vec![0u64; nblocks as usize];
    {
        let vol = open(&cfg);
        let mut d = Driver::new(&vol, 1);
        for b in 0..8u64 {
            assert!(d.write_tags(0, b, &[b + 1], false) > 0);
            model[b as usize] = b + 1;
        }
        vol.cut_and_flush().unwrap();
        // Eight single-block overwrites, journaled (not FLUSHed).
        for b in 0..8u64 {
            assert!(d.write_tags(0, b, &[b + 100], false) > 0);
        }
        drop(d);
        vol.crash();
    }
    // Find the journal with the eight records.
    let cache = dir.path().join("cache");
    // The active epoch's journal: the one whose first record has the highest epoch.
    let mut jpath = None;
    let mut best = 0u64;
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("journal.") {
            let data = std::fs::read(e.path()).unwrap();
            if data.len() >= 64 + 8 * 32 {
                let epoch = u64::from_le_bytes(data[72..80].try_into().unwrap());
                if epoch > best {
                    best = epoch;
                    jpath = Some(e.path());
                }
            }
        }
    }
    let jpath = jpath.expect("a journal with records");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&jpath)
        .unwrap();
    // Record 2 (block 2): one byte flipped. Record 7 (block 7): torn, half of it zeros.
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 64 + 2 * 32 + 9).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 64 + 2 * 32 + 9).unwrap();
    f.write_all_at(&[0u8; 16], 64 + 7 * 32 + 16).unwrap();
    drop(f);
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, 8);
    for b in 0..8usize {
        let want = if b == 2 || b == 7 {
            model[b]
        } else {
            b as u64 + 100
        };
        assert_eq!(got[b], Some(want), "block {b}");
    }
    eprintln!("faults injected (journal): 1 corrupt record, 1 torn record; both skipped");
    drop(d);
    vol.shutdown();
}

/// A damaged bitmap journal (daemon crash): a header that no longer matches (here a flipped
/// byte of its volume id) is ignored at replay, like a journal of another boot: the blocks
/// written since the last flush hold their flushed, acknowledged values, never garbage, and
/// the volume opens and works. The undamaged journal of the same crash keeps its writes.
#[test]
fn a_damaged_bitmap_journal_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let mut cfg = quiet_cfg(dir.path(), nblocks);
    cfg.cache.journal = deltavol::cache::journal::Kind::Bits;
    let cache = dir.path().join("cache");
    let mut model = vec![0u64; nblocks as usize];
    for round in 0..2u64 {
        {
            let vol = open(&cfg);
            let mut d = Driver::new(&vol, 1);
            for b in 0..8u64 {
                assert!(d.write_tags(0, b, &[round * 1000 + b + 1], false) > 0);
                model[b as usize] = round * 1000 + b + 1;
            }
            vol.cut_and_flush().unwrap();
            // Eight single-block overwrites, in the bitmap journal only (not FLUSHed).
            for b in 0..8u64 {
                assert!(d.write_tags(0, b, &[round * 1000 + b + 100], false) > 0);
            }
            drop(d);
            vol.crash();
        }
        let files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".bits"))
            .collect();
        assert_eq!(files.len(), 2, "two bitmap journals: {files:?}");
        if round == 0 {
            // Undamaged: the crash keeps every acknowledged write.
            let vol = open(&cfg);
            let mut d = Driver::new(&vol, 1);
            let got = d.read_tags(0, 0, 8);
            for b in 0..8u64 {
                assert_eq!(got[b as usize], Some(b + 100), "block {b}, journal kept");
                model[b as usize] = b + 100;
            }
            drop(d);
            vol.shutdown();
            continue;
        }
        for p in &files {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 20).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], 20).unwrap();
        }
        let vol = open(&cfg);
        let mut d = Driver::new(&vol, 1);
        let got = d.read_tags(0, 0, 8);
        for b in 0..8usize {
            assert_eq!(got[b], Some(model[b]), "block {b}, journal damaged");
        }
        assert!(d.write_tags(0, 3, &[7777], false) > 0);
        assert_eq!(d.read_tags(0, 3, 1)[0], Some(7777));
        drop(d);
        vol.shutdown();
    }
    eprintln!("faults injected (bitmap journal): a damaged header; the journal ignored");
}

/// The newest copy of `hydrate.map` damaged (a flipped byte) after a crash: the other copy is
/// used, and a block written and flushed since that older copy is not hydrated over with the
/// snapshot's older data (blocks with data in the backing file count as local).
#[test]
fn damaged_hydration_map_copy_falls_back_safely() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 1024u64;
    let mut model = vec![0u64; nblocks as usize];
    let snap = make_source(dir.path(), &dp.addr, &mut model);
    let mut cfg = recovered_cfg(dir.path(), "rec", &dp.addr, nblocks, snap);
    cfg.hydrate_rate_bytes_per_s = 1; // one extent a second: block 1000 is ~15 s away
    {
        let vol = Volume::open(&cfg).unwrap();
        let mut d = Driver::new(&vol, 1);
        assert!(d.write_tags(0, 3, &[333], false) > 0);
        model[3] = 333;
        vol.cut_and_flush().unwrap();
        assert!(d.write_tags(0, 1000, &[1000_1000], false) > 0);
        model[1000] = 1000_1000;
        vol.cut_and_flush().unwrap();
        drop(d);
        vol.crash();
    }
    // Damage the newest copy.
    let cache = dir.path().join("rec").join("cache");
    let copies: Vec<(u64, std::path::PathBuf)> = (0..2)
        .filter_map(|c| {
            let p = cache.join(format!("hydrate.map.{c}"));
            let b = std::fs::read(&p).ok()?;
            (b.len() > 64).then(|| (u64::from_le_bytes(b[40..48].try_into().unwrap()), p))
        })
        .collect();
    assert_eq!(copies.len(), 2, "both copies written");
    let newest = copies.iter().max_by_key(|c| c.0).unwrap().1.clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&newest)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 64 + 15 * 8).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 64 + 15 * 8).unwrap();
    drop(f);
    cfg.hydrate_rate_bytes_per_s = 0;
    let vol = Volume::open(&cfg).expect("reattach with one damaged copy");
    let mut d = Driver::new(&vol, 1);
    assert_eq!(
        d.read_tags(0, 1000, 1)[0],
        Some(1000_1000),
        "the flushed write survives"
    );
    wait_until("hydrated", Duration::from_secs(60), || {
        vol.cache.hydrating().is_none()
    });
    let got = d.read_tags(0, 0, nblocks);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(*g, Some(model[i]), "block {i} after hydration");
    }
    eprintln!("faults injected (hydrate.map): 1 flipped byte in the newest copy; fell back safely");
    drop(d);
    vol.shutdown();
}
