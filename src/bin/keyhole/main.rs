//! `keyhole`: the command-line client. One subcommand per request, plus
//! `token` (for forwarding) and `bench`. Errors are one line on stderr and a
//! distinct exit code per class (see `Args`' help).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use keyhole::client::hub::{IncomingRequest, Received, RequestError};
use keyhole::client::{ClientError, ConnectOptions, HubClient};
use keyhole::error::{Report, TokenFileError};
use keyhole::hub::Lag;
use keyhole::loadgen as bench;

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
    Status {
        /// Also list every pattern subscribed (with its subscriptions) and
        /// every name served (with its responders)
        #[arg(long)]
        topics: bool,
    },
    /// Publish MESSAGE (or stdin with -) on TOPIC; prints how many
    /// subscriptions it reached
    Pub {
        /// Topic
        topic: String,
        /// The message; `-` reads it from stdin; empty if omitted
        message: Option<String>,
    },
    /// Print events of PATTERNs as "TOPIC SEQUENCE PAYLOAD" lines until
    /// interrupted (a pattern's `*` matches one token, a final `>` the rest:
    /// 'sensors.*.temp')
    Sub {
        /// Topics or patterns
        #[arg(required = true)]
        patterns: Vec<String>,
        /// Stop after this many events
        #[arg(short, long)]
        count: Option<u64>,
        /// When this subscriber falls behind, drop its oldest events (each
        /// loss is reported on stderr) instead of being disconnected
        #[arg(long)]
        drop_oldest: bool,
    },
    /// Send MESSAGE (or stdin with -) to whoever serves NAME and print the
    /// reply
    Req {
        /// The name served
        name: String,
        /// The message; `-` reads it from stdin; empty if omitted
        message: Option<String>,
    },
    /// Serve NAME: run COMMAND for each request, with the request on its
    /// stdin and its stdout as the reply (a failing COMMAND fails the
    /// request); the requester's uid, pid and the name are in
    /// $KEYHOLE_REQUEST_UID, $KEYHOLE_REQUEST_PID and $KEYHOLE_REQUEST_NAME
    Reply {
        /// The name to serve
        name: String,
        /// Stop after this many requests
        #[arg(short, long)]
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
        for _ in 0..count.max(1) {
            let started = Instant::now();
            // The first ping goes out with the handshake.
            with_timeout(limit, "the reply to Ping", client.ping()).await?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let welcome = client.welcome().await?;
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
        Command::Status { topics } => {
            let s = with_timeout(limit, "the status", client.status()).await?;
            let _ = writeln!(out, "version        {}", s.version);
            let _ = writeln!(out, "uptime         {:.1} s", s.uptime_ms as f64 / 1e3);
            let _ = writeln!(out, "authenticated  {}", s.authenticated);
            let _ = writeln!(out, "pending        {}", s.pending);
            let _ = writeln!(out, "topics         {}", s.topics);
            let _ = writeln!(out, "subscriptions  {}", s.subscriptions);
            let _ = writeln!(out, "names          {}", s.names);
            let _ = writeln!(out, "in flight      {}", s.requests_in_flight);
            if topics {
                let list = with_timeout(limit, "the topic list", client.topics()).await?;
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
        Command::Pub { topic, message } => {
            let payload = message_bytes(message.as_deref())?;
            let receivers = with_timeout(
                limit,
                "the reply to Publish",
                client.publish(&topic, payload),
            )
            .await?;
            let _ = writeln!(
                out,
                "published to {receivers} subscription{}",
                if receivers == 1 { "" } else { "s" }
            );
        }
        Command::Sub {
            patterns,
            count,
            drop_oldest,
        } => {
            let lag = if drop_oldest {
                Lag::DropOldest
            } else {
                Lag::Disconnect
            };
            let mut merged = futures_util::stream::SelectAll::new();
            for pattern in &patterns {
                let subscription = with_timeout(
                    limit,
                    "the reply to Subscribe",
                    client.subscribe_with(pattern, lag),
                )
                .await?;
                let pattern = pattern.clone();
                merged.push(subscription.map(move |item| (pattern.clone(), item)));
            }
            if std::io::stderr().is_terminal() {
                let _ = writeln!(
                    std::io::stderr(),
                    "subscribed to {}; Ctrl-C to stop",
                    patterns.join(", ")
                );
            }
            let mut seen = 0u64;
            loop {
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                tokio::select! {
                    item = merged.next() => match item {
                        Some((_, Ok(Received::Event(event)))) => {
                            seen += 1;
                            let line = writeln!(out, "{} {} {}", event.topic, event.sequence, String::from_utf8_lossy(&event.payload));
                            // The reader has gone (`keyhole sub t | head -1`): done.
                            if line.and_then(|()| out.flush()).is_err() {
                                break;
                            }
                        }
                        Some((pattern, Ok(Received::Lagged { missed }))) => {
                            let _ = writeln!(
                                std::io::stderr(),
                                "keyhole: {missed} event{} of {pattern} dropped: this subscriber fell behind",
                                if missed == 1 { "" } else { "s" }
                            );
                        }
                        Some((_, Ok(_))) => {}
                        Some((_, Err(err))) => return Err(err.into()),
                        None => return Err(ClientError::Closed { reason: None }.into()),
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Command::Req { name, message } => {
            let payload = message_bytes(message.as_deref())?;
            let reply = client
                .request_timeout(&name, payload, limit)
                .await
                .map_err(request_failure)?;
            let _ = out.write_all(&reply).and_then(|()| out.flush());
        }
        Command::Reply {
            name,
            count,
            command,
        } => {
            let mut requests =
                with_timeout(limit, "the reply to Serve", client.serve(&name)).await?;
            if std::io::stderr().is_terminal() {
                let _ = writeln!(
                    std::io::stderr(),
                    "serving {name} with {}; Ctrl-C to stop",
                    command.join(" ")
                );
            }
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
                    _ = tokio::signal::ctrl_c() => break,
                };
                served += 1;
                match run_command(&command, &request).await {
                    Ok(stdout) => {
                        if let Err(err) = request.reply(stdout).await {
                            let _ = writeln!(
                                std::io::stderr(),
                                "keyhole: the reply was not sent: {}",
                                Report(&err)
                            );
                        }
                    }
                    Err(why) => {
                        let _ = writeln!(std::io::stderr(), "keyhole: {why}");
                        let _ = request.fail(&why).await;
                    }
                }
            }
        }
        Command::Token | Command::Bench(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// The bytes of a message argument: `-` is stdin, none is empty.
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
