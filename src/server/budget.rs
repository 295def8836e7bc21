//! The daemon-wide memory budget: the bytes of inbound frames being
//! received and of events queued, over every authenticated connection.
//!
//! Each connection's share is counted as it changes (its read buffers, the
//! buffer of a large frame arriving, its outbox). When the total passes the
//! budget, the connection holding the most is cut: its queued events are
//! dropped at once, it is sent `Error OverBudget` and closed. A session
//! whose reads pass the budget cuts at once, on its own thread, and lets a
//! connection it cut run (and free its buffers) before it reads on; a
//! publisher whose events pass it wakes the enforcer task, since it holds an
//! outbox's lock while it charges. Charging never fails or waits, so a
//! publisher is never slowed and no event is dropped silently; the total can
//! pass the budget by what arrives before the cut (one read, or one outbox
//! per connection), so RSS stays within the budget plus a fixed overhead.
//! (A payload shared by several outboxes is counted in each of them: the
//! budget errs on the safe side.) Redis's `maxmemory-clients` is the model.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::Notify;
use tracing::warn;

use super::connection::{Inner, Registry};

/// The budget and what is charged against it now.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    over: Arc<Notify>,
    /// The connections to choose from, set when the enforcer starts.
    registry: OnceLock<Weak<Registry>>,
    /// Held while cutting, so that two threads over the budget at once do
    /// not each cut a connection for the same bytes.
    cutting: Mutex<()>,
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
            registry: OnceLock::new(),
            cutting: Mutex::new(()),
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

    /// Whether more than the budget is charged now.
    pub fn is_over(&self) -> bool {
        self.used() > self.limit
    }

    /// Starts the enforcer for `registry`, once (inside the runtime).
    pub fn start_enforcer(self: &Arc<Self>, registry: &Arc<Registry>) {
        if self.registry.set(Arc::downgrade(registry)).is_ok() {
            tokio::spawn(enforce(Arc::downgrade(self), Arc::clone(&self.over)));
        }
    }

    /// Cuts the connections holding the most until the total is within the
    /// budget, now; returns whether `me` is still uncut. Must not be called
    /// with a lock of the registry or of an outbox held. If another thread
    /// is cutting, it does so for both and this returns at once.
    pub fn cut_now(&self, me: &Inner) -> bool {
        let Ok(_cutting) = self.cutting.try_lock() else {
            return !me.share.cut.load(Ordering::Acquire);
        };
        let Some(registry) = self.registry.get().and_then(Weak::upgrade) else {
            return !me.share.cut.load(Ordering::Acquire);
        };
        self.cut_while_over(&registry);
        !me.share.cut.load(Ordering::Acquire)
    }

    /// Cuts the largest uncut connection of `registry` until the total is
    /// within the budget (or none is left). The caller holds `cutting`.
    fn cut_while_over(&self, registry: &Registry) {
        while self.is_over() {
            let Some(victim) = registry.largest_uncut() else {
                break;
            };
            cut(self, &victim);
        }
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

/// Cuts the largest consumers while the budget is exceeded by events
/// queued (a session over it by its reads cuts at once: [`Budget::cut_now`]).
async fn enforce(budget: Weak<Budget>, over: Arc<Notify>) {
    loop {
        {
            let Some(b) = budget.upgrade() else { return };
            let Some(registry) = b.registry.get().and_then(Weak::upgrade) else {
                return;
            };
            let _cutting = b.cutting.lock().unwrap_or_else(|p| p.into_inner());
            b.cut_while_over(&registry);
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
