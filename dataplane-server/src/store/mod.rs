//! Per-volume storage: immutable segment files, an atomically replaced manifest, and the
//! in-memory index that answers "block b as of snapshot s".
//!
//! Layout: `DATA_DIR/volumes/<name>/MANIFEST` and `snap-<id>.seg` (see [`mod@format`]).
//!
//! Invariants:
//! * The manifest is the truth: a snapshot exists once the manifest naming it is durable
//!   (segment written, fsynced, renamed, directory fsynced; then manifest written to a temp
//!   name, fsynced, renamed, directory fsynced). Temp files and segments no manifest names are
//!   removed at load, so a crash mid-upload leaves no trace.
//! * A [`Volume`] lives on the thread that owns it (it is `!Send`); its manifest changes are
//!   serialised by `meta_lock`, and at most one upload runs at a time (`upload`): a new
//!   `BeginSnapshot` supersedes a streaming upload (its client may be gone without the
//!   connection having closed yet), never one that is committing. Each upload writes its own
//!   temp file (`snap-<id>.seg.<epoch>.tmp`), so a superseded one cannot touch the new one's.
//! * No `RefCell` borrow is held across an `.await`.
//! * A segment whose footer or header fails its checks marks the volume damaged: it is
//!   reported and refused, never silently used. Data crcs are checked on every read.

pub mod backend;
pub mod format;
pub mod layer;
pub mod lease;
pub mod tools;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use backend::{Backend, CreateOutcome, ObjBackend, ObjManifest};
use object_store::path::Path as ObjPath;

use deltavol_schemas::{check_extents, wire, ExtentError};
use tokio_uring::buf::BoundedBuf;

use format::{CloneSourceData, ManifestData, SegExtent, SnapEntry, VolumeId, KIND_DATA, KIND_ZERO};
use layer::{Layer, Src};

/// Largest block size a volume may have.
pub const BLOCK_SIZE_MAX_BYTES: u32 = 64 * 1024;
/// Smallest block size a volume may have.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 512;
/// Largest volume.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;
/// Cap on the extents of one snapshot (bounds the upload's in-memory index).
pub const SNAPSHOT_EXTENTS_MAX: u64 = 4 * 1024 * 1024;
/// Slack on top of a snapshot's data cap.
pub const SNAPSHOT_DATA_SLACK_BYTES: u64 = 64 * 1024 * 1024;

/// Cap on the data one snapshot may carry: four times its volume (a delta holds each block
/// about once; the factor allows overlapping extents) plus [`SNAPSHOT_DATA_SLACK_BYTES`].
pub fn snapshot_data_max_bytes(volume_size: u64) -> u64 {
    volume_size
        .saturating_mul(4)
        .saturating_add(SNAPSHOT_DATA_SLACK_BYTES)
}

/// Cap on the depth of a clone chain (a clone of a clone of ...), bounding a read's fall-through.
pub const CLONE_DEPTH_MAX: usize = 16;

/// Cap on the blocks one `ReadExtents` request may ask for, in bytes.
pub const READ_REQUEST_MAX_BYTES: u64 = 1 << 30;

/// What went wrong, in a few stable kinds (mapped to wire error codes by the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    Io,
    Corrupt,
    Unsupported,
    WrongVolume,
    NoSuchVolume,
    VolumeMismatch,
    BadParent,
    BadSnapshotId,
    UploadInProgress,
    NoUpload,
    OutOfRange,
    Checksum,
    CommitMismatch,
    NoSuchSnapshot,
    DeleteHead,
    StaleGeneration,
    Damaged,
    TooLarge,
    Invalid,
    /// A clone depends on the snapshot.
    InUse,
    /// The volume under this name has another id than the client's (a reused name).
    IdentityMismatch,
}

/// A storage error: a kind, what was being done, and the I/O error if any.
#[derive(Debug, thiserror::Error)]
#[error("{ctx}{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct StoreError {
    kind: StoreErrorKind,
    ctx: String,
    #[source]
    source: Option<io::Error>,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, ctx: impl Into<String>) -> Self {
        Self {
            kind,
            ctx: ctx.into(),
            source: None,
        }
    }

    pub fn io(ctx: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind: StoreErrorKind::Io,
            ctx: ctx.into(),
            source: Some(source),
        }
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

fn io_at(op: &str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let ctx = format!("{op} {}", path.display());
    move |e| StoreError::io(ctx, e)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn segment_name(snap_id: u64) -> String {
    format!("snap-{snap_id}.seg")
}

const MANIFEST_NAME: &str = "MANIFEST";
const TMP_SUFFIX: &str = ".tmp";

/// fsyncs a directory (after a rename in it).
async fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = tokio_uring::fs::File::open(dir)
        .await
        .map_err(io_at("open dir", dir))?;
    f.sync_all().await.map_err(io_at("fsync dir", dir))?;
    f.close().await.map_err(io_at("close dir", dir))
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync dir.
async fn write_atomic(dir: &Path, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let f = tokio_uring::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .await
        .map_err(io_at("create", &tmp))?;
    let (res, _) = f.write_all_at(bytes, 0).await;
    res.map_err(io_at("write", &tmp))?;
    f.sync_all().await.map_err(io_at("fsync", &tmp))?;
    f.close().await.map_err(io_at("close", &tmp))?;
    tokio_uring::fs::rename(&tmp, &dst)
        .await
        .map_err(io_at("rename", &tmp))?;
    sync_dir(dir).await
}

/// Where a segment's bytes are read from.
#[derive(Debug)]
enum SegSrc {
    File(tokio_uring::fs::File),
    /// An object read with ranged GETs.
    Object {
        obj: Arc<ObjBackend>,
        key: ObjPath,
    },
}

/// One immutable segment (a file or an object), open for reads, with its footer's extents
/// (the in-memory index cache: footers are fetched once, when the volume loads).
#[derive(Debug)]
pub struct Segment {
    pub snap_id: u64,
    src: SegSrc,
    pub extents: Vec<SegExtent>,
}

impl Segment {
    /// Reads record `rec`'s whole data into `buf` and checks its crc32c.
    pub async fn read_record(
        &self,
        rec: u32,
        block_size: u32,
        buf: Vec<u8>,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        let Some(e) = self.extents.get(rec as usize).copied() else {
            let err = StoreError::new(
                StoreErrorKind::Corrupt,
                format!("segment {}: no record {rec}", self.snap_id),
            );
            return (Err(err), buf);
        };
        let len = u64::from(e.nblocks) * u64::from(block_size);
        let mut buf = buf;
        buf.clear();
        buf.reserve(len as usize);
        let buf = match &self.src {
            SegSrc::File(file) => {
                let (res, slice) = file
                    .read_exact_at(buf.slice(0..len as usize), e.offset)
                    .await;
                let buf = slice.into_inner();
                if let Err(err) = res {
                    return (
                        Err(StoreError::io(
                            format!("read segment {} at offset {}", self.snap_id, e.offset),
                            err,
                        )),
                        buf,
                    );
                }
                buf
            }
            SegSrc::Object { obj, key } => {
                match obj.get_range_cached(key, e.offset..e.offset + len).await {
                    Ok(b) => {
                        buf.extend_from_slice(&b);
                        buf
                    }
                    Err(err) => return (Err(err), buf),
                }
            }
        };
        let crc = crc32c::crc32c(&buf);
        if crc != e.crc32c {
            let err = StoreError::new(
                StoreErrorKind::Checksum,
                format!(
                    "segment {}: extent at lba {} fails its crc32c on disk",
                    self.snap_id, e.lba
                ),
            );
            return (Err(err), buf);
        }
        (Ok(()), buf)
    }
}

/// The state of a volume behind its `RefCell`.
#[derive(Debug)]
struct VolumeState {
    manifest: ManifestData,
    /// Parallel to `manifest.snapshots`: each snapshot's own layer.
    layers: Vec<Rc<Layer>>,
    segments: HashMap<u64, Rc<Segment>>,
    damaged: Option<String>,
    /// Object backend: segment id → the upload tag naming its object.
    tags: HashMap<u64, u128>,
}

/// The upload a volume is receiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ActiveUpload {
    epoch: u64,
    snap_id: u64,
    generation: u64,
    committing: bool,
}

/// A summary of a volume for replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSummary {
    pub size_bytes: u64,
    pub block_size: u32,
    pub latest_snap_id: u64,
    pub generation: u64,
    pub snapshot_count: u64,
    /// For a clone: the source volume and snapshot.
    pub clone_source: Option<(String, u64)>,
    /// The volume's identity (random at its creation; the compute side's own id when it
    /// created the volume).
    pub volume_id: VolumeId,
    /// Commit time of the chain head, 0 when the chain is empty.
    pub latest_commit_ms: u64,
    /// Cut time of the chain head on the compute node, 0 when none or unknown.
    pub latest_cut_ms: u64,
    pub created_ms: u64,
}

impl VolumeSummary {
    /// Refuses a client whose volume id is not this volume's: another volume that reused the
    /// name. The error names this volume (id, size, head, last commit) and says what to do.
    pub fn check_identity(&self, name: &str, client: &VolumeId) -> Result<(), StoreError> {
        if &self.volume_id == client {
            return Ok(());
        }
        let last = if self.latest_commit_ms == 0 {
            "never".to_string()
        } else {
            format!(
                "{} s ago",
                now_ms().saturating_sub(self.latest_commit_ms) / 1000
            )
        };
        Err(StoreError::new(
            StoreErrorKind::IdentityMismatch,
            format!(
                "the data plane already holds another volume named {name}: id {}, {} bytes, \
                 {} snapshots, chain head {}, last commit {last}; this volume's id is {}. \
                 Give this volume another name, or delete the old one on the data plane first \
                 (deltavol volume delete {name} --id {} --dataplane ... --auth-token-file ...)",
                volume_id_hex(&self.volume_id),
                self.size_bytes,
                self.snapshot_count,
                self.latest_snap_id,
                volume_id_hex(client),
                volume_id_hex(&self.volume_id),
            ),
        ))
    }
}

/// Lower-case hex of a volume id.
pub fn volume_id_hex(id: &VolumeId) -> String {
    deltavol_schemas::volume_id_hex(id)
}

/// A read-only view of a clone's source as of the source snapshot, opened by the clone's
/// shard from the source's files: the source snapshot and every one before it are immutable
/// (their segment files are never rewritten; a deleted predecessor's segment is merged by
/// reference into the next snapshot, which keeps the content as of the source snapshot
/// unchanged) and the source snapshot itself cannot be deleted while a clone depends on it.
/// So the view, once built, stays exact without coordination with the source's owner shard.
#[derive(Debug)]
struct SourceView {
    /// The source's layers up to and including the source snapshot, oldest first.
    layers: Vec<Rc<Layer>>,
    segments: HashMap<u64, Rc<Segment>>,
    /// The source's own clone source, if the source is itself a clone.
    next: Option<Rc<SourceView>>,
}

impl SourceView {
    async fn load(
        backend: &Backend,
        src: &CloneSourceData,
        depth: usize,
    ) -> Result<Rc<SourceView>, StoreError> {
        if depth >= CLONE_DEPTH_MAX {
            return Err(StoreError::new(
                StoreErrorKind::Damaged,
                format!("clone chain deeper than {CLONE_DEPTH_MAX} volumes"),
            ));
        }
        let damaged = |why: String| {
            StoreError::new(
                StoreErrorKind::Damaged,
                format!("clone source {}@{}: {why}", src.volume, src.snap_id),
            )
        };
        let (m, tags) = read_manifest_full(backend, &src.volume)
            .await
            .map_err(|e| damaged(e.to_string()))?
            .ok_or_else(|| damaged("the source volume is gone".into()))?;
        if m.volume_id != src.volume_id {
            return Err(damaged(
                "the source volume was replaced by another volume of the same name".into(),
            ));
        }
        let idx = m
            .snapshots
            .iter()
            .position(|s| s.snap_id == src.snap_id)
            .ok_or_else(|| damaged("the source snapshot is gone".into()))?;
        let mut segments = HashMap::new();
        for s in &m.snapshots[..=idx] {
            for id in &s.segments {
                if segments.contains_key(id) {
                    continue;
                }
                let seg = open_segment_any(backend, &src.volume, &m, &tags, *id)
                    .await
                    .map_err(|e| damaged(format!("segment {id}: {e}")))?;
                segments.insert(*id, Rc::new(seg));
            }
        }
        let layers = m.snapshots[..=idx]
            .iter()
            .map(|s| Rc::new(build_layer(&s.segments, &segments)))
            .collect();
        let next = match &m.clone_source {
            Some(c) => Some(Box::pin(SourceView::load(backend, c, depth + 1)).await?),
            None => None,
        };
        Ok(Rc::new(SourceView {
            layers,
            segments,
            next,
        }))
    }
}

/// Reads and verifies the current manifest of volume `name`; `Ok(None)` when there is none.
pub async fn read_manifest(
    backend: &Backend,
    name: &str,
) -> Result<Option<ManifestData>, StoreError> {
    Ok(read_manifest_full(backend, name).await?.map(|(m, _)| m))
}

/// [`read_manifest`] with the segment tags of the object backend (empty for local).
pub async fn read_manifest_full(
    backend: &Backend,
    name: &str,
) -> Result<Option<(ManifestData, HashMap<u64, u128>)>, StoreError> {
    match backend {
        Backend::Local { volumes_dir } => {
            let path = volumes_dir.join(name).join(MANIFEST_NAME);
            match std::fs::read(&path) {
                Ok(raw) => Ok(Some((format::decode_manifest(&raw, name)?, HashMap::new()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(format!("read {}", path.display()), e)),
            }
        }
        Backend::Object(obj) => Ok(latest_obj_manifest(obj, name)
            .await?
            .map(|(m, om)| (m, om.tags))),
    }
}

/// The highest-numbered manifest object of volume `name`, decoded and checked.
pub async fn latest_obj_manifest(
    obj: &ObjBackend,
    name: &str,
) -> Result<Option<(ManifestData, ObjManifest)>, StoreError> {
    let listed = obj.list(&format!("volumes/{name}/manifest")).await?;
    let mut seq = listed
        .iter()
        .filter_map(|m| m.location.filename().and_then(backend::parse_manifest_name))
        .max();
    // A listing may lag a create: look past what it showed until a number is free.
    loop {
        let next = seq.map_or(1, |s| s + 1);
        if obj
            .head(&obj.key(&backend::manifest_rel(name, next)))
            .await?
            .is_none()
        {
            break;
        }
        seq = Some(next);
    }
    let Some(seq) = seq else {
        return Ok(None);
    };
    let key = obj.key(&backend::manifest_rel(name, seq));
    let raw = obj.get(&key).await?.ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Io,
            format!("manifest {key} vanished while being read (garbage collected?): retry"),
        )
    })?;
    let om = backend::decode_obj_manifest(&raw, key.as_ref())?;
    let m = format::decode_manifest(&om.manifest, name)?;
    if m.sequence != seq {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("manifest {key} says sequence {}", m.sequence),
        ));
    }
    for s in &m.snapshots {
        for id in &s.segments {
            if !om.tags.contains_key(id) {
                return Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("manifest {key} names segment {id} without its object tag"),
                ));
            }
        }
    }
    Ok(Some((m, om)))
}

/// Resolves `holes` through `layers` (newest last); appends what they hold to `out` and
/// returns in `holes` what none of them writes.
fn resolve_level(
    layers: &[Rc<Layer>],
    segments: &HashMap<u64, Rc<Segment>>,
    holes: &mut Vec<(u64, u64)>,
    out: &mut Vec<(u64, u64, PlanSrc)>,
) -> Result<(), StoreError> {
    let mut resolved = Vec::new();
    let mut left = Vec::new();
    for &(hs, he) in holes.iter() {
        layer::resolve(
            layers.iter().rev().map(|l| l.as_ref()),
            hs,
            he,
            &mut resolved,
        );
        for (s, e, src) in resolved.drain(..) {
            match src {
                None => left.push((s, e)),
                Some(Src::Zero) => out.push((s, e, PlanSrc::Zero)),
                Some(Src::Data { seg, rec, rec_lba }) => {
                    let seg = segments.get(&seg).cloned().ok_or_else(|| {
                        StoreError::new(
                            StoreErrorKind::Damaged,
                            format!("segment {seg} is missing"),
                        )
                    })?;
                    out.push((s, e, PlanSrc::Data { seg, rec, rec_lba }));
                }
            }
        }
    }
    *holes = left;
    Ok(())
}

/// One piece of a read plan.
#[derive(Debug, Clone)]
pub enum PlanSrc {
    Zero,
    Data {
        seg: Rc<Segment>,
        rec: u32,
        rec_lba: u64,
    },
}

/// A read "as of" a snapshot, resolved to pieces covering the range exactly, in block order.
#[derive(Debug)]
pub struct ReadPlan {
    pub block_size: u32,
    pub pieces: Vec<(u64, u64, PlanSrc)>,
}

/// A volume owned by one thread.
#[derive(Debug)]
pub struct Volume {
    name: String,
    /// Local backend: the volume's directory (unused by the object backend).
    dir: PathBuf,
    backend: Backend,
    meta_lock: tokio::sync::Mutex<()>,
    /// The upload in progress, if any.
    upload: Cell<Option<ActiveUpload>>,
    /// Epoch of the last upload started (numbers temp files, identifies the current upload).
    upload_epoch: Cell<u64>,
    state: RefCell<VolumeState>,
    /// For a clone: its source, opened at the first read that needs it.
    source_view: RefCell<Option<Rc<SourceView>>>,
}

/// The outcome of a `BeginSnapshot`.
#[derive(Debug)]
pub enum BeginOutcome {
    Started(Upload),
    AlreadyCommitted(SnapEntry),
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates a new volume with an empty chain; with `clone_source`, a metadata-only clone of
    /// that snapshot (the caller checked that it exists and pinned it). `id` is the volume's
    /// identity as the compute side chose it (random here when `None`). On a shared object
    /// store, a volume another server created first under the same name is loaded instead
    /// when it has the same id, geometry and source (`IdentityMismatch` / `VolumeMismatch`
    /// otherwise).
    pub async fn create(
        backend: &Backend,
        name: &str,
        size_bytes: u64,
        block_size: u32,
        clone_source: Option<CloneSourceData>,
        id: Option<VolumeId>,
    ) -> Result<Rc<Volume>, StoreError> {
        check_geometry(size_bytes, block_size)?;
        let volume_id: VolumeId = match id {
            Some(id) => id,
            None => {
                let mut v: VolumeId = [0; 16];
                getrandom::getrandom(&mut v)
                    .map_err(|e| StoreError::io("volume id from getrandom", io::Error::other(e)))?;
                v
            }
        };
        let manifest = ManifestData {
            volume_name: name.to_string(),
            volume_id,
            sequence: 1,
            size_bytes,
            block_size,
            generation: 0,
            created_ms: now_ms(),
            snapshots: Vec::new(),
            clone_source,
        };
        let dir = match backend {
            Backend::Local { volumes_dir } => {
                let dir = volumes_dir.join(name);
                std::fs::create_dir_all(&dir).map_err(io_at("create", &dir))?;
                write_atomic(&dir, MANIFEST_NAME, format::encode_manifest(&manifest)).await?;
                sync_dir(volumes_dir).await?;
                dir
            }
            Backend::Object(obj) => {
                match commit_obj_manifest(obj, name, &manifest, &HashMap::new()).await? {
                    CreateOutcome::Created => PathBuf::new(),
                    CreateOutcome::Exists => {
                        let v = Box::pin(Volume::load(backend, name))
                            .await?
                            .ok_or_else(|| {
                                StoreError::new(
                                    StoreErrorKind::Io,
                                    format!("volume {name}: manifest 1 exists but cannot be read"),
                                )
                            })?;
                        if let Some(id) = id {
                            v.summary().check_identity(name, &id)?;
                        }
                        check_same_geometry(&v.summary(), size_bytes, block_size)?;
                        let theirs = v.clone_source().map(|c| (c.volume, c.snap_id));
                        let ours = manifest
                            .clone_source
                            .as_ref()
                            .map(|c| (c.volume.clone(), c.snap_id));
                        if theirs != ours {
                            return Err(StoreError::new(
                                StoreErrorKind::VolumeMismatch,
                                format!("volume {name} exists with another clone source"),
                            ));
                        }
                        tracing::info!(
                            volume = name,
                            "volume was created by another server: loaded"
                        );
                        return Ok(v);
                    }
                }
            }
        };
        match &manifest.clone_source {
            Some(c) => {
                tracing::info!(volume = name, source = %c.volume, source_snap_id = c.snap_id, "clone volume created")
            }
            None => tracing::info!(volume = name, size_bytes, block_size, "volume created"),
        }
        Ok(Rc::new(Volume {
            name: name.to_string(),
            dir,
            backend: backend.clone(),
            meta_lock: tokio::sync::Mutex::new(()),
            upload: Cell::new(None),
            upload_epoch: Cell::new(0),
            state: RefCell::new(VolumeState {
                manifest,
                layers: Vec::new(),
                segments: HashMap::new(),
                damaged: None,
                tags: HashMap::new(),
            }),
            source_view: RefCell::new(None),
        }))
    }

    /// Loads a volume: verifies the manifest and every segment's header and footer, rebuilds
    /// the index. Local: removes temp files and segments no manifest names first. Returns
    /// `Ok(None)` for a volume without a manifest (a creation that never completed).
    pub async fn load(backend: &Backend, name: &str) -> Result<Option<Rc<Volume>>, StoreError> {
        let Some(state) = load_state(backend, name).await? else {
            return Ok(None);
        };
        let dir = match backend {
            Backend::Local { volumes_dir } => volumes_dir.join(name),
            Backend::Object(_) => PathBuf::new(),
        };
        tracing::info!(
            volume = name,
            snapshots = state.manifest.snapshots.len(),
            segments = state.segments.len(),
            damaged = state.damaged.is_some(),
            "volume loaded"
        );
        Ok(Some(Rc::new(Volume {
            name: name.to_string(),
            dir,
            backend: backend.clone(),
            meta_lock: tokio::sync::Mutex::new(()),
            upload: Cell::new(None),
            upload_epoch: Cell::new(0),
            state: RefCell::new(state),
            source_view: RefCell::new(None),
        })))
    }

    /// Replaces the in-memory state by the store's latest (after another server committed).
    async fn reload(&self) -> Result<(), StoreError> {
        if let Some(st) = load_state(&self.backend, &self.name).await? {
            let mut cur = self.state.borrow_mut();
            if st.manifest.volume_id == cur.manifest.volume_id {
                *cur = st;
            }
        }
        Ok(())
    }

    /// Writes `nm` as the volume's manifest (local: atomically replaced; object: created as
    /// number `nm.sequence`, which fails when another server committed that number first: the
    /// state is then reloaded from the store and the change refused).
    async fn write_manifest(
        &self,
        nm: &ManifestData,
        tags: &HashMap<u64, u128>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local { .. } => {
                write_atomic(&self.dir, MANIFEST_NAME, format::encode_manifest(nm)).await
            }
            Backend::Object(obj) if obj.leases().is_some_and(|l| !l.valid(&self.name)) => {
                // Io, not StaleGeneration: the writer is not fenced, this server just stopped
                // serving the volume; the compute side retries and fails over to the server
                // that holds the lease now.
                Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!(
                        "this data-plane server no longer holds the lease of volume {}: \
                         another server may serve it now; reconnect",
                        self.name
                    ),
                ))
            }
            Backend::Object(obj) => match commit_obj_manifest(obj, &self.name, nm, tags).await? {
                CreateOutcome::Created => Ok(()),
                CreateOutcome::Exists => {
                    tracing::warn!(volume = %self.name, sequence = nm.sequence, "another server committed this manifest number first: reloading");
                    if let Err(e) = self.reload().await {
                        tracing::error!(volume = %self.name, error = %e, "reload after a lost manifest race failed");
                    }
                    let cur = self.state.borrow().manifest.generation;
                    if cur > nm.generation {
                        return Err(stale_generation(&self.name, cur, nm.generation));
                    }
                    Err(StoreError::new(
                        StoreErrorKind::BadParent,
                        format!(
                            "volume {}: another server committed manifest {} first (the chain moved): retry",
                            self.name, nm.sequence
                        ),
                    ))
                }
            },
        }
    }

    fn check_damaged(&self) -> Result<(), StoreError> {
        match &self.state.borrow().damaged {
            Some(why) => Err(StoreError::new(
                StoreErrorKind::Damaged,
                format!("volume {} is damaged: {why}", self.name),
            )),
            None => Ok(()),
        }
    }

    /// The volume's identity.
    pub fn volume_id(&self) -> VolumeId {
        self.state.borrow().manifest.volume_id
    }

    pub fn summary(&self) -> VolumeSummary {
        let st = self.state.borrow();
        let m = &st.manifest;
        VolumeSummary {
            size_bytes: m.size_bytes,
            block_size: m.block_size,
            latest_snap_id: m.snapshots.last().map_or(0, |s| s.snap_id),
            generation: m.generation,
            snapshot_count: m.snapshots.len() as u64,
            clone_source: m
                .clone_source
                .as_ref()
                .map(|c| (c.volume.clone(), c.snap_id)),
            volume_id: m.volume_id,
            latest_commit_ms: m.snapshots.last().map_or(0, |s| s.commit_time_ms),
            latest_cut_ms: m.snapshots.last().map_or(0, |s| s.cut_time_ms),
            created_ms: m.created_ms,
        }
    }

    /// The clone source recorded in the manifest, if this volume is a clone.
    pub fn clone_source(&self) -> Option<CloneSourceData> {
        self.state.borrow().manifest.clone_source.clone()
    }

    /// Fencing: moves the volume's generation past both its current one and `floor` (the
    /// asking connection's) by one, durably (manifest replaced before this returns), and
    /// returns the new value. A streaming upload of an older generation is
    /// abandoned at once (its temp file removed); a commit of an older generation that has not
    /// published yet is refused when it does.
    pub async fn new_generation(&self, floor: u64) -> Result<u64, StoreError> {
        self.check_damaged()?;
        let _guard = self.meta_lock.lock().await;
        let new_manifest = {
            let st = self.state.borrow();
            let mut nm = st.manifest.clone();
            nm.generation = nm.generation.max(floor).checked_add(1).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Invalid, "generation counter exhausted")
            })?;
            nm.sequence += 1;
            nm
        };
        let generation = new_manifest.generation;
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&new_manifest, &tags).await?;
        self.state.borrow_mut().manifest = new_manifest;
        if let Some(a) = self.upload.get() {
            if !a.committing && a.generation < generation {
                self.upload.set(None);
                if let Backend::Local { .. } = self.backend {
                    let tmp = self.dir.join(format!(
                        "{}.{}{TMP_SUFFIX}",
                        segment_name(a.snap_id),
                        a.epoch
                    ));
                    let _ = std::fs::remove_file(&tmp);
                }
                tracing::info!(volume = %self.name, snap_id = a.snap_id, generation = a.generation, "upload of a fenced generation abandoned");
            }
        }
        tracing::info!(volume = %self.name, generation, "new generation: older writers are fenced");
        Ok(generation)
    }

    /// Refuses a writer of generation `generation` when the volume moved past it.
    pub fn check_generation(&self, generation: u64) -> Result<(), StoreError> {
        let current = self.state.borrow().manifest.generation;
        if generation < current {
            return Err(stale_generation(&self.name, current, generation));
        }
        Ok(())
    }

    /// The clone's source view, opened on first use.
    async fn source_view(&self) -> Result<Option<Rc<SourceView>>, StoreError> {
        if let Some(v) = self.source_view.borrow().as_ref() {
            return Ok(Some(Rc::clone(v)));
        }
        let Some(src) = self.clone_source() else {
            return Ok(None);
        };
        let view = SourceView::load(&self.backend, &src, 1).await?;
        *self.source_view.borrow_mut() = Some(Rc::clone(&view));
        Ok(Some(view))
    }

    /// Snapshots with id > `after`, oldest first, at most `max`; and whether more follow.
    pub fn list(&self, after: u64, max: usize) -> (Vec<SnapEntry>, bool) {
        let st = self.state.borrow();
        let mut it = st.manifest.snapshots.iter().filter(|s| s.snap_id > after);
        let page: Vec<SnapEntry> = it.by_ref().take(max).cloned().collect();
        (page, it.next().is_some())
    }

    /// Starts receiving snapshot `snap_id` (see the wire protocol's `BeginSnapshot`).
    pub async fn begin(
        self: &Rc<Self>,
        snap_id: u64,
        parent_id: u64,
        volume_size: u64,
        generation: u64,
        cut_time_ms: u64,
    ) -> Result<BeginOutcome, StoreError> {
        self.check_damaged()?;
        let (volume_id, block_size) = {
            let st = self.state.borrow();
            let m = &st.manifest;
            if let Some(s) = m.snapshots.iter().find(|s| s.snap_id == snap_id) {
                if s.parent_id == parent_id {
                    return Ok(BeginOutcome::AlreadyCommitted(s.clone()));
                }
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "snapshot {snap_id} is already committed with parent {}, not {parent_id}",
                        s.parent_id
                    ),
                ));
            }
            if generation < m.generation {
                return Err(stale_generation(&self.name, m.generation, generation));
            }
            let head = m.snapshots.last().map_or(0, |s| s.snap_id);
            if parent_id != head {
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "parent {parent_id} is not the chain head {head} of volume {}",
                        self.name
                    ),
                ));
            }
            if snap_id == 0 || snap_id <= head {
                return Err(StoreError::new(
                    StoreErrorKind::BadSnapshotId,
                    format!("snapshot id {snap_id} must be greater than the chain head {head}"),
                ));
            }
            if volume_size != m.size_bytes {
                return Err(StoreError::new(
                    StoreErrorKind::VolumeMismatch,
                    format!("snapshot volume size {volume_size} differs from the volume's {} (resize is not supported)", m.size_bytes),
                ));
            }
            (m.volume_id, m.block_size)
        };
        match self.upload.get() {
            Some(a) if a.committing => {
                return Err(StoreError::new(
                    StoreErrorKind::UploadInProgress,
                    format!(
                        "snapshot {} of volume {} is being committed: retry",
                        a.snap_id, self.name
                    ),
                ));
            }
            Some(a) => tracing::warn!(
                volume = %self.name,
                superseded = a.snap_id,
                snap_id,
                "a new upload supersedes one still streaming"
            ),
            None => {}
        }
        let epoch = self.upload_epoch.get() + 1;
        self.upload_epoch.set(epoch);
        self.upload.set(Some(ActiveUpload {
            epoch,
            snap_id,
            generation,
            committing: false,
        }));
        let tmp_path = self
            .dir
            .join(format!("{}.{epoch}{TMP_SUFFIX}", segment_name(snap_id)));
        let mut upload = Upload {
            epoch,
            volume: Rc::clone(self),
            snap_id,
            parent_id,
            generation,
            cut_time_ms,
            volume_size,
            block_size,
            volume_id,
            sink: None,
            tag: 0,
            tmp_path,
            write_off: 0,
            extents: Vec::new(),
            data_bytes: 0,
            batch_seq: 0,
            hdr_buf: Vec::new(),
            finished: false,
        };
        let header = format::encode_segment_header(&volume_id, snap_id, block_size).to_vec();
        match &self.backend {
            Backend::Local { .. } => {
                let f = tokio_uring::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&upload.tmp_path)
                    .await
                    .map_err(io_at("create", &upload.tmp_path))?;
                let (res, _) = f.write_all_at(header, 0).await;
                res.map_err(io_at("write", &upload.tmp_path))?;
                upload.sink = Some(Sink::File(f));
            }
            Backend::Object(obj) => {
                let mut tag = [0u8; 16];
                getrandom::getrandom(&mut tag).map_err(|e| {
                    StoreError::io("segment tag from getrandom", io::Error::other(e))
                })?;
                upload.tag = u128::from_le_bytes(tag);
                let key = obj.key(&backend::segment_rel(&self.name, snap_id, upload.tag));
                upload.tmp_path = PathBuf::from(key.to_string());
                let mut sink = ObjSink {
                    obj: Arc::clone(obj),
                    key,
                    part: Vec::new(),
                    upload: None,
                    parts: 0,
                };
                sink.append(&header).await?;
                upload.sink = Some(Sink::Object(sink));
            }
        }
        upload.write_off = format::SEGMENT_HEADER_BYTES as u64;
        Ok(BeginOutcome::Started(upload))
    }

    /// Plans a read of `[lba, lba + nblocks)` as of `snap_id`. On a clone, blocks the clone's
    /// own chain does not hold fall through to the source as of the source snapshot, and
    /// `snap_id = 0` reads the clone's base (the source alone).
    pub async fn plan_read(
        &self,
        snap_id: u64,
        lba: u64,
        nblocks: u64,
    ) -> Result<ReadPlan, StoreError> {
        self.check_damaged()?;
        let view = self.source_view().await?;
        let st = self.state.borrow();
        let m = &st.manifest;
        let bs = m.block_size;
        let volume_blocks = m.size_bytes / u64::from(bs);
        let end = lba.checked_add(nblocks).filter(|e| *e <= volume_blocks && nblocks > 0).ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::OutOfRange,
                format!("read of lba {lba} + {nblocks} blocks is outside the volume ({volume_blocks} blocks)"),
            )
        })?;
        if nblocks * u64::from(bs) > READ_REQUEST_MAX_BYTES {
            return Err(StoreError::new(
                StoreErrorKind::TooLarge,
                format!("read of {nblocks} blocks exceeds the cap of {READ_REQUEST_MAX_BYTES} bytes a request"),
            ));
        }
        let own = if snap_id == 0 && view.is_some() {
            0
        } else {
            m.snapshots
                .iter()
                .position(|s| s.snap_id == snap_id)
                .ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::NoSuchSnapshot,
                        format!("volume {} has no snapshot {snap_id}", self.name),
                    )
                })?
                + 1
        };
        let mut holes = vec![(lba, end)];
        let mut found = Vec::new();
        resolve_level(&st.layers[..own], &st.segments, &mut holes, &mut found)?;
        let mut level = view;
        while let Some(v) = level {
            if holes.is_empty() {
                break;
            }
            resolve_level(&v.layers, &v.segments, &mut holes, &mut found)?;
            level = v.next.clone();
        }
        found.extend(holes.into_iter().map(|(s, e)| (s, e, PlanSrc::Zero)));
        found.sort_unstable_by_key(|p| p.0);
        let mut pieces: Vec<(u64, u64, PlanSrc)> = Vec::with_capacity(found.len());
        for (s, e, p) in found {
            // Merge adjacent zero pieces.
            if let (PlanSrc::Zero, Some((_, pe, PlanSrc::Zero))) = (&p, pieces.last_mut()) {
                if *pe == s {
                    *pe = e;
                    continue;
                }
            }
            pieces.push((s, e, p));
        }
        Ok(ReadPlan {
            block_size: bs,
            pieces,
        })
    }

    /// Deletes snapshot `snap_id`: its extents merge into the next snapshot of the chain, which
    /// takes over its parent. The chain head cannot be deleted. Returns the absorbing snapshot.
    pub async fn delete_snapshot(&self, snap_id: u64) -> Result<u64, StoreError> {
        self.check_damaged()?;
        if self.backend.loads_lazily() {
            // Several servers: a clone of this snapshot may be loaded by another server only,
            // so ask the store rather than this server's clone registry.
            let volume_id = self.state.borrow().manifest.volume_id;
            if let Some(clone) =
                find_clone_of(&self.backend, &self.name, &volume_id, snap_id).await?
            {
                return Err(StoreError::new(
                    StoreErrorKind::InUse,
                    format!(
                        "snapshot {snap_id} of volume {} is the source of clone {clone}: delete the clone first",
                        self.name
                    ),
                ));
            }
        }
        let _guard = self.meta_lock.lock().await;
        let (new_manifest, idx) = {
            let st = self.state.borrow();
            let m = &st.manifest;
            let idx = m
                .snapshots
                .iter()
                .position(|s| s.snap_id == snap_id)
                .ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::NoSuchSnapshot,
                        format!("volume {} has no snapshot {snap_id}", self.name),
                    )
                })?;
            if idx + 1 == m.snapshots.len() {
                return Err(StoreError::new(
                    StoreErrorKind::DeleteHead,
                    format!("snapshot {snap_id} is the chain head (the next snapshot's parent): it cannot be deleted"),
                ));
            }
            let mut nm = m.clone();
            let gone = nm.snapshots.remove(idx);
            let child = &mut nm.snapshots[idx];
            child.parent_id = gone.parent_id;
            let mut segs = gone.segments;
            segs.extend_from_slice(&child.segments);
            child.segments = segs;
            child.bytes += gone.bytes;
            child.extent_count += gone.extent_count;
            nm.sequence += 1;
            (nm, idx)
        };
        let merged_into = new_manifest.snapshots[idx].snap_id;
        let tags = self.state.borrow().tags.clone();
        self.write_manifest(&new_manifest, &tags).await?;
        let mut st = self.state.borrow_mut();
        let mut merged = Layer::clone(&st.layers[idx]);
        merged.overlay(&st.layers[idx + 1]);
        st.layers.remove(idx);
        st.layers[idx] = Rc::new(merged);
        st.manifest = new_manifest;
        tracing::info!(volume = %self.name, snap_id, merged_into, "snapshot deleted");
        Ok(merged_into)
    }
}

impl Volume {
    /// Deletes the whole volume from the store, after checking that `confirm_id` is its id
    /// (so that a volume created meanwhile under the same name is never deleted). The caller
    /// checked that no clone depends on it. An upload in progress is abandoned.
    ///
    /// Crash-safe: local, the directory is renamed to a hidden tombstone (`.deleted-…`,
    /// never a valid volume name) and the parent synced before it is removed, so the volume
    /// is either whole or gone; a tombstone left by a crash is removed at the next start.
    /// Object store: every manifest but the newest is deleted first, then the newest (from
    /// then on the volume does not exist), then the segments; a crash leaves either the
    /// volume at its newest state or unreferenced segments that a repeated delete or `gc`
    /// removes.
    pub async fn delete_volume(&self, confirm_id: &VolumeId) -> Result<(), StoreError> {
        let _guard = self.meta_lock.lock().await;
        let summary = self.summary();
        if &summary.volume_id != confirm_id {
            return Err(StoreError::new(
                StoreErrorKind::IdentityMismatch,
                format!(
                    "volume {} has id {}, not {}: nothing deleted",
                    self.name,
                    volume_id_hex(&summary.volume_id),
                    volume_id_hex(confirm_id)
                ),
            ));
        }
        self.upload.set(None);
        match &self.backend {
            Backend::Local { volumes_dir } => {
                let mut nonce = [0u8; 8];
                getrandom::getrandom(&mut nonce)
                    .map_err(|e| StoreError::io("getrandom", io::Error::other(e)))?;
                let tomb = volumes_dir.join(format!(
                    "{DELETED_PREFIX}{}-{:016x}",
                    self.name,
                    u64::from_le_bytes(nonce)
                ));
                std::fs::rename(&self.dir, &tomb).map_err(io_at("rename", &self.dir))?;
                sync_dir(volumes_dir).await?;
                if let Err(e) = std::fs::remove_dir_all(&tomb) {
                    tracing::warn!(path = %tomb.display(), error = %e, "could not remove a deleted volume's files; removed at the next start");
                }
            }
            Backend::Object(obj) => {
                let mut manifests: Vec<(u64, object_store::path::Path)> = obj
                    .list(&format!("volumes/{}/manifest", self.name))
                    .await?
                    .into_iter()
                    .filter_map(|m| {
                        let seq = m
                            .location
                            .filename()
                            .and_then(backend::parse_manifest_name)?;
                        Some((seq, m.location))
                    })
                    .collect();
                manifests.sort_by_key(|m| m.0);
                for (_, key) in &manifests {
                    obj.delete(key).await?;
                }
                for m in obj.list(&format!("volumes/{}/seg", self.name)).await? {
                    obj.delete(&m.location).await?;
                }
            }
        }
        self.state.borrow_mut().damaged = Some("deleted".into());
        tracing::info!(volume = %self.name, id = %volume_id_hex(confirm_id), snapshots = summary.snapshot_count, "volume deleted");
        Ok(())
    }
}

/// Local store: directory names of deleted volumes on their way out.
pub const DELETED_PREFIX: &str = ".deleted-";

/// Local store: removes what deletions interrupted by a crash left behind.
pub fn remove_deleted_leftovers(volumes_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(volumes_dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(DELETED_PREFIX) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "could not remove a deleted volume's files");
            }
        }
    }
}

/// A volume of the store that is a clone of any snapshot of `volume` (id `volume_id`).
pub async fn find_any_clone_of(
    backend: &Backend,
    volume: &str,
    volume_id: &VolumeId,
) -> Result<Option<(String, u64)>, StoreError> {
    for name in backend.list_volumes().await? {
        if name == volume || !deltavol_schemas::valid_volume_name(&name) {
            continue;
        }
        let Some(m) = read_manifest(backend, &name).await? else {
            continue;
        };
        if let Some(c) = m
            .clone_source
            .as_ref()
            .filter(|c| c.volume == volume && &c.volume_id == volume_id)
        {
            return Ok(Some((name, c.snap_id)));
        }
    }
    Ok(None)
}

fn stale_generation(volume: &str, current: u64, writer: u64) -> StoreError {
    StoreError::new(
        StoreErrorKind::StaleGeneration,
        format!(
            "volume {volume} is now at generation {current} (recovered elsewhere); this writer \
             (generation {writer}) is fenced"
        ),
    )
}

fn check_geometry(size_bytes: u64, block_size: u32) -> Result<(), StoreError> {
    let ok = block_size.is_power_of_two()
        && (BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&block_size)
        && size_bytes > 0
        && size_bytes <= VOLUME_SIZE_MAX_BYTES
        && size_bytes % u64::from(block_size) == 0;
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "invalid geometry: size {size_bytes} bytes, block size {block_size} (power of two in \
                 {BLOCK_SIZE_MIN_BYTES}..={BLOCK_SIZE_MAX_BYTES}, size a multiple of it, at most {VOLUME_SIZE_MAX_BYTES})"
            ),
        ))
    }
}

/// Checks that an existing volume matches a `CreateVolume` request.
pub fn check_same_geometry(
    v: &VolumeSummary,
    size_bytes: u64,
    block_size: u32,
) -> Result<(), StoreError> {
    if v.size_bytes == size_bytes && v.block_size == block_size {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::VolumeMismatch,
            format!(
                "volume exists with size {} and block size {}, not {size_bytes} / {block_size}",
                v.size_bytes, v.block_size
            ),
        ))
    }
}

/// Removes `*.tmp` files and segment files not in `referenced`.
fn remove_stray_files(dir: &Path, referenced: &HashSet<u64>) -> Result<(), StoreError> {
    let rd = std::fs::read_dir(dir).map_err(io_at("list", dir))?;
    for ent in rd {
        let ent = ent.map_err(io_at("list", dir))?;
        let fname = ent.file_name();
        let Some(fname) = fname.to_str() else {
            continue;
        };
        let stray = if fname.ends_with(TMP_SUFFIX) {
            true
        } else if let Some(id) = fname
            .strip_prefix("snap-")
            .and_then(|s| s.strip_suffix(".seg"))
        {
            id.parse::<u64>()
                .map_or(true, |id| !referenced.contains(&id))
        } else {
            false
        };
        if stray {
            let path = ent.path();
            tracing::info!(path = %path.display(), "removing uncommitted file");
            std::fs::remove_file(&path).map_err(io_at("remove", &path))?;
        }
    }
    Ok(())
}

/// Multi-server mode: makes sure this server holds the lease of volume `name` before a
/// connection uses it. `Ok(None)`: nothing to do (no leases, or the lease was already held);
/// `Ok(Some(v))`: the lease was (re)taken and `v` is the volume freshly loaded from the store
/// (`None` if it does not exist yet): the caller replaces what it had. `Err`: refused, with
/// the reason for the client.
pub async fn claim(backend: &Backend, name: &str) -> Result<Option<Option<Rc<Volume>>>, String> {
    let Backend::Object(obj) = backend else {
        return Ok(None);
    };
    let Some(leases) = obj.leases() else {
        return Ok(None);
    };
    match leases.ensure(obj, name).await {
        Ok(false) => Ok(None),
        Ok(true) => match Volume::load(backend, name).await {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(format!("volume {name}: {e}")),
        },
        Err(e) => Err(format!("volume {name} is {e}")),
    }
}

/// A volume of the store that is a clone of `volume@snap_id`, if any (reads every manifest).
async fn find_clone_of(
    backend: &Backend,
    volume: &str,
    volume_id: &VolumeId,
    snap_id: u64,
) -> Result<Option<String>, StoreError> {
    for name in backend.list_volumes().await? {
        if name == volume {
            continue;
        }
        let Some(m) = read_manifest(backend, &name).await? else {
            continue;
        };
        if m.clone_source.as_ref().is_some_and(|c| {
            c.volume == volume && &c.volume_id == volume_id && c.snap_id == snap_id
        }) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Reads a volume's manifest and opens its segments; `Ok(None)` when it has no manifest.
async fn load_state(backend: &Backend, name: &str) -> Result<Option<VolumeState>, StoreError> {
    let (manifest, tags) = match backend {
        Backend::Local { volumes_dir } => {
            let dir = volumes_dir.join(name);
            let manifest_path = dir.join(MANIFEST_NAME);
            let raw = match std::fs::read(&manifest_path) {
                Ok(raw) => raw,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    remove_stray_files(&dir, &HashSet::new())?;
                    return Ok(None);
                }
                Err(e) => {
                    return Err(StoreError::io(
                        format!("read {}", manifest_path.display()),
                        e,
                    ))
                }
            };
            let manifest = format::decode_manifest(&raw, name)?;
            let referenced: HashSet<u64> = manifest
                .snapshots
                .iter()
                .flat_map(|s| s.segments.iter().copied())
                .collect();
            remove_stray_files(&dir, &referenced)?;
            (manifest, HashMap::new())
        }
        Backend::Object(obj) => match latest_obj_manifest(obj, name).await? {
            Some((m, om)) => (m, om.tags),
            None => return Ok(None),
        },
    };
    let mut ids: Vec<u64> = manifest
        .snapshots
        .iter()
        .flat_map(|s| s.segments.iter().copied())
        .collect::<HashSet<u64>>()
        .into_iter()
        .collect();
    ids.sort_unstable();
    let mut segments = HashMap::new();
    let mut damaged = None;
    for id in ids {
        match open_segment_any(backend, name, &manifest, &tags, id).await {
            Ok(seg) => {
                segments.insert(id, Rc::new(seg));
            }
            Err(e) if e.kind() == StoreErrorKind::Io && matches!(backend, Backend::Object(_)) => {
                return Err(e)
            }
            Err(e) => {
                tracing::error!(volume = name, segment = id, error = %e, "corrupt segment: volume marked damaged");
                damaged.get_or_insert_with(|| format!("segment {id}: {e}"));
            }
        }
    }
    let layers = manifest
        .snapshots
        .iter()
        .map(|s| Rc::new(build_layer(&s.segments, &segments)))
        .collect();
    Ok(Some(VolumeState {
        manifest,
        layers,
        segments,
        damaged,
        tags,
    }))
}

/// Commits `nm` as manifest object number `nm.sequence` of volume `name` (create-if-absent).
/// After an ambiguous error (the put may or may not have landed), reads the number back and
/// compares its nonce with this attempt's: ours → committed, another → lost the race.
async fn commit_obj_manifest(
    obj: &ObjBackend,
    name: &str,
    nm: &ManifestData,
    tags: &HashMap<u64, u128>,
) -> Result<CreateOutcome, StoreError> {
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| StoreError::io("manifest nonce from getrandom", io::Error::other(e)))?;
    let bytes = backend::encode_obj_manifest(&ObjManifest {
        nonce,
        writer_generation: nm.generation,
        tags: tags.clone(),
        manifest: format::encode_manifest(nm),
    });
    let key = obj.key(&backend::manifest_rel(name, nm.sequence));
    match obj.put_create(&key, bytes).await {
        Ok(o) => Ok(o),
        Err(put_err) => {
            tracing::warn!(volume = name, key = %key, error = %put_err, "manifest put failed: reading it back");
            let back = obj.get(&key).await.map_err(|e| {
                StoreError::io(
                    format!("commit of {key}: outcome unknown ({put_err}; read-back: {e})"),
                    io::Error::other("ambiguous commit"),
                )
            })?;
            match back {
                None => Err(put_err),
                Some(raw) => {
                    let om = backend::decode_obj_manifest(&raw, key.as_ref())?;
                    Ok(if om.nonce == nonce {
                        CreateOutcome::Created
                    } else {
                        CreateOutcome::Exists
                    })
                }
            }
        }
    }
}

/// Opens segment `id` of volume `name` in whichever backend holds it.
async fn open_segment_any(
    backend: &Backend,
    name: &str,
    m: &ManifestData,
    tags: &HashMap<u64, u128>,
    id: u64,
) -> Result<Segment, StoreError> {
    match backend {
        Backend::Local { volumes_dir } => {
            open_segment(&volumes_dir.join(name), &m.volume_id, id, m.block_size)
        }
        Backend::Object(obj) => {
            let tag = tags.get(&id).copied().ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("segment {id}: the manifest has no object tag for it"),
                )
            })?;
            let key = obj.key(&backend::segment_rel(name, id, tag));
            open_segment_obj(obj, key, &m.volume_id, id, m.block_size).await
        }
    }
}

/// Object backend: reads a segment's header, trailer and footer with ranged GETs.
pub async fn open_segment_obj(
    obj: &Arc<ObjBackend>,
    key: ObjPath,
    volume_id: &VolumeId,
    snap_id: u64,
    block_size: u32,
) -> Result<Segment, StoreError> {
    let meta = obj.head(&key).await?.ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: object {key} is missing"),
        )
    })?;
    let len = meta.size;
    let min = (format::SEGMENT_HEADER_BYTES + format::SEGMENT_TRAILER_BYTES) as u64;
    if len < min {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: object too short ({len} bytes)"),
        ));
    }
    // One GET for the tail (trailer, and the footer when it is small), one for the header.
    let tail_len = len.min(SEGMENT_TAIL_FETCH_BYTES);
    let tail = obj.get_range(&key, len - tail_len..len).await?;
    let header = obj
        .get_range(&key, 0..format::SEGMENT_HEADER_BYTES as u64)
        .await?;
    format::check_segment_header(&header, volume_id, snap_id, block_size)?;
    let trailer = &tail[tail.len() - format::SEGMENT_TRAILER_BYTES..];
    let (off, flen, fcrc) = format::decode_segment_trailer(trailer, snap_id, len)?;
    let footer_in_tail = off >= len - tail_len;
    let fetched;
    let footer: &[u8] = if footer_in_tail {
        let at = (off - (len - tail_len)) as usize;
        &tail[at..at + flen]
    } else {
        fetched = obj.get_range(&key, off..off + flen as u64).await?;
        &fetched
    };
    let decoded = format::decode_segment_footer(footer, fcrc, volume_id, snap_id, off)?;
    if decoded.block_size != block_size {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: block size differs from the volume's"),
        ));
    }
    Ok(Segment {
        snap_id,
        src: SegSrc::Object {
            obj: Arc::clone(obj),
            key,
        },
        extents: decoded.extents,
    })
}

/// How much of a segment object's end is fetched at open (trailer plus, usually, the footer).
pub const SEGMENT_TAIL_FETCH_BYTES: u64 = 256 * 1024;

/// Opens a segment and verifies header, trailer and footer (not the data: reads check it).
fn open_segment(
    dir: &Path,
    volume_id: &VolumeId,
    snap_id: u64,
    block_size: u32,
) -> Result<Segment, StoreError> {
    let path = dir.join(segment_name(snap_id));
    let f = std::fs::File::open(&path).map_err(io_at("open", &path))?;
    let len = f.metadata().map_err(io_at("stat", &path))?.len();
    let min = (format::SEGMENT_HEADER_BYTES + format::SEGMENT_TRAILER_BYTES) as u64;
    if len < min {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: file too short ({len} bytes)"),
        ));
    }
    let mut header = [0u8; format::SEGMENT_HEADER_BYTES];
    f.read_exact_at(&mut header, 0)
        .map_err(io_at("read", &path))?;
    format::check_segment_header(&header, volume_id, snap_id, block_size)?;
    let mut trailer = [0u8; format::SEGMENT_TRAILER_BYTES];
    f.read_exact_at(&mut trailer, len - format::SEGMENT_TRAILER_BYTES as u64)
        .map_err(io_at("read", &path))?;
    let (off, flen, fcrc) = format::decode_segment_trailer(&trailer, snap_id, len)?;
    let mut footer = vec![0u8; flen];
    f.read_exact_at(&mut footer, off)
        .map_err(io_at("read", &path))?;
    let decoded = format::decode_segment_footer(&footer, fcrc, volume_id, snap_id, off)?;
    if decoded.block_size != block_size {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: block size differs from the volume's"),
        ));
    }
    Ok(Segment {
        snap_id,
        src: SegSrc::File(tokio_uring::fs::File::from_std(f)),
        extents: decoded.extents,
    })
}

/// Builds a snapshot's layer from its segments (oldest first; within a segment, later records
/// win). Missing segments (damaged volume) are skipped: the volume refuses reads then.
fn build_layer(segment_ids: &[u64], segments: &HashMap<u64, Rc<Segment>>) -> Layer {
    let mut layer = Layer::new();
    for id in segment_ids {
        let Some(seg) = segments.get(id) else {
            continue;
        };
        add_segment(&mut layer, seg.snap_id, &seg.extents);
    }
    layer
}

fn add_segment(layer: &mut Layer, seg_id: u64, extents: &[SegExtent]) {
    for (i, e) in extents.iter().enumerate() {
        let src = if e.kind == KIND_ZERO {
            Src::Zero
        } else {
            Src::Data {
                seg: seg_id,
                rec: i as u32,
                rec_lba: e.lba,
            }
        };
        layer.insert(e.lba, e.lba + u64::from(e.nblocks), src);
    }
}

/// A snapshot being received. Dropping it before [`Upload::commit`] abandons it: the temp
/// segment is removed and nothing becomes visible.
#[derive(Debug)]
pub struct Upload {
    epoch: u64,
    volume: Rc<Volume>,
    snap_id: u64,
    parent_id: u64,
    generation: u64,
    /// The compute node's cut time of this snapshot (0 = unknown).
    cut_time_ms: u64,
    volume_size: u64,
    block_size: u32,
    volume_id: VolumeId,
    sink: Option<Sink>,
    /// Object backend: the random tag naming this upload's segment object.
    tag: u128,
    /// Local: the temp file; object: the segment's key (for messages).
    tmp_path: PathBuf,
    write_off: u64,
    extents: Vec<SegExtent>,
    data_bytes: u64,
    batch_seq: u64,
    hdr_buf: Vec<u8>,
    finished: bool,
}

impl Upload {
    pub fn snap_id(&self) -> u64 {
        self.snap_id
    }

    /// Checks one frame of extents (bounds, payload lengths, crc32c) and appends it to the
    /// segment. `payload` is handed back for reuse.
    pub async fn put<'a>(
        &mut self,
        extents: impl ExactSizeIterator<Item = &'a wire::Extent> + Clone,
        payload: Vec<u8>,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        let volume_blocks = self.volume_size / u64::from(self.block_size);
        let count = extents.len();
        if let Err(e) = check_extents(extents.clone(), &payload, self.block_size, volume_blocks) {
            let kind = match e {
                ExtentError::OutOfRange { .. } => StoreErrorKind::OutOfRange,
                ExtentError::Checksum { .. } => StoreErrorKind::Checksum,
                _ => StoreErrorKind::Invalid,
            };
            return (
                Err(StoreError::new(
                    kind,
                    format!("snapshot {}: {e}", self.snap_id),
                )),
                payload,
            );
        }
        if let Err(e) = self
            .volume
            .check_generation(self.generation)
            .and_then(|()| self.check_current())
        {
            return (Err(e), payload);
        }
        if self.extents.len() as u64 + count as u64 > SNAPSHOT_EXTENTS_MAX {
            let e = StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "snapshot {} exceeds {SNAPSHOT_EXTENTS_MAX} extents",
                    self.snap_id
                ),
            );
            return (Err(e), payload);
        }
        let data_max_bytes = snapshot_data_max_bytes(self.volume_size);
        if self.data_bytes + payload.len() as u64 > data_max_bytes {
            let e = StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "snapshot {} exceeds {data_max_bytes} bytes of data (four times the volume size plus slack)",
                    self.snap_id
                ),
            );
            return (Err(e), payload);
        }
        let Some(sink) = self.sink.as_mut() else {
            return (
                Err(StoreError::new(
                    StoreErrorKind::NoUpload,
                    "upload already finished",
                )),
                payload,
            );
        };
        let mut hdr = std::mem::take(&mut self.hdr_buf);
        hdr.clear();
        let records_start = format::BATCH_HEADER_BYTES;
        hdr.resize(records_start, 0);
        for e in extents.clone() {
            format::encode_extent_record(&mut hdr, e.lba(), e.nblocks(), e.crc32c(), e.kind().0);
        }
        let records_crc = crc32c::crc32c(&hdr[records_start..]);
        let batch = format::encode_batch_header(
            count as u32,
            payload.len() as u32,
            records_crc,
            self.batch_seq,
        );
        hdr[..records_start].copy_from_slice(&batch);
        let hdr_len = hdr.len() as u64;
        let (res, hdr) = sink.write(hdr, self.write_off, &self.tmp_path).await;
        self.hdr_buf = hdr;
        if let Err(e) = res {
            return (Err(e), payload);
        }
        let data_off = self.write_off + hdr_len;
        let payload_len = payload.len() as u64;
        let (res, payload) = if payload.is_empty() {
            (Ok(()), payload)
        } else {
            sink.write(payload, data_off, &self.tmp_path).await
        };
        if let Err(e) = res {
            return (Err(e), payload);
        }
        let mut off = data_off;
        for e in extents {
            let is_data = e.kind() == wire::ExtentKind::Data;
            self.extents.push(SegExtent {
                lba: e.lba(),
                nblocks: e.nblocks(),
                kind: if is_data { KIND_DATA } else { KIND_ZERO },
                crc32c: e.crc32c(),
                offset: if is_data { off } else { 0 },
            });
            if is_data {
                off += u64::from(e.nblocks()) * u64::from(self.block_size);
            }
        }
        self.data_bytes += payload_len;
        self.write_off = data_off + payload_len;
        self.batch_seq += 1;
        (Ok(()), payload)
    }

    /// Makes the snapshot durable and visible: footer, fsync, rename, fsync dir, then the
    /// manifest naming it (atomically replaced). Checks the client's counts first.
    pub async fn commit(
        mut self,
        extent_count: u64,
        total_bytes: u64,
    ) -> Result<SnapEntry, StoreError> {
        self.volume.check_generation(self.generation)?;
        self.check_current()?;
        if extent_count != self.extents.len() as u64 || total_bytes != self.data_bytes {
            return Err(StoreError::new(
                StoreErrorKind::CommitMismatch,
                format!(
                    "commit of snapshot {} says {extent_count} extents / {total_bytes} bytes, the server received {} / {}",
                    self.snap_id,
                    self.extents.len(),
                    self.data_bytes
                ),
            ));
        }
        let sink = self
            .sink
            .take()
            .ok_or_else(|| StoreError::new(StoreErrorKind::NoUpload, "upload already finished"))?;
        // From here on no new upload may supersede this one.
        self.volume.upload.set(Some(ActiveUpload {
            epoch: self.epoch,
            snap_id: self.snap_id,
            generation: self.generation,
            committing: true,
        }));
        let footer = format::encode_segment_footer(
            &self.volume_id,
            &format::FooterMeta {
                snap_id: self.snap_id,
                parent_id: self.parent_id,
                block_size: self.block_size,
                volume_size: self.volume_size,
                generation: self.generation,
                data_bytes: self.data_bytes,
            },
            &self.extents,
        );
        let trailer = format::encode_segment_trailer(self.write_off, &footer);
        let mut tail = footer;
        tail.extend_from_slice(&trailer);
        let ready = match sink {
            Sink::File(file) => {
                let (res, _) = file.write_all_at(tail, self.write_off).await;
                res.map_err(io_at("write", &self.tmp_path))?;
                file.sync_all()
                    .await
                    .map_err(io_at("fsync", &self.tmp_path))?;
                file.close().await.map_err(io_at("close", &self.tmp_path))?;
                let dir = self.volume.dir.clone();
                let final_path = dir.join(segment_name(self.snap_id));
                tokio_uring::fs::rename(&self.tmp_path, &final_path)
                    .await
                    .map_err(io_at("rename", &self.tmp_path))?;
                Ready::File { dir, final_path }
            }
            Sink::Object(mut sink) => {
                sink.append(&tail).await?;
                let key = sink.key.clone();
                let obj = Arc::clone(&sink.obj);
                sink.finish().await?;
                Ready::Object { obj, key }
            }
        };
        self.finished = true;
        // On error the segment stays: whether the manifest naming it reached the store is
        // unknown here; local: the next load removes it if no manifest names it; object: it
        // is garbage that `deltavol-dataplane gc` removes.
        let result = self.publish(ready).await;
        self.release();
        result
    }

    async fn publish(&mut self, ready: Ready) -> Result<SnapEntry, StoreError> {
        let src = match &ready {
            Ready::File { dir, final_path } => {
                sync_dir(dir).await?;
                let std_file =
                    std::fs::File::open(final_path).map_err(io_at("open", final_path))?;
                SegSrc::File(tokio_uring::fs::File::from_std(std_file))
            }
            Ready::Object { obj, key } => SegSrc::Object {
                obj: Arc::clone(obj),
                key: key.clone(),
            },
        };
        let volume = Rc::clone(&self.volume);
        let _guard = volume.meta_lock.lock().await;
        if let Err(e) = volume.check_damaged() {
            // Deleted (or found damaged) while this upload was finishing: publish nothing.
            ready.remove();
            return Err(e);
        }
        let entry = SnapEntry {
            snap_id: self.snap_id,
            parent_id: self.parent_id,
            commit_time_ms: now_ms(),
            bytes: self.data_bytes,
            extent_count: self.extents.len() as u64,
            volume_size: self.volume_size,
            generation: self.generation,
            segments: vec![self.snap_id],
            cut_time_ms: self.cut_time_ms,
        };
        let (new_manifest, mut tags) = {
            let st = volume.state.borrow();
            let mut nm = st.manifest.clone();
            if self.generation < nm.generation {
                // Fenced while committing: no manifest names this segment, remove it now.
                ready.remove();
                return Err(stale_generation(
                    &volume.name,
                    nm.generation,
                    self.generation,
                ));
            }
            let head = nm.snapshots.last().map_or(0, |s| s.snap_id);
            if head != self.parent_id {
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "chain head moved to {head} during the upload of snapshot {}",
                        self.snap_id
                    ),
                ));
            }
            nm.snapshots.push(entry.clone());
            nm.sequence += 1;
            nm.generation = nm.generation.max(self.generation);
            (nm, st.tags.clone())
        };
        if let Ready::Object { .. } = ready {
            tags.insert(self.snap_id, self.tag);
        }
        volume.write_manifest(&new_manifest, &tags).await?;
        let extents = std::mem::take(&mut self.extents);
        let mut layer = Layer::new();
        add_segment(&mut layer, self.snap_id, &extents);
        let seg = Segment {
            snap_id: self.snap_id,
            src,
            extents,
        };
        let mut st = volume.state.borrow_mut();
        st.tags = tags;
        st.segments.insert(self.snap_id, Rc::new(seg));
        st.layers.push(Rc::new(layer));
        st.manifest = new_manifest;
        tracing::info!(volume = %volume.name, snap_id = entry.snap_id, bytes = entry.bytes, extents = entry.extent_count, "snapshot committed");
        Ok(entry)
    }
}

impl Upload {
    /// Fails when a newer upload superseded this one.
    fn check_current(&self) -> Result<(), StoreError> {
        match self.volume.upload.get() {
            Some(a) if a.epoch == self.epoch => Ok(()),
            _ => Err(StoreError::new(
                StoreErrorKind::UploadInProgress,
                format!(
                    "the upload of snapshot {} was superseded by a newer upload to volume {}",
                    self.snap_id, self.volume.name
                ),
            )),
        }
    }

    /// Clears the volume's upload slot if it is still this upload's.
    fn release(&self) {
        if self
            .volume
            .upload
            .get()
            .is_some_and(|a| a.epoch == self.epoch)
        {
            self.volume.upload.set(None);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.release();
        if !self.finished && matches!(self.volume.backend, Backend::Local { .. }) {
            // Best effort: a leftover temp file is also removed at the next load. (An object
            // upload's multipart upload is aborted by its sink's drop.)
            let _ = std::fs::remove_file(&self.tmp_path);
            tracing::info!(volume = %self.volume.name, snap_id = self.snap_id, "upload abandoned");
        }
    }
}

/// A committed-to-storage segment waiting for its manifest.
enum Ready {
    File { dir: PathBuf, final_path: PathBuf },
    Object { obj: Arc<ObjBackend>, key: ObjPath },
}

impl Ready {
    /// Removes a segment no manifest will name (best effort).
    fn remove(&self) {
        match self {
            Ready::File { final_path, .. } => {
                let _ = std::fs::remove_file(final_path);
            }
            Ready::Object { obj, key } => {
                let store = obj.store();
                let key = key.clone();
                obj.spawn_detached(async move {
                    let _ = object_store::ObjectStoreExt::delete(store.as_ref(), &key).await;
                });
            }
        }
    }
}

/// Where an upload's segment bytes go.
#[derive(Debug)]
enum Sink {
    File(tokio_uring::fs::File),
    Object(ObjSink),
}

impl Sink {
    /// Writes `buf` at `off` (the object sink only appends: segments are written in order).
    async fn write(
        &mut self,
        buf: Vec<u8>,
        off: u64,
        path: &Path,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        match self {
            Sink::File(f) => {
                let (res, buf) = f.write_all_at(buf, off).await;
                (res.map_err(io_at("write", path)), buf)
            }
            Sink::Object(o) => {
                let res = o.append(&buf).await;
                (res, buf)
            }
        }
    }
}

/// A segment object being uploaded: bytes gather in one part buffer of
/// [`backend::PART_BYTES`]; each full part goes out as a multipart-upload part. A segment that
/// fits in one part is written with a single put at the end. Dropped unfinished, the multipart
/// upload is aborted.
struct ObjSink {
    obj: Arc<ObjBackend>,
    key: ObjPath,
    part: Vec<u8>,
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    parts: u64,
}

impl std::fmt::Debug for ObjSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjSink")
            .field("key", &self.key)
            .field("parts", &self.parts)
            .finish()
    }
}

impl ObjSink {
    async fn append(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            if self.part.capacity() == 0 {
                self.part.reserve_exact(backend::PART_BYTES);
            }
            let n = (backend::PART_BYTES - self.part.len()).min(bytes.len());
            self.part.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.part.len() == backend::PART_BYTES {
                self.flush_part().await?;
            }
        }
        Ok(())
    }

    async fn flush_part(&mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            self.upload = Some(self.obj.start_multipart(&self.key).await?);
        }
        let data = std::mem::take(&mut self.part);
        let fut = self
            .upload
            .as_mut()
            .expect("multipart upload started above")
            .put_part(object_store::PutPayload::from(data));
        self.obj.run(fut).await?.map_err(|e| {
            StoreError::io(
                format!("upload part {} of {}", self.parts + 1, self.key),
                io::Error::other(e),
            )
        })?;
        self.parts += 1;
        Ok(())
    }

    /// Completes the object: durable in the store when this returns.
    async fn finish(mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            let data = std::mem::take(&mut self.part);
            return self.obj.put(&self.key, data).await;
        }
        if !self.part.is_empty() {
            self.flush_part().await?;
        }
        let mut up = self.upload.take().expect("multipart upload started");
        let res = self
            .obj
            .run(async move {
                let r = up.complete().await;
                if r.is_err() {
                    let _ = up.abort().await;
                }
                r
            })
            .await?;
        res.map(|_| ()).map_err(|e| {
            StoreError::io(
                format!("complete the upload of {}", self.key),
                io::Error::other(e),
            )
        })
    }
}

impl Drop for ObjSink {
    fn drop(&mut self) {
        if let Some(mut up) = self.upload.take() {
            let key = self.key.clone();
            self.obj.spawn_detached(async move {
                if let Err(e) = up.abort().await {
                    tracing::warn!(key = %key, error = %e, "aborting an abandoned multipart upload failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod obj_tests {
    //! The object layout against an in-memory store with fault injection: an ambiguous
    //! manifest put (it landed, or another writer's did, but the answer was an error) is
    //! resolved by reading the nonce back; a racing writer that overwrites a create is caught
    //! by the read-back.

    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path as ObjPath;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };

    use super::*;

    /// What the next conditional put does besides (or instead of) its work.
    const NORMAL: u8 = 0;
    /// The put lands, then the answer is an error (a lost response).
    const LAND_THEN_FAIL: u8 = 1;
    /// Another writer's object lands first, then this put fails with a plain error.
    const OTHER_THEN_FAIL: u8 = 2;
    /// Nothing lands; the answer is an error.
    const FAIL: u8 = 3;
    /// Another writer's create "wins" after ours (a store whose conditional put is not
    /// atomic): ours reports success, the object holds the other's bytes.
    const OVERWRITTEN: u8 = 4;

    #[derive(Debug)]
    struct Faulty {
        inner: InMemory,
        next_put: AtomicU8,
        /// What "another writer" puts for `OTHER_THEN_FAIL`.
        other: std::sync::Mutex<Vec<u8>>,
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty(InMemory)")
        }
    }

    fn injected() -> object_store::Error {
        object_store::Error::Generic {
            store: "Faulty",
            source: "injected: connection reset after the request was sent".into(),
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &ObjPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            match self.next_put.swap(NORMAL, Ordering::SeqCst) {
                LAND_THEN_FAIL => {
                    self.inner.put_opts(location, payload, opts).await?;
                    Err(injected())
                }
                OTHER_THEN_FAIL => {
                    let other = PutPayload::from(self.other.lock().unwrap().clone());
                    self.inner.put_opts(location, other, opts).await?;
                    Err(injected())
                }
                FAIL => Err(injected()),
                OVERWRITTEN => {
                    let r = self.inner.put_opts(location, payload, opts).await?;
                    let other = PutPayload::from_static(b"another writer's bytes");
                    self.inner
                        .put_opts(location, other, PutOptions::default())
                        .await?;
                    Ok(r)
                }
                _ => self.inner.put_opts(location, payload, opts).await,
            }
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &ObjPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjPath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjPath,
            to: &ObjPath,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn setup() -> (Arc<Faulty>, Arc<ObjBackend>) {
        let f = Arc::new(Faulty {
            inner: InMemory::new(),
            next_put: AtomicU8::new(NORMAL),
            other: std::sync::Mutex::new(Vec::new()),
        });
        let store: Arc<dyn ObjectStore> = Arc::clone(&f) as Arc<dyn ObjectStore>;
        let obj = ObjBackend::with_store(store, "t".into(), "faulty in-memory".into())
            .expect("object backend");
        (f, Arc::new(obj))
    }

    fn manifest(seq: u64) -> ManifestData {
        ManifestData {
            volume_name: "v".into(),
            volume_id: [9; 16],
            sequence: seq,
            size_bytes: 1 << 20,
            block_size: 4096,
            generation: 3,
            created_ms: 1,
            snapshots: Vec::new(),
            clone_source: None,
        }
    }

    #[test]
    fn ambiguous_manifest_puts_are_resolved_by_the_nonce() {
        let (f, obj) = setup();
        let tags = HashMap::new();
        let commit = |seq: u64| {
            futures::executor::block_on(commit_obj_manifest(&obj, "v", &manifest(seq), &tags))
        };
        // Plain create, then the same number again: the second writer loses.
        assert_eq!(commit(1).unwrap(), CreateOutcome::Created);
        assert_eq!(commit(1).unwrap(), CreateOutcome::Exists);
        // Our put landed but the answer was lost: the nonce read back says it is ours.
        f.next_put.store(LAND_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(2).unwrap(), CreateOutcome::Created);
        let (m, om) = futures::executor::block_on(latest_obj_manifest(&obj, "v"))
            .unwrap()
            .unwrap();
        assert_eq!((m.sequence, om.writer_generation), (2, 3));
        // Nothing landed: an error, and the number stays free.
        f.next_put.store(FAIL, Ordering::SeqCst);
        assert_eq!(commit(3).unwrap_err().kind(), StoreErrorKind::Io);
        assert_eq!(commit(3).unwrap(), CreateOutcome::Created);
        // Another writer's manifest landed at our number, our answer was an error: the
        // nonce read back is not ours, we lost.
        *f.other.lock().unwrap() = backend::encode_obj_manifest(&ObjManifest {
            nonce: [0xee; 16],
            writer_generation: 3,
            tags: HashMap::new(),
            manifest: format::encode_manifest(&manifest(4)),
        });
        f.next_put.store(OTHER_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(4).unwrap(), CreateOutcome::Exists);
        let (_, om) = futures::executor::block_on(latest_obj_manifest(&obj, "v"))
            .unwrap()
            .unwrap();
        assert_eq!(om.nonce, [0xee; 16]);
        // Garbage at our number after an error: refused as corrupt, never taken as ours.
        *f.other.lock().unwrap() = b"not a manifest".to_vec();
        f.next_put.store(OTHER_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(5).unwrap_err().kind(), StoreErrorKind::Corrupt);
    }

    #[test]
    fn a_create_overwritten_by_a_racing_writer_is_not_a_win() {
        let (f, obj) = setup();
        let key = obj.key("x/y");
        f.next_put.store(OVERWRITTEN, Ordering::SeqCst);
        let r = futures::executor::block_on(obj.put_create(&key, b"mine".to_vec())).unwrap();
        assert_eq!(r, CreateOutcome::Exists);
        let r =
            futures::executor::block_on(obj.put_create(&obj.key("x/z"), b"mine".to_vec())).unwrap();
        assert_eq!(r, CreateOutcome::Created);
    }

    #[test]
    fn probe_accepts_an_atomic_store() {
        let (_, obj) = setup();
        futures::executor::block_on(obj.probe_conditional_put()).expect("InMemory is atomic");
        // The probe cleans up after itself.
        assert!(futures::executor::block_on(obj.list("probe"))
            .unwrap()
            .is_empty());
    }
}
