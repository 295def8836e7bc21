//! Admission of new connections: the total connection cap and the pending
//! (unauthenticated) slots with eviction by peer process.
//!
//! When every pending slot is taken, a new connection evicts the **oldest
//! pending connection of the process holding the most pending slots** (ties:
//! the oldest among them). A process that floods the socket therefore only
//! pushes out its own connections, and a real client, which holds one slot
//! for well under a millisecond, still gets in. (sshd's random early drop and
//! dbus-daemon's max_incomplete_connections turn real clients away under such
//! a flood.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

struct PendingEntry {
    pid: i32,
    admitted: u64,
    evict: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct PendingState {
    entries: HashMap<u64, PendingEntry>,
    admitted: u64,
}

/// Counts connections and hands out pending slots.
pub struct Admission {
    max_pending: usize,
    max_connections: usize,
    connections: AtomicUsize,
    pending: Mutex<PendingState>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("connections", &self.connections())
            .field("pending", &self.pending_count())
            .finish()
    }
}

/// Held while a connection counts against the total cap.
#[derive(Debug)]
pub struct ConnectionPermit {
    admission: Arc<Admission>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a connection occupies a pending slot. `evicted` resolves if
/// a newer connection took the slot.
#[derive(Debug)]
pub struct PendingSlot {
    admission: Arc<Admission>,
    conn_id: u64,
    /// Resolves (with `Ok`) when this connection is evicted.
    pub evicted: oneshot::Receiver<()>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.admission.lock_pending().entries.remove(&self.conn_id);
    }
}

/// What [`Admission::admit_pending`] did.
#[derive(Debug)]
pub struct Admitted {
    /// The new connection's slot.
    pub slot: PendingSlot,
    /// The connection evicted to make room, if any.
    pub evicted: Option<u64>,
}

impl Admission {
    /// Limits: pending slots (at least 1) and total connections.
    pub fn new(max_pending: usize, max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            max_pending: max_pending.max(1),
            max_connections,
            connections: AtomicUsize::new(0),
            pending: Mutex::new(PendingState::default()),
        })
    }

    fn lock_pending(&self) -> MutexGuard<'_, PendingState> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection, or `None` when the cap is reached.
    pub fn try_connection(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let mut current = self.connections.load(Ordering::Acquire);
        loop {
            if current >= self.max_connections {
                return None;
            }
            match self.connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(ConnectionPermit {
                        admission: Arc::clone(self),
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives `conn_id` (from process `pid`) a pending slot, evicting as the
    /// module doc says when all are taken.
    pub fn admit_pending(self: &Arc<Self>, conn_id: u64, pid: i32) -> Admitted {
        let mut st = self.lock_pending();
        let mut evicted = None;
        if st.entries.len() >= self.max_pending {
            let mut per_pid: HashMap<i32, (usize, u64, u64)> = HashMap::new();
            for (&id, e) in &st.entries {
                let slot = per_pid.entry(e.pid).or_insert((0, u64::MAX, 0));
                slot.0 += 1;
                if e.admitted < slot.1 {
                    slot.1 = e.admitted;
                    slot.2 = id;
                }
            }
            // Most slots first; among equals, the oldest connection.
            if let Some((_, &(_, _, victim))) = per_pid
                .iter()
                .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
            {
                if let Some(mut entry) = st.entries.remove(&victim) {
                    if let Some(tx) = entry.evict.take() {
                        let _ = tx.send(());
                    }
                    evicted = Some(victim);
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        st.admitted += 1;
        let admitted = st.admitted;
        st.entries.insert(
            conn_id,
            PendingEntry {
                pid,
                admitted,
                evict: Some(tx),
            },
        );
        drop(st);
        Admitted {
            slot: PendingSlot {
                admission: Arc::clone(self),
                conn_id,
                evicted: rx,
            },
            evicted,
        }
    }

    /// Connections counted now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Pending slots taken now.
    pub fn pending_count(&self) -> usize {
        self.lock_pending().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooder_only_evicts_its_own_connections() {
        let adm = Admission::new(4, 100);
        let mut slots = Vec::new();
        // Process 100 is a real client with one slot; 666 floods.
        slots.push(adm.admit_pending(1, 100));
        for id in 2..=4 {
            slots.push(adm.admit_pending(id, 666));
        }
        for id in 5..50 {
            let admitted = adm.admit_pending(id, 666);
            let victim = admitted.evicted.unwrap();
            assert_ne!(victim, 1, "the real client was evicted");
            slots.push(admitted);
            assert_eq!(adm.pending_count(), 4);
        }
        // The real client's slot is intact and not signalled.
        assert!(slots[0].slot.evicted.try_recv().is_err());
        let signalled = slots
            .iter_mut()
            .filter_map(|a| a.slot.evicted.try_recv().ok())
            .count();
        assert!(
            signalled >= 45,
            "only {signalled} evicted connections were told"
        );
    }

    #[test]
    fn the_oldest_of_the_top_holder_goes_first() {
        let adm = Admission::new(3, 100);
        let _a = adm.admit_pending(1, 7);
        let _b = adm.admit_pending(2, 8);
        let _c = adm.admit_pending(3, 8);
        assert_eq!(adm.admit_pending(4, 9).evicted, Some(2));
    }

    #[test]
    fn slots_are_released_on_drop_and_the_cap_holds() {
        let adm = Admission::new(2, 2);
        let p1 = adm.try_connection().unwrap();
        let _p2 = adm.try_connection().unwrap();
        assert!(adm.try_connection().is_none());
        drop(p1);
        assert!(adm.try_connection().is_some());
        let s = adm.admit_pending(1, 1);
        assert_eq!(adm.pending_count(), 1);
        drop(s);
        assert_eq!(adm.pending_count(), 0);
    }
}
