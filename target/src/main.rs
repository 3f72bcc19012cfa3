use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DELTAVOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = deltavol::cli::Cli::parse();
    if let Err(e) = deltavol::cli::run(cli) {
        eprintln!("deltavol: error: {e:#}");
        std::process::exit(1);
    }
}
