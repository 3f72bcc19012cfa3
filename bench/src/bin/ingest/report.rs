//! Results: the machine, the runs, medians and ratios, as JSON and as a markdown table.

use serde::Serialize;

use crate::stats::median;
use crate::workload::Workload;

/// The machine and the moment.
pub use crate::machine::Machine;

/// One timed run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub config: String,
    /// 0-based repeat index; runs were interleaved across configurations.
    pub repeat: usize,
    pub bytes: u64,
    pub wall_s: f64,
    /// 10^6 bytes per second.
    pub mb_s: f64,
    /// Mean over the clients of the time spent waiting for commits (fsyncs included).
    pub commit_wait_s: f64,
    /// CPU seconds (user + system) the data-plane server used during the run.
    pub server_cpu_s: Option<f64>,
}

/// A configuration's summary.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub config: String,
    pub mb_s_median: f64,
    pub mb_s_min: f64,
    pub mb_s_max: f64,
    pub runs: usize,
    pub ratio_vs_sink: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub command: Vec<String>,
    pub machine: Machine,
    pub workload: Workload,
    pub total_bytes_per_run: u64,
    pub repeats: usize,
    pub quick: bool,
    pub summaries: Vec<Summary>,
    /// The data plane with two threads over one thread (medians), when both ran.
    pub ratio_2_threads_vs_1: Option<f64>,
    /// `--encrypt`: per thread count, the encrypted configuration over the plain one (medians).
    pub encrypted_vs_plain: Vec<EncryptedRatio>,
    /// `--tls`: per thread count, the configuration over TLS over the plain one (medians).
    pub tls_vs_plain: Vec<EncryptedRatio>,
    pub runs: Vec<Run>,
}

/// Client-side encryption's (or TLS's) cost at one thread count: `dp-Nt-enc` (`dp-Nt-tls`)
/// over `dp-Nt`.
#[derive(Debug, Serialize)]
pub struct EncryptedRatio {
    pub threads: usize,
    pub ratio: f64,
}

/// Summaries of `configs` (the first is the baseline), in that order.
pub fn summarise(configs: &[String], runs: &[Run]) -> Vec<Summary> {
    let mut out: Vec<Summary> = configs
        .iter()
        .map(|c| {
            let xs: Vec<f64> = runs
                .iter()
                .filter(|r| &r.config == c)
                .map(|r| r.mb_s)
                .collect();
            Summary {
                config: c.clone(),
                mb_s_median: median(&xs),
                mb_s_min: xs.iter().copied().fold(f64::INFINITY, f64::min),
                mb_s_max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                runs: xs.len(),
                ratio_vs_sink: f64::NAN,
            }
        })
        .collect();
    let base = out.first().map_or(f64::NAN, |s| s.mb_s_median);
    for s in &mut out {
        s.ratio_vs_sink = s.mb_s_median / base;
    }
    out
}

/// The results as a markdown table.
pub fn table(r: &Report) -> String {
    let mut t = String::from(
        "| config | MB/s (median) | min – max | runs | vs sink |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for s in &r.summaries {
        t.push_str(&format!(
            "| {} | {:.1} | {:.1} – {:.1} | {} | {:.2}× |\n",
            s.config, s.mb_s_median, s.mb_s_min, s.mb_s_max, s.runs, s.ratio_vs_sink
        ));
    }
    if let Some(x) = r.ratio_2_threads_vs_1 {
        t.push_str(&format!("\ndata plane, 2 threads / 1 thread: {x:.2}×\n"));
    }
    for e in &r.encrypted_vs_plain {
        t.push_str(&format!(
            "data plane, {} thread(s), encrypted / plain: {:.2}×\n",
            e.threads, e.ratio
        ));
    }
    for e in &r.tls_vs_plain {
        t.push_str(&format!(
            "data plane, {} thread(s), TLS / plain TCP: {:.2}×\n",
            e.threads, e.ratio
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_against_the_first_config() {
        let run = |c: &str, x| Run {
            config: c.into(),
            repeat: 0,
            bytes: 1,
            wall_s: 1.0,
            mb_s: x,
            commit_wait_s: 0.0,
            server_cpu_s: None,
        };
        let runs = [run("sink", 100.0), run("dp", 80.0), run("sink", 120.0)];
        let s = summarise(&["sink".into(), "dp".into()], &runs);
        assert_eq!(s[0].mb_s_median, 110.0);
        assert!((s[1].ratio_vs_sink - 80.0 / 110.0).abs() < 1e-12);
        assert_eq!(s[0].runs, 2);
    }
}
