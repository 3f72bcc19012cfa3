//! Prometheus metrics over plain HTTP: `GET /metrics` answers the registry in the text
//! (OpenMetrics) format encoded by `prometheus-client`; every other path is a 404.
//!
//! The responder is one blocking thread on `std::net`, apart from the data path: it reads the
//! server's existing atomic counters at scrape time ([`ServerStatsCollector`]) and adds no work
//! to any request. It is bounded: one connection at a time, a request of at most
//! [`REQUEST_BYTES_MAX`] read within [`REQUEST_TIMEOUT_MS`], the answer written within the same
//! deadline, then the connection is closed. A slow or hostile scraper can only delay other
//! scrapes.
//!
//! The compute daemon (`deltavol add --metrics-listen`) serves its own registry with
//! [`MetricsListener`] too; [`counters`] and [`gauges`] encode the samples a [`Collector`]
//! reads at scrape time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::server::ServerStats;

/// The longest request (line and headers) read; a longer one is answered 431 and closed.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a scraper has to send its request, and the answer has to be written.
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;

/// The content type of `prometheus-client`'s text encoding.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running `/metrics` endpoint: its address, stopped (and joined) on drop.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A bound `/metrics` address not serving yet: bind before opening what it reports on, so a
/// bad `--metrics-listen` fails start-up before anything else is done.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    /// Binds `listen`; the error names the flag and the address.
    pub fn bind(listen: SocketAddr) -> std::io::Result<MetricsListener> {
        let listener = TcpListener::bind(listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen for metrics on {listen} (--metrics-listen): {e}; give a free \
                     local address, e.g. 127.0.0.1:9100"
                ),
            )
        })?;
        Ok(MetricsListener { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `registry` on a thread of its own.
    pub fn serve(self, registry: Registry) -> std::io::Result<MetricsServer> {
        let local_addr = self.listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let listener = self.listener;
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || accept_loop(&listener, &registry, &stop)
            })?;
        tracing::info!(addr = %local_addr, "metrics on http://{local_addr}/metrics");
        Ok(MetricsServer {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl MetricsServer {
    /// Binds `listen` and serves `registry` on a thread of its own.
    pub fn start(listen: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
        MetricsListener::bind(listen)?.serve(registry)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept; if the connect fails the thread is left to the process.
        let woke = TcpStream::connect_timeout(&self.local_addr, Duration::from_millis(500)).is_ok();
        if let (true, Some(t)) = (woke, self.thread.take()) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, registry: &Registry, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, registry) {
                    tracing::debug!(error = %e, "metrics request");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request and answers it; the connection is closed after.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let timeout = Some(Duration::from_millis(REQUEST_TIMEOUT_MS));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut len = 0;
    let deadline = std::time::Instant::now() + Duration::from_millis(REQUEST_TIMEOUT_MS);
    let head_end = loop {
        if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        if len == buf.len() {
            break None;
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not sent in time",
            ));
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            // Closed before the end of the headers: answer what the request line asks, if any.
            break Some(len);
        }
        len += n;
    };
    let Some(head_end) = head_end else {
        return respond(
            &mut stream,
            "431 Request Header Fields Too Large",
            "text/plain",
            b"",
        );
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, registry)
                .map_err(|_| std::io::Error::other("encoding the metrics failed"))?;
            respond(&mut stream, "200 OK", CONTENT_TYPE, body.as_bytes())
        }
        ("GET", _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"not found: the metrics are at /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET /metrics\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// One sample: its labels and value.
pub type Sample<'a, V> = (&'a [(&'a str, &'a str)], V);

/// Encodes metric family `name` of the type `make` builds, with its samples, one per label
/// set; nothing when there are none. A sample without labels must be the only one.
fn family<V: Copy, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, V>],
    make: impl Fn(V) -> M,
) -> std::fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, make(*first).metric_type())?;
    if let [(labels, v)] = samples {
        if labels.is_empty() {
            return make(*v).encode(m);
        }
    }
    for (labels, v) in samples {
        make(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes counter `name` (the text format adds `_total`), as [`family`] does.
pub fn counters<V: EncodeCounterValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, V>],
) -> std::fmt::Result {
    family(enc, name, help, samples, ConstCounter::new)
}

/// Encodes gauge `name`, as [`family`] does.
pub fn gauges<V: EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, V>],
) -> std::fmt::Result {
    family(enc, name, help, samples, ConstGauge::new)
}

/// The data plane's [`ServerStats`], read at each scrape.
#[derive(Debug)]
pub struct ServerStatsCollector(pub Arc<ServerStats>);

impl Collector for ServerStatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let l: &[(&str, &str)] = &[];
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, l, v| {
            counters(enc, name, help, &[(l, v)])
        };
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, l, v: u64| {
            gauges(enc, name, help, &[(l, v)])
        };
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "connections_authenticated",
            "Connections that completed the handshake.",
            l,
            get(&s.authenticated),
        )?;
        counter(
            &mut enc,
            "connections_handed_off",
            "Authenticated connections handed to another shard (the volume's owner).",
            l,
            get(&s.handed_off),
        )?;
        gauge(
            &mut enc,
            "connections_open",
            "Connections open now (handshaking and authenticated).",
            l,
            s.open.load(Ordering::Relaxed) as u64,
        )?;
        counter(
            &mut enc,
            "connections_refused_busy",
            "Connections closed at accept because --max-connections were open.",
            l,
            get(&s.refused_busy),
        )?;
        counter(
            &mut enc,
            "handshakes_evicted",
            "Unfinished handshakes dropped to make room for a newer connection.",
            l,
            get(&s.handshakes_evicted),
        )?;
        counter(
            &mut enc,
            "connections_timed_out",
            "Connections closed by a deadline (handshake, idle, frame or write).",
            l,
            get(&s.timed_out),
        )?;
        counter(
            &mut enc,
            "auth_refused",
            "Handshakes refused: a wrong secret, an unknown or revoked credential, no role on the \
             volume, or a TLS handshake that did not complete.",
            l,
            get(&s.auth_refused),
        )?;
        counter(
            &mut enc,
            "requests_forbidden",
            "Requests refused because the connection's credential lacks the role (Forbidden).",
            l,
            get(&s.forbidden),
        )?;
        counter(
            &mut enc,
            "ingest_bytes",
            "Extent data bytes received in PutExtents frames.",
            l,
            get(&s.ingest_bytes),
        )?;
        counter(
            &mut enc,
            "snapshots_committed",
            "Snapshots committed (durable).",
            l,
            get(&s.snapshots_committed),
        )?;
        counter(
            &mut enc,
            "heat_maps_stored",
            "Volume heat maps stored (durable).",
            l,
            get(&s.heat_maps_stored),
        )?;
        gauge(
            &mut enc,
            "volumes",
            "Volumes the server holds now (on a shared object store: those it holds the lease of).",
            l,
            get(&s.volumes),
        )?;
        let c = crate::store::compaction::counters();
        counter(
            &mut enc,
            "compaction_rounds",
            "Compaction rounds published (segments of a snapshot rewritten into one).",
            l,
            c.rounds,
        )?;
        counter(
            &mut enc,
            "compaction_written_bytes",
            "Live data bytes compaction copied into new segments.",
            l,
            c.written_bytes,
        )?;
        counter(
            &mut enc,
            "compaction_freed_bytes",
            "Data bytes of replaced segments that were no longer live (given back; on an object store after the retired grace period).",
            l,
            c.freed_bytes,
        )?;
        counter(
            &mut enc,
            "retired_segments_deleted",
            "Segment objects deleted once their retired grace period was over.",
            l,
            c.retired_deleted,
        )?;
        Ok(())
    }
}

/// The data plane's registry: every metric named `deltavol_dataplane_*`.
pub fn registry(stats: Arc<ServerStats>) -> Registry {
    let mut r = Registry::with_prefix("deltavol_dataplane");
    r.register_collector(Box::new(ServerStatsCollector(stats)));
    r
}
