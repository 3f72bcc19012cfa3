//! Fault injection: the seam through which tests make the compute side's file I/O fail.
//!
//! Two places do file I/O: the queues, through a [`Ring`] (SSD mirrors, journals, and the
//! backing file for reads), and the flush / shipping threads, through `std::fs` (backing-file
//! writes, punches and syncs; outbox writes and syncs). Both consult a [`FaultPlan`]:
//!
//! - [`FaultRing`] wraps any [`Ring`]; it decodes each SQE's opcode and file (the kernel's SQE
//!   layout) and, when a rule matches, fails it (EIO, ENOSPC), shortens it (a short write:
//!   only a prefix is written and the caller sees the short count) or tears it (a prefix is
//!   written, then the caller sees EIO).
//! - The flush thread and the outbox writer take a plan through
//!   [`crate::flush::Flusher::inject_faults`] and [`crate::ship::ShipHandle::inject_faults`];
//!   each write / punch / sync asks [`FaultPlan::hit`] first.
//!
//! Production never pays for it: volumes run on the plain rings (no wrapper), and the
//! threads' hook is an unset `OnceLock` (one atomic load per extent). A plan is an ordinary
//! value owned by whoever injects, never a global.
//!
//! Rules match a file and an operation, let `skip` matching operations pass first, then fire
//! on at most `count` of them (`None`: for ever), each with `probability` (drawn from the
//! plan's seeded generator, so a run replays from its seed). Every injected fault is counted
//! by kind ([`FaultPlan::counts`]).

use crate::ring::{Kicker, Ring, FILE_BACKING, FILE_MIRROR};
use io_uring::{opcode, squeue};
use rand::{Rng as _, SeedableRng};
use serde::Serialize;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which file an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FaultFile {
    /// SSD mirror slot 0 or 1.
    Mirror(usize),
    /// The backing file (permanent storage).
    Backing,
    /// A plain (unregistered) fd on a ring: the membership journals.
    Journal,
    /// An outbox entry.
    Outbox,
    /// Anything else.
    Other,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FaultOp {
    Read,
    Write,
    /// `fdatasync` / `fsync`.
    Sync,
    /// Hole punching (`fallocate`).
    Punch,
}

/// What is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FaultKind {
    /// The operation fails with EIO, nothing done.
    Eio,
    /// The operation fails with ENOSPC, nothing done.
    Enospc,
    /// A write does only the first half (block aligned when it can) and reports that.
    Short,
    /// A write does only its first `torn_bytes` (see [`Rule::torn_bytes`]), then reports EIO.
    Torn,
}

impl FaultKind {
    fn index(self) -> usize {
        self as usize
    }

    /// The errno this fault reports (`Short` reports a count, not an errno).
    pub fn errno(self) -> i32 {
        match self {
            FaultKind::Enospc => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

/// One injection rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The file to match (`None`: any).
    pub file: Option<FaultFile>,
    /// The operation to match (`None`: any).
    pub op: Option<FaultOp>,
    pub kind: FaultKind,
    /// Matching operations let through before the rule starts firing.
    pub skip: u64,
    /// Faults to inject at most (`None`: no limit).
    pub count: Option<u64>,
    /// Chance that a matching operation (past `skip`) is hit.
    pub probability: f64,
    /// For [`FaultKind::Torn`]: how many bytes of the write land (clamped below its length).
    pub torn_bytes: u64,
}

impl Rule {
    /// Hits every matching operation, for ever.
    pub fn always(file: FaultFile, op: FaultOp, kind: FaultKind) -> Rule {
        Rule {
            file: Some(file),
            op: Some(op),
            kind,
            skip: 0,
            count: None,
            probability: 1.0,
            torn_bytes: 4096,
        }
    }

    /// Hits the next `count` matching operations.
    pub fn times(file: FaultFile, op: FaultOp, kind: FaultKind, count: u64) -> Rule {
        Rule {
            count: Some(count),
            ..Rule::always(file, op, kind)
        }
    }
}

struct RuleState {
    rule: Rule,
    seen: u64,
    fired: u64,
}

/// Faults injected so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub eio: u64,
    pub enospc: u64,
    pub short: u64,
    pub torn: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.eio + self.enospc + self.short + self.torn
    }
}

/// A set of rules and the counts of what they injected. Shared (`Arc`) between the ring
/// wrapper, the flush thread and the test that drives them.
pub struct FaultPlan {
    rules: Mutex<Vec<RuleState>>,
    rng: Mutex<rand::rngs::StdRng>,
    counts: [AtomicU64; 4],
}

impl FaultPlan {
    pub fn new(seed: u64) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            rules: Mutex::new(Vec::new()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            counts: Default::default(),
        })
    }

    pub fn add(&self, rule: Rule) {
        self.lock().push(RuleState {
            rule,
            seen: 0,
            fired: 0,
        });
    }

    /// Removes every rule (the counts stay).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RuleState>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides whether an operation is hit; the first matching rule that fires wins. Counts
    /// the fault when one is returned.
    pub fn hit(&self, file: FaultFile, op: FaultOp) -> Option<(FaultKind, u64)> {
        let mut rules = self.lock();
        for r in rules.iter_mut() {
            if r.rule.file.is_some_and(|f| f != file) || r.rule.op.is_some_and(|o| o != op) {
                continue;
            }
            r.seen += 1;
            if r.seen <= r.rule.skip || r.rule.count.is_some_and(|c| r.fired >= c) {
                continue;
            }
            let p = r.rule.probability;
            let fire = p >= 1.0
                || (p > 0.0
                    && self
                        .rng
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .gen_bool(p));
            if fire {
                r.fired += 1;
                self.counts[r.rule.kind.index()].fetch_add(1, Relaxed);
                return Some((r.rule.kind, r.rule.torn_bytes));
            }
        }
        None
    }

    /// Faults injected so far, by kind.
    pub fn counts(&self) -> FaultCounts {
        let c = |k: FaultKind| self.counts[k.index()].load(Relaxed);
        FaultCounts {
            eio: c(FaultKind::Eio),
            enospc: c(FaultKind::Enospc),
            short: c(FaultKind::Short),
            torn: c(FaultKind::Torn),
        }
    }

    /// A `std::fs` write of `buf` at `off` to `f`, through the plan: EIO / ENOSPC fail it
    /// before anything is written; a torn write writes a prefix then fails; a short write
    /// writes half, then the rest (`write_all_at` semantics: the caller sees success).
    pub fn write_all_at(
        plan: Option<&FaultPlan>,
        which: FaultFile,
        f: &std::fs::File,
        buf: &[u8],
        off: u64,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Some((kind, torn)) = plan.and_then(|p| p.hit(which, FaultOp::Write)) {
            match kind {
                FaultKind::Eio | FaultKind::Enospc => {
                    return Err(std::io::Error::from_raw_os_error(kind.errno()))
                }
                FaultKind::Torn => {
                    let k = (torn as usize).min(buf.len().saturating_sub(1));
                    f.write_all_at(&buf[..k], off)?;
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
                FaultKind::Short => {
                    let k = buf.len() / 2;
                    f.write_all_at(&buf[..k], off)?;
                    return f.write_all_at(&buf[k..], off + k as u64);
                }
            }
        }
        f.write_all_at(buf, off)
    }

    /// A sync (`op` = [`FaultOp::Sync`]) or punch through the plan: fails with the fault's
    /// errno when hit, else runs `real`.
    pub fn gate<T>(
        plan: Option<&FaultPlan>,
        which: FaultFile,
        op: FaultOp,
        real: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if let Some((kind, _)) = plan.and_then(|p| p.hit(which, op)) {
            if kind != FaultKind::Short {
                return Err(std::io::Error::from_raw_os_error(kind.errno()));
            }
        }
        real()
    }
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "eio={} enospc={} short={} torn={}",
            self.eio, self.enospc, self.short, self.torn
        )
    }
}

/// The fields of an SQE the plan matches on (kernel `struct io_uring_sqe` layout: `opcode`
/// at byte 0, `flags` at 1, `fd` at 4, `len` at 24).
struct SqeView {
    raw: [u8; 64],
}

const IOSQE_FIXED_FILE: u8 = 1;
const SQE_LEN_AT: usize = 24;

// The SQE is the kernel's 64-byte ABI struct; `squeue::Entry` is `#[repr(C)]` around it.
const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

impl SqeView {
    fn of(sqe: squeue::Entry) -> SqeView {
        // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's `io_uring_sqe`, a
        // 64-byte plain-old-data ABI struct (size asserted above) that the io-uring crate
        // builds from an all-zero value, so every byte is initialized.
        let raw = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(sqe) };
        SqeView { raw }
    }

    fn entry(self) -> squeue::Entry {
        // SAFETY: the bytes came from a valid `squeue::Entry` (see `of`); at most the `len`
        // field was changed, to a smaller length, which keeps the SQE valid.
        unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(self.raw) }
    }

    fn opcode(&self) -> u8 {
        self.raw[0]
    }

    fn file(&self) -> FaultFile {
        let fd = i32::from_le_bytes([self.raw[4], self.raw[5], self.raw[6], self.raw[7]]);
        if self.raw[1] & IOSQE_FIXED_FILE == 0 {
            return FaultFile::Journal;
        }
        match u32::try_from(fd) {
            Ok(i) if i == FILE_MIRROR[0] => FaultFile::Mirror(0),
            Ok(i) if i == FILE_MIRROR[1] => FaultFile::Mirror(1),
            Ok(i) if i == FILE_BACKING => FaultFile::Backing,
            _ => FaultFile::Other,
        }
    }

    fn op(&self) -> Option<FaultOp> {
        match self.opcode() {
            opcode::Read::CODE | opcode::Readv::CODE | opcode::ReadFixed::CODE => {
                Some(FaultOp::Read)
            }
            opcode::Write::CODE | opcode::Writev::CODE | opcode::WriteFixed::CODE => {
                Some(FaultOp::Write)
            }
            opcode::Fsync::CODE => Some(FaultOp::Sync),
            opcode::Fallocate::CODE => Some(FaultOp::Punch),
            _ => None,
        }
    }

    fn len(&self) -> u32 {
        u32::from_le_bytes([
            self.raw[SQE_LEN_AT],
            self.raw[SQE_LEN_AT + 1],
            self.raw[SQE_LEN_AT + 2],
            self.raw[SQE_LEN_AT + 3],
        ])
    }

    fn set_len(&mut self, len: u32) {
        self.raw[SQE_LEN_AT..SQE_LEN_AT + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// A [`Ring`] that runs every SQE through a [`FaultPlan`] before the inner ring (tests).
pub struct FaultRing<R> {
    pub inner: R,
    pub plan: Arc<FaultPlan>,
}

impl<R: Ring> FaultRing<R> {
    pub fn new(inner: R, plan: Arc<FaultPlan>) -> FaultRing<R> {
        FaultRing { inner, plan }
    }
}

impl<R: Ring> Ring for FaultRing<R> {
    unsafe fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        let mut v = SqeView::of(sqe);
        let fault = v.op().and_then(|op| self.plan.hit(v.file(), op));
        async move {
            match fault {
                None => {
                    // SAFETY: the caller's buffer contract is forwarded unchanged.
                    unsafe { self.inner.submit(v.entry()) }.await
                }
                Some((FaultKind::Eio, _)) => -libc::EIO,
                Some((FaultKind::Enospc, _)) => -libc::ENOSPC,
                Some((FaultKind::Short, _)) => {
                    // Half the length, 4 KiB aligned when the request allows (never 0).
                    let len = v.len();
                    let half = if len >= 8192 {
                        (len / 2) & !4095
                    } else {
                        (len / 2).max(1)
                    };
                    v.set_len(half.min(len));
                    // SAFETY: a shorter length over the same buffer: the contract still holds.
                    unsafe { self.inner.submit(v.entry()) }.await
                }
                Some((FaultKind::Torn, torn)) => {
                    let len = v.len();
                    let k = (torn.min(u64::from(len.saturating_sub(1)))) as u32;
                    if k > 0 {
                        v.set_len(k);
                        // SAFETY: as above; the result is dropped, the caller sees EIO.
                        let _ = unsafe { self.inner.submit(v.entry()) }.await;
                    }
                    -libc::EIO
                }
            }
        }
    }

    fn sleep(&self, dur: Duration) -> impl Future<Output = ()> {
        self.inner.sleep(dur)
    }

    fn kicker(&self) -> Option<Arc<Kicker>> {
        self.inner.kicker()
    }

    fn queue_index(&self) -> usize {
        self.inner.queue_index()
    }
}
