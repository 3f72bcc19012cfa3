//! The baseline: a plain sequential copy of the source's bytes over the same loopback. A server
//! thread on 127.0.0.1 reads the source volume's backing file in extent-sized chunks and
//! streams them; the client writes each chunk, in order, to a file in the run's directory and
//! fsyncs it at the end. No protocol, no checksums, no request per extent: `nc | dd
//! conv=fsync`, done properly.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

/// What one copy did.
#[derive(Debug)]
pub struct Copied {
    pub bytes: u64,
    pub wall: Duration,
}

/// Copies `src` (`bytes` long) to `dst` over a TCP connection on 127.0.0.1 in `chunk`-byte
/// reads and writes. The clock runs from the connect to the fsync of `dst`.
pub fn copy(src: &Path, dst: &Path, bytes: u64, chunk: usize) -> anyhow::Result<Copied> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the copy server")?;
    let addr = listener.local_addr().context("the copy server's address")?;
    let src = src.to_path_buf();
    let server = std::thread::Builder::new()
        .name("copy-server".into())
        .spawn(move || -> anyhow::Result<u64> {
            let (mut conn, _) = listener.accept().context("copy server: accept")?;
            conn.set_nodelay(true).context("TCP_NODELAY")?;
            let mut f = File::open(&src).with_context(|| format!("open {}", src.display()))?;
            let mut buf = vec![0u8; chunk];
            let mut sent = 0u64;
            loop {
                let n = read_full(&mut f, &mut buf)
                    .with_context(|| format!("read {}", src.display()))?;
                if n == 0 {
                    return Ok(sent);
                }
                conn.write_all(&buf[..n]).context("copy server: send")?;
                sent += n as u64;
            }
        })
        .context("spawning the copy server")?;

    let t0 = Instant::now();
    let mut conn = TcpStream::connect(addr).context("connecting to the copy server")?;
    conn.set_nodelay(true).context("TCP_NODELAY")?;
    let mut out = File::create(dst).with_context(|| format!("create {}", dst.display()))?;
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    loop {
        let n = read_full(&mut conn, &mut buf).context("copy client: receive")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("write {}", dst.display()))?;
        got += n as u64;
    }
    out.sync_all()
        .with_context(|| format!("fsync {}", dst.display()))?;
    let wall = t0.elapsed();
    let sent = server
        .join()
        .map_err(|_| anyhow::anyhow!("the copy server panicked"))??;
    ensure!(
        sent == bytes && got == bytes,
        "copy: {sent} bytes sent, {got} received, {bytes} expected"
    );
    Ok(Copied { bytes: got, wall })
}

/// Reads until `buf` is full or end of stream; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
