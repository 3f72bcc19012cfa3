//! `deltavol-dataplane`: the data-plane server binary, and its store tools (`verify`, `gc`).
//! The command line and the config file are [`deltavol_dataplane::cli`].

use anyhow::Context;
use deltavol_dataplane::cli::{Cli, Command, CredentialsAction, TlsAction};
use deltavol_dataplane::credentials::{CredentialFile, FileLock, Grant, Role};
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
        Some(Command::Tls {
            action:
                TlsAction::Init {
                    ref dir,
                    ref hosts,
                    ref clients,
                },
        }) => {
            let g = deltavol_dataplane::tls::generate(dir, hosts, clients)?;
            for f in &g.files {
                println!("{}", f.display());
            }
            eprintln!(
                "serve with --tls-cert {0}/server.pem --tls-key {0}/server.key; give {0}/ca.pem \
                 to the compute nodes (--tls-ca) and keep {0}/ca.key offline",
                dir.display()
            );
            Ok(())
        }
        Some(Command::Credentials {
            action,
            credentials_file,
        }) => {
            let path = credentials_file.context(
                "--credentials-file (or credentials_file in the config file) is required",
            )?;
            credentials(action, &path)
        }
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

/// `deltavol-dataplane credentials ...`: edits the file under its lock.
fn credentials(action: CredentialsAction, path: &std::path::Path) -> anyhow::Result<()> {
    let _lock = FileLock::acquire(path)?;
    let missing_ok = matches!(action, CredentialsAction::Issue { .. });
    let mut file = CredentialFile::load(path, missing_ok)?;
    match action {
        CredentialsAction::Issue {
            write,
            read,
            admin,
            label,
            out,
        } => {
            let grants = write
                .into_iter()
                .map(|volume| Grant {
                    volume,
                    role: Role::Write,
                })
                .chain(read.into_iter().map(|volume| Grant {
                    volume,
                    role: Role::Read,
                }))
                .collect();
            let (entry, secret) = file.issue(&label, admin, grants)?;
            hand_out(&file, path, &entry, &secret, out.as_deref(), "issued")
        }
        CredentialsAction::Rotate { id, out } => {
            let (entry, secret) = file.rotate(&id)?;
            hand_out(&file, path, &entry, &secret, out.as_deref(), "rotated")?;
            eprintln!("credential {id} stays valid until `credentials revoke {id}`");
            Ok(())
        }
        CredentialsAction::Revoke { id } => {
            let e = file.revoke(&id)?.clone();
            file.save(path)?;
            eprintln!(
                "revoked credential {} ({}): refused from its next connection",
                e.id,
                e.describe_grants()
            );
            Ok(())
        }
        CredentialsAction::List { json } => {
            if json {
                let list: Vec<_> = file
                    .credentials
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id,
                            "label": e.label,
                            "admin": e.admin,
                            "grants": e.grants,
                            "created_ms": e.created_ms,
                            "revoked_ms": e.revoked_ms,
                            "rotated_from": e.rotated_from,
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "credentials": list }));
            } else {
                println!("{:<16}  {:<8}  {:<40}  LABEL", "ID", "STATE", "RIGHTS");
                for e in &file.credentials {
                    let state = if e.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<16}  {:<8}  {:<40}  {}",
                        e.id,
                        state,
                        e.describe_grants(),
                        e.label
                    );
                }
            }
            Ok(())
        }
    }
}

/// Saves the file with the new credential, then shows the credential (stdout or `out`).
fn hand_out(
    file: &CredentialFile,
    path: &std::path::Path,
    entry: &deltavol_dataplane::credentials::Entry,
    secret: &str,
    out: Option<&std::path::Path>,
    verb: &str,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    // The credential file first: a credential is never saved that nobody could get.
    if let Some(out) = out {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
        f.write_all(format!("{secret}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    file.save(path)?;
    match out {
        Some(out) => eprintln!(
            "{verb} credential {} ({}) into {}: give that file to the compute node as its \
             --auth-token-file",
            entry.id,
            entry.describe_grants(),
            out.display()
        ),
        None => {
            println!("{secret}");
            eprintln!(
                "{verb} credential {} ({}): the line above is shown once; give it to the \
                 compute node in its --auth-token-file",
                entry.id,
                entry.describe_grants()
            );
        }
    }
    Ok(())
}

fn serve(args: Cli) -> anyhow::Result<()> {
    let listen = args
        .listen
        .context("--listen (or listen in the config file) is required to serve (or give a subcommand: verify, gc)")?;
    if args.auth_token_file.is_none() && args.credentials_file.is_none() {
        anyhow::bail!(
            "give --credentials-file (per-volume credentials), --auth-token-file (the admin \
             token), or both (or their keys in the config file) to serve"
        );
    }
    let data_dir = args.store.data_dir()?;
    let token = match &args.auth_token_file {
        Some(f) => deltavol_dataplane::auth::read_token_file(f)
            .with_context(|| format!("reading the auth token from {}", f.display()))?,
        None => Vec::new(),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(deltavol_dataplane::tls::ServerTlsFiles::open(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
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
            credentials: args.credentials_file.clone(),
            tls,
            insecure: args.insecure,
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
