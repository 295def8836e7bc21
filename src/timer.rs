//! Deadlines for the server and the hub without tokio's time driver: one
//! helper thread for the process wakes whatever waits for a deadline.
//!
//! A runtime with tokio's time driver pays for it at every park, timers or
//! not: after each wake-up it reads the clock and walks the timer wheel
//! (callgrind: about 300 instructions a strict request, 12% of the
//! daemon's). The daemon's deadlines are few and rarely armed (the
//! pending connections' one shared deadline, a closing connection's flush
//! that did not finish at once, the hub's request timeouts, the accept
//! back-off, the shutdown bound), so `keyholed` runs without that driver
//! and arms them here. The framework then also runs on a runtime built
//! without `enable_time`.
//!
//! A [`Sleep`] registers with the thread only when first polled before its
//! deadline, and the thread is woken only when a deadline earlier than the
//! one it waits for arrives; a dropped `Sleep` leaves the set at once. The
//! thread holds no task of its own: it sets the entry's flag and wakes the
//! task's waker, which schedules the task on its runtime.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// One armed deadline: fired by the thread, waited for by a task.
#[derive(Debug, Default)]
struct Entry {
    fired: AtomicBool,
    waker: AtomicWaker,
}

/// Key of an armed deadline: its instant, then the order of arming.
type Key = (Instant, u64);

#[derive(Debug, Default)]
struct State {
    armed: BTreeMap<Key, Arc<Entry>>,
    next_id: u64,
    /// The deadline the thread sleeps until (`None`: until woken).
    waiting_for: Option<Instant>,
}

#[derive(Debug, Default)]
struct Timers {
    state: Mutex<State>,
    wake: Condvar,
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, State> {
        // (Nothing that holds the lock can panic; a poisoned lock still
        // holds a consistent set.)
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The thread's loop: fire what is due, sleep until the next deadline.
    fn run(&self) {
        let mut due = Vec::new();
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            while let Some(entry) = st.armed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            st.waiting_for = st.armed.first_key_value().map(|(key, _)| key.0);
            if !due.is_empty() {
                // Woken outside the lock: a waker may do anything.
                drop(st);
                for entry in due.drain(..) {
                    entry.fired.store(true, Ordering::Release);
                    entry.waker.wake();
                }
                st = self.lock();
                continue;
            }
            st = match st.waiting_for {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    self.wake
                        .wait_timeout(st, wait)
                        .map(|(st, _)| st)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The process's timer thread, started on first use.
static TIMERS: OnceLock<Result<Arc<Timers>, String>> = OnceLock::new();

fn timers() -> Result<&'static Arc<Timers>, &'static str> {
    TIMERS
        .get_or_init(|| {
            let timers = Arc::new(Timers::default());
            let run = Arc::clone(&timers);
            std::thread::Builder::new()
                .name("keyhole-timer".to_owned())
                // Its frames are a few hundred bytes: the default 2 MiB
                // would be address space only, but say what it needs.
                .stack_size(64 * 1024)
                .spawn(move || run.run())
                .map(|_| timers)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Starts the timer thread if it is not running yet, so that a server
/// learns at start, not at its first deadline, that it cannot have one.
pub(crate) fn start() -> io::Result<()> {
    timers().map(|_| ()).map_err(io::Error::other)
}

/// A future that completes at its deadline (or at once if that has passed).
#[derive(Debug)]
#[must_use = "a Sleep does nothing unless awaited or polled"]
pub(crate) struct Sleep {
    deadline: Instant,
    /// Set once armed with the thread.
    armed: Option<(u64, Arc<Entry>)>,
}

/// Completes at `deadline`.
pub(crate) fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        armed: None,
    }
}

/// Completes after `duration`.
pub(crate) fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

impl Sleep {
    /// Polls without requiring `Pin` (a `Sleep` has no self-reference).
    pub(crate) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.armed {
            Some((_, entry)) => {
                if entry.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                entry.waker.register(cx.waker());
                // (The thread sets the flag before it wakes: checked again
                // after registering, nothing is missed.)
                if entry.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                Poll::Pending
            }
            None => {
                if Instant::now() >= self.deadline {
                    return Poll::Ready(());
                }
                self.arm(cx.waker())
            }
        }
    }

    fn arm(&mut self, waker: &Waker) -> Poll<()> {
        let timers = match timers() {
            Ok(timers) => timers,
            Err(err) => {
                // Unreachable once a server has started (it calls
                // `start`): a deadline that cannot be armed is due now,
                // not never.
                tracing::error!("cannot start the timer thread: {err}; a deadline ends at once");
                return Poll::Ready(());
            }
        };
        let entry = Arc::new(Entry::default());
        entry.waker.register(waker);
        let mut st = timers.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.armed.insert((self.deadline, id), Arc::clone(&entry));
        let earlier = st.waiting_for.is_none_or(|at| self.deadline < at);
        if earlier {
            st.waiting_for = Some(self.deadline);
        }
        drop(st);
        if earlier {
            timers.wake.notify_one();
        }
        self.armed = Some((id, entry));
        Poll::Pending
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_elapsed(cx)
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((id, entry)) = self.armed.take() {
            if entry.fired.load(Ordering::Acquire) {
                return;
            }
            if let Ok(timers) = timers() {
                // (The thread is not woken: if this was what it waited
                // for, it wakes once for nothing.)
                timers.lock().armed.remove(&(self.deadline, id));
            }
        }
    }
}

/// `fut` did not complete within its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// `fut`'s output, or [`Elapsed`] if `duration` passes first. `fut` is
/// polled first; the deadline is taken only if it is not done at once, so
/// a future that completes on its first poll reads no clock and arms
/// nothing.
pub(crate) async fn timeout<F: Future>(duration: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut sleep: Option<Sleep> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let sleep = sleep.get_or_insert_with(|| self::sleep(duration));
        sleep.poll_elapsed(cx).map(|()| Err(Elapsed))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime without tokio's time driver: `tokio::time` would panic.
    fn io_only() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_sleep_ends_at_its_deadline_not_before() {
        io_only().block_on(async {
            let start = Instant::now();
            sleep(Duration::from_millis(60)).await;
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(60), "{took:?}");
            assert!(took < Duration::from_secs(5), "{took:?}");
        });
    }

    #[test]
    fn deadlines_fire_in_order_whatever_the_order_of_arming() {
        io_only().block_on(async {
            let start = Instant::now();
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for ms in [90u64, 30, 60, 10] {
                let order = Arc::clone(&order);
                tasks.push(tokio::spawn(async move {
                    sleep_until(start + Duration::from_millis(ms)).await;
                    order.lock().unwrap().push(ms);
                }));
                // Each armed while the thread waits for the earlier ones.
                tokio::task::yield_now().await;
            }
            for task in tasks {
                task.await.unwrap();
            }
            assert_eq!(*order.lock().unwrap(), vec![10, 30, 60, 90]);
        });
    }

    #[test]
    fn timeout_gives_the_output_or_elapsed() {
        io_only().block_on(async {
            assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
            let start = Instant::now();
            let never = std::future::pending::<()>();
            assert_eq!(
                timeout(Duration::from_millis(40), never).await,
                Err(Elapsed)
            );
            assert!(start.elapsed() >= Duration::from_millis(40));
            // Done before its time: the output, when it comes.
            let soon = sleep(Duration::from_millis(20));
            assert_eq!(timeout(Duration::from_secs(5), soon).await, Ok(()));
        });
    }

    #[test]
    fn a_dropped_sleep_leaves_the_set() {
        io_only().block_on(async {
            let far = Instant::now() + Duration::from_secs(3600);
            let mut sleeps: Vec<_> = (0..100).map(|_| sleep_until(far)).collect();
            for s in &mut sleeps {
                let waker = futures_util::task::noop_waker();
                assert!(
                    s.poll_elapsed(&mut Context::from_waker(&waker))
                        .is_pending()
                );
            }
            let ids: Vec<u64> = sleeps
                .iter()
                .filter_map(|s| s.armed.as_ref().map(|a| a.0))
                .collect();
            assert_eq!(ids.len(), 100);
            let holds = |ids: &[u64]| {
                let st = timers().unwrap().lock();
                ids.iter()
                    .filter(|id| st.armed.contains_key(&(far, **id)))
                    .count()
            };
            assert_eq!(holds(&ids), 100);
            drop(sleeps);
            assert_eq!(holds(&ids), 0);
        });
    }
}
