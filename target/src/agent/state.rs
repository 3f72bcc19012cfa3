//! The agent's durable record of the node's volumes: what each is (origin, size, options),
//! whether it has a filesystem, and which mounts hold it (one entry per mount id a front-end
//! gave, e.g. Docker's per-container mount ids), so that reference counts survive restarts of
//! the agent and of dockerd.
//!
//! One JSON file (`state.json` in the agent's state dir), replaced atomically: written to a
//! temporary file, fsynced, renamed over the old one, and the directory fsynced. A crash at any
//! point leaves either the old or the new record. A file that does not parse is never
//! overwritten: the agent refuses to start and names it (the volumes' own files are intact).
//!
//! The record carries the boot id it was written under: after a reboot no mount survives, so
//! the mount references of the previous boot are dropped on load ([`AgentState::new_boot`]).

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATE_VERSION: u32 = 1;
/// Largest state file read (a record per volume, a few hundred bytes each).
const STATE_BYTES_MAX: u64 = 64 << 20;

/// Where a volume came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// Created empty here: the agent makes a filesystem on its first mount.
    New,
    /// `from=NAME@SNAP`: a clone of that snapshot (the spec as given, and the snapshot id it
    /// resolved to).
    Clone { spec: String },
    /// `recover=NAME`: the volume itself, brought here from the data plane (`at`: as of a
    /// time).
    Recover { at: Option<String> },
}

/// The filesystem the agent makes on a new volume's first mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    pub fn parse(s: &str) -> anyhow::Result<Fs> {
        match s {
            "ext4" => Ok(Fs::Ext4),
            "xfs" => Ok(Fs::Xfs),
            _ => bail!("fs={s:?} is not supported: use ext4 (the default) or xfs"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }
}

/// Per-volume settings that differ from the agent's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOptions {
    /// Data plane address(es) for this volume (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_cache: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydrate_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydrate_readahead: Option<u64>,
    /// `hot-first` or `lba`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydrate_order: Option<String>,
    /// Seconds between heat-map uploads (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heat_interval_s: Option<u64>,
    /// Retention policy of its snapshots (`last=50,hourly=24,...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Client-side encryption: the key file on this node (the path, never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Bytes (for clones and recoveries: as the data plane gave it, once attached).
    pub size_bytes: u64,
    pub origin: Origin,
    pub fs: Fs,
    pub options: VolumeOptions,
    pub created_unix_ms: u64,
    /// A filesystem was made (or found) on the device.
    #[serde(default)]
    pub formatted: bool,
    /// The mount ids holding the volume mounted (empty: not mounted).
    #[serde(default)]
    pub mounts: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub version: u32,
    /// `/proc/sys/kernel/random/boot_id` when the record was written.
    #[serde(default)]
    pub boot_id: String,
    pub volumes: BTreeMap<String, VolumeRecord>,
}

impl AgentState {
    /// Drops every mount reference if the record was written in an earlier boot (nothing is
    /// mounted after a reboot; the front-ends mount again with new ids). Returns whether it
    /// did.
    pub fn new_boot(&mut self, boot_id: &str) -> bool {
        let stale = !self.boot_id.is_empty() && self.boot_id != boot_id;
        if stale {
            for v in self.volumes.values_mut() {
                v.mounts.clear();
            }
        }
        self.boot_id = boot_id.to_string();
        stale
    }
}

/// The state file and how to replace it.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, or an empty one when there is no file yet. A file that cannot be read or
    /// parsed is an error (never replaced by an empty record).
    pub fn load(&self) -> anyhow::Result<AgentState> {
        use std::io::Read;
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(AgentState {
                    version: STATE_VERSION,
                    ..Default::default()
                })
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", self.path.display())),
        };
        let mut buf = Vec::new();
        f.take(STATE_BYTES_MAX + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("read {}", self.path.display()))?;
        if buf.len() as u64 > STATE_BYTES_MAX {
            bail!(
                "{} is larger than {STATE_BYTES_MAX} bytes: not an agent state file",
                self.path.display()
            );
        }
        let st: AgentState = serde_json::from_slice(&buf).with_context(|| {
            format!(
                "{} is damaged (the volumes' own files are intact): move it aside and restart the agent, then re-create the volumes' records with `docker volume create` of the same names and options",
                self.path.display()
            )
        })?;
        if st.version != STATE_VERSION {
            bail!(
                "{} has version {}, this agent reads version {STATE_VERSION}",
                self.path.display(),
                st.version
            );
        }
        for (k, v) in &st.volumes {
            if k != &v.name {
                bail!(
                    "{} is damaged: record {k:?} names volume {:?}",
                    self.path.display(),
                    v.name
                );
            }
        }
        Ok(st)
    }

    /// Replaces the record atomically and durably.
    pub fn save(&self, st: &AgentState) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(st)?;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&body)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .with_context(|| format!("write {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("rename {} to {}", tmp.display(), self.path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", dir.display()))?;
        Ok(())
    }
}

/// This boot's id (empty if the kernel does not say).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            size_bytes: 1 << 30,
            origin: Origin::New,
            fs: Fs::Ext4,
            options: VolumeOptions::default(),
            created_unix_ms: 1,
            formatted: true,
            mounts: ["m1".to_string(), "m2".to_string()].into(),
        }
    }

    #[test]
    fn save_load_round_trip_and_new_boot_drops_mounts() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        assert_eq!(s.load().unwrap().volumes.len(), 0);
        let mut st = AgentState {
            version: STATE_VERSION,
            boot_id: "b1".into(),
            volumes: [("db1".to_string(), rec("db1"))].into(),
        };
        s.save(&st).unwrap();
        assert_eq!(s.load().unwrap(), st);
        assert!(!st.new_boot("b1"));
        assert_eq!(st.volumes["db1"].mounts.len(), 2);
        assert!(st.new_boot("b2"));
        assert!(st.volumes["db1"].mounts.is_empty());
        assert_eq!(st.boot_id, "b2");
    }

    #[test]
    fn damaged_state_is_an_error_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::new(d.path());
        std::fs::write(s.path(), b"{\"version\":1,\"volumes\":{\"a\":").unwrap();
        let e = s.load().unwrap_err();
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
        assert!(s.path().exists());
        // A record filed under another name.
        let mut st = AgentState {
            version: STATE_VERSION,
            ..Default::default()
        };
        st.volumes.insert("a".into(), rec("b"));
        std::fs::write(s.path(), serde_json::to_vec(&st).unwrap()).unwrap();
        assert!(format!("{:#}", s.load().unwrap_err()).contains("names volume"));
        st.version = 99;
        st.volumes.clear();
        std::fs::write(s.path(), serde_json::to_vec(&st).unwrap()).unwrap();
        assert!(format!("{:#}", s.load().unwrap_err()).contains("version 99"));
    }
}
