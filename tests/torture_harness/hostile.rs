//! The hostile side, run in attacker processes separate from the valid
//! clients (the daemon evicts pending connections by peer process, so a
//! flood must come from a process of its own to be a flood):
//!
//! - `flood`: more silent pending connections than the pending slots, each
//!   reconnected as soon as the daemon drops it (rate-limited);
//! - `mixed`: slowloris (a handshake dribbled one byte per second, and
//!   connections that send nothing), bad length prefixes (4 GiB, handshake
//!   size + 1), random garbage, wrong tokens, bad magic and version,
//!   connect/disconnect churn, disconnects in the middle of a frame before
//!   and after authentication, bad frames after authentication (random
//!   bytes, and intact frames of random requests, each of which must be
//!   answered with its id while the connection stays open),
//!   subscribers that never read, and descriptor sprayers (descriptors
//!   with the handshake, before `AcceptFds`, unannounced, 253 at once,
//!   announced and missing, odd control messages, sprayed over a frame:
//!   see [`super::fdspray`]);
//! - `one_silent`: the many-process flood: one silent pending connection
//!   per process, reconnected as soon as the daemon closes it (hundreds of
//!   these processes run at once);
//! - `fd_pass`: the fd-passing flood: one process that holds many silent
//!   connections, each made by a short-lived child process of its own that
//!   passed it back over a socketpair (`SCM_RIGHTS`) and exited, so that
//!   every connection's `SO_PEERCRED` pid is that of a dead, distinct
//!   process (see [`super::fdpass`]);
//! - `storm`: the connect storm: silent connections held until the daemon
//!   closes them and reconnected at once, more of them than the connection
//!   cap, and connect-and-close loops, all as fast as the process can go.
//!
//! Each connection gets a verdict from what the daemon sent (the pre-auth
//! rule: exactly one `Error` without an id, then EOF) and, when the daemon
//! is the one to close, the time from the peer's last byte to the close;
//! a refusal's timing must also fit its code (an eviction comes at least
//! the grace after the connect, an `AuthTimeout` at least the auth timeout
//! after it). An attacker stops starting connections when its stdin closes
//! (or after a hard limit), lets those in flight finish (`flood`, `mixed`)
//! or closes them (the three floods above, whose in-flight connections
//! would otherwise all wait for their auth timeout), and prints a JSON
//! report.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhole::encoding;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubEvent, HubReply, HubRequest};
use keyhole::token::SessionToken;
use keyhole::token_file::read_token_file;
use keyhole::transport::{CloseReason, ErrorCode, REQUEST_HEADER_LEN, RequestKind, TransportCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use super::fdspray::{self, Spray};
use super::wire::{self, Conn, End, Msg, Req};

/// What an attacker process is told to do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttackConfig {
    /// `flood`, `mixed`, `one_silent`, `fd_pass` or `storm`.
    pub role: String,
    pub socket: PathBuf,
    pub token_file: PathBuf,
    pub auth_timeout_ms: u64,
    /// Stop starting connections after this long even if stdin stays open.
    pub max_run_ms: u64,
    pub seed: u64,
    pub flood_connections: usize,
    /// New flood connections per second, at most.
    pub flood_rate: f64,
    /// Short-lived hostile connections per second, at most.
    pub short_rate: f64,
    pub short_inflight: usize,
    pub dribblers: usize,
    pub silent: usize,
    pub never_readers: usize,
    pub never_reader_life_ms: u64,
    pub topic: String,
    /// The daemon's `--pending-grace`, ms: an eviction earlier than this
    /// after the connect is a violation.
    #[serde(default)]
    pub grace_ms: u64,
    /// `fd_pass`: connections held at once, and child processes being
    /// spawned at once.
    #[serde(default)]
    pub fd_connections: usize,
    #[serde(default)]
    pub fd_spawners: usize,
    /// `storm`: holding tasks and connect-and-close tasks.
    #[serde(default)]
    pub storm_holders: usize,
    #[serde(default)]
    pub storm_churners: usize,
    /// When the connect-and-close tasks start, ms after the holders.
    #[serde(default)]
    pub storm_churn_delay_ms: u64,
}

/// Connections of one kind that ended the same way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub kind: String,
    pub outcome: String,
    pub count: u64,
    /// The outcome is one the kind allows.
    pub expected: bool,
    /// Time from the peer's last byte to the daemon's close, ms (only for
    /// connections the daemon closed).
    pub close_ms: Option<Spread>,
    /// Closed later than the bound, or not at all.
    pub over_bound: u64,
}

/// p50, p99 and max of a set of times, in ms.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(samples: &mut [u64]) -> Option<Spread> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i] as f64 / 1000.0
        };
        Some(Spread {
            p50: at(0.50),
            p99: at(0.99),
            max: *samples.last().unwrap() as f64 / 1000.0,
        })
    }
}

/// What an attacker process reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttackReport {
    pub role: String,
    /// Connections that were established.
    pub connections: u64,
    pub connect_failures: u64,
    pub groups: Vec<Group>,
    pub violations: u64,
    pub violation_samples: Vec<String>,
    /// Largest number of this process's connections open at once.
    pub peak_open: u64,
    /// `fd_pass`: distinct pids of the child processes whose connections
    /// were received.
    #[serde(default)]
    pub distinct_pids: u64,
    /// `fd_pass`: connections whose child's pid was still in use when the
    /// connection ended (the child alive, or its pid reused).
    #[serde(default)]
    pub alive_children: u64,
    /// `mixed`: descriptors its spraying connections passed to the daemon
    /// (each the write end of a pipe, or one of them repeated).
    #[serde(default)]
    pub fds_sent: u64,
    /// Of the pipes whose write ends were passed, those still open 2 s
    /// after the daemon had to have closed them.
    #[serde(default)]
    pub fds_kept: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Flood,
    Dribble,
    Silent,
    Prefix4G,
    Prefix41,
    Garbage,
    WrongToken,
    BadMagic,
    BadVersion,
    RequestFirst,
    PreauthHalfClose,
    PreauthAbort,
    ConnectClose,
    ValidChurn,
    PostauthAbort,
    PostauthPrefixAbort,
    PostauthHalfClose,
    Postauth4G,
    PostauthGarbage,
    PostauthBadFrames,
    NeverReader,
    ManyProcess,
    FdPassed,
    StormHolder,
    StormChurn,
    /// A descriptor-spraying connection (see [`fdspray`]).
    FdSpray(Spray),
}

const CLOSED_BY_US: &str = "closed by the client (daemon must release it)";
/// A flood connection still open when the attack stopped, closed by us.
const STOPPED: &str = "still open at the attack's end, closed by the client";

/// Slack for the timing checks of a refusal, which run from the call to
/// `connect` (before the daemon can have accepted the connection): clock
/// granularity, and the conversion of an fd-passing child's wall-clock
/// time to this process's clock.
const TIMING_SLACK: Duration = Duration::from_millis(10);

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Flood => "flood: silent, more than the pending slots (one process)",
            Kind::Dribble => "slowloris: handshake 1 byte/s",
            Kind::Silent => "slowloris: connect, send nothing",
            Kind::Prefix4G => "length prefix 4 GiB",
            Kind::Prefix41 => "length prefix 41 (handshake + 1)",
            Kind::Garbage => "random garbage, 1-256 bytes",
            Kind::WrongToken => "handshake, wrong token",
            Kind::BadMagic => "handshake, wrong magic",
            Kind::BadVersion => "handshake, version 1 or 3",
            Kind::RequestFirst => "Ping before the handshake",
            Kind::PreauthHalfClose => "22 of 44 handshake bytes, half-close",
            Kind::PreauthAbort => "22 of 44 handshake bytes, disconnect",
            Kind::ConnectClose => "connect, disconnect at once",
            Kind::ValidChurn => "valid handshake, Ping, disconnect",
            Kind::PostauthAbort => "after auth: half a frame, disconnect",
            Kind::PostauthPrefixAbort => "after auth: 2 prefix bytes, disconnect",
            Kind::PostauthHalfClose => "after auth: half a frame, half-close",
            Kind::Postauth4G => "after auth: length prefix 4 GiB",
            Kind::PostauthGarbage => "after auth: random garbage, half-close",
            Kind::PostauthBadFrames => {
                "after auth: intact frames of bad requests, Ping, half-close"
            }
            Kind::NeverReader => "subscriber that never reads",
            Kind::ManyProcess => "many-process flood: 1 silent connection per process",
            Kind::FdPassed => "fd-passing flood: silent, made by a dead child",
            Kind::StormHolder => "connect storm: silent, held, reconnected at once",
            Kind::StormChurn => "connect storm: connect, close at once",
            Kind::FdSpray(spray) => spray.name(),
        }
    }

    /// Whether the close bound applies: not to the connect storm's, whose
    /// close times include the time spent in a full listen backlog before
    /// the daemon accepted them (the handshake deadline runs from the
    /// accept, proto-spec.md section 10, and the client cannot see it).
    fn bounded(self) -> bool {
        !matches!(self, Kind::StormHolder)
    }

    /// Outcomes this kind may have. Any pre-auth connection may also be
    /// evicted when the pending slots are full (and [`Ctx::record_timed`]
    /// checks that it had held its slot for the grace by then).
    ///
    /// A silent connection either waits for a slot, unread, until its
    /// deadline (`AuthTimeout`), or gets a slot and holds it until the
    /// deadline (nobody waiting) or until it is past the grace while others
    /// wait (`TooManyUnauthenticated`). Nothing else.
    fn allows(self, outcome: &str) -> bool {
        let evicted = outcome == "Error TooManyUnauthenticated";
        match self {
            Kind::Flood | Kind::Dribble | Kind::Silent => outcome == "Error AuthTimeout" || evicted,
            Kind::ManyProcess | Kind::FdPassed => {
                outcome == "Error AuthTimeout" || evicted || outcome == STOPPED
            }
            // Over the connection cap: refused in the accept loop at once.
            Kind::StormHolder => {
                outcome == "Error AuthTimeout"
                    || evicted
                    || outcome == "Error TooManyConnections"
                    || outcome == STOPPED
            }
            Kind::StormChurn => outcome == CLOSED_BY_US,
            Kind::Prefix4G | Kind::Prefix41 | Kind::RequestFirst | Kind::PreauthHalfClose => {
                outcome == "Error HandshakeExpected" || evicted
            }
            // Fewer than 4 bytes (or a prefix of 40 and fewer than 44) is
            // an incomplete handshake: the daemon waits for the rest until
            // the deadline, as it must.
            Kind::Garbage => {
                [
                    "Error AuthTimeout",
                    "Error HandshakeExpected",
                    "Error BadMagic",
                    "Error UnsupportedVersion",
                    "Error BadToken",
                ]
                .contains(&outcome)
                    || evicted
            }
            Kind::WrongToken => outcome == "Error BadToken" || evicted,
            Kind::BadMagic => outcome == "Error BadMagic" || evicted,
            Kind::BadVersion => outcome == "Error UnsupportedVersion" || evicted,
            Kind::PreauthAbort
            | Kind::ConnectClose
            | Kind::PostauthAbort
            | Kind::PostauthPrefixAbort => outcome == CLOSED_BY_US,
            Kind::ValidChurn => outcome == "Welcome, Ack, then closed by the client",
            Kind::PostauthHalfClose => outcome == "EOF without a frame",
            Kind::Postauth4G => outcome == "Error FrameTooLarge",
            // Almost always a length prefix over the limit. When the random
            // prefix does frame the rest: under 12 bytes is Malformed (and
            // close); otherwise the request is refused with its id
            // (UnknownRequest, BadRequest) and the connection stays open
            // until our half-close. postauth_verdict checks the ids.
            Kind::PostauthGarbage => [
                "Error FrameTooLarge",
                "Error Malformed",
                "Error UnknownRequest",
                "Error BadRequest",
                "EOF without a frame",
            ]
            .contains(&outcome),
            // Every answer is checked against the one the frame calls for
            // (bad_frames_verdict); the outcome says how the run ended.
            Kind::PostauthBadFrames => [
                "each refused with its id, then Ack, then closed after our half-close",
                "refused with their ids, then Error Malformed and closed",
            ]
            .contains(&outcome),
            // Each has exactly one answer (fdspray checks every frame of
            // it, and that every descriptor sent was closed).
            Kind::FdSpray(spray) => outcome == spray.expected() || evicted,
            Kind::NeverReader => [
                "events, then Closing SlowConsumer",
                "events, then dropped (final frames not read within 2 s)",
                "not cut by the end of the run",
            ]
            .contains(&outcome),
        }
    }
}

/// The mixed attacker's short-lived kinds, in the order they are started.
const SHORT_KINDS: &[Kind] = &[
    Kind::WrongToken,
    Kind::Prefix4G,
    Kind::Garbage,
    Kind::WrongToken,
    Kind::Prefix41,
    Kind::PreauthAbort,
    Kind::WrongToken,
    Kind::ConnectClose,
    Kind::PostauthAbort,
    Kind::WrongToken,
    Kind::BadMagic,
    Kind::PreauthHalfClose,
    Kind::WrongToken,
    Kind::ValidChurn,
    Kind::PostauthHalfClose,
    Kind::WrongToken,
    Kind::Garbage,
    Kind::PostauthPrefixAbort,
    Kind::WrongToken,
    Kind::BadVersion,
    Kind::Postauth4G,
    Kind::WrongToken,
    Kind::RequestFirst,
    Kind::PostauthGarbage,
    Kind::WrongToken,
    Kind::PostauthBadFrames,
    Kind::FdSpray(Spray::Handshake),
    Kind::FdSpray(Spray::NotAccepted),
    Kind::WrongToken,
    Kind::FdSpray(Spray::Unannounced),
    Kind::FdSpray(Spray::TooMany),
    Kind::WrongToken,
    Kind::FdSpray(Spray::Missing),
    Kind::FdSpray(Spray::OddControl),
    Kind::FdSpray(Spray::OverFrame),
];

#[derive(Default)]
struct Tally {
    groups: BTreeMap<(Kind, String), (u64, Vec<u64>, u64)>,
    connections: u64,
    connect_failures: BTreeMap<String, u64>,
    violations: u64,
    violation_samples: Vec<String>,
    open: u64,
    peak_open: u64,
    distinct_pids: u64,
    alive_children: u64,
    fds_sent: u64,
    fds_kept: u64,
}

struct Ctx {
    cfg: AttackConfig,
    token: SessionToken,
    bound: Duration,
    stop: watch::Receiver<bool>,
    tally: Mutex<Tally>,
    rng: Mutex<u64>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn random(&self) -> u64 {
        let mut r = self.rng.lock().unwrap();
        *r = wire::mix(*r);
        *r
    }

    fn random_bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.random() as u8).collect()
    }

    async fn connect(&self, kind: Kind) -> Option<Conn> {
        match Conn::connect(&self.cfg.socket).await {
            Ok(conn) => {
                let mut t = self.tally.lock().unwrap();
                t.connections += 1;
                t.open += 1;
                t.peak_open = t.peak_open.max(t.open);
                Some(conn)
            }
            Err(e) => {
                let mut t = self.tally.lock().unwrap();
                *t.connect_failures
                    .entry(format!("{}: connect failed: {:?}", kind.name(), e.kind()))
                    .or_default() += 1;
                None
            }
        }
    }

    /// Records how one connection ended. `closed_in`: time from the last
    /// byte to the daemon's close (`None` when the daemon did not close it
    /// or the bound does not apply); `Err` outcomes are violations.
    fn record(&self, kind: Kind, outcome: Result<String, String>, closed_in: Option<Duration>) {
        self.record_timed(kind, outcome, closed_in, None);
    }

    /// [`Self::record`] for a connection the daemon refused before
    /// authentication, `life` after its connect was called (before the
    /// daemon can have accepted it): an eviction must come at
    /// least the grace after the connect (the grace runs from the slot's
    /// grant, which is after the connect), an `AuthTimeout` at least the
    /// auth timeout after it (the deadline runs from the accept).
    fn record_timed(
        &self,
        kind: Kind,
        outcome: Result<String, String>,
        closed_in: Option<Duration>,
        life: Option<Duration>,
    ) {
        let mut t = self.tally.lock().unwrap();
        t.open -= 1;
        let mut violation = None;
        let outcome = match outcome {
            Ok(o) => {
                if !kind.allows(&o) {
                    violation = Some(format!("{}: unexpected outcome {o}", kind.name()));
                } else if let Some(life) = life {
                    let early = |floor: Duration| life + TIMING_SLACK < floor;
                    let grace = Duration::from_millis(self.cfg.grace_ms);
                    let timeout = Duration::from_millis(self.cfg.auth_timeout_ms);
                    if o == "Error TooManyUnauthenticated" && early(grace) {
                        violation = Some(format!(
                            "{}: evicted {:.0} ms after its connect, before the grace of {} ms",
                            kind.name(),
                            life.as_secs_f64() * 1000.0,
                            grace.as_millis()
                        ));
                    } else if o == "Error AuthTimeout" && early(timeout) {
                        violation = Some(format!(
                            "{}: AuthTimeout {:.0} ms after its connect, before the auth timeout of {} ms",
                            kind.name(),
                            life.as_secs_f64() * 1000.0,
                            timeout.as_millis()
                        ));
                    }
                }
                o
            }
            Err(e) => {
                violation = Some(format!("{}: {e}", kind.name()));
                format!("VIOLATION: {e}")
            }
        };
        let over = kind.bounded() && closed_in.is_some_and(|d| d > self.bound);
        if over && violation.is_none() {
            violation = Some(format!(
                "{}: closed {:.0} ms after the last byte (bound {} ms)",
                kind.name(),
                closed_in.unwrap().as_secs_f64() * 1000.0,
                self.bound.as_millis()
            ));
        }
        let entry = t.groups.entry((kind, outcome)).or_default();
        entry.0 += 1;
        if let Some(d) = closed_in {
            entry.1.push(d.as_micros() as u64);
        }
        if over {
            entry.2 += 1;
        }
        if let Some(v) = violation {
            t.violations += 1;
            if t.violation_samples.len() < 20 {
                t.violation_samples.push(v);
            }
        }
    }

    fn preauth_deadline(&self, conn: &Conn) -> Instant {
        conn.last_write.max(conn.connected_at) + self.bound + Duration::from_secs(2)
    }
}

/// Entry point of an attacker process: `config` is an [`AttackConfig`] in JSON.
pub fn main(config: &str) -> std::process::ExitCode {
    let cfg: AttackConfig = serde_json::from_str(config).expect("attacker config");
    let token = read_token_file(&cfg.token_file).expect("token file");
    let (stop_tx, stop_rx) = watch::channel(false);
    // Stop when the harness closes our stdin (or goes away), or at the limit.
    std::thread::spawn({
        let stop_tx = stop_tx.clone();
        move || {
            let mut sink = [0u8; 64];
            while let Ok(n) = std::io::stdin().read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
            let _ = stop_tx.send(true);
        }
    });
    let limit = Duration::from_millis(cfg.max_run_ms);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = stop_tx.send(true);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ctx = Arc::new(Ctx {
        bound: Duration::from_millis(cfg.auth_timeout_ms) + Duration::from_secs(1),
        rng: Mutex::new(cfg.seed),
        cfg,
        token,
        stop: stop_rx,
        tally: Mutex::new(Tally::default()),
    });
    runtime.block_on(async {
        match ctx.cfg.role.as_str() {
            "flood" => flood(&ctx).await,
            "mixed" => mixed(&ctx).await,
            "one_silent" => one_silent(&ctx).await,
            "fd_pass" => fd_pass(&ctx).await,
            "storm" => storm(&ctx).await,
            other => panic!("unknown attacker role {other}"),
        }
    });
    let report = {
        let mut t = ctx.tally.lock().unwrap();
        let mut groups = Vec::new();
        for ((kind, outcome), (count, samples, over)) in std::mem::take(&mut t.groups) {
            let mut samples = samples;
            groups.push(Group {
                kind: kind.name().into(),
                expected: kind.allows(&outcome),
                outcome,
                count,
                close_ms: Spread::of(&mut samples),
                over_bound: over,
            });
        }
        for (what, count) in std::mem::take(&mut t.connect_failures) {
            groups.push(Group {
                kind: what,
                outcome: "no connection".into(),
                count,
                expected: true,
                close_ms: None,
                over_bound: 0,
            });
        }
        AttackReport {
            role: ctx.cfg.role.clone(),
            connections: t.connections,
            connect_failures: groups
                .iter()
                .filter(|g| g.outcome == "no connection")
                .map(|g| g.count)
                .sum(),
            groups,
            violations: t.violations,
            violation_samples: t.violation_samples.clone(),
            peak_open: t.peak_open,
            distinct_pids: t.distinct_pids,
            alive_children: t.alive_children,
            fds_sent: t.fds_sent,
            fds_kept: t.fds_kept,
        }
    };
    println!("{}", serde_json::to_string(&report).expect("json"));
    std::process::ExitCode::SUCCESS
}

/// Paces connection starts: one per `period` after an initial burst,
/// shared by many tasks.
struct Pacer {
    next: Mutex<Instant>,
    period: Duration,
    burst: std::sync::atomic::AtomicUsize,
}

impl Pacer {
    fn new(per_second: f64, burst: usize) -> Self {
        Self {
            next: Mutex::new(Instant::now()),
            period: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
            burst: std::sync::atomic::AtomicUsize::new(burst),
        }
    }

    async fn wait(&self) {
        use std::sync::atomic::Ordering;
        if self
            .burst
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1))
            .is_ok()
        {
            return;
        }
        let at = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            // No bursts to catch up after a stall.
            let at = (*next).max(now);
            *next = at + self.period;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

async fn flood(ctx: &Arc<Ctx>) {
    // All at once first: more pending connections than the cap, at once.
    let pacer = Arc::new(Pacer::new(ctx.cfg.flood_rate, ctx.cfg.flood_connections));
    let tasks: Vec<_> = (0..ctx.cfg.flood_connections)
        .map(|_| {
            let (ctx, pacer) = (Arc::clone(ctx), Arc::clone(&pacer));
            tokio::spawn(async move {
                loop {
                    pacer.wait().await;
                    if ctx.stopped() {
                        break;
                    }
                    silent_once(&ctx, Kind::Flood).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("flood task");
    }
}

async fn mixed(ctx: &Arc<Ctx>) {
    let mut tasks = Vec::new();
    for _ in 0..ctx.cfg.dribblers {
        let ctx = Arc::clone(ctx);
        tasks.push(tokio::spawn(async move {
            while !ctx.stopped() {
                dribble_once(&ctx).await;
            }
        }));
    }
    for _ in 0..ctx.cfg.silent {
        let ctx = Arc::clone(ctx);
        tasks.push(tokio::spawn(async move {
            while !ctx.stopped() {
                silent_once(&ctx, Kind::Silent).await;
            }
        }));
    }
    for i in 0..ctx.cfg.never_readers {
        let ctx = Arc::clone(ctx);
        tasks.push(tokio::spawn(async move {
            // Staggered, so that cuts happen all through the run.
            let stagger =
                ctx.cfg.never_reader_life_ms * i as u64 / ctx.cfg.never_readers.max(1) as u64;
            let mut stop = ctx.stop.clone();
            let _ =
                tokio::time::timeout(Duration::from_millis(stagger), stop.wait_for(|s| *s)).await;
            while !ctx.stopped() {
                never_reader_once(&ctx).await;
            }
        }));
    }
    let pacer = Pacer::new(ctx.cfg.short_rate, 0);
    let slots = Arc::new(Semaphore::new(ctx.cfg.short_inflight));
    let mut i = 0usize;
    loop {
        pacer.wait().await;
        if ctx.stopped() {
            break;
        }
        let permit = Arc::clone(&slots).acquire_owned().await.expect("semaphore");
        let kind = SHORT_KINDS[i % SHORT_KINDS.len()];
        i += 1;
        let ctx = Arc::clone(ctx);
        tokio::spawn(async move {
            short_once(&ctx, kind).await;
            drop(permit);
        });
    }
    let _ = slots.acquire_many(ctx.cfg.short_inflight as u32).await;
    for t in tasks {
        t.await.expect("attacker task");
    }
}

/// Connects and sends nothing; the daemon must close within the bound of
/// the connect.
async fn silent_once(ctx: &Ctx, kind: Kind) {
    let Some(conn) = ctx.connect(kind).await else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return;
    };
    hold_silent(ctx, kind, conn, false).await;
}

/// Holds `conn` without sending a byte until the daemon closes it, and
/// records the verdict; with `close_at_stop`, closes it (as [`STOPPED`])
/// if the attack stops first.
async fn hold_silent(ctx: &Ctx, kind: Kind, mut conn: Conn, close_at_stop: bool) {
    // A storm connection may wait in the full listen backlog for seconds
    // before the daemon accepts it, and its handshake deadline starts at
    // the accept, which the client cannot see: no client-side deadline
    // holds for it (a loaded machine failed CI with closes at 5.0 s after
    // the connect). It is held until the daemon closes it or the attack
    // stops; the floods check the deadline itself.
    let deadline = if kind == Kind::StormHolder {
        conn.connected_at + Duration::from_secs(3600)
    } else {
        ctx.preauth_deadline(&conn)
    };
    let tail = if close_at_stop {
        let mut stop = ctx.stop.clone();
        tokio::select! {
            tail = conn.read_to_end(deadline, None) => tail,
            _ = stop.wait_for(|s| *s) => {
                drop(conn);
                ctx.record(kind, Ok(STOPPED.into()), None);
                return;
            }
        }
    } else {
        conn.read_to_end(deadline, None).await
    };
    let verdict = wire::preauth_verdict(&tail);
    let closed_in = tail.at - conn.connected_at;
    ctx.record_timed(
        kind,
        verdict,
        Some(closed_in),
        Some(tail.at - conn.connect_started),
    );
}

/// The many-process flood, one of its processes: one silent connection at
/// a time, reconnected as soon as the daemon closes it.
async fn one_silent(ctx: &Arc<Ctx>) {
    while !ctx.stopped() {
        match ctx.connect(Kind::ManyProcess).await {
            Some(conn) => hold_silent(ctx, Kind::ManyProcess, conn, true).await,
            // A full backlog, say: try again soon.
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The fd-passing flood: `fd_connections` silent connections held at once,
/// each made by a child process of its own (which then exits) and passed
/// here; every one that the daemon closes is replaced by a new child's.
async fn fd_pass(ctx: &Arc<Ctx>) {
    let mut passer = super::fdpass::Passer::start(&ctx.cfg.socket, ctx.cfg.fd_spawners.max(1));
    for _ in 0..ctx.cfg.fd_connections {
        passer.request();
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut pids = std::collections::HashSet::new();
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(()) = done_rx.recv() => passer.request(),
            passed = passer.next() => match passed {
                Some(super::fdpass::Passed::Conn { conn, pid }) => {
                    pids.insert(pid);
                    {
                        let mut t = ctx.tally.lock().unwrap();
                        t.connections += 1;
                        t.open += 1;
                        t.peak_open = t.peak_open.max(t.open);
                    }
                    let (ctx, done) = (Arc::clone(ctx), done_tx.clone());
                    tokio::spawn(async move {
                        hold_silent(&ctx, Kind::FdPassed, conn, true).await;
                        // The child that made it has exited (and was
                        // reaped) long before: at least the grace ago.
                        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                            ctx.tally.lock().unwrap().alive_children += 1;
                        }
                        let _ = done.send(());
                    });
                }
                Some(super::fdpass::Passed::Failed(why)) => {
                    {
                        let mut t = ctx.tally.lock().unwrap();
                        *t.connect_failures
                            .entry(format!("{}: child failed: {why}", Kind::FdPassed.name()))
                            .or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    passer.request();
                }
                None => break,
            },
        }
    }
    passer.stop();
    // Let the holders see the stop and close their connections.
    while ctx.tally.lock().unwrap().open > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.tally.lock().unwrap().distinct_pids = pids.len() as u64;
}

/// The connect storm, one of its processes: `storm_holders` tasks that
/// keep a silent connection each (over the connection cap they are refused
/// at once, and connect again at once), and `storm_churners` tasks that
/// connect and close as fast as they can (from `storm_churn_delay_ms` on).
/// A full backlog (`EAGAIN`) is counted and tried again at once.
async fn storm(ctx: &Arc<Ctx>) {
    let mut tasks = Vec::new();
    for _ in 0..ctx.cfg.storm_holders {
        let ctx = Arc::clone(ctx);
        tasks.push(tokio::spawn(async move {
            while !ctx.stopped() {
                match ctx.connect(Kind::StormHolder).await {
                    Some(conn) => hold_silent(&ctx, Kind::StormHolder, conn, true).await,
                    None => tokio::task::yield_now().await,
                }
            }
        }));
    }
    for _ in 0..ctx.cfg.storm_churners {
        let ctx = Arc::clone(ctx);
        tasks.push(tokio::spawn(async move {
            // The holders first, so that they reach the cap before the
            // backlog fills with connections that are already closed.
            let mut stop = ctx.stop.clone();
            let delay = Duration::from_millis(ctx.cfg.storm_churn_delay_ms);
            let _ = tokio::time::timeout(delay, stop.wait_for(|s| *s)).await;
            while !ctx.stopped() {
                if let Some(conn) = ctx.connect(Kind::StormChurn).await {
                    drop(conn);
                    ctx.record(Kind::StormChurn, Ok(CLOSED_BY_US.into()), None);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("storm task");
    }
}

/// A valid handshake, one byte per second.
async fn dribble_once(ctx: &Ctx) {
    let Some(mut conn) = ctx.connect(Kind::Dribble).await else {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return;
    };
    let handshake = HandshakeFrame::new(&ctx.token);
    let mut sent = 0;
    let mut next = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let hard_stop = conn.connected_at + ctx.bound + Duration::from_secs(3);
    let end = loop {
        let write_due = sent < handshake.len();
        tokio::select! {
            ready = conn.stream.readable() => {
                if ready.is_err() {
                    break End::Closed;
                }
                match conn.stream.try_read(&mut buf) {
                    Ok(0) => break End::Closed,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    // A spurious wake-up: keep waiting.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break End::Closed,
                }
            }
            _ = tokio::time::sleep_until(next.into()), if write_due => {
                match conn.stream.try_write(&handshake[sent..sent + 1]) {
                    Ok(1) => {
                        sent += 1;
                        conn.last_write = Instant::now();
                    }
                    // The daemon has closed: stop writing, read the verdict.
                    _ => sent = handshake.len(),
                }
                next += Duration::from_secs(1);
            }
            _ = tokio::time::sleep_until(hard_stop.into()) => break End::Open,
        }
    };
    let tail = wire::Tail {
        bytes: got,
        end,
        at: Instant::now(),
    };
    let verdict = wire::preauth_verdict(&tail);
    ctx.record_timed(
        Kind::Dribble,
        verdict,
        Some(tail.at - conn.last_write),
        Some(tail.at - conn.connect_started),
    );
}

async fn short_once(ctx: &Ctx, kind: Kind) {
    let Some(mut conn) = ctx.connect(kind).await else {
        return;
    };
    let token = &ctx.token;
    // Pre-auth bytes that must get exactly one Error frame and a close.
    let preauth: Option<Vec<u8>> = match kind {
        Kind::Prefix4G => Some(vec![0xff; 4]),
        Kind::Prefix41 => {
            let mut f = 41u32.to_le_bytes().to_vec();
            f.extend(ctx.random_bytes(41));
            Some(f)
        }
        Kind::Garbage => {
            let n = 1 + (ctx.random() % 256) as usize;
            Some(ctx.random_bytes(n))
        }
        Kind::WrongToken => {
            let mut wrong = [0u8; 32];
            for chunk in wrong.chunks_mut(8) {
                chunk.copy_from_slice(&ctx.random().to_le_bytes());
            }
            Some(HandshakeFrame::new(&SessionToken::from_bytes(wrong)).to_vec())
        }
        Kind::BadMagic => {
            let mut f = HandshakeFrame::new(token).to_vec();
            f[4..8].copy_from_slice(b"KYHX");
            Some(f)
        }
        // A client of the first protocol, or of one that does not exist yet.
        Kind::BadVersion => {
            let version = if ctx.random() % 2 == 0 { 1 } else { 3 };
            Some(HandshakeFrame::with_version(version, token).to_vec())
        }
        Kind::RequestFirst => Some(wire::request(1, Req::Ping)),
        _ => None,
    };
    if let Some(bytes) = preauth {
        // The daemon may close before all of it is written (it reads 4
        // bytes of a bad prefix, no more): a failed write is fine.
        let _ = conn.send(&bytes).await;
        let tail = conn.read_to_end(ctx.preauth_deadline(&conn), None).await;
        let verdict = wire::preauth_verdict(&tail);
        let life = tail.at - conn.connect_started;
        ctx.record_timed(kind, verdict, Some(tail.at - conn.last_write), Some(life));
        return;
    }
    match kind {
        Kind::PreauthHalfClose | Kind::PreauthAbort => {
            let _ = conn.send(&HandshakeFrame::new(token)[..22]).await;
            if kind == Kind::PreauthAbort {
                drop(conn);
                ctx.record(kind, Ok(CLOSED_BY_US.into()), None);
                return;
            }
            conn.half_close().await;
            let tail = conn.read_to_end(ctx.preauth_deadline(&conn), None).await;
            let verdict = wire::preauth_verdict(&tail);
            let life = tail.at - conn.connect_started;
            ctx.record_timed(kind, verdict, Some(tail.at - conn.last_write), Some(life));
        }
        Kind::ConnectClose => {
            drop(conn);
            ctx.record(kind, Ok(CLOSED_BY_US.into()), None);
        }
        Kind::FdSpray(spray) => {
            let verdict = fdspray::run(spray, &mut conn, token, ctx.random(), ctx.bound).await;
            {
                let mut t = ctx.tally.lock().unwrap();
                t.fds_sent += verdict.sent;
                t.fds_kept += verdict.kept;
            }
            ctx.record(kind, verdict.outcome, verdict.closed_in);
        }
        Kind::ValidChurn => {
            let limit = Instant::now() + Duration::from_secs(10);
            let outcome = async {
                conn.authenticate(token, Duration::from_secs(10)).await?;
                conn.send(&wire::request(7, Req::Ping))
                    .await
                    .map_err(|e| e.to_string())?;
                match conn.read_msg(limit).await? {
                    Msg::Ack(7) => Ok("Welcome, Ack, then closed by the client".to_string()),
                    other => Err(format!("Ping answered with {}", wire::describe(&other))),
                }
            }
            .await;
            ctx.record(kind, outcome, None);
        }
        _ => postauth_once(ctx, kind, conn).await,
    }
}

async fn postauth_once(ctx: &Ctx, kind: Kind, mut conn: Conn) {
    if let Err(e) = conn.authenticate(&ctx.token, Duration::from_secs(10)).await {
        // Evicted before the handshake was read, say: not what this kind is
        // about, but the daemon's answer must still be a proper refusal.
        let outcome = if e.contains("TooManyUnauthenticated") {
            Ok("Error TooManyUnauthenticated".to_string())
        } else {
            Err(format!("handshake: {e}"))
        };
        ctx.record(kind, outcome, None);
        return;
    }
    // Half of a 63-byte Publish frame (a 59-byte payload: 32 + a 15-byte
    // topic + 12 bytes): its prefix and 27 of its bytes.
    let mut frame = wire::request(
        3,
        wire::publish("torture.partial", bytes::Bytes::from_static(&[7u8; 12])),
    );
    frame.truncate(frame.len() / 2);
    match kind {
        Kind::PostauthAbort | Kind::PostauthPrefixAbort => {
            let part = if kind == Kind::PostauthAbort {
                &frame[..]
            } else {
                &frame[..2]
            };
            let _ = conn.send(part).await;
            drop(conn);
            ctx.record(kind, Ok(CLOSED_BY_US.into()), None);
        }
        Kind::PostauthHalfClose | Kind::Postauth4G | Kind::PostauthGarbage => {
            let bytes = match kind {
                Kind::PostauthHalfClose => frame,
                Kind::Postauth4G => vec![0xff; 4],
                _ => {
                    let n = 1 + (ctx.random() % 256) as usize;
                    ctx.random_bytes(n)
                }
            };
            let _ = conn.send(&bytes).await;
            if kind != Kind::Postauth4G {
                conn.half_close().await;
            }
            let tail = conn.read_to_end(ctx.preauth_deadline(&conn), None).await;
            let verdict = postauth_verdict(&tail, &bytes);
            ctx.record(kind, verdict, Some(tail.at - conn.last_write));
        }
        Kind::PostauthBadFrames => {
            let (bytes, expected) = bad_frames(ctx);
            let _ = conn.send(&bytes).await;
            conn.half_close().await;
            let tail = conn.read_to_end(ctx.preauth_deadline(&conn), None).await;
            let verdict = bad_frames_verdict(&tail, &expected);
            ctx.record(kind, verdict, Some(tail.at - conn.last_write));
        }
        _ => unreachable!("not a post-auth kind: {kind:?}"),
    }
}

/// After authentication a bad frame gets errors and the daemon closes; the
/// outcome is the last frame before EOF. An error that closes the
/// connection (`FrameTooLarge`, `Malformed`) carries no id and is the last
/// frame; one that keeps it open (`UnknownRequest`, `BadRequest`) carries
/// the id of the request it refuses: the ids of the complete frames `sent`,
/// in order.
fn postauth_verdict(tail: &wire::Tail, sent: &[u8]) -> Result<String, String> {
    if tail.end == End::Open {
        return Err("NOT CLOSED by the deadline".into());
    }
    let (frames, partial) = wire::split_frames(&tail.bytes);
    if partial != 0 {
        return Err(format!("{partial} bytes of a partial frame before EOF"));
    }
    let mut ids = wire::split_frames(sent)
        .0
        .into_iter()
        .filter(|f| f.len() >= REQUEST_HEADER_LEN)
        .map(|f| u64::from_le_bytes(f[..8].try_into().unwrap()));
    let mut last = "EOF without a frame".to_string();
    let mut closed_by: Option<TransportCode> = None;
    for f in frames {
        if let Some(code) = closed_by {
            return Err(format!(
                "a frame after Error {code:?}, which closes the connection"
            ));
        }
        let msg = wire::decode(f)?;
        let Msg::Error {
            id,
            code: ErrorCode::Transport(code),
            ..
        } = msg
        else {
            return Err(format!("unexpected {}", wire::describe(&msg)));
        };
        match (id, code.closes_connection()) {
            (None, true) => closed_by = Some(code),
            (Some(id), false) => match ids.next() {
                Some(sent_id) if sent_id == id => {}
                Some(_) => {
                    return Err(format!("Error {code:?} with another id than the request's"));
                }
                None => {
                    return Err(format!(
                        "Error {code:?} with an id, for no complete request"
                    ));
                }
            },
            (None, false) => return Err(format!("Error {code:?} without the request's id")),
            (Some(_), true) => {
                return Err(format!(
                    "Error {code:?} with an id: a code that closes the connection has none"
                ));
            }
        }
        last = format!("Error {code:?}");
    }
    Ok(last)
}

/// What the daemon must answer to one frame of [`bad_frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// `Error code` with the frame's id; the connection stays open.
    Refused(u64, TransportCode),
    /// `Error Malformed` without an id, then the close.
    Malformed,
    /// `Ack` to the closing `Ping`.
    Ack(u64),
}

impl Due {
    /// In words, without the id (verdicts are grouped by their text).
    fn describe(self) -> String {
        match self {
            Due::Refused(_, code) => format!("Error {code:?} with its id"),
            Due::Malformed => "Error Malformed without an id".into(),
            Due::Ack(_) => "Ack with its id".into(),
        }
    }
}

/// One to four intact frames that are not requests this daemon serves, then
/// (unless the last is too short to be a request) a `Ping`: a `Call` whose
/// body is random bytes or a hub request with a flaw (a byte too many,
/// invalid UTF-8, an unknown hub tag), a `Ping` or `Shutdown` with a body, a
/// kind unknown to this version, or a frame under the 12-byte header. The
/// bytes, and the answers they call for, in order.
fn bad_frames(ctx: &Ctx) -> (Vec<u8>, Vec<Due>) {
    let mut bytes = Vec::new();
    let mut due = Vec::new();
    let frames = 1 + ctx.random() % 4;
    for _ in 0..frames {
        let id = ctx.random();
        let variant = ctx.random() % 5;
        if variant == 4 {
            // Too short for the header: the frame is well delimited but is
            // not a request at all.
            let n = (ctx.random() % REQUEST_HEADER_LEN as u64) as usize;
            bytes.extend_from_slice(&(n as u32).to_le_bytes());
            bytes.extend(ctx.random_bytes(n));
            due.push(Due::Malformed);
            return (bytes, due);
        }
        let (kind, body, code) = match variant {
            0 => {
                let body = loop {
                    let n = (ctx.random() % 48) as usize;
                    let body = ctx.random_bytes(n);
                    if encoding::decode::<HubRequest>(&body).is_err() {
                        break body;
                    }
                };
                (RequestKind::Call.tag(), body, TransportCode::BadRequest)
            }
            1 => {
                let topic = "torture.bad".to_string();
                // Each has its string right after the tag.
                let mut body = encoding::encode(&match ctx.random() % 3 {
                    0 => HubRequest::Serve { name: topic },
                    1 => HubRequest::Unserve { name: topic },
                    _ => HubRequest::Publish {
                        topic,
                        payload: keyhole::Payload::from(ctx.random_bytes(8)),
                    },
                })
                .expect("encode")
                .to_vec();
                match ctx.random() % 3 {
                    // A byte too many.
                    0 => body.push(ctx.random() as u8),
                    // The topic's or name's first byte (after the tag
                    // and the length) is not UTF-8.
                    1 => body[12] = 0xff,
                    // A hub request tag this version does not have.
                    _ => {
                        body[..4].copy_from_slice(&(10 + ctx.random() as u32 % 1000).to_le_bytes())
                    }
                }
                (RequestKind::Call.tag(), body, TransportCode::BadRequest)
            }
            2 => {
                let kind = if ctx.random() % 2 == 0 {
                    RequestKind::Ping
                } else {
                    RequestKind::Shutdown
                };
                let n = 1 + (ctx.random() % 16) as usize;
                (kind.tag(), ctx.random_bytes(n), TransportCode::BadRequest)
            }
            _ => {
                // (This draws from the kinds the daemon does not define.)
                let first = keyhole::transport::REQUEST_KINDS;
                let kind = first.saturating_add(ctx.random() as u32 % (u32::MAX - first));
                let n = (ctx.random() % 32) as usize;
                (kind, ctx.random_bytes(n), TransportCode::UnknownRequest)
            }
        };
        bytes.extend_from_slice(&((REQUEST_HEADER_LEN + body.len()) as u32).to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&body);
        due.push(Due::Refused(id, code));
    }
    let ping = ctx.random();
    bytes.extend(wire::request(ping, Req::Ping));
    due.push(Due::Ack(ping));
    (bytes, due)
}

/// The answers must be exactly the ones due, in order, then EOF.
fn bad_frames_verdict(tail: &wire::Tail, due: &[Due]) -> Result<String, String> {
    if tail.end == End::Open {
        return Err("NOT CLOSED by the deadline".into());
    }
    let (frames, partial) = wire::split_frames(&tail.bytes);
    if partial != 0 {
        return Err(format!("{partial} bytes of a partial frame before EOF"));
    }
    for (i, want) in due.iter().enumerate() {
        let Some(f) = frames.get(i) else {
            return Err(format!(
                "{i} of {} answers, then EOF; {} was due",
                due.len(),
                want.describe()
            ));
        };
        let msg = wire::decode(f)?;
        // `None`: as due; otherwise what is wrong with it.
        let id_of = |due: u64, got: u64| (due != got).then_some(" with another id");
        let wrong = match (*want, &msg) {
            (
                Due::Refused(id, code),
                Msg::Error {
                    id: Some(got),
                    code: ErrorCode::Transport(got_code),
                    ..
                },
            ) if *got_code == code => id_of(id, *got),
            (
                Due::Malformed,
                Msg::Error {
                    id: None,
                    code: ErrorCode::Transport(TransportCode::Malformed),
                    ..
                },
            ) => None,
            (Due::Ack(id), Msg::Ack(got)) => id_of(id, *got),
            _ => Some(""),
        };
        if let Some(wrong) = wrong {
            return Err(format!(
                "answer {i}: {} was due, got {}{wrong}",
                want.describe(),
                wire::describe(&msg)
            ));
        }
    }
    if frames.len() > due.len() {
        return Err(format!(
            "{} frames after the answers due",
            frames.len() - due.len()
        ));
    }
    Ok(match due.last() {
        Some(Due::Malformed) => "refused with their ids, then Error Malformed and closed".into(),
        _ => "each refused with its id, then Ack, then closed after our half-close".into(),
    })
}

/// Subscribes to the valid topic and never reads, for its life or until the
/// stop; then drains what is there and checks it: consecutive sequences,
/// intact payloads, and how the daemon ended it.
async fn never_reader_once(ctx: &Ctx) {
    let Some(mut conn) = ctx.connect(Kind::NeverReader).await else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    let setup = async {
        conn.authenticate(&ctx.token, Duration::from_secs(10))
            .await?;
        conn.send(&wire::request(1, wire::subscribe(&ctx.cfg.topic)))
            .await
            .map_err(|e| e.to_string())?;
        match conn
            .read_msg(Instant::now() + Duration::from_secs(10))
            .await?
        {
            Msg::Reply(1, HubReply::Subscribed) => Ok(()),
            other => Err(format!(
                "Subscribe answered with {}",
                wire::describe(&other)
            )),
        }
    };
    if let Err(e) = setup.await {
        ctx.record(Kind::NeverReader, Err(e), None);
        return;
    }
    let mut stop = ctx.stop.clone();
    let life = Duration::from_millis(ctx.cfg.never_reader_life_ms);
    let _ = tokio::time::timeout(life, stop.wait_for(|s| *s)).await;
    // Drain: until EOF, or 500 ms of silence, or far more than the daemon
    // may queue for one subscriber (then it was not cut).
    let mut bytes = Vec::new();
    let mut end = End::Open;
    let deadline = Instant::now() + Duration::from_secs(20);
    while bytes.len() < 8 * 1024 * 1024 {
        let tail = conn
            .read_to_end(deadline, Some(Duration::from_millis(500)))
            .await;
        let quiet = tail.bytes.is_empty();
        bytes.extend(tail.bytes);
        end = tail.end;
        if end == End::Closed || quiet || Instant::now() >= deadline {
            break;
        }
    }
    ctx.record(
        Kind::NeverReader,
        never_reader_verdict(&bytes, end, &ctx.cfg.topic),
        None,
    );
}

fn never_reader_verdict(bytes: &[u8], end: End, topic: &str) -> Result<String, String> {
    let (frames, partial) = wire::split_frames(bytes);
    let mut last_seq: Option<u64> = None;
    let mut closing = None;
    for f in &frames {
        if closing.is_some() {
            return Err("a frame after Closing".into());
        }
        match wire::decode(f) {
            Ok(Msg::Event(
                _,
                HubEvent::Message {
                    topic: t,
                    sequence,
                    payload,
                },
            )) => {
                if t != topic {
                    return Err(format!("event of topic {t:?}"));
                }
                if let Some(last) = last_seq {
                    if sequence != last + 1 {
                        return Err(format!(
                            "sequence {sequence} after {last}: an event was skipped"
                        ));
                    }
                }
                last_seq = Some(sequence);
                wire::check_payload(&payload)?;
            }
            Ok(Msg::Closing(reason)) => closing = Some(reason),
            Ok(other) => return Err(format!("unexpected {}", wire::describe(&other))),
            Err(e) => return Err(e),
        }
    }
    if closing.is_some() && partial != 0 {
        return Err(format!("{partial} bytes after Closing"));
    }
    match (end, closing) {
        (End::Closed, Some(CloseReason::SlowConsumer)) => {
            Ok("events, then Closing SlowConsumer".into())
        }
        (End::Open, Some(reason)) => Err(format!(
            "Closing {reason:?}, but the connection stayed open"
        )),
        (End::Closed, Some(other)) => Err(format!("Closing {other:?}, expected SlowConsumer")),
        // Cut, but the final frames were not read in time: dropped, maybe
        // in the middle of a frame, which the spec allows.
        (End::Closed, None) => Ok("events, then dropped (final frames not read within 2 s)".into()),
        (End::Open, None) => Ok("not cut by the end of the run".into()),
    }
}
