//! The command line of `deltavol-dataplane`, and its config file.
//!
//! Every option of the server is a flag and a key of the config file,
//! [`DEFAULT_CONFIG`] (`/etc/deltavol/dataplane.toml`) unless `--config FILE` names another
//! (`--no-config`: none). A key is the flag's long name with `_` for `-`, as in the node
//! agent's `/etc/deltavol/agent.toml` (`data_dir = "/var/lib/deltavol-dataplane"`,
//! `threads = 4`, `multi_server = true`); relative paths in the file are relative to the
//! file's directory. A flag on the command line
//! overrides the file, the file overrides the built-in defaults. The subcommands (`verify`,
//! `gc`) take the store keys (`data_dir`, `store`, `s3_*`, ...) from the file too.
//!
//! A missing default file is no error; a missing `--config` file, a syntax error, an unknown
//! key or a value of the wrong type is, naming the file, the line and the key.
//!
//! [`Cli`] is public so that the man page and the shell completions are generated from it
//! (`cargo run -p xtask -- dist-docs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::store::{backend, compaction, lease, tools};
use crate::{BackendConfig, ConnLimits, S3Config};

/// The config file read when `--config` does not name one (missing is fine).
pub const DEFAULT_CONFIG: &str = "/etc/deltavol/dataplane.toml";

const AFTER_LONG_HELP: &str = "\
Config file: every option above (but --config and --no-config) is also a key of \
/etc/deltavol/dataplane.toml (or of the --config FILE), named as the flag with _ for -: \
listen = \"0.0.0.0:7070\", data_dir = \"/var/lib/deltavol-dataplane\", threads = 4, \
multi_server = true. Flags override the file. verify and gc take the store keys (data_dir, \
store, s3_*) from it too.

Once it serves, it prints \"listening on ADDR\" and, under systemd (Type=notify), tells \
systemd it is ready.";

/// The deltavol data plane: keeps every snapshot of every volume.
///
/// Without a subcommand it serves (`--listen`, `--data-dir`, `--auth-token-file`).
#[derive(Debug, Parser)]
#[command(
    name = "deltavol-dataplane",
    version,
    args_conflicts_with_subcommands = true,
    after_long_help = AFTER_LONG_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file (TOML; keys are the long flags with _ for -). Default:
    /// /etc/deltavol/dataplane.toml when it exists.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Read no config file, not even /etc/deltavol/dataplane.toml.
    #[arg(long, global = true, conflicts_with = "config")]
    pub no_config: bool,
    /// Address to listen on (every thread binds it with SO_REUSEPORT), e.g. 127.0.0.1:7070.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Number of shard threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// File holding the admin token: a client holding it may do everything on every volume
    /// (recover, delete volumes). Optional with --credentials-file.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Per-volume credentials (`deltavol-dataplane credentials issue`): a JSON file of
    /// credential ids, roles and hashed keys, re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
    /// TLS on every connection: the server's certificate chain (PEM), e.g. server.pem of
    /// `deltavol-dataplane tls init`. Without it the server speaks plain TCP, and only on a
    /// loopback address unless --insecure.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: every client must present a certificate signed by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plain TCP on an address that is not loopback (no --tls-cert): snapshots then
    /// cross the network unencrypted. Logged at start.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
    #[command(flatten)]
    pub limits: ConnLimits,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, on a thread of its own),
    /// e.g. 127.0.0.1:9101. Prints "metrics on ADDR" after the "listening on" line.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub compaction: CompactionArgs,
}

/// How deleted snapshots give their space back.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct CompactionArgs {
    /// Rewrite a segment once less than this fraction of its bytes is still live (0..1; 0
    /// keeps dead bytes, only the segment count per snapshot stays bounded).
    #[arg(long, default_value_t = compaction::LIVE_RATIO_DEFAULT, value_parser = parse_ratio)]
    pub compact_live_ratio: f64,
    /// MiB a second compaction reads plus writes at most, all volumes together (0: unpaced).
    #[arg(long, default_value_t = compaction::RATE_MIB_S_DEFAULT)]
    pub compact_mib_s: u64,
    /// Object store: how long a segment object replaced by compaction stays before it is
    /// deleted (readers holding an older manifest, e.g. a clone on another server, may still
    /// read it meanwhile).
    #[arg(long, default_value_t = compaction::RETIRED_GRACE_SECS_DEFAULT)]
    pub retired_grace_secs: u64,
}

impl CompactionArgs {
    pub fn tuning(&self) -> compaction::Tuning {
        compaction::Tuning {
            live_ratio: self.compact_live_ratio,
            retired_grace: std::time::Duration::from_secs(self.retired_grace_secs),
            rate_bytes_s: self.compact_mib_s.saturating_mul(1 << 20),
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// TLS certificates for a first set-up.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Issues, rotates, revokes and lists per-volume credentials (in --credentials-file, or
    /// credentials_file of the config file). The server re-reads the file within a second.
    Credentials {
        #[command(subcommand)]
        action: CredentialsAction,
        /// The credentials file (created 0600 by the first `issue`).
        #[arg(long, value_name = "FILE")]
        credentials_file: Option<PathBuf>,
    },
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

/// What `deltavol-dataplane tls` does.
#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Makes a CA and a server certificate (and client certificates for mutual TLS) in DIR:
    /// ca.pem (give it to the compute nodes as --tls-ca), ca.key (keep it offline),
    /// server.pem and server.key (--tls-cert, --tls-key), client-NAME.pem/.key. Never
    /// overwrites a file.
    Init {
        /// Directory to write into (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A DNS name or IP address the compute nodes connect to (repeatable; at least one).
        #[arg(long = "host", value_name = "NAME|IP", required = true)]
        hosts: Vec<String>,
        /// Also a client certificate named NAME (repeatable), for --tls-client-ca.
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
    },
}

/// What `deltavol-dataplane credentials` does.
#[derive(Debug, Subcommand)]
pub enum CredentialsAction {
    /// Issues a credential and prints it once (`dvc1.ID.SECRET`; the file keeps only a hash):
    /// give it to the compute node as its --auth-token-file.
    Issue {
        /// Read and write (ship snapshots, create, clone into, retention, pins, delete its
        /// snapshots) on VOLUME: a name, a prefix ending in `*`, or `*`. Repeatable.
        #[arg(long, value_name = "VOLUME")]
        write: Vec<String>,
        /// Read only (describe, list, read blocks: a clone's source, a verify). Repeatable.
        #[arg(long, value_name = "VOLUME")]
        read: Vec<String>,
        /// Everything on every volume, also recover (a new generation) and delete volumes.
        #[arg(long, conflicts_with_all = ["write", "read"])]
        admin: bool,
        /// A note for `list` (who or what holds it).
        #[arg(long, default_value = "")]
        label: String,
        /// Write the credential to FILE (created 0600, never overwritten) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Issues a new credential with the same rights as ID; ID stays valid until revoked, so
    /// clients switch over without downtime.
    Rotate {
        id: String,
        /// Write the new credential to FILE (created 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revokes ID: refused on its next connection, and its open connections are closed at
    /// their next request.
    Revoke { id: String },
    /// Lists the credentials (ids, rights, labels, revoked or not; never secrets).
    List {
        /// One JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Files under DATA_DIR/volumes (fsynced).
    Local,
    /// An S3-compatible object store (AWS S3, Ceph RGW, MinIO, SeaweedFS, ...).
    S3,
}

/// Where the snapshots live.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Local directory: the volumes (local store) or the lock file (object store).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = StoreKind::Local)]
    pub store: StoreKind,
    /// S3 endpoint URL (omit for AWS). Plain http only for loopback hosts.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 bucket.
    #[arg(long)]
    pub s3_bucket: Option<String>,
    /// S3 region.
    #[arg(long, default_value = "us-east-1")]
    pub s3_region: String,
    /// Key prefix inside the bucket.
    #[arg(long, default_value = "")]
    pub s3_prefix: String,
    /// Credentials file (`access_key_id = ...`, `secret_access_key = ...`); default: the
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.
    #[arg(long)]
    pub s3_credentials_file: Option<PathBuf>,
    /// Several data-plane servers share this store: refuse to start unless conditional
    /// creates hold on it.
    #[arg(long)]
    pub multi_server: bool,
    /// Multi-server: this server's name in volume leases (default: host-pid-random).
    #[arg(long)]
    pub server_id: Option<String>,
    /// Multi-server: how long a volume lease lasts without renewal; another server takes
    /// the volume over this long after its server died.
    #[arg(long, default_value_t = lease::LEASE_MS_DEFAULT)]
    pub lease_ms: u64,
    /// Skip the start-up probe of conditional creates. For test stores only: moto's server,
    /// for one, now and then lets two racing creates of one key both succeed.
    #[arg(long)]
    pub no_create_probe: bool,
}

impl StoreArgs {
    pub fn data_dir(&self) -> anyhow::Result<PathBuf> {
        self.data_dir.clone().context(
            "--data-dir (or data-dir in the config file) is required: the local volumes, or \
             the lock file of an object store",
        )
    }

    pub fn backend_config(&self) -> anyhow::Result<BackendConfig> {
        Ok(match self.store {
            StoreKind::Local => BackendConfig::Local,
            StoreKind::S3 => BackendConfig::S3(S3Config {
                endpoint: self.s3_endpoint.clone(),
                bucket: self
                    .s3_bucket
                    .clone()
                    .context("--store s3 needs --s3-bucket (or s3-bucket in the config file)")?,
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

    pub fn open(&self) -> anyhow::Result<backend::Backend> {
        let dir = self.data_dir()?;
        backend::Backend::open(&self.backend_config()?, &dir)
            .with_context(|| format!("opening the store ({:?})", self.store))
    }

    /// Takes each store key of `file` whose flag was not on the command line (`m`: the
    /// matches of the command these args are flattened into).
    fn apply(&mut self, file: &FileConfig, m: &ArgMatches) {
        let f = file.clone();
        set_opt(m, "data_dir", &mut self.data_dir, f.data_dir);
        set(m, "store", &mut self.store, f.store);
        set_opt(m, "s3_endpoint", &mut self.s3_endpoint, f.s3_endpoint);
        set_opt(m, "s3_bucket", &mut self.s3_bucket, f.s3_bucket);
        set(m, "s3_region", &mut self.s3_region, f.s3_region);
        set(m, "s3_prefix", &mut self.s3_prefix, f.s3_prefix);
        set_opt(
            m,
            "s3_credentials_file",
            &mut self.s3_credentials_file,
            f.s3_credentials_file,
        );
        set(m, "multi_server", &mut self.multi_server, f.multi_server);
        set_opt(m, "server_id", &mut self.server_id, f.server_id);
        set(m, "lease_ms", &mut self.lease_ms, f.lease_ms);
        set(
            m,
            "no_create_probe",
            &mut self.no_create_probe,
            f.no_create_probe,
        );
    }
}

/// The config file: every key optional, the flags' long names with `_` for `-` (as in
/// `/etc/deltavol/agent.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub threads: Option<usize>,
    pub auth_token_file: Option<PathBuf>,
    pub credentials_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub metrics_listen: Option<SocketAddr>,
    pub max_connections: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub handshake_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub frame_timeout_ms: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<StoreKind>,
    pub s3_endpoint: Option<String>,
    pub s3_bucket: Option<String>,
    pub s3_region: Option<String>,
    pub s3_prefix: Option<String>,
    pub s3_credentials_file: Option<PathBuf>,
    pub multi_server: Option<bool>,
    pub server_id: Option<String>,
    pub lease_ms: Option<u64>,
    pub no_create_probe: Option<bool>,
    pub compact_live_ratio: Option<f64>,
    pub compact_mib_s: Option<u64>,
    pub retired_grace_secs: Option<u64>,
}

/// A config file that cannot be used: which file, where, and why.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// The key at that line, when there is one.
    pub key: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl FileConfig {
    /// Parses `text`, the contents of `path` (named in errors; relative paths in the file are
    /// taken relative to its directory).
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        let mut cfg: FileConfig = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => line_and_key(text, span.start),
                None => (None, None),
            };
            // One line: toml's parse errors span two ("invalid string\nexpected ...").
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            let message = if message.starts_with("unknown field") {
                let hint = match unknown_key_hint(&message) {
                    Some(k) => format!("did you mean `{k}`? "),
                    None => String::new(),
                };
                format!(
                    "unknown key ({hint}the keys are the long flags of `deltavol-dataplane \
                     --help` with _ for -, e.g. data_dir): {message}"
                )
            } else {
                message
            };
            ConfigError {
                path: path.to_path_buf(),
                line,
                key,
                message,
            }
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [
            &mut cfg.auth_token_file,
            &mut cfg.credentials_file,
            &mut cfg.tls_cert,
            &mut cfg.tls_key,
            &mut cfg.tls_client_ca,
            &mut cfg.data_dir,
            &mut cfg.s3_credentials_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Reads `path`; `Ok(None)` when it does not exist and `missing_ok`.
    pub fn read(path: &Path, missing_ok: bool) -> Result<Option<FileConfig>, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => return Ok(None),
            Err(e) => {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line: None,
                    key: None,
                    message: format!("cannot read it: {e}"),
                })
            }
        };
        let cfg = FileConfig::parse(path, &text)?;
        if let Some(v) = cfg.compact_live_ratio {
            if !(0.0..=1.0).contains(&v) {
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with("compact_live_ratio"))
                    .map(|n| n + 1);
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line,
                    key: Some("compact_live_ratio".into()),
                    message: format!("{v} is not between 0 and 1"),
                });
            }
        }
        Ok(Some(cfg))
    }
}

/// For serde's "unknown field `data-dir`, expected one of `listen`, ..., `data_dir`, ...": the
/// known key the unknown one means with `_` for `-` (or in another case), if any.
fn unknown_key_hint(message: &str) -> Option<String> {
    let mut names = message.split('`').skip(1).step_by(2);
    let unknown = names.next()?.replace('-', "_").to_ascii_lowercase();
    names.find(|k| *k == unknown).map(str::to_string)
}

/// The 1-based line holding byte `offset` of `text`, and the key written on that line (the
/// part before `=`, or a `[table]` header's name).
fn line_and_key(text: &str, offset: usize) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let Some(line) = text.lines().nth(line_no) else {
        return (Some(line_no + 1), None);
    };
    let t = line.trim();
    let key = if let Some(h) = t.strip_prefix('[') {
        Some(h.trim_start_matches('[').split(']').next().unwrap_or(""))
    } else {
        t.split_once('=').map(|(k, _)| k)
    };
    let key = key
        .map(|k| k.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|k| !k.is_empty());
    (Some(line_no + 1), key)
}

fn from_command_line(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

fn set<T>(m: &ArgMatches, id: &str, field: &mut T, file: Option<T>) {
    if let (false, Some(v)) = (from_command_line(m, id), file) {
        *field = v;
    }
}

fn set_opt<T>(m: &ArgMatches, id: &str, field: &mut Option<T>, file: Option<T>) {
    if let (false, Some(v)) = (from_command_line(m, id), file) {
        *field = Some(v);
    }
}

/// Why [`Cli::load_from`] failed.
#[derive(Debug)]
pub enum LoadError {
    /// The command line (also `--help` and `--version`: `exit()` prints them).
    Clap(clap::Error),
    Config(ConfigError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Clap(e) => write!(f, "{e}"),
            LoadError::Config(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LoadError {}

impl Cli {
    /// The process's command line over its config file; exits on `--help`, `--version` and
    /// command-line errors, as clap does.
    pub fn load() -> Result<Cli, ConfigError> {
        match Cli::load_from(std::env::args_os(), Path::new(DEFAULT_CONFIG)) {
            Ok(cli) => Ok(cli),
            Err(LoadError::Clap(e)) => e.exit(),
            Err(LoadError::Config(e)) => Err(e),
        }
    }

    /// Parses `args` (the program name first) and applies the config file under the flags:
    /// `--config FILE`, or else `default_config` if it exists, or none with `--no-config`.
    pub fn load_from<I, T>(args: I, default_config: &Path) -> Result<Cli, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(LoadError::Clap)?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(LoadError::Clap)?;
        let file = match (&cli.config, cli.no_config) {
            (_, true) => None,
            (Some(path), false) => FileConfig::read(path, false).map_err(LoadError::Config)?,
            (None, false) => FileConfig::read(default_config, true).map_err(LoadError::Config)?,
        };
        if let Some(file) = file {
            cli.apply(&file, &matches);
        }
        Ok(cli)
    }

    /// Takes each key of `file` whose flag was not on the command line.
    fn apply(&mut self, file: &FileConfig, m: &ArgMatches) {
        if let (Some(Command::Verify { store, .. } | Command::Gc { store, .. }), Some((_, sub))) =
            (&mut self.command, m.subcommand())
        {
            store.apply(file, sub);
        }
        if let (
            Some(Command::Credentials {
                credentials_file, ..
            }),
            Some((_, sub)),
        ) = (&mut self.command, m.subcommand())
        {
            set_opt(
                sub,
                "credentials_file",
                credentials_file,
                file.credentials_file.clone(),
            );
        }
        let f = file.clone();
        set_opt(m, "listen", &mut self.listen, f.listen);
        set_opt(
            m,
            "credentials_file",
            &mut self.credentials_file,
            f.credentials_file,
        );
        set_opt(m, "tls_cert", &mut self.tls_cert, f.tls_cert);
        set_opt(m, "tls_key", &mut self.tls_key, f.tls_key);
        set_opt(m, "tls_client_ca", &mut self.tls_client_ca, f.tls_client_ca);
        set(m, "insecure", &mut self.insecure, f.insecure);
        set_opt(m, "threads", &mut self.threads, f.threads);
        set_opt(
            m,
            "auth_token_file",
            &mut self.auth_token_file,
            f.auth_token_file,
        );
        set_opt(
            m,
            "metrics_listen",
            &mut self.metrics_listen,
            f.metrics_listen,
        );
        let l = &mut self.limits;
        set(
            m,
            "max_connections",
            &mut l.max_connections,
            f.max_connections,
        );
        set(m, "max_handshakes", &mut l.max_handshakes, f.max_handshakes);
        set(
            m,
            "handshake_timeout_ms",
            &mut l.handshake_timeout_ms,
            f.handshake_timeout_ms,
        );
        set(
            m,
            "idle_timeout_ms",
            &mut l.idle_timeout_ms,
            f.idle_timeout_ms,
        );
        set(
            m,
            "frame_timeout_ms",
            &mut l.frame_timeout_ms,
            f.frame_timeout_ms,
        );
        let c = &mut self.compaction;
        set(
            m,
            "compact_live_ratio",
            &mut c.compact_live_ratio,
            f.compact_live_ratio,
        );
        set(m, "compact_mib_s", &mut c.compact_mib_s, f.compact_mib_s);
        set(
            m,
            "retired_grace_secs",
            &mut c.retired_grace_secs,
            f.retired_grace_secs,
        );
        self.store.apply(file, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: &str = "/nonexistent/deltavol-test/dataplane.toml";

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("dataplane.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    fn load(args: &[&str], default: &Path) -> Result<Cli, LoadError> {
        let argv = std::iter::once("deltavol-dataplane").chain(args.iter().copied());
        Cli::load_from(argv, default)
    }

    fn config_err(r: Result<Cli, LoadError>) -> ConfigError {
        match r {
            Err(LoadError::Config(e)) => e,
            Err(LoadError::Clap(e)) => panic!("a clap error, not a config error: {e}"),
            Ok(cli) => panic!("accepted: {cli:?}"),
        }
    }

    const FULL: &str = r#"
# every key
listen = "127.0.0.1:7070"
threads = 3
auth_token_file = "/etc/deltavol/token"
metrics_listen = "127.0.0.1:9101"
max_connections = 100
max_handshakes = 10
handshake_timeout_ms = 1000
idle_timeout_ms = 2000
frame_timeout_ms = 3000
data_dir = "/srv/deltavol"
store = "s3"
s3_endpoint = "http://127.0.0.1:9000"
s3_bucket = "b"
s3_region = "eu-west-1"
s3_prefix = "prod"
s3_credentials_file = "creds"
multi_server = true
server_id = "dp-a"
lease_ms = 9000
no_create_probe = true
"#;

    #[test]
    fn file_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), FULL);
        let cli = load(
            &["--config", path.to_str().expect("utf-8")],
            Path::new(NONE),
        )
        .expect("loads");
        assert_eq!(cli.listen, Some("127.0.0.1:7070".parse().expect("addr")));
        assert_eq!(cli.threads, Some(3));
        assert_eq!(
            cli.auth_token_file.as_deref(),
            Some(Path::new("/etc/deltavol/token"))
        );
        assert_eq!(
            cli.metrics_listen,
            Some("127.0.0.1:9101".parse().expect("addr"))
        );
        assert_eq!(
            cli.limits,
            ConnLimits {
                max_connections: 100,
                max_handshakes: 10,
                handshake_timeout_ms: 1000,
                idle_timeout_ms: 2000,
                frame_timeout_ms: 3000,
            }
        );
        let s = &cli.store;
        assert_eq!(s.data_dir.as_deref(), Some(Path::new("/srv/deltavol")));
        assert_eq!(s.store, StoreKind::S3);
        assert_eq!(s.s3_endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.s3_bucket.as_deref(), Some("b"));
        assert_eq!(s.s3_region, "eu-west-1");
        assert_eq!(s.s3_prefix, "prod");
        // Relative to the file's directory.
        assert_eq!(
            s.s3_credentials_file.as_deref(),
            Some(dir.path().join("creds").as_path())
        );
        assert!(s.multi_server && s.no_create_probe);
        assert_eq!(s.server_id.as_deref(), Some("dp-a"));
        assert_eq!(s.lease_ms, 9000);
    }

    #[test]
    fn the_default_file_is_read_when_it_exists_and_skipped_when_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "threads = 7\n");
        assert_eq!(load(&[], &path).expect("loads").threads, Some(7));
        assert_eq!(load(&["--no-config"], &path).expect("loads").threads, None);
        let cli = load(&[], Path::new(NONE)).expect("a missing default file is fine");
        assert_eq!(cli.threads, None);
        assert_eq!(cli.store.s3_region, "us-east-1");
        assert_eq!(cli.limits, ConnLimits::default());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), FULL);
        let cli = load(
            &[
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--max-connections",
                "4096",
                "--data-dir",
                "/d",
                "--store",
                "local",
                "--s3-region",
                "us-east-1",
                "--lease-ms",
                "30000",
            ],
            &path,
        )
        .expect("loads");
        assert_eq!(cli.listen, Some("127.0.0.1:0".parse().expect("addr")));
        assert_eq!(cli.threads, Some(1));
        // A flag equal to the built-in default still wins over the file.
        assert_eq!(cli.limits.max_connections, 4096);
        assert_eq!(cli.store.s3_region, "us-east-1");
        assert_eq!(cli.store.lease_ms, 30000);
        assert_eq!(cli.store.store, StoreKind::Local);
        assert_eq!(cli.store.data_dir.as_deref(), Some(Path::new("/d")));
        // What no flag named comes from the file.
        assert_eq!(cli.limits.max_handshakes, 10);
        assert_eq!(cli.store.s3_bucket.as_deref(), Some("b"));
        assert_eq!(
            cli.metrics_listen,
            Some("127.0.0.1:9101".parse().expect("addr"))
        );
    }

    #[test]
    fn subcommands_take_the_store_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "data_dir = \"/srv/dp\"\nstore = \"s3\"\n");
        let cli = load(&["verify", "--volume", "v"], &path).expect("loads");
        let Some(Command::Verify { store, .. }) = &cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(store.data_dir.as_deref(), Some(Path::new("/srv/dp")));
        assert_eq!(store.store, StoreKind::S3);
        let cli = load(&["gc", "--data-dir", "/x", "--config"], &path);
        assert!(cli.is_err(), "--config needs a value");
        let p = path.to_str().expect("utf-8");
        let cli = load(&["gc", "--data-dir", "/x", "--config", p], Path::new(NONE)).expect("loads");
        let Some(Command::Gc { store, .. }) = &cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(store.data_dir.as_deref(), Some(Path::new("/x")));
        assert_eq!(store.store, StoreKind::S3);
    }

    #[test]
    fn security_keys_from_the_file_for_the_server_and_the_credentials_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "credentials_file = \"creds.json\"\ntls_cert = \"tls/server.pem\"\ntls_key = \"tls/server.key\"\ninsecure = true\n",
        );
        let cli = load(&[], &path).expect("loads");
        // Relative paths are relative to the file's directory.
        assert_eq!(cli.credentials_file, Some(dir.path().join("creds.json")));
        assert_eq!(cli.tls_cert, Some(dir.path().join("tls/server.pem")));
        assert_eq!(cli.tls_key, Some(dir.path().join("tls/server.key")));
        assert!(cli.insecure);
        let cli = load(&["credentials", "list"], &path).expect("loads");
        let Some(Command::Credentials {
            credentials_file, ..
        }) = &cli.command
        else {
            panic!("{cli:?}");
        };
        assert_eq!(
            credentials_file.as_deref(),
            Some(dir.path().join("creds.json").as_path())
        );
        // The flag wins over the file.
        let cli = load(
            &["credentials", "--credentials-file", "/x.json", "list"],
            &path,
        )
        .expect("loads");
        let Some(Command::Credentials {
            credentials_file, ..
        }) = &cli.command
        else {
            panic!("{cli:?}");
        };
        assert_eq!(credentials_file.as_deref(), Some(Path::new("/x.json")));
        // The certificate without its key is a command-line error.
        assert!(load(&["--tls-cert", "/c.pem"], Path::new(NONE)).is_err());
        assert!(load(
            &["--tls-cert", "/c", "--tls-key", "/k", "--insecure"],
            Path::new(NONE)
        )
        .is_err());
    }

    #[test]
    fn compaction_settings_from_flags_and_file_with_bad_values_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cli = load(&[], Path::new(NONE)).expect("defaults");
        assert_eq!(
            cli.compaction.compact_live_ratio,
            compaction::LIVE_RATIO_DEFAULT
        );
        assert_eq!(cli.compaction.compact_mib_s, compaction::RATE_MIB_S_DEFAULT);
        let path = write(
            dir.path(),
            "compact_live_ratio = 0.5\ncompact_mib_s = 8\nretired_grace_secs = 60\n",
        );
        let cli = load(&["--compact-mib-s", "16"], &path).expect("loads");
        assert_eq!(cli.compaction.compact_live_ratio, 0.5);
        assert_eq!(cli.compaction.compact_mib_s, 16, "the flag wins");
        assert_eq!(cli.compaction.retired_grace_secs, 60);
        let t = cli.compaction.tuning();
        assert_eq!(t.rate_bytes_s, 16 << 20);
        assert_eq!(t.retired_grace, std::time::Duration::from_secs(60));
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            assert!(
                matches!(
                    load(&["--compact-live-ratio", bad], Path::new(NONE)),
                    Err(LoadError::Clap(_))
                ),
                "--compact-live-ratio {bad} accepted"
            );
        }
        let path = write(
            dir.path(),
            "listen = \"127.0.0.1:1\"\ncompact_live_ratio = 2.0\n",
        );
        let e = config_err(load(&[], &path));
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("compact_live_ratio"), "{e}");
        let path = write(dir.path(), "compact_mib_s = -1\n");
        assert!(matches!(load(&[], &path), Err(LoadError::Config(_))));
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_line_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "listen = \"127.0.0.1:7070\"\n\n  data-dir = \"/srv\"\n",
        );
        let e = config_err(load(&[], &path));
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key.as_deref(), Some("data-dir"), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("line 3") && msg.contains("unknown key"),
            "{msg}"
        );
        assert!(msg.contains("did you mean `data_dir`?"), "{msg}");

        let e = config_err(load(
            &[],
            &write(dir.path(), "threads = 2\n[s3]\nbucket = \"b\"\n"),
        ));
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("s3")), "{e}");
    }

    #[test]
    fn bad_type_is_an_error_naming_file_line_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            (
                "listen = \"0.0.0.0:7070\"\nthreads = \"four\"\n",
                2,
                "threads",
            ),
            ("listen = \"localhost\"\n", 1, "listen"),
            ("# c\n# c\nmulti_server = 1\n", 3, "multi_server"),
            ("store = \"s4\"\n", 1, "store"),
            ("max_connections = -1\n", 1, "max_connections"),
        ];
        for (text, line, key) in cases {
            let path = write(dir.path(), text);
            let e = config_err(load(&[], &path));
            assert_eq!((e.line, e.key.as_deref()), (Some(line), Some(key)), "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "config file {}, line {line}, key `{key}`: ",
                    path.display()
                )),
                "{msg}"
            );
        }
        // A syntax error: the line, no key.
        let path = write(dir.path(), "threads = 2\nlisten = \n");
        let e = config_err(load(&[], &path));
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.toml");
        let e = config_err(load(
            &["--config", missing.to_str().expect("utf-8")],
            Path::new(NONE),
        ));
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("cannot read it"), "{msg}");
        // --config and --no-config together: the command line is wrong.
        let r = load(&["--config", "x.toml", "--no-config"], Path::new(NONE));
        assert!(matches!(r, Err(LoadError::Clap(_))), "{r:?}");
    }

    /// Every flag of the server is a key of the file, and every key a flag.
    #[test]
    fn every_flag_is_a_key_and_every_key_a_flag() {
        let cmd = Cli::command();
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "version" | "config" | "no-config"))
            .map(|l| l.replace('-', "_"))
            .collect();
        flags.sort();
        for flag in &flags {
            // A table is the wrong type for every key: the error must not be "unknown".
            let e = FileConfig::parse(Path::new("t.toml"), &format!("{flag} = {{}}\n"))
                .expect_err("a table is no value of any key");
            assert!(!e.message.contains("unknown"), "--{flag}: {e}");
        }
        let e = FileConfig::parse(Path::new("t.toml"), "zzz = 1\n").expect_err("unknown");
        let mut keys: Vec<String> = e
            .message
            .split("expected one of")
            .nth(1)
            .expect("the known keys")
            .split(',')
            .map(|k| k.trim().trim_matches('`').to_string())
            .collect();
        keys.sort();
        assert_eq!(flags, keys);
    }

    /// The example config shipped in the package parses, and names every key.
    #[test]
    fn the_packaged_example_parses_and_names_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/dataplane.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/dataplane.toml");
        FileConfig::parse(&path, &text).expect("the example parses");
        let uncommented: String = text
            .lines()
            .map(|l| l.trim_start().trim_start_matches('#').trim_start())
            .filter(|l| l.contains(" = "))
            .collect::<Vec<_>>()
            .join("\n");
        let cmd = Cli::command();
        for flag in cmd
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "version" | "config" | "no-config"))
        {
            let key = flag.replace('-', "_");
            assert!(
                uncommented
                    .lines()
                    .any(|l| l.starts_with(&format!("{key} = "))),
                "packaging/dataplane.toml does not mention {key}"
            );
        }
    }
}
