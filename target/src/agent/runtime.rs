//! What the volume manager does to the node, behind one trait ([`Runtime`]) so that the
//! manager's logic (reference counts, restarts, consistency groups, errors) is tested on the
//! host with a fake, and the real thing ([`SystemRuntime`]) stays a thin layer: the volume
//! daemons are started with this same binary's `add | clone | recover` (each forks its daemon
//! and returns once the device is live), talked to over their control sockets, and the
//! filesystems are made with `mkfs.*`, mounted with mount(2) and frozen with FIFREEZE.

use super::state::Fs;
use crate::control::{self, Request};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where a volume's files live on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePaths {
    pub cache_dir: PathBuf,
    pub backing: PathBuf,
    /// The outbox (`NAME.outbox` beside the backing file).
    pub outbox: PathBuf,
    pub mountpoint: PathBuf,
}

/// How to attach a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachMode {
    /// `add`: create (with a size) or reattach / take over (without).
    Add { size: Option<u64> },
    /// `clone SPEC`: a new volume from a snapshot.
    Clone { spec: String },
    /// `recover NAME [--at TIME]`: the volume itself from the data plane.
    Recover { at: Option<String> },
}

/// Everything `deltavol add | clone | recover` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub name: String,
    pub mode: AttachMode,
    pub paths: VolumePaths,
    /// `HOST:PORT[,...]` and the token file.
    pub dataplane: Option<(String, PathBuf)>,
    /// TLS to the data plane (or insecure plain TCP), with `dataplane`.
    pub tls: crate::cli::TlsArgs,
    pub flush_interval_ms: Option<u64>,
    pub cache_limit: Option<u64>,
    pub read_cache: Option<u64>,
    pub hydrate_rate: Option<u64>,
    pub hydrate_readahead: Option<u64>,
    pub hydrate_order: Option<String>,
    pub heat_interval_s: Option<u64>,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    /// Retention policy of its snapshots on the data plane (`--retention`).
    pub retention: Option<String>,
    /// Client-side encryption (`--encryption-key-file`).
    pub encryption_key_file: Option<PathBuf>,
}

impl AttachRequest {
    /// The command-line arguments of `deltavol` for this attach.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        match &self.mode {
            AttachMode::Add { size } => {
                a.extend(["add".into(), "--name".into(), self.name.clone()]);
                if let Some(s) = size {
                    a.extend(["--size".into(), s.to_string()]);
                }
            }
            AttachMode::Clone { spec } => {
                a.extend([
                    "clone".into(),
                    spec.clone(),
                    "--name".into(),
                    self.name.clone(),
                ]);
            }
            AttachMode::Recover { at } => {
                a.extend(["recover".into(), self.name.clone()]);
                if let Some(t) = at {
                    a.push(format!("--at={t}"));
                }
            }
        }
        let p = |x: &Path| x.display().to_string();
        a.extend([
            "--cache-dir".into(),
            p(&self.paths.cache_dir),
            "--backing".into(),
            p(&self.paths.backing),
        ]);
        if let Some((dp, tok)) = &self.dataplane {
            a.extend([
                "--dataplane".into(),
                dp.clone(),
                "--auth-token-file".into(),
                p(tok),
            ]);
            a.extend(
                self.tls
                    .to_args()
                    .into_iter()
                    .map(|s| s.to_string_lossy().into_owned()),
            );
        }
        let mut opt = |flag: &str, v: Option<u64>| {
            if let Some(v) = v {
                a.extend([flag.to_string(), v.to_string()]);
            }
        };
        opt("--flush-interval-ms", self.flush_interval_ms);
        opt("--cache-limit", self.cache_limit);
        opt("--read-cache", self.read_cache);
        opt("--hydrate-rate", self.hydrate_rate);
        opt("--hydrate-readahead", self.hydrate_readahead);
        opt("--heat-interval-s", self.heat_interval_s);
        opt("--queues", self.queues.map(u64::from));
        opt("--depth", self.depth.map(u64::from));
        if let Some(o) = &self.hydrate_order {
            a.extend(["--hydrate-order".into(), o.clone()]);
        }
        if let (Some(r), Some(_)) = (&self.retention, &self.dataplane) {
            a.extend(["--retention".into(), r.clone()]);
        }
        if let (Some(k), Some(_)) = (&self.encryption_key_file, &self.dataplane) {
            a.extend(["--encryption-key-file".into(), p(k)]);
        }
        // A daemon that dies leaves its device waiting (I/O blocks, no error reaches the
        // filesystem) until the agent's restart takes it over.
        a.push("--user-recovery".into());
        a.push("--json".into());
        a
    }
}

/// A volume as the data plane knows it (for the checks before creating one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpVolume {
    pub volume_id: String,
    pub size_bytes: u64,
    pub snapshot_count: u64,
    pub latest_snap_id: u64,
    pub latest_commit_unix_ms: u64,
}

pub trait Runtime: Send + Sync {
    /// Attaches the volume (or takes over its device after a daemon crash); returns the
    /// device path once it is live.
    fn attach(&self, req: &AttachRequest) -> anyhow::Result<String>;
    /// Final flush and removal of the device (files kept).
    fn detach(&self, name: &str) -> anyhow::Result<()>;
    /// The device of the volume's running daemon; `None` if it is not attached or its
    /// daemon died.
    fn device(&self, name: &str) -> Option<String>;
    /// The volume's daemon died without a clean stop (kill -9, a crash): its run file is
    /// left with a dead pid. A volume stopped with `deltavol del` is not crashed.
    fn crashed(&self, name: &str) -> bool;
    /// The daemon's status (JSON as `deltavol status --json` prints it).
    fn status(&self, name: &str) -> anyhow::Result<serde_json::Value>;
    /// The volume on the data plane, `None` if it holds none of that name.
    fn dp_volume(
        &self,
        name: &str,
        dataplane: &str,
        token: &Path,
    ) -> anyhow::Result<Option<DpVolume>>;
    /// The filesystem on the device, if any.
    fn fs_type(&self, dev: &str) -> anyhow::Result<Option<String>>;
    fn mkfs(&self, dev: &str, fs: Fs) -> anyhow::Result<()>;
    fn mount(&self, dev: &str, mountpoint: &Path, fstype: &str) -> anyhow::Result<()>;
    fn umount(&self, mountpoint: &Path) -> anyhow::Result<()>;
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    fn freeze(&self, mountpoint: &Path) -> anyhow::Result<()>;
    /// Thaws; a filesystem that was not frozen is not an error.
    fn thaw(&self, mountpoint: &Path) -> anyhow::Result<()>;
    /// Cuts the volume's epoch (see [`crate::control::Request::Cut`]): `(ticket, epoch)`.
    fn cut(&self, name: &str, timeout: Duration) -> anyhow::Result<(u64, u64)>;
    /// Waits for the flush of a cut and the data plane's commit of its epoch.
    fn wait_snapshot(
        &self,
        name: &str,
        ticket: u64,
        epoch: u64,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value>;
    /// Deletes the volume's files on this node.
    fn remove_files(&self, paths: &VolumePaths) -> anyhow::Result<()>;
}

/// The real node.
pub struct SystemRuntime {
    /// The `deltavol` binary (this one).
    pub exe: PathBuf,
    /// TLS to the data plane, for the agent's own look-ups there.
    pub tls: crate::cli::TlsArgs,
}

impl SystemRuntime {
    pub fn new(tls: crate::cli::TlsArgs) -> anyhow::Result<SystemRuntime> {
        Ok(SystemRuntime {
            exe: std::env::current_exe().context("find the deltavol binary")?,
            tls,
        })
    }

    fn running(&self, name: &str) -> Option<control::RunInfo> {
        match control::read_info(&control::info_path(name)) {
            Ok(Some(i)) if control::pid_alive(i.pid) => Some(i),
            _ => None,
        }
    }

    fn request(
        &self,
        name: &str,
        req: &Request,
        timeout: Option<Duration>,
    ) -> anyhow::Result<serde_json::Value> {
        let i = self
            .running(name)
            .ok_or_else(|| anyhow!("volume {name} is not attached (its daemon is not running)"))?;
        let v = control::request(&i.socket, req, timeout)?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("volume {name}: {e}");
        }
        Ok(v)
    }
}

/// Runs a command; its error is the last `error:` line it printed (or all of stderr).
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let msg = err
        .lines()
        .rev()
        .find_map(|l| l.split_once("error: ").map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| err.trim().to_string());
    if msg.starts_with(what) {
        bail!("{msg}")
    }
    bail!("{what}: {msg}")
}

impl Runtime for SystemRuntime {
    fn attach(&self, req: &AttachRequest) -> anyhow::Result<String> {
        let what = match &req.mode {
            AttachMode::Add { .. } => format!("attach volume {}", req.name),
            AttachMode::Clone { spec } => format!("clone {spec} as {}", req.name),
            AttachMode::Recover { .. } => format!("recover volume {}", req.name),
        };
        // `add` makes the cache dir and the backing file, not the roots they live in.
        for d in [req.paths.cache_dir.parent(), req.paths.backing.parent()]
            .into_iter()
            .flatten()
        {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let out = run(Command::new(&self.exe).args(req.args()), &what)?;
        // `--json`: the Ready line is the last line.
        let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
        let ready: crate::daemon::Ready = serde_json::from_str(line)
            .with_context(|| format!("{what}: unexpected output {out:?}"))?;
        Ok(ready.device)
    }

    fn detach(&self, name: &str) -> anyhow::Result<()> {
        run(
            Command::new(&self.exe).args(["del", name]),
            &format!("detach volume {name}"),
        )
        .map(|_| ())
    }

    fn device(&self, name: &str) -> Option<String> {
        self.running(name).map(|i| i.device)
    }

    fn crashed(&self, name: &str) -> bool {
        crate::daemon::dead_daemon(name).is_some()
    }

    fn status(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.request(name, &Request::Status, Some(Duration::from_secs(5)))
    }

    fn dp_volume(
        &self,
        name: &str,
        dataplane: &str,
        token: &Path,
    ) -> anyhow::Result<Option<DpVolume>> {
        let dp = crate::cli::DataPlaneArgs {
            dataplane: crate::ship::DataPlaneAddrs::parse(dataplane)
                .map_err(|e| anyhow!("dataplane {dataplane:?}: {e}"))?,
            auth_token_file: token.to_path_buf(),
            tls: self.tls.clone(),
        };
        let mut c = dp.connect(name)?;
        let i = c.volume_info().context("volume info")?;
        if !i.exists {
            return Ok(None);
        }
        Ok(Some(DpVolume {
            volume_id: i
                .volume_id
                .as_ref()
                .map_or_else(|| "unknown".into(), deltavol_schemas::volume_id_hex),
            size_bytes: i.size_bytes,
            snapshot_count: i.snapshot_count,
            latest_snap_id: i.latest_snap_id,
            latest_commit_unix_ms: i.latest_commit_ms,
        }))
    }

    fn fs_type(&self, dev: &str) -> anyhow::Result<Option<String>> {
        super::fs::detect(Path::new(dev))
    }

    fn mkfs(&self, dev: &str, fs: Fs) -> anyhow::Result<()> {
        let mut c = match fs {
            Fs::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", dev]);
                c
            }
            Fs::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", dev]);
                c
            }
        };
        run(
            &mut c,
            &format!("make an {} filesystem on {dev}", fs.name()),
        )
        .map(|_| ())
    }

    fn mount(&self, dev: &str, mountpoint: &Path, fstype: &str) -> anyhow::Result<()> {
        super::fs::mount(Path::new(dev), mountpoint, fstype)
    }

    fn umount(&self, mountpoint: &Path) -> anyhow::Result<()> {
        super::fs::umount(mountpoint)
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        super::fs::is_mounted(mountpoint)
    }

    fn freeze(&self, mountpoint: &Path) -> anyhow::Result<()> {
        super::fs::freeze(mountpoint)
    }

    fn thaw(&self, mountpoint: &Path) -> anyhow::Result<()> {
        super::fs::thaw(mountpoint)
    }

    fn cut(&self, name: &str, timeout: Duration) -> anyhow::Result<(u64, u64)> {
        let v = self.request(
            name,
            &Request::Cut {
                timeout_ms: timeout.as_millis() as u64,
            },
            Some(timeout + Duration::from_secs(5)),
        )?;
        let g = |k: &str| v.get(k).and_then(|x| x.as_u64());
        match (g("ticket"), g("epoch")) {
            (Some(t), Some(e)) => Ok((t, e)),
            _ => bail!("volume {name}: unexpected answer to a cut: {v}"),
        }
    }

    fn wait_snapshot(
        &self,
        name: &str,
        ticket: u64,
        epoch: u64,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        self.request(
            name,
            &Request::WaitSnapshot {
                ticket,
                epoch,
                timeout_ms: timeout.as_millis() as u64,
            },
            None,
        )
    }

    fn remove_files(&self, paths: &VolumePaths) -> anyhow::Result<()> {
        let rm_dir = |d: &Path| match std::fs::remove_dir_all(d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("remove {}", d.display()))
            }
            _ => Ok(()),
        };
        rm_dir(&paths.cache_dir)?;
        rm_dir(&paths.outbox)?;
        match std::fs::remove_file(&paths.backing) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", paths.backing.display()))
            }
            _ => {}
        }
        match std::fs::remove_dir(&paths.mountpoint) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("remove {}", paths.mountpoint.display()))
            }
            _ => Ok(()),
        }
    }
}
