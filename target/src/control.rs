//! The daemon's control socket: `/run/deltavol/NAME.sock`, one JSON request line in, one JSON
//! response line out. Used by `deltavol status | flush | del` and by `list`.
//!
//! Requests are bounded (a line of at most [`REQUEST_BYTES_MAX`]); bad requests get an error
//! response. Only root can reach the socket (mode 0600).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RUN_DIR: &str = "/run/deltavol";
pub const REQUEST_BYTES_MAX: u64 = 4096;
pub const RUN_INFO_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Cut the epoch now and wait until it is on permanent storage.
    Flush,
    /// Cut now, flush, and wait up to `timeout_ms` for the snapshot's commit on the data plane.
    Snapshot {
        timeout_ms: u64,
    },
    /// Cut the epoch now and answer as soon as the switch happened (`{"ticket", "epoch"}`),
    /// without waiting for the flush: the filesystems of a consistency group stay frozen only
    /// this long. Waits at most `timeout_ms` for an earlier epoch's flush to end first.
    Cut {
        timeout_ms: u64,
    },
    /// After `Cut`: wait for that cut's flush, then up to `timeout_ms` for the data plane's
    /// commit of `epoch`; answers like `Snapshot`.
    WaitSnapshot {
        ticket: u64,
        epoch: u64,
        timeout_ms: u64,
    },
    /// Pin (or unpin) committed snapshot `snap_id` of this volume on the data plane, with a
    /// label (empty: none).
    Pin {
        snap_id: u64,
        pinned: bool,
        #[serde(default)]
        label: String,
    },
    /// Stop the device after a final flush.
    Stop,
    /// Scrub: cut a snapshot, then compare the backing file with it on the data plane
    /// (see [`crate::verify`]); waits up to `timeout_ms` for the snapshot's commit.
    Verify {
        timeout_ms: u64,
    },
}

/// What a running daemon records about itself in `/run/deltavol/NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub version: u32,
    pub name: String,
    pub pid: u32,
    pub dev_id: u32,
    pub device: String,
    pub cache_dir: PathBuf,
    pub backing: PathBuf,
    pub socket: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub flush_interval_ms: u64,
    pub started_unix_ms: u64,
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("DELTAVOL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

pub fn info_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.json"))
}

pub fn socket_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// Reads a run-info file; `None` if absent.
pub fn read_info(path: &Path) -> anyhow::Result<Option<RunInfo>> {
    match std::fs::read(path) {
        Ok(b) => {
            let info: RunInfo = serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a deltavol run file ({e}); remove it if no daemon runs",
                    path.display()
                )
            })?;
            if info.version != RUN_INFO_VERSION {
                anyhow::bail!(
                    "{} has run-file version {}, this deltavol reads {RUN_INFO_VERSION}",
                    path.display(),
                    info.version
                );
            }
            Ok(Some(info))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("read {}: {e}", path.display())),
    }
}

/// Whether process `pid` is alive.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends one request and reads the response.
pub fn request(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    call(socket, req, timeout, "the daemon")
}

/// Sends one request line of any type to a JSON-lines socket (a daemon's, the agent's) and
/// reads the response line; a response with `"error"` is an error.
pub fn call<T: Serialize>(
    socket: &Path,
    req: &T,
    timeout: Option<Duration>,
    peer: &str,
) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| anyhow::anyhow!("cannot reach {peer} at {}: {e}", socket.display()))?;
    s.set_read_timeout(timeout)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(s.take(16 << 20)).read_line(&mut resp)?;
    if resp.is_empty() {
        anyhow::bail!("{peer} closed the connection without answering");
    }
    let v: serde_json::Value = serde_json::from_str(&resp)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e}");
    }
    Ok(v)
}

/// Reads one bounded request line from a connection.
pub fn read_request(s: &mut UnixStream) -> Result<Request, String> {
    read_request_as(s)
}

/// [`read_request`] for any request type.
pub fn read_request_as<T: serde::de::DeserializeOwned>(s: &mut UnixStream) -> Result<T, String> {
    let mut line = String::new();
    let mut r = BufReader::new(Read::by_ref(s).take(REQUEST_BYTES_MAX));
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!(
            "request longer than {REQUEST_BYTES_MAX} bytes or not newline-terminated"
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
}

pub fn write_response(s: &mut UnixStream, v: &serde_json::Value) {
    let mut b = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"error\":\"encode\"}".to_vec());
    b.push(b'\n');
    let _ = s.write_all(&b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_bounded_and_checked() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        assert!(matches!(read_request(&mut b), Ok(Request::Status)));
        a.write_all(b"{\"cmd\":\"format_disk\"}\n").unwrap();
        assert!(read_request(&mut b).unwrap_err().contains("bad request"));
        a.write_all(&vec![b'x'; 5000]).unwrap();
        assert!(read_request(&mut b).unwrap_err().contains("longer than"));
    }
}
