//! `keyhole`: the command-line client. One subcommand per request, plus
//! `token` (for forwarding), `bench`, and `completions` and `man` (generated
//! from these clap definitions). Data goes to stdout (as text, or as JSON
//! with `--json` and `sub --format json`, see [`output`]); diagnostics go to
//! stderr, one line each, with a distinct exit code per class (see `Args`'
//! help). Bad arguments (a topic the hub would refuse, `--timeout 0`) are
//! usage errors, exit 2, before anything is sent.

mod output;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use futures_util::StreamExt;
use keyhole::client::hub::{IncomingRequest, Received, RequestError};
use keyhole::client::{ClientError, ConnectOptions, HubClient};
use keyhole::error::{Report, TokenFileError};
use keyhole::hub::{Lag, check_pattern, check_topic};
use keyhole::loadgen as bench;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::output::Format;

/// Command-line client for keyholed.
///
/// Exit codes: 0 success; 1 other error; 2 bad usage; 3 daemon not running
/// (socket missing or nobody listening); 4 permission or token problem
/// (no token, token file refused, socket served by another uid); 5
/// authentication refused by the daemon; 6 timeout; 7 the daemon reported
/// an error or closed the connection; 8 the daemon serves another service
/// than the hub (`ping` and `stop` work with any keyhole daemon).
///
/// KEYHOLE_DAEMON_UID: the uid the daemon must run as when it is not yours
/// (a daemon that admits you with `keyholed --allow-uid`, such as one run by
/// root: KEYHOLE_DAEMON_UID=0); without it the token is sent only to a
/// daemon of your own uid.
#[derive(Debug, Parser)]
#[command(name = "keyhole", version, propagate_version = true)]
struct Args {
    /// Socket path [default: $KEYHOLE_SOCKET, else the runtime directory's keyhole.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Token file [default: $KEYHOLE_TOKEN, else $KEYHOLE_TOKEN_FILE, else the runtime directory's session-token]
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Seconds to wait for the daemon's answers (more than 0, at most 86400)
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0,
          value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trips to the daemon, with their times; a summary after
    /// several, or after Ctrl-C (exit 0 if at least one pong came back)
    Ping {
        /// Number of pings (at least 1; like ping(8), 0 is refused)
        #[arg(short, long, value_name = "N", default_value_t = 1,
              value_parser = parse_count, allow_negative_numbers = true)]
        count: u64,
        /// Seconds to wait between pings (0 to 86400)
        #[arg(short, long, value_name = "SECS", default_value_t = 0.0,
              value_parser = parse_interval, allow_negative_numbers = true)]
        interval: f64,
        /// Print one JSON object (at the end) instead of text
        #[arg(long)]
        json: bool,
    },
    /// The daemon's connections, topics, subscribers, uptime and version
    Status {
        /// Also list every pattern subscribed (with its subscriptions) and
        /// every name served (with its responders)
        #[arg(long)]
        topics: bool,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Publish MESSAGE (or stdin with -) on TOPIC; prints how many
    /// subscriptions it reached
    Pub {
        /// Topic (literal: no wildcards)
        #[arg(value_parser = parse_topic)]
        topic: String,
        /// The message; `-` reads it from stdin; empty if omitted
        #[arg(conflicts_with = "file")]
        message: Option<String>,
        /// Publish the contents of this file
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Publish the file as a sealed memfd: its bytes do not cross the
        /// socket; subscribers that take descriptors get the memfd, the
        /// others its bytes
        #[arg(long, requires = "file")]
        memfd: bool,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Print events of PATTERNs until interrupted (a pattern's `*` matches
    /// one token, a final `>` the rest: 'sensors.*.temp'); once every
    /// subscription is live, "keyhole: subscribed to ..." goes to stderr
    Sub {
        /// Topics or patterns
        #[arg(required = true, value_parser = parse_pattern)]
        patterns: Vec<String>,
        /// Stop after this many events (at least 1)
        #[arg(short, long, value_name = "N", value_parser = parse_count, allow_negative_numbers = true)]
        count: Option<u64>,
        /// When this subscriber falls behind, drop its oldest events (each
        /// loss is reported on stderr) instead of being disconnected
        #[arg(long)]
        drop_oldest: bool,
        /// How each event is printed on stdout
        #[arg(long, value_enum, default_value_t = Format::Line)]
        format: Format,
    },
    /// Send MESSAGE (or stdin with -) to whoever serves NAME and print the
    /// reply
    Req {
        /// The name served
        #[arg(value_parser = parse_topic)]
        name: String,
        /// The message; `-` reads it from stdin; empty if omitted
        message: Option<String>,
        /// Print one JSON object (name, payload, encoding) instead of the
        /// reply's bytes
        #[arg(long)]
        json: bool,
    },
    /// Serve NAME: run COMMAND for each request, with the request on its
    /// stdin and its stdout as the reply (a failing COMMAND fails the
    /// request); the requester's uid, pid and the name are in
    /// $KEYHOLE_REQUEST_UID, $KEYHOLE_REQUEST_PID and $KEYHOLE_REQUEST_NAME
    Reply {
        /// The name to serve
        #[arg(value_parser = parse_topic)]
        name: String,
        /// Stop after this many requests (at least 1)
        #[arg(short, long, value_name = "N", value_parser = parse_count, allow_negative_numbers = true)]
        count: Option<u64>,
        /// The command and its arguments (after `--`)
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Print the session token in hex (to forward it: KEYHOLE_TOKEN=$(ssh host keyhole token))
    Token,
    /// Ask the daemon to shut down gracefully
    Stop,
    /// Measure the daemon: ops/s and latency per workload, every reply
    /// verified (exit 1 if one is lost, reordered or corrupted)
    Bench(bench::BenchArgs),
    /// Print the shell completion script for SHELL on stdout
    /// (bash: `keyhole completions bash > ~/.local/share/bash-completion/completions/keyhole`)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages: keyhole.1 on stdout, or with --out-dir every
    /// page (keyhole.1 and keyhole-SUBCOMMAND.1) into DIR
    /// (keyholed's own: `keyholed --man`)
    Man {
        /// The directory to write the pages into (it must exist)
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Longest `--timeout` and `--interval`: a day (a larger one would only
/// overflow the clock arithmetic, and no answer is worth waiting longer).
const MAX_SECS: f64 = 86_400.0;

fn parse_timeout(text: &str) -> Result<f64, String> {
    parse_secs(text, false)
}

fn parse_interval(text: &str) -> Result<f64, String> {
    parse_secs(text, true)
}

/// A finite number of seconds up to MAX_SECS, 0 only with `zero` (`nan`,
/// `inf` and negative values are refused).
fn parse_secs(text: &str, zero: bool) -> Result<f64, String> {
    let secs = text.trim().parse::<f64>().unwrap_or(f64::NAN);
    let low = if zero { secs >= 0.0 } else { secs > 0.0 };
    if secs.is_finite() && low && secs <= MAX_SECS {
        Ok(secs)
    } else if zero {
        Err(format!("must be a number of seconds from 0 to {MAX_SECS}"))
    } else {
        Err(format!(
            "must be a number of seconds more than 0 and at most {MAX_SECS}"
        ))
    }
}

fn parse_count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("not a whole number".into()),
    }
}

/// A topic or name, by the hub's own rule ([`check_topic`]).
fn parse_topic(text: &str) -> Result<String, String> {
    check_topic(text)
        .map(|()| text.to_string())
        .map_err(|why| why.to_string())
}

/// A subscription pattern, by the hub's own rule ([`check_pattern`]).
fn parse_pattern(text: &str) -> Result<String, String> {
    check_pattern(text)
        .map(|()| text.to_string())
        .map_err(|why| why.to_string())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        let code = match &err {
            ClientError::DaemonNotRunning { .. } | ClientError::NoRuntimeDir => 3,
            ClientError::Permission { .. }
            | ClientError::NoToken { .. }
            | ClientError::TokenFile(_)
            | ClientError::TokenEnv(_)
            | ClientError::BadDaemonUid { .. }
            | ClientError::PeerUidMismatch { .. } => 4,
            ClientError::AuthRefused { .. } => 5,
            ClientError::Timeout { .. } | ClientError::Busy { .. } => 6,
            ClientError::Daemon { .. }
            | ClientError::Service { .. }
            | ClientError::Closed { .. }
            | ClientError::FellBehind { .. }
            | ClientError::Protocol(_) => 7,
            ClientError::WrongService { .. } => 8,
            _ => 1,
        };
        Failure {
            code,
            message: Report(&err).to_string(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let _ = writeln!(
                std::io::stderr(),
                "keyhole: cannot start the async runtime: {err}"
            );
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            let _ = writeln!(std::io::stderr(), "keyhole: {message}");
            ExitCode::from(code)
        }
    }
}

fn options(args: &Args) -> ConnectOptions {
    let mut options = ConnectOptions::new().timeout(timeout(args));
    if let Some(socket) = &args.socket {
        options = options.socket(socket);
    }
    if let Some(file) = &args.token_file {
        options = options.token_file(file);
    }
    options
}

/// `--timeout` (its parser keeps it in (0, MAX_SECS]).
fn timeout(args: &Args) -> Duration {
    Duration::from_secs_f64(args.timeout)
}

async fn with_timeout<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(Failure::from),
        Err(_) => Err(ClientError::Timeout { what }.into()),
    }
}

/// Writes `bytes` to stdout and flushes; false when the reader has gone
/// (`keyhole sub t | head -1`).
fn emit(out: &mut impl Write, bytes: &[u8]) -> bool {
    out.write_all(bytes).and_then(|()| out.flush()).is_ok()
}

/// A line on stderr (a diagnostic, or the readiness line of `sub` and
/// `reply`); a closed stderr is not an error.
fn note(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "keyhole: {text}");
}

/// SIGINT as a stream, installed once, so that a Ctrl-C between two awaits
/// is not lost.
fn interrupts() -> Result<tokio::signal::unix::Signal, Failure> {
    signal(SignalKind::interrupt()).map_err(|err| Failure {
        code: 1,
        message: format!("cannot install the SIGINT handler: {err}"),
    })
}

#[derive(Serialize)]
struct StatusJson<'a> {
    version: &'a str,
    uptime_ms: u64,
    authenticated: u64,
    pending: u64,
    topics: u64,
    subscriptions: u64,
    names: u64,
    requests_in_flight: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    patterns: Option<Vec<PatternJson<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    served: Option<Vec<ServedJson<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
}

#[derive(Serialize)]
struct PatternJson<'a> {
    pattern: &'a str,
    subscriptions: u64,
}

#[derive(Serialize)]
struct ServedJson<'a> {
    name: &'a str,
    responders: u64,
}

#[derive(Serialize)]
struct PubJson<'a> {
    topic: &'a str,
    bytes: usize,
    reached: u64,
}

#[derive(Serialize)]
struct ReqJson<'a> {
    name: &'a str,
    #[serde(flatten)]
    reply: output::Payload<'a>,
}

#[derive(Serialize)]
struct PingJson<'a> {
    socket: &'a std::path::Path,
    service: &'a str,
    service_version: u32,
    software_version: &'a str,
    transmitted: u64,
    received: u64,
    interrupted: bool,
    times_ms: &'a [f64],
    min_ms: Option<f64>,
    avg_ms: Option<f64>,
    max_ms: Option<f64>,
    mdev_ms: Option<f64>,
}

async fn run(args: Args) -> Result<(), Failure> {
    let limit = timeout(&args);
    match &args.command {
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "keyhole", &mut script);
            let _ = emit(&mut std::io::stdout().lock(), &script);
            return Ok(());
        }
        Command::Man { out_dir } => return man(out_dir.as_deref()),
        Command::Token => {
            let token = options(&args).resolve_token().map_err(|err| match err {
                ClientError::TokenFile(TokenFileError::NotFound { .. })
                | ClientError::NoToken { .. } => Failure {
                    code: 4,
                    message: format!("{} (is keyholed running on this host?)", Report(&err)),
                },
                other => other.into(),
            })?;
            let line = zeroize::Zeroizing::new(format!("{}\n", &*token.to_hex()));
            // `println!` would panic on a closed stdout.
            let _ = emit(&mut std::io::stdout().lock(), line.as_bytes());
            return Ok(());
        }
        Command::Bench(bench_args) => {
            return bench::run_with(options(&args), limit, bench_args)
                .await
                .map_err(|err| match err {
                    bench::BenchError::Client(err) => err.into(),
                    other => Failure {
                        code: other.exit_code(),
                        message: Report(&other).to_string(),
                    },
                });
        }
        &Command::Ping {
            count,
            interval,
            json,
        } => return ping(&args, count, interval, json, limit).await,
        Command::Stop => {
            let client = options(&args).connect_raw().await?;
            return with_timeout(
                limit,
                "the daemon's answer to the shutdown request",
                client.shutdown(),
            )
            .await;
        }
        _ => {}
    }
    let mut out = std::io::stdout().lock();
    let client: HubClient = options(&args).connect_hub().await?;
    match args.command {
        Command::Status { topics, json } => {
            let s = with_timeout(limit, "the status", client.status()).await?;
            let list = if topics {
                Some(with_timeout(limit, "the topic list", client.topics()).await?)
            } else {
                None
            };
            if json {
                let doc = StatusJson {
                    version: &s.version,
                    uptime_ms: s.uptime_ms,
                    authenticated: s.authenticated,
                    pending: s.pending,
                    topics: s.topics,
                    subscriptions: s.subscriptions,
                    names: s.names,
                    requests_in_flight: s.requests_in_flight,
                    patterns: list.as_ref().map(|l| {
                        l.patterns
                            .iter()
                            .map(|(pattern, n)| PatternJson {
                                pattern,
                                subscriptions: *n,
                            })
                            .collect()
                    }),
                    served: list.as_ref().map(|l| {
                        l.names
                            .iter()
                            .map(|(name, n)| ServedJson {
                                name,
                                responders: *n,
                            })
                            .collect()
                    }),
                    truncated: list.as_ref().map(|l| l.truncated),
                };
                output::print_json(&doc);
                return Ok(());
            }
            let _ = writeln!(out, "version        {}", s.version);
            let _ = writeln!(out, "uptime         {:.1} s", s.uptime_ms as f64 / 1e3);
            let _ = writeln!(out, "authenticated  {}", s.authenticated);
            let _ = writeln!(out, "pending        {}", s.pending);
            let _ = writeln!(out, "topics         {}", s.topics);
            let _ = writeln!(out, "subscriptions  {}", s.subscriptions);
            let _ = writeln!(out, "names          {}", s.names);
            let _ = writeln!(out, "in flight      {}", s.requests_in_flight);
            if let Some(list) = list {
                let _ = writeln!(out, "\nsubscriptions  pattern");
                for (pattern, n) in &list.patterns {
                    let _ = writeln!(out, "{n:>13}  {pattern}");
                }
                let _ = writeln!(out, "\n   responders  name");
                for (name, n) in &list.names {
                    let _ = writeln!(out, "{n:>13}  {name}");
                }
                if list.truncated {
                    let _ = writeln!(out, "(cut to fit one reply)");
                }
            }
        }
        Command::Pub {
            topic,
            message,
            file,
            memfd,
            json,
        } => {
            let (bytes, receivers) = match (&file, memfd) {
                (Some(path), true) => {
                    let fd = memfd_of(path)?;
                    let bytes = rustix::fs::fstat(&fd).map_or(0, |st| st.st_size as usize);
                    let receivers = with_timeout(
                        limit,
                        "the daemon's answer to the publish",
                        client.publish_memfd(&topic, fd),
                    )
                    .await?;
                    (bytes, receivers)
                }
                _ => {
                    let payload = match &file {
                        Some(path) => std::fs::read(path).map_err(|e| Failure {
                            code: 1,
                            message: format!("cannot read {}: {e}", path.display()),
                        })?,
                        None => message_bytes(message.as_deref())?,
                    };
                    let bytes = payload.len();
                    let receivers = with_timeout(
                        limit,
                        "the daemon's answer to the publish",
                        client.publish(&topic, payload),
                    )
                    .await?;
                    (bytes, receivers)
                }
            };
            if json {
                output::print_json(&PubJson {
                    topic: &topic,
                    bytes,
                    reached: receivers,
                });
            } else {
                let _ = writeln!(
                    out,
                    "published to {receivers} subscription{}",
                    if receivers == 1 { "" } else { "s" }
                );
            }
        }
        Command::Sub {
            patterns,
            count,
            drop_oldest,
            format,
        } => {
            let mut sigint = interrupts()?;
            let lag = if drop_oldest {
                Lag::DropOldest
            } else {
                Lag::Disconnect
            };
            // Publishes by memfd then come as the memfd, read here (the
            // output is the same bytes either way).
            with_timeout(
                limit,
                "the daemon's answer to AcceptFds",
                client.accept_fds(),
            )
            .await?;
            let mut merged = futures_util::stream::SelectAll::new();
            for pattern in &patterns {
                let subscription = with_timeout(
                    limit,
                    "the daemon's answer to the subscription",
                    client.subscribe_with(pattern, lag),
                )
                .await?;
                let pattern = pattern.clone();
                merged.push(subscription.map(move |item| (pattern.clone(), item)));
            }
            // The readiness line, in every mode: events published from now
            // on are received.
            note(format_args!("subscribed to {}", patterns.join(", ")));
            let mut seen = 0u64;
            loop {
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                tokio::select! {
                    item = merged.next() => match item {
                        Some((pattern, Ok(Received::Event(event)))) => {
                            seen += 1;
                            let payload = event.bytes().map_err(|e| Failure {
                                code: 1,
                                message: format!("cannot read the memfd of event {} on {}: {e}", event.sequence, event.topic),
                            })?;
                            let bytes = output::event(format, &pattern, &event.topic, event.sequence, &payload);
                            if !emit(&mut out, &bytes) {
                                break;
                            }
                        }
                        Some((pattern, Ok(Received::Lagged { missed }))) => note(format_args!(
                            "{missed} event{} of {pattern} dropped: this subscriber fell behind",
                            if missed == 1 { "" } else { "s" }
                        )),
                        Some((_, Ok(_))) => {}
                        Some((_, Err(err))) => return Err(err.into()),
                        None => return Err(ClientError::Closed { reason: None }.into()),
                    },
                    _ = sigint.recv() => break,
                }
            }
        }
        Command::Req {
            name,
            message,
            json,
        } => {
            let payload = message_bytes(message.as_deref())?;
            let reply = client
                .request_timeout(&name, payload, limit)
                .await
                .map_err(request_failure)?;
            if json {
                output::print_json(&ReqJson {
                    name: &name,
                    reply: output::Payload::of(&reply),
                });
            } else {
                let _ = emit(&mut out, &reply);
            }
        }
        Command::Reply {
            name,
            count,
            command,
        } => {
            let mut sigint = interrupts()?;
            let mut requests = with_timeout(
                limit,
                "the daemon's answer to the serve request",
                client.serve(&name),
            )
            .await?;
            note(format_args!("serving {name} with {}", command.join(" ")));
            let mut served = 0u64;
            loop {
                if count.is_some_and(|c| served >= c) {
                    break;
                }
                let request = tokio::select! {
                    item = requests.next() => match item {
                        Some(Ok(request)) => request,
                        Some(Err(err)) => return Err(err.into()),
                        None => return Err(ClientError::Closed { reason: None }.into()),
                    },
                    _ = sigint.recv() => break,
                };
                served += 1;
                match run_command(&command, &request).await {
                    Ok(stdout) => {
                        if let Err(err) = request.reply(stdout).await {
                            note(format_args!("the reply was not sent: {}", Report(&err)));
                        }
                    }
                    Err(why) => {
                        note(format_args!("{why}"));
                        let _ = request.fail(&why).await;
                    }
                }
            }
        }
        Command::Ping { .. }
        | Command::Stop
        | Command::Token
        | Command::Bench(_)
        | Command::Completions { .. }
        | Command::Man { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// `keyhole ping`: `count` round trips `interval` apart, like ping(8): a
/// summary after several or after Ctrl-C; interrupted, it exits 0 if at
/// least one pong came back and 1 if none did.
async fn ping(
    args: &Args,
    count: u64,
    interval: f64,
    json: bool,
    limit: Duration,
) -> Result<(), Failure> {
    let mut sigint = interrupts()?;
    let options = options(args);
    let socket = options.resolve_socket()?;
    // Any keyhole daemon answers Ping, whatever its service.
    // The first ping goes out with the handshake; `Welcome` is in once it
    // is answered.
    let client = options.connect_raw().await?;
    let mut out = std::io::stdout().lock();
    let mut times = Vec::new();
    let mut transmitted = 0u64;
    let mut interrupted = false;
    let started = Instant::now();
    for i in 0..count {
        if i > 0 && interval > 0.0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs_f64(interval)) => {}
                _ = sigint.recv() => {
                    interrupted = true;
                    break;
                }
            }
        }
        transmitted += 1;
        let sent = Instant::now();
        tokio::select! {
            pong = with_timeout(limit, "the daemon's answer to a ping", client.ping()) => pong?,
            _ = sigint.recv() => {
                interrupted = true;
                break;
            }
        }
        // Milliseconds to the nanosecond (no binary noise in the JSON).
        let ms = (sent.elapsed().as_secs_f64() * 1e9).round() / 1e6;
        times.push(ms);
        if !json {
            let welcome = client.welcome().await?;
            let line = format!(
                "pong from {} (keyhole {}): time={ms:.3} ms\n",
                welcome.service, welcome.software_version
            );
            if !emit(&mut out, line.as_bytes()) {
                break;
            }
        }
    }
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let received = times.len() as u64;
    let ns = |ms: f64| (ms * 1e6).round() / 1e6;
    let (min, avg, max, mdev) = if times.is_empty() {
        (None, None, None, None)
    } else {
        let n = times.len() as f64;
        let avg = times.iter().sum::<f64>() / n;
        let square = times.iter().map(|t| t * t).sum::<f64>() / n;
        (
            Some(times.iter().copied().fold(f64::INFINITY, f64::min)),
            Some(ns(avg)),
            Some(times.iter().copied().fold(0.0, f64::max)),
            Some(ns((square - avg * avg).max(0.0).sqrt())),
        )
    };
    if json {
        let welcome = client.welcome().await?;
        output::print_json(&PingJson {
            socket: &socket,
            service: &welcome.service,
            service_version: welcome.service_version,
            software_version: &welcome.software_version,
            transmitted,
            received,
            interrupted,
            times_ms: &times,
            min_ms: min,
            avg_ms: avg,
            max_ms: max,
            mdev_ms: mdev,
        });
    } else if count > 1 || interrupted {
        let mut summary = format!(
            "\n--- {} ping statistics ---\n{transmitted} ping{} transmitted, {received} pong{} received, time {total_ms:.1} ms\n",
            socket.display(),
            if transmitted == 1 { "" } else { "s" },
            if received == 1 { "" } else { "s" },
        );
        if let (Some(min), Some(avg), Some(max), Some(mdev)) = (min, avg, max, mdev) {
            summary.push_str(&format!(
                "rtt min/avg/max/mdev = {min:.3}/{avg:.3}/{max:.3}/{mdev:.3} ms\n"
            ));
        }
        let _ = emit(&mut out, summary.as_bytes());
    }
    if received == 0 {
        return Err(Failure {
            code: 1,
            message: "interrupted before any pong".into(),
        });
    }
    Ok(())
}

/// `keyhole man`: keyhole.1 on stdout, or every page into `out_dir`.
fn man(out_dir: Option<&std::path::Path>) -> Result<(), Failure> {
    let failed = |what: String, err: std::io::Error| Failure {
        code: 1,
        message: format!("{what}: {err}"),
    };
    match out_dir {
        Some(dir) => clap_mangen::generate_to(Args::command(), dir).map_err(|err| {
            failed(
                format!("cannot write the man pages into {}", dir.display()),
                err,
            )
        }),
        None => {
            let mut page = Vec::new();
            // As generate_to does: no page for `help`, so none listed.
            clap_mangen::Man::new(Args::command().disable_help_subcommand(true))
                .render(&mut page)
                .map_err(|err| failed("cannot render the man page".into(), err))?;
            let _ = emit(&mut std::io::stdout().lock(), &page);
            Ok(())
        }
    }
}

/// The bytes of a message argument: `-` is stdin, none is empty.
/// A sealed memfd holding the file at `path`.
fn memfd_of(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, Failure> {
    let mut file = std::fs::File::open(path).map_err(|e| Failure {
        code: 1,
        message: format!("cannot open {}: {e}", path.display()),
    })?;
    keyhole::memfd::create_sealed_from("keyhole-pub", &mut file).map_err(|e| Failure {
        code: 1,
        message: format!("cannot publish {} as a memfd: {e}", path.display()),
    })
}

fn message_bytes(message: Option<&str>) -> Result<Vec<u8>, Failure> {
    match message {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure {
                    code: 1,
                    message: format!("cannot read stdin: {e}"),
                })?;
            Ok(buf)
        }
        Some(text) => Ok(text.as_bytes().to_vec()),
        None => Ok(Vec::new()),
    }
}

/// A request's outcome as an exit code: 6 for a timeout, 7 for what the
/// daemon or the responder said.
fn request_failure(err: RequestError) -> Failure {
    match err {
        RequestError::Client(err) => err.into(),
        RequestError::Timeout(_) => Failure {
            code: 6,
            message: Report(&err).to_string(),
        },
        other => Failure {
            code: 7,
            message: Report(&other).to_string(),
        },
    }
}

/// Runs `command` with the request on its stdin; its stdout, or why it
/// failed (its exit status and the last line of its stderr).
async fn run_command(command: &[String], request: &IncomingRequest) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    let (program, args) = command.split_first().ok_or("no command given")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("KEYHOLE_REQUEST_NAME", request.name())
        .env("KEYHOLE_REQUEST_UID", request.uid().to_string())
        .env("KEYHOLE_REQUEST_PID", request.pid().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let payload = request.payload().clone();
    let stdin = child.stdin.take();
    // Written while the output is read, so a large request cannot block on
    // a full pipe; a command that does not read its stdin is fine.
    let feed = async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&payload).await;
        }
    };
    let (_, output) = tokio::join!(feed, child.wait_with_output());
    let output = output.map_err(|e| format!("{program} failed: {e}"))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(if last.is_empty() {
        format!("{program} exited with {}", output.status)
    } else {
        format!("{program} exited with {}: {last}", output.status)
    })
}
