//! The baseline: a plain TCP sink on 127.0.0.1, one thread per connection, writing every byte
//! it receives to one file per connection (`sink-<n>.dat`, in the run's directory, next to
//! where the data plane keeps its data) and fsyncing it at the end of each snapshot before
//! acknowledging. No framing beyond a length per snapshot, no checksums, no index: what a user
//! would get from `nc | dd conv=fsync`, done properly.
//!
//! Protocol (see [`crate::workload::ship_sink`]): the client first names itself (`u64 LE`
//! client number, sent before the clock starts; its file is `sink-<client>.dat`), then per
//! snapshot `u64 LE length` and `length` bytes, answered with `u64 LE total bytes durable`.
//! End of stream at a snapshot boundary ends the connection.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{ensure, Context};

/// Read buffer of each connection (the data plane's frame payload cap).
const SINK_READ_BUF_BYTES: usize = 1 << 20;
/// Cap on one snapshot's length, so a garbled length cannot make the sink write forever.
const SINK_SNAPSHOT_MAX_BYTES: u64 = 1 << 40;

/// One connection's thread: the client number and the bytes it made durable.
type ConnThread = JoinHandle<anyhow::Result<(usize, u64)>>;

/// A running sink accepting exactly `connections` connections.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    acceptor: JoinHandle<anyhow::Result<Vec<ConnThread>>>,
}

impl Sink {
    pub fn start(dir: &Path, connections: usize) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
        let addr = listener.local_addr().context("the sink's address")?;
        let dir = dir.to_path_buf();
        let acceptor = std::thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                let mut handlers = Vec::with_capacity(connections);
                for n in 0..connections {
                    let (stream, _) = listener.accept().context("sink accept")?;
                    let dir = dir.clone();
                    handlers.push(
                        std::thread::Builder::new()
                            .name(format!("sink-{n}"))
                            .spawn(move || serve(stream, &dir))
                            .context("spawning a sink thread")?,
                    );
                }
                Ok(handlers)
            })
            .context("spawning the sink acceptor")?;
        Ok(Sink { addr, acceptor })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for every connection to end (the clients closed them); returns the client
    /// number and the bytes made durable of each connection, in accept order.
    pub fn finish(self) -> anyhow::Result<Vec<(usize, u64)>> {
        let handlers = self
            .acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("the sink acceptor panicked"))??;
        handlers
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a sink thread panicked"))?
            })
            .collect()
    }
}

/// The file the sink wrote for `client`.
pub fn sink_file(dir: &Path, client: usize) -> PathBuf {
    dir.join(format!("sink-{client}.dat"))
}

/// Upper bound on the client number a connection may name.
const SINK_CLIENTS_MAX: u64 = 4096;

fn serve(mut stream: TcpStream, dir: &Path) -> anyhow::Result<(usize, u64)> {
    let mut id = [0u8; 8];
    stream
        .read_exact(&mut id)
        .context("sink: reading the client number")?;
    let id = u64::from_le_bytes(id);
    ensure!(id < SINK_CLIENTS_MAX, "sink: client number {id}");
    let client = id as usize;
    let path = sink_file(dir, client);
    let path = path.as_path();
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; SINK_READ_BUF_BYTES];
    let mut durable = 0u64;
    loop {
        let mut len = [0u8; 8];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok((client, durable)),
            Err(e) => return Err(e).context("sink: reading a snapshot length"),
        }
        let len = u64::from_le_bytes(len);
        ensure!(
            len <= SINK_SNAPSHOT_MAX_BYTES,
            "sink: snapshot of {len} bytes"
        );
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = stream
                .read(&mut buf[..want])
                .context("sink: reading data")?;
            ensure!(n > 0, "sink: the client closed inside a snapshot");
            file.write_all(&buf[..n])
                .with_context(|| format!("write {}", path.display()))?;
            left -= n as u64;
        }
        file.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
        durable += len;
        stream
            .write_all(&durable.to_le_bytes())
            .context("sink: acknowledging")?;
    }
}

/// Opens client `client`'s connection to the sink (outside the clock).
pub fn connect(addr: SocketAddr, client: usize) -> anyhow::Result<TcpStream> {
    let mut s =
        TcpStream::connect(addr).with_context(|| format!("connecting to the sink {addr}"))?;
    s.set_nodelay(true)
        .context("TCP_NODELAY on the sink connection")?;
    s.write_all(&(client as u64).to_le_bytes())
        .context("naming the client to the sink")?;
    Ok(s)
}
