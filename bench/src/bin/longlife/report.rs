//! Results: the machine, the parameters, and per store what was stored against what was
//! needed, commit latency early and late, load time and the checks, as JSON and as a
//! markdown table.

use serde::Serialize;

/// The machine and the moment.
pub use crate::machine::Machine;
use crate::stats::{median, percentile};
use crate::stored::Stored;

/// What the bench was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub snapshots: u64,
    pub volume_size_bytes: u64,
    pub block_size: u32,
    pub writes_per_snapshot: u32,
    pub max_extent_blocks: u32,
    /// Simulated time between two snapshots' cuts.
    pub interval_ms: u64,
    pub retention: String,
    pub seed: u64,
    pub settle_secs: u64,
    pub settle_timeout_secs: u64,
    pub verify_blocks: usize,
    pub dp_threads: usize,
    pub server_args: Vec<String>,
    pub stores: Vec<String>,
    /// The store was left to settle before each latency window (`--no-quiesce`: not).
    pub quiesce_before_windows: bool,
}

/// Commit latency over a window of snapshots (ids `first ..= last`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub first_snap: u64,
    pub last_snap: u64,
    pub median_ms: f64,
    /// Nearest rank: of 20 samples, the largest.
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Snapshots 91 ..= 110 (around snapshot 100).
    pub early: Window,
    /// The last 20 snapshots.
    pub late: Window,
    /// late / early, medians.
    pub ratio_median: f64,
    pub ratio_p99: f64,
    /// All snapshots.
    pub all_median_ms: f64,
    pub all_p99_ms: f64,
    pub all_max_ms: f64,
}

/// A progress point, every ~5 % of the snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub snapshots: u64,
    pub elapsed_s: f64,
    /// Over the snapshots since the previous point.
    pub commits_per_s: f64,
    pub median_commit_ms: f64,
    pub stored_bytes: u64,
    pub snapshot_count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settle {
    pub settled: bool,
    /// From the last commit until the last change seen (0: none).
    pub last_change_s: f64,
    /// From the last commit until the store had been unchanged for `settle_secs` (or the
    /// timeout).
    pub waited_s: f64,
    /// Stored bytes (all kinds) at the last commit.
    pub stored_bytes_at_last_commit: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// SIGTERM until the old server exited.
    pub stop_s: f64,
    /// Spawn until the `listening on` line.
    pub listening_s: f64,
    /// Spawn until a client connected to the volume and listed its snapshots.
    pub ready_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verify {
    /// Retained snapshots read back (oldest, newest and random ones).
    pub snapshots: Vec<u64>,
    pub blocks_read: u64,
    /// Of them, blocks from each snapshot's own delta (written since the retained one before).
    pub delta_blocks_read: u64,
    /// After the restart: the oldest and newest retained snapshots again.
    pub blocks_read_after_restart: u64,
    pub mismatches: u64,
}

/// One store's run.
#[derive(Debug, Clone, Serialize)]
pub struct StoreResult {
    pub store: String,
    pub server_command: Vec<String>,
    pub snapshots: u64,
    /// Data bytes shipped (every snapshot's blocks).
    pub shipped_bytes: u64,
    /// Time spent on the snapshots: generating their data, begin, extents, commit (the
    /// progress measurements left out).
    pub ship_wall_s: f64,
    /// Snapshots / `ship_wall_s`.
    pub commits_per_s: f64,
    pub settle: Settle,
    /// After settling.
    pub stored: Stored,
    pub stored_total_bytes: u64,
    /// After the restart (what a fresh server left once it loaded the volume).
    pub stored_after_restart: Stored,
    /// Live data plus the retained deltas: the minimum a chain of deltas keeps.
    pub needed_bytes: u64,
    /// Of it, the blocks ever written (the head's content, zero blocks aside).
    pub live_bytes: u64,
    /// Stored segment bytes / needed bytes (goal ≤ 1.2×).
    pub ratio_segments: f64,
    /// Every stored byte (manifests and anything else included) / needed bytes.
    pub ratio_total: f64,
    pub retained_count: u64,
    pub retained: Vec<u64>,
    /// What the retention policy keeps of the whole chain (`retention::select`), for
    /// comparison.
    pub retained_expected_count: u64,
    pub retained_matches_policy: bool,
    /// Blocks of each retained snapshot's delta, in the order of `retained`.
    pub needed_blocks_per_retained: Vec<u64>,
    pub latency: Latency,
    pub load: Load,
    pub verify: Verify,
    pub progress: Vec<Progress>,
    /// Seconds the store took to settle before each latency window (none with --no-quiesce).
    pub quiesce_waits_s: Vec<f64>,
    /// Commit latency of every snapshot (begin until the commit is acknowledged), ms; index
    /// `i` is snapshot `i + 1`.
    pub commit_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub command: Vec<String>,
    pub machine: Machine,
    pub params: Params,
    pub quick: bool,
    pub stores: Vec<StoreResult>,
}

/// The window of snapshots `first ..= last` (1-based ids) of `commit_ms`.
pub fn window(commit_ms: &[f64], first: u64, last: u64) -> Window {
    let xs = &commit_ms[(first - 1) as usize..last as usize];
    Window {
        first_snap: first,
        last_snap: last,
        median_ms: median(xs),
        p99_ms: percentile(xs, 99.0),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The results as a markdown table, one column per store.
pub fn table(r: &Report) -> String {
    let s = &r.stores;
    let mut t = String::from("| |");
    for x in s {
        t.push_str(&format!(" {} |", x.store));
    }
    t.push_str("\n| --- |");
    t.push_str(&" ---: |".repeat(s.len()));
    t.push('\n');
    let mut row = |name: &str, f: &dyn Fn(&StoreResult) -> String| {
        t.push_str(&format!("| {name} |"));
        for x in s {
            t.push_str(&format!(" {} |", f(x)));
        }
        t.push('\n');
    };
    row("snapshots shipped", &|x| x.snapshots.to_string());
    row("data shipped", &|x| mib(x.shipped_bytes));
    row("commits/s", &|x| format!("{:.1}", x.commits_per_s));
    row("retained snapshots", &|x| {
        format!(
            "{} (policy: {})",
            x.retained_count, x.retained_expected_count
        )
    });
    row("stored: segments", &|x| {
        format!(
            "{} in {}",
            mib(x.stored.segment_bytes),
            x.stored.segment_count
        )
    });
    row("stored: manifests", &|x| {
        format!(
            "{} in {}",
            mib(x.stored.manifest_bytes),
            x.stored.manifest_count
        )
    });
    row("stored: other", &|x| {
        format!("{} in {}", mib(x.stored.other_bytes), x.stored.other_count)
    });
    row("needed (live + retained deltas)", &|x| {
        format!("{} (live {})", mib(x.needed_bytes), mib(x.live_bytes))
    });
    row("**segments / needed** (goal ≤ 1.2×)", &|x| {
        format!("**{:.2}×**", x.ratio_segments)
    });
    row("all stored / needed", &|x| format!("{:.2}×", x.ratio_total));
    row("settled", &|x| {
        format!(
            "{}, last change after {:.0} s",
            if x.settle.settled { "yes" } else { "**no**" },
            x.settle.last_change_s
        )
    });
    row("commit, snapshots 91–110: median / p99", &|x| {
        let w = x.latency.early;
        format!("{:.1} / {:.1} ms", w.median_ms, w.p99_ms)
    });
    row("commit, last 20: median / p99", &|x| {
        let w = x.latency.late;
        format!("{:.1} / {:.1} ms", w.median_ms, w.p99_ms)
    });
    row("**last 20 / 91–110** (median; p99)", &|x| {
        format!(
            "**{:.2}×**; {:.2}×",
            x.latency.ratio_median, x.latency.ratio_p99
        )
    });
    row("store settled before the windows", &|x| {
        if x.quiesce_waits_s.is_empty() {
            "not waited for (--no-quiesce)".to_string()
        } else {
            let w: Vec<String> = x
                .quiesce_waits_s
                .iter()
                .map(|w| format!("{w:.1} s"))
                .collect();
            format!("after {}", w.join(", "))
        }
    });
    row("load: spawn → listening", &|x| {
        format!("{:.3} s", x.load.listening_s)
    });
    row("**load: spawn → connect + list**", &|x| {
        format!("**{:.3} s**", x.load.ready_s)
    });
    row("blocks verified (snapshots)", &|x| {
        format!(
            "{} + {} after restart ({}), {} mismatches",
            x.verify.blocks_read,
            x.verify.blocks_read_after_restart,
            x.verify.snapshots.len(),
            x.verify.mismatches
        )
    });
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let xs: Vec<f64> = (1..=200).map(f64::from).collect();
        let w = window(&xs, 91, 110);
        assert_eq!((w.first_snap, w.last_snap), (91, 110));
        assert_eq!(w.median_ms, 100.5);
        assert_eq!(w.p99_ms, 110.0);
    }
}
