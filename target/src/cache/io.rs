//! The I/O handler: what one ublk request does to the cache. The ublk queues and the
//! host-level tests call the same [`Cache::handle`], each with its own [`Ring`].
//!
//! No lock is held across an await; the only locks taken are the read-cache shards (short,
//! no I/O inside). No allocation per I/O: runs are tracked in a `SmallVec` on the stack.
//!
//! Every plain file read and write is first tried inline ([`Ring::try_read`] /
//! [`Ring::try_write`]: never blocking, see [`crate::ring`]); what that does not finish, and
//! every error, goes on the ring.

use super::meta::{BLOCK_SHIFT, BLOCK_SIZE};
use super::Cache;
use crate::ring::{self, InlineFile, ReqBuf, Ring, FILE_BACKING, FILE_MIRROR};
use smallvec::SmallVec;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Duration;

/// ublk operation codes (`UBLK_IO_OP_*`) and flags, re-exported for callers.
pub use libublk::sys::{
    UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE,
    UBLK_IO_OP_WRITE_ZEROES,
};

/// How long a write waits between checks when the cache is full (backpressure).
const BACKPRESSURE_POLL: Duration = Duration::from_millis(1);
/// How long a write that meets ENOSPC on the SSD retries (waiting for flushes) before failing.
const ENOSPC_WAIT_MAX: Duration = Duration::from_secs(60);
const ENOSPC_POLL: Duration = Duration::from_millis(5);
const SECTOR_SHIFT: u32 = 9;
static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// Where a request's data is: in user memory (the copy path), or in the request's own pages
/// registered in the ring's buffer table (zero copy, [`ReqBuf`]).
pub enum Data<'a> {
    Mem(&'a mut [u8]),
    Req(ReqBuf<'a>),
}

/// The data of a write: in user memory, or the first `len` bytes of registered buffer `index`
/// from buffer-table address `addr0` on (zero copy).
#[derive(Clone, Copy)]
enum WData<'a> {
    Mem(&'a [u8]),
    Fixed { index: u16, addr0: u64, len: usize },
}

impl WData<'_> {
    fn len(&self) -> usize {
        match self {
            WData::Mem(b) => b.len(),
            WData::Fixed { len, .. } => *len,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Src {
    Mirror(usize),
    Clean,
    /// Not local yet (hydrating): fetched from the data plane.
    Remote,
}

impl Cache {
    /// Serves one block request. `start_sector`/`nr_sectors` are in 512-byte sectors, as ublk
    /// gives them; `buf` is the request's data buffer (READ/WRITE). Returns the bytes done or a
    /// negative errno, as the ublk driver expects. While [`Cache::time_requests`] is set (a
    /// metrics endpoint exports the volume), READ, WRITE and FLUSH are timed into the queue's
    /// [`super::LatencyStats`]; otherwise the two clock reads are not paid.
    pub async fn handle<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        buf: &mut [u8],
    ) -> i32 {
        self.handle_data(ring, op, flags, start_sector, nr_sectors, Data::Mem(buf))
            .await
    }

    /// As [`Cache::handle`], for a request whose data stays in its own pages (zero copy):
    /// reads from the mirror or the backing file land there with READ_FIXED, writes go to the
    /// mirror with WRITE_FIXED; what passes through memory (read-cache hits and fills, blocks
    /// fetched from the data plane) goes through `req.scratch` and user copy.
    pub async fn handle_req<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        req: ReqBuf<'_>,
    ) -> i32 {
        self.handle_data(ring, op, flags, start_sector, nr_sectors, Data::Req(req))
            .await
    }

    async fn handle_data<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        data: Data<'_>,
    ) -> i32 {
        if !self.time_requests.load(Relaxed) {
            return self
                .handle_op(ring, op, flags, start_sector, nr_sectors, data)
                .await;
        }
        let t0 = std::time::Instant::now();
        let r = self
            .handle_op(ring, op, flags, start_sector, nr_sectors, data)
            .await;
        let timed = match op {
            UBLK_IO_OP_READ => super::LATENCY_READ,
            UBLK_IO_OP_WRITE => super::LATENCY_WRITE,
            UBLK_IO_OP_FLUSH => super::LATENCY_FLUSH,
            _ => return r,
        };
        self.stats[ring.queue_index() % self.stats.len()].0.latency[timed].record(t0.elapsed());
        r
    }

    async fn handle_op<R: Ring>(
        &self,
        ring: &R,
        op: u32,
        flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        mut data: Data<'_>,
    ) -> i32 {
        if op == UBLK_IO_OP_FLUSH {
            self.stats[ring.queue_index() % self.stats.len()]
                .0
                .flushes
                .fetch_add(1, Relaxed);
            return self.wait_durable(ring).await;
        }
        let bytes = u64::from(nr_sectors) << SECTOR_SHIFT;
        let off = start_sector << SECTOR_SHIFT;
        let block_mask = BLOCK_SIZE - 1;
        if off & block_mask != 0 || bytes & block_mask != 0 || bytes == 0 {
            return -libc::EINVAL;
        }
        match off.checked_add(bytes) {
            Some(end) if end <= self.size_bytes => {}
            _ => return -libc::EINVAL,
        }
        let b0 = off >> BLOCK_SHIFT;
        let n = bytes >> BLOCK_SHIFT;
        if op != UBLK_IO_OP_READ && self.fenced.load(Relaxed) {
            // Recovered elsewhere: nothing written here could reach the volume's chain.
            return -libc::EIO;
        }
        let cap = match &data {
            Data::Mem(b) => b.len(),
            Data::Req(r) => r.scratch.len(),
        };
        match op {
            UBLK_IO_OP_READ | UBLK_IO_OP_WRITE if bytes as usize > cap => -libc::EINVAL,
            UBLK_IO_OP_READ => self.read(ring, b0, n, &mut data).await,
            UBLK_IO_OP_WRITE => {
                let w = match &data {
                    Data::Mem(b) => WData::Mem(&b[..bytes as usize]),
                    Data::Req(r) => WData::Fixed {
                        index: r.index,
                        addr0: r.addr0,
                        len: bytes as usize,
                    },
                };
                let r = self.write(ring, b0, n, w).await;
                if r >= 0 && flags & UBLK_IO_F_FUA != 0 {
                    let s = self.wait_durable(ring).await;
                    if s < 0 {
                        return s;
                    }
                }
                r
            }
            UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES => self.zero(ring, b0, n).await,
            _ => -libc::EOPNOTSUPP,
        }
    }

    async fn wait_durable<R: Ring>(&self, ring: &R) -> i32 {
        match self.syncer.get() {
            Some(s) => s.request(ring.kicker()).await,
            None => match self.sync_durable() {
                Ok(()) => 0,
                Err(e) => e.errno(),
            },
        }
    }

    /// Reads blocks `b0..b0 + n` into the first `n` blocks of `data`.
    async fn read<R: Ring>(&self, ring: &R, b0: u64, n: u64, data: &mut Data<'_>) -> i32 {
        let q = ring.queue_index();
        let st = &self.stats[q % self.stats.len()].0;
        let bytes = n << BLOCK_SHIFT;
        st.reads.fetch_add(1, Relaxed);
        st.read_bytes.fetch_add(bytes, Relaxed);
        // Sampled before the bitmaps are looked at (see readcache's staleness rule).
        let gen = self.rcache.generation();
        let (a, _ga, f, _gf) = loop {
            let a = self.epochs.current();
            let Some(ga) = self.epochs.read_guard(q, a) else {
                continue;
            };
            let f = self.epochs.frozen();
            let gf = if f != 0 && f != a {
                self.epochs.read_guard(q, f)
            } else {
                None
            };
            let f = if gf.is_some() { f } else { 0 };
            break (a, ga, f, gf);
        };
        let sa = &self.slots[(a % 2) as usize].bits;
        let sf = (f != 0).then(|| &self.slots[(f % 2) as usize].bits);
        let hyd = self.hydrating();
        let src_of = |b: u64| {
            // Sampled before the epoch bits: a write marks a block local only after its
            // epoch bit is set, so "not local" here plus "in no epoch" below means the data
            // plane still has its newest contents.
            let local = hyd.is_none_or(|h| h.local.get(b));
            if sa.get(b) {
                Src::Mirror((a % 2) as usize)
            } else if sf.is_some_and(|bf| bf.get(b)) {
                Src::Mirror((f % 2) as usize)
            } else if local {
                Src::Clean
            } else {
                Src::Remote
            }
        };
        // Runs of blocks with one source, in order.
        let mut runs: SmallVec<[(u64, u64, Src); 8]> = SmallVec::new();
        for i in 0..n {
            let s = src_of(b0 + i);
            match runs.last_mut() {
                Some((_, len, src)) if *src == s => *len += 1,
                _ => runs.push((i, 1, s)),
            }
        }
        for (i, len, src) in runs {
            let lo = (i << BLOCK_SHIFT) as usize;
            let hi = ((i + len) << BLOCK_SHIFT) as usize;
            let r = match (src, &mut *data) {
                (Src::Mirror(s), Data::Mem(buf)) => {
                    self.read_file(ring, FILE_MIRROR[s], b0 + i, &mut buf[lo..hi])
                        .await
                }
                (Src::Clean, Data::Mem(buf)) => {
                    self.read_clean(ring, b0 + i, &mut buf[lo..hi], gen).await
                }
                (Src::Remote, Data::Mem(buf)) => {
                    self.read_remote(ring, b0 + i, &mut buf[lo..hi]).await
                }
                // Zero copy: from the files straight into the request; with a read cache to
                // look in and fill, or from the data plane, through memory and user copy.
                (Src::Mirror(s), Data::Req(rq)) => {
                    self.read_fixed(ring, FILE_MIRROR[s], b0 + i, rq, lo, hi)
                        .await
                }
                (Src::Clean, Data::Req(rq)) if !self.rcache.enabled() => {
                    self.read_fixed(ring, FILE_BACKING, b0 + i, rq, lo, hi)
                        .await
                }
                (Src::Clean, Data::Req(rq)) => {
                    let r = self
                        .read_clean(ring, b0 + i, &mut rq.scratch[lo..hi], gen)
                        .await;
                    if r < 0 {
                        r
                    } else {
                        rq.copy_in(lo, &rq.scratch[lo..hi])
                    }
                }
                (Src::Remote, Data::Req(rq)) => {
                    let r = self
                        .read_remote(ring, b0 + i, &mut rq.scratch[lo..hi])
                        .await;
                    if r < 0 {
                        r
                    } else {
                        rq.copy_in(lo, &rq.scratch[lo..hi])
                    }
                }
            };
            if r < 0 {
                return r;
            }
        }
        bytes as i32
    }

    /// Reads blocks from `b0` on of registered file `file` into bytes `lo..hi` of the zero-copy
    /// request `rq` (READ_FIXED; never inline: the data does not pass through user memory).
    async fn read_fixed<R: Ring>(
        &self,
        ring: &R,
        file: u32,
        b0: u64,
        rq: &ReqBuf<'_>,
        lo: usize,
        hi: usize,
    ) -> i32 {
        let off = b0 << BLOCK_SHIFT;
        let mut done = 0usize;
        while lo + done < hi {
            let len = (hi - lo - done) as u32;
            let sqe =
                ring::read_fixed_sqe(file, rq.index, rq.addr(lo + done), len, off + done as u64);
            // SAFETY: the SQE names the request's registered buffer, which stays registered
            // until this tag commits the request, after this await (ReqBuf's contract).
            let r = unsafe { ring.submit(sqe) }.await;
            if r < 0 {
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    continue;
                }
                return r;
            }
            if r == 0 {
                // Past the end of a file that must be volume-sized: refuse to invent data.
                return -libc::EIO;
            }
            done += r as usize;
        }
        0
    }

    /// Reads blocks that no epoch holds: from the read cache, else the backing file.
    async fn read_clean<R: Ring>(&self, ring: &R, b0: u64, buf: &mut [u8], gen: u64) -> i32 {
        let st = &self.stats[ring.queue_index() % self.stats.len()].0;
        let n = (buf.len() as u64) >> BLOCK_SHIFT;
        let mut i = 0u64;
        while i < n {
            let blk = |k: u64| ((k << BLOCK_SHIFT) as usize)..(((k + 1) << BLOCK_SHIFT) as usize);
            if self.rcache.get(b0 + i, &mut buf[blk(i)]) {
                st.rcache_hits.fetch_add(1, Relaxed);
                i += 1;
                continue;
            }
            // A run of misses, read from the backing file in one go.
            let mut j = i + 1;
            while j < n && !self.rcache.get(b0 + j, &mut buf[blk(j)]) {
                j += 1;
            }
            let lo = (i << BLOCK_SHIFT) as usize;
            let hi = (j << BLOCK_SHIFT) as usize;
            let r = self
                .read_file(ring, FILE_BACKING, b0 + i, &mut buf[lo..hi])
                .await;
            if r < 0 {
                return r;
            }
            st.rcache_misses.fetch_add(j - i, Relaxed);
            for k in i..j {
                self.rcache.insert_if_current(b0 + k, &buf[blk(k)], gen);
            }
            if j < n {
                // Block j was a hit while probing.
                st.rcache_hits.fetch_add(1, Relaxed);
            }
            i = j + 1;
        }
        0
    }

    /// Reads blocks not yet hydrated: their extents are fetched from the data plane (one fetch
    /// shared by concurrent reads of an extent), installed in the backing file, and copied out.
    async fn read_remote<R: Ring>(&self, ring: &R, b0: u64, buf: &mut [u8]) -> i32 {
        use crate::hydrate::HYDRATE_EXTENT_BLOCKS as EXT;
        let Some(fetch) = self.hydration.as_ref().and_then(|h| h.fetch.get()) else {
            return -libc::EIO;
        };
        let n = (buf.len() as u64) >> BLOCK_SHIFT;
        let mut b = b0;
        while b < b0 + n {
            let ext = b / EXT;
            let end = ((ext + 1) * EXT).min(b0 + n);
            let data = match fetch.request(ext, ring.kicker()).await {
                Ok(d) => d,
                Err(e) => return e,
            };
            let src = ((b - ext * EXT) << BLOCK_SHIFT) as usize;
            let dst = ((b - b0) << BLOCK_SHIFT) as usize;
            let len = ((end - b) << BLOCK_SHIFT) as usize;
            if src + len > data.len() {
                return -libc::EIO;
            }
            buf[dst..dst + len].copy_from_slice(&data[src..src + len]);
            b = end;
        }
        0
    }

    async fn read_file<R: Ring>(&self, ring: &R, file: u32, b0: u64, buf: &mut [u8]) -> i32 {
        let off = b0 << BLOCK_SHIFT;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            if let Some(n) = ring.try_read(file, rest, off + done as u64) {
                done += n;
                continue;
            }
            let sqe = ring::read_sqe(
                file,
                rest.as_mut_ptr(),
                rest.len() as u32,
                off + done as u64,
            );
            // SAFETY: `rest` is borrowed mutably for the whole await and the future is awaited
            // to completion here (buffer contract of `ring`).
            let r = unsafe { ring.submit(sqe) }.await;
            if r < 0 {
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    continue;
                }
                return r;
            }
            if r == 0 {
                // Past the end of a file that must be volume-sized: refuse to invent data.
                return -libc::EIO;
            }
            done += r as usize;
        }
        0
    }

    async fn write_file<R: Ring>(&self, ring: &R, file: u32, off: u64, buf: &[u8]) -> i32 {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            if let Some(n) = ring.try_write(InlineFile::Fixed(file), rest, off + done as u64) {
                done += n;
                continue;
            }
            let sqe = ring::write_sqe(file, rest.as_ptr(), rest.len() as u32, off + done as u64);
            // SAFETY: `rest` is borrowed for the whole await, awaited to completion here.
            let r = unsafe { ring.submit(sqe) }.await;
            if r < 0 {
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    continue;
                }
                return r;
            }
            if r == 0 {
                return -libc::EIO;
            }
            done += r as usize;
        }
        0
    }

    /// Writes bytes `from..` of `data` to registered file `file`, whose byte 0 goes at `off`.
    async fn write_data<R: Ring>(
        &self,
        ring: &R,
        file: u32,
        off: u64,
        data: WData<'_>,
        from: usize,
    ) -> i32 {
        let (index, addr0, len) = match data {
            WData::Mem(buf) => {
                return self
                    .write_file(ring, file, off + from as u64, &buf[from..])
                    .await
            }
            WData::Fixed { index, addr0, len } => (index, addr0, len),
        };
        let mut done = from;
        while done < len {
            let sqe = ring::write_fixed_sqe(
                file,
                index,
                addr0 + done as u64,
                (len - done) as u32,
                off + done as u64,
            );
            // SAFETY: the SQE names the request's registered buffer, which stays registered
            // until this tag commits the request, after this await (ReqBuf's contract).
            let r = unsafe { ring.submit(sqe) }.await;
            if r < 0 {
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    continue;
                }
                return r;
            }
            if r == 0 {
                return -libc::EIO;
            }
            done += r as usize;
        }
        0
    }

    /// Waits while the SSD cache is at its limit (backpressure), nudging the flush thread.
    async fn wait_for_room<R: Ring>(&self, ring: &R) {
        let mut waited = false;
        while self.ssd_used_blocks() >= self.cache_limit_blocks {
            if !waited {
                waited = true;
                self.stats[ring.queue_index() % self.stats.len()]
                    .0
                    .backpressure_waits
                    .fetch_add(1, Relaxed);
            }
            self.watermark_hit.store(true, SeqCst);
            ring.sleep(BACKPRESSURE_POLL).await;
        }
        if self.ssd_used_blocks() >= self.high_water_blocks && !self.watermark_hit.load(Relaxed) {
            self.watermark_hit.store(true, SeqCst);
        }
    }

    async fn write<R: Ring>(&self, ring: &R, b0: u64, n: u64, buf: WData<'_>) -> i32 {
        let st = &self.stats[ring.queue_index() % self.stats.len()].0;
        st.writes.fetch_add(1, Relaxed);
        st.write_bytes.fetch_add(buf.len() as u64, Relaxed);
        let mut enospc_since: Option<std::time::Instant> = None;
        let (g, s) = loop {
            self.wait_for_room(ring).await;
            let g = self.epochs.enter_write();
            let s = g.slot();
            let r = self.write_journaled(ring, g.epoch, s, b0, n, buf).await;
            if r == -libc::ENOSPC {
                // The SSD filesystem is full before the cache limit: backpressure, as at the
                // limit. Leave the epoch (the cut must not wait for us), ask for a flush,
                // which frees the frozen mirror, and try again; fail only after a bound.
                drop(g);
                if enospc_since.is_none() {
                    tracing::warn!(volume = %self.name, block = b0, "SSD cache filesystem full (ENOSPC): the write waits for the flush");
                }
                let t0 = *enospc_since.get_or_insert_with(std::time::Instant::now);
                if t0.elapsed() >= ENOSPC_WAIT_MAX {
                    tracing::error!(volume = %self.name, block = b0, waited_ms = t0.elapsed().as_millis() as u64, "SSD cache full (ENOSPC) and flushing frees no room: write failed");
                    return r;
                }
                st.backpressure_waits.fetch_add(1, Relaxed);
                self.watermark_hit.store(true, SeqCst);
                ring.sleep(ENOSPC_POLL).await;
                continue;
            }
            if r < 0 {
                return r;
            }
            break (g, s);
        };
        self.slots[s].mark(b0, n, true);
        if let Some(h) = self.hydrating() {
            h.local.set_range(b0, n);
        }
        drop(g);
        buf.len() as i32
    }

    /// Writes `buf` to slot `s`'s mirror, then its membership record to the slot's journal.
    ///
    /// The record must never land without the data (a replay would then claim a block the
    /// mirror does not hold). Inline first (data in user memory only): the data, and only once
    /// all of it is written, the record. Else the two are one linked pair on the ring (the data
    /// a plain write, or a WRITE_FIXED from the request's own pages under zero copy): the
    /// kernel starts the journal write only once the data write completed in full, with no
    /// round trip through the event loop in between. A short or failed data write cancels the
    /// record; the data is then finished with plain writes and the record written after it.
    async fn write_journaled<R: Ring>(
        &self,
        ring: &R,
        epoch: u64,
        s: usize,
        b0: u64,
        n: u64,
        buf: WData<'_>,
    ) -> i32 {
        use std::os::fd::AsRawFd;
        let off = b0 << BLOCK_SHIFT;
        let Some(j) = self.journals.get().filter(|j| j.takes_records()) else {
            // No journal, or a bitmap journal: the bits the caller sets once this returns
            // are the record.
            return self.write_data(ring, FILE_MIRROR[s], off, buf, 0).await;
        };
        let rec = super::journal::record(epoch, b0, n, false);
        let (f, joff) = j.reserve(s, ring.queue_index());
        let len = buf.len();
        if let WData::Mem(mem) = buf {
            if let Some(done) = ring.try_write(InlineFile::Fixed(FILE_MIRROR[s]), mem, off) {
                // Part or all of the data is in: the rest as any write (inline, else the
                // ring), then the record.
                if done < len {
                    let r = self.write_data(ring, FILE_MIRROR[s], off, buf, done).await;
                    if r < 0 {
                        return r;
                    }
                }
                return self.append_record(ring, f, joff, &rec).await;
            }
        }
        let data = match buf {
            WData::Mem(mem) => ring::write_sqe(FILE_MIRROR[s], mem.as_ptr(), len as u32, off),
            WData::Fixed { index, addr0, len } => {
                ring::write_fixed_sqe(FILE_MIRROR[s], index, addr0, len as u32, off)
            }
        };
        let jsqe = ring::fd_write_sqe(f.as_raw_fd(), rec.as_ptr(), rec.len() as u32, joff);
        // SAFETY: `buf` is borrowed (or, zero copy, the request's buffer stays registered
        // until this tag commits it, see ReqBuf) and `rec` lives in this frame, the journal
        // file in `self`, all until the pair's future (awaited to completion here) resolves.
        let (rd, rj) = unsafe { ring.submit_linked(data, len as i32, jsqe) }.await;
        if rd == len as i32 && rj == rec.len() as i32 {
            return 0;
        }
        if rd != len as i32 {
            // Failed or short: finish (or retry) the data, then the record on its own.
            let done = rd.max(0) as usize;
            if rd < 0 && rd != -libc::EINTR && rd != -libc::EAGAIN {
                return rd;
            }
            let r = self.write_data(ring, FILE_MIRROR[s], off, buf, done).await;
            if r < 0 {
                return r;
            }
        } else if rj >= 0 {
            // A short journal append: never expected on a regular file; refuse to guess.
            return -libc::EIO;
        } else if rj != -libc::ECANCELED && rj != -libc::EINTR && rj != -libc::EAGAIN {
            return rj;
        }
        // The record did not land: write it at its reserved place.
        self.append_record(ring, f, joff, &rec).await
    }

    /// Appends the membership record of a completed write to its slot's journal (page cache
    /// only: it is for a daemon crash, see [`super::journal`]).
    async fn journal<R: Ring>(
        &self,
        ring: &R,
        epoch: u64,
        s: usize,
        b0: u64,
        n: u64,
        zero: bool,
    ) -> i32 {
        let Some(j) = self.journals.get().filter(|j| j.takes_records()) else {
            return 0;
        };
        let rec = super::journal::record(epoch, b0, n, zero);
        let (f, off) = j.reserve(s, ring.queue_index());
        self.append_record(ring, f, off, &rec).await
    }

    /// Writes record `rec` at `off` (reserved) in journal `f`: in the ring's batch of this
    /// round if it keeps one, else inline if it can, else on the ring.
    async fn append_record<R: Ring>(
        &self,
        ring: &R,
        f: &std::fs::File,
        off: u64,
        rec: &[u8; super::journal::RECORD_BYTES as usize],
    ) -> i32 {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let done = match ring.defer_write(fd, rec, off) {
            Some(d) => d.await,
            None => ring.try_write(InlineFile::Journal(fd), rec, off),
        };
        let r = match done {
            Some(k) => k as i32,
            None => {
                let sqe = ring::fd_write_sqe(fd, rec.as_ptr(), rec.len() as u32, off);
                // SAFETY: `rec` is borrowed and the file lives in `self`, both until the await
                // below completes.
                unsafe { ring.submit(sqe) }.await
            }
        };
        if r == rec.len() as i32 {
            0
        } else if r < 0 {
            r
        } else {
            -libc::EIO
        }
    }

    /// DISCARD and WRITE_ZEROES: the range reads as zeros from now on. Recorded in the epoch
    /// as a punched hole in the mirror (no SSD space used), shipped as a zero extent.
    async fn zero<R: Ring>(&self, ring: &R, b0: u64, n: u64) -> i32 {
        let g = self.epochs.enter_write();
        let s = g.slot();
        let off = b0 << BLOCK_SHIFT;
        let len = n << BLOCK_SHIFT;
        // SAFETY: the SQE points at no memory.
        let r = unsafe { ring.submit(ring::punch_sqe(FILE_MIRROR[s], off, len)) }.await;
        if r == -libc::EOPNOTSUPP || r == -libc::EINVAL {
            // No hole punching on the cache filesystem: write zeros instead.
            let mut done = 0u64;
            while done < len {
                let chunk = (len - done).min(ZEROS.len() as u64) as usize;
                let w = self
                    .write_file(ring, FILE_MIRROR[s], off + done, &ZEROS[..chunk])
                    .await;
                if w < 0 {
                    return w;
                }
                done += chunk as u64;
            }
        } else if r < 0 {
            return r;
        }
        let r = self.journal(ring, g.epoch, s, b0, n, true).await;
        if r < 0 {
            return r;
        }
        self.slots[s].mark(b0, n, false);
        if let Some(h) = self.hydrating() {
            h.local.set_range(b0, n);
        }
        drop(g);
        0
    }
}
