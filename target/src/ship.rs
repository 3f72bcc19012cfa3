//! Shipping: each flushed epoch becomes a snapshot on the data plane.
//!
//! [`DataPlaneSink`] is the flush thread's [`DeltaSink`]. When the data plane is reachable and
//! nothing is queued, it streams the epoch's extents straight to it (`BeginSnapshot` →
//! `PutExtents`… → `Commit`, durable there before the flush goes on). Otherwise — data plane
//! down, slow past the I/O timeout, or earlier snapshots still queued — it spools the delta to
//! the **outbox** on the backing disk (written to a temp file, fsynced, renamed: a spooled
//! delta is durable or absent), and the **shipper** thread sends the outbox in snapshot order
//! when the data plane is back. Either way the flush only reclaims the SSD once the delta is
//! durable somewhere, and the foreground I/O never waits on the network.
//!
//! Ordering: a snapshot is shipped directly only when the outbox is empty, so snapshots reach
//! the data plane in order; the server refuses a parent that is not its chain head, and answers
//! `AlreadyCommitted` to a snapshot it has, so a retry never ships one twice and a gap is
//! reported instead of being papered over.
//!
//! A corrupt outbox entry (its checksums fail: damage on the backing disk) is never shipped:
//! it is detected before its snapshot is committed, and it — with every later entry, which
//! chains onto it — is set aside as `*.delta.corrupt` (kept for inspection) with an error in
//! `status`. The data plane's chain then has a gap, so the next flush checks the data plane's
//! head and ships the backing file as a base snapshot chained onto that head — only the blocks
//! whose crc32c differs from it (`ReadChecksums`), or every block when the data plane has no
//! snapshot of the volume — after which the chain goes on. The snapshots set aside are lost on the data plane; the volume's data is not (it is in
//! the backing file). The same happens if the data plane reports a gap (a missing parent).
//!
//! ## Outbox entry (`<outbox>/snap-<id>.delta`)
//! `header (64 B): magic "DVOUTBX1" | version u32 | flags u32 (bit 0: full snapshot) |
//!  volume_id [16] | snap u64 | parent u64 | volume_size u64 | pad | crc32c u32`; from version
//! 2 on, then `cut (32 B): cut_unix_ms u64 | reserved [20] | crc32c u32` — the wall-clock time
//! of the epoch's cut (0 = unknown), so that a snapshot shipped late keeps the moment whose
//! state it holds (version 1 entries, written before, are still read: cut time unknown); then records
//! `magic u32 | kind u32 (0 data, 1 zero) | lba u64 | nblocks u64 | data_crc u32 | hdr_crc u32`
//! each followed by its data, then `trailer (32 B): magic "DVOUTEND" | records u64 |
//! data_bytes u64 | pad u32 | crc32c u32`. Every part is checked before anything is sent.
//!
//! ## An encrypted volume
//! Its blocks cross to the data plane sealed ([`crate::crypt`]): each extent is sealed right
//! before `put_extent` (the outbox, on this node's backing disk, holds plaintext like the
//! backing file), and the volume exists there with the envelopes' block size and the same
//! block count. A base after a gap is then shipped whole: the data plane's checksums are of
//! ciphertext, so they cannot tell which blocks equal the backing file's.

use crate::cache::meta::{VolumeId, BLOCK_SIZE};
use crate::crypt::{BlockCodec, RemoteError};
use crate::error::{Error, ErrorKind, Result};
use crate::fault::{FaultFile, FaultOp, FaultPlan};
use crate::flush::DeltaSink;
use crate::label::{BackingState, LabelWriter};
use deltavol_dataplane::{
    BeginOutcome, Client, ClientAccess, ClientError, ErrorCode, SnapshotInfo, Timeouts,
};
use serde::Serialize;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const OUTBOX_MAGIC: &[u8; 8] = b"DVOUTBX1";
const OUTBOX_END: &[u8; 8] = b"DVOUTEND";
/// Written: 2 (with the cut block). Read: 1 and 2.
const OUTBOX_VERSION: u32 = 2;
const OUTBOX_HEADER_BYTES: u64 = 64;
const OUTBOX_CUT_BYTES: u64 = 32;
const REC_MAGIC: u32 = 0x5245_5644; // "DVER"
const FLAG_FULL: u32 = 1;
/// Largest extent a record may claim (the flush ships at most 1 MiB at once).
const RECORD_BLOCKS_MAX: u64 = 1 << 20;
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);
pub const TOKEN_BYTES_MAX: u64 = 4096;

/// The data-plane servers that may serve a volume, in order of preference: one address, or
/// several servers sharing one object store (`--multi-server`), of which the one holding the
/// volume's lease answers and the others refuse it. Clones share the memory of which address
/// worked last, so the shipper, the hydrator and `verify` all try it first.
#[derive(Debug, Clone)]
pub struct DataPlaneAddrs {
    list: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

/// Largest number of addresses `--dataplane` takes.
pub const DATAPLANE_ADDRS_MAX: usize = 16;

impl DataPlaneAddrs {
    /// One address, as given (resolved at connect time).
    pub fn one(addr: impl Into<String>) -> DataPlaneAddrs {
        DataPlaneAddrs {
            list: vec![addr.into()].into(),
            current: Arc::default(),
        }
    }

    /// Parses `HOST:PORT[,HOST:PORT...]` (IPv6 hosts in brackets), checking each address's
    /// form; names are resolved only when connecting.
    pub fn parse(s: &str) -> Result<DataPlaneAddrs> {
        let mut list: Vec<String> = Vec::new();
        for (i, raw) in s.split(',').enumerate() {
            let a = raw.trim();
            let bad = |why: &str| {
                Error::invalid(format!(
                    "data-plane address #{} {a:?} in {s:?} {why}: give HOST:PORT, or several separated by commas",
                    i + 1
                ))
            };
            if a.is_empty() {
                return Err(bad("is empty"));
            }
            if a.parse::<std::net::SocketAddr>().is_err() {
                let Some((host, port)) = a.rsplit_once(':') else {
                    return Err(bad("has no :PORT"));
                };
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => {}
                    _ => return Err(bad("has no valid port (1-65535)")),
                }
                let host_ok = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_');
                if !host_ok {
                    return Err(bad("has no valid host name or IP address"));
                }
            } else if a.ends_with(":0") {
                return Err(bad("has port 0"));
            }
            if list.iter().any(|x| x == a) {
                return Err(bad("is listed twice"));
            }
            list.push(a.to_string());
        }
        if list.len() > DATAPLANE_ADDRS_MAX {
            return Err(Error::invalid(format!(
                "{} data-plane addresses given: at most {DATAPLANE_ADDRS_MAX}",
                list.len()
            )));
        }
        Ok(DataPlaneAddrs {
            list: list.into(),
            current: Arc::default(),
        })
    }

    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The address that worked last (the first before any worked).
    pub fn current(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        &self.list[i.min(self.list.len() - 1)]
    }

    /// Connects through `attempt` to the address that worked last, then to the others in
    /// order, until one succeeds. A refused or timed-out connection, a server that refuses
    /// the volume (another server holds its lease), or any other failure moves on to the
    /// next address — except fencing (this writer's generation is stale: every server of
    /// the store says so), which is returned at once. When every address fails, the error
    /// names each one's failure (a single address's error is returned as it is).
    pub fn connect<T>(
        &self,
        volume: &str,
        mut attempt: impl FnMut(&str) -> Result<T>,
    ) -> Result<(T, String)> {
        let first = self
            .current
            .load(Ordering::Relaxed)
            .min(self.list.len() - 1);
        let order = std::iter::once(first).chain((0..self.list.len()).filter(|&i| i != first));
        let mut errs: Vec<(usize, Error)> = Vec::new();
        for i in order {
            let addr = &self.list[i];
            match attempt(addr) {
                Ok(t) => {
                    if i != first || !errs.is_empty() {
                        tracing::info!(volume, dataplane = %addr, "connected to data-plane server {}", addr);
                    }
                    self.current.store(i, Ordering::Relaxed);
                    return Ok((t, addr.clone()));
                }
                // Every server of a store says the same: no point asking the others.
                Err(e) if is_fence(&e) || is_identity_refusal(&e) => return Err(e),
                Err(e) => {
                    if self.list.len() > 1 {
                        tracing::debug!(volume, dataplane = %addr, error = %e, "data-plane server unavailable for this volume; trying the next");
                    }
                    errs.push((i, e));
                }
            }
        }
        if errs.len() == 1 {
            return Err(errs
                .pop()
                .map(|e| e.1)
                .unwrap_or_else(|| Error::invalid("no data-plane address")));
        }
        let kind = errs.first().map(|e| e.1.kind()).unwrap_or(ErrorKind::Io);
        let kind = if errs.iter().all(|e| e.1.kind() == kind) {
            kind
        } else {
            ErrorKind::Io
        };
        let msg = errs
            .iter()
            .map(|(i, e)| format!("{}: {e}", self.list[*i]))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::new(
            kind,
            format!("no data-plane server took volume {volume:?}: {msg}"),
        ))
    }

    /// [`Self::connect`] with a plain [`Client`] (no set-up beyond the handshake), as the
    /// volume with identity `volume_id` (the data plane refuses another volume's name).
    pub fn connect_client(
        &self,
        access: &ClientAccess,
        volume: &str,
        timeouts: Timeouts,
        generation: u64,
        volume_id: Option<VolumeId>,
    ) -> Result<(Client, String)> {
        self.connect(volume, |addr| {
            let access = access_for(access, addr);
            Client::connect_as(addr, &access, volume, timeouts, generation, volume_id)
                .map_err(client_err)
        })
    }
}

/// `access` for the server at `addr` (`HOST:PORT`): over TLS, its certificate must name
/// HOST unless `--tls-server-name` named another.
pub fn access_for(access: &ClientAccess, addr: &str) -> ClientAccess {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    access.server_name_or(host)
}

/// How a node's connections to the data plane are protected, for `status` and the log:
/// `tls`, `plain (loopback)`, or `INSECURE plain TCP (--insecure)`.
pub fn transport_label(access: &ClientAccess) -> &'static str {
    if access.is_tls() {
        "tls"
    } else if access.is_insecure() {
        "INSECURE plain TCP (--insecure)"
    } else {
        "plain TCP (loopback only)"
    }
}

impl std::fmt::Display for DataPlaneAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.list.join(","))
    }
}

impl std::str::FromStr for DataPlaneAddrs {
    type Err = Error;
    fn from_str(s: &str) -> Result<DataPlaneAddrs> {
        DataPlaneAddrs::parse(s)
    }
}

/// Where and how to ship.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    pub addrs: DataPlaneAddrs,
    /// The node's credential (or the admin token) and TLS.
    pub access: ClientAccess,
    pub outbox_dir: PathBuf,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// The retention policy to set on the data plane at each connection (`add --retention`);
    /// `None` leaves the data plane's as it is.
    pub retention: Option<deltavol_dataplane::retention::Policy>,
    /// How blocks cross to and from the data plane: plain, or sealed under the volume's key
    /// (`--encryption-key-file`). Every path that ships or reads data-plane blocks goes
    /// through it.
    pub codec: BlockCodec,
}

impl ShipConfig {
    /// The client time-outs this configuration sets.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.connect_timeout,
            io: self.io_timeout,
        }
    }

    /// A plain [`Client`] of `volume` on the first server that serves it (see
    /// [`DataPlaneAddrs::connect`]), as writer `generation` of the volume with identity
    /// `volume_id` (the data plane refuses another volume's name). Returns it and its address.
    pub fn connect_as(
        &self,
        volume: &str,
        generation: u64,
        volume_id: Option<VolumeId>,
    ) -> Result<(Client, String)> {
        self.addrs
            .connect_client(&self.access, volume, self.timeouts(), generation, volume_id)
    }
}

/// Reads a shared-secret token file (trailing whitespace trimmed, as the server does).
pub fn read_token(path: &Path) -> Result<Vec<u8>> {
    let md = std::fs::metadata(path).map_err(|e| Error::io("read auth token", path, e))?;
    if md.len() > TOKEN_BYTES_MAX {
        return Err(Error::invalid(format!(
            "auth token file {} is larger than {TOKEN_BYTES_MAX} bytes",
            path.display()
        )));
    }
    let mut t = std::fs::read(path).map_err(|e| Error::io("read auth token", path, e))?;
    while t.last().is_some_and(|c| c.is_ascii_whitespace()) {
        t.pop();
    }
    if t.is_empty() {
        return Err(Error::invalid(format!(
            "auth token file {} is empty",
            path.display()
        )));
    }
    Ok(t)
}

/// Shipping state for `deltavol status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShipStatus {
    /// The data-plane server in use: the one connected to, else the one that worked last (the
    /// first listed before any did).
    pub dataplane: String,
    /// Every address given, in order (`--dataplane A,B,...`).
    pub dataplane_addrs: Vec<String>,
    pub connected: bool,
    /// The server the shipper is connected to (`None` while it is not).
    pub connected_to: Option<String>,
    /// Newest snapshot made durable (committed on the data plane or queued in the outbox).
    pub head: u64,
    /// Newest snapshot committed on the data plane, and when (unix ms).
    pub last_committed: Option<u64>,
    pub last_committed_unix_ms: Option<u64>,
    /// The wall-clock time of that snapshot's cut (unix ms), when known: the recovery point
    /// (the state a recovery from the data plane gets back is the volume as of this moment).
    pub last_committed_cut_unix_ms: Option<u64>,
    pub outbox_entries: u64,
    pub outbox_bytes: u64,
    pub last_error: Option<String>,
    /// Recovered elsewhere: this daemon ships nothing more to the volume.
    pub fenced: bool,
    /// Fenced: the branch volume on the data plane that holds the snapshots this node made
    /// but could not ship (export or clone it like any volume).
    pub fenced_branch: Option<String>,
    /// Bytes written to the data plane since the daemon started (frames and payload, the
    /// handshake included).
    pub bytes_sent: u64,
}

struct Queued {
    snap: u64,
    path: PathBuf,
    bytes: u64,
}

struct State {
    client: Option<Client>,
    /// The address `client` (or the connection taken from it) is connected to.
    conn_addr: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    outbox: VecDeque<Queued>,
    head: u64,
    /// Newest committed snapshot: (id, commit time, cut time or 0), unix ms.
    committed: Option<(u64, u64, u64)>,
    last_error: Option<String>,
    /// The volume was recovered elsewhere (a newer generation): ship nothing, ever, to the
    /// volume; the outbox goes to the fenced branch instead.
    fenced: bool,
    /// The branch volume on the data plane that keeps this fenced writer's unshipped
    /// snapshots (named once it was created).
    branch: Option<String>,
    stop: bool,
    /// Ask the data plane for its chain head at the next flush even if ours is current
    /// (after a start, or after outbox entries were set aside): it may lack snapshots.
    check_head: bool,
    /// Set by `base_needed` when it learned the data plane's head just now (and the outbox is
    /// empty): a base may be shipped as the blocks that differ from that snapshot.
    base_parent: Option<u64>,
    /// When the heat map is next due (`None`: not scheduled yet); `heat_off`: the data plane
    /// keeps none (an older server), so it is not sent again.
    heat_at: Option<Instant>,
    heat_off: bool,
}

struct Shared {
    cfg: ShipConfig,
    generation: u64,
    volume: String,
    volume_id: VolumeId,
    size_bytes: u64,
    /// Bytes written to data-plane sockets (frames and payload), by every connection.
    bytes_sent: Arc<std::sync::atomic::AtomicU64>,
    st: Mutex<State>,
    cv: Condvar,
    /// Fault injection into outbox writes and syncs (tests); unset in production.
    faults: std::sync::OnceLock<Arc<FaultPlan>>,
    /// Called once when this writer learns it is fenced (the volume makes its device
    /// read-only); argument: a generation newer than this writer's.
    on_fenced: std::sync::OnceLock<FenceHook>,
    /// The read heat map and how often it is shipped ([`crate::heat`]).
    heat: std::sync::OnceLock<(Arc<crate::heat::HeatMap>, Duration)>,
}

/// What the layer above does when the volume is fenced.
pub type FenceHook = Box<dyn Fn(u64) + Send + Sync>;

fn client_err(e: ClientError) -> Error {
    if e.server_code() == Some(ErrorCode::StaleGeneration) {
        return Error::new(ErrorKind::Mismatch, format!("fenced: {e}"));
    }
    if e.server_code() == Some(ErrorCode::IdentityMismatch) {
        return Error::new(ErrorKind::Mismatch, format!("{IDENTITY_REFUSED}{e}"));
    }
    Error::new(ErrorKind::Io, format!("data plane: {e}"))
}

/// An error of a sealed (or plain) exchange through the codec.
fn remote_err(e: RemoteError) -> Error {
    match e {
        RemoteError::DataPlane(e) => client_err(e),
        RemoteError::Crypt(e) => {
            Error::new(ErrorKind::Io, format!("sealing for the data plane: {e}"))
        }
    }
}

fn is_fence(e: &Error) -> bool {
    e.kind() == ErrorKind::Mismatch && e.to_string().starts_with("fenced: ")
}

/// How an error refusing this volume's identity begins (the data plane holds another volume
/// under this name): nothing is shipped, and every server of a store says the same.
pub const IDENTITY_REFUSED: &str = "refused by the data plane: ";

/// Whether the data plane refused this volume's identity (a reused name).
pub fn is_identity_refusal(e: &Error) -> bool {
    e.kind() == ErrorKind::Mismatch && e.to_string().starts_with(IDENTITY_REFUSED)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects to the first of the data-plane servers that serves the volume (see
    /// [`DataPlaneAddrs::connect`]) and makes sure the volume exists there with our size.
    fn connect(&self) -> Result<(Client, String)> {
        let t = self.cfg.timeouts();
        self.cfg.addrs.connect(&self.volume, |addr| {
            let access = access_for(&self.cfg.access, addr);
            let mut c = Client::connect_as(
                addr,
                &access,
                &self.volume,
                t,
                self.generation,
                Some(self.volume_id),
            )
            .map_err(client_err)?;
            c.count_sent_bytes(self.bytes_sent.clone());
            let codec = &self.cfg.codec;
            // Encrypted there and not here (or the other way round): said plainly, never
            // shipped (the data plane would refuse the geometry anyway).
            codec.check_geometry(&self.volume, c.info())?;
            let info = c
                .create_volume(
                    codec.dp_size_bytes(self.size_bytes),
                    codec.dp_block_size(),
                )
                .map_err(client_err)?;
            if crate::crypt::device_size_bytes(&info) != self.size_bytes {
                return Err(Error::mismatch(format!(
                    "the data plane at {addr} holds volume {:?} with {} bytes, this volume has {}",
                    self.volume,
                    crate::crypt::device_size_bytes(&info),
                    self.size_bytes
                )));
            }
            if let Some(p) = self.cfg.retention.filter(|p| *p != info.retention) {
                c.set_retention(&p).map_err(client_err)?;
                tracing::info!(volume = %self.volume, retention = %p, "retention policy set on the data plane");
            }
            Ok(c)
        })
    }

    /// Takes the connected client, connecting if allowed now; `None` while backing off.
    fn take_client(&self, st: &mut State) -> Option<Client> {
        if st.fenced {
            return None;
        }
        if let Some(c) = st.client.take() {
            return Some(c);
        }
        if st.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        match self.connect() {
            Ok((c, addr)) => {
                st.backoff = RETRY_BACKOFF_MIN;
                st.retry_at = None;
                st.conn_addr = Some(addr);
                Some(c)
            }
            Err(e) => {
                self.note_failure(st, &e);
                None
            }
        }
    }

    fn note_failure(&self, st: &mut State, e: &Error) {
        if is_fence(e) {
            if !st.fenced {
                tracing::error!(volume = %self.volume, error = %e, "this volume was recovered on another machine: this daemon is fenced: its device is read-only from now on, it ships nothing more to the volume, and its unshipped snapshots go to a branch volume ({})", branch_name(&self.volume, self.generation));
                if let Some(h) = self.on_fenced.get() {
                    h(self.generation + 1);
                }
            }
            st.fenced = true;
            st.client = None;
            st.conn_addr = None;
            st.last_error = Some(e.to_string());
            return;
        }
        st.client = None;
        st.conn_addr = None;
        if is_identity_refusal(e) {
            if st.last_error.as_deref() != Some(&e.to_string()) {
                tracing::error!(volume = %self.volume, dataplane = %self.cfg.addrs, error = %e, "the data plane holds another volume under this name: nothing is shipped; deltas stay in the outbox until the name is freed");
            }
        } else {
            tracing::warn!(volume = %self.volume, dataplane = %self.cfg.addrs, error = %e, retry_in_ms = st.backoff.as_millis() as u64, "data plane unavailable; deltas queue in the outbox");
        }
        st.last_error = Some(e.to_string());
        st.retry_at = Some(Instant::now() + st.backoff);
        st.backoff = (st.backoff * 2).min(RETRY_BACKOFF_MAX);
    }

    fn note_commit(&self, st: &mut State, info: &SnapshotInfo) {
        st.committed = Some((info.snap_id, info.commit_time_ms, info.cut_time_ms));
        st.last_error = None;
    }
}

enum Mode {
    Idle,
    Direct {
        client: Box<Client>,
    },
    /// The data plane already has this snapshot (a re-flush after a crash).
    Skip,
    Spool {
        w: OutboxWriter,
    },
}

/// The flush thread's sink for a volume with a data plane.
pub struct DataPlaneSink {
    shared: Arc<Shared>,
    mode: Mode,
    /// Where extents are sealed before they are sent (an encrypted volume); kept between
    /// extents.
    seal_buf: Vec<u8>,
    /// Data extents of a batch sent together ([`DeltaSink::extents`]); kept between batches.
    group: Vec<(u64, u32, usize)>,
    shipper: Option<JoinHandle<()>>,
    /// The backing label in the outbox dir ([`crate::label`]).
    label: LabelWriter,
}

impl DataPlaneSink {
    /// Opens the outbox (queuing what a previous run left in it) and starts the shipper.
    /// `snap_head` is the chain head recorded in the superblock; `backing` is what the
    /// backing file holds now (recorded in the backing label before anything is shipped).
    pub fn start(
        cfg: ShipConfig,
        volume: &str,
        volume_id: VolumeId,
        size_bytes: u64,
        snap_head: u64,
        generation: u64,
        backing: BackingState,
    ) -> Result<DataPlaneSink> {
        if cfg.access.is_insecure() {
            tracing::warn!(volume, dataplane = %cfg.addrs, "snapshots go to the data plane over PLAIN TCP (--insecure): unencrypted on the network");
        }
        std::fs::create_dir_all(&cfg.outbox_dir)
            .map_err(|e| Error::io("create outbox", &cfg.outbox_dir, e))?;
        let mut label = LabelWriter::open(&cfg.outbox_dir, volume_id, volume, size_bytes)?;
        let mut outbox: Vec<Queued> = Vec::new();
        let rd = std::fs::read_dir(&cfg.outbox_dir)
            .map_err(|e| Error::io("read outbox", &cfg.outbox_dir, e))?;
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            if let Some(id) = outbox_entry_snap(&name) {
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                outbox.push(Queued {
                    snap: id,
                    path: p,
                    bytes,
                });
            }
        }
        outbox.sort_by_key(|q| q.snap);
        let head = outbox.last().map(|q| q.snap).unwrap_or(0).max(snap_head);
        label.write(backing, head, generation)?;
        if !outbox.is_empty() {
            tracing::info!(
                volume,
                entries = outbox.len(),
                "outbox holds deltas not yet on the data plane; shipping them first"
            );
        }
        let shared = Arc::new(Shared {
            cfg,
            generation,
            volume: volume.to_string(),
            volume_id,
            size_bytes,
            bytes_sent: Arc::default(),
            st: Mutex::new(State {
                client: None,
                conn_addr: None,
                retry_at: None,
                backoff: RETRY_BACKOFF_MIN,
                outbox: outbox.into(),
                head,
                committed: None,
                last_error: None,
                fenced: false,
                branch: None,
                stop: false,
                check_head: true,
                base_parent: None,
                heat_at: None,
                heat_off: false,
            }),
            cv: Condvar::new(),
            faults: std::sync::OnceLock::new(),
            on_fenced: std::sync::OnceLock::new(),
            heat: std::sync::OnceLock::new(),
        });
        let s2 = shared.clone();
        let shipper = std::thread::Builder::new()
            .name(format!("dv-ship-{volume}"))
            .spawn(move || {
                crate::prio::background(false);
                run_shipper(s2)
            })
            .map_err(|e| Error::io("start shipper for", volume, e))?;
        Ok(DataPlaneSink {
            shared,
            mode: Mode::Idle,
            seal_buf: Vec::new(),
            group: Vec::new(),
            shipper: Some(shipper),
            label,
        })
    }

    /// Ships `heat` to the data plane every `every` (the first time `every` from now), when
    /// no snapshot is waiting to be shipped.
    pub fn ship_heat(&self, heat: Arc<crate::heat::HeatMap>, every: Duration) {
        if self.shared.heat.set((heat, every)).is_ok() {
            self.shared.lock().heat_at = Some(Instant::now() + every);
            self.shared.cv.notify_all();
        }
    }

    /// A handle for status and snapshot waits.
    pub fn handle(&self) -> ShipHandle {
        ShipHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for DataPlaneSink {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.shipper.take() {
            let _ = t.join();
        }
    }
}

/// Status and waiting, from other threads (control socket).
#[derive(Clone)]
pub struct ShipHandle {
    shared: Arc<Shared>,
}

impl ShipHandle {
    /// How the connections to the data plane are protected ([`transport_label`]).
    pub fn transport(&self) -> &'static str {
        transport_label(&self.shared.cfg.access)
    }

    /// How this volume's blocks cross to and from the data plane (plain or sealed).
    pub fn codec(&self) -> &BlockCodec {
        &self.shared.cfg.codec
    }

    /// A new connection to the data plane for this volume (reads: scrub, tests).
    pub fn connect(&self) -> Result<Client> {
        let sh = &self.shared;
        sh.cfg
            .connect_as(&sh.volume, sh.generation, Some(sh.volume_id))
            .map(|(c, _)| c)
    }

    /// Sets what happens when this writer learns it is fenced; with `already` (the volume was
    /// fenced before this run) the shipper starts fenced.
    pub fn set_fence_hook(&self, hook: FenceHook, already: bool) {
        let _ = self.shared.on_fenced.set(hook);
        if already {
            let mut st = self.shared.lock();
            st.fenced = true;
            st.last_error = Some(format!(
                "fenced: volume {} was recovered on another machine; this writer ships its snapshots to branch {}",
                self.shared.volume,
                branch_name(&self.shared.volume, self.shared.generation)
            ));
            self.shared.cv.notify_all();
        }
    }

    /// Routes outbox writes and syncs through `plan` from now on (tests). Returns false if a
    /// plan was already set.
    pub fn inject_faults(&self, plan: Arc<FaultPlan>) -> bool {
        self.shared.faults.set(plan).is_ok()
    }

    pub fn status(&self) -> ShipStatus {
        let st = self.shared.lock();
        let connected = st.client.is_some()
            || (st.retry_at.is_none() && st.last_error.is_none() && st.committed.is_some());
        let addrs = &self.shared.cfg.addrs;
        let connected_to = st.conn_addr.clone().filter(|_| connected);
        ShipStatus {
            dataplane: connected_to
                .clone()
                .unwrap_or_else(|| addrs.current().to_string()),
            dataplane_addrs: addrs.list().to_vec(),
            connected,
            connected_to,
            head: st.head,
            last_committed: st.committed.map(|c| c.0),
            last_committed_unix_ms: st.committed.map(|c| c.1),
            last_committed_cut_unix_ms: st.committed.map(|c| c.2).filter(|&t| t != 0),
            outbox_entries: st.outbox.len() as u64,
            outbox_bytes: st.outbox.iter().map(|q| q.bytes).sum(),
            last_error: st.last_error.clone(),
            fenced: st.fenced,
            fenced_branch: st.branch.clone(),
            bytes_sent: self
                .shared
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Waits until snapshot `snap` is committed on the data plane (not merely queued).
    pub fn wait_committed(&self, snap: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let queued = st.outbox.iter().any(|q| q.snap <= snap);
            if !queued && st.committed.is_some_and(|c| c.0 >= snap) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl DataPlaneSink {
    fn fail_direct(&self, e: Error) -> Error {
        let mut st = self.shared.lock();
        self.shared.note_failure(&mut st, &e);
        e
    }
}

impl DeltaSink for DataPlaneSink {
    fn begin(&mut self, snap: u64, full: bool, volume_size: u64, cut_unix_ms: u64) -> Result<()> {
        let sh = self.shared.clone();
        let mut st = sh.lock();
        if snap <= st.head {
            // Already durable (committed, or queued in the outbox) before a restart: the
            // re-flush of this epoch must not ship it again.
            self.mode = Mode::Skip;
            return Ok(());
        }
        let parent = st.head;
        if st.outbox.is_empty() {
            if let Some(mut c) = sh.take_client(&mut st) {
                drop(st);
                let dp_size = sh.cfg.codec.dp_size_bytes(volume_size);
                match c.begin_snapshot_cut_at(snap, parent, dp_size, cut_unix_ms) {
                    Ok(BeginOutcome::Started) => {
                        self.mode = Mode::Direct {
                            client: Box::new(c),
                        };
                        return Ok(());
                    }
                    Ok(BeginOutcome::AlreadyCommitted(info)) => {
                        let mut st = sh.lock();
                        sh.note_commit(&mut st, &info);
                        st.head = st.head.max(snap);
                        st.client = Some(c);
                        self.mode = Mode::Skip;
                        return Ok(());
                    }
                    Err(e) => {
                        let mut st = sh.lock();
                        sh.note_failure(&mut st, &client_err(e));
                    }
                }
            }
        } else {
            drop(st);
        }
        self.mode = Mode::Spool {
            w: OutboxWriter::create(&sh, snap, parent, volume_size, full, cut_unix_ms)?,
        };
        Ok(())
    }

    fn extent(&mut self, lba: u64, nblocks: u64, data: Option<&[u8]>) -> Result<()> {
        let r = match &mut self.mode {
            Mode::Idle => return Err(Error::invalid("extent outside a snapshot")),
            Mode::Skip => return Ok(()),
            Mode::Spool { w } => return w.record(lba, nblocks, data),
            Mode::Direct { client } => match data {
                Some(d) => self
                    .shared
                    .cfg
                    .codec
                    .put_extent(client, lba, d, &mut self.seal_buf),
                None => client
                    .put_zero_extent(lba, nblocks)
                    .map_err(RemoteError::from),
            },
        };
        r.map_err(|e| {
            self.mode = Mode::Idle;
            self.fail_direct(remote_err(e))
        })
    }

    fn extents(&mut self, buf: &[u8], exts: &[(u64, u64, Option<usize>)]) -> Result<()> {
        let direct = matches!(self.mode, Mode::Direct { .. });
        if !direct || self.shared.cfg.codec.is_encrypted() {
            for &(lba, n, at) in exts {
                let data = at.map(|a| &buf[a..a + (n * BLOCK_SIZE) as usize]);
                self.extent(lba, n, data)?;
            }
            return Ok(());
        }
        // Direct and plain: the data extents go to the socket straight from `buf`.
        let mut group = std::mem::take(&mut self.group);
        group.clear();
        let mut r = Ok(());
        if let Mode::Direct { client } = &mut self.mode {
            for &(lba, n, at) in exts {
                r = match at {
                    Some(a) => match u32::try_from(n) {
                        Ok(n) => {
                            group.push((lba, n, a));
                            continue;
                        }
                        Err(_) => Err(Error::invalid(format!("extent {lba}+{n} too long"))),
                    },
                    None => {
                        let sent = match group.is_empty() {
                            true => Ok(()),
                            false => client.put_extents_from(buf, &group),
                        };
                        group.clear();
                        sent.and_then(|()| client.put_zero_extent(lba, n))
                            .map_err(client_err)
                    }
                };
                if r.is_err() {
                    break;
                }
            }
            if r.is_ok() && !group.is_empty() {
                r = client.put_extents_from(buf, &group).map_err(client_err);
            }
        }
        self.group = group;
        r.map_err(|e| {
            self.mode = Mode::Idle;
            self.fail_direct(e)
        })
    }

    fn commit(&mut self, snap: u64) -> Result<()> {
        let sh = self.shared.clone();
        match std::mem::replace(&mut self.mode, Mode::Idle) {
            Mode::Idle => Err(Error::invalid("commit outside a snapshot")),
            Mode::Skip => Ok(()),
            Mode::Spool { w } => {
                let q = w.finish()?;
                let mut st = sh.lock();
                st.outbox.retain(|x| x.snap != q.snap);
                st.outbox.push_back(q);
                st.head = st.head.max(snap);
                sh.cv.notify_all();
                Ok(())
            }
            Mode::Direct { mut client } => match client.commit() {
                Ok(info) => {
                    let mut st = sh.lock();
                    sh.note_commit(&mut st, &info);
                    st.head = st.head.max(snap);
                    st.client = Some(*client);
                    sh.cv.notify_all();
                    Ok(())
                }
                Err(e) => Err(self.fail_direct(client_err(e))),
            },
        }
    }

    fn head(&self) -> u64 {
        self.shared.lock().head
    }

    fn backing_state(&mut self, state: BackingState) -> Result<()> {
        let head = self.shared.lock().head;
        self.label.write(state, head, self.shared.generation)
    }

    fn base_parent(&mut self) -> Option<u64> {
        let mut st = self.shared.lock();
        let p = st.base_parent.take();
        // Sealed: the data plane's checksums are of ciphertext, never equal to the backing
        // file's; the base goes whole (see the module doc).
        p.filter(|p| *p > 0 && *p == st.head && st.outbox.is_empty())
            .filter(|_| !self.shared.cfg.codec.is_encrypted())
    }

    fn parent_checksums(&mut self, snap: u64, lba: u64, n: u64) -> Result<Vec<u32>> {
        let sh = self.shared.clone();
        let mut st = sh.lock();
        let Some(mut c) = sh.take_client(&mut st) else {
            return Err(Error::new(
                ErrorKind::Io,
                format!("data plane unavailable for the checksums of snapshot {snap}"),
            ));
        };
        drop(st);
        let r = c.read_checksums(snap, lba, n);
        let mut st = sh.lock();
        match r {
            Ok(v) => {
                st.client = Some(c);
                Ok(v)
            }
            Err(e) => {
                let e = client_err(e);
                sh.note_failure(&mut st, &e);
                Err(e)
            }
        }
    }

    fn base_needed(&mut self, flushed_epoch: u64) -> Result<bool> {
        let sh = self.shared.clone();
        let mut st = sh.lock();
        st.base_parent = None;
        if flushed_epoch == 0 || (st.head >= flushed_epoch && !st.check_head) {
            return Ok(false);
        }
        // The data plane may be further along than the superblock knew (a crash before the
        // head was persisted), or behind it (outbox entries set aside): ask it.
        if st.outbox.is_empty() {
            if let Some(mut c) = sh.take_client(&mut st) {
                drop(st);
                let latest = c.volume_info().map(|i| i.latest_snap_id);
                st = sh.lock();
                match latest {
                    Ok(l) => {
                        st.client = Some(c);
                        if st.check_head && l < st.head && st.outbox.is_empty() {
                            tracing::warn!(volume = %sh.volume, dataplane_head = l, head = st.head, "the data plane lacks snapshots this volume made: shipping a base snapshot (the blocks that differ from its head) so the chain goes on");
                            st.head = l;
                        }
                        st.check_head = false;
                        st.head = st.head.max(l);
                        if st.head == l {
                            st.base_parent = Some(l);
                        }
                        if l >= flushed_epoch {
                            return Ok(false);
                        }
                    }
                    Err(e) => sh.note_failure(&mut st, &client_err(e)),
                }
            }
        }
        Ok(st.head < flushed_epoch)
    }
}

/// The snapshot an outbox file name (`snap-<id>.delta`) holds; `None` for anything else (temp
/// files, entries set aside, the backing label).
pub fn outbox_entry_snap(file_name: &str) -> Option<u64> {
    file_name
        .strip_prefix("snap-")?
        .strip_suffix(".delta")?
        .parse()
        .ok()
}

/// Writes one outbox entry: temp file, records, trailer, fsync, rename, fsync dir.
struct OutboxWriter {
    faults: Option<Arc<FaultPlan>>,
    tmp: PathBuf,
    path: PathBuf,
    snap: u64,
    w: BufWriter<File>,
    records: u64,
    data_bytes: u64,
    bytes: u64,
}

impl OutboxWriter {
    fn create(
        sh: &Shared,
        snap: u64,
        parent: u64,
        volume_size: u64,
        full: bool,
        cut_unix_ms: u64,
    ) -> Result<OutboxWriter> {
        let dir = &sh.cfg.outbox_dir;
        let path = dir.join(format!("snap-{snap:020}.delta"));
        let tmp = dir.join(format!("snap-{snap:020}.delta.tmp"));
        let f = File::create(&tmp).map_err(|e| Error::io("create outbox entry", &tmp, e))?;
        let mut h = [0u8; 64];
        h[0..8].copy_from_slice(OUTBOX_MAGIC);
        h[8..12].copy_from_slice(&OUTBOX_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(if full { FLAG_FULL } else { 0 }).to_le_bytes());
        h[16..32].copy_from_slice(&sh.volume_id);
        h[32..40].copy_from_slice(&snap.to_le_bytes());
        h[40..48].copy_from_slice(&parent.to_le_bytes());
        h[48..56].copy_from_slice(&volume_size.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        let mut cut = [0u8; OUTBOX_CUT_BYTES as usize];
        cut[0..8].copy_from_slice(&cut_unix_ms.to_le_bytes());
        let crc = crc32c::crc32c(&cut[..28]);
        cut[28..32].copy_from_slice(&crc.to_le_bytes());
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let faults = sh.faults.get().cloned();
        FaultPlan::gate(faults.as_deref(), FaultFile::Outbox, FaultOp::Write, || {
            w.write_all(&h)?;
            w.write_all(&cut)
        })
        .map_err(|e| Error::io("write", &tmp, e))?;
        tracing::info!(volume = %sh.volume, snapshot = snap, full, "spooling snapshot to the outbox");
        Ok(OutboxWriter {
            faults,
            tmp,
            path,
            snap,
            w,
            records: 0,
            data_bytes: 0,
            bytes: OUTBOX_HEADER_BYTES + OUTBOX_CUT_BYTES,
        })
    }

    fn record(&mut self, lba: u64, nblocks: u64, data: Option<&[u8]>) -> Result<()> {
        let mut r = [0u8; 32];
        r[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        r[4..8].copy_from_slice(&(if data.is_some() { 0u32 } else { 1 }).to_le_bytes());
        r[8..16].copy_from_slice(&lba.to_le_bytes());
        r[16..24].copy_from_slice(&nblocks.to_le_bytes());
        r[24..28].copy_from_slice(&data.map(crc32c::crc32c).unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c(&r[..28]);
        r[28..32].copy_from_slice(&crc.to_le_bytes());
        FaultPlan::gate(
            self.faults.as_deref(),
            FaultFile::Outbox,
            FaultOp::Write,
            || self.w.write_all(&r),
        )
        .map_err(|e| Error::io("write", &self.tmp, e))?;
        self.bytes += 32;
        if let Some(d) = data {
            self.w
                .write_all(d)
                .map_err(|e| Error::io("write", &self.tmp, e))?;
            self.data_bytes += d.len() as u64;
            self.bytes += d.len() as u64;
        }
        self.records += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<Queued> {
        let mut t = [0u8; 32];
        t[0..8].copy_from_slice(OUTBOX_END);
        t[8..16].copy_from_slice(&self.records.to_le_bytes());
        t[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&t[..28]);
        t[28..32].copy_from_slice(&crc.to_le_bytes());
        self.w
            .write_all(&t)
            .map_err(|e| Error::io("write", &self.tmp, e))?;
        let f = self
            .w
            .into_inner()
            .map_err(|e| Error::io("write", &self.tmp, e.into_error()))?;
        FaultPlan::gate(
            self.faults.as_deref(),
            FaultFile::Outbox,
            FaultOp::Sync,
            || f.sync_all(),
        )
        .map_err(|e| Error::io("fsync", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io("rename", &self.tmp, e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("fsync", dir, e))?;
        }
        Ok(Queued {
            snap: self.snap,
            path: self.path,
            bytes: self.bytes + 32,
        })
    }
}

/// A verified outbox entry being read back.
struct OutboxReader {
    r: BufReader<File>,
    path: PathBuf,
    snap: u64,
    parent: u64,
    full: bool,
    volume_size: u64,
    /// The epoch's cut time (0 = unknown: a version 1 entry).
    cut_unix_ms: u64,
}

impl OutboxReader {
    fn open(path: &Path, volume_id: &VolumeId) -> Result<OutboxReader> {
        let f = File::open(path).map_err(|e| Error::io("open outbox entry", path, e))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut h = [0u8; 64];
        r.read_exact(&mut h)
            .map_err(|e| Error::io("read", path, e))?;
        let bad = |what: &str| Error::corrupt(format!("outbox entry {}: {what}", path.display()));
        if &h[0..8] != OUTBOX_MAGIC {
            return Err(bad("bad magic"));
        }
        if u32::from_le_bytes(h[60..64].try_into().unwrap_or_default()) != crc32c::crc32c(&h[..60])
        {
            return Err(bad("header checksum mismatch"));
        }
        let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
        let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        let version = le32(8);
        if version != 1 && version != OUTBOX_VERSION {
            return Err(bad(&format!(
                "version {version} unsupported (this deltavol reads versions 1 and {OUTBOX_VERSION}): written by a newer deltavol; ship it with that release"
            )));
        }
        if le32(12) & !FLAG_FULL != 0 {
            return Err(bad("unknown flags"));
        }
        if &h[16..32] != volume_id {
            return Err(bad("belongs to another volume"));
        }
        let mut cut_unix_ms = 0;
        if version >= 2 {
            let mut cut = [0u8; OUTBOX_CUT_BYTES as usize];
            r.read_exact(&mut cut)
                .map_err(|e| Error::io("read", path, e))?;
            if u32::from_le_bytes(cut[28..32].try_into().unwrap_or_default())
                != crc32c::crc32c(&cut[..28])
            {
                return Err(bad("cut-time block checksum mismatch"));
            }
            cut_unix_ms = u64::from_le_bytes(cut[0..8].try_into().unwrap_or_default());
        }
        Ok(OutboxReader {
            r,
            path: path.to_path_buf(),
            snap: le64(32),
            parent: le64(40),
            full: le32(12) & FLAG_FULL != 0,
            volume_size: le64(48),
            cut_unix_ms,
        })
    }

    /// Next record, `None` at a valid trailer: `(lba, nblocks, data crc32c; None: zeros)`,
    /// the data (its checksum checked) in `buf`.
    fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<(u64, u64, Option<u32>)>> {
        let bad =
            |what: String| Error::corrupt(format!("outbox entry {}: {what}", self.path.display()));
        let mut r = [0u8; 32];
        self.r
            .read_exact(&mut r)
            .map_err(|e| bad(format!("truncated ({e})")))?;
        if &r[0..8] == OUTBOX_END {
            if u32::from_le_bytes(r[28..32].try_into().unwrap_or_default())
                != crc32c::crc32c(&r[..28])
            {
                return Err(bad("trailer checksum mismatch".into()));
            }
            return Ok(None);
        }
        if u32::from_le_bytes(r[0..4].try_into().unwrap_or_default()) != REC_MAGIC
            || u32::from_le_bytes(r[28..32].try_into().unwrap_or_default())
                != crc32c::crc32c(&r[..28])
        {
            return Err(bad("bad record header".into()));
        }
        let kind = u32::from_le_bytes(r[4..8].try_into().unwrap_or_default());
        let lba = u64::from_le_bytes(r[8..16].try_into().unwrap_or_default());
        let n = u64::from_le_bytes(r[16..24].try_into().unwrap_or_default());
        if n == 0
            || n > RECORD_BLOCKS_MAX
            || lba
                .checked_add(n)
                .is_none_or(|e| e * BLOCK_SIZE > self.volume_size)
        {
            return Err(bad(format!("record {lba}+{n} out of range")));
        }
        match kind {
            1 => Ok(Some((lba, n, None))),
            0 => {
                buf.resize((n * BLOCK_SIZE) as usize, 0);
                self.r
                    .read_exact(buf)
                    .map_err(|e| bad(format!("truncated data ({e})")))?;
                let crc = crc32c::crc32c(buf);
                if crc != u32::from_le_bytes(r[24..28].try_into().unwrap_or_default()) {
                    return Err(bad(format!("data checksum mismatch at block {lba}")));
                }
                Ok(Some((lba, n, Some(crc))))
            }
            k => Err(bad(format!("unknown record kind {k}"))),
        }
    }
}

/// The branch volume that keeps the unshipped snapshots of the writer of generation
/// `generation` of `volume` once it is fenced.
pub fn branch_name(volume: &str, generation: u64) -> String {
    let suffix = format!(".fenced-g{generation}");
    let keep = crate::cache::meta::NAME_LEN_MAX.saturating_sub(suffix.len());
    let mut base = volume.to_string();
    while base.len() > keep {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// The branch's id: derived from the volume's and the generation, so a restarted fenced
/// writer reconnects to its own branch and nobody else's.
fn branch_id(volume_id: &VolumeId, generation: u64) -> VolumeId {
    let mut id = *volume_id;
    for (i, b) in generation.to_le_bytes().iter().enumerate() {
        id[i] ^= b ^ 0x5a;
    }
    id[15] ^= 0xb7;
    id
}

/// Fenced: ships one outbox entry to the branch volume, creating it at the first entry as a
/// clone of the entry's parent on the volume (a plain new volume when the parent is 0). The
/// branch's chain is the fenced writer's snapshots in order; each keeps its id. Returns the
/// branch's name.
fn ship_to_branch(sh: &Shared, path: &Path) -> Result<String> {
    let name = branch_name(&sh.volume, sh.generation);
    let id = branch_id(&sh.volume_id, sh.generation);
    let (mut c, _) = sh.cfg.connect_as(&name, 0, Some(id))?;
    if !c.info().exists {
        let rd = OutboxReader::open(path, &sh.volume_id)?;
        if rd.parent == 0 || rd.full {
            let codec = &sh.cfg.codec;
            c.create_volume(codec.dp_size_bytes(sh.size_bytes), codec.dp_block_size())
                .map_err(client_err)?;
        } else {
            c.clone_volume(&sh.volume, rd.parent).map_err(client_err)?;
        }
        tracing::warn!(volume = %sh.volume, branch = %name, "fenced: the snapshots this node could not ship go to branch volume {name} (export or clone it)");
    }
    let head = c.info().latest_snap_id;
    let info = ship_entry_as(sh, &mut c, path, Some(head))?;
    tracing::info!(volume = %sh.volume, branch = %name, snapshot = info.snap_id, "fenced: outbox snapshot committed on the branch volume");
    Ok(name)
}

/// Ships one outbox entry; returns the committed snapshot.
fn ship_entry(sh: &Shared, c: &mut Client, path: &Path) -> Result<SnapshotInfo> {
    ship_entry_as(sh, c, path, None)
}

/// [`ship_entry`], chained onto `parent` instead of the entry's own parent when given.
fn ship_entry_as(
    sh: &Shared,
    c: &mut Client,
    path: &Path,
    parent: Option<u64>,
) -> Result<SnapshotInfo> {
    let mut rd = OutboxReader::open(path, &sh.volume_id)?;
    let mut parent = parent.unwrap_or(rd.parent);
    let info = c.volume_info().map_err(client_err)?;
    if rd.full && info.latest_snap_id != parent && info.latest_snap_id < rd.snap {
        // A full snapshot is self-contained: chain it onto the data plane's head.
        parent = info.latest_snap_id;
    }
    let codec = &sh.cfg.codec;
    let dp_size = codec.dp_size_bytes(rd.volume_size);
    match c.begin_snapshot_cut_at(rd.snap, parent, dp_size, rd.cut_unix_ms) {
        Ok(BeginOutcome::AlreadyCommitted(i)) => return Ok(i),
        Ok(BeginOutcome::Started) => {}
        Err(e) if e.server_code() == Some(ErrorCode::BadParent) => {
            return Err(Error::new(
                ErrorKind::Mismatch,
                format!(
                    "the data plane's chain for {:?} ends at snapshot {}, but outbox snapshot {} has parent {}: a snapshot is missing; shipping stopped",
                    sh.volume, info.latest_snap_id, rd.snap, parent
                ),
            ))
        }
        Err(e) => return Err(client_err(e)),
    }
    let mut buf = Vec::new();
    let mut sealed = Vec::new();
    while let Some((lba, n, crc)) = rd.next(&mut buf)? {
        match crc {
            // Plain: the checksum just checked is the one the frame carries (not computed
            // again).
            Some(crc) if !codec.is_encrypted() => {
                let n = u32::try_from(n).map_err(|_| Error::corrupt("record too long"))?;
                c.put_extent_with_crc(lba, n, &buf, crc)
                    .map_err(client_err)?;
            }
            Some(_) => codec
                .put_extent(c, lba, &buf, &mut sealed)
                .map_err(remote_err)?,
            None => c.put_zero_extent(lba, n).map_err(client_err)?,
        }
    }
    c.commit().map_err(client_err)
}

/// Sends the heat map (summed over the queues, then faded: see [`crate::heat`]) on the
/// shipper's connection, and schedules the next. Nothing read since the last one: nothing sent.
fn ship_heat(sh: &Shared, mut st: std::sync::MutexGuard<'_, State>) {
    let Some((heat, every)) = sh.heat.get() else {
        st.heat_at = None;
        return;
    };
    st.heat_at = Some(Instant::now() + *every);
    let Some(map) = heat.take() else {
        return;
    };
    let Some(mut c) = sh.take_client(&mut st) else {
        return;
    };
    drop(st);
    let r = c.put_heat(heat.region_blocks(), &map);
    let mut st = sh.lock();
    match r {
        Ok(()) => {
            tracing::debug!(volume = %sh.volume, regions = map.len(), "heat map shipped");
            if st.client.is_none() {
                st.client = Some(c);
            }
        }
        Err(e) if e.server_code().is_some() => {
            // The data plane answered (the connection is not reused after a refusal).
            if matches!(
                e.server_code(),
                Some(ErrorCode::Malformed | ErrorCode::Protocol)
            ) {
                st.heat_off = true;
            }
            tracing::warn!(volume = %sh.volume, error = %e, "the data plane did not take the heat map (a later recovery hydrates in block order)");
        }
        Err(e) => sh.note_failure(&mut st, &client_err(e)),
    }
}

fn run_shipper(sh: Arc<Shared>) {
    loop {
        let mut st = sh.lock();
        loop {
            if st.stop {
                return;
            }
            let due = st.retry_at.is_none_or(|t| Instant::now() >= t);
            if !st.outbox.is_empty() && due {
                break;
            }
            let heat_at = st
                .heat_at
                .filter(|_| st.outbox.is_empty() && !st.fenced && !st.heat_off);
            if due && heat_at.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let wait = st
                .retry_at
                .or(heat_at)
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            st = sh
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let Some(front) = st.outbox.front().map(|q| q.path.clone()) else {
            // Nothing to ship: the heat map is due.
            ship_heat(&sh, st);
            continue;
        };
        if st.fenced {
            drop(st);
            let r = ship_to_branch(&sh, &front);
            let mut st = sh.lock();
            match r {
                Ok(branch) => {
                    if let Err(e) = std::fs::remove_file(&front) {
                        tracing::warn!(path = %front.display(), error = %e, "could not remove shipped outbox entry");
                    }
                    st.outbox.pop_front();
                    st.branch = Some(branch);
                }
                Err(e) => {
                    tracing::warn!(volume = %sh.volume, error = %e, "fenced: could not ship to the branch volume yet; retrying");
                    st.retry_at = Some(Instant::now() + st.backoff);
                    st.backoff = (st.backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
            sh.cv.notify_all();
            continue;
        }
        let Some(mut c) = sh.take_client(&mut st) else {
            continue;
        };
        drop(st);
        let r = ship_entry(&sh, &mut c, &front);
        let mut st = sh.lock();
        match r {
            Ok(info) => {
                tracing::info!(volume = %sh.volume, snapshot = info.snap_id, "outbox snapshot committed on the data plane");
                if let Err(e) = std::fs::remove_file(&front) {
                    tracing::warn!(path = %front.display(), error = %e, "could not remove shipped outbox entry");
                }
                st.outbox.pop_front();
                sh.note_commit(&mut st, &info);
                st.client = Some(c);
            }
            Err(e)
                if e.kind() == ErrorKind::Corrupt
                    || (e.kind() == ErrorKind::Mismatch
                        && !is_fence(&e)
                        && !is_identity_refusal(&e)) =>
            {
                // Never shippable: set it and the entries chained onto it aside; the next
                // flush ships a full base (see the module doc).
                let mut moved = Vec::new();
                for q in st.outbox.drain(..) {
                    let to = q.path.with_extension("delta.corrupt");
                    match std::fs::rename(&q.path, &to) {
                        Ok(()) => moved.push(q.snap),
                        Err(re) => {
                            tracing::error!(path = %q.path.display(), error = %re, "could not set the outbox entry aside")
                        }
                    }
                }
                st.check_head = true;
                let msg = format!(
                    "{e}; outbox snapshots {moved:?} were set aside as *.delta.corrupt (kept for inspection) and will not reach the data plane; the next flush ships a base snapshot (the blocks that differ from the data plane's head) so the chain goes on"
                );
                tracing::error!(volume = %sh.volume, "{msg}");
                st.last_error = Some(msg);
                st.client = None;
            }
            Err(e) => sh.note_failure(&mut st, &e),
        }
        sh.cv.notify_all();
    }
}
