//! Volume identity end to end (issue 11): the sequences a user can type with one name —
//! reuse the name for a new volume, lose the SSD cache but keep the backing file — never
//! make a snapshot on the data plane differ from what the device held at its cut.

mod common;
use common::dp::*;
use common::*;
use deltavol::volume::Volume;
use std::time::{Duration, Instant};

const NBLOCKS: u64 = 256;

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `tags` at block 0.., returning the model.
fn write_all(vol: &Volume, tags: &[u64]) {
    let mut d = Driver::new(vol, 1);
    for (i, chunk) in tags.chunks(16).enumerate() {
        assert!(d.write_tags(0, (i * 16) as u64, chunk, false) > 0);
    }
}

fn model_tags(model: &[u64]) -> Vec<Option<u64>> {
    model.iter().map(|&t| Some(t)).collect()
}

/// Sequence 1 of issue 11: `add v1`, snapshots, `del`, its cache dir and backing file removed,
/// `add v1` again on new dirs. The new volume must never be chained onto the old one's
/// snapshots: the data plane refuses it (the old volume is named, with its id), nothing of it
/// is committed, and once the old volume is deleted on the data plane the new one's
/// snapshots (kept in its outbox meanwhile) are its own chain, byte-equal to the device.
#[test]
fn a_reused_name_never_joins_the_old_volumes_chain() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let size = NBLOCKS * BS as u64;

    // The first volume "testvol": three snapshots.
    let first = dir.path().join("first");
    let mut cfg = config(&first, size, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&first, &dp.addr));
    let old_model: Vec<u64> = (0..NBLOCKS).map(|b| 1000 + b).collect();
    let old_id = {
        let vol = Volume::open(&cfg).unwrap();
        for round in 0..3u64 {
            let tags: Vec<u64> = old_model.iter().map(|t| t + round * 10_000).collect();
            write_all(&vol, &tags);
            vol.cut_and_flush().unwrap();
        }
        write_all(&vol, &old_model);
        vol.cut_and_flush().unwrap();
        let st = vol.ship.as_ref().unwrap().status();
        assert_eq!(st.last_committed, Some(4), "{st:?}");
        vol.shutdown();
        vol.cache.volume_id
    };
    assert_eq!(client(&dp.addr).info().volume_id, Some(old_id));
    // `del`, then its cache dir and backing file (and outbox) are gone.
    std::fs::remove_dir_all(&first).unwrap();

    // The same name again, on new dirs: a new volume.
    let second = dir.path().join("second");
    let mut cfg2 = config(&second, size, 1);
    cfg2.flush_interval = Duration::from_secs(3600);
    cfg2.ship = Some(ship_cfg(&second, &dp.addr));
    let vol = Volume::open(&cfg2).unwrap();
    assert_ne!(vol.cache.volume_id, old_id);
    let new_model: Vec<u64> = (0..NBLOCKS)
        .map(|b| if b % 3 == 0 { 0 } else { 5000 + b })
        .collect();
    write_all(&vol, &new_model);
    vol.cut_and_flush().unwrap();
    let st = vol.ship.as_ref().unwrap().status();
    assert_eq!(
        st.last_committed, None,
        "nothing of the new volume committed: {st:?}"
    );
    assert_eq!(
        st.outbox_entries, 1,
        "the snapshot waits in the outbox: {st:?}"
    );
    let err = st.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("another volume named testvol")
            && err.contains(&deltavol::cache::meta::volume_id_hex(&old_id))
            && err.contains("volume delete"),
        "status names the old volume and what to do: {err}"
    );
    // The old chain is untouched.
    let info = client(&dp.addr).info().clone();
    assert_eq!((info.latest_snap_id, info.volume_id), (4, Some(old_id)));
    assert_eq!(snapshot_tags(&dp.addr, 4, NBLOCKS), model_tags(&old_model));

    // The operator frees the name on the data plane: the new volume's chain starts there.
    client(&dp.addr).delete_volume(old_id).unwrap();
    wait_until("the outbox to drain", Duration::from_secs(30), || {
        vol.ship.as_ref().unwrap().status().outbox_entries == 0
    });
    let info = client(&dp.addr).info().clone();
    assert_eq!(info.volume_id, Some(vol.cache.volume_id));
    assert_eq!(info.snapshot_count, 1, "{info:?}");
    let head = info.latest_snap_id;
    assert_eq!(
        snapshot_tags(&dp.addr, head, NBLOCKS),
        model_tags(&new_model)
    );
    // And it goes on.
    let newer: Vec<u64> = new_model.iter().map(|t| t + 7).collect();
    write_all(&vol, &newer);
    vol.cut_and_flush().unwrap();
    let st = vol.ship.as_ref().unwrap().status();
    let head = st.last_committed.expect("committed");
    assert_eq!(snapshot_tags(&dp.addr, head, NBLOCKS), model_tags(&newer));
    vol.shutdown();
}
