//! Receiving a snapshot: [`Volume::begin`] starts an [`Upload`], [`Upload::put`] checks each
//! frame of extents and appends it to the segment (a local temp file, or an object uploaded
//! in parts), [`Upload::commit`] writes the footer, makes the segment durable and publishes
//! the manifest naming it.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use deltavol_schemas::{check_extents, wire, ExtentError};
use object_store::path::Path as ObjPath;

use super::backend::{self, Backend, ObjBackend};
use super::chain::add_segment;
use super::compaction::COMPACT_ID_BIT;
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::{self, SegExtent, SnapEntry, VolumeId, KIND_DATA, KIND_ZERO};
use super::layer::Layer;
use super::local::{create_file, segment_name, sync_dir, TMP_SUFFIX};
use super::now_ms;
use super::segment_reader::{SegSrc, Segment};
use super::volume::{stale_generation, Volume};

/// Cap on the extents of one snapshot (bounds the upload's in-memory index).
pub const SNAPSHOT_EXTENTS_MAX: u64 = 4 * 1024 * 1024;
/// Slack on top of a snapshot's data cap.
pub const SNAPSHOT_DATA_SLACK_BYTES: u64 = 64 * 1024 * 1024;

/// Cap on the data one snapshot may carry: four times its volume (a delta holds each block
/// about once; the factor allows overlapping extents) plus [`SNAPSHOT_DATA_SLACK_BYTES`].
pub fn snapshot_data_max_bytes(volume_size: u64) -> u64 {
    volume_size
        .saturating_mul(4)
        .saturating_add(SNAPSHOT_DATA_SLACK_BYTES)
}

/// The upload a volume is receiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ActiveUpload {
    pub(super) epoch: u64,
    pub(super) snap_id: u64,
    pub(super) generation: u64,
    pub(super) committing: bool,
}

/// The outcome of a `BeginSnapshot`.
#[derive(Debug)]
pub enum BeginOutcome {
    Started(Upload),
    AlreadyCommitted(SnapEntry),
}

impl Volume {
    /// Starts receiving snapshot `snap_id` (see the wire protocol's `BeginSnapshot`).
    pub async fn begin(
        self: &Rc<Self>,
        snap_id: u64,
        parent_id: u64,
        volume_size: u64,
        generation: u64,
        cut_time_ms: u64,
    ) -> Result<BeginOutcome, StoreError> {
        self.check_damaged()?;
        let (volume_id, block_size) = {
            let st = self.state.borrow();
            let m = &st.manifest;
            if let Some(s) = m.snapshots.iter().find(|s| s.snap_id == snap_id) {
                if s.parent_id == parent_id {
                    return Ok(BeginOutcome::AlreadyCommitted(s.clone()));
                }
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "snapshot {snap_id} is already committed with parent {}, not {parent_id}",
                        s.parent_id
                    ),
                ));
            }
            if generation < m.generation {
                return Err(stale_generation(&self.name, m.generation, generation));
            }
            let head = m.snapshots.last().map_or(0, |s| s.snap_id);
            if parent_id != head {
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "parent {parent_id} is not the chain head {head} of volume {}",
                        self.name
                    ),
                ));
            }
            if snap_id == 0 || snap_id <= head {
                return Err(StoreError::new(
                    StoreErrorKind::BadSnapshotId,
                    format!("snapshot id {snap_id} must be greater than the chain head {head}"),
                ));
            }
            if snap_id & COMPACT_ID_BIT != 0 {
                return Err(StoreError::new(
                    StoreErrorKind::BadSnapshotId,
                    format!("snapshot id {snap_id} is too large: ids stay below 2^63"),
                ));
            }
            if volume_size != m.size_bytes {
                return Err(StoreError::new(
                    StoreErrorKind::VolumeMismatch,
                    format!("snapshot volume size {volume_size} differs from the volume's {} (resize is not supported)", m.size_bytes),
                ));
            }
            (m.volume_id, m.block_size)
        };
        match self.upload.get() {
            Some(a) if a.committing => {
                return Err(StoreError::new(
                    StoreErrorKind::UploadInProgress,
                    format!(
                        "snapshot {} of volume {} is being committed: retry",
                        a.snap_id, self.name
                    ),
                ));
            }
            Some(a) => tracing::warn!(
                volume = %self.name,
                superseded = a.snap_id,
                snap_id,
                "a new upload supersedes one still streaming"
            ),
            None => {}
        }
        let epoch = self.upload_epoch.get() + 1;
        self.upload_epoch.set(epoch);
        self.upload.set(Some(ActiveUpload {
            epoch,
            snap_id,
            generation,
            committing: false,
        }));
        let tmp_path = self
            .dir
            .join(format!("{}.{epoch}{TMP_SUFFIX}", segment_name(snap_id)));
        let mut upload = Upload {
            epoch,
            volume: Rc::clone(self),
            snap_id,
            parent_id,
            generation,
            cut_time_ms,
            volume_size,
            block_size,
            volume_id,
            sink: None,
            tag: 0,
            tmp_path,
            write_off: 0,
            extents: Vec::new(),
            data_bytes: 0,
            batch_seq: 0,
            hdr_buf: Vec::new(),
            finished: false,
        };
        let header = format::encode_segment_header(&volume_id, snap_id, block_size).to_vec();
        match &self.backend {
            Backend::Local { .. } => {
                let f = create_file(&upload.tmp_path).await?;
                let (res, _) = f.write_all_at(header, 0).await;
                res.map_err(io_at("write", &upload.tmp_path))?;
                upload.sink = Some(Sink::File(f));
            }
            Backend::Object(obj) => {
                upload.tag = backend::random_tag()?;
                let key = obj.key(&backend::segment_rel(&self.name, snap_id, upload.tag));
                upload.tmp_path = PathBuf::from(key.to_string());
                let mut sink = ObjSink {
                    obj: Arc::clone(obj),
                    key,
                    part: Vec::new(),
                    upload: None,
                    parts: 0,
                };
                sink.append(&header).await?;
                upload.sink = Some(Sink::Object(sink));
            }
        }
        upload.write_off = format::SEGMENT_HEADER_BYTES as u64;
        Ok(BeginOutcome::Started(upload))
    }
}

/// A snapshot being received. Dropping it before [`Upload::commit`] abandons it: the temp
/// segment is removed and nothing becomes visible.
#[derive(Debug)]
pub struct Upload {
    epoch: u64,
    volume: Rc<Volume>,
    snap_id: u64,
    parent_id: u64,
    generation: u64,
    /// The compute node's cut time of this snapshot (0 = unknown).
    cut_time_ms: u64,
    volume_size: u64,
    block_size: u32,
    volume_id: VolumeId,
    sink: Option<Sink>,
    /// Object backend: the random tag naming this upload's segment object.
    tag: u128,
    /// Local: the temp file; object: the segment's key (for messages).
    tmp_path: PathBuf,
    write_off: u64,
    extents: Vec<SegExtent>,
    data_bytes: u64,
    batch_seq: u64,
    hdr_buf: Vec<u8>,
    finished: bool,
}

impl Upload {
    pub fn snap_id(&self) -> u64 {
        self.snap_id
    }

    /// Checks one frame of extents (bounds, payload lengths, crc32c) and appends it to the
    /// segment. `payload` is handed back for reuse.
    pub async fn put<'a>(
        &mut self,
        extents: impl ExactSizeIterator<Item = &'a wire::Extent> + Clone,
        payload: Vec<u8>,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        let volume_blocks = self.volume_size / u64::from(self.block_size);
        let count = extents.len();
        if let Err(e) = check_extents(extents.clone(), &payload, self.block_size, volume_blocks) {
            let kind = match e {
                ExtentError::OutOfRange { .. } => StoreErrorKind::OutOfRange,
                ExtentError::Checksum { .. } => StoreErrorKind::Checksum,
                _ => StoreErrorKind::Invalid,
            };
            return (
                Err(StoreError::new(
                    kind,
                    format!("snapshot {}: {e}", self.snap_id),
                )),
                payload,
            );
        }
        if let Err(e) = self
            .volume
            .check_generation(self.generation)
            .and_then(|()| self.check_current())
        {
            return (Err(e), payload);
        }
        if self.extents.len() as u64 + count as u64 > SNAPSHOT_EXTENTS_MAX {
            let e = StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "snapshot {} exceeds {SNAPSHOT_EXTENTS_MAX} extents",
                    self.snap_id
                ),
            );
            return (Err(e), payload);
        }
        let data_max_bytes = snapshot_data_max_bytes(self.volume_size);
        if self.data_bytes + payload.len() as u64 > data_max_bytes {
            let e = StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "snapshot {} exceeds {data_max_bytes} bytes of data (four times the volume size plus slack)",
                    self.snap_id
                ),
            );
            return (Err(e), payload);
        }
        let Some(sink) = self.sink.as_mut() else {
            return (
                Err(StoreError::new(
                    StoreErrorKind::NoUpload,
                    "upload already finished",
                )),
                payload,
            );
        };
        let mut hdr = std::mem::take(&mut self.hdr_buf);
        format::encode_batch_into(
            &mut hdr,
            extents
                .clone()
                .map(|e| (e.lba(), e.nblocks(), e.crc32c(), e.kind().0)),
            payload.len() as u32,
            self.batch_seq,
        );
        let hdr_len = hdr.len() as u64;
        let (res, hdr) = sink.write(hdr, self.write_off, &self.tmp_path).await;
        self.hdr_buf = hdr;
        if let Err(e) = res {
            return (Err(e), payload);
        }
        let data_off = self.write_off + hdr_len;
        let payload_len = payload.len() as u64;
        let (res, payload) = if payload.is_empty() {
            (Ok(()), payload)
        } else {
            sink.write(payload, data_off, &self.tmp_path).await
        };
        if let Err(e) = res {
            return (Err(e), payload);
        }
        let mut off = data_off;
        for e in extents {
            let is_data = e.kind() == wire::ExtentKind::Data;
            self.extents.push(SegExtent {
                lba: e.lba(),
                nblocks: e.nblocks(),
                kind: if is_data { KIND_DATA } else { KIND_ZERO },
                crc32c: e.crc32c(),
                offset: if is_data { off } else { 0 },
            });
            if is_data {
                off += u64::from(e.nblocks()) * u64::from(self.block_size);
            }
        }
        self.data_bytes += payload_len;
        self.write_off = data_off + payload_len;
        self.batch_seq += 1;
        (Ok(()), payload)
    }

    /// Makes the snapshot durable and visible: footer, fsync, rename, fsync dir, then the
    /// manifest naming it (atomically replaced). Checks the client's counts first.
    pub async fn commit(
        mut self,
        extent_count: u64,
        total_bytes: u64,
    ) -> Result<SnapEntry, StoreError> {
        self.volume.check_generation(self.generation)?;
        self.check_current()?;
        if extent_count != self.extents.len() as u64 || total_bytes != self.data_bytes {
            return Err(StoreError::new(
                StoreErrorKind::CommitMismatch,
                format!(
                    "commit of snapshot {} says {extent_count} extents / {total_bytes} bytes, the server received {} / {}",
                    self.snap_id,
                    self.extents.len(),
                    self.data_bytes
                ),
            ));
        }
        let sink = self
            .sink
            .take()
            .ok_or_else(|| StoreError::new(StoreErrorKind::NoUpload, "upload already finished"))?;
        // From here on no new upload may supersede this one.
        self.volume.upload.set(Some(ActiveUpload {
            epoch: self.epoch,
            snap_id: self.snap_id,
            generation: self.generation,
            committing: true,
        }));
        let footer = format::encode_segment_footer(
            &self.volume_id,
            &format::FooterMeta {
                snap_id: self.snap_id,
                parent_id: self.parent_id,
                block_size: self.block_size,
                volume_size: self.volume_size,
                generation: self.generation,
                data_bytes: self.data_bytes,
            },
            &self.extents,
        );
        let trailer = format::encode_segment_trailer(self.write_off, &footer);
        let mut tail = footer;
        tail.extend_from_slice(&trailer);
        let ready = match sink {
            Sink::File(file) => {
                let (res, _) = file.write_all_at(tail, self.write_off).await;
                res.map_err(io_at("write", &self.tmp_path))?;
                file.sync_all()
                    .await
                    .map_err(io_at("fsync", &self.tmp_path))?;
                file.close().await.map_err(io_at("close", &self.tmp_path))?;
                let dir = self.volume.dir.clone();
                let final_path = dir.join(segment_name(self.snap_id));
                tokio_uring::fs::rename(&self.tmp_path, &final_path)
                    .await
                    .map_err(io_at("rename", &self.tmp_path))?;
                Ready::File { dir, final_path }
            }
            Sink::Object(mut sink) => {
                sink.append(&tail).await?;
                let key = sink.key.clone();
                let obj = Arc::clone(&sink.obj);
                sink.finish().await?;
                Ready::Object { obj, key }
            }
        };
        self.finished = true;
        // On error the segment stays: whether the manifest naming it reached the store is
        // unknown here; local: the next load removes it if no manifest names it; object: it
        // is garbage that `deltavol-dataplane gc` removes.
        let result = self.publish(ready).await;
        self.release();
        result
    }

    async fn publish(&mut self, ready: Ready) -> Result<SnapEntry, StoreError> {
        let src = match &ready {
            Ready::File { dir, final_path } => {
                sync_dir(dir).await?;
                let std_file =
                    std::fs::File::open(final_path).map_err(io_at("open", final_path))?;
                SegSrc::File(tokio_uring::fs::File::from_std(std_file))
            }
            Ready::Object { obj, key } => SegSrc::Object {
                obj: Arc::clone(obj),
                key: key.clone(),
            },
        };
        let volume = Rc::clone(&self.volume);
        let _guard = volume.meta_lock.lock().await;
        if let Err(e) = volume.check_damaged() {
            // Deleted (or found damaged) while this upload was finishing: publish nothing.
            ready.remove();
            return Err(e);
        }
        let entry = SnapEntry {
            snap_id: self.snap_id,
            parent_id: self.parent_id,
            commit_time_ms: now_ms(),
            bytes: self.data_bytes,
            extent_count: self.extents.len() as u64,
            volume_size: self.volume_size,
            generation: self.generation,
            segments: vec![self.snap_id],
            cut_time_ms: self.cut_time_ms,
            pinned: false,
            label: String::new(),
        };
        let (new_manifest, mut tags) = {
            let st = volume.state.borrow();
            let mut nm = st.manifest.clone();
            if self.generation < nm.generation {
                // Fenced while committing: no manifest names this segment, remove it now.
                ready.remove();
                return Err(stale_generation(
                    &volume.name,
                    nm.generation,
                    self.generation,
                ));
            }
            let head = nm.snapshots.last().map_or(0, |s| s.snap_id);
            if head != self.parent_id {
                return Err(StoreError::new(
                    StoreErrorKind::BadParent,
                    format!(
                        "chain head moved to {head} during the upload of snapshot {}",
                        self.snap_id
                    ),
                ));
            }
            nm.snapshots.push(entry.clone());
            nm.sequence += 1;
            nm.generation = nm.generation.max(self.generation);
            (nm, st.tags.clone())
        };
        if let Ready::Object { .. } = ready {
            tags.insert(self.snap_id, self.tag);
        }
        volume.write_manifest(&new_manifest, &tags).await?;
        let extents = std::mem::take(&mut self.extents);
        let mut layer = Layer::new();
        add_segment(&mut layer, self.snap_id, &extents);
        let seg = Segment {
            snap_id: self.snap_id,
            src,
            extents,
        };
        let mut st = volume.state.borrow_mut();
        st.tags = tags;
        st.segments.insert(self.snap_id, Rc::new(seg));
        st.layers.push(Rc::new(layer));
        st.manifest = new_manifest;
        tracing::info!(volume = %volume.name, snap_id = entry.snap_id, bytes = entry.bytes, extents = entry.extent_count, "snapshot committed");
        Ok(entry)
    }
}

impl Upload {
    /// Fails when a newer upload superseded this one.
    fn check_current(&self) -> Result<(), StoreError> {
        match self.volume.upload.get() {
            Some(a) if a.epoch == self.epoch => Ok(()),
            _ => Err(StoreError::new(
                StoreErrorKind::UploadInProgress,
                format!(
                    "the upload of snapshot {} was superseded by a newer upload to volume {}",
                    self.snap_id, self.volume.name
                ),
            )),
        }
    }

    /// Clears the volume's upload slot if it is still this upload's.
    fn release(&self) {
        if self
            .volume
            .upload
            .get()
            .is_some_and(|a| a.epoch == self.epoch)
        {
            self.volume.upload.set(None);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.release();
        if !self.finished && matches!(self.volume.backend, Backend::Local { .. }) {
            // Best effort: a leftover temp file is also removed at the next load. (An object
            // upload's multipart upload is aborted by its sink's drop.)
            let _ = std::fs::remove_file(&self.tmp_path);
            tracing::info!(volume = %self.volume.name, snap_id = self.snap_id, "upload abandoned");
        }
    }
}

/// A committed-to-storage segment waiting for its manifest.
enum Ready {
    File { dir: PathBuf, final_path: PathBuf },
    Object { obj: Arc<ObjBackend>, key: ObjPath },
}

impl Ready {
    /// Removes a segment no manifest will name (best effort).
    fn remove(&self) {
        match self {
            Ready::File { final_path, .. } => {
                let _ = std::fs::remove_file(final_path);
            }
            Ready::Object { obj, key } => obj.delete_detached(key.clone()),
        }
    }
}

/// Where an upload's (or a compaction's) segment bytes go.
#[derive(Debug)]
pub(super) enum Sink {
    File(tokio_uring::fs::File),
    Object(ObjSink),
}

impl Sink {
    /// Writes `buf` at `off` (the object sink only appends: segments are written in order).
    pub(super) async fn write(
        &mut self,
        buf: Vec<u8>,
        off: u64,
        path: &Path,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        match self {
            Sink::File(f) => {
                let (res, buf) = f.write_all_at(buf, off).await;
                (res.map_err(io_at("write", path)), buf)
            }
            Sink::Object(o) => {
                let res = o.append(&buf).await;
                (res, buf)
            }
        }
    }
}

/// A segment object being uploaded: bytes gather in one part buffer of
/// [`backend::PART_BYTES`]; each full part goes out as a multipart-upload part. A segment that
/// fits in one part is written with a single put at the end. Dropped unfinished, the multipart
/// upload is aborted.
pub(super) struct ObjSink {
    pub(super) obj: Arc<ObjBackend>,
    pub(super) key: ObjPath,
    part: Vec<u8>,
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    parts: u64,
}

impl std::fmt::Debug for ObjSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjSink")
            .field("key", &self.key)
            .field("parts", &self.parts)
            .finish()
    }
}

impl ObjSink {
    pub(super) fn new(obj: Arc<ObjBackend>, key: ObjPath) -> ObjSink {
        ObjSink {
            obj,
            key,
            part: Vec::new(),
            upload: None,
            parts: 0,
        }
    }

    pub(super) async fn append(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            if self.part.capacity() == 0 {
                self.part.reserve_exact(backend::PART_BYTES);
            }
            let n = (backend::PART_BYTES - self.part.len()).min(bytes.len());
            self.part.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.part.len() == backend::PART_BYTES {
                self.flush_part().await?;
            }
        }
        Ok(())
    }

    async fn flush_part(&mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            self.upload = Some(self.obj.start_multipart(&self.key).await?);
        }
        let data = std::mem::take(&mut self.part);
        let fut = self
            .upload
            .as_mut()
            .expect("multipart upload started above")
            .put_part(object_store::PutPayload::from(data));
        self.obj.run(fut).await?.map_err(|e| {
            StoreError::io(
                format!("upload part {} of {}", self.parts + 1, self.key),
                io::Error::other(e),
            )
        })?;
        self.parts += 1;
        Ok(())
    }

    /// Completes the object: durable in the store when this returns.
    pub(super) async fn finish(mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            let data = std::mem::take(&mut self.part);
            return self.obj.put(&self.key, data).await;
        }
        if !self.part.is_empty() {
            self.flush_part().await?;
        }
        let mut up = self.upload.take().expect("multipart upload started");
        let res = self
            .obj
            .run(async move {
                let r = up.complete().await;
                if r.is_err() {
                    let _ = up.abort().await;
                }
                r
            })
            .await?;
        res.map(|_| ()).map_err(|e| {
            StoreError::io(
                format!("complete the upload of {}", self.key),
                io::Error::other(e),
            )
        })
    }
}

impl Drop for ObjSink {
    fn drop(&mut self) {
        if let Some(mut up) = self.upload.take() {
            let key = self.key.clone();
            self.obj.spawn_detached(async move {
                if let Err(e) = up.abort().await {
                    tracing::warn!(key = %key, error = %e, "aborting an abandoned multipart upload failed");
                }
            });
        }
    }
}
