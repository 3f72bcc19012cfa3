//! The ingest workload: what each client ships, and the two ways of shipping it.
//!
//! Client `c` owns one volume (the data plane shards volumes per core) and ships
//! `snapshots` snapshots, each `extents_per_snapshot` data extents of `extent_bytes`, at
//! distinct, increasing LBAs (snapshot `s`, extent `k` is extent number
//! `s * extents_per_snapshot + k` of the volume). The bytes come from a per-client pool of
//! seeded random data at seeded offsets, generated before the clock starts, so the data plane
//! and the sink receive exactly the same bytes in the same chunks.
//!
//! Both shippers take connections that are already open (and, for the data plane,
//! authenticated with the volume created): the clock covers only the snapshots, from a barrier
//! every client passes together to the last durable commit (the data plane's `Committed`, the
//! sink's acknowledgement after its fsync). Each also reports how long it waited for its
//! commits ([`Shipped::commit_wait`]), which tells streaming from fsync time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use deltavol::crypt::BlockCodec;
use deltavol_dataplane::{BeginOutcome, Client};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Block size of the bench volumes (the ublk target's).
pub const BLOCK_SIZE_BYTES: u32 = 4096;
/// Random bytes each client draws its extents from (plus one extent of slack).
const POOL_BYTES: usize = 8 << 20;

/// The shape of one run; identical for every configuration.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Workload {
    pub clients: usize,
    pub snapshots_per_client: u32,
    pub extents_per_snapshot: u32,
    pub extent_bytes: usize,
    pub seed: u64,
}

impl Workload {
    pub fn snapshot_bytes(&self) -> u64 {
        u64::from(self.extents_per_snapshot) * self.extent_bytes as u64
    }

    pub fn client_bytes(&self) -> u64 {
        u64::from(self.snapshots_per_client) * self.snapshot_bytes()
    }

    pub fn total_bytes(&self) -> u64 {
        self.clients as u64 * self.client_bytes()
    }

    /// Every extent a client ships has its own place in the volume.
    pub fn volume_size_bytes(&self) -> u64 {
        self.client_bytes()
    }

    fn extent_blocks(&self) -> u32 {
        (self.extent_bytes / BLOCK_SIZE_BYTES as usize) as u32
    }

    fn extents_per_client(&self) -> usize {
        self.snapshots_per_client as usize * self.extents_per_snapshot as usize
    }
}

/// The bytes one client ships: extent `i` is `pool[offsets[i]..][..extent_bytes]`.
#[derive(Debug)]
pub struct ClientData {
    pool: Vec<u8>,
    offsets: Vec<usize>,
    extent_bytes: usize,
}

impl ClientData {
    pub fn generate(w: &Workload, client: usize) -> ClientData {
        let mut rng = StdRng::seed_from_u64(w.seed ^ (client as u64).wrapping_mul(0x9e37_79b9));
        let mut pool = vec![0u8; POOL_BYTES + w.extent_bytes];
        rng.fill_bytes(&mut pool);
        let slots = POOL_BYTES / BLOCK_SIZE_BYTES as usize;
        let offsets = (0..w.extents_per_client())
            .map(|_| rng.gen_range(0..slots) * BLOCK_SIZE_BYTES as usize)
            .collect();
        ClientData {
            pool,
            offsets,
            extent_bytes: w.extent_bytes,
        }
    }

    /// Extent number `i` of the volume (snapshot `i / extents_per_snapshot`).
    pub fn extent(&self, i: usize) -> &[u8] {
        &self.pool[self.offsets[i]..self.offsets[i] + self.extent_bytes]
    }
}

/// What one client's shipping took.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    /// When the last commit was acknowledged.
    pub end: Instant,
    /// Time spent waiting for commits (the data plane's `Commit`, the sink's acknowledgement):
    /// the fsyncs, plus whatever the server still had to drain.
    pub commit_wait: Duration,
}

/// Snapshot ids are 1, 2, ... with parent 0 for the first.
pub fn snap_id(s: u32) -> u64 {
    u64::from(s) + 1
}

/// Ships every snapshot of one client to the data plane; returns when its last commit is
/// durable. `client` is connected, authenticated and its volume created (with `codec`'s
/// geometry). Each extent goes through `codec`, as the volume's ship path sends it: as it is,
/// or sealed (client-side encryption) right before `put_extent`.
pub fn ship_dataplane(
    w: &Workload,
    codec: &BlockCodec,
    data: &ClientData,
    client: &mut Client,
    start: &Barrier,
) -> anyhow::Result<Shipped> {
    let volume_size = codec.dp_size_bytes(w.volume_size_bytes());
    let mut sealed = Vec::new();
    start.wait();
    let mut commit_wait = Duration::ZERO;
    for s in 0..w.snapshots_per_client {
        let id = snap_id(s);
        match client
            .begin_snapshot(id, id - 1, volume_size)
            .with_context(|| format!("begin snapshot {id}"))?
        {
            BeginOutcome::Started => {}
            BeginOutcome::AlreadyCommitted(_) => {
                bail!("snapshot {id} is already committed on a fresh data dir")
            }
        }
        for k in 0..w.extents_per_snapshot {
            let i = s as usize * w.extents_per_snapshot as usize + k as usize;
            let lba = i as u64 * u64::from(w.extent_blocks());
            codec
                .put_extent(client, lba, data.extent(i), &mut sealed)
                .with_context(|| format!("put extent {i} of snapshot {id}"))?;
        }
        let t = Instant::now();
        let info = client
            .commit()
            .with_context(|| format!("commit snapshot {id}"))?;
        commit_wait += t.elapsed();
        let stored = codec.dp_size_bytes(w.snapshot_bytes());
        ensure!(
            info.bytes == stored && info.parent_id == id - 1,
            "snapshot {id} committed as {info:?}, {stored} bytes on parent {} expected",
            id - 1
        );
    }
    Ok(Shipped {
        end: Instant::now(),
        commit_wait,
    })
}

/// The sink's protocol: per snapshot, `u64 LE length`, then the bytes (one write per extent);
/// the sink answers `u64 LE total bytes durable` once it has fsynced them.
pub fn ship_sink(
    w: &Workload,
    data: &ClientData,
    stream: &mut TcpStream,
    start: &Barrier,
) -> anyhow::Result<Shipped> {
    start.wait();
    let mut commit_wait = Duration::ZERO;
    let mut durable = 0u64;
    for s in 0..w.snapshots_per_client {
        stream
            .write_all(&w.snapshot_bytes().to_le_bytes())
            .context("sending a snapshot length to the sink")?;
        for k in 0..w.extents_per_snapshot {
            let i = s as usize * w.extents_per_snapshot as usize + k as usize;
            stream
                .write_all(data.extent(i))
                .context("sending an extent to the sink")?;
        }
        let mut ack = [0u8; 8];
        let t = Instant::now();
        stream
            .read_exact(&mut ack)
            .context("waiting for the sink's fsync")?;
        commit_wait += t.elapsed();
        durable += w.snapshot_bytes();
        ensure!(
            u64::from_le_bytes(ack) == durable,
            "sink acknowledged {} bytes, {durable} expected",
            u64::from_le_bytes(ack)
        );
    }
    Ok(Shipped {
        end: Instant::now(),
        commit_wait,
    })
}

/// A seeded choice of one extent per client to read back after a run.
pub fn sample_extent(w: &Workload, client: usize, run: usize) -> usize {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x5a5a ^ ((client as u64) << 32) ^ run as u64);
    rng.gen_range(0..w.extents_per_client())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Workload {
        Workload {
            clients: 2,
            snapshots_per_client: 3,
            extents_per_snapshot: 4,
            extent_bytes: 64 * 1024,
            seed: 7,
        }
    }

    #[test]
    fn sizes_add_up() {
        let w = small();
        assert_eq!(w.snapshot_bytes(), 4 * 64 * 1024);
        assert_eq!(w.client_bytes(), 3 * 4 * 64 * 1024);
        assert_eq!(w.total_bytes(), 2 * w.client_bytes());
        assert_eq!(w.extent_blocks(), 16);
    }

    #[test]
    fn data_is_seeded_and_differs_between_clients() {
        let w = small();
        let a = ClientData::generate(&w, 0);
        let a2 = ClientData::generate(&w, 0);
        let b = ClientData::generate(&w, 1);
        assert_eq!(a.extent(5), a2.extent(5));
        assert_ne!(a.extent(5), b.extent(5));
        assert_eq!(a.extent(11).len(), w.extent_bytes);
        assert!(sample_extent(&w, 1, 3) < 12);
    }
}
