//! Shared helpers of the host-level tests: a volume on temp files, driven through the same
//! handler the ublk queues call, on host io_urings; block contents derived from a tag so a
//! model can be a flat array of tags.
#![allow(dead_code)]

pub mod dp;
pub mod proxy;

use deltavol::cache::io::{
    UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE,
    UBLK_IO_OP_WRITE_ZEROES,
};
use deltavol::cache::CacheConfig;
use deltavol::flush::NullSink;
use deltavol::ring::HostRing;
use deltavol::volume::{Volume, VolumeConfig};
use std::path::Path;
use std::time::Duration;

pub const BS: usize = 4096;

pub fn config(dir: &Path, size_bytes: u64, nr_queues: usize) -> VolumeConfig {
    VolumeConfig {
        cache: CacheConfig {
            name: "testvol".into(),
            size_bytes: Some(size_bytes),
            cache_dir: dir.join("cache"),
            backing: dir.join("backing.img"),
            cache_limit_bytes: 64 << 20,
            read_cache_bytes: 1 << 20,
            nr_queues,
            create_as: None,
            journal: Default::default(),
        },
        flush_interval: Duration::from_millis(50),
        flush_pacing: false,
        ship: None,
        hydrate_rate_bytes_per_s: 0,
        hydrate_readahead_bytes: deltavol::volume::HYDRATE_READAHEAD_BYTES,
        hydrate_hot_first: true,
        heat_interval: deltavol::volume::HEAT_INTERVAL_DEFAULT,
        fetch_timeout: Duration::from_secs(5),
    }
}

pub fn open(cfg: &VolumeConfig) -> Volume {
    Volume::open_with_sink(cfg, Box::new(NullSink)).expect("open volume")
}

/// Deterministic content of a block holding `tag` (tag 0 = zeros).
pub fn fill(tag: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BS);
    if tag == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in out[8..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// The tag a block holds, or `None` if it is not any tag's content (garbage, torn).
pub fn tag_of(b: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
    let mut exp = vec![0u8; BS];
    fill(tag, &mut exp);
    (exp == b).then_some(tag)
}

/// Drives a volume through host rings, one per queue index.
pub struct Driver<'a> {
    pub vol: &'a Volume,
    pub rings: Vec<HostRing>,
    buf: Vec<u8>,
}

impl<'a> Driver<'a> {
    pub fn new(vol: &'a Volume, queues: usize) -> Driver<'a> {
        Driver {
            vol,
            rings: (0..queues).map(|q| vol.host_ring(q).unwrap()).collect(),
            buf: vec![0u8; 512 << 10],
        }
    }

    pub fn op(&mut self, q: usize, op: u32, flags: u32, block: u64, nblocks: u64) -> i32 {
        let ring = &self.rings[q];
        smol::block_on(self.vol.handle(
            ring,
            op,
            flags,
            block * 8,
            (nblocks * 8) as u32,
            &mut self.buf,
        ))
    }

    pub fn write_tags(&mut self, q: usize, block: u64, tags: &[u64], fua: bool) -> i32 {
        for (i, t) in tags.iter().enumerate() {
            fill(*t, &mut self.buf[i * BS..(i + 1) * BS]);
        }
        let ring = &self.rings[q];
        let flags = if fua { UBLK_IO_F_FUA } else { 0 };
        smol::block_on(self.vol.handle(
            ring,
            UBLK_IO_OP_WRITE,
            flags,
            block * 8,
            (tags.len() * 8) as u32,
            &mut self.buf,
        ))
    }

    /// Reads `n` blocks; returns each block's tag (`None` = garbage).
    pub fn read_tags(&mut self, q: usize, block: u64, n: u64) -> Vec<Option<u64>> {
        let max = (self.buf.len() / BS) as u64;
        let mut out = Vec::with_capacity(n as usize);
        let mut done = 0;
        while done < n {
            let k = (n - done).min(max);
            let r = self.op(q, UBLK_IO_OP_READ, 0, block + done, k);
            assert_eq!(
                r,
                (k as usize * BS) as i32,
                "read of {k} blocks at {} returned {r}",
                block + done
            );
            out.extend((0..k as usize).map(|i| tag_of(&self.buf[i * BS..(i + 1) * BS])));
            done += k;
        }
        out
    }

    pub fn discard(&mut self, q: usize, block: u64, n: u64) -> i32 {
        self.op(q, UBLK_IO_OP_DISCARD, 0, block, n)
    }

    pub fn write_zeroes(&mut self, q: usize, block: u64, n: u64) -> i32 {
        self.op(q, UBLK_IO_OP_WRITE_ZEROES, 0, block, n)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        let ring = &self.rings[q];
        smol::block_on(
            self.vol
                .handle(ring, UBLK_IO_OP_FLUSH, 0, 0, 0, &mut self.buf),
        )
    }
}

/// The seed for a randomized test: `DELTAVOL_SEED` if set, else fresh; printed so a failure
/// can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("DELTAVOL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {s} (replay with DELTAVOL_SEED={s})");
    s
}

/// Runs the `deltavol` binary with `args` (its run state in a private temp dir); returns the
/// exit code, stdout and stderr.
pub fn deltavol(args: &[&str]) -> (i32, String, String) {
    let run_dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_deltavol"))
        .args(args)
        .env("DELTAVOL_RUN_DIR", run_dir.path())
        .output()
        .expect("run deltavol");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}
