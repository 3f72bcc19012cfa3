//! While a recovered volume hydrates, each missing extent is fetched from the data plane
//! exactly once: on-demand reads of an extent the background hydrator has in flight, or has
//! just installed, or that another read is already fetching, share that fetch instead of
//! fetching it again; and a write during hydration is never overwritten by hydrated data.

mod common;
use common::dp::*;
use common::proxy::{Mode, Proxy};
use common::*;
use deltavol::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::hydrate::{HYDRATE_BATCH_EXTENTS, HYDRATE_EXTENT_BLOCKS};
use deltavol::volume::{Volume, VolumeConfig};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const READERS: usize = 4;
/// The writer gives block `b` the tag `WRITTEN_TAG + b`.
const WRITTEN_TAG: u64 = 9_000_000;
/// Blocks the writer writes in one go, at most once in each extent.
const WRITE_RUN: u64 = 16;

/// Writes every block of a fresh volume shipped to `addr` (about one in eight all zeros) and
/// takes a snapshot; returns the model (a tag per block) and the snapshot id.
fn make_source(dir: &Path, addr: &str, nblocks: u64, rng: &mut impl Rng) -> (Vec<u64>, u64) {
    let mut cfg = config(&dir.join("src"), nblocks * BS as u64, 1);
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&dir.join("src"), addr));
    let vol = Volume::open(&cfg).unwrap();
    let mut d = Driver::new(&vol, 1);
    let model: Vec<u64> = (0..nblocks)
        .map(|b| {
            if rng.gen_ratio(1, 8) {
                0
            } else {
                1_000_000 + b
            }
        })
        .collect();
    for (i, chunk) in model.chunks(128).enumerate() {
        assert!(d.write_tags(0, i as u64 * 128, chunk, false) > 0);
    }
    let snap = vol.cut_and_flush().unwrap().epoch;
    drop(d);
    vol.shutdown();
    (model, snap)
}

/// A volume recovered from snapshot `snap` of the data plane at `dp`, reached through `via`.
fn recovered_cfg(
    dir: &Path,
    dp: &str,
    via: &str,
    nblocks: u64,
    snap: u64,
    rate: u64,
) -> VolumeConfig {
    let mut cfg = config(&dir.join("rec"), nblocks * BS as u64, READERS + 1);
    // Writes stay in the mirror until the test flushes: their blocks hold nothing in the
    // backing file meanwhile, so a read answered from the backing file where only the mirror
    // or the fetched data can answer would see zeros.
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(ship_cfg(&dir.join("rec"), via));
    cfg.hydrate_rate_bytes_per_s = rate;
    cfg.fetch_timeout = Duration::from_secs(10);
    cfg.cache.create_as = Some(hydrating_from(snap, dp));
    cfg
}

/// The first block not local yet: where the background hydrator is working.
fn frontier(vol: &Volume) -> Option<u64> {
    let h = vol.cache.hydrating()?;
    (0..vol.cache.nblocks).find(|&b| !h.local.get(b))
}

/// Several threads read blocks not yet local, concurrently, while a rate-limited background
/// hydrator works (mostly at and just ahead of its frontier, so they race its batches and each
/// other), and one more thread writes a block here and there just ahead of the frontier (an
/// extent partly written before it is installed); every read is byte-exact, every write
/// survives hydration, and when hydration is done every extent was fetched from the data plane
/// exactly once.
#[test]
fn each_missing_extent_is_fetched_once() {
    fetched_once("each_missing_extent_is_fetched_once", 8 << 20, false);
}

/// The same race at full speed, with the background's batches pipelined (several in flight on
/// the prefetcher's connection while the worker installs) and two of the readers reading in
/// order (so readahead windows are in flight too): still every extent is fetched exactly once,
/// every read is byte-exact and every write survives.
#[test]
fn each_missing_extent_is_fetched_once_pipelined_with_readahead() {
    fetched_once(
        "each_missing_extent_is_fetched_once_pipelined_with_readahead",
        0,
        true,
    );
}

/// `rate`: the background's limit (0 = none); `sequential`: readers 0 and 1 read in order from
/// their own starting points instead of at random.
fn fetched_once(name: &str, rate: u64, sequential: bool) {
    let seed = seed(name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let nblocks = 8192u64; // 32 MiB, 128 extents
    let nextents = nblocks.div_ceil(HYDRATE_EXTENT_BLOCKS);
    let (model, snap) = make_source(dir.path(), &dp.addr, nblocks, &mut rng);

    // The data plane's answers are slowed down (2 ms per 64 KiB chunk), and the background is
    // rate-limited to 8 MiB/s (four batches of 8 extents a second): each batch stays in flight
    // long enough for reads of its extents to arrive meanwhile, and reads of one extent from
    // several threads overlap.
    let proxy = Proxy::start(&dp.addr);
    proxy.set_mode(Mode::Stall(Duration::from_millis(2)));
    let cfg = recovered_cfg(dir.path(), &dp.addr, &proxy.addr, nblocks, snap, rate);
    let vol = Volume::open(&cfg).unwrap();
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    // Blocks the writer wrote (tag WRITTEN_TAG + b), set once its write completed.
    let written: Vec<AtomicBool> = (0..nblocks).map(|_| AtomicBool::new(false)).collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let (vol, stop, written) = (&vol, &stop, &written);
        s.spawn(move || {
            // One run at most in each extent, so that every extent still misses blocks and
            // must be fetched (once).
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5752);
            let ring = vol.host_ring(READERS).unwrap();
            let mut buf = vec![0u8; WRITE_RUN as usize * BS];
            let mut done = vec![false; nextents as usize];
            while !stop.load(SeqCst) {
                let Some(f) = frontier(vol) else { break };
                let ext = (f / HYDRATE_EXTENT_BLOCKS + rng.gen_range(0..HYDRATE_BATCH_EXTENTS))
                    .min(nextents - 1);
                if !done[ext as usize] {
                    done[ext as usize] = true;
                    let b = (ext * HYDRATE_EXTENT_BLOCKS
                        + rng.gen_range(0..=HYDRATE_EXTENT_BLOCKS - WRITE_RUN))
                    .min(nblocks - WRITE_RUN);
                    for (i, blk) in buf.chunks_mut(BS).enumerate() {
                        fill(WRITTEN_TAG + b + i as u64, blk);
                    }
                    let r = smol::block_on(vol.handle(
                        &ring,
                        UBLK_IO_OP_WRITE,
                        0,
                        b * 8,
                        (WRITE_RUN * 8) as u32,
                        &mut buf,
                    ));
                    assert_eq!(r, buf.len() as i32, "seed {seed}: write of {b}+{WRITE_RUN}");
                    for x in b..b + WRITE_RUN {
                        written[x as usize].store(true, SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(10..50)));
            }
        });
        for q in 0..READERS {
            let (model, reads) = (&model, &reads);
            let tseed = seed.wrapping_add(q as u64 + 1);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(tseed);
                let ring = vol.host_ring(q).unwrap();
                let mut buf = vec![0u8; 32 * BS];
                let mut step = 0u64;
                // A reader in order starts half-way (reader 0) or three quarters in (1).
                let in_order = sequential && q < 2;
                let mut next = nblocks / 4 * (q as u64 + 2);
                while !stop.load(SeqCst) {
                    let Some(f) = frontier(vol) else { break };
                    let n = rng.gen_range(1..=32u64);
                    let b = if in_order {
                        if next + n > nblocks {
                            next = 0;
                        }
                        next += n;
                        next - n
                    } else {
                        match rng.gen_range(0..4) {
                        // At or just ahead of the background's frontier: its batch in flight,
                        // the next one, or an extent it has just installed.
                        0 | 1 => {
                            f + rng.gen_range(0..HYDRATE_BATCH_EXTENTS * HYDRATE_EXTENT_BLOCKS)
                        }
                        // Right before the frontier: installed a moment ago.
                        2 => f.saturating_sub(rng.gen_range(0..2 * HYDRATE_EXTENT_BLOCKS)),
                        _ => rng.gen_range(0..nblocks),
                        }
                    }
                    .min(nblocks - n);
                    let len = (n as usize) * BS;
                    let before: Vec<bool> =
                        (b..b + n).map(|x| written[x as usize].load(SeqCst)).collect();
                    let r = smol::block_on(vol.handle(
                        &ring,
                        UBLK_IO_OP_READ,
                        0,
                        b * 8,
                        (n * 8) as u32,
                        &mut buf[..len],
                    ));
                    assert_eq!(
                        r, len as i32,
                        "seed {seed} reader {q} step {step}: read {b}+{n}"
                    );
                    for i in 0..n as usize {
                        let x = b + i as u64;
                        let got = tag_of(&buf[i * BS..(i + 1) * BS]);
                        // Written before the read began: the write; written meanwhile: either.
                        let ok = if before[i] {
                            got == Some(WRITTEN_TAG + x)
                        } else {
                            got == Some(model[x as usize])
                                || (written[x as usize].load(SeqCst)
                                    && got == Some(WRITTEN_TAG + x))
                        };
                        assert!(
                            ok,
                            "seed {seed} reader {q} step {step}: block {x} read {got:?}, snapshot {}",
                            model[x as usize]
                        );
                    }
                    reads.fetch_add(1, SeqCst);
                    step += 1;
                    if !in_order {
                        std::thread::sleep(Duration::from_millis(rng.gen_range(5..40)));
                    }
                }
            });
        }
        while vol.cache.hydrating().is_some() {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "seed {seed}: hydration not done: {:?}",
                vol.status().hydration
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, SeqCst);
    });
    let st = vol.status().hydration.expect("a hydrator");
    eprintln!(
        "seed {seed}: {} reads, {} blocks written in {:?}; {nextents} extents: {st:?}",
        reads.load(SeqCst),
        written.iter().filter(|w| w.load(SeqCst)).count(),
        t0.elapsed()
    );

    // Every block, byte-exact, through the device and in the backing file: the snapshot's
    // data, or the write's.
    let model: Vec<u64> = (0..nblocks)
        .map(|b| {
            if written[b as usize].load(SeqCst) {
                WRITTEN_TAG + b
            } else {
                model[b as usize]
            }
        })
        .collect();
    let nwritten = written.iter().filter(|w| w.load(SeqCst)).count();
    assert!(nwritten > 0, "seed {seed}: the writer wrote nothing");
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, nblocks);
    for b in 0..nblocks as usize {
        assert_eq!(
            got[b],
            Some(model[b]),
            "seed {seed}: block {b} after hydration"
        );
    }
    vol.cut_and_flush().unwrap();
    let mut buf = vec![0u8; BS];
    for b in 0..nblocks {
        deltavol::hydrate::read_backing(&vol.cache, b, &mut buf).unwrap();
        assert_eq!(
            tag_of(&buf),
            Some(model[b as usize]),
            "seed {seed}: backing block {b}"
        );
    }

    // Every extent came from the data plane exactly once: none was fetched twice, and as
    // nothing was local at the start and at most a quarter of each was written, each was
    // fetched at least once, so the total is the count of extents.
    assert_eq!(
        st.extents_refetched, 0,
        "seed {seed}: extents fetched more than once: {st:?}"
    );
    assert_eq!(
        st.extents_fetched, nextents,
        "seed {seed}: each of the {nextents} extents fetched exactly once: {st:?}"
    );
    // And the reads did race: some extents were fetched for reads, some by the background,
    // and some reads were answered by a fetch made for another read or the background.
    assert!(
        st.fetched_on_demand > 0 && st.fetched_on_demand < nextents,
        "seed {seed}: reads and the background both fetched: {st:?}"
    );
    assert!(
        st.fetches_shared > 0,
        "seed {seed}: no read shared a fetch: {st:?}"
    );
    if sequential {
        assert!(
            st.extents_read_ahead > 0,
            "seed {seed}: the readers in order had nothing read ahead: {st:?}"
        );
    }
    drop(d);
    vol.shutdown();
}
