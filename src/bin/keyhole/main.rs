//! `keyhole`: the command-line client. One subcommand per request, plus
//! `token` (for forwarding) and `bench`. Errors are one line on stderr and a
//! distinct exit code per class (see `Args`' help).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keyhole::client::{ClientError, ConnectOptions, HubClient};
use keyhole::error::{Report, TokenFileError};
use keyhole::loadgen as bench;

/// Command-line client for keyholed.
///
/// Exit codes: 0 success; 1 other error; 2 bad usage; 3 daemon not running
/// (socket missing or nobody listening); 4 permission or token problem
/// (no token, token file refused, socket served by another uid); 5
/// authentication refused by the daemon; 6 timeout; 7 the daemon reported
/// an error or closed the connection; 8 the daemon serves another service
/// than the hub (`ping` and `stop` work with any keyhole daemon).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Socket path [default: $KEYHOLE_SOCKET, else the runtime directory's keyhole.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Token file [default: $KEYHOLE_TOKEN, else $KEYHOLE_TOKEN_FILE, else the runtime directory's session-token]
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Seconds to wait for the daemon's answers
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trips to the daemon, with their times
    Ping {
        /// Number of pings
        #[arg(short, long, default_value_t = 1)]
        count: u64,
    },
    /// The daemon's connections, topics, subscribers, uptime and version
    Status,
    /// Publish MESSAGE (or stdin with -) on TOPIC
    Pub {
        /// Topic
        topic: String,
        /// The message; `-` reads it from stdin; empty if omitted
        message: Option<String>,
    },
    /// Print events of TOPICs as "TOPIC SEQUENCE PAYLOAD" lines until interrupted
    Sub {
        /// Topics
        #[arg(required = true)]
        topics: Vec<String>,
        /// Stop after this many events
        #[arg(short, long)]
        count: Option<u64>,
    },
    /// Print the session token in hex (to forward it: KEYHOLE_TOKEN=$(ssh host keyhole token))
    Token,
    /// Ask the daemon to shut down gracefully
    Stop,
    /// Measure the daemon: ops/s and latency per workload, every reply
    /// verified (exit 1 if one is lost, reordered or corrupted)
    Bench(bench::BenchArgs),
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

fn timeout(args: &Args) -> Duration {
    Duration::from_secs_f64(if args.timeout.is_finite() && args.timeout > 0.0 {
        args.timeout
    } else {
        10.0
    })
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

async fn run(args: Args) -> Result<(), Failure> {
    let limit = timeout(&args);
    if let Command::Token = args.command {
        let token = options(&args).resolve_token().map_err(|err| match err {
            ClientError::TokenFile(TokenFileError::NotFound { .. })
            | ClientError::NoToken { .. } => Failure {
                code: 4,
                message: format!("{} (is keyholed running on this host?)", Report(&err)),
            },
            other => other.into(),
        })?;
        println!("{}", &*token.to_hex());
        return Ok(());
    }
    if let Command::Bench(bench_args) = &args.command {
        return bench::run_with(options(&args), limit, bench_args)
            .await
            .map_err(|err| match err {
                bench::BenchError::Client(err) => err.into(),
                other => Failure {
                    code: other.exit_code(),
                    message: other.to_string(),
                },
            });
    }
    let mut out = std::io::stdout().lock();
    if let Command::Ping { count } = args.command {
        // Any keyhole daemon answers Ping, whatever its service.
        let client = options(&args).connect_raw().await?;
        let mut times = Vec::new();
        let welcome = client.welcome().clone();
        for _ in 0..count.max(1) {
            let started = Instant::now();
            with_timeout(limit, "the reply to Ping", client.ping()).await?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            times.push(ms);
            let _ = writeln!(
                out,
                "pong from {} (keyhole {}): time={ms:.3} ms",
                welcome.service, welcome.software_version
            );
        }
        if times.len() > 1 {
            let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = times.iter().cloned().fold(0.0, f64::max);
            let avg = times.iter().sum::<f64>() / times.len() as f64;
            let _ = writeln!(
                out,
                "{} pings: min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms",
                times.len()
            );
        }
        return Ok(());
    }
    if let Command::Stop = args.command {
        let client = options(&args).connect_raw().await?;
        return with_timeout(limit, "the reply to Shutdown", client.shutdown()).await;
    }
    let client: HubClient = options(&args).connect_hub().await?;
    match args.command {
        Command::Ping { .. } | Command::Stop => unreachable!("handled above"),
        Command::Status => {
            let s = with_timeout(limit, "the status", client.status()).await?;
            let _ = writeln!(out, "version        {}", s.version);
            let _ = writeln!(out, "uptime         {:.1} s", s.uptime_ms as f64 / 1e3);
            let _ = writeln!(out, "authenticated  {}", s.authenticated);
            let _ = writeln!(out, "pending        {}", s.pending);
            let _ = writeln!(out, "topics         {}", s.topics);
            let _ = writeln!(out, "subscriptions  {}", s.subscriptions);
        }
        Command::Pub { topic, message } => {
            let payload = match message.as_deref() {
                Some("-") => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Failure {
                            code: 1,
                            message: format!("cannot read stdin: {e}"),
                        })?;
                    buf
                }
                Some(text) => text.as_bytes().to_vec(),
                None => Vec::new(),
            };
            with_timeout(
                limit,
                "the reply to Publish",
                client.publish(&topic, payload),
            )
            .await?;
        }
        Command::Sub { topics, count } => {
            let mut merged = futures_util::stream::SelectAll::new();
            for topic in &topics {
                merged.push(
                    with_timeout(limit, "the reply to Subscribe", client.subscribe(topic)).await?,
                );
            }
            if std::io::stderr().is_terminal() {
                let _ = writeln!(
                    std::io::stderr(),
                    "subscribed to {}; Ctrl-C to stop",
                    topics.join(", ")
                );
            }
            let mut seen = 0u64;
            use futures_util::StreamExt;
            loop {
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                tokio::select! {
                    item = merged.next() => match item {
                        Some(Ok(event)) => {
                            seen += 1;
                            let line = writeln!(out, "{} {} {}", event.topic, event.sequence, String::from_utf8_lossy(&event.payload));
                            // The reader has gone (`keyhole sub t | head -1`): done.
                            if line.and_then(|()| out.flush()).is_err() {
                                break;
                            }
                        }
                        Some(Err(err)) => return Err(err.into()),
                        None => return Err(ClientError::Closed { reason: None }.into()),
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Command::Token | Command::Bench(_) => unreachable!("handled above"),
    }
    Ok(())
}
