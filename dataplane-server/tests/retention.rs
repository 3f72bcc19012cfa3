//! Retention on the data plane: a policy set with `SetRetention` is applied at once and after
//! every commit, keeps the grandfather-father-son shape by cut time, never removes the head,
//! a pinned snapshot, a clone's source or a snapshot being read, and every snapshot it keeps
//! reads exactly as before (a deleted one merges into its successor). Policy and pins survive
//! a restart; bad requests are errors that change nothing.

mod common;

use common::*;
use deltavol_dataplane::retention::Policy;
use deltavol_dataplane::Client;
use deltavol_schemas::wire::ErrorCode;

const BS: usize = 4096;
const BLOCKS: u64 = 128;
const SIZE: u64 = BLOCKS * BS as u64;
/// An hour boundary (2023-11-14 22:00 UTC).
const T0: u64 = 1_700_000_000_000 / 3_600_000 * 3_600_000;
const MIN: u64 = 60_000;

/// Uploads one snapshot cut at `cut_ms` and applies it to the model.
fn upload_at(c: &mut Client, snap: u64, cut_ms: u64, rng: &mut Rng, model: &mut [u8]) {
    let ch = random_changes(rng, BLOCKS, BS, 6);
    let outcome = c
        .begin_snapshot_cut_at(snap, snap - 1, SIZE, cut_ms)
        .expect("begin");
    assert_eq!(outcome, deltavol_dataplane::BeginOutcome::Started);
    for x in &ch {
        match x {
            Change::Data { lba, data } => c
                .put_extent(*lba, (data.len() / BS) as u32, data)
                .expect("put"),
            Change::Zero { lba, nblocks } => c.put_zero_extent(*lba, *nblocks).expect("zero"),
        }
    }
    c.commit().expect("commit");
    apply(model, BS, &ch);
}

fn ids(c: &mut Client) -> Vec<u64> {
    c.list_snapshots()
        .expect("list")
        .iter()
        .map(|s| s.snap_id)
        .collect()
}

#[test]
fn policy_shape_pins_reads_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dp");
    let mut rng = Rng::new(13);
    let mut models: Vec<Vec<u8>> = vec![vec![0u8; SIZE as usize]];
    {
        let server = in_process(&data, 2);
        let mut c = connect(server.local_addr(), "v1");
        c.create_volume(SIZE, BS as u32).expect("create");
        // 30 snapshots 20 minutes apart: hours 0..9, three snapshots each.
        for i in 0..30u64 {
            let mut m = models.last().unwrap().clone();
            upload_at(&mut c, i + 1, T0 + i * 20 * MIN, &mut rng, &mut m);
            models.push(m);
        }
        let p = c.pin_snapshot(5, true, "before-upgrade").expect("pin");
        assert!(p.pinned);
        assert_eq!(p.label, "before-upgrade");

        // Applied at once: the last 3, the newest of each of the last 4 hours, the pin.
        let policy = Policy::parse("last=3,hourly=4").unwrap();
        let info = c.set_retention(&policy).expect("set retention");
        assert_eq!(info.retention, policy);
        assert_eq!(ids(&mut c), vec![5, 21, 24, 27, 28, 29, 30]);

        // A commit (hour 10) applies it again: 21 and 28 go.
        let mut m = models.last().unwrap().clone();
        upload_at(&mut c, 31, T0 + 30 * 20 * MIN, &mut rng, &mut m);
        models.push(m);
        assert_eq!(ids(&mut c), vec![5, 24, 27, 29, 30, 31]);

        // Snapshot 24 is being read (a hydration, say): kept although the policy lets it go.
        check_snapshot(&mut c, 24, &models[24], BS, &mut rng);
        for (i, cut) in [(32u64, 31 * 20 * MIN), (33, 33 * 20 * MIN)] {
            let mut m = models.last().unwrap().clone();
            upload_at(&mut c, i, T0 + cut, &mut rng, &mut m);
            models.push(m);
        }
        let dry = c.prune(true).expect("dry run");
        assert!(dry.dry_run && dry.deleted.is_empty(), "{dry:?}");
        let why: std::collections::BTreeMap<u64, String> = dry.kept.into_iter().collect();
        assert_eq!(why[&24], "being read", "{why:?}");
        assert_eq!(why[&5], "pinned");
        assert_eq!(why[&33], "head,last,hourly");
        assert_eq!(ids(&mut c), vec![5, 24, 27, 30, 31, 32, 33]);

        // Refusals change nothing: a pinned snapshot, the head.
        for (snap, code) in [(5, ErrorCode::InUse), (33, ErrorCode::DeleteHead)] {
            let err = c.delete_snapshot(snap).expect_err("refused");
            assert_eq!(err.server_code(), Some(code), "{snap}: {err}");
            c = connect(server.local_addr(), "v1");
        }
        let err = c.pin_snapshot(99, true, "").expect_err("no such snapshot");
        assert_eq!(err.server_code(), Some(ErrorCode::NoSuchSnapshot), "{err}");
        let mut c = connect(server.local_addr(), "v1");
        let err = c
            .pin_snapshot(30, true, &"x".repeat(200))
            .expect_err("label too long");
        assert!(err.to_string().contains("at most 128 bytes"), "{err}");
        let mut c = connect(server.local_addr(), "v1");
        assert_eq!(ids(&mut c), vec![5, 24, 27, 30, 31, 32, 33]);

        // Unpinned, 5 goes at the next prune (it keeps its label meanwhile).
        let p = c.pin_snapshot(5, false, "").expect("unpin");
        assert!(!p.pinned);
        assert_eq!(p.label, "before-upgrade");
        let r = c.prune(false).expect("prune");
        assert_eq!(r.deleted, vec![5]);
        c.pin_snapshot(27, true, "keep").expect("pin 27");
    }
    // Restart: the policy and the pin are durable; every kept snapshot reads as before.
    let server = in_process(&data, 2);
    let mut c = connect(server.local_addr(), "v1");
    assert_eq!(
        c.info().retention,
        Policy::parse("last=3,hourly=4").unwrap()
    );
    let list = c.list_snapshots().expect("list");
    let kept: Vec<u64> = list.iter().map(|s| s.snap_id).collect();
    assert_eq!(kept, vec![24, 27, 30, 31, 32, 33]);
    let pinned: Vec<(u64, &str)> = list
        .iter()
        .filter(|s| s.pinned)
        .map(|s| (s.snap_id, s.label.as_str()))
        .collect();
    assert_eq!(pinned, vec![(27, "keep")]);
    // The chain stays linked: each kept snapshot's parent is the one before it.
    let mut prev = 0;
    for s in &list {
        assert_eq!(s.parent_id, prev, "snapshot {}", s.snap_id);
        prev = s.snap_id;
    }
    for s in &kept {
        check_snapshot(&mut c, *s, &models[*s as usize], BS, &mut rng);
    }
    // No policy: everything stays.
    let info = c.set_retention(&Policy::default()).expect("no policy");
    assert!(info.retention.keeps_all());
    let mut m = models.last().unwrap().clone();
    upload_at(&mut c, 34, T0 + 40 * 20 * MIN, &mut rng, &mut m);
    assert_eq!(ids(&mut c), vec![24, 27, 30, 31, 32, 33, 34]);
}

#[test]
fn a_clone_source_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(&dir.path().join("dp"), 2);
    let mut rng = Rng::new(5);
    let mut c = connect(server.local_addr(), "src");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    let mut at2 = Vec::new();
    for i in 1..=5u64 {
        upload_at(&mut c, i, T0 + i * MIN, &mut rng, &mut model);
        if i == 2 {
            at2 = model.clone();
        }
    }
    let mut k = connect(server.local_addr(), "cl");
    k.clone_volume("src", 2).expect("clone");
    let mut c = connect(server.local_addr(), "src");
    c.set_retention(&Policy::parse("last=1").unwrap())
        .expect("retention");
    assert_eq!(ids(&mut c), vec![2, 5]);
    let r = c.prune(true).expect("dry run");
    assert_eq!(
        r.kept,
        vec![
            (2, "source of clone cl".to_string()),
            (5, "head,last".to_string())
        ]
    );
    // The clone still reads its source as it was.
    let mut k = connect(server.local_addr(), "cl");
    let mut buf = vec![0u8; SIZE as usize];
    k.read_extents(0, 0, BLOCKS, &mut buf)
        .expect("read clone base");
    assert!(buf == at2, "the clone's base changed");
}

#[test]
fn retention_of_a_volume_that_does_not_exist_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(&dir.path().join("dp"), 1);
    let mut c = connect(server.local_addr(), "ghost");
    let err = c
        .set_retention(&Policy::parse("last=1").unwrap())
        .expect_err("no volume");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchVolume), "{err}");
    let mut c = connect(server.local_addr(), "ghost");
    let err = c.prune(true).expect_err("no volume");
    assert_eq!(err.server_code(), Some(ErrorCode::NoSuchVolume), "{err}");
}
