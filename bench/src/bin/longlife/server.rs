//! The real `deltavol-dataplane` binary as a child process, as in the ingest bench
//! (`../ingest/server.rs`), plus what a long life needs: the store flags and any extra flags
//! given with `--server-arg` passed through, and a clean stop (SIGTERM, then wait) so that the
//! same data dir or bucket can be served again. Started on 127.0.0.1:0, ready when it prints
//! `listening on ADDR`, its stderr kept in a log file (its tail shown when something fails),
//! killed (SIGKILL to its own pid) and reaped when dropped without a stop.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Time the server has to print its `listening on` line (an object store's volumes included).
const SERVER_START_TIMEOUT_MS: u64 = 60_000;
/// Time the server has to exit after SIGTERM before it gets SIGKILL.
const SERVER_STOP_TIMEOUT_MS: u64 = 30_000;
/// Bytes of the server log shown with an error.
const LOG_TAIL_BYTES: usize = 4096;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub threads: usize,
    pub token_file: PathBuf,
    /// `--store s3 --s3-endpoint ...` (empty for the local store, the server's default).
    pub store_args: Vec<String>,
    /// `--server-arg` values, passed through as given, after everything else.
    pub extra_args: Vec<String>,
}

impl ServerSpec {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        // A config file in /etc must not change what is measured, unless the caller named one.
        if !self
            .extra_args
            .iter()
            .any(|x| x == "--config" || x.starts_with("--config=") || x == "--no-config")
        {
            a.push("--no-config".into());
        }
        a.extend(["--listen".into(), "127.0.0.1:0".into()]);
        a.extend(["--data-dir".into(), self.data_dir.clone().into_os_string()]);
        a.extend(["--threads".into(), self.threads.to_string().into()]);
        a.extend([
            "--auth-token-file".into(),
            self.token_file.clone().into_os_string(),
        ]);
        a.extend(self.store_args.iter().map(OsString::from));
        a.extend(self.extra_args.iter().map(OsString::from));
        a
    }

    /// The command line, for the report.
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.bin.display().to_string())
            .chain(self.args().iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }
}

#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    stopped: bool,
}

impl ServerProcess {
    /// Starts the server `spec` describes, its stderr into `log`; returns once it listens.
    pub fn start(spec: &ServerSpec, log: &Path) -> anyhow::Result<ServerProcess> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(&spec.bin)
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
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
            stopped: false,
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the server is no longer running.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(self.failure(&format!("it exited with {status}"))),
            Err(e) => Err(e).context("waiting on the data-plane server"),
        }
    }

    /// SIGTERM, then waits for it to exit (SIGKILL after [`SERVER_STOP_TIMEOUT_MS`], which is
    /// an error). Returns its exit status and how long it took to exit.
    pub fn stop(mut self) -> anyhow::Result<(ExitStatus, Duration)> {
        self.check_alive()?;
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid")?);
        let t = Instant::now();
        kill(pid, Signal::SIGTERM).context("SIGTERM to the data-plane server")?;
        let deadline = t + Duration::from_millis(SERVER_STOP_TIMEOUT_MS);
        loop {
            if let Some(status) = self.child.try_wait().context("waiting on the server")? {
                self.stopped = true;
                return Ok((status, t.elapsed()));
            }
            if Instant::now() > deadline {
                bail!(self.failure(&format!(
                    "still running {SERVER_STOP_TIMEOUT_MS} ms after SIGTERM (it gets SIGKILL)"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A description of a failure with the tail of the server's log.
    pub fn failure(&self, what: &str) -> String {
        failure_with_log(self.child.id(), &self.log, what)
    }
}

/// `what`, with the tail of the log of the server `pid`.
pub fn failure_with_log(pid: u32, log: &Path, what: &str) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let tail = String::from_utf8_lossy(&text[text.len().saturating_sub(LOG_TAIL_BYTES)..]);
    format!(
        "data-plane server (pid {pid}): {what}; its log ({}) ends with:\n{tail}",
        log.display()
    )
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
