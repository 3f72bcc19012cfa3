//! The Docker volume plugin protocol (JSON over HTTP on a unix socket,
//! `/run/docker/plugins/deltavol.sock`): `Plugin.Activate` and `VolumeDriver.Create | Remove |
//! Mount | Unmount | Path | Get | List | Capabilities`, each a POST with a JSON body, each
//! answered with JSON whose `Err` carries a failure as a message `docker` shows.
//!
//! The handlers ([`handle`]) are a thin mapping onto the [`VolumeManager`]; the transport
//! ([`serve`]) is `tiny_http`. Bodies are bounded ([`BODY_BYTES_MAX`]) and must be JSON of the
//! expected shape; anything else is an `Err`, never a panic.
//!
//! Docker mounts a volume once per mount point it prepares (one `docker run` can mount twice,
//! with two ids) and unmounts each id once: the manager counts ids, not calls.

use super::manager::VolumeManager;
use super::runtime::Runtime;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

pub const BODY_BYTES_MAX: u64 = 1 << 20;
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

#[derive(Debug, Deserialize)]
struct NameReq {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Debug, Deserialize)]
struct CreateReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct MountReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

fn err(e: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "Err": e.to_string() })
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, serde_json::Value> {
    // Docker sends an empty body for calls without arguments.
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| err(format!("bad request: {e}")))
}

fn volume_json(v: &super::manager::VolumeView, status: bool) -> serde_json::Value {
    let mut j = serde_json::json!({ "Name": v.name, "Mountpoint": v.mountpoint });
    if v.created_unix_ms > 0 {
        if let Ok(ts) = jiff::Timestamp::from_millisecond(v.created_unix_ms as i64) {
            j["CreatedAt"] = ts.to_string().into();
        }
    }
    if status {
        j["Status"] = v.status.clone();
    }
    j
}

/// Answers one call: `path` is the request path (`/VolumeDriver.Create`, ...).
pub fn handle<R: Runtime>(m: &VolumeManager<R>, path: &str, body: &[u8]) -> serde_json::Value {
    let r = (|| -> Result<serde_json::Value, serde_json::Value> {
        match path {
            "/Plugin.Activate" => Ok(serde_json::json!({ "Implements": ["VolumeDriver"] })),
            "/VolumeDriver.Capabilities" => {
                Ok(serde_json::json!({ "Capabilities": { "Scope": "local" } }))
            }
            "/VolumeDriver.Create" => {
                let q: CreateReq = parse(body)?;
                m.create(&q.name, &q.opts.unwrap_or_default())
                    .map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({ "Err": "" }))
            }
            "/VolumeDriver.Remove" => {
                let q: NameReq = parse(body)?;
                m.remove(&q.name).map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({ "Err": "" }))
            }
            "/VolumeDriver.Mount" => {
                let q: MountReq = parse(body)?;
                let mp = m.mount(&q.name, &q.id).map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({ "Mountpoint": mp.display().to_string(), "Err": "" }))
            }
            "/VolumeDriver.Unmount" => {
                let q: MountReq = parse(body)?;
                m.unmount(&q.name, &q.id)
                    .map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({ "Err": "" }))
            }
            "/VolumeDriver.Path" => {
                let q: NameReq = parse(body)?;
                let p = m.path(&q.name).map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({
                    "Mountpoint": p.map(|p| p.display().to_string()).unwrap_or_default(),
                    "Err": "",
                }))
            }
            "/VolumeDriver.Get" => {
                let q: NameReq = parse(body)?;
                let v = m.get(&q.name).map_err(|e| err(format!("{e:#}")))?;
                Ok(serde_json::json!({ "Volume": volume_json(&v, true), "Err": "" }))
            }
            "/VolumeDriver.List" => {
                let vs: Vec<_> = m.list().iter().map(|v| volume_json(v, false)).collect();
                Ok(serde_json::json!({ "Volumes": vs, "Err": "" }))
            }
            _ => Err(err(format!(
                "unknown call {path:?}: this plugin implements VolumeDriver"
            ))),
        }
    })();
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(call = path, error = %e["Err"], "refused");
            e
        }
    }
}

/// Serves the plugin socket until the process ends (a thread per request: a slow create or
/// recover does not hold up `Get` calls beyond the manager's own lock).
pub fn serve<R: Runtime + 'static>(
    socket: &Path,
    m: Arc<VolumeManager<R>>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let server = bind(socket)?;
    let server = Arc::new(server);
    let t = std::thread::Builder::new()
        .name("dv-plugin".into())
        .spawn(move || loop {
            let mut req = match server.recv() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "plugin socket");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let m = m.clone();
            let _ = std::thread::Builder::new()
                .name("dv-plugin-req".into())
                .spawn(move || {
                    let path = req.url().split('?').next().unwrap_or("").to_string();
                    let mut body = Vec::new();
                    let read = req
                        .as_reader()
                        .take(BODY_BYTES_MAX + 1)
                        .read_to_end(&mut body);
                    let v = if read.is_err() {
                        err("cannot read the request body")
                    } else if body.len() as u64 > BODY_BYTES_MAX {
                        err(format!("request body larger than {BODY_BYTES_MAX} bytes"))
                    } else if *req.method() != tiny_http::Method::Post {
                        err("the plugin protocol uses POST")
                    } else {
                        tracing::debug!(call = %path, "plugin call");
                        handle(&m, &path, &body)
                    };
                    let resp = tiny_http::Response::from_string(v.to_string()).with_header(
                        tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            CONTENT_TYPE.as_bytes(),
                        )
                        .expect("static header"),
                    );
                    let _ = req.respond(resp);
                });
        })?;
    Ok(t)
}

/// The plugin socket, served by tiny_http.
fn bind(socket: &Path) -> anyhow::Result<tiny_http::Server> {
    let l = super::bind_socket(socket)?;
    tiny_http::Server::from_listener(l, None)
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", socket.display()))
}
