//! An S3-compatible server for tests: moto's `moto_server` (PyPI `moto[s3]`, installed by
//! `scripts/install-deps`) on 127.0.0.1 with a free port, one bucket per test, and the real
//! `deltavol-dataplane` binary pointed at it.
//!
//! moto itself is started by [`server::Moto`] (shared with the compute side's tests).

#![allow(dead_code)]

mod server;
pub use server::Moto;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use deltavol_dataplane::store::backend::ObjBackend;
use deltavol_dataplane::S3Config;

impl Moto {
    pub fn s3_config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.to_string(),
            region: "us-east-1".into(),
            prefix: "dv".into(),
            credentials_file: Some(self.creds.clone()),
            multi_server: false,
            server_id: None,
            lease_ms: 0,
            skip_create_probe: false,
        }
    }

    /// A direct handle on the bucket (to inspect or damage objects).
    pub fn objects(&self, bucket: &str) -> Arc<ObjBackend> {
        Arc::new(ObjBackend::s3(&self.s3_config(bucket)).expect("object backend"))
    }

    /// The store flags of `deltavol-dataplane` for `bucket`.
    pub fn store_args(&self, bucket: &str) -> Vec<String> {
        vec![
            "--store".into(),
            "s3".into(),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-bucket".into(),
            bucket.into(),
            "--s3-prefix".into(),
            "dv".into(),
            "--s3-credentials-file".into(),
            self.creds.display().to_string(),
        ]
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deltavol-dataplane")
}

/// The real binary serving an object store.
pub struct S3Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl S3Server {
    pub fn spawn(
        moto: &Moto,
        bucket: &str,
        data_dir: &Path,
        token_file: &Path,
        extra: &[&str],
    ) -> S3Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.join("server.log");
        let mut child = Command::new(bin())
            .args(["--listen", "127.0.0.1:0", "--threads", "2", "--data-dir"])
            .arg(data_dir)
            .arg("--auth-token-file")
            .arg(token_file)
            .args(moto.store_args(bucket))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn deltavol-dataplane");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
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
            .parse()
            .expect("address");
        S3Server { child, addr, log }
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `deltavol-dataplane <args>`; returns (exit code, stdout, stderr).
pub fn run_tool(args: &[String]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run tool");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
