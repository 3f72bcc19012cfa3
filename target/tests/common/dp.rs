//! A real data-plane server for tests: the `deltavol-dataplane` binary on 127.0.0.1, which a
//! test can kill -9 and restart on the same address.

use super::*;
use deltavol::ship::ShipConfig;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TOKEN: &[u8] = b"test-token-ship";

/// The data-plane binary, built on demand (cargo only builds other packages' binaries for
/// `cargo test --workspace`), once per test process.
pub fn dataplane_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_dataplane_bin).clone()
}

fn build_dataplane_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("deltavol-dataplane");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "deltavol-dataplane",
        "--bin",
        "deltavol-dataplane",
    ]);
    if profile_release {
        cmd.arg("--release");
    }
    // Into the target dir that holds this test binary, wherever CARGO_TARGET_DIR (maybe a
    // relative path, which would resolve against this crate's dir) points.
    if let Some(target_dir) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    let st = cmd.status().expect("run cargo build for the data plane");
    assert!(st.success(), "building deltavol-dataplane failed");
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

pub struct Dp {
    child: Child,
    pub addr: String,
}

impl Dp {
    pub fn start(data_dir: &Path, listen: &str) -> Dp {
        Self::start_with(data_dir, listen, &[])
    }

    /// [`Dp::start`] with more flags (TLS, credentials).
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Dp {
        std::fs::create_dir_all(data_dir).unwrap();
        let tok = data_dir.with_extension("token");
        std::fs::write(&tok, TOKEN).unwrap();
        let mut child = Command::new(dataplane_bin())
            .args([
                "--listen",
                listen,
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--threads",
                "2",
                "--auth-token-file",
                tok.to_str().unwrap(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start data plane");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line:?}"))
            .to_string();
        Dp { child, addr }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn ship_cfg(dir: &Path, addr: &str) -> ShipConfig {
    ShipConfig {
        retention: None,
        addrs: deltavol::ship::DataPlaneAddrs::parse(addr).expect("data-plane address"),
        access: deltavol_dataplane::ClientAccess::new(TOKEN),
        outbox_dir: dir.join("outbox"),
        connect_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_secs(5),
        codec: Default::default(),
    }
}

pub fn client(addr: &str) -> deltavol_dataplane::Client {
    let t = deltavol_dataplane::Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(10),
    };
    deltavol_dataplane::Client::connect(addr, TOKEN, "testvol", t).expect("connect")
}

/// The id the data plane holds for volume "testvol" (a recovered copy keeps it).
pub fn dataplane_volume_id(addr: &str) -> [u8; 16] {
    client(addr)
        .info()
        .volume_id
        .expect("the data plane names the volume's id")
}

/// Reads a whole snapshot back from the data plane as block tags.
pub fn snapshot_tags(addr: &str, snap: u64, nblocks: u64) -> Vec<Option<u64>> {
    let mut c = client(addr);
    let mut buf = vec![0u8; 128 * BS];
    let mut out = Vec::new();
    let mut lba = 0;
    while lba < nblocks {
        let n = (nblocks - lba).min(128);
        c.read_extents(snap, lba, n, &mut buf[..n as usize * BS])
            .unwrap();
        out.extend((0..n as usize).map(|i| tag_of(&buf[i * BS..(i + 1) * BS])));
        lba += n;
    }
    out
}

/// How a volume recovered from snapshot `snap` of the data plane at `addr` is created: as
/// of that snapshot, hydrating from it, under the volume's id there.
pub fn hydrating_from(snap: u64, addr: &str) -> deltavol::cache::CreateAs {
    deltavol::cache::CreateAs {
        flushed_epoch: snap,
        snap_head: snap,
        generation: 0,
        hydrate_snap: snap,
        hydrate: true,
        volume_id: dataplane_volume_id(addr),
    }
}
