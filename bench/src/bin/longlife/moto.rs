//! moto's S3 server (`moto_server`, PyPI `moto[s3,server]`, installed by
//! `scripts/install-deps`) on 127.0.0.1 with a free port, as the data plane's tests start it
//! (`dataplane-server/tests/moto/server.rs`): one bucket, test credentials (moto accepts any),
//! killed (SIGKILL to its own pid) and reaped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use deltavol_dataplane::store::backend::ObjBackend;
use deltavol_dataplane::S3Config;

/// Time moto has to accept connections.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Key prefix of the data plane's objects in the bucket.
pub const S3_PREFIX: &str = "dv";

/// `moto_server`: `$DELTAVOL_MOTO_SERVER`, else the first on PATH, else where
/// `scripts/install-deps` or `pip install --user` put it.
pub fn moto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DELTAVOL_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        let cache = std::env::var_os("DELTAVOL_CACHE")
            .map_or_else(|| home.join(".cache/deltavol"), PathBuf::from);
        [
            cache.join("venv/bin/moto_server"),
            home.join(".local/bin/moto_server"),
        ]
        .into_iter()
        .find(|p| p.is_file())
    })
}

#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
    pub endpoint: String,
    pub creds: PathBuf,
    log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

/// One HTTP/1.1 request without a signature (moto does not check them); returns the status.
fn http(port: u16, method: &str, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to moto")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    Ok(resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

impl Moto {
    /// Starts `bin` on a free port (three tries), its output in `dir/moto.log`, and writes
    /// test credentials to `dir/s3-credentials`.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Moto> {
        let log = dir.join("moto.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut child = Command::new(bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file.try_clone().context("moto log fd")?)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let deadline = Instant::now() + MOTO_START_TIMEOUT;
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
                let creds = dir.join("s3-credentials");
                std::fs::write(
                    &creds,
                    "# test credentials (moto accepts any)\naccess_key_id = testing\nsecret_access_key = testing\n",
                )
                .with_context(|| format!("write {}", creds.display()))?;
                return Ok(Moto {
                    child,
                    port,
                    endpoint: format!("http://127.0.0.1:{port}"),
                    creds,
                    log,
                });
            }
            if last_err.is_empty() {
                last_err = format!("not listening within {MOTO_START_TIMEOUT:?}");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        bail!(
            "moto_server ({}) did not start: {last_err}; {} ends with:\n{}",
            bin.display(),
            log.display(),
            &text[text.len().saturating_sub(2048)..]
        )
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let st = http(self.port, "PUT", &format!("/{name}"))?;
        ensure!(st == 200, "moto: creating bucket {name}: HTTP {st}");
        Ok(())
    }

    /// Fails if moto is no longer running.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => bail!("moto_server exited with {st}; see {}", self.log.display()),
            Err(e) => Err(e).context("waiting on moto_server"),
        }
    }

    /// The data plane's store flags for `bucket`.
    pub fn store_args(&self, bucket: &str) -> Vec<String> {
        vec![
            "--store".into(),
            "s3".into(),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-bucket".into(),
            bucket.into(),
            "--s3-prefix".into(),
            S3_PREFIX.into(),
            "--s3-credentials-file".into(),
            self.creds.display().to_string(),
        ]
    }

    /// A handle on `bucket` to list what the data plane stored (the data plane's own
    /// object-store client, configured as the server's flags configure it).
    pub fn objects(&self, bucket: &str) -> anyhow::Result<ObjBackend> {
        let cfg = S3Config {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.to_string(),
            region: "us-east-1".into(),
            prefix: S3_PREFIX.into(),
            credentials_file: Some(self.creds.clone()),
            ..Default::default()
        };
        ObjBackend::s3(&cfg).context("an object-store client for moto")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
