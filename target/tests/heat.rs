//! The read heat map: a volume records which regions the application reads most and ships the
//! map to the data plane; a recovery hydrates those regions first (hottest first), then the
//! rest in block order. With `hydrate_hot_first` off, or without a map, in block order. The
//! map is a hint only: every block reads back exactly either way.

mod common;
use common::dp::*;
use common::*;
use deltavol::cache::io::UBLK_IO_OP_READ;
use deltavol::volume::{Volume, VolumeConfig};
use std::path::Path;
use std::time::{Duration, Instant};

/// 32 MiB: 16 regions of 2 MiB (512 blocks, 8 hydration extents).
const NBLOCKS: u64 = 8192;
const REGION: u64 = 512;
/// The regions the application reads, and how often (hottest first: 11, 3, 7).
const HOT: [(u64, usize); 3] = [(11, 60), (3, 30), (7, 10)];

fn source_cfg(dir: &Path, addr: &str) -> VolumeConfig {
    let mut cfg = config(&dir.join("src"), NBLOCKS * BS as u64, 2);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&dir.join("src"), addr));
    cfg.heat_interval = Duration::from_millis(100);
    cfg
}

fn recovered_cfg(dir: &Path, addr: &str, snap: u64, hot_first: bool) -> VolumeConfig {
    let mut cfg = config(dir, NBLOCKS * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir, addr));
    // One batch (a region) a second: the order is plain to see.
    cfg.hydrate_rate_bytes_per_s = REGION * BS as u64;
    cfg.hydrate_hot_first = hot_first;
    cfg.cache.create_as = Some(hydrating_from(snap, addr));
    cfg
}

/// The regions of a recovering volume in the order they became all local (polled).
fn completion_order(vol: &Volume, want: usize) -> Vec<u64> {
    let t0 = Instant::now();
    let mut done: Vec<u64> = Vec::new();
    while done.len() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "regions done so far {done:?}: {:?}",
            vol.status().hydration
        );
        let Some(h) = vol.cache.hydrating() else {
            break;
        };
        for r in 0..NBLOCKS / REGION {
            if !done.contains(&r) && (r * REGION..(r + 1) * REGION).all(|b| h.local.get(b)) {
                done.push(r);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done
}

#[test]
fn recovery_hydrates_the_regions_read_most_first() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");

    // The source: written whole, its hot regions read (each read counts once for its region).
    let vol = Volume::open(&source_cfg(dir.path(), &dp.addr)).unwrap();
    let mut d = Driver::new(&vol, 2);
    let tags: Vec<u64> = (0..NBLOCKS).map(|b| 7_000_000 + b).collect();
    for (i, chunk) in tags.chunks(128).enumerate() {
        assert!(d.write_tags(0, i as u64 * 128, chunk, false) > 0);
    }
    let snap = vol.cut_and_flush().unwrap().epoch;
    {
        let ring = vol.host_ring(1).unwrap();
        let mut buf = vec![0u8; BS];
        for (r, n) in HOT {
            for i in 0..n as u64 {
                let b = r * REGION + (i * 37) % REGION;
                let got = smol::block_on(vol.handle(&ring, UBLK_IO_OP_READ, 0, b * 8, 8, &mut buf));
                assert_eq!(got, BS as i32);
            }
        }
    }
    // Shipped within a few intervals, region by region as read.
    let t0 = Instant::now();
    let (rb, map) = loop {
        if let Some(h) = client(&dp.addr).get_heat().unwrap() {
            if h.1.iter().filter(|&&v| v > 0).count() == HOT.len() {
                break h;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no heat map shipped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(u64::from(rb), REGION);
    assert_eq!(map.len() as u64, NBLOCKS / REGION);
    let (h11, h3, h7) = (map[11], map[3], map[7]);
    assert!(h11 > h3 && h3 > h7 && h7 > 0, "{map:?}");
    assert!(
        map.iter()
            .enumerate()
            .all(|(i, &v)| v == 0 || [11, 3, 7].contains(&i)),
        "only the regions read are hot: {map:?}"
    );
    drop(d);
    vol.shutdown();
    drop(vol);

    // Recovered with the heat map: the hot regions first, hottest first, then block order.
    let rec = Volume::open(&recovered_cfg(
        &dir.path().join("hot"),
        &dp.addr,
        snap,
        true,
    ))
    .unwrap();
    let order = completion_order(&rec, 5);
    assert_eq!(order, vec![11, 3, 7, 0, 1], "{:?}", rec.status().hydration);
    // Every block exact, hot or not, hydrated or fetched on demand.
    let mut d = Driver::new(&rec, 1);
    let got = d.read_tags(0, 0, NBLOCKS);
    for b in 0..NBLOCKS as usize {
        assert_eq!(got[b], Some(tags[b]), "block {b}");
    }
    drop(d);
    rec.shutdown();
    drop(rec);

    // Without it: block order.
    let rec = Volume::open(&recovered_cfg(
        &dir.path().join("lba"),
        &dp.addr,
        snap,
        false,
    ))
    .unwrap();
    assert_eq!(completion_order(&rec, 3), vec![0, 1, 2]);
    rec.shutdown();
}

/// A volume without reads ships no map; with `heat_interval` zero it keeps none at all.
#[test]
fn no_reads_no_map_and_zero_interval_keeps_none() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let vol = Volume::open(&source_cfg(dir.path(), &dp.addr)).unwrap();
    let mut d = Driver::new(&vol, 1);
    assert!(d.write_tags(0, 0, &[1, 2, 3], false) > 0);
    vol.cut_and_flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(client(&dp.addr).get_heat().unwrap(), None);
    drop(d);
    vol.shutdown();
    drop(vol);

    let mut cfg = source_cfg(dir.path(), &dp.addr);
    cfg.heat_interval = Duration::ZERO;
    let vol = Volume::open(&cfg).unwrap();
    assert!(vol.heat.is_none());
    vol.shutdown();
}
