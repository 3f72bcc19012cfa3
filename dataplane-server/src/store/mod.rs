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
//!
//! Where things are, one file a noun:
//! * `volume.rs`: [`Volume`]: creating and loading one, its summary and identity, generations
//!   (fencing), geometry checks, and the lease [`claim`] of multi-server mode.
//! * `manifest.rs`: the manifest: reading the current one ([`read_manifest`],
//!   [`latest_obj_manifest`]) and committing the next one.
//! * `chain.rs`: the snapshot chain: each snapshot's layer, listing, deleting a snapshot
//!   (merged into its successor).
//! * `segment_writer.rs`: receiving a snapshot ([`Volume::begin`], [`Upload`]).
//! * `segment_reader.rs`: opening a [`Segment`] and reading its records.
//! * `read_plan.rs`: a read as of a snapshot ([`Volume::plan_read`], [`ReadPlan`]).
//! * `clones.rs`: a clone's view of its source; finding the clones of a volume.
//! * `delete.rs`: deleting a whole volume.
//! * `heat.rs`: the volume's read heat map (not part of any snapshot).
//! * `local.rs`: the local backend's file names, atomic replace, removal of stray files.
//! * `error.rs`: [`StoreError`] and its [`StoreErrorKind`].
//! * [`mod@layer`]: one snapshot's in-memory index; [`mod@format`]: the on-disk formats;
//!   [`mod@backend`]: local filesystem or object store; [`mod@lease`]: volume leases on a
//!   shared object store; [`mod@tools`]: the offline `verify` and `gc`.
//!
//! Each cap lives with what it bounds: a volume's geometry in `volume.rs`, a snapshot's size in
//! `segment_writer.rs`, a read request in `read_plan.rs`, a clone chain's depth in `clones.rs`.
//!
//! * [`mod@compaction`]: rewriting the segments of a snapshot that hold dead bytes (left by
//!   deleted snapshots merged into it) or are too many, and deleting what they replaced.

pub mod backend;
pub mod compaction;
pub mod format;
pub mod layer;
pub mod lease;
pub mod tools;

mod chain;
mod clones;
mod delete;
mod error;
mod heat;
mod local;
mod manifest;
mod read_plan;
mod segment_reader;
mod segment_writer;
mod volume;

use std::time::{SystemTime, UNIX_EPOCH};

pub use clones::{find_any_clone_of, CLONE_DEPTH_MAX};
pub use compaction::{CompactOutcome, COMPACT_ID_BIT};
pub use delete::{remove_deleted_leftovers, DELETED_PREFIX};
pub use error::{StoreError, StoreErrorKind};
pub use heat::{check_heat, decode_heat, encode_heat, heat_entries, heat_rel};
pub use manifest::{
    latest_obj_manifest, read_floor, read_manifest, read_manifest_full, trim_manifests, Trimmed,
    KEEP_MANIFESTS, TRIM_EVERY,
};
pub use read_plan::{PlanSrc, ReadPlan, READ_REQUEST_MAX_BYTES};
pub use segment_reader::{open_segment_obj, Segment, SEGMENT_TAIL_FETCH_BYTES};
pub use segment_writer::{
    snapshot_data_max_bytes, BeginOutcome, Upload, SNAPSHOT_DATA_SLACK_BYTES, SNAPSHOT_EXTENTS_MAX,
};
pub use volume::{
    check_same_geometry, claim, volume_id_hex, Volume, VolumeSummary, BLOCK_SIZE_MAX_BYTES,
    BLOCK_SIZE_MIN_BYTES, VOLUME_SIZE_MAX_BYTES,
};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
