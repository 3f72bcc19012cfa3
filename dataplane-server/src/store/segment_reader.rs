//! Segments for reading: opening one (a local file, or an object with ranged GETs) with its
//! header, trailer and footer checked, the footer's extents kept as the in-memory index
//! cache, and reading one record with its crc32c checked.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use tokio_uring::buf::BoundedBuf;

use super::backend::{self, Backend, ObjBackend};
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::{self, ManifestData, SegExtent, VolumeId};
use super::local::segment_name;

/// Where a segment's bytes are read from.
#[derive(Debug)]
pub(super) enum SegSrc {
    File(tokio_uring::fs::File),
    /// An object read with ranged GETs.
    Object {
        obj: Arc<ObjBackend>,
        key: ObjPath,
    },
}

/// One immutable segment (a file or an object), open for reads, with its footer's extents
/// (the in-memory index cache: footers are fetched once, when the volume loads).
#[derive(Debug)]
pub struct Segment {
    pub snap_id: u64,
    pub(super) src: SegSrc,
    pub extents: Vec<SegExtent>,
}

impl Segment {
    /// Reads record `rec`'s whole data into `buf` and checks its crc32c.
    pub async fn read_record(
        &self,
        rec: u32,
        block_size: u32,
        buf: Vec<u8>,
    ) -> (Result<(), StoreError>, Vec<u8>) {
        let Some(e) = self.extents.get(rec as usize).copied() else {
            let err = StoreError::new(
                StoreErrorKind::Corrupt,
                format!("segment {}: no record {rec}", self.snap_id),
            );
            return (Err(err), buf);
        };
        let len = u64::from(e.nblocks) * u64::from(block_size);
        let mut buf = buf;
        buf.clear();
        buf.reserve(len as usize);
        let buf = match &self.src {
            SegSrc::File(file) => {
                let (res, slice) = file
                    .read_exact_at(buf.slice(0..len as usize), e.offset)
                    .await;
                let buf = slice.into_inner();
                if let Err(err) = res {
                    return (
                        Err(StoreError::io(
                            format!("read segment {} at offset {}", self.snap_id, e.offset),
                            err,
                        )),
                        buf,
                    );
                }
                buf
            }
            SegSrc::Object { obj, key } => {
                match obj.get_range_cached(key, e.offset..e.offset + len).await {
                    Ok(b) => {
                        buf.extend_from_slice(&b);
                        buf
                    }
                    Err(err) => return (Err(err), buf),
                }
            }
        };
        let crc = crc32c::crc32c(&buf);
        if crc != e.crc32c {
            let err = StoreError::new(
                StoreErrorKind::Checksum,
                format!(
                    "segment {}: extent at lba {} fails its crc32c on disk",
                    self.snap_id, e.lba
                ),
            );
            return (Err(err), buf);
        }
        (Ok(()), buf)
    }
}

/// Opens segment `id` of volume `name` in whichever backend holds it.
pub(super) async fn open_segment_any(
    backend: &Backend,
    name: &str,
    m: &ManifestData,
    tags: &HashMap<u64, u128>,
    id: u64,
) -> Result<Segment, StoreError> {
    match backend {
        Backend::Local { volumes_dir } => {
            open_segment(&volumes_dir.join(name), &m.volume_id, id, m.block_size)
        }
        Backend::Object(obj) => {
            let tag = tags.get(&id).copied().ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("segment {id}: the manifest has no object tag for it"),
                )
            })?;
            let key = obj.key(&backend::segment_rel(name, id, tag));
            open_segment_obj(obj, key, &m.volume_id, id, m.block_size).await
        }
    }
}

/// Segment opens kept in flight by [`open_segments`] (object store: each is a HEAD and two
/// ranged GETs).
const SEGMENT_OPENS_IN_FLIGHT: usize = 16;

/// Opens segments `ids` of volume `name` ([`open_segment_any`]), several at once; each id
/// with its outcome, in the order given.
pub(super) async fn open_segments(
    backend: &Backend,
    name: &str,
    m: &ManifestData,
    tags: &HashMap<u64, u128>,
    ids: impl IntoIterator<Item = u64>,
) -> Vec<(u64, Result<Segment, StoreError>)> {
    use futures::StreamExt;
    futures::stream::iter(ids)
        .map(|id| async move { (id, open_segment_any(backend, name, m, tags, id).await) })
        .buffered(SEGMENT_OPENS_IN_FLIGHT)
        .collect()
        .await
}

/// Object backend: reads a segment's header, trailer and footer with ranged GETs.
pub async fn open_segment_obj(
    obj: &Arc<ObjBackend>,
    key: ObjPath,
    volume_id: &VolumeId,
    snap_id: u64,
    block_size: u32,
) -> Result<Segment, StoreError> {
    let meta = obj.head(&key).await?.ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: object {key} is missing"),
        )
    })?;
    let len = meta.size;
    let min = (format::SEGMENT_HEADER_BYTES + format::SEGMENT_TRAILER_BYTES) as u64;
    if len < min {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: object too short ({len} bytes)"),
        ));
    }
    // One GET for the tail (trailer, and the footer when it is small), one for the header.
    let tail_len = len.min(SEGMENT_TAIL_FETCH_BYTES);
    let tail = obj.get_range(&key, len - tail_len..len).await?;
    let header = obj
        .get_range(&key, 0..format::SEGMENT_HEADER_BYTES as u64)
        .await?;
    format::check_segment_header(&header, volume_id, snap_id, block_size)?;
    let trailer = &tail[tail.len() - format::SEGMENT_TRAILER_BYTES..];
    let (off, flen, fcrc) = format::decode_segment_trailer(trailer, snap_id, len)?;
    let footer_in_tail = off >= len - tail_len;
    let fetched;
    let footer: &[u8] = if footer_in_tail {
        let at = (off - (len - tail_len)) as usize;
        &tail[at..at + flen]
    } else {
        fetched = obj.get_range(&key, off..off + flen as u64).await?;
        &fetched
    };
    let decoded = format::decode_segment_footer(footer, fcrc, volume_id, snap_id, off)?;
    if decoded.block_size != block_size {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: block size differs from the volume's"),
        ));
    }
    Ok(Segment {
        snap_id,
        src: SegSrc::Object {
            obj: Arc::clone(obj),
            key,
        },
        extents: decoded.extents,
    })
}

/// How much of a segment object's end is fetched at open (trailer plus, usually, the footer).
pub const SEGMENT_TAIL_FETCH_BYTES: u64 = 256 * 1024;

/// Opens a segment and verifies header, trailer and footer (not the data: reads check it).
fn open_segment(
    dir: &Path,
    volume_id: &VolumeId,
    snap_id: u64,
    block_size: u32,
) -> Result<Segment, StoreError> {
    let path = dir.join(segment_name(snap_id));
    let f = std::fs::File::open(&path).map_err(io_at("open", &path))?;
    let len = f.metadata().map_err(io_at("stat", &path))?.len();
    let min = (format::SEGMENT_HEADER_BYTES + format::SEGMENT_TRAILER_BYTES) as u64;
    if len < min {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: file too short ({len} bytes)"),
        ));
    }
    let mut header = [0u8; format::SEGMENT_HEADER_BYTES];
    f.read_exact_at(&mut header, 0)
        .map_err(io_at("read", &path))?;
    format::check_segment_header(&header, volume_id, snap_id, block_size)?;
    let mut trailer = [0u8; format::SEGMENT_TRAILER_BYTES];
    f.read_exact_at(&mut trailer, len - format::SEGMENT_TRAILER_BYTES as u64)
        .map_err(io_at("read", &path))?;
    let (off, flen, fcrc) = format::decode_segment_trailer(&trailer, snap_id, len)?;
    let mut footer = vec![0u8; flen];
    f.read_exact_at(&mut footer, off)
        .map_err(io_at("read", &path))?;
    let decoded = format::decode_segment_footer(&footer, fcrc, volume_id, snap_id, off)?;
    if decoded.block_size != block_size {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("segment {snap_id}: block size differs from the volume's"),
        ));
    }
    Ok(Segment {
        snap_id,
        src: SegSrc::File(tokio_uring::fs::File::from_std(f)),
        extents: decoded.extents,
    })
}
