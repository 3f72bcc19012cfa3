//! The compute side against a secured data plane (issue 14): TLS verified against `--tls-ca`
//! (and the host of `--dataplane`, or `--tls-server-name`), a node's per-volume credential in
//! `--auth-token-file`, and the refusals: no TLS, another CA, another name, an operator's
//! request with a node's credential.

mod common;
use common::dp::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

struct Secured {
    dp: Dp,
    certs: PathBuf,
    cred: PathBuf,
}

fn dataplane_cmd(args: &[&str]) -> std::process::Output {
    Command::new(dataplane_bin())
        .args(args)
        .output()
        .expect("run deltavol-dataplane")
}

/// A data plane with TLS and a credentials file; a credential writing `sec-*` and reading
/// `base` in `dir/node.cred`.
fn secured(dir: &Path) -> Secured {
    let certs = dir.join("tls");
    let c = certs.to_str().unwrap();
    let out = dataplane_cmd(&[
        "tls",
        "init",
        "--no-config",
        "--dir",
        c,
        "--host",
        "127.0.0.1",
        "--host",
        "dp.test",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = dir.join("credentials.json");
    let cred = dir.join("node.cred");
    let out = dataplane_cmd(&[
        "credentials",
        "--no-config",
        "--credentials-file",
        creds.to_str().unwrap(),
        "issue",
        "--write",
        "sec-*",
        "--read",
        "base",
        "--out",
        cred.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = dir.join("dp");
    let dp = Dp::start_with(
        &data,
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &format!("{c}/server.pem"),
            "--tls-key",
            &format!("{c}/server.key"),
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
    );
    Secured { dp, certs, cred }
}

fn admin_access(s: &Secured) -> deltavol_dataplane::ClientAccess {
    let tls = deltavol_dataplane::tls::ClientTls::load(&s.certs.join("ca.pem"), None).unwrap();
    deltavol_dataplane::ClientAccess::new(TOKEN).with_tls(tls, None)
}

#[test]
fn the_cli_speaks_tls_with_a_node_credential_and_refuses_what_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path());
    let a = s.dp.addr.as_str();
    let ca = s.certs.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let cred = s.cred.to_str().unwrap();
    // The admin makes "base" with one snapshot.
    let t = deltavol_dataplane::Timeouts {
        connect: std::time::Duration::from_secs(5),
        io: std::time::Duration::from_secs(30),
    };
    let mut c = deltavol_dataplane::Client::connect(a, &admin_access(&s), "base", t).unwrap();
    c.create_volume(1 << 20, BS as u32).unwrap();
    c.begin_snapshot(1, 0, 1 << 20).unwrap();
    c.put_extent(2, 1, &[5u8; BS]).unwrap();
    c.commit().unwrap();
    let base_id = deltavol_schemas::volume_id_hex(&c.volume_info().unwrap().volume_id.unwrap());

    let dp = |extra: &[&str], args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--dataplane", a, "--auth-token-file", cred]);
        v.extend_from_slice(extra);
        deltavol(&v)
    };
    // TLS with the node's credential: it reads what it may read.
    let (rc, out, err) = dp(&["--tls-ca", ca], &["snapshots", "base", "--json"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    // (An answer about a volume not made yet: the session and the credential worked.)
    let (_, _, err) = dp(&["--tls-ca", ca], &["volume", "info", "sec-1"]);
    assert!(err.contains("has no volume \"sec-1\""), "{err}");
    // The certificate's other name, given explicitly.
    let (_, _, err) = dp(
        &["--tls-ca", ca, "--tls-server-name", "dp.test"],
        &["volume", "info", "sec-1"],
    );
    assert!(err.contains("has no volume \"sec-1\""), "{err}");

    // What an operator does is refused to the node's credential, and nothing changes.
    let (rc, _, err) = dp(
        &["--tls-ca", ca],
        &["volume", "delete", "base", "--id", &base_id],
    );
    assert_ne!(rc, 0);
    assert!(
        err.contains("Forbidden") || err.contains("may not"),
        "{err}"
    );
    let (rc, _, err) = dp(&["--tls-ca", ca], &["snapshots", "delete", "base@1"]);
    assert_ne!(rc, 0);
    assert!(err.contains("may not delete snapshots"), "{err}");
    assert_eq!(c.list_snapshots().unwrap().len(), 1, "base is untouched");
    // A volume it has no role on is refused at the handshake.
    let (rc, _, err) = dp(&["--tls-ca", ca], &["volume", "info", "other"]);
    assert_ne!(rc, 0);
    assert!(err.contains("no role on volume other"), "{err}");

    // No TLS to a TLS server: no session (the plain client gets nothing).
    let (rc, _, _) = dp(&[], &["volume", "info", "sec-1"]);
    assert_ne!(rc, 0);
    // Another CA: the server is not trusted.
    let other = dir.path().join("other");
    let out = dataplane_cmd(&[
        "tls",
        "init",
        "--no-config",
        "--dir",
        other.to_str().unwrap(),
        "--host",
        "127.0.0.1",
    ]);
    assert!(out.status.success());
    let other_ca = other.join("ca.pem");
    let (rc, _, err) = dp(
        &["--tls-ca", other_ca.to_str().unwrap()],
        &["volume", "info", "sec-1"],
    );
    assert_ne!(rc, 0);
    assert!(err.contains("not trusted"), "{err}");
    // A name the certificate does not carry.
    let (rc, _, err) = dp(
        &["--tls-ca", ca, "--tls-server-name", "evil.test"],
        &["volume", "info", "sec-1"],
    );
    assert_ne!(rc, 0);
    assert!(err.contains("evil.test"), "{err}");
    // --insecure and --tls-ca exclude each other.
    let (rc, _, err) = dp(
        &["--tls-ca", ca, "--insecure"],
        &["volume", "info", "sec-1"],
    );
    assert_ne!(rc, 0);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn the_ship_path_connects_over_tls_to_the_host_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path());
    let tls = deltavol_dataplane::tls::ClientTls::load(&s.certs.join("ca.pem"), None).unwrap();
    let cred = std::fs::read(&s.cred).unwrap();
    let mut cfg = ship_cfg(dir.path(), &s.dp.addr);
    cfg.access = deltavol_dataplane::ClientAccess::new(cred.trim_ascii_end()).with_tls(tls, None);
    assert_eq!(deltavol::ship::transport_label(&cfg.access), "tls");
    // The certificate is checked against the host of the address ("127.0.0.1").
    let (mut c, addr) = cfg
        .connect_as("sec-ship", 0, Some([9u8; 16]))
        .expect("connects");
    assert_eq!(addr, s.dp.addr);
    c.create_volume(1 << 20, BS as u32)
        .expect("the credential may create sec-*");
    c.begin_snapshot(1, 0, 1 << 20).unwrap();
    c.put_extent(0, 1, &[1u8; BS]).unwrap();
    c.commit().expect("ships over TLS");
    // A plain access to a non-loopback address is refused before connecting.
    let mut plain = ship_cfg(dir.path(), "192.0.2.1:7070");
    plain.access = deltavol_dataplane::ClientAccess::new(TOKEN);
    let e = plain
        .connect_as("sec-ship", 0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refusing plain TCP"), "{e}");
    assert_eq!(
        deltavol::ship::transport_label(&plain.access.clone().insecure(true)),
        "INSECURE plain TCP (--insecure)"
    );
}
