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

fn read_all(vol: &Volume) -> Vec<Option<u64>> {
    let mut d = Driver::new(vol, 1);
    d.read_tags(0, 0, NBLOCKS)
}

fn shipping_cfg(dir: &std::path::Path, addr: &str) -> deltavol::volume::VolumeConfig {
    let mut cfg = config(dir, NBLOCKS * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir, addr));
    cfg
}

/// Sequence 2 of issue 11, the common case: the daemon dies and its SSD cache dir is lost;
/// the backing file (and the outbox beside it) are kept, and the backing holds exactly the
/// data plane's head. `add` with the same name and backing and a new cache dir continues the
/// volume at once under its own id: no restore, every block as it was, the chain goes on.
#[test]
fn lost_ssd_with_a_clean_backing_continues_the_chain_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(dir.path(), &dp.addr);
    let model: Vec<u64> = (0..NBLOCKS).map(|b| 100 + b).collect();
    let id = {
        let vol = Volume::open(&cfg).unwrap();
        write_all(
            &vol,
            &model.iter().map(|t| t + 1_000_000).collect::<Vec<_>>(),
        );
        vol.cut_and_flush().unwrap();
        write_all(&vol, &model);
        vol.cut_and_flush().unwrap();
        assert_eq!(vol.ship.as_ref().unwrap().status().last_committed, Some(2));
        vol.crash(); // kill -9: no final flush
        vol.cache.volume_id
    };
    std::fs::remove_dir_all(&cfg.cache.cache_dir).unwrap();

    let vol = Volume::open(&cfg).unwrap();
    let note = vol.resumed.clone().expect("resumed");
    assert!(note.contains("continued from epoch 2"), "{note}");
    assert_eq!(vol.status().resumed.as_deref(), Some(note.as_str()));
    assert_eq!(vol.cache.volume_id, id, "the same volume, not a stranger");
    assert!(vol.cache.hydrating().is_none(), "no restore");
    assert_eq!(read_all(&vol), model_tags(&model));
    let newer: Vec<u64> = model
        .iter()
        .map(|t| if t % 2 == 0 { t + 50_000 } else { *t })
        .collect();
    write_all(&vol, &newer);
    vol.cut_and_flush().unwrap();
    let st = vol.ship.as_ref().unwrap().status();
    assert_eq!(st.last_committed, Some(3), "{st:?}");
    let snaps = client(&dp.addr).list_snapshots().unwrap();
    let chain: Vec<(u64, u64)> = snaps.iter().map(|s| (s.snap_id, s.parent_id)).collect();
    assert_eq!(chain, vec![(1, 0), (2, 1), (3, 2)]);
    assert_eq!(snapshot_tags(&dp.addr, 3, NBLOCKS), model_tags(&newer));
    assert_eq!(snapshot_tags(&dp.addr, 2, NBLOCKS), model_tags(&model));
    vol.shutdown();
}

/// Sequence 2, the hard case: the SSD is lost while a flush was writing epoch 2 into the
/// backing (its fdatasync kept failing, so snapshot 2 never committed). The backing is then a
/// mix of epochs 1 and 2 — no point in time. The resumed volume is resynchronised from the
/// data plane's head (snapshot 1): every block reads as of snapshot 1, and the next snapshot
/// chains onto 1 and equals the device.
#[test]
fn lost_ssd_mid_flush_resynchronises_from_the_data_plane() {
    use deltavol::fault::{FaultFile, FaultKind, FaultOp, FaultPlan, Rule};
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(dir.path(), &dp.addr);
    let snap1: Vec<u64> = (0..NBLOCKS).map(|b| 100 + b).collect();
    let torn: Vec<u64> = (0..NBLOCKS)
        .map(|b| if b < 128 { 900 + b } else { 100 + b })
        .collect();
    {
        let vol = Volume::open(&cfg).unwrap();
        write_all(&vol, &snap1);
        vol.cut_and_flush().unwrap();
        let plan = FaultPlan::new(5);
        assert!(vol.flusher.inject_faults(plan.clone()));
        plan.add(Rule::always(
            FaultFile::Backing,
            FaultOp::Sync,
            FaultKind::Eio,
        ));
        write_all(&vol, &torn);
        assert!(
            vol.cut_and_flush().is_err(),
            "the backing's fdatasync fails"
        );
        vol.crash();
    }
    let backing_now = {
        let vol_cfg = cfg.cache.backing.clone();
        let raw = std::fs::read(vol_cfg).unwrap();
        (0..NBLOCKS as usize)
            .map(|b| tag_of(&raw[b * BS..(b + 1) * BS]))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        backing_now,
        model_tags(&torn),
        "the backing holds epoch 2's writes, uncommitted"
    );
    std::fs::remove_dir_all(&cfg.cache.cache_dir).unwrap();

    let vol = Volume::open(&cfg).unwrap();
    let note = vol.resumed.clone().expect("resumed");
    assert!(note.contains("resynchronising from snapshot 1"), "{note}");
    // Blocks 128.. were not rewritten in epoch 2: equal by checksum, kept, never fetched.
    assert!(note.contains("128 of 256 blocks"), "{note}");
    // Reads are as of snapshot 1 at once (fetched on the fly where not yet restored).
    assert_eq!(read_all(&vol), model_tags(&snap1));
    wait_until("hydration", Duration::from_secs(30), || {
        vol.cache.hydrating().is_none()
    });
    assert_eq!(read_all(&vol), model_tags(&snap1));
    let next: Vec<u64> = snap1.iter().map(|t| t + 3).collect();
    write_all(&vol, &next[..64]);
    vol.cut_and_flush().unwrap();
    let mut model = snap1.clone();
    model[..64].copy_from_slice(&next[..64]);
    let st = vol.ship.as_ref().unwrap().status();
    let head = st.last_committed.expect("committed");
    let snaps = client(&dp.addr).list_snapshots().unwrap();
    let last = snaps.last().unwrap();
    assert_eq!((last.snap_id, last.parent_id), (head, 1), "{snaps:?}");
    assert_eq!(snapshot_tags(&dp.addr, head, NBLOCKS), model_tags(&model));
    assert_eq!(read_all(&vol), model_tags(&model));
    vol.shutdown();
}

/// A lost SSD on a node that was fenced meanwhile (the volume recovered elsewhere): refused,
/// the backing left as it is. A backing of another volume name: refused.
#[test]
fn lost_ssd_resume_refuses_a_fenced_node_and_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(dir.path(), &dp.addr);
    let model: Vec<u64> = (0..NBLOCKS).map(|b| 7 + b).collect();
    let id = {
        let vol = Volume::open(&cfg).unwrap();
        write_all(&vol, &model);
        vol.cut_and_flush().unwrap();
        vol.crash();
        vol.cache.volume_id
    };
    std::fs::remove_dir_all(&cfg.cache.cache_dir).unwrap();
    let before = std::fs::read(&cfg.cache.backing).unwrap();

    let mut other = cfg.clone();
    other.cache.name = "another".into();
    let e = Volume::open(&other).err().expect("another name refused");
    assert!(
        e.to_string().contains("belongs to volume \"testvol\""),
        "{e}"
    );

    // Recovered elsewhere: the data plane moved to generation 1.
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "testvol", t, 0, Some(id))
        .unwrap()
        .new_generation()
        .unwrap();
    let e = Volume::open(&cfg).err().expect("fenced node refused");
    assert!(e.to_string().contains("this node is fenced"), "{e}");
    assert_eq!(
        std::fs::read(&cfg.cache.backing).unwrap(),
        before,
        "backing untouched"
    );
}

/// Issue 11, item 3: a node fenced by a recovery elsewhere stops taking writes (EIO: the
/// device is read-only, reads go on), says FENCED, and keeps the snapshots it made but could
/// not ship as a branch volume on the data plane — never merged into the new chain, exportable
/// and cloneable. The fence is persisted: a restart stays read-only.
#[test]
fn a_fenced_node_turns_read_only_and_keeps_its_snapshots_as_a_branch() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(dir.path(), &dp.addr);
    let a: Vec<u64> = (0..NBLOCKS).map(|b| 10 + b).collect();
    let b: Vec<u64> = (0..NBLOCKS)
        .map(|x| if x % 4 == 0 { 70_000 + x } else { 10 + x })
        .collect();
    let vol = Volume::open(&cfg).unwrap();
    write_all(&vol, &a);
    vol.cut_and_flush().unwrap();
    // Another machine recovers the volume: a new generation on the data plane.
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    let id = Some(vol.cache.volume_id);
    let mut other =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "testvol", t, 0, id).unwrap();
    assert_eq!(other.new_generation().unwrap(), 1);
    // This node does not know yet: its writes are acknowledged until its next flush.
    write_all(&vol, &b);
    let _ = vol.cut_and_flush();
    wait_until("the branch", Duration::from_secs(30), || {
        let st = vol.ship.as_ref().unwrap().status();
        st.fenced && st.outbox_entries == 0 && st.fenced_branch.is_some()
    });
    let st = vol.ship.as_ref().unwrap().status();
    let branch = st.fenced_branch.clone().unwrap();
    assert_eq!(branch, "testvol.fenced-g0");
    // Read-only: writes fail, reads see what was acknowledged.
    let mut d = Driver::new(&vol, 1);
    assert_eq!(d.write_tags(0, 3, &[5], false), -libc::EIO);
    assert_eq!(d.discard(0, 3, 1), -libc::EIO);
    drop(d);
    assert_eq!(read_all(&vol), model_tags(&b));
    // The volume's chain has nothing of this node after the fence.
    let main: Vec<u64> = client(&dp.addr)
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(main, vec![1]);
    // The branch holds snapshot 2 as this node cut it, cloned from snapshot 1.
    let mut bc = deltavol_dataplane::Client::connect(&dp.addr, TOKEN, &branch, t).unwrap();
    let info = bc.info().clone();
    assert_eq!(
        (info.clone_source_volume.as_str(), info.clone_source_snap_id),
        ("testvol", 1)
    );
    let snaps = bc.list_snapshots().unwrap();
    assert_eq!(
        snaps
            .iter()
            .map(|s| (s.snap_id, s.parent_id))
            .collect::<Vec<_>>(),
        vec![(2, 0)]
    );
    let mut buf = vec![0u8; NBLOCKS as usize * BS];
    bc.read_extents(2, 0, NBLOCKS, &mut buf).unwrap();
    let got: Vec<Option<u64>> = (0..NBLOCKS as usize)
        .map(|i| tag_of(&buf[i * BS..(i + 1) * BS]))
        .collect();
    assert_eq!(got, model_tags(&b));
    // ... and can be cloned like any volume.
    let mut cl =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "from-branch", t, 0, Some([3; 16]))
            .unwrap();
    cl.clone_volume(&branch, 2).unwrap();
    vol.shutdown();
    drop(vol);

    // A restart stays read-only at once, before any contact with the data plane.
    let vol = Volume::open(&cfg).unwrap();
    assert!(vol.cache.fenced.load(std::sync::atomic::Ordering::SeqCst));
    let mut d = Driver::new(&vol, 1);
    assert_eq!(d.write_tags(0, 3, &[5], false), -libc::EIO);
    assert!(vol.ship.as_ref().unwrap().status().fenced);
    drop(d);
    vol.shutdown();
}

/// Nothing of one volume is ever applied to another: an outbox entry of another volume (id) in
/// this volume's outbox is set aside, never shipped under this volume's name; another volume's
/// membership journal in this volume's cache dir is ignored at reattach.
#[test]
fn another_volumes_outbox_entry_or_journal_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    // Volume A: its data plane is away, so its snapshot waits in its outbox; its last writes
    // are in its journals only (no FLUSH, then a crash).
    let a_dir = dir.path().join("a");
    let mut a_cfg = config(&a_dir, NBLOCKS * BS as u64, 1);
    a_cfg.flush_interval = Duration::from_secs(3600);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    a_cfg.ship = Some(ship_cfg(&a_dir, &dead));
    let a_tags: Vec<u64> = (0..NBLOCKS).map(|b| 900_000 + b).collect();
    {
        let vol = Volume::open(&a_cfg).unwrap();
        write_all(&vol, &a_tags);
        vol.cut_and_flush().unwrap();
        write_all(&vol, &a_tags.iter().map(|t| t + 1).collect::<Vec<_>>());
        vol.crash();
    }
    // Volume B (the same name "testvol", another id), shipping to the real data plane.
    let b_dir = dir.path().join("b");
    let b_cfg = shipping_cfg(&b_dir, &dp.addr);
    let b_tags: Vec<u64> = (0..NBLOCKS).map(|b| 10 + b).collect();
    {
        let vol = Volume::open(&b_cfg).unwrap();
        write_all(&vol, &b_tags);
        vol.cut_and_flush().unwrap();
        vol.shutdown();
    }
    // A's outbox entry and journals land in B's dirs (an operator's copy, a shared disk).
    for e in std::fs::read_dir(a_dir.join("outbox")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.ends_with(".delta") {
            std::fs::copy(e.path(), b_dir.join("outbox").join(&n)).unwrap();
        }
    }
    let mut journals = 0;
    for e in std::fs::read_dir(a_dir.join("cache")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("journal.") {
            std::fs::copy(e.path(), b_dir.join("cache").join(&n)).unwrap();
            journals += 1;
        }
    }
    assert!(journals > 0);
    let vol = Volume::open(&b_cfg).unwrap();
    assert_eq!(
        read_all(&vol),
        model_tags(&b_tags),
        "A's journal applied to B"
    );
    wait_until("A's entry set aside", Duration::from_secs(30), || {
        std::fs::read_dir(b_dir.join("outbox"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".delta.corrupt"))
    });
    let st = vol.ship.as_ref().unwrap().status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("belongs to another volume")),
        "{st:?}"
    );
    let newer: Vec<u64> = b_tags.iter().map(|t| t + 5).collect();
    write_all(&vol, &newer);
    vol.cut_and_flush().unwrap();
    wait_until("B's outbox to drain", Duration::from_secs(30), || {
        vol.ship.as_ref().unwrap().status().outbox_entries == 0
    });
    // Every snapshot on the data plane is B's: none holds a block of A.
    for s in client(&dp.addr).list_snapshots().unwrap() {
        let got = snapshot_tags(&dp.addr, s.snap_id, NBLOCKS);
        assert!(
            got.iter().all(|t| t.is_some_and(|t| t < 900_000)),
            "snapshot {} holds A's data",
            s.snap_id
        );
    }
    let head = vol.ship.as_ref().unwrap().status().last_committed.unwrap();
    assert_eq!(snapshot_tags(&dp.addr, head, NBLOCKS), model_tags(&newer));
    vol.shutdown();
}

/// Lost SSD, backing kept, and the snapshots that waited in the outbox lost as well: the data
/// plane is behind the backing (head 1, backing at epoch 2). The volume continues from the
/// backing, and the missing epoch is shipped as only the blocks whose checksum differs from the
/// data plane's head — a resync by checksums, not a full base — chained onto it.
#[test]
fn lost_ssd_and_outbox_ships_only_the_blocks_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let dp_dir = dir.path().join("dp");
    let mut dp = Dp::start(&dp_dir, "127.0.0.1:0");
    let addr = dp.addr.clone();
    let cfg = shipping_cfg(dir.path(), &addr);
    let m1: Vec<u64> = (0..NBLOCKS).map(|b| 1 + b).collect();
    let m2: Vec<u64> = (0..NBLOCKS)
        .map(|b| if b % 8 == 3 { 5_000 + b } else { 1 + b })
        .collect();
    let changed = m1.iter().zip(&m2).filter(|(a, b)| a != b).count() as u64;
    {
        let vol = Volume::open(&cfg).unwrap();
        write_all(&vol, &m1);
        vol.cut_and_flush().unwrap();
        assert_eq!(vol.ship.as_ref().unwrap().status().last_committed, Some(1));
        dp.kill9();
        write_all(&vol, &m2);
        vol.cut_and_flush().unwrap(); // spooled: the data plane is down
        assert_eq!(vol.ship.as_ref().unwrap().status().outbox_entries, 1);
        vol.crash();
    }
    std::fs::remove_dir_all(&cfg.cache.cache_dir).unwrap();
    for e in std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(".delta") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let dp = Dp::start(&dp_dir, &addr);
    let vol = Volume::open(&cfg).unwrap();
    let note = vol.resumed.clone().expect("resumed");
    assert!(note.contains("continued from epoch 2"), "{note}");
    assert_eq!(read_all(&vol), model_tags(&m2));
    let mut m3 = m2.clone();
    m3[0] = 77_777;
    write_all(&vol, &m3[..16]);
    vol.cut_and_flush().unwrap();
    let snaps = client(&dp.addr).list_snapshots().unwrap();
    let chain: Vec<(u64, u64)> = snaps.iter().map(|s| (s.snap_id, s.parent_id)).collect();
    assert_eq!(chain, vec![(1, 0), (2, 1), (3, 2)]);
    assert_eq!(
        snaps[1].bytes,
        changed * BS as u64,
        "only the differing blocks: {snaps:?}"
    );
    assert_eq!(snapshot_tags(&dp.addr, 2, NBLOCKS), model_tags(&m2));
    assert_eq!(snapshot_tags(&dp.addr, 3, NBLOCKS), model_tags(&m3));
    vol.shutdown();
}

/// `recover` (a volume created to hydrate from a snapshot) onto the backing file the volume
/// already had: blocks equal to the snapshot by checksum are kept, only the others fetched.
#[test]
fn recover_onto_a_kept_backing_fetches_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(dir.path(), &dp.addr);
    let m1: Vec<u64> = (0..NBLOCKS).map(|b| 40 + b).collect();
    let mut m2 = m1.clone();
    {
        let vol = Volume::open(&cfg).unwrap();
        write_all(&vol, &m1);
        vol.cut_and_flush().unwrap();
        // Snapshot 2 changes the first 16 blocks; the backing keeps epoch 1's data there only
        // if the flush of 2 never reached it: make it so by restoring those blocks below.
        m2[..16].copy_from_slice(&(0..16).map(|b| 90_000 + b).collect::<Vec<_>>());
        write_all(&vol, &m2[..16]);
        vol.cut_and_flush().unwrap();
        vol.crash();
    }
    // The backing as the volume's old node left it, but with its first 16 blocks at epoch 1.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg.cache.backing)
            .unwrap();
        let mut blk = vec![0u8; BS];
        for b in 0..16u64 {
            fill(m1[b as usize], &mut blk);
            f.write_all_at(&blk, b * BS as u64).unwrap();
        }
    }
    std::fs::remove_dir_all(&cfg.cache.cache_dir).unwrap();
    let mut rcfg = cfg.clone();
    rcfg.hydrate_rate_bytes_per_s = 0;
    rcfg.cache.create_as = Some(deltavol::cache::CreateAs {
        flushed_epoch: 2,
        snap_head: 2,
        generation: 0,
        hydrate_snap: 2,
        hydrate: true,
        volume_id: dataplane_volume_id(&dp.addr),
    });
    let vol = Volume::open(&rcfg).unwrap();
    wait_until("hydration", Duration::from_secs(30), || {
        vol.cache.hydrating().is_none()
    });
    let h = vol.status().hydration.expect("hydration status");
    // 16 differing blocks: one 256 KiB extent (64 blocks) holds them all.
    assert_eq!(h.extents_fetched, 1, "{h:?}");
    assert_eq!(read_all(&vol), model_tags(&m2));
    vol.shutdown();
}

/// `deltavol volume info` and `volume delete` from the command line: the id shown, a bad or
/// wrong `--id` refused with a clear message and nothing deleted, the right one deletes.
#[test]
fn volume_info_and_delete_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let dp_dir = dir.path().join("dp");
    let dp = Dp::start(&dp_dir, "127.0.0.1:0");
    let tok = dp_dir.with_extension("token");
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    let id = [0x5au8; 16];
    let mut c =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "testvol", t, 0, Some(id)).unwrap();
    c.create_volume(NBLOCKS * BS as u64, BS as u32).unwrap();
    drop(c);
    let hex = deltavol::cache::meta::volume_id_hex(&id);
    let dpa = [
        "--dataplane",
        dp.addr.as_str(),
        "--auth-token-file",
        tok.to_str().unwrap(),
    ];
    let with =
        |a: &[&str]| -> Vec<String> { a.iter().chain(dpa.iter()).map(|s| s.to_string()).collect() };
    let run = |a: Vec<String>| deltavol(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let (code, out, err) = run(with(&["volume", "info", "testvol", "--json"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&hex), "{out}");
    let (code, _, err) = run(with(&["volume", "delete", "testvol", "--id", "xyz"]));
    assert_ne!(code, 0);
    assert!(err.contains("is not a volume id"), "{err}");
    let wrong = "11".repeat(16);
    let (code, _, err) = run(with(&["volume", "delete", "testvol", "--id", &wrong]));
    assert_ne!(code, 0);
    assert!(err.contains(&format!("has id {hex}")), "{err}");
    assert!(
        client(&dp.addr).info().exists,
        "nothing deleted by a wrong id"
    );
    let (code, out, err) = run(with(&["volume", "delete", "testvol", "--id", &hex]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted volume testvol"), "{out}");
    assert!(!client(&dp.addr).info().exists);
    let (code, _, err) = run(with(&["volume", "info", "testvol"]));
    assert_ne!(code, 0);
    assert!(err.contains("has no volume \"testvol\""), "{err}");
}

/// `recover --at` an older snapshot than the chain head (the library half the CLI runs before
/// the device is live): the volume hydrates from snapshot 1 while its chain goes on from the
/// head (3); the blocks that differ between them are written back first, so the first new
/// snapshot, on top of the head, equals snapshot 1 — and the device — byte for byte. Without
/// the write-back that snapshot would be the head plus the new writes: silently not the device.
#[test]
fn recover_as_of_an_older_snapshot_writes_the_way_back() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let cfg = shipping_cfg(&dir.path().join("old"), &dp.addr);
    let m1: Vec<u64> = (0..NBLOCKS).map(|b| 1_000 + b).collect();
    let mut m3 = m1.clone();
    {
        let vol = Volume::open(&cfg).unwrap();
        write_all(&vol, &m1);
        vol.cut_and_flush().unwrap();
        let mut d = Driver::new(&vol, 1);
        for b in (0..NBLOCKS).step_by(5) {
            assert!(d.write_tags(0, b, &[2_000 + b], false) > 0);
            m3[b as usize] = 2_000 + b;
        }
        drop(d);
        vol.cut_and_flush().unwrap();
        let mut d = Driver::new(&vol, 1);
        assert_eq!(d.discard(0, 40, 8), 0);
        drop(d);
        m3[40..48].iter_mut().for_each(|t| *t = 0);
        vol.cut_and_flush().unwrap();
        assert_eq!(vol.ship.as_ref().unwrap().status().last_committed, Some(3));
        vol.crash();
    }
    let differ = m1.iter().zip(&m3).filter(|(a, b)| a != b).count() as u64;
    // Another node recovers it as of snapshot 1.
    let id = dataplane_volume_id(&dp.addr);
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    let generation =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "testvol", t, 0, Some(id))
            .unwrap()
            .new_generation()
            .unwrap();
    let mut rcfg = shipping_cfg(&dir.path().join("new"), &dp.addr);
    rcfg.hydrate_rate_bytes_per_s = 64 << 10;
    rcfg.cache.create_as = Some(deltavol::cache::CreateAs {
        flushed_epoch: 3,
        snap_head: 3,
        generation,
        hydrate_snap: 1,
        hydrate: true,
        volume_id: id,
    });
    let vol = Volume::open(&rcfg).unwrap();
    let sc = rcfg.ship.clone().unwrap();
    let n = deltavol::resume::write_rollback(&vol, &sc, 1, 3).unwrap();
    assert_eq!(n, differ);
    let snap = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(snap, Duration::from_secs(30)));
    let snaps = client(&dp.addr).list_snapshots().unwrap();
    let last = snaps.last().unwrap();
    assert_eq!((last.snap_id, last.parent_id), (4, 3));
    assert_eq!(
        last.bytes,
        differ * BS as u64,
        "every differing block, with snapshot 1's data (the discarded ones included)"
    );
    assert_eq!(snapshot_tags(&dp.addr, 4, NBLOCKS), model_tags(&m1));
    assert_eq!(read_all(&vol), model_tags(&m1));
    // And on: new writes chain onto it.
    let mut m5 = m1.clone();
    m5[7] = 55;
    write_all(&vol, &m5[..16]);
    vol.cut_and_flush().unwrap();
    wait_until("hydration", Duration::from_secs(60), || {
        vol.cache.hydrating().is_none()
    });
    assert_eq!(snapshot_tags(&dp.addr, 5, NBLOCKS), model_tags(&m5));
    assert_eq!(read_all(&vol), model_tags(&m5));
    vol.shutdown();
}
