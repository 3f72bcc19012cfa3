//! `deltavol-dataplane`: the data-plane server binary, and its store tools (`verify`, `gc`).
//! The command line and the config file are [`deltavol_dataplane::cli`].

use anyhow::Context;
use deltavol_dataplane::cli::{Cli, Command};
use deltavol_dataplane::store::tools;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Cli::load()?;
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

fn serve(args: Cli) -> anyhow::Result<()> {
    let listen = args
        .listen
        .context("--listen (or listen in the config file) is required to serve (or give a subcommand: verify, gc)")?;
    let token_file = args.auth_token_file.context(
        "--auth-token-file (or auth-token-file in the config file) is required to serve",
    )?;
    let data_dir = args.store.data_dir()?;
    let token = deltavol_dataplane::auth::read_token_file(&token_file)
        .with_context(|| format!("reading the auth token from {}", token_file.display()))?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let backend = args.store.backend_config()?;
    args.compaction.tuning().apply();
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
    // Under systemd (Type=notify): ready now. A failure to tell it is logged, not fatal.
    let status = format!("READY=1\nSTATUS=listening on {}", handle.local_addr());
    if let Err(e) = deltavol_dataplane::notify::sd_notify(&status) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
    handle.wait();
    drop(metrics);
    Ok(())
}
