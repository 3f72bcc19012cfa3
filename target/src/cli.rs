//! The command line: `deltavol add | del | list | status | flush`, in the manner of the ublk
//! tools people know (rublk, ublksrv): `add` prints the device once it is live, `--json` for
//! scripts, and every error says what to do.

use crate::cache::{holds_volume, CacheConfig};
use crate::control::{self, Request};
use crate::daemon::{self, AddConfig, DEPTH_MAX, QUEUES_MAX};
use crate::ship::DataPlaneAddrs;
use crate::size::{format_size, parse_size};
use crate::volume::{VolumeConfig, FLUSH_INTERVAL_MS_DEFAULT};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "deltavol",
    version,
    about = "Block volumes for containers: a ublk device with an SSD writeback cache, flushed to permanent storage at set intervals."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a volume (or reattach an existing one) and serve it as /dev/ublkbN.
    Add(AddArgs),
    /// Flush a volume to permanent storage and remove its device; its files are kept.
    Del {
        /// Volume name.
        name: String,
        /// Remove the device even if it is open (mounted): I/O to it fails from then on.
        #[arg(long)]
        force: bool,
    },
    /// List attached volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's device, epochs, cache use and flush state.
    Status {
        /// Volume name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// A live terminal view of every volume attached on this node: IOPS, throughput, dirty
    /// bytes, SSD use, epoch, recovery point, outbox, hydration and errors, refreshed every
    /// interval. Keys: q or Esc quits, arrows or j/k select, Enter or d shows the selected
    /// volume's status.
    Top {
        /// Refresh interval in milliseconds (rates are over one interval).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
        interval_ms: u64,
        /// Print one plain-text frame and exit (rates over one interval), for scripts.
        #[arg(long)]
        once: bool,
    },
    /// Cut the current epoch now and wait until it is on permanent storage.
    Flush {
        /// Volume name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a snapshot now: cut, flush, ship, and wait for the data plane's commit; prints its id.
    ///
    /// A volume the node agent manages (`deltavol agent`, e.g. a Docker volume) is snapshotted
    /// through the agent, which freezes its mounted filesystem around the cut (a
    /// filesystem-consistent snapshot). Several names (or --container) make a consistency
    /// group: their filesystems are frozen together and every volume is cut at one moment.
    Snapshot {
        /// Volume name(s).
        #[arg(required_unless_present = "container")]
        names: Vec<String>,
        /// Snapshot every deltavol volume of this Docker container, at one moment (asks
        /// `docker inspect` which they are).
        #[arg(long)]
        container: Option<String>,
        /// How long to wait for the data plane's commit; past it the snapshot stays queued in
        /// the outbox (exit status 2).
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        /// Pin the new snapshot: retention never removes it until `snapshots unpin`.
        #[arg(long)]
        pin: bool,
        /// A label for the pinned snapshot, e.g. before-upgrade (implies --pin).
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A volume's snapshots on the data plane: `snapshots NAME` lists them (id, parent, cut
    /// time, commit time where it differs by more than 5 s, bytes, extents, pin and label) and
    /// the retention policy; `snapshots retention | prune | pin | unpin | delete` manage them.
    Snapshots(SnapshotsArgs),
    /// Bring a volume back on this machine from its last snapshot on the data plane: the device
    /// is live at once, reads of blocks not yet here are fetched on the fly, the rest hydrates
    /// in the background. Fences the old machine (it can ship nothing more).
    Recover {
        /// Volume name on the data plane.
        name: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[command(flatten)]
        dev: DeviceArgs,
        /// Wait until hydration is complete, showing progress.
        #[arg(long)]
        wait: bool,
        /// Recover the volume as it was at TIME: the newest snapshot cut at or before it
        /// (RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' UTC unless a zone follows, or an age like -15m).
        /// The blocks that differ from the chain head are written back first (fetched by
        /// checksum), and shipped as the chain's next snapshot, before the device is live.
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Create a new volume from a snapshot (metadata-only on the data plane) and serve it;
    /// it hydrates like `recover`, and has its own snapshot chain.
    Clone {
        /// NAME@SNAPSHOT_ID, or NAME@TIME: the newest snapshot cut at or before TIME (RFC 3339,
        /// "YYYY-MM-DD HH:MM[:SS]" in UTC unless a zone follows, or an age like -15m).
        spec: String,
        /// Name of the new volume.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[command(flatten)]
        dev: DeviceArgs,
        /// Wait until hydration is complete, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Scrub: compare the volume's permanent storage with its newest snapshot on the data
    /// plane and report the LBA ranges that differ (exit status 1 if any do).
    ///
    /// The live volume moves on after each snapshot, so verify compares what must be equal:
    /// it cuts a fresh snapshot (flushed to the backing file and shipped), waits for the data
    /// plane to commit it, then holds the flush thread (applications keep writing, into the
    /// SSD cache) while it reads the backing file and compares the crc32c of every 4 KiB
    /// block with the one the data plane computes for that snapshot (only checksums cross the
    /// network). An encrypted volume is compared on its data instead (the data plane's
    /// checksums are of ciphertext): each block of the snapshot is read, opened with the
    /// volume's key and compared byte for byte, so the whole volume crosses the network; a
    /// block that does not open counts as differing. If the SSD cache fills while the flush is
    /// held, writes wait (backpressure) until verify ends. A difference means the backing disk
    /// or the data plane holds damaged data. Refused while the volume is still hydrating.
    Verify {
        /// Volume name (attached, with a data plane).
        name: String,
        /// How long to wait for the fresh snapshot's commit on the data plane.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// A volume as the data plane keeps it: `volume info` shows its id, size and chain;
    /// `volume delete` removes it with every snapshot.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// The node agent: owns this node's volumes (starts and restarts their daemons, mounts
    /// them, keeps a durable record) and serves the Docker volume plugin on
    /// /run/docker/plugins/deltavol.sock (`docker volume create -d deltavol`). Runs in the
    /// foreground (systemd: deltavol-agent.service); reads /etc/deltavol/agent.toml.
    Agent(crate::agent::config::AgentArgs),
    /// Write a volume as of one snapshot into an image file (sparse), from the data plane alone.
    Export {
        /// NAME@SNAPSHOT_ID, or NAME@TIME: the newest snapshot cut at or before TIME (RFC 3339,
        /// "YYYY-MM-DD HH:MM[:SS]" in UTC unless a zone follows, or an age like -15m).
        spec: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        /// The image file to write (created or truncated).
        #[arg(long)]
        output: PathBuf,
        /// The volume's key, when it is encrypted on the data plane (its blocks are opened
        /// here; a block that does not open stops the export, naming it).
        #[arg(long, value_name = "FILE")]
        encryption_key_file: Option<PathBuf>,
    },
    /// Make a new key for client-side encryption (`--encryption-key-file` of `add`, `recover`,
    /// `clone`, `export`): 32 random bytes as 64 hex digits in a new file of mode 0600; prints
    /// its key id. Never overwrites a file. Keep a copy somewhere safe: without the key, an
    /// encrypted volume's snapshots can never be read again.
    Keygen {
        /// The key file to create.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotsArgs {
    #[command(subcommand)]
    pub cmd: Option<SnapshotsCmd>,
    /// Volume name (lists its snapshots).
    #[arg(required = true)]
    pub name: Option<String>,
    /// Data-plane server address, HOST:PORT; or several, comma-separated (servers sharing one
    /// object store with --multi-server): the one that worked last is tried first, then the
    /// others in order, until one serves the volume.
    #[arg(long, value_parser = parse_dataplane)]
    pub dataplane: Option<DataPlaneAddrs>,
    /// File holding this node's credential or the data plane's admin token.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotsCmd {
    /// List the snapshots (the same as `snapshots NAME`): ids, cut and commit times, pins
    /// and labels, and sizes: BYTES is the snapshot's own changes as stored, OWN the part the
    /// next snapshot overwrote (deleting this one gives it back), SHARED the part later
    /// snapshots still read.
    List {
        name: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show the volume's retention policy, or set it: POLICY is
    /// `last=N,hourly=N,daily=N,weekly=N,monthly=N` (any subset), or `none` to keep every
    /// snapshot. The data plane applies it at once and after every commit, also while the
    /// node is away; the chain head, pinned snapshots, clone sources and snapshots a
    /// hydration is reading are always kept.
    Retention {
        name: String,
        policy: Option<String>,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention policy now; --dry-run says what it would delete and why each other
    /// snapshot stays.
    Prune {
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pin a snapshot (NAME@ID or NAME@TIME): never deleted, by retention or by hand, until
    /// unpinned.
    Pin {
        spec: String,
        /// A label shown beside it, e.g. before-upgrade.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Unpin a snapshot (its label stays).
    Unpin {
        spec: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete one snapshot (NAME@ID): its changes merge into the next snapshot, so every other
    /// snapshot reads as before. Refused for the chain head, a pinned snapshot and a clone's
    /// source.
    Delete {
        spec: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Show a volume on the data plane: id, size, chain head, snapshot count, last commit,
    /// clone source.
    Info {
        /// Volume name on the data plane.
        name: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and every snapshot of it from the data plane (not from this node's
    /// disks), e.g. to free its name for a new volume. Irreversible. Refused while a clone
    /// depends on one of its snapshots, and while the volume is attached on this node.
    Delete {
        /// Volume name on the data plane.
        name: String,
        /// The volume's id (32 hex digits, as `volume info` or the refusal that named it
        /// shows): a confirmation, so that another volume of that name is never deleted.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        dp: DataPlaneArgs,
        #[arg(long)]
        json: bool,
    },
}

/// How to reach the data plane.
#[derive(Args, Debug, Clone)]
pub struct DataPlaneArgs {
    /// Data-plane server address, HOST:PORT; or several, comma-separated (servers sharing one
    /// object store with --multi-server): the one that worked last is tried first, then the
    /// others in order, until one serves the volume.
    #[arg(long, value_parser = parse_dataplane)]
    pub dataplane: DataPlaneAddrs,
    /// File holding this node's credential (`dvc1.…`, from `deltavol-dataplane credentials
    /// issue`) or the data plane's admin token.
    #[arg(long)]
    pub auth_token_file: PathBuf,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How connections to the data plane are protected.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// TLS: the CA certificate (PEM) the data plane's certificate must chain to (`ca.pem` of
    /// `deltavol-dataplane tls init`). Without it, plain TCP, to a loopback address only
    /// unless --insecure.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The name the data plane's certificate must carry (default: the host of --dataplane).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// Mutual TLS: this node's certificate (PEM), for a data plane with --tls-client-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Plain TCP to a data plane that is not on loopback: snapshots and hydration cross the
    /// network unencrypted (`status` says so).
    #[arg(long, conflicts_with = "tls_ca")]
    pub insecure: bool,
}

impl TlsArgs {
    /// The client's access: `secret` (a credential or the admin token) with this TLS.
    pub fn access(&self, secret: &[u8]) -> anyhow::Result<deltavol_dataplane::ClientAccess> {
        let access = deltavol_dataplane::ClientAccess::new(secret).insecure(self.insecure);
        let Some(ca) = &self.tls_ca else {
            return Ok(access);
        };
        let ca = absolute(ca)?;
        let client = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((absolute(c)?, absolute(k)?)),
            _ => None,
        };
        let tls = deltavol_dataplane::tls::ClientTls::load(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )?;
        Ok(access.with_tls(tls, self.tls_server_name.clone()))
    }

    /// These flags as arguments again (for the agent's daemons).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut push = |flag: &str, v: &Option<PathBuf>| {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.into());
            }
        };
        push("--tls-ca", &self.tls_ca);
        push("--tls-cert", &self.tls_cert);
        push("--tls-key", &self.tls_key);
        if let Some(n) = &self.tls_server_name {
            a.push("--tls-server-name".into());
            a.push(n.into());
        }
        if self.insecure {
            a.push("--insecure".into());
        }
        a
    }
}

impl DataPlaneArgs {
    /// A connection that reads `volume` by name (no identity: any volume of that name).
    pub(crate) fn connect(&self, volume: &str) -> anyhow::Result<deltavol_dataplane::Client> {
        self.connect_as(volume, None)
    }

    /// A connection as the volume with identity `volume_id` (`None`: by name only).
    fn connect_as(
        &self,
        volume: &str,
        volume_id: Option<[u8; 16]>,
    ) -> anyhow::Result<deltavol_dataplane::Client> {
        let token =
            crate::ship::read_token(&self.auth_token_file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let access = self.tls.access(&token)?;
        let t = deltavol_dataplane::Timeouts {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(60),
        };
        // Generation 0: these connections write nothing a fence applies to.
        let (c, addr) = self
            .dataplane
            .connect(volume, |addr| {
                let access = crate::ship::access_for(&access, addr);
                deltavol_dataplane::Client::connect_as(addr, &access, volume, t, 0, volume_id)
                    .map_err(|e| {
                        crate::error::Error::new(crate::error::ErrorKind::Io, e.to_string())
                    })
            })
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "connect to the data plane at {} for volume {volume:?}",
                    self.dataplane
                )
            })?;
        if self.dataplane.list().len() > 1 {
            eprintln!("data plane: volume {volume} is served by {addr}");
        }
        Ok(c)
    }
}

/// `--dataplane HOST:PORT[,HOST:PORT...]`.
fn parse_dataplane(s: &str) -> Result<DataPlaneAddrs, String> {
    DataPlaneAddrs::parse(s).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Volume name (1-64 of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    pub name: String,
    /// Volume size, e.g. 10GiB, 256MiB, 4G. Required to create; checked on reattach.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Ship every flushed epoch as a snapshot to this data-plane server (HOST:PORT); or to
    /// the first of several, comma-separated (servers sharing one object store with
    /// --multi-server), that serves the volume: on a refused connection, a timeout, or a
    /// server answering that another holds the volume, the next is tried.
    #[arg(long, requires = "auth_token_file", value_parser = parse_dataplane)]
    pub dataplane: Option<DataPlaneAddrs>,
    /// File holding this node's credential (`dvc1.…`, from `deltavol-dataplane credentials
    /// issue`) or the data plane's admin token (with --dataplane).
    #[arg(long, requires = "dataplane")]
    pub auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// The local side of a volume: where it lives and how its device is served.
/// The order of background hydration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HydrateOrder {
    /// The regions read most first (the heat map), then the rest in block order.
    HotFirst,
    /// Block order.
    Lba,
}

/// Whether a timed flush is spread over the flush interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlushPacing {
    /// Spread over the interval, yielding between chunks (see `deltavol::flush`).
    On,
    /// At full speed, as soon as the epoch is cut.
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Directory on fast SSD for the writeback cache (created if missing).
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Permanent storage: a volume-sized file (created if missing) or block device.
    #[arg(long)]
    pub backing: PathBuf,
    /// Number of ublk queues (one thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Queue depth: requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
    /// Interval between epoch cuts (flushes to permanent storage), in milliseconds.
    #[arg(long, default_value_t = FLUSH_INTERVAL_MS_DEFAULT)]
    pub flush_interval_ms: u64,
    /// `on`: spread each timed flush over half the flush interval, pausing between
    /// batches, so that the backing disk, the data plane and the CPU see a steady trickle
    /// rather than a burst (fewer foreground stalls; the snapshot lands up to half an interval
    /// later); `off`: flush at full speed. `deltavol snapshot`, `del` and a flush forced by a
    /// full cache always run at full speed. Off by default: in the test VM an unpaced flush
    /// already takes half the interval or more, so pacing had nothing to spread there
    /// (bench/results/snapshot-work-2026-12-05.md).
    #[arg(long, value_enum, value_name = "on|off", default_value = "off")]
    pub flush_pacing: FlushPacing,
    /// SSD space the cache may use; above half of it a flush starts early, at it writes wait.
    #[arg(long, value_parser = parse_size, default_value = "2GiB")]
    pub cache_limit: u64,
    /// Memory for the LRU read cache of clean blocks (0 disables it).
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub read_cache: u64,
    /// Where snapshots wait while the data plane is unreachable (default: NAME.outbox next to
    /// the backing file, on the same disk).
    #[arg(long, requires = "dataplane")]
    pub outbox_dir: Option<PathBuf>,
    /// Client-side encryption: the volume's key (a file of 64 hex digits, mode 0600, as
    /// `deltavol keygen` makes). Every block is sealed on this node (XChaCha20-Poly1305)
    /// before it is shipped and opened after it is read back, so the data plane and its object
    /// store never hold plaintext; the key is never sent. Chosen when a volume is created (a
    /// new volume, or `recover`/`clone` of an encrypted one); every later attach needs the
    /// same key, and a volume created without one cannot be given one.
    #[arg(long, value_name = "FILE", requires = "dataplane")]
    pub encryption_key_file: Option<PathBuf>,
    /// Retention policy of the volume's snapshots on the data plane, set at each attach:
    /// `last=N,hourly=N,daily=N,weekly=N,monthly=N` (any subset; `none` keeps all). The data
    /// plane applies it after every commit. Unset: the data plane's policy stays as it is
    /// (`deltavol snapshots retention` shows and changes it).
    #[arg(long, value_name = "POLICY")]
    pub retention: Option<String>,
    /// Background hydration rate limit per second, e.g. 100MiB (0 = unlimited); only while
    /// the volume hydrates after `recover` or `clone`.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub hydrate_rate: u64,
    /// While the volume hydrates: how much is fetched ahead of reads of blocks not yet local
    /// that come in order (a multiple of 256KiB, at most 64MiB; 0 = no readahead).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "2MiB")]
    pub hydrate_readahead: u64,
    /// While the volume hydrates: `hot-first` fills the regions its heat map (shipped to the
    /// data plane from the volume's earlier life) says were read most first, then the rest in
    /// order; `lba` fills in block order only.
    #[arg(long, value_enum, default_value = "hot-first")]
    pub hydrate_order: HydrateOrder,
    /// How often the volume's read heat map (which regions are read most) goes to the data
    /// plane, in seconds, for a later recovery to hydrate those first; 0 = keep none. Never
    /// for an encrypted volume.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub heat_interval_s: u64,
    /// Zero copy: `auto` runs the device with the kernel's auto buffer registration
    /// (UBLK_F_AUTO_BUF_REG, Linux 6.16+) where the kernel has it, so request data goes
    /// between the request's pages and the cache files without a copy through this process;
    /// `on` refuses to start on a kernel without it; `off` always copies. Blocks served from
    /// the read cache or fetched from the data plane still pass through memory. A device
    /// taken over (--user-recovery) keeps the mode it was created with. Default: auto, or
    /// the environment's DELTAVOL_ZERO_COPY.
    #[arg(long, value_enum, value_name = "MODE")]
    pub zero_copy: Option<crate::zerocopy::ZeroCopy>,
    /// Kernel user recovery: if the daemon dies, the device stays and its I/O waits until
    /// `deltavol add` of the same volume takes it over (a mounted filesystem carries on).
    /// Without a successor that I/O waits forever; `del` then fails it.
    #[arg(long)]
    pub user_recovery: bool,
    /// Serve Prometheus metrics of the volume at http://ADDR/metrics (plain HTTP, a thread of
    /// its own), e.g. 127.0.0.1:9100; one address per attached volume.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Stay in the foreground (logs to stderr) instead of daemonizing.
    #[arg(long)]
    pub foreground: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir().context("current dir")?.join(p))
}

impl AddArgs {
    pub fn to_config(&self) -> anyhow::Result<AddConfig> {
        if self.dev.queues == 0 || self.dev.queues > QUEUES_MAX {
            bail!(
                "--queues {} is out of range: use 1 to {QUEUES_MAX}",
                self.dev.queues
            );
        }
        if self.dev.depth == 0 || self.dev.depth > DEPTH_MAX {
            bail!(
                "--depth {} is out of range: use 1 to {DEPTH_MAX}",
                self.dev.depth
            );
        }
        let ext_bytes = crate::hydrate::HYDRATE_EXTENT_BLOCKS * crate::cache::meta::BLOCK_SIZE;
        if self.dev.hydrate_readahead % ext_bytes != 0 || self.dev.hydrate_readahead > 64 << 20 {
            bail!(
                "--hydrate-readahead {} is not a multiple of 256KiB up to 64MiB (0 turns readahead off)",
                self.dev.hydrate_readahead
            );
        }
        if self.dev.flush_interval_ms == 0 {
            bail!("--flush-interval-ms must be at least 1");
        }
        crate::cache::validate_name(&self.name).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(s) = self.size {
            if s == 0 || s % 4096 != 0 {
                bail!("--size {s} must be a positive multiple of 4KiB");
            }
        }
        if self.dataplane.is_none() && (self.tls.tls_ca.is_some() || self.tls.insecure) {
            bail!("--tls-ca and --insecure say how to reach the data plane: give --dataplane too");
        }
        if self.dev.retention.is_some() && self.dataplane.is_none() {
            bail!("--retention is the policy of the volume's snapshots on the data plane: give --dataplane too");
        }
        let backing = absolute(&self.dev.backing)?;
        let ship = match (&self.dataplane, &self.auth_token_file) {
            (Some(addr), Some(tok)) => {
                let token =
                    crate::ship::read_token(&absolute(tok)?).map_err(|e| anyhow::anyhow!("{e}"))?;
                let outbox_dir = match &self.dev.outbox_dir {
                    Some(d) => absolute(d)?,
                    None => {
                        let parent = backing
                            .parent()
                            .filter(|p| !p.starts_with("/dev"))
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "--backing {} is a device: give --outbox-dir on the same disk",
                                    backing.display()
                                )
                            })?;
                        parent.join(format!("{}.outbox", self.name))
                    }
                };
                let codec = crate::crypt::BlockCodec::from_key_file(
                    self.dev
                        .encryption_key_file
                        .as_deref()
                        .map(absolute)
                        .transpose()?
                        .as_deref(),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                Some(crate::ship::ShipConfig {
                    codec,
                    addrs: addr.clone(),
                    access: self.tls.access(&token)?,
                    outbox_dir,
                    connect_timeout: Duration::from_secs(2),
                    io_timeout: Duration::from_secs(10),
                    retention: self
                        .dev
                        .retention
                        .as_deref()
                        .map(|p| {
                            deltavol_dataplane::retention::Policy::parse(p)
                                .map_err(|e| anyhow::anyhow!("--retention {p:?}: {e}"))
                        })
                        .transpose()?,
                })
            }
            _ => None,
        };
        Ok(AddConfig {
            volume: VolumeConfig {
                ship,
                cache: CacheConfig {
                    name: self.name.clone(),
                    size_bytes: self.size,
                    cache_dir: absolute(&self.dev.cache_dir)?,
                    backing,
                    cache_limit_bytes: self.dev.cache_limit,
                    read_cache_bytes: self.dev.read_cache,
                    nr_queues: usize::from(self.dev.queues),
                    create_as: None,
                    journal: Default::default(),
                },
                flush_interval: Duration::from_millis(self.dev.flush_interval_ms),
                flush_pacing: self.dev.flush_pacing == FlushPacing::On,
                hydrate_rate_bytes_per_s: self.dev.hydrate_rate,
                hydrate_readahead_bytes: self.dev.hydrate_readahead,
                hydrate_hot_first: self.dev.hydrate_order == HydrateOrder::HotFirst,
                heat_interval: Duration::from_secs(self.dev.heat_interval_s),
                fetch_timeout: crate::volume::FETCH_TIMEOUT_DEFAULT,
            },
            user_recovery: self.dev.user_recovery,
            zero_copy: match self.dev.zero_copy {
                Some(z) => z,
                None => crate::zerocopy::ZeroCopy::from_env()?,
            },
            queues: self.dev.queues,
            depth: self.dev.depth,
            foreground: self.dev.foreground,
            json: self.dev.json,
            metrics_listen: self.dev.metrics_listen,
        })
    }
}

fn attached(name: &str) -> anyhow::Result<control::RunInfo> {
    crate::cache::validate_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    match control::read_info(&control::info_path(name))? {
        Some(i) if control::pid_alive(i.pid) => Ok(i),
        Some(i) => {
            let _ = daemon::remove_stale(&i);
            bail!("volume {name:?} is not attached: its daemon (pid {}) is gone; stale state removed. `deltavol add --name {name} --cache-dir {} --backing {}` reattaches it", i.pid, i.cache_dir.display(), i.backing.display())
        }
        None => bail!("volume {name:?} is not attached (`deltavol list` shows attached volumes)"),
    }
}

/// Whether the block device is open by someone else (mounted, or held with O_EXCL).
fn device_busy(dev: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    matches!(
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY)
    )
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Add(a) => daemon::add(a.to_config()?),
        Cmd::Del { name, force } => {
            if let Some(dead) = daemon::dead_daemon(&name) {
                // Its daemon died (kill -9, crash): clean up what it left, which is all `del`
                // can do; the volume's files are intact and `add` reattaches them.
                let removed = daemon::remove_stale(&dead)?;
                let what = removed
                    .map(|id| format!("; removed its stale device /dev/ublkc{id}"))
                    .unwrap_or_default();
                println!(
                    "volume {name}'s daemon (pid {}) had died{what}; volume files kept in {} and {} (`deltavol add` reattaches them)",
                    dead.pid,
                    dead.cache_dir.display(),
                    dead.backing.display()
                );
                return Ok(());
            }
            let info = attached(&name)?;
            if !force && device_busy(&info.device) {
                bail!(
                    "{} is in use (mounted or open): unmount it first, or pass --force",
                    info.device
                );
            }
            control::request(&info.socket, &Request::Stop, Some(Duration::from_secs(10)))?;
            let t0 = Instant::now();
            let mut told = false;
            while control::pid_alive(info.pid) {
                if !told && t0.elapsed() > Duration::from_secs(3) {
                    eprintln!(
                        "waiting for volume {name} to finish flushing to {} ...",
                        info.backing.display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!(
                "deleted {} ({}); volume files kept in {} and {}",
                name,
                info.device,
                info.cache_dir.display(),
                info.backing.display()
            );
            Ok(())
        }
        Cmd::List { json } => {
            let mut rows = Vec::new();
            if let Ok(rd) = std::fs::read_dir(control::run_dir()) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().and_then(|x| x.to_str()) != Some("json") {
                        continue;
                    }
                    if let Ok(Some(i)) = control::read_info(&p) {
                        if !control::pid_alive(i.pid) {
                            continue;
                        }
                        let st = control::request(
                            &i.socket,
                            &Request::Status,
                            Some(Duration::from_secs(2)),
                        )
                        .ok();
                        rows.push((i, st));
                    }
                }
            }
            rows.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(i, st)| {
                        st.clone()
                            .unwrap_or_else(|| serde_json::to_value(i).unwrap_or_default())
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20} {:<14} {:>8} {:>10} {:>8} {:>10}",
                    "NAME", "DEVICE", "PID", "SIZE", "EPOCH", "DIRTY"
                );
                for (i, st) in &rows {
                    let g = |k: &str| st.as_ref().and_then(|s| s.get(k)).and_then(|v| v.as_u64());
                    println!(
                        "{:<20} {:<14} {:>8} {:>10} {:>8} {:>10}",
                        i.name,
                        i.device,
                        i.pid,
                        g("size_bytes").map(format_size).unwrap_or("?".into()),
                        g("epoch").map(|e| e.to_string()).unwrap_or("?".into()),
                        g("dirty_bytes").map(format_size).unwrap_or("?".into()),
                    );
                }
            }
            Ok(())
        }
        Cmd::Status { name, json } => {
            let info = attached(&name)?;
            let v = control::request(&info.socket, &Request::Status, Some(Duration::from_secs(5)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Cmd::Snapshot {
            names,
            container,
            timeout_ms,
            pin,
            label,
            json,
        } => snapshot_cmd(
            names,
            container.as_deref(),
            timeout_ms,
            (pin || label.is_some()).then(|| label.unwrap_or_default()),
            json,
        ),
        Cmd::Agent(a) => crate::agent::run(a.resolve()?),
        Cmd::Top { interval_ms, once } => crate::top::run(interval_ms, once),
        Cmd::Recover {
            name,
            dp,
            dev,
            wait,
            at,
        } => recover(&name, &dp, dev, wait, at.as_deref()),
        Cmd::Clone {
            spec,
            name,
            dp,
            dev,
            wait,
        } => clone(&spec, &name, &dp, dev, wait),
        Cmd::Snapshots(a) => snapshots_cmd(a),
        Cmd::Export {
            spec,
            dp,
            output,
            encryption_key_file,
        } => export(&spec, &dp, &output, encryption_key_file.as_deref()),
        Cmd::Keygen { file, json } => keygen(&file, json),
        Cmd::Volume {
            cmd: VolumeCmd::Info { name, dp, json },
        } => volume_info(&name, &dp, json),
        Cmd::Volume {
            cmd: VolumeCmd::Delete { name, id, dp, json },
        } => volume_delete(&name, &id, &dp, json),
        Cmd::Verify {
            name,
            timeout_ms,
            json,
        } => verify(&name, timeout_ms, json),
        Cmd::Flush { name, json } => {
            let info = attached(&name)?;
            let v = control::request(&info.socket, &Request::Flush, None)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                println!(
                    "flushed epoch {}: {} extents, {} data, {} zeroed, {} ms",
                    g("epoch"),
                    g("extents"),
                    format_size(g("data_bytes")),
                    format_size(g("zero_bytes")),
                    g("duration_ms")
                );
            }
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The deltavol volumes of a Docker container (`docker inspect`).
fn container_volumes(container: &str) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{range .Mounts}}{{if eq .Driver \"deltavol\"}}{{.Name}} {{end}}{{end}}",
            container,
        ])
        .output()
        .context("run `docker inspect` (is docker installed?)")?;
    if !out.status.success() {
        bail!(
            "docker inspect {container}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if v.is_empty() {
        bail!("container {container} uses no deltavol volume");
    }
    Ok(v)
}

/// Pins `name@id` through the volume's daemon (which holds the data-plane credentials).
fn pin_through_daemon(name: &str, id: u64, label: &str) -> anyhow::Result<()> {
    let info = attached(name)?;
    control::request(
        &info.socket,
        &Request::Pin {
            snap_id: id,
            pinned: true,
            label: label.to_string(),
        },
        Some(Duration::from_secs(30)),
    )
    .with_context(|| format!("pin {name}@{id}"))?;
    Ok(())
}

fn snapshot_cmd(
    mut names: Vec<String>,
    container: Option<&str>,
    timeout_ms: u64,
    pin: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(c) = container {
        names.extend(container_volumes(c)?);
    }
    names.sort();
    names.dedup();
    for n in &names {
        crate::cache::validate_name(n).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let api = crate::agent::config::AgentConfig::default().api_socket;
    let managed: Vec<String> = if api.exists() {
        let v = control::call(
            &api,
            &crate::agent::AgentRequest::Manages {
                names: names.clone(),
            },
            Some(Duration::from_secs(10)),
            "the deltavol agent",
        )?;
        serde_json::from_value(v.get("managed").cloned().unwrap_or_default()).unwrap_or_default()
    } else {
        Vec::new()
    };
    if managed.len() == names.len() {
        let v = control::call(
            &api,
            &crate::agent::AgentRequest::Snapshot {
                names: names.clone(),
                timeout_ms: Some(timeout_ms),
            },
            None,
            "the deltavol agent",
        )?;
        if json {
            println!("{}", serde_json::to_string(&v)?);
        }
        let mut all = true;
        for r in v
            .get("volumes")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            let name = r.get("name").and_then(|x| x.as_str()).unwrap_or("?");
            let id = r.get("snapshot").and_then(|x| x.as_u64()).unwrap_or(0);
            let committed = r
                .get("committed")
                .and_then(|x| x.as_bool())
                .unwrap_or(false);
            let frozen = r.get("frozen").and_then(|x| x.as_bool()).unwrap_or(false);
            all &= committed;
            if let (Some(label), true) = (&pin, committed) {
                pin_through_daemon(name, id, label)?;
            }
            if !json {
                println!(
                    "{name}@{id}{}{}",
                    if frozen {
                        " (filesystem frozen for the cut)"
                    } else {
                        ""
                    },
                    if committed {
                        ""
                    } else {
                        ": not yet committed on the data plane (queued in the outbox)"
                    }
                );
            }
        }
        if !json && names.len() > 1 {
            let ms = v.get("frozen_ms").and_then(|x| x.as_u64()).unwrap_or(0);
            println!(
                "consistency group of {} volumes, cut at one moment (filesystems frozen {ms} ms)",
                names.len()
            );
        }
        if !all {
            std::process::exit(2);
        }
        return Ok(());
    }
    match names.as_slice() {
        [one] => snapshot(one, timeout_ms, pin.as_deref(), json),
        _ => bail!(
            "a snapshot of several volumes at one moment needs the deltavol agent to manage them all (it freezes their filesystems together); not managed by it: {}",
            names.iter().filter(|n| !managed.contains(n)).cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

fn snapshot(name: &str, timeout_ms: u64, pin: Option<&str>, json: bool) -> anyhow::Result<()> {
    let info = attached(name)?;
    let v = control::request(&info.socket, &Request::Snapshot { timeout_ms }, None)?;
    let id = v.get("snapshot").and_then(|x| x.as_u64()).unwrap_or(0);
    let committed = v
        .get("committed")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    if let (Some(label), true) = (pin, committed) {
        pin_through_daemon(name, id, label)?;
    }
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else if committed {
        println!("{id}");
    }
    if !committed {
        let err = v
            .get("last_error")
            .and_then(|e| e.as_str())
            .unwrap_or("no answer yet");
        if err.starts_with("fenced: ") {
            eprintln!("deltavol: snapshot {id} is durable in the outbox but is never committed to volume {name} ({err}); it goes to this node's branch volume on the data plane (`deltavol status {name}` names it)");
        } else {
            eprintln!("deltavol: snapshot {id} is durable in the outbox but not yet committed on the data plane ({err}); it ships when the data plane is reachable");
        }
        std::process::exit(2);
    }
    Ok(())
}

fn verify(name: &str, timeout_ms: u64, json: bool) -> anyhow::Result<()> {
    let info = attached(name)?;
    let v = control::request(&info.socket, &Request::Verify { timeout_ms }, None)?;
    let r: crate::verify::VerifyReport = serde_json::from_value(v.clone())
        .map_err(|e| anyhow::anyhow!("unexpected answer from the daemon: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else if r.ok() {
        println!(
            "{name}: permanent storage matches snapshot {} ({} blocks compared{}, {} ms)",
            r.snapshot,
            r.blocks_compared,
            compared_by(&r),
            r.duration_ms
        );
    } else {
        println!(
            "{name}: {} blocks differ from snapshot {} ({} blocks compared{}):",
            r.blocks_differing,
            r.snapshot,
            r.blocks_compared,
            compared_by(&r)
        );
        if r.blocks_refused > 0 {
            println!(
                "  {} of them do not open on the data plane (tampered or damaged there)",
                r.blocks_refused
            );
        }
        for d in &r.ranges {
            println!(
                "  blocks {}..{} ({} blocks, bytes {}..{})",
                d.lba,
                d.lba + d.nblocks,
                d.nblocks,
                d.lba * 4096,
                (d.lba + d.nblocks) * 4096
            );
        }
        if r.truncated {
            println!("  (more ranges not listed)");
        }
    }
    if !r.ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// ` by decrypted data` for an encrypted volume's verify (` by checksums` otherwise).
fn compared_by(r: &crate::verify::VerifyReport) -> String {
    match r.compared_by.as_str() {
        "" => String::new(),
        how => format!(" by {how}"),
    }
}

/// `NAME@SNAPSHOT_ID` or `NAME@TIME` (see [`crate::when::parse_time`]).
enum SnapSpec<'a> {
    Id(&'a str, u64),
    At(&'a str, u64),
}

fn parse_spec(spec: &str) -> anyhow::Result<SnapSpec<'_>> {
    let Some((name, rest)) = spec
        .split_once('@')
        .filter(|(n, r)| !n.is_empty() && !r.is_empty())
    else {
        bail!("{spec:?} is not NAME@SNAPSHOT_ID or NAME@TIME (e.g. db1@42, \"db1@2025-03-01 22:39\", db1@-15m; `deltavol snapshots` lists ids and cut times)");
    };
    if let Ok(id) = rest.parse::<u64>() {
        return Ok(SnapSpec::Id(name, id));
    }
    let at =
        crate::when::parse_time(rest, now_ms()).map_err(|e| anyhow::anyhow!("{spec:?}: {e}"))?;
    Ok(SnapSpec::At(name, at))
}

/// The snapshot of `name` as of `at_ms` on the data plane `c` is connected to (for `name`),
/// said on stderr: which snapshot, its exact cut time, and how far it is from the time asked.
fn resolve_at(c: &mut deltavol_dataplane::Client, name: &str, at_ms: u64) -> anyhow::Result<u64> {
    use crate::when::{format_gap_ms, format_time_ms};
    let snaps = c.list_snapshots().context("list snapshots")?;
    let t = crate::when::resolve(&snaps, name, at_ms).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "{name} as of {}: snapshot {}, {} at {} ({} before the time asked){}",
        format_time_ms(at_ms),
        t.snap_id,
        if t.is_cut { "cut" } else { "committed" },
        format_time_ms(t.time_ms),
        format_gap_ms(at_ms.saturating_sub(t.time_ms)),
        if t.is_cut {
            ""
        } else {
            "; its cut time is unknown (committed before cut times were recorded): the cut was at or before that"
        }
    );
    Ok(t.snap_id)
}

/// The volume name and snapshot id a spec names, resolving a time on the data plane.
fn spec_snapshot(spec: &str, dp: &DataPlaneArgs) -> anyhow::Result<(String, u64)> {
    match parse_spec(spec)? {
        SnapSpec::Id(n, id) => Ok((n.to_string(), id)),
        SnapSpec::At(n, at) => {
            let mut c = dp.connect(n)?;
            let id = resolve_at(&mut c, n, at)?;
            Ok((n.to_string(), id))
        }
    }
}

/// Builds the `add` configuration of a volume created from the data plane.
fn from_dataplane(
    name: &str,
    dp: &DataPlaneArgs,
    dev: DeviceArgs,
    create_as: Option<crate::cache::CreateAs>,
    size: Option<u64>,
) -> anyhow::Result<AddConfig> {
    let args = AddArgs {
        name: name.to_string(),
        size,
        dataplane: Some(dp.dataplane.clone()),
        auth_token_file: Some(dp.auth_token_file.clone()),
        tls: dp.tls.clone(),
        dev,
    };
    let mut cfg = args.to_config()?;
    cfg.volume.cache.create_as = create_as;
    Ok(cfg)
}

fn recover(
    name: &str,
    dp: &DataPlaneArgs,
    dev: DeviceArgs,
    wait: bool,
    at: Option<&str>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    crate::cache::validate_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let at_ms = at
        .map(|a| {
            crate::when::parse_time(a, now_ms()).map_err(|e| anyhow::anyhow!("--at {a:?}: {e}"))
        })
        .transpose()?;
    // Before fencing the old machine: this one must be able to take over.
    daemon::check_driver()?;
    let cfg = if holds_volume(&absolute(&dev.cache_dir)?) {
        if at.is_some() {
            bail!(
                "{} already holds volume {name}: --at recovers onto a new, empty --cache-dir (without --at this reattaches it)",
                dev.cache_dir.display()
            );
        }
        eprintln!(
            "{} already holds volume {name}: reattaching (hydration resumes)",
            dev.cache_dir.display()
        );
        from_dataplane(name, dp, dev, None, None)?
    } else {
        let mut c = dp.connect(name)?;
        let info = c.volume_info().context("volume info")?;
        if !info.exists || info.latest_snap_id == 0 {
            bail!(
                "the data plane at {} has no snapshot of volume {name:?}: nothing to recover",
                dp.dataplane
            );
        }
        // As of a time: resolved before the old machine is fenced, so a bad time fences nothing.
        let target = match at_ms {
            Some(ms) => Some(resolve_at(&mut c, name, ms)?),
            None => None,
        };
        let size = crate::crypt::device_size_bytes(&info);
        let mut cfg = from_dataplane(name, dp, dev, None, Some(size))?;
        // The key (or its absence) must fit the volume before anything is created or fenced.
        check_key(
            &cfg,
            &mut c,
            name,
            &info,
            target.unwrap_or(info.latest_snap_id),
        )?;
        // Fence the old machine first: from now on it can ship nothing.
        let generation = c
            .new_generation()
            .context("start a new generation (fence the old machine)")?;
        let head = c.info().latest_snap_id.max(info.latest_snap_id);
        // The recovered volume is the same volume: it keeps its id on the data plane (a
        // server too old to tell one gets a new random id bound to nothing).
        let volume_id = match (info.volume_id, c.info().volume_id) {
            (Some(a), Some(b)) if a != b => bail!(
                "volume {name:?} on the data plane was replaced by another volume (id {} then {}) while recovering: nothing recovered; run recover again",
                deltavol_schemas::volume_id_hex(&a),
                deltavol_schemas::volume_id_hex(&b)
            ),
            (Some(a), _) => a,
            (None, _) => rand::random(),
        };
        let from = target.unwrap_or(head);
        let ca = crate::cache::CreateAs {
            flushed_epoch: head,
            snap_head: head,
            generation,
            hydrate_snap: from,
            hydrate: true,
            volume_id,
        };
        eprintln!(
            "recovering {name} from snapshot {from} ({}{}), generation {generation}",
            format_size(size),
            encryption_note(&cfg)
        );
        cfg.volume.cache.create_as = Some(ca);
        if from != head {
            roll_back(&cfg, from, head)?;
            // The daemon reattaches the volume made here (hydration resumes).
            cfg.volume.cache.create_as = None;
        }
        cfg
    };
    let json = cfg.json;
    daemon::add(cfg)?;
    if !json {
        eprintln!(
            "device live {} ms after `recover` started",
            t0.elapsed().as_millis()
        );
    }
    if wait {
        wait_hydrated(name)?;
    }
    Ok(())
}

/// `recover --at` an older snapshot than the head: creates the volume here (hydrating from
/// `from`), writes back the blocks that differ from the head, and ships that as the chain's
/// next snapshot (on the head), waiting for its commit, before the device goes live: the data
/// plane's head then equals the device.
fn roll_back(cfg: &AddConfig, from: u64, head: u64) -> anyhow::Result<()> {
    let vol = crate::volume::Volume::open(&cfg.volume).map_err(|e| anyhow::anyhow!("{e}"))?;
    let res = (|| -> anyhow::Result<()> {
        let sc = cfg
            .volume
            .ship
            .as_ref()
            .context("recover needs the data plane")?;
        let n = crate::resume::write_rollback(&vol, sc, from, head)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let snap = vol
            .cut_and_flush()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .epoch;
        let ship = vol.ship.as_ref().context("no shipper")?;
        if n > 0 && !ship.wait_committed(snap, Duration::from_secs(600)) {
            bail!(
                "the way back to snapshot {from} (snapshot {snap}, {n} blocks) is not committed on the data plane after 600 s: {}; the volume is in {} (add it to go on)",
                ship.status().last_error.unwrap_or_default(),
                cfg.volume.cache.cache_dir.display()
            );
        }
        eprintln!(
            "rolled back to snapshot {from}: {n} blocks differ from the head {head}; committed as snapshot {snap} on top of it"
        );
        Ok(())
    })();
    vol.shutdown();
    res
}

fn clone(
    spec: &str,
    new: &str,
    dp: &DataPlaneArgs,
    dev: DeviceArgs,
    wait: bool,
) -> anyhow::Result<()> {
    parse_spec(spec)?;
    crate::cache::validate_name(new).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = if holds_volume(&absolute(&dev.cache_dir)?) {
        daemon::check_driver()?;
        eprintln!(
            "{} already holds volume {new}: reattaching",
            dev.cache_dir.display()
        );
        from_dataplane(new, dp, dev, None, None)?
    } else {
        let (src, snap) = spec_snapshot(spec, dp)?;
        let src = src.as_str();
        let mut cfg = from_dataplane(new, dp, dev, None, None)?;
        // A clone shares its source's blocks, so its key: checked before the clone exists.
        {
            let mut s = dp.connect(src)?;
            let sinfo = s.volume_info().context("volume info")?;
            check_key(&cfg, &mut s, src, &sinfo, snap)?;
        }
        daemon::check_driver()?;
        // A clone is a new volume: a new id, which the data plane records for it.
        let volume_id: [u8; 16] = rand::random();
        let mut c = dp.connect_as(new, Some(volume_id))?;
        let info = c
            .clone_volume(src, snap)
            .with_context(|| format!("clone {src}@{snap} as {new}"))?;
        let ca = crate::cache::CreateAs {
            flushed_epoch: 0,
            snap_head: 0,
            generation: info.generation,
            hydrate_snap: 0,
            hydrate: true,
            volume_id,
        };
        let size = crate::crypt::device_size_bytes(&info);
        eprintln!(
            "cloned {src}@{snap} as {new} ({}{}) on the data plane (metadata only)",
            format_size(size),
            encryption_note(&cfg)
        );
        cfg.volume.cache.size_bytes = Some(size);
        cfg.volume.cache.create_as = Some(ca);
        cfg
    };
    daemon::add(cfg)?;
    if wait {
        wait_hydrated(new)?;
    }
    Ok(())
}

/// Checks the key of `cfg` (or its absence) against the data plane's volume `volume` (`c` is
/// connected to it, `info` describes it) and its snapshot `snap`: an encrypted volume without
/// a key, a key for an unencrypted volume, and another key are refused here, before anything
/// is created or changed ([`crate::crypt::BlockCodec::check_remote`]).
fn check_key(
    cfg: &AddConfig,
    c: &mut deltavol_dataplane::Client,
    volume: &str,
    info: &deltavol_dataplane::VolumeInfo,
    snap: u64,
) -> anyhow::Result<()> {
    let codec = cfg
        .volume
        .ship
        .as_ref()
        .map(|s| s.codec.clone())
        .unwrap_or_default();
    codec
        .check_remote(c, volume, info, snap)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `, encrypted: key id …` for a volume with a key, else nothing.
fn encryption_note(cfg: &AddConfig) -> String {
    match cfg.volume.ship.as_ref().and_then(|s| s.codec.key_id()) {
        Some(id) => format!(", encrypted: key id {}", crate::crypt::key_id_hex(&id)),
        None => String::new(),
    }
}

/// `deltavol keygen FILE`.
fn keygen(file: &Path, json: bool) -> anyhow::Result<()> {
    let k = crate::crypt::VolumeKey::generate(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = crate::crypt::key_id_hex(&k.key_id());
    if json {
        println!(
            "{}",
            serde_json::json!({"file": file, "key_id": id, "cipher": crate::crypt::CIPHER_NAME})
        );
    } else {
        println!("{}: new key, key id {id}", file.display());
        eprintln!("keep a copy of it somewhere safe: without it, the snapshots of a volume encrypted with it can never be read again");
    }
    Ok(())
}

/// Polls the daemon until hydration is complete, printing progress (a bar on a terminal).
fn wait_hydrated(name: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let info = attached(name)?;
    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    loop {
        let v = control::request(&info.socket, &Request::Status, Some(Duration::from_secs(5)))?;
        let Some(h) = v.get("hydration").filter(|h| !h.is_null()) else {
            return Ok(());
        };
        let g = |k: &str| h.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let pct = h.get("percent").and_then(|x| x.as_f64()).unwrap_or(0.0);
        let done = h.get("done").and_then(|x| x.as_bool()).unwrap_or(false);
        let eta = h
            .get("eta_s")
            .and_then(|x| x.as_u64())
            .map(|e| format!(", ETA {e} s"))
            .unwrap_or_default();
        let line = format!(
            "hydrating {name}: {pct:5.1}% ({} of {}) at {}/s{eta}",
            format_size(g("local_bytes")),
            format_size(g("total_bytes")),
            format_size(g("rate_bytes_per_s"))
        );
        if tty {
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64) as usize;
            eprint!(
                "\r[{}{}] {line}   ",
                "#".repeat(filled.min(width)),
                "-".repeat(width - filled.min(width))
            );
        } else if last_line.elapsed() >= Duration::from_secs(5) || done {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        if done {
            if tty {
                eprintln!();
            }
            eprintln!("hydration of {name} complete: it is an ordinary volume now");
            return Ok(());
        }
        if let Some(e) = h.get("last_error").and_then(|e| e.as_str()) {
            if !tty && last_line.elapsed() < Duration::from_millis(10) {
                eprintln!("  (data plane: {e}; retrying)");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Cut and commit times further apart than this are both shown by `snapshots`.
const COMMIT_SHOWN_AFTER_MS: u64 = 5_000;

fn snapshots_cmd(a: SnapshotsArgs) -> anyhow::Result<()> {
    match a.cmd {
        None => {
            let (Some(name), Some(dataplane), Some(auth_token_file)) =
                (a.name, a.dataplane, a.auth_token_file)
            else {
                bail!("name a volume: deltavol snapshots NAME --dataplane HOST:PORT --auth-token-file F");
            };
            let dp = DataPlaneArgs {
                dataplane,
                auth_token_file,
                tls: a.tls,
            };
            list_snapshots(&name, &dp, a.json)
        }
        Some(SnapshotsCmd::List { name, dp, json }) => list_snapshots(&name, &dp, json),
        Some(SnapshotsCmd::Retention {
            name,
            policy,
            dp,
            json,
        }) => retention_cmd(&name, policy.as_deref(), &dp, json),
        Some(SnapshotsCmd::Prune {
            name,
            dry_run,
            dp,
            json,
        }) => prune_cmd(&name, dry_run, &dp, json),
        Some(SnapshotsCmd::Pin {
            spec,
            label,
            dp,
            json,
        }) => pin_cmd(&spec, true, label.as_deref().unwrap_or(""), &dp, json),
        Some(SnapshotsCmd::Unpin { spec, dp, json }) => pin_cmd(&spec, false, "", &dp, json),
        Some(SnapshotsCmd::Delete { spec, dp, json }) => {
            let (name, id) = match parse_spec(&spec)? {
                SnapSpec::Id(n, id) => (n.to_string(), id),
                SnapSpec::At(..) => bail!(
                    "{spec:?}: delete takes NAME@ID (a time could resolve to another snapshot than the one meant)"
                ),
            };
            let mut c = dp.connect(&name)?;
            let merged_into = c
                .delete_snapshot(id)
                .with_context(|| format!("delete {name}@{id}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"deleted": id, "merged_into": merged_into})
                );
            } else {
                println!("deleted {name}@{id}; its changes merged into snapshot {merged_into}");
            }
            Ok(())
        }
    }
}

fn retention_cmd(
    name: &str,
    policy: Option<&str>,
    dp: &DataPlaneArgs,
    json: bool,
) -> anyhow::Result<()> {
    let policy = policy
        .map(|p| {
            deltavol_dataplane::retention::Policy::parse(p)
                .map_err(|e| anyhow::anyhow!("retention policy {p:?}: {e}"))
        })
        .transpose()?;
    let mut c = dp.connect(name)?;
    let info = match policy {
        Some(p) => c.set_retention(&p).context("set the retention policy")?,
        None => c.volume_info().context("volume info")?,
    };
    if !info.exists {
        bail!("the data plane at {} has no volume {name:?}", dp.dataplane);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"volume": name, "retention": info.retention, "snapshots": info.snapshot_count})
        );
    } else {
        let what = if info.retention.keeps_all() {
            "none (every snapshot is kept)".to_string()
        } else {
            info.retention.to_string()
        };
        println!(
            "{name}: retention {what} ({} snapshot(s))",
            info.snapshot_count
        );
    }
    Ok(())
}

fn prune_cmd(name: &str, dry_run: bool, dp: &DataPlaneArgs, json: bool) -> anyhow::Result<()> {
    let mut c = dp.connect(name)?;
    let r = c.prune(dry_run).context("prune")?;
    if json {
        let kept: Vec<_> = r
            .kept
            .iter()
            .map(|(id, why)| serde_json::json!({"id": id, "kept_for": why}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"dry_run": r.dry_run, "deleted": r.deleted, "kept": kept})
            )?
        );
        return Ok(());
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    if r.deleted.is_empty() {
        println!(
            "{name}: nothing to delete ({} snapshot(s) kept)",
            r.kept.len()
        );
    } else {
        let ids: Vec<String> = r.deleted.iter().map(u64::to_string).collect();
        println!(
            "{name}: {verb} {} snapshot(s): {}",
            r.deleted.len(),
            ids.join(" ")
        );
    }
    for (id, why) in &r.kept {
        println!("  keep {id:>10}  {why}");
    }
    Ok(())
}

fn pin_cmd(
    spec: &str,
    pinned: bool,
    label: &str,
    dp: &DataPlaneArgs,
    json: bool,
) -> anyhow::Result<()> {
    let (name, id) = spec_snapshot(spec, dp)?;
    let mut c = dp.connect(&name)?;
    let s = c
        .pin_snapshot(id, pinned, label)
        .with_context(|| format!("{} {name}@{id}", if pinned { "pin" } else { "unpin" }))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"id": s.snap_id, "pinned": s.pinned, "label": s.label})
        );
    } else {
        let l = if s.label.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.label)
        };
        println!(
            "{name}@{id}{l} {}",
            if s.pinned { "pinned" } else { "unpinned" }
        );
    }
    Ok(())
}

fn list_snapshots(name: &str, dp: &DataPlaneArgs, json: bool) -> anyhow::Result<()> {
    use crate::when::format_time_ms;
    let mut c = dp.connect(name)?;
    let snaps = c.list_snapshots().context("list snapshots")?;
    let retention = c.info().retention;
    let block_size = c.info().block_size;
    let tl = crate::when::timeline(&snaps);
    if json {
        let v: Vec<_> = snaps
            .iter()
            .zip(&tl)
            .map(|(s, t)| {
                serde_json::json!({
                    "id": s.snap_id,
                    "parent": s.parent_id,
                    "cut_time_unix_ms": (s.cut_time_ms != 0).then_some(s.cut_time_ms),
                    "commit_time_unix_ms": s.commit_time_ms,
                    // The moment whose state it holds, as well as it is known (the commit time
                    // when the cut time is unknown), and whether it is the cut time.
                    "point_in_time_unix_ms": t.time_ms,
                    "cut_time_known": t.is_cut,
                    "clock_stepped_back": t.stepped_back,
                    "time_unix_ms": s.commit_time_ms,
                    "bytes": s.bytes,
                    "own_bytes": s.own_bytes,
                    "shared_bytes": s.shared_bytes,
                    "extents": s.extent_count,
                    // The device's size (an encrypted volume's envelopes taken out); the
                    // byte counts above are as stored.
                    "volume_size": crate::crypt::device_bytes(block_size, s.volume_size),
                    "generation": s.generation,
                    "pinned": s.pinned,
                    "label": s.label,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if retention.keeps_all() {
        println!("retention: none (every snapshot is kept)");
    } else {
        println!("retention: {retention}");
    }
    println!(
        "{:>10} {:>10} {:<29} {:<27} {:>10} {:>10} {:>10} {:>8}  PIN",
        "ID", "PARENT", "CUT TIME", "COMMITTED", "BYTES", "OWN", "SHARED", "EXTENTS"
    );
    let (mut unknown, mut stepped) = (false, false);
    for (s, t) in snaps.iter().zip(&tl) {
        let mark = match (t.is_cut, t.stepped_back) {
            (false, _) => {
                unknown = true;
                "*"
            }
            (true, true) => {
                stepped = true;
                "!"
            }
            (true, false) => "",
        };
        let cut = format!("{}{mark}", format_time_ms(t.time_ms));
        let committed = if t.is_cut && s.commit_time_ms.abs_diff(t.time_ms) > COMMIT_SHOWN_AFTER_MS
        {
            format_time_ms(s.commit_time_ms)
        } else {
            "-".to_string()
        };
        let pin = match (s.pinned, s.label.is_empty()) {
            (true, true) => "pinned".to_string(),
            (true, false) => format!("pinned {}", s.label),
            (false, true) => String::new(),
            (false, false) => s.label.clone(),
        };
        let row = format!(
            "{:>10} {:>10} {:<29} {:<27} {:>10} {:>10} {:>10} {:>8}  {pin}",
            s.snap_id,
            s.parent_id,
            cut,
            committed,
            format_size(s.bytes),
            format_size(s.own_bytes),
            format_size(s.shared_bytes),
            s.extent_count
        );
        println!("{}", row.trim_end());
    }
    println!("BYTES: the snapshot's own changes as stored; OWN: of them, what the next snapshot overwrote (deleting this one gives it back); SHARED: what later snapshots still read");
    if unknown {
        println!("* cut time unknown (committed before cut times were recorded): the commit time is shown; the cut was at or before it");
    }
    if stepped {
        println!("! cut earlier than an earlier snapshot's: the node's clock stepped back; kept as recorded, ordered by id, and a time resolves by id order");
    }
    Ok(())
}

fn volume_json(i: &deltavol_dataplane::VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": i.name,
        "exists": i.exists,
        "volume_id": i.volume_id.as_ref().map(deltavol_schemas::volume_id_hex),
        "size_bytes": crate::crypt::device_size_bytes(i),
        "block_size": i.block_size,
        "stored_size_bytes": i.size_bytes,
        // Client-side encryption, as the block size tells (the key never reaches the data plane).
        "encrypted": crate::crypt::is_sealed_block_size(i.block_size),
        "latest_snap_id": i.latest_snap_id,
        "latest_commit_unix_ms": i.latest_commit_ms,
        "snapshot_count": i.snapshot_count,
        "generation": i.generation,
        "created_unix_ms": i.created_ms,
        "clone_source": (!i.clone_source_volume.is_empty())
            .then(|| format!("{}@{}", i.clone_source_volume, i.clone_source_snap_id)),
    })
}

fn volume_info(name: &str, dp: &DataPlaneArgs, json: bool) -> anyhow::Result<()> {
    crate::cache::validate_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = dp.connect(name)?;
    let i = c.volume_info().context("volume info")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&volume_json(&i))?);
        return Ok(());
    }
    if !i.exists {
        bail!("the data plane at {} has no volume {name:?}", dp.dataplane);
    }
    let id = i
        .volume_id
        .as_ref()
        .map_or_else(|| "unknown".into(), deltavol_schemas::volume_id_hex);
    println!("volume:        {name} ({id})");
    let size = crate::crypt::device_size_bytes(&i);
    println!("size:          {} ({size} bytes)", format_size(size));
    if crate::crypt::is_sealed_block_size(i.block_size) {
        println!(
            "encryption:    client-side, {} envelopes ({}-byte blocks on the data plane; give --encryption-key-file to read it)",
            crate::crypt::CIPHER_NAME,
            i.block_size
        );
    } else {
        println!("encryption:    none");
    }
    let age = if i.latest_commit_ms == 0 {
        "none".to_string()
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        format!(
            "{:.1} s ago",
            now.saturating_sub(i.latest_commit_ms) as f64 / 1000.0
        )
    };
    println!(
        "snapshots:     {} (head {}, last commit {age})",
        i.snapshot_count, i.latest_snap_id
    );
    println!("generation:    {}", i.generation);
    if !i.clone_source_volume.is_empty() {
        println!(
            "clone of:      {}@{}",
            i.clone_source_volume, i.clone_source_snap_id
        );
    }
    Ok(())
}

fn volume_delete(name: &str, id: &str, dp: &DataPlaneArgs, json: bool) -> anyhow::Result<()> {
    crate::cache::validate_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(id) = deltavol_schemas::parse_volume_id_hex(id) else {
        bail!("--id {id:?} is not a volume id (32 hex digits, as `deltavol volume info {name}` shows)");
    };
    // The volume attached here under this name may be another one (a reused name, waiting
    // for the old one to be deleted): refuse only when it is this very volume.
    if let Ok(Some(i)) = control::read_info(&control::info_path(name)) {
        if control::pid_alive(i.pid) {
            let attached_id = control::request(&i.socket, &Request::Status, None)
                .ok()
                .and_then(|v| {
                    v.get("volume_id")
                        .and_then(|x| x.as_str())
                        .map(str::to_string)
                });
            match attached_id {
                Some(a) if a != deltavol_schemas::volume_id_hex(&id) => {}
                _ => bail!("volume {name:?} (id {}) is attached on this node (pid {}): `deltavol del {name}` first; deleting it on the data plane under a live daemon would break its snapshot chain", deltavol_schemas::volume_id_hex(&id), i.pid),
            }
        }
    }
    let mut c = dp.connect(name)?;
    let before = c.volume_info().context("volume info")?;
    if !before.exists {
        bail!(
            "the data plane at {} has no volume {name:?}: nothing to delete",
            dp.dataplane
        );
    }
    c.delete_volume(id)
        .with_context(|| format!("delete volume {name} on the data plane"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&volume_json(&before))?);
    } else {
        println!(
            "deleted volume {name} ({}) and its {} snapshots from the data plane",
            deltavol_schemas::volume_id_hex(&id),
            before.snapshot_count
        );
    }
    Ok(())
}

fn export(
    spec: &str,
    dp: &DataPlaneArgs,
    output: &Path,
    key_file: Option<&Path>,
) -> anyhow::Result<()> {
    let codec =
        crate::crypt::BlockCodec::from_key_file(key_file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (name, snap) = spec_snapshot(spec, dp)?;
    let name = name.as_str();
    let mut c = dp.connect(name)?;
    let info = c.volume_info().context("volume info")?;
    codec
        .check_remote(&mut c, name, &info, snap)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let size = crate::crypt::device_size_bytes(&info);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(output)
        .with_context(|| format!("create {}", output.display()))?;
    f.set_len(size)?;
    const CHUNK_BLOCKS: u64 = 256;
    let mut buf = vec![0u8; (CHUNK_BLOCKS * 4096) as usize];
    let nblocks = size / 4096;
    let (mut lba, mut last_pct, t0) = (0u64, u64::MAX, Instant::now());
    let mut scratch = Vec::new();
    use std::os::unix::fs::FileExt;
    while lba < nblocks {
        let n = (nblocks - lba).min(CHUNK_BLOCKS);
        let b = &mut buf[..(n * 4096) as usize];
        codec
            .read_exact(&mut c, snap, lba, b, &mut scratch)
            .with_context(|| format!("read snapshot {snap} at block {lba}"))?;
        for (i, blk) in b.chunks(4096).enumerate() {
            if blk.iter().any(|&x| x != 0) {
                f.write_all_at(blk, (lba + i as u64) * 4096)?;
            }
        }
        lba += n;
        let pct = lba * 100 / nblocks;
        if pct / 10 != last_pct / 10 || lba == nblocks {
            last_pct = pct;
            eprintln!(
                "export {name}@{snap}: {pct}% ({} of {}, {:.1} s)",
                format_size(lba * 4096),
                format_size(size),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    f.sync_all()?;
    println!("{}", output.display());
    Ok(())
}

/// The `data plane:` line of `status`: the server in use, whether connected, and the others
/// listed (with several addresses).
fn dataplane_line(sh: &serde_json::Value) -> String {
    let cur = sh.get("dataplane").and_then(|x| x.as_str()).unwrap_or("?");
    let all: Vec<&str> = sh
        .get("dataplane_addrs")
        .and_then(|x| x.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if all.len() <= 1 {
        return cur.to_string();
    }
    let connected = sh.get("connected_to").and_then(|x| x.as_str()).is_some();
    format!(
        "{cur} ({}; servers {})",
        if connected {
            "connected"
        } else {
            "not connected"
        },
        all.join(", ")
    )
}

fn print_status(v: &serde_json::Value) {
    let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("volume:        {} ({})", s("name"), s("volume_id"));
    println!(
        "device:        {} (pid {}, {} queue(s), depth {})",
        s("device"),
        u("pid"),
        u("queues"),
        u("depth")
    );
    println!("size:          {}", format_size(u("size_bytes")));
    if let Some(e) = v.get("encryption").and_then(|x| x.as_str()) {
        println!("encryption:    {e}");
    }
    if let Some(t) = v.get("dataplane_transport").and_then(|x| x.as_str()) {
        println!("data plane:    {t}");
    }
    if let Some(m) = v.get("metrics_url").and_then(|x| x.as_str()) {
        println!("metrics:       {m}");
    }
    println!("cache dir:     {}", s("cache_dir"));
    println!("backing:       {}", s("backing"));
    println!(
        "epoch:         {} (frozen {}, last flushed {})",
        u("epoch"),
        u("frozen_epoch"),
        u("flushed_epoch")
    );
    println!("dirty:         {}", format_size(u("dirty_bytes")));
    if v.get("rss_bytes").is_some() {
        println!(
            "memory:        {} resident (peak {}), of it {} read cache and {} beyond it",
            format_size(u("rss_bytes")),
            format_size(u("rss_peak_bytes")),
            format_size(u("read_cache_bytes")),
            format_size(u("rss_beyond_read_cache_bytes"))
        );
    }
    println!(
        "ssd used:      {} of {} limit ({} allocated)",
        format_size(u("ssd_used_bytes")),
        format_size(u("cache_limit_bytes")),
        format_size(u("ssd_allocated_bytes"))
    );
    let ratio = v
        .get("read_cache_hit_ratio")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0);
    println!(
        "read cache:    {} blocks, hit ratio {:.1}%",
        u("read_cache_blocks"),
        ratio * 100.0
    );
    println!(
        "i/o:           {} reads ({}), {} writes ({}), {} flushes",
        u("reads"),
        format_size(u("read_bytes")),
        u("writes"),
        format_size(u("write_bytes")),
        u("flush_requests")
    );
    if let Some(f) = v.get("flush") {
        match f.get("last") {
            Some(l) if !l.is_null() => {
                let g = |k: &str| l.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                let age = (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0))
                .saturating_sub(g("finished_unix_ms"));
                println!(
                    "last flush:    epoch {}, {} in {} ms, {:.1} s ago",
                    g("epoch"),
                    format_size(g("data_bytes")),
                    g("duration_ms"),
                    age as f64 / 1000.0
                );
            }
            _ => println!("last flush:    none yet"),
        }
        let fg = |k: &str| f.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        if let Some(e) = f.get("last_error").and_then(|e| e.as_str()) {
            let ago = f
                .get("last_error_unix_ms")
                .and_then(|x| x.as_u64())
                .map(|t| format!(", {} s ago", now_ms().saturating_sub(t) / 1000))
                .unwrap_or_default();
            println!(
                "flush error:   {e} ({} failed attempts in a row{ago}; retrying with backoff; data is safe in the cache)",
                fg("consecutive_failures")
            );
        }
        if fg("failed_attempts") > 0 {
            println!(
                "flush retries: {} failed attempts since attach",
                fg("failed_attempts")
            );
        }
    }
    match v.get("shipping") {
        Some(sh) if !sh.is_null() => {
            let g = |k: &str| sh.get(k).and_then(|x| x.as_u64());
            let ago = |t: u64| format!("{:.1} s ago", now_ms().saturating_sub(t) as f64 / 1000.0);
            match (
                g("last_committed"),
                g("last_committed_unix_ms"),
                g("last_committed_cut_unix_ms"),
            ) {
                (Some(id), Some(t), Some(cut)) => println!(
                    "last snapshot: {id} cut {} ({}; the recovery point), committed {}",
                    ago(cut),
                    crate::when::format_time_ms(cut),
                    ago(t)
                ),
                (Some(id), Some(t), None) => println!(
                    "last snapshot: {id} committed {} (cut time unknown: the recovery point is at most that)",
                    ago(t)
                ),
                _ => println!(
                    "last snapshot: none committed since attach (chain head {})",
                    g("head").unwrap_or(0)
                ),
            }
            println!(
                "outbox:        {} snapshot(s), {}",
                g("outbox_entries").unwrap_or(0),
                format_size(g("outbox_bytes").unwrap_or(0))
            );
            println!("data plane:    {}", dataplane_line(sh));
            if sh.get("fenced").and_then(|x| x.as_bool()).unwrap_or(false) {
                println!("FENCED:        this volume was recovered on another machine: the device is read-only (writes fail with EIO) and ships nothing more to the volume");
                match sh.get("fenced_branch").and_then(|x| x.as_str()) {
                    Some(b) => println!("               the snapshots it made after the fence are kept as branch volume {b} on the data plane (export or clone it)"),
                    None => println!("               its unshipped snapshots go to a branch volume on the data plane once it is reachable"),
                }
            }
            if let Some(e) = sh.get("last_error").and_then(|e| e.as_str()) {
                println!("ship error:    {e}");
            }
        }
        _ => println!("snapshots:     not shipped (no --dataplane)"),
    }
    if let Some(p) = v.get("io_path").and_then(|p| p.as_str()) {
        let how = match p {
            "zero-copy" => crate::zerocopy::IoPath::ZeroCopy.describe(),
            "copy" => crate::zerocopy::IoPath::Copy.describe(),
            other => other,
        };
        println!("i/o path:      {how}");
    }
    if let Some(r) = v.get("resumed").and_then(|r| r.as_str()) {
        println!("resumed:       {r}");
    }
    if let Some(h) = v.get("hydration").filter(|h| !h.is_null()) {
        let g = |k: &str| h.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        if h.get("done").and_then(|x| x.as_bool()).unwrap_or(false) {
            println!("hydration:     complete (from snapshot {})", g("snapshot"));
        } else {
            let pct = h.get("percent").and_then(|x| x.as_f64()).unwrap_or(0.0);
            let eta = h
                .get("eta_s")
                .and_then(|x| x.as_u64())
                .map(|e| format!(", ETA {e} s"))
                .unwrap_or_default();
            println!(
                "hydration:     {pct:.1}% of snapshot {} ({} of {}), {}/s{eta}, {} fetched on demand",
                g("snapshot"),
                format_size(g("local_bytes")),
                format_size(g("total_bytes")),
                format_size(g("rate_bytes_per_s")),
                g("fetched_on_demand")
            );
            println!(
                "               {} extents fetched ({} read ahead of reads in order), {} refetched, {} reads answered by a fetch already under way",
                g("extents_fetched"),
                g("extents_read_ahead"),
                g("extents_refetched"),
                g("fetches_shared")
            );
        }
    }
    if v.get("durability_failed")
        .and_then(|x| x.as_bool())
        .unwrap_or(false)
    {
        println!("WARNING:       a sync of the cache failed; FLUSH now fails. Detach and reattach the volume.");
    }
}

#[cfg(test)]
mod tests {
    use super::dataplane_line;
    use super::{Cli, Cmd};
    use crate::zerocopy::ZeroCopy;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("deltavol").chain(args.iter().copied()))
    }

    #[test]
    fn zero_copy_is_an_option_of_add_recover_and_clone() {
        let dev = ["--cache-dir", "/c", "--backing", "/b"];
        fn with<'a>(head: &[&'a str], dev: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
            [head, dev, tail].concat()
        }
        let zc = |cli: Cli| match cli.cmd {
            Cmd::Add(a) => a.dev.zero_copy,
            Cmd::Recover { dev, .. } | Cmd::Clone { dev, .. } => dev.zero_copy,
            other => panic!("unexpected command {other:?}"),
        };
        let add = ["add", "--name", "v"];
        assert_eq!(zc(parse(&with(&add, &dev, &[])).unwrap()), None);
        for (word, mode) in [
            ("auto", ZeroCopy::Auto),
            ("on", ZeroCopy::On),
            ("off", ZeroCopy::Off),
        ] {
            assert_eq!(
                zc(parse(&with(&add, &dev, &["--zero-copy", word])).unwrap()),
                Some(mode)
            );
        }
        let dp = [
            "--dataplane",
            "127.0.0.1:7070",
            "--auth-token-file",
            "/t",
            "--zero-copy",
            "off",
        ];
        assert_eq!(
            zc(parse(&with(&["recover", "v"], &dev, &dp)).unwrap()),
            Some(ZeroCopy::Off)
        );
        assert_eq!(
            zc(parse(&with(&["clone", "v@3", "--name", "w"], &dev, &dp)).unwrap()),
            Some(ZeroCopy::Off)
        );
        let e = parse(&with(&add, &dev, &["--zero-copy", "maybe"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto") && e.contains("off"), "{e}");
    }

    #[test]
    fn status_names_the_data_plane_in_use() {
        let one = serde_json::json!({"dataplane": "10.0.0.1:7070", "dataplane_addrs": ["10.0.0.1:7070"], "connected_to": null});
        assert_eq!(dataplane_line(&one), "10.0.0.1:7070");
        let on_b = serde_json::json!({"dataplane": "b:7070", "dataplane_addrs": ["a:7070", "b:7070"], "connected_to": "b:7070"});
        assert_eq!(
            dataplane_line(&on_b),
            "b:7070 (connected; servers a:7070, b:7070)"
        );
        let down = serde_json::json!({"dataplane": "a:7070", "dataplane_addrs": ["a:7070", "b:7070"], "connected_to": null});
        assert_eq!(
            dataplane_line(&down),
            "a:7070 (not connected; servers a:7070, b:7070)"
        );
        // A daemon from before address lists: just the address.
        let old = serde_json::json!({"dataplane": "a:7070"});
        assert_eq!(dataplane_line(&old), "a:7070");
    }
}
