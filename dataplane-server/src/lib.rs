//! deltavol's data plane: a thread-per-core server that keeps every snapshot of every volume.
//!
//! The tree follows the data path:
//! * [`server`]: shards (one tokio-uring runtime per thread, `SO_REUSEPORT` listeners), the
//!   handshake, connection hand-off to the volume's owner shard, request handling.
//! * [`auth`]: challenge–response on a shared secret (HMAC-SHA256).
//! * [`store`]: per-volume segment files, the atomically replaced manifest, the in-memory
//!   index answering "block b as of snapshot s"; [`mod@store::format`] holds the on-disk formats.
//!   [`mod@store::backend`] puts them on the local filesystem (default) or an S3-compatible
//!   object store (numbered manifests committed with create-if-absent puts).
//! * [`metrics`]: the Prometheus `/metrics` endpoint (`--metrics-listen`), read at scrape time.
//! * [`client`]: the blocking client the compute daemon's flush thread uses.
//! * [`cli`]: the `deltavol-dataplane` command line and its config file
//!   (`/etc/deltavol/dataplane.toml`); [`notify`]: systemd readiness.
//!
//! The wire format and schemas live in the `deltavol-schemas` crate.
//!
//! # Protocol
//!
//! Every message is one frame (`u32 LE header_len | wire::Frame flatbuffer | payload`).
//!
//! | client sends | server answers |
//! | --- | --- |
//! | `Hello{protocol_version}` | `Challenge{nonce}` |
//! | `Auth{volume, mac = HMAC-SHA256(token, nonce ‖ volume), generation}` | `AuthOk{VolumeInfo}`, or `Error` and close |
//! | `CreateVolume{size_bytes, block_size}` | `VolumeInfo` (idempotent; `VolumeMismatch` if different) |
//! | `GetVolumeInfo` | `VolumeInfo` |
//! | `BeginSnapshot{snap_id, parent_id, volume_size, generation}` | `BeginOk`, `AlreadyCommitted{SnapshotInfo}`, or `Error` (`BadParent`, `BadSnapshotId`, `StaleGeneration`, `UploadInProgress`, ...) |
//! | `PutExtents{snap_id, extents}` + data payload (≤ 1 MiB) | nothing; on error `Error` and close |
//! | `Commit{snap_id, extent_count, total_bytes}` | `Committed{SnapshotInfo}` once durable |
//! | `ListSnapshots{after_snap_id, max_count}` | `SnapshotList{snapshots, more}` (pages of ≤ 256) |
//! | `ReadExtents{snap_id, lba, nblocks}` | `ReadData{extents, last}` + payload, repeated until `last` |
//! | `DeleteSnapshot{snap_id}` | `Deleted{snap_id, merged_into}` (`DeleteHead` for the head, `InUse` when a clone depends on it or it is pinned) |
//! | `SetRetention{policy}` | `VolumeInfo` (with `retention`); the policy is applied at once and after every commit ([`retention`]) |
//! | `PinSnapshot{snap_id, pinned, label}` | `Pinned{SnapshotInfo}` (with `pinned`, `label`) |
//! | `Prune{dry_run}` | `Pruned{deleted, kept, kept_for, dry_run}` |
//! | `NewGeneration{}` | `VolumeInfo` with the new generation (durable); older writers are fenced |
//! | `CloneVolume{source_volume, source_snap_id}` | `VolumeInfo` of the new clone (`VolumeExists`, `NoSuchVolume`, `NoSuchSnapshot`) |
//! | `DeleteVolume{volume_id}` | `VolumeInfo` (`exists` false; `InUse` while a clone depends on it) |
//! | `ReadChecksums{snap_id, lba, nblocks}` | `Checksums{snap_id, lba, crcs}` (≤ `CHECKSUM_BLOCKS_MAX` blocks) |
//! | `PutHeat{region_blocks, total_bytes, offset}` + a piece of the heat map as payload (≤ 1 MiB), in order | `HeatStored{received_bytes, stored}` per piece; `stored` on the last, once durable (write role; `Malformed` / `TooLarge` for a bad shape, nothing stored) |
//! | `GetHeat{}` | `Heat{region_blocks, present, total_bytes, offset, last}` + a piece as payload, repeated until `last` (read role) |
//!
//! Generations: a connection writes as the generation it authenticated with (or got from its
//! own `NewGeneration`); `BeginSnapshot`, `PutExtents`, `Commit`, `DeleteSnapshot` and
//! `PutHeat` of a generation older than the volume's are refused with `StaleGeneration`, reads
//! are not.
//!
//! Heat map: one byte per region of `region_blocks` blocks (a power of two) of the volume,
//! 0 = cold .. 255 = hottest, ceil(volume blocks / region_blocks) bytes, at most
//! `HEAT_BYTES_MAX` (4 MiB): the compute node's record of what the application reads most, so
//! that a recovery hydrates it first. One per volume, replaced by every complete `PutHeat`, not
//! part of any snapshot (retention and compaction never touch it); deleted with the volume; a
//! clone starts without one. `PutHeat` of a fenced generation is `StaleGeneration`.
//!
//! Clones: reads as of a clone's snapshot fall through, for blocks its own chain never wrote,
//! to the source as of the source snapshot; `ReadExtents{snap_id: 0}` on a clone reads its
//! base (the source alone).
//!
//! After `AuthOk` the connection is bound to its volume: no request names a volume.

pub mod auth;
pub mod cli;
pub mod client;
pub mod credentials;
pub mod filewatch;
pub mod metrics;
pub mod notify;
pub mod retention;
pub mod server;
pub mod store;
pub mod tls;

pub use client::{
    BeginOutcome, Client, ClientAccess, ClientError, ClientErrorKind, PruneReport, SnapshotInfo,
    Timeouts, ToClientAccess, VolumeInfo,
};
pub use deltavol_schemas::wire::ErrorCode;
pub use server::{
    start, start_with_backend, ConnLimits, ServerConfig, ServerError, ServerHandle, ServerStats,
};
pub use store::backend::{BackendConfig, S3Config};
