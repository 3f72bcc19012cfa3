//! Files the server reads again when they change (the credentials file, the TLS certificate
//! and key): what identifies a version of a file, and the thread that looks every so often.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A version of a file: its modification time, length and inode (a file replaced by a
/// rename is a new inode even within one timestamp tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    mtime_ns: i128,
    len: u64,
    ino: u64,
}

/// `path`'s version now; `None` when it cannot be looked at (missing, no permission).
pub fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        len: m.len(),
        ino: m.ino(),
    })
}

/// Calls `look` on `target` every `interval`, on a thread named `name`, until `target` is
/// dropped (the thread holds it weakly).
pub fn every<T: Send + Sync + 'static>(
    name: &str,
    interval: Duration,
    target: &Arc<T>,
    look: fn(&T),
) -> std::io::Result<()> {
    let weak = Arc::downgrade(target);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match weak.upgrade() {
                Some(t) => look(&t),
                None => return,
            }
        })
        .map(|_| ())
}
