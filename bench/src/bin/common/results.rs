//! The results file, shared by the benchmark binaries (each includes this file).

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Writes `report` as JSON to `out`, else to `bench/results/<bench>-<date>.json` unless
/// `skipped_by` names the flags that leave that out (`--quick`); says which on stderr.
pub fn write(
    report: &impl Serialize,
    bench: &str,
    date: &str,
    out: Option<&Path>,
    skipped_by: Option<&str>,
) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report).context("encoding the results")?;
    let path = match (out, skipped_by) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(flags)) => {
            eprintln!("results: not written ({flags} without --out)");
            return Ok(());
        }
        (None, None) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("{bench}-{date}.json")),
    };
    if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(&path, json + "\n").with_context(|| format!("write {}", path.display()))?;
    eprintln!("results: {}", path.display());
    Ok(())
}
