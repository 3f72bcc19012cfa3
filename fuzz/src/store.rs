//! The store-format harness: the data plane's on-disk decoders, fed arbitrary bytes.
//!
//! Input: one mode byte, then the bytes for that decoder.
//!
//! | mode % 4 | bytes | decoder |
//! | --- | --- | --- |
//! | 0 | a whole manifest file | `decode_manifest` |
//! | 1 | footer offset (u64 LE) ‖ a segment footer | `decode_segment_footer` |
//! | 2 | a segment header | `check_segment_header` |
//! | 3 | file length (u64 LE) ‖ a segment trailer | `decode_segment_trailer` |
//!
//! Every record carries a crc32c, which random mutations almost never keep right: the harness
//! recomputes the crcs (and takes the names and ids the decoder checks against from the input
//! itself) so that mutations reach the flatbuffers verifier and the field checks behind it.
//! Beyond "never panics", what the decoders accept is checked: a decoded manifest or footer
//! re-encodes to bytes that decode to the same value; an accepted trailer's footer lies
//! inside the file.

// `crate::store_format` is the data plane's `store/format.rs`: in the fuzz crate compiled from
// the same file (see lib.rs), in the data plane's seed test its public module.
use crate::store_format::{
    check_segment_header, decode_manifest, decode_segment_footer, decode_segment_trailer,
    encode_manifest, encode_segment_footer, encode_segment_trailer, FooterMeta, VolumeId,
    MANIFEST_HEADER_BYTES, SEGMENT_HEADER_BYTES, SEGMENT_TRAILER_BYTES,
};
use deltavol_schemas::{verify_manifest, verify_segment_index};

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Empty input.
    Nothing,
    /// The decoder refused it (with an error, as it must for bad bytes).
    Refused,
    /// The decoder accepted it, and the checks on what it accepted held.
    Decoded,
}

/// Runs one input through the decoder its first byte selects.
pub fn run(data: &[u8]) -> Reached {
    let Some((&mode, body)) = data.split_first() else {
        return Reached::Nothing;
    };
    match mode % 4 {
        0 => manifest(body),
        1 => footer(body),
        2 => header(body),
        _ => trailer(body),
    }
}

fn put_crc(buf: &mut [u8], at: usize, covered: std::ops::Range<usize>) {
    let crc = crc32c::crc32c(&buf[covered]);
    buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn manifest(file: &[u8]) -> Reached {
    let mut buf = file.to_vec();
    if buf.len() >= MANIFEST_HEADER_BYTES {
        let n = buf.len();
        put_crc(&mut buf, 44, MANIFEST_HEADER_BYTES..n);
        put_crc(&mut buf, 60, 0..60);
    }
    // The name the decoder checks the body against: the body's own, when it verifies.
    let name = buf
        .get(MANIFEST_HEADER_BYTES..)
        .and_then(|b| verify_manifest(b).ok())
        .and_then(|m| m.volume_name().map(str::to_string))
        .unwrap_or_default();
    let Ok(m) = decode_manifest(&buf, &name) else {
        return Reached::Refused;
    };
    let again = encode_manifest(&m);
    let back = decode_manifest(&again, &name).expect("a re-encoded manifest decodes");
    assert_eq!(back, m, "manifest changed through encode/decode");
    Reached::Decoded
}

fn footer(input: &[u8]) -> Reached {
    if input.len() < 8 {
        return Reached::Refused;
    }
    let (off, footer) = input.split_at(8);
    let footer_offset = le_u64(off);
    let Ok(idx) = verify_segment_index(footer) else {
        return Reached::Refused;
    };
    let Some(vid) = idx.volume_id() else {
        return Reached::Refused;
    };
    let mut volume_id: VolumeId = [0; 16];
    volume_id[..8].copy_from_slice(&vid.hi().to_be_bytes());
    volume_id[8..].copy_from_slice(&vid.lo().to_be_bytes());
    let snap_id = idx.snap_id();
    let crc = crc32c::crc32c(footer);
    let Ok(f) = decode_segment_footer(footer, crc, &volume_id, snap_id, footer_offset) else {
        return Reached::Refused;
    };
    assert_eq!(f.snap_id, snap_id);
    assert!(f.extents.iter().all(|e| e.nblocks > 0));
    let meta = FooterMeta {
        snap_id: f.snap_id,
        parent_id: f.parent_id,
        block_size: f.block_size,
        volume_size: f.volume_size,
        generation: f.generation,
        data_bytes: f.data_bytes,
    };
    let again = encode_segment_footer(&volume_id, &meta, &f.extents);
    let back = decode_segment_footer(
        &again,
        crc32c::crc32c(&again),
        &volume_id,
        snap_id,
        footer_offset,
    )
    .expect("a re-encoded footer decodes");
    assert_eq!(back, f, "footer changed through encode/decode");
    Reached::Decoded
}

fn header(h: &[u8]) -> Reached {
    let mut buf = h.to_vec();
    if buf.len() < SEGMENT_HEADER_BYTES {
        return match check_segment_header(&buf, &[0; 16], 0, 0) {
            Ok(()) => panic!("a {}-byte segment header was accepted", buf.len()),
            Err(_) => Reached::Refused,
        };
    }
    put_crc(&mut buf, 60, 0..60);
    let mut volume_id: VolumeId = [0; 16];
    volume_id.copy_from_slice(&buf[16..32]);
    let snap_id = le_u64(&buf[32..40]);
    let block_size = u32::from_le_bytes([buf[40], buf[41], buf[42], buf[43]]);
    match check_segment_header(&buf, &volume_id, snap_id, block_size) {
        Ok(()) => {
            // Another volume's or snapshot's header is refused.
            let mut other = volume_id;
            other[0] ^= 1;
            assert!(check_segment_header(&buf, &other, snap_id, block_size).is_err());
            assert!(
                check_segment_header(&buf, &volume_id, snap_id.wrapping_add(1), block_size)
                    .is_err()
            );
            Reached::Decoded
        }
        Err(_) => Reached::Refused,
    }
}

fn trailer(input: &[u8]) -> Reached {
    if input.len() < 8 {
        return Reached::Refused;
    }
    let (len, t) = input.split_at(8);
    let file_len = le_u64(len);
    let mut buf = t.to_vec();
    if buf.len() == SEGMENT_TRAILER_BYTES {
        put_crc(&mut buf, 28, 0..28);
    }
    let Ok((off, footer_len, footer_crc)) = decode_segment_trailer(&buf, 0, file_len) else {
        return Reached::Refused;
    };
    assert!(off >= SEGMENT_HEADER_BYTES as u64);
    assert_eq!(
        off.checked_add((footer_len + SEGMENT_TRAILER_BYTES) as u64),
        Some(file_len),
        "an accepted trailer's footer does not end where the trailer starts"
    );
    // The trailer the encoder writes for a footer of that length says the same.
    if footer_len <= 1 << 16 {
        let footer = vec![0u8; footer_len];
        let (o, l, _) = decode_segment_trailer(&encode_segment_trailer(off, &footer), 0, file_len)
            .expect("an encoded trailer decodes");
        assert_eq!((o, l), (off, footer_len));
    }
    let _ = footer_crc;
    Reached::Decoded
}
