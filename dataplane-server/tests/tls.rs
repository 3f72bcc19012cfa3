//! TLS for data-plane connections (`deltavol_dataplane::tls`), on 127.0.0.1:
//! * certificates from `tls::generate` load on both sides; a tokio-uring server accepts with
//!   `ServerTls::accept`, reads a first frame over the tokio `TlsStream` (as the handshake
//!   does), moves the session to the owner-shard transport (`into_inner` + `into_std` +
//!   `tokio_uring::net::TcpStream::from_std` → `ServerTransport::Tls`) and echoes frames:
//!   a second frame that arrived in the same record as the first survives the move, a 4 MiB
//!   frame and small ones come back byte-exact;
//! * a server certificate from another CA, or for another name, is refused at `connect`
//!   ("not trusted"); mutual TLS refuses a client without a certificate and serves one with
//!   the generated client certificate;
//! * `generate` never overwrites and writes keys 0600; PEM mistakes name the file;
//! * the transports' `read_exact` contract: "peer closed" vs "truncated frame", plain and TLS,
//!   and a corrupted record is `InvalidData`.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use deltavol_dataplane::tls::{
    self, ClientStream, ClientTls, ServerTls, ServerTransport, UringTls,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(10);

fn hosts(h: &[&str]) -> Vec<String> {
    h.iter().map(|s| s.to_string()).collect()
}

/// A fresh directory with a generated CA, server certificate for `dp.example` and
/// `127.0.0.1`, and client certificate `alice`.
fn pki() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    tls::generate(
        &dir,
        &hosts(&["dp.example", "127.0.0.1"]),
        &hosts(&["alice"]),
    )
    .unwrap();
    (tmp, dir)
}

fn server_tls(dir: &Path, mutual: bool) -> ServerTls {
    let ca = dir.join("ca.pem");
    ServerTls::load(
        &dir.join("server.pem"),
        &dir.join("server.key"),
        mutual.then_some(ca.as_path()),
    )
    .unwrap()
}

fn client_tls(dir: &Path, with_cert: bool) -> ClientTls {
    let cert = dir.join("client-alice.pem");
    let key = dir.join("client-alice.key");
    ClientTls::load(
        &dir.join("ca.pem"),
        with_cert.then_some((cert.as_path(), key.as_path())),
    )
    .unwrap()
}

fn frame(data: &[u8]) -> Vec<u8> {
    let mut f = (data.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(data);
    f
}

fn recv_frame(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut data = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut data)?;
    Ok(data)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 9) as u8) ^ seed)
        .collect()
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// What the server saw before handing the session to the transport.
#[derive(Debug)]
struct Handover {
    /// Plaintext bytes rustls held (read beyond the first frame) at the move.
    buffered: usize,
    /// The client presented a certificate.
    client_cert: bool,
}

/// What [`serve_tls`] returns: the hand-over and `f`'s result, or why the connection failed.
type Served<T> = Result<(Handover, T), String>;

/// One TLS connection served on a tokio-uring thread, the way the data plane does: accept,
/// handshake, read the first frame over the tokio `TlsStream` and echo it, then move the
/// session to `ServerTransport::Tls` and run `f` on it. Errors (a refused handshake) come
/// back as their message.
fn serve_tls<F, Fut, T>(tls: ServerTls, f: F) -> (SocketAddr, JoinHandle<Served<T>>)
where
    F: FnOnce(ServerTransport) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        tokio_uring::start(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let work = async {
                let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
                let mut t = tls.accept(s).await.map_err(|e| e.to_string())?;
                let mut len = [0u8; 4];
                t.read_exact(&mut len).await.map_err(|e| e.to_string())?;
                let mut data = vec![0u8; u32::from_le_bytes(len) as usize];
                t.read_exact(&mut data).await.map_err(|e| e.to_string())?;
                let (buffered, client_cert) = {
                    let conn = t.get_mut().1;
                    let st = conn.process_new_packets().map_err(|e| e.to_string())?;
                    (
                        st.plaintext_bytes_to_read(),
                        conn.peer_certificates().is_some(),
                    )
                };
                t.write_all(&frame(&data))
                    .await
                    .map_err(|e| e.to_string())?;
                t.flush().await.map_err(|e| e.to_string())?;
                let (tcp, conn) = t.into_inner();
                let std = tcp.into_std().map_err(|e| e.to_string())?;
                std.set_nonblocking(false).map_err(|e| e.to_string())?;
                let tr = ServerTransport::Tls(UringTls::new(
                    tokio_uring::net::TcpStream::from_std(std),
                    conn,
                ));
                assert!(tr.is_tls());
                tr.set_nodelay(true).map_err(|e| e.to_string())?;
                let out = f(tr).await;
                Ok((
                    Handover {
                        buffered,
                        client_cert,
                    },
                    out,
                ))
            };
            tokio::time::timeout(TIMEOUT, work)
                .await
                .unwrap_or_else(|_| Err("server timed out".to_string()))
        })
    });
    (rx.recv().unwrap(), h)
}

/// Echoes frames until the peer goes; returns the frames echoed and the error that ended it.
async fn echo(mut t: ServerTransport) -> (usize, std::io::Error, usize) {
    let (mut hdr, mut body) = (Vec::new(), Vec::new());
    let mut frames = 0;
    let (end, left) = loop {
        let (r, h) = t.read_exact(hdr, 4).await;
        hdr = h;
        if let Err(e) = r {
            break (e, hdr.len());
        }
        let n = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let (r, b) = t.read_exact(body, n).await;
        body = b;
        if let Err(e) = r {
            break (e, body.len());
        }
        assert_eq!(body.len(), n);
        let mut out = hdr.clone();
        out.extend_from_slice(&body);
        let (r, _) = t.write_all(out).await;
        r.unwrap();
        frames += 1;
    };
    t.shutdown().await;
    (frames, end, left)
}

#[test]
fn echo_over_tls_survives_the_move_to_uring_and_carries_large_frames() {
    let (_tmp, dir) = pki();
    let (addr, server) = serve_tls(server_tls(&dir, false), echo);
    let mut c = client_tls(&dir, false)
        .connect(tcp(addr), "dp.example")
        .unwrap();
    assert!(c.is_tls());
    // The first frame (read over the tokio stream) and the second in one write: one record,
    // so the second is buffered plaintext in the session when it moves to the uring transport.
    let mut two = frame(b"hello");
    two.extend_from_slice(&frame(b"second frame, same record"));
    c.write_all(&two).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"hello");
    assert_eq!(recv_frame(&mut c).unwrap(), b"second frame, same record");

    let big = pattern(4 << 20, 7);
    c.write_all(&frame(&big)).unwrap();
    let back = recv_frame(&mut c).unwrap();
    assert!(back == big, "4 MiB echo differs");
    for (i, n) in [0usize, 1, 3, 100, 16 * 1024 + 1, 70_000]
        .into_iter()
        .enumerate()
    {
        let d = pattern(n, i as u8);
        c.write_all(&frame(&d)).unwrap();
        assert_eq!(recv_frame(&mut c).unwrap(), d, "frame of {n} bytes");
    }
    // Several frames back to back, answers read afterwards.
    let smalls: Vec<Vec<u8>> = (0..20).map(|i| pattern(10 + i * 37, i as u8)).collect();
    let mut batch = Vec::new();
    for d in &smalls {
        batch.extend_from_slice(&frame(d));
    }
    c.write_all(&batch).unwrap();
    for d in &smalls {
        assert_eq!(&recv_frame(&mut c).unwrap(), d);
    }
    c.shutdown();

    let (hand, (frames, end, left)) = server.join().unwrap().unwrap();
    assert!(
        hand.buffered > 0,
        "the second frame was not buffered at the move: {hand:?}"
    );
    assert!(!hand.client_cert);
    assert_eq!(frames, 1 + 1 + 6 + 20);
    assert_eq!(end.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(end.to_string(), "peer closed");
    assert_eq!(left, 0);
}

#[test]
fn ip_literal_server_name_matches_an_ip_san() {
    let (_tmp, dir) = pki();
    let (addr, server) = serve_tls(server_tls(&dir, false), echo);
    let mut c = client_tls(&dir, false)
        .connect(tcp(addr), "127.0.0.1")
        .unwrap();
    c.write_all(&frame(b"hi")).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"hi");
    c.write_all(&frame(b"again")).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"again");
    c.shutdown();
    let (_, (frames, end, _)) = server.join().unwrap().unwrap();
    assert_eq!(frames, 1);
    assert_eq!(end.to_string(), "peer closed");
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_at_connect() {
    let (_tmp, dir) = pki();
    let (_tmp2, other) = pki();
    let (addr, server) = serve_tls(server_tls(&dir, false), echo);
    let err = client_tls(&other, false)
        .connect(tcp(addr), "dp.example")
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), ErrorKind::InvalidData, "{msg}");
    assert!(
        msg.starts_with("the data plane's certificate is not trusted:"),
        "{msg}"
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    let server_err = server.join().unwrap().unwrap_err();
    assert!(
        server_err.contains("does not trust this server's certificate"),
        "{server_err}"
    );
}

#[test]
fn a_server_certificate_for_another_name_is_refused_at_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    tls::generate(&dir, &hosts(&["dp.example"]), &[]).unwrap();
    let (addr, server) = serve_tls(server_tls(&dir, false), echo);
    let err = client_tls(&dir, false)
        .connect(tcp(addr), "other.example")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("the data plane's certificate is not trusted:"),
        "{msg}"
    );
    assert!(msg.contains("other.example"), "{msg}");
    assert!(server.join().unwrap().is_err());

    // A name that is no DNS name at all is refused before any byte is sent.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = tcp(l.local_addr().unwrap());
    let err = client_tls(&dir, false)
        .connect(s, "not a name!")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("\"not a name!\""), "{err}");
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate_and_serves_one_with_it() {
    let (_tmp, dir) = pki();
    let stls = server_tls(&dir, true);
    assert!(stls.requires_client_cert());
    assert!(!server_tls(&dir, false).requires_client_cert());

    // Without a certificate: TLS 1.3 lets the client finish its side, so the refusal is the
    // first read's error (or connect's); the server's accept fails.
    let (addr, server) = serve_tls(stls.clone(), echo);
    let client_err = match client_tls(&dir, false).connect(tcp(addr), "dp.example") {
        Err(e) => e,
        Ok(mut c) => recv_frame(&mut c).unwrap_err(),
    };
    let msg = client_err.to_string();
    assert!(msg.contains("requires a client certificate"), "{msg}");
    let server_err = server.join().unwrap().unwrap_err();
    assert!(
        server_err.contains("presented no certificate"),
        "{server_err}"
    );

    // A certificate from another CA is refused as well.
    let (_tmp2, other) = pki();
    let (addr, server) = serve_tls(stls.clone(), echo);
    let foreign = ClientTls::load(
        &dir.join("ca.pem"),
        Some((
            &other.join("client-alice.pem"),
            &other.join("client-alice.key"),
        )),
    )
    .unwrap();
    let client_err = match foreign.connect(tcp(addr), "dp.example") {
        Err(e) => e,
        Ok(mut c) => recv_frame(&mut c).unwrap_err(),
    };
    assert!(
        client_err
            .to_string()
            .contains("does not accept the client certificate"),
        "{client_err}"
    );
    let server_err = server.join().unwrap().unwrap_err();
    assert!(
        server_err.starts_with("the client's certificate is not trusted"),
        "{server_err}"
    );

    // With the generated client certificate: served.
    let (addr, server) = serve_tls(stls, echo);
    let mut c = client_tls(&dir, true)
        .connect(tcp(addr), "dp.example")
        .unwrap();
    c.write_all(&frame(b"hello")).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"hello");
    let d = pattern(300_000, 3);
    c.write_all(&frame(&d)).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), d);
    c.shutdown();
    let (hand, (frames, end, _)) = server.join().unwrap().unwrap();
    assert!(hand.client_cert);
    assert_eq!(frames, 1);
    assert_eq!(end.to_string(), "peer closed");
}

#[test]
fn a_plain_tcp_client_fails_the_servers_handshake() {
    let (_tmp, dir) = pki();
    let (addr, server) = serve_tls(server_tls(&dir, false), echo);
    let mut s = tcp(addr);
    s.write_all(&frame(b"plain hello, not a ClientHello"))
        .unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(err.contains("TLS handshake failed"), "{err}");
}

#[test]
fn tls_transport_reports_peer_closed_truncation_and_corrupt_records() {
    let (_tmp, dir) = pki();
    let ctls = client_tls(&dir, false);

    // close_notify at a frame boundary, and a plain TCP close without close_notify: both are
    // "peer closed" with nothing read.
    for notify in [true, false] {
        let (addr, server) = serve_tls(server_tls(&dir, false), echo);
        let mut c = ctls.connect(tcp(addr), "dp.example").unwrap();
        c.write_all(&frame(b"hello")).unwrap();
        assert_eq!(recv_frame(&mut c).unwrap(), b"hello");
        if notify {
            c.shutdown();
        } else {
            c.tcp().shutdown(std::net::Shutdown::Both).unwrap();
        }
        let (_, (frames, end, left)) = server.join().unwrap().unwrap();
        assert_eq!(frames, 0);
        assert_eq!(end.kind(), ErrorKind::UnexpectedEof);
        assert_eq!(end.to_string(), "peer closed", "close_notify: {notify}");
        assert_eq!(left, 0);
    }

    // Part of a frame, then the close: truncated, with what was read left in the buffer.
    let (addr, server) = serve_tls(
        server_tls(&dir, false),
        |mut t: ServerTransport| async move {
            let (r, buf) = t.read_exact(Vec::new(), 10).await;
            (r.unwrap_err(), buf)
        },
    );
    let mut c = ctls.connect(tcp(addr), "dp.example").unwrap();
    c.write_all(&frame(b"hello")).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"hello");
    c.write_all(b"abc").unwrap();
    c.flush().unwrap();
    c.shutdown();
    let (_, (e, buf)) = server.join().unwrap().unwrap();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(e.to_string(), "truncated frame: 3 of 10 bytes");
    assert_eq!(buf, b"abc");

    // Bytes that are no valid record: InvalidData naming the TLS error, and the client gets
    // an alert rather than silence.
    let (addr, server) = serve_tls(
        server_tls(&dir, false),
        |mut t: ServerTransport| async move {
            let (r, _) = t.read_exact(Vec::new(), 4).await;
            r.unwrap_err()
        },
    );
    let mut c = ctls.connect(tcp(addr), "dp.example").unwrap();
    c.write_all(&frame(b"hello")).unwrap();
    assert_eq!(recv_frame(&mut c).unwrap(), b"hello");
    // An application-data record header with a body that does not decrypt.
    let mut bogus = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    bogus.extend_from_slice(&[0x5a; 0x40]);
    c.tcp().write_all(&bogus).unwrap();
    let (_, e) = server.join().unwrap().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidData);
    assert!(e.to_string().starts_with("TLS error:"), "{e}");
    let after = recv_frame(&mut c).unwrap_err();
    assert_eq!(after.kind(), ErrorKind::InvalidData, "{after}");
}

/// The plain transport, served from a std listener on a tokio-uring thread.
fn serve_plain<F, Fut, T>(f: F) -> (SocketAddr, JoinHandle<T>)
where
    F: FnOnce(ServerTransport) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        tokio_uring::start(async move {
            let t = ServerTransport::Plain(tokio_uring::net::TcpStream::from_std(s));
            assert!(!t.is_tls());
            t.set_nodelay(true).unwrap();
            tokio::time::timeout(TIMEOUT, f(t))
                .await
                .expect("server timed out")
        })
    });
    (addr, h)
}

#[test]
fn plain_transport_read_exact_and_write_all_contract() {
    // Frames echoed, then a close at a boundary: "peer closed", empty buffer.
    let (addr, server) = serve_plain(echo);
    let mut c = ClientStream::Plain(tcp(addr));
    assert!(!c.is_tls());
    let big = pattern(4 << 20, 1);
    for d in [b"one".to_vec(), Vec::new(), big] {
        c.write_all(&frame(&d)).unwrap();
        assert!(recv_frame(&mut c).unwrap() == d);
    }
    c.shutdown();
    let (frames, end, left) = server.join().unwrap();
    assert_eq!(frames, 3);
    assert_eq!(end.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(end.to_string(), "peer closed");
    assert_eq!(left, 0);

    // A close part way: truncated, the bytes read so far in the buffer; a zero-byte read
    // needs nothing from the peer; the buffer's old contents are replaced.
    let (addr, server) = serve_plain(|mut t: ServerTransport| async move {
        let (r, buf) = t.read_exact(b"old contents".to_vec(), 0).await;
        r.unwrap();
        assert!(buf.is_empty());
        let (r, buf) = t.read_exact(buf, 2).await;
        r.unwrap();
        assert_eq!(buf, b"ab");
        let (r, buf) = t.read_exact(buf, 8).await;
        (r.unwrap_err(), buf)
    });
    let mut c = tcp(addr);
    c.write_all(b"abcde").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (e, buf) = server.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(e.to_string(), "truncated frame: 3 of 8 bytes");
    assert_eq!(buf, b"cde");
}

#[test]
fn generate_writes_the_files_never_overwrites_and_keeps_keys_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new").join("tls");
    let g = tls::generate(
        &dir,
        &hosts(&["dp.example", "10.0.0.7", "::1"]),
        &hosts(&["a", "b-2"]),
    )
    .unwrap();
    let names: Vec<String> = g
        .files
        .iter()
        .map(|p| {
            assert_eq!(p.parent().unwrap(), dir);
            p.file_name().unwrap().to_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca.key",
            "server.pem",
            "server.key",
            "client-a.pem",
            "client-a.key",
            "client-b-2.pem",
            "client-b-2.key"
        ]
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for p in &g.files {
        if p.extension().unwrap() == "key" {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        } else {
            assert_eq!(mode(p) & 0o600, 0o600, "{}", p.display());
            assert!(std::fs::read_to_string(p)
                .unwrap()
                .contains("BEGIN CERTIFICATE"));
        }
    }
    // Every client certificate loads with the CA.
    ClientTls::load(
        &dir.join("ca.pem"),
        Some((&dir.join("client-b-2.pem"), &dir.join("client-b-2.key"))),
    )
    .unwrap();

    // A second run refuses and changes nothing.
    let before: Vec<Vec<u8>> = g.files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let e = tls::generate(&dir, &hosts(&["dp.example"]), &[]).unwrap_err();
    assert!(matches!(e, tls::TlsError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("ca.pem already exists"), "{e}");
    let after: Vec<Vec<u8>> = g.files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after);

    // One existing file among those it would write: nothing at all is written.
    let dir2 = tmp.path().join("partial");
    std::fs::create_dir(&dir2).unwrap();
    std::fs::write(dir2.join("client-b.key"), "mine").unwrap();
    let e = tls::generate(&dir2, &hosts(&["dp.example"]), &hosts(&["a", "b"])).unwrap_err();
    assert!(e.to_string().contains("client-b.key already exists"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir2).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(
        std::fs::read_to_string(dir2.join("client-b.key")).unwrap(),
        "mine"
    );

    // Names that cannot be used.
    let dir3 = tmp.path().join("bad");
    for (h, c) in [
        (vec![], vec![]),
        (hosts(&["bad host"]), vec![]),
        (hosts(&["dp.example"]), hosts(&["../escape"])),
        (hosts(&["dp.example"]), hosts(&["a", "a"])),
    ] {
        let e = tls::generate(&dir3, &h, &c).unwrap_err();
        assert!(matches!(e, tls::TlsError::InvalidName { .. }), "{e}");
    }
    assert!(!dir3.exists());
}

#[test]
fn pem_mistakes_name_the_file() {
    let (tmp, dir) = pki();
    let t = tmp.path();
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");

    // A "certificate" file that holds only a key.
    let e = ServerTls::load(&key, &key, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "TLS certificate file {} holds no certificate",
            key.display()
        )
    );
    // Garbage as the key.
    let garbage = t.join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").unwrap();
    let e = ServerTls::load(&cert, &garbage, None).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "TLS key file {} holds no private key",
            garbage.display()
        )),
        "{e}"
    );
    // PEM framing around bytes that are no base64.
    let bad64 = t.join("bad64.key");
    std::fs::write(
        &bad64,
        "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = ServerTls::load(&cert, &bad64, None).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "TLS key file {} is not valid PEM",
            bad64.display()
        )),
        "{e}"
    );
    // Valid PEM, but no key inside.
    let notkey = t.join("notkey.key");
    std::fs::write(
        &notkey,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = ServerTls::load(&cert, &notkey, None).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "TLS key file {} is not a usable private key for the certificate in {}",
            notkey.display(),
            cert.display()
        )),
        "{e}"
    );
    // Another certificate's key.
    let e = ServerTls::load(&cert, &dir.join("client-alice.key"), None).unwrap_err();
    assert!(matches!(e, tls::TlsError::BadKey { .. }), "{e}");
    // A missing file.
    let missing = t.join("missing.pem");
    let e = ServerTls::load(&missing, &key, None).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "cannot read the TLS certificate file {}",
            missing.display()
        )),
        "{e}"
    );
    // A client CA file without certificates, and a CA file that is not PEM, for the client.
    let e = ServerTls::load(&cert, &key, Some(&garbage)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("TLS CA file {} holds no certificate", garbage.display())
    );
    let e = ClientTls::load(&key, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("TLS CA file {} holds no certificate", key.display())
    );
    let unterminated = t.join("unterminated.pem");
    std::fs::write(&unterminated, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let e = ClientTls::load(&unterminated, None).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "TLS CA file {} is not valid PEM",
            unterminated.display()
        )),
        "{e}"
    );
    let e = ClientTls::load(&dir.join("ca.pem"), Some((&cert, &garbage))).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "TLS client key file {} holds no private key",
            garbage.display()
        )),
        "{e}"
    );
}
