//! Per-volume credentials (issue 14): every message of a connection is scoped to its
//! credential's roles on its volume; credentials are issued, rotated and revoked with
//! `deltavol-dataplane credentials` while the server runs, and a revoked one is refused on its
//! next connection and cut off at its open connections' next request.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use deltavol_dataplane::retention::Policy;
use deltavol_dataplane::{start, Client, ClientError, ServerConfig};
use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::wire;

const BS: usize = 4096;
const SIZE: u64 = 64 * BS as u64;

fn dataplane(args: &[&str]) -> std::process::Output {
    // --no-config after the subcommand: before it, clap takes it for the server's.
    Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .arg(args[0])
        .arg("--no-config")
        .args(&args[1..])
        .output()
        .expect("run deltavol-dataplane")
}

/// `credentials issue` with `args`; returns the credential line it printed.
fn issue(creds: &Path, args: &[&str]) -> Vec<u8> {
    let mut all = vec![
        "credentials",
        "--credentials-file",
        creds.to_str().expect("utf-8"),
        "issue",
    ];
    all.extend_from_slice(args);
    let out = dataplane(&all);
    assert!(
        out.status.success(),
        "issue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("utf-8");
    let line = line.trim().to_string();
    assert!(line.starts_with("dvc1."), "{line:?}");
    line.into_bytes()
}

fn id_of(cred: &[u8]) -> String {
    String::from_utf8_lossy(cred)
        .split('.')
        .nth(1)
        .expect("id")
        .to_string()
}

fn creds_cmd(creds: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "credentials",
        "--credentials-file",
        creds.to_str().expect("utf-8"),
    ];
    all.extend_from_slice(args);
    dataplane(&all)
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> wire::ErrorCode {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e
            .server_code()
            .unwrap_or_else(|| panic!("not a server refusal: {e}")),
    }
}

fn connect_with(
    addr: std::net::SocketAddr,
    cred: &[u8],
    volume: &str,
) -> Result<Client, ClientError> {
    Client::connect(addr, cred, volume, timeouts())
}

/// A server (the real binary) with the admin token and a credentials file.
fn server(dir: &Path) -> (ChildServer, PathBuf) {
    let token = write_token(dir);
    let creds = dir.join("credentials.json");
    let data = dir.join("data");
    let s = ChildServer::spawn_with(
        &data,
        &token,
        &["--credentials-file", creds.to_str().expect("utf-8")],
        &[],
    );
    (s, creds)
}

/// Volume `name` with two snapshots of known data, made with the admin token.
fn seed(addr: std::net::SocketAddr, name: &str, fill: u8) -> Vec<u8> {
    let mut c = connect(addr, name);
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    for (snap, lba) in [(1u64, 3u64), (2, 9)] {
        let data = vec![fill.wrapping_add(snap as u8); 2 * BS];
        c.begin_snapshot(snap, snap - 1, SIZE).expect("begin");
        c.put_extent(lba, 2, &data).expect("put");
        c.commit().expect("commit");
        model[lba as usize * BS..(lba as usize + 2) * BS].copy_from_slice(&data);
    }
    model
}

fn read_all(c: &mut Client, snap: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    c.read_extents(snap, 0, SIZE / BS as u64, &mut buf)
        .expect("read");
    buf
}

/// Sends one raw request frame on a raw authenticated stream and returns the reply's error
/// code (None: not an error).
fn raw_request(
    s: &mut std::net::TcpStream,
    ty: wire::Message,
    build: impl FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> deltavol_schemas::flatbuffers::WIPOffset<
        deltavol_schemas::flatbuffers::UnionWIPOffset,
    >,
    payload: &[u8],
) -> Option<wire::ErrorCode> {
    use std::io::Write;
    let mut fbb = FlatBufferBuilder::new();
    let body = build(&mut fbb);
    let f = frame(&mut fbb, ty, body, payload);
    s.write_all(&f).expect("send");
    read_reply(s).expect("a reply").1
}

#[test]
fn a_credential_acts_only_within_its_roles_for_every_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (srv, creds) = server(dir.path());
    let model_a = seed(srv.addr, "vol-a", 0x10);
    let model_b = seed(srv.addr, "vol-b", 0x60);
    let writer_a = issue(&creds, &["--write", "vol-a", "--label", "node-1"]);
    let reader_b = issue(&creds, &["--read", "vol-b"]);

    // A's writer is refused on B at the handshake: no message of it reaches B.
    let e = code(connect_with(srv.addr, &writer_a, "vol-b"));
    assert_eq!(e, wire::ErrorCode::Unauthorized);
    let e = connect_with(srv.addr, &writer_a, "vol-b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no role on volume vol-b"), "{e}");
    // Nor on a volume that does not exist yet (it cannot create it).
    assert_eq!(
        code(connect_with(srv.addr, &writer_a, "vol-new")),
        wire::ErrorCode::Unauthorized
    );

    // A's writer does a writer's work on A.
    let mut a = connect_with(srv.addr, &writer_a, "vol-a").expect("writer connects");
    assert_eq!(read_all(&mut a, 2), model_a);
    assert_eq!(a.list_snapshots().expect("list").len(), 2);
    a.read_checksums(2, 0, 4).expect("checksums");
    a.create_volume(SIZE, BS as u32)
        .expect("create is idempotent");
    a.begin_snapshot(3, 2, SIZE).expect("begin");
    a.put_extent(0, 1, &[0x33; BS]).expect("put");
    a.commit().expect("commit");
    a.pin_snapshot(3, true, "keep").expect("pin");
    a.pin_snapshot(3, false, "").expect("unpin");
    a.set_retention(&Policy::default()).expect("retention");
    a.prune(true).expect("prune dry run");
    a.delete_snapshot(1).expect("delete its own snapshot");
    // ... but not an operator's: a new generation (it would fence the running writer) or
    // deleting the volume.
    let generation = a.volume_info().expect("info").generation;
    assert_eq!(code(a.new_generation()), wire::ErrorCode::Forbidden);
    let id = a.volume_info().expect("info").volume_id.expect("id");
    let e = a.delete_volume(id).unwrap_err();
    assert_eq!(e.server_code(), Some(wire::ErrorCode::Forbidden));
    assert!(e.to_string().contains("needs admin"), "{e}");
    let info = a.volume_info().expect("info");
    assert!(info.exists);
    assert_eq!(info.generation, generation, "no new generation");
    drop(a);

    // B's reader reads B ...
    let mut b = connect_with(srv.addr, &reader_b, "vol-b").expect("reader connects");
    assert_eq!(read_all(&mut b, 2), model_b);
    b.read_checksums(1, 0, 8).expect("checksums");
    let before = b.list_snapshots().expect("list");
    // ... and every request that changes anything is refused, with nothing changed.
    assert_eq!(
        code(b.create_volume(SIZE, BS as u32)),
        wire::ErrorCode::Forbidden
    );
    assert_eq!(
        code(b.begin_snapshot(3, 2, SIZE)),
        wire::ErrorCode::Forbidden
    );
    assert_eq!(
        code(b.set_retention(&Policy::default())),
        wire::ErrorCode::Forbidden
    );
    assert_eq!(
        code(b.pin_snapshot(1, true, "x")),
        wire::ErrorCode::Forbidden
    );
    assert_eq!(code(b.prune(false)), wire::ErrorCode::Forbidden);
    assert_eq!(code(b.delete_snapshot(1)), wire::ErrorCode::Forbidden);
    assert_eq!(code(b.new_generation()), wire::ErrorCode::Forbidden);
    let id_b = b.volume_info().expect("info").volume_id.expect("id");
    assert_eq!(code(b.delete_volume(id_b)), wire::ErrorCode::Forbidden);
    assert_eq!(code(b.clone_volume("vol-b", 1)), wire::ErrorCode::Forbidden);
    assert_eq!(b.list_snapshots().expect("list"), before);
    drop(b);

    // PutExtents and Commit as raw frames (the client library sends them only inside an
    // upload, which the reader cannot begin).
    let (mut s, reply) = raw_auth(srv.addr, &reader_b, "vol-b");
    assert_eq!(reply.expect("auth reply").0, wire::Message::AuthOk);
    let data = [0x77u8; BS];
    let crc = crc32c::crc32c(&data);
    let e = raw_request(
        &mut s,
        wire::Message::PutExtents,
        |fbb| {
            let ext = [wire::Extent::new(0, 1, crc, wire::ExtentKind::Data)];
            let v = fbb.create_vector(&ext);
            wire::PutExtents::create(
                fbb,
                &wire::PutExtentsArgs {
                    snap_id: 3,
                    extents: Some(v),
                },
            )
            .as_union_value()
        },
        &data,
    );
    assert_eq!(e, Some(wire::ErrorCode::Forbidden));
    let e = raw_request(
        &mut s,
        wire::Message::Commit,
        |fbb| {
            wire::Commit::create(
                fbb,
                &wire::CommitArgs {
                    snap_id: 3,
                    extent_count: 1,
                    total_bytes: BS as u64,
                },
            )
            .as_union_value()
        },
        &[],
    );
    assert_eq!(e, Some(wire::ErrorCode::Forbidden));
    let mut admin = connect(srv.addr, "vol-b");
    assert_eq!(admin.list_snapshots().expect("list"), before);
    assert_eq!(read_all(&mut admin, 2), model_b);
}

#[test]
fn a_clone_needs_write_on_itself_and_read_on_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (srv, creds) = server(dir.path());
    let model = seed(srv.addr, "base", 0x21);
    let cloner = issue(&creds, &["--write", "clone-*", "--read", "base"]);
    let no_source = issue(&creds, &["--write", "other-*"]);

    let mut c = connect_with(srv.addr, &cloner, "clone-1").expect("connects");
    c.clone_volume("base", 2).expect("clone");
    assert_eq!(
        read_all(&mut c, 0),
        model,
        "the clone's base reads the source"
    );
    // The cloner may read the source but not change it.
    let mut src = connect_with(srv.addr, &cloner, "base").expect("reads base");
    assert_eq!(code(src.delete_snapshot(1)), wire::ErrorCode::Forbidden);

    let mut d = connect_with(srv.addr, &no_source, "other-1").expect("connects");
    let e = d.clone_volume("base", 2).unwrap_err();
    assert_eq!(e.server_code(), Some(wire::ErrorCode::Forbidden));
    assert!(
        e.to_string().contains("may not read volume \"base\""),
        "{e}"
    );
    assert!(!d.volume_info().expect("info").exists, "no clone was made");
}

#[test]
fn revoked_credentials_are_refused_and_open_connections_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (srv, creds) = server(dir.path());
    seed(srv.addr, "vol-a", 0x10);
    let old = issue(&creds, &["--write", "vol-a"]);
    let mut open = connect_with(srv.addr, &old, "vol-a").expect("connects");
    open.list_snapshots().expect("works before the rotation");

    // Rotation: a second credential with the same rights; both work meanwhile.
    let out = creds_cmd(&creds, &["rotate", &id_of(&old)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .as_bytes()
        .to_vec();
    assert_ne!(id_of(&new), id_of(&old));
    connect_with(srv.addr, &new, "vol-a").expect("the new one works at once");
    connect_with(srv.addr, &old, "vol-a").expect("the old one still works");
    open.list_snapshots().expect("the open connection goes on");

    let out = creds_cmd(&creds, &["revoke", &id_of(&old)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The next connection is refused at once (the handshake re-reads a changed file).
    let e = connect_with(srv.addr, &old, "vol-a").unwrap_err();
    assert_eq!(e.server_code(), Some(wire::ErrorCode::Unauthorized));
    assert!(e.to_string().contains("revoked"), "{e}");
    // The open connection is closed at a request within the watcher's interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match open.list_snapshots() {
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) => panic!("the revoked credential's connection still works after 10 s"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        refused.server_code(),
        Some(wire::ErrorCode::Unauthorized),
        "{refused}"
    );
    let mut c = connect_with(srv.addr, &new, "vol-a").expect("the rotated one works");
    c.list_snapshots().expect("list");

    // A wrong secret for a valid id is refused.
    let mut forged = new.clone();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let e = connect_with(srv.addr, &forged, "vol-a").unwrap_err();
    assert_eq!(e.server_code(), Some(wire::ErrorCode::Unauthorized));
}

#[test]
fn the_command_keeps_secrets_out_of_the_file_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("credentials.json");
    let cred = issue(
        &creds,
        &["--write", "db", "--read", "base-*", "--label", "node 7"],
    );
    let secret = String::from_utf8_lossy(&cred)
        .rsplit('.')
        .next()
        .expect("secret")
        .to_string();
    let text = std::fs::read_to_string(&creds).expect("file");
    assert!(!text.contains(&secret), "the secret is not stored");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let out = creds_cmd(&creds, &["list"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains(&id_of(&cred)), "{listed}");
    assert!(listed.contains("write db, read base-*"), "{listed}");
    assert!(listed.contains("node 7"), "{listed}");
    assert!(!listed.contains(&secret));
    let out = creds_cmd(&creds, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["credentials"][0]["grants"][1]["role"], "read");

    // --out: the credential goes to a new 0600 file; an existing file is never overwritten.
    let out_file = dir.path().join("node.cred");
    let out = creds_cmd(
        &creds,
        &[
            "issue",
            "--admin",
            "--out",
            out_file.to_str().expect("utf-8"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "nothing secret on stdout");
    let written = std::fs::read(&out_file).expect("written");
    assert!(written.starts_with(b"dvc1."));
    assert_eq!(
        std::fs::metadata(&out_file)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let out = creds_cmd(
        &creds,
        &[
            "issue",
            "--admin",
            "--out",
            out_file.to_str().expect("utf-8"),
        ],
    );
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&out_file).expect("kept"), written);

    let before = std::fs::read(&creds).expect("file");
    for (args, needle) in [
        (vec!["issue"], "needs a role"),
        (vec!["issue", "--write", "a/b"], "invalid volume pattern"),
        (
            vec!["issue", "--admin", "--write", "x"],
            "cannot be used with",
        ),
        (
            vec!["revoke", "0123456789abcdef"],
            "no credential 0123456789abcdef",
        ),
        (vec!["rotate", "0123456789abcdef"], "no credential"),
    ] {
        let out = creds_cmd(&creds, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read(&creds).expect("file"),
        before,
        "refusals change nothing"
    );

    // A damaged file is an error naming it, for the command and for the server.
    std::fs::write(
        &creds,
        b"{\"version\": 1, \"credentials\": [{\"id\": \"zz\"}]}",
    )
    .expect("damage");
    let out = creds_cmd(&creds, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(creds.to_str().expect("utf-8")), "{err}");
    let token = write_token(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["--no-config", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--auth-token-file")
        .arg(&token)
        .arg("--credentials-file")
        .arg(&creds)
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "the server refuses a damaged credentials file"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("credentials file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_server_with_credentials_only_takes_no_token_and_admin_credentials_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("credentials.json");
    let admin = issue(&creds, &["--admin"]);
    let writer = issue(&creds, &["--write", "db"]);
    let srv = start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        threads: 2,
        auth_token: Vec::new(),
        credentials: Some(creds.clone()),
        tls: None,
        insecure: false,
        limits: Default::default(),
    })
    .expect("starts with credentials only");
    let addr = srv.local_addr();
    let e = Client::connect(addr, TOKEN, "db", timeouts()).unwrap_err();
    assert_eq!(e.server_code(), Some(wire::ErrorCode::Unauthorized));
    assert!(e.to_string().contains("credentials only"), "{e}");

    let stats = srv.stats_shared();
    let count = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        count(&stats.auth_refused),
        1,
        "the refused token is counted"
    );
    let mut w = connect_with(addr, &writer, "db").expect("writer");
    assert_eq!(code(w.new_generation()), wire::ErrorCode::Forbidden);
    assert_eq!(
        count(&stats.forbidden),
        1,
        "the forbidden request is counted"
    );
    assert_eq!(count(&stats.auth_refused), 1);
    w.create_volume(SIZE, BS as u32).expect("create");
    w.begin_snapshot(1, 0, SIZE).expect("begin");
    w.put_extent(5, 1, &[9u8; BS]).expect("put");
    w.commit().expect("commit");
    // Recovery elsewhere: the admin credential starts a new generation, which fences the
    // writer's connection.
    let mut r = connect_with(addr, &admin, "db").expect("admin");
    let g = r.new_generation().expect("new generation");
    assert!(g > 0);
    assert_eq!(
        code(w.begin_snapshot(2, 1, SIZE)),
        wire::ErrorCode::StaleGeneration
    );
    let mut buf = vec![0u8; BS];
    r.read_extents(1, 5, 1, &mut buf).expect("read");
    assert_eq!(buf, vec![9u8; BS]);
    // A damaged credential file on the client side is a clear local error.
    let e = Client::connect(addr, b"dvc1.nothex.zz", "db", timeouts()).unwrap_err();
    assert!(e.to_string().contains("damaged credential"), "{e}");
    srv.shutdown();
}

/// Every request type, as the committed fuzz seeds hold one valid frame of each: a credential
/// of A gets no request through on B (the handshake is refused and the connection closed, the
/// request after it goes nowhere), and B's reader gets `Forbidden` for each request that
/// changes anything; B is the same afterwards.
#[test]
fn every_request_type_of_a_credential_of_a_is_refused_on_b() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let (srv, creds) = server(dir.path());
    seed(srv.addr, "vol-a", 0x10);
    let model_b = seed(srv.addr, "vol-b", 0x60);
    let writer_a = issue(&creds, &["--write", "vol-a"]);
    let reader_b = issue(&creds, &["--read", "vol-b"]);
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decode");
    let changing = [
        "create_volume",
        "begin_snapshot",
        "put_extents",
        "commit",
        "delete_snapshot",
        "new_generation",
        "clone_volume",
        "delete_volume",
        "set_retention",
        "pin_snapshot",
        "prune",
        "put_heat",
    ];
    let reading = [
        "get_volume_info",
        "list_snapshots",
        "read_extents",
        "read_checksums",
        "get_heat",
    ];
    let mut admin = connect(srv.addr, "vol-b");
    let before = admin.list_snapshots().expect("list");
    let info_before = admin.volume_info().expect("info");
    for name in changing.iter().chain(&reading) {
        let f = std::fs::read(corpus.join(name)).expect("the seed frame");
        let (mut s, reply) = raw_auth(srv.addr, &writer_a, "vol-b");
        assert_eq!(
            reply.expect("a refusal").1,
            Some(wire::ErrorCode::Unauthorized),
            "{name}"
        );
        let _ = s.write_all(&f);
        assert!(closed(&mut s), "{name}: the refused connection is closed");

        let (mut s, reply) = raw_auth(srv.addr, &reader_b, "vol-b");
        assert_eq!(reply.expect("auth").0, wire::Message::AuthOk, "{name}");
        s.write_all(&f).expect("send");
        let code = read_reply(&mut s).expect("a reply").1;
        if changing.contains(name) {
            assert_eq!(code, Some(wire::ErrorCode::Forbidden), "{name}");
        } else {
            assert_ne!(code, Some(wire::ErrorCode::Forbidden), "{name}");
        }
    }
    assert_eq!(admin.list_snapshots().expect("list"), before);
    let info = admin.volume_info().expect("info");
    assert_eq!(
        (info.generation, info.volume_id, info.retention),
        (
            info_before.generation,
            info_before.volume_id,
            info_before.retention
        )
    );
    assert_eq!(read_all(&mut admin, 2), model_b);
    assert_eq!(
        admin.get_heat().expect("get"),
        None,
        "no heat map was stored"
    );
}
