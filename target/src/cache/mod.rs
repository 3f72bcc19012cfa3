//! The per-volume cache: the SSD mirror pair, the epochs and their dirty bitmaps, the LRU read
//! cache, and the backing file behind them.
//!
//! ## Files
//! In the cache dir (on SSD): `superblock`, `mirror.0`, `mirror.1` (sparse, volume-sized,
//! direct-mapped: block `b` at offset `b * 4096`), `map.0`, `map.1` (the persisted dirty
//! bitmaps of the epoch in each slot, see [`meta`]) and `lock` (an exclusive `flock`, so only
//! one daemon attaches a volume). The backing file (big, slow disk) is a plain volume-sized
//! image: after a flush it holds the volume as of that epoch, and can be mounted as such.
//!
//! ## Reads
//! active epoch's bitmap → frozen epoch's bitmap → LRU read cache → backing file.
//!
//! ## Invariants
//! - A block whose bit is set in epoch `e`'s bitmap has its newest data in `mirror[e % 2]`
//!   (a DISCARD / WRITE_ZEROES punches a hole there, which reads back as zeros).
//! - Bits are only set after the mirror write completed; they stay set until epoch `e` is
//!   flushed, committed (`flushed_epoch = e` durable) and retired.
//! - After a FLUSH (or FUA write) completes, every write completed before it is durable: its
//!   data in the mirror and its bit in the map (the syncer snapshots the map pages, then syncs
//!   the mirrors, then writes and syncs the pages).

pub mod bitmap;
pub mod epoch;
pub mod io;
pub mod journal;
pub mod meta;
pub mod readcache;
pub mod syncer;
pub mod wait;

pub use syncer::SyncHandle;

use crate::error::{Error, ErrorKind, Result};
use bitmap::Bitmap;
use epoch::{Epochs, Padded};
use meta::{Superblock, VolumeId, BLOCK_SIZE, MAP_PAGE_BYTES, PAGE_BITS};
use readcache::ReadCache;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

/// Share of the cache limit at which the flush thread cuts early.
pub const HIGH_WATERMARK_PERCENT: u64 = 50;

/// How to open or create a volume's cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub name: String,
    /// Required to create; when given for an existing volume it must match.
    pub size_bytes: Option<u64>,
    pub cache_dir: PathBuf,
    pub backing: PathBuf,
    /// SSD bytes the two mirrors may hold before writes wait.
    pub cache_limit_bytes: u64,
    pub read_cache_bytes: u64,
    /// Queues (or host threads) that will call the handler.
    pub nr_queues: usize,
    /// When the volume is created (not reattached): start it as a copy of a data-plane
    /// snapshot, to be hydrated (recover, clone).
    pub create_as: Option<CreateAs>,
    /// How completed writes are journaled for a daemon crash (see [`journal`]).
    pub journal: journal::Kind,
}

/// The starting point of a volume created from the data plane.
#[derive(Debug, Clone, Copy)]
pub struct CreateAs {
    /// The epoch the local volume starts after (its snapshots continue the chain from here).
    pub flushed_epoch: u64,
    /// The chain head on the data plane (parent of the first new snapshot).
    pub snap_head: u64,
    /// The writer generation the data plane gave this volume.
    pub generation: u64,
    /// The data-plane snapshot whose contents the volume hydrates from (0: a clone's base).
    pub hydrate_snap: u64,
    /// Whether the volume starts hydrating from `hydrate_snap` (recover, clone, resync); not
    /// when it continues on a backing file that already holds `flushed_epoch` (a lost SSD).
    pub hydrate: bool,
    /// The volume's identity on the data plane: a recovered volume keeps the id it has
    /// there; a clone gets the new id it was created with.
    pub volume_id: VolumeId,
}

/// While a volume hydrates from the data plane: which blocks are local (hydrated, or written
/// here), so that reads of the others are fetched and hydration never overwrites a write.
pub struct Hydration {
    pub local: Bitmap,
    pub snap: u64,
    pub done: AtomicBool,
    /// The fetcher serving on-demand reads; set once it is started.
    pub fetch: std::sync::OnceLock<crate::hydrate::FetchHandle>,
    pub(crate) persist: Mutex<crate::hydrate::MapPersist>,
}

/// One mirror slot: the dirty bitmap of the epoch using it, and its persistence state.
pub struct Slot {
    pub bits: Bitmap,
    /// Map pages changed since they were last persisted.
    dirty_pages: Box<[AtomicBool]>,
    /// Blocks written with data (not discards) in this epoch: the SSD space it uses.
    pub data_blocks: AtomicU64,
    /// The mirror file has writes not yet synced.
    mirror_dirty: AtomicBool,
    persist: Mutex<PagePersist>,
}

/// Per-page persistence bookkeeping (only the syncer and the flush's clear touch it).
struct PagePersist {
    seq: Vec<u64>,
    /// Which copy (0/1) holds the newest valid version, 2 when neither does.
    newest: Vec<u8>,
}

impl Slot {
    fn new(nblocks: u64) -> Slot {
        let npages = nblocks.div_ceil(PAGE_BITS) as usize;
        Slot {
            bits: Bitmap::new(nblocks),
            dirty_pages: (0..npages).map(|_| AtomicBool::new(false)).collect(),
            data_blocks: AtomicU64::new(0),
            mirror_dirty: AtomicBool::new(false),
            persist: Mutex::new(PagePersist {
                seq: vec![0; npages],
                newest: vec![2; npages],
            }),
        }
    }

    /// Records that `[start, start + len)` was written in this slot's epoch.
    fn mark(&self, start: u64, len: u64, data: bool) {
        if !self.mirror_dirty.load(SeqCst) {
            self.mirror_dirty.store(true, SeqCst);
        }
        let newly = self.bits.set_range(start, len);
        if data && newly > 0 {
            self.data_blocks.fetch_add(newly, SeqCst);
        }
        for p in start / PAGE_BITS..=(start + len - 1) / PAGE_BITS {
            let d = &self.dirty_pages[p as usize];
            if !d.load(SeqCst) {
                d.store(true, SeqCst);
            }
        }
    }
}

/// Upper bounds of the request latency buckets, in microseconds (a last bucket holds the rest).
pub const LATENCY_BUCKET_BOUNDS_US: [u64; 10] = [
    16, 64, 256, 1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000, 4_000_000,
];
/// Buckets of [`LatencyStats`]: one per bound, and one above the last.
pub const LATENCY_BUCKETS: usize = LATENCY_BUCKET_BOUNDS_US.len() + 1;
/// Index of the ops in [`QueueStats::latency`] (DISCARD and WRITE_ZEROES are not timed).
pub const LATENCY_READ: usize = 0;
pub const LATENCY_WRITE: usize = 1;
pub const LATENCY_FLUSH: usize = 2;

/// Latency of one op's requests on one queue, from the handler's start to its result (waits
/// for backpressure, fetches and durability included): requests per bucket, and the sum.
#[derive(Default)]
pub struct LatencyStats {
    pub buckets: [AtomicU64; LATENCY_BUCKETS],
    pub sum_ns: AtomicU64,
}

impl LatencyStats {
    /// Two relaxed adds on the queue's own counters.
    pub fn record(&self, elapsed: std::time::Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKET_BOUNDS_US
            .iter()
            .position(|&b| ns <= b * 1_000)
            .unwrap_or(LATENCY_BUCKETS - 1);
        self.buckets[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sum_ns
            .fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Per-queue counters (each queue writes only its own).
#[derive(Default)]
pub struct QueueStats {
    /// Request latency by op ([`LATENCY_READ`], [`LATENCY_WRITE`], [`LATENCY_FLUSH`]).
    pub latency: [LatencyStats; 3],
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub rcache_hits: AtomicU64,
    pub rcache_misses: AtomicU64,
    pub flushes: AtomicU64,
    pub backpressure_waits: AtomicU64,
}

/// A volume's cache: files, epochs, bitmaps and read cache.
pub struct Cache {
    pub name: String,
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    pub nblocks: u64,
    pub cache_dir: PathBuf,
    pub backing_path: PathBuf,
    sb: Mutex<(Superblock, File)>,
    pub mirrors: [File; 2],
    maps: [File; 2],
    pub backing: File,
    pub slots: [Slot; 2],
    pub epochs: Epochs,
    pub rcache: ReadCache,
    pub stats: Box<[Padded<QueueStats>]>,
    pub cache_limit_blocks: u64,
    pub high_water_blocks: u64,
    /// Set by the write path when the high watermark is crossed; the flush thread clears it.
    pub watermark_hit: AtomicBool,
    /// A sync failed: durability can no longer be promised, every later FLUSH fails.
    pub sync_failed: AtomicBool,
    /// Fenced: the data plane moved to a newer writer generation (the volume was recovered
    /// elsewhere). Writes, discards and write-zeroes fail with EIO from then on, reads go on:
    /// this node must not take writes that can never reach the volume's chain. Persisted.
    pub fenced: AtomicBool,
    /// Time each request into the per-queue latency histograms (set while a metrics endpoint
    /// exports the volume: the clock reads cost ~5% of a cached 4k read's CPU).
    pub time_requests: AtomicBool,
    /// The syncer thread serving FLUSH; set once it is started (see [`SyncHandle::start`]).
    pub syncer: std::sync::OnceLock<SyncHandle>,
    /// Present while the volume hydrates from the data plane.
    pub hydration: Option<Hydration>,
    /// Held by whoever writes the backing file for the flush or for hydration, so that
    /// hydration never writes a block after the flush of a newer write to it.
    pub backing_lock: Mutex<()>,
    /// Membership of completed writes, for a daemon crash (see [`journal`]); started once
    /// what the previous run's journals held is persisted.
    pub journals: std::sync::OnceLock<journal::Journals>,
    _lock: File,
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Checks a volume name: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= meta::NAME_LEN_MAX
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid volume name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)"
        )))
    }
}

fn file_size(f: &File, path: &Path) -> Result<u64> {
    let md = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if md.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which outlives the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x8008_1272, &mut size as *mut u64) };
        if r < 0 {
            return Err(Error::io(
                "BLKGETSIZE64",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(size)
    } else {
        Ok(md.len())
    }
}

/// Whether `cache_dir` holds a volume (a non-empty superblock; an empty one is a creation that
/// never completed).
pub fn holds_volume(cache_dir: &Path) -> bool {
    cache_dir
        .join("superblock")
        .metadata()
        .is_ok_and(|m| m.len() > 0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cache {
    /// Opens the volume in `cfg.cache_dir`, creating it if the dir holds no volume yet.
    pub fn open(cfg: &CacheConfig) -> Result<Cache> {
        validate_name(&cfg.name)?;
        if let Some(size) = cfg.size_bytes {
            if size == 0 || size % BLOCK_SIZE != 0 {
                return Err(Error::invalid(format!(
                    "volume size {size} must be a positive multiple of {BLOCK_SIZE} bytes"
                )));
            }
        }
        std::fs::create_dir_all(&cfg.cache_dir)
            .map_err(|e| Error::io("create cache dir", &cfg.cache_dir, e))?;
        let lock_path = cfg.cache_dir.join("lock");
        let lock = open_rw(&lock_path, true)?;
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "cache dir {} is in use by another deltavol process: `deltavol list` shows it; `deltavol del {}` detaches it",
                    cfg.cache_dir.display(),
                    cfg.name
                ),
            ));
        }
        let sb_path = cfg.cache_dir.join("superblock");
        // An empty superblock is a creation that never completed: start over.
        let exists = holds_volume(&cfg.cache_dir);
        let sb_file = open_rw(&sb_path, true)?;
        let (mut sb, fresh) = if exists {
            let sb = Superblock::read(&sb_file, &sb_path)?;
            if sb.name != cfg.name {
                return Err(Error::mismatch(format!(
                    "cache dir {} belongs to volume {:?} (id {}), not {:?}: give that volume's name or another --cache-dir",
                    cfg.cache_dir.display(),
                    sb.name,
                    meta::volume_id_hex(&sb.volume_id),
                    cfg.name
                )));
            }
            if let Some(size) = cfg.size_bytes {
                if size != sb.size_bytes {
                    return Err(Error::mismatch(format!(
                        "volume {:?} in {} is {} bytes, not {size}: resizing is not supported; omit --size to reattach",
                        sb.name,
                        cfg.cache_dir.display(),
                        sb.size_bytes
                    )));
                }
            }
            (sb, false)
        } else {
            let Some(size_bytes) = cfg.size_bytes else {
                drop(sb_file);
                let _ = std::fs::remove_file(&sb_path);
                return Err(Error::invalid(format!(
                    "{} holds no volume yet: give --size to create volume {:?}",
                    cfg.cache_dir.display(),
                    cfg.name
                )));
            };
            let ca = cfg.create_as;
            let sb = Superblock {
                volume_id: ca.map_or_else(rand::random, |c| c.volume_id),
                name: cfg.name.clone(),
                size_bytes,
                flushed_epoch: ca.map_or(0, |c| c.flushed_epoch),
                seq: 0,
                created_unix_ms: now_unix_ms(),
                snap_head: ca.map_or(0, |c| c.snap_head),
                generation: ca.map_or(0, |c| c.generation),
                hydrating: ca.is_some_and(|c| c.hydrate),
                hydrate_snap: ca.filter(|c| c.hydrate).map_or(0, |c| c.hydrate_snap),
                fenced_generation: 0,
                cuts: [(0, 0); 2],
            };
            (sb, true)
        };
        let backing = match open_rw(&cfg.backing, fresh) {
            Ok(b) => b,
            Err(e) => {
                if fresh {
                    drop(sb_file);
                    let _ = std::fs::remove_file(&sb_path);
                }
                return Err(e);
            }
        };
        let bsize = file_size(&backing, &cfg.backing)?;
        let is_blk = backing
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let backing_ok = if is_blk {
            bsize >= sb.size_bytes
        } else {
            bsize == sb.size_bytes || (fresh && bsize == 0)
        };
        if !backing_ok {
            if fresh {
                drop(sb_file);
                let _ = std::fs::remove_file(&sb_path);
            }
            return Err(Error::mismatch(format!(
                "backing {} is {bsize} bytes but volume {:?} is {} bytes: wrong --backing for this volume?",
                cfg.backing.display(),
                sb.name,
                sb.size_bytes
            )));
        }
        if fresh {
            if !is_blk && bsize == 0 {
                backing
                    .set_len(sb.size_bytes)
                    .map_err(|e| Error::io("resize", &cfg.backing, e))?;
            }
            // Both copies, so a torn later update always has a valid twin.
            sb.write_next(&sb_file, &sb_path)?;
            sb.write_next(&sb_file, &sb_path)?;
        }
        let mut mirrors = Vec::new();
        let mut maps = Vec::new();
        for s in 0..2 {
            let mp = cfg.cache_dir.join(format!("mirror.{s}"));
            let m = open_rw(&mp, true)?;
            if file_size(&m, &mp)? != sb.size_bytes {
                m.set_len(sb.size_bytes)
                    .map_err(|e| Error::io("resize", &mp, e))?;
            }
            mirrors.push(m);
            let pp = cfg.cache_dir.join(format!("map.{s}"));
            maps.push(open_rw(&pp, true)?);
        }
        let nblocks = sb.size_bytes / BLOCK_SIZE;
        let slots = [Slot::new(nblocks), Slot::new(nblocks)];

        // Derive the live epochs from flushed_epoch F and the persisted pages: slot (F+1)%2
        // may hold epoch F+1, slot F%2 may hold epoch F+2 (the cut was made, F+1 not flushed).
        let f = sb.flushed_epoch;
        let mut found = [false; 2];
        for (s, slot) in slots.iter().enumerate() {
            let expected = if (f + 1) % 2 == s as u64 {
                f + 1
            } else {
                f + 2
            };
            found[s] = load_map(
                &maps[s],
                &cfg.cache_dir.join(format!("map.{s}")),
                slot,
                s as u8,
                expected,
                &sb.volume_id,
            )?;
        }
        // Writes completed before a daemon crash on this boot (not yet FLUSHed).
        let replayed = journal::replay(&cfg.cache_dir, &sb.volume_id, |slot, epoch, lba, n| {
            let expected = if (f + 1) % 2 == slot as u64 {
                f + 1
            } else {
                f + 2
            };
            if epoch == expected && n > 0 && lba.checked_add(n).is_some_and(|e| e <= nblocks) {
                slots[slot].mark(lba, n, false);
                found[slot] = true;
            }
        })?;
        // The same from bitmap journals: every bit set in the epoch a slot may hold.
        let mut replayed_bits = 0u64;
        journal::replay_bits(
            &cfg.cache_dir,
            &sb.volume_id,
            nblocks,
            |slot, epoch, words| {
                let expected = if (f + 1) % 2 == slot as u64 {
                    f + 1
                } else {
                    f + 2
                };
                if epoch != expected {
                    return;
                }
                for (i, &w) in words.iter().enumerate() {
                    let mut w = w;
                    while w != 0 {
                        // One run of set bits at a time.
                        let lo = u64::from(w.trailing_zeros());
                        let run = u64::from((w >> lo).trailing_ones());
                        slots[slot].mark(i as u64 * 64 + lo, run, false);
                        replayed_bits += run;
                        found[slot] = true;
                        w = if lo + run >= 64 {
                            0
                        } else {
                            w & !(((1u64 << run) - 1) << lo)
                        };
                    }
                }
            },
        )?;
        let replayed = replayed + replayed_bits;
        let (active, frozen) = if found[(f % 2) as usize] {
            (f + 2, f + 1)
        } else {
            (f + 1, 0)
        };
        for s in &slots {
            s.data_blocks.store(s.bits.count(), SeqCst);
        }
        if frozen == 0 {
            // Slot F%2 holds only flushed data: reclaim it now (idempotent).
            let s = (f % 2) as usize;
            slots[s].bits.clear_all();
            slots[s].data_blocks.store(0, SeqCst);
            punch_all(
                &mirrors[s],
                &cfg.cache_dir.join(format!("mirror.{s}")),
                sb.size_bytes,
            )?;
        }

        let limit = cfg.cache_limit_bytes / BLOCK_SIZE;
        if limit < 2 * 256 {
            return Err(Error::invalid(format!(
                "cache limit {} bytes is too small: give at least 2MiB",
                cfg.cache_limit_bytes
            )));
        }
        let hydration = if sb.hydrating {
            let h = crate::hydrate::open_local_map(
                &cfg.cache_dir,
                &sb,
                nblocks,
                &backing,
                &cfg.backing,
            )?;
            // Blocks written here (still in an epoch) are local whatever the map says.
            for s in &slots {
                for w in 0..s.bits.nwords() {
                    h.local.or_word(w, s.bits.word(w));
                }
            }
            Some(h)
        } else {
            None
        };
        let mirrors: [File; 2] = mirrors.try_into().map_err(|_| Error::invalid("mirrors"))?;
        let maps: [File; 2] = maps.try_into().map_err(|_| Error::invalid("maps"))?;
        let fenced = sb.fenced_generation != 0;
        let mut c = Cache {
            name: sb.name.clone(),
            volume_id: sb.volume_id,
            size_bytes: sb.size_bytes,
            nblocks,
            cache_dir: cfg.cache_dir.clone(),
            backing_path: cfg.backing.clone(),
            sb: Mutex::new((sb, sb_file)),
            mirrors,
            maps,
            backing,
            slots,
            epochs: Epochs::new(active, frozen, cfg.nr_queues),
            rcache: ReadCache::new(cfg.read_cache_bytes),
            stats: (0..cfg.nr_queues.max(1))
                .map(|_| Padded::default())
                .collect(),
            cache_limit_blocks: limit,
            high_water_blocks: limit * HIGH_WATERMARK_PERCENT / 100,
            watermark_hit: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            fenced: AtomicBool::new(fenced),
            time_requests: AtomicBool::new(false),
            syncer: std::sync::OnceLock::new(),
            hydration,
            backing_lock: Mutex::new(()),
            journals: std::sync::OnceLock::new(),
            _lock: lock,
        };
        if replayed > 0 {
            // Make the replayed membership durable before the journals start over.
            c.sync_durable()?;
        }
        let kind = cfg.journal.resolve(&cfg.cache_dir);
        let j =
            journal::Journals::create(&cfg.cache_dir, &c.volume_id, cfg.nr_queues, kind, nblocks)?;
        for (s, slot) in c.slots.iter_mut().enumerate() {
            if let Some(b) = j.bits_file(s) {
                slot.bits.move_to(b);
            }
        }
        j.begin_epoch((active % 2) as usize, active);
        if frozen != 0 {
            j.begin_epoch((frozen % 2) as usize, frozen);
        }
        let _ = c.journals.set(j);
        tracing::info!(
            journal = ?kind,
            journal_records_replayed = replayed,
            volume = %c.name, id = %meta::volume_id_hex(&c.volume_id), size_bytes = c.size_bytes,
            active_epoch = active, frozen_epoch = frozen, flushed_epoch = f,
            dirty_blocks = c.dirty_blocks(), "volume cache opened"
        );
        Ok(c)
    }

    /// Cuts the active epoch (see [`Epochs::cut`]); the slot the next epoch takes is tagged
    /// with it in the bitmap journal first, before any of its writes can set a bit.
    pub fn cut(&self) -> u64 {
        let next = self.epochs.current() + 1;
        if let Some(j) = self.journals.get() {
            j.begin_epoch((next % 2) as usize, next);
        }
        self.epochs.cut()
    }

    pub fn flushed_epoch(&self) -> u64 {
        self.sb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .flushed_epoch
    }

    /// Blocks held in the mirrors (active + frozen), counting discarded blocks too.
    pub fn dirty_blocks(&self) -> u64 {
        let a = self.epochs.current();
        let f = self.epochs.frozen();
        let mut n = self.slots[(a % 2) as usize].bits.count();
        if f != 0 {
            n += self.slots[(f % 2) as usize].bits.count();
        }
        n
    }

    /// SSD blocks holding data (what the cache limit bounds).
    pub fn ssd_used_blocks(&self) -> u64 {
        self.slots[0].data_blocks.load(SeqCst) + self.slots[1].data_blocks.load(SeqCst)
    }

    /// The SSD cache is at its high-water mark: writers wait (or soon will) for the flush.
    pub fn under_pressure(&self) -> bool {
        self.ssd_used_blocks() >= self.high_water_blocks
    }

    /// Bytes the mirror files really occupy on the cache filesystem.
    pub fn ssd_allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.mirrors
            .iter()
            .map(|m| m.metadata().map(|md| md.blocks() * 512).unwrap_or(0))
            .sum()
    }

    /// The epoch owning slot `s`, if any.
    fn slot_owner(&self, s: usize) -> Option<u64> {
        let a = self.epochs.current();
        if (a % 2) as usize == s {
            return Some(a);
        }
        let f = self.epochs.frozen();
        (f != 0 && (f % 2) as usize == s).then_some(f)
    }

    /// Makes every completed write durable (the work of a FLUSH). Blocking: called by the
    /// syncer thread, which batches concurrent FLUSHes into one call (group commit).
    pub fn sync_durable(&self) -> Result<()> {
        if self.sync_failed.load(SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier sync failed; restart the volume",
            ));
        }
        let r = self.sync_durable_inner();
        if r.is_err() {
            self.sync_failed.store(true, SeqCst);
        }
        r
    }

    fn sync_durable_inner(&self) -> Result<()> {
        let mut locks = [
            self.slots[0]
                .persist
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            self.slots[1]
                .persist
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ];
        // 1. Snapshot the changed pages: every bit in them belongs to a completed write.
        let pw = meta::page_words();
        let mut pages: Vec<(usize, usize, u64, u64, u8, Vec<u8>)> = Vec::new();
        for (s, slot) in self.slots.iter().enumerate() {
            let Some(epoch) = self.slot_owner(s) else {
                continue;
            };
            let pp = &mut locks[s];
            for (i, d) in slot.dirty_pages.iter().enumerate() {
                if !d.load(SeqCst) || !d.swap(false, SeqCst) {
                    continue;
                }
                let first = i * pw;
                let words: Vec<u64> = (first..(first + pw).min(slot.bits.nwords()))
                    .map(|w| slot.bits.word(w))
                    .collect();
                let seq = pp.seq[i] + 1;
                let copy = if pp.newest[i] == 0 { 1 } else { 0 };
                let mut buf = vec![0u8; MAP_PAGE_BYTES];
                let hdr = meta::PageHdr {
                    page: i as u32,
                    slot: s as u8,
                    epoch,
                    seq,
                };
                meta::encode_page(&hdr, &self.volume_id, &words, &mut buf);
                pages.push((s, i, seq, epoch, copy, buf));
            }
        }
        // 2. Their data first...
        for (s, slot) in self.slots.iter().enumerate() {
            if slot.mirror_dirty.swap(false, SeqCst) {
                if let Err(e) = self.mirrors[s].sync_data() {
                    slot.mirror_dirty.store(true, SeqCst);
                    return Err(Error::io(
                        "fdatasync",
                        self.cache_dir.join(format!("mirror.{s}")),
                        e,
                    ));
                }
            }
        }
        // 3. ...then the pages that point at it.
        let mut touched = [false; 2];
        for (s, i, seq, _epoch, copy, buf) in &pages {
            let off = (2 * *i as u64 + u64::from(*copy)) * MAP_PAGE_BYTES as u64;
            let path = self.cache_dir.join(format!("map.{s}"));
            use std::os::unix::fs::FileExt;
            self.maps[*s]
                .write_all_at(buf, off)
                .map_err(|e| Error::io_at("write", &path, off, e))?;
            locks[*s].seq[*i] = *seq;
            touched[*s] = true;
        }
        for (s, t) in touched.iter().enumerate() {
            if *t {
                let path = self.cache_dir.join(format!("map.{s}"));
                self.maps[s]
                    .sync_data()
                    .map_err(|e| Error::io("fdatasync", &path, e))?;
            }
        }
        for (s, i, _, _, copy, _) in &pages {
            locks[*s].newest[*i] = *copy;
        }
        Ok(())
    }

    /// Commits `epoch` as flushed (its data is durable in the backing file) and `snap_head` as
    /// the newest snapshot the delta sink made durable.
    pub fn commit_flushed(&self, epoch: u64, snap_head: u64) -> Result<()> {
        let mut g = self.sb.lock().unwrap_or_else(|p| p.into_inner());
        let (sb, file) = &mut *g;
        let prev = (sb.flushed_epoch, sb.snap_head);
        sb.flushed_epoch = epoch;
        sb.snap_head = snap_head;
        let path = self.cache_dir.join("superblock");
        if let Err(e) = sb.write_next(file, &path) {
            (sb.flushed_epoch, sb.snap_head) = prev;
            return Err(e);
        }
        Ok(())
    }

    /// Records that epoch `epoch` was cut at `unix_ms` (wall clock), durably, so that its
    /// snapshot carries the moment of its cut even when it is flushed after a restart. A
    /// failure to persist is logged and the time kept in memory (a crash before the flush
    /// then ships the cut time as unknown).
    pub fn record_cut(&self, epoch: u64, unix_ms: u64) {
        let mut g = self.sb.lock().unwrap_or_else(|p| p.into_inner());
        let (sb, file) = &mut *g;
        sb.cuts[(epoch % 2) as usize] = (epoch, unix_ms);
        let path = self.cache_dir.join("superblock");
        if let Err(e) = sb.write_next(file, &path) {
            tracing::warn!(volume = %self.name, epoch, error = %e, "could not persist the cut time of the epoch; a crash before its flush ships it as unknown");
        }
    }

    /// The wall-clock cut time of epoch `epoch` (ms since the Unix epoch), 0 when unknown.
    pub fn cut_time(&self, epoch: u64) -> u64 {
        let g = self.sb.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.cuts[(epoch % 2) as usize] {
            (e, ms) if e == epoch && epoch != 0 => ms,
            _ => 0,
        }
    }

    /// What the backing file holds as this cache knows it: `Partial` while hydrating (blocks
    /// only the data plane has), `Writing(F + 1)` while a frozen epoch may be half-written
    /// into it, else exactly the flushed epoch F.
    pub fn backing_state(&self) -> crate::label::BackingState {
        use crate::label::BackingState;
        let f = self.flushed_epoch();
        if self.hydrating().is_some() {
            BackingState::Partial(f)
        } else if self.epochs.frozen() != 0 {
            BackingState::Writing(f + 1)
        } else {
            BackingState::Clean(f)
        }
    }

    /// Makes the volume read-only for good: the data plane said a newer writer (generation
    /// `newer`) owns it. Persisted before it returns, so a restart stays read-only.
    pub fn fence(&self, newer: u64) -> Result<()> {
        self.fenced.store(true, SeqCst);
        let mut g = self.sb.lock().unwrap_or_else(|p| p.into_inner());
        let (sb, file) = &mut *g;
        if sb.fenced_generation != 0 {
            return Ok(());
        }
        sb.fenced_generation = newer.max(1);
        let path = self.cache_dir.join("superblock");
        if let Err(e) = sb.write_next(file, &path) {
            sb.fenced_generation = 0;
            return Err(e);
        }
        Ok(())
    }

    /// The writer generation on the data plane.
    pub fn generation(&self) -> u64 {
        self.sb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .generation
    }

    /// The hydration state, while the volume is still hydrating.
    pub fn hydrating(&self) -> Option<&Hydration> {
        self.hydration.as_ref().filter(|h| !h.done.load(SeqCst))
    }

    /// Marks hydration complete in the superblock: from now on an ordinary volume.
    pub fn finish_hydration(&self) -> Result<()> {
        let mut g = self.sb.lock().unwrap_or_else(|p| p.into_inner());
        let (sb, file) = &mut *g;
        sb.hydrating = false;
        let path = self.cache_dir.join("superblock");
        if let Err(e) = sb.write_next(file, &path) {
            sb.hydrating = true;
            return Err(e);
        }
        if let Some(h) = &self.hydration {
            h.done.store(true, SeqCst);
        }
        Ok(())
    }

    /// The newest snapshot id recorded as durable in the sink (0 for none).
    pub fn snap_head(&self) -> u64 {
        self.sb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .snap_head
    }

    /// After the flushed epoch in slot `s` is retired and no reader uses it: forgets its
    /// bitmap, and frees its mirror space when the SSD cache needs room.
    ///
    /// Room is needed when the writers are at (or were pushed to) the high watermark, or the
    /// two mirrors' allocated bytes pass it. Otherwise the flushed blocks stay allocated,
    /// stale, for the epoch after next to overwrite in place: a write into a punched hole
    /// first allocates (on tmpfs: zeroes) a page, then the punch frees it again, every epoch.
    /// A stale block is never read: what a slot holds is its bitmap (persisted map, journal),
    /// never the mirror's allocation; a discard punches its range itself; and the flush reads
    /// only the blocks of its bitmap (the holes between them it may read are dropped).
    pub fn reclaim_slot(&self, s: usize) -> Result<()> {
        let _p = self.slots[s]
            .persist
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let room_needed = self.under_pressure()
            || self.watermark_hit.load(SeqCst)
            || self.ssd_allocated_bytes() >= self.high_water_blocks * BLOCK_SIZE;
        if room_needed {
            punch_all(
                &self.mirrors[s],
                &self.cache_dir.join(format!("mirror.{s}")),
                self.size_bytes,
            )?;
        }
        let slot = &self.slots[s];
        slot.bits.clear_all();
        slot.data_blocks.store(0, SeqCst);
        slot.mirror_dirty.store(false, SeqCst);
        for d in slot.dirty_pages.iter() {
            d.store(false, SeqCst);
        }
        if let Some(j) = self.journals.get() {
            j.reset(s);
        }
        Ok(())
    }

    pub fn stats_sum(&self, f: impl Fn(&QueueStats) -> &AtomicU64) -> u64 {
        self.stats.iter().map(|s| f(&s.0).load(SeqCst)).sum()
    }

    /// The latency of op `op` ([`LATENCY_READ`], ...) over all queues: requests per bucket
    /// and the sum in ns.
    pub fn latency_sum(&self, op: usize) -> ([u64; LATENCY_BUCKETS], u64) {
        let mut buckets = [0u64; LATENCY_BUCKETS];
        let mut sum_ns = 0u64;
        for s in self.stats.iter() {
            let l = &s.0.latency[op];
            for (b, a) in buckets.iter_mut().zip(&l.buckets) {
                *b += a.load(SeqCst);
            }
            sum_ns = sum_ns.saturating_add(l.sum_ns.load(SeqCst));
        }
        (buckets, sum_ns)
    }
}

/// Loads slot `s`'s persisted pages of `epoch` into `slot`; returns whether any bit was set.
fn load_map(
    file: &File,
    path: &Path,
    slot: &Slot,
    s: u8,
    epoch: u64,
    id: &VolumeId,
) -> Result<bool> {
    let npages = slot.dirty_pages.len();
    let pw = meta::page_words();
    let mut buf = vec![0u8; 2 * MAP_PAGE_BYTES];
    let mut words = vec![0u64; pw];
    let mut any = false;
    let mut pp = slot.persist.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..npages {
        let n = meta::read_full_at(file, &mut buf, (2 * i * MAP_PAGE_BYTES) as u64)
            .map_err(|e| Error::io("read", path, e))?;
        buf[n..].fill(0);
        let mut best: Option<(meta::PageHdr, u8, Vec<u64>)> = None;
        for copy in 0..2u8 {
            let b = &buf[copy as usize * MAP_PAGE_BYTES..(copy as usize + 1) * MAP_PAGE_BYTES];
            if let Some(h) = meta::decode_page(b, id, s, i as u32, &mut words) {
                if best.as_ref().is_none_or(|(bh, _, _)| h.seq > bh.seq) {
                    best = Some((h, copy, words.clone()));
                }
            }
        }
        if let Some((h, copy, w)) = best {
            pp.seq[i] = h.seq;
            pp.newest[i] = copy;
            if h.epoch == epoch {
                for (j, v) in w.iter().enumerate() {
                    let wi = i * pw + j;
                    if wi < slot.bits.nwords() && *v != 0 {
                        slot.bits.or_word(wi, *v);
                        any = true;
                    }
                }
            }
        }
    }
    Ok(any)
}

/// Punches the whole file (keeps its size): reads return zeros, space is freed.
fn punch_all(f: &File, path: &Path, size: u64) -> Result<()> {
    // SAFETY: fallocate on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            size as libc::off_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // No hole punching on this filesystem: recreate the file's contents as a hole.
            f.set_len(0).map_err(|e| Error::io("truncate", path, e))?;
            f.set_len(size)
                .map_err(|e| Error::io("truncate", path, e))?;
            return Ok(());
        }
        return Err(Error::io("punch hole in", path, e));
    }
    Ok(())
}
