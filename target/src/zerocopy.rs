//! Zero copy (`UBLK_F_AUTO_BUF_REG`, Linux 6.16 and later): which path a volume's requests
//! take (`--zero-copy auto|on|off`), decided once per device from the kernel's features.
//!
//! ## What the kernel offers (`drivers/block/ublk_drv.c`, 6.16 and later)
//! - With `UBLK_F_AUTO_BUF_REG`, before the driver hands a READ or WRITE request to the
//!   server it registers the request's pages in the io_uring buffer table of the ring that
//!   issued the tag's FETCH / COMMIT_AND_FETCH, at the index that command names (in
//!   `sqe->addr`, a `ublk_auto_buf_reg`), and unregisters them when the tag commits. The
//!   server moves the data with READ_FIXED / WRITE_FIXED on that same ring (`buf_index` = the
//!   index; `addr` = the byte offset into the request, since the kernel registers the pages
//!   at address 0). The driver itself copies nothing to or from user memory.
//! - What has to pass through user memory reaches the request by user copy: `pwrite` /
//!   `pread` on `/dev/ublkcN` at `ublk_user_copy_pos(q, tag, offset)`, which needs
//!   `UBLK_F_USER_COPY`. The driver accepts `UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG`
//!   together (add_dev refuses them only for unprivileged devices). Here that is a read-cache
//!   hit or fill and a block fetched from the data plane while hydrating: served through the
//!   tag's own memory, then copied into the request, as many copies as the copy path makes.
//! - `UBLK_AUTO_BUF_REG_FALLBACK`: should the registration fail (the index taken), the
//!   request is delivered flagged `UBLK_IO_F_NEED_REG_BUF` instead of failed; such a request
//!   is served on the copy path through user copy ([`crate::queue`]).
//!
//! No volume needs zero copy off: client-side encryption seals only what goes to the data
//! plane (the mirror and the backing file hold plaintext), and hydration and the read cache
//! take the user-copy route above per run of blocks. Every crash guarantee is the copy
//! path's: a write's journal record is linked behind its WRITE_FIXED exactly as behind a plain
//! write (`cache::io`), FLUSH and FUA unchanged.
//!
//! What zero copy cannot do is the copy path's inline first attempt (a synchronous
//! `pread`/`pwrite` on the queue thread, see [`crate::ring`]): every data transfer is an SQE.
//! On a filesystem that serves an SQE at submission (an SSD filesystem's page-cache reads; its
//! buffered writes go to a worker thread on either path) zero copy does the same work minus a
//! copy. On tmpfs and ramfs every SQE goes to an io-wq worker thread (no `FMODE_NOWAIT`), while
//! the copy path copies inline on the queue thread: there the copy path is much faster (2–4×
//! at 4k, `bench/results/zerocopy-2026-12-05.md`). Hence `auto` is zero copy where the kernel
//! has it *and* the cache files are not on a memory filesystem; `on` forces it.

use libublk::sys;
use serde::Serialize;

/// `--zero-copy`: whether the device runs with `UBLK_F_AUTO_BUF_REG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ZeroCopy {
    /// Zero copy where the kernel has it (`UBLK_F_AUTO_BUF_REG`, Linux 6.16+) and the cache
    /// files are not on a memory filesystem (tmpfs, ramfs); else copy.
    #[default]
    Auto,
    /// Zero copy, or refuse to start on a kernel without it.
    On,
    /// Always the copy path.
    Off,
}

impl ZeroCopy {
    /// The default when `--zero-copy` is not given: `DELTAVOL_ZERO_COPY` (auto, on or off),
    /// else auto. An unknown value is an error, not a guess.
    pub fn from_env() -> anyhow::Result<ZeroCopy> {
        match std::env::var("DELTAVOL_ZERO_COPY") {
            Err(_) => Ok(ZeroCopy::Auto),
            Ok(v) => Self::parse(&v),
        }
    }

    fn parse(v: &str) -> anyhow::Result<ZeroCopy> {
        <ZeroCopy as clap::ValueEnum>::from_str(v, true).map_err(|_| {
            anyhow::anyhow!("DELTAVOL_ZERO_COPY={v:?}: use auto, on or off (or --zero-copy)")
        })
    }
}

/// The device flags zero copy needs: auto buffer registration for the files' I/O, user copy
/// for what passes through memory.
pub const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

/// How a device's requests reach the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoPath {
    /// Each tag has a buffer in user memory; the driver copies every request's data to or
    /// from it.
    Copy,
    /// The request's own pages, registered in the queue's ring (see the module doc).
    ZeroCopy,
}

impl IoPath {
    /// The path of a device created (or taken over) with negotiated flags `dev_flags`.
    pub fn of_device(dev_flags: u64) -> IoPath {
        if dev_flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS {
            IoPath::ZeroCopy
        } else {
            IoPath::Copy
        }
    }

    /// The flags to create a device with for this path.
    pub fn ctrl_flags(self) -> u64 {
        match self {
            IoPath::Copy => 0,
            IoPath::ZeroCopy => ZERO_COPY_FLAGS,
        }
    }

    /// For `status`.
    pub fn describe(self) -> &'static str {
        match self {
            IoPath::Copy => "copy (the driver copies each request to or from a buffer per tag)",
            IoPath::ZeroCopy => {
                "zero copy (UBLK_F_AUTO_BUF_REG: the request's pages go to and from the files; read-cache and data-plane blocks by user copy)"
            }
        }
    }
}

/// Where the volume's cache files are, as far as the choice of path goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// tmpfs or ramfs: every SQE to it goes through an io-wq thread, the copy path's inline
    /// copies do not.
    Memory,
    /// Anything else (an SSD's filesystem, a block device).
    Disk,
}

/// The path for a new device: `mode` against the driver's `features` (`UBLK_U_CMD_GET_FEATURES`)
/// and the cache files' `medium` (see the module doc). `on` without the features is an error
/// that says what to do.
pub fn select(mode: ZeroCopy, features: u64, medium: Medium) -> Result<IoPath, String> {
    let have = features & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS;
    match (mode, have) {
        (ZeroCopy::Off, _) | (ZeroCopy::Auto, false) => Ok(IoPath::Copy),
        (ZeroCopy::Auto, true) if medium == Medium::Memory => Ok(IoPath::Copy),
        (ZeroCopy::Auto, true) | (ZeroCopy::On, true) => Ok(IoPath::ZeroCopy),
        (ZeroCopy::On, false) => Err(format!(
            "--zero-copy on: this kernel's ublk driver lacks {} (features {features:#x}; zero copy needs Linux 6.16 or later): use --zero-copy auto (copy on this kernel) or off",
            missing(features)
        )),
    }
}

fn missing(features: u64) -> &'static str {
    let auto = features & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0;
    let user = features & u64::from(sys::UBLK_F_USER_COPY) != 0;
    match (auto, user) {
        (false, false) => "UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY",
        (false, true) => "UBLK_F_AUTO_BUF_REG",
        _ => "UBLK_F_USER_COPY",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: u64 = sys::UBLK_F_AUTO_BUF_REG as u64;
    const USER: u64 = sys::UBLK_F_USER_COPY as u64;
    /// What a 6.12 driver reports: user copy and zero copy of its time, no auto registration.
    const K612: u64 = USER | sys::UBLK_F_SUPPORT_ZERO_COPY as u64 | 0x1_0000_0000;

    const DISK: Medium = Medium::Disk;

    #[test]
    fn auto_follows_the_kernel() {
        assert_eq!(
            select(ZeroCopy::Auto, AUTO | USER, DISK),
            Ok(IoPath::ZeroCopy)
        );
        assert_eq!(select(ZeroCopy::Auto, K612, DISK), Ok(IoPath::Copy));
        assert_eq!(select(ZeroCopy::Auto, AUTO, DISK), Ok(IoPath::Copy));
        assert_eq!(select(ZeroCopy::Auto, 0, DISK), Ok(IoPath::Copy));
    }

    #[test]
    fn auto_copies_on_a_memory_filesystem_and_on_does_not() {
        let all = AUTO | USER;
        assert_eq!(
            select(ZeroCopy::Auto, all, Medium::Memory),
            Ok(IoPath::Copy)
        );
        assert_eq!(
            select(ZeroCopy::On, all, Medium::Memory),
            Ok(IoPath::ZeroCopy)
        );
        assert_eq!(select(ZeroCopy::Off, all, Medium::Memory), Ok(IoPath::Copy));
        assert!(select(ZeroCopy::On, K612, Medium::Memory).is_err());
    }

    #[test]
    fn the_environment_default_parses_strictly() {
        assert_eq!(ZeroCopy::parse("on").unwrap(), ZeroCopy::On);
        assert_eq!(ZeroCopy::parse("OFF").unwrap(), ZeroCopy::Off);
        assert_eq!(ZeroCopy::parse("auto").unwrap(), ZeroCopy::Auto);
        let e = ZeroCopy::parse("yes").unwrap_err().to_string();
        assert!(e.contains("auto, on or off"), "{e}");
    }

    #[test]
    fn off_is_always_copy() {
        assert_eq!(select(ZeroCopy::Off, AUTO | USER, DISK), Ok(IoPath::Copy));
        assert_eq!(select(ZeroCopy::Off, 0, DISK), Ok(IoPath::Copy));
    }

    #[test]
    fn on_without_the_feature_is_refused_clearly() {
        assert_eq!(
            select(ZeroCopy::On, AUTO | USER, DISK),
            Ok(IoPath::ZeroCopy)
        );
        let e = select(ZeroCopy::On, K612, DISK).unwrap_err();
        assert!(e.contains("UBLK_F_AUTO_BUF_REG"), "{e}");
        assert!(e.contains("6.16"), "{e}");
        assert!(e.contains("--zero-copy auto"), "{e}");
        let e = select(ZeroCopy::On, AUTO, DISK).unwrap_err();
        assert!(e.contains("UBLK_F_USER_COPY"), "{e}");
    }

    #[test]
    fn the_device_flags_say_the_path() {
        assert_eq!(IoPath::of_device(AUTO | USER | 0x40), IoPath::ZeroCopy);
        assert_eq!(IoPath::of_device(USER), IoPath::Copy);
        assert_eq!(IoPath::of_device(0), IoPath::Copy);
        assert_eq!(
            IoPath::of_device(IoPath::ZeroCopy.ctrl_flags()),
            IoPath::ZeroCopy
        );
        assert_eq!(IoPath::of_device(IoPath::Copy.ctrl_flags()), IoPath::Copy);
    }

    #[test]
    fn status_names_the_path() {
        assert_eq!(
            serde_json::to_value(IoPath::ZeroCopy).unwrap(),
            serde_json::json!("zero-copy")
        );
        assert_eq!(
            serde_json::to_value(IoPath::Copy).unwrap(),
            serde_json::json!("copy")
        );
    }
}
