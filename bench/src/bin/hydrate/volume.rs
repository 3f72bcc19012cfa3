//! deltavol volumes driven from the host, as the host-level tests drive them: no kernel ublk
//! driver, the same handler the queues call, on a host io_uring of our own.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use deltavol::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::cache::{CacheConfig, CreateAs};
use deltavol::crypt::{BlockCodec, VolumeKey};
use deltavol::hydrate::HYDRATE_EXTENT_BLOCKS;
use deltavol::ring::HostRing;
use deltavol::ship::ShipConfig;
use deltavol::volume::{Volume, VolumeConfig};

use crate::data::{Data, BLOCK_BYTES};

/// The volume name on the data plane (the source and every recovered copy).
pub const VOLUME_NAME: &str = "bench-hydrate";
/// The encrypted source's name (`--encrypt`): the same data, sealed.
pub const VOLUME_NAME_ENC: &str = "bench-hydrate-enc";

/// Which source a volume is made from or recovers: the plain one, or the encrypted one
/// (client-side encryption, `deltavol::crypt`), with its codec.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub codec: BlockCodec,
}

impl Variant {
    pub fn plain() -> Variant {
        Variant {
            name: VOLUME_NAME,
            codec: BlockCodec::plain(),
        }
    }

    /// The encrypted source, under a fixed key (the bench measures sealing and opening, not
    /// key handling).
    pub fn encrypted() -> Variant {
        Variant {
            name: VOLUME_NAME_ENC,
            codec: BlockCodec::sealed(VolumeKey::from_bytes(&[0x5e; 32])),
        }
    }

    /// The suffix of the configurations measured on it: `""` or `"-enc"`.
    pub fn suffix(&self) -> &'static str {
        if self.codec.is_encrypted() {
            "-enc"
        } else {
            ""
        }
    }
}
/// Bytes of one fetch and one background-hydration step (the hydrator's extent).
pub const EXTENT_BYTES: usize = HYDRATE_EXTENT_BLOCKS as usize * BLOCK_BYTES;
/// Sectors per block.
const SECTORS_PER_BLOCK: u64 = (BLOCK_BYTES / 512) as u64;
/// Flush interval of the bench volumes: long, so no timed flush runs inside a measurement.
const FLUSH_INTERVAL: Duration = Duration::from_secs(3600);
/// How long the source's snapshot may take to commit on the data plane.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// The data-plane connection every volume of the bench uses.
pub struct Plane {
    pub addr: String,
    pub token: Vec<u8>,
}

impl Plane {
    fn ship(&self, dir: &Path, v: &Variant) -> ShipConfig {
        ShipConfig {
            retention: None,
            addrs: deltavol::ship::DataPlaneAddrs::one(self.addr.clone()),
            access: deltavol_dataplane::ClientAccess::new(&self.token),
            outbox_dir: dir.join("outbox"),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(60),
            codec: v.codec.clone(),
        }
    }

    /// A connection to volume `name`.
    fn client(&self, name: &str) -> anyhow::Result<deltavol_dataplane::Client> {
        let t = deltavol_dataplane::Timeouts {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(60),
        };
        deltavol_dataplane::Client::connect(&self.addr, &self.token, name, t)
            .context("connect to the data plane")
    }

    /// The id of a bench volume on the data plane (a recovered copy keeps it).
    fn volume_id(&self, name: &str) -> anyhow::Result<[u8; 16]> {
        let c = self.client(name)?;
        c.info()
            .volume_id
            .context("the data plane names no id for the bench volume")
    }
}

fn config(dir: &Path, size_bytes: u64, plane: &Plane, v: &Variant) -> VolumeConfig {
    VolumeConfig {
        cache: CacheConfig {
            name: v.name.into(),
            size_bytes: Some(size_bytes),
            cache_dir: dir.join("cache"),
            backing: dir.join("backing.img"),
            // Room for the whole volume in the mirrors: the source fill never waits for a
            // flush, so the snapshot is one epoch.
            cache_limit_bytes: 2 * size_bytes + (64 << 20),
            read_cache_bytes: 8 << 20,
            nr_queues: 1,
            create_as: None,
            journal: Default::default(),
        },
        flush_interval: FLUSH_INTERVAL,
        flush_pacing: false,
        ship: Some(plane.ship(dir, v)),
        hydrate_rate_bytes_per_s: 0,
        hydrate_readahead_bytes: deltavol::volume::HYDRATE_READAHEAD_BYTES,
        hydrate_hot_first: true,
        heat_interval: deltavol::volume::HEAT_INTERVAL_DEFAULT,
        fetch_timeout: Duration::from_secs(30),
    }
}

/// A volume recovered from snapshot `snap`, in the fresh directory `dir`; `rate` is the
/// background hydration limit (bytes/s, 0 = unlimited).
pub fn recovered_config(
    dir: &Path,
    size_bytes: u64,
    plane: &Plane,
    v: &Variant,
    snap: u64,
    rate: u64,
) -> anyhow::Result<VolumeConfig> {
    let mut cfg = config(dir, size_bytes, plane, v);
    cfg.hydrate_rate_bytes_per_s = rate;
    // The source's heat map stays the one on the data plane.
    cfg.heat_interval = Duration::ZERO;
    cfg.cache.create_as = Some(CreateAs {
        flushed_epoch: snap,
        snap_head: snap,
        generation: 0,
        hydrate_snap: snap,
        hydrate: true,
        volume_id: plane.volume_id(v.name)?,
    });
    Ok(cfg)
}

/// One block request through the volume's handler; fails unless it did all of `buf`.
pub fn io(
    vol: &Volume,
    ring: &HostRing,
    op: u32,
    block: u64,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    let nr_sectors = u32::try_from(buf.len() as u64 / BLOCK_BYTES as u64 * SECTORS_PER_BLOCK)
        .context("request too large")?;
    let r = smol::block_on(vol.handle(ring, op, 0, block * SECTORS_PER_BLOCK, nr_sectors, buf));
    let what = if op == UBLK_IO_OP_READ {
        "read"
    } else {
        "write"
    };
    ensure!(
        usize::try_from(r).ok() == Some(buf.len()),
        "{what} of {} bytes at block {block} returned {r}",
        buf.len()
    );
    Ok(())
}

/// What making the source took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Source {
    pub snapshot: u64,
    pub blocks_written: u64,
    /// Writing the data through the volume.
    pub fill_s: f64,
    /// `cut_and_flush`: the epoch flushed to the backing file and handed to the shipper.
    pub cut_and_flush_s: f64,
    /// From the flush to the snapshot committed on the data plane.
    pub ship_commit_s: f64,
    /// The regions (of `heat_region_blocks` blocks) the source read, its working set, whose
    /// heat map went to the data plane (none for an encrypted source: its map is not shipped).
    pub hot_regions: Vec<u64>,
    pub heat_region_blocks: u32,
}

/// Reads of each hot region by the source (4k, spread over the region).
const HOT_SOURCE_READS: u64 = 16;
/// How long the source's heat map may take to reach the data plane.
const HEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the source volume in `dir`, writes `data` into it (runs of filled blocks, at most
/// one extent a write), snapshots it to the data plane and shuts it down. Its backing file
/// (`dir/backing.img`) then holds the snapshot's bytes.
pub fn make_source(
    dir: &Path,
    size_bytes: u64,
    plane: &Plane,
    v: &Variant,
    data: &Data,
    hot_regions: &[u64],
) -> anyhow::Result<Source> {
    let mut cfg = config(dir, size_bytes, plane, v);
    cfg.heat_interval = Duration::from_millis(200);
    let vol = Volume::open(&cfg).context("opening the source volume")?;
    let ring = vol.host_ring(0).context("a host ring")?;
    let nblocks = size_bytes / BLOCK_BYTES as u64;
    let mut buf = vec![0u8; EXTENT_BYTES];
    let t0 = Instant::now();
    let mut written = 0;
    let mut b = 0;
    while b < nblocks {
        if !data.filled(b) {
            b += 1;
            continue;
        }
        let mut e = b + 1;
        while e < nblocks && e - b < HYDRATE_EXTENT_BLOCKS && data.filled(e) {
            e += 1;
        }
        let len = (e - b) as usize * BLOCK_BYTES;
        data.blocks(b, &mut buf[..len]);
        io(&vol, &ring, UBLK_IO_OP_WRITE, b, &mut buf[..len])?;
        written += e - b;
        b = e;
    }
    let fill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let report = vol.cut_and_flush().context("cut_and_flush of the source")?;
    let cut_and_flush_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let ship = vol.ship.as_ref().context("the source ships")?;
    if !ship.wait_committed(report.epoch, COMMIT_TIMEOUT) {
        bail!(
            "the source snapshot {} did not commit on the data plane in {COMMIT_TIMEOUT:?}: {:?}",
            report.epoch,
            ship.status()
        );
    }
    let ship_commit_s = t2.elapsed().as_secs_f64();
    // The working set: its regions read, and their heat map on the data plane.
    let heat_region_blocks = vol.heat.as_ref().map_or(0, |h| h.region_blocks());
    if let Some(h) = &vol.heat {
        let rb = u64::from(h.region_blocks());
        let mut one = vec![0u8; BLOCK_BYTES];
        for &r in hot_regions {
            for i in 0..HOT_SOURCE_READS {
                let b = (r * rb + i * rb / HOT_SOURCE_READS).min(nblocks - 1);
                io(&vol, &ring, UBLK_IO_OP_READ, b, &mut one)?;
            }
        }
        let t = Instant::now();
        loop {
            let mut c = plane.client(v.name)?;
            if let Some((_, map)) = c.get_heat().context("reading the heat map back")? {
                if hot_regions
                    .iter()
                    .all(|&r| map.get(r as usize).is_some_and(|&x| x > 0))
                {
                    break;
                }
            }
            ensure!(
                t.elapsed() < HEAT_TIMEOUT,
                "the source's heat map did not reach the data plane in {HEAT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(ring);
    vol.shutdown();
    Ok(Source {
        snapshot: report.epoch,
        blocks_written: written,
        fill_s,
        cut_and_flush_s,
        ship_commit_s,
        hot_regions: if heat_region_blocks > 0 {
            hot_regions.to_vec()
        } else {
            Vec::new()
        },
        heat_region_blocks,
    })
}

/// Whether block `b` of a recovering volume is local already (hydrated or fetched).
pub fn is_local(vol: &Volume, b: u64) -> bool {
    vol.cache.hydrating().is_none_or(|h| h.local.get(b))
}
