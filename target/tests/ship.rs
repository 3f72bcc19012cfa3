//! Shipping each flushed epoch to a real data-plane server on 127.0.0.1: snapshot truth,
//! the data plane down for a while (outbox), killed mid-upload, and base snapshots.

mod common;
use common::dp::*;
use common::*;
use deltavol::volume::{Volume, VolumeConfig};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn wait_outbox_empty(vol: &Volume, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let st = vol.ship.as_ref().unwrap().status();
        if st.outbox_entries == 0 {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "outbox not drained in {limit:?}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Seeded multi-queue workload with cuts at random moments from another thread; every
/// snapshot, rebuilt from the data plane alone, equals the model at some instant within its
/// cut (the ops done when the cut began .. when it returned).
#[test]
fn snapshots_equal_the_model_at_their_cut() {
    let seed = seed("snapshots_equal_the_model_at_their_cut");
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 512u64;
    let queues = 2;
    let mut cfg = config(dir.path(), nblocks * BS as u64, queues);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Arc::new(Volume::open(&cfg).unwrap());
    let ops_done = Arc::new(AtomicU64::new(0));
    let history: Arc<Mutex<Vec<Vec<u64>>>> =
        Arc::new(Mutex::new(vec![vec![0u64; nblocks as usize]]));
    let stop = Arc::new(AtomicU64::new(0));
    let cuts = {
        let (vol, ops_done, stop) = (vol.clone(), ops_done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC0FFEE);
            let mut cuts = Vec::new();
            while stop.load(SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(rng.gen_range(1..30)));
                let lo = ops_done.load(SeqCst);
                let r = vol.cut_and_flush().unwrap();
                let hi = ops_done.load(SeqCst);
                cuts.push((r.epoch, lo, hi));
            }
            cuts
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = Driver::new(&vol, queues);
    let mut model = vec![0u64; nblocks as usize];
    let mut tag = 1u64;
    for _ in 0..1500 {
        let q = rng.gen_range(0..queues);
        let n = rng.gen_range(1..=16u64);
        let b = rng.gen_range(0..=nblocks - n);
        match rng.gen_range(0..10) {
            0..=6 => {
                let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                tag += n;
                assert!(d.write_tags(q, b, &tags, false) > 0);
                model[b as usize..(b + n) as usize].copy_from_slice(&tags);
            }
            7 => {
                assert_eq!(d.discard(q, b, n), 0);
                model[b as usize..(b + n) as usize].fill(0);
            }
            8 => assert_eq!(d.flush(q), 0),
            _ => {
                let got = d.read_tags(q, b, n);
                assert!(
                    got.iter()
                        .zip(&model[b as usize..])
                        .all(|(g, m)| *g == Some(*m)),
                    "seed {seed}: read"
                );
            }
        }
        history.lock().unwrap().push(model.clone());
        ops_done.fetch_add(1, SeqCst);
    }
    stop.store(1, SeqCst);
    let cuts = cuts.join().unwrap();
    assert!(cuts.len() >= 5, "cuts taken: {}", cuts.len());
    wait_outbox_empty(&vol, Duration::from_secs(30));
    let h = history.lock().unwrap();
    let mut c = client(&dp.addr);
    let listed = c.list_snapshots().unwrap();
    let mut prev = 0;
    for s in &listed {
        assert_eq!(s.parent_id, prev, "seed {seed}: chain order");
        prev = s.snap_id;
    }
    for (snap, lo, hi) in &cuts {
        assert!(
            listed.iter().any(|s| s.snap_id == *snap),
            "seed {seed}: snapshot {snap} missing on the data plane"
        );
        let got = snapshot_tags(&dp.addr, *snap, nblocks);
        let ok = (*lo..=*hi).any(|k| h[k as usize].iter().zip(&got).all(|(m, g)| Some(*m) == *g));
        assert!(
            ok,
            "seed {seed}: snapshot {snap} equals no model state between ops {lo} and {hi}"
        );
    }
    drop(d);
    vol.shutdown();
}

/// The data plane is away for several flushes: foreground I/O goes on, snapshots queue in the
/// outbox, and once it is back every snapshot arrives, in order, each one exact.
#[test]
fn outbox_holds_snapshots_while_the_data_plane_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    let mut at_cut = Vec::new();
    for round in 0..5u64 {
        for i in 0..20u64 {
            let b = (round * 37 + i * 11) % nblocks;
            let t = round * 1000 + i + 1;
            assert!(
                d.write_tags(0, b, &[t], false) > 0,
                "writes go on without the data plane"
            );
            model[b as usize] = t;
        }
        let r = vol.cut_and_flush().unwrap();
        at_cut.push((r.epoch, model.clone()));
    }
    let st = vol.ship.as_ref().unwrap().status();
    assert_eq!(st.outbox_entries, 5, "{st:?}");
    assert!(st.last_error.is_some());
    // Nothing was lost from the foreground's point of view.
    assert!(d
        .read_tags(0, 0, nblocks)
        .iter()
        .zip(&model)
        .all(|(g, m)| *g == Some(*m)));
    let dp = Dp::start(&dir.path().join("dp"), &addr);
    wait_outbox_empty(&vol, Duration::from_secs(60));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    assert_eq!(
        ids,
        at_cut.iter().map(|c| c.0).collect::<Vec<_>>(),
        "every snapshot, in order"
    );
    for (snap, m) in &at_cut {
        let got = snapshot_tags(&dp.addr, *snap, nblocks);
        assert!(
            got.iter().zip(m).all(|(g, m)| *g == Some(*m)),
            "snapshot {snap} exact"
        );
    }
    assert!(
        std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".delta")),
        "shipped entries removed"
    );
    drop(d);
    vol.shutdown();
}

/// The data plane is killed (-9) in the middle of an upload and restarted: nothing partial is
/// visible, the snapshot is re-sent from the outbox, the chain continues.
#[test]
fn data_plane_killed_mid_upload() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 8192u64; // 32 MiB
    let mut dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let addr = dp.addr.clone();
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.cache.cache_limit_bytes = 1 << 30; // no early (watermark) cut in the middle
    cfg.ship = Some(ship_cfg(dir.path(), &addr));
    let vol = Arc::new(Volume::open(&cfg).unwrap());
    let mut d = Driver::new(&vol, 1);
    assert!(d.write_tags(0, 0, &[7], false) > 0);
    let first = vol.cut_and_flush().unwrap().epoch;
    let mut model = vec![0u64; nblocks as usize];
    model[0] = 7;
    for b in (0..nblocks).step_by(64) {
        let tags: Vec<u64> = (0..64).map(|i| b + i + 100).collect();
        assert!(d.write_tags(0, b, &tags, false) > 0);
        model[b as usize..(b + 64) as usize].copy_from_slice(&tags);
    }
    let v2 = vol.clone();
    let cut = std::thread::spawn(move || v2.cut_and_flush().unwrap().epoch);
    std::thread::sleep(Duration::from_millis(40));
    dp.kill9();
    let second = cut.join().unwrap();
    // Restart on the same address; the snapshot must arrive whole.
    let dp = Dp::start(&dir.path().join("dp"), &addr);
    wait_outbox_empty(&vol, Duration::from_secs(60));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    assert_eq!(ids, vec![first, second]);
    assert_eq!(listed[1].parent_id, first);
    let got = snapshot_tags(&dp.addr, second, nblocks);
    assert!(
        got.iter().zip(&model).all(|(g, m)| *g == Some(*m)),
        "the re-sent snapshot is exact"
    );
    drop(d);
    vol.shutdown();
}

/// A volume that was flushed before shipping was configured starts its chain with a full base
/// snapshot, so the data plane alone can rebuild it.
#[test]
fn first_snapshot_of_an_existing_volume_is_a_full_base() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    let mut model = vec![0u64; nblocks as usize];
    {
        let vol = open(&cfg);
        let mut d = Driver::new(&vol, 1);
        for b in 0..100u64 {
            assert!(d.write_tags(0, b, &[b + 1], false) > 0);
            model[b as usize] = b + 1;
        }
        vol.cut_and_flush().unwrap();
        drop(d);
        vol.shutdown();
    }
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let mut cfg2: VolumeConfig = cfg.clone();
    cfg2.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Volume::open(&cfg2).unwrap();
    let mut d = Driver::new(&vol, 1);
    assert!(d.write_tags(0, 200, &[999], false) > 0);
    model[200] = 999;
    let snap = vol.cut_and_flush().unwrap().epoch;
    wait_outbox_empty(&vol, Duration::from_secs(30));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    assert_eq!(listed.len(), 2, "base + delta: {listed:?}");
    assert_eq!(listed[1].snap_id, snap);
    let got = snapshot_tags(&dp.addr, snap, nblocks);
    assert!(got.iter().zip(&model).all(|(g, m)| *g == Some(*m)));
    drop(d);
    vol.shutdown();
}

/// The byte accounting behind issue 5's write-amplification figures: overwrites within an
/// epoch coalesce, so the backing file gets each dirty block once, and the data plane gets
/// the dirty data plus only framing (every byte written to its socket is counted).
#[test]
fn flush_and_ship_send_each_dirty_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 1024u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    // 300 distinct blocks, each written three times, and 16 blocks discarded.
    let mut tag = 1u64;
    for _round in 0..3 {
        for b in (0..600u64).step_by(2) {
            assert!(d.write_tags(0, b, &[tag], false) > 0);
            tag += 1;
        }
    }
    assert_eq!(d.discard(0, 800, 16), 0);
    let before = vol.status();
    let rep = vol.cut_and_flush().unwrap();
    wait_outbox_empty(&vol, Duration::from_secs(30));
    let st = vol.status();
    let dirty_data = 300 * BS as u64;
    assert_eq!(rep.data_bytes, dirty_data, "{rep:?}");
    assert_eq!(rep.zero_bytes, 16 * BS as u64, "{rep:?}");
    assert_eq!(
        st.flush.data_bytes_total - before.flush.data_bytes_total,
        dirty_data
    );
    let sent =
        st.shipping.as_ref().unwrap().bytes_sent - before.shipping.as_ref().unwrap().bytes_sent;
    assert!(sent >= dirty_data, "sent {sent} < dirty {dirty_data}");
    // Framing: a header per frame and an extent record per extent; 150 extents here at most
    // (runs of one block), far below 5 % of the data even then.
    assert!(
        sent <= dirty_data + dirty_data / 20,
        "sent {sent} bytes for {dirty_data} dirty bytes"
    );
    drop(d);
    vol.shutdown();
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Rewrites a version 2 outbox entry as the release before cut times wrote it (version 1,
/// no cut block): such entries left in an outbox by an upgrade must still ship.
fn downgrade_outbox_entry_to_v1(path: &std::path::Path) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[0..8], b"DVOUTBX1");
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
    let mut h = b[..64].to_vec();
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&b[96..]);
    std::fs::write(path, h).unwrap();
}

/// The data plane is away while four cuts are taken about 1.2 s apart; it comes back seconds
/// later and the outbox ships. Each snapshot carries the moment of its own cut (within the
/// `cut_and_flush` call that made it, so their spacing is preserved), not the moment it was
/// committed, which is later; an entry in the old outbox format ships with its cut time
/// unknown (0) and its commit time stands in.
#[test]
fn spooled_snapshots_keep_their_cut_times() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut cuts = Vec::new();
    for round in 0..5u64 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(1200));
        }
        assert!(d.write_tags(0, round, &[round + 1], false) > 0);
        let before = unix_ms();
        let r = vol.cut_and_flush().unwrap();
        let after = unix_ms();
        cuts.push((r.epoch, before, after));
    }
    assert_eq!(vol.ship.as_ref().unwrap().status().outbox_entries, 5);
    // The first entry as an older release left it.
    let first = dir
        .path()
        .join("outbox")
        .join(format!("snap-{:020}.delta", cuts[0].0));
    downgrade_outbox_entry_to_v1(&first);
    std::thread::sleep(Duration::from_secs(2));
    let back = unix_ms();
    let dp = Dp::start(&dir.path().join("dp"), &addr);
    wait_outbox_empty(&vol, Duration::from_secs(60));
    let listed = client(&dp.addr).list_snapshots().unwrap();
    assert_eq!(
        listed.iter().map(|s| s.snap_id).collect::<Vec<_>>(),
        cuts.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    assert_eq!(
        listed[0].cut_time_ms, 0,
        "old-format entry: cut time unknown"
    );
    assert_eq!(
        listed[0].point_in_time_ms(),
        (listed[0].commit_time_ms, false)
    );
    for (s, (snap, before, after)) in listed.iter().zip(&cuts).skip(1) {
        assert!(
            (*before..=*after).contains(&s.cut_time_ms),
            "snapshot {snap}: cut time {} outside its cut [{before}, {after}]",
            s.cut_time_ms
        );
        assert!(
            s.commit_time_ms >= back && s.commit_time_ms > s.cut_time_ms + 2000,
            "snapshot {snap}: committed at {} after the data plane came back at {back}, cut at {}",
            s.commit_time_ms,
            s.cut_time_ms
        );
    }
    // The spacing of the cuts is preserved (about 1.2 s each), whatever the commits' was.
    for w in listed[1..].windows(2) {
        let gap = w[1].cut_time_ms - w[0].cut_time_ms;
        assert!((1150..3000).contains(&gap), "cut spacing {gap} ms");
    }
    let info = client(&dp.addr).volume_info().unwrap();
    assert_eq!(info.latest_cut_ms, listed[4].cut_time_ms);
    drop(d);
    vol.shutdown();
}

/// `Volume::cut` (what a consistency group's frozen filesystems wait for) returns at the epoch
/// switch, while the flush is still held: the snapshot it names holds every write done before
/// the call and none done after it, once flushed and committed.
#[test]
fn cut_returns_at_the_switch_and_its_snapshot_holds_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 64u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let a: Vec<u64> = (100..108).collect();
    assert!(d.write_tags(0, 0, &a, false) > 0);
    let (ticket, epoch) = {
        // The flush cannot write the backing file while this is held: the cut must return
        // without it.
        let _held = vol.flusher.pause();
        let (ticket, epoch) = vol.cut(Duration::from_secs(10)).unwrap();
        let b: Vec<u64> = (200..208).collect();
        let c: Vec<u64> = (300..308).collect();
        assert!(d.write_tags(0, 0, &b, false) > 0);
        assert!(d.write_tags(0, 8, &c, false) > 0);
        assert_eq!(vol.status().frozen_epoch, epoch, "flushed while held");
        (ticket, epoch)
    };
    let r = vol.wait_flushed(ticket).unwrap();
    assert_eq!(r.epoch, epoch);
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(epoch, Duration::from_secs(30)));
    let got = snapshot_tags(&dp.addr, epoch, nblocks);
    let want: Vec<Option<u64>> = (0..nblocks)
        .map(|b| if b < 8 { Some(100 + b) } else { Some(0) })
        .collect();
    assert_eq!(got, want, "snapshot {epoch} is not the state at the cut");
    // The writes after the cut are the next snapshot.
    let next = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(next, Duration::from_secs(30)));
    let got = snapshot_tags(&dp.addr, next, nblocks);
    assert_eq!(got[0], Some(200));
    assert_eq!(got[8], Some(300));
    assert_eq!(got[16], Some(0));
    drop(d);
    vol.shutdown();
}
