//! Harnesses shared by the fuzz targets and by the test that checks the committed seeds
//! (`dataplane-server/tests/fuzz_seeds.rs` includes [`store`] by path).

pub mod store;

/// The data plane's on-disk decoders, compiled here from their own source file
/// (`dataplane-server/src/store/format.rs`, as [`store_format`]), so the fuzz build needs only the schemas crate
/// and not the data plane's whole dependency tree (the object-store client, TLS, HTTP), which
/// would make the sanitizer build take several times longer. The file's only outside names
/// are `super::{StoreError, StoreErrorKind}`, given here with the same shape.
pub mod store_shim {
    /// Mirrors the data plane's `StoreErrorKind` (the variants `format.rs` uses, and the rest).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        InUse,
    }

    /// Mirrors the data plane's `StoreError` (kind and context).
    #[derive(Debug)]
    pub struct StoreError {
        kind: StoreErrorKind,
        ctx: String,
    }

    impl StoreError {
        pub fn new(kind: StoreErrorKind, ctx: impl Into<String>) -> Self {
            Self {
                kind,
                ctx: ctx.into(),
            }
        }

        pub fn kind(&self) -> StoreErrorKind {
            self.kind
        }
    }

    impl std::fmt::Display for StoreError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.ctx)
        }
    }
}

// format.rs reaches these as `super::{StoreError, StoreErrorKind}`: the crate root here.
pub use store_shim::{StoreError, StoreErrorKind};

#[path = "../../dataplane-server/src/store/format.rs"]
#[allow(dead_code)]
pub mod store_format;
