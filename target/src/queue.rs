//! ublk queue threads: one thread, one io_uring and one `smol::LocalExecutor` per queue, one
//! async task per tag. Each task posts FETCH, then loops: serve the request through
//! [`Volume::handle`] on the queue's own ring → COMMIT_AND_FETCH. A per-queue [`Kicker`] task
//! keeps a read posted on an eventfd so that other threads (the syncer) can wake the ring.
//!
//! Per-tag I/O buffers are allocated once when the task starts (never per I/O), and a request
//! is committed only after every SQE it issued has completed (see [`crate::ring`]). Plain reads
//! and writes are first tried inline on the queue thread without blocking (one [`Inline`] per
//! queue, see the ring module's "Inline first attempts").
//!
//! A device made with zero copy ([`crate::zerocopy`]) has its tasks fetch with auto buffer
//! registration at index = tag, and serve each request from its own pages
//! ([`Volume::handle_req`]); the per-tag buffer then only carries what passes through memory.
//! A request the kernel could not register (`UBLK_IO_F_NEED_REG_BUF`) is served whole on the
//! copy path, its data moved by user copy.

use crate::ring::{Inline, InlineMode, Kicker, ReqBuf, Ring, UblkRing};
use crate::volume::Volume;
use crate::zerocopy::IoPath;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use std::rc::Rc;
use std::sync::Arc;

/// Runs queue `qid` until the device stops. Called on the queue's own thread by libublk.
pub fn run_queue(qid: u16, dev: &UblkDev, vol: Arc<Volume>, kicker: Arc<Kicker>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "cannot set up ublk queue");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let buf_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let path = IoPath::of_device(dev.dev_info.flags);
    let _ = vol.io_path.set(path);
    let cdev = dev.tgt.fds[0];
    let inline = {
        use std::os::fd::AsRawFd;
        let c = &vol.cache;
        Rc::new(Inline::new(
            InlineMode::from_env(),
            [c.mirrors[0].as_raw_fd(), c.mirrors[1].as_raw_fd()],
            c.backing.as_raw_fd(),
        ))
    };
    // Journal records are batched per round: `run_ops` below writes each round's batch.
    if std::env::var("DELTAVOL_JOURNAL_BATCH").as_deref() != Ok("off") {
        inline.enable_batching(usize::from(dev.dev_info.queue_depth));
    }
    tracing::info!(queue = qid, mode = ?inline.mode(), files = %inline.describe(), path = ?path, "inline I/O");
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let vol = vol.clone();
        let kicker = kicker.clone();
        let inline = inline.clone();
        tasks.push(exe.spawn(async move {
            let ring = UblkRing {
                queue: &q,
                index: usize::from(qid),
                kicker,
                inline: &inline,
            };
            let r = match path {
                IoPath::Copy => io_task(&ring, &q, tag, buf_bytes, &vol).await,
                IoPath::ZeroCopy => zc_io_task(&ring, &q, tag, buf_bytes, cdev, &vol).await,
            };
            match r {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(queue = qid, tag, error = %e, "ublk io task failed"),
            }
        }));
    }
    // The wake-up reader: completes whenever another thread kicks this ring.
    let kq = q.clone();
    let kk = kicker.clone();
    let ki = inline.clone();
    let _kick_task = exe.spawn(async move {
        let ring = UblkRing {
            queue: &kq,
            index: usize::from(qid),
            kicker: kk.clone(),
            inline: &ki,
        };
        loop {
            // SAFETY: the read targets the Kicker's own buffer, which the volume keeps alive
            // for longer than this queue's ring (the ring is torn down first).
            let r = unsafe { ring.submit(kk.read_sqe()) }.await;
            if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
                break;
            }
        }
    });
    let e2 = exe.clone();
    let bi = inline.clone();
    smol::block_on(exe.run(async move {
        // Run every runnable task; then write the journal records they deferred (one write
        // per run of records) and run the tasks that woke, until a round defers none.
        let run_ops = || loop {
            while e2.try_tick() {}
            if bi.write_batch() == 0 {
                break;
            }
        };
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(queue = qid, error = %e, "ublk queue event loop failed");
        }
    }));
    let c = inline.counts();
    tracing::info!(
        queue = qid,
        reads_inline = c.reads_inline,
        reads_ring = c.reads_ring,
        writes_inline = c.writes_inline,
        writes_ring = c.writes_ring,
        records_batched = c.batched,
        batch_writes = c.batch_writes,
        files = %inline.describe(),
        "queue stopped: inline I/O"
    );
}

async fn io_task(
    ring: &UblkRing<'_>,
    q: &UblkQueue<'_>,
    tag: u16,
    buf_bytes: usize,
    vol: &Volume,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(buf_bytes);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let flags = iod.op_flags & !0xff;
        let (start, nr) = (iod.start_sector, iod.nr_sectors);
        let res = vol
            .handle(ring, op, flags, start, nr, buf.as_mut_slice())
            .await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// A tag's task on a zero-copy device: FETCH and COMMIT_AND_FETCH ask the kernel to register
/// each request's pages at index `tag` of this queue's ring (falling back to a flagged,
/// unregistered request rather than failing it); the request is served from those pages.
async fn zc_io_task(
    ring: &UblkRing<'_>,
    q: &UblkQueue<'_>,
    tag: u16,
    buf_bytes: usize,
    cdev: std::os::fd::RawFd,
    vol: &Volume,
) -> Result<(), UblkError> {
    // Only what passes through memory uses it (read-cache hits and fills, data-plane blocks).
    let mut scratch = IoBuf::<u8>::new(buf_bytes);
    let reg = sys::ublk_auto_buf_reg {
        index: tag,
        flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
        reserved0: 0,
        reserved1: 0,
    };
    let copy_pos = libublk::io::UblkIOCtx::ublk_user_copy_pos(q.get_qid(), tag, 0);
    q.submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None)
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let flags = iod.op_flags & !0xff;
        let (start, nr) = (iod.start_sector, iod.nr_sectors);
        let res = if flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 {
            serve_copied(
                ring,
                vol,
                op,
                flags,
                start,
                nr,
                cdev,
                copy_pos,
                scratch.as_mut_slice(),
            )
            .await
        } else {
            let req = ReqBuf {
                index: tag,
                addr0: 0,
                copy_fd: cdev,
                copy_pos,
                scratch: scratch.as_mut_slice(),
            };
            vol.handle_req(ring, op, flags, start, nr, req).await
        };
        q.submit_io_commit_cmd(tag, BufDesc::AutoReg(reg), res)
            .await?;
    }
}

/// Serves a request of a zero-copy device that the kernel could not register
/// (`UBLK_IO_F_NEED_REG_BUF`) on the copy path: a write's data is copied out of the request
/// first, a read's copied into it after (user copy on `/dev/ublkcN`).
#[allow(clippy::too_many_arguments)]
async fn serve_copied(
    ring: &UblkRing<'_>,
    vol: &Volume,
    op: u32,
    flags: u32,
    start: u64,
    nr: u32,
    cdev: std::os::fd::RawFd,
    copy_pos: u64,
    buf: &mut [u8],
) -> i32 {
    use crate::cache::io::{UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
    let bytes = (nr as usize) << 9;
    if bytes > buf.len() {
        return -libc::EINVAL;
    }
    // Only its user copy is used here.
    let user = ReqBuf {
        index: 0,
        addr0: 0,
        copy_fd: cdev,
        copy_pos,
        scratch: &mut [],
    };
    if op == UBLK_IO_OP_WRITE {
        let r = user.copy_out(0, &mut buf[..bytes]);
        if r < 0 {
            return r;
        }
    }
    let res = vol.handle(ring, op, flags, start, nr, buf).await;
    if op == UBLK_IO_OP_READ && res > 0 {
        let r = user.copy_in(0, &buf[..res as usize]);
        if r < 0 {
            return r;
        }
    }
    res
}
