//! Shared helpers of the data-plane integration tests: servers on 127.0.0.1 with a temp data
//! dir (in-process or the real binary as a child), a flat-array model, raw frames.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deltavol_dataplane::{auth, start, Client, ServerConfig, ServerHandle, Timeouts};
use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::{append_frame, decode_frame, finish_header, wire, PROTOCOL_VERSION};

pub const TOKEN: &[u8] = b"test-token-0123456789";

pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(30),
    }
}

pub fn in_process(data_dir: &Path, threads: usize) -> ServerHandle {
    start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: data_dir.to_path_buf(),
        threads,
        auth_token: TOKEN.to_vec(),
        credentials: None,
        tls: None,
        insecure: false,
        limits: Default::default(),
    })
    .expect("server starts")
}

pub fn connect(addr: SocketAddr, volume: &str) -> Client {
    Client::connect(addr, TOKEN, volume, timeouts()).expect("client connects")
}

/// The real binary as a child process.
pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ChildServer {
    pub fn spawn(data_dir: &Path, token_file: &Path) -> ChildServer {
        Self::spawn_with(data_dir, token_file, &[], &[])
    }

    /// [`ChildServer::spawn`] with more flags and environment variables.
    pub fn spawn_with(
        data_dir: &Path,
        token_file: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> ChildServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
            .args(extra)
            .envs(envs.iter().copied())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--threads")
            .arg("2")
            .arg("--auth-token-file")
            .arg(token_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        ChildServer { child, addr }
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_token(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, [TOKEN, b"\n"].concat()).expect("write token");
    p
}

/// Tiny deterministic generator (xorshift64*), so failures print a reproducible seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One change of a snapshot, applied to the model in order.
#[derive(Debug, Clone)]
pub enum Change {
    Data { lba: u64, data: Vec<u8> },
    Zero { lba: u64, nblocks: u64 },
}

/// Generates random changes (overlapping, some large, some zero) for a volume of `blocks`.
pub fn random_changes(rng: &mut Rng, blocks: u64, bs: usize, count: usize) -> Vec<Change> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let big = rng.below(8) == 0;
        let n = if big {
            1 + rng.below(600)
        } else {
            1 + rng.below(32)
        };
        let n = n.min(blocks);
        let lba = rng.below(blocks - n + 1);
        if rng.below(5) == 0 {
            out.push(Change::Zero { lba, nblocks: n });
        } else {
            let mut data = vec![0u8; n as usize * bs];
            rng.fill(&mut data);
            out.push(Change::Data { lba, data });
        }
    }
    out
}

pub fn apply(model: &mut [u8], bs: usize, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Data { lba, data } => {
                let at = *lba as usize * bs;
                model[at..at + data.len()].copy_from_slice(data);
            }
            Change::Zero { lba, nblocks } => {
                let at = *lba as usize * bs;
                model[at..at + *nblocks as usize * bs].fill(0);
            }
        }
    }
}

pub fn upload(c: &mut Client, snap: u64, parent: u64, size: u64, bs: usize, changes: &[Change]) {
    let outcome = c.begin_snapshot(snap, parent, size).expect("begin");
    assert_eq!(outcome, deltavol_dataplane::BeginOutcome::Started);
    for ch in changes {
        match ch {
            Change::Data { lba, data } => c
                .put_extent(*lba, (data.len() / bs) as u32, data)
                .expect("put"),
            Change::Zero { lba, nblocks } => c.put_zero_extent(*lba, *nblocks).expect("put zero"),
        }
    }
    let info = c.commit().expect("commit");
    assert_eq!(info.snap_id, snap);
    assert_eq!(info.parent_id, parent);
}

/// Reads the whole volume as of `snap` and compares it with `model`, then a few sub-ranges.
pub fn check_snapshot(c: &mut Client, snap: u64, model: &[u8], bs: usize, rng: &mut Rng) {
    let blocks = (model.len() / bs) as u64;
    let mut buf = vec![0xeeu8; model.len()];
    c.read_extents(snap, 0, blocks, &mut buf)
        .expect("read whole volume");
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "snapshot {snap}: first difference at byte {i} (block {})",
            i / bs
        );
    }
    for _ in 0..8 {
        let n = 1 + rng.below(blocks.min(300));
        let lba = rng.below(blocks - n + 1);
        let mut part = vec![0xeeu8; n as usize * bs];
        c.read_extents(snap, lba, n, &mut part).expect("read range");
        let at = lba as usize * bs;
        assert!(
            part == model[at..at + part.len()],
            "snapshot {snap}: range {lba}+{n} differs"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Raw frames for hostile-client tests
// ------------------------------------------------------------------------------------------

pub fn frame(
    fbb: &mut FlatBufferBuilder<'_>,
    ty: wire::Message,
    body: deltavol_schemas::flatbuffers::WIPOffset<deltavol_schemas::flatbuffers::UnionWIPOffset>,
    payload: &[u8],
) -> Vec<u8> {
    let h = finish_header(fbb, ty, body, payload.len()).expect("header");
    let mut out = Vec::new();
    append_frame(&mut out, h, payload).expect("frame");
    fbb.reset();
    out
}

/// Reads one frame from a raw stream; returns (message type, error code if Error, message).
pub fn read_reply(s: &mut TcpStream) -> Option<(wire::Message, Option<wire::ErrorCode>, String)> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).ok()?;
    let len = u32::from_le_bytes(prefix) as usize;
    assert!(
        len <= deltavol_schemas::FRAME_HEADER_MAX_BYTES,
        "server sent an oversized header"
    );
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).ok()?;
    let mut whole = prefix.to_vec();
    whole.extend_from_slice(&rest);
    let hdr = deltavol_schemas::decode_header(&rest).expect("server frames verify");
    let mut payload = vec![0u8; hdr.payload_len() as usize];
    s.read_exact(&mut payload).ok()?;
    whole.extend_from_slice(&payload);
    let f = decode_frame(&whole).expect("server frame decodes");
    let ty = f.header.body_type();
    match f.header.body_as_error() {
        Some(e) => Some((
            ty,
            Some(e.code()),
            e.message().unwrap_or_default().to_string(),
        )),
        None => Some((ty, None, String::new())),
    }
}

/// Opens a raw connection and authenticates it for `volume`.
pub fn raw_auth(
    addr: SocketAddr,
    token: &[u8],
    volume: &str,
) -> (
    TcpStream,
    Option<(wire::Message, Option<wire::ErrorCode>, String)>,
) {
    raw_auth_with_id(addr, token, volume, None)
}

/// [`raw_auth`] sending `volume_id` as the Auth's volume id bytes (any length).
pub fn raw_auth_with_id(
    addr: SocketAddr,
    token: &[u8],
    volume: &str,
    volume_id: Option<&[u8]>,
) -> (
    TcpStream,
    Option<(wire::Message, Option<wire::ErrorCode>, String)>,
) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::Hello::create(
        &mut fbb,
        &wire::HelloArgs {
            protocol_version: PROTOCOL_VERSION,
            client_name: None,
        },
    );
    let f = frame(&mut fbb, wire::Message::Hello, body.as_union_value(), &[]);
    s.write_all(&f).expect("hello");
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).expect("challenge prefix");
    let mut hdr = vec![0u8; u32::from_le_bytes(prefix) as usize];
    s.read_exact(&mut hdr).expect("challenge");
    let h = deltavol_schemas::decode_header(&hdr).expect("challenge verifies");
    let nonce = h
        .body_as_challenge()
        .expect("challenge")
        .nonce()
        .expect("nonce")
        .bytes()
        .to_vec();
    // A per-volume credential (`dvc1.`) proves its secret; anything else is the admin token.
    let (mac, credential_id, proof) =
        match deltavol_dataplane::credentials::ClientCredential::parse(token) {
            Some(c) => {
                let c = c.expect("a well-formed credential");
                let p = c.proof(&nonce, volume);
                (
                    None,
                    Some(fbb.create_string(&c.id)),
                    Some(fbb.create_vector(&p)),
                )
            }
            None => (
                Some(fbb.create_vector(&auth::answer(token, &nonce, volume))),
                None,
                None,
            ),
        };
    let v = fbb.create_string(volume);
    let id = volume_id.map(|b| fbb.create_vector(b));
    let body = wire::Auth::create(
        &mut fbb,
        &wire::AuthArgs {
            volume: Some(v),
            mac,
            generation: 0,
            volume_id: id,
            credential_id,
            proof,
        },
    );
    let f = frame(&mut fbb, wire::Message::Auth, body.as_union_value(), &[]);
    s.write_all(&f).expect("auth");
    let reply = read_reply(&mut s);
    (s, reply)
}

/// True when the server closed the connection (EOF or reset) within the read timeout.
pub fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// `GET path` on a metrics endpoint: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("response head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line of {head:?}"));
    (code, body.to_string())
}

/// The value of the sample `series` (a name with its labels, e.g. `x_total{volume="v"}`) in a
/// text exposition; panics with the exposition when it is missing.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}
