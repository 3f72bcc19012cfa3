//! The data plane over TLS (issue 14): snapshots shipped and read back byte-exact through
//! TLS sessions that move from the accepting shard to the owner shard; a client refuses a
//! server it cannot verify; mutual TLS; plain TCP only on loopback or with `--insecure`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use deltavol_dataplane::tls::{generate, ClientTls, ServerTlsFiles};
use deltavol_dataplane::{start, Client, ClientAccess, ServerConfig, ServerHandle};

const BS: usize = 4096;

fn tls_server(dir: &Path, certs: &Path, client_ca: bool) -> ServerHandle {
    tls_server_with(dir, certs, client_ca, Default::default())
}

fn tls_server_with(
    dir: &Path,
    certs: &Path,
    client_ca: bool,
    limits: deltavol_dataplane::ConnLimits,
) -> ServerHandle {
    let tls = ServerTlsFiles::open(
        &certs.join("server.pem"),
        &certs.join("server.key"),
        client_ca.then(|| certs.join("ca.pem")).as_deref(),
    )
    .expect("server TLS loads");
    start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.join("data"),
        threads: 2,
        auth_token: TOKEN.to_vec(),
        credentials: None,
        tls: Some(tls),
        insecure: false,
        limits,
    })
    .expect("server starts")
}

fn certs(dir: &Path, name: &str, clients: &[&str]) -> std::path::PathBuf {
    let d = dir.join(name);
    let clients: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    generate(&d, &["127.0.0.1".into(), "dp.test".into()], &clients).expect("certificates");
    d
}

fn access(certs: &Path, name: Option<&str>) -> ClientAccess {
    let tls = ClientTls::load(&certs.join("ca.pem"), None).expect("client TLS loads");
    ClientAccess::new(TOKEN).with_tls(tls, name.map(str::to_string))
}

#[test]
fn snapshots_ship_and_read_back_over_tls_on_every_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = certs(dir.path(), "tls", &[]);
    let srv = tls_server(dir.path(), &c, false);
    let acc = access(&c, None);
    let named = access(&c, Some("dp.test"));
    let mut rng = Rng::new(0x7153);
    // Several volumes: with two shards, some connections are handed off to the other shard
    // (their TLS session with them).
    for (i, vol) in ["tls-a", "tls-b", "tls-c", "tls-d"].iter().enumerate() {
        let acc = if i % 2 == 0 { &acc } else { &named };
        let mut cl = Client::connect(srv.local_addr(), acc, vol, timeouts()).expect("connects");
        let blocks = 2048u64; // 8 MiB: frames of several MiB through the TLS transports
        let size = blocks * BS as u64;
        cl.create_volume(size, BS as u32).expect("create");
        let mut model = vec![0u8; size as usize];
        let mut big = vec![0u8; 6 << 20];
        rng.fill(&mut big);
        let changes = vec![
            Change::Data {
                lba: 7,
                data: big.clone(),
            },
            Change::Zero {
                lba: 100,
                nblocks: 3,
            },
        ];
        upload(&mut cl, 1, 0, size, BS, &changes);
        apply(&mut model, BS, &changes);
        let changes = random_changes(&mut rng, blocks, BS, 40);
        upload(&mut cl, 2, 1, size, BS, &changes);
        apply(&mut model, BS, &changes);
        check_snapshot(&mut cl, 2, &model, BS, &mut rng);
        // A new connection reads the same.
        let mut again = Client::connect(srv.local_addr(), acc, vol, timeouts()).expect("again");
        check_snapshot(&mut again, 2, &model, BS, &mut rng);
    }
    let stats = srv.stats();
    assert!(
        stats.handed_off.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "some TLS sessions moved to another shard"
    );
    srv.shutdown();
}

#[test]
fn the_client_refuses_a_server_it_cannot_verify_and_plain_clients_get_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = certs(dir.path(), "tls", &[]);
    let other = certs(dir.path(), "other", &[]);
    let srv = tls_server(dir.path(), &c, false);
    let addr = srv.local_addr();

    // Another CA: not trusted.
    let e = Client::connect(addr, &access(&other, None), "v", timeouts()).unwrap_err();
    assert!(e.to_string().contains("not trusted"), "{e}");
    // The right CA but a name the certificate does not carry.
    let e = Client::connect(addr, &access(&c, Some("evil.test")), "v", timeouts()).unwrap_err();
    assert!(e.to_string().contains("evil.test"), "{e}");
    // A plain-TCP client gets no session (and the server goes on).
    assert!(Client::connect(addr, TOKEN, "v", timeouts()).is_err());
    let mut ok = Client::connect(addr, &access(&c, None), "v", timeouts()).expect("TLS works");
    ok.create_volume(1 << 20, BS as u32).expect("create");
    srv.shutdown();
}

#[test]
fn mutual_tls_takes_only_clients_with_a_certificate_of_its_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = certs(dir.path(), "tls", &["node-1"]);
    let other = certs(dir.path(), "other", &["intruder"]);
    let srv = tls_server(dir.path(), &c, true);
    let addr = srv.local_addr();
    let connect = |client: Option<(&Path, &Path)>| {
        let tls = ClientTls::load(&c.join("ca.pem"), client).expect("loads");
        let mut cl = Client::connect(
            addr,
            &ClientAccess::new(TOKEN).with_tls(tls, None),
            "m",
            timeouts(),
        )?;
        cl.volume_info()
    };
    assert!(connect(None).is_err(), "no client certificate");
    assert!(
        connect(Some((
            &other.join("client-intruder.pem"),
            &other.join("client-intruder.key")
        )))
        .is_err(),
        "a client certificate of another CA"
    );
    connect(Some((
        &c.join("client-node-1.pem"),
        &c.join("client-node-1.key"),
    )))
    .expect("the node's certificate");
    srv.shutdown();
}

#[test]
fn plain_tcp_only_on_loopback_or_with_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The server refuses plain TCP on an address that is not loopback ...
    let cfg = |insecure| ServerConfig {
        listen: "0.0.0.0:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        threads: 1,
        auth_token: TOKEN.to_vec(),
        credentials: None,
        tls: None,
        insecure,
        limits: Default::default(),
    };
    let e = match start(cfg(false)) {
        Ok(_) => panic!("plain TCP on 0.0.0.0 without insecure started"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("refusing plain TCP") && e.contains("--insecure"),
        "{e}"
    );
    // ... and serves with --insecure.
    let srv = start(cfg(true)).expect("starts with insecure");
    let port = srv.local_addr().port();
    // The client refuses plain TCP to an address that is not loopback, before connecting ...
    let target = format!("0.0.0.0:{port}");
    let e = Client::connect(target.as_str(), TOKEN, "p", timeouts()).unwrap_err();
    assert!(e.to_string().contains("refusing plain TCP"), "{e}");
    // ... unless told it is meant.
    let mut cl = Client::connect(
        target.as_str(),
        &ClientAccess::new(TOKEN).insecure(true),
        "p",
        timeouts(),
    )
    .expect("insecure connects");
    cl.create_volume(1 << 20, BS as u32).expect("create");
    srv.shutdown();

    // The binary says the same, naming the flags.
    let token = write_token(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["--no-config", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data2"))
        .arg("--auth-token-file")
        .arg(&token)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn tls_init_writes_certificates_the_server_serves_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("tls");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
            .args(args)
            .output()
            .expect("run")
    };
    let d = certs.to_str().expect("utf-8");
    let out = run(&[
        "tls",
        "init",
        "--no-config",
        "--dir",
        d,
        "--host",
        "127.0.0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = run(&[
        "tls",
        "init",
        "--no-config",
        "--dir",
        d,
        "--host",
        "127.0.0.1",
    ]);
    assert!(!again.status.success(), "never overwrites");
    let token = write_token(dir.path());
    let srv = ChildServer::spawn_with(
        &dir.path().join("data"),
        &token,
        &[
            "--tls-cert",
            &format!("{d}/server.pem"),
            "--tls-key",
            &format!("{d}/server.key"),
        ],
        &[],
    );
    let mut cl = Client::connect(srv.addr, &access(&certs, None), "cli", timeouts()).expect("TLS");
    cl.create_volume(1 << 20, BS as u32).expect("create");
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = certs(dir.path(), "tls", &[]);
    let renewed = certs(dir.path(), "renewed", &[]);
    let srv = tls_server(dir.path(), &c, false);
    let addr = srv.local_addr();
    let mut open = Client::connect(addr, &access(&c, None), "r", timeouts()).expect("old CA");
    open.create_volume(1 << 20, BS as u32).expect("create");

    // A half-done renewal (the new key before its certificate) does not load: the server
    // keeps serving the certificate that works.
    std::fs::copy(renewed.join("server.key"), c.join("server.key.new")).expect("copy");
    std::fs::rename(c.join("server.key.new"), c.join("server.key")).expect("rename");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    Client::connect(addr, &access(&c, None), "r", timeouts())
        .expect("the old certificate is still served");

    // The certificate follows: new connections get it within the reload interval.
    std::fs::copy(renewed.join("server.pem"), c.join("server.pem.new")).expect("copy");
    std::fs::rename(c.join("server.pem.new"), c.join("server.pem")).expect("rename");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Client::connect(addr, &access(&renewed, None), "r", timeouts()) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("the renewed certificate was not served within 10 s: {e}"),
        }
    }
    let e = Client::connect(addr, &access(&c, None), "r", timeouts()).unwrap_err();
    assert!(e.to_string().contains("not trusted"), "{e}");
    // The session opened before goes on.
    open.volume_info().expect("the open connection still works");
    srv.shutdown();
}

/// True when the server closes the connection (after an alert, maybe) within the read
/// timeout.
fn ends(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn garbage_and_silent_clients_on_the_tls_port_are_dropped_and_good_ones_served() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = certs(dir.path(), "tls", &[]);
    let limits = deltavol_dataplane::ConnLimits {
        handshake_timeout_ms: 500,
        ..Default::default()
    };
    let srv = tls_server_with(dir.path(), &c, false, limits);
    let addr = srv.local_addr();
    let raw = || {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        s
    };
    // Garbage instead of a ClientHello: the connection is closed.
    let mut g = raw();
    g.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x00, 0x13, 0x37])
        .expect("send");
    g.write_all(&[0xa5; 4096]).expect("send");
    assert!(ends(&mut g), "garbage is dropped");
    // A plain deltavol Hello on the TLS port: dropped too.
    let mut p = raw();
    let mut fbb = deltavol_schemas::flatbuffers::FlatBufferBuilder::new();
    let body = deltavol_schemas::wire::Hello::create(
        &mut fbb,
        &deltavol_schemas::wire::HelloArgs {
            protocol_version: deltavol_schemas::PROTOCOL_VERSION,
            client_name: None,
        },
    );
    let f = frame(
        &mut fbb,
        deltavol_schemas::wire::Message::Hello,
        body.as_union_value(),
        &[],
    );
    p.write_all(&f).expect("send");
    assert!(ends(&mut p), "a plain client is dropped");
    // Silent sockets (a slow loris of the TLS handshake) are closed at the deadline, while a
    // good client is served meanwhile.
    let mut silent: Vec<_> = (0..8).map(|_| raw()).collect();
    let mut good = Client::connect(addr, &access(&c, None), "g", timeouts()).expect("served");
    good.create_volume(1 << 20, BS as u32).expect("create");
    for s in &mut silent {
        assert!(
            closed(s),
            "a silent socket is closed at the handshake deadline"
        );
    }
    let refused = srv
        .stats()
        .auth_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        refused >= 2,
        "the failed TLS handshakes are counted: {refused}"
    );
    good.volume_info().expect("the good client goes on");
    srv.shutdown();
}
