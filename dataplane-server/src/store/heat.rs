//! A volume's read heat map: one byte per region of `region_blocks` blocks (0 = cold .. 255 =
//! hottest), recorded by the compute node and stored here so that a recovery can hydrate the
//! hottest regions first. It is not part of any snapshot: it never affects snapshot data,
//! retention or compaction.
//!
//! Stored per volume, replaced atomically: local, the file `HEAT` in the volume's directory
//! (temp file, fsync, rename, directory fsync); object store, `volumes/<name>/heat.dvh`. The
//! encoding carries the volume id: a map left by a deleted volume of the same name (a deletion
//! that crashed half-way on an object store) is never served to a new volume.
//!
//! Encoding: magic `DVHEAT01` 8 | volume id 16 | region_blocks u32 | length u32 | the map |
//! crc32c u32 of everything before it (little-endian).

use super::backend::Backend;
use super::error::{io_at, StoreError, StoreErrorKind};
use super::format::VolumeId;
use super::local::write_atomic;
use super::volume::{volume_id_hex, Volume};
use deltavol_schemas::HEAT_BYTES_MAX;
use tokio_uring::buf::BoundedBuf;

/// Local store: the heat map's file in the volume's directory.
pub(super) const HEAT_NAME: &str = "HEAT";

const HEAT_MAGIC: [u8; 8] = *b"DVHEAT01";
const HEAT_HEADER_BYTES: usize = 8 + 16 + 4 + 4;
const HEAT_CRC_BYTES: usize = 4;

/// `volumes/<name>/heat.dvh`
pub fn heat_rel(volume: &str) -> String {
    format!("volumes/{volume}/heat.dvh")
}

/// The number of entries of a heat map of a volume of `volume_blocks` blocks with regions of
/// `region_blocks` blocks (the last region may be partial).
pub fn heat_entries(volume_blocks: u64, region_blocks: u32) -> u64 {
    volume_blocks.div_ceil(u64::from(region_blocks.max(1)))
}

/// Checks a heat map's shape against the volume: `region_blocks` a power of two (at least 1),
/// `len` = ceil(volume_blocks / region_blocks), at most [`HEAT_BYTES_MAX`].
pub fn check_heat(volume_blocks: u64, region_blocks: u32, len: u64) -> Result<(), StoreError> {
    if !region_blocks.is_power_of_two() {
        return Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!("heat map: region_blocks {region_blocks} is not a power of two (1, 2, 4, ...)"),
        ));
    }
    let want = heat_entries(volume_blocks, region_blocks);
    if want > HEAT_BYTES_MAX as u64 {
        return Err(StoreError::new(
            StoreErrorKind::TooLarge,
            format!(
                "heat map: {volume_blocks} blocks in regions of {region_blocks} make {want} \
                 entries, over the cap of {HEAT_BYTES_MAX}: use larger regions"
            ),
        ));
    }
    if len > HEAT_BYTES_MAX as u64 {
        return Err(StoreError::new(
            StoreErrorKind::TooLarge,
            format!("heat map of {len} bytes exceeds the cap of {HEAT_BYTES_MAX}"),
        ));
    }
    if len != want {
        return Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "heat map of {len} bytes for a volume of {volume_blocks} blocks in regions of \
                 {region_blocks}: {want} bytes expected (one per region, rounded up)"
            ),
        ));
    }
    Ok(())
}

/// Encodes a heat map for the store.
pub fn encode_heat(volume_id: &VolumeId, region_blocks: u32, heat: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAT_HEADER_BYTES + heat.len() + HEAT_CRC_BYTES);
    out.extend_from_slice(&HEAT_MAGIC);
    out.extend_from_slice(volume_id);
    out.extend_from_slice(&region_blocks.to_le_bytes());
    out.extend_from_slice(&(heat.len() as u32).to_le_bytes());
    out.extend_from_slice(heat);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a stored heat map: (volume id, region_blocks, map). Every length is checked
/// before use; a bad magic, length or crc32c is `Corrupt`.
pub fn decode_heat(buf: &[u8], what: &str) -> Result<(VolumeId, u32, Vec<u8>), StoreError> {
    let corrupt = |why: &str| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("{what}: not a heat map ({why})"),
        )
    };
    if buf.len() < HEAT_HEADER_BYTES + HEAT_CRC_BYTES || buf[..8] != HEAT_MAGIC {
        return Err(corrupt("bad length or magic"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let region_blocks = u32_at(24);
    let len = u32_at(28) as usize;
    if len > HEAT_BYTES_MAX || buf.len() != HEAT_HEADER_BYTES + len + HEAT_CRC_BYTES {
        return Err(corrupt("bad length"));
    }
    let body_end = HEAT_HEADER_BYTES + len;
    if crc32c::crc32c(&buf[..body_end]) != u32_at(body_end) {
        return Err(corrupt("crc32c mismatch"));
    }
    let id: VolumeId = buf[8..24].try_into().expect("16 bytes");
    Ok((id, region_blocks, buf[HEAT_HEADER_BYTES..body_end].to_vec()))
}

/// Local store: the heat map file's bytes (through io_uring, off the shard's thread), `None`
/// when there is none. Reads at most one byte more than the largest valid map: a longer file
/// fails its length check.
async fn read_local(path: &std::path::Path) -> Result<Option<Vec<u8>>, StoreError> {
    let f = match tokio_uring::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at("open", path)(e)),
    };
    let cap = HEAT_HEADER_BYTES + HEAT_BYTES_MAX + HEAT_CRC_BYTES + 1;
    let mut buf = Vec::with_capacity(cap);
    let res = loop {
        let at = buf.len();
        if at == cap {
            break Ok(());
        }
        let (r, slice) = f.read_at(buf.slice(at..cap), at as u64).await;
        buf = slice.into_inner();
        match r {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let _ = f.close().await;
    res.map_err(io_at("read", path))?;
    Ok(Some(buf))
}

impl Volume {
    /// Stores the volume's heat map, replacing the one stored; durable when this returns.
    /// Checked against the volume's current geometry ([`check_heat`]).
    pub async fn put_heat(&self, region_blocks: u32, heat: &[u8]) -> Result<(), StoreError> {
        let _guard = self.heat_lock.lock().await;
        self.check_damaged()?;
        let s = self.summary();
        check_heat(
            s.size_bytes / u64::from(s.block_size),
            region_blocks,
            heat.len() as u64,
        )?;
        let bytes = encode_heat(&s.volume_id, region_blocks, heat);
        match &self.backend {
            Backend::Local { .. } => write_atomic(&self.dir, HEAT_NAME, bytes).await?,
            Backend::Object(obj) if obj.leases().is_some_and(|l| !l.valid(&self.name)) => {
                return Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!(
                        "this data-plane server no longer holds the lease of volume {}: \
                         another server may serve it now; reconnect",
                        self.name
                    ),
                ));
            }
            Backend::Object(obj) => obj.put(&obj.key(&heat_rel(&self.name)), bytes).await?,
        }
        tracing::debug!(volume = %self.name, region_blocks, bytes = heat.len(), "heat map stored");
        Ok(())
    }

    /// The volume's stored heat map, `None` when none was stored. A map stored for another
    /// volume id (a deleted volume of the same name) is `None`; a damaged one is `Damaged`.
    pub async fn get_heat(&self) -> Result<Option<(u32, Vec<u8>)>, StoreError> {
        let raw = match &self.backend {
            Backend::Local { .. } => match read_local(&self.dir.join(HEAT_NAME)).await? {
                Some(raw) => raw,
                None => return Ok(None),
            },
            Backend::Object(obj) => match obj.get(&obj.key(&heat_rel(&self.name))).await? {
                Some(b) => b.to_vec(),
                None => return Ok(None),
            },
        };
        let what = format!("volume {} heat map", self.name);
        let (id, region_blocks, heat) = decode_heat(&raw, &what).map_err(|e| {
            tracing::error!(volume = %self.name, error = %e, "stored heat map is damaged");
            StoreError::new(StoreErrorKind::Damaged, e.to_string())
        })?;
        let own = self.volume_id();
        if id != own {
            tracing::warn!(volume = %self.name, stored_for = %volume_id_hex(&id), id = %volume_id_hex(&own), "ignoring a heat map stored for another volume of this name");
            return Ok(None);
        }
        Ok(Some((region_blocks, heat)))
    }

    /// Object store: removes the heat map (a volume deletion, before its manifests).
    pub(super) async fn delete_heat_obj(&self) -> Result<(), StoreError> {
        if let Backend::Object(obj) = &self.backend {
            obj.delete(&obj.key(&heat_rel(&self.name))).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_round_trip_and_corruption() {
        let id = [7u8; 16];
        let heat: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let enc = encode_heat(&id, 64, &heat);
        assert_eq!(decode_heat(&enc, "t").unwrap(), (id, 64, heat.clone()));
        for cut in [0, 10, enc.len() - 1] {
            assert!(decode_heat(&enc[..cut], "t").is_err(), "{cut}");
        }
        for at in [0, 9, 25, 30, 100, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[at] ^= 1;
            assert!(decode_heat(&bad, "t").is_err(), "flip at {at}");
        }
        let empty = encode_heat(&id, 1, &[]);
        assert_eq!(decode_heat(&empty, "t").unwrap(), (id, 1, vec![]));
    }

    #[test]
    fn heat_shape() {
        assert!(check_heat(1000, 8, 125).is_ok());
        assert!(check_heat(1001, 8, 126).is_ok());
        assert!(check_heat(1001, 8, 125).is_err());
        assert!(check_heat(1000, 0, 1000).is_err());
        assert!(check_heat(1000, 3, 334).is_err());
        assert!(check_heat(1000, 1 << 31, 1).is_ok());
        assert_eq!(
            check_heat(1 << 40, 1, 1).unwrap_err().kind(),
            StoreErrorKind::TooLarge
        );
        assert!(check_heat(HEAT_BYTES_MAX as u64, 1, HEAT_BYTES_MAX as u64).is_ok());
    }
}
