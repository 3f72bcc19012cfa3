//! Scheduling priority of the background threads.
//!
//! Snapshot work must cost the application nothing perceptible (DESIGN): the flush thread and
//! the shipper run at a lower CPU priority (nice [`BACKGROUND_NICE`]) than the ublk queue
//! threads, so on a busy machine the queues get the cores first. When the SSD cache is at its
//! high-water mark the flush is what writers wait for, so the flush thread then runs at normal
//! priority until the pressure is gone ([`background`]).
//!
//! Linux applies `setpriority(PRIO_PROCESS, tid)` to one thread. Raising the priority back
//! needs `CAP_SYS_NICE` (the daemon runs as root); without it the thread stays lower, which
//! is logged once and is otherwise harmless.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The nice value of background threads (0 is normal, 19 the lowest).
pub const BACKGROUND_NICE: i32 = 10;

static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets the calling thread's nice value; false if the kernel refused.
pub fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(2) on our own thread id, plain integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 && !WARNED.swap(true, Relaxed) {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "cannot change a background thread's priority; it keeps its current one"
        );
    }
    r == 0
}

/// Runs the calling thread as background work, or at normal priority when `urgent`.
pub fn background(urgent: bool) {
    set_thread_nice(if urgent { 0 } else { BACKGROUND_NICE });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        // SAFETY: as above.
        let tid = unsafe { libc::gettid() };
        // SAFETY: getpriority(2) on our own thread id. (It may return -1 legitimately; errno
        // is not needed for the values tested here.)
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    #[test]
    fn background_lowers_only_the_calling_thread() {
        let main_before = own_nice();
        let seen = std::thread::spawn(|| {
            background(false);
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(seen, BACKGROUND_NICE);
        assert_eq!(own_nice(), main_before, "the nice value is per thread");
    }
}
