//! `deltavol top`: a terminal view of every volume attached on this node, refreshed every
//! interval: IOPS and throughput, dirty bytes, SSD use, epoch, recovery point, outbox,
//! hydration, and what is wrong.
//!
//! Three parts, so that everything but drawing is tested without a terminal:
//!
//! - data: [`collect`] finds the attached volumes in the run dir (as `deltavol list` does: a
//!   run file whose daemon is alive) and asks each daemon's control socket for its status, all
//!   at once, each within a timeout (a daemon that does not answer is a row saying so, never a
//!   wait for the others);
//! - model: [`Model::update`] turns successive samples into [`Row`]s, with rates computed
//!   from the counters of a volume's last two answers and the time between them (a volume
//!   that appears has none yet, a daemon restarted under the same name starts over), and
//!   keeps the selection on the same volume while others come and go; [`Model::key`] is the
//!   keyboard; [`cells`] formats a row, with a [`Level`] per cell (warnings, errors);
//! - drawing: the full-screen view (ratatui over crossterm: alternate screen, raw mode,
//!   restored on exit, on SIGTERM/SIGINT and on panic; on SIGHUP, its terminal gone, it
//!   exits at once) and, for `--once`, the same cells as plain text ([`plain_frame`]).
//!
//! The detail pane is the text of `deltavol status NAME`, run as a child of this binary (so it
//! is exactly what `status` prints), refreshed with every sample while it is open.
//!
//! The status carries no request latency (the latency histograms are exported only as
//! Prometheus metrics, `--metrics-listen`), so the LAT column shows `-`; it shows the mean
//! over the interval if a status carries `io_latency: {"read"|"write": {"count", "sum_ns"}}`.

use crate::control::{self, Request};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a node with no volume shows.
pub const EMPTY_NODE: &str =
    "no volumes attached: deltavol add ... or docker volume create -d deltavol";

/// Set by `DELTAVOL_TOP_TEST_PANIC=1`: the key `!` panics (the tests check the terminal is
/// restored after a panic).
const TEST_PANIC_ENV: &str = "DELTAVOL_TOP_TEST_PANIC";

// ---------------------------------------------------------------------------------------------
// Data: the run dir and the daemons' answers.

/// One daemon's answer (or its silence), when it came.
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: String,
    pub device: String,
    pub pid: u32,
    /// When the answer came (rates are over the time between two answers).
    pub at: Instant,
    pub unix_ms: u64,
    /// The status JSON, or why there is none.
    pub answer: Result<Value, String>,
}

/// Every attached volume's probe at one refresh, sorted by name.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub unix_ms: u64,
    pub probes: Vec<Probe>,
}

/// The volumes attached on this node: run files in `run_dir` whose daemon is alive (as
/// `deltavol list`), sorted by name. Unreadable run files are left out, as `list` does.
pub fn discover(run_dir: &Path) -> Vec<control::RunInfo> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            if let Ok(Some(i)) = control::read_info(&p) {
                if control::pid_alive(i.pid) {
                    v.push(i);
                }
            }
        }
    }
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Asks every attached volume's daemon for its status, in parallel, each within `timeout`.
pub fn collect(run_dir: &Path, timeout: Duration) -> Sample {
    let infos = discover(run_dir);
    let probes = std::thread::scope(|s| {
        let handles: Vec<_> = infos
            .iter()
            .map(|i| {
                s.spawn(move || {
                    let answer = control::request(&i.socket, &Request::Status, Some(timeout))
                        .map_err(|e| not_answering_reason(&e.to_string(), timeout));
                    Probe {
                        name: i.name.clone(),
                        device: i.device.clone(),
                        pid: i.pid,
                        at: Instant::now(),
                        unix_ms: now_ms(),
                        answer,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&infos)
            .map(|(h, i)| {
                h.join().unwrap_or_else(|_| Probe {
                    name: i.name.clone(),
                    device: i.device.clone(),
                    pid: i.pid,
                    at: Instant::now(),
                    unix_ms: now_ms(),
                    answer: Err("the status request failed".into()),
                })
            })
            .collect()
    });
    Sample {
        unix_ms: now_ms(),
        probes,
    }
}

/// A request error said for people: a read that timed out is "no answer within T".
fn not_answering_reason(e: &str, timeout: Duration) -> String {
    if e.contains("os error 11") || e.contains("timed out") {
        format!("no answer within {:.1} s", timeout.as_secs_f64())
    } else {
        e.to_string()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The numbers: counters, rates, and what a status says.

/// A request-latency counter pair: requests timed and their total time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyCounter {
    pub count: u64,
    pub sum_ns: u64,
}

/// The cumulative I/O counters of a status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_latency: Option<LatencyCounter>,
    pub write_latency: Option<LatencyCounter>,
}

/// Per-second rates between two answers, and the mean latency over that time (when known).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub read_latency_ms: Option<f64>,
    pub write_latency_ms: Option<f64>,
}

impl Rates {
    /// The rates from `prev` to `cur`, `dt` apart; `None` without time between them or when
    /// a counter went back (the daemon restarted: its counters start from 0).
    pub fn between(prev: &Counters, cur: &Counters, dt: Duration) -> Option<Rates> {
        let s = dt.as_secs_f64();
        if s <= 0.0 {
            return None;
        }
        let d = |a: u64, b: u64| b.checked_sub(a).map(|x| x as f64 / s);
        let lat = |a: Option<LatencyCounter>, b: Option<LatencyCounter>| -> Option<f64> {
            let (a, b) = (a?, b?);
            let n = b.count.checked_sub(a.count)?;
            let ns = b.sum_ns.checked_sub(a.sum_ns)?;
            (n > 0).then(|| ns as f64 / n as f64 / 1e6)
        };
        Some(Rates {
            read_iops: d(prev.reads, cur.reads)?,
            write_iops: d(prev.writes, cur.writes)?,
            read_bytes_per_s: d(prev.read_bytes, cur.read_bytes)?,
            write_bytes_per_s: d(prev.write_bytes, cur.write_bytes)?,
            read_latency_ms: lat(prev.read_latency, cur.read_latency),
            write_latency_ms: lat(prev.write_latency, cur.write_latency),
        })
    }
}

/// The recovery point of a volume: the age of what a recovery from the data plane gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpo {
    /// No `--dataplane`: no snapshots, no recovery point.
    NoDataPlane,
    /// Shipping, but nothing committed since the daemon started.
    NoneYet,
    /// The newest committed snapshot's cut, unix ms.
    Cut(u64),
    /// Only the commit time is known (the cut was at or before it).
    CommittedAt(u64),
}

/// Hydration after `recover` or `clone`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hydration {
    Done,
    Percent(f64),
}

/// Something wrong with a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Recovered on another machine: read-only here.
    Fenced,
    /// A cache sync failed: FLUSH fails until the volume is reattached.
    DurabilityFailed,
    /// The last flush attempt failed (retrying).
    FlushError(String),
    /// The shipper's last error (the data plane unreachable, refused, ...).
    ShipError(String),
}

/// What `top` reads from a daemon's status JSON (missing fields read as zero/absent: an older
/// or newer daemon still shows).
#[derive(Debug, Clone, PartialEq)]
pub struct VolStat {
    pub counters: Counters,
    pub size_bytes: u64,
    pub dirty_bytes: u64,
    pub ssd_used_bytes: u64,
    pub cache_limit_bytes: u64,
    pub epoch: u64,
    pub flushed_epoch: u64,
    pub flush_interval_ms: u64,
    pub rpo: Rpo,
    /// Snapshots waiting in the outbox and their bytes (`None` without a data plane).
    pub outbox: Option<(u64, u64)>,
    pub hydration: Option<Hydration>,
    pub problems: Vec<Problem>,
}

impl VolStat {
    pub fn from_status(v: &Value) -> VolStat {
        let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        let g = |k: &str| u(v, k).unwrap_or(0);
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let b = |v: &Value, k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let nonnull = |k: &str| v.get(k).filter(|x| !x.is_null());
        let latency = |op: &str| {
            let l = v.get("io_latency")?.get(op)?;
            Some(LatencyCounter {
                count: u(l, "count")?,
                sum_ns: u(l, "sum_ns")?,
            })
        };
        let mut problems = Vec::new();
        let shipping = nonnull("shipping");
        if shipping.is_some_and(|sh| b(sh, "fenced")) {
            problems.push(Problem::Fenced);
        }
        if b(v, "durability_failed") {
            problems.push(Problem::DurabilityFailed);
        }
        if let Some(e) = nonnull("flush").and_then(|f| s(f, "last_error")) {
            problems.push(Problem::FlushError(e));
        }
        if let Some(e) = shipping.and_then(|sh| s(sh, "last_error")) {
            problems.push(Problem::ShipError(e));
        }
        let rpo = match shipping {
            None => Rpo::NoDataPlane,
            Some(sh) => match (
                u(sh, "last_committed_cut_unix_ms"),
                u(sh, "last_committed_unix_ms"),
            ) {
                (Some(cut), _) => Rpo::Cut(cut),
                (None, Some(t)) => Rpo::CommittedAt(t),
                (None, None) => Rpo::NoneYet,
            },
        };
        let hydration = nonnull("hydration").map(|h| {
            if b(h, "done") {
                Hydration::Done
            } else {
                Hydration::Percent(h.get("percent").and_then(Value::as_f64).unwrap_or(0.0))
            }
        });
        VolStat {
            counters: Counters {
                reads: g("reads"),
                writes: g("writes"),
                read_bytes: g("read_bytes"),
                write_bytes: g("write_bytes"),
                read_latency: latency("read"),
                write_latency: latency("write"),
            },
            size_bytes: g("size_bytes"),
            dirty_bytes: g("dirty_bytes"),
            ssd_used_bytes: g("ssd_used_bytes"),
            cache_limit_bytes: g("cache_limit_bytes"),
            epoch: g("epoch"),
            flushed_epoch: g("flushed_epoch"),
            flush_interval_ms: g("flush_interval_ms"),
            rpo,
            outbox: shipping.map(|sh| {
                (
                    u(sh, "outbox_entries").unwrap_or(0),
                    u(sh, "outbox_bytes").unwrap_or(0),
                )
            }),
            hydration,
            problems,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: rows, rates across samples, selection, keys.

/// A volume as the view shows it.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub device: String,
    pub pid: u32,
    /// When its probe was answered (unix ms): ages are measured from here.
    pub unix_ms: u64,
    pub state: RowState,
}

#[derive(Debug, Clone)]
pub enum RowState {
    /// The daemon answered; rates once it has answered twice.
    Up {
        stat: Box<VolStat>,
        rates: Option<Rates>,
    },
    /// The daemon is alive but did not answer, and why.
    NotAnswering(String),
}

/// Keys `top` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Quit,
    /// Esc: closes the detail pane if it is open, else quits.
    Back,
    Up,
    Down,
    Home,
    End,
    /// Enter or d: opens (or closes) the selected volume's detail pane.
    Detail,
}

/// What a key asks of the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Fetch this volume's detail text (`deltavol status NAME`).
    FetchDetail(String),
}

/// The detail pane: the `deltavol status` text of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    pub name: String,
    /// `None` until the first answer.
    pub text: Option<String>,
    /// A fetch is under way.
    pub pending: bool,
}

#[derive(Debug, Clone, Copy)]
struct Prev {
    pid: u32,
    at: Instant,
    counters: Counters,
}

/// The view's state across refreshes.
#[derive(Debug, Default)]
pub struct Model {
    pub rows: Vec<Row>,
    /// When the last sample was taken (unix ms); 0 before the first.
    pub unix_ms: u64,
    /// Samples taken so far.
    pub samples: u64,
    prev: HashMap<String, Prev>,
    selected: Option<String>,
    pub detail: Option<Detail>,
}

impl Model {
    /// Takes a new sample: rows in name order, rates against each volume's previous answer.
    pub fn update(&mut self, sample: Sample) {
        let old_index = self.selected_index();
        let mut prev = HashMap::new();
        let mut rows = Vec::with_capacity(sample.probes.len());
        for p in sample.probes {
            let state = match p.answer {
                Ok(v) => {
                    let stat = VolStat::from_status(&v);
                    let rates = self
                        .prev
                        .get(&p.name)
                        .filter(|q| q.pid == p.pid)
                        .and_then(|q| {
                            Rates::between(&q.counters, &stat.counters, p.at.duration_since(q.at))
                        });
                    prev.insert(
                        p.name.clone(),
                        Prev {
                            pid: p.pid,
                            at: p.at,
                            counters: stat.counters,
                        },
                    );
                    RowState::Up {
                        stat: Box::new(stat),
                        rates,
                    }
                }
                Err(e) => {
                    // Silent this time: keep its last answer for the next rate.
                    if let Some(q) = self.prev.get(&p.name).filter(|q| q.pid == p.pid) {
                        prev.insert(p.name.clone(), *q);
                    }
                    RowState::NotAnswering(e)
                }
            };
            rows.push(Row {
                name: p.name,
                device: p.device,
                pid: p.pid,
                unix_ms: p.unix_ms,
                state,
            });
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        self.rows = rows;
        self.prev = prev;
        self.unix_ms = sample.unix_ms;
        self.samples += 1;
        // The selection follows its volume; if that one went away, the row now at its place.
        self.selected = match &self.selected {
            Some(n) if self.rows.iter().any(|r| &r.name == n) => Some(n.clone()),
            _ if self.rows.is_empty() => None,
            _ => {
                let i = old_index.unwrap_or(0).min(self.rows.len() - 1);
                Some(self.rows[i].name.clone())
            }
        };
        if let Some(d) = &self.detail {
            if Some(&d.name) != self.selected.as_ref() {
                self.detail = None;
            }
        }
    }

    /// The selected row's index.
    pub fn selected_index(&self) -> Option<usize> {
        let n = self.selected.as_ref()?;
        self.rows.iter().position(|r| &r.name == n)
    }

    pub fn selected_name(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// Acts on a key.
    pub fn key(&mut self, k: Key) -> Action {
        let n = self.rows.len();
        let cur = self.selected_index();
        let to = match k {
            Key::Quit => return Action::Quit,
            Key::Back if self.detail.is_some() => {
                self.detail = None;
                return Action::None;
            }
            Key::Back => return Action::Quit,
            Key::Detail => {
                if self.detail.is_some() {
                    self.detail = None;
                    return Action::None;
                }
                return match self.selected.clone() {
                    Some(name) => {
                        self.detail = Some(Detail {
                            name: name.clone(),
                            text: None,
                            pending: true,
                        });
                        Action::FetchDetail(name)
                    }
                    None => Action::None,
                };
            }
            _ if n == 0 => return Action::None,
            Key::Up => cur.map_or(0, |i| i.saturating_sub(1)),
            Key::Down => cur.map_or(0, |i| (i + 1).min(n - 1)),
            Key::Home => 0,
            Key::End => n - 1,
        };
        let name = self.rows[to].name.clone();
        self.selected = Some(name.clone());
        match &mut self.detail {
            Some(d) if d.name != name => {
                *d = Detail {
                    name: name.clone(),
                    text: None,
                    pending: true,
                };
                Action::FetchDetail(name)
            }
            _ => Action::None,
        }
    }

    /// The detail text of `name` came.
    pub fn detail_text(&mut self, name: &str, text: String) {
        if let Some(d) = self.detail.as_mut().filter(|d| d.name == name) {
            d.text = Some(text);
            d.pending = false;
        }
    }

    /// After a sample: the open detail pane's volume, to fetch again (unless a fetch is under
    /// way).
    pub fn detail_refresh(&mut self) -> Option<String> {
        let d = self.detail.as_mut().filter(|d| !d.pending)?;
        d.pending = true;
        Some(d.name.clone())
    }

    /// The node's totals over the volumes that answered.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            volumes: self.rows.len(),
            ..Totals::default()
        };
        for r in &self.rows {
            match &r.state {
                RowState::NotAnswering(_) => {
                    t.not_answering += 1;
                    t.with_problems += 1;
                }
                RowState::Up { stat, rates } => {
                    if let Some(x) = rates {
                        t.read_iops += x.read_iops;
                        t.write_iops += x.write_iops;
                        t.read_bytes_per_s += x.read_bytes_per_s;
                        t.write_bytes_per_s += x.write_bytes_per_s;
                    }
                    t.dirty_bytes += stat.dirty_bytes;
                    t.ssd_used_bytes += stat.ssd_used_bytes;
                    if let Some((n, b)) = stat.outbox {
                        t.outbox_entries += n;
                        t.outbox_bytes += b;
                    }
                    if !stat.problems.is_empty() {
                        t.with_problems += 1;
                    }
                    if matches!(stat.hydration, Some(Hydration::Percent(_))) {
                        t.hydrating += 1;
                    }
                }
            }
        }
        t
    }
}

/// The node's totals (the header).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub volumes: usize,
    pub not_answering: usize,
    pub with_problems: usize,
    pub hydrating: usize,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub dirty_bytes: u64,
    pub ssd_used_bytes: u64,
    pub outbox_entries: u64,
    pub outbox_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// Formatting: the cells of a row, shared by the screen and `--once`.

/// How a cell is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Normal,
    /// Fine and worth seeing (a healthy state).
    Good,
    /// Look at it (a recovery point getting old, hydration under way).
    Warn,
    /// Wrong (errors, fenced, not answering, a recovery point far too old).
    Bad,
    /// No data.
    Dim,
}

/// A column: header, width on screen, right-aligned.
pub struct Column {
    pub header: &'static str,
    pub width: u16,
    pub right: bool,
}

/// The columns, in order; the last (STATE) takes the rest of the width.
pub const COLUMNS: [Column; 14] = [
    col("NAME", 16, false),
    col("DEVICE", 12, false),
    col("RD/s", 8, true),
    col("WR/s", 8, true),
    col("RD MiB/s", 8, true),
    col("WR MiB/s", 8, true),
    col("LAT ms r/w", 11, true),
    col("DIRTY", 7, true),
    col("SSD", 11, true),
    col("EPOCH", 7, true),
    col("RPO", 8, true),
    col("OUTBOX", 10, true),
    col("HYDR", 6, true),
    col("STATE", 20, false),
];

const fn col(header: &'static str, width: u16, right: bool) -> Column {
    Column {
        header,
        width,
        right,
    }
}

/// Bytes in a few characters, binary units: `512B`, `4.0K`, `96M`, `1.5G`.
pub fn short_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    if b < 1024 {
        return format!("{b}B");
    }
    let (mut v, mut i) = (b as f64, 0);
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if v < 9.95 {
        format!("{v:.1}{}", UNITS[i])
    } else {
        format!("{v:.0}{}", UNITS[i])
    }
}

/// An age in a few characters: `4.2s`, `3m12s`, `2h05m`, `3d04h`.
pub fn short_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{:.1}s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// How worrying a recovery point of this age is: warn past twice the flush interval (at least
/// 30 s), bad past four times it (at least 60 s). The flush interval is when the next snapshot
/// is due; one more interval covers a slow flush or ship.
pub fn rpo_level(age_ms: u64, flush_interval_ms: u64) -> Level {
    let i = if flush_interval_ms == 0 {
        crate::volume::FLUSH_INTERVAL_MS_DEFAULT
    } else {
        flush_interval_ms
    };
    if age_ms > (4 * i).max(60_000) {
        Level::Bad
    } else if age_ms > (2 * i).max(30_000) {
        Level::Warn
    } else {
        Level::Normal
    }
}

/// One cell: its text and how to show it.
pub type Cell = (String, Level);

/// The cells of a row, one per [`COLUMNS`] entry.
pub fn cells(r: &Row) -> Vec<Cell> {
    let n = |s: String| (s, Level::Normal);
    let dash = || ("-".to_string(), Level::Dim);
    let mut c = vec![n(r.name.clone()), n(r.device.clone())];
    match &r.state {
        RowState::NotAnswering(_) => {
            c.extend((2..COLUMNS.len() - 1).map(|_| dash()));
            c.push(("not answering".into(), Level::Bad));
        }
        RowState::Up { stat, rates } => {
            match rates {
                Some(x) => {
                    c.push(n(format!("{:.0}", x.read_iops)));
                    c.push(n(format!("{:.0}", x.write_iops)));
                    c.push(n(format!(
                        "{:.1}",
                        x.read_bytes_per_s / (1u64 << 20) as f64
                    )));
                    c.push(n(format!(
                        "{:.1}",
                        x.write_bytes_per_s / (1u64 << 20) as f64
                    )));
                    let l = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.2}"));
                    if x.read_latency_ms.is_none() && x.write_latency_ms.is_none() {
                        c.push(dash());
                    } else {
                        c.push(n(format!(
                            "{}/{}",
                            l(x.read_latency_ms),
                            l(x.write_latency_ms)
                        )));
                    }
                }
                None => c.extend((0..5).map(|_| dash())),
            }
            c.push(n(short_bytes(stat.dirty_bytes)));
            let ssd = if stat.cache_limit_bytes > 0 {
                let pct = stat.ssd_used_bytes as f64 * 100.0 / stat.cache_limit_bytes as f64;
                let level = if pct >= 90.0 {
                    Level::Bad
                } else if pct >= 50.0 {
                    Level::Warn
                } else {
                    Level::Normal
                };
                (
                    format!("{} {pct:.0}%", short_bytes(stat.ssd_used_bytes)),
                    level,
                )
            } else {
                n(short_bytes(stat.ssd_used_bytes))
            };
            c.push(ssd);
            c.push(n(stat.epoch.to_string()));
            c.push(match stat.rpo {
                Rpo::NoDataPlane => dash(),
                Rpo::NoneYet => ("none yet".into(), Level::Warn),
                Rpo::Cut(t) | Rpo::CommittedAt(t) => {
                    let age = r.unix_ms.saturating_sub(t);
                    let mark = if matches!(stat.rpo, Rpo::CommittedAt(_)) {
                        "<"
                    } else {
                        ""
                    };
                    (
                        format!("{mark}{}", short_age(age)),
                        rpo_level(age, stat.flush_interval_ms),
                    )
                }
            });
            c.push(match stat.outbox {
                None => dash(),
                Some((0, _)) => n("0".into()),
                Some((e, b)) => (format!("{e} {}", short_bytes(b)), Level::Warn),
            });
            c.push(match stat.hydration {
                None => dash(),
                Some(Hydration::Done) => ("done".into(), Level::Good),
                Some(Hydration::Percent(p)) => (format!("{p:.1}%"), Level::Warn),
            });
            c.push(state_cell(&stat.problems));
        }
    }
    c
}

/// The STATE cell: `ok`, or what is wrong (the detail pane has the whole message).
fn state_cell(problems: &[Problem]) -> Cell {
    if problems.is_empty() {
        return ("ok".into(), Level::Good);
    }
    let words: Vec<String> = problems
        .iter()
        .map(|p| match p {
            Problem::Fenced => "FENCED".into(),
            Problem::DurabilityFailed => "SYNC FAILED".into(),
            Problem::FlushError(e) => format!("flush error: {e}"),
            Problem::ShipError(e) => format!("ship error: {e}"),
        })
        .collect();
    (words.join("; "), Level::Bad)
}

/// The header's two lines: what and when, then the node's totals.
pub fn header_lines(m: &Model, host: &str, interval: Duration) -> (String, String) {
    let t = m.totals();
    let when = if m.unix_ms == 0 {
        "collecting ...".to_string()
    } else {
        crate::when::format_time_ms(m.unix_ms)
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string()
            + " UTC"
    };
    let mut first = format!(
        "deltavol top - {host} - {} volume{} - {when} - every {:.1} s",
        t.volumes,
        if t.volumes == 1 { "" } else { "s" },
        interval.as_secs_f64()
    );
    if t.not_answering > 0 {
        first += &format!(" - {} not answering", t.not_answering);
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut second = format!(
        "read {:.0} IOPS {:.1} MiB/s   write {:.0} IOPS {:.1} MiB/s   dirty {}   ssd {}   outbox {} ({})",
        t.read_iops,
        mib(t.read_bytes_per_s),
        t.write_iops,
        mib(t.write_bytes_per_s),
        short_bytes(t.dirty_bytes),
        short_bytes(t.ssd_used_bytes),
        t.outbox_entries,
        short_bytes(t.outbox_bytes)
    );
    if t.hydrating > 0 {
        second += &format!("   hydrating {}", t.hydrating);
    }
    if t.with_problems > 0 {
        second += &format!("   PROBLEMS {}", t.with_problems);
    }
    (first, second)
}

/// The keys, for the footer.
pub const FOOTER: &str = "q/Esc quit   \u{2191}\u{2193} j/k select   Enter/d detail";

/// One plain-text frame (`--once`): the header, the column titles, a line per volume (or the
/// empty node's message).
pub fn plain_frame(m: &Model, host: &str, interval: Duration) -> String {
    let (h1, h2) = header_lines(m, host, interval);
    let mut out = format!("{h1}\n{h2}\n");
    if m.rows.is_empty() {
        out += EMPTY_NODE;
        out.push('\n');
        return out;
    }
    let rows: Vec<Vec<Cell>> = m.rows.iter().map(cells).collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].0.chars().count())
                .chain([c.header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |texts: Vec<&str>| {
        let mut s = String::new();
        for (i, (t, c)) in texts.iter().zip(&COLUMNS).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i == COLUMNS.len() - 1 {
                s.push_str(t);
            } else if c.right {
                s += &format!("{t:>w$}", w = widths[i]);
            } else {
                s += &format!("{t:<w$}", w = widths[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out += &line(COLUMNS.iter().map(|c| c.header).collect());
    for (r, row) in rows.iter().zip(&m.rows) {
        out += &line(r.iter().map(|c| c.0.as_str()).collect());
        if let RowState::NotAnswering(e) = &row.state {
            out += &format!("  {}: {e}\n", row.name);
        }
    }
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this node".into())
}

/// How long a daemon has to answer a status request: the interval, within 200 ms to 2 s.
fn probe_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(200), Duration::from_secs(2))
}

// ---------------------------------------------------------------------------------------------
// Running it.

/// Runs `deltavol top`: the full-screen view, or with `once` one plain-text frame on stdout
/// (two samples `interval_ms` apart, so the rates are real).
pub fn run(interval_ms: u64, once: bool) -> anyhow::Result<()> {
    let interval = Duration::from_millis(interval_ms.max(1));
    let run_dir = control::run_dir();
    let host = hostname();
    if once {
        let mut m = Model::default();
        let first = collect(&run_dir, probe_timeout(interval));
        let any = !first.probes.is_empty();
        m.update(first);
        if any {
            std::thread::sleep(interval);
            m.update(collect(&run_dir, probe_timeout(interval)));
        }
        print!("{}", plain_frame(&m, &host, interval));
        return Ok(());
    }
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("deltavol top needs a terminal on stdout; `deltavol top --once` prints one frame for scripts");
    }
    tui::run(&run_dir, &host, interval)
}

/// What the worker threads send the screen.
enum Msg {
    Sample(Sample),
    Detail(String, String),
}

/// `deltavol status NAME` of this binary: the detail pane's text.
fn status_text(name: &str) -> String {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return format!("cannot find this program to run `deltavol status`: {e}"),
    };
    match std::process::Command::new(exe)
        .args(["status", name])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!(
            "deltavol status {name}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run `deltavol status {name}`: {e}"),
    }
}

/// Set by SIGTERM and SIGINT: the loop ends and the terminal is restored.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        // The terminal is gone (its window or tmux session closed): there is nothing to
        // restore, and crossterm's poll would spin on the dead tty, reading end-of-file
        // forever without returning. Leave at once.
        // SAFETY: _exit is async-signal-safe and ends the process without running anything.
        unsafe { libc::_exit(128 + libc::SIGHUP) };
    }
    STOP.store(true, Ordering::SeqCst);
}

mod tui {
    use super::*;
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::{cursor, execute, terminal};
    use ratatui::backend::CrosstermBackend;
    use ratatui::layout::{Constraint, Layout, Rect};
    use ratatui::style::{Color, Modifier, Style};
    use ratatui::text::{Line, Span, Text};
    use ratatui::widgets::{
        Block, Borders, HighlightSpacing, Paragraph, Row as TRow, Table, TableState, Wrap,
    };
    use ratatui::{Frame, Terminal};

    /// Whether the terminal is in the view's modes (raw, alternate screen, cursor hidden).
    static ACTIVE: AtomicBool = AtomicBool::new(false);

    /// Puts the terminal back: raw mode off, main screen, cursor shown; once (after a panic
    /// both the hook and the unwinding guard come here, and leaving the alternate screen a
    /// second time would move the cursor back over the panic's message). Errors are ignored
    /// (the terminal may be gone).
    fn restore() {
        if !ACTIVE.swap(false, Ordering::SeqCst) {
            return;
        }
        let _ = terminal::disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }

    /// Restores the terminal when dropped (any return, an error, an unwinding panic).
    struct Guard;

    impl Drop for Guard {
        fn drop(&mut self) {
            restore();
        }
    }

    pub(super) fn run(run_dir: &Path, host: &str, interval: Duration) -> anyhow::Result<()> {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: the handler only stores to an atomic (async-signal-safe).
            unsafe {
                libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
            }
        }
        // Before anything changes the terminal: a panic puts it back, then reports.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        ACTIVE.store(true, Ordering::SeqCst);
        let _guard = Guard;
        terminal::enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
        term.clear()?;

        let (tx, rx) = mpsc::channel::<Msg>();
        // The sampler: a sample every interval until the screen goes away.
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        {
            let tx = tx.clone();
            let run_dir = run_dir.to_path_buf();
            std::thread::spawn(move || loop {
                let t0 = Instant::now();
                if tx
                    .send(Msg::Sample(collect(&run_dir, probe_timeout(interval))))
                    .is_err()
                {
                    return;
                }
                let wait = interval.saturating_sub(t0.elapsed());
                if !matches!(
                    stop_rx.recv_timeout(wait),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
            });
        }
        // The detail fetcher: `deltavol status NAME` for each name asked.
        let (detail_tx, detail_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            while let Ok(name) = detail_rx.recv() {
                let text = status_text(&name);
                if tx.send(Msg::Detail(name, text)).is_err() {
                    return;
                }
            }
        });

        let test_panic = std::env::var_os(TEST_PANIC_ENV).is_some();
        let mut m = Model::default();
        let mut dirty = true;
        while !STOP.load(Ordering::SeqCst) {
            if dirty {
                term.draw(|f| draw(f, &m, host, interval))?;
                dirty = false;
            }
            loop {
                match rx.try_recv() {
                    Ok(Msg::Sample(s)) => {
                        m.update(s);
                        if let Some(n) = m.detail_refresh() {
                            let _ = detail_tx.send(n);
                        }
                    }
                    Ok(Msg::Detail(n, t)) => m.detail_text(&n, t),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        anyhow::bail!("deltavol top: the sampling thread stopped")
                    }
                }
                dirty = true;
            }
            // The terminal hung up (its window or tmux session closed): quit. crossterm's
            // poll would spin on the dead tty, reading end-of-file forever.
            if terminal_gone() {
                break;
            }
            if !event::poll(Duration::from_millis(50))? {
                continue;
            }
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let key = match k.code {
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            Key::Quit
                        }
                        KeyCode::Char('q') => Key::Quit,
                        KeyCode::Esc => Key::Back,
                        KeyCode::Up | KeyCode::Char('k') => Key::Up,
                        KeyCode::Down | KeyCode::Char('j') => Key::Down,
                        KeyCode::Home | KeyCode::Char('g') => Key::Home,
                        KeyCode::End | KeyCode::Char('G') => Key::End,
                        KeyCode::Enter | KeyCode::Char('d') => Key::Detail,
                        KeyCode::Char('!') if test_panic => {
                            panic!("deltavol top: test panic ({TEST_PANIC_ENV})")
                        }
                        _ => continue,
                    };
                    match m.key(key) {
                        Action::Quit => break,
                        Action::FetchDetail(n) => {
                            let _ = detail_tx.send(n);
                        }
                        Action::None => {}
                    }
                    dirty = true;
                }
                Event::Resize(..) => {
                    term.autoresize()?;
                    dirty = true;
                }
                _ => {}
            }
        }
        drop(stop_tx);
        Ok(())
    }

    /// Whether standard input's terminal hung up (POLLHUP/POLLERR/POLLNVAL, or end of file).
    fn terminal_gone() -> bool {
        let mut p = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, valid for the call; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    fn style(l: Level) -> Style {
        match l {
            Level::Normal => Style::default(),
            Level::Good => Style::default().fg(Color::Green),
            Level::Warn => Style::default().fg(Color::Yellow),
            Level::Bad => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            Level::Dim => Style::default().fg(Color::DarkGray),
        }
    }

    fn draw(f: &mut Frame, m: &Model, host: &str, interval: Duration) {
        let area = f.area();
        let table_h = (m.rows.len() as u16).max(1) + 3;
        let detail = m.detail.is_some();
        let [head, body, rest, foot] = Layout::vertical([
            Constraint::Length(2),
            if detail {
                Constraint::Length(table_h.min(area.height / 2).max(4))
            } else {
                Constraint::Fill(1)
            },
            Constraint::Length(if detail { area.height } else { 0 }),
            Constraint::Length(1),
        ])
        .areas(area);
        draw_header(f, head, m, host, interval);
        draw_table(f, body, m);
        if let Some(d) = &m.detail {
            let text = d.text.as_deref().unwrap_or("asking the daemon ...");
            let title = format!(" {} (deltavol status {}) ", d.name, d.name);
            f.render_widget(
                Paragraph::new(Text::raw(text))
                    .wrap(Wrap { trim: false })
                    .block(Block::default().borders(Borders::ALL).title(title)),
                rest,
            );
        }
        let keys = if detail {
            format!("{FOOTER}   (Esc/Enter/d close the detail)")
        } else {
            FOOTER.to_string()
        };
        f.render_widget(
            Paragraph::new(Line::from(Span::styled(
                keys,
                Style::default().add_modifier(Modifier::REVERSED),
            ))),
            foot,
        );
    }

    fn draw_header(f: &mut Frame, area: Rect, m: &Model, host: &str, interval: Duration) {
        let (h1, h2) = header_lines(m, host, interval);
        let t = m.totals();
        let second = if t.with_problems > 0 {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        f.render_widget(
            Paragraph::new(vec![
                Line::from(Span::styled(
                    h1,
                    Style::default().add_modifier(Modifier::BOLD),
                )),
                Line::from(Span::styled(h2, second)),
            ]),
            area,
        );
    }

    fn draw_table(f: &mut Frame, area: Rect, m: &Model) {
        let block = Block::default().borders(Borders::ALL).title(" volumes ");
        if m.rows.is_empty() {
            let msg = if m.samples == 0 {
                "collecting ..."
            } else {
                EMPTY_NODE
            };
            f.render_widget(Paragraph::new(msg).block(block), area);
            return;
        }
        let align = |text: String, c: &Column| {
            if c.right {
                Line::from(text).right_aligned()
            } else {
                Line::from(text)
            }
        };
        let header = TRow::new(COLUMNS.iter().map(|c| align(c.header.to_string(), c)))
            .style(Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
        let rows: Vec<TRow> = m
            .rows
            .iter()
            .map(|r| {
                TRow::new(
                    cells(r)
                        .into_iter()
                        .zip(&COLUMNS)
                        .map(|((t, l), c)| align(t, c).style(style(l))),
                )
            })
            .collect();
        let widths = COLUMNS.iter().enumerate().map(|(i, c)| {
            if i == COLUMNS.len() - 1 {
                Constraint::Fill(1)
            } else {
                Constraint::Length(c.width)
            }
        });
        let table = Table::new(rows, widths)
            .header(header)
            .block(block)
            .column_spacing(1)
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
            .highlight_symbol("> ")
            .highlight_spacing(HighlightSpacing::Always);
        let mut state = TableState::default().with_selected(m.selected_index());
        f.render_stateful_widget(table, area, &mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(reads: u64, writes: u64, rb: u64, wb: u64) -> Value {
        json!({
            "name": "v", "reads": reads, "writes": writes, "read_bytes": rb, "write_bytes": wb,
            "dirty_bytes": 12 << 20, "ssd_used_bytes": 24 << 20, "cache_limit_bytes": 2u64 << 30,
            "epoch": 42, "flushed_epoch": 41, "flush_interval_ms": 15000,
            "flush": {"last": null, "last_error": null, "failed_attempts": 0},
            "shipping": null, "hydration": null
        })
    }

    fn probe(name: &str, pid: u32, at: Instant, answer: Result<Value, String>) -> Probe {
        Probe {
            name: name.into(),
            device: format!("/dev/ublkb-{name}"),
            pid,
            at,
            unix_ms: 1_000_000,
            answer,
        }
    }

    fn sample(probes: Vec<Probe>) -> Sample {
        Sample {
            unix_ms: 1_000_000,
            probes,
        }
    }

    fn rates(m: &Model, name: &str) -> Option<Rates> {
        match &m.rows.iter().find(|r| r.name == name)?.state {
            RowState::Up { rates, .. } => *rates,
            RowState::NotAnswering(_) => None,
        }
    }

    #[test]
    fn rates_are_counter_deltas_over_the_time_between_answers() {
        let a = Counters {
            reads: 100,
            writes: 10,
            read_bytes: 1 << 20,
            write_bytes: 0,
            ..Counters::default()
        };
        let b = Counters {
            reads: 600,
            writes: 260,
            read_bytes: 3 << 20,
            write_bytes: 1 << 20,
            ..Counters::default()
        };
        let r = Rates::between(&a, &b, Duration::from_millis(500)).unwrap();
        assert_eq!(r.read_iops, 1000.0);
        assert_eq!(r.write_iops, 500.0);
        assert_eq!(r.read_bytes_per_s, (4 << 20) as f64);
        assert_eq!(r.write_bytes_per_s, (2 << 20) as f64);
        assert_eq!((r.read_latency_ms, r.write_latency_ms), (None, None));
        // No time, or counters that went back (a restarted daemon): no rates.
        assert!(Rates::between(&a, &b, Duration::ZERO).is_none());
        assert!(Rates::between(&b, &a, Duration::from_secs(1)).is_none());
    }

    #[test]
    fn latency_is_the_mean_over_the_interval_when_the_status_has_it() {
        let mut v1 = status(0, 0, 0, 0);
        v1["io_latency"] = json!({"read": {"count": 10, "sum_ns": 1_000_000}});
        let mut v2 = status(110, 0, 0, 0);
        v2["io_latency"] = json!({"read": {"count": 110, "sum_ns": 26_000_000}});
        let (a, b) = (VolStat::from_status(&v1), VolStat::from_status(&v2));
        let r = Rates::between(&a.counters, &b.counters, Duration::from_secs(1)).unwrap();
        assert_eq!(r.read_latency_ms, Some(0.25));
        assert_eq!(r.write_latency_ms, None);
        // Today's status has none: the column says "-".
        let row = Row {
            name: "v".into(),
            device: "/dev/ublkb0".into(),
            pid: 1,
            unix_ms: 0,
            state: RowState::Up {
                stat: Box::new(VolStat::from_status(&status(0, 0, 0, 0))),
                rates: Some(Rates::default()),
            },
        };
        assert_eq!(cells(&row)[6], ("-".into(), Level::Dim));
    }

    #[test]
    fn model_rates_follow_each_volume_and_start_over_for_a_new_daemon() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(200);
        let t2 = t1 + Duration::from_millis(400);
        let mut m = Model::default();
        m.update(sample(vec![probe("a", 1, t0, Ok(status(0, 0, 0, 0)))]));
        assert_eq!(rates(&m, "a"), None, "one answer: no rate yet");
        m.update(sample(vec![
            probe("a", 1, t1, Ok(status(300, 50, 3 << 20, 1 << 20))),
            probe("b", 2, t1, Ok(status(5, 5, 5, 5))),
        ]));
        let r = rates(&m, "a").unwrap();
        assert_eq!((r.read_iops, r.write_iops), (1500.0, 250.0));
        assert_eq!(r.read_bytes_per_s, (15 << 20) as f64);
        assert_eq!(rates(&m, "b"), None, "b appeared: no rate yet");
        // a silent once: its last answer stays the base; b restarted (another pid).
        m.update(sample(vec![
            probe("a", 1, t1, Err("no answer within 0.2 s".into())),
            probe("b", 3, t1, Ok(status(9, 9, 9, 9))),
        ]));
        assert!(matches!(m.rows[0].state, RowState::NotAnswering(_)));
        assert_eq!(rates(&m, "b"), None, "new daemon, counters from 0");
        m.update(sample(vec![
            probe("a", 1, t2, Ok(status(700, 50, 3 << 20, 1 << 20))),
            probe("b", 3, t2, Ok(status(9, 9, 9, 9))),
        ]));
        assert_eq!(rates(&m, "a").unwrap().read_iops, 400.0 / 0.4);
        assert_eq!(rates(&m, "b").unwrap().read_iops, 0.0);
    }

    #[test]
    fn selection_stays_on_its_volume_while_others_come_and_go() {
        let t = Instant::now();
        let up = |n: &str| probe(n, 1, t, Ok(status(0, 0, 0, 0)));
        let mut m = Model::default();
        assert_eq!(m.key(Key::Down), Action::None, "empty: nothing to select");
        assert_eq!(m.key(Key::Detail), Action::None);
        m.update(sample(vec![up("b"), up("a"), up("c")]));
        assert_eq!(
            m.rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(m.selected_name(), Some("a"), "the first row is selected");
        m.key(Key::Down);
        m.key(Key::Down);
        m.key(Key::Down);
        assert_eq!(m.selected_name(), Some("c"), "stops at the last");
        m.key(Key::Up);
        assert_eq!(m.selected_name(), Some("b"));
        // "0" appears before b: the selection stays on b.
        m.update(sample(vec![up("0"), up("a"), up("b"), up("c")]));
        assert_eq!(
            (m.selected_name(), m.selected_index()),
            (Some("b"), Some(2))
        );
        // b goes: the row now at its place.
        m.update(sample(vec![up("0"), up("a"), up("c")]));
        assert_eq!(m.selected_name(), Some("c"));
        m.update(sample(vec![up("0")]));
        assert_eq!(m.selected_name(), Some("0"));
        m.update(sample(vec![]));
        assert_eq!(m.selected_name(), None);
        m.update(sample(vec![up("x")]));
        assert_eq!(m.selected_name(), Some("x"));
        m.key(Key::End);
        m.key(Key::Home);
        assert_eq!(m.selected_name(), Some("x"));
    }

    #[test]
    fn keys_open_close_and_follow_the_detail_pane() {
        let t = Instant::now();
        let up = |n: &str| probe(n, 1, t, Ok(status(0, 0, 0, 0)));
        let mut m = Model::default();
        m.update(sample(vec![up("a"), up("b")]));
        assert_eq!(m.key(Key::Detail), Action::FetchDetail("a".into()));
        assert_eq!(m.detail_refresh(), None, "a fetch is under way");
        m.detail_text("a", "volume: a".into());
        assert_eq!(
            m.detail.as_ref().unwrap().text.as_deref(),
            Some("volume: a")
        );
        assert_eq!(
            m.detail_refresh(),
            Some("a".into()),
            "refreshed with samples"
        );
        // Moving the selection moves the pane; a late answer for a is dropped.
        assert_eq!(m.key(Key::Down), Action::FetchDetail("b".into()));
        m.detail_text("a", "late".into());
        assert_eq!(m.detail.as_ref().unwrap().text, None);
        assert_eq!(m.key(Key::Down), Action::None, "already on b");
        // Esc closes the pane, then quits; Enter toggles; q quits at once.
        assert_eq!(m.key(Key::Back), Action::None);
        assert!(m.detail.is_none());
        assert_eq!(m.key(Key::Detail), Action::FetchDetail("b".into()));
        assert_eq!(m.key(Key::Detail), Action::None);
        assert!(m.detail.is_none());
        assert_eq!(m.key(Key::Back), Action::Quit);
        m.key(Key::Detail);
        assert_eq!(m.key(Key::Quit), Action::Quit);
        // The pane's volume goes away: the pane closes.
        m.update(sample(vec![up("a")]));
        assert!(m.detail.is_none());
    }

    #[test]
    fn formats_fit_their_columns() {
        assert_eq!(short_bytes(0), "0B");
        assert_eq!(short_bytes(1023), "1023B");
        assert_eq!(short_bytes(4096), "4.0K");
        assert_eq!(short_bytes(12 << 20), "12M");
        assert_eq!(short_bytes(3 << 29), "1.5G");
        assert_eq!(short_bytes(u64::MAX), "16384P");
        assert_eq!(short_age(0), "0.0s");
        assert_eq!(short_age(5_049), "5.0s");
        assert_eq!(short_age(600_000), "10m00s");
        assert_eq!(short_age(7_500_000), "2h05m");
        assert_eq!(short_age(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(rpo_level(20_000, 15_000), Level::Normal);
        assert_eq!(rpo_level(31_000, 15_000), Level::Warn);
        assert_eq!(rpo_level(61_000, 15_000), Level::Bad);
        assert_eq!(rpo_level(5_000, 500), Level::Normal, "at least 30 s");
        assert_eq!(rpo_level(300_000, 120_000), Level::Warn);
        assert_eq!(rpo_level(500_000, 120_000), Level::Bad);
    }

    #[test]
    fn cells_say_rpo_outbox_hydration_and_problems() {
        let mut v = status(0, 0, 0, 0);
        v["shipping"] = json!({
            "last_committed": 41, "last_committed_unix_ms": 999_000,
            "last_committed_cut_unix_ms": 995_000, "outbox_entries": 3,
            "outbox_bytes": 96u64 << 20, "fenced": false, "last_error": null
        });
        v["hydration"] = json!({"done": false, "percent": 42.46});
        let row = |v: &Value, rates| Row {
            name: "db1".into(),
            device: "/dev/ublkb0".into(),
            pid: 1,
            unix_ms: 1_000_000,
            state: RowState::Up {
                stat: Box::new(VolStat::from_status(v)),
                rates,
            },
        };
        let r = Rates {
            read_iops: 1000.0,
            write_iops: 250.4,
            read_bytes_per_s: (4 << 20) as f64,
            write_bytes_per_s: (1 << 19) as f64,
            ..Rates::default()
        };
        let c = cells(&row(&v, Some(r)));
        let texts: Vec<&str> = c.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            texts,
            [
                "db1",
                "/dev/ublkb0",
                "1000",
                "250",
                "4.0",
                "0.5",
                "-",
                "12M",
                "24M 1%",
                "42",
                "5.0s",
                "3 96M",
                "42.5%",
                "ok"
            ]
        );
        assert_eq!(c.len(), COLUMNS.len());
        assert_eq!(c[10].1, Level::Normal);
        // Cut time unknown: "<" the commit's age; fenced and a ship error are red.
        v["shipping"]["last_committed_cut_unix_ms"] = Value::Null;
        v["shipping"]["fenced"] = json!(true);
        v["shipping"]["last_error"] = json!("fenced: generation 3");
        v["hydration"] = json!({"done": true, "percent": 100.0});
        v["flush"]["last_error"] = json!("ENOSPC");
        let c = cells(&row(&v, None));
        assert_eq!(c[2], ("-".into(), Level::Dim), "no rate yet");
        assert_eq!(c[10].0, "<1.0s");
        assert_eq!(c[12], ("done".into(), Level::Good));
        assert_eq!(
            c[13],
            (
                "FENCED; flush error: ENOSPC; ship error: fenced: generation 3".into(),
                Level::Bad
            )
        );
        // No data plane: "-" for the recovery point and the outbox; nothing committed yet.
        let c = cells(&row(&status(0, 0, 0, 0), None));
        assert_eq!((c[10].0.as_str(), c[11].0.as_str()), ("-", "-"));
        v["shipping"] = json!({"head": 0, "outbox_entries": 0, "outbox_bytes": 0});
        assert_eq!(cells(&row(&v, None))[10], ("none yet".into(), Level::Warn));
        // Old recovery point: red.
        v["shipping"]["last_committed_cut_unix_ms"] = json!(1_000_000u64 - 600_000);
        assert_eq!(cells(&row(&v, None))[10], ("10m00s".into(), Level::Bad));
        // A daemon that does not answer.
        let down = Row {
            state: RowState::NotAnswering("no answer".into()),
            ..row(&v, None)
        };
        let c = cells(&down);
        assert_eq!(c.len(), COLUMNS.len());
        assert_eq!(c[13], ("not answering".into(), Level::Bad));
    }

    #[test]
    fn plain_frame_has_the_totals_a_line_per_volume_and_the_empty_node() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut m = Model::default();
        m.update(sample(vec![]));
        let f = plain_frame(&m, "node1", Duration::from_secs(1));
        assert!(f.contains("deltavol top - node1 - 0 volumes"), "{f}");
        assert!(f.ends_with(&format!("{EMPTY_NODE}\n")), "{f}");
        m.update(sample(vec![
            probe("a", 1, t0, Ok(status(0, 0, 0, 0))),
            probe("b", 2, t0, Ok(status(0, 0, 0, 0))),
        ]));
        m.update(sample(vec![
            probe("a", 1, t1, Ok(status(100, 10, 1 << 20, 0))),
            probe("b", 2, t1, Ok(status(50, 0, 1 << 20, 0))),
            probe("c", 3, t1, Err("connection refused".into())),
        ]));
        let f = plain_frame(&m, "node1", Duration::from_secs(1));
        let lines: Vec<&str> = f.lines().collect();
        assert!(lines[0].contains("3 volumes") && lines[0].contains("1 not answering"));
        assert!(
            lines[1].starts_with("read 150 IOPS 2.0 MiB/s   write 10 IOPS 0.0 MiB/s"),
            "{f}"
        );
        assert!(lines[1].contains("PROBLEMS 1"), "{f}");
        assert!(
            lines[2].starts_with("NAME") && lines[2].ends_with("STATE"),
            "{f}"
        );
        let a: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(&a[..4], ["a", "/dev/ublkb-a", "100", "10"], "{f}");
        assert!(lines[5].starts_with("c ") && lines[5].ends_with("not answering"));
        assert_eq!(lines[6], "  c: connection refused");
    }

    #[test]
    fn not_answering_says_why() {
        let t = Duration::from_millis(500);
        assert_eq!(
            not_answering_reason("Resource temporarily unavailable (os error 11)", t),
            "no answer within 0.5 s"
        );
        assert_eq!(
            not_answering_reason("cannot reach the daemon at /x: refused", t),
            "cannot reach the daemon at /x: refused"
        );
    }

    #[test]
    fn collect_finds_live_daemons_and_tolerates_silent_ones() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let info = |name: &str, pid: u32| control::RunInfo {
            version: control::RUN_INFO_VERSION,
            name: name.into(),
            pid,
            dev_id: 0,
            device: "/dev/ublkb0".into(),
            cache_dir: "/c".into(),
            backing: "/b".into(),
            socket: dir.path().join(format!("{name}.sock")),
            queues: 1,
            depth: 64,
            flush_interval_ms: 1000,
            started_unix_ms: 0,
        };
        let write = |i: &control::RunInfo| {
            std::fs::write(
                dir.path().join(format!("{}.json", i.name)),
                serde_json::to_vec(i).unwrap(),
            )
            .unwrap()
        };
        // Alive and answering; alive and silent (listening, never answering); no socket;
        // a dead pid (left out); a stray file.
        let me = std::process::id();
        for n in ["ok", "silent", "nosock"] {
            write(&info(n, me));
        }
        write(&info("dead", u32::MAX / 2));
        std::fs::write(dir.path().join("junk.json"), b"{").unwrap();
        let ok = UnixListener::bind(dir.path().join("ok.sock")).unwrap();
        let _silent = UnixListener::bind(dir.path().join("silent.sock")).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = ok.accept().unwrap();
            assert!(matches!(control::read_request(&mut s), Ok(Request::Status)));
            control::write_response(&mut s, &status(7, 0, 0, 0));
        });
        let t0 = Instant::now();
        let s = collect(dir.path(), Duration::from_millis(300));
        assert!(t0.elapsed() < Duration::from_secs(2), "probes run together");
        server.join().unwrap();
        let names: Vec<&str> = s.probes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["nosock", "ok", "silent"]);
        assert!(s.probes[0]
            .answer
            .as_ref()
            .unwrap_err()
            .contains("cannot reach"));
        assert_eq!(s.probes[1].answer.as_ref().unwrap()["reads"], 7);
        assert_eq!(
            s.probes[2].answer.as_ref().unwrap_err(),
            "no answer within 0.3 s"
        );
        assert!(
            collect(&dir.path().join("missing"), Duration::from_millis(100))
                .probes
                .is_empty()
        );
    }
}
