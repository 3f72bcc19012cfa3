//! `deltavol-dataplane`: the data-plane server binary, and its store tools (`verify`, `gc`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use deltavol_dataplane::store::{backend, tools};
use deltavol_dataplane::{BackendConfig, S3Config};

/// The deltavol data plane: keeps every snapshot of every volume.
///
/// Without a subcommand it serves (`--listen`, `--data-dir`, `--auth-token-file`).
#[derive(Debug, Parser)]
#[command(
    name = "deltavol-dataplane",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (every thread binds it with SO_REUSEPORT), e.g. 127.0.0.1:7070.
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    store: StoreArgs,
    /// Number of shard threads (default: number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// File holding the shared secret clients authenticate with.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    limits: deltavol_dataplane::ConnLimits,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, on a thread of its own),
    /// e.g. 127.0.0.1:9101. Prints "metrics on ADDR" after the "listening on" line.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads every segment of every snapshot: checks each extent's crc32c, the batch records
    /// against the index footer, and the manifests. Exits 1 if anything is corrupt.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this volume.
        #[arg(long)]
        volume: Option<String>,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Removes objects no committed manifest references (object store only): segments of
    /// abandoned or lost uploads, manifests older than the newest few, probe leftovers.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        /// Leave unreferenced segments younger than this alone (uploads in flight).
        #[arg(long, default_value_t = tools::GC_MIN_AGE_SECS_DEFAULT)]
        min_age_secs: u64,
        /// Manifests kept per volume besides the newest (older ones are removed).
        #[arg(long, default_value_t = tools::GC_KEEP_MANIFESTS_DEFAULT)]
        keep_manifests: u64,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many removals (bounded runs; a later run removes the rest).
        #[arg(long)]
        max_removals: Option<u64>,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// Files under DATA_DIR/volumes (fsynced).
    Local,
    /// An S3-compatible object store (AWS S3, Ceph RGW, MinIO, SeaweedFS, ...).
    S3,
}

/// Where the snapshots live.
#[derive(Debug, Clone, ClapArgs)]
struct StoreArgs {
    /// Local directory: the volumes (local store) or the lock file (object store).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = StoreKind::Local)]
    store: StoreKind,
    /// S3 endpoint URL (omit for AWS). Plain http only for loopback hosts.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 bucket.
    #[arg(long)]
    s3_bucket: Option<String>,
    /// S3 region.
    #[arg(long, default_value = "us-east-1")]
    s3_region: String,
    /// Key prefix inside the bucket.
    #[arg(long, default_value = "")]
    s3_prefix: String,
    /// Credentials file (`access_key_id = ...`, `secret_access_key = ...`); default: the
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.
    #[arg(long)]
    s3_credentials_file: Option<PathBuf>,
    /// Several data-plane servers share this store: refuse to start unless conditional
    /// creates hold on it.
    #[arg(long)]
    multi_server: bool,
    /// Multi-server: this server's name in volume leases (default: host-pid-random).
    #[arg(long)]
    server_id: Option<String>,
    /// Multi-server: how long a volume lease lasts without renewal; another server takes
    /// the volume over this long after its server died.
    #[arg(long, default_value_t = deltavol_dataplane::store::lease::LEASE_MS_DEFAULT)]
    lease_ms: u64,
    /// Skip the start-up probe of conditional creates. For test stores only: moto's server,
    /// for one, now and then lets two racing creates of one key both succeed.
    #[arg(long)]
    no_create_probe: bool,
}

impl StoreArgs {
    fn data_dir(&self) -> anyhow::Result<PathBuf> {
        self.data_dir.clone().context(
            "--data-dir is required (the local volumes, or the lock file of an object store)",
        )
    }

    fn backend_config(&self) -> anyhow::Result<BackendConfig> {
        Ok(match self.store {
            StoreKind::Local => BackendConfig::Local,
            StoreKind::S3 => BackendConfig::S3(S3Config {
                endpoint: self.s3_endpoint.clone(),
                bucket: self
                    .s3_bucket
                    .clone()
                    .context("--store s3 needs --s3-bucket")?,
                region: self.s3_region.clone(),
                prefix: self.s3_prefix.clone(),
                credentials_file: self.s3_credentials_file.clone(),
                multi_server: self.multi_server,
                server_id: self.server_id.clone(),
                lease_ms: self.lease_ms,
                skip_create_probe: self.no_create_probe,
            }),
        })
    }

    fn open(&self) -> anyhow::Result<backend::Backend> {
        let dir = self.data_dir()?;
        backend::Backend::open(&self.backend_config()?, &dir)
            .with_context(|| format!("opening the store ({:?})", self.store))
    }
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
    match args.command {
        Some(Command::Verify {
            ref store,
            ref volume,
            json,
        }) => {
            let backend = store.open()?;
            let report = tools::verify(&backend, volume.as_deref()).context("verify")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            if !report.findings.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Gc {
            ref store,
            min_age_secs,
            keep_manifests,
            dry_run,
            max_removals,
            json,
        }) => {
            let backend = store.open()?;
            let opts = tools::GcOptions {
                min_age_secs,
                keep_manifests,
                dry_run,
                max_removals,
            };
            let report = tools::gc(&backend, &opts).context("gc")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            Ok(())
        }
        None => serve(args),
    }
}

fn serve(args: Args) -> anyhow::Result<()> {
    let listen = args
        .listen
        .context("--listen is required to serve (or give a subcommand: verify, gc)")?;
    let token_file = args
        .auth_token_file
        .context("--auth-token-file is required to serve")?;
    let data_dir = args.store.data_dir()?;
    let token = deltavol_dataplane::auth::read_token_file(&token_file)
        .with_context(|| format!("reading the auth token from {}", token_file.display()))?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let backend = args.store.backend_config()?;
    // Bound first: a bad --metrics-listen fails before the store is opened.
    let metrics_listener = args
        .metrics_listen
        .map(deltavol_dataplane::metrics::MetricsListener::bind)
        .transpose()?;
    let handle = deltavol_dataplane::start_with_backend(
        deltavol_dataplane::ServerConfig {
            listen,
            data_dir: data_dir.clone(),
            threads,
            auth_token: token,
            limits: args.limits.clone(),
        },
        &backend,
    )
    .with_context(|| {
        format!(
            "starting the data plane on {listen} with data dir {}",
            data_dir.display()
        )
    })?;
    let metrics = match metrics_listener {
        Some(l) => Some(
            l.serve(deltavol_dataplane::metrics::registry(handle.stats_shared()))
                .context("starting the metrics endpoint")?,
        ),
        None => None,
    };
    // Scripts and tests wait for this line (the real port when --listen asked for port 0).
    println!("listening on {}", handle.local_addr());
    if let Some(m) = &metrics {
        println!("metrics on {}", m.local_addr());
    }
    handle.wait();
    drop(metrics);
    Ok(())
}
