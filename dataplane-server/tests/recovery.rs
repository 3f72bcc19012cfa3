//! Issue 4 on the data plane: generations (fencing a recovered volume's old writer) and
//! metadata-only clones (reads falling through to the source snapshot, across shards), each
//! checked against flat-array models and across a restart.

mod common;

use common::*;
use deltavol_dataplane::server::shard_of;
use deltavol_dataplane::{BeginOutcome, Client};
use deltavol_schemas::wire::ErrorCode;

const BS: usize = 4096;
const BLOCKS: u64 = 512;
const SIZE: u64 = BLOCKS * BS as u64;

fn seed() -> u64 {
    std::env::var("DELTAVOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0004)
}

fn connect_gen(addr: std::net::SocketAddr, volume: &str, generation: u64) -> Client {
    Client::connect_with_generation(addr, TOKEN, volume, timeouts(), generation)
        .expect("client connects")
}

fn tmp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list volume dir")
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn new_generation_fences_the_old_writer() {
    let seed = seed();
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();

    // The original machine: two snapshots, then a third one half uploaded.
    let mut old = connect(addr, "vol-g");
    old.create_volume(SIZE, BS as u32).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    let mut models = Vec::new();
    for snap in 1..=2 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 20);
        upload(&mut old, snap, snap - 1, SIZE, BS, &changes);
        apply(&mut model, BS, &changes);
        models.push(model.clone());
    }
    assert_eq!(
        old.begin_snapshot(3, 2, SIZE).expect("begin 3"),
        BeginOutcome::Started
    );
    old.put_extent(0, 2, &vec![0xabu8; 2 * BS]).expect("put");
    // Push the batch to the server so the upload is really in progress there.
    old.put_extent(4, 256, &vec![0xcdu8; 256 * BS])
        .expect("put big");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let vol_dir = deltavol_dataplane::server::volume_dir(dir.path(), "vol-g");
    assert_eq!(tmp_files(&vol_dir).len(), 1, "the upload is in progress");

    // Recovery elsewhere: a new generation, durable, returned with the head as of the fence.
    let mut new = connect(addr, "vol-g");
    assert_eq!(new.info().generation, 0);
    assert_eq!(new.new_generation().expect("new generation"), 1);
    assert_eq!(new.generation(), 1);
    let info = new.info().clone();
    assert_eq!((info.generation, info.latest_snap_id), (1, 2));
    assert_eq!(new.volume_info().expect("info").generation, 1);
    // The fenced upload left no trace.
    assert!(tmp_files(&vol_dir).is_empty(), "{:?}", tmp_files(&vol_dir));

    // The old writer's upload is refused, with a clear message.
    let err = old.commit().expect_err("fenced commit");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("volume vol-g is now at generation 1")
            && msg.contains("(generation 0) is fenced"),
        "{msg}"
    );

    // The old machine coming back: it authenticates and reads, but cannot write.
    let mut back = connect(addr, "vol-g");
    assert_eq!(back.info().generation, 1);
    check_snapshot(&mut back, 2, &models[1], BS, &mut rng);
    let err = back.begin_snapshot(3, 2, SIZE).expect_err("stale begin");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    assert!(err.to_string().contains("fenced"), "{err}");
    let err = back.delete_snapshot(1).expect_err("stale delete");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    // A begin that claims the new generation on a connection authenticated with the old one
    // is still refused (a writer is as old as its Auth).
    let err = back
        .begin_snapshot(3, 2, SIZE)
        .expect_err("stale begin again");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");

    // The new writer continues the chain from the head.
    let changes = random_changes(&mut rng, BLOCKS, BS, 20);
    upload(&mut new, 3, 2, SIZE, BS, &changes);
    apply(&mut model, BS, &changes);
    models.push(model.clone());
    // Another connection that knows the new generation may write too.
    let mut new2 = connect_gen(addr, "vol-g", 1);
    let changes = random_changes(&mut rng, BLOCKS, BS, 20);
    upload(&mut new2, 4, 3, SIZE, BS, &changes);
    apply(&mut model, BS, &changes);
    models.push(model.clone());
    let list = new2.list_snapshots().expect("list");
    assert_eq!(
        list.iter()
            .map(|s| (s.snap_id, s.parent_id, s.generation))
            .collect::<Vec<_>>(),
        vec![(1, 0, 0), (2, 1, 0), (3, 2, 1), (4, 3, 1)]
    );
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut new2, i as u64 + 1, m, BS, &mut rng);
    }
    server.shutdown();

    // The generation survives a restart; so does the fence.
    let server = in_process(dir.path(), 3);
    let addr = server.local_addr();
    let mut back = connect(addr, "vol-g");
    assert_eq!(back.info().generation, 1);
    assert_eq!(back.info().latest_snap_id, 4);
    let err = back.begin_snapshot(5, 4, SIZE).expect_err("still fenced");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut back, i as u64 + 1, m, BS, &mut rng);
    }
    // A second recovery fences generation 1 in turn.
    let mut writer1 = connect_gen(addr, "vol-g", 1);
    let mut third = connect(addr, "vol-g");
    assert_eq!(third.new_generation().expect("again"), 2);
    let err = writer1
        .begin_snapshot(5, 4, SIZE)
        .expect_err("gen 1 fenced");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    upload(
        &mut third,
        5,
        4,
        SIZE,
        BS,
        &[Change::Zero { lba: 0, nblocks: 8 }],
    );
    // A connection that claims a generation ahead of the volume's bumps past its own claim.
    let mut ahead = connect_gen(addr, "vol-g", 7);
    assert_eq!(ahead.new_generation().expect("past the claim"), 8);
    server.shutdown();
}

#[test]
fn fenced_upload_in_progress_then_closed_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let addr = server.local_addr();
    let mut old = connect(addr, "vol-f");
    old.create_volume(SIZE, BS as u32).expect("create");
    upload(
        &mut old,
        1,
        0,
        SIZE,
        BS,
        &[Change::Zero { lba: 0, nblocks: 1 }],
    );
    old.begin_snapshot(2, 1, SIZE).expect("begin");
    let mut new = connect(addr, "vol-f");
    new.new_generation().expect("fence");
    drop(old);
    std::thread::sleep(std::time::Duration::from_millis(100));
    // A new upload of the same id by the new generation works, and only it is committed.
    upload(
        &mut new,
        2,
        1,
        SIZE,
        BS,
        &[Change::Zero { lba: 1, nblocks: 1 }],
    );
    assert_eq!(new.list_snapshots().expect("list").len(), 2);
    server.shutdown();
    let server = in_process(dir.path(), 1);
    let mut c = connect(server.local_addr(), "vol-f");
    assert_eq!(c.info().generation, 1);
    assert_eq!(c.list_snapshots().expect("list").len(), 2);
    let vol_dir = deltavol_dataplane::server::volume_dir(dir.path(), "vol-f");
    assert!(tmp_files(&vol_dir).is_empty());
    server.shutdown();
}

/// A name whose owner shard differs from `other`'s among `shards`.
fn name_on_another_shard(prefix: &str, other: &str, shards: usize) -> String {
    (0..100)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| shard_of(n, shards) != shard_of(other, shards))
        .expect("some name lands elsewhere")
}

#[test]
fn clone_reads_source_snapshot_plus_its_own_changes() {
    let seed = seed() ^ 0xc10e;
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    const SHARDS: usize = 3;
    let server = in_process(dir.path(), SHARDS);
    let addr = server.local_addr();

    // The source: four snapshots.
    let mut src = connect(addr, "src-vol");
    src.create_volume(SIZE, BS as u32).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    let mut src_models = Vec::new();
    for snap in 1..=4 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 25);
        upload(&mut src, snap, snap - 1, SIZE, BS, &changes);
        apply(&mut model, BS, &changes);
        src_models.push(model.clone());
    }

    // A clone of the middle snapshot, owned by another shard than its source.
    let clone_name = name_on_another_shard("clone-a", "src-vol", SHARDS);
    let mut cl = connect(addr, &clone_name);
    assert!(!cl.info().exists);
    let info = cl.clone_volume("src-vol", 2).expect("clone");
    assert!(info.exists);
    assert_eq!((info.size_bytes, info.block_size), (SIZE, BS as u32));
    assert_eq!(
        (info.clone_source_volume.as_str(), info.clone_source_snap_id),
        ("src-vol", 2)
    );
    assert_eq!((info.latest_snap_id, info.snapshot_count), (0, 0));
    // Its base, before it has any snapshot: the source as of snapshot 2.
    check_snapshot(&mut cl, 0, &src_models[1], BS, &mut rng);

    // The clone's own chain (ids of its choosing, first parent 0) and more source snapshots.
    let mut clone_model = src_models[1].clone();
    let mut clone_models = Vec::new();
    for (snap, parent) in [(100u64, 0u64), (101, 100)] {
        let changes = random_changes(&mut rng, BLOCKS, BS, 25);
        upload(&mut cl, snap, parent, SIZE, BS, &changes);
        apply(&mut clone_model, BS, &changes);
        clone_models.push((snap, clone_model.clone()));
    }
    let changes = random_changes(&mut rng, BLOCKS, BS, 25);
    upload(&mut src, 5, 4, SIZE, BS, &changes);
    apply(&mut model, BS, &changes);
    src_models.push(model.clone());

    // A clone of the clone (chains fall through twice), on yet another name.
    let mut cl2 = connect(addr, "clone-b");
    let info2 = cl2
        .clone_volume(&clone_name, 100)
        .expect("clone of a clone");
    assert_eq!(info2.clone_source_snap_id, 100);
    let mut clone2_model = clone_models[0].1.clone();
    let changes = random_changes(&mut rng, BLOCKS, BS, 10);
    upload(&mut cl2, 1, 0, SIZE, BS, &changes);
    apply(&mut clone2_model, BS, &changes);

    let check_all = |rng: &mut Rng| {
        let mut src = connect(addr, "src-vol");
        for (i, m) in src_models.iter().enumerate() {
            check_snapshot(&mut src, i as u64 + 1, m, BS, rng);
        }
        let mut cl = connect(addr, &clone_name);
        check_snapshot(&mut cl, 0, &src_models[1], BS, rng);
        for (snap, m) in &clone_models {
            check_snapshot(&mut cl, *snap, m, BS, rng);
        }
        let mut cl2 = connect(addr, "clone-b");
        check_snapshot(&mut cl2, 0, &clone_models[0].1, BS, rng);
        check_snapshot(&mut cl2, 1, &clone2_model, BS, rng);
    };
    check_all(&mut rng);

    // Refusals.
    let err = connect(addr, &clone_name)
        .clone_volume("src-vol", 1)
        .expect_err("clone onto an existing volume");
    assert_eq!(err.server_code(), Some(ErrorCode::VolumeExists), "{err}");
    let err = connect(addr, "src-vol")
        .clone_volume("src-vol", 1)
        .expect_err("clone onto itself");
    assert_eq!(err.server_code(), Some(ErrorCode::VolumeExists), "{err}");
    let mut x = connect(addr, "clone-x");
    let err = x.clone_volume("src-vol", 99).expect_err("missing snapshot");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot), "{err}");
    let err = x
        .clone_volume("no-such-vol", 1)
        .expect_err("missing volume");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchVolume), "{err}");
    assert!(
        !x.volume_info().expect("info").exists,
        "nothing was created"
    );
    let err = src.delete_snapshot(2).expect_err("a clone depends on it");
    assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
    assert!(err.to_string().contains(&clone_name), "{err}");
    let err = cl.delete_snapshot(100).expect_err("clone-b depends on it");
    assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
    // Snapshots no clone depends on can go; the clones still read exactly.
    let base = src_models[1].clone();
    assert_eq!(src.delete_snapshot(1).expect("delete 1"), 2);
    assert_eq!(src.delete_snapshot(3).expect("delete 3"), 4);
    src_models.remove(2);
    src_models.remove(0);
    check_snapshot(&mut cl, 0, &base, BS, &mut rng);
    check_snapshot(&mut cl, 101, &clone_models[1].1, BS, &mut rng);
    // A non-clone has no base to read at snapshot 0.
    let err = src
        .read_extents(0, 0, 1, &mut [0u8; BS])
        .expect_err("no snapshot 0");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot), "{err}");
    server.shutdown();

    // After a restart: same contents, the clone's description, and the dependencies.
    let server = in_process(dir.path(), SHARDS);
    let addr = server.local_addr();
    let mut cl = connect(addr, &clone_name);
    let info = cl.info().clone();
    assert_eq!(
        (
            info.clone_source_volume.as_str(),
            info.clone_source_snap_id,
            info.latest_snap_id,
            info.snapshot_count
        ),
        ("src-vol", 2, 101, 2)
    );
    let mut src = connect(addr, "src-vol");
    let err = src.delete_snapshot(2).expect_err("still depended on");
    assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
    let mut src_check = connect(addr, "src-vol");
    // Source snapshots 2, 4, 5 remain (1 and 3 were merged away).
    let ids: Vec<u64> = src_check
        .list_snapshots()
        .expect("list")
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(ids, vec![2, 4, 5]);
    for (id, m) in ids.iter().zip(&src_models) {
        check_snapshot(&mut src_check, *id, m, BS, &mut rng);
    }
    check_snapshot(&mut cl, 0, &base, BS, &mut rng);
    for (snap, m) in &clone_models {
        check_snapshot(&mut cl, *snap, m, BS, &mut rng);
    }
    let mut cl2 = connect(addr, "clone-b");
    check_snapshot(&mut cl2, 0, &clone_models[0].1, BS, &mut rng);
    check_snapshot(&mut cl2, 1, &clone2_model, BS, &mut rng);
    server.shutdown();
}

#[test]
fn clone_and_source_segments_with_the_same_id_are_not_confused() {
    // The source's snapshot 1 and the clone's own snapshot 1 are different segment files
    // with the same id; one read interleaves records of both.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let mut src = connect(addr, "same-src");
    src.create_volume(SIZE, BS as u32).expect("create");
    let a = vec![0xaau8; 64 * BS];
    upload(
        &mut src,
        1,
        0,
        SIZE,
        BS,
        &[Change::Data {
            lba: 0,
            data: a.clone(),
        }],
    );
    let mut cl = connect(addr, "same-clone");
    cl.clone_volume("same-src", 1).expect("clone");
    let b = vec![0xbbu8; 10 * BS];
    upload(
        &mut cl,
        1,
        0,
        SIZE,
        BS,
        &[Change::Data {
            lba: 10,
            data: b.clone(),
        }],
    );
    let mut model = vec![0u8; SIZE as usize];
    apply(&mut model, BS, &[Change::Data { lba: 0, data: a }]);
    apply(&mut model, BS, &[Change::Data { lba: 10, data: b }]);
    let mut rng = Rng::new(7);
    check_snapshot(&mut cl, 1, &model, BS, &mut rng);
    // A fresh volume on a connection that does not exist yet cannot be fenced.
    let err = connect(addr, "nope")
        .new_generation()
        .expect_err("no such volume");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchVolume), "{err}");
    server.shutdown();
}

#[test]
fn new_generation_is_durable_before_the_answer_kill9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let token = write_token(dir.path());
    let server = ChildServer::spawn(&data, &token);
    let mut c = connect(server.addr, "vol-k");
    c.create_volume(SIZE, BS as u32).expect("create");
    upload(
        &mut c,
        1,
        0,
        SIZE,
        BS,
        &[Change::Zero { lba: 0, nblocks: 4 }],
    );
    let mut clone = connect(server.addr, "vol-k-clone");
    clone.clone_volume("vol-k", 1).expect("clone");
    assert_eq!(c.new_generation().expect("fence"), 1);
    server.kill9();
    let server = ChildServer::spawn(&data, &token);
    let mut c = connect(server.addr, "vol-k");
    assert_eq!(
        (c.info().generation, c.info().latest_snap_id),
        (1, 1),
        "the fence survived kill -9"
    );
    let err = c.begin_snapshot(2, 1, SIZE).expect_err("gen 0 is fenced");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    let clone = connect(server.addr, "vol-k-clone");
    assert_eq!(clone.info().clone_source_volume, "vol-k");
    let err = c.delete_snapshot(1).expect_err("fenced before InUse");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    server.kill9();
}

#[test]
fn hostile_clone_requests_get_clear_errors() {
    use deltavol_schemas::flatbuffers::FlatBufferBuilder;
    use deltavol_schemas::wire;
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let (mut s, reply) = raw_auth(addr, TOKEN, "evil-clone");
    assert_eq!(reply.map(|r| r.0), Some(wire::Message::AuthOk));
    let mut fbb = FlatBufferBuilder::new();
    for (source, code) in [
        (Some("../../etc"), ErrorCode::NoSuchVolume),
        (None, ErrorCode::NoSuchVolume),
        (Some("evil-clone"), ErrorCode::VolumeExists),
    ] {
        let src = source.map(|n| fbb.create_string(n));
        let body = wire::CloneVolume::create(
            &mut fbb,
            &wire::CloneVolumeArgs {
                source_volume: src,
                source_snap_id: 1,
            },
        );
        let f = frame(
            &mut fbb,
            wire::Message::CloneVolume,
            body.as_union_value(),
            &[],
        );
        s.write_all(&f).expect("send");
        let (ty, got, msg) = read_reply(&mut s).expect("reply");
        assert_eq!(
            (ty, got),
            (wire::Message::Error, Some(code)),
            "{source:?}: {msg}"
        );
    }
    // The connection goes on: the volume still does not exist.
    let body = wire::GetVolumeInfo::create(&mut fbb, &wire::GetVolumeInfoArgs { reserved: 0 });
    let f = frame(
        &mut fbb,
        wire::Message::GetVolumeInfo,
        body.as_union_value(),
        &[],
    );
    s.write_all(&f).expect("send");
    let (ty, got, _) = read_reply(&mut s).expect("reply");
    assert_eq!((ty, got), (wire::Message::VolumeInfo, None));
    assert!(!dir.path().join("volumes/evil-clone").exists());
    server.shutdown();
}
