//! The daemon-wide memory budget: the bytes of inbound frames being
//! received and of events queued, over every authenticated connection.
//!
//! Each connection's share is counted as it changes (its read buffers, the
//! buffer of a large frame arriving, its outbox). When the total passes the
//! budget, the enforcer (one task) cuts the connection holding the most: its
//! queued events are dropped at once, it is sent `Error OverBudget` and
//! closed. Charging never fails or waits, so a publisher is never slowed and
//! no event is dropped silently; the total can pass the budget by what
//! arrives before the enforcer runs (bounded by one frame and one outbox
//! per connection), so RSS stays within the budget plus a fixed overhead.
//! (A payload shared by several outboxes is counted in each of them: the
//! budget errs on the safe side.) Redis's `maxmemory-clients` is the model.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::Notify;
use tracing::warn;

use super::connection::{Inner, Registry};

/// The budget and what is charged against it now.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    over: Arc<Notify>,
    enforcer_started: std::sync::Once,
}

impl Drop for Budget {
    fn drop(&mut self) {
        // The enforcer holds only a weak handle: wake it to find that out.
        self.over.notify_one();
    }
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            over: Arc::new(Notify::new()),
            enforcer_started: std::sync::Once::new(),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Adds `n` bytes; wakes the enforcer if the total passes the budget.
    pub fn charge(&self, n: usize) {
        if n == 0 {
            return;
        }
        let used = self.used.fetch_add(n, Ordering::AcqRel) + n;
        if used > self.limit {
            self.over.notify_one();
        }
    }

    /// Gives `n` bytes back.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Starts the enforcer for `registry`, once (inside the runtime).
    pub fn start_enforcer(self: &Arc<Self>, registry: &Arc<Registry>) {
        self.enforcer_started.call_once(|| {
            tokio::spawn(enforce(
                Arc::downgrade(self),
                Arc::clone(&self.over),
                Arc::downgrade(registry),
            ));
        });
    }
}

/// A connection's share of the budget, and whether it was cut for it.
#[derive(Debug, Default)]
pub(crate) struct Share {
    /// Inbound bytes held (read buffers, a large frame arriving).
    pub inbound: AtomicUsize,
    /// Set when the enforcer cut the connection.
    pub cut: AtomicBool,
    /// What it held when it was cut (for the `Error` it is sent).
    pub held_when_cut: AtomicUsize,
}

/// Cuts the largest consumers while the budget is exceeded.
async fn enforce(budget: Weak<Budget>, over: Arc<Notify>, registry: Weak<Registry>) {
    loop {
        {
            let Some(b) = budget.upgrade() else { return };
            while b.used() > b.limit {
                let Some(reg) = registry.upgrade() else {
                    return;
                };
                let Some(victim) = reg.largest_uncut() else {
                    break;
                };
                cut(&b, &victim);
            }
        }
        // A notification sent meanwhile is kept (`notify_one` stores it).
        over.notified().await;
    }
}

fn cut(budget: &Budget, victim: &Arc<Inner>) {
    let held = victim.held();
    warn!(
        conn = victim.id,
        uid = victim.peer.uid,
        pid = victim.peer.pid,
        held,
        budget = budget.limit,
        "memory budget exceeded: cutting the connection that holds the most"
    );
    victim.share.held_when_cut.store(held, Ordering::Release);
    victim.share.cut.store(true, Ordering::Release);
    // What it holds is given back now, so the next round does not cut
    // another connection for bytes that are about to go: its queued events
    // are dropped here, and its session drops its buffers as soon as it
    // runs, sends `Error OverBudget` and closes. (The session's own
    // accounting swaps the same counter, so nothing is given back twice.)
    budget.release(victim.share.inbound.swap(0, Ordering::AcqRel));
    victim.outbox.drop_queued();
    victim.outbox.wake();
}
