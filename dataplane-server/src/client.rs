//! The blocking data-plane client (std::net only), for the compute daemon's flush thread.
//!
//! One [`Client`] is one authenticated connection to one volume. Uploads are streamed:
//! [`Client::begin_snapshot`], any number of [`Client::put_extent`] /
//! [`Client::put_zero_extent`] (batched into frames of at most
//! [`FRAME_PAYLOAD_MAX_BYTES`] of payload), then [`Client::commit`], which returns once the
//! snapshot is durable on the server.
//!
//! Everything the server sends is checked like network input: frames through the verifier and
//! the caps, read data against its crc32c and the requested range. After an I/O error or a
//! protocol violation the client is poisoned: every later call fails (reconnect instead).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use deltavol_schemas::flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use deltavol_schemas::{
    append_frame, check_extent_layout, decode_header, finish_header, header_len_from_prefix,
    valid_volume_name, wire, AUTH_NONCE_BYTES, FRAME_EXTENTS_MAX, FRAME_LEN_PREFIX_BYTES,
    FRAME_PAYLOAD_MAX_BYTES, HEAT_BYTES_MAX, PROTOCOL_VERSION,
};

use crate::auth;
use crate::credentials::ClientCredential;
use crate::tls::{ClientStream, ClientTls};

/// How a client authenticates and protects its connections: its secret (a per-volume
/// credential, `dvc1.ID.SECRET`, or the admin token) and TLS. Without TLS a client connects
/// only to a loopback address, unless [`ClientAccess::insecure`] allows plain TCP anywhere.
#[derive(Clone)]
pub struct ClientAccess {
    secret: std::sync::Arc<[u8]>,
    tls: Option<ClientTls>,
    server_name: Option<String>,
    insecure: bool,
}

impl std::fmt::Debug for ClientAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAccess")
            .field("tls", &self.tls.is_some())
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl ClientAccess {
    /// Plain TCP (loopback only) with `secret`.
    pub fn new(secret: &[u8]) -> ClientAccess {
        ClientAccess {
            secret: secret.into(),
            tls: None,
            server_name: None,
            insecure: false,
        }
    }

    /// TLS on every connection, verifying the server against `tls`'s CA. `server_name` is the
    /// name its certificate must carry; `None`: the IP address connected to.
    pub fn with_tls(mut self, tls: ClientTls, server_name: Option<String>) -> ClientAccess {
        self.tls = Some(tls);
        self.server_name = server_name;
        self
    }

    /// The name the server's certificate must carry, when set.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// This access with `name` as the server's certificate name, unless one is set already
    /// (an address's host name is the default a caller gives).
    pub fn server_name_or(&self, name: &str) -> ClientAccess {
        let mut a = self.clone();
        if a.server_name.is_none() && a.tls.is_some() {
            a.server_name = Some(name.to_string());
        }
        a
    }

    /// Allows plain TCP to addresses that are not loopback (`--insecure`).
    pub fn insecure(mut self, yes: bool) -> ClientAccess {
        self.insecure = yes;
        self
    }

    /// The secret (a credential or the admin token).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether plain TCP to non-loopback addresses is allowed.
    pub fn is_insecure(&self) -> bool {
        self.insecure && self.tls.is_none()
    }
}

/// What [`Client::connect`] takes: a [`ClientAccess`], or the secret's bytes alone (plain
/// TCP to loopback).
pub trait ToClientAccess {
    fn to_access(&self) -> std::borrow::Cow<'_, ClientAccess>;
}

impl ToClientAccess for ClientAccess {
    fn to_access(&self) -> std::borrow::Cow<'_, ClientAccess> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl ToClientAccess for [u8] {
    fn to_access(&self) -> std::borrow::Cow<'_, ClientAccess> {
        std::borrow::Cow::Owned(ClientAccess::new(self))
    }
}

impl<const N: usize> ToClientAccess for [u8; N] {
    fn to_access(&self) -> std::borrow::Cow<'_, ClientAccess> {
        std::borrow::Cow::Owned(ClientAccess::new(self))
    }
}

impl ToClientAccess for Vec<u8> {
    fn to_access(&self) -> std::borrow::Cow<'_, ClientAccess> {
        std::borrow::Cow::Owned(ClientAccess::new(self))
    }
}

/// Connection and I/O timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time to establish the TCP connection.
    pub connect: Duration,
    /// Time any single read or write may block (a commit's fsyncs included).
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(60),
        }
    }
}

/// What kind of failure a [`ClientError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientErrorKind {
    /// Connecting, reading or writing failed (includes timeouts and a closed connection).
    Io,
    /// The server's answer was malformed or not what the protocol allows.
    Protocol,
    /// The server refused the request with this code.
    Server(wire::ErrorCode),
    /// The call itself was wrong (e.g. a put without a begun snapshot, a wrong buffer size).
    Usage,
}

/// A client error: kind, what was being done, and the underlying I/O error if any.
#[derive(Debug, thiserror::Error)]
#[error("{ctx}{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct ClientError {
    kind: ClientErrorKind,
    ctx: String,
    #[source]
    source: Option<io::Error>,
}

impl ClientError {
    fn new(kind: ClientErrorKind, ctx: impl Into<String>) -> Self {
        Self {
            kind,
            ctx: ctx.into(),
            source: None,
        }
    }

    fn io(ctx: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind: ClientErrorKind::Io,
            ctx: ctx.into(),
            source: Some(source),
        }
    }

    pub fn kind(&self) -> ClientErrorKind {
        self.kind
    }

    /// The server's error code, when the server refused the request.
    pub fn server_code(&self) -> Option<wire::ErrorCode> {
        match self.kind {
            ClientErrorKind::Server(c) => Some(c),
            _ => None,
        }
    }
}

fn protocol(ctx: impl Into<String>) -> ClientError {
    ClientError::new(ClientErrorKind::Protocol, ctx)
}

fn usage(ctx: impl Into<String>) -> ClientError {
    ClientError::new(ClientErrorKind::Usage, ctx)
}

/// A volume as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeInfo {
    pub name: String,
    pub exists: bool,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The chain head, 0 when the volume has no snapshot.
    pub latest_snap_id: u64,
    pub generation: u64,
    pub snapshot_count: u64,
    /// For a clone: the source volume (empty otherwise).
    pub clone_source_volume: String,
    /// For a clone: the source snapshot (0 otherwise).
    pub clone_source_snap_id: u64,
    /// The volume's identity (`None` when it does not exist, or from an older server).
    pub volume_id: Option<[u8; 16]>,
    /// Commit time of the chain head (ms since the epoch), 0 when none.
    pub latest_commit_ms: u64,
    /// When the volume was created on the data plane (ms since the epoch).
    pub created_ms: u64,
    /// Cut time of the chain head on the compute node (ms since the epoch), 0 when none or
    /// unknown (see [`SnapshotInfo::point_in_time_ms`]).
    pub latest_cut_ms: u64,
    /// The retention policy the data plane applies (all zero: none).
    pub retention: crate::retention::Policy,
}

impl VolumeInfo {
    fn from_wire(v: wire::VolumeInfo<'_>) -> Self {
        Self {
            name: v.name().unwrap_or_default().to_string(),
            exists: v.exists(),
            size_bytes: v.size_bytes(),
            block_size: v.block_size(),
            latest_snap_id: v.latest_snap_id(),
            generation: v.generation(),
            snapshot_count: v.snapshot_count(),
            clone_source_volume: v.clone_source_volume().unwrap_or_default().to_string(),
            clone_source_snap_id: v.clone_source_snap_id(),
            // A malformed id from the server is treated as absent (the server checks ids).
            volume_id: deltavol_schemas::volume_id_field(v.volume_id())
                .ok()
                .flatten(),
            latest_commit_ms: v.latest_commit_ms(),
            created_ms: v.created_ms(),
            latest_cut_ms: v.latest_cut_ms(),
            retention: v
                .retention()
                .map(crate::retention::Policy::from_wire)
                .unwrap_or_default(),
        }
    }
}

/// What `Prune` did (or would do).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Deleted (or that would be), oldest first.
    pub deleted: Vec<u64>,
    /// Kept, with why (`head`, `pinned`, `last`, `hourly`, ..., or what protects it).
    pub kept: Vec<(u64, String)>,
}

/// A committed snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    pub snap_id: u64,
    pub parent_id: u64,
    pub commit_time_ms: u64,
    pub bytes: u64,
    pub extent_count: u64,
    pub volume_size: u64,
    pub generation: u64,
    /// Wall-clock time of the cut on the compute node (ms since the Unix epoch), 0 when
    /// unknown (committed before cut times were recorded).
    pub cut_time_ms: u64,
    /// Pinned: never removed by retention or deletion until unpinned.
    pub pinned: bool,
    /// The label given with the pin (empty when none).
    pub label: String,
    /// Of `bytes`, the data only this snapshot holds (the next one overwrote it): deleting it
    /// gives this back. 0 for the chain head.
    pub own_bytes: u64,
    /// Of `bytes`, the data later snapshots still read.
    pub shared_bytes: u64,
}

impl SnapshotInfo {
    /// The moment whose state the snapshot holds, as well as it is known: the cut time, or
    /// the commit time (later than the real cut) when the cut time is unknown. The bool is
    /// true when it is the cut time.
    pub fn point_in_time_ms(&self) -> (u64, bool) {
        if self.cut_time_ms != 0 {
            (self.cut_time_ms, true)
        } else {
            (self.commit_time_ms, false)
        }
    }

    fn from_wire(s: wire::SnapshotInfo<'_>) -> Self {
        Self {
            snap_id: s.snap_id(),
            parent_id: s.parent_id(),
            commit_time_ms: s.commit_time_ms(),
            bytes: s.bytes(),
            extent_count: s.extent_count(),
            volume_size: s.volume_size(),
            generation: s.generation(),
            cut_time_ms: s.cut_time_ms(),
            pinned: s.pinned(),
            label: s.label().unwrap_or_default().to_string(),
            own_bytes: s.own_bytes(),
            shared_bytes: s.shared_bytes(),
        }
    }
}

/// The answer to [`Client::begin_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginOutcome {
    /// Send the extents, then commit.
    Started,
    /// This snapshot is already committed with that parent: do not send it again.
    AlreadyCommitted(SnapshotInfo),
}

#[derive(Debug)]
struct UploadState {
    snap_id: u64,
    extents: Vec<wire::Extent>,
    payload: Vec<u8>,
    extent_count: u64,
    data_bytes: u64,
}

/// One authenticated connection to one volume.
pub struct Client {
    stream: ClientStream,
    info: VolumeInfo,
    generation: u64,
    /// The volume id this connection authenticated with, if any.
    volume_id: Option<[u8; 16]>,
    fbb: FlatBufferBuilder<'static>,
    out: Vec<u8>,
    hdr: Vec<u8>,
    payload: Vec<u8>,
    upload: Option<UploadState>,
    poisoned: bool,
    /// Where the bytes written to the socket are counted, if anywhere.
    sent: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, authenticates for `volume` with `access` (a [`ClientAccess`], or a
    /// credential's or the admin token's bytes), and returns the client.
    pub fn connect(
        addr: impl ToSocketAddrs,
        access: &(impl ToClientAccess + ?Sized),
        volume: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError> {
        Self::connect_with_generation(addr, access, volume, timeouts, 0)
    }

    /// Like [`Client::connect`], naming the fencing generation the client believes current.
    pub fn connect_with_generation(
        addr: impl ToSocketAddrs,
        access: &(impl ToClientAccess + ?Sized),
        volume: &str,
        timeouts: Timeouts,
        generation: u64,
    ) -> Result<Client, ClientError> {
        Self::connect_as(addr, access, volume, timeouts, generation, None)
    }

    /// Like [`Client::connect_with_generation`], as the volume with identity `volume_id`:
    /// the server refuses the connection (`IdentityMismatch`, naming the volume it holds)
    /// when a volume of that name with another id exists, and a `create_volume` or
    /// `clone_volume` on this connection creates the volume with this id. Every writer
    /// should connect this way; `None` reads by name only.
    pub fn connect_as(
        addr: impl ToSocketAddrs,
        access: &(impl ToClientAccess + ?Sized),
        volume: &str,
        timeouts: Timeouts,
        generation: u64,
        volume_id: Option<[u8; 16]>,
    ) -> Result<Client, ClientError> {
        let access = access.to_access();
        if !valid_volume_name(volume) {
            return Err(usage(format!("invalid volume name {volume:?}")));
        }
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| ClientError::io("resolving the address", e))?
            .collect();
        let mut last_err = None;
        let mut stream = None;
        for a in &addrs {
            if access.tls.is_none() && !access.insecure && !a.ip().is_loopback() {
                last_err = Some(usage(format!(
                    "refusing plain TCP to the data plane at {a} (not a loopback address): give \
                     the data plane's CA certificate (--tls-ca) to use TLS, or --insecure to \
                     send snapshots unencrypted"
                )));
                continue;
            }
            match TcpStream::connect_timeout(a, timeouts.connect) {
                Ok(s) => {
                    stream = Some((s, *a));
                    break;
                }
                Err(e) => last_err = Some(ClientError::io(format!("connecting to {a}"), e)),
            }
        }
        let (tcp, peer) = match stream {
            Some(s) => s,
            None => {
                return Err(last_err.unwrap_or_else(|| usage("the address resolved to nothing")))
            }
        };
        let io_ctx = |e| ClientError::io("configuring the socket", e);
        tcp.set_read_timeout(Some(timeouts.io)).map_err(io_ctx)?;
        tcp.set_write_timeout(Some(timeouts.io)).map_err(io_ctx)?;
        tcp.set_nodelay(true).map_err(io_ctx)?;
        let stream = match &access.tls {
            Some(tls) => {
                let name = access
                    .server_name
                    .clone()
                    .unwrap_or_else(|| peer.ip().to_string());
                tls.connect(tcp, &name).map_err(|e| {
                    ClientError::io(format!("TLS with the data plane at {peer} as {name:?}"), e)
                })?
            }
            None => ClientStream::Plain(tcp),
        };
        let mut c = Client {
            stream,
            info: VolumeInfo::default(),
            generation,
            volume_id,
            fbb: FlatBufferBuilder::with_capacity(1024),
            out: Vec::with_capacity(4096),
            hdr: Vec::with_capacity(4096),
            payload: Vec::new(),
            upload: None,
            poisoned: false,
            sent: None,
        };
        c.handshake(access.secret(), volume)?;
        Ok(c)
    }

    fn handshake(&mut self, token: &[u8], volume: &str) -> Result<(), ClientError> {
        let name = self.fbb.create_string("deltavol");
        let body = wire::Hello::create(
            &mut self.fbb,
            &wire::HelloArgs {
                protocol_version: PROTOCOL_VERSION,
                client_name: Some(name),
            },
        );
        self.send(wire::Message::Hello, body.as_union_value())?;
        self.recv()?;
        let nonce = {
            let f =
                decode_header(&self.hdr).map_err(|e| protocol(format!("bad challenge: {e}")))?;
            let ch = f
                .body_as_challenge()
                .ok_or_else(|| protocol("expected a Challenge"))?;
            let n = ch.nonce().map(|n| n.bytes()).unwrap_or_default();
            if n.len() != AUTH_NONCE_BYTES {
                return Err(protocol(format!("challenge nonce of {} bytes", n.len())));
            }
            n.to_vec()
        };
        // A per-volume credential proves its secret; anything else is the admin token.
        let (mac, credential_id, proof) = match ClientCredential::parse(token) {
            Some(Ok(c)) => {
                let proof = c.proof(&nonce, volume);
                (
                    None,
                    Some(self.fbb.create_string(&c.id)),
                    Some(self.fbb.create_vector(&proof)),
                )
            }
            Some(Err(e)) => return Err(usage(format!("the credential file holds {e}"))),
            None => {
                let mac = auth::answer(token, &nonce, volume);
                (Some(self.fbb.create_vector(&mac)), None, None)
            }
        };
        let vol = self.fbb.create_string(volume);
        let id = self.volume_id.map(|id| self.fbb.create_vector(&id));
        let body = wire::Auth::create(
            &mut self.fbb,
            &wire::AuthArgs {
                volume: Some(vol),
                mac,
                generation: self.generation,
                volume_id: id,
                credential_id,
                proof,
            },
        );
        self.send(wire::Message::Auth, body.as_union_value())?;
        self.recv()?;
        let f = decode_header(&self.hdr).map_err(|e| protocol(format!("bad auth answer: {e}")))?;
        let ok = f
            .body_as_auth_ok()
            .ok_or_else(|| protocol("expected AuthOk"))?;
        let info = ok
            .info()
            .ok_or_else(|| protocol("AuthOk without volume info"))?;
        self.info = VolumeInfo::from_wire(info);
        if self.info.name != volume {
            return Err(protocol(format!(
                "server answered for volume {:?}",
                self.info.name
            )));
        }
        Ok(())
    }

    /// The volume as last described by the server.
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    fn check_usable(&self) -> Result<(), ClientError> {
        if self.poisoned {
            return Err(usage(
                "connection is unusable after an earlier I/O or protocol error: reconnect",
            ));
        }
        Ok(())
    }

    fn poison<T>(&mut self, r: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(e) = &r {
            if matches!(e.kind, ClientErrorKind::Io | ClientErrorKind::Protocol) {
                self.poisoned = true;
            }
        }
        r
    }

    fn write_all(&mut self, data_is_out: bool, payload: &[u8]) -> Result<(), ClientError> {
        let r = if data_is_out {
            self.stream.write_all(&self.out)
        } else {
            Ok(())
        }
        .and_then(|()| {
            if payload.is_empty() {
                Ok(())
            } else {
                self.stream.write_all(payload)
            }
        })
        // TLS: the records of this frame leave now, not with the next one.
        .and_then(|()| self.stream.flush());
        if r.is_ok() {
            if let Some(c) = &self.sent {
                let n = if data_is_out { self.out.len() } else { 0 } + payload.len();
                c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r.map_err(|e| ClientError::io("sending to the data plane", e))
    }

    /// Counts every byte this client writes to its socket from now on (frames and payload)
    /// into `counter`, which several clients may share.
    pub fn count_sent_bytes(&mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.sent = Some(counter);
    }

    /// Sends a frame without payload.
    fn send(
        &mut self,
        ty: wire::Message,
        body: WIPOffset<UnionWIPOffset>,
    ) -> Result<(), ClientError> {
        self.check_usable()?;
        self.out.clear();
        let r = finish_header(&mut self.fbb, ty, body, 0)
            .and_then(|h| append_frame(&mut self.out, h, &[]))
            .map_err(|e| usage(format!("request over the frame caps: {e}")));
        self.fbb.reset();
        r?;
        let r = self.write_all(true, &[]);
        self.poison(r)
    }

    /// Sends a frame with a payload (at most `FRAME_PAYLOAD_MAX_BYTES`).
    fn send_with_payload(
        &mut self,
        ty: wire::Message,
        body: WIPOffset<UnionWIPOffset>,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.check_usable()?;
        self.out.clear();
        let r = finish_header(&mut self.fbb, ty, body, payload.len())
            .and_then(|h| append_frame(&mut self.out, h, &[]))
            .map_err(|e| usage(format!("request over the frame caps: {e}")));
        self.fbb.reset();
        r?;
        // `append_frame` wrote the prefix and header only; the payload follows.
        let r = self.write_all(true, payload);
        self.poison(r)
    }

    /// Receives one frame into `hdr` / `payload`; an `Error` frame becomes a server error.
    fn recv(&mut self) -> Result<(), ClientError> {
        let r = self.recv_inner();
        self.poison(r)?;
        self.refusal()
    }

    /// The last frame received as an error, if it is an Error frame.
    fn refusal(&self) -> Result<(), ClientError> {
        let f = decode_header(&self.hdr).map_err(|e| protocol(format!("bad frame: {e}")))?;
        if let Some(e) = f.body_as_error() {
            let code = e.code();
            let msg = e.message().unwrap_or("no message");
            return Err(ClientError::new(
                ClientErrorKind::Server(code),
                format!("data plane refused: {msg} ({code:?})"),
            ));
        }
        Ok(())
    }

    /// Receives a frame's header only, leaving its payload (the returned length) in the
    /// stream for the caller to read where it belongs; an error frame is read whole and
    /// returned as the error.
    fn recv_header(&mut self) -> Result<usize, ClientError> {
        let r = self.recv_header_inner();
        let payload_len = self.poison(r)?;
        let f = decode_header(&self.hdr).map_err(|e| protocol(format!("bad frame: {e}")))?;
        if f.body_as_error().is_some() {
            // Consume its payload (none is expected) so the connection stays in step.
            self.payload.resize(payload_len, 0);
            let r = self
                .stream
                .read_exact(&mut self.payload)
                .map_err(|e| ClientError::io("reading from the data plane", e));
            self.poison(r)?;
            self.refusal()?;
        }
        Ok(payload_len)
    }

    fn recv_header_inner(&mut self) -> Result<usize, ClientError> {
        let mut prefix = [0u8; FRAME_LEN_PREFIX_BYTES];
        self.stream
            .read_exact(&mut prefix)
            .map_err(|e| ClientError::io("reading from the data plane", e))?;
        let len = header_len_from_prefix(prefix)
            .map_err(|e| protocol(format!("bad frame from the data plane: {e}")))?;
        self.hdr.resize(len, 0);
        self.stream
            .read_exact(&mut self.hdr)
            .map_err(|e| ClientError::io("reading from the data plane", e))?;
        Ok(decode_header(&self.hdr)
            .map_err(|e| protocol(format!("bad frame from the data plane: {e}")))?
            .payload_len() as usize)
    }

    fn recv_inner(&mut self) -> Result<(), ClientError> {
        let payload_len = self.recv_header_inner()?;
        self.payload.resize(payload_len, 0);
        self.stream
            .read_exact(&mut self.payload)
            .map_err(|e| ClientError::io("reading from the data plane", e))?;
        Ok(())
    }

    /// Decodes the last received frame.
    fn frame(&self) -> Result<wire::Frame<'_>, ClientError> {
        decode_header(&self.hdr).map_err(|e| protocol(format!("bad frame: {e}")))
    }

    /// Creates the volume (idempotent when size and block size are the same).
    pub fn create_volume(
        &mut self,
        size_bytes: u64,
        block_size: u32,
    ) -> Result<VolumeInfo, ClientError> {
        let body = wire::CreateVolume::create(
            &mut self.fbb,
            &wire::CreateVolumeArgs {
                size_bytes,
                block_size,
            },
        );
        self.send(wire::Message::CreateVolume, body.as_union_value())?;
        self.recv_volume_info()
    }

    /// Asks the server for the volume's current state.
    pub fn volume_info(&mut self) -> Result<VolumeInfo, ClientError> {
        let body =
            wire::GetVolumeInfo::create(&mut self.fbb, &wire::GetVolumeInfoArgs { reserved: 0 });
        self.send(wire::Message::GetVolumeInfo, body.as_union_value())?;
        self.recv_volume_info()
    }

    fn recv_volume_info(&mut self) -> Result<VolumeInfo, ClientError> {
        self.recv()?;
        let info = {
            let f = self.frame()?;
            let v = f
                .body_as_volume_info()
                .ok_or_else(|| protocol("expected VolumeInfo"))?;
            VolumeInfo::from_wire(v)
        };
        self.info = info.clone();
        Ok(info)
    }

    /// The fencing generation this connection writes as.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Fencing (recovery): atomically increments the volume's generation on the data plane
    /// (durable before the answer) and makes it this connection's. Every writer of an older
    /// generation is refused from then on (`StaleGeneration`), its upload in progress
    /// abandoned. Returns the new generation; [`Client::info`] is refreshed too (its
    /// `latest_snap_id` is the head as of the fence).
    pub fn new_generation(&mut self) -> Result<u64, ClientError> {
        if self.upload.is_some() {
            return Err(usage("new_generation while a snapshot is being uploaded"));
        }
        let body =
            wire::NewGeneration::create(&mut self.fbb, &wire::NewGenerationArgs { reserved: 0 });
        self.send(wire::Message::NewGeneration, body.as_union_value())?;
        let info = self.recv_volume_info()?;
        if info.generation <= self.generation {
            // The server must move past any generation this client wrote as.
            return self.poison(Err(protocol(format!(
                "new generation {} is not newer than this connection's {}",
                info.generation, self.generation
            ))));
        }
        self.generation = info.generation;
        Ok(info.generation)
    }

    /// Creates this connection's volume (which must not exist yet) as a metadata-only clone
    /// of `source_volume` as of its snapshot `source_snap_id`: same size and block size, no
    /// snapshot of its own (its first has parent 0), nothing copied. Reads as of the clone's
    /// snapshots fall through to the source; `read_extents(0, ..)` reads the clone's base.
    /// While the clone exists the source snapshot cannot be deleted (`InUse`).
    pub fn clone_volume(
        &mut self,
        source_volume: &str,
        source_snap_id: u64,
    ) -> Result<VolumeInfo, ClientError> {
        if !valid_volume_name(source_volume) {
            return Err(usage(format!("invalid volume name {source_volume:?}")));
        }
        let src = self.fbb.create_string(source_volume);
        let body = wire::CloneVolume::create(
            &mut self.fbb,
            &wire::CloneVolumeArgs {
                source_volume: Some(src),
                source_snap_id,
            },
        );
        self.send(wire::Message::CloneVolume, body.as_union_value())?;
        self.recv_volume_info()
    }

    /// Starts snapshot `snap_id` on top of `parent_id` (0 for the first one).
    pub fn begin_snapshot(
        &mut self,
        snap_id: u64,
        parent_id: u64,
        volume_size: u64,
    ) -> Result<BeginOutcome, ClientError> {
        self.begin_snapshot_cut_at(snap_id, parent_id, volume_size, 0)
    }

    /// [`Client::begin_snapshot`] of a snapshot whose cut (on the compute node) happened at
    /// `cut_time_ms` (ms since the Unix epoch; 0 = unknown): the data plane stores it with the
    /// snapshot, whenever it is shipped.
    pub fn begin_snapshot_cut_at(
        &mut self,
        snap_id: u64,
        parent_id: u64,
        volume_size: u64,
        cut_time_ms: u64,
    ) -> Result<BeginOutcome, ClientError> {
        if self.upload.is_some() {
            return Err(usage(
                "a snapshot is already being uploaded on this connection",
            ));
        }
        let body = wire::BeginSnapshot::create(
            &mut self.fbb,
            &wire::BeginSnapshotArgs {
                snap_id,
                parent_id,
                volume_size,
                generation: self.generation,
                cut_time_ms,
            },
        );
        self.send(wire::Message::BeginSnapshot, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        if let Some(ok) = f.body_as_begin_ok() {
            if ok.snap_id() != snap_id {
                return self.poison(Err(protocol("BeginOk for another snapshot")));
            }
            self.upload = Some(UploadState {
                snap_id,
                extents: Vec::with_capacity(64),
                payload: Vec::with_capacity(FRAME_PAYLOAD_MAX_BYTES),
                extent_count: 0,
                data_bytes: 0,
            });
            return Ok(BeginOutcome::Started);
        }
        if let Some(ac) = f.body_as_already_committed() {
            let info = ac
                .info()
                .ok_or_else(|| protocol("AlreadyCommitted without info"))?;
            return Ok(BeginOutcome::AlreadyCommitted(SnapshotInfo::from_wire(
                info,
            )));
        }
        self.poison(Err(protocol("expected BeginOk or AlreadyCommitted")))
    }

    fn block_size(&self) -> Result<u64, ClientError> {
        if !self.info.exists || self.info.block_size == 0 {
            return Err(usage(format!(
                "volume {} does not exist: create it first",
                self.info.name
            )));
        }
        Ok(u64::from(self.info.block_size))
    }

    /// Adds a data extent to the snapshot being uploaded (`data.len()` = `nblocks` blocks).
    /// Extents are batched into frames of at most 1 MiB of payload; large ones are split.
    pub fn put_extent(&mut self, lba: u64, nblocks: u32, data: &[u8]) -> Result<(), ClientError> {
        self.put_extent_crc(lba, nblocks, data, None)
    }

    /// [`Client::put_extent`] of an extent whose crc32c the caller already has (read back and
    /// checked from a spool, say): it is not computed again when the extent fits in one frame.
    /// A wrong `crc` makes the data plane refuse the snapshot.
    pub fn put_extent_with_crc(
        &mut self,
        lba: u64,
        nblocks: u32,
        data: &[u8],
        crc: u32,
    ) -> Result<(), ClientError> {
        self.put_extent_crc(lba, nblocks, data, Some(crc))
    }

    fn put_extent_crc(
        &mut self,
        lba: u64,
        nblocks: u32,
        data: &[u8],
        crc: Option<u32>,
    ) -> Result<(), ClientError> {
        let bs = self.block_size()?;
        if nblocks == 0 || data.len() as u64 != u64::from(nblocks) * bs {
            return Err(usage(format!(
                "put_extent: {} bytes for {nblocks} blocks of {bs}",
                data.len()
            )));
        }
        if self.upload.is_none() {
            return Err(usage("put_extent without begin_snapshot"));
        }
        let chunk_blocks = FRAME_PAYLOAD_MAX_BYTES as u64 / bs;
        let mut cur = 0u64;
        while cur < u64::from(nblocks) {
            let n = (u64::from(nblocks) - cur).min(chunk_blocks);
            let bytes = &data[(cur * bs) as usize..((cur + n) * bs) as usize];
            let full = {
                let u = self.upload.as_ref().expect("checked above");
                u.payload.len() + bytes.len() > FRAME_PAYLOAD_MAX_BYTES
                    || u.extents.len() == FRAME_EXTENTS_MAX
            };
            if full {
                self.flush_batch()?;
            }
            let u = self.upload.as_mut().expect("checked above");
            let whole = cur == 0 && n == u64::from(nblocks);
            let crc = match crc {
                Some(c) if whole => c,
                _ => crc32c::crc32c(bytes),
            };
            u.extents.push(wire::Extent::new(
                lba + cur,
                n as u32,
                crc,
                wire::ExtentKind::Data,
            ));
            u.payload.extend_from_slice(bytes);
            u.extent_count += 1;
            u.data_bytes += bytes.len() as u64;
            cur += n;
        }
        Ok(())
    }

    /// Adds data extents whose bytes are already in memory to the snapshot being uploaded:
    /// `exts[i] = (lba, nblocks, at)`, its bytes `data[at..at + nblocks * block size]` (at
    /// most 1 MiB each). They go in PutExtents frames gathered straight from `data` by
    /// vectored writes, never copied into the client's batch (extents batched before them go
    /// first): what the flush uses to ship an epoch from the buffer it read it into.
    pub fn put_extents_from(
        &mut self,
        data: &[u8],
        exts: &[(u64, u32, usize)],
    ) -> Result<(), ClientError> {
        let bs = self.block_size()?;
        if self.upload.is_none() {
            return Err(usage("put_extents_from without begin_snapshot"));
        }
        for &(lba, n, at) in exts {
            let len = u64::from(n) * bs;
            if n == 0
                || len > FRAME_PAYLOAD_MAX_BYTES as u64
                || at.checked_add(len as usize).is_none_or(|e| e > data.len())
            {
                return Err(usage(format!(
                    "put_extents_from: extent {lba}+{n} at byte {at} of {}",
                    data.len()
                )));
            }
        }
        self.flush_batch()?;
        let mut i = 0;
        while i < exts.len() {
            let mut payload = 0usize;
            let mut j = i;
            while j < exts.len() && j - i < FRAME_EXTENTS_MAX {
                let len = exts[j].1 as usize * bs as usize;
                if payload + len > FRAME_PAYLOAD_MAX_BYTES {
                    break;
                }
                payload += len;
                j += 1;
            }
            self.send_extents_from(data, &exts[i..j], bs as usize, payload)?;
            i = j;
        }
        Ok(())
    }

    /// One PutExtents frame of `exts` (checked by the caller), its payload gathered from
    /// `data`.
    fn send_extents_from(
        &mut self,
        data: &[u8],
        exts: &[(u64, u32, usize)],
        bs: usize,
        payload_len: usize,
    ) -> Result<(), ClientError> {
        self.check_usable()?;
        let Some(mut u) = self.upload.take() else {
            return Err(usage("put_extents_from without begin_snapshot"));
        };
        u.extents.clear();
        let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(exts.len() + 1);
        let mut run: Option<(usize, usize)> = None;
        let out_placeholder = slices.len();
        slices.push(std::io::IoSlice::new(&[]));
        for &(lba, n, at) in exts {
            let bytes = &data[at..at + n as usize * bs];
            u.extents.push(wire::Extent::new(
                lba,
                n,
                crc32c::crc32c(bytes),
                wire::ExtentKind::Data,
            ));
            // Neighbours in memory go out as one slice.
            run = match run {
                Some((s, e)) if e == at => Some((s, at + bytes.len())),
                Some((s, e)) => {
                    slices.push(std::io::IoSlice::new(&data[s..e]));
                    Some((at, at + bytes.len()))
                }
                None => Some((at, at + bytes.len())),
            };
        }
        if let Some((s, e)) = run {
            slices.push(std::io::IoSlice::new(&data[s..e]));
        }
        let r = self.encode_put_extents(u.snap_id, &u.extents, payload_len);
        u.extents.clear();
        if let Err(e) = r {
            self.upload = Some(u);
            return Err(e);
        }
        slices[out_placeholder] = std::io::IoSlice::new(&self.out);
        let total = self.out.len() + payload_len;
        let r =
            write_all_vectored(&mut self.stream, &mut slices).and_then(|()| self.stream.flush());
        u.extent_count += exts.len() as u64;
        u.data_bytes += payload_len as u64;
        self.upload = Some(u);
        match r {
            Ok(()) => {
                if let Some(c) = &self.sent {
                    c.fetch_add(total as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                let e = ClientError::io("sending to the data plane", e);
                Err(self.reason_after_write_error().unwrap_or(e))
            }
        }
    }

    /// Adds a zero extent (a discard) to the snapshot being uploaded. Carries no payload.
    pub fn put_zero_extent(&mut self, lba: u64, nblocks: u64) -> Result<(), ClientError> {
        self.block_size()?;
        if nblocks == 0 {
            return Err(usage("put_zero_extent of zero blocks"));
        }
        if self.upload.is_none() {
            return Err(usage("put_zero_extent without begin_snapshot"));
        }
        let mut cur = 0u64;
        while cur < nblocks {
            let n = (nblocks - cur).min(u64::from(u32::MAX));
            if self
                .upload
                .as_ref()
                .is_some_and(|u| u.extents.len() == FRAME_EXTENTS_MAX)
            {
                self.flush_batch()?;
            }
            let u = self.upload.as_mut().expect("checked above");
            u.extents.push(wire::Extent::new(
                lba + cur,
                n as u32,
                0,
                wire::ExtentKind::Zero,
            ));
            u.extent_count += 1;
            cur += n;
        }
        Ok(())
    }

    /// Sends the batched extents as one PutExtents frame (no answer unless an error).
    fn flush_batch(&mut self) -> Result<(), ClientError> {
        self.check_usable()?;
        let Some(mut u) = self.upload.take() else {
            return Ok(());
        };
        if u.extents.is_empty() {
            self.upload = Some(u);
            return Ok(());
        }
        let r = self.encode_put_extents(u.snap_id, &u.extents, u.payload.len());
        if let Err(e) = r {
            self.upload = Some(u);
            return Err(e);
        }
        // `append_frame` wrote the prefix with the header length only; the payload follows.
        let r = self.write_all(true, &u.payload);
        u.extents.clear();
        u.payload.clear();
        self.upload = Some(u);
        if let Err(e) = r {
            // The server may have refused the stream and closed: fetch its reason if it sent one.
            self.poisoned = true;
            return Err(self.reason_after_write_error().unwrap_or(e));
        }
        Ok(())
    }

    /// Encodes the length prefix and header of a PutExtents frame of `extents` for snapshot
    /// `snap_id` into `self.out`; its `payload_len` bytes of payload are the caller's to send.
    fn encode_put_extents(
        &mut self,
        snap_id: u64,
        extents: &[wire::Extent],
        payload_len: usize,
    ) -> Result<(), ClientError> {
        let ex = self.fbb.create_vector(extents);
        let body = wire::PutExtents::create(
            &mut self.fbb,
            &wire::PutExtentsArgs {
                snap_id,
                extents: Some(ex),
            },
        );
        self.out.clear();
        let r = finish_header(
            &mut self.fbb,
            wire::Message::PutExtents,
            body.as_union_value(),
            payload_len,
        )
        .and_then(|h| append_frame(&mut self.out, h, &[]))
        .map_err(|e| usage(format!("batch over the frame caps: {e}")));
        self.fbb.reset();
        r
    }

    fn reason_after_write_error(&mut self) -> Option<ClientError> {
        let _ = self
            .stream
            .tcp()
            .set_read_timeout(Some(Duration::from_millis(500)));
        self.recv_inner().ok()?;
        let f = decode_header(&self.hdr).ok()?;
        let e = f.body_as_error()?;
        Some(ClientError::new(
            ClientErrorKind::Server(e.code()),
            format!(
                "data plane refused the upload: {} ({:?})",
                e.message().unwrap_or("no message"),
                e.code()
            ),
        ))
    }

    /// Sends the rest of the snapshot and commits it; returns once it is durable.
    pub fn commit(&mut self) -> Result<SnapshotInfo, ClientError> {
        if self.upload.is_none() {
            return Err(usage("commit without begin_snapshot"));
        }
        self.flush_batch()?;
        let u = self.upload.take().expect("checked above");
        let body = wire::Commit::create(
            &mut self.fbb,
            &wire::CommitArgs {
                snap_id: u.snap_id,
                extent_count: u.extent_count,
                total_bytes: u.data_bytes,
            },
        );
        self.send(wire::Message::Commit, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        let c = f
            .body_as_committed()
            .and_then(|c| c.info())
            .map(SnapshotInfo::from_wire);
        match c {
            Some(info) if info.snap_id == u.snap_id => Ok(info),
            _ => self.poison(Err(protocol("expected Committed for the snapshot sent"))),
        }
    }

    /// All committed snapshots of the volume, oldest first.
    pub fn list_snapshots(&mut self) -> Result<Vec<SnapshotInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0u64;
        loop {
            let body = wire::ListSnapshots::create(
                &mut self.fbb,
                &wire::ListSnapshotsArgs {
                    after_snap_id: after,
                    max_count: 0,
                },
            );
            self.send(wire::Message::ListSnapshots, body.as_union_value())?;
            self.recv()?;
            let more = {
                let f = self.frame()?;
                let l = f
                    .body_as_snapshot_list()
                    .ok_or_else(|| protocol("expected SnapshotList"))?;
                for s in l.snapshots().iter().flat_map(|v| v.iter()) {
                    let info = SnapshotInfo::from_wire(s);
                    if info.snap_id <= after {
                        return Err(protocol("SnapshotList out of order"));
                    }
                    after = info.snap_id;
                    all.push(info);
                }
                l.more() && l.snapshots().is_some_and(|v| !v.is_empty())
            };
            if !more {
                return Ok(all);
            }
        }
    }

    /// Reads blocks `[lba, lba + nblocks)` as of snapshot `snap_id` into `buf`
    /// (`nblocks` blocks long). Every extent is checked against its crc32c.
    pub fn read_extents(
        &mut self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let bs = self.block_size()?;
        if nblocks == 0 || Some(buf.len() as u64) != nblocks.checked_mul(bs) {
            return Err(usage(format!(
                "read_extents: buffer of {} bytes for {nblocks} blocks of {bs}",
                buf.len()
            )));
        }
        if self.upload.is_some() {
            return Err(usage("read_extents while a snapshot is being uploaded"));
        }
        // The server caps one request; larger reads go as several.
        let chunk_blocks = (crate::store::READ_REQUEST_MAX_BYTES / bs).max(1);
        let mut done = 0u64;
        while done < nblocks {
            let n = (nblocks - done).min(chunk_blocks);
            let from = (done * bs) as usize;
            let to = ((done + n) * bs) as usize;
            self.read_chunk(snap_id, lba + done, n, bs, &mut buf[from..to])?;
            done += n;
        }
        Ok(())
    }

    fn read_chunk(
        &mut self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
        bs: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let body = wire::ReadExtents::create(
            &mut self.fbb,
            &wire::ReadExtentsArgs {
                snap_id,
                lba,
                nblocks,
            },
        );
        self.send(wire::Message::ReadExtents, body.as_union_value())?;
        let end = lba + nblocks;
        let mut cursor = lba;
        loop {
            let payload_len = self.recv_header()?;
            let r = self.take_read_frame(snap_id, lba, end, bs, &mut cursor, buf, payload_len);
            if self.poison(r)? {
                break;
            }
        }
        if cursor != end {
            return self.poison(Err(protocol(format!(
                "read ended at block {cursor}, {end} expected"
            ))));
        }
        Ok(())
    }

    /// Receives one ReadData frame (its header already in, `payload_len` bytes of payload to
    /// come) straight into `buf`: the extents are checked first (layout, range, blocks in
    /// order from `cursor`), then each data extent is read from the stream into its place and
    /// checked against its crc32c there — no copy through a payload buffer. Returns whether
    /// it was the last frame. Any error leaves the stream mid-frame: the caller poisons the
    /// connection.
    #[allow(clippy::too_many_arguments)]
    fn take_read_frame(
        &mut self,
        snap_id: u64,
        lba: u64,
        end: u64,
        bs: u64,
        cursor: &mut u64,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<bool, ClientError> {
        // Where each extent goes, from the header alone (the payload is still unread).
        let mut plan: smallvec::SmallVec<[(u64, u64, Option<u32>); 16]> = smallvec::SmallVec::new();
        let last = {
            let f = self.frame()?;
            let d = f
                .body_as_read_data()
                .ok_or_else(|| protocol("expected ReadData"))?;
            if d.snap_id() != snap_id {
                return Err(protocol("ReadData for another snapshot"));
            }
            let extents = d
                .extents()
                .ok_or_else(|| protocol("ReadData without extents"))?;
            check_extent_layout(extents.iter(), payload_len as u64, bs as u32, end)
                .map_err(|e| protocol(format!("bad read data from the data plane: {e}")))?;
            let mut at = *cursor;
            for e in extents.iter() {
                if e.lba() != at {
                    return Err(protocol(format!(
                        "read data at block {}, block {} expected",
                        e.lba(),
                        at
                    )));
                }
                let n = u64::from(e.nblocks());
                let crc = (e.kind() == wire::ExtentKind::Data).then(|| e.crc32c());
                plan.push((at, n, crc));
                at += n;
            }
            d.last()
        };
        for (at, n, crc) in plan {
            let dst = &mut buf[((at - lba) * bs) as usize..((at - lba + n) * bs) as usize];
            match crc {
                Some(want) => {
                    self.stream
                        .read_exact(dst)
                        .map_err(|e| ClientError::io("reading from the data plane", e))?;
                    let got = crc32c::crc32c(dst);
                    if got != want {
                        return Err(protocol(format!(
                            "bad read data from the data plane: {}",
                            deltavol_schemas::ExtentError::Checksum {
                                lba: at,
                                expected: want,
                                actual: got,
                            }
                        )));
                    }
                }
                None => dst.fill(0),
            }
            *cursor = at + n;
        }
        Ok(last)
    }

    /// The crc32c of every block of the volume as of `snap_id` in `[lba, lba + nblocks)`,
    /// without the data (requests of at most `CHECKSUM_BLOCKS_MAX` blocks, as many as
    /// needed). Same snapshot semantics as [`Client::read_extents`].
    pub fn read_checksums(
        &mut self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
    ) -> Result<Vec<u32>, ClientError> {
        let mut out = Vec::with_capacity(usize::try_from(nblocks).unwrap_or(0).min(1 << 24));
        let mut cur = lba;
        let end = lba
            .checked_add(nblocks)
            .ok_or_else(|| usage("lba + nblocks overflows"))?;
        while cur < end {
            let n = (end - cur).min(deltavol_schemas::CHECKSUM_BLOCKS_MAX);
            let body = wire::ReadChecksums::create(
                &mut self.fbb,
                &wire::ReadChecksumsArgs {
                    snap_id,
                    lba: cur,
                    nblocks: n,
                },
            );
            self.send(wire::Message::ReadChecksums, body.as_union_value())?;
            self.recv()?;
            let got = {
                let f = self.frame()?;
                match f.body_as_checksums() {
                    Some(c) if c.snap_id() == snap_id && c.lba() == cur => {
                        c.crcs().map(|v| v.iter().collect::<Vec<u32>>())
                    }
                    _ => None,
                }
            };
            match got {
                Some(v) if v.len() as u64 == n => out.extend_from_slice(&v),
                _ => {
                    return self.poison(Err(protocol(format!(
                        "expected Checksums of {n} blocks at {cur}"
                    ))))
                }
            }
            cur += n;
        }
        Ok(out)
    }

    /// Deletes this connection's volume with every snapshot of it. `volume_id` must be the
    /// volume's id (a confirmation; `IdentityMismatch` otherwise). Refused with `InUse` while
    /// a clone depends on one of its snapshots.
    pub fn delete_volume(&mut self, volume_id: [u8; 16]) -> Result<VolumeInfo, ClientError> {
        let id = self.fbb.create_vector(&volume_id);
        let body = wire::DeleteVolume::create(
            &mut self.fbb,
            &wire::DeleteVolumeArgs {
                volume_id: Some(id),
            },
        );
        self.send(wire::Message::DeleteVolume, body.as_union_value())?;
        self.recv_volume_info()
    }

    /// Deletes snapshot `snap_id`; its extents merge into the next snapshot. Returns the id
    /// of that snapshot. The chain head cannot be deleted.
    /// Sets the volume's retention policy (applied by the data plane at once and after
    /// every commit); returns the volume as it is then.
    pub fn set_retention(
        &mut self,
        policy: &crate::retention::Policy,
    ) -> Result<VolumeInfo, ClientError> {
        let r = wire::Retention::create(&mut self.fbb, &policy.to_wire());
        let body =
            wire::SetRetention::create(&mut self.fbb, &wire::SetRetentionArgs { policy: Some(r) });
        self.send(wire::Message::SetRetention, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        match f.body_as_volume_info() {
            Some(v) => Ok(VolumeInfo::from_wire(v)),
            None => self.poison(Err(protocol("expected VolumeInfo"))),
        }
    }

    /// Pins (or unpins) a committed snapshot, with a label (empty: none, or keep the one it
    /// has when unpinning).
    pub fn pin_snapshot(
        &mut self,
        snap_id: u64,
        pinned: bool,
        label: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        let label = (!label.is_empty()).then(|| self.fbb.create_string(label));
        let body = wire::PinSnapshot::create(
            &mut self.fbb,
            &wire::PinSnapshotArgs {
                snap_id,
                pinned,
                label,
            },
        );
        self.send(wire::Message::PinSnapshot, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        match f.body_as_pinned().and_then(|p| p.info()) {
            Some(i) if i.snap_id() == snap_id => Ok(SnapshotInfo::from_wire(i)),
            _ => self.poison(Err(protocol("expected Pinned"))),
        }
    }

    /// Applies the retention policy now (`dry_run`: says what it would delete, deletes
    /// nothing).
    pub fn prune(&mut self, dry_run: bool) -> Result<PruneReport, ClientError> {
        let body = wire::Prune::create(&mut self.fbb, &wire::PruneArgs { dry_run });
        self.send(wire::Message::Prune, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        let Some(p) = f.body_as_pruned() else {
            return self.poison(Err(protocol("expected Pruned")));
        };
        let kept: Vec<u64> = p.kept().map(|k| k.iter().collect()).unwrap_or_default();
        let why: Vec<String> = p
            .kept_for()
            .map(|w| w.iter().map(str::to_string).collect())
            .unwrap_or_default();
        Ok(PruneReport {
            dry_run: p.dry_run(),
            deleted: p.deleted().map(|d| d.iter().collect()).unwrap_or_default(),
            kept: kept
                .into_iter()
                .enumerate()
                .map(|(i, k)| (k, why.get(i).cloned().unwrap_or_default()))
                .collect(),
        })
    }

    pub fn delete_snapshot(&mut self, snap_id: u64) -> Result<u64, ClientError> {
        let body =
            wire::DeleteSnapshot::create(&mut self.fbb, &wire::DeleteSnapshotArgs { snap_id });
        self.send(wire::Message::DeleteSnapshot, body.as_union_value())?;
        self.recv()?;
        let f = self.frame()?;
        match f.body_as_deleted() {
            Some(d) if d.snap_id() == snap_id => Ok(d.merged_into()),
            _ => self.poison(Err(protocol("expected Deleted"))),
        }
    }

    /// Stores the volume's heat map, replacing the one stored (durable when this returns).
    /// `region_blocks`: blocks per entry (a power of two, at least 1); `heat.len()` must be the
    /// volume's block count divided by `region_blocks`, rounded up, and at most
    /// `deltavol_schemas::HEAT_BYTES_MAX`.
    ///
    /// The server checks the shape against the volume's current size (`Malformed`, or
    /// `TooLarge` over the cap: nothing stored); it needs the write role (`Forbidden`) and the
    /// current generation (`StaleGeneration`). Not while a snapshot is being uploaded on this
    /// connection. The map crosses the wire in pieces of at most `FRAME_PAYLOAD_MAX_BYTES`.
    pub fn put_heat(&mut self, region_blocks: u32, heat: &[u8]) -> Result<(), ClientError> {
        if heat.len() > HEAT_BYTES_MAX {
            return Err(usage(format!(
                "put_heat: heat map of {} bytes exceeds the cap of {HEAT_BYTES_MAX}",
                heat.len()
            )));
        }
        if self.upload.is_some() {
            return Err(usage("put_heat while a snapshot is being uploaded"));
        }
        let total_bytes = heat.len() as u32;
        let mut offset = 0usize;
        loop {
            let end = (offset + FRAME_PAYLOAD_MAX_BYTES).min(heat.len());
            let body = wire::PutHeat::create(
                &mut self.fbb,
                &wire::PutHeatArgs {
                    region_blocks,
                    total_bytes,
                    offset: offset as u32,
                },
            );
            self.send_with_payload(
                wire::Message::PutHeat,
                body.as_union_value(),
                &heat[offset..end],
            )?;
            self.recv()?;
            let ack = {
                let f = self.frame()?;
                f.body_as_heat_stored()
                    .map(|a| (a.received_bytes(), a.stored()))
            };
            let last = end == heat.len();
            match ack {
                Some((received, stored)) if received as usize == end && stored == last => {}
                _ => return self.poison(Err(protocol("expected HeatStored for the piece sent"))),
            }
            if last {
                return Ok(());
            }
            offset = end;
        }
    }

    /// The volume's stored heat map: `Some((region_blocks, heat))`, or `None` if none was
    /// stored. Needs the read role.
    pub fn get_heat(&mut self) -> Result<Option<(u32, Vec<u8>)>, ClientError> {
        if self.upload.is_some() {
            return Err(usage("get_heat while a snapshot is being uploaded"));
        }
        let body = wire::GetHeat::create(&mut self.fbb, &wire::GetHeatArgs { reserved: 0 });
        self.send(wire::Message::GetHeat, body.as_union_value())?;
        let mut heat: Vec<u8> = Vec::new();
        let mut first: Option<(bool, u32, u32)> = None;
        loop {
            self.recv()?;
            let r = self.take_heat_frame(&mut first, &mut heat);
            if self.poison(r)? {
                break;
            }
        }
        match first {
            Some((true, region_blocks, _)) => Ok(Some((region_blocks, heat))),
            _ => Ok(None),
        }
    }

    /// Checks one Heat frame (against the first one's present / region_blocks / total) and
    /// appends its bytes to `heat`; returns whether it was the last.
    fn take_heat_frame(
        &self,
        first: &mut Option<(bool, u32, u32)>,
        heat: &mut Vec<u8>,
    ) -> Result<bool, ClientError> {
        let f = self.frame()?;
        let h = f.body_as_heat().ok_or_else(|| protocol("expected Heat"))?;
        let this = (h.present(), h.region_blocks(), h.total_bytes());
        if this.2 as usize > HEAT_BYTES_MAX || (!this.0 && this.2 != 0) {
            return Err(protocol(format!(
                "heat map of {} bytes from the data plane (cap {HEAT_BYTES_MAX})",
                this.2
            )));
        }
        match first {
            None => {
                *first = Some(this);
                heat.reserve_exact(this.2 as usize);
            }
            Some(f) if *f == this => {}
            Some(_) => return Err(protocol("Heat frames of different maps")),
        }
        let end = h.offset() as usize + self.payload.len();
        if h.offset() as usize != heat.len() || end > this.2 as usize {
            return Err(protocol(format!(
                "heat map piece at offset {} of {} bytes, offset {} of {} expected",
                h.offset(),
                self.payload.len(),
                heat.len(),
                this.2
            )));
        }
        heat.extend_from_slice(&self.payload);
        if h.last() != (end == this.2 as usize) {
            return Err(protocol("heat map ended early or late"));
        }
        Ok(h.last())
    }
}

/// Writes every byte of `bufs` (a `write_all` of vectored writes), advancing through them.
fn write_all_vectored(
    w: &mut impl Write,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn client_can_move_to_the_flush_thread() {
        assert_send::<Client>();
        assert_send::<ClientError>();
    }

    #[test]
    fn bad_volume_name_is_refused_before_connecting() {
        let err =
            Client::connect("127.0.0.1:1", b"t", "a/b", Timeouts::default()).expect_err("refused");
        assert_eq!(err.kind(), ClientErrorKind::Usage);
    }
}
