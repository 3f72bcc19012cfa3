//! Host-level tests of the engine: driven through the same handler the ublk queues call, on
//! real files, without a kernel ublk driver.

mod common;
use common::*;
use deltavol::error::ErrorKind;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// Reads the backing file and returns each block's tag.
fn backing_tags(path: &std::path::Path, nblocks: u64) -> Vec<Option<u64>> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; BS];
    (0..nblocks)
        .map(|i| {
            f.read_exact_at(&mut b, i * BS as u64).unwrap();
            tag_of(&b)
        })
        .collect()
}

/// Seeded differential test: random reads, writes (some FUA), discards, write-zeroes, FLUSHes
/// and cuts through randomly chosen queues, against a flat model; background cuts run at a
/// short interval at the same time. After every explicit cut the backing file must equal the
/// model; after reopen the volume must too.
#[test]
fn differential_against_flat_model() {
    let seed = seed("differential_against_flat_model");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 2048u64; // 8 MiB
    let queues = 3;
    let mut cfg = config(dir.path(), nblocks * BS as u64, queues);
    cfg.cache.read_cache_bytes = 256 * BS as u64;
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, queues);
    let mut model = vec![0u64; nblocks as usize];
    let mut next_tag = 1u64;
    for step in 0..6000 {
        let q = rng.gen_range(0..queues);
        let n = if rng.gen_bool(0.8) {
            rng.gen_range(1..=8)
        } else {
            rng.gen_range(1..=128)
        };
        let b = rng.gen_range(0..=nblocks - n);
        match rng.gen_range(0..100) {
            0..=39 => {
                let got = d.read_tags(q, b, n);
                for i in 0..n as usize {
                    assert_eq!(
                        got[i],
                        Some(model[b as usize + i]),
                        "seed {seed} step {step}: block {} via queue {q}",
                        b as usize + i
                    );
                }
            }
            40..=79 => {
                let tags: Vec<u64> = (0..n).map(|i| next_tag + i).collect();
                next_tag += n;
                let fua = rng.gen_bool(0.05);
                assert_eq!(d.write_tags(q, b, &tags, fua), (n as usize * BS) as i32);
                model[b as usize..(b + n) as usize].copy_from_slice(&tags);
            }
            80..=85 => {
                assert_eq!(d.discard(q, b, n), 0);
                model[b as usize..(b + n) as usize].fill(0);
            }
            86..=89 => {
                assert_eq!(d.write_zeroes(q, b, n), 0);
                model[b as usize..(b + n) as usize].fill(0);
            }
            90..=95 => assert_eq!(d.flush(q), 0),
            _ => {
                vol.cut_and_flush().unwrap();
                let bt = backing_tags(&cfg.cache.backing, nblocks);
                for (i, t) in bt.iter().enumerate() {
                    assert_eq!(
                        *t,
                        Some(model[i]),
                        "seed {seed} step {step}: backing block {i} after a cut"
                    );
                }
            }
        }
    }
    drop(d);
    vol.shutdown();
    let st = vol.status();
    assert!(
        st.flush.flushes > 2,
        "background flushes ran: {}",
        st.flush.flushes
    );
    drop(vol);
    // Clean detach: everything is in the backing file and a reopen sees the same volume.
    let bt = backing_tags(&cfg.cache.backing, nblocks);
    assert!(
        bt.iter().zip(&model).all(|(a, m)| *a == Some(*m)),
        "seed {seed}: backing after detach"
    );
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    let got = d.read_tags(0, 0, 128);
    assert!(got.iter().zip(&model).all(|(a, m)| *a == Some(*m)));
    assert_eq!(vol.status().dirty_bytes, 0);
}

/// Several threads at once, each owning a region it writes and checks, while also reading
/// other regions (unchecked) to stir the read cache, and the flush cuts every few ms. Catches
/// the two races of DESIGN.md: a frozen-mirror read overtaken by the punch, and a stale
/// backing read resurrected by the LRU after a flush.
#[test]
fn concurrent_queues_with_racing_flushes() {
    let seed = seed("concurrent_queues_with_racing_flushes");
    let dir = tempfile::tempdir().unwrap();
    let threads = 4usize;
    let per = 256u64;
    let nblocks = per * threads as u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, threads);
    cfg.flush_interval = std::time::Duration::from_millis(3);
    cfg.cache.read_cache_bytes = nblocks * BS as u64;
    let vol = Arc::new(open(&cfg));
    // Per block, a seqlock-style count: odd while its owner writes or discards it. A foreign
    // read that overlapped such a write may see a torn block (buffered page-cache copies are
    // not atomic against each other, and no block device promises more for overlapping I/O);
    // any other foreign read must see a whole block that some write made.
    let writing: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..nblocks).map(|_| Default::default()).collect());
    std::thread::scope(|s| {
        for t in 0..threads {
            let vol = vol.clone();
            let writing = writing.clone();
            s.spawn(move || {
                use std::sync::atomic::Ordering::SeqCst;
                let mark = |b0: u64, n: u64| {
                    for b in b0..b0 + n {
                        writing[b as usize].fetch_add(1, SeqCst);
                    }
                };
                let mut rng =
                    rand::rngs::StdRng::seed_from_u64(seed ^ ((t as u64 + 1) * 0x1234_5678));
                let mut d = Driver::new(&vol, threads);
                let base = t as u64 * per;
                let mut model = vec![0u64; per as usize];
                let mut tag = (t as u64 + 1) << 40;
                for step in 0..4000 {
                    let n = rng.gen_range(1..=4u64);
                    let off = rng.gen_range(0..=per - n);
                    match rng.gen_range(0..10) {
                        0..=3 => {
                            let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                            tag += n;
                            mark(base + off, n);
                            assert!(d.write_tags(t, base + off, &tags, false) > 0);
                            mark(base + off, n);
                            model[off as usize..(off + n) as usize].copy_from_slice(&tags);
                        }
                        4..=6 => {
                            let got = d.read_tags(t, base + off, n);
                            for i in 0..n as usize {
                                assert_eq!(
                                    got[i],
                                    Some(model[off as usize + i]),
                                    "seed {seed} thread {t} step {step} block {}",
                                    base + off + i as u64
                                );
                            }
                        }
                        7 => {
                            mark(base + off, n);
                            assert_eq!(d.discard(t, base + off, n), 0);
                            mark(base + off, n);
                            model[off as usize..(off + n) as usize].fill(0);
                        }
                        _ => {
                            // Foreign read: populates the LRU with other threads' blocks.
                            let fb = rng.gen_range(0..nblocks - 8);
                            let seq = |b: u64| writing[b as usize].load(SeqCst);
                            let before: Vec<u64> = (fb..fb + 8).map(seq).collect();
                            let got = d.read_tags(t, fb, 8);
                            for (i, g) in got.iter().enumerate() {
                                let b = fb + i as u64;
                                let quiet = before[i] % 2 == 0 && seq(b) == before[i];
                                assert!(
                                    g.is_some() || !quiet,
                                    "seed {seed}: garbage in a foreign read of block {b}, \
                                     which no write overlapped"
                                );
                            }
                        }
                    }
                }
                let got = d.read_tags(t, base, per);
                for i in 0..per as usize {
                    assert_eq!(
                        got[i],
                        Some(model[i]),
                        "seed {seed} thread {t} final block {}",
                        base + i as u64
                    );
                }
            });
        }
    });
    let st = vol.status();
    assert!(
        st.flush.flushes >= 2,
        "flushes raced with the I/O: {}",
        st.flush.flushes
    );
    assert!(st.read_cache_hits > 0, "the read cache was exercised");
    vol.shutdown();
}

/// A block written through one queue is read back through another.
#[test]
fn coherent_across_queues() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4 * MIB, 2);
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 2);
    for i in 0..200u64 {
        assert!(d.write_tags((i % 2) as usize, i, &[i + 100], false) > 0);
        assert_eq!(
            d.read_tags(((i + 1) % 2) as usize, i, 1),
            vec![Some(i + 100)]
        );
        if i % 50 == 0 {
            vol.cut_and_flush().unwrap();
        }
    }
    vol.shutdown();
}

/// Crash-and-reopen loop: random I/O with FLUSHes, a simulated crash (threads stopped where
/// they are, nothing more flushed) at a random point — often in the middle of a background
/// flush — then reopen. Half the rounds are a daemon crash on the same boot (the membership
/// journals survive): every completed write must be there, exactly. The others simulate a
/// power cut (the journals are lost): every write acknowledged before the last completed
/// FLUSH (or FUA) must be there, and every other block holds its last or an earlier written
/// value, never garbage.
///
/// Once with each journal kind: the bitmap journal (the default on this filesystem) and the
/// records.
#[test]
fn crash_and_reopen_keeps_flushed_writes() {
    crash_and_reopen(
        "crash_and_reopen_keeps_flushed_writes",
        deltavol::cache::journal::Kind::Bits,
    );
}

#[test]
fn crash_and_reopen_keeps_flushed_writes_journal_records() {
    crash_and_reopen(
        "crash_and_reopen_keeps_flushed_writes_journal_records",
        deltavol::cache::journal::Kind::Records,
    );
}

fn crash_and_reopen(name: &str, kind: deltavol::cache::journal::Kind) {
    let seed = seed(name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 512u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 2);
    cfg.cache.journal = kind;
    cfg.flush_interval = std::time::Duration::from_millis(rng.gen_range(1..20));
    // durable[b]: value at the last completed FLUSH; since[b]: values written after it.
    let mut durable = vec![0u64; nblocks as usize];
    let mut since: Vec<Vec<u64>> = vec![Vec::new(); nblocks as usize];
    let mut tag = 1u64;
    let mut power_cut = false;
    for round in 0..30 {
        let vol = open(&cfg);
        {
            let mut d = Driver::new(&vol, 2);
            // Check what survived the previous crash.
            let got = d.read_tags(0, 0, nblocks);
            for b in 0..nblocks as usize {
                let g = got[b]
                    .unwrap_or_else(|| panic!("seed {seed} round {round}: garbage in block {b}"));
                if !power_cut {
                    let newest = since[b].last().copied().unwrap_or(durable[b]);
                    assert_eq!(
                        g, newest,
                        "seed {seed} round {round}: block {b} after a daemon crash (journals kept)"
                    );
                }
                assert!(
                    g == durable[b] || since[b].contains(&g),
                    "seed {seed} round {round}: block {b} holds {g}, expected {} or one of {:?}",
                    durable[b],
                    since[b]
                );
                durable[b] = g;
                since[b].clear();
            }
            let ops = rng.gen_range(1..300);
            for _ in 0..ops {
                let q = rng.gen_range(0..2);
                let n = rng.gen_range(1..=16u64);
                let b = rng.gen_range(0..=nblocks - n);
                match rng.gen_range(0..20) {
                    0..=13 => {
                        let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                        tag += n;
                        let fua = rng.gen_bool(0.1);
                        assert!(d.write_tags(q, b, &tags, fua) > 0);
                        for i in 0..n as usize {
                            since[b as usize + i].push(tags[i]);
                        }
                        if fua {
                            // FUA: this write is durable (others are not promised).
                            for i in 0..n as usize {
                                durable[b as usize + i] = tags[i];
                                since[b as usize + i].retain(|&t| t > tags[i]);
                            }
                        }
                    }
                    14..=15 => {
                        assert_eq!(d.discard(q, b, n), 0);
                        for i in 0..n as usize {
                            since[b as usize + i].push(0);
                        }
                    }
                    _ => {
                        assert_eq!(d.flush(q), 0);
                        for i in 0..nblocks as usize {
                            if let Some(&last) = since[i].last() {
                                durable[i] = last;
                            }
                            since[i].clear();
                        }
                    }
                }
            }
            if rng.gen_bool(0.3) {
                std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(0..10)));
            }
        }
        vol.crash();
        drop(vol);
        // A power cut loses the page cache; here the files keep their data, but the journals
        // (meant only for a crash on the same boot) are what would not count: remove them.
        power_cut = rng.gen_bool(0.5);
        if power_cut {
            for e in std::fs::read_dir(&cfg.cache.cache_dir).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("journal.") {
                    std::fs::remove_file(e.path()).unwrap();
                }
            }
        }
    }
}

/// With a small cache limit and a long interval, writes beyond the limit wait for the flush
/// (which the high watermark starts early) instead of failing, and nothing is lost.
#[test]
fn backpressure_waits_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 4096u64; // 16 MiB volume
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.cache.cache_limit_bytes = 2 * MIB;
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    let mut max_used = 0;
    for b in (0..nblocks).step_by(16) {
        let tags: Vec<u64> = (0..16).map(|i| b + i + 1).collect();
        assert!(d.write_tags(0, b, &tags, false) > 0);
        max_used = max_used.max(vol.cache.ssd_used_blocks());
    }
    assert!(
        max_used <= vol.cache.cache_limit_blocks,
        "SSD use {max_used} blocks exceeded the limit"
    );
    assert!(
        vol.status().flush.flushes >= 4,
        "the watermark started flushes early"
    );
    let got = d.read_tags(0, 0, 128);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, g)| *g == Some(i as u64 + 1)));
    vol.shutdown();
    let bt = backing_tags(&cfg.cache.backing, nblocks);
    assert!(bt.iter().enumerate().all(|(i, g)| *g == Some(i as u64 + 1)));
}

/// Requests the kernel should never send still get a clean error, never a panic.
#[test]
fn bad_requests_are_refused() {
    use deltavol::cache::io::*;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4 * MIB, 1);
    let vol = open(&cfg);
    let ring = vol.host_ring(0).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut h = |op, sector, nr| smol::block_on(vol.handle(&ring, op, 0, sector, nr, &mut buf));
    let end = (4 * MIB) >> 9;
    assert_eq!(h(UBLK_IO_OP_READ, end, 8), -libc::EINVAL, "past the end");
    assert_eq!(
        h(UBLK_IO_OP_WRITE, end - 8, 16),
        -libc::EINVAL,
        "straddling the end"
    );
    assert_eq!(h(UBLK_IO_OP_READ, 1, 8), -libc::EINVAL, "misaligned start");
    assert_eq!(h(UBLK_IO_OP_WRITE, 0, 9), -libc::EINVAL, "partial block");
    assert_eq!(h(UBLK_IO_OP_READ, 0, 0), -libc::EINVAL, "empty read");
    assert_eq!(
        h(UBLK_IO_OP_WRITE, 0, 256),
        -libc::EINVAL,
        "larger than the buffer"
    );
    assert_eq!(
        h(UBLK_IO_OP_DISCARD, u64::MAX - 7, 8),
        -libc::EINVAL,
        "overflowing range"
    );
    assert_eq!(h(77, 0, 8), -libc::EOPNOTSUPP, "unknown op");
    assert_eq!(h(UBLK_IO_OP_READ, 0, 8), 4096, "a good request still works");
    vol.shutdown();
}

fn err_of(cfg: &deltavol::volume::VolumeConfig) -> deltavol::error::Error {
    match deltavol::volume::Volume::open(cfg) {
        Ok(_) => panic!("open should have failed"),
        Err(e) => e,
    }
}

#[test]
fn wrong_or_corrupt_cache_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4 * MIB, 1);
    let vol = open(&cfg);
    // Attached: a second open is refused, not shared.
    let e = err_of(&cfg);
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    vol.shutdown();
    drop(vol);

    let mut other = cfg.clone();
    other.cache.name = "othervol".into();
    let e = err_of(&other);
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    assert!(
        e.to_string().contains("belongs to volume \"testvol\""),
        "{e}"
    );

    let mut resized = cfg.clone();
    resized.cache.size_bytes = Some(8 * MIB);
    let e = err_of(&resized);
    assert!(e.to_string().contains("resizing is not supported"), "{e}");

    let mut wrong_backing = cfg.clone();
    wrong_backing.cache.backing = dir.path().join("other.img");
    std::fs::write(&wrong_backing.cache.backing, vec![0u8; 8192]).unwrap();
    let e = err_of(&wrong_backing);
    assert!(e.to_string().contains("wrong --backing"), "{e}");

    // Reattach without --size works.
    let mut reattach = cfg.clone();
    reattach.cache.size_bytes = None;
    open(&reattach).shutdown();

    // New volume without a size: clear error, and nothing left behind.
    let mut nosize = config(&dir.path().join("fresh"), 4 * MIB, 1);
    nosize.cache.size_bytes = None;
    let e = err_of(&nosize);
    assert!(e.to_string().contains("give --size"), "{e}");
    assert!(!nosize.cache.cache_dir.join("superblock").exists());

    for (bad, what) in [(0u64, "zero"), (4097, "unaligned")] {
        let c = config(&dir.path().join(what), bad, 1);
        assert_eq!(err_of(&c).kind(), ErrorKind::InvalidInput, "{what} size");
    }
    let mut badname = config(&dir.path().join("n"), 4 * MIB, 1);
    badname.cache.name = "../etc".into();
    assert_eq!(err_of(&badname).kind(), ErrorKind::InvalidInput);

    // Corrupt superblock: both copies garbage → refused with a clear message.
    let sb = cfg.cache.cache_dir.join("superblock");
    std::fs::write(&sb, vec![0xA5u8; 8192]).unwrap();
    let e = err_of(&cfg);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("bad magic"), "{e}");
}

/// A torn (corrupt) newest superblock copy falls back to the older copy; a corrupt map page
/// loses only what no FLUSH acknowledged.
#[test]
fn torn_metadata_falls_back_to_the_older_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 4 * MIB, 1);
    // Only the explicit cut below: a periodic one in between (a loaded machine) would move
    // the epochs the corruption is aimed at.
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    {
        let vol = open(&cfg);
        let mut d = Driver::new(&vol, 1);
        assert!(d.write_tags(0, 0, &[11, 12], false) > 0);
        vol.cut_and_flush().unwrap();
        assert!(d.write_tags(0, 0, &[21], false) > 0);
        assert_eq!(d.flush(0), 0);
        assert!(d.write_tags(0, 1, &[22], false) > 0);
        assert_eq!(d.flush(0), 0);
        drop(d);
        vol.crash();
    }
    // Tear the map page copy written last (the second FLUSH): the first one's copy remains.
    let f = 1u64; // flushed epoch after the cut; live epoch 2 is in slot 0.
    let _ = f;
    let map = cfg.cache.cache_dir.join("map.0");
    let data = std::fs::read(&map).unwrap();
    let seq = |c: usize| u64::from_le_bytes(data[c * 4096 + 24..c * 4096 + 32].try_into().unwrap());
    let newest = if seq(0) > seq(1) { 0 } else { 1 };
    let fh = std::fs::OpenOptions::new().write(true).open(&map).unwrap();
    fh.write_all_at(&[0xEE; 64], (newest * 4096 + 1000) as u64)
        .unwrap();
    drop(fh);
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    // Block 0 (first FLUSH) survives; block 1's newer write may be lost, but the value is an
    // acknowledged one, never garbage.
    assert_eq!(d.read_tags(0, 0, 1), vec![Some(21)]);
    let b1 = d.read_tags(0, 1, 1)[0];
    assert!(b1 == Some(22) || b1 == Some(12), "block 1 holds {b1:?}");
    vol.shutdown();
}

/// Pacing (`flush_pacing`): a timed flush of an epoch of scattered writes is spread over
/// about half the interval, and ends before the next cut is due; a cut requested while a
/// paced flush runs turns it to full speed (the request returns long before the pace would
/// have ended); the backing file equals the model after each; discards in a paced epoch too.
#[test]
fn paced_flush_spreads_over_the_interval_and_yields_to_requests() {
    use std::time::{Duration, Instant};
    let seed = seed("paced_flush_spreads_over_the_interval_and_yields_to_requests");
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 8192u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    let interval = Duration::from_millis(4000);
    cfg.flush_interval = interval;
    cfg.flush_pacing = true;
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u64; nblocks as usize];
    let mut tag = 1u64;
    // Scattered single blocks: many batches of runs.
    let mut dirty = |d: &mut Driver, model: &mut Vec<u64>, rng: &mut rand::rngs::StdRng| {
        for _ in 0..3000 {
            let b = rng.gen_range(0..nblocks);
            assert_eq!(d.write_tags(0, b, &[tag], false), BS as i32);
            model[b as usize] = tag;
            tag += 1;
        }
        let b = rng.gen_range(0..nblocks - 70);
        assert_eq!(d.discard(0, b, 70), 0);
        model[b as usize..b as usize + 70].fill(0);
    };
    let expect = |model: &[u64]| {
        let got = backing_tags(&cfg.cache.backing, nblocks);
        for (b, (g, m)) in got.iter().zip(model).enumerate() {
            assert_eq!(*g, Some(*m), "seed {seed}: block {b}");
        }
    };
    // A timed flush, paced.
    dirty(&mut d, &mut model, &mut rng);
    let n0 = vol.flusher.status().flushes;
    let limit = Instant::now() + 3 * interval;
    while vol.flusher.status().flushes == n0 {
        assert!(Instant::now() < limit, "no timed flush");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = vol.flusher.status().last.unwrap();
    assert!(
        r.duration_ms >= interval.as_millis() as u64 / 4
            && r.duration_ms < interval.as_millis() as u64,
        "a paced flush of {} extents took {} ms (interval {interval:?})",
        r.extents,
        r.duration_ms
    );
    expect(&model);
    // A request during a paced flush: full speed from then on.
    dirty(&mut d, &mut model, &mut rng);
    let snap = model.clone();
    let limit = Instant::now() + 3 * interval;
    while vol.cache.epochs.frozen() == 0 {
        assert!(Instant::now() < limit, "no timed cut");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    vol.cut_and_flush().unwrap();
    let took = t.elapsed();
    assert!(
        took < interval / 4,
        "a cut requested during a paced flush took {took:?}"
    );
    expect(&snap);
    vol.shutdown();
}

/// A flushed mirror keeps its blocks allocated while the cache has room (the epoch after next
/// overwrites them in place), and none of those stale blocks is ever read: not by the
/// foreground, not by a later flush, not after a daemon crash and a reopen; under pressure
/// the flushed mirror is punched as before.
#[test]
fn stale_blocks_of_a_kept_mirror_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let nblocks = 256u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 1);
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    let check = |vol: &deltavol::volume::Volume, want: &[(u64, u64)], when: &str| {
        let mut d = Driver::new(vol, 1);
        for &(b, t) in want {
            assert_eq!(d.read_tags(0, b, 1), vec![Some(t)], "{when}: block {b}");
        }
    };
    {
        let vol = open(&cfg);
        let mut d = Driver::new(&vol, 1);
        // Epoch 1 (slot 1): blocks 0..64 = 1, 100 = 1.
        let ones = vec![1u64; 64];
        assert!(d.write_tags(0, 0, &ones, false) > 0);
        assert!(d.write_tags(0, 100, &[1], false) > 0);
        vol.cut_and_flush().unwrap();
        assert!(
            vol.cache.ssd_allocated_bytes() >= 64 * BS as u64,
            "the flushed mirror was punched with room to spare"
        );
        // Epoch 2 (slot 0): block 5 = 2, block 100 discarded.
        assert!(d.write_tags(0, 5, &[2], false) > 0);
        assert_eq!(d.discard(0, 100, 1), 0);
        vol.cut_and_flush().unwrap();
        // Epoch 3 (slot 1 again, stale 1s in it): block 7 = 3 only.
        assert!(d.write_tags(0, 7, &[3], false) > 0);
        check(&vol, &[(5, 2), (100, 0), (7, 3), (6, 1)], "epoch 3");
        vol.crash();
    }
    {
        // Reopened after the crash: epoch 3's membership comes back from its journal, the
        // stale blocks do not.
        let vol = open(&cfg);
        check(&vol, &[(5, 2), (100, 0), (7, 3), (6, 1)], "after the crash");
        vol.cut_and_flush().unwrap();
        let got = backing_tags(&cfg.cache.backing, nblocks);
        assert_eq!(got[5], Some(2));
        assert_eq!(got[100], Some(0));
        assert_eq!(got[7], Some(3));
        check(&vol, &[(5, 2), (100, 0), (7, 3), (6, 1)], "after the flush");
        vol.shutdown();
    }
    // Under pressure the flushed mirror is punched: a cache limit the writes pass.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 4096 * BS as u64, 1);
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    cfg.cache.cache_limit_bytes = 4 << 20;
    let vol = open(&cfg);
    let mut d = Driver::new(&vol, 1);
    let tags: Vec<u64> = (1..=128).collect();
    for b in (0..768).step_by(128) {
        assert!(d.write_tags(0, b, &tags, false) > 0);
    }
    vol.cut_and_flush().unwrap();
    assert!(
        vol.cache.ssd_allocated_bytes() < 768 * BS as u64,
        "a flushed mirror past the watermark was kept: {} bytes",
        vol.cache.ssd_allocated_bytes()
    );
    vol.shutdown();
}
