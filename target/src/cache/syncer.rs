//! The syncer: one thread that makes FLUSH (and FUA) durable for every queue, batching all
//! requests that arrive while a sync runs into the next one (group commit).
//!
//! Queue threads never block: a FLUSH sends a [`Waiter`] and awaits it; the syncer completes
//! it, wakes the task and kicks the queue's ring (see [`crate::ring::Kicker`]).

use super::wait::{Completion, Wait};
use super::Cache;
use crate::ring::Kicker;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One FLUSH waiting for the syncer: resolves to 0, or a negative errno.
type Waiter = Completion<i32>;

/// Resolves to 0 once everything completed before the request is durable, or `-EIO`.
pub type WaitDurable = Wait<i32>;

enum Msg {
    Sync(Arc<Waiter>),
    Stop,
}

/// The sending side, kept in the volume so every queue can reach the syncer.
pub struct SyncHandle {
    tx: Mutex<Sender<Msg>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SyncHandle {
    /// Starts the syncer thread for `cache`.
    pub fn start(cache: Arc<Cache>) -> std::io::Result<SyncHandle> {
        let (tx, rx) = channel();
        let t = std::thread::Builder::new()
            .name(format!("dv-sync-{}", cache.name))
            .spawn(move || run(cache, rx))?;
        Ok(SyncHandle {
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(t)),
        })
    }

    /// Asks for durability of everything completed so far; `kicker` wakes the caller's ring.
    pub fn request(&self, kicker: Option<Arc<Kicker>>) -> WaitDurable {
        let w = Waiter::new(kicker);
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Msg::Sync(w.clone()));
        if sent.is_err() {
            w.complete(-libc::ESHUTDOWN);
        }
        w.wait()
    }

    /// Stops the thread after the requests already queued.
    pub fn stop(&self) {
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Msg::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(cache: Arc<Cache>, rx: Receiver<Msg>) {
    let mut batch: Vec<Arc<Waiter>> = Vec::new();
    let mut stop = false;
    while !stop {
        match rx.recv() {
            Ok(Msg::Sync(w)) => batch.push(w),
            Ok(Msg::Stop) | Err(_) => stop = true,
        }
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Sync(w) => batch.push(w),
                Msg::Stop => stop = true,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let res = match cache.sync_durable() {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(volume = %cache.name, error = %e, "FLUSH failed: data written since the last successful FLUSH may not be durable");
                e.errno()
            }
        };
        for w in batch.drain(..) {
            w.complete(res);
        }
    }
}
