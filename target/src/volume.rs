//! A volume: its cache, the syncer that serves FLUSH, and the flush thread, started and
//! stopped together. The ublk queues ([`crate::queue`]) and the host-level tests drive it
//! through [`Volume::handle`].

use crate::cache::{meta, Cache, CacheConfig, SyncHandle};
use crate::error::{Error, Result};
use crate::flush::{DeltaSink, FlushStatus, Flusher, NullSink};
use crate::hydrate::{HydrateConfig, HydrateStatus, Hydrator};
use crate::ring::{HostRing, Ring};
use crate::ship::{DataPlaneSink, ShipConfig, ShipHandle, ShipStatus};
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 15_000;

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub cache: CacheConfig,
    pub flush_interval: Duration,
    /// Spread each timed flush over the flush interval instead of running it at full speed
    /// ([`crate::flush`], "Pacing"). Requested cuts (`snapshot`, `del`) and flushes the SSD
    /// watermark forces always run at full speed.
    pub flush_pacing: bool,
    /// Ship each flushed epoch as a snapshot to a data plane (and, while the volume
    /// hydrates, fetch from it).
    pub ship: Option<ShipConfig>,
    /// Background hydration rate limit, bytes per second (0 = unlimited).
    pub hydrate_rate_bytes_per_s: u64,
    /// Readahead while hydrating: bytes fetched ahead of reads of blocks not yet local in
    /// order (whole extents; 0 = none; default [`HYDRATE_READAHEAD_BYTES`]).
    pub hydrate_readahead_bytes: u64,
    /// While hydrating: the regions the volume's heat map says were read most first.
    pub hydrate_hot_first: bool,
    /// How often the read heat map goes to the data plane ([`crate::heat`]); zero: no heat
    /// map is kept. Only with a data plane, never for an encrypted volume.
    pub heat_interval: Duration,
    /// How long a read of a not-yet-hydrated block retries an unreachable data plane.
    pub fetch_timeout: Duration,
}

pub const FETCH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// The default of [`VolumeConfig::heat_interval`].
pub const HEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);
/// The default of [`VolumeConfig::hydrate_readahead_bytes`]: 2 MiB.
pub const HYDRATE_READAHEAD_BYTES: u64 = crate::hydrate::HYDRATE_READAHEAD_EXTENTS
    * crate::hydrate::HYDRATE_EXTENT_BLOCKS
    * meta::BLOCK_SIZE;

pub struct Volume {
    pub cache: Arc<Cache>,
    pub flusher: Flusher,
    pub ship: Option<ShipHandle>,
    pub hydrator: Option<Hydrator>,
    /// The read heat map, shipped to the data plane ([`crate::heat`]).
    pub heat: Option<Arc<crate::heat::HeatMap>>,
    /// How the volume was resumed after its SSD cache was lost ([`crate::resume`]), if it was.
    pub resumed: Option<String>,
    /// The key id of an encrypted volume (client-side encryption, [`crate::crypt`]).
    pub key_id: Option<crate::crypt::KeyId>,
    /// How the device's requests reach the engine, once its queues run ([`crate::zerocopy`]).
    pub io_path: std::sync::OnceLock<crate::zerocopy::IoPath>,
}

/// A point-in-time view of a volume for `deltavol status`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub volume_id: String,
    pub size_bytes: u64,
    pub epoch: u64,
    pub frozen_epoch: u64,
    pub flushed_epoch: u64,
    pub dirty_bytes: u64,
    pub ssd_used_bytes: u64,
    pub ssd_allocated_bytes: u64,
    pub cache_limit_bytes: u64,
    pub read_cache_blocks: u64,
    pub read_cache_hits: u64,
    pub read_cache_misses: u64,
    pub read_cache_hit_ratio: f64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flush_requests: u64,
    pub backpressure_waits: u64,
    pub durability_failed: bool,
    pub flush: FlushStatus,
    pub shipping: Option<ShipStatus>,
    pub hydration: Option<HydrateStatus>,
    /// Set when this run resumed the volume after its SSD cache was lost: how (continued
    /// from the backing file, or resynchronised from the data plane).
    pub resumed: Option<String>,
    /// `copy` or `zero-copy` ([`crate::zerocopy::IoPath`]); `copy` until the device runs.
    pub io_path: crate::zerocopy::IoPath,
}

impl Volume {
    /// Opens (or creates) the volume and starts its syncer, flush thread and (with a data
    /// plane configured) its shipper.
    pub fn open(cfg: &VolumeConfig) -> Result<Volume> {
        Self::open_inner(cfg, None)
    }

    /// Like [`Volume::open`] with a given delta sink (tests).
    pub fn open_with_sink(cfg: &VolumeConfig, sink: Box<dyn DeltaSink>) -> Result<Volume> {
        Self::open_inner(cfg, Some(sink))
    }

    fn open_inner(cfg: &VolumeConfig, sink: Option<Box<dyn DeltaSink>>) -> Result<Volume> {
        if cfg.flush_interval.is_zero() {
            return Err(Error::invalid("flush interval must be at least 1 ms"));
        }
        let key_id = check_encryption(cfg)?;
        // A lost SSD cache over a kept backing: resume the volume under its own identity.
        let resumed = crate::resume::plan(cfg)?;
        // A recover or clone onto a backing that already holds data (the same volume's, kept):
        // blocks equal to the snapshot by checksum need not be fetched.
        let seed_kept_backing = resumed.is_none()
            && cfg.cache.create_as.is_some_and(|c| c.hydrate)
            && !crate::cache::holds_volume(&cfg.cache.cache_dir)
            && std::fs::metadata(&cfg.cache.backing).is_ok_and(|m| m.len() > 0);
        let owned;
        let cfg = match &resumed {
            None => cfg,
            Some(r) => {
                if r.zero_backing {
                    crate::resume::zero_backing(&cfg.cache.backing, r.size_bytes)?;
                }
                let mut c = cfg.clone();
                c.cache.create_as = Some(r.create_as);
                c.cache.size_bytes = Some(r.size_bytes);
                owned = c;
                &owned
            }
        };
        let cache = Arc::new(Cache::open(&cfg.cache)?);
        let mut resumed = resumed.map(|r| r.note);
        if let (true, Some(sc)) = (seed_kept_backing, &cfg.ship) {
            let kept = crate::resume::seed_from_checksums(&cache, sc)?;
            tracing::info!(volume = %cache.name, blocks_kept = kept, blocks = cache.nblocks, "the backing already held data: blocks equal to the snapshot by checksum are kept, not fetched");
        }
        if let (Some(note), Some(sc)) = (&mut resumed, &cfg.ship) {
            if cache.hydrating().is_some() {
                let kept = crate::resume::seed_from_checksums(&cache, sc)?;
                note.push_str(&format!(
                    "; {kept} of {} blocks of the backing equal the snapshot by checksum and are kept",
                    cache.nblocks
                ));
            }
        }
        let mut ship = None;
        let heat = cfg
            .ship
            .as_ref()
            .filter(|sc| !cfg.heat_interval.is_zero() && !sc.codec.is_encrypted())
            .map(|_| {
                Arc::new(crate::heat::HeatMap::new(
                    cache.nblocks,
                    cfg.cache.nr_queues,
                ))
            });
        let sink: Box<dyn DeltaSink> = match (sink, &cfg.ship) {
            (Some(s), _) => s,
            (None, Some(sc)) => {
                let s = DataPlaneSink::start(
                    sc.clone(),
                    &cache.name,
                    cache.volume_id,
                    cache.size_bytes,
                    cache.snap_head(),
                    cache.generation(),
                    cache.backing_state(),
                )?;
                let h = s.handle();
                let weak = Arc::downgrade(&cache);
                h.set_fence_hook(
                    Box::new(move |newer| {
                        if let Some(c) = weak.upgrade() {
                            if let Err(e) = c.fence(newer) {
                                tracing::error!(volume = %c.name, error = %e, "could not persist the fence (the device is read-only until the daemon stops)");
                            }
                        }
                    }),
                    cache.fenced.load(SeqCst),
                );
                ship = Some(h);
                if let Some(hm) = &heat {
                    s.ship_heat(hm.clone(), cfg.heat_interval);
                }
                Box::new(s)
            }
            (None, None) => Box::new(NullSink),
        };
        let sync = SyncHandle::start(cache.clone())
            .map_err(|e| Error::io("start syncer for", &cfg.cache.cache_dir, e))?;
        if cache.syncer.set(sync).is_err() {
            return Err(Error::invalid("syncer already started"));
        }
        let flusher = Flusher::start(cache.clone(), sink, cfg.flush_interval, cfg.flush_pacing)
            .map_err(|e| Error::io("start flush thread for", &cfg.cache.cache_dir, e))?;
        let hydrator = match (&cfg.ship, cache.hydrating()) {
            (_, None) => None,
            (None, Some(_)) => {
                return Err(Error::invalid(format!(
                    "volume {:?} is still hydrating from the data plane: give --dataplane and --auth-token-file",
                    cache.name
                )))
            }
            (Some(sc), Some(_)) => Hydrator::start(
                cache.clone(),
                HydrateConfig {
                    ship: sc.clone(),
                    generation: cache.generation(),
                    rate_bytes_per_s: cfg.hydrate_rate_bytes_per_s,
                    readahead_extents: cfg.hydrate_readahead_bytes
                        / (crate::hydrate::HYDRATE_EXTENT_BLOCKS * meta::BLOCK_SIZE),
                    hot_first: cfg.hydrate_hot_first,
                    fetch_timeout: cfg.fetch_timeout,
                },
            )?,
        };
        Ok(Volume {
            cache,
            flusher,
            ship,
            hydrator,
            heat,
            resumed,
            key_id,
            io_path: std::sync::OnceLock::new(),
        })
    }

    /// Serves one block request (see [`Cache::handle`]); a read counts in the heat map.
    pub async fn handle<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        buf: &mut [u8],
    ) -> i32 {
        if op == crate::cache::io::UBLK_IO_OP_READ {
            if let Some(h) = &self.heat {
                h.record(ring.queue_index(), start_sector >> (meta::BLOCK_SHIFT - 9));
            }
        }
        self.cache
            .handle(ring, op, flags, start_sector, nr_sectors, buf)
            .await
    }

    /// As [`Volume::handle`], for a zero-copy request ([`Cache::handle_req`]).
    pub async fn handle_req<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        req: crate::ring::ReqBuf<'_>,
    ) -> i32 {
        if op == crate::cache::io::UBLK_IO_OP_READ {
            if let Some(h) = &self.heat {
                h.record(ring.queue_index(), start_sector >> (meta::BLOCK_SHIFT - 9));
            }
        }
        self.cache
            .handle_req(ring, op, flags, start_sector, nr_sectors, req)
            .await
    }

    /// A private ring for host thread `index` (tests, benchmarks).
    pub fn host_ring(&self, index: usize) -> std::io::Result<HostRing> {
        let c = &self.cache;
        HostRing::new(
            index,
            [c.mirrors[0].as_raw_fd(), c.mirrors[1].as_raw_fd()],
            c.backing.as_raw_fd(),
        )
    }

    /// Cuts the active epoch now and waits for its flush.
    pub fn cut_and_flush(&self) -> Result<crate::flush::FlushReport> {
        self.flusher.cut_and_wait()
    }

    /// Cuts the epoch and returns once the switch happened: `(ticket, epoch)` (see
    /// [`crate::flush::Flusher::cut`]); [`Volume::wait_flushed`] waits for its flush.
    pub fn cut(&self, timeout: std::time::Duration) -> Result<(u64, u64)> {
        self.flusher.cut(timeout)
    }

    pub fn wait_flushed(&self, ticket: u64) -> Result<crate::flush::FlushReport> {
        self.flusher.wait_flushed(ticket)
    }

    /// Clean stop: flushes everything to the backing file, then stops the threads. Call once
    /// no more I/O can arrive.
    pub fn shutdown(&self) {
        self.flusher.stop();
        if let Some(h) = &self.hydrator {
            h.stop();
        }
        if let Some(s) = self.cache.syncer.get() {
            s.stop();
        }
    }

    /// Simulated crash (tests): stops the threads without flushing anything more.
    pub fn crash(&self) {
        self.flusher.abort();
        if let Some(h) = &self.hydrator {
            h.abort();
        }
        if let Some(s) = self.cache.syncer.get() {
            s.stop();
        }
    }

    pub fn status(&self) -> VolumeStatus {
        let c = &self.cache;
        let hits = c.stats_sum(|s| &s.rcache_hits);
        let misses = c.stats_sum(|s| &s.rcache_misses);
        VolumeStatus {
            name: c.name.clone(),
            volume_id: meta::volume_id_hex(&c.volume_id),
            size_bytes: c.size_bytes,
            epoch: c.epochs.current(),
            frozen_epoch: c.epochs.frozen(),
            flushed_epoch: c.flushed_epoch(),
            dirty_bytes: c.dirty_blocks() * meta::BLOCK_SIZE,
            ssd_used_bytes: c.ssd_used_blocks() * meta::BLOCK_SIZE,
            ssd_allocated_bytes: c.ssd_allocated_bytes(),
            cache_limit_bytes: c.cache_limit_blocks * meta::BLOCK_SIZE,
            read_cache_blocks: c.rcache.len_blocks(),
            read_cache_hits: hits,
            read_cache_misses: misses,
            read_cache_hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            reads: c.stats_sum(|s| &s.reads),
            writes: c.stats_sum(|s| &s.writes),
            read_bytes: c.stats_sum(|s| &s.read_bytes),
            write_bytes: c.stats_sum(|s| &s.write_bytes),
            flush_requests: c.stats_sum(|s| &s.flushes),
            backpressure_waits: c.stats_sum(|s| &s.backpressure_waits),
            durability_failed: c.sync_failed.load(SeqCst),
            flush: self.flusher.status(),
            shipping: self.ship.as_ref().map(|s| s.status()),
            hydration: self.hydrator.as_ref().map(|h| h.status()),
            resumed: self.resumed.clone(),
            io_path: self
                .io_path
                .get()
                .copied()
                .unwrap_or(crate::zerocopy::IoPath::Copy),
        }
    }
}

/// Client-side encryption is chosen when a volume is created: records the key id of a volume
/// about to be created in its cache dir (before anything else of it exists there), and
/// refuses to attach an existing volume without its key, with another key, or with a key
/// when it was created without one. Returns the key id in use.
fn check_encryption(cfg: &VolumeConfig) -> Result<Option<crate::crypt::KeyId>> {
    use crate::crypt::key_id_hex;
    let dir = &cfg.cache.cache_dir;
    let name = &cfg.cache.name;
    let given = cfg.ship.as_ref().and_then(|s| s.codec.key_id());
    if !crate::cache::holds_volume(dir) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create cache dir", dir, e))?;
        meta::write_key_record(dir, given.as_ref())?;
        return Ok(given);
    }
    let recorded = meta::read_key_record(dir)?;
    match (recorded, given) {
        (Some(r), None) => Err(Error::mismatch(format!(
            "volume {name:?} is encrypted (key id {}, recorded in {}): give --dataplane, --auth-token-file and --encryption-key-file with its key",
            key_id_hex(&r),
            dir.join(meta::KEY_RECORD_FILE).display()
        ))),
        (Some(r), Some(g)) if r != g => Err(Error::mismatch(format!(
            "volume {name:?} is encrypted with key id {}, but the key given (--encryption-key-file) has key id {}: give the key it was created with",
            key_id_hex(&r),
            key_id_hex(&g)
        ))),
        (None, Some(g)) if encrypted_remotely(cfg)? => {
            // The cache dir was made without the key while the data plane was away (a lost
            // SSD resumed without --encryption-key-file): the data plane says the volume is
            // encrypted under this very key, so the record is repaired. What waits in the
            // outbox is plaintext, and is sealed as it is shipped.
            tracing::warn!(volume = %name, key_id = %key_id_hex(&g), "the volume is encrypted on the data plane under this key but its cache dir had no record of it: recorded now");
            meta::write_key_record(dir, Some(&g))?;
            Ok(given)
        }
        (None, Some(_)) => Err(Error::mismatch(format!(
            "volume {name:?} was created without encryption: leave out --encryption-key-file (encryption is chosen when a volume is created; to encrypt its data, copy it into a new volume created with the key)"
        ))),
        _ => Ok(given),
    }
}

/// Whether the data plane holds the volume encrypted under the key of `cfg` (checked on a
/// block of its newest snapshot); `false` when it does not, or cannot be asked.
fn encrypted_remotely(cfg: &VolumeConfig) -> Result<bool> {
    let Some(sc) = &cfg.ship else {
        return Ok(false);
    };
    // Read-only, by name: generation 0 writes nothing a fence applies to.
    let Ok((mut c, _)) = sc.connect_as(&cfg.cache.name, 0, None) else {
        return Ok(false);
    };
    let info = c.info().clone();
    if !info.exists || !crate::crypt::is_sealed_block_size(info.block_size) {
        return Ok(false);
    }
    // Another key is refused here, naming both ids.
    sc.codec
        .check_remote(&mut c, &cfg.cache.name, &info, info.latest_snap_id)?;
    Ok(true)
}
