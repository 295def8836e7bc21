//! Request/reply among the valid clients, run inside [`super::valid`] in
//! both phases:
//!
//! - responders: library clients serving one name (a group), each answering
//!   every request with a reply that embeds the request's own payload and
//!   the responder's identity (its index and connection id), after checking
//!   the request's name, payload, uid (ours) and pid (this process's);
//! - requesters with unique, self-checking payloads (requester id, counter,
//!   checksum: [`wire::make_payload`]): library clients one request at a
//!   time, library clients with [`WINDOW`] in flight, and raw clients with
//!   [`WINDOW`] pipelined on one connection whose every `Requested` and
//!   `Response` is checked at the wire level (order, ids, no duplicate);
//!   every reply must be the answer to that exact request (its payload
//!   echoed byte for byte) from a member of the group;
//! - one more responder, a raw connection, that stops answering halfway
//!   through the phase, holds what arrives, then closes its end: exactly
//!   its requests in flight must end in `ResponderGone`, promptly, and the
//!   requests after it must be served by the others;
//! - a third party (a valid client subscribed to `>`) that answers tokens it
//!   was never given (the live ones, as far as it can guess them, and the
//!   killed responder's held ones, which the harness hands it) with
//!   `Respond` and `Fail`: every one must be answered
//!   `Responded{delivered: false}`, it must never see a `Request` or
//!   `Response` event, and no requester may ever get its payload.
//!
//! Every outcome other than a verified reply is a failure, except the
//! `ResponderGone` of a request that the killed responder held. At the end
//! of the phase, each requester must have received exactly one outcome per
//! request sent (the raw one counts every `Response` frame on its
//! connection, and must get nothing more after its half-close), the
//! responders' `delivered: true` must match the requesters' verified
//! replies one for one, and the daemon's `Status` must show no request left
//! in flight. [`self_check`] proves first that the reply checker catches a
//! crossed, forged, corrupt or outsider's reply.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyhole::client::HubClient;
use keyhole::client::hub::{RequestError, Responder};
use keyhole::hub::{Failure, HubEvent, HubReply, HubRequest, Lag, Outcome};
use keyhole::token_file::read_token_file;
use tokio::sync::watch;

use super::hostile::Spread;
use super::valid::{Metric, OP_LIMIT, Shared, ticker};
use super::wire::{self, Conn, End, Msg, Req, Stamp};

/// Requests in flight at once for the windowed requesters.
pub const WINDOW: usize = 16;

/// How soon after the killed responder's close its requests must end in
/// `ResponderGone`.
pub const GONE_BOUND: Duration = Duration::from_secs(1);

/// The request/reply workload.
#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// The name the group serves.
    pub name: String,
    /// Library responders that stay all through the phase.
    pub responders: usize,
    /// Library requesters with one request at a time, and their period.
    pub serial: usize,
    pub serial_interval: Duration,
    /// Library requesters and raw requesters that send [`WINDOW`] requests
    /// at once every `window_interval`.
    pub windowed: usize,
    pub raw: usize,
    pub window_interval: Duration,
    /// Whether one more responder is killed halfway through the phase,
    /// after holding (reading, not answering) what arrives for `kill_hold`.
    pub kill: bool,
    pub kill_hold: Duration,
    /// Third parties forging answers: `forge_batch` tokens every
    /// `forge_interval`.
    pub forgers: usize,
    pub forge_interval: Duration,
    pub forge_batch: usize,
}

/// Requester ids (the `publisher` of their payloads' stamps), by kind.
const SERIAL_BASE: u32 = 2000;
const WINDOWED_BASE: u32 = 2100;
const RAW_BASE: u32 = 2200;
const FORGER_BASE: u32 = 2900;

const REPLY_MAGIC: [u8; 4] = *b"RPLY";
const FORGED_MAGIC: [u8; 4] = *b"FRGD";
const FORGED_MESSAGE: &str = "forged by a third party";

/// A request: (requester id, counter).
type Key = (u32, u64);

/// Requests accepted by the daemon so far, over the process (tokens are
/// numbered per daemon from 1, and only the valid clients of the main
/// daemon send requests): the third party's guess at the live tokens.
static SENT: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The killed responder's account of its end.
#[derive(Debug, Clone)]
struct Kill {
    /// Requests it received and never answered.
    held: Vec<Key>,
    /// When it stopped answering, closed its end, and saw the daemon close.
    stopped_at: Instant,
    closed_at: Instant,
    eof_at: Instant,
}

impl Ledger {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// What the request/reply clients of one run share.
#[derive(Default)]
pub struct Ledger {
    pub name: String,
    /// (index, connection id) of every member of the group, set before
    /// the clock starts.
    pub group: Vec<(u32, u64)>,
    /// The index of the responder that is killed.
    pub killed_idx: Option<u32>,
    /// Which responder each request was given to (a second one is a
    /// duplicate delivery).
    served: Mutex<HashMap<Key, u32>>,
    per_responder: Mutex<BTreeMap<u32, u64>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    /// `ResponderGone` outcomes and when their requesters got them.
    gone: Mutex<Vec<(Key, Instant)>>,
    kill: Mutex<Option<Kill>>,
    /// When the daemon closed the killed responder's connection.
    killed_eof: OnceLock<Instant>,
    /// Replies verified for requests sent after that.
    after_kill: AtomicU64,
    /// The latest tokens the killed responder was given (exact, unlike
    /// [`SENT`]): for the third party to forge answers to.
    live_tokens: Mutex<VecDeque<u64>>,
    /// The tokens it holds, until it closes.
    held_tokens: Mutex<HashSet<u64>>,
    /// When the third party got the `Responded` to each of its forged
    /// answers to one of those: certainly in flight if before the killed
    /// responder's close (the daemon handled the answer before the close).
    forged_held_at: Mutex<Vec<Instant>>,
    /// Per requester id: what it sent and what came back.
    per_requester: Mutex<BTreeMap<u32, Tally>>,
    /// `requests_in_flight` of a `Status` once every requester was done.
    left_in_flight: OnceLock<u64>,
    crossed: AtomicU64,
    forged: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
    third_party_events: AtomicU64,
    third_party_bad: AtomicU64,
}

/// One requester's requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Requests sent.
    pub sent: u64,
    /// Outcomes it received, of any kind (for the raw requester, every
    /// `Response` event or refusal on its connection, stray ones included).
    pub answered: u64,
    /// Replies verified as the answer to that exact request.
    pub verified: u64,
    /// `ResponderGone` outcomes.
    pub gone: u64,
}

impl Tally {
    /// Every request ended in exactly one outcome, each a verified reply or
    /// a `ResponderGone`.
    pub fn exact(&self) -> bool {
        self.sent > 0 && self.answered == self.sent && self.verified + self.gone == self.sent
    }
}

fn tally(shared: &Shared, rid: u32, f: impl FnOnce(&mut Tally)) {
    f(lock(&shared.rpc.per_requester).entry(rid).or_default());
}

/// What the request/reply workload of one run did.
#[derive(Debug, Default, Clone)]
pub struct RpcResult {
    /// Requests one at a time (library); latency per request.
    pub serial: Metric,
    /// [`WINDOW`] in flight (library); latency per request.
    pub windowed: Metric,
    /// [`WINDOW`] pipelined (raw, wire-checked); latency per request.
    pub raw: Metric,
    /// Requests received by the responders, checked and answered
    /// `delivered: true`.
    pub served: Metric,
    /// Requests in flight at the killed responder: attempted, those it held
    /// or whose requesters got `ResponderGone`; verified, those that ended
    /// `ResponderGone` within [`GONE_BOUND`] of its close.
    pub killed: Metric,
    /// Forged `Respond`/`Fail`: verified, those answered `delivered: false`.
    pub forged_answers: Metric,
    /// Of them, answers to a token certainly in flight (held by the killed
    /// responder, answered `delivered: false` before it closed).
    pub forged_in_flight: u64,
    /// Per requester: what it sent and what came back.
    pub per_requester: Vec<(String, Tally)>,
    /// The daemon's `requests_in_flight` once every requester was done
    /// (`None`: not asked).
    pub left_in_flight: Option<u64>,
    /// The phase's length, s (the requesters send for that long).
    pub secs: f64,
    pub outcomes: BTreeMap<String, u64>,
    pub crossed: u64,
    pub forged_deliveries: u64,
    pub duplicates: u64,
    /// Failures of the request/reply clients (also in the run's failures).
    pub failures: u64,
    /// Requests served per responder index (the killed one marked).
    pub per_responder: Vec<(String, u64)>,
    /// Requests the killed responder held (read, never answered).
    pub held: u64,
    /// `ResponderGone` for requests given to the killed responder that it
    /// never read (pushed after its last read, before the daemon's close).
    pub gone_unread: u64,
    /// From the killed responder's close to each `ResponderGone`, µs.
    pub gone_delay_us: Vec<u64>,
    /// Replies verified for requests sent after the killed responder's
    /// connection was closed.
    pub after_kill: u64,
    /// Events the third party received on its `>` subscription.
    pub third_party_events: u64,
    /// `Request` or `Response` events the third party received (must be 0).
    pub third_party_bad: u64,
}

impl RpcResult {
    pub fn requests(&self) -> [&Metric; 3] {
        [&self.serial, &self.windowed, &self.raw]
    }

    /// Verified replies per second of the phase, per kind of requester
    /// and in all.
    pub fn round_trips_per_s(&self) -> [f64; 4] {
        let per_s = |n: u64| n as f64 / self.secs.max(0.001);
        let [a, b, c] = self.requests().map(|m| m.verified);
        [per_s(a), per_s(b), per_s(c), per_s(a + b + c)]
    }

    pub fn gone_delay(&self) -> Option<Spread> {
        Spread::of(&mut self.gone_delay_us.clone())
    }
}

fn fail(shared: &Shared, what: String) {
    shared.rpc.failures.fetch_add(1, Ordering::Relaxed);
    shared.failures.add(what);
}

fn outcome(shared: &Shared, what: &str) {
    *lock(&shared.rpc.outcomes).entry(what.into()).or_default() += 1;
}

fn requester_name(rid: u32) -> String {
    match rid {
        r if r >= FORGER_BASE => format!("third party {}", r - FORGER_BASE),
        r if r >= RAW_BASE => format!("raw requester {}", r - RAW_BASE),
        r if r >= WINDOWED_BASE => format!("windowed requester {}", r - WINDOWED_BASE),
        r => format!("requester {}", r - SERIAL_BASE),
    }
}

// ---------------------------------------------------------------------------
// Replies.

/// magic, responder index, responder connection id, request length, the
/// request's payload, then an FNV-1a checksum of everything before it.
fn make_reply(responder: u32, conn: u64, request: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + request.len());
    out.extend_from_slice(&REPLY_MAGIC);
    out.extend_from_slice(&responder.to_le_bytes());
    out.extend_from_slice(&conn.to_le_bytes());
    out.extend_from_slice(&(request.len() as u32).to_le_bytes());
    out.extend_from_slice(request);
    let sum = wire::fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn forged_payload(counter: u64) -> Vec<u8> {
    let mut out = FORGED_MAGIC.to_vec();
    out.extend(wire::make_payload(Stamp {
        publisher: FORGER_BASE,
        counter,
        sent_us: wire::now_us(),
    }));
    out
}

enum Bad {
    Forged,
    /// The answer to another request, whose stamp this is.
    Crossed(Stamp),
    Corrupt(String),
}

/// The index of the responder that answered, if `reply` is the answer to
/// `sent` from a member of `group`.
fn check_reply(reply: &[u8], sent: &[u8], group: &[(u32, u64)]) -> Result<u32, Bad> {
    if reply.starts_with(&FORGED_MAGIC) {
        return Err(Bad::Forged);
    }
    if reply.len() < 28 {
        return Err(Bad::Corrupt(format!(
            "reply of {} bytes is too short",
            reply.len()
        )));
    }
    let (data, sum) = reply.split_at(reply.len() - 8);
    if wire::fnv1a(data) != u64::from_le_bytes(sum.try_into().unwrap()) {
        return Err(Bad::Corrupt("reply checksum mismatch".into()));
    }
    if data[..4] != REPLY_MAGIC {
        return Err(Bad::Corrupt("reply magic mismatch".into()));
    }
    let idx = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let conn = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let len = u32::from_le_bytes(data[16..20].try_into().unwrap()) as usize;
    if !group.contains(&(idx, conn)) {
        return Err(Bad::Corrupt(format!(
            "reply from responder {idx} on connection {conn}, not a member of the group"
        )));
    }
    let echoed = &data[20..];
    if echoed.len() != len {
        return Err(Bad::Corrupt(format!(
            "reply echoes {} bytes, says {len}",
            echoed.len()
        )));
    }
    if echoed != sent {
        return Err(match wire::check_payload(echoed) {
            Ok(stamp) => Bad::Crossed(stamp),
            Err(e) => Bad::Corrupt(format!("echoed request: {e}")),
        });
    }
    Ok(idx)
}

/// The reply checker tells a verified reply from a crossed, forged,
/// corrupt or outsider's one (run once at the start of every run, so a
/// harness that could not see a misdelivery does not pass).
pub fn self_check() {
    let group = [(0, 11), (1, 12)];
    for counter in 0..50 {
        let key = (SERIAL_BASE, counter);
        let sent = request_payload(key);
        let other = request_payload((WINDOWED_BASE, counter));
        let reply = make_reply(1, 12, &sent);
        assert!(matches!(check_reply(&reply, &sent, &group), Ok(1)));
        let crossed = make_reply(0, 11, &other);
        assert!(matches!(
            check_reply(&crossed, &sent, &group),
            Err(Bad::Crossed(s)) if s.publisher == WINDOWED_BASE && s.counter == counter
        ));
        let outsider = make_reply(1, 13, &sent);
        assert!(matches!(
            check_reply(&outsider, &sent, &group),
            Err(Bad::Corrupt(_))
        ));
        assert!(matches!(
            check_reply(&forged_payload(counter), &sent, &group),
            Err(Bad::Forged)
        ));
        let mut flipped = reply.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        assert!(check_reply(&flipped, &sent, &group).is_err());
    }
}

/// Judges one reply; `t0` is when its request was sent.
fn judge(shared: &Shared, key: Key, sent: &[u8], reply: &[u8], t0: Instant, m: &mut Metric) {
    let who = requester_name(key.0);
    tally(shared, key.0, |t| t.answered += 1);
    let after_kill = shared.rpc.killed_eof.get().is_some_and(|eof| t0 > *eof);
    match check_reply(reply, sent, &shared.rpc.group) {
        Ok(idx) if after_kill && Some(idx) == shared.rpc.killed_idx => {
            outcome(shared, "Reply from the killed responder, after its end");
            fail(
                shared,
                format!(
                    "{who}: request {} sent after the killed responder's end was answered by it",
                    key.1
                ),
            );
        }
        Ok(_) => {
            if after_kill {
                shared.rpc.after_kill.fetch_add(1, Ordering::Relaxed);
            }
            outcome(shared, "Reply, verified");
            tally(shared, key.0, |t| t.verified += 1);
            m.verified += 1;
            m.lat_us.push(t0.elapsed().as_micros() as u64);
        }
        Err(Bad::Forged) => {
            shared.rpc.forged.fetch_add(1, Ordering::Relaxed);
            outcome(shared, "Reply FORGED by the third party");
            fail(
                shared,
                format!(
                    "{who}: request {} got the third party's forged reply",
                    key.1
                ),
            );
        }
        Err(Bad::Crossed(stamp)) => {
            shared.rpc.crossed.fetch_add(1, Ordering::Relaxed);
            outcome(shared, "Reply CROSSED (another request's)");
            fail(
                shared,
                format!(
                    "{who}: request {} got the answer to {}'s request {}",
                    key.1,
                    requester_name(stamp.publisher),
                    stamp.counter
                ),
            );
        }
        Err(Bad::Corrupt(e)) => {
            outcome(shared, "Reply corrupt");
            fail(shared, format!("{who}: request {}: {e}", key.1));
        }
    }
}

/// A request's outcome other than a reply or `ResponderGone`.
fn judge_outcome(shared: &Shared, key: Key, what: &str, forged: bool) {
    tally(shared, key.0, |t| t.answered += 1);
    if forged {
        shared.rpc.forged.fetch_add(1, Ordering::Relaxed);
        outcome(shared, "Failed FORGED by the third party");
    } else {
        outcome(shared, what);
    }
    fail(
        shared,
        format!("{}: request {}: {what}", requester_name(key.0), key.1),
    );
}

/// A request that got no outcome (its connection ended, or time ran out).
fn lost(shared: &Shared, key: Key, what: &str) {
    outcome(shared, "no outcome (lost)");
    fail(
        shared,
        format!(
            "{}: request {}: no outcome ({what})",
            requester_name(key.0),
            key.1
        ),
    );
}

fn gone(shared: &Shared, key: Key) {
    tally(shared, key.0, |t| {
        t.answered += 1;
        t.gone += 1;
    });
    outcome(shared, "ResponderGone");
    lock(&shared.rpc.gone).push((key, Instant::now()));
}

fn request_payload(key: Key) -> Bytes {
    Bytes::from(wire::make_payload(Stamp {
        publisher: key.0,
        counter: key.1,
        sent_us: wire::now_us(),
    }))
}

// ---------------------------------------------------------------------------
// Requesters.

/// One request through the library; `false` if the client cannot go on.
/// A `ResponderGone` is not counted here (see [`reconcile`]).
async fn one_request(client: &HubClient, key: Key, shared: &Shared, m: &mut Metric) -> bool {
    let payload = request_payload(key);
    SENT.fetch_add(1, Ordering::Relaxed);
    tally(shared, key.0, |t| t.sent += 1);
    m.attempted += 1;
    let t0 = Instant::now();
    let call = client.request_timeout(&shared.rpc.name, payload.clone(), OP_LIMIT);
    match tokio::time::timeout(OP_LIMIT + Duration::from_secs(10), call).await {
        Ok(Ok(reply)) => {
            judge(shared, key, &payload, &reply, t0, m);
            true
        }
        Ok(Err(RequestError::ResponderGone)) => {
            m.attempted -= 1;
            gone(shared, key);
            true
        }
        Ok(Err(RequestError::Failed { message })) => {
            let forged = message == FORGED_MESSAGE;
            judge_outcome(shared, key, &format!("Failed: {message}"), forged);
            true
        }
        Ok(Err(RequestError::Client(e))) => {
            lost(shared, key, &format!("client error: {e}"));
            false
        }
        Ok(Err(e)) => {
            judge_outcome(shared, key, &format!("{e}"), false);
            true
        }
        Err(_) => {
            lost(shared, key, "none within the request's timeout + 10 s");
            false
        }
    }
}

/// One request at a time, every `period`.
pub async fn serial_requester(
    idx: usize,
    client: HubClient,
    period: Duration,
    shared: Arc<Shared>,
) -> Metric {
    let rid = SERIAL_BASE + idx as u32;
    let mut m = Metric::default();
    let mut tick = ticker(period);
    let mut counter = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        let go_on = one_request(&client, (rid, counter), &shared, &mut m).await;
        counter += 1;
        if !go_on {
            break;
        }
    }
    m
}

/// [`WINDOW`] requests at once (each a task of its own on one client),
/// every `period`.
pub async fn windowed_requester(
    idx: usize,
    client: HubClient,
    period: Duration,
    shared: Arc<Shared>,
) -> Metric {
    let rid = WINDOWED_BASE + idx as u32;
    let mut m = Metric::default();
    let mut tick = ticker(period);
    let mut counter = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        let tasks: Vec<_> = (0..WINDOW as u64)
            .map(|k| {
                let (client, shared) = (client.clone(), Arc::clone(&shared));
                let key = (rid, counter + k);
                tokio::spawn(async move {
                    let mut m = Metric::default();
                    let go_on = one_request(&client, key, &shared, &mut m).await;
                    (m, go_on)
                })
            })
            .collect();
        counter += WINDOW as u64;
        let mut go_on = true;
        for task in tasks {
            let (one, ok) = task.await.expect("request task");
            m.merge(one);
            go_on &= ok;
        }
        if !go_on {
            break;
        }
    }
    m
}

struct InFlight {
    key: Key,
    payload: Bytes,
    requested: bool,
}

/// [`WINDOW`] requests pipelined on one raw connection every `period`;
/// every `Requested` must come in request order, and every request must
/// end in exactly one `Response` with its id, after its `Requested`.
pub async fn raw_requester(idx: usize, period: Duration, shared: Arc<Shared>) -> Metric {
    let rid = RAW_BASE + idx as u32;
    let who = requester_name(rid);
    let mut m = Metric::default();
    let mut conn = match raw_connect(&shared).await {
        Ok((conn, _)) => conn,
        Err(e) => {
            fail(&shared, format!("{who}: {e}"));
            return m;
        }
    };
    let timeout_ms = OP_LIMIT.as_millis() as u32;
    let mut next_id = 1u64;
    let mut counter = 0u64;
    let mut tick = ticker(period);
    let clean = 'run: loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break true;
        }
        let mut bytes = Vec::new();
        let mut inflight: HashMap<u64, InFlight> = HashMap::new();
        let mut order: VecDeque<u64> = VecDeque::new();
        for _ in 0..WINDOW {
            let key = (rid, counter);
            let payload = request_payload(key);
            bytes.extend(wire::request(
                next_id,
                Req::Hub(HubRequest::Request {
                    name: shared.rpc.name.clone(),
                    timeout_ms,
                    payload: keyhole::Payload::from(payload.clone()),
                }),
            ));
            inflight.insert(
                next_id,
                InFlight {
                    key,
                    payload,
                    requested: false,
                },
            );
            order.push_back(next_id);
            next_id += 1;
            counter += 1;
        }
        m.attempted += WINDOW as u64;
        tally(&shared, rid, |t| t.sent += WINDOW as u64);
        let t0 = Instant::now();
        if let Err(e) = conn.send(&bytes).await {
            fail(&shared, format!("{who}: write: {e}"));
            break false;
        }
        let deadline = Instant::now() + OP_LIMIT + Duration::from_secs(5);
        while !inflight.is_empty() {
            let msg = match conn.read_msg(deadline).await {
                Ok(msg) => msg,
                Err(e) => {
                    for f in inflight.values() {
                        lost(&shared, f.key, &e);
                    }
                    fail(
                        &shared,
                        format!("{who}: {} requests without an outcome: {e}", inflight.len()),
                    );
                    break 'run false;
                }
            };
            match msg {
                Msg::Reply(id, HubReply::Requested) => {
                    if order.front() != Some(&id) {
                        fail(
                            &shared,
                            format!(
                                "{who}: Requested for id {id}, expected the reply to {:?}",
                                order.front()
                            ),
                        );
                        break 'run false;
                    }
                    order.pop_front();
                    if let Some(f) = inflight.get_mut(&id) {
                        f.requested = true;
                    }
                    SENT.fetch_add(1, Ordering::Relaxed);
                }
                Msg::Error {
                    id: Some(id),
                    code,
                    message,
                } if order.front() == Some(&id) => {
                    order.pop_front();
                    let f = inflight.remove(&id).expect("in flight");
                    judge_outcome(
                        &shared,
                        f.key,
                        &format!("refused: Error {} ({message})", wire::code_name(code)),
                        false,
                    );
                }
                Msg::Event(0, HubEvent::Response { request, outcome }) => {
                    let Some(f) = inflight.remove(&request) else {
                        stray(&shared, rid, request, next_id, "");
                        break 'run false;
                    };
                    if !f.requested {
                        fail(
                            &shared,
                            format!(
                                "{who}: the Response to id {request} came before its Requested"
                            ),
                        );
                        break 'run false;
                    }
                    match outcome {
                        Outcome::Reply { payload } => {
                            judge(&shared, f.key, &f.payload, &payload, t0, &mut m)
                        }
                        Outcome::ResponderGone => {
                            m.attempted -= 1;
                            gone(&shared, f.key);
                        }
                        Outcome::Failed { message } => {
                            let forged = message == FORGED_MESSAGE;
                            judge_outcome(&shared, f.key, &format!("Failed: {message}"), forged);
                        }
                        other => judge_outcome(&shared, f.key, &format!("{other:?}"), false),
                    }
                }
                other => {
                    fail(
                        &shared,
                        format!("{who}: unexpected {}", wire::describe(&other)),
                    );
                    break 'run false;
                }
            }
        }
    };
    if clean {
        // Every request has ended: from here on nothing may arrive, and the
        // daemon closes once it has read our end.
        conn.half_close().await;
        let tail = conn.read_to_end(Instant::now() + OP_LIMIT, None).await;
        let (frames, partial) = wire::split_frames(&tail.bytes);
        for frame in frames {
            match wire::decode(frame) {
                Ok(Msg::Event(0, HubEvent::Response { request, .. })) => {
                    stray(
                        &shared,
                        rid,
                        request,
                        next_id,
                        " after every request had ended",
                    );
                }
                Ok(other) => fail(
                    &shared,
                    format!(
                        "{who}: {} after every request had ended",
                        wire::describe(&other)
                    ),
                ),
                Err(e) => fail(&shared, format!("{who}: after the end: {e}")),
            }
        }
        if partial != 0 || tail.end == End::Open {
            fail(
                &shared,
                format!(
                    "{who}: after its half-close, {partial} bytes of a partial frame and the connection {:?}",
                    tail.end
                ),
            );
        }
    }
    m
}

/// A `Response` the raw requester `rid` did not wait for: a duplicate if
/// its id was sent (ids below `next_id`, whose requests had ended), or one
/// meant for another connection.
fn stray(shared: &Shared, rid: u32, request: u64, next_id: u64, when: &str) {
    let who = requester_name(rid);
    tally(shared, rid, |t| t.answered += 1);
    if request < next_id {
        shared.rpc.duplicates.fetch_add(1, Ordering::Relaxed);
        fail(
            shared,
            format!("{who}: a second Response for request id {request}{when}"),
        );
    } else {
        shared.rpc.crossed.fetch_add(1, Ordering::Relaxed);
        fail(
            shared,
            format!("{who}: a Response for id {request}, never sent{when}"),
        );
    }
}

async fn raw_connect(shared: &Shared) -> Result<(Conn, u64), String> {
    let token = read_token_file(&shared.token_file).map_err(|e| format!("token: {e}"))?;
    let mut conn = Conn::connect(&shared.socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let welcome = conn.authenticate_welcome(&token, OP_LIMIT).await?;
    Ok((conn, welcome.connection_id))
}

// ---------------------------------------------------------------------------
// Responders.

/// Checks a request as its responder sees it; the request's key.
fn check_incoming(
    shared: &Shared,
    name: &str,
    uid: u32,
    pid: u32,
    payload: &[u8],
) -> Result<Key, String> {
    if name != shared.rpc.name {
        return Err(format!("a request for {name:?}"));
    }
    let our_uid = rustix::process::geteuid().as_raw();
    if uid != our_uid {
        return Err(format!("a request from uid {uid}, not {our_uid}"));
    }
    if pid != std::process::id() {
        return Err(format!(
            "a request from pid {pid}, not the requester's {}",
            std::process::id()
        ));
    }
    let stamp = wire::check_payload(payload).map_err(|e| format!("request payload: {e}"))?;
    if !(SERIAL_BASE..FORGER_BASE).contains(&stamp.publisher) {
        return Err(format!(
            "a request stamped by {}, not a requester",
            stamp.publisher
        ));
    }
    Ok((stamp.publisher, stamp.counter))
}

/// Records that request `key` was given to responder `idx`; a request given
/// twice is a duplicate delivery.
fn note_served(shared: &Shared, idx: u32, key: Key) {
    if let Some(before) = lock(&shared.rpc.served).insert(key, idx) {
        shared.rpc.duplicates.fetch_add(1, Ordering::Relaxed);
        fail(
            shared,
            format!(
                "{}'s request {} was given to responder {before}, then again to responder {idx}",
                requester_name(key.0),
                key.1
            ),
        );
    }
}

/// Connects and serves the name (before the clock starts).
pub async fn serve(shared: &Shared, who: &str) -> Option<(HubClient, Responder)> {
    let client = super::valid::connect(shared, who).await?;
    match tokio::time::timeout(OP_LIMIT, client.serve(&shared.rpc.name)).await {
        Ok(Ok(responder)) => Some((client, responder)),
        Ok(Err(e)) => {
            fail(shared, format!("{who}: serve: {e}"));
            None
        }
        Err(_) => {
            fail(shared, format!("{who}: serve timed out"));
            None
        }
    }
}

/// A library responder: answers every request with [`make_reply`], until
/// `done`.
pub async fn responder(
    idx: u32,
    client: HubClient,
    mut serving: Responder,
    mut done: watch::Receiver<bool>,
    shared: Arc<Shared>,
) -> Metric {
    let who = format!("responder {idx}");
    let conn = client.welcome().await.unwrap().connection_id;
    let mut m = Metric::default();
    loop {
        let next = tokio::select! {
            biased;
            next = serving.next_request() => next,
            _ = done.wait_for(|d| *d) => break,
        };
        let request = match next {
            Some(Ok(request)) => request,
            Some(Err(e)) => {
                fail(&shared, format!("{who}: {e}"));
                break;
            }
            None => {
                fail(&shared, format!("{who}: the requests ended"));
                break;
            }
        };
        m.attempted += 1;
        let checked = check_incoming(
            &shared,
            request.name(),
            request.uid(),
            request.pid(),
            request.payload(),
        );
        let key = match checked {
            Ok(key) => key,
            Err(e) => {
                fail(&shared, format!("{who}: {e}"));
                let _ = request
                    .fail("the request failed the responder's checks")
                    .await;
                continue;
            }
        };
        note_served(&shared, idx, key);
        let reply = make_reply(idx, conn, request.payload());
        match tokio::time::timeout(OP_LIMIT, request.reply(reply)).await {
            Ok(Ok(true)) => {
                m.verified += 1;
                *lock(&shared.rpc.per_responder).entry(idx).or_default() += 1;
            }
            Ok(Ok(false)) => fail(
                &shared,
                format!(
                    "{who}: the reply to {}'s request {} was not delivered (Responded delivered: false)",
                    requester_name(key.0),
                    key.1
                ),
            ),
            Ok(Err(e)) => {
                fail(&shared, format!("{who}: reply: {e}"));
                break;
            }
            Err(_) => {
                fail(&shared, format!("{who}: reply timed out"));
                break;
            }
        }
    }
    m
}

/// The responder to kill: a raw connection serving the name (before the
/// clock starts), and its connection id.
pub async fn killed_setup(shared: &Shared, who: &str) -> Option<(Conn, u64)> {
    let setup = async {
        let (mut conn, id) = raw_connect(shared).await?;
        let serve = Req::Hub(HubRequest::Serve {
            name: shared.rpc.name.clone(),
        });
        conn.send(&wire::request(1, serve))
            .await
            .map_err(|e| format!("serve: {e}"))?;
        match conn.read_msg(Instant::now() + OP_LIMIT).await? {
            Msg::Reply(1, HubReply::Serving) => Ok((conn, id)),
            other => Err(format!("Serve answered with {}", wire::describe(&other))),
        }
    };
    match setup.await {
        Ok(ok) => Some(ok),
        Err(e) => {
            fail(shared, format!("{who}: {e}"));
            None
        }
    }
}

/// The killed responder's view of its connection.
struct Killed<'a> {
    idx: u32,
    conn_id: u64,
    who: String,
    shared: &'a Shared,
    next_id: u64,
    /// Ids of `Respond`s sent whose `Responded` has not come.
    pending: VecDeque<(u64, Key)>,
    held: Vec<Key>,
    m: Metric,
}

impl Killed<'_> {
    /// Handles one frame; `answer`: answer a request, or hold it. `Err`
    /// ends the responder.
    fn on(&mut self, msg: Msg, answer: bool, out: &mut Vec<u8>) -> Result<(), String> {
        match msg {
            Msg::Event(
                0,
                HubEvent::Request {
                    token,
                    name,
                    uid,
                    pid,
                    payload,
                },
            ) => {
                {
                    let mut live = lock(&self.shared.rpc.live_tokens);
                    live.push_back(token);
                    if live.len() > 32 {
                        live.pop_front();
                    }
                }
                let key = check_incoming(self.shared, &name, uid, pid, &payload)?;
                note_served(self.shared, self.idx, key);
                if !answer {
                    self.held.push(key);
                    lock(&self.shared.rpc.held_tokens).insert(token);
                    return Ok(());
                }
                self.m.attempted += 1;
                let reply = make_reply(self.idx, self.conn_id, &payload);
                out.extend(wire::request(
                    self.next_id,
                    Req::Hub(HubRequest::Respond {
                        token,
                        payload: keyhole::Payload::from(reply),
                    }),
                ));
                self.pending.push_back((self.next_id, key));
                self.next_id += 1;
                Ok(())
            }
            Msg::Reply(id, HubReply::Responded { delivered }) => {
                match self.pending.pop_front() {
                    Some((want, _)) if want != id => {
                        return Err(format!("Responded for id {id}, expected {want}"));
                    }
                    None => return Err(format!("Responded for id {id}, nothing pending")),
                    Some((_, key)) if !delivered => {
                        fail(
                            self.shared,
                            format!(
                                "{}: the reply to {}'s request {} was not delivered",
                                self.who,
                                requester_name(key.0),
                                key.1
                            ),
                        );
                    }
                    Some(_) => {
                        self.m.verified += 1;
                        *lock(&self.shared.rpc.per_responder)
                            .entry(self.idx)
                            .or_default() += 1;
                    }
                }
                Ok(())
            }
            other => Err(format!("unexpected {}", wire::describe(&other))),
        }
    }
}

/// Serves until `kill_at`, then stops answering, holds what arrives for
/// `hold`, closes its end with those requests in flight and reads what the
/// daemon still sends until it closes.
pub async fn killed_responder(
    idx: u32,
    mut conn: Conn,
    conn_id: u64,
    kill_at: Instant,
    hold: Duration,
    shared: Arc<Shared>,
) -> Metric {
    let mut k = Killed {
        idx,
        conn_id,
        who: format!("responder {idx} (killed mid-run)"),
        shared: &shared,
        next_id: 2,
        pending: VecDeque::new(),
        held: Vec::new(),
        m: Metric::default(),
    };
    let run = async {
        loop {
            let read = conn.read_msg(kill_at + OP_LIMIT);
            let msg = match tokio::time::timeout_at(kill_at.into(), read).await {
                Err(_) => break,
                Ok(msg) => msg?,
            };
            let mut out = Vec::new();
            k.on(msg, true, &mut out)?;
            if !out.is_empty() {
                conn.send(&out).await.map_err(|e| format!("respond: {e}"))?;
            }
        }
        let stopped_at = Instant::now();
        let hold_until = stopped_at + hold;
        loop {
            let read = conn.read_msg(hold_until + OP_LIMIT);
            match tokio::time::timeout_at(hold_until.into(), read).await {
                Err(_) => break,
                Ok(msg) => k.on(msg?, false, &mut Vec::new())?,
            }
        }
        // From here on the held requests may be ended at any moment.
        lock(&shared.rpc.held_tokens).clear();
        conn.half_close().await;
        let closed_at = conn.last_write;
        let tail = conn.read_to_end(closed_at + OP_LIMIT, None).await;
        let (frames, partial) = wire::split_frames(&tail.bytes);
        for f in frames {
            k.on(wire::decode(f)?, false, &mut Vec::new())?;
        }
        if tail.end == End::Open {
            return Err("the daemon did not close the connection after its half-close".into());
        }
        if partial != 0 {
            return Err(format!("{partial} bytes of a partial frame before EOF"));
        }
        if !k.pending.is_empty() {
            return Err(format!(
                "{} Responded replies missing at the end",
                k.pending.len()
            ));
        }
        let _ = shared.rpc.killed_eof.set(tail.at);
        *lock(&shared.rpc.kill) = Some(Kill {
            held: std::mem::take(&mut k.held),
            stopped_at,
            closed_at,
            eof_at: tail.at,
        });
        Ok::<(), String>(())
    };
    if let Err(e) = run.await {
        fail(&shared, format!("{}: {e}", k.who));
    }
    k.m
}

// ---------------------------------------------------------------------------
// The third party.

/// Subscribes to `>` and, every `period`, answers `batch` tokens around the
/// live ones (and the killed responder's latest, exactly), plus a few
/// random ones, with `Respond` and `Fail`, until `done`. Every answer must
/// be `Responded{delivered: false}`; it must get no `Request` or `Response`
/// event; every event it gets must be intact.
pub async fn third_party(
    idx: usize,
    period: Duration,
    batch: usize,
    mut done: watch::Receiver<bool>,
    shared: Arc<Shared>,
) -> Metric {
    let who = requester_name(FORGER_BASE + idx as u32);
    let mut m = Metric::default();
    let mut conn = match raw_connect(&shared).await {
        Ok((conn, _)) => conn,
        Err(e) => {
            fail(&shared, format!("{who}: {e}"));
            return m;
        }
    };
    let subscribe = Req::Hub(HubRequest::Subscribe {
        sid: 1,
        pattern: ">".into(),
        lag: Lag::Disconnect,
    });
    if let Err(e) = conn.send(&wire::request(1, subscribe)).await {
        fail(&shared, format!("{who}: subscribe: {e}"));
        return m;
    }
    // (id, token, whether the killed responder held it when the answer
    // was sent) of every answer sent, in order; token 0 for the Subscribe.
    let mut expected: VecDeque<(u64, u64, bool)> = VecDeque::from([(1, 0, false)]);
    let mut next_id = 2u64;
    let mut rng = wire::mix(0x7468_6972_6470 ^ idx as u64 ^ wire::now_us());
    let mut counter = 0u64;
    let mut tick = ticker(period);
    let mut drain_until: Option<Instant> = None;
    loop {
        if let Some(until) = drain_until {
            if expected.is_empty() {
                break;
            }
            if Instant::now() >= until {
                fail(
                    &shared,
                    format!("{who}: {} answers never answered", expected.len()),
                );
                break;
            }
        }
        let far = Instant::now() + OP_LIMIT;
        tokio::select! {
            _ = async { let _ = done.wait_for(|d| *d).await; }, if drain_until.is_none() => {
                drain_until = Some(Instant::now() + OP_LIMIT);
            }
            _ = tick.tick(), if drain_until.is_none() => {
                let mut tokens: Vec<u64> = lock(&shared.rpc.live_tokens).iter().rev().take(16).copied().collect();
                let held: HashSet<u64> = {
                    let held = lock(&shared.rpc.held_tokens);
                    tokens.iter().copied().filter(|t| held.contains(t)).collect()
                };
                let est = SENT.load(Ordering::Relaxed) + 1;
                tokens.extend(est.saturating_sub(batch as u64)..est + 2);
                for _ in 0..2 {
                    rng = wire::mix(rng);
                    tokens.push(rng);
                }
                let mut bytes = Vec::new();
                for token in tokens {
                    let answer = if counter % 2 == 0 {
                        HubRequest::Respond {
                            token,
                            payload: keyhole::Payload::from(forged_payload(counter)),
                        }
                    } else {
                        HubRequest::Fail {
                            token,
                            failure: Failure::Failed {
                                message: FORGED_MESSAGE.into(),
                            },
                        }
                    };
                    counter += 1;
                    bytes.extend(wire::request(next_id, Req::Hub(answer)));
                    expected.push_back((next_id, token, held.contains(&token)));
                    next_id += 1;
                    m.attempted += 1;
                }
                if let Err(e) = conn.send(&bytes).await {
                    fail(&shared, format!("{who}: write: {e}"));
                    break;
                }
            }
            msg = conn.read_msg(far) => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        fail(&shared, format!("{who}: {e}"));
                        break;
                    }
                };
                match msg {
                    Msg::Reply(id, reply) => {
                        let Some((want, token, held)) = expected.pop_front() else {
                            fail(&shared, format!("{who}: a reply (id {id}) to nothing sent"));
                            break;
                        };
                        match reply {
                            _ if id != want => {
                                fail(&shared, format!("{who}: reply id {id}, expected {want}"));
                                break;
                            }
                            HubReply::Subscribed if id == 1 => {}
                            HubReply::Responded { delivered: false } if id != 1 => {
                                m.verified += 1;
                                if held {
                                    lock(&shared.rpc.forged_held_at).push(Instant::now());
                                }
                            }
                            HubReply::Responded { delivered: true } => {
                                shared.rpc.forged.fetch_add(1, Ordering::Relaxed);
                                fail(
                                    &shared,
                                    format!("{who}: its answer to token {token} was DELIVERED"),
                                );
                            }
                            other => {
                                fail(&shared, format!("{who}: id {id} answered with {other:?}"));
                                break;
                            }
                        }
                    }
                    Msg::Event(1, HubEvent::Message { topic, payload, .. }) => {
                        shared.rpc.third_party_events.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = wire::check_payload(&payload) {
                            fail(&shared, format!("{who}: event on {topic:?}: {e}"));
                        }
                    }
                    Msg::Event(stream, event @ (HubEvent::Request { .. } | HubEvent::Response { .. })) => {
                        shared.rpc.third_party_bad.fetch_add(1, Ordering::Relaxed);
                        fail(
                            &shared,
                            format!("{who}: was sent an event meant for a responder or requester (stream {stream}): {event:?}"),
                        );
                    }
                    other => {
                        fail(&shared, format!("{who}: unexpected {}", wire::describe(&other)));
                        break;
                    }
                }
            }
        }
    }
    m
}

// ---------------------------------------------------------------------------
// The end of a run.

/// Asks the daemon how many requests are still in flight, once every
/// requester (and the killed responder) is done: it must be 0.
pub async fn count_left(shared: &Shared) {
    let who = "in-flight check";
    let Some(client) = super::valid::connect(shared, who).await else {
        return;
    };
    match tokio::time::timeout(OP_LIMIT, client.status()).await {
        Ok(Ok(status)) => {
            let _ = shared.rpc.left_in_flight.set(status.requests_in_flight);
        }
        Ok(Err(e)) => fail(shared, format!("{who}: Status: {e}")),
        Err(_) => fail(shared, format!("{who}: Status timed out")),
    }
}

/// Settles the run's `ResponderGone` outcomes against the killed
/// responder's account and fills in the figures. Called once every client
/// of the run has finished.
pub fn reconcile(shared: &Shared, cfg: &RpcConfig, r: &mut RpcResult) {
    let ledger = &shared.rpc;
    let gone = std::mem::take(&mut *lock(&ledger.gone));
    let kill = lock(&ledger.kill).take();
    if cfg.kill && kill.is_none() {
        fail(
            shared,
            "the responder to kill did not end as planned".into(),
        );
    }
    let held: HashSet<Key> = kill
        .as_ref()
        .map(|k| k.held.iter().copied().collect())
        .unwrap_or_default();
    if let Some(k) = &kill {
        r.held = k.held.len() as u64;
        if k.held.is_empty() {
            fail(
                shared,
                "the killed responder held no request when it closed".into(),
            );
        }
    }
    let mut ended = HashSet::new();
    for (key, at) in gone {
        r.killed.attempted += 1;
        ended.insert(key);
        let who = requester_name(key.0);
        let Some(k) = &kill else {
            fail(
                shared,
                format!(
                    "{who}: ResponderGone for request {}, and no responder was killed",
                    key.1
                ),
            );
            continue;
        };
        let delay = at.saturating_duration_since(k.closed_at);
        r.gone_delay_us.push(delay.as_micros() as u64);
        let unread = !held.contains(&key) && at >= k.stopped_at && at <= k.eof_at + GONE_BOUND;
        if !held.contains(&key) && !unread {
            fail(
                shared,
                format!(
                    "{who}: ResponderGone for request {}, which the killed responder was not given",
                    key.1
                ),
            );
        } else if delay > GONE_BOUND {
            fail(
                shared,
                format!(
                    "{who}: ResponderGone for request {} {:.0} ms after the killed responder's close",
                    key.1,
                    delay.as_secs_f64() * 1000.0
                ),
            );
        } else {
            r.killed.verified += 1;
            if unread {
                r.gone_unread += 1;
            }
        }
    }
    for key in held.difference(&ended) {
        r.killed.attempted += 1;
        fail(
            shared,
            format!(
                "{}: request {}, held by the killed responder, did not end in ResponderGone",
                requester_name(key.0),
                key.1
            ),
        );
    }
    let replies: u64 = r.requests().iter().map(|m| m.verified).sum();
    if r.served.verified != replies {
        fail(
            shared,
            format!(
                "responders delivered {} replies, requesters verified {replies}",
                r.served.verified
            ),
        );
    }
    if kill.is_some() && replies > 0 && ledger.after_kill.load(Ordering::Relaxed) == 0 {
        fail(
            shared,
            "no request sent after the killed responder's end was answered".into(),
        );
    }
    r.outcomes = std::mem::take(&mut *lock(&ledger.outcomes));
    r.crossed = ledger.crossed.load(Ordering::Relaxed);
    r.forged_deliveries = ledger.forged.load(Ordering::Relaxed);
    r.duplicates = ledger.duplicates.load(Ordering::Relaxed);
    r.after_kill = ledger.after_kill.load(Ordering::Relaxed);
    r.third_party_events = ledger.third_party_events.load(Ordering::Relaxed);
    r.third_party_bad = ledger.third_party_bad.load(Ordering::Relaxed);
    let held_at = std::mem::take(&mut *lock(&ledger.forged_held_at));
    r.forged_in_flight = kill.as_ref().map_or(0, |k| {
        held_at.iter().filter(|at| **at < k.closed_at).count() as u64
    });
    r.per_requester = lock(&ledger.per_requester)
        .iter()
        .map(|(rid, t)| (requester_name(*rid), *t))
        .collect();
    r.left_in_flight = ledger.left_in_flight.get().copied();
    if r.left_in_flight.is_some_and(|n| n != 0) {
        fail(
            shared,
            format!(
                "the daemon still had {} requests in flight once every requester was done",
                r.left_in_flight.unwrap_or(0)
            ),
        );
    }
    let expected = cfg.serial + cfg.windowed + cfg.raw;
    if r.per_requester.len() != expected {
        fail(
            shared,
            format!(
                "{} requesters sent requests, of {expected}",
                r.per_requester.len()
            ),
        );
    }
    for (who, t) in &r.per_requester {
        if !t.exact() {
            fail(
                shared,
                format!(
                    "{who}: sent {}, received {} outcomes, {} verified replies and {} ResponderGone",
                    t.sent, t.answered, t.verified, t.gone
                ),
            );
        }
    }
    let per = lock(&ledger.per_responder);
    r.per_responder = ledger
        .group
        .iter()
        .map(|(idx, _)| {
            let label = if Some(*idx) == ledger.killed_idx {
                format!("{idx} (killed)")
            } else {
                idx.to_string()
            };
            (label, per.get(idx).copied().unwrap_or(0))
        })
        .collect(); // Last: the checks above count too.
    r.failures = ledger.failures.load(Ordering::Relaxed);
}
