//! stub
/// Runs the demo worker.
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("demo worker not built yet")
}
