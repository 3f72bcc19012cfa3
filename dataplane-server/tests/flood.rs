//! Connection floods and slow clients against the real `deltavol-dataplane` binary on
//! 127.0.0.1, while a well-behaved authenticated client keeps writing and reading snapshots.
//!
//! Every test has bounded counts and durations (each well under 20 s) and asserts:
//! * the good client's operations all succeed, byte-exact, with a latency sanity bound
//!   (p50 / p99 / max are printed);
//! * the server process's RSS (`VmRSS` of the child) stays under a bound computed from the
//!   number of hostile connections (printed with before / peak / after);
//! * the server closes each kind of abuser by the deadline meant for it (handshake, idle,
//!   frame, write), and closes connections over `--max-connections` at once, with a log line.
//!
//! The tests run one at a time (a mutex) so that their figures are not each other's noise.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use deltavol_dataplane::Client;
use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::wire::{self, ErrorCode};
use deltavol_schemas::PROTOCOL_VERSION;

const BS: usize = 4096;
/// The good client's volume: 4 MiB.
const GOOD_BLOCKS: u64 = 1024;
/// Sanity bound on any one operation of the good client (a loaded 2-core machine included).
const GOOD_OP_LATENCY_MAX: Duration = Duration::from_secs(2);
/// RSS budget per hostile connection the server holds at once: its task, socket registration,
/// reply builder (~6 KiB measured as a few KiB) with a 2x margin.
const RSS_PER_CONN_KIB: u64 = 16;
/// RSS budget on top: the good client's frame buffers (2 x 1 MiB), the read path's record
/// buffers, allocator arenas of the shard threads.
const RSS_SLACK_KIB: u64 = 32 * 1024;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server binary as a child, with its stderr (tracing at info) collected.
struct Dp {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Dp {
    fn spawn(dir: &Path, extra: &[&str]) -> Dp {
        let token = write_token(dir);
        let data = dir.join("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
            .args(["--listen", "127.0.0.1:0", "--threads", "2"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--auth-token-file")
            .arg(&token)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn deltavol-dataplane");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    // Bounded: the flood logs one line per refused handshake.
                    if l.len() < 100_000 {
                        l.push(line);
                    }
                }
            });
        }
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Dp { child, addr, log }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    fn log_tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        l[l.len().saturating_sub(n)..].join("\n")
    }

    fn log_lines_with(&self, needle: &str) -> usize {
        let l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().filter(|s| s.contains(needle)).count()
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Samples a process's RSS every 20 ms and keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let thread = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

fn require_fds(n: u64) {
    let have = open_files_limit();
    assert!(
        have >= n,
        "this test opens about {n} sockets but `ulimit -n` is {have}: raise it (ulimit -n {n})"
    );
}

// ------------------------------------------------------------------------------------------
// The good client
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct GoodReport {
    ops: usize,
    snapshots: u64,
    reconnects: usize,
    /// Reconnects whose first handshake was dropped under the flood and retried.
    handshake_retries: usize,
    /// When each reconnect completed.
    reconnected_at: Vec<Instant>,
    latencies: Vec<Duration>,
}

impl GoodReport {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).copied().unwrap_or_default()
    }

    fn max(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }

    fn print(&self, test: &str) {
        println!(
            "{test}: good client: {} ops ({} snapshots written and read back, {} reconnects, {} \
             retried), latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.ops,
            self.snapshots,
            self.reconnects,
            self.handshake_retries,
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.max().as_secs_f64() * 1e3,
        );
    }

    fn check(&self) {
        assert!(
            self.snapshots >= 3,
            "the good client made too little progress"
        );
        let max = self.max();
        assert!(
            max < GOOD_OP_LATENCY_MAX,
            "the good client waited {max:?} for one operation (bound {GOOD_OP_LATENCY_MAX:?})"
        );
    }
}

/// A well-behaved client: uploads a snapshot of random changes, reads the whole volume and a
/// random range back (byte-exact against a model), and, when `reconnect_every` is set, opens a
/// new connection every that many snapshots. Every operation must succeed; each is timed.
fn good_client(
    addr: SocketAddr,
    volume: &str,
    stop: Arc<AtomicBool>,
    reconnect_every: Option<u64>,
) -> GoodReport {
    let size = GOOD_BLOCKS * BS as u64;
    let mut rep = GoodReport::default();
    let mut c = connect(addr, volume);
    c.create_volume(size, BS as u32).expect("create");
    let mut rng = Rng::new(0x600d);
    let mut model = vec![0u8; size as usize];
    let mut buf = vec![0u8; size as usize];
    let mut snap = 0u64;
    let timed = |rep: &mut GoodReport, t: Instant| {
        rep.ops += 1;
        rep.latencies.push(t.elapsed());
    };
    while !stop.load(Ordering::Relaxed) || snap < 3 {
        if reconnect_every.is_some_and(|n| snap > 0 && snap % n == 0) {
            let t = Instant::now();
            // Under a flood of unfinished handshakes the oldest is dropped for a newcomer (by
            // design, --max-handshakes): a handshake caught mid-way by that is retried, as the
            // compute side's clients do. A second refusal in a row is a failure.
            c = match Client::connect(addr, TOKEN, volume, timeouts()) {
                Ok(c) => c,
                Err(e) => {
                    rep.handshake_retries += 1;
                    eprintln!(
                        "good client: reconnect after snapshot {snap} refused ({e}); retrying once"
                    );
                    Client::connect(addr, TOKEN, volume, timeouts()).unwrap_or_else(|e| {
                        panic!("good client reconnect after snapshot {snap}, retried: {e}")
                    })
                }
            };
            timed(&mut rep, t);
            rep.reconnects += 1;
            rep.reconnected_at.push(Instant::now());
        }
        let changes = random_changes(&mut rng, GOOD_BLOCKS, BS, 4);
        let t = Instant::now();
        upload(&mut c, snap + 1, snap, size, BS, &changes);
        timed(&mut rep, t);
        snap += 1;
        apply(&mut model, BS, &changes);

        let t = Instant::now();
        c.read_extents(snap, 0, GOOD_BLOCKS, &mut buf)
            .unwrap_or_else(|e| panic!("good client read of snapshot {snap}: {e}"));
        timed(&mut rep, t);
        if let Some(i) = buf.iter().zip(&model).position(|(a, b)| a != b) {
            panic!("good client: snapshot {snap} differs at byte {i}");
        }
        let n = 1 + rng.below(64);
        let lba = rng.below(GOOD_BLOCKS - n + 1);
        let part = &mut buf[..n as usize * BS];
        let t = Instant::now();
        c.read_extents(snap, lba, n, part)
            .unwrap_or_else(|e| panic!("good client read of {lba}+{n}: {e}"));
        timed(&mut rep, t);
        let at = lba as usize * BS;
        assert!(
            *part == model[at..at + part.len()],
            "good client: snapshot {snap} range {lba}+{n} differs"
        );
    }
    rep.snapshots = snap;
    rep
}

struct Good {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<GoodReport>,
}

impl Good {
    fn start(addr: SocketAddr, volume: &str, reconnect_every: Option<u64>) -> Good {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let volume = volume.to_string();
            std::thread::spawn(move || good_client(addr, &volume, stop, reconnect_every))
        };
        Good { stop, thread }
    }

    fn finish(self) -> GoodReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the good client never failed")
    }
}

// ------------------------------------------------------------------------------------------
// Raw sockets
// ------------------------------------------------------------------------------------------

/// Whether the server still holds a raw connection: drains what it sent, without waiting.
fn is_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 4096];
    let open = loop {
        match s.read(&mut b) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    s.set_nonblocking(false).expect("blocking");
    open
}

/// Polls `socks` until all are closed or `limit` passes; returns when each was seen closed
/// (time since `t0`), `None` for those still open.
fn wait_closed(socks: &mut [TcpStream], t0: Instant, limit: Duration) -> Vec<Option<Duration>> {
    let mut when = vec![None; socks.len()];
    loop {
        for (s, w) in socks.iter_mut().zip(when.iter_mut()) {
            if w.is_none() && !is_open(s) {
                *w = Some(t0.elapsed());
            }
        }
        if when.iter().all(Option::is_some) || t0.elapsed() >= limit {
            return when;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hello_frame() -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::Hello::create(
        &mut fbb,
        &wire::HelloArgs {
            protocol_version: PROTOCOL_VERSION,
            client_name: None,
        },
    );
    frame(&mut fbb, wire::Message::Hello, body.as_union_value(), &[])
}

fn read_extents_frame(snap_id: u64, lba: u64, nblocks: u64) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::ReadExtents::create(
        &mut fbb,
        &wire::ReadExtentsArgs {
            snap_id,
            lba,
            nblocks,
        },
    );
    frame(
        &mut fbb,
        wire::Message::ReadExtents,
        body.as_union_value(),
        &[],
    )
}

/// A complete `PutExtents` header announcing `payload_len` bytes of payload (none sent).
fn put_header_only(payload_len: usize) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let ex = fbb.create_vector(&[wire::Extent::new(
        0,
        (payload_len / BS) as u32,
        0,
        wire::ExtentKind::Data,
    )]);
    let body = wire::PutExtents::create(
        &mut fbb,
        &wire::PutExtentsArgs {
            snap_id: 1,
            extents: Some(ex),
        },
    );
    let h = deltavol_schemas::finish_header(
        &mut fbb,
        wire::Message::PutExtents,
        body.as_union_value(),
        payload_len,
    )
    .expect("header");
    let mut out = (h.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(h);
    out
}

fn authed(addr: SocketAddr, volume: &str) -> TcpStream {
    let (s, reply) = raw_auth(addr, TOKEN, volume);
    let (ty, code, msg) = reply.expect("an answer to Auth");
    assert_eq!(ty, wire::Message::AuthOk, "{code:?} {msg}");
    s
}

fn print_rss(test: &str, before: u64, peak: u64, after: u64, bound: u64) {
    println!(
        "{test}: server RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB (bound {:.1} MiB)",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0,
        bound as f64 / 1024.0
    );
}

fn check_rss(test: &str, before: u64, peak: u64, after: u64, conns: u64) {
    let bound = before + conns * RSS_PER_CONN_KIB + RSS_SLACK_KIB;
    print_rss(test, before, peak, after, bound);
    assert!(
        peak <= bound,
        "{test}: server RSS peaked at {peak} KiB, over the bound of {bound} KiB"
    );
}

// ------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------

/// 2,000 sockets that connect and send nothing or half a frame, opened in one burst: the
/// server keeps at most `--max-handshakes` of them (dropping the oldest unfinished handshake
/// for each newcomer), closes the rest by the handshake deadline, and a good client that
/// reconnects every few snapshots is admitted and served throughout.
#[test]
fn idle_and_half_open_flood() {
    let _serial = serial();
    const TEST: &str = "idle_and_half_open_flood";
    const FLOOD: usize = 2000;
    const MAX_HANDSHAKES: usize = 512;
    const HANDSHAKE_MS: u64 = 2000;
    require_fds(FLOOD as u64 + 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = Dp::spawn(
        dir.path(),
        &[
            "--max-handshakes",
            &MAX_HANDSHAKES.to_string(),
            "--handshake-timeout-ms",
            &HANDSHAKE_MS.to_string(),
        ],
    );
    let addr = dp.addr;
    // The good client opens a new connection before every snapshot.
    let good = Good::start(addr, "good", Some(1));
    std::thread::sleep(Duration::from_millis(300));
    let before = dp.rss_kib();
    let sampler = RssSampler::start(dp.child.id());

    let hello = hello_frame();
    let t0 = Instant::now();
    let mut socks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut s = TcpStream::connect(addr).expect("connect");
        // Half of them send the length prefix and a few bytes of a Hello, then stall.
        if i % 2 == 1 {
            s.write_all(&hello[..8]).expect("half a hello");
        }
        socks.push(s);
    }
    let opened = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let held = socks.iter_mut().map(is_open).filter(|&o| o).count();
    println!(
        "{TEST}: {FLOOD} sockets opened in {:.0} ms; {held} still held by the server 300 ms later \
         (--max-handshakes {MAX_HANDSHAKES})",
        opened.as_secs_f64() * 1e3
    );
    assert!(
        held <= MAX_HANDSHAKES,
        "the server holds {held} unfinished handshakes, over --max-handshakes {MAX_HANDSHAKES}"
    );
    // Every handshake slot is taken by an idle socket: a newcomer that answers at once still
    // gets in (the oldest idle one makes room for it).
    let t = Instant::now();
    let mut newcomer = Client::connect(addr, TOKEN, "newcomer", timeouts())
        .unwrap_or_else(|e| panic!("a client connecting while the handshake slots are full: {e}"));
    newcomer.volume_info().expect("the newcomer is served");
    println!(
        "{TEST}: a new client authenticated and was served in {:.1} ms while the server held \
         {held} idle handshakes",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(newcomer);
    let when = wait_closed(
        &mut socks,
        t0,
        opened + Duration::from_millis(HANDSHAKE_MS + 3000),
    );
    let still = when.iter().filter(|w| w.is_none()).count();
    let last = when.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "{TEST}: all but {still} closed by the server, the last after {:.0} ms \
         (handshake deadline {HANDSHAKE_MS} ms)",
        last.as_secs_f64() * 1e3
    );
    assert_eq!(
        still, 0,
        "{still} idle sockets outlived the handshake deadline"
    );
    drop(socks);
    // Give the good client a little time after the flood, too.
    std::thread::sleep(Duration::from_millis(500));
    let rep = good.finish();
    let peak = sampler.finish();
    let after = dp.rss_kib();
    rep.print(TEST);
    rep.check();
    let t_end = t0 + when.iter().flatten().max().copied().unwrap_or_default();
    let during = rep
        .reconnected_at
        .iter()
        .filter(|t| **t >= t0 && **t <= t_end)
        .count();
    let rel: Vec<String> = rep
        .reconnected_at
        .iter()
        .map(|t| format!("{:.2}", t.saturating_duration_since(t0).as_secs_f64()))
        .collect();
    println!(
        "{TEST}: the good client connected anew {during} times during the flood \
         (0..{:.2} s; reconnects at {} s since the flood began)",
        (t_end - t0).as_secs_f64(),
        rel.join(", ")
    );
    assert!(
        during >= 1,
        "the good client never connected anew while the flood was held"
    );
    check_rss(TEST, before, peak, after, FLOOD as u64);
    assert!(
        dp.log_lines_with("handshake not finished within") > 0,
        "no handshake deadline in the server's log"
    );
}

/// `--max-connections`: authenticated idle connections fill the cap; every further connection
/// is answered "busy" and closed at once (not queued), with a log line; closing some gives
/// their slots back; the idle deadline closes the rest. The good client's connection, opened
/// first, is served throughout.
#[test]
fn connection_cap_closes_excess_at_once() {
    let _serial = serial();
    const TEST: &str = "connection_cap_closes_excess_at_once";
    const MAX_CONNECTIONS: usize = 300;
    const EXCESS: usize = 500;
    const IDLE_MS: u64 = 4000;
    require_fds((MAX_CONNECTIONS + EXCESS) as u64 + 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = Dp::spawn(
        dir.path(),
        &[
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--idle-timeout-ms",
            &IDLE_MS.to_string(),
        ],
    );
    let addr = dp.addr;
    let good = Good::start(addr, "good", None);
    std::thread::sleep(Duration::from_millis(300));
    let before = dp.rss_kib();
    let sampler = RssSampler::start(dp.child.id());

    // Fill the cap (the good client holds one slot).
    let t_fill = Instant::now();
    let mut idle: Vec<TcpStream> = (0..MAX_CONNECTIONS - 1)
        .map(|i| authed(addr, &format!("idle-{}", i % 8)))
        .collect();
    // The next ones are refused at once: a "busy" error, then EOF.
    let t0 = Instant::now();
    let mut refused_max = Duration::ZERO;
    for _ in 0..EXCESS {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).expect("connect (the kernel accepts)");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (_, code, msg) = read_reply(&mut s).expect("a busy answer");
        assert_eq!(code, Some(ErrorCode::Internal), "{msg}");
        assert!(msg.contains("server busy"), "{msg}");
        assert!(closed(&mut s), "an excess connection was kept open");
        refused_max = refused_max.max(t.elapsed());
    }
    println!(
        "{TEST}: {} idle authenticated connections fill --max-connections {MAX_CONNECTIONS} \
         ({:.0} ms); {EXCESS} more refused in {:.0} ms, each closed within {:.1} ms",
        MAX_CONNECTIONS - 1,
        (t0 - t_fill).as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3,
        refused_max.as_secs_f64() * 1e3
    );
    assert!(refused_max < Duration::from_secs(1));
    assert!(
        dp.log_lines_with("connection limit reached") > 0,
        "no log line for refused connections"
    );

    // Slots come back when connections end.
    idle.truncate(MAX_CONNECTIONS - 1 - 50);
    std::thread::sleep(Duration::from_millis(200));
    let mut more: Vec<TcpStream> = (0..50).map(|_| authed(addr, "idle-more")).collect();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&hello_frame()).expect("hello");
    let (_, code, msg) = read_reply(&mut s).expect("an answer");
    assert_eq!(code, Some(ErrorCode::Internal), "full again: {msg}");

    // The idle deadline closes every idle connection (the good client is never idle).
    idle.append(&mut more);
    let when = wait_closed(&mut idle, t0, Duration::from_millis(IDLE_MS + 6000));
    let still = when.iter().filter(|w| w.is_none()).count();
    assert_eq!(
        still, 0,
        "{still} idle connections outlived the idle deadline"
    );
    // Then there is room again.
    let mut c = connect(addr, "after-idle");
    c.create_volume(GOOD_BLOCKS * BS as u64, BS as u32)
        .expect("served after the idle ones were closed");
    drop(c);
    let rep = good.finish();
    let peak = sampler.finish();
    let after = dp.rss_kib();
    rep.print(TEST);
    rep.check();
    check_rss(TEST, before, peak, after, (MAX_CONNECTIONS + EXCESS) as u64);
    assert!(dp.log_lines_with("idle timeout") > 0);
}

/// Slow-loris clients: an unauthenticated one trickling a Hello a byte per second, an
/// authenticated one trickling a frame header a byte per second, ones announcing the largest
/// header or payload and stalling, and one that asks for a large read and never reads the
/// answer. Each is closed by its deadline (not earlier than it, not much later), while the
/// good client is served.
#[test]
fn slow_loris_and_stalled_frames_are_closed() {
    let _serial = serial();
    const TEST: &str = "slow_loris_and_stalled_frames_are_closed";
    const EACH: usize = 40;
    const HANDSHAKE_MS: u64 = 3000;
    const FRAME_MS: u64 = 3000;
    require_fds(6 * EACH as u64 + 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = Dp::spawn(
        dir.path(),
        &[
            "--handshake-timeout-ms",
            &HANDSHAKE_MS.to_string(),
            "--frame-timeout-ms",
            &FRAME_MS.to_string(),
            "--idle-timeout-ms",
            "60000",
        ],
    );
    let addr = dp.addr;
    // A volume with 32 MiB of data for the reader that never reads.
    const BIG_BLOCKS: u64 = 8192;
    {
        let mut c = connect(addr, "big");
        c.create_volume(BIG_BLOCKS * BS as u64, BS as u32)
            .expect("create");
        c.begin_snapshot(1, 0, BIG_BLOCKS * BS as u64)
            .expect("begin");
        let mut rng = Rng::new(5);
        let mut chunk = vec![0u8; 256 * BS];
        for lba in (0..BIG_BLOCKS).step_by(256) {
            rng.fill(&mut chunk);
            c.put_extent(lba, 256, &chunk).expect("put");
        }
        c.commit().expect("commit");
    }
    let good = Good::start(addr, "good", Some(3));
    std::thread::sleep(Duration::from_millis(300));
    let before = dp.rss_kib();
    let sampler = RssSampler::start(dp.child.id());

    let hello = hello_frame();
    let t0 = Instant::now();
    // 1. Unauthenticated, a Hello byte per second.
    let mut unauth: Vec<TcpStream> = (0..EACH)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    // 2. Authenticated, a header byte per second (after a whole length prefix).
    let read_req = read_extents_frame(1, 0, 1);
    let mut trickle: Vec<TcpStream> = (0..EACH).map(|_| authed(addr, "good")).collect();
    for s in &mut trickle {
        s.write_all(&read_req[..4]).expect("prefix");
    }
    // 3. The largest header announced, nothing more.
    let mut big_hdr: Vec<TcpStream> = (0..EACH).map(|_| authed(addr, "loris")).collect();
    for s in &mut big_hdr {
        s.write_all(&(deltavol_schemas::FRAME_HEADER_MAX_BYTES as u32).to_le_bytes())
            .expect("prefix");
    }
    // 4. The largest payload announced, a few bytes of it sent.
    let put = put_header_only(deltavol_schemas::FRAME_PAYLOAD_MAX_BYTES);
    let mut big_payload: Vec<TcpStream> = (0..EACH).map(|_| authed(addr, "loris")).collect();
    for s in &mut big_payload {
        s.write_all(&put).expect("header");
        s.write_all(&[0u8; 100]).expect("some payload");
    }
    let t_frames = t0.elapsed();
    // 5. A 32 MiB read whose answer is never read (small receive buffers, so the server's
    //    writes block instead of filling the kernel's buffers).
    let mut readers: Vec<TcpStream> = (0..4)
        .map(|_| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            sock.connect(&addr.into()).expect("connect");
            let s: TcpStream = sock.into();
            s
        })
        .collect();
    for s in &mut readers {
        raw_auth_on(s, "big");
        s.write_all(&read_extents_frame(1, 0, BIG_BLOCKS))
            .expect("read request");
    }
    let t_readers = t0.elapsed();

    // Trickle one byte a second into 1. and 2. while watching everything close.
    let mut closed_at: Vec<Vec<Option<Duration>>> = vec![vec![None; EACH]; 4];
    let mut sent = 0usize;
    let mut next_byte = Instant::now();
    let limit = Duration::from_millis(HANDSHAKE_MS.max(FRAME_MS) + 4000);
    while t0.elapsed() < limit {
        if Instant::now() >= next_byte {
            for (i, s) in unauth.iter_mut().enumerate() {
                if closed_at[0][i].is_none() && sent < hello.len() {
                    let _ = s.write_all(&hello[sent..sent + 1]);
                }
            }
            for (i, s) in trickle.iter_mut().enumerate() {
                if closed_at[1][i].is_none() && 4 + sent < read_req.len() {
                    let _ = s.write_all(&read_req[4 + sent..4 + sent + 1]);
                }
            }
            sent += 1;
            next_byte += Duration::from_secs(1);
        }
        for (k, group) in [&mut unauth, &mut trickle, &mut big_hdr, &mut big_payload]
            .into_iter()
            .enumerate()
        {
            for (i, s) in group.iter_mut().enumerate() {
                if closed_at[k][i].is_none() && !is_open(s) {
                    closed_at[k][i] = Some(t0.elapsed());
                }
            }
        }
        if closed_at.iter().flatten().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let names = [
        ("unauthenticated, a byte/s", HANDSHAKE_MS, Duration::ZERO),
        ("authenticated, a header byte/s", FRAME_MS, t_frames),
        ("largest header announced, stalled", FRAME_MS, t_frames),
        ("largest payload announced, stalled", FRAME_MS, t_frames),
    ];
    for ((name, deadline_ms, setup), when) in names.iter().zip(&closed_at) {
        let still = when.iter().filter(|w| w.is_none()).count();
        let first = when.iter().flatten().min().copied().unwrap_or_default();
        let last = when.iter().flatten().max().copied().unwrap_or_default();
        println!(
            "{TEST}: {EACH} x {name}: closed after {:.1}..{:.1} s (deadline {:.1} s), {still} left open",
            first.as_secs_f64(),
            last.as_secs_f64(),
            *deadline_ms as f64 / 1e3
        );
        assert_eq!(
            still, 0,
            "{name}: {still} connections outlived the deadline"
        );
        let deadline = Duration::from_millis(*deadline_ms);
        // Not before the deadline (minus scheduling slack), not long after it.
        assert!(
            first + Duration::from_millis(300) >= deadline,
            "{name}: closed after {first:?}, before the deadline of {deadline:?}"
        );
        assert!(
            last <= *setup + deadline + Duration::from_millis(2500),
            "{name}: closed only after {last:?} (deadline {deadline:?})"
        );
    }

    // 5. The readers that never read: the server gives up writing after the frame deadline
    //    (its log says so). Draining then gets what the kernel buffered, then EOF, well short
    //    of 32 MiB. (Draining earlier would let the blocked write go on.)
    let give_up = t_readers + Duration::from_millis(FRAME_MS + 5000);
    while dp.log_lines_with("peer did not take a reply") < readers.len() && t0.elapsed() < give_up {
        std::thread::sleep(Duration::from_millis(50));
    }
    let gave_up = dp.log_lines_with("peer did not take a reply");
    println!(
        "{TEST}: the server gave up on {gave_up} of {} stalled readers by {:.1} s",
        readers.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        gave_up,
        readers.len(),
        "the server kept writing to stalled readers past the write deadline"
    );
    let want = BIG_BLOCKS as usize * BS;
    for s in &mut readers {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut got = 0usize;
        let mut b = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "reader: {e} ({:?}) after {got} bytes; the server's last log lines:\n{}",
                    e.kind(),
                    dp.log_tail(40)
                ),
            }
        }
        println!(
            "{TEST}: a reader that stopped reading got {got} of {want} bytes before the server \
             closed it (write deadline {FRAME_MS} ms, set up at {:.1} s)",
            t_readers.as_secs_f64()
        );
        assert!(
            got < want / 2,
            "the server kept writing to a stalled reader"
        );
    }

    let rep = good.finish();
    let peak = sampler.finish();
    let after = dp.rss_kib();
    rep.print(TEST);
    rep.check();
    check_rss(TEST, before, peak, after, 4 * EACH as u64 + 4);
    assert!(dp.log_lines_with("frame not received within") > 0);
}

/// Hello / challenge / auth on an already connected socket (for sockets made with socket2).
fn raw_auth_on(s: &mut TcpStream, volume: &str) {
    s.write_all(&hello_frame()).expect("hello");
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).expect("challenge prefix");
    let mut hdr = vec![0u8; u32::from_le_bytes(prefix) as usize];
    s.read_exact(&mut hdr).expect("challenge");
    let h = deltavol_schemas::decode_header(&hdr).expect("challenge verifies");
    let nonce = h
        .body_as_challenge()
        .and_then(|c| c.nonce())
        .expect("nonce")
        .bytes()
        .to_vec();
    let mac = deltavol_dataplane::auth::answer(TOKEN, &nonce, volume);
    let mut fbb = FlatBufferBuilder::new();
    let v = fbb.create_string(volume);
    let m = fbb.create_vector(&mac);
    let body = wire::Auth::create(
        &mut fbb,
        &wire::AuthArgs {
            volume: Some(v),
            mac: Some(m),
            generation: 0,
            volume_id: None,
            ..Default::default()
        },
    );
    s.write_all(&frame(
        &mut fbb,
        wire::Message::Auth,
        body.as_union_value(),
        &[],
    ))
    .expect("auth");
    let (ty, code, msg) = read_reply(s).expect("auth answer");
    assert_eq!(ty, wire::Message::AuthOk, "{code:?} {msg}");
}

/// A reconnect storm: threads that connect, authenticate, ask one question and hang up (some
/// with a reset, some after garbage), as fast as they can for a bounded time and count. Every
/// well-formed one is served; the server's memory does not grow with the number of
/// connections it has seen.
#[test]
fn reconnect_storm() {
    let _serial = serial();
    const TEST: &str = "reconnect_storm";
    const THREADS: usize = 4;
    const PER_THREAD_MAX: usize = 1500;
    const DURATION: Duration = Duration::from_secs(6);
    require_fds(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = Dp::spawn(dir.path(), &[]);
    let addr = dp.addr;
    let good = Good::start(addr, "good", Some(2));
    std::thread::sleep(Duration::from_millis(300));
    let before = dp.rss_kib();
    let sampler = RssSampler::start(dp.child.id());
    let t0 = Instant::now();
    let storms: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut served = 0usize;
                let mut garbage = 0usize;
                for i in 0..PER_THREAD_MAX {
                    if t0.elapsed() >= DURATION {
                        break;
                    }
                    if i % 5 == 4 {
                        // Garbage, then a reset.
                        let mut s = TcpStream::connect(addr).expect("connect");
                        let _ = s.write_all(&[0xa5; 64]);
                        socket2::SockRef::from(&s)
                            .set_linger(Some(Duration::ZERO))
                            .expect("linger");
                        drop(s);
                        garbage += 1;
                        continue;
                    }
                    let vol = format!("storm-{}", (t * 7 + i) % 16);
                    let mut c = Client::connect(addr, TOKEN, &vol, timeouts())
                        .unwrap_or_else(|e| panic!("storm connection {t}/{i}: {e}"));
                    let info = c.volume_info().expect("volume info");
                    assert_eq!(info.name, vol);
                    served += 1;
                    if i % 3 == 0 {
                        authed_then_reset(addr, &vol);
                        served += 1;
                    }
                }
                (served, garbage)
            })
        })
        .collect();
    let mut served = 0;
    let mut garbage = 0;
    for s in storms {
        let (a, b) = s.join().expect("storm thread");
        served += a;
        garbage += b;
    }
    let storm_time = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rep = good.finish();
    let peak = sampler.finish();
    let after = dp.rss_kib();
    println!(
        "{TEST}: {} connections in {:.1} s from {THREADS} threads: {served} authenticated and \
         served, {garbage} garbage-then-reset",
        served + garbage,
        storm_time.as_secs_f64()
    );
    rep.print(TEST);
    rep.check();
    assert!(served >= 500, "the storm was too small to mean anything");
    // Connections come and go: the server holds a few at once, so the bound is per thread.
    check_rss(TEST, before, peak, after, 64 * THREADS as u64);
    // Once the storm is over, nothing it left holds memory growing with its size.
    assert!(
        after <= before + RSS_SLACK_KIB,
        "RSS after the storm {after} KiB vs {before} KiB before"
    );
}

/// A connection that authenticates, sends a request and is dropped with a reset (SO_LINGER 0)
/// before reading the answer.
fn authed_then_reset(addr: SocketAddr, vol: &str) {
    let (mut s, reply) = raw_auth(addr, TOKEN, vol);
    assert_eq!(reply.expect("auth answer").0, wire::Message::AuthOk);
    let _ = s.write_all(&read_extents_frame(1, 0, 1));
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
}

/// Every way a connection can end gives its slot back: a clean close, a refused token,
/// garbage, an evicted handshake, each deadline, a refusal at the cap. Checked on the
/// server's own counters (in-process), which also count each kind of closing.
#[test]
fn slots_are_given_back_on_every_path() {
    let _serial = serial();
    use deltavol_dataplane::{start, ConnLimits, ServerConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        threads: 2,
        auth_token: TOKEN.to_vec(),
        credentials: None,
        tls: None,
        insecure: false,
        limits: ConnLimits {
            max_connections: 40,
            max_handshakes: 8,
            handshake_timeout_ms: 500,
            idle_timeout_ms: 1000,
            frame_timeout_ms: 500,
        },
    })
    .expect("server starts");
    let addr = server.local_addr();
    let st = server.stats();
    let open = || st.open.load(Ordering::Relaxed);
    let wait_open = |want: usize| {
        let t = Instant::now();
        while open() != want && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        open()
    };

    // Clean close after a request.
    let mut c = connect(addr, "v");
    c.volume_info().expect("info");
    drop(c);
    // Wrong token; garbage.
    let _ = Client::connect(addr, b"nope", "v", timeouts()).expect_err("refused");
    let mut g = TcpStream::connect(addr).expect("connect");
    g.write_all(&[0xff; 32]).expect("garbage");
    drop(g);
    assert_eq!(
        wait_open(0),
        0,
        "a slot leaked on a clean close or a refused handshake"
    );

    // 20 idle sockets: at most 8 handshakes are kept, the rest evicted at once; the kept
    // ones hit the handshake deadline.
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(open() <= 8, "{} handshakes held (cap 8)", open());
    let when = wait_closed(&mut idle, Instant::now(), Duration::from_secs(3));
    assert!(when.iter().all(Option::is_some));
    assert_eq!(
        wait_open(0),
        0,
        "a slot leaked on eviction or the handshake deadline"
    );
    let evicted = st.handshakes_evicted.load(Ordering::Relaxed);
    assert!(evicted >= 12, "{evicted} handshakes evicted, 12 expected");

    // Idle and frame deadlines of authenticated connections.
    let mut a = authed(addr, "v");
    let mut b = authed(addr, "v");
    b.write_all(&[200, 0, 0, 0, 1, 2]).expect("part of a frame");
    let timed_before = st.timed_out.load(Ordering::Relaxed);
    let when = wait_closed(
        &mut [a.try_clone().expect("clone"), b.try_clone().expect("clone")],
        Instant::now(),
        Duration::from_secs(4),
    );
    assert!(when.iter().all(Option::is_some), "{when:?}");
    assert_eq!(
        wait_open(0),
        0,
        "a slot leaked on the idle or frame deadline"
    );
    assert!(st.timed_out.load(Ordering::Relaxed) >= timed_before + 2);
    assert!(closed(&mut a) && closed(&mut b));

    // At the cap: 40 authenticated, 10 more refused, then all closed.
    let mut held: Vec<TcpStream> = (0..40).map(|i| authed(addr, &format!("v{i}"))).collect();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (_, code, msg) = read_reply(&mut s).expect("busy");
        assert_eq!(code, Some(ErrorCode::Internal), "{msg}");
    }
    assert_eq!(st.refused_busy.load(Ordering::Relaxed), 10);
    assert_eq!(open(), 40);
    held.clear();
    assert_eq!(
        wait_open(0),
        0,
        "a slot leaked when authenticated connections closed"
    );
    server.shutdown();
}
