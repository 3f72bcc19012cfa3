//! A volume's read heat map on the data plane (issue 19): `put_heat` / `get_heat` round trip
//! byte-exact (a full 4 MiB map crosses the wire in pieces), a second put replaces the first,
//! the map survives a restart, there is none before a put, bad shapes are refused with nothing
//! stored, the read role gets but does not put, a fenced generation does not put, it goes with
//! the volume and a clone starts without one. Each on the local store and on an S3-compatible
//! store (moto; skipped loudly when `moto_server` is missing).

mod common;
mod moto;

use std::path::Path;

use common::*;
use deltavol_dataplane::store::{encode_heat, heat_rel};
use deltavol_dataplane::{Client, ClientError, ClientErrorKind};
use deltavol_schemas::wire::ErrorCode;
use deltavol_schemas::HEAT_BYTES_MAX;
use moto::{Moto, S3Server};

const BS: u32 = 4096;

/// How to (re)start the server under test on one store.
trait Store {
    type Server;
    fn spawn(&self, dir: &Path, run: usize) -> (Self::Server, std::net::SocketAddr);
}

struct Local;

impl Store for Local {
    type Server = ChildServer;
    fn spawn(&self, dir: &Path, _run: usize) -> (ChildServer, std::net::SocketAddr) {
        let token = write_token(dir);
        let s = ChildServer::spawn(&dir.join("data"), &token);
        let addr = s.addr;
        (s, addr)
    }
}

struct S3<'a> {
    moto: &'a Moto,
    bucket: String,
}

impl Store for S3<'_> {
    type Server = S3Server;
    fn spawn(&self, dir: &Path, run: usize) -> (S3Server, std::net::SocketAddr) {
        let token = write_token(dir);
        // Every run its own local dir: everything is served from the bucket.
        let s = S3Server::spawn(
            self.moto,
            &self.bucket,
            &dir.join(format!("run-{run}")),
            &token,
            &[],
        );
        let addr = s.addr;
        (s, addr)
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e
            .server_code()
            .unwrap_or_else(|| panic!("not a server refusal: {e}")),
    }
}

fn heat_of(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn create(addr: std::net::SocketAddr, name: &str, blocks: u64) -> Client {
    let mut c = connect(addr, name);
    c.create_volume(blocks * u64::from(BS), BS).expect("create");
    c
}

/// The whole behaviour on one store.
fn scenario(store: &impl Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = store.spawn(dir.path(), 0);

    // A volume whose map at one block per region is exactly the cap: 4 MiB, four pieces.
    let big_blocks = HEAT_BYTES_MAX as u64;
    let mut big = create(addr, "big", big_blocks);
    assert_eq!(big.get_heat().expect("get"), None, "none before any put");
    let full = heat_of(HEAT_BYTES_MAX, 1);
    big.put_heat(1, &full).expect("put 4 MiB");
    let got = big.get_heat().expect("get");
    assert!(
        got.as_ref() == Some(&(1, full.clone())),
        "4 MiB map round trip byte-exact"
    );
    // Replaced by a second put (another region size, another length).
    let half = heat_of(HEAT_BYTES_MAX / 2, 2);
    big.put_heat(2, &half).expect("put 2 MiB");
    assert!(big.get_heat().expect("get") == Some((2, half.clone())));

    // A volume whose last region is partial: 1001 blocks in regions of 8 = 126 entries.
    let mut odd = create(addr, "odd", 1001);
    let small = heat_of(126, 3);
    odd.put_heat(8, &small).expect("put");
    assert_eq!(odd.get_heat().expect("get"), Some((8, small.clone())));

    // Refused, nothing stored: region size not a power of two, wrong lengths, over the cap.
    for (region, len, want) in [
        (0u32, 126usize, ErrorCode::Malformed),
        (3, 334, ErrorCode::Malformed),
        (8, 125, ErrorCode::Malformed),
        (8, 127, ErrorCode::Malformed),
        (16, 126, ErrorCode::Malformed),
        (8, 0, ErrorCode::Malformed),
    ] {
        let e = odd.put_heat(region, &vec![0xee; len]).expect_err("refused");
        assert_eq!(
            e.server_code(),
            Some(want),
            "region {region} len {len}: {e}"
        );
        assert!(e.to_string().contains("heat map"), "{e}");
    }
    let e = odd
        .put_heat(1, &vec![0; HEAT_BYTES_MAX + 1])
        .expect_err("over the cap");
    assert_eq!(e.kind(), ClientErrorKind::Usage, "{e}");
    assert_eq!(odd.get_heat().expect("get"), Some((8, small.clone())));
    // A volume too large for one block per region: TooLarge, naming the way out.
    let mut huge = create(addr, "huge", big_blocks + 1);
    let e = huge.put_heat(1, &full).expect_err("too many regions");
    assert_eq!(e.server_code(), Some(ErrorCode::TooLarge), "{e}");
    assert!(e.to_string().contains("use larger regions"), "{e}");
    assert_eq!(huge.get_heat().expect("get"), None);
    let fits = heat_of(HEAT_BYTES_MAX / 2 + 1, 4);
    huge.put_heat(2, &fits).expect("larger regions fit");

    // A clone starts without one; the source keeps its own.
    let mut snap = create(addr, "src", 64);
    snap.begin_snapshot(1, 0, 64 * u64::from(BS))
        .expect("begin");
    snap.put_extent(0, 1, &vec![7u8; BS as usize])
        .expect("put extent");
    snap.commit().expect("commit");
    let src_heat = heat_of(8, 5);
    snap.put_heat(8, &src_heat).expect("put");
    let mut cl = connect(addr, "src-clone");
    cl.clone_volume("src", 1).expect("clone");
    assert_eq!(cl.get_heat().expect("get"), None, "a clone has no heat map");
    assert_eq!(snap.get_heat().expect("get"), Some((8, src_heat.clone())));

    // A fenced writer cannot replace the map of the one that recovered the volume.
    let mut old = connect(addr, "odd");
    let mut recovered = connect(addr, "odd");
    recovered.new_generation().expect("new generation");
    assert_eq!(
        code(old.put_heat(8, &heat_of(126, 6))),
        ErrorCode::StaleGeneration
    );
    assert_eq!(
        old.get_heat().expect("a fenced reader still reads"),
        Some((8, small.clone()))
    );
    drop((old, recovered, big, odd, huge, snap, cl));

    // Survives a restart.
    drop(server);
    let (server, addr) = store.spawn(dir.path(), 1);
    let mut big = connect(addr, "big");
    assert!(big.get_heat().expect("get") == Some((2, half.clone())));
    let mut odd = connect(addr, "odd");
    assert_eq!(odd.get_heat().expect("get"), Some((8, small.clone())));

    // Deleted with the volume: a new volume of the name has none.
    let id = odd.info().volume_id.expect("id");
    odd.delete_volume(id).expect("delete");
    drop(odd);
    let mut again = create(addr, "odd", 1001);
    assert_eq!(again.get_heat().expect("get"), None, "gone with the volume");
    drop((big, again));
    drop(server);
}

#[test]
fn heat_map_on_the_local_store() {
    scenario(&Local);
}

#[test]
fn heat_map_on_s3() {
    let Some(moto) = Moto::start("heat_map_on_s3") else {
        return;
    };
    let bucket = moto.bucket("heat");
    scenario(&S3 {
        moto: &moto,
        bucket: bucket.clone(),
    });
    // The map is an object next to the volume's others; deleting the volume removed it
    // (`odd`), the others are there.
    let obj = moto.objects(&bucket);
    let get = |name: &str| {
        obj.block_on(obj.get(&obj.key(&heat_rel(name))))
            .expect("get")
    };
    assert!(get("big").is_some());
    assert!(get("odd").is_none(), "deleted with its volume");

    // A map left under the name by another volume (a deletion that crashed half-way) is not
    // served to the volume that has the name now.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = S3 {
        moto: &moto,
        bucket: bucket.clone(),
    };
    let (_server, addr) = store.spawn(dir.path(), 9);
    let c = connect(addr, "big");
    let mut other_id = c.info().volume_id.expect("id");
    other_id[0] ^= 0xff;
    obj.block_on(obj.put(
        &obj.key(&heat_rel("big")),
        encode_heat(&other_id, 4, &[1, 2, 3]),
    ))
    .expect("put a stray map");
    drop(c);
    let mut c = connect(addr, "big");
    assert_eq!(c.get_heat().expect("get"), None);
    drop((c, _server));

    // gc removes the heat map of a volume that does not exist (no manifest), past its grace
    // period, and leaves the others.
    obj.block_on(obj.put(&obj.key(&heat_rel("gone")), encode_heat(&other_id, 1, &[1])))
        .expect("put an orphan map");
    let mut args: Vec<String> = ["gc", "--min-age-secs", "0", "--data-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(dir.path().join("gc").display().to_string());
    args.extend(moto.store_args(&bucket));
    let (code, out, err) = moto::run_tool(&args);
    assert_eq!(code, 0, "gc:\n{out}\n{err}");
    assert!(out.contains("gone/heat.dvh"), "{out}");
    assert!(get("gone").is_none(), "orphan removed");
    assert!(get("big").is_some(), "a live volume's map stays");
}

#[test]
fn the_read_role_gets_the_heat_map_but_does_not_put_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_token(dir.path());
    let creds = dir.path().join("credentials.json");
    let server = ChildServer::spawn_with(
        &dir.path().join("data"),
        &token,
        &["--credentials-file", creds.to_str().expect("utf-8")],
        &[],
    );
    let issue = |role: &str| -> Vec<u8> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
            .args(["credentials", "--no-config", "--credentials-file"])
            .arg(&creds)
            .args(["issue", role, "vol"])
            .output()
            .expect("run credentials issue");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .as_bytes()
            .to_vec()
    };
    let reader = issue("--read");
    let writer = issue("--write");
    let mut w = Client::connect(server.addr, &writer, "vol", timeouts()).expect("writer");
    w.create_volume(64 * u64::from(BS), BS).expect("create");
    let heat = heat_of(4, 7);
    w.put_heat(16, &heat).expect("the write role puts");
    let mut r = Client::connect(server.addr, &reader, "vol", timeouts()).expect("reader");
    assert_eq!(
        r.get_heat().expect("the read role gets"),
        Some((16, heat.clone()))
    );
    let e = r
        .put_heat(16, &[9; 4])
        .expect_err("the read role does not put");
    assert_eq!(e.server_code(), Some(ErrorCode::Forbidden), "{e}");
    assert!(e.to_string().contains("heat map"), "{e}");
    assert_eq!(w.get_heat().expect("get"), Some((16, heat)));
}

#[test]
fn a_damaged_heat_map_is_refused_and_replaced_by_the_next_put() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Local.spawn(dir.path(), 0);
    let mut c = create(addr, "v", 100);
    let heat = heat_of(25, 8);
    c.put_heat(4, &heat).expect("put");
    drop((c, server));
    let vdir = dir.path().join("data/volumes/v");
    let path = vdir.join("HEAT");
    let mut raw = std::fs::read(&path).expect("the HEAT file");
    raw[40] ^= 1;
    std::fs::write(&path, &raw).expect("damage it");
    // A temp file of a put that crashed is removed at load.
    std::fs::write(vdir.join("HEAT.tmp"), b"half").expect("temp file");
    let (_server, addr) = Local.spawn(dir.path(), 1);
    let mut c = connect(addr, "v");
    assert!(!vdir.join("HEAT.tmp").exists(), "temp file removed at load");
    let e = c.get_heat().expect_err("damaged");
    assert_eq!(e.server_code(), Some(ErrorCode::Damaged), "{e}");
    assert!(e.to_string().contains("crc32c"), "{e}");
    c.put_heat(4, &heat).expect("a new put replaces it");
    assert_eq!(c.get_heat().expect("get"), Some((4, heat)));
}

#[test]
fn stored_heat_maps_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let mut c = create(server.local_addr(), "m", 64);
    let stored = || {
        server
            .stats()
            .heat_maps_stored
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(stored(), 0);
    c.put_heat(8, &[1; 8]).expect("put");
    c.put_heat(8, &[2; 8]).expect("put");
    c.put_heat(8, &[2; 7]).expect_err("refused");
    assert_eq!(stored(), 2);
    assert_eq!(c.get_heat().expect("get"), Some((8, vec![2; 8])));
    drop(c);
    server.shutdown();
}
