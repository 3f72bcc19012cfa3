//! Hydration: a volume recovered (or cloned) from a data-plane snapshot is usable at once and
//! fills itself in the background.
//!
//! While hydrating, the cache keeps a *local* bitmap: blocks whose data is in the backing file
//! (hydrated) or that were written here. A read of a block that is neither in an epoch nor
//! local is served from the data plane: the queue hands the block's extent
//! ([`HYDRATE_EXTENT_BLOCKS`] blocks) to the hydration worker and awaits it (a queue thread
//! never blocks: it sends a request and parks the read on a completion); the worker writes the
//! extent's non-local blocks to the backing file, marks them local, and hands the data to the
//! waiting reads. Meanwhile the same worker hydrates the rest in LBA order, at most
//! `rate_bytes_per_s`.
//!
//! ## Pipelined
//! Two threads, each with its own data-plane connection:
//! - the **worker** decides everything: which extents are fetched, and it alone installs them
//!   (writes the backing file, marks blocks local) and answers reads; it fetches on its own
//!   connection only for a read that waits for an extent nobody is fetching;
//! - the **prefetcher** fetches the batches the worker hands it, one after the other, on its
//!   connection, and hands the data back; it never writes anything.
//!
//! The worker keeps up to [`HYDRATE_PIPELINE_BATCHES`] background batches
//! ([`HYDRATE_BATCH_EXTENTS`] extents each) with the prefetcher, so the next batch is read by
//! the data plane and crosses the network while the worker installs the last one or persists
//! the map. Batch buffers are reused (a read fills every byte, so none is zeroed again).
//!
//! **Readahead.** A read of a missing extent that follows the last one asked for, or reaches
//! the end of the last readahead window, or waits for an extent of a window still in flight,
//! is sequential: the next [`HYDRATE_READAHEAD_EXTENTS`] extents not local are handed to the
//! prefetcher at once (at most two windows in flight; the rate limit does not apply, the
//! application waits for them), while the read's own extent is fetched on the worker's
//! connection. Reads of a region in order then find it local, or in flight.
//!
//! ## Each missing extent is fetched once
//! The worker records every extent it handed the prefetcher until that batch is installed
//! (or failed), and takes requests one at a time. A request is only looked at when the worker
//! takes it, and the extent is checked again then, because the read looked at the local bitmap
//! before it asked, and since then the extent may have been installed (by a batch, or by
//! another read's fetch):
//! - an extent already asked for (by another read, the background or readahead) joins that
//!   fetch (one fetch answers every waiting read);
//! - an extent all local now is answered from what was installed, never fetched again: from
//!   the backing file (read under `backing_lock`) when its install wrote every block of it —
//!   the backing then holds the snapshot's data or a newer write flushed since, either right
//!   for a read that looked before the extent became local — else (a write came first, its
//!   block may not be in the backing file yet) from the installed data itself, kept for the
//!   last [`HYDRATE_RECENT_EXTENTS`] such installs; past those, it is fetched again (counted
//!   in `extents_refetched`);
//! - the background and readahead pick their extents from the local bitmap when they hand
//!   them over, skipping extents in flight, so they never fetch an extent a read's fetch has
//!   installed or is fetching. A batch that fails is forgotten: its extents are asked for
//!   again (by the pass, or by the reads waiting for them, each on its own).
//!
//! `status` counts `extents_fetched` (from the data plane), `extents_refetched` (extents this
//! run fetched before: 0 unless a backing write failed or a read trailed far behind),
//! `fetches_shared` (reads answered by a fetch made for another read, readahead or the
//! background) and `extents_read_ahead`.
//!
//! ## A block that does not open
//! The data plane's blocks reach the fetcher through the volume's codec (`ShipConfig::codec`,
//! [`crate::crypt::BlockCodec`]): plain, or opened from their envelopes for an encrypted
//! volume. A block that fails to open (tampered or damaged on the data plane, or sealed under
//! another key) is never installed and never handed to a read: the other blocks of its extent
//! are installed, the reads waiting for the extent fail with EIO (a read of one of those other
//! blocks succeeds from then on, from the backing file), and `status` counts the block in
//! `blocks_refused` with the reason. Hydration cannot complete while such a block is not
//! local: after a pass it looks again every [`HYDRATE_RESCAN_SECS`] s (the data plane may be
//! repaired), and a write of the block by the application makes it local like any other.
//!
//! ## Never overwrite a write
//! A write marks its blocks local once its mirror write completed (before its epoch can be
//! cut). Hydration writes a block only if it is not local, checked and written under the
//! cache's `backing_lock`, which the flush also holds while it writes the backing file — so a
//! hydrated (old) block can land before the flush of a newer write, never after it.
//!
//! ## Durability
//! The local map is persisted (A/B files `hydrate.map.{0,1}`, magic, sequence, crc32c) after
//! the backing file is synced, and by the flush before it commits an epoch, so after a crash a
//! block marked local always has its data in the backing file. A block hydrated but not yet in
//! the persisted map is merely fetched again.
//!
//! ## A damaged copy
//! A copy that fails its checks is ignored and the other one used. But the damaged copy may
//! have been the newest: blocks written here and flushed since the older copy would then look
//! "not local", and hydration would write the snapshot's older data over them. So when the
//! backing file started out empty (all hole — recorded as a flag in every copy), every block
//! that has data in it is marked local too: such a block was either hydrated (it holds the
//! snapshot's data) or written here, and never needs fetching. When that cannot be told (a
//! block device, or a backing that held data from the start), a damaged map is refused with a
//! clear error rather than risk old data over new.

use crate::cache::bitmap::Bitmap;
use crate::cache::meta::{read_full_at, Superblock, BLOCK_SHIFT, BLOCK_SIZE};
use crate::cache::wait::{Completion, Wait};
use crate::cache::{Cache, Hydration};
use crate::error::{Error, ErrorKind, Result};
use crate::ring::Kicker;
use crate::ship::ShipConfig;
use deltavol_dataplane::Client;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The unit of fetching and hydrating: 64 blocks, 256 KiB.
pub const HYDRATE_EXTENT_BLOCKS: u64 = 64;
/// Extents the background hydrator fetches in one request (2 MiB): one round trip to the
/// data plane per batch rather than per extent. An on-demand read arriving meanwhile waits
/// for at most one batch.
pub const HYDRATE_BATCH_EXTENTS: u64 = 8;
/// Background batches in flight at once (the default of [`Hydrator::tune`]): the prefetcher
/// fetches the next ones on its own connection while the worker installs the last one and
/// persists the map, so the data plane's read, the network and the local write overlap.
pub const HYDRATE_PIPELINE_BATCHES: u64 = 3;
/// Extents fetched ahead of a reader that reads blocks not yet local in order (2 MiB; the
/// default of [`Hydrator::tune`]).
pub const HYDRATE_READAHEAD_EXTENTS: u64 = 8;
/// Readahead windows in flight at once.
const READAHEAD_WINDOWS: u64 = 2;
/// Installs whose data the fetcher keeps for a read that asked before the install but is
/// taken after it, when the backing file cannot answer for the extent (a write to one of its
/// blocks came first): at most 4 MiB, and only while such installs happen.
pub const HYDRATE_RECENT_EXTENTS: usize = 16;
const MAP_MAGIC: &[u8; 8] = b"DVHYDMAP";
const MAP_VERSION: u32 = 1;
const MAP_HDR_BYTES: usize = 64;
/// Map flag: the backing file was all hole when hydration started.
const MAP_FLAG_SPARSE_START: u32 = 1;
/// How often background hydration syncs the backing file and persists the map.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// After a pass that left blocks that would not open, how long before the next pass.
pub const HYDRATE_RESCAN_SECS: u64 = 30;

/// The result of one extent fetch: its data, or a negative errno.
pub type FetchResult = std::result::Result<Arc<Vec<u8>>, i32>;

#[derive(Debug, Clone)]
pub struct HydrateConfig {
    pub ship: ShipConfig,
    pub generation: u64,
    /// Background hydration rate limit (bytes per second; 0 = unlimited).
    pub rate_bytes_per_s: u64,
    /// Extents fetched ahead of reads in order (0 = no readahead).
    pub readahead_extents: u64,
    /// Hydrate the regions the volume's heat map (on the data plane) says were read most
    /// first ([`crate::heat`]); else in LBA order.
    pub hot_first: bool,
    /// How long a read of a missing block retries an unreachable data plane before EIO.
    pub fetch_timeout: Duration,
}

/// Persistence state of the local map (alternating copies).
pub struct MapPersist {
    dir: PathBuf,
    seq: u64,
    flags: u32,
}

fn map_path(dir: &Path, copy: u64) -> PathBuf {
    dir.join(format!("hydrate.map.{copy}"))
}

fn encode_map(sb_id: &[u8; 16], snap: u64, seq: u64, flags: u32, bits: &Bitmap) -> Vec<u8> {
    let mut out = vec![0u8; MAP_HDR_BYTES + bits.nwords() * 8];
    out[0..8].copy_from_slice(MAP_MAGIC);
    out[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    out[16..32].copy_from_slice(sb_id);
    out[32..40].copy_from_slice(&snap.to_le_bytes());
    out[40..48].copy_from_slice(&seq.to_le_bytes());
    out[48..56].copy_from_slice(&bits.len_bits().to_le_bytes());
    for w in 0..bits.nwords() {
        let o = MAP_HDR_BYTES + w * 8;
        out[o..o + 8].copy_from_slice(&bits.word(w).to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..60]), &out[MAP_HDR_BYTES..]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes one copy: `(seq, flags, words)` if valid and ours.
fn decode_map(b: &[u8], sb: &Superblock, nblocks: u64) -> Option<(u64, u32, Vec<u64>)> {
    if b.len() < MAP_HDR_BYTES || &b[0..8] != MAP_MAGIC {
        return None;
    }
    let le64 = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
    if crc != crc32c::crc32c_append(crc32c::crc32c(&b[..60]), &b[MAP_HDR_BYTES..])
        || u32::from_le_bytes(b[8..12].try_into().ok()?) != MAP_VERSION
        || u32::from_le_bytes(b[12..16].try_into().ok()?) & !MAP_FLAG_SPARSE_START != 0
        || b[16..32] != sb.volume_id
        || le64(32) != sb.hydrate_snap
        || le64(48) != nblocks
        || b.len() != MAP_HDR_BYTES + nblocks.div_ceil(64) as usize * 8
    {
        return None;
    }
    let words = b[MAP_HDR_BYTES..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some((
        le64(40),
        u32::from_le_bytes(b[12..16].try_into().ok()?),
        words,
    ))
}

/// Whether a regular file holds no data at all (every byte a hole).
fn all_hole(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    let regular = f
        .metadata()
        .map(|m| m.file_type().is_file())
        .unwrap_or(false);
    // SAFETY: lseek on a valid fd with integer arguments.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    regular && r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

/// Marks local every block of `f` that holds data (`SEEK_DATA` / `SEEK_HOLE`).
fn mark_allocated(f: &File, path: &Path, local: &Bitmap) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let size = f.metadata().map_err(|e| Error::io("stat", path, e))?.len();
    let nblocks = local.len_bits();
    let mut off: i64 = 0;
    let mut marked = 0;
    while (off as u64) < size {
        // SAFETY: lseek on a valid fd with integer arguments.
        let d = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(Error::io("seek data in", path, e));
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(Error::io(
                "seek hole in",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        let b0 = (d as u64) >> BLOCK_SHIFT;
        let b1 = ((h as u64).div_ceil(BLOCK_SIZE)).min(nblocks);
        if b1 > b0 {
            local.set_range(b0, b1 - b0);
            marked += b1 - b0;
        }
        off = h;
    }
    Ok(marked)
}

/// Loads the persisted local map of a hydrating volume (empty if none was persisted yet).
/// `backing` is the volume's backing file (see the module doc on a damaged copy).
pub fn open_local_map(
    dir: &Path,
    sb: &Superblock,
    nblocks: u64,
    backing: &File,
    backing_path: &Path,
) -> Result<Hydration> {
    let local = Bitmap::new(nblocks);
    let mut best: Option<(u64, u32, Vec<u64>)> = None;
    let mut damaged = Vec::new();
    for copy in 0..2 {
        let path = map_path(dir, copy);
        match std::fs::read(&path) {
            // Empty: created, never written (a crash in the middle of a persist).
            Ok(b) if b.is_empty() => {}
            Ok(b) => match decode_map(&b, sb, nblocks) {
                Some((seq, flags, words)) => {
                    if best.as_ref().is_none_or(|(s, _, _)| seq > *s) {
                        best = Some((seq, flags, words));
                    }
                }
                None => damaged.push(path),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read", &path, e)),
        }
    }
    let seq = best.as_ref().map_or(0, |b| b.0);
    let flags = match &best {
        Some((_, f, _)) => *f,
        // Nothing persisted yet: note whether the backing starts out empty.
        None if damaged.is_empty() && all_hole(backing) => MAP_FLAG_SPARSE_START,
        None => 0,
    };
    if let Some((_, _, words)) = best {
        for (i, w) in words.into_iter().enumerate() {
            local.or_word(i, w);
        }
    }
    if !damaged.is_empty() {
        let names: Vec<String> = damaged.iter().map(|p| p.display().to_string()).collect();
        if flags & MAP_FLAG_SPARSE_START == 0 {
            return Err(Error::corrupt(format!(
                "hydration map {} is damaged and {} did not start empty, so which blocks are already local cannot be told: recover the volume again onto a new, empty backing file",
                names.join(" and "),
                backing_path.display()
            )));
        }
        let marked = mark_allocated(backing, backing_path, &local)?;
        tracing::warn!(damaged = %names.join(", "), blocks_with_data = marked, "hydration map copy damaged: using the other copy, and every block with data in the backing file counts as local");
    }
    Ok(Hydration {
        local,
        snap: sb.hydrate_snap,
        done: Default::default(),
        fetch: std::sync::OnceLock::new(),
        persist: Mutex::new(MapPersist {
            dir: dir.to_path_buf(),
            seq,
            flags,
        }),
    })
}

/// Persists the local map: syncs the backing file first (so every block marked local has its
/// data durable there), then writes the other copy and syncs it.
pub fn persist_local(c: &Cache) -> Result<()> {
    let Some(h) = c.hydrating() else {
        return Ok(());
    };
    let mut p = h.persist.lock().unwrap_or_else(|p| p.into_inner());
    let seq = p.seq + 1;
    let snapshot = Bitmap::new(h.local.len_bits());
    for w in 0..h.local.nwords() {
        snapshot.or_word(w, h.local.word(w));
    }
    c.backing
        .sync_data()
        .map_err(|e| Error::io("fdatasync", &c.backing_path, e))?;
    let path = map_path(&p.dir, seq % 2);
    let bytes = encode_map(&c.volume_id, h.snap, seq, p.flags, &snapshot);
    let f = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
    f.write_all_at(&bytes, 0)
        .map_err(|e| Error::io("write", &path, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
    p.seq = seq;
    Ok(())
}

struct FetchReq {
    extent: u64,
    done: Arc<Completion<FetchResult>>,
}

/// What reaches the worker: a read's request, or a batch the prefetcher fetched.
enum Msg {
    Read(FetchReq),
    Batch(Batch),
}

/// A fetch the worker hands the prefetcher: `count` extents from `first` on, into `buf` (a
/// buffer the worker reuses: a read fills every byte of it, so it is never zeroed again).
struct Job {
    first: u64,
    count: u64,
    /// Asked for a sequential reader (readahead), not by the background pass.
    readahead: bool,
    buf: Vec<u8>,
}

/// A job done: its extents' data (the job's buffer, filled), or why not.
struct Batch {
    first: u64,
    count: u64,
    readahead: bool,
    result: Result<Fetched>,
}

/// How queues reach the fetcher.
pub struct FetchHandle {
    tx: Mutex<Sender<Msg>>,
}

impl FetchHandle {
    /// Asks for extent `extent` (block `extent * HYDRATE_EXTENT_BLOCKS` on); `kicker` wakes the
    /// caller's ring when the data is there.
    pub fn request(&self, extent: u64, kicker: Option<Arc<Kicker>>) -> Wait<FetchResult> {
        let done = Completion::new(kicker);
        let w = done.wait();
        if self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Msg::Read(FetchReq {
                extent,
                done: done.clone(),
            }))
            .is_err()
        {
            done.complete(Err(-libc::EIO));
        }
        w
    }
}

/// Hydration progress, for `deltavol status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HydrateStatus {
    pub snapshot: u64,
    pub done: bool,
    pub local_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
    /// Extents fetched for reads of blocks not yet local.
    pub fetched_on_demand: u64,
    /// Extents read from the data plane (for reads, ahead of them and in the background).
    pub extents_fetched: u64,
    /// Of those, extents this run had fetched already (0 unless a backing write failed or a
    /// read was taken long after its extent was installed; see the module doc).
    pub extents_refetched: u64,
    /// Reads of a missing extent answered by a fetch made for another read, ahead of them or
    /// by the background (in flight when they asked, or installed since), without one of
    /// their own.
    pub fetches_shared: u64,
    /// Extents fetched ahead of a reader reading blocks not yet local in order (readahead).
    pub extents_read_ahead: u64,
    /// Blocks fetched that would not open (an encrypted volume: tampered or damaged on the
    /// data plane, or sealed under another key): never installed, reads of them fail (EIO).
    pub blocks_refused: u64,
    pub last_error: Option<String>,
}

struct Shared {
    cache: Arc<Cache>,
    cfg: HydrateConfig,
    stop: AtomicU64,
    /// Background batches the prefetcher may have at once ([`Hydrator::tune`]).
    depth: AtomicU64,
    /// Extents fetched ahead of a sequential reader, 0 = no readahead ([`Hydrator::tune`]).
    readahead: AtomicU64,
    on_demand: AtomicU64,
    extents_fetched: AtomicU64,
    extents_refetched: AtomicU64,
    shared: AtomicU64,
    read_ahead: AtomicU64,
    refused: AtomicU64,
    rate: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The fetcher + background hydrator of one volume.
pub struct Hydrator {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Hydrator {
    /// Starts the threads if the volume is hydrating; `None` otherwise.
    pub fn start(cache: Arc<Cache>, cfg: HydrateConfig) -> Result<Option<Hydrator>> {
        let Some(h) = cache.hydrating() else {
            return Ok(None);
        };
        let (tx, rx) = channel();
        if h.fetch
            .set(FetchHandle {
                tx: Mutex::new(tx.clone()),
            })
            .is_err()
        {
            return Err(Error::invalid("hydrator already started"));
        }
        let readahead = cfg.readahead_extents;
        let shared = Arc::new(Shared {
            cache: cache.clone(),
            cfg,
            stop: AtomicU64::new(0),
            depth: AtomicU64::new(HYDRATE_PIPELINE_BATCHES),
            readahead: AtomicU64::new(readahead),
            on_demand: AtomicU64::new(0),
            extents_fetched: AtomicU64::new(0),
            extents_refetched: AtomicU64::new(0),
            shared: AtomicU64::new(0),
            read_ahead: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let (job_tx, job_rx) = channel();
        let pre = Prefetcher {
            sh: shared.clone(),
            jobs: job_rx,
            out: tx,
            client: None,
            scratch: Vec::new(),
        };
        let prefetcher = std::thread::Builder::new()
            .name(format!("dv-prefetch-{}", cache.name))
            .spawn(move || pre.run())
            .map_err(|e| Error::io("start hydration prefetcher for", &cache.name, e))?;
        let s2 = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("dv-hydrate-{}", cache.name))
            .spawn(move || Worker::new(s2, rx, job_tx, prefetcher).run())
            .map_err(|e| Error::io("start hydrator for", &cache.name, e))?;
        Ok(Some(Hydrator {
            shared,
            thread: Mutex::new(Some(t)),
        }))
    }

    pub fn status(&self) -> HydrateStatus {
        status_of(&self.shared)
    }

    /// Tuning, taken at the worker's next turn: `depth` background batches in flight at once
    /// (1 = stop-and-wait; default [`HYDRATE_PIPELINE_BATCHES`]) and `readahead_extents`
    /// fetched ahead of a sequential reader (0 = none; default [`HYDRATE_READAHEAD_EXTENTS`]).
    pub fn tune(&self, depth: u64, readahead_extents: u64) {
        self.shared.depth.store(depth.max(1), SeqCst);
        self.shared.readahead.store(readahead_extents, SeqCst);
    }

    /// Stops the threads (the map is persisted; hydration resumes on the next attach).
    pub fn stop(&self) {
        self.halt(1);
    }

    /// Stops the threads without persisting anything more, as a crash would (tests).
    pub fn abort(&self) {
        self.halt(2);
    }

    fn halt(&self, how: u64) {
        self.shared.stop.store(how, SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn status_of(sh: &Shared) -> HydrateStatus {
    let c = &sh.cache;
    let Some(h) = &c.hydration else {
        return HydrateStatus::default();
    };
    let total = c.size_bytes;
    let done = h.done.load(SeqCst);
    let local = if done {
        total
    } else {
        h.local.count() * BLOCK_SIZE
    };
    let rate = sh.rate.load(SeqCst);
    HydrateStatus {
        snapshot: h.snap,
        done,
        local_bytes: local,
        total_bytes: total,
        percent: if total == 0 {
            100.0
        } else {
            local as f64 * 100.0 / total as f64
        },
        rate_bytes_per_s: rate,
        eta_s: (rate > 0 && !done).then(|| (total - local) / rate),
        fetched_on_demand: sh.on_demand.load(SeqCst),
        extents_fetched: sh.extents_fetched.load(SeqCst),
        extents_refetched: sh.extents_refetched.load(SeqCst),
        fetches_shared: sh.shared.load(SeqCst),
        extents_read_ahead: sh.read_ahead.load(SeqCst),
        blocks_refused: sh.refused.load(SeqCst),
        last_error: sh
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }
}

/// Connects to the data plane as the volume (the shipper's failover: the address that worked
/// last first, then the others) and checks the geometry: encrypted there and no key here (or
/// the other way round) is said in `status`, and nothing is read.
fn connect(sh: &Shared) -> Result<Client> {
    let (c, _addr) =
        sh.cfg
            .ship
            .connect_as(&sh.cache.name, sh.cfg.generation, Some(sh.cache.volume_id))?;
    sh.cfg.ship.codec.check_geometry(&sh.cache.name, c.info())?;
    Ok(c)
}

/// Reads `count` consecutive extents from `first` on into `buf` (resized, not cleared: the
/// read fills every byte), in one request, through the volume's codec (opened from their
/// envelopes when the volume is encrypted). Connects first if `client` is `None`.
fn read_batch(
    sh: &Shared,
    client: &mut Option<Client>,
    first: u64,
    count: u64,
    mut buf: Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<Fetched> {
    let c = &sh.cache;
    let lba = first * HYDRATE_EXTENT_BLOCKS;
    let n = (c.nblocks - lba).min(HYDRATE_EXTENT_BLOCKS * count.max(1));
    let snap = c.hydration.as_ref().map_or(0, |h| h.snap);
    buf.resize((n * BLOCK_SIZE) as usize, 0);
    if client.is_none() {
        *client = Some(connect(sh)?);
    }
    let cl = client
        .as_mut()
        .ok_or_else(|| Error::new(ErrorKind::Io, "no data-plane client"))?;
    let refused = sh
        .cfg
        .ship
        .codec
        .read_blocks(cl, snap, lba, &mut buf, scratch)
        .map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("data plane read of blocks {lba}+{n} as of snapshot {snap}: {e}"),
            )
        })?;
    Ok(Fetched { data: buf, refused })
}

/// The prefetcher: fetches the worker's jobs one after the other on a connection of its own,
/// so the next batch is on its way while the worker installs the last one (and persists the
/// map, or fetches for a read on its own connection). It never writes anything: the worker
/// installs every batch.
struct Prefetcher {
    sh: Arc<Shared>,
    jobs: Receiver<Job>,
    out: Sender<Msg>,
    client: Option<Client>,
    scratch: Vec<u8>,
}

impl Prefetcher {
    fn run(mut self) {
        while let Ok(j) = self.jobs.recv() {
            if self.sh.stop.load(SeqCst) != 0 {
                break;
            }
            let result = read_batch(
                &self.sh,
                &mut self.client,
                j.first,
                j.count,
                j.buf,
                &mut self.scratch,
            );
            if result.is_err() {
                // Reconnect for the next job (the worker backs off first).
                self.client = None;
            }
            let b = Batch {
                first: j.first,
                count: j.count,
                readahead: j.readahead,
                result,
            };
            if self.out.send(Msg::Batch(b)).is_err() {
                break;
            }
        }
    }
}

struct Pending {
    waiters: Vec<Arc<Completion<FetchResult>>>,
    since: Instant,
}

struct Worker {
    sh: Arc<Shared>,
    rx: Receiver<Msg>,
    client: Option<Client>,
    /// The prefetcher's job queue and thread (`None` once it is gone: jobs are then fetched
    /// here, one at a time).
    jobs: Option<Sender<Job>>,
    prefetcher: Option<JoinHandle<()>>,
    retry_at: Option<Instant>,
    backoff: Duration,
    pending: BTreeMap<u64, Pending>,
    /// Extents the prefetcher was asked for and that are not installed yet (`true`: for a
    /// sequential reader): a read of one waits for that batch instead of fetching it again.
    inflight: BTreeMap<u64, bool>,
    background_batches: u64,
    readahead_batches: u64,
    /// Buffers of installed batches, for the next jobs.
    pool: Vec<Vec<u8>>,
    /// Extents fetched in this run (for `extents_refetched`).
    fetched: Bitmap,
    /// Extents whose install wrote every block: the backing file answers for them.
    clean: Bitmap,
    /// The data of the last installs that were not clean (see the module doc).
    recent: VecDeque<(u64, Arc<Vec<u8>>)>,
    /// The background pass: the extents of the hottest regions first (from the heat map),
    /// then the LBA pass from `cursor`.
    hot: VecDeque<u64>,
    cursor: u64,
    window_start: Instant,
    window_bytes: u64,
    last_persist: Instant,
    /// Readahead: the extent the last read asked for, and the first extent past the last
    /// readahead window.
    last_demand: Option<u64>,
    ra_next: u64,
    /// Data-plane blocks as they arrive (sealed ones are opened from here); reused.
    scratch: Vec<u8>,
    /// A pass ended with blocks that would not open: the next one starts then.
    rescan_at: Option<Instant>,
}

/// What one fetch brought: the extents' blocks, and those of them that did not open (their
/// bytes are zeros and never used).
struct Fetched {
    data: Vec<u8>,
    refused: Vec<crate::crypt::CryptError>,
}

impl Fetched {
    /// The refused blocks in `[lba, lba + n)`.
    fn refused_in(&self, lba: u64, n: u64) -> Vec<u64> {
        self.refused
            .iter()
            .filter_map(|e| e.lba())
            .filter(|b| (lba..lba + n).contains(b))
            .collect()
    }
}

impl Worker {
    fn new(
        sh: Arc<Shared>,
        rx: Receiver<Msg>,
        jobs: Sender<Job>,
        prefetcher: JoinHandle<()>,
    ) -> Worker {
        let nextents = sh.cache.nblocks.div_ceil(HYDRATE_EXTENT_BLOCKS);
        Worker {
            fetched: Bitmap::new(nextents),
            clean: Bitmap::new(nextents),
            recent: VecDeque::new(),
            sh,
            rx,
            client: None,
            jobs: Some(jobs),
            prefetcher: Some(prefetcher),
            retry_at: None,
            backoff: Duration::from_millis(50),
            pending: BTreeMap::new(),
            inflight: BTreeMap::new(),
            background_batches: 0,
            readahead_batches: 0,
            pool: Vec::new(),
            hot: VecDeque::new(),
            cursor: 0,
            window_start: Instant::now(),
            window_bytes: 0,
            last_persist: Instant::now(),
            last_demand: None,
            ra_next: 0,
            scratch: Vec::new(),
            rescan_at: None,
        }
    }

    fn nextents(&self) -> u64 {
        self.sh.cache.nblocks.div_ceil(HYDRATE_EXTENT_BLOCKS)
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Read(r) => self.take(r),
            Msg::Batch(b) => self.on_batch(b),
        }
    }

    /// Takes a read's request: it joins a fetch of its extent already asked for (by another
    /// read, the background or readahead), or is answered from what is installed if the
    /// extent became local since the read looked, or waits for a fetch of its own.
    fn take(&mut self, r: FetchReq) {
        if r.extent >= self.nextents() {
            r.done.complete(Err(-libc::EIO));
            return;
        }
        self.read_ahead_of(r.extent);
        if let Some(p) = self.pending.get_mut(&r.extent) {
            p.waiters.push(r.done);
            return;
        }
        if !self.inflight.contains_key(&r.extent) && self.extent_local(r.extent) {
            if let Some(res) = self.installed(r.extent) {
                self.sh.shared.fetch_add(1, SeqCst);
                r.done.complete(res);
                return;
            }
        }
        self.pending.insert(
            r.extent,
            Pending {
                waiters: vec![r.done],
                since: Instant::now(),
            },
        );
    }

    /// Readahead: a read of extent `ext` that follows the last one, or reaches the end of the
    /// last readahead window, or waits for an extent of a window still in flight (the reader
    /// caught up with it), is sequential: the next window of extents not local is fetched
    /// on the prefetcher's connection while the read's own extent is fetched on the worker's.
    /// At most [`READAHEAD_WINDOWS`] windows are in flight; the rate limit does not apply
    /// (the application is waiting for these blocks).
    fn read_ahead_of(&mut self, ext: u64) {
        let ra = self.sh.readahead.load(SeqCst);
        let prev = self.last_demand.replace(ext);
        if ra == 0 || self.backing_off() || self.readahead_batches >= READAHEAD_WINDOWS {
            return;
        }
        let sequential = prev.is_some_and(|p| ext == p + 1)
            || ext == self.ra_next
            || self.inflight.get(&ext) == Some(&true);
        if !sequential {
            return;
        }
        let start = if self.ra_next > ext && self.ra_next <= ext + 2 * ra {
            self.ra_next
        } else {
            ext + 1
        };
        let end = (start + ra).min(self.nextents());
        self.ra_next = start + ra;
        let free = |w: &Worker, e: u64| !w.inflight.contains_key(&e) && !w.extent_local(e);
        let Some(first) = (start..end).find(|&e| free(self, e)) else {
            return;
        };
        let mut count = 1;
        while first + count < end && free(self, first + count) {
            count += 1;
        }
        self.dispatch(first, count, true);
    }

    /// Blocks `[lba, lba + n)` of extent `ext`.
    fn extent_blocks(&self, ext: u64) -> (u64, u64) {
        let lba = ext * HYDRATE_EXTENT_BLOCKS;
        (
            lba,
            (self.sh.cache.nblocks - lba).min(HYDRATE_EXTENT_BLOCKS),
        )
    }

    /// Whether every block of extent `ext` is local (hydrated or written here).
    fn extent_local(&self, ext: u64) -> bool {
        let Some(h) = &self.sh.cache.hydration else {
            return true;
        };
        let (lba, n) = self.extent_blocks(ext);
        (lba..lba + n).all(|b| h.local.get(b))
    }

    /// The data of extent `ext`, all local, as installed: `None` if it cannot be told without
    /// fetching it again (see the module doc).
    fn installed(&self, ext: u64) -> Option<FetchResult> {
        if let Some((_, d)) = self.recent.iter().find(|(e, _)| *e == ext) {
            return Some(Ok(d.clone()));
        }
        if !self.clean.get(ext) {
            return None;
        }
        let c = &self.sh.cache;
        let (lba, n) = self.extent_blocks(ext);
        let mut buf = vec![0u8; (n * BLOCK_SIZE) as usize];
        let r = {
            let _g = c.backing_lock.lock().unwrap_or_else(|p| p.into_inner());
            read_backing(c, lba, &mut buf)
        };
        Some(match r {
            Ok(()) => Ok(Arc::new(buf)),
            Err(e) => {
                tracing::error!(volume = %c.name, error = %e, "hydration: cannot read the backing file");
                Err(e.errno())
            }
        })
    }

    fn run(mut self) {
        tracing::info!(volume = %self.sh.cache.name, "hydration started");
        if self.sh.cfg.hot_first {
            self.load_heat();
        }
        loop {
            if self.sh.stop.load(SeqCst) != 0 {
                break;
            }
            while let Ok(m) = self.rx.try_recv() {
                self.on_msg(m);
            }
            let hydrated = self.sh.cache.hydrating().is_none();
            if !hydrated && !self.backing_off() {
                self.issue_background();
            }
            // A read waiting for an extent nobody is fetching: fetched on this connection.
            let own = self
                .pending
                .keys()
                .find(|e| !self.inflight.contains_key(e))
                .copied();
            if let Some(ext) = own {
                self.serve_on_demand(ext);
                continue;
            }
            if !hydrated && self.pass_done() && self.end_pass() {
                continue;
            }
            // Nothing to do before a read or a batch arrives (or the rate window turns).
            match self.rx.recv_timeout(self.idle_wait()) {
                Ok(m) => self.on_msg(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // The prefetcher ends after the job it is on (if any); nothing it fetched is installed.
        self.jobs = None;
        if let Some(t) = self.prefetcher.take() {
            let _ = t.join();
        }
        if self.sh.stop.load(SeqCst) == 1 {
            let _ = persist_local(&self.sh.cache);
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            for w in p.waiters {
                w.complete(Err(-libc::EIO));
            }
        }
    }

    /// Fetches the volume's heat map and queues the extents of its regions, hottest first,
    /// ahead of the LBA pass. Without one (never shipped, an encrypted volume, an older data
    /// plane, or one that does not fit the volume) hydration goes in LBA order.
    fn load_heat(&mut self) {
        let c = self.sh.cache.clone();
        let r = match &mut self.client {
            Some(cl) => cl.get_heat(),
            None => match connect(&self.sh) {
                Ok(cl) => self.client.insert(cl).get_heat(),
                Err(e) => {
                    tracing::info!(volume = %c.name, error = %e, "hydration: no heat map (data plane unavailable); in LBA order");
                    return;
                }
            },
        };
        match r {
            Ok(Some((rb, map))) => match crate::heat::hot_order(rb, &map, self.nextents()) {
                Some(order) => {
                    tracing::info!(volume = %c.name, extents = order.len(), "hydration: the regions read most first (heat map)");
                    self.hot = order.into();
                }
                None => {
                    tracing::warn!(volume = %c.name, region_blocks = rb, entries = map.len(), "hydration: the heat map does not fit the volume; ignored")
                }
            },
            Ok(None) => {
                tracing::info!(volume = %c.name, "hydration: no heat map on the data plane; in LBA order")
            }
            Err(e) => {
                // An older data plane, or a failed exchange: the connection is not reused.
                self.client = None;
                tracing::info!(volume = %c.name, error = %e, "hydration: no heat map; in LBA order");
            }
        }
    }

    /// How long the worker may wait for a message: until the rate window turns when the
    /// background is held back by the rate limit, else a while (stop is looked at then).
    fn idle_wait(&self) -> Duration {
        let rate = self.sh.cfg.rate_bytes_per_s;
        if rate > 0 && self.window_bytes >= rate {
            Duration::from_secs(1)
                .saturating_sub(self.window_start.elapsed())
                .clamp(Duration::from_millis(1), Duration::from_millis(50))
        } else {
            Duration::from_millis(100)
        }
    }

    fn backing_off(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }

    fn note_error(&mut self, e: &Error) {
        tracing::warn!(volume = %self.sh.cache.name, error = %e, "hydration: data plane unavailable; retrying");
        *self.sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        self.client = None;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
    }

    /// A fetch worked: the data plane is back.
    fn note_success(&mut self) {
        self.backoff = Duration::from_millis(50);
        self.retry_at = None;
    }

    /// Counts a fetch of `exts` extents from `first` on, and logs the blocks that did not open.
    fn account(&mut self, first: u64, exts: u64, f: &Fetched) {
        self.sh.extents_fetched.fetch_add(exts, SeqCst);
        for e in first..first + exts {
            if self.fetched.set_range(e, 1) == 0 {
                self.sh.extents_refetched.fetch_add(1, SeqCst);
            }
        }
        if let Some(e) = f.refused.first() {
            let c = &self.sh.cache;
            let snap = c.hydration.as_ref().map_or(0, |h| h.snap);
            self.sh.refused.fetch_add(f.refused.len() as u64, SeqCst);
            tracing::error!(volume = %c.name, snapshot = snap, blocks = f.refused.len(), error = %e, "hydration: blocks from the data plane do not open; they are never installed, and reads of them fail (EIO)");
            *self.sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "{} block(s) of snapshot {snap} refused: {e}",
                f.refused.len()
            ));
        }
    }

    /// Fetches extent `ext` on the worker's own connection, for a waiting read.
    fn fetch(&mut self, ext: u64) -> Result<Fetched> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = read_batch(&self.sh, &mut self.client, ext, 1, Vec::new(), &mut scratch);
        self.scratch = scratch;
        let f = r?;
        self.note_success();
        self.account(ext, 1, &f);
        Ok(f)
    }

    /// Hands `count` extents from `first` on to the prefetcher (or, if it is gone, fetches
    /// them here), recording them as in flight until their batch is installed.
    fn dispatch(&mut self, first: u64, count: u64, readahead: bool) {
        for e in first..first + count {
            self.inflight.insert(e, readahead);
        }
        if readahead {
            self.readahead_batches += 1;
        } else {
            self.background_batches += 1;
        }
        let buf = self.pool.pop().unwrap_or_default();
        let job = Job {
            first,
            count,
            readahead,
            buf,
        };
        let job = match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        if self.jobs.take().is_some() {
            tracing::warn!(volume = %self.sh.cache.name, "hydration: the prefetcher is gone; fetching one batch at a time");
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = read_batch(
            &self.sh,
            &mut self.client,
            first,
            count,
            job.buf,
            &mut scratch,
        );
        self.scratch = scratch;
        self.on_batch(Batch {
            first,
            count,
            readahead,
            result,
        });
    }

    /// The background pass: keeps up to `depth` batches in flight, each the extents from the
    /// cursor on that miss a block and nobody is fetching, up to [`HYDRATE_BATCH_EXTENTS`] and
    /// no more than the rate window has room for. Chosen from the local bitmap when the batch
    /// is asked for: an extent a read's fetch installed is skipped.
    fn issue_background(&mut self) {
        let depth = self.sh.depth.load(SeqCst).max(1);
        let total = self.nextents();
        let ext_bytes = HYDRATE_EXTENT_BLOCKS * BLOCK_SIZE;
        let rate = self.sh.cfg.rate_bytes_per_s;
        while self.background_batches < depth {
            let elapsed = self.window_start.elapsed();
            if elapsed >= Duration::from_secs(1) {
                self.sh.rate.store(
                    (self.window_bytes as f64 / elapsed.as_secs_f64()) as u64,
                    SeqCst,
                );
                self.window_start = Instant::now();
                self.window_bytes = 0;
            } else if rate > 0 && self.window_bytes >= rate {
                return;
            }
            let room = if rate > 0 {
                (rate.saturating_sub(self.window_bytes) / ext_bytes).max(1)
            } else {
                u64::MAX
            };
            let max = HYDRATE_BATCH_EXTENTS.min(room);
            // The hottest regions first: consecutive extents of the hot queue in one batch.
            while self
                .hot
                .front()
                .is_some_and(|&e| self.inflight.contains_key(&e) || self.extent_local(e))
            {
                self.hot.pop_front();
            }
            let (ext, count) = if let Some(ext) = self.hot.pop_front() {
                let mut count = 1;
                while count < max
                    && self.hot.front() == Some(&(ext + count))
                    && !self.inflight.contains_key(&(ext + count))
                    && !self.extent_local(ext + count)
                {
                    self.hot.pop_front();
                    count += 1;
                }
                (ext, count)
            } else {
                while self.cursor < total
                    && (self.inflight.contains_key(&self.cursor) || self.extent_local(self.cursor))
                {
                    self.cursor += 1;
                }
                if self.cursor >= total {
                    return;
                }
                let ext = self.cursor;
                let mut count = 1;
                while count < max
                    && ext + count < total
                    && !self.inflight.contains_key(&(ext + count))
                    && !self.extent_local(ext + count)
                {
                    count += 1;
                }
                self.cursor = ext + count;
                (ext, count)
            };
            let (lba, _) = self.extent_blocks(ext);
            self.window_bytes +=
                (self.sh.cache.nblocks - lba).min(count * HYDRATE_EXTENT_BLOCKS) * BLOCK_SIZE;
            self.dispatch(ext, count, false);
        }
    }

    /// A batch is back: its extents are installed and the reads waiting for them answered.
    fn on_batch(&mut self, b: Batch) {
        for e in b.first..b.first + b.count {
            self.inflight.remove(&e);
        }
        if b.readahead {
            self.readahead_batches = self.readahead_batches.saturating_sub(1);
        } else {
            self.background_batches = self.background_batches.saturating_sub(1);
        }
        let f = match b.result {
            Ok(f) => f,
            Err(e) => {
                // Looked at again by the pass; reads waiting for them fetch on their own.
                self.cursor = self.cursor.min(b.first);
                self.note_error(&e);
                return;
            }
        };
        self.note_success();
        let ext_bytes = (HYDRATE_EXTENT_BLOCKS * BLOCK_SIZE) as usize;
        let exts = f.data.len().div_ceil(ext_bytes) as u64;
        self.account(b.first, exts, &f);
        if b.readahead {
            self.sh.read_ahead.fetch_add(exts, SeqCst);
        }
        for (i, chunk) in f.data.chunks(ext_bytes).enumerate() {
            let e = b.first + i as u64;
            let (lba, n) = self.extent_blocks(e);
            let refused = f.refused_in(lba, n);
            if !refused.is_empty() {
                // Passed over (see the module doc): never clean, never kept, never handed out.
                if let Err(err) = self.write_missing(e, chunk, &refused) {
                    tracing::error!(volume = %self.sh.cache.name, error = %err, "hydration: cannot write the backing file");
                }
                self.answer(e, &Err(-libc::EIO), false);
                continue;
            }
            let data = self
                .pending
                .contains_key(&e)
                .then(|| Arc::new(chunk.to_vec()));
            let keep = data.clone();
            match self.install(e, chunk, || {
                keep.unwrap_or_else(|| Arc::new(chunk.to_vec()))
            }) {
                Ok(_) => {
                    if let Some(d) = data {
                        self.answer(e, &Ok(d), false);
                    }
                }
                Err(err) => {
                    self.answer(e, &Err(err.errno()), false);
                    self.cursor = self.cursor.min(e);
                    self.note_error(&err);
                    break;
                }
            }
        }
        if self.pool.len() < HYDRATE_PIPELINE_BATCHES as usize + READAHEAD_WINDOWS as usize {
            self.pool.push(f.data);
        }
        if self.last_persist.elapsed() >= PERSIST_EVERY {
            if let Err(e) = persist_local(&self.sh.cache) {
                self.note_error(&e);
            }
            self.last_persist = Instant::now();
        }
    }

    /// Installs a fetched extent (see [`Worker::write_missing`]), then notes how a read taken
    /// later is answered (see [`Worker::installed`]): from the backing file if every block was
    /// written, else from the fetched data, which `keep` hands over.
    fn install(
        &mut self,
        ext: u64,
        data: &[u8],
        keep: impl FnOnce() -> Arc<Vec<u8>>,
    ) -> Result<u64> {
        let written = self.write_missing(ext, data, &[])?;
        if written == (data.len() as u64) >> BLOCK_SHIFT {
            self.clean.set_range(ext, 1);
        } else {
            if self.recent.len() >= HYDRATE_RECENT_EXTENTS {
                self.recent.pop_front();
            }
            self.recent.push_back((ext, keep()));
        }
        Ok(written)
    }

    /// Writes the blocks of a fetched extent that are still not local, and marks them local;
    /// never the blocks in `refused` (they did not open: their bytes are not data).
    fn write_missing(&self, ext: u64, data: &[u8], refused: &[u64]) -> Result<u64> {
        let c = &self.sh.cache;
        let Some(h) = &c.hydration else { return Ok(0) };
        let lba = ext * HYDRATE_EXTENT_BLOCKS;
        let n = (data.len() as u64) >> BLOCK_SHIFT;
        let _g = c.backing_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut written = 0;
        let mut i = 0;
        let skip = |b: u64| h.local.get(b) || refused.contains(&b);
        while i < n {
            if skip(lba + i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && !skip(lba + j) {
                j += 1;
            }
            let off = (lba + i) << BLOCK_SHIFT;
            c.backing
                .write_all_at(
                    &data[(i << BLOCK_SHIFT) as usize..(j << BLOCK_SHIFT) as usize],
                    off,
                )
                .map_err(|e| Error::io_at("write", &c.backing_path, off, e))?;
            h.local.set_range(lba + i, j - i);
            written += j - i;
            i = j;
        }
        Ok(written)
    }

    /// Completes every read waiting for extent `ext`; `own`: whether one of them had the
    /// fetch made for it (the others shared it).
    fn answer(&mut self, ext: u64, res: &FetchResult, own: bool) {
        if let Some(p) = self.pending.remove(&ext) {
            let shared = p.waiters.len() as u64 - u64::from(own);
            self.sh.shared.fetch_add(shared, SeqCst);
            for w in p.waiters {
                w.complete(res.clone());
            }
        }
    }

    fn serve_on_demand(&mut self, ext: u64) {
        // Installed since the request was taken (a write can complete an extent too).
        if self.extent_local(ext) {
            if let Some(res) = self.installed(ext) {
                self.answer(ext, &res, false);
                return;
            }
        }
        match self.fetch(ext) {
            Ok(f) if !f.refused.is_empty() => {
                // Never data: the blocks that opened are installed (a read of them succeeds
                // from now on), the reads waiting for the extent fail.
                let (lba, n) = self.extent_blocks(ext);
                if let Err(e) = self.write_missing(ext, &f.data, &f.refused_in(lba, n)) {
                    tracing::error!(volume = %self.sh.cache.name, error = %e, "hydration: cannot write the backing file");
                }
                self.sh.on_demand.fetch_add(1, SeqCst);
                self.answer(ext, &Err(-libc::EIO), true);
            }
            Ok(f) => {
                let data = Arc::new(f.data);
                let res: FetchResult = match self.install(ext, &data, || data.clone()) {
                    Ok(_) => Ok(data),
                    Err(e) => {
                        tracing::error!(volume = %self.sh.cache.name, error = %e, "hydration: cannot write the backing file");
                        Err(e.errno())
                    }
                };
                self.sh.on_demand.fetch_add(1, SeqCst);
                self.answer(ext, &res, true);
            }
            Err(e) => {
                self.note_error(&e);
                // Reads waiting longer than the fetch timeout fail (never wrong data).
                let timeout = self.sh.cfg.fetch_timeout;
                let expired: Vec<u64> = self
                    .pending
                    .iter()
                    .filter(|(_, p)| p.since.elapsed() >= timeout)
                    .map(|(k, _)| *k)
                    .collect();
                for k in expired {
                    if let Some(p) = self.pending.remove(&k) {
                        for w in p.waiters {
                            w.complete(Err(-libc::EIO));
                        }
                    }
                }
                std::thread::sleep(self.backoff.min(Duration::from_millis(100)));
            }
        }
    }

    /// Whether the background pass has looked at every extent and nothing is in flight.
    fn pass_done(&self) -> bool {
        self.cursor >= self.nextents() && self.hot.is_empty() && self.inflight.is_empty()
    }

    /// The end of a pass: hydration is complete if every block is local; else (blocks that
    /// would not open were passed over) another pass is made later. Returns whether the
    /// worker should look again at once.
    fn end_pass(&mut self) -> bool {
        let c = self.sh.cache.clone();
        let Some(h) = c.hydrating() else { return false };
        let missing = c.nblocks - h.local.count();
        if missing > 0 {
            if self.rescan_at.is_none() {
                tracing::error!(volume = %c.name, blocks = missing, "hydration cannot complete: blocks of the snapshot do not open (see blocks_refused); looking again every {HYDRATE_RESCAN_SECS} s");
                let _ = persist_local(&c);
                self.rescan_at = Some(Instant::now() + Duration::from_secs(HYDRATE_RESCAN_SECS));
            } else if self.rescan_at.is_some_and(|t| Instant::now() >= t) {
                self.rescan_at = None;
                self.cursor = 0;
                return true;
            }
            return false;
        }
        match persist_local(&c).and_then(|_| c.finish_hydration()) {
            Ok(()) => {
                tracing::info!(volume = %c.name, "hydration complete: the volume is an ordinary volume");
                true
            }
            Err(e) => {
                self.note_error(&e);
                false
            }
        }
    }
}

/// Reads block range `[lba, lba + n)` of the backing file (tests, verify).
pub fn read_backing(c: &Cache, lba: u64, buf: &mut [u8]) -> Result<()> {
    let off = lba << BLOCK_SHIFT;
    read_full_at(&c.backing, buf, off)
        .map_err(|e| Error::io_at("read", &c.backing_path, off, e))?;
    Ok(())
}
