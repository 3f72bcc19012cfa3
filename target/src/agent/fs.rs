//! Filesystems on volume devices: detection by superblock magic (no blkid needed), mount(2),
//! umount(2) after syncfs, and freeze/thaw (the FIFREEZE/FITHAW ioctls `fsfreeze` uses) for
//! snapshots that are filesystem-consistent.

use anyhow::{bail, Context};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

/// FIFREEZE / FITHAW: `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// The filesystem whose superblock starts the device, by magic: ext2/3/4 (0xEF53 at byte
/// 1080), xfs (`XFSB` at 0), btrfs (`_BHRfS_M` at 65600). `None`: none of these (an empty
/// volume reads as zeroes).
pub fn detect(dev: &Path) -> anyhow::Result<Option<String>> {
    let mut f = std::fs::File::open(dev).with_context(|| format!("open {}", dev.display()))?;
    let mut head = [0u8; 4096];
    f.read_exact(&mut head)
        .with_context(|| format!("read {}", dev.display()))?;
    if let Some(t) = detect_in(&head) {
        return Ok(Some(t.into()));
    }
    let mut b = [0u8; 8];
    if f.seek(SeekFrom::Start(65_600)).is_ok() && f.read_exact(&mut b).is_ok() && &b == b"_BHRfS_M"
    {
        return Ok(Some("btrfs".into()));
    }
    Ok(None)
}

/// [`detect`] on the first 4 KiB of a device.
pub fn detect_in(head: &[u8; 4096]) -> Option<&'static str> {
    if &head[0..4] == b"XFSB" {
        return Some("xfs");
    }
    if head[1080] == 0x53 && head[1081] == 0xEF {
        // ext4 if it has extents or flex_bg (incompat 0x40 / 0x200), else ext2/3: the ext4
        // driver mounts them all.
        return Some("ext4");
    }
    None
}

pub fn mount(dev: &Path, mountpoint: &Path, fstype: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("create {}", mountpoint.display()))?;
    nix::mount::mount(
        Some(dev),
        mountpoint,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mount {} ({fstype}) on {}",
            dev.display(),
            mountpoint.display()
        )
    })
}

pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    if let Ok(d) = std::fs::File::open(mountpoint) {
        // SAFETY: syncfs takes an open file descriptor, which `d` holds for the call.
        unsafe { libc::syncfs(d.as_raw_fd()) };
    }
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()).with_context(|| {
        format!(
            "unmount {} (still in use by a process outside the containers?)",
            mountpoint.display()
        )
    })
}

/// Whether `mountpoint` is a mount point in this mount namespace (`/proc/self/mountinfo`).
pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape(mp) == want)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fs_ioctl(mountpoint: &Path, req: libc::c_ulong, what: &str) -> std::io::Result<()> {
    let d = std::fs::File::open(mountpoint)?;
    // SAFETY: FIFREEZE/FITHAW take an int argument by value (ignored by the kernel) on an open
    // descriptor of the filesystem's root, which `d` holds for the call; no memory is passed.
    let r = unsafe { libc::ioctl(d.as_raw_fd(), req as _, 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!(mountpoint = %mountpoint.display(), error = %e, "{what}");
        return Err(e);
    }
    Ok(())
}

pub fn freeze(mountpoint: &Path) -> anyhow::Result<()> {
    if !is_mounted(mountpoint) {
        bail!("{} is not mounted: nothing to freeze", mountpoint.display());
    }
    fs_ioctl(mountpoint, FIFREEZE, "freeze")
        .with_context(|| format!("freeze the filesystem at {}", mountpoint.display()))
}

pub fn thaw(mountpoint: &Path) -> anyhow::Result<()> {
    match fs_ioctl(mountpoint, FITHAW, "thaw") {
        // EINVAL: it was not frozen.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.with_context(|| format!("thaw the filesystem at {}", mountpoint.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_ext4_and_xfs_magic_and_nothing_on_zeroes() {
        let mut h = [0u8; 4096];
        assert_eq!(detect_in(&h), None);
        h[1080] = 0x53;
        h[1081] = 0xEF;
        assert_eq!(detect_in(&h), Some("ext4"));
        let mut x = [0u8; 4096];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(detect_in(&x), Some("xfs"));
        // On a file: zeroes, then ext4 magic.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 70_000]).unwrap();
        assert_eq!(detect(&p).unwrap(), None);
        let mut img = vec![0u8; 70_000];
        img[65_600..65_608].copy_from_slice(b"_BHRfS_M");
        std::fs::write(&p, &img).unwrap();
        assert_eq!(detect(&p).unwrap().as_deref(), Some("btrfs"));
        std::fs::write(&p, h).unwrap();
        assert_eq!(detect(&p).unwrap().as_deref(), Some("ext4"));
    }

    #[test]
    fn mountinfo_unescapes_and_root_is_mounted() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert!(is_mounted(Path::new("/")));
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mounted(d.path()));
    }
}
