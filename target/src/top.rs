//! `deltavol top`: a terminal view of every volume attached on this node.

/// Runs `deltavol top`.
pub fn run(_interval_ms: u64, _once: bool) -> anyhow::Result<()> {
    anyhow::bail!("deltavol top is not built yet")
}
