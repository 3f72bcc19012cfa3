//! Several data-plane servers on one S3-compatible store, for the compute side's tests: moto's
//! `moto_server` (PyPI `moto[s3]`, installed by `scripts/install-deps`) on 127.0.0.1, one
//! bucket, and real `deltavol-dataplane` binaries in `--multi-server` mode pointed at it.
//!
//! When `moto_server` is missing, [`Moto::start`] returns `None` after printing a loud
//! SKIPPED line; under CI (`CI=true`) or with `DELTAVOL_REQUIRE_MOTO=1` it panics instead
//! (as the data plane's own object-store tests do).
//!
//! A test crate includes it next to `mod common;` with
//! `#[path = "common/moto.rs"] mod moto;`.

#![allow(dead_code)]

use crate::common::dp::{dataplane_bin, TOKEN};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
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

    /// Creates a bucket (moto does not check signatures) and returns its name.
    pub fn bucket(&self, name: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect moto");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let st: u16 = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert_eq!(st, 200, "create bucket {name}: HTTP {st}");
        name.to_string()
    }
}

/// A `deltavol-dataplane` serving `bucket` in `--multi-server` mode.
pub struct S3Dp {
    child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl S3Dp {
    pub fn spawn(
        moto: &Moto,
        bucket: &str,
        data_dir: &Path,
        server_id: &str,
        lease_ms: u64,
    ) -> S3Dp {
        std::fs::create_dir_all(data_dir).unwrap();
        let tok = data_dir.join("token");
        std::fs::write(&tok, TOKEN).unwrap();
        let log = data_dir.join("server.log");
        let mut child = Command::new(dataplane_bin())
            .args(["--listen", "127.0.0.1:0", "--threads", "2", "--data-dir"])
            .arg(data_dir)
            .arg("--auth-token-file")
            .arg(&tok)
            .args([
                "--store",
                "s3",
                "--s3-endpoint",
                &moto.endpoint,
                "--s3-bucket",
                bucket,
            ])
            .args(["--s3-prefix", "dv", "--s3-credentials-file"])
            .arg(&moto.creds)
            // moto lets two racing creates both win now and then, which the start-up probe
            // (rightly) refuses; every create is read back, which covers these tests.
            .args([
                "--multi-server",
                "--no-create-probe",
                "--server-id",
                server_id,
            ])
            .args(["--lease-ms", &lease_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn deltavol-dataplane");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "server did not start: {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        S3Dp { child, addr, log }
    }

    /// SIGKILL: no goodbye, its lease simply stops being renewed.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Dp {
    fn drop(&mut self) {
        self.kill9();
    }
}
