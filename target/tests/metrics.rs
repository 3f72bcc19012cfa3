//! The volume's `/metrics` endpoint scraped over TCP, as `deltavol add --metrics-listen` serves
//! it (the daemon needs ublk; the endpoint is given the volume it would give): requests and
//! bytes by op counted exactly, the flush and the committed snapshot (the recovery point) seen,
//! and a second scrape seeing later I/O.

mod common;
use common::dp::*;
use common::*;
use deltavol::volume::Volume;
use deltavol_dataplane::metrics::MetricsListener;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// `GET path`: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("response head");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The value of sample `series` (name and labels); panics with the exposition if missing.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn scrape(addr: SocketAddr) -> String {
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text
}

#[test]
fn scrape_counts_io_flushes_and_the_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 2);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(dir.path(), &dp.addr));
    let vol = Arc::new(Volume::open(&cfg).unwrap());
    let metrics = MetricsListener::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .serve(deltavol::metrics::registry(vec![vol.clone()]))
        .unwrap();
    let addr = metrics.local_addr();

    let text = scrape(addr);
    assert_eq!(
        sample(
            &text,
            r#"deltavol_io_requests_total{volume="testvol",op="write"}"#
        ),
        0.0
    );
    // Nothing committed yet: no recovery point to report.
    assert!(
        !text.contains("deltavol_recovery_point_age_seconds{"),
        "{text}"
    );

    // 7 writes of 3 blocks over two queues, 4 reads of 2 blocks, 2 FLUSHes.
    let mut d = Driver::new(&vol, 2);
    for i in 0..7u64 {
        let r = d.write_tags((i % 2) as usize, i * 10, &[i + 1, i + 100, i + 200], false);
        assert_eq!(r, (3 * BS) as i32);
    }
    for i in 0..4u64 {
        assert_eq!(d.read_tags(0, i * 10, 2)[0], Some(i + 1));
    }
    assert_eq!(d.flush(0), 0);
    assert_eq!(d.flush(1), 0);
    let text = scrape(addr);
    let v = |m: &str, op: &str| sample(&text, &format!(r#"{m}{{volume="testvol",op="{op}"}}"#));
    assert_eq!(v("deltavol_io_requests_total", "write"), 7.0);
    assert_eq!(v("deltavol_io_requests_total", "read"), 4.0);
    assert_eq!(v("deltavol_io_requests_total", "flush"), 2.0);
    assert_eq!(v("deltavol_io_bytes_total", "write"), (7 * 3 * BS) as f64);
    assert_eq!(v("deltavol_io_bytes_total", "read"), (4 * 2 * BS) as f64);
    // Every timed request lands in one latency bucket.
    for (op, n) in [("read", 4.0), ("write", 7.0), ("flush", 2.0)] {
        assert_eq!(v("deltavol_io_latency_seconds_count", op), n);
        let inf = format!(
            r#"deltavol_io_latency_seconds_bucket{{le="+Inf",volume="testvol",op="{op}"}}"#
        );
        assert_eq!(sample(&text, &inf), n);
        assert!(v("deltavol_io_latency_seconds_sum", op) > 0.0);
    }
    let g = |m: &str| sample(&text, &format!(r#"{m}{{volume="testvol"}}"#));
    assert_eq!(g("deltavol_dirty_bytes"), (7 * 3 * BS) as f64);
    assert_eq!(g("deltavol_size_bytes"), (nblocks * BS as u64) as f64);
    assert_eq!(g("deltavol_flushes_total"), 0.0);
    // Reads of blocks the SSD cache holds do not reach the read cache.
    assert_eq!(g("deltavol_read_cache_misses_total"), 0.0);

    // One epoch flushed and committed on the data plane: the recovery point appears.
    let e = vol.cut_and_flush().unwrap().epoch;
    let ship = vol.ship.as_ref().unwrap();
    assert!(
        ship.wait_committed(e, Duration::from_secs(20)),
        "snapshot {e} not committed: {:?}",
        ship.status()
    );
    // Flushed, the blocks are read from permanent storage through the read cache: the
    // first read of a block misses, the second hits.
    assert_eq!(d.read_tags(0, 0, 1)[0], Some(1));
    assert_eq!(d.read_tags(0, 0, 1)[0], Some(1));
    let text = scrape(addr);
    let g = |m: &str| sample(&text, &format!(r#"{m}{{volume="testvol"}}"#));
    assert_eq!(g("deltavol_read_cache_misses_total"), 1.0);
    assert_eq!(g("deltavol_read_cache_hits_total"), 1.0);
    assert_eq!(g("deltavol_flushes_total"), 1.0);
    assert_eq!(g("deltavol_flush_failures_total"), 0.0);
    assert_eq!(g("deltavol_dirty_bytes"), 0.0);
    assert_eq!(g("deltavol_flushed_bytes_total"), (7 * 3 * BS) as f64);
    assert_eq!(g("deltavol_last_committed_snapshot"), e as f64);
    assert_eq!(g("deltavol_outbox_entries"), 0.0);
    assert_eq!(g("deltavol_shipper_connected"), 1.0);
    assert_eq!(g("deltavol_fenced"), 0.0);
    let age = g("deltavol_recovery_point_age_seconds");
    assert!((0.0..60.0).contains(&age), "recovery point age {age}");
    assert!(g("deltavol_last_flush_duration_seconds") >= 0.0);
    assert!(
        text.contains("# TYPE deltavol_io_requests counter"),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE deltavol_io_requests ").count(),
        1,
        "one descriptor per metric: {text}"
    );

    // Later I/O shows in the next scrape; other paths are 404.
    assert!(d.write_tags(1, 200, &[9], false) > 0);
    let text = scrape(addr);
    assert_eq!(
        sample(
            &text,
            r#"deltavol_io_requests_total{volume="testvol",op="write"}"#
        ),
        8.0
    );
    assert_eq!(http_get(addr, "/").0, 404);
    drop(d);
    drop(metrics);
    vol.shutdown();
}

/// A volume recovered from a snapshot, hydrating slowly: the hydration gauges show progress
/// and a read of a block not yet local counts as an on-demand fetch.
#[test]
fn scrape_shows_hydration_progress_and_on_demand_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 4096u64;
    let snap = {
        let mut cfg = config(&dir.path().join("src"), nblocks * BS as u64, 1);
        cfg.flush_interval = Duration::from_secs(3600);
        cfg.ship = Some(ship_cfg(&dir.path().join("src"), &dp.addr));
        let vol = Volume::open(&cfg).unwrap();
        let mut d = Driver::new(&vol, 1);
        for b in (0..nblocks).step_by(8) {
            assert!(d.write_tags(0, b, &[b + 1; 8], false) > 0);
        }
        let snap = vol.cut_and_flush().unwrap().epoch;
        drop(d);
        vol.shutdown();
        snap
    };
    let mut cfg = config(&dir.path().join("rec"), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&dir.path().join("rec"), &dp.addr));
    // 64 KiB/s: the background is far from the end of the volume while the test runs.
    cfg.hydrate_rate_bytes_per_s = 64 << 10;
    cfg.cache.create_as = Some(hydrating_from(snap, &dp.addr));
    let vol = Arc::new(Volume::open(&cfg).unwrap());
    let metrics = MetricsListener::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .serve(deltavol::metrics::registry(vec![vol.clone()]))
        .unwrap();
    let mut d = Driver::new(&vol, 1);
    let last = nblocks - 8;
    assert_eq!(d.read_tags(0, last, 1)[0], Some(last + 1));
    let text = scrape(metrics.local_addr());
    let g = |m: &str| sample(&text, &format!(r#"{m}{{volume="testvol"}}"#));
    assert_eq!(g("deltavol_hydration_done"), 0.0);
    assert_eq!(
        g("deltavol_hydration_total_bytes"),
        (nblocks * BS as u64) as f64
    );
    assert!(g("deltavol_hydration_local_bytes") < g("deltavol_hydration_total_bytes"));
    assert!(
        g("deltavol_hydration_fetched_on_demand_total") >= 1.0,
        "{text}"
    );
    assert!(
        g("deltavol_hydration_extents_fetched_total") >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("deltavol_hydration_extents_read_ahead_total{"),
        "{text}"
    );
    drop(d);
    drop(metrics);
    vol.shutdown();
}
