//! A volume: [`Volume`] (the owner thread's handle on its manifest, segments and index),
//! creating and loading one, its summary and identity, generations (fencing), geometry
//! checks, and the lease claim of multi-server mode.
//!
//! The other operations on a [`Volume`] each live with their noun (uploads in
//! `segment_writer.rs`, reads in `read_plan.rs`, the chain in `chain.rs`, ...): see the map
//! in `store/mod.rs`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;

use super::backend::{Backend, CreateOutcome};
use super::chain::build_layer;
use super::clones::SourceView;
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::{self, CloneSourceData, ManifestData, VolumeId};
use super::layer::Layer;
use super::local::{
    remove_stray_files, segment_name, sync_dir, write_atomic, MANIFEST_NAME, TMP_SUFFIX,
};
use super::manifest::{commit_obj_manifest, latest_obj_manifest};
use super::now_ms;
use super::segment_reader::{open_segments, Segment};
use super::segment_writer::ActiveUpload;

/// Largest block size a volume may have.
pub const BLOCK_SIZE_MAX_BYTES: u32 = 64 * 1024;
/// Smallest block size a volume may have.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 512;
/// Largest volume.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;

/// The state of a volume behind its `RefCell`.
#[derive(Debug)]
pub(super) struct VolumeState {
    pub(super) manifest: ManifestData,
    /// Parallel to `manifest.snapshots`: each snapshot's own layer.
    pub(super) layers: Vec<Rc<Layer>>,
    pub(super) segments: HashMap<u64, Rc<Segment>>,
    pub(super) damaged: Option<String>,
    /// Object backend: segment id → the upload tag naming its object.
    pub(super) tags: HashMap<u64, u128>,
    /// Object backend: segment objects compaction replaced, deleted once their grace period
    /// is over (see [`super::backend::Retired`]).
    pub(super) retired: Vec<super::backend::Retired>,
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
    /// The retention policy (all zero: none).
    pub retention: super::format::RetentionCounts,
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

/// A volume owned by one thread.
#[derive(Debug)]
pub struct Volume {
    pub(super) name: String,
    /// Local backend: the volume's directory (unused by the object backend).
    pub(super) dir: PathBuf,
    pub(super) backend: Backend,
    pub(super) meta_lock: tokio::sync::Mutex<()>,
    /// Serialises heat map writes (and a deletion against them); taken after `meta_lock`.
    pub(super) heat_lock: tokio::sync::Mutex<()>,
    /// The upload in progress, if any.
    pub(super) upload: Cell<Option<ActiveUpload>>,
    /// Epoch of the last upload started (numbers temp files, identifies the current upload).
    pub(super) upload_epoch: Cell<u64>,
    pub(super) state: RefCell<VolumeState>,
    /// For a clone: its source, opened at the first read that needs it.
    pub(super) source_view: RefCell<Option<Rc<SourceView>>>,
    /// When each snapshot was last read (retention keeps snapshots being read).
    pub(super) reads: RefCell<HashMap<u64, std::time::Instant>>,
    /// A background compaction task runs ([`Volume::kick_compaction`]).
    pub(super) compacting: Cell<bool>,
    /// It was kicked again while running: it runs another pass.
    pub(super) compact_again: Cell<bool>,
    /// Wakes the task while it waits for retired objects to come due.
    pub(super) compact_wake: tokio::sync::Notify,
    /// What compaction planning knows of each snapshot's layer.
    pub(super) compact_stats: RefCell<super::compaction::StatsCache>,
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
            retention: Default::default(),
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
                // The floor of a deleted volume of this name (a deletion that crashed, or a
                // trim that raced it) would make this create look stale: no manifest, no floor.
                if super::manifest::read_floor(obj, name).await? > 0
                    && latest_obj_manifest(obj, name).await?.is_none()
                {
                    obj.delete(&obj.key(&super::backend::floor_rel(name)))
                        .await?;
                }
                match commit_obj_manifest(obj, name, &manifest, &HashMap::new(), &[]).await? {
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
            heat_lock: tokio::sync::Mutex::new(()),
            upload: Cell::new(None),
            upload_epoch: Cell::new(0),
            state: RefCell::new(VolumeState {
                manifest,
                layers: Vec::new(),
                segments: HashMap::new(),
                damaged: None,
                tags: HashMap::new(),
                retired: Vec::new(),
            }),
            source_view: RefCell::new(None),
            reads: RefCell::new(HashMap::new()),
            compacting: Cell::new(false),
            compact_again: Cell::new(false),
            compact_wake: tokio::sync::Notify::new(),
            compact_stats: RefCell::new(Default::default()),
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
            heat_lock: tokio::sync::Mutex::new(()),
            upload: Cell::new(None),
            upload_epoch: Cell::new(0),
            state: RefCell::new(state),
            source_view: RefCell::new(None),
            reads: RefCell::new(HashMap::new()),
            compacting: Cell::new(false),
            compact_again: Cell::new(false),
            compact_wake: tokio::sync::Notify::new(),
            compact_stats: RefCell::new(Default::default()),
        })))
    }

    /// Replaces the in-memory state by the store's latest (after another server committed).
    pub(super) async fn reload(&self) -> Result<(), StoreError> {
        if let Some(st) = load_state(&self.backend, &self.name).await? {
            let mut cur = self.state.borrow_mut();
            if st.manifest.volume_id == cur.manifest.volume_id {
                *cur = st;
            }
        }
        Ok(())
    }

    pub(super) fn check_damaged(&self) -> Result<(), StoreError> {
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
            retention: m.retention,
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
}

pub(super) fn stale_generation(volume: &str, current: u64, writer: u64) -> StoreError {
    StoreError::new(
        StoreErrorKind::StaleGeneration,
        format!(
            "volume {volume} is now at generation {current} (recovered elsewhere); this writer \
             (generation {writer}) is fenced"
        ),
    )
}

/// Checks a new volume's geometry. Its block size is a power of two in
/// `BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES`, or such a power of two plus
/// `ENVELOPE_BYTES` (64): a volume encrypted on its compute node stores each block as an
/// envelope (header + ciphertext, `deltavol::crypt::ENVELOPE_BYTES`), which this server keeps
/// like any other block without being able to read it.
fn check_geometry(size_bytes: u64, block_size: u32) -> Result<(), StoreError> {
    /// Bytes a client-side encryption envelope adds to a block (`deltavol::crypt`).
    const ENVELOPE_BYTES: u32 = 64;
    let pow2 =
        |b: u32| b.is_power_of_two() && (BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&b);
    let ok = (pow2(block_size) || block_size.checked_sub(ENVELOPE_BYTES).is_some_and(pow2))
        && size_bytes > 0
        && size_bytes <= VOLUME_SIZE_MAX_BYTES
        && size_bytes % u64::from(block_size) == 0;
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "invalid geometry: size {size_bytes} bytes, block size {block_size} (a power of two in \
                 {BLOCK_SIZE_MIN_BYTES}..={BLOCK_SIZE_MAX_BYTES}, or one plus {ENVELOPE_BYTES} for an encrypted \
                 volume's envelopes; size a positive multiple of it, at most {VOLUME_SIZE_MAX_BYTES})"
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

/// Reads a volume's manifest and opens its segments; `Ok(None)` when it has no manifest.
async fn load_state(backend: &Backend, name: &str) -> Result<Option<VolumeState>, StoreError> {
    let (manifest, tags, retired) = match backend {
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
            (manifest, HashMap::new(), Vec::new())
        }
        Backend::Object(obj) => match latest_obj_manifest(obj, name).await? {
            Some((m, om)) => (m, om.tags, om.retired),
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
    let opened = open_segments(backend, name, &manifest, &tags, ids).await;
    for (id, res) in opened {
        match res {
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
        retired,
    }))
}
