//! `deltavol top` driven as a person would: in a terminal (tmux), keys sent, the screen read.
//!
//! The volumes are fake daemons ([`FakeNode`]): a temporary run dir (`DELTAVOL_RUN_DIR`) with
//! run files naming this test process as the daemon (so it counts as alive) and control
//! sockets answering `{"cmd":"status"}` with a real [`VolumeStatus`] (plus the daemon's own
//! fields, as `daemon.rs` adds them) whose counters grow at known rates with time: the IOPS and
//! MiB/s on screen are checked against them.
//!
//! tmux is required (`scripts/install-deps` installs it): without it these tests fail saying
//! so, they are never skipped.

use deltavol::control::{self, RunInfo};
use deltavol::flush::FlushStatus;
use deltavol::hydrate::HydrateStatus;
use deltavol::ship::ShipStatus;
use deltavol::volume::VolumeStatus;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_deltavol");
const MIB: u64 = 1 << 20;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Fake daemons.

/// A volume's status as a function of the time since its daemon started and the wall clock.
type StatusFn = dyn Fn(Duration, u64) -> VolumeStatus + Send + Sync;

/// A run dir of fake volume daemons, each a thread answering its control socket.
struct FakeNode {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next_dev: u32,
}

impl FakeNode {
    fn new() -> FakeNode {
        FakeNode {
            dir: tempfile::tempdir().unwrap(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            next_dev: 0,
        }
    }

    fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the run file of `name` (pid: this process) and returns it.
    fn run_file(&mut self, name: &str) -> RunInfo {
        let dev_id = self.next_dev;
        self.next_dev += 1;
        let info = RunInfo {
            version: control::RUN_INFO_VERSION,
            name: name.into(),
            pid: std::process::id(),
            dev_id,
            device: format!("/dev/ublkb{dev_id}"),
            cache_dir: format!("/ssd/deltavol/{name}").into(),
            backing: format!("/hdd/{name}.img").into(),
            socket: self.run_dir().join(format!("{name}.sock")),
            queues: 1,
            depth: 64,
            flush_interval_ms: 15_000,
            started_unix_ms: now_ms(),
        };
        std::fs::write(
            self.run_dir().join(format!("{name}.json")),
            serde_json::to_vec(&info).unwrap(),
        )
        .unwrap();
        info
    }

    /// A volume whose daemon answers with `status` (the number of answers so far is counted in
    /// the returned counter).
    fn add(
        &mut self,
        name: &str,
        status: impl Fn(Duration, u64) -> VolumeStatus + Send + Sync + 'static,
    ) -> Arc<AtomicU64> {
        let info = self.run_file(name);
        let listener = UnixListener::bind(&info.socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, answers) = (self.stop.clone(), Arc::new(AtomicU64::new(0)));
        let counted = answers.clone();
        let status: Box<StatusFn> = Box::new(status);
        let t0 = Instant::now();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let mut s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if control::read_request(&mut s).is_err() {
                    continue;
                }
                // As daemon.rs answers: the volume's status and the daemon's own fields.
                let mut v = serde_json::to_value(status(t0.elapsed(), now_ms())).unwrap();
                let o = v.as_object_mut().unwrap();
                o.insert("dev_id".into(), info.dev_id.into());
                o.insert("device".into(), info.device.clone().into());
                o.insert("pid".into(), info.pid.into());
                o.insert("queues".into(), info.queues.into());
                o.insert("depth".into(), info.depth.into());
                o.insert("flush_interval_ms".into(), info.flush_interval_ms.into());
                o.insert("cache_dir".into(), serde_json::json!(info.cache_dir));
                o.insert("backing".into(), serde_json::json!(info.backing));
                o.insert("started_unix_ms".into(), info.started_unix_ms.into());
                control::write_response(&mut s, &v);
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }));
        answers
    }

    /// A volume whose daemon is alive but never answers (its socket listens, nobody reads).
    fn add_silent(&mut self, name: &str) {
        let info = self.run_file(name);
        let listener = UnixListener::bind(&info.socket).unwrap();
        // Kept open (connections queue in the backlog, unanswered) until the node goes.
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(listener);
        }));
    }

    /// The volume is detached: its run file and socket go (its thread answers no more).
    fn remove(&self, name: &str) {
        std::fs::remove_file(self.run_dir().join(format!("{name}.json"))).unwrap();
        std::fs::remove_file(self.run_dir().join(format!("{name}.sock"))).unwrap();
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A healthy status: the given counters, 12 MiB dirty, 24 MiB of a 2 GiB cache, epoch 42.
fn base_status(name: &str, reads: u64, writes: u64, rb: u64, wb: u64) -> VolumeStatus {
    VolumeStatus {
        name: name.into(),
        volume_id: "5d0c00000000000000000000000000e1".into(),
        size_bytes: 10 << 30,
        epoch: 42,
        frozen_epoch: 41,
        flushed_epoch: 41,
        dirty_bytes: 12 * MIB,
        ssd_used_bytes: 24 * MIB,
        ssd_allocated_bytes: 32 * MIB,
        cache_limit_bytes: 2 << 30,
        read_cache_blocks: 0,
        read_cache_hits: 0,
        read_cache_misses: 0,
        read_cache_hit_ratio: 0.0,
        reads,
        writes,
        read_bytes: rb,
        write_bytes: wb,
        flush_requests: 0,
        backpressure_waits: 0,
        durability_failed: false,
        flush: FlushStatus {
            last: None,
            last_error: None,
            last_error_unix_ms: None,
            failed_attempts: 0,
            consecutive_failures: 0,
            flushes: 0,
            data_bytes_total: 0,
            zero_bytes_total: 0,
        },
        shipping: None,
        hydration: None,
        resumed: None,
        io_path: deltavol::zerocopy::IoPath::Copy,
    }
}

/// `per_s` events a second over `t`.
fn at_rate(per_s: u64, t: Duration) -> u64 {
    (per_s as u128 * t.as_micros() / 1_000_000) as u64
}

/// alpha: 1000 reads/s of 4 KiB (4 MiB/s), 250 writes/s of 4 KiB (1 MiB/s); shipping, its
/// newest committed snapshot cut 5 s before each answer, the outbox empty.
fn alpha(t: Duration, now: u64) -> VolumeStatus {
    let mut s = base_status(
        "alpha",
        at_rate(1000, t),
        at_rate(250, t),
        at_rate(1000, t) * 4096,
        at_rate(250, t) * 4096,
    );
    s.shipping = Some(ShipStatus {
        dataplane: "10.0.0.5:7070".into(),
        dataplane_addrs: vec!["10.0.0.5:7070".into()],
        connected: true,
        connected_to: Some("10.0.0.5:7070".into()),
        head: 41,
        last_committed: Some(41),
        last_committed_unix_ms: Some(now - 4_000),
        last_committed_cut_unix_ms: Some(now - 5_000),
        ..ShipStatus::default()
    });
    s
}

/// beta: no reads, 2000 writes/s of 4 KiB (7.8 MiB/s); a recovered volume hydrating (42.5%)
/// whose data plane is away: its recovery point 10 minutes old, 3 snapshots (96 MiB) waiting,
/// the shipper's error.
fn beta(t: Duration, now: u64) -> VolumeStatus {
    let mut s = base_status("beta", 0, at_rate(2000, t), 0, at_rate(2000, t) * 4096);
    (s.epoch, s.frozen_epoch, s.flushed_epoch) = (10, 9, 9);
    s.shipping = Some(ShipStatus {
        dataplane: "10.0.0.5:7070".into(),
        dataplane_addrs: vec!["10.0.0.5:7070".into()],
        head: 9,
        last_committed: Some(6),
        last_committed_unix_ms: Some(now - 590_000),
        last_committed_cut_unix_ms: Some(now - 600_000),
        outbox_entries: 3,
        outbox_bytes: 96 * MIB,
        last_error: Some("connect 10.0.0.5:7070: Connection refused".into()),
        ..ShipStatus::default()
    });
    s.hydration = Some(HydrateStatus {
        snapshot: 6,
        local_bytes: 4352 * MIB,
        total_bytes: 10240 * MIB,
        percent: 42.5,
        rate_bytes_per_s: 200 * MIB,
        ..HydrateStatus::default()
    });
    s
}

// ---------------------------------------------------------------------------------------------
// tmux.

/// A tmux server of its own (`tmux -L`), with one session running a shell, killed on drop.
struct Tmux {
    socket: String,
    /// The server's socket file (left behind by kill-server: removed on drop).
    socket_path: String,
}

impl Tmux {
    /// A `width` x `height` terminal running `sh`.
    fn start(tag: &str, width: u16, height: u16) -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.as_ref().is_ok_and(|o| o.status.success()),
            "tmux is needed to test `deltavol top` on a terminal and is not installed \
             (scripts/install-deps installs it; or apt-get install tmux): {found:?}"
        );
        let mut t = Tmux {
            socket: format!("deltavol-top-{tag}-{}", std::process::id()),
            socket_path: String::new(),
        };
        t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            "env PS1='$ ' sh",
        ]);
        t.socket_path = t.pane("#{socket_path}");
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Types `keys` (tmux key names: "Enter", "j", "Down", ...).
    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "top"];
        a.extend_from_slice(keys);
        self.run(&a);
    }

    /// The screen as text.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// The screen with its colours (escape sequences).
    fn screen_with_colours(&self) -> String {
        self.run(&["capture-pane", "-p", "-e", "-t", "top"])
    }

    /// A tmux format of the pane, e.g. `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_string()
    }

    /// Waits until the screen satisfies `ok` (10 s at most), and returns it.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "waited 10 s for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `check` passes on the screen (10 s at most), and returns the screen.
    fn wait_until(&self, what: &str, check: impl Fn(&str) -> Result<(), String>) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            match check(&s) {
                Ok(()) => return s,
                Err(e) => assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "waited 10 s for {what}: {e}; the screen:\n{s}"
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `deltavol top ARGS` with `DELTAVOL_RUN_DIR=run_dir` (and `env`) from a script in
    /// the shell; once it exits, the script prints `TOP-EXIT=<status>` and `TTY-OK` if the
    /// terminal's settings are as they were before (raw mode undone).
    fn start_top(&self, dir: &Path, run_dir: &Path, env: &str, args: &str) {
        let script = dir.join("run-top.sh");
        std::fs::write(
            &script,
            format!(
                "S1=$(stty -g)\n\
                 {env} DELTAVOL_RUN_DIR='{}' '{BIN}' top {args}\n\
                 echo \"TOP-EXIT=$?\"\n\
                 if [ \"$S1\" = \"$(stty -g)\" ]; then echo TTY-OK; else echo TTY-CHANGED; fi\n",
                run_dir.display()
            ),
        )
        .unwrap();
        self.keys(&[&format!("sh '{}'", script.display()), "Enter"]);
    }

    /// Checks `top` has exited with `status` and left the terminal as it found it: main screen,
    /// the cursor shown, the tty settings back.
    fn assert_restored(&self, status: i32) -> String {
        let s = self.wait_for("top to exit", |s| s.contains("TTY-"));
        assert!(s.contains(&format!("TOP-EXIT={status}\n")), "{s}");
        assert!(
            s.contains("TTY-OK"),
            "the tty settings were not restored:\n{s}"
        );
        assert_eq!(
            self.pane("#{alternate_on}"),
            "0",
            "still on the alternate screen"
        );
        assert_eq!(
            self.pane("#{cursor_flag}"),
            "1",
            "the cursor is still hidden"
        );
        s
    }

    /// The pid of the program the pane's shell runs (the script's child: `deltavol top`).
    fn top_pid(&self) -> u32 {
        let shell: u32 = self.pane("#{pane_pid}").parse().unwrap();
        let t0 = Instant::now();
        loop {
            let mut pids = vec![shell];
            let mut i = 0;
            while i < pids.len() {
                let children =
                    std::fs::read_to_string(format!("/proc/{}/task/{}/children", pids[i], pids[i]))
                        .unwrap_or_default();
                pids.extend(
                    children
                        .split_whitespace()
                        .map(|p| p.parse::<u32>().unwrap()),
                );
                i += 1;
            }
            let bin = std::fs::canonicalize(BIN).unwrap();
            for p in pids {
                let exe = std::fs::read_link(format!("/proc/{p}/exe")).unwrap_or_default();
                if exe == bin {
                    return p;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no deltavol top under the shell"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
        if !self.socket_path.is_empty() {
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the screen.

/// The table line of volume `name`, split into its cells' words (borders and the selection
/// mark removed).
fn row_words(screen: &str, name: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|l| {
        let w: Vec<String> = l
            .replace('│', " ")
            .replacen("> ", "  ", 1)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        (w.first().map(String::as_str) == Some(name)).then_some(w)
    })
}

fn num(w: &[String], i: usize) -> Result<f64, String> {
    w.get(i)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| format!("cell {i} of {w:?} is not a number"))
}

/// The volume the selection mark (`> `) is on.
fn selected(screen: &str) -> Option<String> {
    screen.lines().find_map(|l| {
        let rest = l.strip_prefix("│> ")?;
        rest.split_whitespace().next().map(str::to_string)
    })
}

fn near(what: &str, got: f64, want: f64) -> Result<(), String> {
    // 10%: the rates are over the time between two answers as `top` sees them, which a busy
    // machine stretches or shrinks a little.
    if (got - want).abs() <= want * 0.1 + 0.051 {
        Ok(())
    } else {
        Err(format!("{what}: {got}, expected {want} (within 10%)"))
    }
}

/// The numbers the fake volumes' counters and clocks make: alpha's and beta's rates, alpha's
/// recovery point, the node's write total. A transient hiccup of the machine (a thread
/// descheduled between an answer and its timestamp) skews one refresh: callers look at the
/// next one.
fn expected_numbers(screen: &str) -> Result<(), String> {
    let a = row_words(screen, "alpha").ok_or("no alpha")?;
    let b = row_words(screen, "beta").ok_or("no beta")?;
    near("alpha read IOPS", num(&a, 2)?, 1000.0)?;
    near("alpha write IOPS", num(&a, 3)?, 250.0)?;
    near("alpha read MiB/s", num(&a, 4)?, 3.9)?;
    near("alpha write MiB/s", num(&a, 5)?, 1.0)?;
    near("beta read IOPS", num(&b, 2)?, 0.0)?;
    near("beta write IOPS", num(&b, 3)?, 2000.0)?;
    near("beta write MiB/s", num(&b, 5)?, 7.8)?;
    let rpo = a.get(11).ok_or("no RPO")?;
    let secs: f64 = rpo
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("alpha's RPO {rpo}"))?;
    if !(5.0..5.5).contains(&secs) {
        return Err(format!("alpha's RPO: {rpo}, expected 5.0s"));
    }
    let total: Vec<&str> = screen
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    if total.len() < 8
        || (total[0], total[2], total[5], total[7]) != ("read", "IOPS", "write", "IOPS")
    {
        return Err(format!("no totals: {total:?}"));
    }
    near("total write IOPS", total[6].parse().unwrap_or(-1.0), 2250.0)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn top_in_a_terminal_shows_every_volume_follows_keys_and_restores_the_terminal() {
    let mut node = FakeNode::new();
    node.add("alpha", alpha);
    let beta_answers = node.add("beta", beta);
    let tmux = Tmux::start("main", 160, 40);
    tmux.start_top(node.run_dir(), node.run_dir(), "", "--interval-ms 500");

    // Both volumes, with the rates their counters make, the header and the footer.
    let s = tmux.wait_until("both volumes with their rates", expected_numbers);
    println!("the screen (cargo test -- --nocapture shows it):\n{s}");
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "1",
        "full screen: the alternate screen"
    );
    let a = row_words(&s, "alpha").unwrap();
    let mut b = row_words(&s, "beta").unwrap();
    b.truncate(17);
    // NAME DEVICE RD/s WR/s RD-MiB/s WR-MiB/s LAT DIRTY SSD(2 words) EPOCH RPO OUTBOX HYDR STATE
    assert_eq!(a[1], "/dev/ublkb0", "{s}");
    assert_eq!(
        &a[6..],
        ["-", "12M", "24M", "1%", "42", &a[11], "0", "-", "ok"],
        "{s}"
    );
    assert_eq!(b[1], "/dev/ublkb1");
    assert_eq!(b[2], "0");
    assert_eq!(
        &b[6..],
        ["-", "12M", "24M", "1%", "10", "10m00s", "3", "96M", "42.5%", "ship", "error:"],
        "{s}"
    );
    // The header: the node's totals; the footer: the keys.
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[0].starts_with("deltavol top - ") && lines[0].contains(" - 2 volumes - "),
        "{s}"
    );
    assert!(
        lines[1].contains("outbox 3 (96M)")
            && lines[1].contains("hydrating 1")
            && lines[1].contains("PROBLEMS 1"),
        "{s}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("q/Esc quit") && l.contains("Enter/d detail")),
        "{s}"
    );
    // Colour where it matters: beta's 10-minute recovery point is red.
    let coloured = tmux.screen_with_colours();
    let beta_line = coloured.lines().find(|l| l.contains("beta")).unwrap();
    let before_rpo = &beta_line[..beta_line.find("10m00s").unwrap()];
    let last_sgr = &before_rpo[before_rpo.rfind("\x1b[").unwrap()..];
    assert!(
        ["[31m", "[91m", ";31m", ";91m", "38;5;1m", "38;5;9m"]
            .iter()
            .any(|red| last_sgr.contains(red)),
        "beta's RPO is not red: {last_sgr:?} in {beta_line:?}"
    );

    // j selects beta, Enter opens its detail pane: `deltavol status beta`.
    assert_eq!(selected(&s).as_deref(), Some("alpha"), "the first row: {s}");
    let before = beta_answers.load(Ordering::SeqCst);
    tmux.keys(&["j"]);
    tmux.wait_for("beta selected", |s| selected(s).as_deref() == Some("beta"));
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("beta's detail pane", |s| {
        s.contains("beta (deltavol status beta)") && s.contains("hydration:")
    });
    assert!(
        s.contains("volume:        beta (5d0c00000000000000000000000000e1)"),
        "{s}"
    );
    assert!(s.contains("device:        /dev/ublkb1 (pid "), "{s}");
    assert!(s.contains("hydration:     42.5% of snapshot 6"), "{s}");
    assert!(s.contains("outbox:        3 snapshot(s), 96MiB"), "{s}");
    assert!(
        s.contains("cut 600."),
        "beta's recovery point in its status: {s}"
    );
    assert!(s.contains("Esc/Enter/d close the detail"), "{s}");
    println!("with beta's detail pane:\n{s}");
    assert!(
        beta_answers.load(Ordering::SeqCst) > before,
        "beta kept being asked"
    );

    // A volume appears whose daemon does not answer; alpha goes away.
    node.add_silent("gamma");
    node.remove("alpha");
    let s = tmux.wait_for("gamma not answering, alpha gone", |s| {
        s.contains("1 not answering") && row_words(s, "alpha").is_none()
    });
    let g = row_words(&s, "gamma").unwrap();
    assert_eq!(g[1], "/dev/ublkb2");
    assert_eq!(&g[g.len() - 2..], ["not", "answering"], "{s}");
    assert!(s.contains("2 volumes") && s.contains("PROBLEMS 2"), "{s}");
    assert!(
        s.contains("beta (deltavol status beta)"),
        "the detail pane stays on beta: {s}"
    );
    // Esc closes the pane (it does not quit).
    tmux.keys(&["Escape"]);
    tmux.wait_for("the detail pane closed", |s| {
        !s.contains("deltavol status beta") && row_words(s, "beta").is_some()
    });

    // A smaller terminal: the view redraws to it.
    tmux.run(&["resize-window", "-t", "top", "-x", "100", "-y", "20"]);
    let s = tmux.wait_for("the view at 100x20", |s| {
        s.lines().count() <= 20
            && s.lines().all(|l| l.chars().count() <= 100)
            && s.lines().any(|l| l.starts_with("q/Esc quit"))
            && row_words(s, "beta").is_some()
    });
    assert!(
        s.lines().next().unwrap().starts_with("deltavol top - "),
        "{s}"
    );
    tmux.run(&["resize-window", "-t", "top", "-x", "160", "-y", "40"]);

    // q quits: the shell's screen is back, as it was.
    tmux.keys(&["q"]);
    let s = tmux.assert_restored(0);
    assert!(!s.contains("NAME"), "the view is gone: {s}");
}

#[test]
fn top_on_an_empty_node_says_how_to_attach_a_volume() {
    let node = FakeNode::new();
    let tmux = Tmux::start("empty", 120, 20);
    tmux.start_top(node.run_dir(), node.run_dir(), "", "--interval-ms 500");
    let s = tmux.wait_for("the empty node's message", |s| {
        s.contains("no volumes attached: deltavol add ... or docker volume create -d deltavol")
    });
    assert!(s.contains(" - 0 volumes - "), "{s}");
    tmux.keys(&["Escape"]);
    tmux.assert_restored(0);
}

#[test]
fn top_restores_the_terminal_after_a_panic_and_a_sigterm() {
    let mut node = FakeNode::new();
    node.add("alpha", alpha);
    let tmux = Tmux::start("panic", 120, 30);
    // A panic (the test key of DELTAVOL_TOP_TEST_PANIC): the terminal is put back first, then
    // the panic is reported on it.
    tmux.start_top(
        node.run_dir(),
        node.run_dir(),
        "DELTAVOL_TOP_TEST_PANIC=1",
        "--interval-ms 500",
    );
    tmux.wait_for("alpha", |s| row_words(s, "alpha").is_some());
    tmux.keys(&["!"]);
    let s = tmux.assert_restored(101);
    assert!(s.contains("deltavol top: test panic"), "{s}");
    // SIGTERM: the loop ends and the terminal is restored.
    tmux.run(&["send-keys", "-t", "top", "clear", "Enter"]);
    tmux.wait_for("a clear screen", |s| !s.contains("TTY-"));
    tmux.start_top(node.run_dir(), node.run_dir(), "", "--interval-ms 500");
    tmux.wait_for("alpha", |s| row_words(s, "alpha").is_some());
    let pid = tmux.top_pid();
    // SAFETY: a signal to the process this test started (in its tmux).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    tmux.assert_restored(0);
}

#[test]
fn top_once_prints_one_plain_frame() {
    let mut node = FakeNode::new();
    node.add("alpha", alpha);
    node.add("beta", beta);
    node.add_silent("gamma");
    // One frame, its rates over one interval (a hiccup of a busy machine skews one: the
    // frame is taken again, three times at most).
    let mut tries = 0;
    let out = loop {
        let o = Command::new(BIN)
            .args(["top", "--once", "--interval-ms", "500"])
            .env("DELTAVOL_RUN_DIR", node.run_dir())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        tries += 1;
        match expected_numbers(&out) {
            Ok(()) => break out,
            Err(e) => assert!(tries < 3, "{e}:\n{out}"),
        }
    };
    println!("deltavol top --once:\n{out}");
    assert!(
        !out.contains('\x1b'),
        "plain text, no terminal control: {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains(" - 3 volumes - ") && lines[0].contains("1 not answering"));
    assert!(
        lines[2].starts_with("NAME") && lines[2].ends_with("STATE"),
        "{out}"
    );
    let a = row_words(&out, "alpha").unwrap();
    assert_eq!(a[a.len() - 1], "ok");
    let b = row_words(&out, "beta").unwrap();
    assert_eq!(&b[11..16], ["10m00s", "3", "96M", "42.5%", "ship"], "{out}");
    let g = row_words(&out, "gamma").unwrap();
    assert_eq!(&g[g.len() - 2..], ["not", "answering"]);
    assert!(out.contains("  gamma: no answer within 0.5 s\n"), "{out}");

    // An empty node.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["top", "--once"])
        .env("DELTAVOL_RUN_DIR", empty.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        out.ends_with(
            "no volumes attached: deltavol add ... or docker volume create -d deltavol\n"
        ),
        "{out}"
    );
}

#[test]
fn top_without_a_terminal_points_at_once() {
    let node = FakeNode::new();
    let o = Command::new(BIN)
        .args(["top"])
        .env("DELTAVOL_RUN_DIR", node.run_dir())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("needs a terminal") && err.contains("--once"),
        "{err}"
    );
}

/// Its terminal closing (the window, the tmux session) ends `deltavol top` at once: nothing is
/// left behind spinning on a dead tty (crossterm's poll would read end-of-file forever).
#[test]
fn top_exits_when_its_terminal_goes_away() {
    let mut node = FakeNode::new();
    node.add("alpha", alpha);
    let tmux = Tmux::start("hangup", 120, 30);
    tmux.start_top(node.run_dir(), node.run_dir(), "", "--interval-ms 200");
    tmux.wait_for("alpha", |s| row_words(s, "alpha").is_some());
    let pid = tmux.top_pid();
    drop(tmux); // kill-server: the pane's terminal hangs up
    let gone = |pid: u32| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for its new parent counts as gone.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    };
    let t0 = Instant::now();
    while !gone(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "deltavol top (pid {pid}) still runs after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
