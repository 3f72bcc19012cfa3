//! A one-shot completion another thread fills in and a queue task awaits (FLUSH waiting for
//! the syncer, a read waiting for an on-demand fetch). Completing wakes the task and kicks its
//! ring (see [`crate::ring::Kicker`]): a queue thread parked in `io_uring_enter` would not
//! otherwise run a task woken from another thread.

use crate::ring::Kicker;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

pub struct Completion<T> {
    state: Mutex<(Option<T>, Option<Waker>)>,
    kicker: Option<Arc<Kicker>>,
}

impl<T: Clone> Completion<T> {
    pub fn new(kicker: Option<Arc<Kicker>>) -> Arc<Completion<T>> {
        Arc::new(Completion {
            state: Mutex::new((None, None)),
            kicker,
        })
    }

    /// Sets the result (the first one wins), wakes the waiting task and kicks its ring.
    pub fn complete(&self, v: T) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.0.is_none() {
                st.0 = Some(v);
            }
            st.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(k) = &self.kicker {
            k.kick();
        }
    }

    pub fn wait(self: &Arc<Self>) -> Wait<T> {
        Wait(self.clone())
    }
}

/// Resolves to the completion's value.
pub struct Wait<T>(Arc<Completion<T>>);

impl<T: Clone> Future for Wait<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        match &st.0 {
            Some(v) => Poll::Ready(v.clone()),
            None => {
                st.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
