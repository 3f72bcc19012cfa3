//! Scrub: `deltavol verify` compares the backing file with the newest snapshot on the data
//! plane and reports the blocks that differ, by LBA range.

mod common;
use common::dp::*;
use common::*;
use deltavol::verify::{verify, DiffRange};
use deltavol::volume::Volume;
use std::os::unix::fs::FileExt;
use std::time::Duration;

#[test]
fn verify_reports_a_corrupt_backing_block_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 1024u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    for b in (0..nblocks).step_by(3) {
        assert!(d.write_tags(0, b, &[b + 1], false) > 0);
    }
    let t = Duration::from_secs(30);
    // Nothing flushed yet: verify cuts the first snapshot itself, and it matches.
    let r = verify(&vol, t).unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.blocks_compared, nblocks);
    let first = r.snapshot;
    assert!(first > 0);

    // Damage block 37 and blocks 500..503 of the backing file behind the volume's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.cache.backing)
        .unwrap();
    f.write_all_at(&[0xEE; 100], 37 * BS as u64 + 1000).unwrap();
    f.write_all_at(&vec![0x11; 3 * BS], 500 * BS as u64)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The application keeps writing elsewhere meanwhile: not a difference.
    assert!(d.write_tags(0, 900, &[4242], false) > 0);
    let r = verify(&vol, t).unwrap();
    assert!(!r.ok());
    assert!(r.snapshot > first, "compared against a fresh snapshot");
    assert_eq!(
        r.ranges,
        vec![
            DiffRange {
                lba: 37,
                nblocks: 1
            },
            DiffRange {
                lba: 500,
                nblocks: 3
            }
        ]
    );
    assert_eq!(r.blocks_differing, 4);
    eprintln!(
        "verify: {} blocks compared against snapshot {}, {} differing in {:?} ({} ms)",
        r.blocks_compared, r.snapshot, r.blocks_differing, r.ranges, r.duration_ms
    );
    // Repair by rewriting the blocks through the volume: they flush, and verify is clean.
    for b in [37u64, 500, 501, 502] {
        assert!(d.write_tags(0, b, &[b + 1], false) > 0);
    }
    let r = verify(&vol, t).unwrap();
    assert!(r.ok(), "{r:?}");
    drop(d);
    vol.shutdown();
}

/// Without a data plane there is nothing to compare against: a clear error.
#[test]
fn verify_needs_a_data_plane() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 256 * BS as u64, 1);
    let vol = open(&cfg);
    let e = verify(&vol, Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("--dataplane"), "{e}");
    vol.shutdown();
}
