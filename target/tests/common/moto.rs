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
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

// moto itself: the data plane's test helper, the same file.
#[path = "../../../dataplane-server/tests/moto/server.rs"]
mod server;
pub use server::Moto;

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
