//! deltavol's flatbuffers schemas and the data-plane frame codec.
//!
//! * [`wire`]: the protocol between the compute daemon and the data plane (`wire.fbs`).
//! * [`store`]: the data plane's on-disk segment index footer and manifest (`store.fbs`).
//! * The frame codec: a frame is `u32 LE header_len | flatbuffer header | raw payload`. The
//!   header (a [`wire::Frame`]) names the message and the payload length; bulk data is the raw
//!   payload, never a flatbuffers vector.
//!
//! Invariants: nothing read from the network or a disk is used before [`decode_header`] (or
//! [`verify_manifest`] / [`verify_segment_index`]) ran the flatbuffers verifier on it with the
//! explicit limits below; every length is checked against a named cap before a buffer is sized
//! from it.
//!
//! The generated code under `src/generated/` is committed; `regen.sh` regenerates it and the
//! test `generated_code_is_fresh` fails when it is stale.

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    unused_imports,
    dead_code,
    deprecated,
    non_camel_case_types,
    non_snake_case,
    mismatched_lifetime_syntaxes
)]
#[rustfmt::skip]
mod generated_wire {
    include!("generated/wire_generated.rs");
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    unused_imports,
    dead_code,
    deprecated,
    non_camel_case_types,
    non_snake_case,
    mismatched_lifetime_syntaxes
)]
#[rustfmt::skip]
mod generated_store {
    include!("generated/store_generated.rs");
}

pub use flatbuffers;
/// The data plane's storage formats (`store.fbs`).
pub use generated_store::deltavol::store;
/// The wire protocol (`wire.fbs`).
pub use generated_wire::deltavol::wire;

use flatbuffers::{
    FlatBufferBuilder, InvalidFlatbuffer, UnionWIPOffset, VerifierOptions, WIPOffset,
};

/// Version of the protocol spoken in `Hello` / `Challenge`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes of the little-endian header length that starts every frame.
pub const FRAME_LEN_PREFIX_BYTES: usize = 4;
/// Smallest possible flatbuffer header (root offset + file identifier).
pub const FRAME_HEADER_MIN_BYTES: usize = 8;
/// Cap on a frame's flatbuffer header.
pub const FRAME_HEADER_MAX_BYTES: usize = 64 * 1024;
/// Cap on a frame's raw payload.
pub const FRAME_PAYLOAD_MAX_BYTES: usize = 1024 * 1024;
/// Cap on the extents one frame may describe (24 bytes each: well inside the header cap).
pub const FRAME_EXTENTS_MAX: usize = 2048;
/// Cap on snapshots in one `SnapshotList` page (keeps the answer inside the header cap).
pub const LIST_PAGE_SNAPSHOTS_MAX: u32 = 256;
/// Bytes of the auth challenge nonce.
pub const AUTH_NONCE_BYTES: usize = 32;
/// Bytes of the HMAC-SHA256 auth answer.
pub const AUTH_MAC_BYTES: usize = 32;
/// Cap on a volume name.
pub const VOLUME_NAME_MAX_BYTES: usize = 64;
/// Cap on an error message carried in an `Error` frame.
pub const ERROR_MESSAGE_MAX_BYTES: usize = 1024;

/// How much larger than its bytes a flatbuffer may look to the verifier. The verifier counts
/// every table with its vtable, but a builder shares one vtable among all tables of the same
/// shape, so a canonical buffer of many small tables (a long chain of snapshots with mostly
/// default fields) looks several times its size: 2× refused such a manifest. The limit only
/// bounds verification work against buffers whose offsets alias (a DAG read as a tree), and
/// stays linear in the bytes.
pub const APPARENT_SIZE_FACTOR: usize = 64;

/// Verifier limits for frame headers.
pub fn wire_verifier_options() -> VerifierOptions {
    VerifierOptions {
        max_depth: 8,
        max_tables: 4 * 1024,
        max_apparent_size: APPARENT_SIZE_FACTOR * FRAME_HEADER_MAX_BYTES,
        ignore_missing_null_terminator: false,
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum FrameError {
    #[error(
        "frame header length {len_bytes} bytes is too small (minimum {FRAME_HEADER_MIN_BYTES})"
    )]
    HeaderTooSmall { len_bytes: usize },
    #[error("frame header length {len_bytes} bytes exceeds the cap of {FRAME_HEADER_MAX_BYTES}")]
    HeaderTooLarge { len_bytes: usize },
    #[error("frame payload length {len_bytes} bytes exceeds the cap of {FRAME_PAYLOAD_MAX_BYTES}")]
    PayloadTooLarge { len_bytes: usize },
    #[error("truncated frame: {needed_bytes} bytes needed, {available_bytes} available")]
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    #[error("frame header is not a valid flatbuffer: {0}")]
    Invalid(#[from] InvalidFlatbuffer),
    #[error("frame header lacks the DVW1 file identifier")]
    BadIdentifier,
    #[error("frame header carries no message")]
    MissingBody,
    #[error("frame carries message type {0}, unknown to this version")]
    UnknownMessage(u8),
}

/// Why the extents of a frame were refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentError {
    #[error("{count} extents in one frame exceed the cap of {FRAME_EXTENTS_MAX}")]
    TooMany { count: usize },
    #[error("extent at lba {lba} has zero blocks")]
    Empty { lba: u64 },
    #[error("extent at lba {lba} has unknown kind {kind}")]
    UnknownKind { lba: u64, kind: u8 },
    #[error("extent lba {lba} + {nblocks} blocks is past the end of the volume ({volume_blocks} blocks)")]
    OutOfRange {
        lba: u64,
        nblocks: u64,
        volume_blocks: u64,
    },
    #[error(
        "extents describe {described_bytes} payload bytes but the frame carries {payload_bytes}"
    )]
    PayloadMismatch {
        described_bytes: u64,
        payload_bytes: u64,
    },
    #[error("crc32c mismatch for extent at lba {lba}: header says {expected:#010x}, data has {actual:#010x}")]
    Checksum {
        lba: u64,
        expected: u32,
        actual: u32,
    },
    #[error("zero extent at lba {lba} carries a non-zero crc32c")]
    ZeroWithCrc { lba: u64 },
    #[error("extent at lba {lba} of {nblocks} blocks does not fit one frame payload")]
    TooLong { lba: u64, nblocks: u64 },
}

/// Parses the 4-byte length prefix and checks it against the header caps.
pub fn header_len_from_prefix(prefix: [u8; FRAME_LEN_PREFIX_BYTES]) -> Result<usize, FrameError> {
    let len_bytes = u32::from_le_bytes(prefix) as usize;
    if len_bytes < FRAME_HEADER_MIN_BYTES {
        return Err(FrameError::HeaderTooSmall { len_bytes });
    }
    if len_bytes > FRAME_HEADER_MAX_BYTES {
        return Err(FrameError::HeaderTooLarge { len_bytes });
    }
    Ok(len_bytes)
}

/// Verifies a frame header (exactly the `header_len` bytes after the prefix) and returns it.
/// The payload length it announces is checked against [`FRAME_PAYLOAD_MAX_BYTES`].
pub fn decode_header(header: &[u8]) -> Result<wire::Frame<'_>, FrameError> {
    if header.len() < FRAME_HEADER_MIN_BYTES {
        return Err(FrameError::HeaderTooSmall {
            len_bytes: header.len(),
        });
    }
    if header.len() > FRAME_HEADER_MAX_BYTES {
        return Err(FrameError::HeaderTooLarge {
            len_bytes: header.len(),
        });
    }
    if !wire::frame_buffer_has_identifier(header) {
        return Err(FrameError::BadIdentifier);
    }
    let frame = wire::root_as_frame_with_opts(&wire_verifier_options(), header)?;
    let payload_len = frame.payload_len() as usize;
    if payload_len > FRAME_PAYLOAD_MAX_BYTES {
        return Err(FrameError::PayloadTooLarge {
            len_bytes: payload_len,
        });
    }
    if frame.body_type() == wire::Message::NONE {
        return Err(FrameError::MissingBody);
    }
    if frame.body_type().variant_name().is_none() {
        return Err(FrameError::UnknownMessage(frame.body_type().0));
    }
    // A known member whose table is absent.
    if frame.body().is_none() {
        return Err(FrameError::MissingBody);
    }
    Ok(frame)
}

/// A frame decoded from a contiguous buffer.
#[derive(Debug, Clone, Copy)]
pub struct DecodedFrame<'a> {
    pub header: wire::Frame<'a>,
    pub payload: &'a [u8],
    /// Bytes of `buf` the frame took (prefix + header + payload).
    pub frame_bytes: usize,
}

/// Decodes one whole frame from the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<DecodedFrame<'_>, FrameError> {
    let prefix: [u8; FRAME_LEN_PREFIX_BYTES] = match buf.get(..FRAME_LEN_PREFIX_BYTES) {
        Some(p) => [p[0], p[1], p[2], p[3]],
        None => {
            return Err(FrameError::Truncated {
                needed_bytes: FRAME_LEN_PREFIX_BYTES,
                available_bytes: buf.len(),
            })
        }
    };
    let header_len = header_len_from_prefix(prefix)?;
    let header_end = FRAME_LEN_PREFIX_BYTES + header_len;
    let header_bytes =
        buf.get(FRAME_LEN_PREFIX_BYTES..header_end)
            .ok_or(FrameError::Truncated {
                needed_bytes: header_end,
                available_bytes: buf.len(),
            })?;
    let header = decode_header(header_bytes)?;
    let frame_end = header_end + header.payload_len() as usize;
    let payload = buf
        .get(header_end..frame_end)
        .ok_or(FrameError::Truncated {
            needed_bytes: frame_end,
            available_bytes: buf.len(),
        })?;
    Ok(DecodedFrame {
        header,
        payload,
        frame_bytes: frame_end,
    })
}

/// Finishes a frame header in `fbb` around an already built message body and returns the
/// header bytes (without the length prefix).
pub fn finish_header<'b>(
    fbb: &'b mut FlatBufferBuilder<'_>,
    body_type: wire::Message,
    body: WIPOffset<UnionWIPOffset>,
    payload_len_bytes: usize,
) -> Result<&'b [u8], FrameError> {
    if payload_len_bytes > FRAME_PAYLOAD_MAX_BYTES {
        return Err(FrameError::PayloadTooLarge {
            len_bytes: payload_len_bytes,
        });
    }
    let root = wire::Frame::create(
        fbb,
        &wire::FrameArgs {
            body_type,
            body: Some(body),
            payload_len: payload_len_bytes as u32,
        },
    );
    wire::finish_frame_buffer(fbb, root);
    let header = fbb.finished_data();
    if header.len() > FRAME_HEADER_MAX_BYTES {
        return Err(FrameError::HeaderTooLarge {
            len_bytes: header.len(),
        });
    }
    Ok(header)
}

/// Appends `prefix | header | payload` to `out`. The header must come from [`finish_header`].
pub fn append_frame(out: &mut Vec<u8>, header: &[u8], payload: &[u8]) -> Result<(), FrameError> {
    if header.len() > FRAME_HEADER_MAX_BYTES {
        return Err(FrameError::HeaderTooLarge {
            len_bytes: header.len(),
        });
    }
    if payload.len() > FRAME_PAYLOAD_MAX_BYTES {
        return Err(FrameError::PayloadTooLarge {
            len_bytes: payload.len(),
        });
    }
    out.reserve(FRAME_LEN_PREFIX_BYTES + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    Ok(())
}

/// Bytes of an extent of `nblocks` blocks, or `None` on overflow.
pub fn extent_bytes(nblocks: u64, block_size: u32) -> Option<u64> {
    nblocks.checked_mul(u64::from(block_size))
}

/// Checks the extents a frame describes against its payload and the volume:
/// count cap, non-empty, known kind, inside the volume, data lengths adding up to the payload,
/// and each data extent's crc32c. Returns the data bytes described.
pub fn check_extents<'a>(
    extents: impl ExactSizeIterator<Item = &'a wire::Extent>,
    payload: &[u8],
    block_size: u32,
    volume_blocks: u64,
) -> Result<u64, ExtentError> {
    check_extents_with(
        extents,
        payload.len() as u64,
        block_size,
        volume_blocks,
        |e, offset, len| {
            let actual = crc32c::crc32c(&payload[offset as usize..(offset + len) as usize]);
            if actual == e.crc32c() {
                Ok(())
            } else {
                Err(ExtentError::Checksum {
                    lba: e.lba(),
                    expected: e.crc32c(),
                    actual,
                })
            }
        },
    )
}

/// [`check_extents`] without the checksums, for a payload of `payload_bytes` not read yet (a
/// receiver that reads each data extent straight into its place checks its crc32c there).
pub fn check_extent_layout<'a>(
    extents: impl ExactSizeIterator<Item = &'a wire::Extent>,
    payload_bytes: u64,
    block_size: u32,
    volume_blocks: u64,
) -> Result<u64, ExtentError> {
    check_extents_with(
        extents,
        payload_bytes,
        block_size,
        volume_blocks,
        |_, _, _| Ok(()),
    )
}

fn check_extents_with<'a>(
    extents: impl ExactSizeIterator<Item = &'a wire::Extent>,
    payload_bytes: u64,
    block_size: u32,
    volume_blocks: u64,
    mut data: impl FnMut(&wire::Extent, u64, u64) -> Result<(), ExtentError>,
) -> Result<u64, ExtentError> {
    if extents.len() > FRAME_EXTENTS_MAX {
        return Err(ExtentError::TooMany {
            count: extents.len(),
        });
    }
    let mut offset: u64 = 0;
    for e in extents {
        let lba = e.lba();
        let nblocks = u64::from(e.nblocks());
        if nblocks == 0 {
            return Err(ExtentError::Empty { lba });
        }
        match lba.checked_add(nblocks) {
            Some(end) if end <= volume_blocks => {}
            _ => {
                return Err(ExtentError::OutOfRange {
                    lba,
                    nblocks,
                    volume_blocks,
                })
            }
        }
        match e.kind() {
            wire::ExtentKind::Zero => {
                if e.crc32c() != 0 {
                    return Err(ExtentError::ZeroWithCrc { lba });
                }
            }
            wire::ExtentKind::Data => {
                let len = extent_bytes(nblocks, block_size)
                    .filter(|len| *len <= FRAME_PAYLOAD_MAX_BYTES as u64)
                    .ok_or(ExtentError::TooLong { lba, nblocks })?;
                let end = offset + len;
                if end > payload_bytes {
                    return Err(ExtentError::PayloadMismatch {
                        described_bytes: end,
                        payload_bytes,
                    });
                }
                data(e, offset, len)?;
                offset = end;
            }
            other => return Err(ExtentError::UnknownKind { lba, kind: other.0 }),
        }
    }
    if offset != payload_bytes {
        return Err(ExtentError::PayloadMismatch {
            described_bytes: offset,
            payload_bytes,
        });
    }
    Ok(offset)
}

/// Most blocks one `ReadChecksums` may ask for (its answer, 4 bytes a block, fits a frame
/// header).
pub const CHECKSUM_BLOCKS_MAX: u64 = 8192;

/// Cap on a volume's heat map (`PutHeat`, `Heat`): one byte per region, so a 16 TiB volume of
/// 4 KiB blocks fits it with regions of 1024 blocks (4 MiB). The map crosses the wire in
/// payload pieces of at most [`FRAME_PAYLOAD_MAX_BYTES`].
pub const HEAT_BYTES_MAX: usize = 4 << 20;

/// Bytes of a volume id (random at a volume's creation, never reused).
pub const VOLUME_ID_BYTES: usize = 16;

/// A volume id field of a message: `Ok(None)` when absent or empty, `Err` with the length
/// when it is not [`VOLUME_ID_BYTES`] long (network input: refused, never truncated).
pub fn volume_id_field(
    v: Option<flatbuffers::Vector<'_, u8>>,
) -> Result<Option<[u8; VOLUME_ID_BYTES]>, usize> {
    match v.map(|v| v.bytes()) {
        None => Ok(None),
        Some([]) => Ok(None),
        Some(b) => b.try_into().map(Some).map_err(|_| b.len()),
    }
}

/// Lower-case hex of a volume id, as the CLI and errors print it.
pub fn volume_id_hex(id: &[u8; VOLUME_ID_BYTES]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`volume_id_hex`]'s form (32 hex digits).
pub fn parse_volume_id_hex(s: &str) -> Option<[u8; VOLUME_ID_BYTES]> {
    let s = s.trim();
    if s.len() != 2 * VOLUME_ID_BYTES || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; VOLUME_ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// Checks a volume name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= VOLUME_NAME_MAX_BYTES
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Verifier limits for on-disk flatbuffers (manifests and segment footers).
pub fn store_verifier_options(max_bytes: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: 8,
        max_tables: 4 * 1024 * 1024,
        max_apparent_size: max_bytes.saturating_mul(APPARENT_SIZE_FACTOR),
        ignore_missing_null_terminator: false,
    }
}

/// Verifies a manifest body (the flatbuffer inside the manifest envelope).
pub fn verify_manifest(buf: &[u8]) -> Result<store::Manifest<'_>, InvalidFlatbuffer> {
    store::root_as_manifest_with_opts(&store_verifier_options(buf.len()), buf)
}

/// Verifies a segment index footer (the flatbuffer inside the segment trailer envelope).
pub fn verify_segment_index(buf: &[u8]) -> Result<store::SegmentIndex<'_>, InvalidFlatbuffer> {
    flatbuffers::root_with_opts::<store::SegmentIndex>(&store_verifier_options(buf.len()), buf)
}

/// Decodes `data` as a stream of frames, as the server and the client read them, and reads
/// every field of every accepted message. Returns the number of frames accepted before the
/// first refusal (or the end of `data`). Used by the fuzz targets and the property tests: it
/// must never panic, whatever `data` is; it asserts the decoder's own promises (an accepted
/// frame lies inside `data`, its header and payload inside their caps).
#[doc(hidden)]
pub fn fuzz_decode_one(data: &[u8]) -> usize {
    let mut rest = data;
    let mut accepted = 0;
    while !rest.is_empty() {
        // The server's path: the prefix alone, then exactly the header it announces.
        if let Some(p) = rest.get(..FRAME_LEN_PREFIX_BYTES) {
            if let Ok(len) = header_len_from_prefix([p[0], p[1], p[2], p[3]]) {
                assert!((FRAME_HEADER_MIN_BYTES..=FRAME_HEADER_MAX_BYTES).contains(&len));
                if let Some(h) = rest.get(FRAME_LEN_PREFIX_BYTES..FRAME_LEN_PREFIX_BYTES + len) {
                    if let Ok(f) = decode_header(h) {
                        assert!(f.payload_len() as usize <= FRAME_PAYLOAD_MAX_BYTES);
                    }
                }
            }
        }
        let Ok(frame) = decode_frame(rest) else {
            break;
        };
        assert!(frame.frame_bytes <= rest.len());
        assert_eq!(frame.payload.len(), frame.header.payload_len() as usize);
        assert!(frame.payload.len() <= FRAME_PAYLOAD_MAX_BYTES);
        fuzz_read_message(frame.header, frame.payload);
        accepted += 1;
        rest = &rest[frame.frame_bytes..];
    }
    accepted
}

/// Reads every field of a verified frame's message (each union member of `wire::Message`).
fn fuzz_read_message(h: wire::Frame<'_>, payload: &[u8]) {
    use wire::Message as M;
    let mut sink = 0u64;
    let mut str_len = |s: Option<&str>| sink = sink.wrapping_add(s.map_or(0, str::len) as u64);
    match h.body_type() {
        M::Hello => {
            let m = h.body_as_hello().expect("verified Hello");
            str_len(m.client_name());
            let _ = m.protocol_version();
        }
        M::Challenge => {
            let m = h.body_as_challenge().expect("verified Challenge");
            let _ = (m.nonce().map(|n| n.bytes().len()), m.protocol_version());
        }
        M::Auth => {
            let m = h.body_as_auth().expect("verified Auth");
            str_len(m.volume());
            let _ = (m.mac().map(|n| n.bytes().len()), m.generation());
            let _ = volume_id_field(m.volume_id());
            if let Some(v) = m.volume() {
                let _ = valid_volume_name(v);
            }
        }
        M::AuthOk => fuzz_volume_info(h.body_as_auth_ok().expect("verified AuthOk").info()),
        M::CreateVolume => {
            let m = h.body_as_create_volume().expect("verified CreateVolume");
            let _ = (m.size_bytes(), m.block_size());
        }
        M::GetVolumeInfo => {
            let _ = h.body_as_get_volume_info().expect("verified").reserved();
        }
        M::VolumeInfo => fuzz_volume_info(h.body_as_volume_info()),
        M::BeginSnapshot => {
            let m = h.body_as_begin_snapshot().expect("verified BeginSnapshot");
            let _ = (
                m.snap_id(),
                m.parent_id(),
                m.volume_size(),
                m.generation(),
                m.cut_time_ms(),
            );
        }
        M::BeginOk => {
            let _ = h.body_as_begin_ok().expect("verified BeginOk").snap_id();
        }
        M::AlreadyCommitted => {
            fuzz_snapshot_info(h.body_as_already_committed().expect("verified").info())
        }
        M::PutExtents => {
            let m = h.body_as_put_extents().expect("verified PutExtents");
            let _ = m.snap_id();
            if let Some(ex) = m.extents() {
                for e in ex.iter() {
                    let _ = (e.lba(), e.nblocks(), e.crc32c(), e.kind());
                }
                let _ = check_extents(ex.iter(), payload, 512, u64::MAX);
                let _ = check_extents(ex.iter(), payload, 4096, 1 << 20);
                let _ = check_extents(ex.iter(), payload, u32::MAX, u64::MAX);
            }
        }
        M::Commit => {
            let m = h.body_as_commit().expect("verified Commit");
            let _ = (m.snap_id(), m.extent_count(), m.total_bytes());
        }
        M::Committed => fuzz_snapshot_info(h.body_as_committed().expect("verified").info()),
        M::ListSnapshots => {
            let m = h.body_as_list_snapshots().expect("verified ListSnapshots");
            let _ = (m.after_snap_id(), m.max_count());
        }
        M::SnapshotList => {
            let m = h.body_as_snapshot_list().expect("verified SnapshotList");
            for s in m.snapshots().iter().flat_map(|v| v.iter()) {
                fuzz_snapshot_info(Some(s));
            }
            let _ = m.more();
        }
        M::ReadExtents => {
            let m = h.body_as_read_extents().expect("verified ReadExtents");
            let _ = (m.snap_id(), m.lba(), m.nblocks());
            let _ = extent_bytes(m.nblocks(), 4096);
        }
        M::ReadData => {
            let m = h.body_as_read_data().expect("verified ReadData");
            if let Some(ex) = m.extents() {
                let _ = check_extents(ex.iter(), payload, 4096, u64::MAX);
            }
            let _ = (m.snap_id(), m.last());
        }
        M::DeleteSnapshot => {
            let _ = h.body_as_delete_snapshot().expect("verified").snap_id();
        }
        M::Deleted => {
            let m = h.body_as_deleted().expect("verified Deleted");
            let _ = (m.snap_id(), m.merged_into());
        }
        M::Error => {
            let m = h.body_as_error().expect("verified Error");
            str_len(m.message());
            let _ = (m.code(), m.code().variant_name());
        }
        M::NewGeneration => {
            let _ = h.body_as_new_generation().expect("verified").reserved();
        }
        M::CloneVolume => {
            let m = h.body_as_clone_volume().expect("verified CloneVolume");
            str_len(m.source_volume());
            let _ = m.source_snap_id();
            if let Some(v) = m.source_volume() {
                let _ = valid_volume_name(v);
            }
        }
        M::ReadChecksums => {
            let m = h.body_as_read_checksums().expect("verified ReadChecksums");
            let _ = (m.snap_id(), m.lba(), m.nblocks());
        }
        M::Checksums => {
            let m = h.body_as_checksums().expect("verified Checksums");
            let _ = (m.snap_id(), m.lba(), m.crcs().map(|c| c.len()));
        }
        M::DeleteVolume => {
            let m = h.body_as_delete_volume().expect("verified DeleteVolume");
            let _ = volume_id_field(m.volume_id());
        }
        M::SetRetention => {
            let m = h.body_as_set_retention().expect("verified SetRetention");
            fuzz_retention(m.policy());
        }
        M::PinSnapshot => {
            let m = h.body_as_pin_snapshot().expect("verified PinSnapshot");
            str_len(m.label());
            let _ = (m.snap_id(), m.pinned());
        }
        M::Pinned => {
            let m = h.body_as_pinned().expect("verified Pinned");
            fuzz_snapshot_info(m.info());
        }
        M::Prune => {
            let _ = h.body_as_prune().expect("verified Prune").dry_run();
        }
        M::Pruned => {
            let m = h.body_as_pruned().expect("verified Pruned");
            let _ = (
                m.deleted().map(|d| d.iter().sum::<u64>()),
                m.kept().map(|k| k.len()),
                m.dry_run(),
            );
            if let Some(w) = m.kept_for() {
                for s in w.iter() {
                    str_len(Some(s));
                }
            }
        }
        M::PutHeat => {
            let m = h.body_as_put_heat().expect("verified PutHeat");
            let (region, total, offset) = (m.region_blocks(), m.total_bytes(), m.offset());
            let _ = (region.is_power_of_two(), total as usize <= HEAT_BYTES_MAX);
            let _ = u64::from(offset).checked_add(payload.len() as u64);
        }
        M::HeatStored => {
            let m = h.body_as_heat_stored().expect("verified HeatStored");
            let _ = (m.received_bytes(), m.stored());
        }
        M::GetHeat => {
            let _ = h.body_as_get_heat().expect("verified GetHeat").reserved();
        }
        M::Heat => {
            let m = h.body_as_heat().expect("verified Heat");
            let _ = (m.region_blocks(), m.present(), m.total_bytes(), m.last());
            let _ = u64::from(m.offset()).checked_add(payload.len() as u64);
        }
        // `decode_header` refuses NONE and unknown members.
        other => panic!("decode_header accepted message type {}", other.0),
    }
    std::hint::black_box(sink);
}

fn fuzz_volume_info(info: Option<wire::VolumeInfo<'_>>) {
    if let Some(i) = info {
        let _ = (
            i.name().map(str::len),
            i.exists(),
            i.size_bytes(),
            i.block_size(),
            i.latest_snap_id(),
            i.generation(),
            i.snapshot_count(),
            i.clone_source_volume().map(str::len),
            i.clone_source_snap_id(),
            volume_id_field(i.volume_id()),
            i.latest_commit_ms(),
            i.created_ms(),
            i.latest_cut_ms(),
        );
        fuzz_retention(i.retention());
    }
}

fn fuzz_retention(r: Option<wire::Retention<'_>>) {
    if let Some(r) = r {
        let _ = (r.last(), r.hourly(), r.daily(), r.weekly(), r.monthly());
    }
}

fn fuzz_snapshot_info(info: Option<wire::SnapshotInfo<'_>>) {
    if let Some(s) = info {
        let _ = (
            s.snap_id(),
            s.parent_id(),
            s.commit_time_ms(),
            s.bytes(),
            s.extent_count(),
            s.volume_size(),
            s.generation(),
            s.cut_time_ms(),
            s.pinned(),
            s.label().map(str::len),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_frame(extents: &[wire::Extent], payload: &[u8]) -> Vec<u8> {
        let mut fbb = FlatBufferBuilder::new();
        let ex = fbb.create_vector(extents);
        let body = wire::PutExtents::create(
            &mut fbb,
            &wire::PutExtentsArgs {
                snap_id: 7,
                extents: Some(ex),
            },
        );
        let header = finish_header(
            &mut fbb,
            wire::Message::PutExtents,
            body.as_union_value(),
            payload.len(),
        )
        .unwrap();
        let mut out = Vec::new();
        append_frame(&mut out, header, payload).unwrap();
        out
    }

    #[test]
    fn put_extents_round_trip() {
        let data = vec![0xabu8; 1024];
        let extents = [
            wire::Extent::new(8, 2, crc32c::crc32c(&data), wire::ExtentKind::Data),
            wire::Extent::new(100, 50, 0, wire::ExtentKind::Zero),
        ];
        let buf = put_frame(&extents, &data);
        let f = decode_frame(&buf).unwrap();
        assert_eq!(f.frame_bytes, buf.len());
        let put = f.header.body_as_put_extents().unwrap();
        assert_eq!(put.snap_id(), 7);
        let ex = put.extents().unwrap();
        assert_eq!(check_extents(ex.iter(), f.payload, 512, 1000), Ok(1024));
        assert_eq!(
            check_extents(ex.iter(), f.payload, 512, 120),
            Err(ExtentError::OutOfRange {
                lba: 100,
                nblocks: 50,
                volume_blocks: 120
            })
        );
        let mut bad = data.clone();
        bad[3] ^= 1;
        assert!(matches!(
            check_extents(ex.iter(), &bad, 512, 1000),
            Err(ExtentError::Checksum { lba: 8, .. })
        ));
        assert!(matches!(
            check_extents(ex.iter(), &data[..512], 512, 1000),
            Err(ExtentError::PayloadMismatch { .. })
        ));
        // The layout alone (a payload not read yet): everything but the checksums.
        assert_eq!(check_extent_layout(ex.iter(), 1024, 512, 1000), Ok(1024));
        assert!(matches!(
            check_extent_layout(ex.iter(), 512, 512, 1000),
            Err(ExtentError::PayloadMismatch { .. })
        ));
        assert!(matches!(
            check_extent_layout(ex.iter(), 1024, 512, 120),
            Err(ExtentError::OutOfRange { lba: 100, .. })
        ));
    }

    #[test]
    fn caps_are_enforced() {
        let big = ((FRAME_HEADER_MAX_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(
            header_len_from_prefix(big),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        assert!(matches!(
            header_len_from_prefix([1, 0, 0, 0]),
            Err(FrameError::HeaderTooSmall { .. })
        ));
        let buf = put_frame(&[], &[]);
        assert!(matches!(
            decode_frame(&buf[..buf.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        let mut garbage = vec![16u8, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(decode_frame(&garbage).is_err());
    }

    #[test]
    fn volume_ids() {
        let id = [0xabu8; VOLUME_ID_BYTES];
        assert_eq!(parse_volume_id_hex(&volume_id_hex(&id)), Some(id));
        assert_eq!(parse_volume_id_hex("abc"), None);
        assert_eq!(parse_volume_id_hex(&"zz".repeat(16)), None);
    }

    #[test]
    fn volume_names() {
        assert!(valid_volume_name("vol-1.a_b"));
        assert!(!valid_volume_name(""));
        assert!(!valid_volume_name(".."));
        assert!(!valid_volume_name("a/b"));
        assert!(!valid_volume_name(&"x".repeat(65)));
    }
}
