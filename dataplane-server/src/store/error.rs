//! Store errors: a [`StoreError`] is a stable [`StoreErrorKind`] (mapped to wire error codes by
//! the server), what was being done, and the I/O error if any.

use std::io;
use std::path::Path;

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

pub(super) fn io_at(op: &str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let ctx = format!("{op} {}", path.display());
    move |e| StoreError::io(ctx, e)
}
