//! Zero copy (`deltavol::zerocopy`): the engine serving a request from its own pages
//! ([`Volume::handle_req`]: READ_FIXED / WRITE_FIXED on the request's registered buffer, user
//! copy for what passes through memory) must give the same bytes as the copy path, on every
//! source a read can come from (the mirror, the backing file with and without the read cache,
//! the read cache), and keep every completed write across a daemon crash (the journal record
//! linked behind the WRITE_FIXED).
//!
//! The host has no ublk driver: the request's pages are stood in for by a shared mapping of a
//! memfd, registered as fixed buffer 0 of each host ring; user copy (`pwrite`/`pread` on
//! `/dev/ublkcN` in the daemon) goes to the memfd, whose pages are the mapping's.

mod common;
use common::*;
use deltavol::cache::io::{UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::ring::ReqBuf;
use deltavol::volume::Volume;
use rand::{Rng, SeedableRng};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The largest request, as the daemon's per-tag buffer.
const REQ_BYTES: usize = 512 << 10;

/// A stand-in for a ublk request's pages: a memfd mapped shared.
struct Pages {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Pages {
    fn new() -> Pages {
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"zc-request".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), REQ_BYTES as i64) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of the memfd's REQ_BYTES; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REQ_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Pages {
            fd,
            ptr: ptr.cast(),
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is REQ_BYTES long and lives as long as `self`; the ring writes
        // into it only while a request is being served, never while this borrow is used.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, REQ_BYTES) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; the rings that registered it are gone.
        unsafe { libc::munmap(self.ptr.cast(), REQ_BYTES) };
    }
}

/// A driver whose rings have the request pages registered as buffer 0.
struct Zc<'a> {
    d: Driver<'a>,
    pages: Pages,
    scratch: Vec<u8>,
}

impl<'a> Zc<'a> {
    fn new(vol: &'a Volume, queues: usize) -> Zc<'a> {
        let d = Driver::new(vol, queues);
        let pages = Pages::new();
        for r in &d.rings {
            // SAFETY: `pages` outlives the rings: fields drop in declaration order, `d` first.
            unsafe { r.register_buffer(pages.ptr, REQ_BYTES) }.expect("register buffer");
        }
        Zc {
            d,
            pages,
            scratch: vec![0u8; REQ_BYTES],
        }
    }

    fn req(&mut self, q: usize, op: u32, flags: u32, block: u64, n: u64) -> i32 {
        let req = ReqBuf {
            index: 0,
            addr0: self.pages.ptr as u64,
            copy_fd: self.pages.fd.as_raw_fd(),
            copy_pos: 0,
            scratch: &mut self.scratch,
        };
        let ring = &self.d.rings[q];
        smol::block_on(
            self.d
                .vol
                .handle_req(ring, op, flags, block * 8, (n * 8) as u32, req),
        )
    }

    fn write_tags(&mut self, q: usize, block: u64, tags: &[u64], fua: bool) -> i32 {
        let p = self.pages.bytes();
        for (i, t) in tags.iter().enumerate() {
            fill(*t, &mut p[i * BS..(i + 1) * BS]);
        }
        let flags = if fua { UBLK_IO_F_FUA } else { 0 };
        self.req(q, UBLK_IO_OP_WRITE, flags, block, tags.len() as u64)
    }

    fn read_tags(&mut self, q: usize, block: u64, n: u64) -> Vec<Option<u64>> {
        self.pages.bytes()[..n as usize * BS].fill(0xa5);
        let r = self.req(q, UBLK_IO_OP_READ, 0, block, n);
        assert_eq!(
            r,
            (n as usize * BS) as i32,
            "zero-copy read of {n} blocks at {block}"
        );
        let p = self.pages.bytes();
        (0..n as usize)
            .map(|i| tag_of(&p[i * BS..(i + 1) * BS]))
            .collect()
    }
}

/// Random requests, each through zero copy or the copy path, checked against a model; the
/// volume is cut and flushed now and then (so reads come from the backing file and the read
/// cache too), and crashes (no flush) between rounds: every completed write must be there.
fn random_mix(read_cache_bytes: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nblocks = 1024u64;
    let mut cfg = config(dir.path(), nblocks * BS as u64, 2);
    cfg.cache.read_cache_bytes = read_cache_bytes;
    cfg.flush_interval = std::time::Duration::from_secs(3600);
    let mut model = vec![0u64; nblocks as usize];
    let mut tag = 1u64;
    for round in 0..4 {
        let vol = open(&cfg);
        let mut zc = Zc::new(&vol, 2);
        let got = zc.read_tags(0, 0, 64);
        for (b, g) in got.iter().enumerate() {
            assert_eq!(
                *g,
                Some(model[b]),
                "seed {seed} round {round}: block {b} after reopen"
            );
        }
        for step in 0..400 {
            let q = rng.gen_range(0..2);
            let n = rng.gen_range(1..=32u64);
            let b = rng.gen_range(0..=nblocks - n);
            match rng.gen_range(0..100) {
                0..=39 => {
                    let tags: Vec<u64> = (0..n).map(|i| tag + i).collect();
                    tag += n;
                    let fua = rng.gen_bool(0.1);
                    let r = if rng.gen_bool(0.8) {
                        zc.write_tags(q, b, &tags, fua)
                    } else {
                        zc.d.write_tags(q, b, &tags, fua)
                    };
                    assert_eq!(r, (n as usize * BS) as i32, "seed {seed}: write");
                    model[b as usize..(b + n) as usize].copy_from_slice(&tags);
                }
                40..=44 => {
                    assert_eq!(
                        zc.d.op(q, UBLK_IO_OP_DISCARD, 0, b, n),
                        0,
                        "seed {seed}: discard"
                    );
                    model[b as usize..(b + n) as usize].fill(0);
                }
                45..=47 => {
                    vol.cut_and_flush().expect("cut and flush");
                }
                _ => {
                    let got = if rng.gen_bool(0.8) {
                        zc.read_tags(q, b, n)
                    } else {
                        zc.d.read_tags(q, b, n)
                    };
                    for (i, g) in got.iter().enumerate() {
                        let blk = b as usize + i;
                        assert_eq!(
                            *g,
                            Some(model[blk]),
                            "seed {seed} round {round} step {step}: block {blk}"
                        );
                    }
                }
            }
        }
        // Everything, through zero copy, before the crash.
        let got = zc.read_tags(1, 0, 128);
        for (b, g) in got.iter().enumerate() {
            assert_eq!(*g, Some(model[b]), "seed {seed} round {round}: block {b}");
        }
        drop(zc);
        vol.crash();
    }
}

#[test]
fn zero_copy_matches_the_model_with_a_read_cache() {
    random_mix(
        1 << 20,
        seed("zero_copy_matches_the_model_with_a_read_cache"),
    );
}

#[test]
fn zero_copy_matches_the_model_without_a_read_cache() {
    random_mix(0, seed("zero_copy_matches_the_model_without_a_read_cache"));
}

/// A request larger than the buffer is refused, as on the copy path.
#[test]
fn an_oversized_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1024 * BS as u64, 1);
    let vol = open(&cfg);
    let mut zc = Zc::new(&vol, 1);
    let n = (REQ_BYTES / BS) as u64 + 1;
    assert_eq!(zc.req(0, UBLK_IO_OP_READ, 0, 0, n), -libc::EINVAL);
    assert_eq!(zc.req(0, UBLK_IO_OP_WRITE, 0, 0, n), -libc::EINVAL);
}
