//! Errors of the deltavol library: one small, stable [`ErrorKind`] plus the context a user
//! needs to act (path, offset, operation). Mapping to errno happens only at the ublk boundary
//! ([`Error::errno`]).

use std::path::PathBuf;

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input from the user: a size, a name, a flag combination.
    InvalidInput,
    /// A file on disk is not what it must be: bad magic, checksum, version or feature bits.
    Corrupt,
    /// The cache dir or backing file belongs to another volume, or has another size.
    Mismatch,
    /// An I/O error from the operating system.
    Io,
    /// The volume is already attached by another process.
    Busy,
    /// The volume is shutting down.
    ShuttingDown,
}

/// An error with its kind, context and cause.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    #[source]
    source: Option<std::io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// An OS error during `op` on `path` (at `offset`, when it matters).
    pub fn io(op: &str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        Error {
            kind: ErrorKind::Io,
            msg: format!("{op} {}: {source}", path.display()),
            source: Some(source),
        }
    }

    pub fn io_at(op: &str, path: impl Into<PathBuf>, offset: u64, source: std::io::Error) -> Self {
        let path = path.into();
        Error {
            kind: ErrorKind::Io,
            msg: format!("{op} {} at offset {offset}: {source}", path.display()),
            source: Some(source),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, msg)
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }

    pub fn mismatch(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, msg)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The negative errno the ublk driver is given for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::InvalidInput => -libc::EINVAL,
            ErrorKind::Busy => -libc::EBUSY,
            ErrorKind::ShuttingDown => -libc::ESHUTDOWN,
            _ => match self.source.as_ref().and_then(|e| e.raw_os_error()) {
                Some(e) => -e,
                None => -libc::EIO,
            },
        }
    }
}
