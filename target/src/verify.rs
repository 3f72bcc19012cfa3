//! Scrub (`deltavol verify NAME`): compares the volume's permanent storage with its newest
//! snapshot on the data plane, block by block, and reports the ranges that differ.
//!
//! ## What is compared, and why
//! The live volume moves on after every snapshot, so "the volume" and "its last snapshot"
//! need not be equal. What must be equal: the backing file right after the flush of epoch N,
//! and snapshot N on the data plane (both are the volume as of that cut). So verify
//! 1. cuts a fresh snapshot (the flush writes it to the backing file and ships it),
//! 2. waits until the data plane has committed it,
//! 3. pauses the flush thread (foreground I/O goes on, into the SSD cache, and waits only if
//!    the cache fills before verify ends) so the backing file
//!    holds exactly the newest flushed epoch N (a flush that slipped in between is fine: its
//!    snapshot is waited for too),
//! 4. reads the backing file, extent by extent, and compares the crc32c of each 4 KiB block
//!    with the one the data plane computes for snapshot N (`ReadChecksums`: 4 bytes a block
//!    cross the network, not the data), and reports differing blocks as LBA ranges.
//!
//! An encrypted volume ([`crate::crypt`]) is compared on its data instead: the data plane's
//! checksums are of ciphertext, which says nothing about the plaintext, so verify reads the
//! snapshot's blocks, opens them, and compares them with the backing file's byte for byte
//! (the whole volume crosses the network). A block that does not open (tampered or damaged
//! on the data plane) differs, and is counted in `blocks_refused`.
//!
//! A volume still hydrating is refused (its backing file is not complete yet).

use crate::cache::meta::{BLOCK_SHIFT, BLOCK_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Blocks compared per read (8 MiB of the backing, 8 KiB of checksums).
const VERIFY_EXTENT_BLOCKS: u64 = 2048;
/// Differing ranges listed at most (the count of differing blocks is always exact).
pub const DIFF_RANGES_MAX: usize = 10_000;

/// A run of differing blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRange {
    pub lba: u64,
    pub nblocks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The snapshot compared against (= the flushed epoch the backing file holds).
    pub snapshot: u64,
    pub blocks_compared: u64,
    pub blocks_differing: u64,
    pub ranges: Vec<DiffRange>,
    /// More ranges differ than are listed.
    pub truncated: bool,
    pub duration_ms: u64,
    /// How blocks were compared: `checksums` (crc32c, only checksums crossed the network) or
    /// `decrypted data` (an encrypted volume: each block read, opened and compared).
    #[serde(default)]
    pub compared_by: String,
    /// Of the differing blocks, those whose envelope on the data plane did not open
    /// (tampered, damaged, or another key's).
    #[serde(default)]
    pub blocks_refused: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.blocks_differing == 0
    }
}

/// Runs the scrub described in the module doc on an attached volume.
pub fn verify(vol: &Volume, commit_timeout: Duration) -> Result<VerifyReport> {
    let t0 = Instant::now();
    let c = &vol.cache;
    let Some(ship) = &vol.ship else {
        return Err(Error::invalid(
            "this volume ships no snapshots: attach it with --dataplane ADDR --auth-token-file F to verify it",
        ));
    };
    if c.hydrating().is_some() {
        return Err(Error::invalid(
            "the volume is still hydrating: its backing file is not complete; verify once hydration is done",
        ));
    }
    let e = vol.cut_and_flush()?.epoch;
    let not_committed = |snap: u64| {
        let st = ship.status();
        Error::new(
            ErrorKind::Io,
            format!(
                "snapshot {snap} is not committed on the data plane after {} ms (outbox: {} entries; last error: {}): nothing to compare against yet",
                commit_timeout.as_millis(),
                st.outbox_entries,
                st.last_error.unwrap_or_else(|| "none".into())
            ),
        )
    };
    if e != 0 && !ship.wait_committed(e, commit_timeout) {
        return Err(not_committed(e));
    }
    let _paused = vol.flusher.pause();
    let snap = c.flushed_epoch();
    if snap == 0 {
        return Err(Error::invalid(
            "the volume has no snapshot yet: nothing to compare against",
        ));
    }
    if snap != e && !ship.wait_committed(snap, commit_timeout) {
        return Err(not_committed(snap));
    }
    let mut client = ship.connect()?;
    let mut local = vec![0u8; (VERIFY_EXTENT_BLOCKS * BLOCK_SIZE) as usize];
    let codec = ship.codec().clone();
    let mut rep = VerifyReport {
        snapshot: snap,
        blocks_compared: 0,
        blocks_differing: 0,
        ranges: Vec::new(),
        truncated: false,
        duration_ms: 0,
        compared_by: if codec.is_encrypted() {
            "decrypted data"
        } else {
            "checksums"
        }
        .into(),
        blocks_refused: 0,
    };
    // An encrypted volume: the snapshot's blocks, opened (see the module doc).
    let mut remote_data = if codec.is_encrypted() {
        vec![0u8; local.len()]
    } else {
        Vec::new()
    };
    let mut scratch = Vec::new();
    let mut lba = 0u64;
    while lba < c.nblocks {
        let n = (c.nblocks - lba).min(VERIFY_EXTENT_BLOCKS);
        let len = (n << BLOCK_SHIFT) as usize;
        crate::hydrate::read_backing(c, lba, &mut local[..len])?;
        let dp = |e: deltavol_dataplane::ClientError| {
            Error::new(
                ErrorKind::Io,
                format!("data plane read of blocks {lba}+{n} of snapshot {snap}: {e}"),
            )
        };
        let (remote, refused) = if codec.is_encrypted() {
            let refused = codec
                .read_blocks(
                    &mut client,
                    snap,
                    lba,
                    &mut remote_data[..len],
                    &mut scratch,
                )
                .map_err(dp)?;
            let refused: Vec<u64> = refused.iter().filter_map(|e| e.lba()).collect();
            if let Some(b) = refused.first() {
                tracing::error!(volume = %c.name, snapshot = snap, block = b, blocks = refused.len(), "verify: blocks of the snapshot do not open (tampered or damaged on the data plane)");
            }
            (None, refused)
        } else {
            (
                Some(client.read_checksums(snap, lba, n).map_err(dp)?),
                Vec::new(),
            )
        };
        for i in 0..n {
            let r = ((i << BLOCK_SHIFT) as usize)..(((i + 1) << BLOCK_SHIFT) as usize);
            let same = match &remote {
                Some(crcs) => crcs.get(i as usize) == Some(&crc32c::crc32c(&local[r.clone()])),
                None => !refused.contains(&(lba + i)) && local[r.clone()] == remote_data[r],
            };
            if same {
                continue;
            }
            rep.blocks_differing += 1;
            if refused.contains(&(lba + i)) {
                rep.blocks_refused += 1;
            }
            let b = lba + i;
            let full = rep.ranges.len() >= DIFF_RANGES_MAX;
            match rep.ranges.last_mut() {
                Some(d) if d.lba + d.nblocks == b => d.nblocks += 1,
                _ if full => rep.truncated = true,
                _ => rep.ranges.push(DiffRange { lba: b, nblocks: 1 }),
            }
        }
        rep.blocks_compared += n;
        lba += n;
    }
    rep.duration_ms = t0.elapsed().as_millis() as u64;
    if rep.ok() {
        tracing::info!(volume = %c.name, snapshot = snap, blocks = rep.blocks_compared, "verify: permanent storage matches the snapshot");
    } else {
        tracing::error!(volume = %c.name, snapshot = snap, blocks_differing = rep.blocks_differing, ranges = rep.ranges.len(), "verify: permanent storage differs from the snapshot");
    }
    Ok(rep)
}
