//! The data plane on an S3-compatible object store (moto's server on 127.0.0.1): snapshot
//! chains, restart, clones, delete-by-merge, verify and damage detection; two servers racing
//! to commit one snapshot; GC interrupted and rerun.

mod common;
mod moto;

use common::*;
use deltavol_dataplane::store::backend::{self, ObjBackend};
use deltavol_schemas::wire::ErrorCode;
use moto::{run_tool, Moto, S3Server};

const BS: usize = 4096;
const BLOCKS: u64 = 1024;
const SIZE: u64 = BLOCKS * BS as u64;

/// These tests count and damage segment objects by snapshot: compaction (which also rewrites
/// a snapshot whose own extents overlap) is off for them; `tests/compaction.rs` covers it.
const NO_COMPACT: [&str; 2] = ["--compact-live-ratio", "0"];

fn seed() -> u64 {
    std::env::var("DELTAVOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0007)
}

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

fn tool_args(moto: &Moto, bucket: &str, dir: &std::path::Path, cmd: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    a.push("--data-dir".into());
    a.push(dir.display().to_string());
    a.extend(moto.store_args(bucket));
    a
}

/// Keys under `volumes/<vol>/<sub>/` of the bucket.
fn keys(obj: &ObjBackend, vol: &str, sub: &str) -> Vec<object_store::ObjectMeta> {
    obj.block_on(obj.list(&format!("volumes/{vol}/{sub}")))
        .expect("list")
}

/// Walks a segment's batches (format of `store::format`): (lba, nblocks, data offset) of
/// every data extent, in order.
fn data_extents(raw: &[u8]) -> Vec<(u64, u32, u64)> {
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
    let footer_at = u64_at(raw.len() - 32) as usize;
    let mut out = Vec::new();
    let mut pos = 64;
    while pos < footer_at {
        let count = u32_at(pos + 4) as usize;
        let payload = u32_at(pos + 8) as usize;
        let mut data = (pos + 32 + count * 24) as u64;
        for k in 0..count {
            let r = pos + 32 + k * 24;
            if raw[r + 16] == 0 {
                let nblocks = u32_at(r + 8);
                out.push((u64_at(r), nblocks, data));
                data += u64::from(nblocks) * BS as u64;
            }
        }
        pos += 32 + count * 24 + payload;
    }
    out
}

#[test]
fn snapshot_clone_delete_verify_on_s3() {
    let Some(moto) = Moto::start("snapshot_clone_delete_verify_on_s3") else {
        return;
    };
    let seed = seed();
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let bucket = moto.bucket("suite");
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    let server = S3Server::spawn(&moto, &bucket, &dir.path().join("a"), &token, &NO_COMPACT);
    let mut c = connect(server.addr, "vol-a");
    assert!(!c.info().exists);
    c.create_volume(SIZE, BS as u32).expect("create");
    c.create_volume(SIZE, BS as u32)
        .expect("create again (idempotent)");
    let err = c
        .create_volume(SIZE * 2, BS as u32)
        .expect_err("other size");
    assert_eq!(err.server_code(), Some(ErrorCode::VolumeMismatch), "{err}");

    let mut rng = Rng::new(seed);
    let mut models = build_chain(&mut c, &mut rng, 5);
    // One snapshot larger than a multipart part (8 MiB): 12 MiB over a 16 MiB volume.
    let big_blocks = 4096u64;
    let big_size = big_blocks * BS as u64;
    let mut cb = connect(server.addr, "vol-big");
    cb.create_volume(big_size, BS as u32).expect("create big");
    let mut big = vec![0u8; (12 << 20) as usize];
    rng.fill(&mut big);
    let changes = vec![Change::Data {
        lba: 100,
        data: big,
    }];
    upload(&mut cb, 1, 0, big_size, BS, &changes);
    let mut big_model = vec![0u8; big_size as usize];
    apply(&mut big_model, BS, &changes);
    check_snapshot(&mut cb, 1, &big_model, BS, &mut rng);
    drop(cb);

    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
    }
    // Segments are objects, manifests are numbered objects: 1 (create) + 5 commits.
    let obj = moto.objects(&bucket);
    assert_eq!(keys(&obj, "vol-a", "seg").len(), 5);
    let manifests: Vec<u64> = keys(&obj, "vol-a", "manifest")
        .iter()
        .filter_map(|m| m.location.filename().and_then(backend::parse_manifest_name))
        .collect();
    assert_eq!(manifests.len(), 6, "{manifests:?}");
    drop(c);

    // A restarted server (another data dir: nothing local) serves everything from the store.
    server.kill9();
    let server = S3Server::spawn(&moto, &bucket, &dir.path().join("b"), &token, &NO_COMPACT);
    let mut c = connect(server.addr, "vol-a");
    assert!(c.info().exists);
    assert_eq!(c.list_snapshots().expect("list").len(), 5);
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
    }
    let mut cb = connect(server.addr, "vol-big");
    check_snapshot(&mut cb, 1, &big_model, BS, &mut rng);

    // A clone of snapshot 3, with a snapshot of its own.
    let mut cl = connect(server.addr, "vol-clone");
    let info = cl.clone_volume("vol-a", 3).expect("clone");
    assert_eq!(
        (info.clone_source_volume.as_str(), info.clone_source_snap_id),
        ("vol-a", 3)
    );
    check_snapshot(&mut cl, 0, &models[2], BS, &mut rng);
    let changes = random_changes(&mut rng, BLOCKS, BS, 20);
    upload(&mut cl, 1, 0, SIZE, BS, &changes);
    let mut clone_model = models[2].clone();
    apply(&mut clone_model, BS, &changes);
    check_snapshot(&mut cl, 1, &clone_model, BS, &mut rng);

    // Delete by merge: 2 merges into 3; the clone pins 3; the head cannot go.
    assert_eq!(c.delete_snapshot(2).expect("delete 2"), 3);
    let err = c.delete_snapshot(3).expect_err("clone depends on 3");
    assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
    let err = c.delete_snapshot(5).expect_err("head");
    assert_eq!(err.server_code(), Some(ErrorCode::DeleteHead), "{err}");
    models.remove(1);
    let ids = [1u64, 3, 4, 5];
    for (id, m) in ids.iter().zip(&models) {
        check_snapshot(&mut c, *id, m, BS, &mut rng);
    }
    drop((c, cl, cb));

    // After another restart: the merged chain and the clone, as they were.
    server.kill9();
    let server = S3Server::spawn(&moto, &bucket, &dir.path().join("c"), &token, &NO_COMPACT);
    let mut c = connect(server.addr, "vol-a");
    let listed: Vec<u64> = c
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(listed, ids);
    for (id, m) in ids.iter().zip(&models) {
        check_snapshot(&mut c, *id, m, BS, &mut rng);
    }
    let mut cl = connect(server.addr, "vol-clone");
    check_snapshot(&mut cl, 1, &clone_model, BS, &mut rng);
    drop((c, cl));
    drop(server);

    // verify: all good; then one flipped byte in a data extent is named by volume,
    // snapshot and LBA range, with a non-zero exit.
    let (code, out, err) = run_tool(&tool_args(
        &moto,
        &bucket,
        &dir.path().join("v"),
        &["verify"],
    ));
    assert_eq!(code, 0, "verify failed on a clean store:\n{out}\n{err}");
    assert!(out.contains("all good"), "{out}");
    assert!(out.contains("3 volumes"), "{out}");
    let seg4 = keys(&obj, "vol-a", "seg")
        .into_iter()
        .find(|m| {
            m.location
                .filename()
                .and_then(backend::parse_segment_name)
                .is_some_and(|(id, _)| id == 4)
        })
        .expect("segment of snapshot 4");
    let mut raw = obj
        .block_on(obj.get(&seg4.location))
        .unwrap()
        .unwrap()
        .to_vec();
    // The last data extent of the segment (no later extent of its snapshot hides it).
    let (lba, nblocks, data_at) = *data_extents(&raw).last().expect("a data extent");
    raw[data_at as usize + 5] ^= 0x40;
    obj.block_on(obj.put(&seg4.location, raw)).unwrap();
    let (code, out, _) = run_tool(&tool_args(
        &moto,
        &bucket,
        &dir.path().join("v"),
        &["verify", "--volume", "vol-a"],
    ));
    assert_eq!(code, 1, "verify must fail on a flipped byte:\n{out}");
    let want = format!(
        "CORRUPT volume vol-a snapshot 4 segment 4 extent lba {lba}..{}",
        lba + u64::from(nblocks)
    );
    assert!(out.contains(&want), "expected {want:?} in:\n{out}");
    assert!(out.contains("crc32c"), "{out}");
    // The JSON form says the same.
    let (code, out, _) = run_tool(&tool_args(
        &moto,
        &bucket,
        &dir.path().join("v"),
        &["verify", "--json"],
    ));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["findings"][0]["volume"], "vol-a");
    assert_eq!(v["findings"][0]["snap_id"], 4);
    assert_eq!(v["findings"][0]["lba_start"], lba);

    // A server reading that extent refuses it with a checksum error, never wrong data.
    let server = S3Server::spawn(&moto, &bucket, &dir.path().join("d"), &token, &NO_COMPACT);
    let mut c = connect(server.addr, "vol-a");
    let mut buf = vec![0u8; nblocks as usize * BS];
    let err = c
        .read_extents(4, lba, u64::from(nblocks), &mut buf)
        .expect_err("corrupt extent");
    assert_eq!(err.server_code(), Some(ErrorCode::Checksum), "{err}");
}

/// Two servers on one store, each with a client uploading snapshot `snap` on top of
/// `parent` with different data, committing at the same moment. Returns which won (0 = A,
/// 1 = B), the winner's changes, and the loser's error code.
fn race_once(
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    vol: &str,
    snap: u64,
    parent: u64,
    rng: &mut Rng,
) -> (usize, Vec<Change>, Option<ErrorCode>) {
    let changes = [
        random_changes(rng, BLOCKS, BS, 30),
        random_changes(rng, BLOCKS, BS, 30),
    ];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let results: Vec<Result<u64, Option<ErrorCode>>> = std::thread::scope(|s| {
        let hs: Vec<_> = [a, b]
            .into_iter()
            .zip(changes.iter())
            .map(|(addr, ch)| {
                let barrier = std::sync::Arc::clone(&barrier);
                s.spawn(move || {
                    let mut c = connect(addr, vol);
                    let o = c.begin_snapshot(snap, parent, SIZE).expect("begin");
                    assert_eq!(o, deltavol_dataplane::BeginOutcome::Started);
                    for x in ch {
                        match x {
                            Change::Data { lba, data } => c
                                .put_extent(*lba, (data.len() / BS) as u32, data)
                                .expect("put"),
                            Change::Zero { lba, nblocks } => {
                                c.put_zero_extent(*lba, *nblocks).expect("put zero")
                            }
                        }
                    }
                    barrier.wait();
                    c.commit().map(|i| i.snap_id).map_err(|e| e.server_code())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("racer")).collect()
    });
    let wins: Vec<usize> = (0..2).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(
        wins.len(),
        1,
        "exactly one commit of snapshot {snap} must win: {results:?}"
    );
    let w = wins[0];
    assert_eq!(results[w], Ok(snap));
    let lost = results[1 - w].expect_err("loser");
    (w, changes[w].clone(), lost)
}

#[test]
fn two_servers_racing_to_commit_one_snapshot_exactly_one_wins() {
    let Some(moto) = Moto::start("two_servers_racing_to_commit_one_snapshot_exactly_one_wins")
    else {
        return;
    };
    let seed = seed() ^ 0x7ace;
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let bucket = moto.bucket("race");
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    // No leases: two servers on one volume at once, only the numbered manifests guard.
    let multi = NO_COMPACT;
    let sa = S3Server::spawn(&moto, &bucket, &dir.path().join("a"), &token, &multi);
    let sb = S3Server::spawn(&moto, &bucket, &dir.path().join("b"), &token, &multi);
    connect(sa.addr, "vol-r")
        .create_volume(SIZE, BS as u32)
        .expect("create on A");
    // B did not know the volume: its create loads the one A made (same geometry).
    connect(sb.addr, "vol-r")
        .create_volume(SIZE, BS as u32)
        .expect("create on B loads A's volume");
    let err = connect(sb.addr, "vol-r")
        .create_volume(SIZE * 2, BS as u32)
        .expect_err("other geometry");
    assert_eq!(err.server_code(), Some(ErrorCode::VolumeMismatch), "{err}");

    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut models = Vec::new();
    let mut losers = Vec::new();
    for snap in 1..=4u64 {
        let (w, changes, code) = race_once(sa.addr, sb.addr, "vol-r", snap, snap - 1, &mut rng);
        eprintln!(
            "snapshot {snap}: server {} won, the other got {code:?}",
            ["A", "B"][w]
        );
        assert!(
            matches!(
                code,
                Some(ErrorCode::BadParent) | Some(ErrorCode::StaleGeneration)
            ),
            "the loser must get a clear refusal, got {code:?}"
        );
        losers.push(1 - w);
        apply(&mut model, BS, &changes);
        models.push(model.clone());
        // Both servers now agree on the chain (the loser reloaded it).
        for addr in [sa.addr, sb.addr] {
            let mut c = connect(addr, "vol-r");
            let ids: Vec<u64> = c
                .list_snapshots()
                .unwrap()
                .iter()
                .map(|s| s.snap_id)
                .collect();
            assert_eq!(ids, (1..=snap).collect::<Vec<_>>());
            check_snapshot(&mut c, snap, &model, BS, &mut rng);
        }
    }
    // A third server reading the store alone sees one chain, each snapshot the winner's.
    let sc = S3Server::spawn(&moto, &bucket, &dir.path().join("c"), &token, &multi);
    let mut c = connect(sc.addr, "vol-r");
    assert_eq!(c.list_snapshots().unwrap().len(), 4);
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
    }
    // The losers' segments are garbage in the store (8 uploads, 4 committed).
    let obj = moto.objects(&bucket);
    assert_eq!(keys(&obj, "vol-r", "seg").len(), 8);
    let (code, out, err) = run_tool(&tool_args(
        &moto,
        &bucket,
        &dir.path().join("v"),
        &["verify"],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn gc_interrupted_and_rerun_leaves_the_chain_whole() {
    let Some(moto) = Moto::start("gc_interrupted_and_rerun_leaves_the_chain_whole") else {
        return;
    };
    let seed = seed() ^ 0x6c;
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let bucket = moto.bucket("gc-test");
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    // No leases: two servers on one volume at once, only the numbered manifests guard.
    let multi = NO_COMPACT;
    let sa = S3Server::spawn(&moto, &bucket, &dir.path().join("a"), &token, &multi);
    let sb = S3Server::spawn(&moto, &bucket, &dir.path().join("b"), &token, &multi);
    connect(sa.addr, "vol-g")
        .create_volume(SIZE, BS as u32)
        .unwrap();
    connect(sb.addr, "vol-g")
        .create_volume(SIZE, BS as u32)
        .unwrap();
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut models = Vec::new();
    for snap in 1..=3u64 {
        let (_, changes, _) = race_once(sa.addr, sb.addr, "vol-g", snap, snap - 1, &mut rng);
        apply(&mut model, BS, &changes);
        models.push(model.clone());
    }
    // Plus a volume whose creation never committed: a lone segment object, no manifest.
    let obj = moto.objects(&bucket);
    let orphan = obj.key(&backend::segment_rel("vol-never", 1, 0xabc));
    obj.block_on(obj.put(&orphan, vec![7u8; 1000])).unwrap();
    drop((sa, sb));
    assert_eq!(keys(&obj, "vol-g", "seg").len(), 6);

    let gc = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["gc", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = run_tool(&tool_args(&moto, &bucket, &dir.path().join("t"), &args));
        assert_eq!(code, 0, "gc failed:\n{out}\n{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("gc json {out:?}: {e}"))
    };
    // Within the grace period nothing goes.
    let r = gc(&[]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["young_left"], 4, "{r}");
    // Interrupted after one removal ...
    let r = gc(&["--min-age-secs", "0", "--max-removals", "1"]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["stopped_early"], true, "{r}");
    let check_chain = |tag: &str| {
        let s = S3Server::spawn(&moto, &bucket, &dir.path().join(tag), &token, &NO_COMPACT);
        let mut c = connect(s.addr, "vol-g");
        assert_eq!(c.list_snapshots().unwrap().len(), 3);
        let mut rng = Rng::new(seed ^ 1);
        for (i, m) in models.iter().enumerate() {
            check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
        }
        let (code, out, err) = run_tool(&tool_args(
            &moto,
            &bucket,
            &dir.path().join("v"),
            &["verify"],
        ));
        assert_eq!(code, 0, "{out}\n{err}");
    };
    // ... the chain is whole, and a rerun removes the rest.
    check_chain("c1");
    let r = gc(&["--min-age-secs", "0", "--keep-manifests", "1"]);
    let removed: Vec<String> = r["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(removed.len(), 3, "{r}");
    assert!(removed.iter().any(|k| k.contains("vol-never")), "{r}");
    assert!(r["stopped_early"] == false, "{r}");
    // Manifests 1..=2 of 4 are deleted (the newest and one more are kept).
    assert_eq!(r["manifests_trimmed"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(keys(&obj, "vol-g", "manifest").len(), 2);
    assert_eq!(keys(&obj, "vol-g", "seg").len(), 3);
    check_chain("c2");
    // Nothing left to do.
    let r = gc(&["--min-age-secs", "0", "--keep-manifests", "1"]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["manifests_trimmed"].as_array().unwrap().len(), 0, "{r}");
}

fn try_connect(
    addr: std::net::SocketAddr,
    vol: &str,
) -> Result<deltavol_dataplane::Client, deltavol_dataplane::ClientError> {
    deltavol_dataplane::Client::connect(addr, TOKEN, vol, timeouts())
}

#[test]
fn lease_two_servers_one_killed_mid_upload_other_takes_over() {
    let Some(moto) = Moto::start("lease_two_servers_one_killed_mid_upload_other_takes_over") else {
        return;
    };
    let seed = seed() ^ 0x1ea5e;
    eprintln!("seed {seed} (set DELTAVOL_TEST_SEED to reproduce)");
    let bucket = moto.bucket("lease-test");
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    let lease_ms = 4000u64;
    let lease = lease_ms.to_string();
    let args = |id: &'static str| -> Vec<String> {
        vec![
            "--multi-server".into(),
            "--no-create-probe".into(),
            "--lease-ms".into(),
            lease.clone(),
            "--server-id".into(),
            id.into(),
        ]
    };
    let a_args = args("srv-a");
    let b_args = args("srv-b");
    let a_ref: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_ref: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let sa = S3Server::spawn(&moto, &bucket, &dir.path().join("a"), &token, &a_ref);
    let sb = S3Server::spawn(&moto, &bucket, &dir.path().join("b"), &token, &b_ref);

    let mut rng = Rng::new(seed);
    let mut ca = connect(sa.addr, "vol-l");
    ca.create_volume(SIZE, BS as u32).expect("create on A");
    let models = build_chain(&mut ca, &mut rng, 3);

    // While A lives it keeps renewing: B refuses the volume, naming A, for several leases.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(lease_ms * 2);
    while std::time::Instant::now() < until {
        let Err(err) = try_connect(sb.addr, "vol-l") else {
            panic!("B must refuse the volume A holds");
        };
        assert_eq!(err.server_code(), Some(ErrorCode::Io), "{err}");
        assert!(err.to_string().contains("srv-a"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // Another volume is free for B meanwhile.
    connect(sb.addr, "vol-other")
        .create_volume(SIZE, BS as u32)
        .expect("B serves a volume nobody holds");

    // A dies mid-upload of snapshot 4 (12 MiB streamed, more than one multipart part).
    ca.begin_snapshot(4, 3, SIZE).expect("begin 4");
    let mut big = vec![0u8; 12 << 20];
    rng.fill(&mut big);
    for (i, chunk) in big.chunks(BS * 256).enumerate() {
        ca.put_extent((i * 256) as u64 % (BLOCKS - 256), 256, chunk)
            .expect("put");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let killed = std::time::Instant::now();
    sa.kill9();
    drop(ca);

    // B takes the volume once A's lease runs out, not before.
    let Err(err) = try_connect(sb.addr, "vol-l") else {
        panic!("the lease is still A's");
    };
    assert!(err.to_string().contains("srv-a"), "{err}");
    let mut cb = loop {
        match try_connect(sb.addr, "vol-l") {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    killed.elapsed() < std::time::Duration::from_millis(lease_ms * 5),
                    "B did not take the volume over: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    };
    let took = killed.elapsed();
    eprintln!(
        "B took the volume over {} ms after A was killed",
        took.as_millis()
    );
    assert!(cb.info().exists);
    // The chain is whole: 1..3, as A committed them; the half upload left nothing.
    let ids: Vec<u64> = cb
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|s| s.snap_id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut cb, i as u64 + 1, m, BS, &mut rng);
    }
    // And it continues on B.
    let changes = random_changes(&mut rng, BLOCKS, BS, 30);
    upload(&mut cb, 4, 3, SIZE, BS, &changes);
    let mut m4 = models[2].clone();
    apply(&mut m4, BS, &changes);
    check_snapshot(&mut cb, 4, &m4, BS, &mut rng);
    // The generation lives in the manifest: fencing holds across servers.
    let g = cb.new_generation().expect("new generation");
    drop(cb);
    let mut stale = deltavol_dataplane::Client::connect_with_generation(
        sb.addr,
        TOKEN,
        "vol-l",
        timeouts(),
        g - 1,
    )
    .expect("connect with an old generation");
    let err = stale.begin_snapshot(5, 4, SIZE).expect_err("fenced");
    assert_eq!(err.server_code(), Some(ErrorCode::StaleGeneration), "{err}");
    drop(stale);
    drop(sb);
    let obj = moto.objects(&bucket);
    assert_eq!(
        keys(&obj, "vol-l", "seg").len(),
        4,
        "no segment of the dead upload"
    );
    let (code, out, err) = run_tool(&tool_args(
        &moto,
        &bucket,
        &dir.path().join("v"),
        &["verify"],
    ));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn multi_server_delete_refuses_a_snapshot_a_clone_on_another_server_uses() {
    let Some(moto) =
        Moto::start("multi_server_delete_refuses_a_snapshot_a_clone_on_another_server_uses")
    else {
        return;
    };
    let bucket = moto.bucket("clone-dep");
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path());
    // moto lets two racing creates both win now and then, which the start-up probe
    // (rightly) refuses; the read-back of every create covers it for these tests.
    let multi = ["--multi-server", "--no-create-probe"];
    let sa = S3Server::spawn(&moto, &bucket, &dir.path().join("a"), &token, &multi);
    let sb = S3Server::spawn(&moto, &bucket, &dir.path().join("b"), &token, &multi);
    let mut rng = Rng::new(0xc10e);
    let mut c = connect(sa.addr, "src");
    c.create_volume(SIZE, BS as u32).unwrap();
    let models = build_chain(&mut c, &mut rng, 3);
    // The clone lives on B (B holds its lease); A serves the source.
    let mut cl = connect(sb.addr, "cl");
    cl.clone_volume("src", 1).expect("clone on B");
    check_snapshot(&mut cl, 0, &models[0], BS, &mut rng);
    let err = c
        .delete_snapshot(1)
        .expect_err("clone on B depends on src@1");
    assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
    assert!(err.to_string().contains("cl"), "{err}");
    // Snapshot 2 is free to go (merged into 3).
    assert_eq!(c.delete_snapshot(2).expect("delete 2"), 3);
    check_snapshot(&mut c, 3, &models[2], BS, &mut rng);
    check_snapshot(&mut cl, 0, &models[0], BS, &mut rng);
}
