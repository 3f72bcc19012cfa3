//! Compaction: deleted snapshots give their space back, every kept snapshot (and a clone of
//! one) reads byte for byte as before, a snapshot's segment count stays bounded, and a crash
//! at each durable step of a compaction (and kill -9 at random moments while rounds run) leaves
//! a whole chain with no stray file. On the object
//! store, replaced segments are retired, then deleted after the grace period, and a clone
//! whose view opened them keeps reading.

mod common;
mod moto;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use deltavol_dataplane::retention::Policy;
use deltavol_dataplane::store::compaction::{COMPACT_ID_BIT, SEGMENTS_PER_SNAPSHOT_MAX};
use deltavol_dataplane::store::format::{decode_manifest, ManifestData};
use deltavol_dataplane::Client;
use moto::{Moto, S3Server};

const BS: usize = 4096;
const BLOCKS: u64 = 512;
const SIZE: u64 = BLOCKS * BS as u64;

/// The volume's content after every snapshot, and each block's write history.
struct Model {
    cur: Vec<u8>,
    at: HashMap<u64, Vec<u8>>,
    /// Per block: (snapshot, wrote data rather than zeros), in order.
    history: Vec<Vec<(u64, bool)>>,
    shipped: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            cur: vec![0; SIZE as usize],
            at: HashMap::new(),
            history: vec![Vec::new(); BLOCKS as usize],
            shipped: 0,
        }
    }

    fn record(&mut self, snap: u64, changes: &[Change]) {
        apply(&mut self.cur, BS, changes);
        for ch in changes {
            let (lba, n, data) = match ch {
                Change::Data { lba, data } => (*lba, (data.len() / BS) as u64, true),
                Change::Zero { lba, nblocks } => (*lba, *nblocks, false),
            };
            if data {
                self.shipped += n * BS as u64;
            }
            for b in lba..lba + n {
                let h = &mut self.history[b as usize];
                if h.last().is_some_and(|l| l.0 == snap) {
                    h.pop();
                }
                h.push((snap, data));
            }
        }
        self.at.insert(snap, self.cur.clone());
    }

    /// Forgets every snapshot after `head` (attempted, never committed).
    fn rewind(&mut self, head: u64) {
        self.cur = self.at[&head].clone();
        self.at.retain(|s, _| *s <= head);
        for h in &mut self.history {
            h.retain(|w| w.0 <= head);
        }
    }

    /// The data bytes a chain of deltas must keep for the kept snapshots `kept` (ascending):
    /// each kept snapshot holds, of every block, the last write since the previous kept one.
    fn needed(&self, kept: &[u64]) -> u64 {
        let mut blocks = 0;
        for h in &self.history {
            let mut prev = 0;
            for &k in kept {
                if let Some(last) = h.iter().rev().find(|w| w.0 > prev && w.0 <= k) {
                    blocks += u64::from(last.1);
                }
                prev = k;
            }
        }
        blocks * BS as u64
    }
}

fn try_upload(c: &mut Client, snap: u64, changes: &[Change]) -> Result<(), String> {
    c.begin_snapshot(snap, snap - 1, SIZE)
        .map_err(|e| e.to_string())?;
    for ch in changes {
        match ch {
            Change::Data { lba, data } => c.put_extent(*lba, (data.len() / BS) as u32, data),
            Change::Zero { lba, nblocks } => c.put_zero_extent(*lba, *nblocks),
        }
        .map_err(|e| e.to_string())?;
    }
    c.commit().map(|_| ()).map_err(|e| e.to_string())
}

fn ids(c: &mut Client) -> Vec<u64> {
    c.list_snapshots()
        .expect("list")
        .iter()
        .map(|s| s.snap_id)
        .collect()
}

fn segment_file(id: u64) -> String {
    if id & COMPACT_ID_BIT != 0 {
        format!("compact-{}.seg", id & !COMPACT_ID_BIT)
    } else {
        format!("snap-{id}.seg")
    }
}

/// (name, size) of every file of a volume directory, sorted.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read volume dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("stat").len(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until the directory stops changing (background compaction done).
fn settle(dir: &Path) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = files(dir);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = files(dir);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_millis(1500) {
            return last;
        }
        assert!(Instant::now() < deadline, "store never settled: {last:?}");
    }
}

fn manifest(dir: &Path, name: &str) -> ManifestData {
    let raw = std::fs::read(dir.join("MANIFEST")).expect("read MANIFEST");
    decode_manifest(&raw, name).expect("decode MANIFEST")
}

/// The manifest names exactly the segment files there are, and no temp file is left.
fn check_no_strays(dir: &Path, name: &str) -> ManifestData {
    let m = manifest(dir, name);
    let referenced: BTreeSet<String> = m
        .snapshots
        .iter()
        .flat_map(|s| s.segments.iter().map(|id| segment_file(*id)))
        .collect();
    let present: BTreeSet<String> = files(dir)
        .into_iter()
        .map(|f| f.0)
        .filter(|f| f != "MANIFEST")
        .collect();
    assert_eq!(present, referenced, "files besides the manifest's segments");
    m
}

fn seg_bytes(files: &[(String, u64)]) -> u64 {
    files
        .iter()
        .filter(|f| f.0.ends_with(".seg"))
        .map(|f| f.1)
        .sum()
}

fn verify_tool(data: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["verify", "--no-config", "--data-dir"])
        .arg(data)
        .output()
        .expect("run verify");
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn deleted_snapshots_give_their_space_back_and_every_kept_snapshot_reads_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dp");
    let token = write_token(dir.path());
    let vdir = data.join("volumes").join("v1");
    let mut rng = Rng::new(0x00c0_4ac7);
    let mut model = Model::new();
    let server = ChildServer::spawn(&data, &token);
    let mut c = connect(server.addr, "v1");
    c.create_volume(SIZE, BS as u32).expect("create");
    c.set_retention(&Policy::parse("last=4").unwrap())
        .expect("retention");
    let mut clone_base = Vec::new();
    for snap in 1..=60u64 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 5);
        try_upload(&mut c, snap, &changes).expect("upload");
        model.record(snap, &changes);
        if snap == 20 {
            c.pin_snapshot(20, true, "kept").expect("pin");
        }
        if snap == 25 {
            // A clone of 25, read once now: its view holds the segments of 25 and earlier,
            // which compaction then replaces.
            let mut cl = connect(server.addr, "c1");
            cl.clone_volume("v1", 25).expect("clone");
            clone_base = model.at[&25].clone();
            check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);
        }
    }
    let settled = settle(&vdir);
    let kept = ids(&mut c);
    assert_eq!(kept, vec![20, 25, 57, 58, 59, 60], "retention");
    for &s in &kept {
        check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
    }
    let mut cl = connect(server.addr, "c1");
    check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);

    let m = check_no_strays(&vdir, "v1");
    for s in &m.snapshots {
        assert!(
            s.segments.len() <= SEGMENTS_PER_SNAPSHOT_MAX,
            "snapshot {} has {} segments",
            s.snap_id,
            s.segments.len()
        );
    }
    let needed = model.needed(&kept);
    let stored = seg_bytes(&settled);
    eprintln!(
        "shipped {} B, needed {needed} B, stored {stored} B ({:.2}x)",
        model.shipped,
        stored as f64 / needed as f64
    );
    // A segment is rewritten once less than 3/4 of it is live: at most 4/3 of the needed
    // bytes, plus headers and indexes.
    assert!(
        stored as f64 <= needed as f64 * 4.0 / 3.0 + 64.0 * 1024.0 * settled.len() as f64 / 4.0,
        "stored {stored} B for {needed} B needed"
    );
    assert!(stored * 4 < model.shipped, "nothing was given back");

    // After a restart: the same content, nothing left over, and the store verifies.
    drop((c, cl));
    drop(server);
    verify_tool(&data);
    let server = ChildServer::spawn(&data, &token);
    let mut c = connect(server.addr, "v1");
    for &s in &kept {
        check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
    }
    let mut cl = connect(server.addr, "c1");
    check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);
    check_no_strays(&vdir, "v1");
}

#[test]
fn a_crash_at_each_step_of_a_compaction_leaves_a_whole_chain() {
    for point in ["compact-written", "compact-published"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("dp");
        let token = write_token(dir.path());
        let vdir = data.join("volumes").join("v1");
        let mut rng = Rng::new(0xdead ^ point.len() as u64);
        let mut model = Model::new();
        let mut server = ChildServer::spawn_with(
            &data,
            &token,
            &[],
            &[("DELTAVOL_DATAPLANE_CRASH_AT", point)],
        );
        let mut c = connect(server.addr, "v1");
        c.create_volume(SIZE, BS as u32).expect("create");
        c.set_retention(&Policy::parse("last=2").unwrap())
            .expect("retention");
        let mut crashed = false;
        for snap in 1..=60u64 {
            let changes = random_changes(&mut rng, BLOCKS, BS, 5);
            // Recorded first: a snapshot whose commit answer was lost may be committed.
            model.record(snap, &changes);
            if try_upload(&mut c, snap, &changes).is_err() {
                crashed = true;
                break;
            }
            if server.child.try_wait().expect("try_wait").is_some() {
                crashed = true;
                break;
            }
        }
        assert!(crashed, "{point}: the server never reached the crash point");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = server.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "{point}: the server did not die");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{point}: {status}");
        drop(c);
        drop(server);

        let server = ChildServer::spawn(&data, &token);
        let mut c = connect(server.addr, "v1");
        let kept = ids(&mut c);
        assert!(!kept.is_empty(), "{point}: the chain is gone");
        for &s in &kept {
            check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
        }
        // The next commit's retention resumes compaction; then nothing is left over.
        let head = *kept.last().unwrap();
        model.rewind(head);
        let changes = random_changes(&mut rng, BLOCKS, BS, 5);
        try_upload(&mut c, head + 1, &changes).expect("upload after restart");
        model.record(head + 1, &changes);
        settle(&vdir);
        let kept = ids(&mut c);
        for &s in &kept {
            check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
        }
        drop(c);
        drop(server);
        check_no_strays(&vdir, "v1");
        verify_tool(&data);
    }
}

#[test]
fn object_store_compaction_retires_then_deletes_and_a_clone_keeps_reading() {
    let Some(moto) = Moto::start("object_store_compaction_retires_then_deletes") else {
        return;
    };
    let bucket = moto.bucket("compaction");
    let bucket = bucket.as_str();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_token(dir.path());
    let data = dir.path().join("dp");
    let server = S3Server::spawn(&moto, bucket, &data, &token, &["--retired-grace-secs", "2"]);
    let obj = moto.objects(bucket);
    let mut rng = Rng::new(0x05ee_d0b1);
    let mut model = Model::new();
    let mut c = connect(server.addr, "v1");
    c.create_volume(SIZE, BS as u32).expect("create");
    c.set_retention(&Policy::parse("last=3").unwrap())
        .expect("retention");
    let mut clone_base = Vec::new();
    for snap in 1..=30u64 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 5);
        try_upload(&mut c, snap, &changes).expect("upload");
        model.record(snap, &changes);
        if snap == 8 {
            let mut cl = connect(server.addr, "c1");
            cl.clone_volume("v1", 8).expect("clone");
            clone_base = model.at[&8].clone();
            check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);
        }
    }
    // Settled: every segment object is one the newest manifest names, none retired.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (m, stored) = loop {
        let (m, om) = obj
            .block_on(deltavol_dataplane::store::latest_obj_manifest(&obj, "v1"))
            .expect("manifest")
            .expect("a manifest");
        let referenced: BTreeSet<(u64, u128)> = m
            .snapshots
            .iter()
            .flat_map(|s| s.segments.iter().map(|id| (*id, om.tags[id])))
            .collect();
        let listed = obj
            .block_on(obj.list("volumes/v1/seg"))
            .expect("list segments");
        let present: BTreeSet<(u64, u128)> = listed
            .iter()
            .filter_map(|o| {
                o.location
                    .filename()
                    .and_then(deltavol_dataplane::store::backend::parse_segment_name)
            })
            .collect();
        if present == referenced && om.retired.is_empty() {
            let stored: u64 = listed.iter().map(|o| o.size).sum();
            break (m, stored);
        }
        assert!(
            Instant::now() < deadline,
            "segments never settled: {} listed, {} referenced, {} retired",
            present.len(),
            referenced.len(),
            om.retired.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        m.snapshots
            .iter()
            .flat_map(|s| &s.segments)
            .any(|id| id & COMPACT_ID_BIT != 0),
        "no compacted segment"
    );
    let kept = ids(&mut c);
    assert_eq!(kept, vec![8, 28, 29, 30]);
    for &s in &kept {
        check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
    }
    // The clone's view opened segments that are deleted now: it reopens from the current
    // manifest.
    let mut cl = connect(server.addr, "c1");
    check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);
    let needed = model.needed(&kept);
    eprintln!(
        "s3: shipped {} B, needed {needed} B, stored {stored} B",
        model.shipped
    );
    assert!(stored * 4 < model.shipped, "nothing was given back");

    // Bounded metadata: old manifests are deleted below a floor (one commit and one
    // retention round a snapshot: some 60 manifests were written).
    let floor = obj
        .block_on(deltavol_dataplane::store::read_floor(&obj, "v1"))
        .expect("floor");
    let manifests = obj
        .block_on(obj.list("volumes/v1/manifest"))
        .expect("list manifests")
        .len() as u64;
    assert!(floor > 1, "no manifest was trimmed");
    assert!(
        manifests
            <= deltavol_dataplane::store::KEEP_MANIFESTS
                + deltavol_dataplane::store::TRIM_EVERY
                + 2,
        "{manifests} manifests kept"
    );
    eprintln!(
        "s3: {} manifests after {} commits, floor {floor}",
        manifests, m.sequence
    );
    // A restart loads from the floor, and reads the same.
    drop((c, cl));
    drop(server);
    let server = S3Server::spawn(&moto, bucket, &data, &token, &["--retired-grace-secs", "2"]);
    let mut c = connect(server.addr, "v1");
    assert_eq!(ids(&mut c), kept);
    for &s in &kept {
        check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
    }
    let mut cl = connect(server.addr, "c1");
    check_snapshot(&mut cl, 0, &clone_base, BS, &mut rng);
}

#[test]
fn the_listing_tells_own_from_shared_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(&dir.path().join("dp"), 2);
    let mut c = connect(server.local_addr(), "v1");
    c.create_volume(SIZE, BS as u32).expect("create");
    let data = |lba: u64, n: u64| Change::Data {
        lba,
        data: vec![lba as u8 + 1; (n as usize) * BS],
    };
    try_upload(&mut c, 1, &[data(0, 10)]).expect("1");
    try_upload(&mut c, 2, &[data(5, 3), data(20, 2)]).expect("2");
    try_upload(
        &mut c,
        3,
        &[
            data(0, 2),
            Change::Zero {
                lba: 21,
                nblocks: 1,
            },
        ],
    )
    .expect("3");
    let usage = |c: &mut Client| -> Vec<(u64, u64, u64)> {
        c.list_snapshots()
            .expect("list")
            .iter()
            .map(|s| (s.snap_id, s.own_bytes, s.shared_bytes))
            .collect()
    };
    let b = BS as u64;
    // 1: blocks 5..8 overwritten by 2 are its own, the other 7 shared. 2: block 21 zeroed by
    // 3 is its own. 3, the head: all shared.
    assert_eq!(
        usage(&mut c),
        vec![(1, 3 * b, 7 * b), (2, b, 4 * b), (3, 0, 2 * b)]
    );
    // Deleting 1 merges it into 2: 2 now holds blocks 0..10 and 20..22; 3 overwrote 0..2 and
    // 21.
    c.delete_snapshot(1).expect("delete 1");
    assert_eq!(usage(&mut c), vec![(2, 3 * b, 9 * b), (3, 0, 2 * b)]);
}

#[test]
fn kill_9_at_random_moments_of_compactions_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dp");
    let token = write_token(dir.path());
    let vdir = data.join("volumes").join("v1");
    let seed = std::env::var("DELTAVOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b11_1009u64);
    eprintln!("seed {seed}");
    let mut rng = Rng::new(seed);
    let mut model = Model::new();
    let mut head = 0u64;
    let mut kills = 0;
    for round in 0..6 {
        let server = ChildServer::spawn(&data, &token);
        let mut c = connect(server.addr, "v1");
        if round == 0 {
            c.create_volume(SIZE, BS as u32).expect("create");
            c.set_retention(&Policy::parse("last=2").unwrap())
                .expect("retention");
        }
        // What the last incarnation left: every kept snapshot reads as it did.
        let kept = ids(&mut c);
        if let Some(&h) = kept.last() {
            head = h;
            model.rewind(h);
        }
        for &s in &kept {
            check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
        }
        // Ship a few snapshots (each retention round kicks a compaction), then kill -9 the
        // server a random moment later, while it compacts.
        for _ in 0..3 + rng.below(4) {
            let snap = head + 1;
            let changes = random_changes(&mut rng, BLOCKS, BS, 6);
            model.record(snap, &changes);
            try_upload(&mut c, snap, &changes).expect("upload");
            head = snap;
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        drop(c);
        server.kill9();
        kills += 1;
    }
    let server = ChildServer::spawn(&data, &token);
    let mut c = connect(server.addr, "v1");
    let kept = ids(&mut c);
    assert_eq!(
        *kept.last().unwrap(),
        head,
        "an acknowledged commit was lost"
    );
    for &s in &kept {
        check_snapshot(&mut c, s, &model.at[&s], BS, &mut rng);
    }
    // Once the compaction the load kicked is done: only the manifest's segments are left,
    // and the store verifies.
    settle(&vdir);
    drop(c);
    drop(server);
    check_no_strays(&vdir, "v1");
    verify_tool(&data);
    assert_eq!(kills, 6);
}
