//! The real `deltavol-dataplane` binary as a child process: started on 127.0.0.1:0, ready when
//! it prints `listening on ADDR`, its stderr kept in a log file (shown when something fails),
//! killed (SIGKILL to its own pid) and reaped when dropped.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// Time the server has to print its `listening on` line.
const SERVER_START_TIMEOUT_MS: u64 = 20_000;
/// Bytes of the server log shown with an error.
const LOG_TAIL_BYTES: usize = 4096;
/// Linux reports process CPU time in USER_HZ ticks, 100 a second on every architecture.
const USER_HZ: f64 = 100.0;

#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `bin` serving `data_dir` with `threads` shard threads.
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        threads: usize,
        token_file: &Path,
        log: &Path,
    ) -> anyhow::Result<ServerProcess> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--auth-token-file")
            .arg(token_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("dp-stdout".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = tx.send(lines.next());
                // Drain whatever else it prints so it never blocks on a full pipe.
                for _ in lines {}
            })
            .context("spawning the stdout reader")?;
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.to_path_buf(),
        };
        let first = rx.recv_timeout(Duration::from_millis(SERVER_START_TIMEOUT_MS));
        let line = match first {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => return Err(e).context(server.failure("reading its stdout")),
            Ok(None) => bail!(server.failure("it exited before listening")),
            Err(_) => bail!(server.failure(&format!(
                "no `listening on` line within {SERVER_START_TIMEOUT_MS} ms"
            ))),
        };
        server.addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| server.failure(&format!("unexpected first line {line:?}")))?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// User plus system CPU seconds the server has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut f = rest.split(' ').skip(11);
        let utime: u64 = f.next()?.parse().ok()?;
        let stime: u64 = f.next()?.parse().ok()?;
        Some((utime + stime) as f64 / USER_HZ)
    }

    /// Fails if the server is no longer running (it must outlive every run).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(self.failure(&format!("it exited with {status}"))),
            Err(e) => Err(e).context("waiting on the data-plane server"),
        }
    }

    /// A description of a failure with the tail of the server's log.
    pub fn failure(&self, what: &str) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(LOG_TAIL_BYTES)..]);
        format!(
            "data-plane server (pid {}): {what}; its log ({}) ends with:\n{tail}",
            self.child.id(),
            self.log.display()
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
