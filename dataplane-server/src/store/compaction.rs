//! Compaction: giving back the space of deleted snapshots, and keeping a snapshot's segment
//! count small.
//!
//! Deleting a snapshot merges it into its successor by reference: the successor's segment list
//! grows by the deleted one's segments, and the blocks the successor overwrote become dead
//! bytes that still sit in those segments. A compaction round picks one snapshot and rewrites
//! some of its segments (those whose live fraction fell below [`Tuning::live_ratio`], and the
//! smallest ones while the snapshot holds more than [`SEGMENTS_PER_SNAPSHOT_MAX`]) into one new
//! segment holding exactly their live blocks (plus the snapshot's zero ranges), appended last
//! to the snapshot's list. Why that keeps every read the same: a layer maps each block to the
//! last segment of the list covering it (its owner). The new segment covers exactly the blocks
//! the rewritten segments owned, with their data; every other block keeps the owner it had,
//! because the last of the kept segments covering it was already the last of all.
//!
//! Crash safety, one durable step at a time (the manifest is the truth):
//! 1. the new segment is written and made durable under its own name (`compact-<n>.seg`;
//!    object: `seg/<id>-<tag>.seg`); a crash here leaves a file no manifest names, removed at
//!    the next load (object: by the grace-period GC);
//! 2. the manifest naming it instead of the old ones replaces the old manifest;
//! 3. local: the old files are removed (a crash before leaves files no manifest names, removed
//!    at the next load). Object: the old objects are listed in the manifest as retired and
//!    deleted once [`Tuning::retired_grace`] has passed, so that a reader holding an older
//!    manifest (a clone's view on another server) keeps finding them meanwhile.
//!
//! A round never holds the manifest lock while it copies. A retention round may merge the
//! snapshot meanwhile: a deletion only puts a deleted snapshot's list in front of its
//! successor's, so the planned list is still one contiguous run of one snapshot's list, whose
//! overlay there is unchanged; the swap replaces that run by the kept segments then the new
//! one. (Were the run not found, the round would drop its segment and plan again.)
//! Memory is bounded by one copy chunk and the piece list of one snapshot; I/O is paced by
//! [`Tuning::rate_bytes_s`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{self, Backend, Retired};
use super::chain::build_layer;
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::{self, SegExtent, KIND_DATA, KIND_ZERO};
use super::layer::Src;
use super::local::{create_file, segment_name, sync_dir, TMP_SUFFIX};
use super::now_ms;
use super::segment_reader::{SegSrc, Segment};
use super::segment_writer::{ObjSink, Sink};
use super::volume::Volume;

/// The high bit marks a segment written by compaction: its id is this bit | a number no
/// snapshot id can take (snapshot ids stay below it, see `Volume::begin`).
pub const COMPACT_ID_BIT: u64 = 1 << 63;
/// Above this many segments, a snapshot's smallest segments are merged.
pub const SEGMENTS_PER_SNAPSHOT_MAX: usize = 8;
/// Data one batch of a compacted segment carries at most (also the copy chunk).
const BATCH_DATA_MAX_BYTES: usize = 1 << 20;
/// Records one batch carries at most.
const BATCH_RECORDS_MAX: usize = 4096;
/// A round stops adding segments to rewrite past this many live bytes (a round takes about
/// a second at the default pace; the next round goes on).
const ROUND_LIVE_BYTES_MAX: u64 = 32 << 20;
/// Rounds one [`Volume::compact`] call runs at most (the next trigger continues).
const ROUNDS_MAX: usize = 64;

/// Defaults of [`Tuning`].
pub const LIVE_RATIO_DEFAULT: f64 = 0.75;
pub const RETIRED_GRACE_SECS_DEFAULT: u64 = 3600;
pub const RATE_MIB_S_DEFAULT: u64 = 64;

static LIVE_PERMILLE: AtomicU32 = AtomicU32::new((LIVE_RATIO_DEFAULT * 1000.0) as u32);
static RETIRED_GRACE_MS: AtomicU64 = AtomicU64::new(RETIRED_GRACE_SECS_DEFAULT * 1000);
static RATE_BYTES_S: AtomicU64 = AtomicU64::new(RATE_MIB_S_DEFAULT << 20);

static ROUNDS: AtomicU64 = AtomicU64::new(0);
static WRITTEN_BYTES: AtomicU64 = AtomicU64::new(0);
static FREED_BYTES: AtomicU64 = AtomicU64::new(0);
static RETIRED_DELETED: AtomicU64 = AtomicU64::new(0);

/// What compaction did in this process (for the metrics endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rounds: u64,
    pub written_bytes: u64,
    pub freed_bytes: u64,
    pub retired_deleted: u64,
}

pub fn counters() -> Counters {
    Counters {
        rounds: ROUNDS.load(Ordering::Relaxed),
        written_bytes: WRITTEN_BYTES.load(Ordering::Relaxed),
        freed_bytes: FREED_BYTES.load(Ordering::Relaxed),
        retired_deleted: RETIRED_DELETED.load(Ordering::Relaxed),
    }
}

/// The process's compaction settings (server flags; one data plane, one policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// A segment whose live fraction is below this is rewritten (0 turns the rewriting of
    /// dead bytes off; the segment-count bound stays).
    pub live_ratio: f64,
    /// Object store: how long a replaced segment object stays before it is deleted.
    pub retired_grace: Duration,
    /// Bytes a second a compaction reads and writes at most (0: unpaced).
    pub rate_bytes_s: u64,
}

impl Tuning {
    pub fn current() -> Tuning {
        Tuning {
            live_ratio: f64::from(LIVE_PERMILLE.load(Ordering::Relaxed)) / 1000.0,
            retired_grace: Duration::from_millis(RETIRED_GRACE_MS.load(Ordering::Relaxed)),
            rate_bytes_s: RATE_BYTES_S.load(Ordering::Relaxed),
        }
    }

    /// Sets the process's settings; `live_ratio` is clamped to [0, 1].
    pub fn apply(self) {
        let permille = (self.live_ratio.clamp(0.0, 1.0) * 1000.0).round() as u32;
        LIVE_PERMILLE.store(permille, Ordering::Relaxed);
        RETIRED_GRACE_MS.store(
            self.retired_grace.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        RATE_BYTES_S.store(self.rate_bytes_s, Ordering::Relaxed);
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactOutcome {
    /// The snapshot whose segments were rewritten.
    pub snap_id: u64,
    /// Segments replaced.
    pub rewritten: usize,
    /// Bytes the new segment holds (0: the replaced segments held nothing live).
    pub live_bytes: u64,
    /// Bytes of the replaced segments' data.
    pub old_bytes: u64,
}

/// Per snapshot, what planning learnt from its layer, kept while the layer is the same.
#[derive(Debug, Default)]
pub(super) struct StatsCache(HashMap<u64, SnapStats>);

#[derive(Debug)]
struct SnapStats {
    /// The layer the figures were taken from (identity: a changed layer is a new `Rc`).
    layer: Rc<super::layer::Layer>,
    segments: Vec<u64>,
    /// (segment id, data bytes, live bytes), in list order.
    stats: Vec<(u64, u64, u64)>,
}

/// A round's decision, taken from the in-memory index.
#[derive(Debug)]
struct Plan {
    snap_id: u64,
    parent_id: u64,
    /// The snapshot's segment list when planned (the swap finds it again as a run).
    segments: Vec<u64>,
    rewrite: HashSet<u64>,
    /// What the new segment holds, in block order: (start, end, source).
    pieces: Vec<(u64, u64, Src)>,
    live_bytes: u64,
    old_bytes: u64,
}

/// Data bytes of a segment's extents.
fn data_bytes(seg: &Segment, bs: u64) -> u64 {
    seg.extents
        .iter()
        .filter(|e| e.kind == KIND_DATA)
        .map(|e| u64::from(e.nblocks) * bs)
        .sum()
}

/// Reads the records a round copies. Local files: one read per record (the page cache does
/// the rest). Object store: one ranged GET covers a run of needed records of a segment (up to
/// [`WINDOW_BYTES_MAX`], skipping no gap wider than [`WINDOW_GAP_BYTES_MAX`]) instead of a GET
/// a record, and bypasses the hot-extent cache (a compaction's reads are not hot).
struct RecordReader {
    /// Per object segment: the (offset, length) of each record the round needs, by offset.
    needed: HashMap<u64, Vec<(u64, u64)>>,
    /// Per segment: the window last fetched (its start offset and bytes).
    windows: HashMap<u64, (u64, bytes::Bytes)>,
    window_bytes: usize,
}

/// Most bytes one ranged GET of a compaction fetches.
const WINDOW_BYTES_MAX: u64 = 8 << 20;
/// Widest stretch of unneeded bytes a window reads through rather than starting a new GET.
const WINDOW_GAP_BYTES_MAX: u64 = 256 << 10;
/// Windows held at once, in bytes, before they are dropped.
const WINDOWS_HELD_MAX: usize = 64 << 20;

impl RecordReader {
    fn new(
        pieces: &[(u64, u64, Src)],
        segments: &HashMap<u64, Rc<Segment>>,
        bs: u64,
    ) -> RecordReader {
        let mut needed: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        let mut seen: HashSet<(u64, u32)> = HashSet::new();
        for &(_, _, src) in pieces {
            let Src::Data { seg, rec, .. } = src else {
                continue;
            };
            let Some(segment) = segments.get(&seg) else {
                continue;
            };
            if !matches!(segment.src, SegSrc::Object { .. }) || !seen.insert((seg, rec)) {
                continue;
            }
            if let Some(e) = segment.extents.get(rec as usize) {
                needed
                    .entry(seg)
                    .or_default()
                    .push((e.offset, u64::from(e.nblocks) * bs));
            }
        }
        for v in needed.values_mut() {
            v.sort_unstable();
        }
        RecordReader {
            needed,
            windows: HashMap::new(),
            window_bytes: 0,
        }
    }

    /// Reads record `rec` of `seg` into `buf` and checks its crc32c; returns the bytes fetched.
    async fn read(
        &mut self,
        seg: &Segment,
        rec: u32,
        bs: u32,
        buf: &mut Vec<u8>,
    ) -> Result<u64, StoreError> {
        let SegSrc::Object { obj, key } = &seg.src else {
            let (res, b) = seg.read_record(rec, bs, std::mem::take(buf)).await;
            *buf = b;
            res?;
            return Ok(buf.len() as u64);
        };
        let e = seg.extents.get(rec as usize).copied().ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Corrupt,
                format!("segment {}: no record {rec}", seg.snap_id),
            )
        })?;
        let len = u64::from(e.nblocks) * u64::from(bs);
        let inside =
            |w: &(u64, bytes::Bytes)| e.offset >= w.0 && e.offset + len <= w.0 + w.1.len() as u64;
        let mut fetched = 0;
        if !self.windows.get(&seg.snap_id).is_some_and(inside) {
            let mut end = e.offset + len;
            if let Some(list) = self.needed.get(&seg.snap_id) {
                let from = list.partition_point(|r| r.0 < e.offset);
                for &(off, l) in &list[from..] {
                    if off < end {
                        end = end.max(off + l);
                        continue;
                    }
                    if off - end > WINDOW_GAP_BYTES_MAX || off + l - e.offset > WINDOW_BYTES_MAX {
                        break;
                    }
                    end = off + l;
                }
            }
            let bytes = obj.get_range(key, e.offset..end).await?;
            fetched = bytes.len() as u64;
            if self.window_bytes + bytes.len() > WINDOWS_HELD_MAX {
                self.windows.clear();
                self.window_bytes = 0;
            }
            self.window_bytes += bytes.len();
            if let Some(old) = self.windows.insert(seg.snap_id, (e.offset, bytes)) {
                self.window_bytes -= old.1.len();
            }
        }
        let (start, w) = &self.windows[&seg.snap_id];
        let at = (e.offset - start) as usize;
        buf.clear();
        buf.extend_from_slice(&w[at..at + len as usize]);
        if crc32c::crc32c(buf) != e.crc32c {
            return Err(StoreError::new(
                StoreErrorKind::Checksum,
                format!(
                    "segment {}: extent at lba {} fails its crc32c",
                    seg.snap_id, e.lba
                ),
            ));
        }
        Ok(fetched)
    }
}

/// The process's compaction I/O clock: the moment (ns since [`pace_origin`]) up to which
/// the rate's budget is spent. Every round of every volume on every shard draws on it, so
/// `--compact-mib-s` bounds the whole server, not each volume.
static PACE_NEXT_NS: AtomicU64 = AtomicU64::new(0);
/// How far ahead of now the budget may be spent before a round waits (a small burst).
const PACE_BURST: Duration = Duration::from_millis(100);

fn pace_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Accounts `bytes` of compaction I/O (read plus written) at `rate` bytes a second, and
/// waits while the server's budget is spent more than [`PACE_BURST`] ahead.
async fn pace(bytes: u64, rate: u64) {
    if rate == 0 || bytes == 0 {
        return;
    }
    let cost =
        (u128::from(bytes) * 1_000_000_000 / u128::from(rate)).min(u128::from(u64::MAX)) as u64;
    let now = pace_origin().elapsed().as_nanos() as u64;
    let mut end = 0;
    let _ = PACE_NEXT_NS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
        end = cur.max(now).saturating_add(cost);
        Some(end)
    });
    let ahead = Duration::from_nanos(end.saturating_sub(now));
    if ahead > PACE_BURST {
        tokio::time::sleep(ahead - PACE_BURST).await;
    }
}

impl Volume {
    /// Starts a background compaction pass on this thread unless one runs (then it runs once
    /// more when done). Errors are logged; the next kick retries.
    pub fn kick_compaction(self: &Rc<Self>) {
        if self.compacting.replace(true) {
            self.compact_again.set(true);
            self.compact_wake.notify_one();
            return;
        }
        let v = Rc::clone(self);
        tokio_uring::spawn(async move {
            loop {
                v.compact_again.set(false);
                if let Err(e) = v.compact().await {
                    if e.kind() != StoreErrorKind::Damaged {
                        tracing::warn!(volume = %v.name, error = %e, "compaction");
                    }
                    break;
                }
                if v.compact_again.get() {
                    continue;
                }
                // Retired objects left: wake when the first one is due (at most a minute
                // later, so a deleted volume's task ends soon).
                let Some(first) = v.state.borrow().retired.iter().map(|r| r.retired_ms).min()
                else {
                    break;
                };
                let grace_ms = Tuning::current().retired_grace.as_millis() as u64;
                let wait = (first + grace_ms)
                    .saturating_sub(now_ms())
                    .clamp(10, 60_000);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    () = v.compact_wake.notified() => {}
                }
            }
            v.compacting.set(false);
        });
    }

    /// Whether a background compaction pass is running.
    pub fn compaction_running(&self) -> bool {
        self.compacting.get()
    }

    /// Whether retired segment objects wait for deletion.
    pub fn has_retired(&self) -> bool {
        !self.state.borrow().retired.is_empty()
    }

    /// Runs compaction rounds until nothing is left to do (at most [`ROUNDS_MAX`]), then
    /// deletes retired segment objects whose grace period is over. Returns what each round
    /// did.
    pub async fn compact(&self) -> Result<Vec<CompactOutcome>, StoreError> {
        let mut done = Vec::new();
        for _ in 0..ROUNDS_MAX {
            match self.compact_once().await? {
                Some(o) => done.push(o),
                None => break,
            }
        }
        self.sweep_retired().await?;
        Ok(done)
    }

    /// Plans and runs one round; `None` when no snapshot needs one (or the chain moved under
    /// it: the next call plans again).
    pub async fn compact_once(&self) -> Result<Option<CompactOutcome>, StoreError> {
        self.check_damaged()?;
        let tuning = Tuning::current();
        let Some(plan) = self.plan_compaction(tuning.live_ratio) else {
            return Ok(None);
        };
        let written = if plan.live_bytes == 0 && plan.pieces.is_empty() {
            None
        } else {
            Some(self.write_compacted(&plan, tuning.rate_bytes_s).await?)
        };
        self.swap_compacted(plan, written).await
    }

    /// Picks the snapshot with the most to gain and what to rewrite in it.
    fn plan_compaction(&self, live_ratio: f64) -> Option<Plan> {
        let st = self.state.borrow();
        let bs = u64::from(st.manifest.block_size);
        let mut cache = self.compact_stats.borrow_mut();
        // (gain, index, rewrite set, live bytes, old bytes) of the best snapshot so far.
        let mut best: Option<(u64, usize, HashSet<u64>, u64, u64)> = None;
        for (idx, entry) in st.manifest.snapshots.iter().enumerate() {
            let layer = &st.layers[idx];
            // A snapshot's statistics change only with its layer (a commit, a merge into it,
            // a compaction of it): recomputed then, reused otherwise, so planning after each
            // commit costs the snapshots that changed, not the whole chain.
            let fresh = cache
                .0
                .get(&entry.snap_id)
                .is_some_and(|c| Rc::ptr_eq(&c.layer, layer) && c.segments == entry.segments);
            if !fresh {
                let mut live: HashMap<u64, u64> = HashMap::new();
                for p in layer.pieces() {
                    if let Src::Data { seg, .. } = p.src {
                        *live.entry(seg).or_default() += (p.end - p.start) * bs;
                    }
                }
                let mut stats = Vec::with_capacity(entry.segments.len());
                for id in &entry.segments {
                    let seg = st.segments.get(id)?;
                    stats.push((*id, data_bytes(seg, bs), live.get(id).copied().unwrap_or(0)));
                }
                cache.0.insert(
                    entry.snap_id,
                    SnapStats {
                        layer: Rc::clone(layer),
                        segments: entry.segments.clone(),
                        stats,
                    },
                );
            }
            // (id, total data bytes, live bytes), in list order.
            let stats = &cache.0[&entry.snap_id].stats;
            let mut rewrite: HashSet<u64> = HashSet::new();
            let mut budget = 0u64;
            for &(id, total, l) in stats {
                if total > 0
                    && (l as f64) < live_ratio * total as f64
                    && budget < ROUND_LIVE_BYTES_MAX
                {
                    rewrite.insert(id);
                    budget += l;
                }
            }
            let count_after =
                |rw: &HashSet<u64>| stats.len() - rw.len() + usize::from(!rw.is_empty());
            if count_after(&rewrite) > SEGMENTS_PER_SNAPSHOT_MAX {
                // Merge the smallest kept segments until half the bound is left: each byte is
                // rewritten about log(segments) times as a snapshot absorbs deleted ones.
                let mut by_size: Vec<&(u64, u64, u64)> =
                    stats.iter().filter(|s| !rewrite.contains(&s.0)).collect();
                by_size.sort_by_key(|s| (s.1, s.0));
                for s in by_size {
                    if count_after(&rewrite) <= SEGMENTS_PER_SNAPSHOT_MAX / 2
                        || (budget >= ROUND_LIVE_BYTES_MAX && rewrite.len() >= 2)
                    {
                        break;
                    }
                    rewrite.insert(s.0);
                    budget += s.2;
                }
            }
            if rewrite.is_empty() {
                continue;
            }
            let (old_bytes, live_bytes) = stats
                .iter()
                .filter(|s| rewrite.contains(&s.0))
                .fold((0, 0), |(o, l), s| (o + s.1, l + s.2));
            // A rewrite of one segment into one is only worth it when it drops dead bytes.
            if rewrite.len() == 1 && live_bytes == old_bytes {
                continue;
            }
            let gain = (old_bytes - live_bytes) + (rewrite.len() as u64 - 1) * 4096;
            if best.as_ref().is_none_or(|b| gain > b.0) {
                best = Some((gain, idx, rewrite, live_bytes, old_bytes));
            }
        }
        // Snapshots gone from the chain leave the cache.
        if cache.0.len() > st.manifest.snapshots.len() {
            let ids: HashSet<u64> = st.manifest.snapshots.iter().map(|s| s.snap_id).collect();
            cache.0.retain(|id, _| ids.contains(id));
        }
        let (_, idx, rewrite, live_bytes, old_bytes) = best?;
        let entry = &st.manifest.snapshots[idx];
        let layer = &st.layers[idx];
        let mut pieces = Vec::new();
        for p in layer.pieces() {
            match p.src {
                Src::Data { seg, .. } if rewrite.contains(&seg) => {
                    pieces.push((p.start, p.end, p.src))
                }
                Src::Zero => pieces.push((p.start, p.end, p.src)),
                _ => {}
            }
        }
        Some(Plan {
            snap_id: entry.snap_id,
            parent_id: entry.parent_id,
            segments: entry.segments.clone(),
            rewrite,
            pieces,
            live_bytes,
            old_bytes,
        })
    }

    /// Writes the plan's new segment and makes it durable; returns it, open for reads, with
    /// its object tag (0 on local disk).
    async fn write_compacted(&self, plan: &Plan, rate: u64) -> Result<(Segment, u128), StoreError> {
        let (volume_id, block_size, volume_size, generation, id) = {
            let st = self.state.borrow();
            let m = &st.manifest;
            (
                m.volume_id,
                m.block_size,
                m.size_bytes,
                m.generation,
                COMPACT_ID_BIT | (m.sequence + 1),
            )
        };
        let bs = u64::from(block_size);
        let header = format::encode_segment_header(&volume_id, id, block_size).to_vec();
        let (mut sink, tag, path) = match &self.backend {
            Backend::Local { .. } => {
                let tmp = self.dir.join(format!("{}{TMP_SUFFIX}", segment_name(id)));
                (Sink::File(create_file(&tmp).await?), 0u128, tmp)
            }
            Backend::Object(obj) => {
                let tag = backend::random_tag()?;
                let key = obj.key(&backend::segment_rel(&self.name, id, tag));
                let path = std::path::PathBuf::from(key.to_string());
                (Sink::Object(ObjSink::new(Arc::clone(obj), key)), tag, path)
            }
        };
        let result = self
            .fill_compacted(plan, &mut sink, &path, header, bs, rate)
            .await;
        let (extents, write_off) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Sink::File(f) = sink {
                    let _ = f.close().await;
                    let _ = std::fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        let data_bytes = extents
            .iter()
            .filter(|e| e.kind == KIND_DATA)
            .map(|e| u64::from(e.nblocks) * bs)
            .sum();
        let footer = format::encode_segment_footer(
            &volume_id,
            &format::FooterMeta {
                snap_id: id,
                parent_id: plan.snap_id,
                block_size,
                volume_size,
                generation,
                data_bytes,
            },
            &extents,
        );
        let trailer = format::encode_segment_trailer(write_off, &footer);
        let mut tail = footer;
        tail.extend_from_slice(&trailer);
        let src = match sink {
            Sink::File(f) => {
                let done = async {
                    let (res, _) = f.write_all_at(tail, write_off).await;
                    res.map_err(io_at("write", &path))?;
                    f.sync_all().await.map_err(io_at("fsync", &path))?;
                    f.close().await.map_err(io_at("close", &path))?;
                    let final_path = self.dir.join(segment_name(id));
                    tokio_uring::fs::rename(&path, &final_path)
                        .await
                        .map_err(io_at("rename", &path))?;
                    sync_dir(&self.dir).await?;
                    crash_point("compact-written");
                    let f = std::fs::File::open(&final_path).map_err(io_at("open", &final_path))?;
                    Ok::<_, StoreError>(SegSrc::File(tokio_uring::fs::File::from_std(f)))
                }
                .await;
                match done {
                    Ok(src) => src,
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        return Err(e);
                    }
                }
            }
            Sink::Object(mut o) => {
                o.append(&tail).await?;
                let obj = Arc::clone(&o.obj);
                let key = o.key.clone();
                o.finish().await?;
                crash_point("compact-written");
                SegSrc::Object { obj, key }
            }
        };
        Ok((
            Segment {
                snap_id: id,
                src,
                extents,
            },
            tag,
        ))
    }

    /// Copies the plan's pieces into `sink` after `header`, in batches; returns the new
    /// segment's index and where its footer goes.
    #[allow(clippy::too_many_arguments)]
    async fn fill_compacted(
        &self,
        plan: &Plan,
        sink: &mut Sink,
        path: &std::path::Path,
        header: Vec<u8>,
        bs: u64,
        rate: u64,
    ) -> Result<(Vec<SegExtent>, u64), StoreError> {
        let (res, _) = sink.write(header, 0, path).await;
        res?;
        let mut write_off = format::SEGMENT_HEADER_BYTES as u64;
        let mut extents: Vec<SegExtent> = Vec::with_capacity(plan.pieces.len());
        let mut batch_recs: Vec<SegExtent> = Vec::new();
        let mut batch_data: Vec<u8> = Vec::with_capacity(BATCH_DATA_MAX_BYTES);
        let mut batch_seq = 0u64;
        // The record last read (a record split into several live pieces is read once).
        let mut cached: Option<(u64, u32)> = None;
        let mut rec_buf: Vec<u8> = Vec::new();
        let mut reader = {
            let st = self.state.borrow();
            RecordReader::new(&plan.pieces, &st.segments, bs)
        };
        // Bytes read and written since the last call to `pace`.
        let mut moved = 0u64;
        // Pieces longer than a batch are cut to fit one.
        let max_blocks = (BATCH_DATA_MAX_BYTES as u64 / bs).max(1);
        let mut work: Vec<(u64, u64, Src)> = Vec::with_capacity(plan.pieces.len());
        for &(s, e, src) in &plan.pieces {
            let mut at = s;
            while at < e {
                let end = match src {
                    Src::Zero => e,
                    Src::Data { .. } => e.min(at + max_blocks),
                };
                work.push((at, end, src));
                at = end;
            }
        }
        let mut i = 0;
        while i <= work.len() {
            let flush = i == work.len()
                || batch_recs.len() >= BATCH_RECORDS_MAX
                || match work[i].2 {
                    Src::Data { .. } => {
                        batch_data.len() as u64 + (work[i].1 - work[i].0) * bs
                            > BATCH_DATA_MAX_BYTES as u64
                    }
                    Src::Zero => false,
                };
            if flush && !batch_recs.is_empty() {
                let mut hdr = Vec::new();
                format::encode_batch_into(
                    &mut hdr,
                    batch_recs
                        .iter()
                        .map(|r| (r.lba, r.nblocks, r.crc32c, r.kind)),
                    batch_data.len() as u32,
                    batch_seq,
                );
                let hdr_len = hdr.len() as u64;
                let (res, _) = sink.write(hdr, write_off, path).await;
                res?;
                let mut data_off = write_off + hdr_len;
                let payload_len = batch_data.len() as u64;
                if !batch_data.is_empty() {
                    let (res, back) = sink
                        .write(std::mem::take(&mut batch_data), data_off, path)
                        .await;
                    res?;
                    batch_data = back;
                    batch_data.clear();
                }
                for mut r in batch_recs.drain(..) {
                    if r.kind == KIND_DATA {
                        r.offset = data_off;
                        data_off += u64::from(r.nblocks) * bs;
                    }
                    extents.push(r);
                }
                write_off += hdr_len + payload_len;
                batch_seq += 1;
                moved += payload_len;
                pace(std::mem::take(&mut moved), rate).await;
            }
            if i == work.len() {
                break;
            }
            let (s, e, src) = work[i];
            i += 1;
            let nblocks = (e - s) as u32;
            match src {
                Src::Zero => batch_recs.push(SegExtent {
                    lba: s,
                    nblocks,
                    kind: KIND_ZERO,
                    crc32c: 0,
                    offset: 0,
                }),
                Src::Data { seg, rec, rec_lba } => {
                    if cached != Some((seg, rec)) {
                        let segment =
                            self.state
                                .borrow()
                                .segments
                                .get(&seg)
                                .cloned()
                                .ok_or_else(|| {
                                    StoreError::new(
                                        StoreErrorKind::Damaged,
                                        format!("compaction: segment {seg} is missing"),
                                    )
                                })?;
                        moved += reader.read(&segment, rec, bs as u32, &mut rec_buf).await?;
                        cached = Some((seg, rec));
                    }
                    let from = ((s - rec_lba) * bs) as usize;
                    let to = ((e - rec_lba) * bs) as usize;
                    let data = rec_buf.get(from..to).ok_or_else(|| {
                        StoreError::new(
                            StoreErrorKind::Corrupt,
                            format!(
                                "compaction: segment {seg} record {rec} is shorter than its piece"
                            ),
                        )
                    })?;
                    batch_recs.push(SegExtent {
                        lba: s,
                        nblocks,
                        kind: KIND_DATA,
                        crc32c: crc32c::crc32c(data),
                        offset: 0,
                    });
                    batch_data.extend_from_slice(data);
                }
            }
        }
        Ok((extents, write_off))
    }

    /// Publishes a round: if the snapshot still has the planned segment list, the manifest
    /// names the new segment instead of the rewritten ones; then the old ones go (local: at
    /// once; object: retired for the grace period).
    async fn swap_compacted(
        &self,
        plan: Plan,
        written: Option<(Segment, u128)>,
    ) -> Result<Option<CompactOutcome>, StoreError> {
        let new_id = written.as_ref().map(|(s, _)| s.snap_id);
        let new_tag = written.as_ref().map_or(0, |w| w.1);
        let drop_new = |why: &str| {
            tracing::info!(volume = %self.name, snap_id = plan.snap_id, why, "compaction round dropped");
            if let Some(id) = new_id {
                self.remove_segment_now(id, new_tag);
            }
        };
        let _guard = self.meta_lock.lock().await;
        if let Err(e) = self.check_damaged() {
            drop_new("volume damaged or deleted");
            return Err(e);
        }
        let bs = u64::from(self.state.borrow().manifest.block_size);
        let (nm, idx, tags, retired, new_segments) = {
            let st = self.state.borrow();
            // Deletions meanwhile only concatenate lists (a deleted snapshot's list goes in
            // front of its successor's), so the planned list is still one contiguous run of
            // one snapshot's list, and its overlay there is what it was.
            let found = st.manifest.snapshots.iter().enumerate().find_map(|(i, s)| {
                s.segments
                    .windows(plan.segments.len())
                    .position(|w| w == plan.segments.as_slice())
                    .map(|at| (i, at))
            });
            let Some((idx, at)) = found else {
                drop(st);
                drop_new("the planned segments are no longer one run of a snapshot");
                return Ok(None);
            };
            let mut nm = st.manifest.clone();
            let entry = &mut nm.snapshots[idx];
            // The run P becomes (P minus the rewritten) then the new segment: the same overlay.
            let mut segs: Vec<u64> = entry.segments[..at].to_vec();
            segs.extend(
                plan.segments
                    .iter()
                    .copied()
                    .filter(|id| !plan.rewrite.contains(id)),
            );
            segs.extend(new_id);
            segs.extend_from_slice(&entry.segments[at + plan.segments.len()..]);
            entry.segments = segs;
            let mut new_segments = st.segments.clone();
            for id in &plan.rewrite {
                new_segments.remove(id);
            }
            let mut tags = st.tags.clone();
            let mut retired = st.retired.clone();
            if let Backend::Object(_) = self.backend {
                let now = now_ms();
                for id in &plan.rewrite {
                    if let Some(tag) = tags.remove(id) {
                        retired.push(Retired {
                            id: *id,
                            tag,
                            retired_ms: now,
                        });
                    }
                }
                if let Some(id) = new_id {
                    tags.insert(id, new_tag);
                }
            }
            nm.sequence += 1;
            (nm, idx, tags, retired, new_segments)
        };
        let mut new_segments = new_segments;
        if let Some((seg, _)) = written {
            new_segments.insert(seg.snap_id, Rc::new(seg));
        }
        let mut nm = nm;
        {
            let entry = &mut nm.snapshots[idx];
            entry.bytes = entry
                .segments
                .iter()
                .filter_map(|id| new_segments.get(id))
                .map(|s| data_bytes(s, bs))
                .sum();
            entry.extent_count = entry
                .segments
                .iter()
                .filter_map(|id| new_segments.get(id))
                .map(|s| s.extents.len() as u64)
                .sum();
        }
        if let Err(e) = self.write_manifest_with(&nm, &tags, &retired).await {
            drop_new("the manifest write failed");
            return Err(e);
        }
        crash_point("compact-published");
        let layer = build_layer(&nm.snapshots[idx].segments, &new_segments);
        {
            let mut st = self.state.borrow_mut();
            st.layers[idx] = Rc::new(layer);
            st.segments = new_segments;
            st.manifest = nm;
            st.tags = tags;
            st.retired = retired;
        }
        if let Backend::Local { .. } = self.backend {
            for id in &plan.rewrite {
                self.remove_segment_now(*id, 0);
            }
        }
        ROUNDS.fetch_add(1, Ordering::Relaxed);
        WRITTEN_BYTES.fetch_add(plan.live_bytes, Ordering::Relaxed);
        FREED_BYTES.fetch_add(plan.old_bytes - plan.live_bytes, Ordering::Relaxed);
        let outcome = CompactOutcome {
            snap_id: plan.snap_id,
            rewritten: plan.rewrite.len(),
            live_bytes: plan.live_bytes,
            old_bytes: plan.old_bytes,
        };
        tracing::info!(
            volume = %self.name,
            snap_id = outcome.snap_id,
            rewritten = outcome.rewritten,
            live_bytes = outcome.live_bytes,
            freed_bytes = outcome.old_bytes - outcome.live_bytes,
            parent = plan.parent_id,
            "compacted"
        );
        Ok(Some(outcome))
    }

    /// Removes a segment no manifest names any more (best effort; local: a file left is
    /// removed at the next load; object: the GC finds it).
    fn remove_segment_now(&self, id: u64, tag: u128) {
        match &self.backend {
            Backend::Local { .. } => {
                let path = self.dir.join(segment_name(id));
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "removing a replaced segment");
                    }
                }
            }
            Backend::Object(obj) => {
                obj.delete_detached(obj.key(&backend::segment_rel(&self.name, id, tag)))
            }
        }
    }

    /// Object backend: deletes the retired segment objects whose grace period is over; the
    /// next manifest no longer lists them. Returns how many were deleted.
    pub async fn sweep_retired(&self) -> Result<usize, StoreError> {
        let Backend::Object(obj) = &self.backend else {
            return Ok(0);
        };
        let grace_ms = Tuning::current().retired_grace.as_millis() as u64;
        let now = now_ms();
        let due: Vec<Retired> = self
            .state
            .borrow()
            .retired
            .iter()
            .filter(|r| now.saturating_sub(r.retired_ms) >= grace_ms)
            .copied()
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        for r in &due {
            obj.delete(&obj.key(&backend::segment_rel(&self.name, r.id, r.tag)))
                .await?;
        }
        let _guard = self.meta_lock.lock().await;
        self.check_damaged()?;
        let gone: HashSet<(u64, u128)> = due.iter().map(|r| (r.id, r.tag)).collect();
        let (nm, tags, retired) = {
            let st = self.state.borrow();
            let retired: Vec<Retired> = st
                .retired
                .iter()
                .filter(|r| !gone.contains(&(r.id, r.tag)))
                .copied()
                .collect();
            let mut nm = st.manifest.clone();
            nm.sequence += 1;
            (nm, st.tags.clone(), retired)
        };
        self.write_manifest_with(&nm, &tags, &retired).await?;
        let mut st = self.state.borrow_mut();
        st.manifest = nm;
        st.retired = retired;
        RETIRED_DELETED.fetch_add(due.len() as u64, Ordering::Relaxed);
        tracing::info!(volume = %self.name, deleted = due.len(), "retired segments deleted");
        Ok(due.len())
    }
}

/// Test seam: `DELTAVOL_DATAPLANE_CRASH_AT=<point>` aborts the process at that point of a
/// compaction (`compact-written`: the new segment is durable, no manifest names it;
/// `compact-published`: the manifest names it, the old segments are still there), as a
/// power cut would. Read once; unset in production.
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("DELTAVOL_DATAPLANE_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        tracing::error!(point, "DELTAVOL_DATAPLANE_CRASH_AT: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    //! Random chains against a model: snapshots with overlapping data and zero extents,
    //! random deletions (merges), then compaction under several live ratios; every kept
    //! snapshot must read exactly as before, before and after a reload from disk.

    use deltavol_schemas::wire;

    use super::*;
    use crate::store::read_plan::PlanSrc;
    use crate::store::segment_writer::BeginOutcome;

    const BS: u32 = 4096;
    const BLOCKS: u64 = 96;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    async fn ship(v: &Rc<Volume>, snap: u64, parent: u64, rng: &mut Rng, model: &mut [u8]) {
        let BeginOutcome::Started(mut up) = v
            .begin(snap, parent, BLOCKS * u64::from(BS), 1, 0)
            .await
            .expect("begin")
        else {
            panic!("already committed");
        };
        let (mut count, mut bytes) = (0u64, 0u64);
        for _ in 0..1 + rng.below(4) {
            let n = 1 + rng.below(24);
            let lba = rng.below(BLOCKS - n + 1);
            let at = (lba * u64::from(BS)) as usize;
            let len = (n * u64::from(BS)) as usize;
            let (ext, payload) = if rng.below(5) == 0 {
                model[at..at + len].fill(0);
                let e = wire::Extent::new(lba, n as u32, 0, wire::ExtentKind::Zero);
                (e, Vec::new())
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                model[at..at + len].copy_from_slice(&data);
                let e =
                    wire::Extent::new(lba, n as u32, crc32c::crc32c(&data), wire::ExtentKind::Data);
                (e, data)
            };
            bytes += payload.len() as u64;
            count += 1;
            let (res, _) = up.put([ext].iter(), payload).await;
            res.expect("put");
        }
        up.commit(count, bytes).await.expect("commit");
    }

    async fn read_all(v: &Volume, snap: u64) -> Vec<u8> {
        let plan = v.plan_read(snap, 0, BLOCKS).await.expect("plan");
        let bs = u64::from(BS);
        let mut out = vec![0u8; (BLOCKS * bs) as usize];
        for (s, e, src) in plan.pieces {
            if let PlanSrc::Data { seg, rec, rec_lba } = src {
                let (res, buf) = seg.read_record(rec, BS, Vec::new()).await;
                res.expect("read record");
                let from = ((s - rec_lba) * bs) as usize;
                let to = ((e - rec_lba) * bs) as usize;
                out[(s * bs) as usize..(e * bs) as usize].copy_from_slice(&buf[from..to]);
            }
        }
        out
    }

    #[test]
    fn the_pace_is_shared_by_every_round_of_the_process() {
        tokio_uring::start(async {
            let t = Instant::now();
            // Two rounds at once, 2 MiB each, at 8 MiB/s for the process: 0.5 s, less the
            // burst allowance.
            let round = || async {
                for _ in 0..4 {
                    pace(512 << 10, 8 << 20).await;
                }
            };
            futures::join!(round(), round());
            let took = t.elapsed();
            assert!(took >= Duration::from_millis(350), "{took:?}");
        });
    }

    fn same(got: &[u8], want: &[u8], ratio: f64, snap: u64) {
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "ratio {ratio}, snapshot {snap}: block {} differs",
                i / BS as usize
            );
        }
    }

    #[test]
    fn random_chains_read_the_same_after_deletions_and_compaction() {
        let ratios = [0.75, 1.0, 0.3, 0.0, 0.9, 0.6];
        for (seed, ratio) in (1u64..=9).map(|s| (s, ratios[s as usize % ratios.len()])) {
            let dir = tempfile::tempdir().expect("tempdir");
            let backend = Backend::Local {
                volumes_dir: dir.path().to_path_buf(),
            };
            Tuning {
                live_ratio: ratio,
                retired_grace: Duration::from_secs(3600),
                rate_bytes_s: 0,
            }
            .apply();
            tokio_uring::start(async {
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let v = Volume::create(&backend, "v", BLOCKS * u64::from(BS), BS, None, None)
                    .await
                    .expect("create");
                let mut model = vec![0u8; (BLOCKS * u64::from(BS)) as usize];
                let mut models: HashMap<u64, Vec<u8>> = HashMap::new();
                let mut head = 0;
                for snap in 1..=60u64 {
                    ship(&v, snap, head, &mut rng, &mut model).await;
                    models.insert(snap, model.clone());
                    head = snap;
                    // Delete a random older snapshot now and then, compact after some.
                    if snap % 3 == 0 {
                        let chain = v.chain();
                        if chain.len() > 2 {
                            let victim = chain[rng.below(chain.len() as u64 - 1) as usize].snap_id;
                            v.delete_snapshots(&[victim]).await.expect("delete");
                            models.remove(&victim);
                        }
                    }
                    if snap % 5 == 0 {
                        // A deletion while a round copies: the round's snapshot may be merged
                        // into its successor (or absorb its predecessor) before the swap.
                        let chain = v.chain();
                        if chain.len() > 2 {
                            let victim = chain[rng.below(chain.len() as u64 - 1) as usize].snap_id;
                            let (c, d) = futures::join!(v.compact(), async {
                                tokio::task::yield_now().await;
                                v.delete_snapshots(&[victim]).await
                            });
                            c.expect("compact");
                            d.expect("delete");
                            models.remove(&victim);
                        }
                    }
                    if snap % 7 == 0 {
                        v.compact().await.expect("compact");
                        for s in v.chain() {
                            assert!(s.segments.len() <= SEGMENTS_PER_SNAPSHOT_MAX + 1);
                        }
                    }
                }
                v.compact().await.expect("compact");
                for s in v.chain() {
                    assert!(
                        s.segments.len() <= SEGMENTS_PER_SNAPSHOT_MAX,
                        "ratio {ratio}: snapshot {} keeps {} segments",
                        s.snap_id,
                        s.segments.len()
                    );
                    same(
                        &read_all(&v, s.snap_id).await,
                        &models[&s.snap_id],
                        ratio,
                        s.snap_id,
                    );
                }
                let compacted = v
                    .chain()
                    .iter()
                    .flat_map(|s| s.segments.clone())
                    .filter(|id| id & COMPACT_ID_BIT != 0)
                    .count();
                assert!(
                    ratio == 0.0 || compacted > 0,
                    "ratio {ratio}: nothing was compacted"
                );
                drop(v);
                let v = Volume::load(&backend, "v")
                    .await
                    .expect("load")
                    .expect("volume");
                for s in v.chain() {
                    same(
                        &read_all(&v, s.snap_id).await,
                        &models[&s.snap_id],
                        ratio,
                        s.snap_id,
                    );
                }
            });
        }
        Tuning {
            live_ratio: LIVE_RATIO_DEFAULT,
            retired_grace: Duration::from_secs(RETIRED_GRACE_SECS_DEFAULT),
            rate_bytes_s: RATE_MIB_S_DEFAULT << 20,
        }
        .apply();
    }
}
