//! The real clients of the floods, each process a user of its own (this
//! binary, `--real-client CONFIG`): one client at a time, back to back,
//! each of which waits `delay_ms` between its connect and its handshake
//! (a client that is slow to send, or descheduled) and must get `Welcome`
//! and an answer to a `Ping`.
//!
//! A delayed client makes its first attempt on a raw connection, with no
//! retry of any kind: whether that attempt gets in is the "first attempt"
//! figure. If it does not, it goes on as the client library does
//! (`ConnectOptions::connect_raw`): a full backlog (`EAGAIN`) is retried
//! by `connect_socket_within`, and the refusals `TooManyConnections` and
//! `TooManyUnauthenticated` are retried with a pause of 5 ms doubling to
//! 100 ms; any other error ends it. It uses the library's own `connect_socket`,
//! `connect_socket_within`, `check_peer_uid` and `handshake`, with the
//! delay put between the connect and the handshake, which the library has
//! no option for; the whole is bounded by the library's default timeout,
//! 10 s. With `library_every`, every n-th client (delay 0 only) is instead
//! the library's `connect_raw` itself, with its default timeout, inside
//! the same 10 s.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyhole::client::{
    ClientError, ConnectOptions, DEFAULT_TIMEOUT, check_peer_uid, connect_socket,
    connect_socket_within, handshake,
};
use keyhole::token::SessionToken;
use keyhole::token_file::{current_uid, read_token_file};
use keyhole::transport::{ErrorCode, TransportCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::wire::{self, Conn, Msg, Req};

/// What a real-client process is told to do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RealConfig {
    pub socket: PathBuf,
    pub token_file: PathBuf,
    /// D: the wait between the connect and the handshake, ms.
    pub delay_ms: u64,
    /// When > 0, every n-th client is the library's `connect_raw`.
    pub library_every: u64,
    /// Pause between two clients, ms.
    pub gap_ms: u64,
    /// Stop after this long even if stdin stays open.
    pub max_run_ms: u64,
}

/// Clients of one kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientStats {
    pub clients: u64,
    /// Got `Welcome` and an `Ack` to a `Ping` within 10 s.
    pub got_in: u64,
    /// Of those, on the first attempt (delayed clients only).
    pub first_ok: u64,
    /// Attempts made, over all clients.
    pub attempts: u64,
    pub max_attempts: u64,
    /// Time from the start of the client to its `Ack`, ms, of those that
    /// got in.
    pub in_ms: Vec<u32>,
    /// How first attempts ended (delayed clients only).
    pub first_outcomes: BTreeMap<String, u64>,
    pub failure_samples: Vec<String>,
}

impl ClientStats {
    pub fn merge(&mut self, other: &ClientStats) {
        self.clients += other.clients;
        self.got_in += other.got_in;
        self.first_ok += other.first_ok;
        self.attempts += other.attempts;
        self.max_attempts = self.max_attempts.max(other.max_attempts);
        self.in_ms.extend(&other.in_ms);
        for (k, v) in &other.first_outcomes {
            *self.first_outcomes.entry(k.clone()).or_default() += v;
        }
        for f in &other.failure_samples {
            if self.failure_samples.len() < 10 {
                self.failure_samples.push(f.clone());
            }
        }
    }

    fn fail(&mut self, what: String) {
        if self.failure_samples.len() < 10 {
            self.failure_samples.push(what);
        }
    }
}

/// What a real-client process reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RealReport {
    pub delay_ms: u64,
    pub delayed: ClientStats,
    pub library: ClientStats,
}

/// Bound on one client, first attempt to `Ack`: the library's default
/// timeout.
const CLIENT_LIMIT: Duration = DEFAULT_TIMEOUT;

/// Entry point of a real-client process: `config` is a [`RealConfig`] in
/// JSON.
pub fn main(config: &str) -> std::process::ExitCode {
    let cfg: RealConfig = serde_json::from_str(config).expect("real-client config");
    let token = read_token_file(&cfg.token_file).expect("token file");
    let (stop_tx, stop_rx) = watch::channel(false);
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
    let mut report = RealReport {
        delay_ms: cfg.delay_ms,
        ..RealReport::default()
    };
    runtime.block_on(async {
        let mut n = 0u64;
        while !*stop_rx.borrow() {
            n += 1;
            if cfg.library_every > 0 && n % cfg.library_every == 0 {
                library_client(&cfg, &mut report.library).await;
            } else {
                delayed_client(&cfg, &token, &mut report.delayed).await;
            }
            tokio::time::sleep(Duration::from_millis(cfg.gap_ms)).await;
        }
    });
    println!("{}", serde_json::to_string(&report).expect("json"));
    std::process::ExitCode::SUCCESS
}

/// A short name for how an attempt failed.
fn describe(err: &ClientError) -> String {
    match err {
        ClientError::AuthRefused { code, .. } => format!("Error {}", wire::code_name(*code)),
        ClientError::Connect { source, .. } => format!("connect: {:?}", source.kind()),
        ClientError::Busy { .. } => "busy: the backlog stayed full".into(),
        ClientError::Timeout { .. } => "no answer to the handshake in time".into(),
        other => other.to_string(),
    }
}

fn is_busy(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::AuthRefused {
            code: ErrorCode::Transport(
                TransportCode::TooManyConnections | TransportCode::TooManyUnauthenticated
            ),
            ..
        }
    )
}

async fn delayed_client(cfg: &RealConfig, token: &SessionToken, stats: &mut ClientStats) {
    let start = Instant::now();
    let until = start + CLIENT_LIMIT;
    let delay = Duration::from_millis(cfg.delay_ms);
    let uid = current_uid();
    let mut pause = Duration::from_millis(5);
    let mut attempts = 0u64;
    stats.clients += 1;
    let outcome = loop {
        attempts += 1;
        let left = until.saturating_duration_since(Instant::now());
        let attempt = async {
            // The first attempt: one connect, no retry. Later ones: the
            // library's connect, which retries a full backlog.
            let mut stream = if attempts == 1 {
                connect_socket(&cfg.socket).await?
            } else {
                connect_socket_within(&cfg.socket, left).await?
            };
            check_peer_uid(&stream, &cfg.socket, uid)?;
            tokio::time::sleep(delay).await;
            handshake(&mut stream, token, left).await?;
            Ok::<_, ClientError>(stream)
        };
        let result = tokio::time::timeout(left + Duration::from_millis(1), attempt)
            .await
            .unwrap_or(Err(ClientError::Timeout {
                what: "the client's 10 s",
            }));
        if attempts == 1 {
            let first = match &result {
                Ok(_) => "Welcome".to_string(),
                Err(e) => describe(e),
            };
            *stats.first_outcomes.entry(first).or_default() += 1;
        }
        match result {
            Ok(stream) => break Ok(stream),
            // A full backlog on the raw first attempt: from here on the
            // library's connect, which retries it.
            Err(ClientError::Connect { source, .. })
                if attempts == 1 && source.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if is_busy(&e) && Instant::now() + pause < until => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => break Err(format!("attempt {attempts}: {}", describe(&e))),
        }
    };
    stats.attempts += attempts;
    stats.max_attempts = stats.max_attempts.max(attempts);
    let result = match outcome {
        Ok(stream) => ping(Conn::from_stream(stream, start, start), until).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            stats.got_in += 1;
            if attempts == 1 {
                stats.first_ok += 1;
            }
            stats.in_ms.push(start.elapsed().as_millis() as u32);
        }
        Err(e) => stats.fail(format!("D = {} ms: {e}", cfg.delay_ms)),
    }
}

/// A `Ping` on an authenticated connection, answered with its `Ack`.
async fn ping(mut conn: Conn, until: Instant) -> Result<(), String> {
    conn.send(&wire::request(1, Req::Ping))
        .await
        .map_err(|e| format!("Ping: {e}"))?;
    match conn.read_msg(until).await? {
        Msg::Ack(1) => Ok(()),
        other => Err(format!("Ping answered with {}", wire::describe(&other))),
    }
}

/// The library's own path: `connect_raw` (its busy-retry inside), `ping`.
async fn library_client(cfg: &RealConfig, stats: &mut ClientStats) {
    let start = Instant::now();
    stats.clients += 1;
    stats.attempts += 1;
    stats.max_attempts = stats.max_attempts.max(1);
    let options = ConnectOptions::new()
        .socket(&cfg.socket)
        .token_file(&cfg.token_file);
    let once = async {
        let client = options.connect_raw().await.map_err(|e| describe(&e))?;
        client.ping().await.map_err(|e| format!("ping: {e}"))
    };
    match tokio::time::timeout(CLIENT_LIMIT, once).await {
        Ok(Ok(())) => {
            stats.got_in += 1;
            stats.in_ms.push(start.elapsed().as_millis() as u32);
        }
        Ok(Err(e)) => stats.fail(format!("library connect_raw: {e}")),
        Err(_) => stats.fail("library connect_raw: not in within 10 s".into()),
    }
}
