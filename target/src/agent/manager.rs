//! The volume manager: the one API the agent's front-ends call (the Docker volume plugin
//! today, a CSI node service later). It owns the node's volumes: creates them (empty, as a
//! clone, or recovered), keeps their daemons running (restarting a dead one, which takes its
//! device over so a mounted filesystem sees no error), makes and mounts their filesystems,
//! counts the mounts holding each, and cuts filesystem-consistent snapshots of one volume or of
//! several at one moment (a consistency group).
//!
//! Every change is written to the durable record ([`super::state`]) before it is answered, so
//! a restart of the agent (or of dockerd) neither loses nor invents a mount. Operations are
//! serialised by one lock; a snapshot holds it only while it freezes, cuts and thaws, never
//! while it waits for the flush or the data plane's commit.

use super::config::{parse_duration_ms, AgentConfig};
use super::runtime::{AttachMode, AttachRequest, Runtime, VolumePaths};
use super::state::{AgentState, Fs, Origin, StateStore, VolumeOptions, VolumeRecord};
use crate::size::{format_size, parse_size};
use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Options a volume can be created with (`docker volume create -o KEY=VALUE`).
pub const OPTIONS: &[&str] = &[
    "size",
    "from",
    "recover",
    "at",
    "fs",
    "dataplane",
    "flush-interval",
    "cache-limit",
    "read-cache",
    "hydrate-rate",
    "hydrate-readahead",
    "hydrate-order",
    "heat-interval-s",
    "retention",
    "encryption-key-file",
];

/// A volume as the front-ends show it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub name: String,
    /// The mount point while mounted, else empty.
    pub mountpoint: String,
    pub created_unix_ms: u64,
    pub status: serde_json::Value,
}

/// One volume's part of a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    pub name: String,
    pub snapshot: u64,
    pub committed: bool,
    /// Its filesystem was frozen around the cut.
    pub frozen: bool,
    pub detail: serde_json::Value,
}

/// A snapshot of one or several volumes.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSnapshot {
    pub volumes: Vec<SnapshotResult>,
    /// How long the filesystems stayed frozen (freeze of the first to thaw of the last).
    pub frozen_ms: u64,
}

/// What the supervisor knows about a volume beyond the record (not persisted).
#[derive(Debug, Default, Clone)]
struct Health {
    restarts: u64,
    last_error: Option<String>,
    next_try: Option<Instant>,
    backoff: Duration,
}

pub struct VolumeManager<R: Runtime> {
    cfg: AgentConfig,
    rt: R,
    store: StateStore,
    st: Mutex<AgentState>,
    health: Mutex<HashMap<String, Health>>,
}

fn now_ms() -> u64 {
    crate::cache::now_unix_ms()
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

impl<R: Runtime> VolumeManager<R> {
    /// Loads the record (refusing a damaged one). Call [`VolumeManager::reconcile`] next.
    pub fn open(cfg: AgentConfig, rt: R) -> anyhow::Result<Self> {
        let store = StateStore::new(&cfg.state_dir);
        let st = store.load()?;
        Ok(VolumeManager {
            cfg,
            rt,
            store,
            st: Mutex::new(st),
            health: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn runtime(&self) -> &R {
        &self.rt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, st: &AgentState) -> anyhow::Result<()> {
        self.store
            .save(st)
            .context("record the change in the agent's state")
    }

    pub fn paths(&self, name: &str) -> VolumePaths {
        VolumePaths {
            cache_dir: self.cfg.cache_root.join(name),
            backing: self.cfg.backing_root.join(format!("{name}.img")),
            outbox: self.cfg.backing_root.join(format!("{name}.outbox")),
            mountpoint: self.cfg.mount_root.join(name),
        }
    }

    /// The data plane of a volume: its own, else the agent's.
    fn dataplane(&self, o: &VolumeOptions) -> Option<(String, PathBuf)> {
        let dp = o.dataplane.clone().or_else(|| self.cfg.dataplane.clone())?;
        let tok = self.cfg.auth_token_file.clone()?;
        Some((dp, tok))
    }

    fn attach_request(&self, r: &VolumeRecord, mode: AttachMode) -> AttachRequest {
        let o = &r.options;
        AttachRequest {
            name: r.name.clone(),
            mode,
            paths: self.paths(&r.name),
            dataplane: self.dataplane(o),
            tls: self.cfg.tls.clone(),
            flush_interval_ms: o.flush_interval_ms.or(self.cfg.flush_interval_ms),
            cache_limit: o.cache_limit.or(self.cfg.cache_limit),
            read_cache: o.read_cache.or(self.cfg.read_cache),
            hydrate_rate: o.hydrate_rate.or(self.cfg.hydrate_rate),
            hydrate_readahead: o.hydrate_readahead.or(self.cfg.hydrate_readahead),
            hydrate_order: o
                .hydrate_order
                .clone()
                .or_else(|| self.cfg.hydrate_order.clone()),
            heat_interval_s: o.heat_interval_s.or(self.cfg.heat_interval_s),
            queues: None,
            depth: None,
            retention: o.retention.clone().or_else(|| self.cfg.retention.clone()),
            encryption_key_file: o.encryption_key_file.clone(),
        }
    }

    /// Parses `-o` options into a record (not yet attached).
    pub fn parse_create(
        &self,
        name: &str,
        opts: &BTreeMap<String, String>,
    ) -> anyhow::Result<VolumeRecord> {
        crate::cache::validate_name(name).map_err(|e| anyhow!("{e}"))?;
        for k in opts.keys() {
            if !OPTIONS.contains(&k.as_str()) {
                bail!(
                    "unknown option {k:?}: deltavol volumes take {}",
                    OPTIONS.join(", ")
                );
            }
        }
        let get = |k: &str| opts.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let size_opt = |k: &str| -> anyhow::Result<Option<u64>> {
            get(k)
                .map(|v| parse_size(v).map_err(|e| anyhow!("{k}={v:?}: {e}")))
                .transpose()
        };
        let size = size_opt("size")?;
        if let Some(s) = size {
            if s == 0 || s % 4096 != 0 {
                bail!("size={s} must be a positive multiple of 4KiB (e.g. 10GiB)");
            }
        }
        let origin = match (get("from"), get("recover"), get("at")) {
            (Some(_), Some(_), _) => {
                bail!("from= and recover= exclude each other: from= makes a new volume from a snapshot, recover= brings this volume itself back")
            }
            (Some(_), None, Some(_)) => {
                bail!("at= goes with recover=; for a clone as of a time write from=NAME@TIME")
            }
            (Some(spec), None, None) => {
                if !spec.contains('@') {
                    bail!("from={spec:?}: write from=VOLUME@SNAPSHOT_ID or from=VOLUME@TIME (e.g. db1@42, db1@-15m)");
                }
                Origin::Clone {
                    spec: spec.to_string(),
                }
            }
            (None, Some(rv), at) => {
                if rv != name && rv != "true" && rv != "yes" {
                    bail!("recover={rv:?}: a recovered volume keeps its name: create it as {rv} (docker volume create -d deltavol --name {rv} -o recover={rv})");
                }
                Origin::Recover {
                    at: at.map(str::to_string),
                }
            }
            (None, None, Some(_)) => bail!("at= goes with recover="),
            (None, None, None) => Origin::New,
        };
        if size.is_some() && origin != Origin::New {
            bail!(
                "size= is for new volumes: a clone or a recovered volume has its snapshot's size"
            );
        }
        let options = VolumeOptions {
            dataplane: get("dataplane").map(str::to_string),
            flush_interval_ms: get("flush-interval")
                .map(|v| parse_duration_ms(v).map_err(|e| anyhow!("flush-interval: {e}")))
                .transpose()?,
            cache_limit: size_opt("cache-limit")?,
            read_cache: size_opt("read-cache")?,
            hydrate_rate: size_opt("hydrate-rate")?,
            hydrate_readahead: size_opt("hydrate-readahead")?
                .map(|v| {
                    crate::agent::config::check_readahead(v)
                        .map_err(|e| anyhow!("hydrate-readahead: {e}"))
                })
                .transpose()?,
            hydrate_order: get("hydrate-order")
                .map(|v| {
                    crate::agent::config::check_order(v).map_err(|e| anyhow!("hydrate-order: {e}"))
                })
                .transpose()?,
            heat_interval_s: get("heat-interval-s")
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        anyhow!("heat-interval-s={v:?}: a number of seconds (0 = keep no heat map)")
                    })
                })
                .transpose()?,
            retention: get("retention")
                .map(|r| {
                    deltavol_dataplane::retention::Policy::parse(r)
                        .map(|p| p.to_string())
                        .map_err(|e| anyhow!("retention={r:?}: {e}"))
                })
                .transpose()?,
            encryption_key_file: get("encryption-key-file").map(PathBuf::from),
        };
        if let Some(k) = &options.encryption_key_file {
            if !k.is_absolute() {
                bail!(
                    "encryption-key-file={}: give the key file's absolute path on this node",
                    k.display()
                );
            }
            crate::crypt::VolumeKey::load(k)
                .map_err(|e| anyhow!("encryption-key-file={}: {e}", k.display()))?;
            if self.dataplane(&options).is_none() {
                bail!("encryption-key-file= seals what the volume ships: it needs a data plane (dataplane in the agent's config, or -o dataplane=)");
            }
        }
        if let Some(dp) = &options.dataplane {
            crate::ship::DataPlaneAddrs::parse(dp).map_err(|e| anyhow!("dataplane={dp:?}: {e}"))?;
            if self.cfg.auth_token_file.is_none() {
                bail!("dataplane= needs the data plane's token: set auth_token_file in the agent's config ({})", super::config::CONFIG_DEFAULT);
            }
        }
        let fs = match get("fs") {
            Some(f) => Fs::parse(f)?,
            None => self.cfg.fs,
        };
        if origin != Origin::New && get("fs").is_some() {
            bail!("fs= is for new volumes: a clone or a recovered volume has its snapshot's filesystem");
        }
        Ok(VolumeRecord {
            name: name.to_string(),
            size_bytes: size.unwrap_or(self.cfg.default_size),
            origin,
            fs,
            options,
            created_unix_ms: now_ms(),
            formatted: false,
            mounts: Default::default(),
        })
    }

    /// Creates a volume and attaches it: an empty one, a clone (`from=`) or the volume itself
    /// recovered from the data plane (`recover=`); clones and recoveries are usable at once
    /// and hydrate in the background. Creating a volume that exists with the same options is
    /// a no-op.
    pub fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let mut rec = self.parse_create(name, opts)?;
        let mut st = self.lock();
        if let Some(old) = st.volumes.get(name) {
            let same = old.origin == rec.origin && old.options == rec.options && old.fs == rec.fs;
            let same_size = opts.get("size").is_none() || old.size_bytes == rec.size_bytes;
            if same && same_size {
                return Ok(());
            }
            bail!(
                "volume {name} exists already on this node ({}, {:?}) with other options: remove it first (docker volume rm {name})",
                format_size(old.size_bytes),
                old.origin
            );
        }
        let dp = self.dataplane(&rec.options);
        if rec.origin != Origin::New && dp.is_none() {
            bail!("{} needs a data plane: set dataplane and auth_token_file in the agent's config ({}), or -o dataplane=HOST:PORT",
                if matches!(rec.origin, Origin::Clone { .. }) { "from=" } else { "recover=" },
                super::config::CONFIG_DEFAULT);
        }
        let paths = self.paths(name);
        for p in [&paths.cache_dir, &paths.backing, &paths.outbox] {
            if p.exists() {
                bail!(
                    "{} exists already, but the agent has no volume {name}: files of an earlier volume of that name? Move them away (or delete them) and create again",
                    p.display()
                );
            }
        }
        if let (Origin::New, Some((addr, tok))) = (&rec.origin, &dp) {
            // A name the data plane holds is another volume (or this one, attached on
            // another node): refused here, not discovered at the first snapshot.
            let v = self
                .rt
                .dp_volume(name, addr, tok)
                .with_context(|| format!("check that the data plane at {addr} holds no other volume {name} (is it reachable?)"))?;
            if let Some(v) = v {
                bail!(
                    "volume {name} exists on the data plane at {addr} (id {}, {}, {} snapshot(s), head {}, last commit {}): it is attached on another node or was lost with one. Bring it here with -o recover={name}, or choose another name",
                    v.volume_id,
                    format_size(v.size_bytes),
                    v.snapshot_count,
                    v.latest_snap_id,
                    ago(v.latest_commit_unix_ms)
                );
            }
        }
        let mode = match &rec.origin {
            Origin::New => AttachMode::Add {
                size: Some(rec.size_bytes),
            },
            Origin::Clone { spec } => AttachMode::Clone { spec: spec.clone() },
            Origin::Recover { at } => AttachMode::Recover { at: at.clone() },
        };
        // Recorded first: a crash from here on leaves a record the next start reattaches.
        st.volumes.insert(name.to_string(), rec.clone());
        self.save(&st)?;
        let req = self.attach_request(&rec, mode);
        if let Err(e) = self.rt.attach(&req) {
            st.volumes.remove(name);
            let saved = self.save(&st);
            // Nothing of this volume existed before (checked above): whatever the failed
            // attach left goes.
            if let Err(re) = self.rt.remove_files(&paths) {
                tracing::warn!(volume = name, error = %re, "removing the files of a failed create");
            }
            saved?;
            return Err(e);
        }
        if rec.origin != Origin::New {
            if let Some(sz) = self
                .rt
                .status(name)
                .ok()
                .and_then(|s| s.get("size_bytes").and_then(|x| x.as_u64()))
            {
                rec.size_bytes = sz;
                st.volumes.insert(name.to_string(), rec);
                self.save(&st)?;
            }
        }
        tracing::info!(volume = name, "created");
        Ok(())
    }

    /// Detaches the volume and deletes its files on this node. Its snapshots stay on the data
    /// plane (`deltavol volume delete` removes them). Refused while mounted.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let mut st = self.lock();
        let Some(rec) = st.volumes.get(name) else {
            bail!("no volume {name} on this node");
        };
        if !rec.mounts.is_empty() {
            bail!(
                "volume {name} is in use ({} mount(s)): stop the containers using it first",
                rec.mounts.len()
            );
        }
        let paths = self.paths(name);
        if self.rt.is_mounted(&paths.mountpoint) {
            self.rt.umount(&paths.mountpoint)?;
        }
        if self.rt.device(name).is_some() {
            self.rt.detach(name)?;
        }
        st.volumes.remove(name);
        self.save(&st)?;
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.rt.remove_files(&paths)?;
        tracing::info!(volume = name, "removed");
        Ok(())
    }

    /// Ensures the volume's daemon runs (reattaching, or taking over its device); returns the
    /// device.
    fn ensure_attached(&self, rec: &VolumeRecord) -> anyhow::Result<String> {
        if let Some(d) = self.rt.device(&rec.name) {
            return Ok(d);
        }
        let req = self.attach_request(rec, AttachMode::Add { size: None });
        self.rt.attach(&req)
    }

    /// Mounts the volume for mount id `id` (making a filesystem on a new volume's first
    /// mount) and returns the mount point. Each id counts once, however often it mounts.
    pub fn mount(&self, name: &str, id: &str) -> anyhow::Result<PathBuf> {
        if id.is_empty() {
            bail!("a mount needs an id");
        }
        let mut st = self.lock();
        let Some(mut rec) = st.volumes.get(name).cloned() else {
            bail!("no volume {name} on this node");
        };
        let mp = self.paths(name).mountpoint;
        if !self.rt.is_mounted(&mp) {
            let dev = self.ensure_attached(&rec)?;
            self.mount_dev(&mut rec, &dev, true)?;
        }
        rec.mounts.insert(id.to_string());
        st.volumes.insert(name.to_string(), rec);
        self.save(&st)?;
        Ok(mp)
    }

    /// Mounts the device at the volume's mount point; makes the filesystem first if allowed
    /// and the volume is new and never formatted.
    fn mount_dev(&self, rec: &mut VolumeRecord, dev: &str, may_mkfs: bool) -> anyhow::Result<()> {
        let mp = self.paths(&rec.name).mountpoint;
        let fstype = match self.rt.fs_type(dev)? {
            Some(t) => t,
            None if may_mkfs && rec.origin == Origin::New && !rec.formatted => {
                tracing::info!(volume = %rec.name, fs = rec.fs.name(), "first mount: making the filesystem");
                self.rt.mkfs(dev, rec.fs)?;
                rec.fs.name().to_string()
            }
            None => bail!(
                "{dev} (volume {}) holds no filesystem the agent can mount{}: it is not formatted again, to lose nothing",
                rec.name,
                match rec.origin {
                    Origin::New => " although one was made on it",
                    _ => " (its snapshot had none)",
                }
            ),
        };
        self.rt.mount(dev, &mp, &fstype)?;
        rec.formatted = true;
        Ok(())
    }

    /// Releases mount id `id`; the last one unmounts the filesystem. An id that holds no
    /// mount is not an error (a front-end retrying after a restart).
    pub fn unmount(&self, name: &str, id: &str) -> anyhow::Result<()> {
        let mut st = self.lock();
        let Some(mut rec) = st.volumes.get(name).cloned() else {
            bail!("no volume {name} on this node");
        };
        if !rec.mounts.remove(id) {
            return Ok(());
        }
        let mp = self.paths(name).mountpoint;
        if rec.mounts.is_empty() && self.rt.is_mounted(&mp) {
            self.rt.umount(&mp)?;
        }
        st.volumes.insert(name.to_string(), rec);
        self.save(&st)?;
        Ok(())
    }

    /// The mount point while mounted, else `None`.
    pub fn path(&self, name: &str) -> anyhow::Result<Option<PathBuf>> {
        let st = self.lock();
        let Some(rec) = st.volumes.get(name) else {
            bail!("no volume {name} on this node");
        };
        let mp = self.paths(name).mountpoint;
        Ok((!rec.mounts.is_empty() && self.rt.is_mounted(&mp)).then_some(mp))
    }

    fn view(&self, rec: &VolumeRecord, with_status: bool) -> VolumeView {
        let mp = self.paths(&rec.name).mountpoint;
        let mounted = !rec.mounts.is_empty() && self.rt.is_mounted(&mp);
        let mut status = serde_json::json!({
            "size": format_size(rec.size_bytes),
            "origin": match &rec.origin {
                Origin::New => "new".to_string(),
                Origin::Clone { spec } => format!("clone of {spec}"),
                Origin::Recover { at: None } => "recovered".to_string(),
                Origin::Recover { at: Some(t) } => format!("recovered as of {t}"),
            },
            "mounts": rec.mounts.len(),
        });
        let o = status.as_object_mut().expect("object");
        if let Some(h) = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.name)
        {
            if h.restarts > 0 {
                o.insert("daemon_restarts".into(), h.restarts.into());
            }
            if let Some(e) = &h.last_error {
                o.insert("error".into(), e.clone().into());
            }
        }
        if with_status {
            match self.rt.status(&rec.name) {
                Ok(s) => summarize(&s, o),
                Err(e) => {
                    o.insert("device".into(), "not attached".into());
                    o.entry("error").or_insert_with(|| format!("{e:#}").into());
                }
            }
        }
        VolumeView {
            name: rec.name.clone(),
            mountpoint: if mounted {
                mp.display().to_string()
            } else {
                String::new()
            },
            created_unix_ms: rec.created_unix_ms,
            status,
        }
    }

    pub fn get(&self, name: &str) -> anyhow::Result<VolumeView> {
        let rec = self
            .lock()
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no volume {name} on this node"))?;
        Ok(self.view(&rec, true))
    }

    pub fn list(&self) -> Vec<VolumeView> {
        let recs: Vec<_> = self.lock().volumes.values().cloned().collect();
        recs.iter().map(|r| self.view(r, false)).collect()
    }

    /// Whether the agent manages `name`.
    pub fn manages(&self, name: &str) -> bool {
        self.lock().volumes.contains_key(name)
    }

    /// Snapshots `names` at one moment: the mounted filesystems among them are frozen (in
    /// name order), every volume's epoch is cut, the filesystems are thawed, and then each
    /// snapshot's flush and commit are waited for. With one volume this is a
    /// filesystem-consistent snapshot; with several, a consistency group (their snapshots
    /// hold the same instant). Volumes not mounted through the agent are cut unfrozen
    /// (crash-consistent).
    pub fn snapshot(
        &self,
        names: &[String],
        commit_timeout: Duration,
    ) -> anyhow::Result<GroupSnapshot> {
        if names.is_empty() {
            bail!("name at least one volume");
        }
        let mut sorted: Vec<String> = names.to_vec();
        sorted.sort();
        sorted.dedup();
        let (cuts, frozen_ms) = {
            let st = self.lock();
            for n in &sorted {
                let Some(rec) = st.volumes.get(n) else {
                    bail!("no volume {n} on this node");
                };
                if self.rt.device(n).is_none() {
                    bail!("volume {n} is not attached (its daemon is restarting?): retry");
                }
                if self.dataplane(&rec.options).is_none() {
                    bail!("volume {n} ships no snapshots: it has no data plane");
                }
            }
            let mut frozen: Vec<(String, PathBuf)> = Vec::new();
            let t0 = Instant::now();
            let res = (|| -> anyhow::Result<Vec<(String, u64, u64, bool)>> {
                for n in &sorted {
                    let rec = &st.volumes[n];
                    let mp = self.paths(n).mountpoint;
                    if !rec.mounts.is_empty() && self.rt.is_mounted(&mp) {
                        self.rt.freeze(&mp)?;
                        frozen.push((n.clone(), mp));
                    }
                }
                let mut cuts = Vec::new();
                for n in &sorted {
                    let (ticket, epoch) = self.rt.cut(n, self.cfg.cut_timeout)?;
                    cuts.push((n.clone(), ticket, epoch, frozen.iter().any(|(f, _)| f == n)));
                }
                Ok(cuts)
            })();
            // Thawed whatever happened (an agent crash in between: thawed at its next start).
            for (n, mp) in frozen.iter().rev() {
                if let Err(e) = self.rt.thaw(mp) {
                    tracing::error!(volume = %n, error = %e, "thaw after a snapshot cut");
                }
            }
            let frozen_ms = if frozen.is_empty() {
                0
            } else {
                t0.elapsed().as_millis() as u64
            };
            (res?, frozen_ms)
        };
        let mut volumes = Vec::new();
        for (n, ticket, epoch, frozen) in cuts {
            let v = self.rt.wait_snapshot(&n, ticket, epoch, commit_timeout)?;
            volumes.push(SnapshotResult {
                committed: v
                    .get("committed")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false),
                name: n,
                snapshot: epoch,
                frozen,
                detail: v,
            });
        }
        Ok(GroupSnapshot { volumes, frozen_ms })
    }

    /// Brings the node in line with the record, at start: a new boot drops the mount
    /// references of the last one; filesystems left frozen by a crash are thawed; every
    /// volume's daemon is (re)attached; held volumes are mounted again, and mounts nothing
    /// holds are unmounted.
    pub fn reconcile(&self) -> anyhow::Result<()> {
        let mut st = self.lock();
        if st.new_boot(&super::state::boot_id()) {
            tracing::info!("first start in this boot: mount references of the last boot dropped");
        }
        self.save(&st)?;
        let names: Vec<String> = st.volumes.keys().cloned().collect();
        for n in names {
            let mut rec = st.volumes[&n].clone();
            let mp = self.paths(&n).mountpoint;
            if self.rt.is_mounted(&mp) {
                let _ = self.rt.thaw(&mp);
            }
            let dev = match self.ensure_attached(&rec) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(volume = %n, error = %format!("{e:#}"), "cannot attach; the supervisor retries");
                    self.note_error(&n, &e);
                    continue;
                }
            };
            let mounted = self.rt.is_mounted(&mp);
            if !rec.mounts.is_empty() && !mounted {
                match self.mount_dev(&mut rec, &dev, false) {
                    Ok(()) => {
                        tracing::info!(volume = %n, "mounted again ({} reference(s))", rec.mounts.len())
                    }
                    Err(e) => {
                        tracing::error!(volume = %n, error = %format!("{e:#}"), "cannot mount again");
                        self.note_error(&n, &e);
                    }
                }
            } else if rec.mounts.is_empty() && mounted {
                tracing::info!(volume = %n, "unmounting a mount nothing holds");
                if let Err(e) = self.rt.umount(&mp) {
                    self.note_error(&n, &e);
                }
            }
            st.volumes.insert(n, rec);
        }
        self.save(&st)
    }

    fn note_error(&self, name: &str, e: &anyhow::Error) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.entry(name.to_string()).or_default().last_error = Some(format!("{e:#}"));
    }

    /// One round of the supervisor: a volume whose daemon died is attached again (taking its
    /// device over: I/O that waited carries on), with a backoff while that fails. A volume an
    /// operator stopped (`deltavol del`) stays stopped until its next mount or agent start.
    pub fn supervise(&self) {
        let st = self.lock();
        for rec in st.volumes.values() {
            if self.rt.device(&rec.name).is_some() || !self.rt.crashed(&rec.name) {
                continue;
            }
            {
                let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = h.get(&rec.name).and_then(|h| h.next_try) {
                    if Instant::now() < t {
                        continue;
                    }
                }
            }
            tracing::warn!(volume = %rec.name, "its daemon is gone: restarting it (takeover of the device)");
            let req = self.attach_request(rec, AttachMode::Add { size: None });
            let r = self.rt.attach(&req);
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            let e = h.entry(rec.name.clone()).or_default();
            match r {
                Ok(dev) => {
                    e.restarts += 1;
                    e.last_error = None;
                    e.next_try = None;
                    e.backoff = Duration::ZERO;
                    tracing::info!(volume = %rec.name, device = %dev, restarts = e.restarts, "daemon restarted");
                }
                Err(err) => {
                    e.backoff =
                        (e.backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    e.next_try = Some(Instant::now() + e.backoff);
                    e.last_error = Some(format!("restart failed: {err:#}"));
                    tracing::error!(volume = %rec.name, error = %format!("{err:#}"), retry_in_s = e.backoff.as_secs(), "daemon restart failed");
                }
            }
        }
    }
}

/// The daemon status fields a front-end shows.
fn summarize(s: &serde_json::Value, o: &mut serde_json::Map<String, serde_json::Value>) {
    let copy =
        |o: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: &serde_json::Value| {
            if !v.is_null() {
                o.insert(k.into(), v.clone());
            }
        };
    for k in ["device", "volume_id", "epoch", "flushed_epoch", "resumed"] {
        if let Some(v) = s.get(k) {
            copy(o, k, v);
        }
    }
    if let Some(d) = s.get("dirty_bytes").and_then(|x| x.as_u64()) {
        o.insert("dirty".into(), format_size(d).into());
    }
    if let Some(sh) = s.get("shipping").filter(|x| !x.is_null()) {
        let g = |k: &str| sh.get(k).and_then(|x| x.as_u64());
        match g("last_committed") {
            Some(id) => {
                o.insert("last_snapshot".into(), id.into());
                let cut = g("last_committed_cut_unix_ms").or(g("last_committed_unix_ms"));
                if let Some(t) = cut {
                    o.insert("last_snapshot_age".into(), ago(t).into());
                    o.insert("last_snapshot_cut_unix_ms".into(), t.into());
                }
            }
            None => {
                o.insert("last_snapshot".into(), "none since attach".into());
            }
        }
        if let Some(n) = g("outbox_entries") {
            o.insert("outbox_snapshots".into(), n.into());
        }
        if sh.get("fenced").and_then(|x| x.as_bool()) == Some(true) {
            o.insert(
                "fenced".into(),
                "recovered on another node: read-only here".into(),
            );
        }
        if let Some(e) = sh.get("last_error").and_then(|x| x.as_str()) {
            o.insert("shipping_error".into(), e.into());
        }
    }
    if let Some(h) = s.get("hydration").filter(|x| !x.is_null()) {
        let done = h.get("done").and_then(|x| x.as_bool()).unwrap_or(false);
        let pct = h.get("percent").and_then(|x| x.as_f64()).unwrap_or(0.0);
        o.insert(
            "hydration".into(),
            if done {
                "complete".to_string()
            } else {
                format!("{pct:.1}%")
            }
            .into(),
        );
        o.insert(
            "hydration_percent".into(),
            (if done { 100.0 } else { pct }).into(),
        );
    }
}
