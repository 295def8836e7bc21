//! Admission of new connections: the total connection cap, the pending
//! (unauthenticated) slots, the queue in front of them, and every pending
//! connection's deadline.
//!
//! - A connection counts against the cap from accept to close
//!   ([`ConnectionPermit`]).
//! - A pending connection needs one of `max_pending` **slots** to be read
//!   from. With a slot free and nobody waiting it gets one at once;
//!   otherwise it **waits**, unread (its handshake, if sent, stays in the
//!   socket), in a queue that is fair between peer processes: slots go
//!   round-robin by pid, so a process that opened many connections does not
//!   push the others back. (A peer whose pid the daemon cannot see, pid 0, is
//!   a process of its own per connection.)
//! - While someone waits, a connection that has held its slot for the
//!   **grace** period without completing its handshake loses it (`Error
//!   TooManyUnauthenticated`), and the slot goes to the next in the queue.
//!   Evictions are spread, at most one every grace / `max_pending`: slots
//!   handed out together then come free one by one, not all at once. A
//!   real client completes within milliseconds of getting its slot; a silent
//!   or dribbling peer does not. The victim is taken from the process
//!   holding the most slots, and among its connections the oldest; "oldest"
//!   is the order of accept (connection ids are given by the accept loop).
//! - Every pending connection, waiting or not, has the handshake deadline
//!   from its arrival (`Error AuthTimeout`).
//!
//! So a flood of silent connections, from one process or from hundreds,
//! costs each of its connections a slot for at most the grace period, and a
//! real client waits at most (connections in the queue ahead of it) × grace
//! / `max_pending`, in round-robin order by process. This module decides;
//! it owns no socket. One task (the reaper)
//! drives its deadlines for all connections: no timer per connection.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::connection::IdHasher;

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// What admission says of a pending connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// In the queue: not to be read from yet.
    Waiting,
    /// Holds a slot: read its handshake.
    Active,
    /// Lost its slot (or its place) to someone else: `TooManyUnauthenticated`.
    Evicted,
    /// The handshake deadline passed: `AuthTimeout`.
    TimedOut,
    /// The daemon is shutting down: `ShuttingDown`. Final: nothing changes
    /// it (a pending connection then needs no shutdown future of its own).
    ShuttingDown,
}

impl Standing {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Standing::Waiting,
            1 => Standing::Active,
            2 => Standing::Evicted,
            3 => Standing::TimedOut,
            _ => Standing::ShuttingDown,
        }
    }
}

/// Where a connection's standing is published to its task.
#[derive(Debug)]
struct Signal {
    standing: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// (Called with the admission's lock held, so the check and the store
    /// are not raced.)
    fn set(&self, standing: Standing) {
        if self.get() == Standing::ShuttingDown {
            return;
        }
        self.standing.store(standing as u8, Ordering::Release);
        self.waker.wake();
    }

    fn get(&self) -> Standing {
        Standing::from_u8(self.standing.load(Ordering::Acquire))
    }
}

/// Which process a pending connection counts for (fairness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Pid(i32),
    /// Pid 0 (outside the daemon's pid namespace): a source of its own.
    Alone(u64),
}

#[derive(Debug)]
struct Entry {
    source: Source,
    /// When it got its slot; `None` while waiting.
    granted: Option<Instant>,
    signal: Arc<Signal>,
}

/// Admission's state; every method takes the time, so that it can be tested
/// without a clock.
#[derive(Debug)]
struct State {
    max_pending: usize,
    grace: Duration,
    entries: IdMap<Entry>,
    active: usize,
    /// The ids holding a slot (at most `max_pending`).
    holders: Vec<u64>,
    /// Waiting connections by source, and the sources in round-robin order.
    queues: HashMap<Source, VecDeque<u64>>,
    turns: VecDeque<Source>,
    waiting: usize,
    /// Handshake deadlines in arrival order (arrivals get `now + timeout`,
    /// so this is sorted); entries already gone are skipped.
    deadlines: VecDeque<(Instant, u64)>,
    /// The last grace eviction: evictions are spread, at most one every
    /// grace / slots, so that slots granted together are not all taken back
    /// together (a slot then comes free every grace / slots, not every
    /// grace).
    last_eviction: Option<Instant>,
    /// What the reaper sleeps until (`None`: nothing), never more than
    /// [`REAPER_CHECK`] ahead. An arrival wakes it only for an earlier
    /// deadline: one connect after another used to wake it and re-arm its
    /// timer every time (~1,500 instructions a connection); now it wakes at
    /// most twice a [`REAPER_CHECK`] whatever the rate of connections.
    armed: Option<Instant>,
    /// Shutdown began: every standing is `ShuttingDown`, arrivals included.
    closed: bool,
}

impl State {
    fn new(max_pending: usize, grace: Duration) -> Self {
        Self {
            max_pending: max_pending.max(1),
            grace,
            entries: IdMap::default(),
            active: 0,
            holders: Vec::new(),
            queues: HashMap::new(),
            turns: VecDeque::new(),
            waiting: 0,
            deadlines: VecDeque::new(),
            last_eviction: None,
            armed: None,
            closed: false,
        }
    }

    /// What the reaper sleeps until, woken at `now`: the next deadline or
    /// grace eviction but no more than [`REAPER_CHECK`] ahead while
    /// something is pending; with nothing pending, the time it was armed
    /// for if still ahead (so the next arrival need not wake it), else
    /// nothing at all.
    fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        let next = match self.expire(now) {
            Some(at) => Some(at.min(now + REAPER_CHECK)),
            None => self.armed.filter(|&armed| armed > now),
        };
        self.armed = next;
        next
    }

    /// The least time between two grace evictions.
    fn eviction_interval(&self) -> Duration {
        self.grace / self.max_pending as u32
    }

    /// A new pending connection.
    fn arrive(&mut self, id: u64, pid: i32, now: Instant, timeout: Duration) -> Arc<Signal> {
        // Trim deadlines of connections already gone (most finish long
        // before theirs), so the queue stays about as long as the table.
        while let Some(&(_, front)) = self.deadlines.front() {
            if self.entries.contains_key(&front) {
                break;
            }
            self.deadlines.pop_front();
        }
        let source = if pid == 0 {
            Source::Alone(id)
        } else {
            Source::Pid(pid)
        };
        let first = if self.closed {
            Standing::ShuttingDown
        } else {
            Standing::Waiting
        };
        let signal = Arc::new(Signal {
            standing: AtomicU8::new(first as u8),
            waker: AtomicWaker::new(),
        });
        let deadline = now + timeout;
        self.entries.insert(
            id,
            Entry {
                source,
                granted: None,
                signal: Arc::clone(&signal),
            },
        );
        self.deadlines.push_back((deadline, id));
        if self.waiting == 0 && self.active < self.max_pending {
            self.grant(id, now);
        } else {
            self.enqueue(source, id);
            self.rebalance(now);
        }
        signal
    }

    fn grant(&mut self, id: u64, now: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.granted = Some(now);
            self.active += 1;
            self.holders.push(id);
            entry.signal.set(Standing::Active);
        }
    }

    fn enqueue(&mut self, source: Source, id: u64) {
        let queue = self.queues.entry(source).or_default();
        if queue.is_empty() {
            self.turns.push_back(source);
        }
        queue.push_back(id);
        self.waiting += 1;
    }

    /// The next waiting connection, round-robin by source.
    fn dequeue(&mut self) -> Option<u64> {
        while let Some(source) = self.turns.pop_front() {
            let Some(queue) = self.queues.get_mut(&source) else {
                continue;
            };
            let Some(id) = queue.pop_front() else {
                self.queues.remove(&source);
                continue;
            };
            if queue.is_empty() {
                self.queues.remove(&source);
            } else {
                self.turns.push_back(source);
            }
            self.waiting -= 1;
            return Some(id);
        }
        None
    }

    /// Hands free slots to waiting connections, evicting connections past
    /// their grace while anyone still waits. Returns when the next holder
    /// will pass its grace, if someone is left waiting.
    fn rebalance(&mut self, now: Instant) -> Option<Instant> {
        while self.waiting > 0 {
            if self.active < self.max_pending {
                if let Some(id) = self.dequeue() {
                    self.grant(id, now);
                }
                continue;
            }
            if let Some(last) = self.last_eviction {
                let next = last + self.eviction_interval();
                if now < next {
                    return Some(match self.victim(now) {
                        Ok(_) => next,
                        Err(due) => due.map_or(next, |due| due.max(next)),
                    });
                }
            }
            match self.victim(now) {
                Ok(victim) => {
                    self.remove(victim, Standing::Evicted, now);
                    self.last_eviction = Some(now);
                }
                Err(next) => return next,
            }
        }
        None
    }

    /// The holder to evict now, or (none yet) when the first one passes
    /// its grace: the source holding the most slots, its oldest connection.
    fn victim(&self, now: Instant) -> Result<u64, Option<Instant>> {
        // Slots held per source, among the (at most max_pending) holders.
        let mut held: Vec<(Source, usize)> = Vec::new();
        let mut first_due: Option<Instant> = None;
        for id in &self.holders {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            match held.iter_mut().find(|(s, _)| *s == entry.source) {
                Some((_, n)) => *n += 1,
                None => held.push((entry.source, 1)),
            }
            if let Some(granted) = entry.granted {
                let due = granted + self.grace;
                first_due = Some(first_due.map_or(due, |d: Instant| d.min(due)));
            }
        }
        let count = |source: Source| {
            held.iter()
                .find(|(s, _)| *s == source)
                .map_or(0, |(_, n)| *n)
        };
        self.holders
            .iter()
            .filter_map(|id| Some((*id, self.entries.get(id)?)))
            .filter(|(_, e)| e.granted.is_some_and(|g| now >= g + self.grace))
            .max_by(|(a_id, a), (b_id, b)| {
                count(a.source).cmp(&count(b.source)).then(b_id.cmp(a_id)) // smaller id = older: greater
            })
            .map(|(id, _)| id)
            .ok_or(first_due)
    }

    /// Shutdown: see [`Admission::shut_down`].
    fn close(&mut self) {
        self.closed = true;
        for entry in self.entries.values() {
            entry.signal.set(Standing::ShuttingDown);
        }
    }

    /// Takes `id` out, telling it why (unless it left by itself).
    fn remove(&mut self, id: u64, why: Standing, now: Instant) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if entry.granted.is_some() {
            self.active -= 1;
            if let Some(at) = self.holders.iter().position(|&h| h == id) {
                self.holders.swap_remove(at);
            }
        } else if let Some(queue) = self.queues.get_mut(&entry.source) {
            if let Some(at) = queue.iter().position(|&q| q == id) {
                queue.remove(at);
                self.waiting -= 1;
            }
        }
        if why != Standing::Active {
            entry.signal.set(why);
        }
        // A slot may have come free.
        let _ = now;
    }

    /// Deadlines that have passed; returns the next one to wake for.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if !self.entries.contains_key(&id) {
                self.deadlines.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            self.remove(id, Standing::TimedOut, now);
        }
        let grace = self.rebalance(now);
        let deadline = self.deadlines.front().map(|d| d.0);
        match (grace, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The longest the reaper's timer stays registered with nothing pending.
///
/// While a timer is registered, every park of the event loop reads the
/// clock once more and passes `epoll_wait` a timeout: ~100 instructions a
/// request on a connection that authenticated within the last handshake
/// deadline, if the timer stayed on that deadline. A burst of connections
/// still arms it about once a check, not once a connection.
const REAPER_CHECK: Duration = Duration::from_millis(50);

/// Counts connections and hands out pending slots.
pub(crate) struct Admission {
    max_connections: usize,
    auth_timeout: Duration,
    connections: AtomicUsize,
    state: Mutex<State>,
    /// Wakes the reaper when a deadline earlier than the one it sleeps for
    /// may exist (someone started waiting, or the first entry arrived).
    reaper: Arc<Notify>,
    reaper_started: std::sync::Once,
}

impl Drop for Admission {
    fn drop(&mut self) {
        // The reaper holds only a weak handle: wake it to find that out.
        self.reaper.notify_one();
    }
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
pub(crate) struct ConnectionPermit {
    admission: Arc<Admission>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pending connection's place in admission: its standing, and its slot
/// or its place in the queue until dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    signal: Arc<Signal>,
}

impl Ticket {
    /// The standing now.
    pub fn standing(&self) -> Standing {
        self.signal.get()
    }

    /// Resolves when the standing is no longer `from`.
    pub async fn changed(&self, from: Standing) -> Standing {
        poll_fn(|cx| {
            let now = self.signal.get();
            if now != from {
                return Poll::Ready(now);
            }
            self.signal.waker.register(cx.waker());
            match self.signal.get() {
                now if now != from => Poll::Ready(now),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut st = self.admission.lock();
        st.remove(self.id, Standing::Active, now);
        let waiting = st.waiting > 0;
        st.rebalance(now);
        drop(st);
        if waiting {
            self.admission.reaper.notify_one();
        }
    }
}

impl Admission {
    /// Limits: pending slots (at least 1), total connections, the grace of a
    /// slot holder while others wait, the handshake deadline.
    pub fn new(
        max_pending: usize,
        max_connections: usize,
        grace: Duration,
        auth_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_connections,
            auth_timeout,
            connections: AtomicUsize::new(0),
            state: Mutex::new(State::new(max_pending, grace)),
            reaper: Arc::new(Notify::new()),
            reaper_started: std::sync::Once::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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

    /// A new pending connection (`id` in accept order, from process `pid`).
    /// Call inside the tokio runtime (the first call starts the reaper).
    pub fn arrive(self: &Arc<Self>, id: u64, pid: i32) -> Ticket {
        self.reaper_started.call_once(|| {
            tokio::spawn(Self::run_reaper(
                Arc::downgrade(self),
                Arc::clone(&self.reaper),
            ));
        });
        let now = Instant::now();
        let mut st = self.lock();
        let deadline = now + self.auth_timeout;
        let earlier = st.armed.is_none_or(|armed| deadline < armed);
        if earlier {
            st.armed = Some(deadline.min(now + REAPER_CHECK));
        }
        let signal = st.arrive(id, pid, now, self.auth_timeout);
        let waiting = st.waiting > 0;
        drop(st);
        if earlier || waiting {
            self.reaper.notify_one();
        }
        Ticket {
            admission: Arc::clone(self),
            id,
            signal,
        }
    }

    /// Shutdown began: every pending connection, and every one arriving
    /// from now on, stands `ShuttingDown`.
    pub fn shut_down(&self) {
        self.lock().close();
    }

    /// Connections counted now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Pending connections now (holding a slot or waiting for one).
    pub fn pending_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// Drives every pending connection's deadlines until the admission is
    /// dropped: one task for all of them.
    async fn run_reaper(admission: Weak<Self>, wake: Arc<Notify>) {
        loop {
            let Some(this) = admission.upgrade() else {
                return;
            };
            let next = this.lock().next_wake(Instant::now());
            drop(this);
            let woken = wake.notified();
            let sleep = async {
                match next {
                    Some(at) => crate::timer::sleep_until(at).await,
                    // Nothing pending: no timer at all until something
                    // arrives (an arrival, or dropping the admission, wakes
                    // the reaper). With a timer registered, every park of
                    // the event loop walks the timer wheel and reads the
                    // clock once more: ~100 instructions a request on a
                    // daemon whose connections are all authenticated.
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn standings(st: &State, signals: &[(u64, Arc<Signal>)]) -> Vec<(u64, Standing)> {
        let _ = st;
        signals.iter().map(|(id, s)| (*id, s.get())).collect()
    }

    #[test]
    fn the_reapers_timer_outlives_the_last_pending_connection_by_at_most_a_check() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut st = State::new(3, GRACE);
        // As `Admission::arrive` arms it for the first arrival.
        st.armed = Some(t0 + REAPER_CHECK);
        let _first = st.arrive(1, 7, t0, TIMEOUT);
        // Pending: the next look is a check away, not at the 5 s deadline.
        assert_eq!(st.next_wake(t0), Some(t0 + REAPER_CHECK));
        st.remove(1, Standing::Active, t0 + ms(1));
        // Gone before the check: the timer stays where it is (a later
        // arrival then need not wake the reaper)...
        assert_eq!(st.next_wake(t0 + ms(1)), Some(t0 + REAPER_CHECK));
        // ...and at the check, with nothing pending, there is none.
        assert_eq!(st.next_wake(t0 + REAPER_CHECK), None);
        assert_eq!(st.armed, None);
        // A deadline nearer than a check is kept to the instant.
        let t1 = t0 + ms(500);
        let short = st.arrive(2, 7, t1, ms(10));
        assert_eq!(st.next_wake(t1), Some(t1 + ms(10)));
        assert_eq!(st.next_wake(t1 + ms(10)), None);
        assert_eq!(short.get(), Standing::TimedOut);
    }

    #[test]
    fn with_slots_free_everyone_is_active_at_once() {
        let t0 = Instant::now();
        let mut st = State::new(3, GRACE);
        for id in 1..=3 {
            assert_eq!(
                st.arrive(id, 100 + id as i32, t0, TIMEOUT).get(),
                Standing::Active
            );
        }
        assert_eq!(st.arrive(4, 200, t0, TIMEOUT).get(), Standing::Waiting);
    }

    #[test]
    fn a_waiting_connection_gets_the_slot_of_the_first_holder_past_its_grace() {
        let t0 = Instant::now();
        let mut st = State::new(3, GRACE);
        let q: Vec<_> = (1..=3)
            .map(|id| (id, st.arrive(id, 7, t0, TIMEOUT)))
            .collect();
        let late = st.arrive(4, 9, t0 + Duration::from_millis(10), TIMEOUT);
        assert_eq!(late.get(), Standing::Waiting);
        // Before the grace: nobody is evicted; the reaper is told when.
        assert_eq!(st.expire(t0 + Duration::from_millis(100)), Some(t0 + GRACE));
        assert!(
            standings(&st, &q)
                .iter()
                .all(|(_, s)| *s == Standing::Active)
        );
        // At the grace: the oldest of the holder of the most slots, Q1 (the
        // first accepted, whatever the order of their tasks).
        st.expire(t0 + GRACE);
        assert_eq!(
            standings(&st, &q),
            vec![
                (1, Standing::Evicted),
                (2, Standing::Active),
                (3, Standing::Active)
            ]
        );
        assert_eq!(late.get(), Standing::Active);
    }

    #[test]
    fn slots_granted_together_are_taken_back_one_by_one() {
        // Four slots granted at once, four waiting: at the grace one is
        // evicted, then one every grace / 4, not all four at once (which
        // made the next waiter wait a whole grace period).
        let t0 = Instant::now();
        let mut st = State::new(4, GRACE);
        let held: Vec<_> = (1..=4)
            .map(|id| (id, st.arrive(id, 7, t0, TIMEOUT)))
            .collect();
        let waiting: Vec<_> = (5..=8)
            .map(|id| (id, st.arrive(id, 8, t0 + Duration::from_millis(1), TIMEOUT)))
            .collect();
        let step = GRACE / 4;
        let evicted = |st: &State| {
            standings(st, &held)
                .iter()
                .filter(|(_, s)| *s == Standing::Evicted)
                .count()
        };
        assert_eq!(st.expire(t0 + GRACE), Some(t0 + GRACE + step));
        assert_eq!(evicted(&st), 1);
        assert_eq!(st.expire(t0 + GRACE + step / 2), Some(t0 + GRACE + step));
        assert_eq!(evicted(&st), 1, "a second eviction before grace / slots");
        for k in 1..4u32 {
            st.expire(t0 + GRACE + step * k);
            assert_eq!(evicted(&st), k as usize + 1);
        }
        assert!(
            standings(&st, &waiting)
                .iter()
                .all(|(_, s)| *s == Standing::Active)
        );
    }

    #[test]
    fn the_oldest_is_the_first_accepted_whatever_the_arrival_order() {
        let t0 = Instant::now();
        let mut st = State::new(3, GRACE);
        // Tasks may call `arrive` out of accept order.
        let q3 = st.arrive(3, 7, t0, TIMEOUT);
        let q1 = st.arrive(1, 8, t0, TIMEOUT);
        let q2 = st.arrive(2, 9, t0, TIMEOUT);
        st.arrive(4, 10, t0, TIMEOUT);
        st.expire(t0 + GRACE);
        assert_eq!(
            (q1.get(), q2.get(), q3.get()),
            (Standing::Evicted, Standing::Active, Standing::Active)
        );
    }

    #[test]
    fn the_queue_is_round_robin_by_process() {
        let t0 = Instant::now();
        let mut st = State::new(1, GRACE);
        st.arrive(1, 5, t0, TIMEOUT);
        // A flood from process 666 queues first, then a real client.
        let flood: Vec<_> = (2..=20).map(|id| st.arrive(id, 666, t0, TIMEOUT)).collect();
        let real = st.arrive(21, 42, t0, TIMEOUT);
        // The first slot to come free goes to the flood's first, the next
        // to the real client, not to the flood's other 18.
        st.remove(1, Standing::Active, t0);
        st.rebalance(t0);
        assert_eq!(flood[0].get(), Standing::Active);
        st.expire(t0 + GRACE);
        assert_eq!(flood[0].get(), Standing::Evicted);
        assert_eq!(real.get(), Standing::Active);
    }

    #[test]
    fn after_shutdown_every_pending_connection_stands_shutting_down_for_good() {
        let t0 = Instant::now();
        let mut st = State::new(1, GRACE);
        let holder = st.arrive(1, 5, t0, TIMEOUT);
        let waiting = st.arrive(2, 6, t0, TIMEOUT);
        assert_eq!(
            (holder.get(), waiting.get()),
            (Standing::Active, Standing::Waiting)
        );
        st.close();
        assert_eq!(holder.get(), Standing::ShuttingDown);
        assert_eq!(waiting.get(), Standing::ShuttingDown);
        // Neither a slot coming free nor a deadline changes what the one
        // waiting stands, and arrivals stand the same.
        st.remove(1, Standing::Active, t0);
        st.rebalance(t0);
        st.expire(t0 + TIMEOUT);
        assert_eq!(waiting.get(), Standing::ShuttingDown);
        assert_eq!(st.arrive(3, 7, t0, TIMEOUT).get(), Standing::ShuttingDown);
    }

    #[test]
    fn pid_zero_connections_are_each_a_process_of_their_own() {
        let t0 = Instant::now();
        let mut st = State::new(1, GRACE);
        st.arrive(1, 0, t0, TIMEOUT);
        let a = st.arrive(2, 0, t0, TIMEOUT);
        let b = st.arrive(3, 0, t0, TIMEOUT);
        st.expire(t0 + GRACE);
        assert_eq!((a.get(), b.get()), (Standing::Active, Standing::Waiting));
    }

    #[test]
    fn deadlines_time_out_waiting_and_active_connections_alike() {
        let t0 = Instant::now();
        let mut st = State::new(1, GRACE);
        let active = st.arrive(1, 5, t0, TIMEOUT);
        let waiting = st.arrive(2, 6, t0, TIMEOUT);
        // No grace eviction if the only waiter's own deadline comes first.
        assert_eq!(st.expire(t0 + TIMEOUT), None);
        assert_eq!(
            (active.get(), waiting.get()),
            (Standing::TimedOut, Standing::TimedOut)
        );
        assert!(st.entries.is_empty());
        assert_eq!((st.active, st.waiting), (0, 0));
    }

    #[test]
    fn a_connection_that_leaves_frees_its_slot_or_its_place() {
        let t0 = Instant::now();
        let mut st = State::new(1, GRACE);
        st.arrive(1, 5, t0, TIMEOUT);
        let w = st.arrive(2, 6, t0, TIMEOUT);
        let w2 = st.arrive(3, 7, t0, TIMEOUT);
        st.remove(2, Standing::Active, t0); // left the queue
        st.remove(1, Standing::Active, t0); // left its slot
        st.rebalance(t0);
        assert_eq!(
            w.get(),
            Standing::Waiting,
            "a departed entry is not granted"
        );
        assert_eq!(w2.get(), Standing::Active);
        assert_eq!((st.active, st.waiting), (1, 0));
    }

    #[test]
    fn the_cap_holds_and_permits_are_released_on_drop() {
        let adm = Admission::new(2, 2, GRACE, TIMEOUT);
        let p1 = adm.try_connection().unwrap();
        let _p2 = adm.try_connection().unwrap();
        assert!(adm.try_connection().is_none());
        drop(p1);
        assert!(adm.try_connection().is_some());
    }
}
