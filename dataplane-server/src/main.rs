//! `deltavol-dataplane`: the data-plane server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The deltavol data plane: keeps every snapshot of every volume.
#[derive(Debug, Parser)]
#[command(name = "deltavol-dataplane", version)]
struct Args {
    /// Address to listen on (every thread binds it with SO_REUSEPORT), e.g. 127.0.0.1:7070.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory holding the volumes (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Number of shard threads (default: number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// File holding the shared secret clients authenticate with.
    #[arg(long)]
    auth_token_file: PathBuf,
    #[command(flatten)]
    limits: deltavol_dataplane::ConnLimits,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let token =
        deltavol_dataplane::auth::read_token_file(&args.auth_token_file).with_context(|| {
            format!(
                "reading the auth token from {}",
                args.auth_token_file.display()
            )
        })?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let handle = deltavol_dataplane::start(deltavol_dataplane::ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        threads,
        auth_token: token,
        limits: args.limits.clone(),
    })
    .with_context(|| {
        format!(
            "starting the data plane on {} with data dir {}",
            args.listen,
            args.data_dir.display()
        )
    })?;
    // Scripts and tests wait for this line (the real port when --listen asked for port 0).
    println!("listening on {}", handle.local_addr());
    handle.wait();
    Ok(())
}
