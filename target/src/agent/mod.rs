//! The node agent (`deltavol agent`, one per node, run by systemd): owns the node's volumes
//! and serves them to container engines.
//!
//! - [`manager`]: the volume-manager API every front-end calls (create / remove / mount /
//!   unmount / get / list / snapshot), independent of any container engine;
//! - [`docker`]: the Docker volume plugin protocol on `/run/docker/plugins/deltavol.sock`;
//! - the agent's own socket (`/run/deltavol/agent.sock`, JSON lines like a daemon's control
//!   socket): `deltavol snapshot` asks it for filesystem-consistent snapshots of the volumes
//!   it manages, and for consistency groups;
//! - [`state`]: the durable record (volumes, filesystems, mount references);
//! - [`runtime`]: what is done to the node (daemons, mkfs, mount, freeze), a trait so the
//!   manager is tested on the host;
//! - [`config`]: `/etc/deltavol/agent.toml` and the flags over it.
//!
//! The volume daemons are separate processes (each `deltavol add` forks one), so the agent can
//! restart (or crash) without touching I/O; its unit uses `KillMode=process` for that. A
//! daemon that dies is restarted by the supervisor loop, taking its device over (the devices
//! are created with user recovery), so a mounted filesystem sees no error.

pub mod config;
pub mod docker;
pub mod fs;
pub mod manager;
pub mod runtime;
pub mod state;

use anyhow::Context;
use manager::VolumeManager;
use runtime::Runtime;
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

/// A request on the agent's own socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Which of `names` the agent manages.
    Manages { names: Vec<String> },
    /// A filesystem-consistent snapshot of these volumes, at one moment; waits up to
    /// `timeout_ms` (default: the agent's) for each commit.
    Snapshot {
        names: Vec<String>,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Every volume with its mount point.
    List,
}

pub fn handle_api<R: Runtime>(m: &VolumeManager<R>, req: AgentRequest) -> serde_json::Value {
    match req {
        AgentRequest::Manages { names } => {
            let v: Vec<_> = names.into_iter().filter(|n| m.manages(n)).collect();
            serde_json::json!({ "managed": v })
        }
        AgentRequest::Snapshot { names, timeout_ms } => match m.snapshot(
            &names,
            timeout_ms.map_or(m.config().commit_timeout, std::time::Duration::from_millis),
        ) {
            Ok(g) => serde_json::to_value(g).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        },
        AgentRequest::List => serde_json::json!({ "volumes": m.list() }),
    }
}

/// Binds a unix socket for root only (mode 0600), replacing a stale socket file a crash left;
/// refused while another process answers on it (another agent).
pub(crate) fn bind_socket(socket: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "{} is in use: another agent runs on this node",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(socket);
    let l =
        UnixListener::bind(socket).with_context(|| format!("listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(l)
}

fn serve_api<R: Runtime + 'static>(
    socket: &Path,
    m: Arc<VolumeManager<R>>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let l = bind_socket(socket)?;
    Ok(std::thread::Builder::new()
        .name("dv-agent-api".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(mut s) = c else { continue };
                let m = m.clone();
                let _ = std::thread::Builder::new()
                    .name("dv-agent-req".into())
                    .spawn(move || {
                        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                        let v = match crate::control::read_request_as::<AgentRequest>(&mut s) {
                            Ok(r) => handle_api(&m, r),
                            Err(e) => serde_json::json!({ "error": e }),
                        };
                        crate::control::write_response(&mut s, &v);
                    });
            }
        })?)
}

/// Runs the agent until SIGTERM/SIGINT: reconciles the node with the record, serves the
/// plugin and API sockets, and supervises the daemons. The volumes stay attached and mounted
/// when it stops.
pub fn run(cfg: config::AgentConfig) -> anyhow::Result<()> {
    crate::daemon::check_driver()?;
    let rt = runtime::SystemRuntime::new(cfg.tls.clone())?;
    let plugin = cfg.plugin_socket.clone();
    let api = cfg.api_socket.clone();
    let every = cfg.supervise_every;
    let m = Arc::new(VolumeManager::open(cfg, rt)?);
    m.reconcile()?;
    let _api = serve_api(&api, m.clone())?;
    let _plugin = docker::serve(&plugin, m.clone())?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        register_stop(sig, stop.clone())?;
    }
    tracing::info!(plugin = %plugin.display(), api = %api.display(), volumes = m.list().len(), "agent ready");
    // systemd (Type=notify): Docker, ordered after this unit, starts once the socket is there.
    if let Err(e) = deltavol_dataplane::notify::sd_notify(&format!(
        "READY=1\nSTATUS=Docker volume plugin on {}",
        plugin.display()
    )) {
        tracing::warn!(error = %e, "sd_notify");
    }
    println!("agent ready: docker plugin on {}", plugin.display());
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(every);
        m.supervise();
    }
    tracing::info!("agent stopping; the volumes stay attached and mounted");
    let _ = std::fs::remove_file(&plugin);
    let _ = std::fs::remove_file(&api);
    Ok(())
}

static STOP: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_stop(_: libc::c_int) {
    if let Some(s) = STOP.get() {
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn register_stop(
    sig: nix::sys::signal::Signal,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let _ = STOP.set(stop);
    let act = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_stop),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic (async-signal-safe); it replaces the
    // default action of a terminating signal.
    unsafe { nix::sys::signal::sigaction(sig, &act) }.context("install a signal handler")?;
    Ok(())
}
