//! Inline first attempts (see `deltavol::ring`, "Inline first attempts"): the handler serves
//! plain reads and writes synchronously when it can (`RWF_NOWAIT`, or plain copies on a memory
//! filesystem) and on the ring otherwise. Both paths, mixed request by request on one volume,
//! must give byte-exact data, and a daemon crash must keep every completed write (the
//! membership journal: a record written inline lands only after its data).
//!
//! Run on a disk directory (`TMPDIR`) and, when `/dev/shm` is a tmpfs, on it too (there every
//! write is inline: the only place the host can exercise inline writes, since ext4 refuses
//! buffered `RWF_NOWAIT` writes). `DELTAVOL_INLINE_IO` does not matter here: each ring's mode
//! is set explicitly.

mod common;
use common::*;
use deltavol::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::ring::{
    Deferred, HostRing, Inline, InlineCounts, InlineFile, InlineMode, Kicker, Ring, BATCH_REC_BYTES,
};
use deltavol::volume::Volume;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

const MODES: [InlineMode; 3] = [InlineMode::Auto, InlineMode::NoWait, InlineMode::Off];

/// A driver per mode over one volume; each has a ring per queue.
fn drivers(vol: &Volume, queues: usize) -> Vec<Driver<'_>> {
    let c = &vol.cache;
    let mirrors = [c.mirrors[0].as_raw_fd(), c.mirrors[1].as_raw_fd()];
    MODES
        .iter()
        .map(|&mode| {
            let mut d = Driver::new(vol, queues);
            d.rings = (0..queues)
                .map(|q| HostRing::with_inline(q, mirrors, c.backing.as_raw_fd(), mode).unwrap())
                .collect();
            d
        })
        .collect()
}

fn add(total: &mut [InlineCounts; 3], ds: &[Driver<'_>]) {
    for (t, d) in total.iter_mut().zip(ds) {
        for r in &d.rings {
            let c = r.inline().counts();
            t.reads_inline += c.reads_inline;
            t.reads_ring += c.reads_ring;
            t.writes_inline += c.writes_inline;
            t.writes_ring += c.writes_ring;
        }
    }
}

/// Random writes, discards, reads and FLUSHes, each through a randomly chosen mode; every read
/// checked against the model; every few hundred requests the daemon "crashes" (no flush, the
/// journals kept) and the volume is reopened: every completed write must be there.
fn mixed_modes_then_crash(dir: &Path, seed: u64) -> [InlineCounts; 3] {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nblocks = 512u64;
    let mut cfg = config(dir, nblocks * BS as u64, 2);
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    let mut model = vec![0u64; nblocks as usize];
    let mut tag = 1u64;
    let mut total = [InlineCounts::default(); 3];
    for round in 0..6 {
        let vol = open(&cfg);
        let mut ds = drivers(&vol, 2);
        let got = ds[rng.gen_range(0..3)].read_tags(0, 0, nblocks);
        for (b, g) in got.iter().enumerate() {
            assert_eq!(
                *g,
                Some(model[b]),
                "seed {seed} round {round}: block {b} after a daemon crash"
            );
        }
        for _ in 0..rng.gen_range(100..300) {
            let d = &mut ds[rng.gen_range(0..3)];
            let q = rng.gen_range(0..2);
            let n = rng.gen_range(1..=16u64);
            let b = rng.gen_range(0..=nblocks - n);
            match rng.gen_range(0..20) {
                0..=9 => {
                    let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                    tag += n;
                    assert_eq!(d.write_tags(q, b, &tags, false), (n as usize * BS) as i32);
                    model[b as usize..(b + n) as usize].copy_from_slice(&tags);
                }
                10 => {
                    assert_eq!(d.discard(q, b, n), 0);
                    model[b as usize..(b + n) as usize].fill(0);
                }
                11 => assert_eq!(d.flush(q), 0),
                _ => {
                    let got = d.read_tags(q, b, n);
                    for i in 0..n as usize {
                        assert_eq!(
                            got[i],
                            Some(model[b as usize + i]),
                            "seed {seed} round {round}: block {}",
                            b as usize + i
                        );
                    }
                }
            }
        }
        add(&mut total, &ds);
        drop(ds);
        vol.crash();
        drop(vol);
    }
    total
}

/// Whether `/dev/shm` is a tmpfs (where every write can be inline).
fn shm_is_tmpfs() -> bool {
    // SAFETY: statfs writes only into the zeroed struct, read only on success.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let p = std::ffi::CString::new("/dev/shm").unwrap();
        libc::statfs(p.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == 0x0102_1994
    }
}

#[test]
fn inline_and_ring_paths_agree_on_disk() {
    let seed = seed("inline_and_ring_paths_agree_on_disk");
    let dir = tempfile::tempdir().unwrap();
    let t = mixed_modes_then_crash(dir.path(), seed);
    let off = t[2];
    assert_eq!(
        (off.reads_inline, off.writes_inline),
        (0, 0),
        "mode off did I/O inline"
    );
    assert!(off.reads_ring > 0 && off.writes_ring > 0);
    eprintln!("inline counts on disk (auto, nowait, off): {t:?}");
}

#[test]
fn inline_and_ring_paths_agree_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm_is_tmpfs() {
        eprintln!("SKIPPED inline_and_ring_paths_agree_on_tmpfs: /dev/shm is not a tmpfs");
        return;
    }
    let seed = seed("inline_and_ring_paths_agree_on_tmpfs");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let t = mixed_modes_then_crash(dir.path(), seed);
    eprintln!("inline counts on tmpfs (auto, nowait, off): {t:?}");
    let (auto, off) = (t[0], t[2]);
    // Auto copies plainly on tmpfs: every read and write of the mirrors and journals inline.
    assert!(auto.reads_inline > 0 && auto.writes_inline > 0, "{auto:?}");
    assert_eq!(auto.writes_ring, 0, "{auto:?}");
    assert_eq!((off.reads_inline, off.writes_inline), (0, 0), "{off:?}");
}

/// A host ring whose journal records go through a per-round batch, as a ublk queue's do: the
/// test's event loop runs every task, then writes the batch ([`Inline::write_batch`]).
struct BatchRing {
    host: HostRing,
    inline: Inline,
}

impl Ring for BatchRing {
    unsafe fn submit(&self, sqe: io_uring::squeue::Entry) -> impl Future<Output = i32> {
        // SAFETY: forwarded from the caller.
        unsafe { self.host.submit(sqe) }
    }

    unsafe fn submit_linked(
        &self,
        first: io_uring::squeue::Entry,
        first_len: i32,
        second: io_uring::squeue::Entry,
    ) -> impl Future<Output = (i32, i32)> {
        // SAFETY: forwarded from the caller.
        unsafe { self.host.submit_linked(first, first_len, second) }
    }

    fn try_read(&self, file: u32, buf: &mut [u8], off: u64) -> Option<usize> {
        self.inline.read(file, buf, off)
    }

    fn try_write(&self, file: InlineFile, buf: &[u8], off: u64) -> Option<usize> {
        self.inline.write(file, buf, off)
    }

    fn defer_write(
        &self,
        fd: RawFd,
        rec: &[u8; BATCH_REC_BYTES],
        off: u64,
    ) -> Option<Deferred<'_>> {
        self.inline.defer(fd, rec, off)
    }

    fn sleep(&self, dur: std::time::Duration) -> impl Future<Output = ()> {
        self.host.sleep(dur)
    }

    fn kicker(&self) -> Option<Arc<Kicker>> {
        None
    }

    fn queue_index(&self) -> usize {
        self.host.queue_index()
    }
}

/// Several tasks write (each its own residue class of blocks) and read back concurrently on
/// one batching ring; their records are written a round at a time. Every read is exact, and
/// after a daemon crash every completed write is there (the batched records replay).
fn batched_records(dir: &Path, seed: u64, mode: InlineMode) -> InlineCounts {
    const TASKS: u64 = 16;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nblocks = 512u64;
    let mut cfg = config(dir, nblocks * BS as u64, 1);
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    // Records are what is batched (a bitmap journal writes none).
    cfg.cache.journal = deltavol::cache::journal::Kind::Records;
    let mut model = vec![0u64; nblocks as usize];
    let mut counts = InlineCounts::default();
    for round in 0..4 {
        let vol = open(&cfg);
        let c = &vol.cache;
        let mirrors = [c.mirrors[0].as_raw_fd(), c.mirrors[1].as_raw_fd()];
        let backing = c.backing.as_raw_fd();
        let ring = BatchRing {
            host: HostRing::with_inline(0, mirrors, backing, InlineMode::Off).unwrap(),
            inline: Inline::new(mode, mirrors, backing),
        };
        ring.inline.enable_batching(64);
        {
            let mut d = Driver::new(&vol, 1);
            let got = d.read_tags(0, 0, nblocks);
            for (b, g) in got.iter().enumerate() {
                assert_eq!(*g, Some(model[b]), "seed {seed} round {round}: block {b}");
            }
        }
        // Each task's writes: (block, tag), blocks of its residue class.
        let plans: Vec<Vec<(u64, u64)>> = (0..TASKS)
            .map(|t| {
                (0..rng.gen_range(5..40))
                    .map(|i| {
                        let b = t + TASKS * rng.gen_range(0..nblocks / TASKS);
                        (b, (round + 1) * 1_000_000 + t * 10_000 + i)
                    })
                    .collect()
            })
            .collect();
        let ex = smol::LocalExecutor::new();
        let tasks: Vec<_> = plans
            .iter()
            .map(|plan| {
                let (ring, vol) = (&ring, &vol);
                ex.spawn(async move {
                    let mut buf = vec![0u8; BS];
                    for &(b, tag) in plan {
                        fill(tag, &mut buf);
                        let r = vol
                            .handle(ring, UBLK_IO_OP_WRITE, 0, b * 8, 8, &mut buf)
                            .await;
                        assert_eq!(r, BS as i32, "write of block {b}");
                        buf.fill(0);
                        let r = vol
                            .handle(ring, UBLK_IO_OP_READ, 0, b * 8, 8, &mut buf)
                            .await;
                        assert_eq!(r, BS as i32, "read of block {b}");
                        assert_eq!(tag_of(&buf), Some(tag), "block {b} read back");
                    }
                })
            })
            .collect();
        while !tasks.iter().all(|t| t.is_finished()) {
            while ex.try_tick() {}
            ring.inline.write_batch();
        }
        for plan in &plans {
            for &(b, tag) in plan {
                model[b as usize] = tag;
            }
        }
        let c = ring.inline.counts();
        counts.batched += c.batched;
        counts.batch_writes += c.batch_writes;
        counts.writes_inline += c.writes_inline;
        counts.writes_ring += c.writes_ring;
        drop(tasks);
        drop(ex);
        drop(ring);
        vol.crash();
        drop(vol);
    }
    counts
}

#[test]
fn batched_journal_records_survive_a_crash() {
    let seed = seed("batched_journal_records_survive_a_crash");
    // On disk: journals refuse RWF_NOWAIT writes (ext4) or take them (xfs, btrfs); either way
    // every record lands, in a batch or on the ring.
    let dir = tempfile::tempdir().unwrap();
    let c = batched_records(dir.path(), seed, InlineMode::Auto);
    eprintln!("on disk: {c:?}");
    if !shm_is_tmpfs() {
        eprintln!("SKIPPED the tmpfs half: /dev/shm is not a tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let c = batched_records(dir.path(), seed, InlineMode::Auto);
    eprintln!("on tmpfs: {c:?}");
    // Plain copies on tmpfs: every record went through a batch, several per write.
    assert!(c.batched > 0 && c.batch_writes > 0, "{c:?}");
    assert!(
        c.batch_writes < c.batched,
        "no batch held two records: {c:?}"
    );
}
