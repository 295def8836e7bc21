//! The valid clients, run the same way with and without attack:
//!
//! - request/response through the client library (`Ping`, `Status`), paced;
//! - publishers and subscribers through the client library: every event's
//!   sequence number, per-publisher order and payload checksum is checked,
//!   and every Ack'ed publish must reach every subscriber exactly once;
//! - raw pipelining clients that check every reply's id and kind in order at
//!   the wire level, with their own published events interleaved;
//! - a client that connects, authenticates, pings and disconnects for every
//!   operation (a real client arriving while the pending slots are flooded);
//! - request/reply between clients: responders, requesters, a responder
//!   killed halfway through, and a third party forging answers (see
//!   [`super::rpc`]).
//!
//! Every operation has a time limit; a failure of any kind is counted and
//! kept as a sample for the report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyhole::client::{ConnectOptions, HubClient, Subscription};
use keyhole::hub::{HubEvent, HubReply, HubRequest};
use keyhole::token_file::read_token_file;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::rpc::{self, Ledger, RpcConfig, RpcResult};
use super::wire::{self, Conn, Msg, Req, Stamp};

/// Time limit of any one valid operation.
pub const OP_LIMIT: Duration = Duration::from_secs(10);

/// The valid workload. Rates are per client.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub rr_clients: usize,
    pub rr_interval: Duration,
    pub raw_clients: usize,
    pub raw_interval: Duration,
    pub raw_batch: usize,
    pub publishers: usize,
    pub publish_interval: Duration,
    pub subscribers: usize,
    pub churn_interval: Duration,
    pub topic: String,
    pub rpc: RpcConfig,
}

/// Operations of one kind: how many were attempted, how many were completed
/// and verified, and their latencies (microseconds).
#[derive(Debug, Default, Clone)]
pub struct Metric {
    pub attempted: u64,
    pub verified: u64,
    pub lat_us: Vec<u64>,
}

impl Metric {
    pub fn merge(&mut self, other: Metric) {
        self.attempted += other.attempted;
        self.verified += other.verified;
        self.lat_us.extend(other.lat_us);
    }
}

/// What one run of the valid workload did.
#[derive(Debug, Default)]
pub struct ValidResult {
    /// `Ping` and `Status` through the library.
    pub rr: Metric,
    /// `Publish` until its `Reply Published`, through the library.
    pub publish: Metric,
    /// Events: attempted = Ack'ed publishes x subscribers; latency from
    /// publish to receipt.
    pub delivery: Metric,
    /// Raw pipelined requests; latency per batch.
    pub raw: Metric,
    /// Events of the raw clients' own publishes (no latency: they are read
    /// only between batches).
    pub raw_events: Metric,
    /// Connect + handshake + `Ping` + close.
    pub churn: Metric,
    /// Request/reply between clients.
    pub rpc: RpcResult,
    pub failures: u64,
    pub failure_samples: Vec<String>,
    /// Largest `pending` seen in a `Status` reply.
    pub peak_pending: u64,
    /// Largest `authenticated` seen in a `Status` reply.
    pub peak_authenticated: u64,
}

impl ValidResult {
    pub fn metrics(&self) -> [(&'static str, &Metric); 12] {
        [
            ("request/response (library Ping, Status)", &self.rr),
            ("publish -> Ack (library)", &self.publish),
            ("events delivered (library subscribers)", &self.delivery),
            ("raw pipelined requests (wire-checked)", &self.raw),
            ("raw clients' own events", &self.raw_events),
            ("connect + auth + Ping + close", &self.churn),
            (
                "client request -> verified reply, one at a time (library)",
                &self.rpc.serial,
            ),
            (
                "client request -> verified reply, 16 in flight (library)",
                &self.rpc.windowed,
            ),
            (
                "client request -> verified reply, 16 pipelined (raw, wire-checked)",
                &self.rpc.raw,
            ),
            (
                "requests served (uid, pid, payload checked; delivered)",
                &self.rpc.served,
            ),
            (
                "in flight at the killed responder -> ResponderGone",
                &self.rpc.killed,
            ),
            (
                "third party's forged Respond/Fail -> delivered: false",
                &self.rpc.forged_answers,
            ),
        ]
    }

    /// Every operation attempted was completed and verified.
    pub fn all_verified(&self) -> bool {
        self.failures == 0
            && self
                .metrics()
                .iter()
                .all(|(_, m)| m.attempted == m.verified)
    }
}

#[derive(Default)]
pub struct Failures {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Failures {
    pub fn add(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 20 {
            samples.push(what);
        }
    }
}

pub struct Shared {
    options: ConnectOptions,
    pub socket: PathBuf,
    pub token_file: PathBuf,
    pub end: Instant,
    pub failures: Failures,
    peak_pending: AtomicU64,
    peak_authenticated: AtomicU64,
    pub rpc: Ledger,
}

pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

pub async fn connect(shared: &Shared, who: &str) -> Option<HubClient> {
    match tokio::time::timeout(OP_LIMIT, shared.options.connect_hub()).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(e)) => {
            shared.failures.add(format!("{who}: connect: {e}"));
            None
        }
        Err(_) => {
            shared.failures.add(format!("{who}: connect timed out"));
            None
        }
    }
}

/// Runs the workload for `duration` (plus the drain of events in flight).
pub async fn run(
    cfg: &ValidConfig,
    socket: PathBuf,
    token_file: PathBuf,
    duration: Duration,
) -> ValidResult {
    let options = ConnectOptions::new()
        .socket(&socket)
        .token_file(&token_file)
        .timeout(OP_LIMIT);
    let mut shared = Shared {
        options,
        socket,
        token_file,
        end: Instant::now(),
        failures: Failures::default(),
        peak_pending: AtomicU64::new(0),
        peak_authenticated: AtomicU64::new(0),
        rpc: Ledger::new(&cfg.rpc.name),
    };

    // Subscribers and publishers are connected (and subscribed) before the
    // clock starts, so every publish has every subscriber.
    let mut subs: Vec<(HubClient, Subscription)> = Vec::new();
    for i in 0..cfg.subscribers {
        let who = format!("subscriber {i}");
        if let Some(client) = connect(&shared, &who).await {
            match tokio::time::timeout(OP_LIMIT, client.subscribe(&cfg.topic)).await {
                Ok(Ok(sub)) => subs.push((client, sub)),
                Ok(Err(e)) => shared.failures.add(format!("{who}: subscribe: {e}")),
                Err(_) => shared.failures.add(format!("{who}: subscribe timed out")),
            }
        }
    }
    let mut pubs: Vec<HubClient> = Vec::new();
    for i in 0..cfg.publishers {
        if let Some(client) = connect(&shared, &format!("publisher {i}")).await {
            pubs.push(client);
        }
    }
    let mut rrs: Vec<HubClient> = Vec::new();
    for i in 0..cfg.rr_clients {
        if let Some(client) = connect(&shared, &format!("rr client {i}")).await {
            rrs.push(client);
        }
    }
    // The group is complete before the clock starts, and so are the
    // library requesters' connections.
    let rc = &cfg.rpc;
    let mut responders = Vec::new();
    for i in 0..rc.responders {
        if let Some((client, serving)) = rpc::serve(&shared, &format!("responder {i}")).await {
            let conn = client.welcome().await.unwrap().connection_id;
            shared.rpc.group.push((i as u32, conn));
            responders.push((i as u32, client, serving));
        }
    }
    let mut killed = None;
    if rc.kill {
        let idx = rc.responders as u32;
        let who = format!("responder {idx} (to be killed)");
        if let Some((conn, id)) = rpc::killed_setup(&shared, &who).await {
            shared.rpc.group.push((idx, id));
            shared.rpc.killed_idx = Some(idx);
            killed = Some((idx, conn, id));
        }
    }
    let mut serial = Vec::new();
    for i in 0..rc.serial {
        if let Some(client) = connect(&shared, &format!("requester {i}")).await {
            serial.push(client);
        }
    }
    let mut windowed = Vec::new();
    for i in 0..rc.windowed {
        if let Some(client) = connect(&shared, &format!("windowed requester {i}")).await {
            windowed.push(client);
        }
    }

    shared.end = Instant::now() + duration;
    let kill_at = Instant::now() + duration / 2;
    let shared = Arc::new(shared);
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..cfg.publishers).map(|_| AtomicU64::new(0)).collect());
    let (done_tx, done_rx) = watch::channel(false);

    let sub_tasks: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, (client, sub))| {
            let (shared, acked, done, topic) = (
                Arc::clone(&shared),
                Arc::clone(&acked),
                done_rx.clone(),
                cfg.topic.clone(),
            );
            tokio::spawn(subscriber(i, client, sub, topic, acked, done, shared))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let (shared, acked, topic, period) = (
                Arc::clone(&shared),
                Arc::clone(&acked),
                cfg.topic.clone(),
                cfg.publish_interval,
            );
            tokio::spawn(publisher(i as u32, client, topic, period, acked, shared))
        })
        .collect();
    let rr_tasks: Vec<_> = rrs
        .into_iter()
        .enumerate()
        .map(|(i, client)| tokio::spawn(rr_client(i, client, cfg.rr_interval, Arc::clone(&shared))))
        .collect();
    let raw_tasks: Vec<_> = (0..cfg.raw_clients)
        .map(|i| {
            tokio::spawn(raw_client(
                i,
                cfg.raw_interval,
                cfg.raw_batch,
                Arc::clone(&shared),
            ))
        })
        .collect();
    let churn_task = tokio::spawn(churn(cfg.churn_interval, Arc::clone(&shared)));
    let (rpc_done_tx, rpc_done_rx) = watch::channel(false);
    let responder_tasks: Vec<_> = responders
        .into_iter()
        .map(|(i, client, serving)| {
            tokio::spawn(rpc::responder(
                i,
                client,
                serving,
                rpc_done_rx.clone(),
                Arc::clone(&shared),
            ))
        })
        .collect();
    let killed_task = killed.map(|(i, conn, id)| {
        tokio::spawn(rpc::killed_responder(
            i,
            conn,
            id,
            kill_at,
            rc.kill_hold,
            Arc::clone(&shared),
        ))
    });
    let forger_tasks: Vec<_> = (0..rc.forgers)
        .map(|i| {
            tokio::spawn(rpc::third_party(
                i,
                rc.forge_interval,
                rc.forge_batch,
                rpc_done_rx.clone(),
                Arc::clone(&shared),
            ))
        })
        .collect();
    let serial_tasks: Vec<_> = serial
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(rpc::serial_requester(
                i,
                client,
                rc.serial_interval,
                Arc::clone(&shared),
            ))
        })
        .collect();
    let windowed_tasks: Vec<_> = windowed
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(rpc::windowed_requester(
                i,
                client,
                rc.window_interval,
                Arc::clone(&shared),
            ))
        })
        .collect();
    let raw_rpc_tasks: Vec<_> = (0..rc.raw)
        .map(|i| {
            tokio::spawn(rpc::raw_requester(
                i,
                rc.window_interval,
                Arc::clone(&shared),
            ))
        })
        .collect();

    let mut result = ValidResult::default();
    for task in pub_tasks {
        result.publish.merge(task.await.expect("publisher task"));
    }
    let _ = done_tx.send(true);
    for task in sub_tasks {
        result.delivery.merge(task.await.expect("subscriber task"));
    }
    for task in rr_tasks {
        result.rr.merge(task.await.expect("rr task"));
    }
    for task in raw_tasks {
        let (raw, events) = task.await.expect("raw task");
        result.raw.merge(raw);
        result.raw_events.merge(events);
    }
    result.churn.merge(churn_task.await.expect("churn task"));
    // The requesters first: once they are done, nothing is in flight.
    for task in serial_tasks {
        result.rpc.serial.merge(task.await.expect("requester task"));
    }
    for task in windowed_tasks {
        result
            .rpc
            .windowed
            .merge(task.await.expect("requester task"));
    }
    for task in raw_rpc_tasks {
        result.rpc.raw.merge(task.await.expect("requester task"));
    }
    if let Some(task) = killed_task {
        result
            .rpc
            .served
            .merge(task.await.expect("killed responder task"));
    }
    rpc::count_left(&shared).await;
    let _ = rpc_done_tx.send(true);
    for task in responder_tasks {
        result.rpc.served.merge(task.await.expect("responder task"));
    }
    for task in forger_tasks {
        result
            .rpc
            .forged_answers
            .merge(task.await.expect("third party task"));
    }
    result.rpc.secs = duration.as_secs_f64();
    rpc::reconcile(&shared, &cfg.rpc, &mut result.rpc);

    // Every subscriber asked for was owed every Ack'ed publish, including
    // one that failed to connect.
    let total_acked: u64 = acked.iter().map(|a| a.load(Ordering::Acquire)).sum();
    let owed = total_acked * cfg.subscribers as u64;
    if result.delivery.attempted != owed {
        shared.failures.add(format!(
            "events owed {owed} ({total_acked} Ack'ed publishes x {} subscribers), accounted {}",
            cfg.subscribers, result.delivery.attempted
        ));
        result.delivery.attempted = owed.max(result.delivery.attempted);
    }
    result.failures = shared.failures.count.load(Ordering::Relaxed);
    result.failure_samples = shared.failures.samples.lock().unwrap().clone();
    result.peak_pending = shared.peak_pending.load(Ordering::Relaxed);
    result.peak_authenticated = shared.peak_authenticated.load(Ordering::Relaxed);
    result
}

async fn publisher(
    idx: u32,
    client: HubClient,
    topic: String,
    period: Duration,
    acked: Arc<Vec<AtomicU64>>,
    shared: Arc<Shared>,
) -> Metric {
    let mut m = Metric::default();
    let mut tick = ticker(period);
    let mut counter = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        let payload = wire::make_payload(Stamp {
            publisher: idx,
            counter,
            sent_us: wire::now_us(),
        });
        m.attempted += 1;
        let t0 = Instant::now();
        match tokio::time::timeout(OP_LIMIT, client.publish(&topic, payload)).await {
            Ok(Ok(_)) => {
                m.lat_us.push(t0.elapsed().as_micros() as u64);
                m.verified += 1;
                counter += 1;
                acked[idx as usize].store(counter, Ordering::Release);
            }
            Ok(Err(e)) => {
                shared
                    .failures
                    .add(format!("publisher {idx}: publish {counter}: {e}"));
                break;
            }
            Err(_) => {
                shared
                    .failures
                    .add(format!("publisher {idx}: publish {counter} timed out"));
                break;
            }
        }
    }
    m
}

async fn subscriber(
    idx: usize,
    _client: HubClient,
    mut sub: Subscription,
    topic: String,
    acked: Arc<Vec<AtomicU64>>,
    done: watch::Receiver<bool>,
    shared: Arc<Shared>,
) -> Metric {
    let mut m = Metric::default();
    let mut next = vec![0u64; acked.len()];
    let mut last_seq: Option<u64> = None;
    let mut drain_until: Option<Instant> = None;
    let fail = |what: String| shared.failures.add(format!("subscriber {idx}: {what}"));
    loop {
        if *done.borrow() {
            let until = *drain_until.get_or_insert_with(|| Instant::now() + OP_LIMIT);
            let complete = next
                .iter()
                .zip(acked.iter())
                .all(|(n, a)| *n >= a.load(Ordering::Acquire));
            if complete {
                break;
            }
            if Instant::now() >= until {
                let missing: u64 = next
                    .iter()
                    .zip(acked.iter())
                    .map(|(n, a)| a.load(Ordering::Acquire).saturating_sub(*n))
                    .sum();
                fail(format!("{missing} Ack'ed events never arrived"));
                break;
            }
        }
        let event = match tokio::time::timeout(Duration::from_millis(50), sub.next_event()).await {
            Err(_) => continue,
            Ok(None) => {
                fail("subscription ended".into());
                break;
            }
            Ok(Some(Err(e))) => {
                fail(format!("subscription error: {e}"));
                break;
            }
            Ok(Some(Ok(event))) => event,
        };
        let received_us = wire::now_us();
        if event.topic != topic {
            fail(format!("event of topic {:?}", event.topic));
            break;
        }
        if let Some(last) = last_seq {
            if event.sequence != last + 1 {
                fail(format!(
                    "sequence {} after {last}: {}",
                    event.sequence,
                    if event.sequence <= last {
                        "duplicate or reordered"
                    } else {
                        "events lost"
                    }
                ));
                break;
            }
        }
        last_seq = Some(event.sequence);
        let stamp = match wire::check_payload(&event.payload) {
            Ok(stamp) => stamp,
            Err(e) => {
                fail(format!("event {}: {e}", event.sequence));
                break;
            }
        };
        let p = stamp.publisher as usize;
        if p >= next.len() || stamp.counter != next[p] {
            fail(format!(
                "publisher {p} message {} arrived, expected {}",
                stamp.counter,
                next.get(p).copied().unwrap_or(0)
            ));
            break;
        }
        next[p] += 1;
        m.verified += 1;
        m.lat_us.push(received_us.saturating_sub(stamp.sent_us));
    }
    // Owed: every Ack'ed publish (read after the publishers finished).
    m.attempted = acked.iter().map(|a| a.load(Ordering::Acquire)).sum();
    if m.verified > m.attempted {
        fail(format!(
            "{} events received for {} Ack'ed publishes",
            m.verified, m.attempted
        ));
    }
    m
}

async fn rr_client(idx: usize, client: HubClient, period: Duration, shared: Arc<Shared>) -> Metric {
    let mut m = Metric::default();
    let mut tick = ticker(period);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        m.attempted += 1;
        let t0 = Instant::now();
        let outcome = if n % 2 == 0 {
            tokio::time::timeout(OP_LIMIT, client.ping())
                .await
                .map(|r| r.map_err(|e| e.to_string()))
        } else {
            tokio::time::timeout(OP_LIMIT, client.status())
                .await
                .map(|r| match r {
                    Ok(status)
                        if status.version == env!("CARGO_PKG_VERSION")
                            && status.authenticated >= 1 =>
                    {
                        shared
                            .peak_pending
                            .fetch_max(status.pending, Ordering::Relaxed);
                        shared
                            .peak_authenticated
                            .fetch_max(status.authenticated, Ordering::Relaxed);
                        Ok(())
                    }
                    Ok(status) => Err(format!("implausible status {status:?}")),
                    Err(e) => Err(e.to_string()),
                })
        };
        n += 1;
        match outcome {
            Ok(Ok(())) => {
                m.lat_us.push(t0.elapsed().as_micros() as u64);
                m.verified += 1;
            }
            Ok(Err(e)) => {
                shared.failures.add(format!("rr client {idx}: {e}"));
                break;
            }
            Err(_) => {
                shared
                    .failures
                    .add(format!("rr client {idx}: request timed out"));
                break;
            }
        }
    }
    m
}

/// What a raw client expects back for one request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// `Ack` to a `Ping`.
    Ack,
    /// `Reply Published` to a `Publish`.
    Published,
    /// `Reply Status` to a `Status`.
    Status,
}

async fn raw_client(
    idx: usize,
    period: Duration,
    batch: usize,
    shared: Arc<Shared>,
) -> (Metric, Metric) {
    let mut m = Metric::default();
    let mut ev = Metric::default();
    let who = format!("raw client {idx}");
    let fail = |what: String| shared.failures.add(format!("{who}: {what}"));
    let token = match read_token_file(&shared.token_file) {
        Ok(t) => t,
        Err(e) => {
            fail(format!("token: {e}"));
            return (m, ev);
        }
    };
    let mut conn = match Conn::connect(&shared.socket).await {
        Ok(c) => c,
        Err(e) => {
            fail(format!("connect: {e}"));
            return (m, ev);
        }
    };
    if let Err(e) = conn.authenticate(&token, OP_LIMIT).await {
        fail(e);
        return (m, ev);
    }
    let topic = format!("torture.raw.{idx}");
    let publisher = 1000 + idx as u32;
    let mut state = RawEvents {
        topic: topic.clone(),
        publisher,
        next: 0,
        last_seq: None,
    };
    let setup = wire::request(1, wire::subscribe(&topic));
    if let Err(e) = conn.send(&setup).await {
        fail(format!("subscribe: {e}"));
        return (m, ev);
    }
    match conn.read_msg(Instant::now() + OP_LIMIT).await {
        Ok(Msg::Reply(1, HubReply::Subscribed)) => {}
        Ok(other) => {
            fail(format!("subscribe answered with {other:?}"));
            return (m, ev);
        }
        Err(e) => {
            fail(format!("subscribe: {e}"));
            return (m, ev);
        }
    }
    let mut next_id = 2u64;
    let mut published = 0u64;
    let mut tick = ticker(period);
    'run: loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        let mut wire_bytes = Vec::new();
        let mut expected = Vec::with_capacity(batch);
        for k in 0..batch {
            let (req, kind) = match k % 4 {
                0 => (Req::Ping, Expect::Ack),
                2 => (Req::Hub(HubRequest::Status), Expect::Status),
                _ => {
                    let payload = wire::make_payload(Stamp {
                        publisher,
                        counter: published
                            + expected
                                .iter()
                                .filter(|(_, e)| *e == Expect::Published)
                                .count() as u64,
                        sent_us: wire::now_us(),
                    });
                    (
                        wire::publish(&topic, Bytes::from(payload)),
                        Expect::Published,
                    )
                }
            };
            wire_bytes.extend_from_slice(&wire::request(next_id, req));
            expected.push((next_id, kind));
            next_id += 1;
        }
        m.attempted += batch as u64;
        let t0 = Instant::now();
        if let Err(e) = conn.send(&wire_bytes).await {
            fail(format!("write: {e}"));
            break;
        }
        let deadline = Instant::now() + OP_LIMIT;
        let mut answered = 0;
        while answered < expected.len() {
            let msg = match conn.read_msg(deadline).await {
                Ok(msg) => msg,
                Err(e) => {
                    fail(format!("reply {answered} of a batch: {e}"));
                    break 'run;
                }
            };
            if let Msg::Event(..) = msg {
                if let Err(e) = state.check(&msg, &mut ev) {
                    fail(e);
                    break 'run;
                }
                continue;
            }
            let (id, kind) = expected[answered];
            let ok = match (&msg, kind) {
                (Msg::Ack(got), Expect::Ack)
                | (Msg::Reply(got, HubReply::Published { .. }), Expect::Published) => *got == id,
                (Msg::Reply(got, HubReply::Status(status)), Expect::Status) => {
                    *got == id && status.subscriptions >= 1
                }
                _ => false,
            };
            if !ok {
                fail(format!("request id {id} ({kind:?}) answered with {msg:?}"));
                break 'run;
            }
            if kind == Expect::Published {
                published += 1;
            }
            answered += 1;
            m.verified += 1;
        }
        m.lat_us.push(t0.elapsed().as_micros() as u64);
    }
    // Every Ack'ed publish of this client must come back to it as an event.
    ev.attempted = published;
    let deadline = Instant::now() + OP_LIMIT;
    while state.next < published {
        match conn.read_msg(deadline).await {
            Ok(msg @ Msg::Event(..)) => {
                if let Err(e) = state.check(&msg, &mut ev) {
                    fail(e);
                    break;
                }
            }
            Ok(other) => {
                fail(format!("unexpected {other:?} while draining events"));
                break;
            }
            Err(e) => {
                fail(format!(
                    "{} own events missing: {e}",
                    published - state.next
                ));
                break;
            }
        }
    }
    (m, ev)
}

struct RawEvents {
    topic: String,
    publisher: u32,
    next: u64,
    last_seq: Option<u64>,
}

impl RawEvents {
    fn check(&mut self, msg: &Msg, ev: &mut Metric) -> Result<(), String> {
        let Msg::Event(
            _,
            HubEvent::Message {
                topic,
                sequence,
                payload,
            },
        ) = msg
        else {
            return Err(format!("not an event: {msg:?}"));
        };
        if *topic != self.topic {
            return Err(format!("event of topic {topic:?}"));
        }
        if let Some(last) = self.last_seq {
            if *sequence != last + 1 {
                return Err(format!("sequence {sequence} after {last}"));
            }
        }
        self.last_seq = Some(*sequence);
        let stamp = wire::check_payload(payload)?;
        if stamp.publisher != self.publisher || stamp.counter != self.next {
            return Err(format!(
                "own event {}:{} arrived, expected {}:{}",
                stamp.publisher, stamp.counter, self.publisher, self.next
            ));
        }
        self.next += 1;
        ev.verified += 1;
        // No latency: this client reads its events only between batches.
        Ok(())
    }
}

async fn churn(period: Duration, shared: Arc<Shared>) -> Metric {
    let mut m = Metric::default();
    let mut tick = ticker(period);
    loop {
        tick.tick().await;
        if Instant::now() >= shared.end {
            break;
        }
        m.attempted += 1;
        let t0 = Instant::now();
        let once = async {
            let client = shared
                .options
                .connect_hub()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            client.ping().await.map_err(|e| format!("ping: {e}"))
        };
        match tokio::time::timeout(OP_LIMIT, once).await {
            Ok(Ok(())) => {
                m.lat_us.push(t0.elapsed().as_micros() as u64);
                m.verified += 1;
            }
            Ok(Err(e)) => shared.failures.add(format!("churn client: {e}")),
            Err(_) => shared.failures.add("churn client: timed out".into()),
        }
    }
    m
}
