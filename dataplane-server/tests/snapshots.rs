//! Snapshot chains against a real server on 127.0.0.1: round trip against a flat-array model,
//! idempotent begin, delete-and-merge, restart rebuilding the index, corruption detection,
//! and `kill -9` of the real binary mid-upload.

mod common;

use common::*;
use deltavol_dataplane::{BeginOutcome, ClientErrorKind};
use deltavol_schemas::wire::ErrorCode;

const BS: usize = 4096;
const BLOCKS: u64 = 1024;
const SIZE: u64 = BLOCKS * BS as u64;

fn seed() -> u64 {
    std::env::var("DELTAVOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001)
}

/// Uploads `n` random snapshots; returns the model of the volume at each of them.
fn build_chain(c: &mut deltavol_dataplane::Client, rng: &mut Rng, n: u64) -> Vec<Vec<u8>> {
    let mut model = vec![0u8; SIZE as usize];
    let mut models = Vec::new();
    for snap in 1..=n {
        let changes = random_changes(rng, BLOCKS, BS, 40);
        upload(c, snap, snap - 1, SIZE, BS, &changes);
        apply(&mut model, BS, &changes);
        models.push(model.clone());
    }
    models
}

#[test]
fn snapshot_chain_round_trip_matches_model() {
    let seed = seed();
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let mut c = connect(server.local_addr(), "vol-a");
    assert!(!c.info().exists);
    let info = c.create_volume(SIZE, BS as u32).expect("create");
    assert!(info.exists && info.size_bytes == SIZE && info.block_size == BS as u32);
    // Idempotent with the same geometry, refused with another.
    c.create_volume(SIZE, BS as u32).expect("create again");
    let err = c
        .create_volume(SIZE * 2, BS as u32)
        .expect_err("different size");
    assert_eq!(err.server_code(), Some(ErrorCode::VolumeMismatch), "{err}");

    let mut rng = Rng::new(seed);
    let models = build_chain(&mut c, &mut rng, 6);
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
    }

    let list = c.list_snapshots().expect("list");
    assert_eq!(
        list.iter()
            .map(|s| (s.snap_id, s.parent_id))
            .collect::<Vec<_>>(),
        (1..=6).map(|i| (i, i - 1)).collect::<Vec<_>>()
    );
    assert!(list
        .iter()
        .all(|s| s.commit_time_ms > 0 && s.extent_count > 0 && s.volume_size == SIZE));

    // A retried snapshot is recognised, never shipped twice.
    match c.begin_snapshot(6, 5, SIZE).expect("begin again") {
        BeginOutcome::AlreadyCommitted(info) => assert_eq!((info.snap_id, info.parent_id), (6, 5)),
        other => panic!("expected AlreadyCommitted, got {other:?}"),
    }
    // Wrong parent, and an id not after the head.
    let err = c
        .begin_snapshot(7, 5, SIZE)
        .expect_err("parent is not the head");
    assert_eq!(err.server_code(), Some(ErrorCode::BadParent), "{err}");
    let err = c
        .begin_snapshot(0, 6, SIZE)
        .expect_err("id not after the head");
    assert_eq!(err.server_code(), Some(ErrorCode::BadSnapshotId), "{err}");
    let err = c
        .read_extents(99, 0, 1, &mut [0u8; BS])
        .expect_err("no such snapshot");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot), "{err}");
    let err = c
        .read_extents(1, BLOCKS - 1, 2, &mut [0u8; 2 * BS])
        .expect_err("read past the end");
    assert_eq!(err.server_code(), Some(ErrorCode::OutOfRange), "{err}");
    // The connection still works after refused requests.
    check_snapshot(&mut c, 6, &models[5], BS, &mut rng);

    // A second volume on another connection is independent.
    let mut c2 = connect(server.local_addr(), "vol-b");
    c2.create_volume(SIZE, BS as u32).expect("create b");
    let err = c2
        .read_extents(1, 0, 1, &mut [0u8; BS])
        .expect_err("vol-b has no snapshot 1");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot));
    server.shutdown();
}

#[test]
fn delete_snapshot_merges_into_the_next() {
    let seed = seed() ^ 0xde1e7e;
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let mut c = connect(server.local_addr(), "vol-d");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(seed);
    let models = build_chain(&mut c, &mut rng, 5);

    let err = c
        .delete_snapshot(5)
        .expect_err("the head cannot be deleted");
    assert_eq!(err.server_code(), Some(ErrorCode::DeleteHead), "{err}");
    assert_eq!(c.delete_snapshot(3).expect("delete 3"), 4);
    assert_eq!(c.delete_snapshot(1).expect("delete 1"), 2);
    let err = c.delete_snapshot(3).expect_err("already gone");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot));

    let list = c.list_snapshots().expect("list");
    assert_eq!(
        list.iter()
            .map(|s| (s.snap_id, s.parent_id))
            .collect::<Vec<_>>(),
        vec![(2, 0), (4, 2), (5, 4)]
    );
    for snap in [2u64, 4, 5] {
        check_snapshot(&mut c, snap, &models[snap as usize - 1], BS, &mut rng);
    }
    // The chain continues from the head; delete 2 (now the oldest) too.
    let changes = random_changes(&mut rng, BLOCKS, BS, 10);
    upload(&mut c, 6, 5, SIZE, BS, &changes);
    let mut m6 = models[4].clone();
    apply(&mut m6, BS, &changes);
    assert_eq!(c.delete_snapshot(2).expect("delete 2"), 4);
    check_snapshot(&mut c, 4, &models[3], BS, &mut rng);
    check_snapshot(&mut c, 6, &m6, BS, &mut rng);
    server.shutdown();

    // The merged chain survives a restart.
    let server = in_process(dir.path(), 2);
    let mut c = connect(server.local_addr(), "vol-d");
    let list = c.list_snapshots().expect("list");
    assert_eq!(
        list.iter()
            .map(|s| (s.snap_id, s.parent_id))
            .collect::<Vec<_>>(),
        vec![(4, 0), (5, 4), (6, 5)]
    );
    check_snapshot(&mut c, 4, &models[3], BS, &mut rng);
    check_snapshot(&mut c, 5, &models[4], BS, &mut rng);
    check_snapshot(&mut c, 6, &m6, BS, &mut rng);
    server.shutdown();
}

#[test]
fn restart_rebuilds_the_index_and_detects_corruption() {
    // This test names and damages segment files by snapshot: no compaction in this process
    // (its random snapshots overlap within themselves, which compaction would rewrite).
    use deltavol_dataplane::store::compaction::Tuning;
    Tuning {
        live_ratio: 0.0,
        ..Tuning::current()
    }
    .apply();
    let seed = seed() ^ 0x4e57;
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(seed);
    let models = {
        let server = in_process(dir.path(), 2);
        let mut c = connect(server.local_addr(), "vol-r");
        c.create_volume(SIZE, BS as u32).expect("create");
        let models = build_chain(&mut c, &mut rng, 4);
        server.shutdown();
        models
    };
    // What a crash between the steps of a commit leaves: a renamed segment no manifest names,
    // temp files. All removed at start-up; the committed chain is intact.
    let vol_dir = dir.path().join("volumes/vol-r");
    std::fs::copy(vol_dir.join("snap-4.seg"), vol_dir.join("snap-5.seg")).expect("orphan segment");
    std::fs::write(vol_dir.join("MANIFEST.tmp"), b"half a manifest").expect("temp manifest");
    std::fs::write(vol_dir.join("snap-5.seg.tmp"), b"half a segment").expect("temp segment");
    {
        let server = in_process(dir.path(), 3);
        let mut c = connect(server.local_addr(), "vol-r");
        assert_eq!(c.info().latest_snap_id, 4);
        for (i, m) in models.iter().enumerate() {
            check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
        }
        let mut names: Vec<String> = std::fs::read_dir(&vol_dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "MANIFEST",
                "snap-1.seg",
                "snap-2.seg",
                "snap-3.seg",
                "snap-4.seg"
            ]
        );
        // The chain continues after a restart.
        let changes = random_changes(&mut rng, BLOCKS, BS, 5);
        upload(&mut c, 5, 4, SIZE, BS, &changes);
        server.shutdown();
    }
    // A volume whose snapshot 1 is one data extent: flip one byte of that data on disk.
    {
        let server = in_process(dir.path(), 1);
        let mut c = connect(server.local_addr(), "vol-c");
        c.create_volume(SIZE, BS as u32).expect("create");
        c.begin_snapshot(1, 0, SIZE).expect("begin");
        c.put_extent(0, 8, &vec![0x11u8; 8 * BS]).expect("put");
        c.commit().expect("commit");
        c.begin_snapshot(2, 1, SIZE).expect("begin");
        c.put_extent(100, 8, &vec![0x22u8; 8 * BS]).expect("put");
        c.commit().expect("commit");
        server.shutdown();
    }
    let seg = dir.path().join("volumes/vol-c/snap-1.seg");
    let mut raw = std::fs::read(&seg).expect("read segment");
    // Segment header (64), batch header (32), one extent record (24), then the data.
    raw[64 + 32 + 24 + 100] ^= 0xff;
    std::fs::write(&seg, &raw).expect("write segment");
    {
        let server = in_process(dir.path(), 1);
        let mut c = connect(server.local_addr(), "vol-c");
        let mut buf = vec![0u8; 8 * BS];
        let err = c
            .read_extents(2, 0, 8, &mut buf)
            .expect_err("corrupt data is refused");
        assert_eq!(err.server_code(), Some(ErrorCode::Checksum), "{err}");
        // Blocks that do not depend on the corrupt extent are still served.
        c.read_extents(2, 100, 8, &mut buf).expect("intact extent");
        assert!(buf.iter().all(|b| *b == 0x22));
        server.shutdown();
    }
    // Break segment 3's footer: the volume is reported damaged at load, not silently used.
    let seg = dir.path().join("volumes/vol-r/snap-3.seg");
    let mut raw = std::fs::read(&seg).expect("read segment");
    let n = raw.len();
    raw[n - 40] ^= 0xff;
    std::fs::write(&seg, &raw).expect("write segment");
    {
        let server = in_process(dir.path(), 1);
        let mut c = connect(server.local_addr(), "vol-r");
        let err = c
            .read_extents(1, 0, 1, &mut [0u8; BS])
            .expect_err("damaged volume");
        assert_eq!(err.server_code(), Some(ErrorCode::Damaged), "{err}");
        assert!(err.to_string().contains("segment 3"), "{err}");
        server.shutdown();
    }
}

#[test]
fn kill9_mid_upload_leaves_no_trace_and_resend_works() {
    let seed = seed() ^ 0x9;
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let token = write_token(dir.path());
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; SIZE as usize];

    let server = ChildServer::spawn(&data_dir, &token);
    let mut c = connect(server.addr, "vol-k");
    c.create_volume(SIZE, BS as u32).expect("create");
    let first = random_changes(&mut rng, BLOCKS, BS, 20);
    upload(&mut c, 1, 0, SIZE, BS, &first);
    apply(&mut model, BS, &first);
    let m1 = model.clone();

    // Snapshot 2: stream several MiB, then kill the server before the commit.
    let second = random_changes(&mut rng, BLOCKS, BS, 60);
    assert_eq!(
        c.begin_snapshot(2, 1, SIZE).expect("begin"),
        BeginOutcome::Started
    );
    for ch in &second {
        match ch {
            Change::Data { lba, data } => c
                .put_extent(*lba, (data.len() / BS) as u32, data)
                .expect("put"),
            Change::Zero { lba, nblocks } => c.put_zero_extent(*lba, *nblocks).expect("put zero"),
        }
    }
    let vol_dir = data_dir.join("volumes/vol-k");
    // Wait until the server has written part of the temp segment, so the kill is mid-upload.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The upload's temp file is `snap-2.seg.<epoch>.tmp`.
    let tmp_len = || {
        std::fs::read_dir(&vol_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("snap-2.seg.") && n.ends_with(".tmp")
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    while tmp_len() < (1 << 20) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(tmp_len() >= 1 << 20, "upload in progress on disk");
    server.kill9();
    let err = c.commit().expect_err("server is gone");
    assert_eq!(err.kind(), ClientErrorKind::Io, "{err}");

    let server = ChildServer::spawn(&data_dir, &token);
    let names: Vec<String> = std::fs::read_dir(&vol_dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".tmp") || n == "snap-2.seg"),
        "leftovers: {names:?}"
    );
    let mut c = connect(server.addr, "vol-k");
    assert_eq!(c.info().latest_snap_id, 1);
    let list = c.list_snapshots().expect("list");
    assert_eq!(list.len(), 1);
    let err = c
        .read_extents(2, 0, 1, &mut [0u8; BS])
        .expect_err("snapshot 2 is not visible");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot));
    check_snapshot(&mut c, 1, &m1, BS, &mut rng);

    // The client re-sends snapshot 2 whole.
    upload(&mut c, 2, 1, SIZE, BS, &second);
    apply(&mut model, BS, &second);
    check_snapshot(&mut c, 2, &model, BS, &mut rng);
    check_snapshot(&mut c, 1, &m1, BS, &mut rng);
    server.kill9();
}

#[test]
fn many_volumes_across_shards_and_generations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 3);
    let addr = server.local_addr();
    let workers: Vec<_> = (0..6u64)
        .map(|v| {
            std::thread::spawn(move || {
                let name = format!("vol-{v}");
                let mut rng = Rng::new(1000 + v);
                let mut c = connect(addr, &name);
                c.create_volume(SIZE, BS as u32).expect("create");
                let mut model = vec![0u8; SIZE as usize];
                for snap in 1..=3 {
                    let changes = random_changes(&mut rng, BLOCKS, BS, 10);
                    upload(&mut c, snap, snap - 1, SIZE, BS, &changes);
                    apply(&mut model, BS, &changes);
                    // A second connection to the same volume sees the commit at once.
                    let mut other = connect(addr, &name);
                    check_snapshot(&mut other, snap, &model, BS, &mut rng);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let stats = server.stats();
    let handed_off = stats.handed_off.load(std::sync::atomic::Ordering::Relaxed);
    let authenticated = stats
        .authenticated
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{authenticated} connections, {handed_off} handed to their volume's owner shard");
    assert!(authenticated >= 24);
    assert!(
        handed_off > 0,
        "no connection was handed off between shards"
    );

    // Generations: stored with each snapshot; an older generation is refused.
    let mut c =
        deltavol_dataplane::Client::connect_with_generation(addr, TOKEN, "vol-0", timeouts(), 5)
            .expect("connect");
    upload(
        &mut c,
        4,
        3,
        SIZE,
        BS,
        &[Change::Zero { lba: 0, nblocks: 1 }],
    );
    assert_eq!(c.volume_info().expect("info").generation, 5);
    assert_eq!(
        c.list_snapshots()
            .expect("list")
            .last()
            .map(|s| s.generation),
        Some(5)
    );
    let mut old = connect(addr, "vol-0");
    let err = old
        .begin_snapshot(5, 4, SIZE)
        .expect_err("stale generation");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    server.shutdown();

    // An unreadable manifest: that volume is refused with the reason, the others are served.
    let manifest = dir.path().join("volumes/vol-1/MANIFEST");
    let mut raw = std::fs::read(&manifest).expect("read manifest");
    raw[70] ^= 0xff;
    std::fs::write(&manifest, &raw).expect("write manifest");
    let server = in_process(dir.path(), 2);
    let err = deltavol_dataplane::Client::connect(server.local_addr(), TOKEN, "vol-1", timeouts())
        .expect_err("damaged volume is refused");
    assert_eq!(err.server_code(), Some(ErrorCode::Damaged), "{err}");
    assert!(err.to_string().contains("manifest"), "{err}");
    let mut c = connect(server.local_addr(), "vol-2");
    assert_eq!(c.list_snapshots().expect("list").len(), 3);
    server.shutdown();
}

#[test]
fn a_new_upload_supersedes_a_stalled_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let mut stalled = connect(addr, "vol-s");
    stalled.create_volume(SIZE, BS as u32).expect("create");
    assert_eq!(
        stalled.begin_snapshot(1, 0, SIZE).expect("begin"),
        BeginOutcome::Started
    );
    stalled
        .put_extent(0, 4, &vec![0xaau8; 4 * BS])
        .expect("put");

    // The same client, reconnected (the old connection is still open): its begin wins.
    let mut fresh = connect(addr, "vol-s");
    assert_eq!(
        fresh.begin_snapshot(1, 0, SIZE).expect("begin"),
        BeginOutcome::Started
    );
    fresh.put_extent(0, 4, &vec![0xbbu8; 4 * BS]).expect("put");
    fresh.commit().expect("commit");

    let err = stalled.commit().expect_err("superseded");
    assert_eq!(
        err.server_code(),
        Some(ErrorCode::UploadInProgress),
        "{err}"
    );
    assert!(err.to_string().contains("superseded"), "{err}");

    let mut buf = vec![0u8; 4 * BS];
    fresh.read_extents(1, 0, 4, &mut buf).expect("read");
    assert!(buf.iter().all(|b| *b == 0xbb));
    assert_eq!(fresh.list_snapshots().expect("list").len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("volumes/vol-s"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    server.shutdown();
}

/// `ReadChecksums`: the crc32c of every block as of each snapshot equals the model's, without
/// the data; a clone's checksums fall through to its source; requests past the end are
/// refused.
#[test]
fn checksum_read_matches_the_model_at_every_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let mut c = connect(server.local_addr(), "vol-crc");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(0xc3c);
    let models = build_chain(&mut c, &mut rng, 4);
    let crcs_of = |m: &[u8]| -> Vec<u32> { m.chunks(BS).map(crc32c::crc32c).collect() };
    for (i, m) in models.iter().enumerate() {
        let got = c
            .read_checksums(i as u64 + 1, 0, BLOCKS)
            .expect("checksums");
        assert_eq!(got, crcs_of(m), "snapshot {}", i + 1);
        // An unaligned window, crossing request chunks of the client as well.
        let got = c.read_checksums(i as u64 + 1, 5, 300).expect("checksums");
        assert_eq!(got, crcs_of(&m[5 * BS..305 * BS]));
    }
    let err = c
        .read_checksums(4, BLOCKS - 1, 2)
        .expect_err("past the end");
    assert_eq!(err.server_code(), Some(ErrorCode::OutOfRange), "{err}");
    let mut c = connect(server.local_addr(), "vol-crc");
    let err = c.read_checksums(99, 0, 1).expect_err("no such snapshot");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot), "{err}");

    let mut cl = connect(server.local_addr(), "vol-crc-clone");
    cl.clone_volume("vol-crc", 2).expect("clone");
    assert_eq!(
        cl.read_checksums(0, 0, BLOCKS).expect("base"),
        crcs_of(&models[1])
    );
}

/// The cut time a client gives with BeginSnapshot is stored with the snapshot, answered by
/// Commit, AlreadyCommitted, ListSnapshots and VolumeInfo, and kept across a restart; a
/// client that gives none (an older one) gets 0 (unknown) and the commit time stands in.
#[test]
fn cut_times_are_stored_listed_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cut1 = 1_600_000_000_000u64; // long before the commit: a snapshot that waited
    {
        let server = in_process(dir.path(), 1);
        let mut c = connect(server.local_addr(), "vol-t");
        c.create_volume(SIZE, BS as u32).expect("create");
        assert_eq!(
            c.begin_snapshot_cut_at(1, 0, SIZE, cut1).expect("begin"),
            BeginOutcome::Started
        );
        c.put_zero_extent(0, 1).expect("put");
        let info = c.commit().expect("commit");
        assert_eq!(info.cut_time_ms, cut1);
        assert!(info.commit_time_ms > cut1 + 1000);
        assert_eq!(info.point_in_time_ms(), (cut1, true));
        // A retry of the same snapshot is answered with the stored cut time.
        match c
            .begin_snapshot_cut_at(1, 0, SIZE, cut1 + 5)
            .expect("again")
        {
            BeginOutcome::AlreadyCommitted(i) => assert_eq!(i.cut_time_ms, cut1),
            o => panic!("{o:?}"),
        }
        // An older client gives no cut time.
        upload(&mut c, 2, 1, SIZE, BS, &[]);
        assert_eq!(c.volume_info().expect("info").latest_cut_ms, 0);
        server.shutdown();
    }
    let server = in_process(dir.path(), 1);
    let mut c = connect(server.local_addr(), "vol-t");
    let list = c.list_snapshots().expect("list");
    assert_eq!(
        list.iter().map(|s| s.cut_time_ms).collect::<Vec<_>>(),
        [cut1, 0]
    );
    let (t2, is_cut) = list[1].point_in_time_ms();
    assert!(!is_cut && t2 == list[1].commit_time_ms);
}

/// `put_extents_from` (frames gathered straight from the caller's buffer, split at the frame
/// caps) and `put_extent_with_crc` (a checksum the caller has) give the same snapshots as
/// `put_extent`; a wrong checksum is refused.
#[test]
fn extents_from_a_buffer_and_with_a_known_crc() {
    let seed = seed() ^ 0x9a7e;
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let mut c = connect(server.local_addr(), "vol-v");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; SIZE as usize];
    // Snapshot 1: every other block (more extents than a frame carries), then 300 blocks
    // at once (more payload than a frame carries, in extents of at most 256), from one buffer
    // with gaps between the extents, and a zero extent between two groups.
    let mut buf = vec![0u8; 2 * SIZE as usize];
    rng.fill(&mut buf);
    let mut exts: Vec<(u64, u32, usize)> = (0..BLOCKS / 2)
        .map(|i| (2 * i, 1, 2 * i as usize * BS + 7))
        .collect();
    let tail: Vec<(u64, u32, usize)> =
        vec![(1, 255, SIZE as usize), (257, 45, SIZE as usize + 255 * BS)];
    assert!(matches!(
        c.begin_snapshot(1, 0, SIZE).expect("begin"),
        BeginOutcome::Started
    ));
    c.put_extents_from(&buf, &exts).expect("put_extents_from");
    c.put_zero_extent(1000, 3).expect("zero");
    c.put_extents_from(&buf, &tail)
        .expect("put_extents_from, long");
    c.commit().expect("commit 1");
    exts.extend_from_slice(&tail);
    for (lba, n, at) in &exts {
        let (o, len) = (*lba as usize * BS, *n as usize * BS);
        model[o..o + len].copy_from_slice(&buf[*at..*at + len]);
    }
    model[1000 * BS..1003 * BS].fill(0);
    check_snapshot(&mut c, 1, &model, BS, &mut rng);
    // Snapshot 2: with known checksums.
    let mut d = vec![0u8; 4 * BS];
    rng.fill(&mut d);
    c.begin_snapshot(2, 1, SIZE).expect("begin 2");
    c.put_extent_with_crc(10, 4, &d, crc32c::crc32c(&d))
        .expect("with crc");
    c.commit().expect("commit 2");
    model[10 * BS..14 * BS].copy_from_slice(&d);
    check_snapshot(&mut c, 2, &model, BS, &mut rng);
    // A wrong one is refused.
    c.begin_snapshot(3, 2, SIZE).expect("begin 3");
    let r = c
        .put_extent_with_crc(20, 4, &d, crc32c::crc32c(&d) ^ 1)
        .and_then(|()| c.commit().map(|_| ()));
    assert!(r.is_err(), "a wrong checksum was taken");
    server.shutdown();
}
