//! The daemon behind `deltavol add`: opens the volume, creates the ublk device, serves it, and
//! tears it down cleanly on `deltavol del` or SIGTERM/SIGINT.
//!
//! Start-up is a readiness handshake (as rublk does): without `--foreground` the CLI forks, the
//! child becomes the daemon and reports through a pipe either the live device or the real
//! error, and only then does the CLI print `/dev/ublkbN` and exit. Before any thread starts the
//! daemon leaves the caller's mount namespace (`unshare(CLONE_NEWNS)`, libublk-rs#50: a daemon
//! sharing a mount namespace with a mount of its own device can deadlock on exit).

use crate::control::{self, Request, RunInfo};
use crate::queue;
use crate::ring::{Kicker, FILE_BACKING, FILE_MIRROR, NR_FIXED_FILES};
use crate::volume::{Volume, VolumeConfig};
use anyhow::{anyhow, bail, Context};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request the device accepts (ublk `max_io_buf_bytes`).
pub const IO_BUF_BYTES: u32 = 512 << 10;
/// Largest DISCARD / WRITE_ZEROES request, in bytes.
pub const DISCARD_BYTES_MAX: u64 = 1 << 30;
pub const QUEUES_MAX: u16 = 32;
pub const DEPTH_MAX: u16 = 1024;
const CONTROL_CONNECTIONS_MAX: usize = 16;

/// Everything `deltavol add` needs.
#[derive(Debug, Clone)]
pub struct AddConfig {
    pub volume: VolumeConfig,
    /// Create the device with the kernel's user recovery: after a daemon crash the device
    /// (and a filesystem on it) waits for `deltavol add` to take it over; its I/O blocks
    /// until then.
    pub user_recovery: bool,
    /// `--zero-copy` ([`crate::zerocopy`]).
    pub zero_copy: crate::zerocopy::ZeroCopy,
    pub queues: u16,
    pub depth: u16,
    pub foreground: bool,
    pub json: bool,
    /// Serve Prometheus metrics of the volume here ([`crate::metrics`]).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The line a started daemon reports (and `add --json` prints).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub name: String,
    pub dev_id: u32,
    pub device: String,
    pub pid: u32,
    pub cache_dir: PathBuf,
    pub backing: PathBuf,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fails unless the ublk driver is loaded.
pub fn check_driver() -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        bail!("/dev/ublk-control is missing: the ublk driver is not loaded. Run `modprobe ublk_drv` (Linux >= 6.0; see kernel-setup/README.md)");
    }
    Ok(())
}

/// Checks what can be checked before forking, so the common mistakes fail fast and clearly.
pub fn preflight(cfg: &AddConfig) -> anyhow::Result<()> {
    check_driver()?;
    let name = &cfg.volume.cache.name;
    if let Some(info) = control::read_info(&control::info_path(name))? {
        if control::pid_alive(info.pid) {
            bail!("volume {name:?} is already attached as {} (pid {}); `deltavol del {name}` detaches it", info.device, info.pid);
        }
    }
    Ok(())
}

/// Runs `add`: in the foreground, or forked into a daemon that reports readiness.
pub fn add(cfg: AddConfig) -> anyhow::Result<()> {
    preflight(&cfg)?;
    if cfg.foreground {
        return serve(cfg, None);
    }
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: the CLI is single-threaded here (no thread has been spawned yet), so the child
    // may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            // One line: the daemon keeps its end open while it runs, so read a line, not to EOF.
            let mut msg = String::new();
            std::io::BufReader::new(std::fs::File::from(rd))
                .read_line(&mut msg)
                .context("read daemon start-up report")?;
            let log = cfg.volume.cache.cache_dir.join("deltavol.log");
            if let Some(j) = msg.strip_prefix("OK ") {
                let r: Ready = serde_json::from_str(j.trim()).context("daemon start-up report")?;
                if cfg.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("{}", r.device);
                }
                Ok(())
            } else if let Some(e) = msg.strip_prefix("ERR ") {
                bail!("{}", e.trim())
            } else {
                bail!(
                    "the deltavol daemon exited during start-up; see {}",
                    log.display()
                )
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let res = daemonize(&cfg).and_then(|_| serve(cfg, Some(wr.try_clone()?)));
            if let Err(e) = &res {
                report(&wr, &format!("ERR {e:#}"));
                tracing::error!(error = %format!("{e:#}"), "daemon failed");
            }
            std::process::exit(if res.is_ok() { 0 } else { 1 });
        }
    }
}

fn report(fd: &OwnedFd, msg: &str) {
    if let Ok(f) = fd.try_clone() {
        let line = format!("{}\n", msg.replace('\n', " "));
        let _ = std::fs::File::from(f).write_all(line.as_bytes());
    }
}

/// Detaches from the terminal: new session, stdio to the volume's log file.
fn daemonize(cfg: &AddConfig) -> anyhow::Result<()> {
    nix::unistd::setsid().context("setsid")?;
    let dir = &cfg.volume.cache.cache_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create cache dir {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("deltavol.log"))
        .with_context(|| format!("open log {}", dir.join("deltavol.log").display()))?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    nix::unistd::dup2(log.as_raw_fd(), 1)?;
    nix::unistd::dup2(log.as_raw_fd(), 2)?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Leaves the caller's mount namespace (libublk-rs#50) and stops mount propagation into it.
fn private_mount_namespace() {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        tracing::warn!(error = %e, "unshare(CLONE_NEWNS) failed; a mount of the device in this namespace could deadlock daemon exit");
        return;
    }
    let flags = nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE;
    if let Err(e) = nix::mount::mount(None::<&str>, "/", None::<&str>, flags, None::<&str>) {
        tracing::warn!(error = %e, "could not make / private in the daemon's mount namespace");
    }
    // The new namespace is a copy: a filesystem mounted on a ublk device when the daemon
    // started (its own device being taken over, or another volume's) would stay mounted in
    // here and keep that device busy after the user unmounts it. The daemon needs none.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let src = f.next()?;
            let dst = f.next()?;
            src.starts_with("/dev/ublkb").then_some(dst)
        })
        .collect();
    targets.reverse(); // innermost first
    for t in targets {
        let t = t.replace("\\040", " ");
        if let Err(e) = nix::mount::umount2(t.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %t, error = %e, "could not detach a ublk mount from the daemon's namespace");
        }
    }
}

fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    let _ = set.thread_block();
    set
}

/// Gives this thread libublk's control ring (a `UblkCtrl` used off the thread that created
/// the device panics without one).
fn init_ctrl_ring() -> Result<(), libublk::UblkError> {
    libublk::ublk_init_ctrl_task_ring(|r| {
        if r.is_none() {
            let ring = io_uring::IoUring::<io_uring::squeue::Entry128>::builder().build(16);
            *r = Some(ring.map_err(libublk::UblkError::IOError)?);
        }
        Ok(())
    })
}

/// Stops the ublk device from a thread other than the one running it.
fn kill_device(dev_id: u32) -> anyhow::Result<()> {
    init_ctrl_ring().map_err(|e| anyhow!("control ring: {e}"))?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32)
        .map_err(|e| anyhow!("open ublk device {dev_id}: {e}"))?;
    ctrl.kill_dev()
        .map_err(|e| anyhow!("stop ublk device {dev_id}: {e}"))?;
    Ok(())
}

struct Daemon {
    volume: Arc<Volume>,
    /// Where the volume's Prometheus metrics are served (`--metrics-listen`).
    metrics_addr: Option<std::net::SocketAddr>,
    info: Mutex<Option<RunInfo>>,
    stopping: AtomicBool,
}

impl Daemon {
    fn stop(&self) {
        if self.stopping.swap(true, SeqCst) {
            return;
        }
        let id = self
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|i| i.dev_id);
        if let Some(id) = id {
            tracing::info!(dev_id = id, "stopping device");
            if let Err(e) = kill_device(id) {
                tracing::error!(error = %format!("{e:#}"), "could not stop the device");
            }
        }
    }

    fn handle(&self, req: Request) -> serde_json::Value {
        match req {
            Request::Status => {
                let mut v = serde_json::to_value(self.volume.status()).unwrap_or_default();
                if let (Some(info), Some(o)) = (
                    self.info.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    v.as_object_mut(),
                ) {
                    o.insert("dev_id".into(), info.dev_id.into());
                    o.insert("device".into(), info.device.into());
                    o.insert("pid".into(), info.pid.into());
                    o.insert("queues".into(), info.queues.into());
                    o.insert("depth".into(), info.depth.into());
                    o.insert("flush_interval_ms".into(), info.flush_interval_ms.into());
                    o.insert(
                        "cache_dir".into(),
                        serde_json::to_value(&info.cache_dir).unwrap_or_default(),
                    );
                    o.insert(
                        "backing".into(),
                        serde_json::to_value(&info.backing).unwrap_or_default(),
                    );
                    o.insert("started_unix_ms".into(), info.started_unix_ms.into());
                }
                if let (Some(a), Some(o)) = (self.metrics_addr, v.as_object_mut()) {
                    o.insert("metrics_url".into(), format!("http://{a}/metrics").into());
                }
                // TLS, plain TCP to loopback, or plain TCP allowed by --insecure.
                if let (Some(ship), Some(o)) = (&self.volume.ship, v.as_object_mut()) {
                    o.insert("dataplane_transport".into(), ship.transport().into());
                }
                // Client-side encryption: `none`, or `xchacha20poly1305 (key id …)`.
                if let Some(o) = v.as_object_mut() {
                    let id = self.volume.key_id.as_ref();
                    o.insert(
                        "encryption".into(),
                        crate::crypt::describe_key_id(id).into(),
                    );
                    o.insert(
                        "encryption_key_id".into(),
                        id.map(crate::crypt::key_id_hex).into(),
                    );
                }
                // The daemon's resident memory, and how much of it is not the read cache.
                if let (Ok(m), Some(o)) = (crate::procmem::resident(), v.as_object_mut()) {
                    let cache = o
                        .get("read_cache_blocks")
                        .and_then(|b| b.as_u64())
                        .unwrap_or(0)
                        .saturating_mul(crate::cache::meta::BLOCK_SIZE);
                    o.insert("rss_bytes".into(), m.rss_bytes.into());
                    o.insert("rss_peak_bytes".into(), m.hwm_bytes.into());
                    o.insert("read_cache_bytes".into(), cache.into());
                    o.insert(
                        "rss_beyond_read_cache_bytes".into(),
                        m.rss_bytes.saturating_sub(cache).into(),
                    );
                }
                v
            }
            Request::Flush => match self.volume.cut_and_flush() {
                Ok(r) => serde_json::to_value(r).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": format!("flush failed: {e}") }),
            },
            Request::Snapshot { timeout_ms } => {
                let Some(ship) = &self.volume.ship else {
                    return serde_json::json!({ "error": "this volume ships no snapshots: attach it with --dataplane ADDR --auth-token-file F" });
                };
                match self.volume.cut_and_flush() {
                    Ok(r) => {
                        let committed =
                            ship.wait_committed(r.epoch, Duration::from_millis(timeout_ms));
                        let st = ship.status();
                        serde_json::json!({
                            "snapshot": r.epoch, "committed": committed, "flush": r,
                            "outbox_entries": st.outbox_entries, "last_error": st.last_error,
                        })
                    }
                    Err(e) => serde_json::json!({ "error": format!("snapshot failed: {e}") }),
                }
            }
            Request::Cut { timeout_ms } => {
                match self.volume.cut(Duration::from_millis(timeout_ms)) {
                    Ok((ticket, epoch)) => serde_json::json!({ "ticket": ticket, "epoch": epoch }),
                    Err(e) => serde_json::json!({ "error": format!("cut failed: {e}") }),
                }
            }
            Request::WaitSnapshot {
                ticket,
                epoch,
                timeout_ms,
            } => match self.volume.wait_flushed(ticket) {
                Ok(r) => match &self.volume.ship {
                    Some(ship) => {
                        let committed =
                            ship.wait_committed(epoch, Duration::from_millis(timeout_ms));
                        let st = ship.status();
                        serde_json::json!({
                            "snapshot": epoch, "committed": committed, "flush": r,
                            "outbox_entries": st.outbox_entries, "last_error": st.last_error,
                        })
                    }
                    None => {
                        serde_json::json!({ "snapshot": epoch, "committed": false, "flush": r, "local_only": true })
                    }
                },
                Err(e) => {
                    serde_json::json!({ "error": format!("flush of epoch {epoch} failed: {e}") })
                }
            },
            Request::Pin {
                snap_id,
                pinned,
                label,
            } => {
                let Some(ship) = &self.volume.ship else {
                    return serde_json::json!({ "error": "this volume ships no snapshots: attach it with --dataplane ADDR --auth-token-file F" });
                };
                let r = ship.connect().map_err(|e| e.to_string()).and_then(|mut c| {
                    c.pin_snapshot(snap_id, pinned, &label)
                        .map_err(|e| e.to_string())
                });
                match r {
                    Ok(s) => {
                        serde_json::json!({ "snapshot": s.snap_id, "pinned": s.pinned, "label": s.label })
                    }
                    Err(e) => {
                        serde_json::json!({ "error": format!("pin snapshot {snap_id}: {e}") })
                    }
                }
            }
            Request::Stop => {
                self.stop();
                serde_json::json!({ "stopping": true })
            }
            Request::Verify { timeout_ms } => {
                match crate::verify::verify(&self.volume, Duration::from_millis(timeout_ms)) {
                    Ok(r) => serde_json::to_value(r).unwrap_or_default(),
                    Err(e) => serde_json::json!({ "error": format!("verify failed: {e}") }),
                }
            }
        }
    }
}

fn serve_control(listener: UnixListener, d: Arc<Daemon>) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        if active.load(SeqCst) >= CONTROL_CONNECTIONS_MAX {
            control::write_response(
                &mut s,
                &serde_json::json!({"error": "too many control connections; retry"}),
            );
            continue;
        }
        active.fetch_add(1, SeqCst);
        let d = d.clone();
        let a = active.clone();
        let _ = std::thread::Builder::new()
            .name("dv-control".into())
            .spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let resp = match control::read_request(&mut s) {
                    Ok(r) => d.handle(r),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                control::write_response(&mut s, &resp);
                a.fetch_sub(1, SeqCst);
            });
    }
}

/// The run state of a dead daemon of `name`, if its run file is left behind.
pub fn dead_daemon(name: &str) -> Option<RunInfo> {
    let info = control::read_info(&control::info_path(name)).ok()??;
    (!control::pid_alive(info.pid) && info.pid != std::process::id()).then_some(info)
}

/// Removes what a dead daemon of this volume left: its run files and the ublk device it
/// created (after `kill -9` the driver stops the disk, but `/dev/ublkcN` stays until someone
/// deletes it). Returns the device id it deleted. The delete can wait for the last user of the
/// dead disk (a lazily unmounted filesystem), so `add` runs this in the background.
pub fn remove_stale(info: &RunInfo) -> anyhow::Result<Option<u32>> {
    let _ = std::fs::remove_file(control::info_path(&info.name));
    let _ = std::fs::remove_file(&info.socket);
    let dev_id = info.dev_id;
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return Ok(None);
    }
    tracing::info!(
        dev_id,
        dead_pid = info.pid,
        "removing the ublk device left by a dead daemon of this volume"
    );
    init_ctrl_ring()
        .and_then(|_| UblkCtrl::new_simple(dev_id as i32))
        .and_then(|c| c.del_dev_async().or_else(|_| c.del_dev()))
        .map_err(|e| anyhow!("delete stale ublk device {dev_id}: {e}"))?;
    Ok(Some(dev_id))
}

/// The device of a dead daemon of `name` that the kernel holds for a successor (state
/// QUIESCED: created with user recovery, daemon gone): its id, queue count and depth.
fn takeover_candidate(name: &str) -> Option<(u32, u16, u16)> {
    let info = dead_daemon(name)?;
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{}", info.dev_id)).exists() {
        return None;
    }
    init_ctrl_ring().ok()?;
    let c = UblkCtrl::new_simple(info.dev_id as i32).ok()?;
    // The kernel quiesces a device whose daemon died when it notices: at once on newer kernels
    // (the char device's release), within its daemon monitor's period (5 s) on older ones such
    // as 6.12. A recoverable device still LIVE is waited for, not removed as stale: removing
    // it would fail the I/O waiting in it (seen in the Docker drill on 6.12, where the agent
    // restarted the daemon within a second of the kill).
    let deadline = std::time::Instant::now() + TAKEOVER_QUIESCE_WAIT;
    loop {
        let di = c.dev_info();
        if u32::from(di.state) == sys::UBLK_S_DEV_QUIESCED {
            return Some((info.dev_id, di.nr_hw_queues, di.queue_depth));
        }
        let recoverable = di.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0;
        if !recoverable
            || u32::from(di.state) != sys::UBLK_S_DEV_LIVE
            || std::time::Instant::now() >= deadline
        {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
        c.read_dev_info().ok()?;
    }
}

/// How long a successor waits for the kernel to quiesce a dead daemon's recoverable device
/// (twice the monitor period of kernels that notice a dead daemon only through it).
const TAKEOVER_QUIESCE_WAIT: Duration = Duration::from_secs(12);

fn remove_stale_in_background(name: &str) {
    let Some(info) = dead_daemon(name) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("dv-stale-del".into())
        .spawn(move || match remove_stale(&info) {
            Ok(Some(id)) => tracing::info!(dev_id = id, "stale ublk device removed"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not remove the stale ublk device")
            }
        });
}

/// Opens the volume and serves the device until it is stopped.
pub fn serve(cfg: AddConfig, ready_fd: Option<OwnedFd>) -> anyhow::Result<()> {
    let sigs = block_signals();
    private_mount_namespace();
    let name = cfg.volume.cache.name.clone();
    let features = UblkCtrl::get_features().unwrap_or(0);
    tracing::info!(features = format!("{features:#x}"), "ublk driver features");
    // A dead daemon of this volume whose device waits for a successor (user recovery): take
    // the device over, so a mounted filesystem carries on. Otherwise clean up what it left.
    // Taking over is safe because the membership journal restored every write the dead
    // daemon completed (same boot: the page cache is intact).
    let takeover = takeover_candidate(&name);
    if takeover.is_none() {
        remove_stale_in_background(&name);
    }
    let recovery_flags = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    let supported = features & recovery_flags == recovery_flags;
    if cfg.user_recovery && !supported {
        bail!("--user-recovery: this kernel's ublk driver lacks UBLK_F_USER_RECOVERY_REISSUE (Linux >= 6.1 has it)");
    }
    let user_recovery = cfg.user_recovery && supported;
    // Zero copy where the kernel has it (and `--zero-copy` allows it); a taken-over device
    // keeps the mode it was made with (its flags decide, in the queues). `on` on a kernel
    // without it is refused here, before the volume is opened (or created).
    use crate::zerocopy::{select, Medium};
    select(cfg.zero_copy, features, Medium::Disk).map_err(|e| anyhow!(e))?;

    // Bound before the volume opens: a taken --metrics-listen fails start-up at once.
    let metrics_listener = cfg
        .metrics_listen
        .map(deltavol_dataplane::metrics::MetricsListener::bind)
        .transpose()?;
    let volume = Arc::new(Volume::open(&cfg.volume).map_err(|e| anyhow!("{e}"))?);
    let _metrics = match metrics_listener {
        Some(l) => Some(
            l.serve(crate::metrics::registry(vec![volume.clone()]))
                .context("starting the metrics endpoint")?,
        ),
        None => None,
    };
    let cache = volume.cache.clone();
    let medium = if crate::ring::is_memory_file(cache.mirrors[0].as_raw_fd()) {
        Medium::Memory
    } else {
        Medium::Disk
    };
    let io_path = select(cfg.zero_copy, features, medium).map_err(|e| anyhow!(e))?;
    if takeover.is_none() {
        tracing::info!(path = ?io_path, mode = ?cfg.zero_copy, medium = ?medium, "i/o path");
    }
    // A taken-over device keeps its own geometry.
    let nr_queues = takeover.map_or(cfg.queues, |t| t.1);
    let kickers: Arc<Vec<Arc<Kicker>>> = Arc::new(
        (0..nr_queues)
            .map(|_| Kicker::new().map(Arc::new))
            .collect::<std::io::Result<_>>()?,
    );

    let ctrl = match takeover {
        Some((id, q, d)) => {
            tracing::info!(
                dev_id = id,
                "taking over the device of a dead daemon of this volume (user recovery)"
            );
            UblkCtrl::new_simple(id as i32)
                .and_then(|c| c.start_user_recover())
                .map_err(|e| anyhow!("start user recovery of ublk device {id}: {e}"))?;
            UblkCtrlBuilder::default()
                .name("deltavol")
                .id(id as i32)
                .nr_queues(q)
                .depth(d)
                .io_buf_bytes(IO_BUF_BYTES)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| anyhow!("recover ublk device {id}: {e}"))?
        }
        None => UblkCtrlBuilder::default()
            .name("deltavol")
            .id(-1)
            .nr_queues(nr_queues)
            .depth(cfg.depth)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags(if user_recovery { recovery_flags } else { 0 } | io_path.ctrl_flags())
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| {
                anyhow!("create ublk device: {e} (is ublk_drv loaded and are you root?)")
            })?,
    };

    let dev_path = crate::zerocopy::IoPath::of_device(ctrl.dev_info().flags);
    if dev_path != io_path {
        tracing::warn!(device = ?dev_path, asked = ?cfg.zero_copy, "the device taken over keeps the i/o path it was created with");
    }
    let size = cache.size_bytes;
    let depth = takeover.map_or(cfg.depth, |t| t.2);
    let fds = [
        cache.mirrors[0].as_raw_fd(),
        cache.mirrors[1].as_raw_fd(),
        cache.backing.as_raw_fd(),
    ];
    let target_json = serde_json::json!({
        "deltavol": { "name": name, "cache_dir": cfg.volume.cache.cache_dir, "backing": cfg.volume.cache.backing }
    });
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        p.types = sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD;
        p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        p.basic.logical_bs_shift = 12;
        p.basic.physical_bs_shift = 12;
        p.basic.io_opt_shift = 12;
        p.basic.io_min_shift = 12;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: (DISCARD_BYTES_MAX >> 9) as u32,
            max_write_zeroes_sectors: (DISCARD_BYTES_MAX >> 9) as u32,
            max_discard_segments: 1,
            reserved0: 0,
        };
        // Requests may issue several SQEs (split reads, FUA, the kicker, backpressure timers).
        dev.tgt.sq_depth = depth.saturating_mul(4).max(64);
        dev.tgt.cq_depth = depth.saturating_mul(4).max(64);
        let t = &mut dev.tgt;
        t.fds[FILE_MIRROR[0] as usize] = fds[0];
        t.fds[FILE_MIRROR[1] as usize] = fds[1];
        t.fds[FILE_BACKING as usize] = fds[2];
        t.nr_fds = NR_FIXED_FILES as i32;
        dev.set_target_json(target_json);
        Ok(())
    };

    let d = Arc::new(Daemon {
        volume: volume.clone(),
        metrics_addr: _metrics.as_ref().map(|m| m.local_addr()),
        info: Mutex::new(None),
        stopping: AtomicBool::new(false),
    });
    let vq = volume.clone();
    let kq = kickers.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        queue::run_queue(qid, dev, vq.clone(), kq[usize::from(qid)].clone())
    };
    let d2 = d.clone();
    let cfg2 = cfg.clone();
    let dev_fn = move |ctrl: &UblkCtrl| {
        let dev_id = ctrl.dev_info().dev_id;
        match publish(&cfg2, dev_id, d2.clone(), sigs) {
            Ok(ready) => {
                tracing::info!(device = %ready.device, dev_id, "volume {} is live", ready.name);
                match &ready_fd {
                    Some(fd) => report(
                        fd,
                        &format!("OK {}", serde_json::to_string(&ready).unwrap_or_default()),
                    ),
                    None if cfg2.json => {
                        println!("{}", serde_json::to_string(&ready).unwrap_or_default())
                    }
                    None => println!("{}", ready.device),
                }
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                if let Some(fd) = &ready_fd {
                    report(fd, &format!("ERR {e:#}"));
                }
                tracing::error!(error = %format!("{e:#}"), "start-up failed after the device was created; removing it");
                *d2.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(RunInfo {
                    version: control::RUN_INFO_VERSION,
                    name: cfg2.volume.cache.name.clone(),
                    pid: std::process::id(),
                    dev_id,
                    device: String::new(),
                    cache_dir: PathBuf::new(),
                    backing: PathBuf::new(),
                    socket: PathBuf::new(),
                    queues: 0,
                    depth: 0,
                    flush_interval_ms: 0,
                    started_unix_ms: 0,
                });
                d2.stop();
            }
        }
    };
    let r = ctrl.run_target(tgt_init, q_fn, dev_fn);
    // Queues are gone: no more I/O can arrive. Flush everything, then delete the device (a
    // control made for ADD_DEV does it when dropped; a recovered one must be told).
    tracing::info!("device stopped; flushing");
    volume.shutdown();
    if takeover.is_some() {
        if let Err(e) = ctrl.del_dev() {
            tracing::warn!(error = %e, "could not delete the recovered ublk device");
        }
    }
    let _ = std::fs::remove_file(control::socket_path(&name));
    let _ = std::fs::remove_file(control::info_path(&name));
    r.map_err(|e| anyhow!("ublk device: {e}"))?;
    tracing::info!(volume = %name, "volume detached cleanly");
    Ok(())
}

// BLKROSET: _IO(0x12, 93), its argument a pointer to an int (1 = read-only).
nix::ioctl_write_ptr_bad!(blk_ro_set, 0x125d, libc::c_int);

/// Marks block device `dev` read-only in the kernel.
fn set_read_only(dev: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(dev)?;
    let one: libc::c_int = 1;
    // SAFETY: BLKROSET reads one c_int through the pointer, which points at `one`, alive for
    // the whole call; `f` is an open block-device fd.
    unsafe { blk_ro_set(f.as_raw_fd(), &one) }.map_err(std::io::Error::from)?;
    Ok(())
}

/// Publishes the run state and starts the control, fence and signal threads.
fn publish(
    cfg: &AddConfig,
    dev_id: u32,
    d: Arc<Daemon>,
    sigs: nix::sys::signal::SigSet,
) -> anyhow::Result<Ready> {
    let name = &cfg.volume.cache.name;
    let dir = control::run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let sock = control::socket_path(name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("bind {}", sock.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let info = RunInfo {
        version: control::RUN_INFO_VERSION,
        name: name.clone(),
        pid: std::process::id(),
        dev_id,
        device: format!("/dev/ublkb{dev_id}"),
        cache_dir: cfg.volume.cache.cache_dir.clone(),
        backing: cfg.volume.cache.backing.clone(),
        socket: sock.clone(),
        queues: cfg.queues,
        depth: cfg.depth,
        flush_interval_ms: cfg.volume.flush_interval.as_millis() as u64,
        started_unix_ms: now_unix_ms(),
    };
    let tmp = dir.join(format!(".{name}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&info)?)?;
    std::fs::rename(&tmp, control::info_path(name))?;
    *d.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.clone());

    let dc = d.clone();
    std::thread::Builder::new()
        .name("dv-control".into())
        .spawn(move || serve_control(listener, dc))?;
    // Fenced (recovered elsewhere): the cache already fails writes with EIO; also mark the
    // block device read-only, so the kernel refuses writes before they reach us and
    // `blockdev --getro` shows it.
    let (df, dev) = (d.clone(), info.device.clone());
    std::thread::Builder::new()
        .name("dv-fence".into())
        .spawn(move || loop {
            if df.stopping.load(SeqCst) {
                return;
            }
            if df.volume.cache.fenced.load(SeqCst) {
                match set_read_only(&dev) {
                    Ok(()) => tracing::warn!(device = %dev, "fenced: the device is read-only"),
                    Err(e) => {
                        tracing::warn!(device = %dev, error = %e, "fenced: could not mark the device read-only (writes fail with EIO all the same)")
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        })?;
    let ds = d.clone();
    std::thread::Builder::new()
        .name("dv-signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                tracing::info!(signal = ?sig, "signal received: detaching the volume");
                ds.stop();
            }
        })?;
    Ok(Ready {
        name: name.clone(),
        dev_id,
        device: info.device,
        pid: info.pid,
        cache_dir: info.cache_dir,
        backing: info.backing,
    })
}
