//! The agent's settings: `/etc/deltavol/agent.toml` (or `--config FILE`), then the command
//! line, which overrides the file key by key. Unknown keys and bad values are errors that name
//! the file and the key; a missing default file means the built-in defaults.

use super::state::Fs;
use crate::size::parse_size;
use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CONFIG_DEFAULT: &str = "/etc/deltavol/agent.toml";

/// `deltavol agent` flags (each overrides the config file's key of the same name, with `_`
/// for `-`).
#[derive(Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// Config file (TOML); default /etc/deltavol/agent.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data-plane server(s) the node's volumes ship to, HOST:PORT[,HOST:PORT...]
    /// (a volume's `-o dataplane=` overrides it). Without one, volumes are local only.
    #[arg(long)]
    pub dataplane: Option<String>,
    /// File holding the node's credential (`deltavol-dataplane credentials issue --write
    /// ...`, covering the names of the node's volumes) or the data plane's admin token.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// How the node's volumes reach the data plane: TLS (--tls-ca ...) or --insecure.
    #[command(flatten)]
    pub tls: crate::cli::TlsArgs,
    /// The agent's own state (the record of volumes and mounts).
    /// [default: /var/lib/deltavol/agent]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Directory on SSD holding each volume's writeback cache (ROOT/NAME).
    /// [default: /var/lib/deltavol/cache]
    #[arg(long)]
    pub cache_root: Option<PathBuf>,
    /// Directory on the big disk holding each volume's backing file (ROOT/NAME.img) and
    /// outbox. [default: /var/lib/deltavol/backing]
    #[arg(long)]
    pub backing_root: Option<PathBuf>,
    /// Where mounted volumes' filesystems are mounted (ROOT/NAME).
    /// [default: /var/lib/deltavol/mounts]
    #[arg(long)]
    pub mount_root: Option<PathBuf>,
    /// The Docker volume plugin socket. [default: /run/docker/plugins/deltavol.sock]
    #[arg(long)]
    pub plugin_socket: Option<PathBuf>,
    /// The agent's own socket (`deltavol snapshot` asks it to freeze mounted filesystems).
    /// [default: /run/deltavol/agent.sock]
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Size of a volume created without `-o size=`. [default: 10GiB]
    #[arg(long)]
    pub default_size: Option<String>,
    /// Filesystem made on a new volume's first mount: ext4 or xfs. [default: ext4]
    #[arg(long)]
    pub fs: Option<String>,
    /// Epoch interval of the node's volumes, e.g. 15s, 500ms. [default: deltavol add's]
    #[arg(long)]
    pub flush_interval: Option<String>,
    /// SSD space each volume's cache may use. [default: deltavol add's]
    #[arg(long)]
    pub cache_limit: Option<String>,
    /// Read-cache memory per volume. [default: deltavol add's]
    #[arg(long)]
    pub read_cache: Option<String>,
    /// Background hydration rate limit per volume (0 = unlimited).
    #[arg(long)]
    pub hydrate_rate: Option<String>,
    /// Fetched ahead of reads in order of a hydrating volume (0 = none). [default: deltavol
    /// add's]
    #[arg(long)]
    pub hydrate_readahead: Option<String>,
    /// Order of background hydration: hot-first (the heat map) or lba. [default: deltavol
    /// add's]
    #[arg(long)]
    pub hydrate_order: Option<String>,
    /// How often each volume's read heat map goes to the data plane, in seconds (0 = keep
    /// none). [default: deltavol add's]
    #[arg(long, value_name = "SECS")]
    pub heat_interval_s: Option<u64>,
    /// Retention policy of the volumes' snapshots on the data plane, e.g.
    /// last=50,hourly=24,daily=7 (a volume's `-o retention=` overrides it). Unset: the data
    /// plane's policy of each volume stays as it is.
    #[arg(long)]
    pub retention: Option<String>,
}

/// The file's keys: the flags' names with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dataplane: Option<String>,
    auth_token_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_server_name: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure: Option<bool>,
    state_dir: Option<PathBuf>,
    cache_root: Option<PathBuf>,
    backing_root: Option<PathBuf>,
    mount_root: Option<PathBuf>,
    plugin_socket: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    default_size: Option<String>,
    fs: Option<String>,
    flush_interval: Option<String>,
    cache_limit: Option<String>,
    read_cache: Option<String>,
    hydrate_rate: Option<String>,
    hydrate_readahead: Option<String>,
    hydrate_order: Option<String>,
    heat_interval_s: Option<u64>,
    retention: Option<String>,
}

/// Everything the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub dataplane: Option<String>,
    pub auth_token_file: Option<PathBuf>,
    /// TLS to the data plane (or insecure plain TCP), passed to every volume's daemon.
    pub tls: crate::cli::TlsArgs,
    pub state_dir: PathBuf,
    pub cache_root: PathBuf,
    pub backing_root: PathBuf,
    pub mount_root: PathBuf,
    pub plugin_socket: PathBuf,
    pub api_socket: PathBuf,
    pub default_size: u64,
    pub fs: Fs,
    pub flush_interval_ms: Option<u64>,
    pub cache_limit: Option<u64>,
    pub read_cache: Option<u64>,
    pub hydrate_rate: Option<u64>,
    pub hydrate_readahead: Option<u64>,
    /// `hot-first` or `lba`.
    pub hydrate_order: Option<String>,
    /// Seconds between heat-map uploads (0: none).
    pub heat_interval_s: Option<u64>,
    /// Retention policy for the volumes (normalised `last=N,...`).
    pub retention: Option<String>,
    /// Longest a cut may keep filesystems frozen waiting for an earlier flush.
    pub cut_timeout: Duration,
    /// How long a snapshot waits for the data plane's commit.
    pub commit_timeout: Duration,
    /// How often the supervisor looks at the daemons.
    pub supervise_every: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            dataplane: None,
            auth_token_file: None,
            tls: crate::cli::TlsArgs::default(),
            state_dir: "/var/lib/deltavol/agent".into(),
            cache_root: "/var/lib/deltavol/cache".into(),
            backing_root: "/var/lib/deltavol/backing".into(),
            mount_root: "/var/lib/deltavol/mounts".into(),
            plugin_socket: "/run/docker/plugins/deltavol.sock".into(),
            api_socket: crate::control::run_dir().join("agent.sock"),
            default_size: 10 << 30,
            fs: Fs::Ext4,
            flush_interval_ms: None,
            cache_limit: None,
            read_cache: None,
            hydrate_rate: None,
            hydrate_readahead: None,
            hydrate_order: None,
            heat_interval_s: None,
            retention: None,
            cut_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(60),
            supervise_every: Duration::from_secs(1),
        }
    }
}

/// `15s`, `500ms`, `2m`, `1h`, or a bare number of milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (t, 1)
    };
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration: use e.g. 15s, 500ms, 2m"))?;
    let ms = v
        .checked_mul(mul)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long"))?;
    if ms == 0 {
        bail!("{s:?}: the interval must be at least 1ms");
    }
    Ok(ms)
}

/// A readahead size `deltavol add --hydrate-readahead` takes: a multiple of 256KiB up to 64MiB.
pub fn check_readahead(v: u64) -> anyhow::Result<u64> {
    let ext = crate::hydrate::HYDRATE_EXTENT_BLOCKS * crate::cache::meta::BLOCK_SIZE;
    if v % ext != 0 || v > 64 << 20 {
        bail!("{v} is not a multiple of 256KiB up to 64MiB (0 turns readahead off)");
    }
    Ok(v)
}

/// A hydration order `deltavol add --hydrate-order` takes.
pub fn check_order(v: &str) -> anyhow::Result<String> {
    match v {
        "hot-first" | "lba" => Ok(v.to_string()),
        _ => bail!("{v:?} is not a hydration order: hot-first or lba"),
    }
}

fn size(key: &str, v: &str) -> anyhow::Result<u64> {
    parse_size(v).map_err(|e| anyhow::anyhow!("{key} = {v:?}: {e}"))
}

impl AgentArgs {
    /// The file (if any) under the flags.
    pub fn resolve(&self) -> anyhow::Result<AgentConfig> {
        let (file, path) = match &self.config {
            Some(p) => (Some(read_file(p)?), Some(p.clone())),
            None if Path::new(CONFIG_DEFAULT).exists() => (
                Some(read_file(Path::new(CONFIG_DEFAULT))?),
                Some(PathBuf::from(CONFIG_DEFAULT)),
            ),
            None => (None, None),
        };
        let f = file.unwrap_or_default();
        let ctx = |r: anyhow::Result<u64>| -> anyhow::Result<u64> {
            match &path {
                Some(p) => r.with_context(|| format!("in {} or on the command line", p.display())),
                None => r,
            }
        };
        let d = AgentConfig::default();
        let pick_s = |a: &Option<String>, b: Option<String>| a.clone().or(b);
        let pick_p =
            |a: &Option<PathBuf>, b: Option<PathBuf>, def: PathBuf| a.clone().or(b).unwrap_or(def);
        let opt_size = |key: &str, a: &Option<String>, b: Option<String>| {
            pick_s(a, b).map(|v| ctx(size(key, &v))).transpose()
        };
        let cfg = AgentConfig {
            dataplane: pick_s(&self.dataplane, f.dataplane),
            auth_token_file: self.auth_token_file.clone().or(f.auth_token_file),
            tls: crate::cli::TlsArgs {
                tls_ca: self.tls.tls_ca.clone().or(f.tls_ca),
                tls_server_name: pick_s(&self.tls.tls_server_name, f.tls_server_name),
                tls_cert: self.tls.tls_cert.clone().or(f.tls_cert),
                tls_key: self.tls.tls_key.clone().or(f.tls_key),
                insecure: self.tls.insecure || f.insecure.unwrap_or(false),
            },
            state_dir: pick_p(&self.state_dir, f.state_dir, d.state_dir),
            cache_root: pick_p(&self.cache_root, f.cache_root, d.cache_root),
            backing_root: pick_p(&self.backing_root, f.backing_root, d.backing_root),
            mount_root: pick_p(&self.mount_root, f.mount_root, d.mount_root),
            plugin_socket: pick_p(&self.plugin_socket, f.plugin_socket, d.plugin_socket),
            api_socket: pick_p(&self.api_socket, f.api_socket, d.api_socket),
            default_size: match pick_s(&self.default_size, f.default_size) {
                Some(v) => ctx(size("default_size", &v))?,
                None => d.default_size,
            },
            fs: match pick_s(&self.fs, f.fs) {
                Some(v) => Fs::parse(&v)?,
                None => d.fs,
            },
            flush_interval_ms: pick_s(&self.flush_interval, f.flush_interval)
                .map(|v| ctx(parse_duration_ms(&v).context("flush_interval")))
                .transpose()?,
            cache_limit: opt_size("cache_limit", &self.cache_limit, f.cache_limit)?,
            read_cache: opt_size("read_cache", &self.read_cache, f.read_cache)?,
            hydrate_rate: opt_size("hydrate_rate", &self.hydrate_rate, f.hydrate_rate)?,
            hydrate_readahead: opt_size(
                "hydrate_readahead",
                &self.hydrate_readahead,
                f.hydrate_readahead,
            )?
            .map(|v| check_readahead(v).context("hydrate_readahead"))
            .transpose()?,
            hydrate_order: pick_s(&self.hydrate_order, f.hydrate_order)
                .map(|v| check_order(&v).context("hydrate_order"))
                .transpose()?,
            heat_interval_s: self.heat_interval_s.or(f.heat_interval_s),
            retention: pick_s(&self.retention, f.retention)
                .map(|r| {
                    deltavol_dataplane::retention::Policy::parse(&r)
                        .map(|p| p.to_string())
                        .map_err(|e| anyhow::anyhow!("retention = {r:?}: {e}"))
                })
                .transpose()?,
            ..d
        };
        if cfg.dataplane.is_some() != cfg.auth_token_file.is_some() {
            bail!("dataplane and auth_token_file go together: give both (flags or the config file) or neither");
        }
        if cfg.tls.tls_ca.is_some() && cfg.tls.insecure {
            bail!("tls_ca and insecure exclude each other: TLS, or plain TCP (insecure)");
        }
        if cfg.tls.tls_cert.is_some() != cfg.tls.tls_key.is_some() {
            bail!("tls_cert and tls_key go together");
        }
        if (cfg.tls.tls_cert.is_some() || cfg.tls.tls_server_name.is_some())
            && cfg.tls.tls_ca.is_none()
        {
            bail!("tls_cert and tls_server_name need tls_ca (the data plane's CA)");
        }
        if let Some(dp) = &cfg.dataplane {
            crate::ship::DataPlaneAddrs::parse(dp)
                .map_err(|e| anyhow::anyhow!("dataplane = {dp:?}: {e}"))?;
        }
        if cfg.default_size == 0 || cfg.default_size % 4096 != 0 {
            bail!("default_size must be a positive multiple of 4KiB");
        }
        Ok(cfg)
    }
}

fn read_file(p: &Path) -> anyhow::Result<FileConfig> {
    let s = std::fs::read_to_string(p)
        .with_context(|| format!("read the agent config {}", p.display()))?;
    toml::from_str(&s).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(body: &str) -> (tempfile::TempDir, AgentArgs) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        std::fs::write(&p, body).unwrap();
        let a = AgentArgs {
            config: Some(p),
            ..Default::default()
        };
        (d, a)
    }

    #[test]
    fn file_then_flags_override() {
        let (_d, mut a) = with_file(
            "dataplane = \"10.0.0.5:7070\"\nauth_token_file = \"/etc/deltavol/token\"\ncache_root = \"/ssd/dv\"\ndefault_size = \"1GiB\"\nflush_interval = \"5s\"\nfs = \"xfs\"\n",
        );
        let c = a.resolve().unwrap();
        assert_eq!(c.dataplane.as_deref(), Some("10.0.0.5:7070"));
        assert_eq!(c.cache_root, PathBuf::from("/ssd/dv"));
        assert_eq!(c.default_size, 1 << 30);
        assert_eq!(c.flush_interval_ms, Some(5000));
        assert_eq!(c.fs, Fs::Xfs);
        assert_eq!(c.mount_root, PathBuf::from("/var/lib/deltavol/mounts"));
        a.cache_root = Some("/other".into());
        a.flush_interval = Some("250ms".into());
        let c = a.resolve().unwrap();
        assert_eq!(c.cache_root, PathBuf::from("/other"));
        assert_eq!(c.flush_interval_ms, Some(250));
    }

    #[test]
    fn hydration_keys_and_their_mistakes() {
        let (_d, a) = with_file(
            "hydrate_readahead = \"4MiB\"\nhydrate_order = \"lba\"\nheat_interval_s = 0\n",
        );
        let c = a.resolve().unwrap();
        assert_eq!(c.hydrate_readahead, Some(4 << 20));
        assert_eq!(c.hydrate_order.as_deref(), Some("lba"));
        assert_eq!(c.heat_interval_s, Some(0));
        for (body, want) in [
            ("hydrate_readahead = \"1000\"\n", "not a multiple of 256KiB"),
            ("hydrate_readahead = \"128MiB\"\n", "up to 64MiB"),
            ("hydrate_order = \"random\"\n", "hot-first or lba"),
        ] {
            let (_d, a) = with_file(body);
            let e = format!("{:#}", a.resolve().unwrap_err());
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn tls_keys_from_the_file_and_their_mistakes() {
        let (_d, a) = with_file(
            "dataplane = \"dp.example:7070\"\nauth_token_file = \"/etc/deltavol/node.cred\"\ntls_ca = \"/etc/deltavol/ca.pem\"\ntls_server_name = \"dp.example\"\n",
        );
        let c = a.resolve().unwrap();
        assert_eq!(c.tls.tls_ca, Some(PathBuf::from("/etc/deltavol/ca.pem")));
        assert_eq!(c.tls.tls_server_name.as_deref(), Some("dp.example"));
        let args: Vec<String> = c
            .tls
            .to_args()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--tls-ca",
                "/etc/deltavol/ca.pem",
                "--tls-server-name",
                "dp.example"
            ]
        );
        for (body, needle) in [
            ("tls_ca = \"/c\"\ninsecure = true\n", "exclude each other"),
            ("tls_ca = \"/c\"\ntls_cert = \"/n\"\n", "go together"),
            ("tls_cert = \"/n\"\ntls_key = \"/k\"\n", "need tls_ca"),
            ("insecure = \"yes\"\n", "insecure"),
        ] {
            let (_d, a) = with_file(body);
            let e = format!("{:#}", a.resolve().unwrap_err());
            assert!(e.contains(needle), "{body:?}: {e}");
        }
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let (_d, a) = with_file("cache_rot = \"/x\"\n");
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("agent.toml") && e.contains("cache_rot"), "{e}");
        let (_d, a) = with_file("default_size = 12\n");
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("default_size"), "{e}");
        let (_d, a) = with_file("default_size = \"lots\"\n");
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("default_size") && e.contains("lots"), "{e}");
        let (_d, a) = with_file("dataplane = \"10.0.0.5:7070\"\n");
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("auth_token_file"), "{e}");
        let a = AgentArgs {
            config: Some("/nonexistent/agent.toml".into()),
            ..Default::default()
        };
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
        let a = AgentArgs {
            flush_interval: Some("soon".into()),
            ..Default::default()
        };
        assert!(format!("{:#}", a.resolve().unwrap_err()).contains("soon"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("15s").unwrap(), 15_000);
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("2m").unwrap(), 120_000);
        assert_eq!(parse_duration_ms("1h").unwrap(), 3_600_000);
        assert_eq!(parse_duration_ms("700").unwrap(), 700);
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("-1s").is_err());
        assert!(parse_duration_ms("1d").is_err());
    }
}
