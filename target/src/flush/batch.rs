//! Batched file I/O for the flush thread: many positioned reads (or writes) of one file put
//! on a private io_uring and submitted with one `io_uring_enter`, instead of one `pread` /
//! `pwrite` syscall per extent (an epoch of random 4k writes has tens of thousands of them).
//!
//! Buffer contract: every SQE points into the buffer borrowed by [`BatchIo::run`] for the
//! whole call, and the call returns only once the CQE of every SQE it pushed is reaped, so the
//! kernel never touches the buffer after it. A wait that fails for a reason other than an
//! interruption (a broken ring) would leave that unknowable: the process aborts rather than
//! free or reuse a buffer the kernel may still write.
//!
//! The ring is the flush thread's own (not a ublk queue's): it is not [`crate::ring`]'s, whose
//! rings belong to the queue threads.

use io_uring::{opcode, types, IoUring};
use std::os::fd::RawFd;

/// SQEs per `io_uring_enter` (the ring's size).
pub const BATCH_OPS_MAX: usize = 256;

/// One positioned transfer: `len` bytes at file offset `off`, from or to `buf[at..at + len]`.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub off: u64,
    pub at: usize,
    pub len: usize,
}

pub struct BatchIo {
    ring: IoUring,
}

impl BatchIo {
    pub fn new() -> std::io::Result<BatchIo> {
        Ok(BatchIo {
            ring: IoUring::new(BATCH_OPS_MAX as u32)?,
        })
    }

    /// Reads (`write` false) or writes `ops` on `fd` to or from `buf`; `res[i]` gets op `i`'s
    /// result: bytes transferred (maybe short) or a negative errno. Every op's range must lie
    /// in `buf` (checked: a bad range panics before anything is submitted).
    pub fn run(&mut self, fd: RawFd, write: bool, buf: &mut [u8], ops: &[Op], res: &mut Vec<i32>) {
        res.clear();
        res.resize(ops.len(), 0);
        for op in ops {
            assert!(
                op.at.checked_add(op.len).is_some_and(|e| e <= buf.len())
                    && u32::try_from(op.len).is_ok(),
                "batch op {op:?} outside its buffer of {} bytes",
                buf.len()
            );
        }
        let base = buf.as_mut_ptr();
        for (chunk_no, chunk) in ops.chunks(BATCH_OPS_MAX).enumerate() {
            let first = chunk_no * BATCH_OPS_MAX;
            {
                let mut sq = self.ring.submission();
                for (k, op) in chunk.iter().enumerate() {
                    // The range was checked against `buf` above.
                    let p = base.wrapping_add(op.at);
                    let sqe = if write {
                        opcode::Write::new(types::Fd(fd), p, op.len as u32)
                            .offset(op.off)
                            .build()
                    } else {
                        opcode::Read::new(types::Fd(fd), p, op.len as u32)
                            .offset(op.off)
                            .build()
                    };
                    let sqe = sqe.user_data((first + k) as u64);
                    // SAFETY: `p..p + len` lies in `buf` (checked above), which stays borrowed
                    // until every CQE of this chunk is reaped below; the ring has room for a
                    // whole chunk (BATCH_OPS_MAX entries, and nothing else is queued on it).
                    if unsafe { sq.push(&sqe) }.is_err() {
                        unreachable!("the submission queue holds a whole chunk");
                    }
                }
            }
            let mut left = chunk.len();
            while left > 0 {
                match self.ring.submit_and_wait(left) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "the flush thread's io_uring failed with I/O in flight: aborting rather than reuse a buffer the kernel may still write");
                        std::process::abort();
                    }
                }
                for cqe in self.ring.completion() {
                    let i = cqe.user_data() as usize;
                    if let Some(r) = res.get_mut(i) {
                        *r = cqe.result();
                    }
                    left -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn scattered_reads_and_writes_land_where_asked() {
        let f = tempfile::tempfile().unwrap();
        let Ok(mut io) = BatchIo::new() else {
            eprintln!("skipped: no io_uring here");
            return;
        };
        let mut buf: Vec<u8> = (0..3 * BATCH_OPS_MAX * 16).map(|i| i as u8).collect();
        // More ops than one chunk, scattered, out of order.
        let ops: Vec<Op> = (0..3 * BATCH_OPS_MAX)
            .map(|i| Op {
                off: ((i * 7919) % (3 * BATCH_OPS_MAX)) as u64 * 100,
                at: i * 16,
                len: 16,
            })
            .collect();
        let mut res = Vec::new();
        io.run(f.as_raw_fd(), true, &mut buf, &ops, &mut res);
        assert!(res.iter().all(|&r| r == 16), "{res:?}");
        for op in &ops {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, op.off).unwrap();
            assert_eq!(&b[..], &buf[op.at..op.at + 16]);
        }
        let mut back = vec![0u8; buf.len()];
        io.run(f.as_raw_fd(), false, &mut back, &ops, &mut res);
        assert!(res.iter().all(|&r| r == 16));
        assert_eq!(back, buf);
        // A read past the end is short, not an error.
        let end = f.metadata().unwrap().len();
        let mut one = vec![0u8; 32];
        let op = Op {
            off: end - 8,
            at: 0,
            len: 32,
        };
        io.run(f.as_raw_fd(), false, &mut one, &[op], &mut res);
        assert_eq!(res, vec![8]);
    }
}
