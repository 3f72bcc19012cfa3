//! systemd readiness (`Type=notify`): once the server serves, `READY=1` is sent to the socket
//! systemd names in `NOTIFY_SOCKET` (a path, or an abstract name after `@`). Without the
//! variable nothing is sent. The protocol is one datagram of `KEY=VALUE` lines
//! (`sd_notify(3)`), so no library is needed.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `"READY=1\nSTATUS=listening on 0.0.0.0:7070"`) to systemd's notify
/// socket. `Ok(false)`: not started by systemd with a notify socket, nothing sent.
pub fn sd_notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}
