//! Recovery from the data plane: a volume created from a snapshot is usable at once; reads of
//! blocks not yet local are fetched on demand while the rest hydrates in the background.

mod common;
use common::dp::*;
use common::*;
use deltavol::volume::{Volume, VolumeConfig};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes `model` into a fresh volume shipped to `addr`, takes a snapshot; returns its id.
fn make_source(dir: &Path, addr: &str, model: &mut [u64], rng: &mut impl Rng) -> u64 {
    let nblocks = model.len() as u64;
    let mut cfg = config(&dir.join("src"), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&dir.join("src"), addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    for b in 0..nblocks {
        // Most blocks data, some never written (zeros on the data plane).
        if rng.gen_bool(0.8) {
            model[b as usize] = 1_000_000 + b;
            assert!(d.write_tags(0, b, &[model[b as usize]], false) > 0);
        }
    }
    let snap = vol.cut_and_flush().unwrap().epoch;
    drop(d);
    vol.shutdown();
    snap
}

fn recovered_cfg(dir: &Path, addr: &str, nblocks: u64, snap: u64, rate: u64) -> VolumeConfig {
    let mut cfg = config(&dir.join("rec"), nblocks * BS as u64, 2);
    cfg.flush_interval = Duration::from_millis(30);
    cfg.ship = Some(ship_cfg(&dir.join("rec"), addr));
    cfg.hydrate_rate_bytes_per_s = rate;
    cfg.fetch_timeout = Duration::from_secs(2);
    cfg.cache.create_as = Some(hydrating_from(snap, addr));
    cfg
}

fn wait_hydrated(vol: &Volume, limit: Duration) {
    let t0 = Instant::now();
    while vol.cache.hydrating().is_some() {
        assert!(
            t0.elapsed() < limit,
            "hydration not done in {limit:?}: {:?}",
            vol.status().hydration
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads and writes race on-demand fetches and a slow background hydration, across a crash
/// and reattach; every read equals the model, writes are never overwritten by hydration, and
/// at the end the local copy equals the model and the snapshot chain continues.
#[test]
fn recovered_volume_is_usable_at_once_and_hydrates_exactly() {
    let seed = seed("recovered_volume_is_usable_at_once_and_hydrates_exactly");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 4096u64; // 16 MiB
    let mut model = vec![0u64; nblocks as usize];
    let snap = make_source(dir.path(), &dp.addr, &mut model, &mut rng);

    // Slow background hydration (128 KiB/s), so reads race it.
    let cfg = recovered_cfg(dir.path(), &dp.addr, nblocks, snap, 128 << 10);
    let mut tag = 5_000_000u64;
    for round in 0..3 {
        let vol = Volume::open(&cfg).unwrap();
        let mut d = Driver::new(&vol, 2);
        for step in 0..60 {
            let q = rng.gen_range(0..2);
            let n = rng.gen_range(1..=4u64);
            let b = rng.gen_range(0..=nblocks - n);
            if rng.gen_bool(0.6) {
                let got = d.read_tags(q, b, n);
                for i in 0..n as usize {
                    assert_eq!(
                        got[i],
                        Some(model[b as usize + i]),
                        "seed {seed} round {round} step {step}: block {}",
                        b as usize + i
                    );
                }
            } else {
                let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                tag += n;
                assert!(d.write_tags(q, b, &tags, false) > 0);
                model[b as usize..(b + n) as usize].copy_from_slice(&tags);
            }
        }
        let st = vol.status().hydration.expect("hydrating");
        if round == 0 {
            // 64 extents, ~36 small random reads, 2 extents/s in the background: the crash
            // below comes mid-hydration.
            assert!(
                !st.done,
                "round {round}: hydration must still be running (rate-limited): {st:?}"
            );
            assert!(
                st.fetched_on_demand > 0,
                "reads were served by on-demand fetches: {st:?}"
            );
        }
        // Make the writes durable, then crash mid-hydration; the next round reattaches.
        assert_eq!(d.flush(0), 0);
        drop(d);
        vol.crash();
    }
    // Finish at full speed.
    let mut fast = cfg.clone();
    fast.hydrate_rate_bytes_per_s = 0;
    let vol = Volume::open(&fast).unwrap();
    wait_hydrated(&vol, Duration::from_secs(60));
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, nblocks);
    for b in 0..nblocks as usize {
        assert_eq!(
            got[b],
            Some(model[b]),
            "seed {seed}: block {b} after hydration"
        );
    }
    // The local copy (backing file) equals the model once everything is flushed.
    let next = vol.cut_and_flush().unwrap().epoch;
    assert!(
        next > snap,
        "the chain continues after the recovered snapshot"
    );
    let mut buf = vec![0u8; BS];
    for b in 0..nblocks {
        deltavol::hydrate::read_backing(&vol.cache, b, &mut buf).unwrap();
        assert_eq!(
            tag_of(&buf),
            Some(model[b as usize]),
            "seed {seed}: backing block {b}"
        );
    }
    let s = vol.ship.as_ref().unwrap();
    assert!(
        s.wait_committed(next, Duration::from_secs(30)),
        "{:?}",
        s.status()
    );
    let listed = client(&dp.addr).list_snapshots().unwrap();
    let last = listed.last().unwrap();
    assert!(
        last.snap_id == next && listed.iter().any(|x| x.snap_id == snap),
        "{listed:?}"
    );
    drop(d);
    vol.shutdown();
    drop(vol);
    // An ordinary volume now: reattaching needs no data plane.
    let mut plain = fast.clone();
    plain.ship = None;
    let vol = Volume::open(&plain).unwrap();
    assert!(vol.cache.hydrating().is_none());
    vol.shutdown();
}

/// The data plane goes away mid-hydration: reads of local blocks go on, reads of missing ones
/// fail with EIO after the fetch timeout (never wrong data), and hydration resumes when it is
/// back.
#[test]
fn data_plane_away_during_hydration() {
    let seed = seed("data_plane_away_during_hydration");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let addr = dp.addr.clone();
    let nblocks = 1024u64;
    let mut model = vec![0u64; nblocks as usize];
    let snap = make_source(dir.path(), &addr, &mut model, &mut rng);
    let cfg = recovered_cfg(dir.path(), &addr, nblocks, snap, 64 << 10);
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    assert_eq!(
        d.read_tags(0, 0, 8),
        model[..8].iter().map(|m| Some(*m)).collect::<Vec<_>>()
    );
    dp.kill9();
    // Local blocks still read.
    assert_eq!(
        d.read_tags(0, 0, 8),
        model[..8].iter().map(|m| Some(*m)).collect::<Vec<_>>()
    );
    // A block far from anything hydrated: EIO after the fetch timeout.
    let t0 = Instant::now();
    let r = d.op(0, deltavol::cache::io::UBLK_IO_OP_READ, 0, nblocks - 1, 1);
    assert_eq!(r, -libc::EIO, "a missing block with the data plane away");
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "retried for the fetch timeout first"
    );
    // Writes go on.
    assert!(d.write_tags(0, nblocks - 2, &[77], false) > 0);
    model[nblocks as usize - 2] = 77;
    let _dp = Dp::start(&dir.path().join("dp"), &addr);
    let got = d.read_tags(0, nblocks - 8, 8);
    assert!(
        got.iter()
            .zip(&model[nblocks as usize - 8..])
            .all(|(g, m)| *g == Some(*m)),
        "after the data plane is back"
    );
    drop(d);
    vol.shutdown();
    drop(vol);
    let mut fast = cfg.clone();
    fast.hydrate_rate_bytes_per_s = 0;
    let vol = Volume::open(&fast).unwrap();
    wait_hydrated(&vol, Duration::from_secs(60));
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, nblocks);
    assert!(got.iter().zip(&model).all(|(g, m)| *g == Some(*m)));
    drop(d);
    vol.shutdown();
}

/// Reads of blocks not yet local, in order, are read ahead: after the first, the extents they
/// reach are fetched before they ask (a few reads fetch on demand, not one per extent); reads
/// far apart are not; and with readahead off (`Hydrator::tune(_, 0)`) every extent read is a
/// fetch of its own. Every read is byte-exact.
#[test]
fn reads_in_order_are_read_ahead() {
    use deltavol::cache::io::UBLK_IO_OP_READ;
    use deltavol::hydrate::{HYDRATE_EXTENT_BLOCKS as EXT, HYDRATE_PIPELINE_BATCHES};
    let seed = seed("reads_in_order_are_read_ahead");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 4096u64; // 64 extents
    let mut model = vec![0u64; nblocks as usize];
    let snap = make_source(dir.path(), &dp.addr, &mut model, &mut rng);
    // Extents 8..56, read in 128 KiB reads: in order, or 12 apart (never next to the last).
    let in_order: Vec<u64> = (8 * EXT..56 * EXT).step_by(32).collect();
    let apart: Vec<u64> = (0..12)
        .flat_map(|i| (0..4).map(move |k| (8 + i + 12 * k) * EXT))
        .collect();
    for (case, blocks, readahead) in [
        ("in order", &in_order, true),
        ("apart", &apart, true),
        ("in order, no readahead", &in_order, false),
    ] {
        let run = dir
            .path()
            .join(format!("run-{}", case.replace([' ', ','], "-")));
        // Background hydration held back (one extent a second, from extent 0).
        let vol = Volume::open(&recovered_cfg(&run, &dp.addr, nblocks, snap, 1)).unwrap();
        if !readahead {
            vol.hydrator
                .as_ref()
                .unwrap()
                .tune(HYDRATE_PIPELINE_BATCHES, 0);
        }
        let ring = vol.host_ring(0).unwrap();
        let mut buf = vec![0u8; 32 * BS];
        for &b in blocks {
            let r = smol::block_on(vol.handle(&ring, UBLK_IO_OP_READ, 0, b * 8, 32 * 8, &mut buf));
            assert_eq!(r, buf.len() as i32, "seed {seed} {case}: read of {b}+32");
            for i in 0..32 {
                assert_eq!(
                    tag_of(&buf[i * BS..(i + 1) * BS]),
                    Some(model[(b + i as u64) as usize]),
                    "seed {seed} {case}: block {}",
                    b + i as u64
                );
            }
        }
        let st = vol.status().hydration.unwrap();
        let extents = blocks
            .iter()
            .map(|b| b / EXT)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        eprintln!("{case}: {extents} extents read: {st:?}");
        assert_eq!(st.extents_refetched, 0, "seed {seed} {case}: {st:?}");
        match case {
            "in order" => assert!(
                st.extents_read_ahead > 0 && st.fetched_on_demand <= extents / 4,
                "seed {seed} {case}: reads in order fetch on demand rarely: {st:?}"
            ),
            "apart" => assert_eq!(
                st.extents_read_ahead, 0,
                "seed {seed} {case}: reads far apart are not read ahead: {st:?}"
            ),
            _ => assert!(
                st.extents_read_ahead == 0 && st.fetched_on_demand >= extents - 8,
                "seed {seed} {case}: without readahead each extent is fetched for its read: {st:?}"
            ),
        }
        drop(ring);
        vol.shutdown();
    }
}
