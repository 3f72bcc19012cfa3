//! The `/metrics` endpoint scraped over TCP: counters match what was done (connections,
//! ingested bytes, committed snapshots, volumes held), other paths are 404, and the binary's
//! `--metrics-listen` serves it and refuses a bad address clearly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use deltavol_dataplane::metrics::{registry, MetricsServer};

const BS: usize = 4096;

#[test]
fn scrape_counts_connections_ingest_and_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let metrics = MetricsServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        registry(server.stats_shared()),
    )
    .expect("metrics endpoint starts");

    let (code, before) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(code, 200, "{before}");
    assert_eq!(
        sample(
            &before,
            "deltavol_dataplane_connections_authenticated_total"
        ),
        0.0
    );
    assert!(before.trim_end().ends_with("# EOF"), "{before}");
    assert_eq!(sample(&before, "deltavol_dataplane_volumes"), 0.0);
    assert_eq!(
        sample(&before, "deltavol_dataplane_auth_refused_total"),
        0.0
    );
    assert_eq!(
        sample(&before, "deltavol_dataplane_requests_forbidden_total"),
        0.0
    );

    let mut c = connect(server.local_addr(), "vol-m");
    c.create_volume(64 * BS as u64, BS as u32).expect("create");
    // Two snapshots: 3 data blocks + a zero extent (no payload), then 5 data blocks.
    let data = vec![0xabu8; 5 * BS];
    c.begin_snapshot(1, 0, 64 * BS as u64).expect("begin 1");
    c.put_extent(0, 3, &data[..3 * BS]).expect("put");
    c.put_zero_extent(10, 4).expect("put zero");
    c.commit().expect("commit 1");
    c.begin_snapshot(2, 1, 64 * BS as u64).expect("begin 2");
    c.put_extent(20, 5, &data).expect("put");
    c.commit().expect("commit 2");

    let (code, text) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        sample(&text, "deltavol_dataplane_connections_authenticated_total"),
        1.0
    );
    assert_eq!(sample(&text, "deltavol_dataplane_connections_open"), 1.0);
    assert_eq!(
        sample(&text, "deltavol_dataplane_snapshots_committed_total"),
        2.0
    );
    assert_eq!(
        sample(&text, "deltavol_dataplane_ingest_bytes_total"),
        (8 * BS) as f64
    );
    // Compaction's counters are there (process-wide; other tests of this binary may add).
    for series in [
        "deltavol_dataplane_compaction_rounds_total",
        "deltavol_dataplane_compaction_written_bytes_total",
        "deltavol_dataplane_compaction_freed_bytes_total",
        "deltavol_dataplane_retired_segments_deleted_total",
    ] {
        assert!(sample(&text, series) >= 0.0, "{series}");
    }
    assert_eq!(
        sample(&text, "deltavol_dataplane_connections_refused_busy_total"),
        0.0
    );
    assert!(
        text.contains("# TYPE deltavol_dataplane_ingest_bytes counter"),
        "{text}"
    );
    assert_eq!(sample(&text, "deltavol_dataplane_volumes"), 1.0);
    assert!(
        text.contains("# TYPE deltavol_dataplane_volumes gauge"),
        "{text}"
    );

    // Volumes held: two more created (one again: no change), one deleted.
    for name in ["vol-m2", "vol-m3", "vol-m2"] {
        let mut c2 = connect(server.local_addr(), name);
        c2.create_volume(64 * BS as u64, BS as u32).expect("create");
    }
    let (_, text) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(sample(&text, "deltavol_dataplane_volumes"), 3.0, "{text}");
    let mut c3 = connect(server.local_addr(), "vol-m3");
    let id = c3.info().volume_id.expect("the volume's id");
    c3.delete_volume(id).expect("delete vol-m3");
    drop(c3);
    let (_, text) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(sample(&text, "deltavol_dataplane_volumes"), 2.0, "{text}");

    drop(c);
    let (code, body) = http_get(metrics.local_addr(), "/");
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_get(metrics.local_addr(), "/metricsx");
    assert_eq!(code, 404, "{body}");
    drop(metrics);
    server.shutdown();

    // A restarted server counts the volumes it loads.
    let server = in_process(dir.path(), 2);
    let metrics = MetricsServer::start(
        "127.0.0.1:0".parse().expect("addr"),
        registry(server.stats_shared()),
    )
    .expect("metrics endpoint starts");
    let (_, text) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(sample(&text, "deltavol_dataplane_volumes"), 2.0, "{text}");
    drop(metrics);
    server.shutdown();
}

#[test]
fn binary_serves_metrics_listen_and_refuses_a_bad_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_token(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--auth-token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn deltavol-dataplane");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = [String::new(), String::new()];
    for l in &mut lines {
        out.read_line(l).expect("read a line");
    }
    let addr: std::net::SocketAddr = lines[0]
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line {:?}", lines[0]))
        .parse()
        .expect("addr");
    let maddr = lines[1]
        .trim()
        .strip_prefix("metrics on ")
        .unwrap_or_else(|| panic!("second line {:?}", lines[1]))
        .parse()
        .expect("metrics addr");
    let c = connect(addr, "vol-b");
    let (code, text) = http_get(maddr, "/metrics");
    let _ = child.kill();
    let _ = child.wait();
    drop(c);
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        sample(&text, "deltavol_dataplane_connections_authenticated_total"),
        1.0
    );

    // Not an address: clap says so before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "localhost"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--metrics-listen") && err.contains("invalid"),
        "{err}"
    );

    // An address in use: the error names the flag and the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(["--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--metrics-listen", &taken_addr])
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .arg("--auth-token-file")
        .arg(&token)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--metrics-listen") && err.contains(&taken_addr),
        "{err}"
    );
}
