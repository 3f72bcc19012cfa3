//! The compute daemon follows a list of data-plane addresses (`--dataplane A,B`): it ships to
//! the first that serves the volume, never fails over on fencing, and — with several servers
//! on one object store — moves to the server that takes the volume's lease over when the
//! one it shipped to dies, resuming its outbox there.

mod common;
#[path = "common/moto.rs"]
mod moto;

use common::dp::*;
use common::*;
use deltavol::ship::{DataPlaneAddrs, ShipStatus};
use deltavol::volume::Volume;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An address nothing listens on: bound, then closed (connecting is refused).
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn ship_status(vol: &Volume) -> ShipStatus {
    vol.ship.as_ref().expect("ships").status()
}

fn wait_outbox_empty(vol: &Volume, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let st = ship_status(vol);
        if st.outbox_entries == 0 {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "outbox not drained in {limit:?}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_snapshot_exact(addr: &str, snap: u64, model: &[u64]) {
    let got = snapshot_tags(addr, snap, model.len() as u64);
    let bad: Vec<usize> = (0..model.len())
        .filter(|&i| got[i] != Some(model[i]))
        .take(8)
        .collect();
    assert!(
        bad.is_empty(),
        "snapshot {snap} on {addr} differs from the model at its cut, e.g. blocks {bad:?}: got {:?}, want {:?}",
        bad.iter().map(|&i| got[i]).collect::<Vec<_>>(),
        bad.iter().map(|&i| model[i]).collect::<Vec<_>>()
    );
}

#[test]
fn address_lists_are_checked() {
    let one = DataPlaneAddrs::parse("127.0.0.1:7070").unwrap();
    assert_eq!(one.list(), ["127.0.0.1:7070"]);
    assert_eq!(one.current(), "127.0.0.1:7070");
    assert_eq!(one.to_string(), "127.0.0.1:7070");
    let many = DataPlaneAddrs::parse("dp-a.example:7070, [::1]:7071,10.0.0.3:7072").unwrap();
    assert_eq!(
        many.list(),
        ["dp-a.example:7070", "[::1]:7071", "10.0.0.3:7072"]
    );
    assert_eq!(many.current(), "dp-a.example:7070");
    for (bad, why) in [
        ("", "is empty"),
        ("127.0.0.1:7070,", "is empty"),
        ("127.0.0.1:7070,,127.0.0.1:7071", "is empty"),
        ("127.0.0.1", "no :PORT"),
        ("host:", "no valid port"),
        ("host:99999", "no valid port"),
        ("host:0", "no valid port"),
        ("127.0.0.1:0", "port 0"),
        (":7070", "no valid host"),
        ("ho st:7070", "no valid host"),
        ("a:1,b:2,a:1", "listed twice"),
    ] {
        let e = DataPlaneAddrs::parse(bad).expect_err(bad).to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
        assert!(e.contains("HOST:PORT"), "{bad:?}: {e}");
    }
}

/// The first address is dead: the volume ships to the second, `status` says so, and the
/// scrub (`verify`) finds the same server.
#[test]
fn a_dead_first_address_ships_to_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dead_addr();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &format!("{dead},{}", dp.addr)));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    let mut cuts = Vec::new();
    for round in 0..3u64 {
        for i in 0..40u64 {
            let b = (round * 53 + i * 7) % nblocks;
            let t = round * 1000 + i + 1;
            assert!(d.write_tags(0, b, &[t], false) > 0);
            model[b as usize] = t;
        }
        let e = vol.cut_and_flush().unwrap().epoch;
        assert!(
            vol.ship
                .as_ref()
                .unwrap()
                .wait_committed(e, Duration::from_secs(20)),
            "snapshot {e} not committed: {:?}",
            ship_status(&vol)
        );
        cuts.push((e, model.clone()));
    }
    let st = ship_status(&vol);
    assert_eq!(st.dataplane, dp.addr, "{st:?}");
    assert_eq!(st.connected_to.as_deref(), Some(dp.addr.as_str()), "{st:?}");
    assert_eq!(st.dataplane_addrs, vec![dead.clone(), dp.addr.clone()]);
    assert_eq!(
        st.outbox_entries, 0,
        "shipped directly once connected: {st:?}"
    );
    let listed = client(&dp.addr).list_snapshots().unwrap();
    assert_eq!(
        listed.iter().map(|s| s.snap_id).collect::<Vec<_>>(),
        cuts.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    for (snap, m) in &cuts {
        assert_snapshot_exact(&dp.addr, *snap, m);
    }
    let rep = deltavol::verify::verify(&vol, Duration::from_secs(20)).expect("verify");
    assert!(rep.ok(), "{rep:?}");
    assert_eq!(rep.blocks_compared, nblocks);
    drop(d);
    vol.shutdown();
}

/// Fencing is never a reason to try the next server: a volume fenced on the first address
/// stays fenced, and the second never hears of it.
#[test]
fn fencing_on_the_first_address_does_not_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let a = Dp::start(&dir.path().join("a"), "127.0.0.1:0");
    let b = Dp::start(&dir.path().join("b"), "127.0.0.1:0");
    let nblocks = 64u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &format!("{},{}", a.addr, b.addr)));
    let vol = Volume::open(&cfg).unwrap();
    // Another machine recovered the volume (the same volume: its id) on A: its generation is
    // now 1.
    {
        let t = deltavol_dataplane::Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(10),
        };
        let id = Some(vol.cache.volume_id);
        let mut c =
            deltavol_dataplane::Client::connect_as(&a.addr, TOKEN, "testvol", t, 0, id).unwrap();
        c.create_volume(nblocks * BS as u64, BS as u32).unwrap();
        assert_eq!(c.new_generation().unwrap(), 1);
    }
    let mut d = Driver::new(&vol, 1);
    assert!(d.write_tags(0, 0, &[1], false) > 0);
    let _ = vol.cut_and_flush();
    // Fenced: the device takes no more writes.
    for round in 1..3u64 {
        assert_eq!(d.write_tags(0, round, &[round + 1], false), -libc::EIO);
        let _ = vol.cut_and_flush();
    }
    let st = ship_status(&vol);
    assert!(st.fenced, "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("fenced: ")),
        "{st:?}"
    );
    assert!(
        !client(&b.addr).info().exists,
        "B must never get the volume"
    );
    assert!(client(&a.addr).list_snapshots().unwrap().is_empty());
    drop(d);
    vol.shutdown();
}

/// Two data-plane servers in `--multi-server` mode on one (moto) S3 store; the volume ships
/// with `--dataplane A,B`. A is killed (-9) in the middle of a snapshot's upload; writes and
/// cuts go on (the deltas queue in the outbox while B refuses the volume A's lease still
/// covers); once B takes the volume over, the outbox drains to B in order and later snapshots
/// go straight to B. The chain is whole and every snapshot equals the model at its cut.
#[test]
fn two_servers_one_store_killed_server_fails_over_to_the_other() {
    let Some(moto) =
        moto::Moto::start("two_servers_one_store_killed_server_fails_over_to_the_other")
    else {
        return;
    };
    let seed = seed("two_servers_one_store_killed_server_fails_over_to_the_other");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bucket = moto.bucket("failover");
    let dir = tempfile::tempdir().unwrap();
    let lease_ms = 2000;
    let mut a = moto::S3Dp::spawn(&moto, &bucket, &dir.path().join("a"), "srv-a", lease_ms);
    let b = moto::S3Dp::spawn(&moto, &bucket, &dir.path().join("b"), "srv-b", lease_ms);
    let nblocks = 2048u64; // 8 MiB
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.cache.cache_limit_bytes = 1 << 30; // no early (watermark) cut
    let mut sc = ship_cfg(dir.path(), &format!("{},{}", a.addr, b.addr));
    sc.connect_timeout = Duration::from_millis(500);
    cfg.ship = Some(sc);
    let vol = Arc::new(Volume::open(&cfg).unwrap());
    let ship = vol.ship.clone().unwrap();
    let mut d = Driver::new(&vol, 1);
    let mut model = vec![0u64; nblocks as usize];
    let mut tag = 1u64;
    let mut cuts: Vec<(u64, Vec<u64>)> = Vec::new();
    let write_some =
        |d: &mut Driver, model: &mut [u64], rng: &mut rand::rngs::StdRng, tag: &mut u64| {
            for _ in 0..rng.gen_range(10..40) {
                let n = rng.gen_range(1..=16u64);
                let lba = rng.gen_range(0..=nblocks - n);
                let tags: Vec<u64> = (0..n).map(|i| *tag + i).collect();
                *tag += n;
                assert!(d.write_tags(0, lba, &tags, false) > 0);
                model[lba as usize..(lba + n) as usize].copy_from_slice(&tags);
            }
        };

    // On A while it lives.
    for _ in 0..3 {
        write_some(&mut d, &mut model, &mut rng, &mut tag);
        let e = vol.cut_and_flush().unwrap().epoch;
        assert!(
            ship.wait_committed(e, Duration::from_secs(20)),
            "{:?}",
            ship.status()
        );
        cuts.push((e, model.clone()));
    }
    let st = ship.status();
    assert_eq!(st.connected_to.as_deref(), Some(a.addr.as_str()), "{st:?}");
    assert_eq!(st.outbox_entries, 0, "{st:?}");

    // A big snapshot (every block) streaming to A when A is killed.
    for lba in (0..nblocks).step_by(64) {
        let tags: Vec<u64> = (0..64).map(|i| tag + i).collect();
        tag += 64;
        assert!(d.write_tags(0, lba, &tags, false) > 0);
        model[lba as usize..(lba + 64) as usize].copy_from_slice(&tags);
    }
    let v2 = vol.clone();
    let cut = std::thread::spawn(move || v2.cut_and_flush().map(|r| r.epoch));
    std::thread::sleep(Duration::from_millis(rng.gen_range(20..120)));
    a.kill9();
    let killed = Instant::now();
    let e = cut
        .join()
        .unwrap()
        .expect("the cut completes (into the outbox)");
    cuts.push((e, model.clone()));
    eprintln!(
        "snapshot {e} cut as A was killed: {}",
        if ship.status().outbox_entries > 0 {
            "A died mid-upload; it went to the outbox"
        } else {
            "A committed it before dying"
        }
    );

    // Writes and cuts go on: the deltas queue while B still refuses the volume.
    let mut saw_refusal = false;
    let mut after_takeover = 0;
    while after_takeover < 3 {
        write_some(&mut d, &mut model, &mut rng, &mut tag);
        let e = vol.cut_and_flush().unwrap().epoch;
        cuts.push((e, model.clone()));
        let st = ship.status();
        saw_refusal |= st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("srv-a"));
        if st.connected_to.as_deref() == Some(b.addr.as_str()) && st.outbox_entries == 0 {
            after_takeover += 1;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(lease_ms * 8),
            "B did not take the volume over: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let took = killed.elapsed();
    eprintln!("shipping to B {} ms after A was killed", took.as_millis());
    assert!(
        saw_refusal,
        "B refused the volume while A's lease ran (the error names srv-a)"
    );
    let last = cuts.last().unwrap().0;
    assert!(
        ship.wait_committed(last, Duration::from_secs(20)),
        "{:?}",
        ship.status()
    );
    wait_outbox_empty(&vol, Duration::from_secs(20));
    let st = ship.status();
    assert_eq!(st.dataplane, b.addr, "{st:?}");
    assert_eq!(st.connected_to.as_deref(), Some(b.addr.as_str()), "{st:?}");
    assert!(!st.fenced && st.last_error.is_none(), "{st:?}");
    assert!(
        std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".delta")),
        "the outbox drained: no entry left, none set aside"
    );

    // The whole chain, on B, in order; every snapshot exact.
    let listed = client(&b.addr).list_snapshots().unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.snap_id).collect();
    assert_eq!(
        ids,
        cuts.iter().map(|c| c.0).collect::<Vec<_>>(),
        "seed {seed}"
    );
    let mut prev = 0;
    for s in &listed {
        assert_eq!(s.parent_id, prev, "seed {seed}: chain order");
        prev = s.snap_id;
    }
    for (snap, m) in &cuts {
        assert_snapshot_exact(&b.addr, *snap, m);
    }
    // The scrub uses the same failover (A first in the list, dead).
    let rep = deltavol::verify::verify(&vol, Duration::from_secs(20)).expect("verify");
    assert!(rep.ok(), "seed {seed}: {rep:?}");
    drop(d);
    vol.shutdown();
}

/// The CLI: `--dataplane` takes a list (its help says so), refuses a bad entry by name, and
/// `snapshots` / `export` get past a dead first address; with every address dead the error
/// names each one.
#[test]
fn cli_follows_the_address_list() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, TOKEN).unwrap();
    let tok = tok.to_str().unwrap();
    let (code, out, _) = deltavol(&["snapshots", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("comma-separated"), "{out}");
    let (code, out, _) = deltavol(&["add", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("comma-separated"), "{out}");
    let (code, _, err) = deltavol(&[
        "snapshots",
        "testvol",
        "--dataplane",
        "127.0.0.1:7070,nonsense",
        "--auth-token-file",
        tok,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("#2 \"nonsense\"") && err.contains("no :PORT"),
        "{err}"
    );

    // A volume with two snapshots on the live server.
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 64u64;
    {
        let mut c = client(&dp.addr);
        c.create_volume(nblocks * BS as u64, BS as u32).unwrap();
        for (snap, t) in [(1u64, 11u64), (2, 22)] {
            c.begin_snapshot(snap, snap - 1, nblocks * BS as u64)
                .unwrap();
            let mut blk = vec![0u8; BS];
            fill(t, &mut blk);
            c.put_extent(snap, 1, &blk).unwrap();
            c.commit().unwrap();
        }
    }
    let (dead1, dead2) = (dead_addr(), dead_addr());
    let list = format!("{dead1},{}", dp.addr);
    let (code, out, err) = deltavol(&[
        "snapshots",
        "testvol",
        "--dataplane",
        &list,
        "--auth-token-file",
        tok,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    assert!(err.contains(&format!("served by {}", dp.addr)), "{err}");
    let img = dir.path().join("out.img");
    let (code, _, err) = deltavol(&[
        "export",
        "testvol@2",
        "--dataplane",
        &list,
        "--auth-token-file",
        tok,
        "--output",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let got = std::fs::read(&img).unwrap();
    assert_eq!(got.len(), nblocks as usize * BS);
    for b in 0..nblocks as usize {
        let want = match b {
            1 => 11,
            2 => 22,
            _ => 0,
        };
        assert_eq!(tag_of(&got[b * BS..(b + 1) * BS]), Some(want), "block {b}");
    }
    let (code, _, err) = deltavol(&[
        "snapshots",
        "testvol",
        "--dataplane",
        &format!("{dead1},{dead2}"),
        "--auth-token-file",
        tok,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no data-plane server took volume")
            && err.contains(&dead1)
            && err.contains(&dead2),
        "{err}"
    );
}

/// Hydration (on-demand reads and the background fetcher) gets past a dead first address.
#[test]
fn hydration_fetches_past_a_dead_first_address() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 1024u64; // 16 hydration extents
    let mut model = vec![0u64; nblocks as usize];
    let snap = {
        let mut cfg = config(&dir.path().join("src"), nblocks * BS as u64, 1);
        cfg.flush_interval = Duration::from_secs(3600);
        cfg.ship = Some(ship_cfg(&dir.path().join("src"), &dp.addr));
        let vol = Volume::open(&cfg).unwrap();
        let mut d = Driver::new(&vol, 1);
        for b in (0..nblocks).filter(|b| b % 3 != 0) {
            model[b as usize] = 7_000_000 + b;
            assert!(d.write_tags(0, b, &[model[b as usize]], false) > 0);
        }
        let snap = vol.cut_and_flush().unwrap().epoch;
        assert!(vol
            .ship
            .as_ref()
            .unwrap()
            .wait_committed(snap, Duration::from_secs(20)));
        drop(d);
        vol.shutdown();
        snap
    };
    let rec = dir.path().join("rec");
    let mut cfg = config(&rec, nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&rec, &format!("{},{}", dead_addr(), dp.addr)));
    cfg.hydrate_rate_bytes_per_s = 64 << 10; // slow: the reads below are served on demand
    cfg.fetch_timeout = Duration::from_secs(5);
    cfg.cache.create_as = Some(deltavol::cache::CreateAs {
        flushed_epoch: snap,
        snap_head: snap,
        generation: 0,
        hydrate_snap: snap,
        hydrate: true,
        volume_id: dataplane_volume_id(&dp.addr),
    });
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    for b in [1000u64, 700, 3, 512] {
        let got = d.read_tags(0, b, 8);
        for i in 0..8usize {
            assert_eq!(
                got[i],
                Some(model[b as usize + i]),
                "block {}",
                b as usize + i
            );
        }
    }
    let st = vol.status().hydration.expect("hydrating");
    assert!(st.fetched_on_demand > 0, "{st:?}");
    drop(d);
    vol.shutdown();
    drop(vol);
    cfg.hydrate_rate_bytes_per_s = 0;
    let vol = Volume::open(&cfg).unwrap();
    let t0 = Instant::now();
    while vol.cache.hydrating().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "hydration not done: {:?}",
            vol.status().hydration
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, nblocks);
    for b in 0..nblocks as usize {
        assert_eq!(got[b], Some(model[b]), "block {b} after hydration");
    }
    drop(d);
    vol.shutdown();
}
