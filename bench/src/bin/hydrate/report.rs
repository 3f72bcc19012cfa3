//! Results: the machine, the runs, medians, percentiles and the ratio, as JSON and as a
//! markdown table. ([`Machine`] is the ingest bench's.)

use serde::Serialize;

/// The machine and the moment.
pub use crate::machine::Machine;
use crate::stats::{median, percentile};

/// A latency phase: a fresh recovered volume with background hydration held back, its open
/// and its reads of blocks that were not local.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRun {
    /// `held-back` (background hydration at 1 byte/s) or `full-speed` (unlimited).
    pub mode: String,
    /// The background hydration limit of the phase (0 = unlimited).
    pub hydrate_rate_bytes_per_s: u64,
    pub repeat: usize,
    /// `Volume::open` of the recovered volume.
    pub open_ms: f64,
    /// The volume's first read (a 4k block not yet local).
    pub first_read_us: f64,
    /// Every read, in order (the first one included).
    pub reads_us: Vec<f64>,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Extents the fetcher served on demand (from the volume's status).
    pub fetched_on_demand: u64,
    /// Bytes local when the reads were done (on-demand plus what the held-back background
    /// hydration did meanwhile).
    pub local_bytes_at_end: u64,
}

/// One timed hydration or copy.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `hydrate`, `hydrate-enc`, `hydrate-serial`, `seq-read`, `seq-read-no-ra` or `copy`.
    pub config: String,
    /// 0-based repeat index; runs were interleaved (hydrate, copy, hydrate, ...).
    pub repeat: usize,
    pub bytes: u64,
    pub wall_s: f64,
    /// 10^6 bytes per second.
    pub mb_s: f64,
    /// `hydrate`: the volume's open, included in `wall_s`.
    pub open_ms: Option<f64>,
    /// CPU seconds (user + system) the data-plane server used during the run.
    pub server_cpu_s: Option<f64>,
    /// Blocks compared with the source afterwards.
    pub verified_blocks: u64,
}

/// A working-set phase: a recovered volume reads the source's working set at once.
#[derive(Debug, Clone, Serialize)]
pub struct HotRun {
    /// `hot-set` (the hottest regions hydrated first) or `hot-set-lba` (block order).
    pub mode: String,
    pub repeat: usize,
    pub reads: usize,
    /// Of the reads, those whose block was local when they were issued.
    pub local_share: f64,
    /// From the start of the open until the last read was done.
    pub done_ms: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub fetched_on_demand: u64,
}

/// The working-set phases of one mode together (medians over the phases).
#[derive(Debug, Serialize)]
pub struct HotSummary {
    pub mode: String,
    pub phases: usize,
    pub local_share_median: f64,
    pub done_ms_median: f64,
    pub read_us_median: f64,
    pub read_us_p99_median: f64,
    pub fetched_on_demand_median: f64,
}

pub fn summarise_hot(modes: &[&str], runs: &[HotRun]) -> Vec<HotSummary> {
    modes
        .iter()
        .map(|m| {
            let rs: Vec<&HotRun> = runs.iter().filter(|r| r.mode == *m).collect();
            let med =
                |f: &dyn Fn(&HotRun) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            HotSummary {
                mode: (*m).to_string(),
                phases: rs.len(),
                local_share_median: med(&|r| r.local_share),
                done_ms_median: med(&|r| r.done_ms),
                read_us_median: med(&|r| r.median_us),
                read_us_p99_median: med(&|r| r.p99_us),
                fetched_on_demand_median: med(&|r| r.fetched_on_demand as f64),
            }
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub config: String,
    pub mb_s_median: f64,
    pub mb_s_min: f64,
    pub mb_s_max: f64,
    pub runs: usize,
    pub ratio_vs_copy: f64,
}

/// The latency phases of one mode together.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    pub mode: String,
    pub phases: usize,
    /// Medians over the latency phases.
    pub open_ms_median: f64,
    pub first_read_us_median: f64,
    /// Open plus first read.
    pub time_to_usable_ms_median: f64,
    /// Every read of every phase, pooled.
    pub reads: usize,
    pub read_us_median: f64,
    pub read_us_p99: f64,
    pub read_us_max: f64,
}

#[derive(Debug, Serialize)]
pub struct Params {
    pub size_bytes: u64,
    pub fill_percent: u8,
    pub extent_bytes: usize,
    pub reads_per_phase: usize,
    pub repeats: usize,
    pub dataplane_threads: usize,
    /// Page cache of the source side (data-plane data, source backing file) dropped before
    /// every timed run.
    pub cold_source: bool,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub command: Vec<String>,
    pub machine: Machine,
    pub params: Params,
    pub quick: bool,
    pub source: crate::volume::Source,
    /// `--encrypt`: the encrypted source (same data, sealed client-side).
    pub source_encrypted: Option<crate::volume::Source>,
    pub latency: Vec<LatencySummary>,
    pub summaries: Vec<Summary>,
    /// Hydration over the copy (medians).
    pub ratio_hydrate_vs_copy: f64,
    /// `--encrypt`: hydration of the encrypted source over the plain one (medians).
    pub ratio_encrypted_vs_plain: Option<f64>,
    /// Hydration with batches pipelined (the default) over one batch at a time (medians).
    pub ratio_pipelined_vs_serial: f64,
    /// Sequential reads of blocks not yet local with readahead over without (medians).
    pub ratio_readahead: f64,
    /// The working-set phases (heat map), by mode.
    pub hot: Vec<HotSummary>,
    pub hot_runs: Vec<HotRun>,
    pub latency_runs: Vec<LatencyRun>,
    pub runs: Vec<Run>,
}

pub fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NAN, f64::max)
}

/// Summaries of `configs` (the last is the baseline), in that order.
pub fn summarise(configs: &[&str], runs: &[Run]) -> Vec<Summary> {
    let mut out: Vec<Summary> = configs
        .iter()
        .map(|c| {
            let xs: Vec<f64> = runs
                .iter()
                .filter(|r| r.config == *c)
                .map(|r| r.mb_s)
                .collect();
            Summary {
                config: (*c).to_string(),
                mb_s_median: median(&xs),
                mb_s_min: xs.iter().copied().fold(f64::INFINITY, f64::min),
                mb_s_max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                runs: xs.len(),
                ratio_vs_copy: f64::NAN,
            }
        })
        .collect();
    let base = out.last().map_or(f64::NAN, |s| s.mb_s_median);
    for s in &mut out {
        s.ratio_vs_copy = s.mb_s_median / base;
    }
    out
}

/// Summaries of each mode of `modes`, in that order.
pub fn summarise_latency(modes: &[&str], runs: &[LatencyRun]) -> Vec<LatencySummary> {
    modes
        .iter()
        .map(|m| {
            let rs: Vec<LatencyRun> = runs.iter().filter(|r| r.mode == *m).cloned().collect();
            summarise_mode(m, &rs)
        })
        .collect()
}

fn summarise_mode(mode: &str, runs: &[LatencyRun]) -> LatencySummary {
    let all: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.reads_us.iter().copied())
        .collect();
    let open: Vec<f64> = runs.iter().map(|r| r.open_ms).collect();
    let first: Vec<f64> = runs.iter().map(|r| r.first_read_us).collect();
    let usable: Vec<f64> = runs
        .iter()
        .map(|r| r.open_ms + r.first_read_us / 1000.0)
        .collect();
    LatencySummary {
        mode: mode.to_string(),
        phases: runs.len(),
        open_ms_median: median(&open),
        first_read_us_median: median(&first),
        time_to_usable_ms_median: median(&usable),
        reads: all.len(),
        read_us_median: median(&all),
        read_us_p99: percentile(&all, 99.0),
        read_us_max: max(&all),
    }
}

/// The results as markdown.
pub fn table(r: &Report) -> String {
    let mut t = String::from(
        "| config | MB/s (median) | min – max | runs | vs copy |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for s in &r.summaries {
        t.push_str(&format!(
            "| {} | {:.1} | {:.1} – {:.1} | {} | {:.2}× |\n",
            s.config, s.mb_s_median, s.mb_s_min, s.mb_s_max, s.runs, s.ratio_vs_copy
        ));
    }
    if let Some(x) = r.ratio_encrypted_vs_plain {
        t.push_str(&format!("\nhydration, encrypted / plain: {x:.2}×\n"));
    }
    t.push_str(&format!(
        "\nhydration, pipelined / one batch at a time: {:.2}×\n\
         sequential reads of blocks not yet local, readahead / none: {:.2}×\n",
        r.ratio_pipelined_vs_serial, r.ratio_readahead
    ));
    t.push_str(
        "\n| recovered volume reads its working set at once | reads found local | all done after the open | read median | read p99 | extents fetched on demand |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for h in &r.hot {
        t.push_str(&format!(
            "| {} | {:.0}% | {:.0} ms | {:.0} µs | {:.0} µs | {:.0} |\n",
            h.mode,
            h.local_share_median * 100.0,
            h.done_ms_median,
            h.read_us_median,
            h.read_us_p99_median,
            h.fetched_on_demand_median
        ));
    }
    t.push_str(&format!(
        "\nhydration / copy: {:.2}×\n\n\
         | recovered volume, background hydration | `Volume::open` | first read | open + first read | 4k reads not local | median | p99 | max |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        r.ratio_hydrate_vs_copy
    ));
    for l in &r.latency {
        t.push_str(&format!(
            "| {} | {:.1} ms | {:.0} µs | {:.1} ms | {} | {:.0} µs | {:.0} µs | {:.0} µs |\n",
            l.mode,
            l.open_ms_median,
            l.first_read_us_median,
            l.time_to_usable_ms_median,
            l.reads,
            l.read_us_median,
            l.read_us_p99,
            l.read_us_max,
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maximum() {
        let xs: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(max(&xs), 200.0);
    }

    #[test]
    fn ratio_against_the_copy() {
        let run = |c: &str, x| Run {
            config: c.into(),
            repeat: 0,
            bytes: 1,
            wall_s: 1.0,
            mb_s: x,
            open_ms: None,
            server_cpu_s: None,
            verified_blocks: 0,
        };
        let runs = [run("hydrate", 80.0), run("copy", 100.0), run("copy", 120.0)];
        let s = summarise(&["hydrate", "copy"], &runs);
        assert_eq!(s[1].mb_s_median, 110.0);
        assert!((s[0].ratio_vs_copy - 80.0 / 110.0).abs() < 1e-12);
    }
}
