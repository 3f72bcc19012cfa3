//! Resident memory of a volume at host level (issue 5, item 4): a process opens a big sparse
//! volume with the structures the daemon builds (`Volume::open`: cache, bitmaps, read cache,
//! journals, syncer and flush threads), fills its read cache with reads, then writes scattered
//! blocks across the whole volume (so every page of the dirty bitmap is touched), cuts and
//! flushes, and writes scattered blocks again into the other epoch. After each phase it reads
//! `VmRSS` and `VmHWM` from `/proc/self/status` and compares them with the budget:
//! read cache + 2 dirty bitmaps (one per mirror slot) + a fixed allowance.
//!
//! Runs in a child process of its own (`--memory-child`), so the throughput bench's buffers
//! and its model are not counted.

use crate::data::BLOCK_BYTES;
use anyhow::{ensure, Context};
use deltavol::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::cache::CacheConfig;
use deltavol::flush::NullSink;
use deltavol::volume::{Volume, VolumeConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// What the budget allows beyond the read cache and the bitmaps: the process itself (code,
/// libraries, thread stacks, allocator arenas) and the volume's small per-page tables.
pub const FIXED_ALLOWANCE_BYTES: u64 = 16 << 20;
/// Dirty bitmaps a volume keeps: one per mirror slot (a hydrating volume has a third, the
/// local map; not measured here).
pub const BITMAPS: u64 = 2;
const SECTORS_PER_BLOCK: u64 = (BLOCK_BYTES / 512) as u64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub vm_rss_bytes: u64,
    pub vm_hwm_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    pub volume_bytes: u64,
    pub read_cache_bytes: u64,
    pub bitmap_bytes_each: u64,
    pub bitmaps: u64,
    pub fixed_allowance_bytes: u64,
    /// read cache + bitmaps × bitmap bytes + fixed allowance.
    pub budget_bytes: u64,
    /// The process before the volume was opened.
    pub baseline_rss_bytes: u64,
    pub read_cache_blocks_held: u64,
    pub scattered_writes_per_phase: u64,
    pub phases: Vec<Phase>,
    /// Largest `VmRSS` of the phases / budget.
    pub ratio_rss: f64,
    /// Final `VmHWM` / budget.
    pub ratio_hwm: f64,
    /// Final `VmHWM` minus the baseline, against read cache + bitmaps (no allowance): what
    /// the volume itself costs beyond its two big structures.
    pub volume_overhead_bytes: i64,
    pub within_budget: bool,
    pub note: String,
}

/// `VmRSS` and `VmHWM` of this process, bytes.
pub fn rss_hwm() -> anyhow::Result<(u64, u64)> {
    let m = deltavol::procmem::resident().context("read /proc/self/status")?;
    Ok((m.rss_bytes, m.hwm_bytes))
}

/// The measurement itself (run in the child process).
pub fn measure(
    dir: &Path,
    volume_bytes: u64,
    read_cache_bytes: u64,
) -> anyhow::Result<MemoryReport> {
    ensure!(
        volume_bytes % (4 << 20) == 0 && volume_bytes >= 64 << 20,
        "--memory-size must be a multiple of 4 MiB, at least 64 MiB"
    );
    let nblocks = volume_bytes / BLOCK_BYTES as u64;
    let bitmap_bytes = nblocks.div_ceil(64) * 8;
    let budget = read_cache_bytes + BITMAPS * bitmap_bytes + FIXED_ALLOWANCE_BYTES;
    let mut phases: Vec<Phase> = Vec::new();
    let t0 = Instant::now();
    let mark = |phases: &mut Vec<Phase>, name: &str| -> anyhow::Result<()> {
        let (rss, hwm) = rss_hwm()?;
        eprintln!(
            "memory: {name:<28} VmRSS {:>8.1} MiB  VmHWM {:>8.1} MiB  (budget {:.1} MiB)",
            mib(rss),
            mib(hwm),
            mib(budget)
        );
        phases.push(Phase {
            phase: name.into(),
            vm_rss_bytes: rss,
            vm_hwm_bytes: hwm,
            seconds: t0.elapsed().as_secs_f64(),
        });
        Ok(())
    };
    mark(&mut phases, "before open")?;
    let baseline = phases[0].vm_rss_bytes;
    let cfg = VolumeConfig {
        cache: CacheConfig {
            name: "bench-memory".into(),
            size_bytes: Some(volume_bytes),
            cache_dir: dir.join("cache"),
            backing: dir.join("backing.img"),
            cache_limit_bytes: 2 << 30,
            read_cache_bytes,
            nr_queues: 1,
            create_as: None,
            journal: Default::default(),
        },
        flush_interval: Duration::from_secs(24 * 3600),
        flush_pacing: false,
        ship: None,
        hydrate_rate_bytes_per_s: 0,
        hydrate_readahead_bytes: deltavol::volume::HYDRATE_READAHEAD_BYTES,
        hydrate_hot_first: true,
        heat_interval: deltavol::volume::HEAT_INTERVAL_DEFAULT,
        fetch_timeout: Duration::from_secs(5),
    };
    let vol = Volume::open_with_sink(&cfg, Box::new(NullSink)).context("open the volume")?;
    mark(&mut phases, "opened")?;
    let ring = vol.host_ring(0).context("a host ring")?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let io = |op: u32, block: u64, buf: &mut [u8]| -> anyhow::Result<()> {
        let r = smol::block_on(vol.handle(
            &ring,
            op,
            0,
            block * SECTORS_PER_BLOCK,
            SECTORS_PER_BLOCK as u32,
            buf,
        ));
        ensure!(r == BLOCK_BYTES as i32, "4k request at block {block}: {r}");
        Ok(())
    };

    // Reads of distinct blocks spread over the volume (the backing file is sparse: zeros),
    // 1.5 times what the read cache holds, so every shard of it fills up.
    let rc_blocks = read_cache_bytes / BLOCK_BYTES as u64;
    let nreads = (rc_blocks * 3 / 2).min(nblocks);
    // Odd, so the blocks spread evenly over the read cache's shards (chosen by block number).
    let stride = (nblocks / nreads.max(1)).max(1) | 1;
    let nreads = nreads.min(nblocks / stride);
    for i in 0..nreads {
        io(UBLK_IO_OP_READ, i * stride, &mut buf)?;
        ensure!(
            buf.iter().all(|&b| b == 0),
            "block {} of a fresh sparse volume is not zeros",
            i * stride
        );
    }
    let held = vol.status().read_cache_blocks;
    ensure!(
        rc_blocks == 0 || held * 100 >= rc_blocks * 95,
        "the read cache holds {held} blocks after {nreads} distinct reads; it should hold about {rc_blocks}"
    );
    mark(&mut phases, "read cache filled")?;

    // One 4k write in every 2 MiB of the volume: every page of the dirty bitmap is touched.
    let step = (2 << 20) / BLOCK_BYTES as u64;
    let writes = nblocks / step;
    let mut scatter = |phase_off: u64, tag: u8| -> anyhow::Result<()> {
        for i in 0..writes {
            let b = i * step + phase_off;
            buf.fill(tag);
            buf[..8].copy_from_slice(&b.to_le_bytes());
            io(UBLK_IO_OP_WRITE, b, &mut buf)?;
        }
        // Read a few back.
        for i in [0, writes / 2, writes - 1] {
            let b = i * step + phase_off;
            io(UBLK_IO_OP_READ, b, &mut buf)?;
            ensure!(
                buf[..8] == b.to_le_bytes() && buf[8..].iter().all(|&x| x == tag),
                "block {b} does not read back as written"
            );
        }
        Ok(())
    };
    scatter(0, 0xa5)?;
    ensure!(
        vol.status().dirty_bytes == writes * BLOCK_BYTES as u64,
        "dirty bytes {} after {writes} scattered writes",
        vol.status().dirty_bytes
    );
    mark(&mut phases, "scattered writes, epoch 1")?;
    vol.cut_and_flush().context("cut and flush")?;
    mark(&mut phases, "cut and flushed")?;
    scatter(step / 2, 0x5a)?;
    mark(&mut phases, "scattered writes, epoch 2")?;
    drop(ring);
    vol.shutdown();
    drop(vol);

    let rss_max = phases.iter().map(|p| p.vm_rss_bytes).max().unwrap_or(0);
    let hwm = phases.last().map_or(0, |p| p.vm_hwm_bytes);
    let core = read_cache_bytes + BITMAPS * bitmap_bytes;
    Ok(MemoryReport {
        volume_bytes,
        read_cache_bytes,
        bitmap_bytes_each: bitmap_bytes,
        bitmaps: BITMAPS,
        fixed_allowance_bytes: FIXED_ALLOWANCE_BYTES,
        budget_bytes: budget,
        baseline_rss_bytes: baseline,
        read_cache_blocks_held: held,
        scattered_writes_per_phase: writes,
        ratio_rss: rss_max as f64 / budget as f64,
        ratio_hwm: hwm as f64 / budget as f64,
        volume_overhead_bytes: hwm as i64 - baseline as i64 - core as i64,
        within_budget: hwm <= budget,
        note: "host-level process (Volume::open, the daemon's structures); the daemon's own RSS \
               needs the ublk driver (measure it in the VM)"
            .into(),
        phases,
    })
}

pub fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}
