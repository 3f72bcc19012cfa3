//! The real `deltavol-dataplane` binary as a child process, shared by the benchmark binaries
//! that run it (each includes this file): started on 127.0.0.1:0, ready when it prints
//! `listening on ADDR`, its stderr kept in a log file (its tail shown when something fails),
//! killed (SIGKILL to its own pid) and reaped when dropped without a [`ServerProcess::stop`].

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

/// Time the server has to print its `listening on` line, with the local store.
#[allow(dead_code)] // the longlife bench allows longer (an object store's volumes included)
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Time the server has to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the server log shown with an error.
const LOG_TAIL_BYTES: usize = 4096;
/// Linux reports process CPU time in USER_HZ ticks, 100 a second on every architecture.
const USER_HZ: f64 = 100.0;

/// `--listen 127.0.0.1:0 --data-dir DATA_DIR --threads THREADS --auth-token-file TOKEN_FILE`.
pub fn serve_args(data_dir: &Path, threads: usize, token_file: &Path) -> Vec<OsString> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data_dir.into(),
        "--threads".into(),
        threads.to_string().into(),
        "--auth-token-file".into(),
        token_file.into(),
    ]
}

#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `bin` with `args` (which make it listen on 127.0.0.1:0), its stderr into `log`;
    /// returns once it listens, fails if it has not said so within `timeout`.
    pub fn start(
        bin: &Path,
        args: &[OsString],
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<ServerProcess> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(args)
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
        let line = match rx.recv_timeout(timeout) {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => return Err(e).context(server.failure("reading its stdout")),
            Ok(None) => bail!(server.failure("it exited before listening")),
            Err(_) => bail!(server.failure(&format!(
                "no `listening on` line within {} ms",
                timeout.as_millis()
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

    /// User plus system CPU seconds the server has used so far.
    #[allow(dead_code)] // not every bench measures it
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
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

    /// SIGTERM, then waits for it to exit (SIGKILL after [`STOP_TIMEOUT`], which is an error),
    /// so that the same data dir or bucket can be served again. Returns its exit status and
    /// how long it took to exit.
    #[allow(dead_code)] // not every bench restarts the server
    pub fn stop(mut self) -> anyhow::Result<(ExitStatus, Duration)> {
        self.check_alive()?;
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid")?);
        let t = Instant::now();
        kill(pid, Signal::SIGTERM).context("SIGTERM to the data-plane server")?;
        let deadline = t + STOP_TIMEOUT;
        loop {
            // Once reaped here, the drop's kill and wait do nothing.
            if let Some(status) = self.child.try_wait().context("waiting on the server")? {
                return Ok((status, t.elapsed()));
            }
            if Instant::now() > deadline {
                bail!(self.failure(&format!(
                    "still running {} ms after SIGTERM (it gets SIGKILL)",
                    STOP_TIMEOUT.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A description of a failure with the tail of the server's log.
    pub fn failure(&self, what: &str) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(LOG_TAIL_BYTES)..]);
        format!(
            "data-plane server (pid {}): {what}; its log ({}) ends with:\n{tail}",
            self.pid(),
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
