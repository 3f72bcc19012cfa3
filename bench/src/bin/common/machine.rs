//! Machine details and timestamps shared by the benchmark binaries (each includes this file).

use serde::Serialize;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub date_utc: String,
    pub unix_time_s: u64,
    pub kernel: String,
    pub cpus: usize,
    /// `/proc/loadavg` when the bench started (the machine may be shared).
    pub loadavg_start: String,
    pub dir: String,
    /// `statfs` f_type of `dir`, hex.
    pub dir_fs_magic: String,
    pub dir_is_tmpfs: bool,
}

impl Machine {
    pub fn probe(dir: &Path) -> Machine {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kernel = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let (magic, tmpfs) = match nix::sys::statfs::statfs(dir) {
            Ok(s) => (
                format!("{:#x}", s.filesystem_type().0),
                s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
            ),
            Err(_) => ("unknown".into(), false),
        };
        Machine {
            date_utc: utc_timestamp(now),
            unix_time_s: now,
            kernel,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_start: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            dir: dir.display().to_string(),
            dir_fs_magic: magic,
            dir_is_tmpfs: tmpfs,
        }
    }

    /// `YYYY-MM-DD` of the start.
    #[allow(dead_code)] // not every bench names its results by date
    pub fn date(&self) -> &str {
        &self.date_utc[..10]
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (proleptic Gregorian, Howard Hinnant's algorithm).
pub fn utc_timestamp(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_924_066), "2026-11-29T03:47:46Z");
    }
}
