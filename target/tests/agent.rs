//! The node agent's volume manager and Docker plugin handlers, on the host: a fake runtime
//! stands for the node (daemons, devices, filesystems, mounts, freezes) and records what was
//! done to it, so every endpoint, bad input and restart path is checked without a kernel
//! driver. The real node is the VM drill `tests/drills/docker.sh`.

use deltavol::agent::config::AgentConfig;
use deltavol::agent::docker::handle;
use deltavol::agent::manager::VolumeManager;
use deltavol::agent::runtime::{AttachMode, AttachRequest, DpVolume, Runtime, VolumePaths};
use deltavol::agent::state::Fs;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Node {
    /// Running daemons: name -> device.
    daemons: HashMap<String, String>,
    next_dev: u32,
    /// Filesystem on each device.
    fs: HashMap<String, String>,
    /// Mount point -> device.
    mounts: HashMap<PathBuf, String>,
    frozen: BTreeSet<PathBuf>,
    /// Volumes on the data plane.
    dp: HashMap<String, DpVolume>,
    dp_down: bool,
    /// What happened, in order.
    log: Vec<String>,
    attach_fails: Option<String>,
    epoch: HashMap<String, u64>,
    /// Volumes stopped cleanly (`del`), not crashed.
    clean: BTreeSet<String>,
    /// Epoch cut while each mount point was frozen.
    cut_frozen: Vec<(String, bool)>,
    files: BTreeSet<PathBuf>,
    /// The `deltavol` arguments of each volume's last attach.
    argv: HashMap<String, Vec<String>>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Node>>);

impl Fake {
    fn n(&self) -> std::sync::MutexGuard<'_, Node> {
        self.0.lock().unwrap()
    }
}

impl Runtime for Fake {
    fn attach(&self, req: &AttachRequest) -> anyhow::Result<String> {
        let mut n = self.n();
        if let Some(e) = n.attach_fails.clone() {
            n.files.insert(req.paths.cache_dir.clone());
            anyhow::bail!("{e}");
        }
        let dev = match n.daemons.get(&req.name) {
            Some(d) => d.clone(),
            None => {
                let d = format!("/dev/ublkb{}", n.next_dev);
                n.next_dev += 1;
                d
            }
        };
        let what = match &req.mode {
            AttachMode::Add { size: Some(s) } => format!("add {} {s}", req.name),
            AttachMode::Add { size: None } => format!("reattach {}", req.name),
            AttachMode::Clone { spec } => {
                // A clone has its snapshot's filesystem.
                n.fs.insert(dev.clone(), "ext4".into());
                format!("clone {spec} {}", req.name)
            }
            AttachMode::Recover { at } => {
                n.fs.insert(dev.clone(), "ext4".into());
                format!("recover {} {:?}", req.name, at)
            }
        };
        n.log.push(what);
        assert!(req.args().contains(&"--user-recovery".to_string()));
        n.argv.insert(req.name.clone(), req.args());
        n.daemons.insert(req.name.clone(), dev.clone());
        n.clean.remove(&req.name);
        n.files.insert(req.paths.cache_dir.clone());
        n.files.insert(req.paths.backing.clone());
        Ok(dev)
    }
    fn detach(&self, name: &str) -> anyhow::Result<()> {
        let mut n = self.n();
        n.daemons.remove(name);
        n.clean.insert(name.to_string());
        n.log.push(format!("detach {name}"));
        Ok(())
    }
    fn device(&self, name: &str) -> Option<String> {
        self.n().daemons.get(name).cloned()
    }
    fn crashed(&self, name: &str) -> bool {
        let n = self.n();
        !n.daemons.contains_key(name) && !n.clean.contains(name)
    }
    fn status(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let n = self.n();
        let dev = n
            .daemons
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("not attached"))?;
        Ok(json!({
            "device": dev, "size_bytes": 1u64 << 30, "epoch": 7, "dirty_bytes": 4096,
            "shipping": {"last_committed": 6, "last_committed_cut_unix_ms": 1, "outbox_entries": 0},
            "hydration": {"done": false, "percent": 42.5},
        }))
    }
    fn dp_volume(&self, name: &str, _dp: &str, _t: &Path) -> anyhow::Result<Option<DpVolume>> {
        let n = self.n();
        if n.dp_down {
            anyhow::bail!("connect: connection refused");
        }
        Ok(n.dp.get(name).cloned())
    }
    fn fs_type(&self, dev: &str) -> anyhow::Result<Option<String>> {
        Ok(self.n().fs.get(dev).cloned())
    }
    fn mkfs(&self, dev: &str, fs: Fs) -> anyhow::Result<()> {
        let mut n = self.n();
        n.fs.insert(dev.into(), fs.name().into());
        n.log.push(format!("mkfs {} {dev}", fs.name()));
        Ok(())
    }
    fn mount(&self, dev: &str, mp: &Path, fstype: &str) -> anyhow::Result<()> {
        let mut n = self.n();
        assert_eq!(n.fs.get(dev).map(String::as_str), Some(fstype));
        assert!(!n.mounts.contains_key(mp), "mounted twice");
        n.mounts.insert(mp.into(), dev.into());
        n.log.push(format!("mount {dev} {}", mp.display()));
        Ok(())
    }
    fn umount(&self, mp: &Path) -> anyhow::Result<()> {
        let mut n = self.n();
        anyhow::ensure!(n.mounts.remove(mp).is_some(), "not mounted");
        n.log.push(format!("umount {}", mp.display()));
        Ok(())
    }
    fn is_mounted(&self, mp: &Path) -> bool {
        self.n().mounts.contains_key(mp)
    }
    fn freeze(&self, mp: &Path) -> anyhow::Result<()> {
        let mut n = self.n();
        n.frozen.insert(mp.into());
        n.log.push(format!("freeze {}", mp.display()));
        Ok(())
    }
    fn thaw(&self, mp: &Path) -> anyhow::Result<()> {
        let mut n = self.n();
        if n.frozen.remove(mp) {
            n.log.push(format!("thaw {}", mp.display()));
        }
        Ok(())
    }
    fn cut(&self, name: &str, _t: Duration) -> anyhow::Result<(u64, u64)> {
        let mut n = self.n();
        let e = {
            let e = n.epoch.entry(name.into()).or_insert(1);
            *e += 1;
            *e - 1
        };
        let mp = PathBuf::from("/mnt/dv").join(name);
        let frozen = n.frozen.contains(&mp);
        n.cut_frozen.push((name.into(), frozen));
        n.log.push(format!("cut {name} {e}"));
        Ok((e, e))
    }
    fn wait_snapshot(
        &self,
        name: &str,
        _ticket: u64,
        epoch: u64,
        _t: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let n = self.n();
        assert!(n.frozen.is_empty(), "waited for a commit while frozen");
        Ok(json!({"snapshot": epoch, "committed": true, "name": name}))
    }
    fn remove_files(&self, p: &VolumePaths) -> anyhow::Result<()> {
        let mut n = self.n();
        n.files.remove(&p.cache_dir);
        n.files.remove(&p.backing);
        n.log.push(format!("rm {}", p.cache_dir.display()));
        Ok(())
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn cfg(dir: &Path, with_dp: bool) -> AgentConfig {
    AgentConfig {
        state_dir: dir.join("state"),
        cache_root: dir.join("cache"),
        backing_root: dir.join("backing"),
        mount_root: "/mnt/dv".into(),
        dataplane: with_dp.then(|| "127.0.0.1:7070".to_string()),
        auth_token_file: with_dp.then(|| dir.join("token")),
        ..AgentConfig::default()
    }
}

fn call(m: &VolumeManager<Fake>, path: &str, body: serde_json::Value) -> serde_json::Value {
    handle(m, path, body.to_string().as_bytes())
}

fn ok(v: &serde_json::Value) {
    assert_eq!(v["Err"].as_str().unwrap_or(""), "", "{v}");
}

fn err_of(v: &serde_json::Value) -> String {
    let e = v["Err"].as_str().unwrap_or("").to_string();
    assert!(!e.is_empty(), "expected an error, got {v}");
    e
}

#[test]
fn every_endpoint_create_mount_twice_unmount_remove() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    assert_eq!(
        call(&m, "/Plugin.Activate", json!({})),
        json!({"Implements": ["VolumeDriver"]})
    );
    assert_eq!(
        handle(&m, "/VolumeDriver.Capabilities", b""),
        json!({"Capabilities": {"Scope": "local"}})
    );
    ok(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "db1", "Opts": {"size": "1GiB", "flush-interval": "2s"}}),
    ));
    // Idempotent with the same options.
    ok(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "db1", "Opts": {"size": "1GiB", "flush-interval": "2s"}}),
    ));
    let l = call(&m, "/VolumeDriver.List", json!({}));
    assert_eq!(l["Volumes"][0]["Name"], "db1");
    assert_eq!(l["Volumes"][0]["Mountpoint"], "");
    assert_eq!(
        call(&m, "/VolumeDriver.Path", json!({"Name": "db1"}))["Mountpoint"],
        ""
    );
    // One `docker run` mounts twice with two ids.
    let a = call(&m, "/VolumeDriver.Mount", json!({"Name": "db1", "ID": "a"}));
    ok(&a);
    assert_eq!(a["Mountpoint"], "/mnt/dv/db1");
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db1", "ID": "b"}),
    ));
    // The same id again counts once.
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db1", "ID": "b"}),
    ));
    assert_eq!(
        call(&m, "/VolumeDriver.Path", json!({"Name": "db1"}))["Mountpoint"],
        "/mnt/dv/db1"
    );
    let g = call(&m, "/VolumeDriver.Get", json!({"Name": "db1"}));
    ok(&g);
    let st = &g["Volume"]["Status"];
    assert_eq!(g["Volume"]["Mountpoint"], "/mnt/dv/db1");
    assert_eq!(st["device"], "/dev/ublkb0");
    assert_eq!(st["mounts"], 2);
    assert_eq!(st["last_snapshot"], 6);
    assert_eq!(st["hydration"], "42.5%");
    assert!(g["Volume"]["CreatedAt"].as_str().unwrap().starts_with("20"));
    // Removing a mounted volume is refused.
    assert!(err_of(&call(&m, "/VolumeDriver.Remove", json!({"Name": "db1"}))).contains("in use"));
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "a"}),
    ));
    assert!(fake.n().mounts.contains_key(Path::new("/mnt/dv/db1")));
    // An id that holds nothing: no error, nothing changes.
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "zz"}),
    ));
    assert!(fake.n().mounts.contains_key(Path::new("/mnt/dv/db1")));
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "b"}),
    ));
    assert!(fake.n().mounts.is_empty());
    // Mounted again: the filesystem is not made twice.
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db1", "ID": "c"}),
    ));
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "c"}),
    ));
    ok(&call(&m, "/VolumeDriver.Remove", json!({"Name": "db1"})));
    let log = fake.n().log.clone();
    assert_eq!(
        log,
        vec![
            "add db1 1073741824",
            "mkfs ext4 /dev/ublkb0",
            "mount /dev/ublkb0 /mnt/dv/db1",
            "umount /mnt/dv/db1",
            "mount /dev/ublkb0 /mnt/dv/db1",
            "umount /mnt/dv/db1",
            "detach db1",
            &format!("rm {}", d.path().join("cache/db1").display()),
        ]
    );
    assert!(call(&m, "/VolumeDriver.List", json!({}))["Volumes"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(
        err_of(&call(&m, "/VolumeDriver.Get", json!({"Name": "db1"}))).contains("no volume db1")
    );
}

/// A volume's `-o` options, else the agent's, reach its daemon's command line.
#[test]
fn volume_options_reach_the_daemon() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut c = cfg(d.path(), true);
    c.heat_interval_s = Some(60);
    c.hydrate_order = Some("lba".into());
    let m = VolumeManager::open(c, fake.clone()).unwrap();
    let argv = |name: &str| fake.n().argv.get(name).cloned().unwrap_or_default();
    let has = |a: &[String], flag: &str, v: &str| a.windows(2).any(|w| w[0] == flag && w[1] == v);
    for (name, opts) in [
        (
            "db1",
            json!({"size": "1GiB", "heat-interval-s": "0", "hydrate-readahead": "4MiB"}),
        ),
        ("db2", json!({"size": "1GiB"})),
    ] {
        ok(&call(
            &m,
            "/VolumeDriver.Create",
            json!({"Name": name, "Opts": opts}),
        ));
        ok(&call(
            &m,
            "/VolumeDriver.Mount",
            json!({"Name": name, "ID": "c1"}),
        ));
    }
    let a = argv("db1");
    assert!(has(&a, "--heat-interval-s", "0"), "{a:?}");
    assert!(has(&a, "--hydrate-readahead", "4194304"), "{a:?}");
    assert!(has(&a, "--hydrate-order", "lba"), "{a:?}");
    let b = argv("db2");
    assert!(has(&b, "--heat-interval-s", "60"), "{b:?}");
    assert!(!b.iter().any(|x| x == "--hydrate-readahead"), "{b:?}");
}

#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    let create = |name: &str, o: serde_json::Value| {
        call(&m, "/VolumeDriver.Create", json!({"Name": name, "Opts": o}))
    };
    assert!(err_of(&create("db1", json!({"size": "lots"}))).contains("size=\"lots\""));
    assert!(err_of(&create("db1", json!({"size": "1000"}))).contains("multiple of 4KiB"));
    assert!(err_of(&create("db1", json!({"colour": "red"}))).contains("unknown option \"colour\""));
    assert!(err_of(&create("db1", json!({"fs": "ntfs"}))).contains("ext4"));
    assert!(err_of(&create("db1", json!({"from": "db0"}))).contains("VOLUME@SNAPSHOT_ID"));
    assert!(err_of(&create("db1", json!({"from": "a@1", "recover": "db1"}))).contains("exclude"));
    assert!(err_of(&create("db1", json!({"recover": "db9"}))).contains("keeps its name"));
    assert!(
        err_of(&create("db1", json!({"from": "a@1", "size": "1GiB"}))).contains("size= is for new")
    );
    assert!(err_of(&create("db1", json!({"flush-interval": "soon"}))).contains("flush-interval"));
    assert!(
        err_of(&create("db1", json!({"hydrate-readahead": "100KiB"})))
            .contains("hydrate-readahead: 102400 is not a multiple of 256KiB")
    );
    assert!(err_of(&create("db1", json!({"hydrate-order": "random"})))
        .contains("hydrate-order: \"random\" is not a hydration order: hot-first or lba"));
    assert!(err_of(&create("db1", json!({"heat-interval-s": "5m"})))
        .contains("heat-interval-s=\"5m\": a number of seconds"));
    assert!(err_of(&create("db1", json!({"dataplane": "nohost"}))).contains("dataplane="));
    assert!(err_of(&create("../etc", json!({}))).contains("name"));
    assert!(err_of(&create("db1", json!({"at": "-1h"}))).contains("recover="));
    // A key file: absolute, a real key (never written into the record), and a data plane.
    assert!(
        err_of(&create("db1", json!({"encryption-key-file": "db1.key"}))).contains("absolute path")
    );
    let missing = d.path().join("no.key");
    assert!(err_of(&create(
        "db1",
        json!({"encryption-key-file": missing.to_str().unwrap()})
    ))
    .contains("encryption-key-file="));
    let bad = d.path().join("bad.key");
    std::fs::write(&bad, "not hex\n").unwrap();
    assert!(err_of(&create(
        "db1",
        json!({"encryption-key-file": bad.to_str().unwrap()})
    ))
    .contains("encryption-key-file="));
    let good = d.path().join("db1.key");
    deltavol::crypt::VolumeKey::generate(&good).unwrap();
    let no_dp = VolumeManager::open(cfg(&d.path().join("nodp"), false), Fake::default()).unwrap();
    let e = err_of(&call(
        &no_dp,
        "/VolumeDriver.Create",
        json!({"Name": "db1", "Opts": {"encryption-key-file": good.to_str().unwrap()}}),
    ));
    assert!(e.contains("needs a data plane"), "{e}");
    // Bodies that are not the protocol.
    assert!(err_of(&handle(&m, "/VolumeDriver.Create", b"{not json")).contains("bad request"));
    assert!(err_of(&handle(&m, "/VolumeDriver.Mount", b"{\"Name\": 5}")).contains("bad request"));
    assert!(err_of(&handle(&m, "/VolumeDriver.Snapshot", b"{}")).contains("unknown call"));
    assert!(err_of(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "nope", "ID": "a"})
    ))
    .contains("no volume nope"));
    assert!(
        err_of(&call(&m, "/VolumeDriver.Remove", json!({"Name": "nope"})))
            .contains("no volume nope")
    );
    assert!(
        err_of(&call(&m, "/VolumeDriver.Path", json!({"Name": "nope"}))).contains("no volume nope")
    );
    assert!(fake.n().log.is_empty(), "{:?}", fake.n().log);
    assert!(m.list().is_empty());
    // A good key file: the record keeps its path, never the key.
    ok(&create(
        "enc1",
        json!({"encryption-key-file": good.to_str().unwrap()}),
    ));
    let key_hex = std::fs::read_to_string(&good).unwrap();
    let mut recorded = String::new();
    for e in walk(&d.path().join("state")) {
        recorded.push_str(&String::from_utf8_lossy(&std::fs::read(e).unwrap()));
    }
    assert!(recorded.contains(good.to_str().unwrap()), "{recorded}");
    assert!(
        !recorded.contains(key_hex.trim()),
        "the key is not in the record"
    );
    // A different create of an existing volume.
    ok(&create("db1", json!({"size": "1GiB"})));
    assert!(err_of(&create("db1", json!({"size": "2GiB"}))).contains("exists already"));
    // An empty mount id.
    assert!(err_of(&call(&m, "/VolumeDriver.Mount", json!({"Name": "db1"}))).contains("id"));
}

#[test]
fn data_plane_refusals_reach_docker() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    // The name is another volume on the data plane (attached on another node).
    fake.n().dp.insert(
        "db1".into(),
        DpVolume {
            volume_id: "5d0c".into(),
            size_bytes: 1 << 30,
            snapshot_count: 3,
            latest_snap_id: 9,
            latest_commit_unix_ms: 1,
        },
    );
    let e = err_of(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "db1", "Opts": {}}),
    ));
    assert!(
        e.contains("exists on the data plane") && e.contains("recover=db1") && e.contains("5d0c"),
        "{e}"
    );
    // The data plane away: refused, it cannot be checked.
    fake.n().dp_down = true;
    let e = err_of(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "db2", "Opts": {}}),
    ));
    assert!(
        e.contains("reachable") && e.contains("connection refused"),
        "{e}"
    );
    // An attach that fails (unknown snapshot, say): nothing recorded, its files removed.
    fake.n().attach_fails = Some("snapshot 99 of db1 does not exist".into());
    let e = err_of(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "c1", "Opts": {"from": "db1@99"}}),
    ));
    assert!(e.contains("snapshot 99"), "{e}");
    assert!(m.list().is_empty());
    assert!(fake.n().files.is_empty());
    // Without a data plane, clones and recoveries are refused with what to set.
    let d2 = tempfile::tempdir().unwrap();
    let m2 = VolumeManager::open(cfg(d2.path(), false), Fake::default()).unwrap();
    let e = err_of(&call(
        &m2,
        "/VolumeDriver.Create",
        json!({"Name": "c1", "Opts": {"from": "db1@1"}}),
    ));
    assert!(e.contains("needs a data plane"), "{e}");
    // Files of an unrecorded volume of the name are never taken over.
    std::fs::create_dir_all(d2.path().join("cache/old")).unwrap();
    let e = err_of(&call(
        &m2,
        "/VolumeDriver.Create",
        json!({"Name": "old", "Opts": {}}),
    ));
    assert!(
        e.contains("exists already, but the agent has no volume old"),
        "{e}"
    );
}

#[test]
fn clone_and_recover_are_mounted_without_mkfs() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    ok(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "c1", "Opts": {"from": "db1@42"}}),
    ));
    ok(&call(
        &m,
        "/VolumeDriver.Create",
        json!({"Name": "db1", "Opts": {"recover": "db1", "at": "-15m"}}),
    ));
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "c1", "ID": "x"}),
    ));
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db1", "ID": "y"}),
    ));
    let log = fake.n().log.clone();
    assert!(log.contains(&"clone db1@42 c1".to_string()), "{log:?}");
    assert!(
        log.contains(&"recover db1 Some(\"-15m\")".to_string()),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.starts_with("mkfs")), "{log:?}");
    // A clone whose snapshot holds no filesystem is never formatted.
    fake.n().fs.clear();
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "c1", "ID": "x"}),
    ));
    let e = err_of(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "c1", "ID": "x2"}),
    ));
    assert!(e.contains("not formatted again"), "{e}");
}

#[test]
fn references_survive_an_agent_restart_and_a_dead_daemon_is_restarted() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    {
        let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
        m.reconcile().unwrap();
        ok(&call(
            &m,
            "/VolumeDriver.Create",
            json!({"Name": "db1", "Opts": {}}),
        ));
        ok(&call(
            &m,
            "/VolumeDriver.Mount",
            json!({"Name": "db1", "ID": "a"}),
        ));
        ok(&call(
            &m,
            "/VolumeDriver.Mount",
            json!({"Name": "db1", "ID": "b"}),
        ));
        ok(&call(
            &m,
            "/VolumeDriver.Create",
            json!({"Name": "db2", "Opts": {}}),
        ));
    }
    // The agent restarts (same boot): the mount stays, both references too.
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    m.reconcile().unwrap();
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "a"}),
    ));
    assert!(fake.n().mounts.contains_key(Path::new("/mnt/dv/db1")));
    // A daemon dies: the supervisor takes its device over.
    fake.n().daemons.remove("db2");
    m.supervise();
    assert_eq!(fake.n().log.last().unwrap(), "reattach db2");
    assert_eq!(m.get("db2").unwrap().status["daemon_restarts"], 1);
    // A restart that fails is retried with a backoff, and Get says why.
    fake.n().daemons.remove("db2");
    fake.n().attach_fails = Some("backing disk gone".into());
    m.supervise();
    m.supervise();
    let st = m.get("db2").unwrap().status;
    assert!(
        st["error"].as_str().unwrap().contains("backing disk gone"),
        "{st}"
    );
    assert_eq!(st["device"], "not attached");
    let tries = fake
        .n()
        .log
        .iter()
        .filter(|l| l.as_str() == "reattach db2")
        .count();
    assert_eq!(tries, 1, "retried without backoff");
    fake.n().attach_fails = None;
    // An operator's clean stop (`deltavol del`) is left alone by the supervisor; the next
    // mount attaches the volume again.
    std::thread::sleep(Duration::from_millis(1100));
    m.supervise();
    assert!(fake.n().daemons.contains_key("db2"));
    fake.n().daemons.remove("db2");
    fake.n().clean.insert("db2".into());
    std::thread::sleep(Duration::from_millis(2100));
    m.supervise();
    assert!(
        !fake.n().daemons.contains_key("db2"),
        "restarted a volume stopped on purpose"
    );
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db2", "ID": "m"}),
    ));
    assert!(fake.n().daemons.contains_key("db2"));
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db2", "ID": "m"}),
    ));
    // The agent restarts while a mount of db1 was lost (someone unmounted it): mounted again.
    fake.n().mounts.clear();
    drop(m);
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    m.reconcile().unwrap();
    assert!(fake.n().mounts.contains_key(Path::new("/mnt/dv/db1")));
    assert!(fake.n().daemons.contains_key("db2"));
    ok(&call(
        &m,
        "/VolumeDriver.Unmount",
        json!({"Name": "db1", "ID": "b"}),
    ));
    assert!(fake.n().mounts.is_empty());
}

#[test]
fn a_mount_left_by_a_crash_before_its_record_is_unmounted_and_a_new_boot_drops_references() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    {
        let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
        ok(&call(
            &m,
            "/VolumeDriver.Create",
            json!({"Name": "db1", "Opts": {}}),
        ));
        ok(&call(
            &m,
            "/VolumeDriver.Mount",
            json!({"Name": "db1", "ID": "a"}),
        ));
    }
    // The record says an earlier boot: nothing is mounted any more and the old ids never
    // unmount; the references go.
    let p = d.path().join("state/state.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    st["boot_id"] = "an-earlier-boot".into();
    std::fs::write(&p, st.to_string()).unwrap();
    fake.n().mounts.clear();
    fake.n().daemons.clear();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    m.reconcile().unwrap();
    assert_eq!(m.get("db1").unwrap().status["mounts"], 0);
    assert!(fake.n().mounts.is_empty());
    assert!(fake.n().daemons.contains_key("db1"));
    // A mount with no reference (the agent died between mount(2) and its record): unmounted.
    fake.n()
        .mounts
        .insert("/mnt/dv/db1".into(), "/dev/ublkb1".into());
    drop(m);
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    m.reconcile().unwrap();
    assert!(fake.n().mounts.is_empty());
    // A damaged record: the agent refuses to start, the file stays.
    std::fs::write(&p, b"{\"version\": 1, \"volumes\": ").unwrap();
    assert!(VolumeManager::open(cfg(d.path(), true), fake.clone()).is_err());
    assert!(p.exists());
}

#[test]
fn consistency_group_freezes_all_cuts_all_then_thaws_before_waiting() {
    let d = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let m = VolumeManager::open(cfg(d.path(), true), fake.clone()).unwrap();
    for n in ["db", "wal", "raw"] {
        ok(&call(
            &m,
            "/VolumeDriver.Create",
            json!({"Name": n, "Opts": {}}),
        ));
    }
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "db", "ID": "1"}),
    ));
    ok(&call(
        &m,
        "/VolumeDriver.Mount",
        json!({"Name": "wal", "ID": "2"}),
    ));
    fake.n().log.clear();
    let g = m
        .snapshot(
            &["wal".into(), "db".into(), "raw".into(), "db".into()],
            Duration::from_secs(1),
        )
        .unwrap();
    let log = fake.n().log.clone();
    assert_eq!(
        log,
        vec![
            "freeze /mnt/dv/db",
            "freeze /mnt/dv/wal",
            "cut db 1",
            "cut raw 1",
            "cut wal 1",
            "thaw /mnt/dv/wal",
            "thaw /mnt/dv/db",
        ]
    );
    assert_eq!(g.volumes.len(), 3);
    assert!(g.volumes.iter().all(|v| v.committed && v.snapshot == 1));
    let frozen: Vec<_> = g
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v.frozen))
        .collect();
    assert_eq!(frozen, vec![("db", true), ("raw", false), ("wal", true)]);
    // Every mounted volume was cut while both filesystems were frozen.
    assert_eq!(
        fake.n().cut_frozen,
        vec![
            ("db".into(), true),
            ("raw".into(), false),
            ("wal".into(), true)
        ]
    );
    // Unknown volumes and empty groups are refused before anything is frozen.
    fake.n().log.clear();
    assert!(m
        .snapshot(&["db".into(), "nope".into()], Duration::from_secs(1))
        .is_err());
    assert!(m.snapshot(&[], Duration::from_secs(1)).is_err());
    assert!(fake.n().log.is_empty());
    // A volume whose daemon is down: refused, nothing frozen.
    fake.n().daemons.remove("wal");
    let e = m
        .snapshot(&["db".into(), "wal".into()], Duration::from_secs(1))
        .unwrap_err();
    assert!(format!("{e:#}").contains("not attached"));
    assert!(fake.n().frozen.is_empty());
}

#[test]
fn attach_arguments_are_what_deltavol_takes() {
    use clap::Parser;
    use deltavol::cli::Cli;
    let paths = VolumePaths {
        cache_dir: "/c/db1".into(),
        backing: "/b/db1.img".into(),
        outbox: "/b/db1.outbox".into(),
        mountpoint: "/m/db1".into(),
    };
    for mode in [
        AttachMode::Add {
            size: Some(1 << 30),
        },
        AttachMode::Add { size: None },
        AttachMode::Clone {
            spec: "db0@3".into(),
        },
        AttachMode::Recover {
            at: Some("-15m".into()),
        },
    ] {
        let req = AttachRequest {
            name: "db1".into(),
            mode,
            paths: paths.clone(),
            dataplane: Some(("127.0.0.1:7070".into(), "/etc/deltavol/token".into())),
            tls: deltavol::cli::TlsArgs {
                tls_ca: Some("/etc/deltavol/tls/ca.pem".into()),
                tls_server_name: Some("dp.example".into()),
                ..Default::default()
            },
            flush_interval_ms: Some(2000),
            cache_limit: Some(1 << 30),
            read_cache: Some(16 << 20),
            hydrate_rate: Some(0),
            hydrate_readahead: Some(4 << 20),
            hydrate_order: Some("lba".into()),
            heat_interval_s: Some(0),
            queues: Some(2),
            depth: Some(128),
            retention: Some("last=50,hourly=24".into()),
            encryption_key_file: Some("/etc/deltavol/keys/db1.key".into()),
        };
        let mut argv = vec!["deltavol".to_string()];
        argv.extend(req.args());
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let dbg = format!("{cli:?}");
        assert!(
            dbg.contains("user_recovery: true") && dbg.contains("flush_interval_ms: 2000"),
            "{dbg}"
        );
        assert!(dbg.contains("last=50,hourly=24"), "{dbg}");
        assert!(
            dbg.contains("hydrate_readahead: 4194304") && dbg.contains("hydrate_order: Lba"),
            "the daemon gets the volume's hydration options: {dbg}"
        );
        assert!(
            dbg.contains("heat_interval_s: 0"),
            "the daemon gets the volume's heat interval: {dbg}"
        );
        assert!(
            dbg.contains("tls_ca: Some(\"/etc/deltavol/tls/ca.pem\")")
                && dbg.contains("tls_server_name: Some(\"dp.example\")"),
            "the daemon gets the agent's TLS: {dbg}"
        );
        assert!(
            dbg.contains("encryption_key_file: Some(\"/etc/deltavol/keys/db1.key\")"),
            "the daemon gets the volume's key file: {dbg}"
        );
    }
}

/// The plugin socket itself: HTTP over a unix socket, as dockerd speaks it; a second agent on
/// the same socket is refused; a stale socket file left by a crash is replaced.
#[test]
fn the_plugin_socket_speaks_http() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("plugins/deltavol.sock");
    let m = Arc::new(VolumeManager::open(cfg(d.path(), true), Fake::default()).unwrap());
    let post = |path: &str, body: &str| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // A stale socket file (a crashed agent's) does not stop the start.
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let _t = deltavol::agent::docker::serve(&sock, m.clone()).unwrap();
    let r = post("/Plugin.Activate", "{}");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("application/vnd.docker.plugins.v1.2+json"),
        "{r}"
    );
    assert!(r.ends_with("{\"Implements\":[\"VolumeDriver\"]}"), "{r}");
    let r = post(
        "/VolumeDriver.Create",
        r#"{"Name":"db1","Opts":{"size":"lots"}}"#,
    );
    assert!(r.contains("size=\\\"lots\\\""), "{r}");
    let r = post(
        "/VolumeDriver.Create",
        r#"{"Name":"db1","Opts":{"size":"1GiB"}}"#,
    );
    assert!(r.ends_with("{\"Err\":\"\"}"), "{r}");
    let r = post("/VolumeDriver.List", "");
    assert!(r.contains("\"Name\":\"db1\""), "{r}");
    // Only root may connect.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second agent on the same socket is refused.
    let e = deltavol::agent::docker::serve(&sock, m).unwrap_err();
    assert!(format!("{e:#}").contains("another agent"), "{e:#}");
}
