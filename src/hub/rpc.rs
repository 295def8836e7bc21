//! Request/reply between clients: served names, the requests in flight, and
//! their deadlines.
//!
//! A connection serves a name; the connections serving one name form a
//! group, and each request goes to the next member in turn that has room
//! ([`MAX_REQUESTS_IN_FLIGHT`]). The request is pushed to the responder as
//! an event carrying a token; the responder answers with the token, and
//! only the connection the request was given to can answer it, so an answer
//! reaches nobody but the requester. Every request ends in exactly one
//! outcome pushed to its requester: the reply, `ResponderGone` (the
//! responder's connection ended first), `Timeout` (one task drives every
//! deadline), `ReplyTooLarge` or `Failed`; and a request to a name nobody
//! serves is refused at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::encoding::Payload;
use crate::limits::{
    DEFAULT_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT, MAX_REQUESTS_IN_FLIGHT, MIN_FRAME_LEN,
};
use crate::server::{Connection, PushError};
use crate::transport::EncodedEvent;

use super::messages::{Hub, HubError, HubEventRef, Outcome};

/// Pushes an event to a connection (deferred wake-ups inside a handler).
pub(crate) type Push<'a> = dyn FnMut(&Connection<Hub>, &EncodedEvent) -> Result<(), PushError> + 'a;

struct Group {
    /// In the order they joined.
    responders: Vec<Connection<Hub>>,
    /// Where the next request starts looking: the member after the one the
    /// previous request went to.
    next: usize,
}

impl Group {
    /// Takes `connection` out, keeping the turn where it was: a member
    /// before the turn leaving moves the turn back with the members after
    /// it, so nobody is skipped or served twice in a row.
    fn leave(&mut self, connection: &Connection<Hub>) {
        if let Some(at) = self.responders.iter().position(|c| c == connection) {
            self.responders.remove(at);
            if at < self.next {
                self.next -= 1;
            }
        }
    }
}

struct Waiting {
    requester: Connection<Hub>,
    /// The id of the requester's `Call`.
    request: u64,
    responder: u64,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    names: HashMap<String, Group>,
    /// Requests in flight per responder connection.
    in_flight: HashMap<u64, usize>,
    waiting: HashMap<u64, Waiting>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// The deadline the deadline task sleeps until (`None`: no timer). It
    /// is woken only for an earlier one: a request answered before its
    /// deadline leaves the timer as it is (one spurious wake-up later)
    /// rather than costing a wake-up and a re-arm per request.
    armed: Option<Instant>,
    by_requester: HashMap<u64, HashSet<u64>>,
    by_responder: HashMap<u64, HashSet<u64>>,
    next_token: u64,
    closed: bool,
}

impl State {
    /// Takes request `token` out of every table.
    fn take(&mut self, token: u64) -> Option<Waiting> {
        let waiting = self.waiting.remove(&token)?;
        self.deadlines.remove(&(waiting.deadline, token));
        remove_from(&mut self.by_requester, waiting.requester.id(), token);
        remove_from(&mut self.by_responder, waiting.responder, token);
        if let Some(n) = self.in_flight.get_mut(&waiting.responder) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&waiting.responder);
            }
        }
        Some(waiting)
    }
}

fn remove_from(map: &mut HashMap<u64, HashSet<u64>>, conn: u64, token: u64) {
    if let Some(set) = map.get_mut(&conn) {
        set.remove(&token);
        if set.is_empty() {
            map.remove(&conn);
        }
    }
}

/// The request/reply tables, shared with the deadline task.
pub(crate) struct Rpc {
    state: Mutex<State>,
    /// Wakes the deadline task when an earlier deadline is set (and when
    /// the hub goes).
    earlier: Arc<Notify>,
    started: std::sync::Once,
}

impl Drop for Rpc {
    fn drop(&mut self) {
        // The deadline task holds only a weak handle: wake it to find that out.
        self.earlier.notify_one();
    }
}

impl Default for Rpc {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                next_token: 1,
                ..State::default()
            }),
            earlier: Arc::new(Notify::new()),
            started: std::sync::Once::new(),
        }
    }
}

impl Rpc {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below keeps the tables consistent at each step that
        // could panic (none should): recover rather than stop serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `connection` to the group serving `name`; `false` if it was in
    /// it already.
    pub fn serve(&self, name: &str, connection: &Connection<Hub>) -> bool {
        let mut st = self.lock();
        let group = st.names.entry(name.to_owned()).or_insert_with(|| Group {
            responders: Vec::new(),
            next: 0,
        });
        if group.responders.iter().any(|c| c == connection) {
            return false;
        }
        group.responders.push(connection.clone());
        true
    }

    /// Takes `connection` out of the group serving `name`.
    pub fn unserve(&self, name: &str, connection: &Connection<Hub>) {
        let mut st = self.lock();
        if let Some(group) = st.names.get_mut(name) {
            group.leave(connection);
            if group.responders.is_empty() {
                st.names.remove(name);
            }
        }
    }

    /// Gives a request to the next responder of `name` with room, pushing
    /// it as an event; `Ok` once it is on its way.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        self: &Arc<Self>,
        requester: &Connection<Hub>,
        request: u64,
        name: &str,
        timeout_ms: u32,
        payload: &Payload,
        max_frame_len: usize,
        push: &mut Push<'_>,
    ) -> Result<(), HubError> {
        self.start_deadlines();
        let timeout = match timeout_ms {
            0 => DEFAULT_REQUEST_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_REQUEST_TIMEOUT),
        };
        let mut guard = self.lock();
        if guard.closed {
            return Err(HubError::ShuttingDown);
        }
        let token = guard.next_token;
        let peer = requester.peer();
        let event = EncodedEvent::new(
            &HubEventRef::Request {
                token,
                name,
                uid: peer.uid,
                pid: u32::try_from(peer.pid).unwrap_or(0),
                payload,
            },
            max_frame_len,
        )
        .map_err(|err| HubError::too_large(&err))?;
        let st = &mut *guard;
        let Some(group) = st.names.get_mut(name) else {
            return Err(HubError::NoResponders { name: name.into() });
        };
        // Round robin over the group, skipping responders that are full; a
        // responder whose connection is gone leaves the group.
        let mut tried = 0;
        let responder = loop {
            if group.responders.is_empty() {
                st.names.remove(name);
                return Err(HubError::NoResponders { name: name.into() });
            }
            if tried == group.responders.len() {
                return Err(HubError::Busy {
                    name: name.into(),
                    max: MAX_REQUESTS_IN_FLIGHT,
                });
            }
            let at = group.next % group.responders.len();
            let candidate = &group.responders[at];
            if st.in_flight.get(&candidate.id()).copied().unwrap_or(0) >= MAX_REQUESTS_IN_FLIGHT {
                group.next = at + 1;
                tried += 1;
                continue;
            }
            match push(candidate, &event) {
                Ok(()) => {
                    group.next = at + 1;
                    break candidate.id();
                }
                Err(_) => {
                    // Gone: the member after it is now at `at`.
                    group.responders.remove(at);
                    group.next = at;
                }
            }
        };
        st.next_token += 1;
        let deadline = Instant::now() + timeout;
        let earliest = st.armed.is_none_or(|armed| deadline < armed);
        if earliest {
            st.armed = Some(deadline);
        }
        st.deadlines.insert((deadline, token));
        *st.in_flight.entry(responder).or_default() += 1;
        st.by_requester
            .entry(requester.id())
            .or_default()
            .insert(token);
        st.by_responder.entry(responder).or_default().insert(token);
        st.waiting.insert(
            token,
            Waiting {
                requester: requester.clone(),
                request,
                responder,
                deadline,
            },
        );
        drop(guard);
        if earliest {
            self.earlier.notify_one();
        }
        Ok(())
    }

    /// Answers request `token` from `responder`: `Ok(true)` if the outcome
    /// went to the requester, `Ok(false)` if the request is not waiting or
    /// was not given to `responder`.
    pub fn answer(
        &self,
        responder: &Connection<Hub>,
        token: u64,
        outcome: Outcome,
        max_frame_len: usize,
        push: &mut Push<'_>,
    ) -> Result<bool, HubError> {
        let mut st = self.lock();
        match st.waiting.get(&token) {
            Some(w) if w.responder == responder.id() => {}
            _ => return Ok(false),
        }
        let Some(waiting) = st.take(token) else {
            return Ok(false);
        };
        drop(st);
        let (event, refused) = match EncodedEvent::new(
            &HubEventRef::Response {
                request: waiting.request,
                outcome: &outcome,
            },
            max_frame_len,
        ) {
            Ok(event) => (event, None),
            Err(err) => {
                // The reply does not fit: the requester is told so, and so
                // is the responder.
                let len = match &outcome {
                    Outcome::Reply { payload } => payload.len() as u64,
                    _ => 0,
                };
                let event = response(
                    waiting.request,
                    &Outcome::ReplyTooLarge { len },
                    max_frame_len,
                );
                (event, Some(HubError::too_large(&err)))
            }
        };
        let delivered = push(&waiting.requester, &event).is_ok();
        match refused {
            Some(err) => Err(err),
            None => Ok(delivered),
        }
    }

    /// `connection` has ended: it leaves every group in `served`, its
    /// requests in flight as a responder end in `ResponderGone`, and its
    /// own requests are forgotten.
    pub fn close(
        &self,
        connection: &Connection<Hub>,
        served: &HashSet<String>,
        max_frame_len: usize,
    ) {
        let mut st = self.lock();
        for name in served {
            if let Some(group) = st.names.get_mut(name) {
                group.leave(connection);
                if group.responders.is_empty() {
                    st.names.remove(name);
                }
            }
        }
        let id = connection.id();
        let mine: Vec<u64> = st
            .by_requester
            .get(&id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for token in mine {
            st.take(token);
        }
        let given: Vec<u64> = st
            .by_responder
            .get(&id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let gone: Vec<Waiting> = given.into_iter().filter_map(|t| st.take(t)).collect();
        drop(st);
        for waiting in gone {
            let event = response(waiting.request, &Outcome::ResponderGone, max_frame_len);
            let _ = waiting.requester.push_encoded(&event);
        }
    }

    /// From now on every request is refused with `ShuttingDown`.
    pub fn shut(&self) {
        self.lock().closed = true;
    }

    /// (names served, requests in flight)
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.names.len() as u64, st.waiting.len() as u64)
    }

    /// Each name served with its number of responders, until `f` says stop.
    pub fn each_name(&self, mut f: impl FnMut(&str, usize) -> bool) {
        let st = self.lock();
        for (name, group) in &st.names {
            if !f(name, group.responders.len()) {
                return;
            }
        }
    }

    /// Starts the deadline task (once, inside the runtime).
    fn start_deadlines(self: &Arc<Self>) {
        self.started.call_once(|| {
            tokio::spawn(expire(Arc::downgrade(self), Arc::clone(&self.earlier)));
        });
    }
}

/// A `Response` event; an outcome without a payload always fits.
fn response(request: u64, outcome: &Outcome, max_frame_len: usize) -> EncodedEvent {
    EncodedEvent::new(&HubEventRef::Response { request, outcome }, max_frame_len)
        .unwrap_or_default()
}

/// Ends every request whose deadline has passed with `Timeout`, until the
/// hub is gone.
async fn expire(rpc: Weak<Rpc>, earlier: Arc<Notify>) {
    loop {
        let next = {
            let Some(rpc) = rpc.upgrade() else { return };
            let now = Instant::now();
            let mut expired = Vec::new();
            let next = {
                let mut st = rpc.lock();
                while let Some(&(deadline, token)) = st.deadlines.first() {
                    if deadline > now {
                        break;
                    }
                    if let Some(waiting) = st.take(token) {
                        expired.push(waiting);
                    } else {
                        st.deadlines.pop_first();
                    }
                }
                let next = st.deadlines.first().map(|(deadline, _)| *deadline);
                st.armed = next;
                next
            };
            for waiting in expired {
                // A `Timeout` always fits in the smallest frame limit.
                let event = response(waiting.request, &Outcome::Timeout, MIN_FRAME_LEN);
                let _ = waiting.requester.push_encoded(&event);
            }
            next
        };
        // A notification sent meanwhile is kept (`notify_one` stores it).
        match next {
            Some(at) => {
                tokio::select! {
                    _ = crate::timer::sleep_until(at) => {}
                    _ = earlier.notified() => {}
                }
            }
            None => earlier.notified().await,
        }
    }
}
