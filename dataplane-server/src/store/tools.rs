//! Offline store tools behind `deltavol-dataplane verify` and `deltavol-dataplane gc`.
//!
//! Both run outside the shards, on the caller's thread: local files with plain `pread`,
//! object-store calls on the backend's runtime (`block_on`).
//!
//! * **verify** reads every segment of every snapshot end to end: header, trailer and footer
//!   checks, then every batch (header crc, records crc, each record against the footer's
//!   index entry) and every data extent's crc32c. A finding names the volume, the snapshot,
//!   the segment and, for data, the extent's LBA range.
//! * **gc** (object store) removes what no committed manifest references: segments of
//!   uploads that never committed (a lost race, a crash mid-upload, a fenced writer) once
//!   older than a grace period (segments compaction replaced: once retired for that long),
//!   volumes whose creation never committed, the heat map of a volume without a manifest,
//!   probe leftovers, and
//!   manifests older than the newest few (the volume's trim floor is raised first, so loads
//!   list from it and a stale writer's create of a deleted number is taken back).
//!   The newest manifest is never touched, and a segment is removed only if the newest
//!   manifest, read again just before the removal, still does not name it: an interrupted GC
//!   leaves garbage, never a broken chain. On a local store, gc takes the data dir's lock (so
//!   no server runs) and removes temp files and unreferenced segment files.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjPath;

use super::backend::{self, Backend, ObjBackend};
use super::format::{self, ManifestData, KIND_DATA, KIND_ZERO};
use super::{StoreError, StoreErrorKind};

/// Default grace period before an unreferenced segment object is garbage.
pub const GC_MIN_AGE_SECS_DEFAULT: u64 = 3600;
/// Default number of older manifests kept whole besides the newest.
pub const GC_KEEP_MANIFESTS_DEFAULT: u64 = 8;
/// Cap on one batch read by verify (a batch carries at most about one frame of data).
const VERIFY_BATCH_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// One problem found by verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub volume: String,
    /// The snapshot whose content is affected (the manifest entry holding the segment).
    pub snap_id: Option<u64>,
    pub segment: Option<u64>,
    /// Blocks `[start, end)` of the damaged extent.
    pub lba: Option<(u64, u64)>,
    pub what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CORRUPT volume {}", self.volume)?;
        if let Some(s) = self.snap_id {
            write!(f, " snapshot {s}")?;
        }
        if let Some(g) = self.segment {
            write!(f, " segment {g}")?;
        }
        if let Some((a, b)) = self.lba {
            write!(f, " extent lba {a}..{b}")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What verify read and found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub volumes: u64,
    pub snapshots: u64,
    pub segments: u64,
    pub extents: u64,
    pub data_bytes: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn to_json(&self) -> String {
        let findings: Vec<serde_json::Value> = self
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "volume": f.volume,
                    "snap_id": f.snap_id,
                    "segment": f.segment,
                    "lba_start": f.lba.map(|l| l.0),
                    "lba_end": f.lba.map(|l| l.1),
                    "what": f.what,
                })
            })
            .collect();
        serde_json::json!({
            "ok": self.findings.is_empty(),
            "volumes": self.volumes,
            "snapshots": self.snapshots,
            "segments": self.segments,
            "extents": self.extents,
            "data_bytes": self.data_bytes,
            "findings": findings,
        })
        .to_string()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for x in &self.findings {
            writeln!(f, "{x}")?;
        }
        writeln!(
            f,
            "verify: {} volumes, {} snapshots, {} segments, {} extents, {} data bytes checked: {}",
            self.volumes,
            self.snapshots,
            self.segments,
            self.extents,
            self.data_bytes,
            if self.findings.is_empty() {
                "all good".to_string()
            } else {
                format!("{} problems", self.findings.len())
            }
        )
    }
}

/// Random access to one segment, whichever backend holds it.
enum Reader {
    File { f: std::fs::File, path: PathBuf },
    Object { obj: Arc<ObjBackend>, key: ObjPath },
}

impl Reader {
    fn len(&self) -> Result<u64, StoreError> {
        match self {
            Reader::File { f, path } => f
                .metadata()
                .map(|m| m.len())
                .map_err(|e| StoreError::io(format!("stat {}", path.display()), e)),
            Reader::Object { obj, key } => {
                obj.block_on(obj.head(key))?.map(|m| m.size).ok_or_else(|| {
                    StoreError::new(StoreErrorKind::Corrupt, format!("object {key} is missing"))
                })
            }
        }
    }

    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        match self {
            Reader::File { f, path } => {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off)
                    .map_err(|e| StoreError::io(format!("read {} at {off}", path.display()), e))?;
                Ok(buf)
            }
            Reader::Object { obj, key } => {
                Ok(obj.block_on(obj.get_range(key, off..off + len))?.to_vec())
            }
        }
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn block_on<F: std::future::Future>(backend: &Backend, f: F) -> F::Output {
    match backend {
        Backend::Object(obj) => obj.block_on(f),
        // The local paths of the async store functions used here do no async I/O.
        Backend::Local { .. } => futures::executor::block_on(f),
    }
}

/// Verifies every volume (or only `only`).
pub fn verify(backend: &Backend, only: Option<&str>) -> Result<VerifyReport, StoreError> {
    let mut names = match only {
        Some(v) => vec![v.to_string()],
        None => block_on(backend, backend.list_volumes())?,
    };
    names.sort();
    let mut report = VerifyReport::default();
    for name in names {
        let got = block_on(backend, super::read_manifest_full(backend, &name));
        let (m, tags) = match got {
            Ok(Some(x)) => x,
            Ok(None) if only.is_some() => {
                return Err(StoreError::new(
                    StoreErrorKind::NoSuchVolume,
                    format!("volume {name} does not exist"),
                ))
            }
            Ok(None) => continue,
            Err(e) if e.kind() == StoreErrorKind::Io => return Err(e),
            Err(e) => {
                report.volumes += 1;
                report.findings.push(Finding {
                    volume: name.clone(),
                    snap_id: None,
                    segment: None,
                    lba: None,
                    what: format!("manifest: {e}"),
                });
                continue;
            }
        };
        report.volumes += 1;
        report.snapshots += m.snapshots.len() as u64;
        let mut seen = HashSet::new();
        for s in &m.snapshots {
            for &seg in &s.segments {
                if !seen.insert(seg) {
                    continue;
                }
                report.segments += 1;
                let reader = match backend {
                    Backend::Local { volumes_dir } => {
                        let path = volumes_dir
                            .join(&name)
                            .join(super::local::segment_name(seg));
                        match std::fs::File::open(&path) {
                            Ok(f) => Reader::File { f, path },
                            Err(e) => {
                                report.findings.push(Finding {
                                    volume: name.clone(),
                                    snap_id: Some(s.snap_id),
                                    segment: Some(seg),
                                    lba: None,
                                    what: format!("segment file {}: {e}", path.display()),
                                });
                                continue;
                            }
                        }
                    }
                    Backend::Object(obj) => {
                        let tag = tags.get(&seg).copied().unwrap_or_default();
                        Reader::Object {
                            obj: Arc::clone(obj),
                            key: obj.key(&backend::segment_rel(&name, seg, tag)),
                        }
                    }
                };
                verify_segment(&reader, &name, &m, s.snap_id, seg, &mut report)?;
            }
        }
    }
    Ok(report)
}

/// Walks one segment; problems go to `report.findings`, only store I/O failures are errors.
fn verify_segment(
    r: &Reader,
    volume: &str,
    m: &ManifestData,
    snap_id: u64,
    seg: u64,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let finding = |lba: Option<(u64, u64)>, what: String| Finding {
        volume: volume.to_string(),
        snap_id: Some(snap_id),
        segment: Some(seg),
        lba,
        what,
    };
    // Corruption shows as a `Corrupt`-like error of the format checks; a store that cannot
    // answer is an error of the run.
    macro_rules! check {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if e.kind() == StoreErrorKind::Io => return Err(e),
                Err(e) => {
                    report.findings.push(finding(None, e.to_string()));
                    return Ok(());
                }
            }
        };
    }
    let len = check!(r.len());
    let min = (format::SEGMENT_HEADER_BYTES + format::SEGMENT_TRAILER_BYTES) as u64;
    if len < min {
        report
            .findings
            .push(finding(None, format!("segment is {len} bytes, too short")));
        return Ok(());
    }
    let header = r.read(0, format::SEGMENT_HEADER_BYTES as u64)?;
    check!(format::check_segment_header(
        &header,
        &m.volume_id,
        seg,
        m.block_size
    ));
    let trailer = r.read(
        len - format::SEGMENT_TRAILER_BYTES as u64,
        format::SEGMENT_TRAILER_BYTES as u64,
    )?;
    let (foff, flen, fcrc) = check!(format::decode_segment_trailer(&trailer, seg, len));
    let footer = r.read(foff, flen as u64)?;
    let idx = check!(format::decode_segment_footer(
        &footer,
        fcrc,
        &m.volume_id,
        seg,
        foff
    ));
    let bs = u64::from(m.block_size);
    let mut pos = format::SEGMENT_HEADER_BYTES as u64;
    let mut i = 0usize;
    while pos < foff {
        if foff - pos < format::BATCH_HEADER_BYTES as u64 {
            report.findings.push(finding(
                None,
                format!("truncated batch header at offset {pos}"),
            ));
            return Ok(());
        }
        let bh = r.read(pos, format::BATCH_HEADER_BYTES as u64)?;
        if bh[0..4] != format::BATCH_MAGIC || crc32c::crc32c(&bh[..28]) != le_u32(&bh, 28) {
            report.findings.push(finding(
                None,
                format!("batch header at offset {pos} is damaged (magic or crc)"),
            ));
            return Ok(());
        }
        let count = u64::from(le_u32(&bh, 4));
        let payload = u64::from(le_u32(&bh, 8));
        let records_crc = le_u32(&bh, 12);
        let body_len = count * format::EXTENT_RECORD_BYTES as u64 + payload;
        let body_at = pos + format::BATCH_HEADER_BYTES as u64;
        if body_len > VERIFY_BATCH_MAX_BYTES || body_at + body_len > foff {
            report.findings.push(finding(
                None,
                format!("batch at offset {pos} claims {body_len} bytes beyond the footer"),
            ));
            return Ok(());
        }
        let body = r.read(body_at, body_len)?;
        let rec_bytes = (count as usize) * format::EXTENT_RECORD_BYTES;
        if crc32c::crc32c(&body[..rec_bytes]) != records_crc {
            report.findings.push(finding(
                None,
                format!("extent records of the batch at offset {pos} fail their crc32c"),
            ));
            return Ok(());
        }
        let data_at = body_at + rec_bytes as u64;
        let mut cur = data_at;
        for k in 0..count as usize {
            let rec = &body[k * format::EXTENT_RECORD_BYTES..(k + 1) * format::EXTENT_RECORD_BYTES];
            let (lba, nblocks, crc, kind) =
                (le_u64(rec, 0), le_u32(rec, 8), le_u32(rec, 12), rec[16]);
            let range = (lba, lba + u64::from(nblocks));
            report.extents += 1;
            let Some(fe) = idx.extents.get(i) else {
                report.findings.push(finding(
                    Some(range),
                    "a batch record has no entry in the index footer".into(),
                ));
                return Ok(());
            };
            i += 1;
            let want_off = if kind == KIND_DATA { cur } else { 0 };
            if (fe.lba, fe.nblocks, fe.crc32c, fe.kind, fe.offset)
                != (lba, nblocks, crc, kind, want_off)
            {
                report.findings.push(finding(
                    Some(range),
                    "the index footer disagrees with the batch record".into(),
                ));
            }
            match kind {
                KIND_DATA => {
                    let n = u64::from(nblocks) * bs;
                    let at = (cur - data_at) as usize;
                    let Some(data) = body[rec_bytes..].get(at..at + n as usize) else {
                        report.findings.push(finding(
                            Some(range),
                            "extent data runs past its batch".into(),
                        ));
                        return Ok(());
                    };
                    if crc32c::crc32c(data) != crc {
                        report
                            .findings
                            .push(finding(Some(range), "data fails its crc32c".into()));
                    }
                    report.data_bytes += n;
                    cur += n;
                }
                KIND_ZERO => {}
                other => report
                    .findings
                    .push(finding(Some(range), format!("unknown extent kind {other}"))),
            }
        }
        if cur != data_at + payload {
            report.findings.push(finding(
                None,
                format!(
                    "batch at offset {pos}: records cover {} of {payload} payload bytes",
                    cur - data_at
                ),
            ));
            return Ok(());
        }
        pos = data_at + payload;
    }
    if pos != foff || i != idx.extents.len() {
        report.findings.push(finding(
            None,
            format!(
                "batches end at {pos} with {i} extents, the footer starts at {foff} with {}",
                idx.extents.len()
            ),
        ));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// GC
// -------------------------------------------------------------------------------------------

/// GC settings.
#[derive(Debug, Clone)]
pub struct GcOptions {
    pub min_age_secs: u64,
    pub keep_manifests: u64,
    pub dry_run: bool,
    /// Stop after this many removals (bounded runs; the rest waits for the next run).
    pub max_removals: Option<u64>,
}

/// What GC removed (or would remove, in a dry run).
#[derive(Debug, Default)]
pub struct GcReport {
    pub volumes: u64,
    /// Object keys or file paths removed.
    pub removed: Vec<String>,
    pub removed_bytes: u64,
    /// Old manifests deleted (below the volume's new trim floor).
    pub manifests_trimmed: Vec<String>,
    /// Unreferenced segments left because they are younger than the grace period.
    pub young_left: u64,
    pub dry_run: bool,
    /// `max_removals` was reached: more garbage may be left for the next run.
    pub stopped_early: bool,
}

impl GcReport {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "dry_run": self.dry_run,
            "volumes": self.volumes,
            "removed": self.removed,
            "removed_bytes": self.removed_bytes,
            "manifests_trimmed": self.manifests_trimmed,
            "young_left": self.young_left,
            "stopped_early": self.stopped_early,
        })
        .to_string()
    }
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for r in &self.removed {
            writeln!(f, "{verb} {r}")?;
        }
        for t in &self.manifests_trimmed {
            writeln!(f, "{verb} old manifest {t}")?;
        }
        writeln!(
            f,
            "gc: {} volumes; {verb} {} objects ({} bytes); {} old manifests; {} unreferenced segments younger than the grace period left",
            self.volumes,
            self.removed.len(),
            self.removed_bytes,
            self.manifests_trimmed.len(),
            self.young_left
        )
    }
}

/// Runs GC over the whole store.
pub fn gc(backend: &Backend, opts: &GcOptions) -> Result<GcReport, StoreError> {
    match backend {
        Backend::Local { volumes_dir } => gc_local(volumes_dir, opts),
        Backend::Object(obj) => obj.block_on(gc_object(obj, opts)),
    }
}

fn gc_local(volumes_dir: &Path, opts: &GcOptions) -> Result<GcReport, StoreError> {
    let data_dir = volumes_dir.parent().unwrap_or(Path::new("."));
    let lock_path = data_dir.join("LOCK");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::io(format!("open {}", lock_path.display()), e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            StoreError::new(
                StoreErrorKind::Io,
                format!(
                    "data dir {} is in use by a running deltavol-dataplane ({e}): a local store \
                     cleans itself at start-up; run gc with the server stopped",
                    data_dir.display()
                ),
            )
        })?;
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let rd = std::fs::read_dir(volumes_dir)
        .map_err(|e| StoreError::io(format!("list {}", volumes_dir.display()), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io("list volumes", e))?;
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = ent.path();
        let referenced: HashSet<u64> = match super::read_manifest_full(
            &Backend::Local {
                volumes_dir: volumes_dir.to_path_buf(),
            },
            &name,
        )
        .block_on_local()?
        {
            Some((m, _)) => m
                .snapshots
                .iter()
                .flat_map(|s| s.segments.iter().copied())
                .collect(),
            // A volume without a manifest never existed: nothing in it is referenced.
            None => HashSet::new(),
        };
        report.volumes += 1;
        let files = std::fs::read_dir(&dir)
            .map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        for f in files {
            let f = f.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
            let fname = f.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            let stray = fname.ends_with(super::local::TMP_SUFFIX)
                || fname
                    .strip_prefix("snap-")
                    .and_then(|s| s.strip_suffix(".seg"))
                    .is_some_and(|id| {
                        id.parse::<u64>()
                            .map_or(true, |id| !referenced.contains(&id))
                    });
            if stray {
                if opts
                    .max_removals
                    .is_some_and(|max| report.removed.len() as u64 >= max)
                {
                    report.stopped_early = true;
                    return Ok(report);
                }
                let p = f.path();
                report.removed_bytes += f.metadata().map_or(0, |m| m.len());
                if !opts.dry_run {
                    std::fs::remove_file(&p)
                        .map_err(|e| StoreError::io(format!("remove {}", p.display()), e))?;
                }
                report.removed.push(p.display().to_string());
            }
        }
    }
    Ok(report)
}

/// Runs a store future whose local-backend path does no async I/O.
trait BlockOnLocal: std::future::Future + Sized {
    fn block_on_local(self) -> Self::Output {
        futures::executor::block_on(self)
    }
}

impl<F: std::future::Future> BlockOnLocal for F {}

async fn gc_object(obj: &Arc<ObjBackend>, opts: &GcOptions) -> Result<GcReport, StoreError> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let now = chrono_now_ms();
    let min_age_ms = opts.min_age_secs.saturating_mul(1000);
    let old_enough = |m: &object_store::ObjectMeta| {
        now.saturating_sub(m.last_modified.timestamp_millis().max(0) as u64) >= min_age_ms
    };
    // Probe leftovers of a start-up probe that died half-way.
    for m in obj.list("probe").await? {
        if old_enough(&m) {
            remove(obj, &m, opts, &mut report).await?;
        }
    }
    let mut names = obj.list_dirs("volumes").await?;
    names.sort();
    for name in names {
        report.volumes += 1;
        let latest = super::latest_obj_manifest(obj, &name).await?;
        let latest_seq = latest.as_ref().map_or(0, |(m, _)| m.sequence);
        // Segments: unreferenced by the newest manifest and past the grace period.
        let referenced = |tags: &HashMap<u64, u128>, m: &ManifestData| -> HashSet<(u64, u128)> {
            m.snapshots
                .iter()
                .flat_map(|s| s.segments.iter())
                .filter_map(|id| tags.get(id).map(|t| (*id, *t)))
                .collect()
        };
        let mut refs = latest
            .as_ref()
            .map(|(m, om)| referenced(&om.tags, m))
            .unwrap_or_default();
        // Segments compaction replaced count from their retirement, not their upload.
        for r in latest.as_ref().map_or(&[][..], |(_, om)| &om.retired[..]) {
            if now.saturating_sub(r.retired_ms) < min_age_ms {
                refs.insert((r.id, r.tag));
                report.young_left += 1;
            }
        }
        let mut candidates = Vec::new();
        for m in obj.list(&format!("volumes/{name}/seg")).await? {
            let parsed = m.location.filename().and_then(backend::parse_segment_name);
            match parsed {
                Some(st) if refs.contains(&st) => {}
                _ if !old_enough(&m) => report.young_left += 1,
                _ => candidates.push(m),
            }
        }
        if !candidates.is_empty() {
            // Read the newest manifest again: a commit that landed meanwhile may name one.
            let again = super::latest_obj_manifest(obj, &name).await?;
            let refs2 = again
                .as_ref()
                .map(|(m, om)| referenced(&om.tags, m))
                .unwrap_or_default();
            for m in candidates {
                let parsed = m.location.filename().and_then(backend::parse_segment_name);
                if parsed.is_some_and(|st| refs2.contains(&st)) {
                    continue;
                }
                remove(obj, &m, opts, &mut report).await?;
            }
        }
        // The heat map of a volume that does not exist (no manifest): never served (it names
        // another volume id than any later volume of the name), removed once old enough.
        if latest.is_none() {
            let key = obj.key(&super::heat_rel(&name));
            if let Some(m) = obj.head(&key).await? {
                if old_enough(&m) {
                    remove(obj, &m, opts, &mut report).await?;
                } else {
                    report.young_left += 1;
                }
            }
        }
        // Old lease epochs: only the newest matters; two more are kept for the record.
        let leases = obj.list(&format!("volumes/{name}/lease")).await?;
        let newest = leases
            .iter()
            .filter_map(|m| m.location.filename().and_then(parse_lease_epoch))
            .max()
            .unwrap_or(0);
        for m in &leases {
            if m.location
                .filename()
                .and_then(parse_lease_epoch)
                .is_some_and(|e| e + 2 < newest)
            {
                remove(obj, m, opts, &mut report).await?;
            }
        }
        // Old manifests: keep the newest `keep_manifests + 1`, raise the floor, delete the
        // rest (also the tombstones of older builds' gc).
        if latest.is_some() {
            let t = super::manifest::trim_manifests(
                obj,
                &name,
                latest_seq,
                opts.keep_manifests,
                opts.dry_run,
            )
            .await?;
            report.removed_bytes += t.bytes;
            report.manifests_trimmed.extend(t.keys);
        }
    }
    Ok(report)
}

async fn remove(
    obj: &Arc<ObjBackend>,
    m: &object_store::ObjectMeta,
    opts: &GcOptions,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    if opts
        .max_removals
        .is_some_and(|max| report.removed.len() as u64 >= max)
    {
        report.stopped_early = true;
        return Ok(());
    }
    if !opts.dry_run {
        obj.delete(&m.location).await?;
    }
    tracing::info!(key = %m.location, bytes = m.size, dry_run = opts.dry_run, "gc: unreferenced object");
    report.removed_bytes += m.size;
    report.removed.push(m.location.to_string());
    Ok(())
}

fn parse_lease_epoch(name: &str) -> Option<u64> {
    name.strip_suffix(".lease")?.parse().ok()
}

fn chrono_now_ms() -> u64 {
    super::now_ms()
}
