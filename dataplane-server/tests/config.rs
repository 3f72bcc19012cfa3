//! The binary with a config file: it serves from the file alone (relative paths taken from the
//! file's directory), flags override the file, a bad or missing file stops it with an error
//! naming the file, the line and the key, and under systemd (`NOTIFY_SOCKET`) it says
//! `READY=1` once it serves.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn dataplane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
}

/// Spawns the server with `args`, reads its first `n` stdout lines, kills it.
fn first_lines(args: &[&str], n: usize) -> Vec<String> {
    let mut child = dataplane()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn deltavol-dataplane");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut l = String::new();
        out.read_line(&mut l).expect("read a line");
        lines.push(l.trim().to_string());
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    assert!(
        lines.iter().all(|l| !l.is_empty()),
        "stdout {lines:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

#[test]
fn serves_from_the_config_file_alone_and_notifies_systemd() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_token(dir.path());
    let cfg = dir.path().join("dataplane.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nauth_token_file = \"token\"\n\
         threads = 1\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    // Run from elsewhere: the relative paths are the config file's directory's.
    let mut child = dataplane()
        .args(["--config", cfg.to_str().expect("utf-8")])
        .current_dir("/")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = [String::new(), String::new()];
    for l in &mut lines {
        out.read_line(l).expect("read a line");
    }
    let addr: std::net::SocketAddr = lines[0]
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line {:?}", lines[0]))
        .parse()
        .expect("addr");
    assert!(lines[1].starts_with("metrics on "), "{lines:?}");
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 on the notify socket");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    let mut c = connect(addr, "vol-cfg");
    c.create_volume(1 << 20, 4096).expect("create");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(msg, format!("READY=1\nSTATUS=listening on {addr}"));
    assert!(dir.path().join("data/volumes/vol-cfg").is_dir());
}

#[test]
fn flags_override_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_token(dir.path());
    // The file's address is taken: only the flag's lets the server start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let cfg = dir.path().join("dataplane.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{}\"\ndata_dir = \"/nonexistent/deltavol-test\"\nthreads = 1\n",
            taken.local_addr().expect("addr")
        ),
    )
    .expect("write config");
    let data = dir.path().join("data");
    let lines = first_lines(
        &[
            "--config",
            cfg.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--auth-token-file",
            token.to_str().expect("utf-8"),
        ],
        1,
    );
    assert!(lines[0].starts_with("listening on 127.0.0.1:"), "{lines:?}");
    assert_ne!(
        lines[0],
        format!("listening on {}", taken.local_addr().expect("addr"))
    );
}

#[test]
fn a_bad_or_missing_config_file_stops_it_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("dataplane.toml");
    let cases = [
        (
            "listen = \"127.0.0.1:0\"\nthreads = \"four\"\n",
            "line 2, key `threads`: invalid type",
        ),
        (
            "listen = \"127.0.0.1:0\"\n\nauth-token-file = \"t\"\n",
            "line 3, key `auth-token-file`: unknown key (did you mean `auth_token_file`?",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).expect("write config");
        // Also for a subcommand: verify reads the store keys from the same file.
        for sub in [&[][..], &["verify"][..]] {
            let out = dataplane()
                .args(sub)
                .args(["--config", cfg.to_str().expect("utf-8")])
                .output()
                .expect("run");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains(&format!("config file {}, {want}", cfg.display())),
                "{sub:?}: {err}"
            );
        }
    }
    let missing = dir.path().join("missing.toml");
    let out = dataplane()
        .args(["--config", missing.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "config file {}: cannot read it",
            missing.display()
        )),
        "{err}"
    );
}
