//! moto's S3 server (`moto_server`, PyPI `moto[s3]`, installed by `scripts/install-deps`) on
//! 127.0.0.1 with a free port, for tests. Shared by the data plane's tests (`tests/moto/mod.rs`)
//! and the compute side's (`target/tests/common/moto.rs` includes this file by path); std only.
//!
//! When `moto_server` is missing, [`Moto::start`] returns `None` after printing a loud
//! SKIPPED line; under CI (`CI=true`) or with `DELTAVOL_REQUIRE_MOTO=1` it panics instead.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `moto_server`: `$DELTAVOL_MOTO_SERVER`, else the first on PATH.
fn moto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DELTAVOL_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
    })
}

pub struct Moto {
    child: Child,
    pub port: u16,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    pub creds: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP/1.1 request without signature (moto does not check them); returns the status.
fn http(port: u16, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect moto");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

impl Moto {
    /// Starts moto, or returns `None` (after a loud message) when it is not installed.
    pub fn start(test: &str) -> Option<Moto> {
        let Some(bin) = moto_bin() else {
            let required = std::env::var("DELTAVOL_REQUIRE_MOTO").is_ok_and(|v| v == "1")
                || std::env::var("CI").is_ok_and(|v| v == "true");
            if required {
                panic!(
                    "moto_server not found (CI=true or DELTAVOL_REQUIRE_MOTO=1 require it): \
                     run scripts/install-deps"
                );
            }
            // Straight to the process's stderr: the test harness does not capture this.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED {test}: moto_server (PyPI moto[s3]) is not installed: run \
                 scripts/install-deps; set DELTAVOL_REQUIRE_MOTO=1 to make this a failure ***\n"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("log fd"))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    last_err = format!("moto_server exited with {st}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if up {
                let creds = dir.path().join("s3-credentials");
                std::fs::write(
                    &creds,
                    "# test credentials (moto accepts any)\naccess_key_id = testing\nsecret_access_key = testing\n",
                )
                .unwrap();
                return Some(Moto {
                    child,
                    port,
                    endpoint: format!("http://127.0.0.1:{port}"),
                    dir,
                    creds,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start: {last_err}");
    }

    /// Creates a bucket with a fresh name and returns it.
    pub fn bucket(&self, name: &str) -> String {
        let st = http(self.port, "PUT", &format!("/{name}"));
        assert_eq!(st, 200, "create bucket {name}: HTTP {st}");
        name.to_string()
    }
}
