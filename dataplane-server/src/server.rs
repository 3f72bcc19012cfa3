//! The thread-per-core server.
//!
//! * One shard per thread, each a tokio-uring runtime with its own `SO_REUSEPORT` listener on
//!   the same address; the kernel spreads connections over them.
//! * Each volume is owned by exactly one shard ([`shard_of`], a hash of its name). A shard
//!   accepts, runs the handshake (hello, challenge, auth) and then hands the socket to the
//!   owner shard through that shard's bounded channel (the tokio channel wakes its runtime);
//!   the owner serves every request of the connection. Volumes are `Rc`s in the owner's map:
//!   there is no lock shared between threads on the data path.
//! * Generations (fencing): a connection carries the generation it authenticated with (raised
//!   by its own `NewGeneration`). Reads always work; writes (begin, put, commit, delete) of a
//!   generation older than the volume's are refused with `StaleGeneration`.
//! * Clones: a clone's shard reads its source's immutable files itself (a read-only
//!   [`store`] source view opened from the source's manifest and segments on disk), so a clone
//!   read never waits on the source's owner shard. What must be coordinated across shards is
//!   only "a clone depends on snapshot S of volume V": the [`CloneRegistry`], one small mutex
//!   shared by all shards, taken by clone creation, snapshot deletion and start-up only (never
//!   on the data path). Deleting a snapshot a clone depends on is refused with `InUse`.
//! * A malformed frame, a protocol violation or any error during an upload's stream gets an
//!   `Error` reply and closes that connection only; request errors (bad parent, unknown
//!   snapshot, ...) get an `Error` reply and the connection goes on.
//! * Hostile clients are bounded by [`ConnLimits`]: at most `max_connections` sockets open in
//!   the whole process (one more is answered "busy" and closed at once, never queued); at most
//!   `max_handshakes` unauthenticated ones (when full, the oldest unfinished handshake is
//!   dropped for the newcomer, so idle sockets cannot lock out a client that answers at once);
//!   a short deadline for the whole handshake, an idle deadline between requests, a deadline
//!   for the rest of a frame once its length prefix arrived, and one for each reply written (a
//!   client that stops reading is dropped). Handshake frames are capped at
//!   [`HANDSHAKE_FRAME_MAX_BYTES`], so an unauthenticated socket costs a few KiB at most.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::{
    append_frame, decode_header, finish_header, header_len_from_prefix, valid_volume_name, wire,
    FrameError, CHECKSUM_BLOCKS_MAX, ERROR_MESSAGE_MAX_BYTES, FRAME_EXTENTS_MAX,
    FRAME_LEN_PREFIX_BYTES, FRAME_PAYLOAD_MAX_BYTES, HEAT_BYTES_MAX, LIST_PAGE_SNAPSHOTS_MAX,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth;
use crate::credentials::{Access, Authorized, CredentialStore};
use crate::store::format::VolumeId;
use crate::store::{
    self, BeginOutcome, PlanSrc, StoreError, StoreErrorKind, Upload, Volume, VolumeSummary,
};
use crate::tls::{ServerTlsFiles, ServerTransport, UringTls};

/// Default time a new connection has to finish hello / challenge / auth.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// A snapshot read within this long (a recovery or a clone hydrating from it, a verify, an
/// export) is kept by retention. (An explicit DeleteSnapshot is the operator's call.)
pub const READ_PROTECT: Duration = Duration::from_secs(15 * 60);

/// What applying a retention policy did (or would do).
#[derive(Debug, Default)]
struct RetentionOutcome {
    dry_run: bool,
    deleted: Vec<u64>,
    /// Kept snapshots with why, in chain order.
    kept: Vec<(u64, String)>,
}
/// Default time an authenticated connection may stay silent between requests.
pub const IDLE_TIMEOUT_MS: u64 = 600_000;
/// Default time to receive the rest of a frame once its length prefix arrived, and to write
/// one reply frame.
pub const FRAME_TIMEOUT_MS: u64 = 60_000;
/// Default cap on connections open at once in the whole process.
pub const MAX_CONNECTIONS: usize = 4096;
/// Default cap on connections in the handshake at once in the whole process.
pub const MAX_HANDSHAKES: usize = 512;
/// Cap on a handshake frame's header (`Hello` and `Auth` are ~150 bytes).
pub const HANDSHAKE_FRAME_MAX_BYTES: usize = 1024;
/// At most one "connection limit reached" log line per shard per this many ms.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 1_000;
/// Depth of each shard's hand-off queue.
pub const HANDOFF_QUEUE_MAX: usize = 1024;
/// Listen backlog of each shard's socket.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub threads: usize,
    /// The admin token (`--auth-token-file`); empty: none, only credentials authenticate.
    pub auth_token: Vec<u8>,
    /// The per-volume credentials file (`--credentials-file`), if any.
    pub credentials: Option<PathBuf>,
    /// TLS on every connection (`--tls-cert`, `--tls-key`, `--tls-client-ca`), re-read when
    /// the files change; `None`: plain TCP, which [`start`] allows only on a loopback address
    /// or with `insecure`.
    pub tls: Option<Arc<ServerTlsFiles>>,
    /// Serve plain TCP on a non-loopback address (`--insecure`): logged at start.
    pub insecure: bool,
    /// Connection caps and deadlines (`ConnLimits::default()` for a production server).
    pub limits: ConnLimits,
}

/// Caps and deadlines that bound what a client, hostile or slow, can hold of the server.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnLimits {
    /// Most connections open at once in the whole process (handshaking and authenticated);
    /// one more is answered "busy" and closed at once.
    #[arg(long, default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most connections still in the handshake at once in the whole process (split evenly
    /// over the threads); when full, the oldest unfinished handshake is dropped.
    #[arg(long, default_value_t = MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Deadline for hello, challenge and auth of a new connection, in ms.
    #[arg(long, default_value_t = HANDSHAKE_TIMEOUT_MS)]
    pub handshake_timeout_ms: u64,
    /// How long an authenticated connection may stay silent between requests, in ms.
    #[arg(long, default_value_t = IDLE_TIMEOUT_MS)]
    pub idle_timeout_ms: u64,
    /// Deadline for the rest of a frame once its length prefix arrived, and for writing one
    /// reply frame, in ms.
    #[arg(long, default_value_t = FRAME_TIMEOUT_MS)]
    pub frame_timeout_ms: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_handshakes: MAX_HANDSHAKES,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
            frame_timeout_ms: FRAME_TIMEOUT_MS,
        }
    }
}

/// File descriptors kept free for segment files, manifests and the listeners.
pub const FDS_RESERVED: u64 = 256;

impl ConnLimits {
    /// Warns when the open-files limit cannot hold `max_connections` sockets: past it, accept
    /// fails (EMFILE) and new connections wait in the kernel's backlog instead of being
    /// answered "busy".
    fn warn_if_fds_short(&self) {
        let Some(soft) = open_files_soft_limit() else {
            return;
        };
        let need = self.max_connections as u64 + FDS_RESERVED;
        if soft < need {
            tracing::warn!(
                open_files_limit = soft,
                max_connections = self.max_connections,
                "the open-files limit is below --max-connections + {FDS_RESERVED}: raise it \
                 (ulimit -n {need}, or LimitNOFILE= in the service unit) or lower \
                 --max-connections"
            );
        }
    }

    fn check(&self) -> Result<(), ServerError> {
        let bad = |what: &str| Err(ServerError::Config(format!("{what} must be at least 1")));
        if self.max_connections == 0 {
            return bad("--max-connections");
        }
        if self.max_handshakes == 0 {
            return bad("--max-handshakes");
        }
        if self.handshake_timeout_ms == 0 {
            return bad("--handshake-timeout-ms");
        }
        if self.idle_timeout_ms == 0 {
            return bad("--idle-timeout-ms");
        }
        if self.frame_timeout_ms == 0 {
            return bad("--frame-timeout-ms");
        }
        Ok(())
    }
}

/// Server start-up errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("{ctx}: {source}")]
    Io { ctx: String, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

fn io_err(ctx: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let ctx = ctx.into();
    move |source| ServerError::Io { ctx, source }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn open_files_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files            1024                 524288               files"
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The shard owning `volume` among `shards`: FNV-1a of the name.
pub fn shard_of(volume: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in volume.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// A running server: its address and its threads.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Arc<ServerStats>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Counters of the whole server (updated once per connection, once per `PutExtents` frame and
/// once per commit, relaxed; read by the metrics endpoint at scrape time).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections that completed the handshake.
    pub authenticated: std::sync::atomic::AtomicU64,
    /// Of those, connections handed to another shard (the volume's owner).
    pub handed_off: std::sync::atomic::AtomicU64,
    /// Connections open right now (handshaking and authenticated).
    pub open: std::sync::atomic::AtomicUsize,
    /// Connections closed at accept because `max_connections` were open.
    pub refused_busy: std::sync::atomic::AtomicU64,
    /// Unfinished handshakes dropped to make room for a newer connection.
    pub handshakes_evicted: std::sync::atomic::AtomicU64,
    /// Connections closed by a deadline (handshake, idle, frame or write).
    pub timed_out: std::sync::atomic::AtomicU64,
    /// Handshakes refused: authentication failed (wrong secret, unknown or revoked
    /// credential, no role on the volume) or the TLS handshake did not complete.
    pub auth_refused: std::sync::atomic::AtomicU64,
    /// Requests refused because the connection's credential lacks the role (`Forbidden`).
    pub forbidden: std::sync::atomic::AtomicU64,
    /// Extent data bytes received in `PutExtents` payloads (of uploads committed or not).
    pub ingest_bytes: std::sync::atomic::AtomicU64,
    /// Snapshots committed (durable).
    pub snapshots_committed: std::sync::atomic::AtomicU64,
    /// Heat maps stored (durable; `PutHeat`'s last piece).
    pub heat_maps_stored: std::sync::atomic::AtomicU64,
    /// Volumes the server holds now (loaded by a shard: all of a local store's at start-up;
    /// on a shared object store, those whose lease this server took).
    pub volumes: std::sync::atomic::AtomicU64,
}

/// One of the `max_connections` slots, given back when the connection ends.
#[derive(Debug)]
struct ConnSlot {
    stats: Arc<ServerStats>,
}

impl ConnSlot {
    fn try_acquire(stats: &Arc<ServerStats>, max: usize) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering;
        stats
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnSlot {
            stats: Arc::clone(stats),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The counters, shared (the metrics endpoint reads them at scrape time).
    pub fn stats_shared(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Stops accepting, drops every connection and waits for the threads.
    pub fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Waits for the threads (they run until shutdown).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An authenticated connection on its way to the owner shard.
#[derive(Debug)]
struct Handoff {
    stream: std::net::TcpStream,
    /// The TLS session the handshake ran in (the owner shard goes on with it).
    tls: Option<rustls::ServerConnection>,
    volume: String,
    /// The generation the client authenticated with.
    generation: u64,
    /// The client's volume id, when it sent one.
    volume_id: Option<VolumeId>,
    /// What the connection's credential may do.
    auth: Authorized,
    peer: SocketAddr,
    _slot: ConnSlot,
}

/// Which clones depend on which snapshots, across all shards (see the module doc).
#[derive(Debug, Default)]
pub struct CloneRegistry {
    inner: std::sync::Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    /// (source volume, source snapshot) → the clones depending on it.
    deps: HashMap<(String, u64), std::collections::BTreeSet<String>>,
    /// Snapshots being deleted right now: a clone of them is refused until that ends.
    deleting: std::collections::HashSet<(String, u64)>,
    /// Volumes being deleted right now: a clone of any of their snapshots is refused.
    deleting_volumes: std::collections::HashSet<String>,
}

impl CloneRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        // The lock guards plain maps updated in one step: a panic cannot leave them torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `clone` depends on `source@snap`; refused while that snapshot is being
    /// deleted.
    fn add(&self, source: &str, snap: u64, clone: &str) -> Result<(), ReqError> {
        let mut r = self.lock();
        let key = (source.to_string(), snap);
        if r.deleting.contains(&key) || r.deleting_volumes.contains(source) {
            return Err(ReqError::new(
                wire::ErrorCode::NoSuchSnapshot,
                format!("snapshot {snap} of volume {source} is being deleted"),
            ));
        }
        r.deps.entry(key).or_default().insert(clone.to_string());
        Ok(())
    }

    fn remove(&self, source: &str, snap: u64, clone: &str) {
        let mut r = self.lock();
        let key = (source.to_string(), snap);
        if let Some(set) = r.deps.get_mut(&key) {
            set.remove(clone);
            if set.is_empty() {
                r.deps.remove(&key);
            }
        }
    }

    /// Marks `volume@snap` as being deleted, unless a clone depends on it.
    fn begin_delete<'a>(&'a self, volume: &str, snap: u64) -> Result<DeleteGuard<'a>, ReqError> {
        let mut r = self.lock();
        let key = (volume.to_string(), snap);
        if let Some(clones) = r.deps.get(&key).filter(|c| !c.is_empty()) {
            let names: Vec<&str> = clones.iter().map(String::as_str).collect();
            return Err(ReqError::new(
                wire::ErrorCode::InUse,
                format!(
                    "snapshot {snap} of volume {volume} is the source of clone(s) {}: it cannot be deleted while they exist",
                    names.join(", ")
                ),
            ));
        }
        if !r.deleting.insert(key.clone()) {
            return Err(ReqError::new(
                wire::ErrorCode::UploadInProgress,
                format!("snapshot {snap} of volume {volume} is already being deleted"),
            ));
        }
        Ok(DeleteGuard { reg: self, key })
    }
}

impl CloneRegistry {
    /// A clone depending on `volume@snap`, if any.
    fn clones_of(&self, volume: &str, snap: u64) -> Option<String> {
        let r = self.lock();
        r.deps
            .get(&(volume.to_string(), snap))
            .and_then(|c| c.iter().next().cloned())
    }

    /// Marks `volume` as being deleted, unless a clone depends on one of its snapshots
    /// (`Err` names it and the snapshot). While marked, no clone of it can start.
    fn begin_delete_volume<'a>(
        &'a self,
        volume: &str,
    ) -> Result<VolumeDeleteGuard<'a>, (String, u64)> {
        let mut r = self.lock();
        let dep = r
            .deps
            .iter()
            .find(|((src, _), clones)| src == volume && !clones.is_empty())
            .and_then(|((_, snap), clones)| clones.iter().next().map(|c| (c.clone(), *snap)));
        if let Some(d) = dep {
            return Err(d);
        }
        r.deleting_volumes.insert(volume.to_string());
        Ok(VolumeDeleteGuard {
            reg: self,
            volume: volume.to_string(),
        })
    }
}

/// Ends a volume deletion's mark in the [`CloneRegistry`] when dropped.
struct VolumeDeleteGuard<'a> {
    reg: &'a CloneRegistry,
    volume: String,
}

impl Drop for VolumeDeleteGuard<'_> {
    fn drop(&mut self) {
        self.reg.lock().deleting_volumes.remove(&self.volume);
    }
}

/// Ends a deletion's mark in the [`CloneRegistry`] when dropped.
struct DeleteGuard<'a> {
    reg: &'a CloneRegistry,
    key: (String, u64),
}

impl Drop for DeleteGuard<'_> {
    fn drop(&mut self) {
        self.reg.lock().deleting.remove(&self.key);
    }
}

/// Binds the listeners, loads the volumes (each shard its own) and starts the shards.
pub fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    start_with_backend(cfg, &store::backend::BackendConfig::Local)
}

/// [`start`] with the store on the backend `backend` names (the data dir then holds only the
/// lock file for an object store).
pub fn start_with_backend(
    cfg: ServerConfig,
    backend: &store::backend::BackendConfig,
) -> Result<ServerHandle, ServerError> {
    if cfg.threads == 0 {
        return Err(ServerError::Config("--threads must be at least 1".into()));
    }
    if cfg.auth_token.is_empty() && cfg.credentials.is_none() {
        return Err(ServerError::Config(
            "no way to authenticate: give an admin token (--auth-token-file), a credentials \
             file (--credentials-file), or both"
                .into(),
        ));
    }
    match (&cfg.tls, cfg.listen.ip().is_loopback(), cfg.insecure) {
        (Some(tls), _, _) => {
            tls.watch().map_err(io_err("spawn the TLS reloader"))?;
            tracing::info!(
                client_certificates = tls.requires_client_cert(),
                "TLS on every connection"
            )
        }
        (None, true, _) => {}
        (None, false, true) => tracing::warn!(
            listen = %cfg.listen,
            "serving PLAIN TCP on a non-loopback address (--insecure): snapshots cross the \
             network unencrypted and unauthenticated after the handshake"
        ),
        (None, false, false) => {
            return Err(ServerError::Config(format!(
                "refusing plain TCP on {} (not a loopback address): give --tls-cert and \
                 --tls-key (`deltavol-dataplane tls init` makes them), or --insecure to serve \
                 unencrypted anyway",
                cfg.listen
            )))
        }
    }
    let credentials = match &cfg.credentials {
        Some(path) => {
            let store =
                CredentialStore::open(path).map_err(|e| ServerError::Config(e.to_string()))?;
            store
                .watch()
                .map_err(io_err("spawn the credentials watcher"))?;
            Some(store)
        }
        None => None,
    };
    cfg.limits.check()?;
    cfg.limits.warn_if_fds_short();
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(io_err(format!("create {}", cfg.data_dir.display())))?;
    let volumes_dir = store::backend::Backend::open(backend, &cfg.data_dir)?;
    let lock_path = cfg.data_dir.join("LOCK");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("open {}", lock_path.display())))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            ServerError::Config(format!(
                "data dir {} is in use by another deltavol-dataplane ({e})",
                cfg.data_dir.display()
            ))
        })?;

    let mut listeners = Vec::with_capacity(cfg.threads);
    let mut addr = cfg.listen;
    for _ in 0..cfg.threads {
        let l = bind_reuseport(addr)?;
        addr = l.local_addr().map_err(io_err("local_addr"))?;
        listeners.push(l);
    }

    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut senders = Vec::with_capacity(cfg.threads);
    let mut receivers = Vec::with_capacity(cfg.threads);
    for _ in 0..cfg.threads {
        let (tx, rx) = tokio::sync::mpsc::channel::<Handoff>(HANDOFF_QUEUE_MAX);
        senders.push(tx);
        receivers.push(rx);
    }
    let senders = Arc::new(senders);
    let token: Arc<[u8]> = Arc::from(cfg.auth_token.clone());
    let stats = Arc::new(ServerStats::default());
    let registry = Arc::new(CloneRegistry::default());
    // Every shard loads its volumes (and registers its clones' dependencies) before any shard
    // serves a request, so no deletion can miss a dependency recorded on another shard.
    let loaded = Arc::new(std::sync::Barrier::new(cfg.threads));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::with_capacity(cfg.threads);
    for (id, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
        let ctx = ShardInit {
            stats: Arc::clone(&stats),
            id,
            nshards: cfg.threads,
            volumes_dir: volumes_dir.clone(),
            token: Arc::clone(&token),
            credentials: credentials.clone(),
            tls: cfg.tls.clone(),
            senders: Arc::clone(&senders),
            shutdown: shutdown_rx.clone(),
            registry: Arc::clone(&registry),
            loaded: Arc::clone(&loaded),
            limits: cfg.limits.clone(),
        };
        let ready = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("dp-shard-{id}"))
            .spawn(move || {
                tokio_uring::start(async move {
                    if let Err(e) = shard_main(ctx, listener, rx, ready).await {
                        tracing::error!(shard = id, error = %e, "shard stopped");
                    }
                });
            })
            .map_err(io_err("spawn shard thread"))?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..cfg.threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = shutdown.send(true);
                return Err(ServerError::Config(format!("shard failed to start: {e}")));
            }
            Err(_) => {
                let _ = shutdown.send(true);
                return Err(ServerError::Config(
                    "a shard thread died during start-up".into(),
                ));
            }
        }
    }
    tracing::info!(
        addr = %addr,
        threads = cfg.threads,
        data_dir = %cfg.data_dir.display(),
        limits = ?cfg.limits,
        "data plane listening"
    );
    Ok(ServerHandle {
        stats,
        local_addr: addr,
        shutdown,
        threads,
        _lock: lock,
    })
}

fn bind_reuseport(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(io_err("socket"))?;
    s.set_reuse_address(true).map_err(io_err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(io_err("SO_REUSEPORT"))?;
    s.bind(&addr.into())
        .map_err(io_err(format!("bind {addr}")))?;
    s.listen(LISTEN_BACKLOG)
        .map_err(io_err(format!("listen {addr}")))?;
    s.set_nonblocking(true).map_err(io_err("set_nonblocking"))?;
    Ok(s.into())
}

struct ShardInit {
    id: usize,
    nshards: usize,
    volumes_dir: store::backend::Backend,
    token: Arc<[u8]>,
    credentials: Option<Arc<CredentialStore>>,
    tls: Option<Arc<ServerTlsFiles>>,
    senders: Arc<Vec<tokio::sync::mpsc::Sender<Handoff>>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    stats: Arc<ServerStats>,
    registry: Arc<CloneRegistry>,
    loaded: Arc<std::sync::Barrier>,
    limits: ConnLimits,
}

/// One shard's state: the volumes it owns. Lives on its thread only.
struct Shard {
    id: usize,
    nshards: usize,
    volumes_dir: store::backend::Backend,
    /// The admin token (empty: none).
    token: Arc<[u8]>,
    /// Per-volume credentials, when the server has a credentials file.
    credentials: Option<Arc<CredentialStore>>,
    /// TLS on every connection, when configured.
    tls: Option<Arc<ServerTlsFiles>>,
    senders: Arc<Vec<tokio::sync::mpsc::Sender<Handoff>>>,
    stats: Arc<ServerStats>,
    volumes: RefCell<HashMap<String, Rc<Volume>>>,
    /// Volumes whose manifest could not be read at start-up, with the reason: refused, never
    /// replaced by a new empty volume.
    broken: RefCell<HashMap<String, String>>,
    create_lock: tokio::sync::Mutex<()>,
    registry: Arc<CloneRegistry>,
    limits: ConnLimits,
    /// This shard's share of `max_handshakes`.
    handshakes_max: usize,
    /// Unfinished handshakes of this shard, oldest first (by accept sequence).
    handshakes: RefCell<std::collections::BTreeMap<u64, tokio::task::AbortHandle>>,
    accept_seq: std::cell::Cell<u64>,
    /// Connections refused since the last "connection limit" log line, and when it was.
    refused_unlogged: std::cell::Cell<u64>,
    refusal_logged_at: std::cell::Cell<Option<std::time::Instant>>,
}

impl Shard {
    /// Installs `v` as volume `name` (replacing its old state, if any), counted in
    /// [`ServerStats::volumes`].
    fn insert_volume(&self, name: String, v: Rc<Volume>) {
        if self.volumes.borrow_mut().insert(name, v).is_none() {
            self.stats
                .volumes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Forgets volume `name`, if held.
    fn remove_volume(&self, name: &str) {
        if self.volumes.borrow_mut().remove(name).is_some() {
            self.stats
                .volumes
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Answers "busy" (best effort, never waiting) and closes a connection over the cap.
    fn refuse_busy(&self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        self.stats
            .refused_busy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Out::new();
        out.error(
            wire::ErrorCode::Internal,
            &format!(
                "server busy: {} connections open (--max-connections); try again later",
                self.limits.max_connections
            ),
        );
        let _ = stream.try_write(&out.buf);
        drop(stream);
        self.refused_unlogged.set(self.refused_unlogged.get() + 1);
        let now = std::time::Instant::now();
        let due = self.refusal_logged_at.get().is_none_or(|t| {
            now.duration_since(t) >= Duration::from_millis(REFUSAL_LOG_INTERVAL_MS)
        });
        if due {
            tracing::warn!(
                shard = self.id,
                peer = %peer,
                refused = self.refused_unlogged.get(),
                max_connections = self.limits.max_connections,
                "connection limit reached: closing new connections at once"
            );
            self.refused_unlogged.set(0);
            self.refusal_logged_at.set(Some(now));
        }
    }

    /// Makes room for one more handshake: drops the oldest unfinished one when full.
    fn make_room_for_handshake(&self) {
        let oldest = {
            let mut hs = self.handshakes.borrow_mut();
            if hs.len() < self.handshakes_max {
                return;
            }
            hs.pop_first()
        };
        if let Some((_, h)) = oldest {
            h.abort();
            self.stats
                .handshakes_evicted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Removes a handshake from its shard's table when it ends, however it ends.
struct HandshakeEntry {
    shard: Rc<Shard>,
    seq: u64,
}

impl Drop for HandshakeEntry {
    fn drop(&mut self) {
        self.shard.handshakes.borrow_mut().remove(&self.seq);
    }
}

async fn shard_main(
    init: ShardInit,
    listener: std::net::TcpListener,
    mut rx: tokio::sync::mpsc::Receiver<Handoff>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), ServerError> {
    let shard = Rc::new(Shard {
        id: init.id,
        nshards: init.nshards,
        volumes_dir: init.volumes_dir,
        token: init.token,
        credentials: init.credentials,
        tls: init.tls,
        senders: init.senders,
        stats: init.stats,
        volumes: RefCell::new(HashMap::new()),
        broken: RefCell::new(HashMap::new()),
        create_lock: tokio::sync::Mutex::new(()),
        registry: init.registry,
        handshakes_max: init.limits.max_handshakes.div_ceil(init.nshards).max(1),
        limits: init.limits,
        handshakes: RefCell::new(std::collections::BTreeMap::new()),
        accept_seq: std::cell::Cell::new(0),
        refused_unlogged: std::cell::Cell::new(0),
        refusal_logged_at: std::cell::Cell::new(None),
    });
    let mut shutdown = init.shutdown;
    let loaded = load_volumes(&shard).await;
    init.loaded.wait();
    let listener = match loaded.and_then(|()| {
        tokio::net::TcpListener::from_std(listener).map_err(io_err("register listener"))
    }) {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e);
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = ConnSlot::try_acquire(&shard.stats, shard.limits.max_connections) else {
                        shard.refuse_busy(stream, peer);
                        continue;
                    };
                    shard.make_room_for_handshake();
                    let seq = shard.accept_seq.get();
                    shard.accept_seq.set(seq + 1);
                    let entry = HandshakeEntry { shard: Rc::clone(&shard), seq };
                    let task = tokio_uring::spawn(async move { handshake(entry, stream, peer, slot).await });
                    // The task has not run yet (this thread is busy here): it finds its entry.
                    shard.handshakes.borrow_mut().insert(seq, task.abort_handle());
                }
                Err(e) => {
                    tracing::warn!(shard = shard.id, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(h) = rx.recv() => {
                let shard = Rc::clone(&shard);
                tokio_uring::spawn(async move { serve(shard, h).await });
            }
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(shard = shard.id, "shard shutting down");
    Ok(())
}

async fn load_volumes(shard: &Shard) -> Result<(), ServerError> {
    if shard.volumes_dir.loads_lazily() {
        // Several servers share the store: a volume is loaded when a connection claims its
        // lease (`claim_volume`), not at start-up.
        return Ok(());
    }
    if let (store::backend::Backend::Local { volumes_dir }, 0) = (&shard.volumes_dir, shard.id) {
        store::remove_deleted_leftovers(volumes_dir);
    }
    for name in shard.volumes_dir.list_volumes().await? {
        if !valid_volume_name(&name) || shard_of(&name, shard.nshards) != shard.id {
            continue;
        }
        match Volume::load(&shard.volumes_dir, &name).await {
            Ok(Some(v)) => {
                if let Some(c) = v.clone_source() {
                    shard
                        .registry
                        .lock()
                        .deps
                        .entry((c.volume, c.snap_id))
                        .or_default()
                        .insert(name.clone());
                }
                // Work a crash or a restart interrupted (dead bytes, retired objects).
                v.kick_compaction();
                shard.insert_volume(name, v);
            }
            Ok(None) => {
                tracing::warn!(volume = %name, "volume directory without a manifest: ignored")
            }
            Err(e) => {
                // Serving an empty volume in its place would hide the loss: refuse it.
                tracing::error!(volume = %name, error = %e, "volume cannot be loaded: refused until repaired");
                shard.broken.borrow_mut().insert(name, e.to_string());
            }
        }
    }
    Ok(())
}

/// A request error: the code and message sent back, and whether the connection closes.
#[derive(Debug)]
struct ReqError {
    code: wire::ErrorCode,
    msg: String,
    fatal: bool,
    /// Writing to the peer failed: no error reply is attempted.
    write_failed: bool,
}

impl ReqError {
    fn new(code: wire::ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            fatal: false,
            write_failed: false,
        }
    }

    fn fatal(code: wire::ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            fatal: true,
            write_failed: false,
        }
    }
}

impl From<StoreError> for ReqError {
    fn from(e: StoreError) -> Self {
        use wire::ErrorCode as C;
        let code = match e.kind() {
            StoreErrorKind::Io => C::Io,
            StoreErrorKind::Corrupt | StoreErrorKind::Damaged | StoreErrorKind::Unsupported => {
                C::Damaged
            }
            StoreErrorKind::WrongVolume => C::WrongVolume,
            StoreErrorKind::NoSuchVolume => C::NoSuchVolume,
            StoreErrorKind::VolumeMismatch => C::VolumeMismatch,
            StoreErrorKind::BadParent => C::BadParent,
            StoreErrorKind::BadSnapshotId => C::BadSnapshotId,
            StoreErrorKind::UploadInProgress => C::UploadInProgress,
            StoreErrorKind::NoUpload => C::NoUpload,
            StoreErrorKind::OutOfRange => C::OutOfRange,
            StoreErrorKind::Checksum => C::Checksum,
            StoreErrorKind::CommitMismatch => C::CommitMismatch,
            StoreErrorKind::NoSuchSnapshot => C::NoSuchSnapshot,
            StoreErrorKind::DeleteHead => C::DeleteHead,
            StoreErrorKind::StaleGeneration => C::StaleGeneration,
            StoreErrorKind::TooLarge => C::TooLarge,
            StoreErrorKind::InUse => C::InUse,
            StoreErrorKind::IdentityMismatch => C::IdentityMismatch,
            _ => C::Malformed,
        };
        if e.kind() == StoreErrorKind::Io {
            tracing::error!(error = %e, "storage I/O error");
        }
        ReqError::new(code, e.to_string())
    }
}

fn frame_error(e: FrameError) -> ReqError {
    let code = match e {
        FrameError::HeaderTooLarge { .. } | FrameError::PayloadTooLarge { .. } => {
            wire::ErrorCode::TooLarge
        }
        FrameError::UnknownMessage(_) => wire::ErrorCode::Protocol,
        _ => wire::ErrorCode::Malformed,
    };
    ReqError::fatal(code, format!("refused frame: {e}"))
}

/// Builds frames into a reused buffer.
struct Out {
    fbb: FlatBufferBuilder<'static>,
    buf: Vec<u8>,
}

impl Out {
    fn new() -> Self {
        Self {
            fbb: FlatBufferBuilder::with_capacity(1024),
            buf: Vec::with_capacity(4096),
        }
    }

    fn finish(
        &mut self,
        ty: wire::Message,
        body: deltavol_schemas::flatbuffers::WIPOffset<
            deltavol_schemas::flatbuffers::UnionWIPOffset,
        >,
        payload: &[u8],
    ) {
        self.buf.clear();
        match finish_header(&mut self.fbb, ty, body, payload.len()) {
            Ok(h) => {
                append_frame(&mut self.buf, h, payload).expect("caps checked by finish_header");
            }
            Err(e) => {
                // Only reachable by a bug in the server's own sizing: answer an error instead.
                tracing::error!(error = %e, "reply frame over its caps");
                self.fbb.reset();
                let msg = self
                    .fbb
                    .create_string("internal error: reply over the frame caps");
                let body = wire::Error::create(
                    &mut self.fbb,
                    &wire::ErrorArgs {
                        code: wire::ErrorCode::Internal,
                        message: Some(msg),
                    },
                );
                let h = finish_header(
                    &mut self.fbb,
                    wire::Message::Error,
                    body.as_union_value(),
                    0,
                )
                .expect("small frame");
                append_frame(&mut self.buf, h, &[]).expect("small frame");
            }
        }
        self.fbb.reset();
    }

    fn error(&mut self, code: wire::ErrorCode, msg: &str) {
        let mut cut = msg.len().min(ERROR_MESSAGE_MAX_BYTES);
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        let m = self.fbb.create_string(&msg[..cut]);
        let body = wire::Error::create(
            &mut self.fbb,
            &wire::ErrorArgs {
                code,
                message: Some(m),
            },
        );
        self.finish(wire::Message::Error, body.as_union_value(), &[]);
    }

    fn volume_info_body(
        &mut self,
        name: &str,
        v: Option<VolumeSummary>,
    ) -> deltavol_schemas::flatbuffers::WIPOffset<wire::VolumeInfo<'static>> {
        let name = self.fbb.create_string(name);
        let v = v.as_ref();
        let clone_volume = v
            .and_then(|v| v.clone_source.as_ref())
            .map(|c| self.fbb.create_string(&c.0));
        let volume_id = v.map(|v| self.fbb.create_vector(&v.volume_id));
        let retention = v
            .map(|v| v.retention)
            .filter(|r| *r != store::format::RetentionCounts::default())
            .map(|r| {
                wire::Retention::create(&mut self.fbb, &crate::retention::Policy::from(r).to_wire())
            });
        wire::VolumeInfo::create(
            &mut self.fbb,
            &wire::VolumeInfoArgs {
                name: Some(name),
                exists: v.is_some(),
                size_bytes: v.map_or(0, |v| v.size_bytes),
                block_size: v.map_or(0, |v| v.block_size),
                latest_snap_id: v.map_or(0, |v| v.latest_snap_id),
                generation: v.map_or(0, |v| v.generation),
                snapshot_count: v.map_or(0, |v| v.snapshot_count),
                clone_source_volume: clone_volume,
                clone_source_snap_id: v.and_then(|v| v.clone_source.as_ref()).map_or(0, |c| c.1),
                volume_id,
                latest_commit_ms: v.map_or(0, |v| v.latest_commit_ms),
                created_ms: v.map_or(0, |v| v.created_ms),
                latest_cut_ms: v.map_or(0, |v| v.latest_cut_ms),
                retention,
            },
        )
    }

    /// `usage`: (own, shared) bytes, see [`Volume::usage`].
    fn snapshot_info(
        &mut self,
        s: &store::format::SnapEntry,
        usage: Option<(u64, u64)>,
    ) -> deltavol_schemas::flatbuffers::WIPOffset<wire::SnapshotInfo<'static>> {
        let (own_bytes, shared_bytes) = usage.unwrap_or((0, s.bytes));
        let label = (!s.label.is_empty()).then(|| self.fbb.create_string(&s.label));
        wire::SnapshotInfo::create(
            &mut self.fbb,
            &wire::SnapshotInfoArgs {
                snap_id: s.snap_id,
                parent_id: s.parent_id,
                commit_time_ms: s.commit_time_ms,
                bytes: s.bytes,
                extent_count: s.extent_count,
                volume_size: s.volume_size,
                generation: s.generation,
                cut_time_ms: s.cut_time_ms,
                pinned: s.pinned,
                label,
                own_bytes,
                shared_bytes,
            },
        )
    }
}

// ---------------------------------------------------------------------------------------
// Handshake (tokio TcpStream on the accepting shard)
// ---------------------------------------------------------------------------------------

async fn read_frame_tokio(
    stream: &mut (impl AsyncRead + Unpin),
    hdr: &mut Vec<u8>,
) -> Result<(), ReqError> {
    let mut prefix = [0u8; FRAME_LEN_PREFIX_BYTES];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| ReqError::fatal(wire::ErrorCode::Malformed, format!("reading frame: {e}")))?;
    let len = header_len_from_prefix(prefix).map_err(frame_error)?;
    if len > HANDSHAKE_FRAME_MAX_BYTES {
        return Err(ReqError::fatal(
            wire::ErrorCode::TooLarge,
            format!(
                "handshake frame header of {len} bytes exceeds the cap of {HANDSHAKE_FRAME_MAX_BYTES}"
            ),
        ));
    }
    hdr.resize(len, 0);
    stream.read_exact(hdr).await.map_err(|e| {
        ReqError::fatal(wire::ErrorCode::Malformed, format!("truncated frame: {e}"))
    })?;
    let f = decode_header(hdr).map_err(frame_error)?;
    if f.payload_len() != 0 {
        return Err(ReqError::fatal(
            wire::ErrorCode::Protocol,
            "handshake frames carry no payload",
        ));
    }
    Ok(())
}

/// What a handshake established: the volume name, the client's generation and volume id,
/// and the credential's rights.
type Authenticated = (String, u64, Option<VolumeId>, Authorized);

/// Hello → Challenge → Auth. Returns the authenticated volume name, generation and id.
async fn run_handshake(
    shard: &Shard,
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    out: &mut Out,
) -> Result<Authenticated, ReqError> {
    let mut hdr = Vec::new();
    read_frame_tokio(stream, &mut hdr).await?;
    let f = decode_header(&hdr).map_err(frame_error)?;
    let hello = f.body_as_hello().ok_or_else(|| {
        ReqError::fatal(
            wire::ErrorCode::Protocol,
            "expected Hello as the first frame",
        )
    })?;
    if hello.protocol_version() != PROTOCOL_VERSION {
        return Err(ReqError::fatal(
            wire::ErrorCode::Protocol,
            format!(
                "protocol version {} not supported (server speaks {PROTOCOL_VERSION})",
                hello.protocol_version()
            ),
        ));
    }
    let nonce = auth::nonce()
        .map_err(|e| ReqError::fatal(wire::ErrorCode::Internal, format!("nonce: {e}")))?;
    let n = out.fbb.create_vector(&nonce);
    let body = wire::Challenge::create(
        &mut out.fbb,
        &wire::ChallengeArgs {
            nonce: Some(n),
            protocol_version: PROTOCOL_VERSION,
        },
    );
    out.finish(wire::Message::Challenge, body.as_union_value(), &[]);
    // flush: a TLS stream holds what it was given until then.
    let written = match stream.write_all(&out.buf).await {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    written.map_err(|e| ReqError::fatal(wire::ErrorCode::Io, format!("write: {e}")))?;

    read_frame_tokio(stream, &mut hdr).await?;
    let f = decode_header(&hdr).map_err(frame_error)?;
    let a = f.body_as_auth().ok_or_else(|| {
        ReqError::fatal(
            wire::ErrorCode::Protocol,
            "expected Auth after the Challenge",
        )
    })?;
    let volume = a.volume().unwrap_or_default();
    if !valid_volume_name(volume) {
        return Err(ReqError::fatal(
            wire::ErrorCode::Unauthorized,
            "invalid volume name (1-64 bytes of [A-Za-z0-9._-], not starting with '.')",
        ));
    }
    let unauthorized = |msg: String| ReqError::fatal(wire::ErrorCode::Unauthorized, msg);
    let authorized = match a.credential_id() {
        Some(id) => {
            let store = shard.credentials.as_ref().ok_or_else(|| {
                unauthorized(
                    "this data plane has no per-volume credentials (no --credentials-file): \
                     authenticate with its admin token"
                        .into(),
                )
            })?;
            // A credential issued or revoked a moment ago counts from this connection on.
            store.refresh();
            let proof = a.proof().map(|p| p.bytes()).unwrap_or_default();
            store
                .authenticate(id, &nonce, volume, proof)
                .map_err(|r| unauthorized(r.0))?
        }
        None => {
            if shard.token.is_empty() {
                return Err(unauthorized(
                    "this data plane takes per-volume credentials only (it has no admin \
                     token): give the client a credential from `deltavol-dataplane \
                     credentials issue`"
                        .into(),
                ));
            }
            let mac = a.mac().map(|m| m.bytes()).unwrap_or_default();
            if !auth::verify(&shard.token, &nonce, volume, mac) {
                return Err(unauthorized("authentication failed: wrong token".into()));
            }
            Authorized::admin_token()
        }
    };
    let volume_id = deltavol_schemas::volume_id_field(a.volume_id()).map_err(|len| {
        ReqError::fatal(
            wire::ErrorCode::Malformed,
            format!("volume id of {len} bytes (16 expected)"),
        )
    })?;
    Ok((volume.to_string(), a.generation(), volume_id, authorized))
}

/// A connection during its handshake: plain TCP, or TLS once that handshake is done.
enum HandshakeStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl AsyncRead for HandshakeStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            HandshakeStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            HandshakeStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HandshakeStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            HandshakeStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            HandshakeStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            HandshakeStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            HandshakeStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            HandshakeStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            HandshakeStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

async fn handshake(
    entry: HandshakeEntry,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
) {
    let shard = Rc::clone(&entry.shard);
    let mut out = Out::new();
    let deadline = Duration::from_millis(shard.limits.handshake_timeout_ms);
    let started = tokio::time::Instant::now();
    // TLS first (inside the same deadline as the rest of the handshake).
    let mut stream = match &shard.tls {
        None => HandshakeStream::Plain(stream),
        Some(tls) => match tokio::time::timeout(deadline, tls.current().accept(stream)).await {
            Ok(Ok(s)) => HandshakeStream::Tls(Box::new(s)),
            Ok(Err(e)) => {
                shard
                    .stats
                    .auth_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(peer = %peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                shard
                    .stats
                    .timed_out
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(peer = %peer, "TLS handshake not finished in time");
                return;
            }
        },
    };
    let left = deadline.saturating_sub(started.elapsed());
    let res = tokio::time::timeout(left, run_handshake(&shard, &mut stream, &mut out))
        .await
        .unwrap_or_else(|_| {
            shard
                .stats
                .timed_out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ReqError::fatal(
                wire::ErrorCode::Protocol,
                format!(
                    "handshake not finished within {} ms",
                    shard.limits.handshake_timeout_ms
                ),
            ))
        });
    // No longer an unfinished handshake: it cannot be evicted from here on.
    drop(entry);
    let (volume, generation, volume_id, auth) = match res {
        Ok(v) => v,
        Err(e) => {
            if e.code == wire::ErrorCode::Unauthorized {
                shard
                    .stats
                    .auth_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer = %peer, error = %e.msg, "authentication refused");
            } else {
                tracing::info!(peer = %peer, code = ?e.code, error = %e.msg, "handshake refused");
            }
            out.error(e.code, &e.msg);
            // The error frame is small; a peer that does not take it is not waited for long.
            let write = async {
                stream.write_all(&out.buf).await?;
                stream.flush().await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(deadline, write).await;
            return;
        }
    };
    let (stream, tls) = match stream {
        HandshakeStream::Plain(s) => (s, None),
        HandshakeStream::Tls(s) => {
            let (s, conn) = s.into_inner();
            (s, Some(conn))
        }
    };
    let std_stream = match stream
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "could not detach the socket");
            return;
        }
    };
    let owner = shard_of(&volume, shard.nshards);
    shard
        .stats
        .authenticated
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if owner != shard.id {
        shard
            .stats
            .handed_off
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let h = Handoff {
        stream: std_stream,
        tls,
        volume,
        generation,
        volume_id,
        auth,
        peer,
        _slot: slot,
    };
    if owner == shard.id {
        serve(shard, h).await;
    } else if shard.senders[owner].send(h).await.is_err() {
        tracing::warn!(peer = %peer, owner, "owner shard is gone");
    }
}

// ---------------------------------------------------------------------------------------
// Serving an authenticated connection (tokio-uring TcpStream on the owner shard)
// ---------------------------------------------------------------------------------------

struct Conn {
    shard: Rc<Shard>,
    volume_name: String,
    /// The generation this connection writes as (its Auth's, or its own NewGeneration's).
    generation: u64,
    /// The volume id the client authenticated with (`None`: a client that reads by name).
    /// Every request that changes the volume checks it against the volume's id.
    volume_id: Option<VolumeId>,
    /// What the connection's credential may do (re-read when the credentials change).
    auth: Authorized,
    /// `auth`'s role on this connection's volume, worked out once per change of `auth` (not
    /// per request: the grants' patterns are matched here, off the per-frame path).
    access: Access,
    /// The credentials' generation `auth` was read at.
    auth_seen: u64,
    stream: ServerTransport,
    hdr: Vec<u8>,
    payload: Vec<u8>,
    out: Out,
    upload: Option<Upload>,
    rec_buf: Vec<u8>,
    read_payload: Vec<u8>,
    read_extents: Vec<wire::Extent>,
    heat_upload: Option<HeatUpload>,
}

enum Next {
    Frame,
    Closed,
}

/// A `PutHeat` frame's fields.
#[derive(Debug, Clone, Copy)]
struct HeatPiece {
    region_blocks: u32,
    total_bytes: u32,
    offset: u32,
}

/// A heat map being received in pieces (at most `HEAT_BYTES_MAX`, checked against the volume
/// before the buffer is sized).
struct HeatUpload {
    region_blocks: u32,
    total_bytes: u32,
    heat: Vec<u8>,
}

impl Conn {
    fn volume(&self) -> Option<Rc<Volume>> {
        self.shard.volumes.borrow().get(&self.volume_name).cloned()
    }

    /// Refuses a connection whose volume id is not the volume's (a reused name). A client
    /// without an id (reads by name) passes; so does a volume that does not exist (yet).
    fn check_identity(&self) -> Result<(), ReqError> {
        if let (Some(id), Some(v)) = (&self.volume_id, self.volume()) {
            if v.volume_id() != *id {
                // The summary (and its message) only for a refusal.
                v.summary().check_identity(&self.volume_name, id)?;
            }
        }
        Ok(())
    }

    /// Re-reads the connection's credential when the credentials changed since: a revoked
    /// (or removed) credential closes the connection.
    fn recheck_credential(&mut self) -> Result<(), ReqError> {
        let (Some(store), Some(id)) = (&self.shard.credentials, &self.auth.id) else {
            return Ok(());
        };
        let seen = store.generation();
        if seen == self.auth_seen {
            return Ok(());
        }
        match store.current(id) {
            Some(a) => {
                self.access = a.access(&self.volume_name);
                self.auth = a;
                self.auth_seen = seen;
                Ok(())
            }
            None => Err(ReqError::fatal(
                wire::ErrorCode::Unauthorized,
                format!("credential {id} was revoked: the connection is closed"),
            )),
        }
    }

    /// Refuses the request (`Forbidden`) unless the credential has `level` on this volume.
    fn need(&self, level: Access, what: &str) -> Result<(), ReqError> {
        let have = self.access;
        if have >= level {
            return Ok(());
        }
        self.shard
            .stats
            .forbidden
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(ReqError::new(
            wire::ErrorCode::Forbidden,
            format!(
                "{} may not {what} on volume {} (its role there: {}; this needs {})",
                self.auth.who(),
                self.volume_name,
                have.name(),
                level.name()
            ),
        ))
    }

    /// The volume, for a request that changes it: it must exist and be this client's.
    fn require_own_volume(&self) -> Result<Rc<Volume>, ReqError> {
        let v = self.require_volume()?;
        self.check_identity()?;
        Ok(v)
    }

    fn require_volume(&self) -> Result<Rc<Volume>, ReqError> {
        self.volume().ok_or_else(|| {
            ReqError::new(
                wire::ErrorCode::NoSuchVolume,
                format!(
                    "volume {} does not exist: create it first",
                    self.volume_name
                ),
            )
        })
    }

    /// Writes the frame in `out.buf`; a peer that does not take it within the frame deadline
    /// (it stopped reading) gets `TimedOut`.
    async fn send(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.out.buf);
        let deadline = Duration::from_millis(self.shard.limits.frame_timeout_ms);
        match tokio::time::timeout(deadline, self.stream.write_all(buf)).await {
            Ok((res, buf)) => {
                self.out.buf = buf;
                res
            }
            Err(_) => {
                // The buffer went with the cancelled write; the connection is closed next.
                self.count_timeout();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "peer did not take a reply within {} ms",
                        self.shard.limits.frame_timeout_ms
                    ),
                ))
            }
        }
    }

    fn count_timeout(&self) {
        self.shard
            .stats
            .timed_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads the next frame into `hdr` / `payload`.
    async fn read_frame(&mut self) -> Result<Next, ReqError> {
        let hdr = std::mem::take(&mut self.hdr);
        let idle = Duration::from_millis(self.shard.limits.idle_timeout_ms);
        let (res, hdr) =
            match tokio::time::timeout(idle, self.stream.read_exact(hdr, FRAME_LEN_PREFIX_BYTES))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    self.count_timeout();
                    return Err(ReqError::fatal(
                        wire::ErrorCode::Protocol,
                        format!(
                            "idle timeout: no request within {} ms",
                            self.shard.limits.idle_timeout_ms
                        ),
                    ));
                }
            };
        self.hdr = hdr;
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.hdr.is_empty() => {
                return Ok(Next::Closed)
            }
            Err(e) => {
                return Err(ReqError::fatal(
                    wire::ErrorCode::Malformed,
                    format!("reading frame: {e}"),
                ))
            }
        }
        let prefix = [self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]];
        let len = header_len_from_prefix(prefix).map_err(frame_error)?;
        // One deadline for the header and the payload together: a client trickling bytes holds
        // the connection for at most this long per frame.
        let frame_timeout_ms = self.shard.limits.frame_timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(frame_timeout_ms);
        let timed_out = |c: &Conn| {
            c.count_timeout();
            ReqError::fatal(
                wire::ErrorCode::Protocol,
                format!("frame not received within {frame_timeout_ms} ms of its length prefix"),
            )
        };
        let hdr = std::mem::take(&mut self.hdr);
        let (res, hdr) =
            match tokio::time::timeout_at(deadline, self.stream.read_exact(hdr, len)).await {
                Ok(r) => r,
                Err(_) => return Err(timed_out(self)),
            };
        self.hdr = hdr;
        res.map_err(|e| {
            ReqError::fatal(wire::ErrorCode::Malformed, format!("reading frame: {e}"))
        })?;
        let payload_len = decode_header(&self.hdr).map_err(frame_error)?.payload_len() as usize;
        let payload = std::mem::take(&mut self.payload);
        let (res, payload) =
            match tokio::time::timeout_at(deadline, self.stream.read_exact(payload, payload_len))
                .await
            {
                Ok(r) => r,
                Err(_) => return Err(timed_out(self)),
            };
        self.payload = payload;
        res.map_err(|e| {
            ReqError::fatal(
                wire::ErrorCode::Malformed,
                format!("reading frame payload: {e}"),
            )
        })?;
        Ok(Next::Frame)
    }

    async fn handle(&mut self) -> Result<(), ReqError> {
        let hdr = std::mem::take(&mut self.hdr);
        let res = self.dispatch(&hdr).await;
        self.hdr = hdr;
        res
    }

    async fn dispatch(&mut self, hdr: &[u8]) -> Result<(), ReqError> {
        let f = decode_header(hdr).map_err(frame_error)?;
        let ty = f.body_type();
        if ty != wire::Message::PutExtents
            && ty != wire::Message::PutHeat
            && !self.payload.is_empty()
        {
            return Err(ReqError::fatal(
                wire::ErrorCode::Protocol,
                "only PutExtents and PutHeat frames carry a payload",
            ));
        }
        self.recheck_credential()?;
        if let Some(m) = f.body_as_put_extents() {
            self.need(Access::Write, "ship snapshots")?;
            return self.put(m).await;
        }
        if let Some(m) = f.body_as_create_volume() {
            self.need(Access::Write, "create the volume")?;
            return self.create_volume(m.size_bytes(), m.block_size()).await;
        }
        if f.body_as_get_volume_info().is_some() {
            self.need(Access::Read, "describe the volume")?;
            self.reply_volume_info();
            return self.send_reply().await;
        }
        if let Some(m) = f.body_as_begin_snapshot() {
            self.need(Access::Write, "ship snapshots")?;
            return self
                .begin(
                    m.snap_id(),
                    m.parent_id(),
                    m.volume_size(),
                    m.generation(),
                    m.cut_time_ms(),
                )
                .await;
        }
        if let Some(m) = f.body_as_commit() {
            self.need(Access::Write, "ship snapshots")?;
            return self
                .commit(m.snap_id(), m.extent_count(), m.total_bytes())
                .await;
        }
        if let Some(m) = f.body_as_list_snapshots() {
            self.need(Access::Read, "list snapshots")?;
            return self.list(m.after_snap_id(), m.max_count()).await;
        }
        if let Some(m) = f.body_as_read_extents() {
            self.need(Access::Read, "read blocks")?;
            return self.read(m.snap_id(), m.lba(), m.nblocks()).await;
        }
        if let Some(m) = f.body_as_read_checksums() {
            self.need(Access::Read, "read checksums")?;
            return self.read_checksums(m.snap_id(), m.lba(), m.nblocks()).await;
        }
        if f.body_as_new_generation().is_some() {
            self.need(
                Access::Admin,
                "start a new generation (recover: it fences the running writer)",
            )?;
            return self.new_generation().await;
        }
        if let Some(m) = f.body_as_clone_volume() {
            let source = m.source_volume().unwrap_or_default().to_string();
            self.need(Access::Write, "create the volume as a clone")?;
            if self.auth.access(&source) < Access::Read {
                self.shard
                    .stats
                    .forbidden
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ReqError::new(
                    wire::ErrorCode::Forbidden,
                    format!(
                        "{} may not read volume {source:?}, the clone's source",
                        self.auth.who()
                    ),
                ));
            }
            return self.clone_volume(&source, m.source_snap_id()).await;
        }
        if let Some(m) = f.body_as_delete_volume() {
            self.need(Access::Admin, "delete the volume")?;
            let id = deltavol_schemas::volume_id_field(m.volume_id()).map_err(|len| {
                ReqError::new(
                    wire::ErrorCode::Malformed,
                    format!("volume id of {len} bytes (16 expected)"),
                )
            })?;
            let id = id.ok_or_else(|| {
                ReqError::new(
                    wire::ErrorCode::Malformed,
                    "DeleteVolume needs the volume's id (as a confirmation)",
                )
            })?;
            return self.delete_volume(id).await;
        }
        if let Some(m) = f.body_as_set_retention() {
            self.need(Access::Write, "set the retention policy")?;
            let r = m.policy();
            let policy = r
                .map(crate::retention::Policy::from_wire)
                .unwrap_or_default();
            let v = self.require_own_volume()?;
            v.set_retention(policy.into()).await?;
            self.apply_retention(false).await?;
            self.reply_volume_info();
            return self.send_reply().await;
        }
        if let Some(m) = f.body_as_pin_snapshot() {
            self.need(Access::Write, "pin snapshots")?;
            let v = self.require_own_volume()?;
            let label = m.label();
            let e = v.pin(m.snap_id(), m.pinned(), label).await?;
            let info = self.out.snapshot_info(&e, v.usage(e.snap_id));
            let body =
                wire::Pinned::create(&mut self.out.fbb, &wire::PinnedArgs { info: Some(info) });
            self.out
                .finish(wire::Message::Pinned, body.as_union_value(), &[]);
            return self.send_reply().await;
        }
        if let Some(m) = f.body_as_prune() {
            self.need(Access::Write, "prune snapshots")?;
            let o = self.apply_retention(m.dry_run()).await?;
            let deleted = self.out.fbb.create_vector(&o.deleted);
            let kept_ids: Vec<u64> = o.kept.iter().map(|k| k.0).collect();
            let kept = self.out.fbb.create_vector(&kept_ids);
            let why: Vec<_> = o
                .kept
                .iter()
                .map(|k| self.out.fbb.create_string(&k.1))
                .collect();
            let kept_for = self.out.fbb.create_vector(&why);
            let body = wire::Pruned::create(
                &mut self.out.fbb,
                &wire::PrunedArgs {
                    deleted: Some(deleted),
                    kept: Some(kept),
                    kept_for: Some(kept_for),
                    dry_run: o.dry_run,
                },
            );
            self.out
                .finish(wire::Message::Pruned, body.as_union_value(), &[]);
            return self.send_reply().await;
        }
        if let Some(m) = f.body_as_put_heat() {
            // Any refusal drops the map being received: nothing of it is stored.
            let piece = HeatPiece {
                region_blocks: m.region_blocks(),
                total_bytes: m.total_bytes(),
                offset: m.offset(),
            };
            let res = self.put_heat(piece).await;
            if res.is_err() {
                self.heat_upload = None;
            }
            return res;
        }
        if f.body_as_get_heat().is_some() {
            self.need(Access::Read, "read the heat map")?;
            return self.get_heat().await;
        }
        if let Some(m) = f.body_as_delete_snapshot() {
            self.need(Access::Write, "delete snapshots")?;
            let v = self.require_own_volume()?;
            v.check_generation(self.generation)?;
            let shard = Rc::clone(&self.shard);
            let _deleting = shard
                .registry
                .begin_delete(&self.volume_name, m.snap_id())?;
            let merged_into = v.delete_snapshot(m.snap_id()).await?;
            v.kick_compaction();
            let body = wire::Deleted::create(
                &mut self.out.fbb,
                &wire::DeletedArgs {
                    snap_id: m.snap_id(),
                    merged_into,
                },
            );
            self.out
                .finish(wire::Message::Deleted, body.as_union_value(), &[]);
            return self.send_reply().await;
        }
        Err(ReqError::fatal(
            wire::ErrorCode::Protocol,
            format!(
                "unexpected message {} on an authenticated connection",
                ty.variant_name().unwrap_or("?")
            ),
        ))
    }

    /// One piece of a `PutHeat`: checked against the volume and the pieces before it; the
    /// last one stores the map.
    async fn put_heat(&mut self, p: HeatPiece) -> Result<(), ReqError> {
        use wire::ErrorCode as C;
        self.need(Access::Write, "store the heat map")?;
        let v = self.require_own_volume()?;
        v.check_generation(self.generation)?;
        let s = v.summary();
        let volume_blocks = s.size_bytes / u64::from(s.block_size.max(1));
        store::check_heat(volume_blocks, p.region_blocks, u64::from(p.total_bytes))?;
        let piece_len = self.payload.len() as u64;
        let end = u64::from(p.offset) + piece_len;
        if end > u64::from(p.total_bytes) {
            return Err(ReqError::new(
                C::Malformed,
                format!(
                    "heat map piece of {piece_len} bytes at offset {} is past its total of {} bytes",
                    p.offset, p.total_bytes
                ),
            ));
        }
        if piece_len == 0 && end < u64::from(p.total_bytes) {
            return Err(ReqError::new(
                C::Malformed,
                "heat map piece without bytes before the end of the map",
            ));
        }
        if p.offset == 0 {
            self.heat_upload = Some(HeatUpload {
                region_blocks: p.region_blocks,
                total_bytes: p.total_bytes,
                // Grown by what arrives, never sized by what a header announces.
                heat: Vec::new(),
            });
        }
        let Some(up) = self.heat_upload.as_mut() else {
            return Err(ReqError::new(
                C::Malformed,
                format!(
                    "heat map piece at offset {} without the pieces before it (start at 0)",
                    p.offset
                ),
            ));
        };
        if up.region_blocks != p.region_blocks
            || up.total_bytes != p.total_bytes
            || up.heat.len() as u64 != u64::from(p.offset)
        {
            return Err(ReqError::new(
                C::Malformed,
                format!(
                    "heat map piece at offset {} (region_blocks {}, total {}) does not follow \
                     the {} bytes received (region_blocks {}, total {}): start again at 0",
                    p.offset,
                    p.region_blocks,
                    p.total_bytes,
                    up.heat.len(),
                    up.region_blocks,
                    up.total_bytes
                ),
            ));
        }
        up.heat.reserve_exact(self.payload.len());
        up.heat.extend_from_slice(&self.payload);
        let received_bytes = up.heat.len() as u32;
        let stored = end == u64::from(p.total_bytes);
        if stored {
            let up = self.heat_upload.take().expect("checked above");
            v.put_heat(up.region_blocks, &up.heat).await?;
            self.shard
                .stats
                .heat_maps_stored
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let body = wire::HeatStored::create(
            &mut self.out.fbb,
            &wire::HeatStoredArgs {
                received_bytes,
                stored,
            },
        );
        self.out
            .finish(wire::Message::HeatStored, body.as_union_value(), &[]);
        self.send_reply().await
    }

    /// Answers `GetHeat`: the stored map in `Heat` frames of at most a frame payload each.
    async fn get_heat(&mut self) -> Result<(), ReqError> {
        let v = self.require_volume()?;
        let stored = v.get_heat().await?;
        let (region_blocks, heat) = match stored {
            Some((r, h)) if h.len() <= HEAT_BYTES_MAX => (r, Some(h)),
            Some(_) => {
                return Err(ReqError::new(
                    wire::ErrorCode::Damaged,
                    "stored heat map over its cap",
                ))
            }
            None => (0, None),
        };
        let present = heat.is_some();
        let heat = heat.unwrap_or_default();
        let total_bytes = heat.len() as u32;
        let mut offset = 0usize;
        loop {
            let end = (offset + FRAME_PAYLOAD_MAX_BYTES).min(heat.len());
            let last = end == heat.len();
            let body = wire::Heat::create(
                &mut self.out.fbb,
                &wire::HeatArgs {
                    region_blocks,
                    present,
                    total_bytes,
                    offset: offset as u32,
                    last,
                },
            );
            self.out.finish(
                wire::Message::Heat,
                body.as_union_value(),
                &heat[offset..end],
            );
            self.send_reply().await?;
            if last {
                return Ok(());
            }
            offset = end;
        }
    }

    async fn send_reply(&mut self) -> Result<(), ReqError> {
        self.send().await.map_err(|e| {
            let mut r = ReqError::fatal(wire::ErrorCode::Io, format!("write: {e}"));
            r.write_failed = true;
            r
        })
    }

    fn reply_volume_info(&mut self) {
        let summary = self.volume().map(|v| v.summary());
        let name = self.volume_name.clone();
        let body = self.out.volume_info_body(&name, summary);
        self.out
            .finish(wire::Message::VolumeInfo, body.as_union_value(), &[]);
    }

    /// Deletes the authenticated volume (whose id must be `id`), refused while a clone
    /// depends on any of its snapshots.
    async fn delete_volume(&mut self, id: VolumeId) -> Result<(), ReqError> {
        use wire::ErrorCode as C;
        let shard = Rc::clone(&self.shard);
        let _guard = shard.create_lock.lock().await;
        let v = self.require_volume()?;
        let held = v.volume_id();
        if held != id {
            return Err(ReqError::new(
                C::IdentityMismatch,
                format!(
                    "volume {} has id {}, not {}: nothing deleted",
                    self.volume_name,
                    store::volume_id_hex(&held),
                    store::volume_id_hex(&id)
                ),
            ));
        }
        let in_use = |(c, snap): (String, u64)| {
            ReqError::new(
                C::InUse,
                format!(
                    "volume {} cannot be deleted: clone {c} depends on its snapshot {snap} (delete the clone first)",
                    self.volume_name
                ),
            )
        };
        let _deleting = shard
            .registry
            .begin_delete_volume(&self.volume_name)
            .map_err(in_use)?;
        // Clones loaded by no server yet (or by another server of a shared store).
        let clone = store::find_any_clone_of(&shard.volumes_dir, &self.volume_name, &id).await?;
        if let Some(c) = clone {
            return Err(in_use(c));
        }
        v.delete_volume(&id).await?;
        shard.remove_volume(&self.volume_name);
        if let Some((src, snap)) = v.summary().clone_source {
            shard.registry.remove(&src, snap, &self.volume_name);
        }
        self.reply_volume_info();
        self.send_reply().await
    }

    async fn create_volume(&mut self, size_bytes: u64, block_size: u32) -> Result<(), ReqError> {
        if let Some(v) = self.volume() {
            self.check_identity()?;
            store::check_same_geometry(&v.summary(), size_bytes, block_size)?;
        } else {
            let shard = Rc::clone(&self.shard);
            let _guard = shard.create_lock.lock().await;
            let existing = self.volume();
            match existing {
                Some(v) => {
                    self.check_identity()?;
                    store::check_same_geometry(&v.summary(), size_bytes, block_size)?
                }
                None => {
                    let v = Volume::create(
                        &shard.volumes_dir,
                        &self.volume_name,
                        size_bytes,
                        block_size,
                        None,
                        self.volume_id,
                    )
                    .await?;
                    shard.insert_volume(self.volume_name.clone(), v);
                }
            }
        }
        self.reply_volume_info();
        self.send_reply().await
    }

    async fn new_generation(&mut self) -> Result<(), ReqError> {
        let v = self.require_own_volume()?;
        self.generation = v.new_generation(self.generation).await?;
        self.reply_volume_info();
        self.send_reply().await
    }

    async fn clone_volume(&mut self, source: &str, source_snap_id: u64) -> Result<(), ReqError> {
        use wire::ErrorCode as C;
        if !valid_volume_name(source) {
            return Err(ReqError::new(
                C::NoSuchVolume,
                format!("invalid clone source volume name {source:?}"),
            ));
        }
        if source == self.volume_name {
            return Err(ReqError::new(
                C::VolumeExists,
                format!("volume {source} cannot be a clone of itself"),
            ));
        }
        let shard = Rc::clone(&self.shard);
        let _guard = shard.create_lock.lock().await;
        if self.volume().is_some() || shard.broken.borrow().contains_key(&self.volume_name) {
            return Err(ReqError::new(
                C::VolumeExists,
                format!(
                    "volume {} already exists: a clone needs a new name",
                    self.volume_name
                ),
            ));
        }
        // Pin the source snapshot first, then check it exists: a deletion either sees the pin
        // or has already removed the snapshot from the manifest read below.
        shard
            .registry
            .add(source, source_snap_id, &self.volume_name)?;
        let res = self.create_clone(source, source_snap_id).await;
        if res.is_err() {
            shard
                .registry
                .remove(source, source_snap_id, &self.volume_name);
        }
        res?;
        self.reply_volume_info();
        self.send_reply().await
    }

    async fn create_clone(&mut self, source: &str, source_snap_id: u64) -> Result<(), ReqError> {
        use wire::ErrorCode as C;
        let m = store::read_manifest(&self.shard.volumes_dir, source)
            .await?
            .ok_or_else(|| {
                ReqError::new(
                    C::NoSuchVolume,
                    format!("clone source volume {source} does not exist"),
                )
            })?;
        if source_snap_id == 0 || !m.snapshots.iter().any(|s| s.snap_id == source_snap_id) {
            return Err(ReqError::new(
                C::NoSuchSnapshot,
                format!("clone source volume {source} has no snapshot {source_snap_id}"),
            ));
        }
        let v = Volume::create(
            &self.shard.volumes_dir,
            &self.volume_name,
            m.size_bytes,
            m.block_size,
            Some(store::format::CloneSourceData {
                volume: source.to_string(),
                volume_id: m.volume_id,
                snap_id: source_snap_id,
            }),
            self.volume_id,
        )
        .await?;
        self.shard.insert_volume(self.volume_name.clone(), v);
        Ok(())
    }

    async fn begin(
        &mut self,
        snap_id: u64,
        parent_id: u64,
        volume_size: u64,
        generation: u64,
        cut_time_ms: u64,
    ) -> Result<(), ReqError> {
        if let Some(u) = &self.upload {
            return Err(ReqError::new(
                wire::ErrorCode::UploadInProgress,
                format!(
                    "snapshot {} is still being uploaded on this connection",
                    u.snap_id()
                ),
            ));
        }
        let v = self.require_own_volume()?;
        // A writer is as old as the older of its Auth and its BeginSnapshot.
        let generation = generation.min(self.generation);
        match v
            .begin(snap_id, parent_id, volume_size, generation, cut_time_ms)
            .await?
        {
            BeginOutcome::Started(u) => {
                self.upload = Some(u);
                let body = wire::BeginOk::create(&mut self.out.fbb, &wire::BeginOkArgs { snap_id });
                self.out
                    .finish(wire::Message::BeginOk, body.as_union_value(), &[]);
            }
            BeginOutcome::AlreadyCommitted(s) => {
                let usage = self.volume().and_then(|v| v.usage(s.snap_id));
                let info = self.out.snapshot_info(&s, usage);
                let body = wire::AlreadyCommitted::create(
                    &mut self.out.fbb,
                    &wire::AlreadyCommittedArgs { info: Some(info) },
                );
                self.out
                    .finish(wire::Message::AlreadyCommitted, body.as_union_value(), &[]);
            }
        }
        self.send_reply().await
    }

    /// Puts are not answered; any error abandons the upload and closes the connection.
    async fn put(&mut self, m: wire::PutExtents<'_>) -> Result<(), ReqError> {
        let Some(mut upload) = self.upload.take() else {
            return Err(ReqError::fatal(
                wire::ErrorCode::NoUpload,
                "PutExtents without a BeginSnapshot",
            ));
        };
        if upload.snap_id() != m.snap_id() {
            return Err(ReqError::fatal(
                wire::ErrorCode::NoUpload,
                format!(
                    "PutExtents for snapshot {} while snapshot {} is being uploaded",
                    m.snap_id(),
                    upload.snap_id()
                ),
            ));
        }
        let Some(extents) = m.extents() else {
            return Err(ReqError::fatal(
                wire::ErrorCode::Malformed,
                "PutExtents without extents",
            ));
        };
        let payload = std::mem::take(&mut self.payload);
        self.shard
            .stats
            .ingest_bytes
            .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let (res, payload) = upload.put(extents.iter(), payload).await;
        self.payload = payload;
        match res {
            Ok(()) => {
                self.upload = Some(upload);
                Ok(())
            }
            Err(e) => {
                let mut r = ReqError::from(e);
                r.fatal = true;
                Err(r)
            }
        }
    }

    async fn commit(
        &mut self,
        snap_id: u64,
        extent_count: u64,
        total_bytes: u64,
    ) -> Result<(), ReqError> {
        let upload = match self.upload.take() {
            Some(u) if u.snap_id() == snap_id => u,
            Some(u) => {
                let msg = format!(
                    "Commit of snapshot {snap_id} while snapshot {} is being uploaded",
                    u.snap_id()
                );
                return Err(ReqError::fatal(wire::ErrorCode::NoUpload, msg));
            }
            None => {
                return Err(ReqError::new(
                    wire::ErrorCode::NoUpload,
                    format!("Commit of snapshot {snap_id} without a BeginSnapshot"),
                ))
            }
        };
        let entry = upload.commit(extent_count, total_bytes).await?;
        self.shard
            .stats
            .snapshots_committed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let usage = self.volume().and_then(|v| v.usage(entry.snap_id));
        let info = self.out.snapshot_info(&entry, usage);
        let body =
            wire::Committed::create(&mut self.out.fbb, &wire::CommittedArgs { info: Some(info) });
        self.out
            .finish(wire::Message::Committed, body.as_union_value(), &[]);
        self.send_reply().await?;
        // The volume's retention policy, once the commit is answered (the snapshot is durable
        // whatever happens here); a failure is logged and retried at the next commit.
        if let Err(e) = self.apply_retention(false).await {
            tracing::warn!(volume = %self.volume_name, error = %e.msg, "retention after a commit");
        }
        Ok(())
    }

    /// Applies the volume's retention policy (`dry_run`: decides only). Kept whatever the
    /// policy: the head, pinned snapshots, clone sources (this server's registry, and the
    /// store's check when servers share it) and snapshots read within [`READ_PROTECT`].
    async fn apply_retention(&mut self, dry_run: bool) -> Result<RetentionOutcome, ReqError> {
        let out = self.select_and_delete(dry_run).await?;
        // Compaction gives the deleted snapshots' space back; it also restarts the deletion
        // of retired objects if the task that waited for them ended on an error.
        if !dry_run {
            if let Some(v) = self.volume() {
                if !out.deleted.is_empty() || v.has_retired() {
                    v.kick_compaction();
                }
            }
        }
        Ok(out)
    }

    /// [`Self::apply_retention`] without the compaction that follows.
    async fn select_and_delete(&mut self, dry_run: bool) -> Result<RetentionOutcome, ReqError> {
        use crate::retention::{select, Candidate};
        let v = self.require_own_volume()?;
        let policy = crate::retention::Policy::from(v.retention());
        if policy.keeps_all() && !dry_run {
            return Ok(RetentionOutcome::default());
        }
        let chain = v.chain();
        let shard = Rc::clone(&self.shard);
        let candidates: Vec<Candidate> = chain
            .iter()
            .map(|s| Candidate {
                snap_id: s.snap_id,
                time_ms: if s.cut_time_ms != 0 {
                    s.cut_time_ms
                } else {
                    s.commit_time_ms
                },
                pinned: s.pinned,
                protected: shard
                    .registry
                    .clones_of(&self.volume_name, s.snap_id)
                    .map(|c| format!("source of clone {c}"))
                    .or_else(|| {
                        v.read_within(s.snap_id, READ_PROTECT)
                            .then(|| "being read".to_string())
                    }),
            })
            .collect();
        let decisions = select(&policy, &candidates);
        let mut out = RetentionOutcome {
            dry_run,
            ..Default::default()
        };
        let mut doomed = Vec::new();
        for d in &decisions {
            if d.keep() {
                let why: Vec<String> = d.kept_for.iter().map(|r| r.to_string()).collect();
                out.kept.push((d.snap_id, why.join(",")));
            } else {
                doomed.push(d.snap_id);
            }
        }
        if dry_run || doomed.is_empty() {
            out.deleted = doomed;
            return Ok(out);
        }
        // Marked as being deleted: no clone of them can start meanwhile.
        let mut guards = Vec::with_capacity(doomed.len());
        let mut ids = Vec::with_capacity(doomed.len());
        for id in doomed {
            match shard.registry.begin_delete(&self.volume_name, id) {
                Ok(g) => {
                    guards.push(g);
                    ids.push(id);
                }
                Err(e) => out.kept.push((id, e.msg)),
            }
        }
        out.kept.sort_by_key(|k| k.0);
        let merged = v.delete_snapshots(&ids).await?;
        drop(guards);
        out.deleted = merged.into_iter().map(|m| m.0).collect();
        if !out.deleted.is_empty() {
            tracing::info!(volume = %self.volume_name, policy = %policy, deleted = out.deleted.len(), "retention applied");
        }
        Ok(out)
    }

    async fn list(&mut self, after: u64, max: u32) -> Result<(), ReqError> {
        let v = self.require_volume()?;
        let max = if max == 0 {
            LIST_PAGE_SNAPSHOTS_MAX
        } else {
            max.min(LIST_PAGE_SNAPSHOTS_MAX)
        };
        let (page, more) = v.list(after, max as usize);
        let mut infos = Vec::with_capacity(page.len());
        for s in &page {
            let usage = v.usage(s.snap_id);
            infos.push(self.out.snapshot_info(s, usage));
        }
        let snaps = self.out.fbb.create_vector(&infos);
        let body = wire::SnapshotList::create(
            &mut self.out.fbb,
            &wire::SnapshotListArgs {
                snapshots: Some(snaps),
                more,
            },
        );
        self.out
            .finish(wire::Message::SnapshotList, body.as_union_value(), &[]);
        self.send_reply().await
    }

    async fn flush_read_frame(&mut self, snap_id: u64, last: bool) -> Result<(), ReqError> {
        let ex = self.out.fbb.create_vector(&self.read_extents);
        let body = wire::ReadData::create(
            &mut self.out.fbb,
            &wire::ReadDataArgs {
                snap_id,
                extents: Some(ex),
                last,
            },
        );
        let payload = std::mem::take(&mut self.read_payload);
        self.out
            .finish(wire::Message::ReadData, body.as_union_value(), &payload);
        self.read_payload = payload;
        self.read_payload.clear();
        self.read_extents.clear();
        self.send_reply().await
    }

    /// Reads record `rec` of `seg` into `rec_buf`, unless `cached` says it is there already
    /// (by segment identity: a clone's segment and its source's may carry the same id).
    async fn load_record(
        &mut self,
        seg: &Rc<store::Segment>,
        rec: u32,
        block_size: u32,
        cached: &mut Option<(*const store::Segment, u32)>,
    ) -> Result<(), ReqError> {
        if *cached != Some((Rc::as_ptr(seg), rec)) {
            let buf = std::mem::take(&mut self.rec_buf);
            let (res, buf) = seg.read_record(rec, block_size, buf).await;
            self.rec_buf = buf;
            res?;
            *cached = Some((Rc::as_ptr(seg), rec));
        }
        Ok(())
    }

    /// The crc32c of each block as of `snap_id` (see the wire's `ReadChecksums`): the data
    /// is read here, only the checksums cross the network.
    async fn read_checksums(
        &mut self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
    ) -> Result<(), ReqError> {
        if nblocks == 0 || nblocks > CHECKSUM_BLOCKS_MAX {
            return Err(ReqError::new(
                wire::ErrorCode::TooLarge,
                format!("ReadChecksums of {nblocks} blocks: 1..={CHECKSUM_BLOCKS_MAX} per request"),
            ));
        }
        let v = self.require_volume()?;
        let plan = v.plan_read(snap_id, lba, nblocks).await?;
        let bs = u64::from(plan.block_size);
        let zero_crc = crc32c::crc32c(&vec![0u8; bs as usize]);
        let mut crcs: Vec<u32> = Vec::with_capacity(nblocks as usize);
        let mut cached: Option<(*const store::Segment, u32)> = None;
        for (start, end, src) in &plan.pieces {
            match src {
                PlanSrc::Zero => {
                    crcs.extend(std::iter::repeat_n(zero_crc, (*end - *start) as usize))
                }
                PlanSrc::Data { seg, rec, rec_lba } => {
                    self.load_record(seg, *rec, plan.block_size, &mut cached)
                        .await?;
                    for b in *start..*end {
                        let from = ((b - rec_lba) * bs) as usize;
                        let Some(data) = self.rec_buf.get(from..from + bs as usize) else {
                            return Err(ReqError::new(
                                wire::ErrorCode::Damaged,
                                "index points outside its extent",
                            ));
                        };
                        crcs.push(crc32c::crc32c(data));
                    }
                }
            }
        }
        if crcs.len() as u64 != nblocks {
            return Err(ReqError::new(
                wire::ErrorCode::Internal,
                format!("read plan covered {} of {nblocks} blocks", crcs.len()),
            ));
        }
        let v = self.out.fbb.create_vector(&crcs);
        let body = wire::Checksums::create(
            &mut self.out.fbb,
            &wire::ChecksumsArgs {
                snap_id,
                lba,
                crcs: Some(v),
            },
        );
        self.out
            .finish(wire::Message::Checksums, body.as_union_value(), &[]);
        self.send_reply().await
    }

    async fn read(&mut self, snap_id: u64, lba: u64, nblocks: u64) -> Result<(), ReqError> {
        let v = self.require_volume()?;
        let plan = v.plan_read(snap_id, lba, nblocks).await?;
        let bs = u64::from(plan.block_size);
        let frame_blocks_max = FRAME_PAYLOAD_MAX_BYTES as u64 / bs;
        self.read_extents.clear();
        self.read_payload.clear();
        // The record in `rec_buf`, by segment identity: a clone's segment and its source's may
        // carry the same snapshot id.
        let mut cached: Option<(*const store::Segment, u32)> = None;
        for (start, end, src) in &plan.pieces {
            let mut cur = *start;
            match src {
                PlanSrc::Zero => {
                    while cur < *end {
                        if self.read_extents.len() == FRAME_EXTENTS_MAX {
                            self.flush_read_frame(snap_id, false).await?;
                        }
                        let n = (*end - cur).min(u64::from(u32::MAX));
                        self.read_extents.push(wire::Extent::new(
                            cur,
                            n as u32,
                            0,
                            wire::ExtentKind::Zero,
                        ));
                        cur += n;
                    }
                }
                PlanSrc::Data { seg, rec, rec_lba } => {
                    self.load_record(seg, *rec, plan.block_size, &mut cached)
                        .await?;
                    // A whole record goes as one extent with the crc32c it was just checked
                    // against (computed once, on the way in); a frame is sent early rather
                    // than split one. A part of a record gets the crc of its own bytes.
                    let rec_blocks = self.rec_buf.len() as u64 / bs;
                    let whole = cur == *rec_lba && *end - cur == rec_blocks;
                    let used_blocks = self.read_payload.len() as u64 / bs;
                    if whole && used_blocks > 0 && frame_blocks_max - used_blocks < rec_blocks {
                        self.flush_read_frame(snap_id, false).await?;
                    }
                    while cur < *end {
                        let used_blocks = self.read_payload.len() as u64 / bs;
                        let room = frame_blocks_max - used_blocks;
                        if room == 0 || self.read_extents.len() == FRAME_EXTENTS_MAX {
                            self.flush_read_frame(snap_id, false).await?;
                            continue;
                        }
                        let n = (*end - cur).min(room);
                        let from = ((cur - rec_lba) * bs) as usize;
                        let to = from + (n * bs) as usize;
                        let Some(data) = self.rec_buf.get(from..to) else {
                            return Err(ReqError::new(
                                wire::ErrorCode::Damaged,
                                "index points outside its extent",
                            ));
                        };
                        let checked = (from == 0 && to == self.rec_buf.len())
                            .then(|| seg.extents.get(*rec as usize).map(|e| e.crc32c))
                            .flatten();
                        let crc = checked.unwrap_or_else(|| crc32c::crc32c(data));
                        self.read_payload.extend_from_slice(data);
                        self.read_extents.push(wire::Extent::new(
                            cur,
                            n as u32,
                            crc,
                            wire::ExtentKind::Data,
                        ));
                        cur += n;
                    }
                }
            }
        }
        self.flush_read_frame(snap_id, true).await
    }
}

async fn serve(shard: Rc<Shard>, h: Handoff) {
    let peer = h.peer;
    let access = h.auth.access(&h.volume);
    let tcp = tokio_uring::net::TcpStream::from_std(h.stream);
    let stream = match h.tls {
        Some(session) => ServerTransport::Tls(UringTls::new(tcp, session)),
        None => ServerTransport::Plain(tcp),
    };
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        shard,
        volume_name: h.volume,
        generation: h.generation,
        volume_id: h.volume_id,
        // Never a generation: the first request re-reads the credential (it may have been
        // revoked between the handshake and here).
        auth_seen: u64::MAX,
        access,
        auth: h.auth,
        stream,
        hdr: Vec::new(),
        payload: Vec::new(),
        out: Out::new(),
        upload: None,
        rec_buf: Vec::new(),
        read_payload: Vec::new(),
        read_extents: Vec::new(),
        heat_upload: None,
    };
    tracing::debug!(peer = %peer, volume = %conn.volume_name, shard = conn.shard.id, "connection authenticated");
    let broken = conn.shard.broken.borrow().get(&conn.volume_name).cloned();
    if let Some(why) = broken {
        let msg = format!("volume {} cannot be loaded: {why}", conn.volume_name);
        conn.out.error(wire::ErrorCode::Damaged, &msg);
        let _ = conn.send().await;
        conn.stream.shutdown().await;
        return;
    }
    if let Err(msg) = claim_volume(&conn.shard, &conn.volume_name).await {
        tracing::info!(peer = %peer, volume = %conn.volume_name, error = %msg, "volume refused");
        conn.out.error(wire::ErrorCode::Io, &msg);
        let _ = conn.send().await;
        conn.stream.shutdown().await;
        return;
    }
    if let Err(e) = conn.check_identity() {
        tracing::info!(peer = %peer, volume = %conn.volume_name, error = %e.msg, "volume refused: another volume's id");
        conn.out.error(e.code, &e.msg);
        let _ = conn.send().await;
        conn.stream.shutdown().await;
        return;
    }
    let summary = conn.volume().map(|v| v.summary());
    let name = conn.volume_name.clone();
    let info = conn.out.volume_info_body(&name, summary);
    let body = wire::AuthOk::create(&mut conn.out.fbb, &wire::AuthOkArgs { info: Some(info) });
    conn.out
        .finish(wire::Message::AuthOk, body.as_union_value(), &[]);
    if conn.send().await.is_err() {
        return;
    }
    loop {
        let res = match conn.read_frame().await {
            Ok(Next::Closed) => break,
            Ok(Next::Frame) => conn.handle().await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::info!(peer = %peer, volume = %conn.volume_name, code = ?e.code, fatal = e.fatal, error = %e.msg, "request refused");
            if e.write_failed {
                break;
            }
            conn.out.error(e.code, &e.msg);
            let sent = conn.send().await;
            if e.fatal || sent.is_err() {
                break;
            }
        }
    }
    // Dropping the connection drops an unfinished upload: nothing of it becomes visible.
    drop(conn.upload.take());
    conn.stream.shutdown().await;
}

/// Several servers on one object store: takes (or keeps) this server's lease on `name` and,
/// when newly taken, installs the volume as the store has it now.
async fn claim_volume(shard: &Shard, name: &str) -> Result<(), String> {
    let Some(fresh) = store::claim(&shard.volumes_dir, name).await? else {
        return Ok(());
    };
    match fresh {
        Some(v) => {
            if let Some(c) = v.clone_source() {
                shard
                    .registry
                    .lock()
                    .deps
                    .entry((c.volume, c.snap_id))
                    .or_default()
                    .insert(name.to_string());
            }
            shard.insert_volume(name.to_string(), v);
        }
        None => {
            shard.remove_volume(name);
        }
    }
    Ok(())
}

/// Path helper for tests and tools: the directory of `volume` under `data_dir`.
pub fn volume_dir(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join("volumes").join(volume)
}
