//! Young connections, run by the accept task itself until they have lived
//! a little; then each gets a task of its own.
//!
//! Most connections to a local daemon are a command's: connect, one
//! request, its reply, close. Given a task each, the end of one and the
//! arrival of the next usually come in the same batch of events, so two
//! tasks are ready at once and tokio wakes a second worker thread to take
//! one (a `futex` wake-up and two context switches per connection, where a
//! single-threaded server such as Redis has none). Run by the accept task,
//! both events wake the same task, which also spares the short connection a
//! task spawn.
//!
//! A connection leaves the nursery for a task of its own (tracked like any)
//! once it is older than [`YOUNG_FOR`], once it has been polled
//! [`YOUNG_POLLS`] times (it is busy), when the nursery is full and a newer
//! one arrives, or when the daemon shuts down. A panic while the accept
//! task polls one ends that connection only.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;
use tracing::error;

/// How many connections the accept task runs at most.
pub(crate) const NURSERY_SLOTS: usize = 8;

/// Age at which a connection gets a task of its own (checked whenever the
/// accept task runs).
pub(crate) const YOUNG_FOR: Duration = Duration::from_millis(5);

/// Polls after which a connection gets a task of its own: a command's
/// connection ends within a few (handshake, request, end of stream).
pub(crate) const YOUNG_POLLS: u32 = 8;

struct Young<F> {
    conn: Pin<Box<F>>,
    polls: u32,
    born: Instant,
}

/// The accept task's young connections.
pub(crate) struct Nursery<F> {
    young: Vec<Young<F>>,
    tracker: TaskTracker,
}

impl<F> Nursery<F>
where
    F: Future<Output = ()> + Send + 'static,
{
    pub(crate) fn new(tracker: TaskTracker) -> Self {
        Self {
            young: Vec::with_capacity(NURSERY_SLOTS),
            tracker,
        }
    }

    /// Takes a new connection and polls it once (usually its handshake is
    /// already there). When full, the oldest leaves first.
    pub(crate) fn adopt(&mut self, conn: F, cx: &mut Context<'_>) {
        if self.young.len() == NURSERY_SLOTS {
            let oldest = self.young.remove(0);
            self.tracker.spawn(oldest.conn);
        }
        let mut young = Young {
            conn: Box::pin(conn),
            polls: 0,
            born: Instant::now(),
        };
        if poll_young(&mut young, cx).is_pending() {
            self.young.push(young);
        } else {
            drop_ended(young);
        }
    }

    /// Polls every young connection: those that ended are dropped, those
    /// grown up are given tasks of their own (and not polled here).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) {
        if self.young.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut at = 0;
        while at < self.young.len() {
            let young = &mut self.young[at];
            let grown = now.saturating_duration_since(young.born) >= YOUNG_FOR
                || young.polls >= YOUNG_POLLS;
            if grown {
                let young = self.young.remove(at);
                self.tracker.spawn(young.conn);
            } else if poll_young(young, cx).is_ready() {
                drop_ended(self.young.remove(at));
            } else {
                at += 1;
            }
        }
    }

    /// Gives every young connection a task of its own (shutdown: the accept
    /// task stops).
    pub(crate) fn release_all(&mut self) {
        for young in self.young.drain(..) {
            self.tracker.spawn(young.conn);
        }
    }
}

/// Polls one young connection; a panic ends it (logged) instead of the
/// accept task.
fn poll_young<F: Future<Output = ()>>(young: &mut Young<F>, cx: &mut Context<'_>) -> Poll<()> {
    young.polls += 1;
    match std::panic::catch_unwind(AssertUnwindSafe(|| young.conn.as_mut().poll(cx))) {
        Ok(polled) => polled,
        Err(_) => {
            error!("a connection panicked; it is closed");
            Poll::Ready(())
        }
    }
}

/// Drops a connection that ended (one that panicked may panic again as it
/// drops).
fn drop_ended<F>(young: Young<F>) {
    let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(young)));
}
