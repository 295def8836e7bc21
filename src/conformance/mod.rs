//! The conformance kit: a scripted hub daemon that a client of any
//! language is tested against, through its normal API, by a small *driver*
//! program (proto-spec.md Part IV says how to write one).
//!
//! The kit listens like keyholed (a runtime directory, its socket and a
//! fresh token file; the peer's uid checked before a byte is read) and
//! serves the hub (name `hub`, version 2). A run is a list of steps. At
//! each step the kit pushes an instruction (JSON, as an event on the
//! driver's subscription to [`CONTROL_TOPIC`]), the driver makes its client
//! do what it says, and publishes on [`REPORT_TOPIC`] what its client saw.
//! The kit checks every byte the client sent during the step against the
//! bytes the spec prescribes, and the report against what the client must
//! have seen; the first difference ends the run with a [`Report`] naming
//! the step, with the expected and received bytes in hex.
//!
//! - `script`: the steps, as data.
//! - `run`: the run's state and every check.
//! - `service`: the kit's hub, a [`crate::Service`] on the framework.
//! - `relay`: the main connection, passed to that hub unchanged while its
//!   bytes are checked.
//! - `extra`: the extra connections, where the kit misbehaves on purpose
//!   (refused handshakes, busy refusals whose retries are timed, bad
//!   `Welcome`s, replies that break the rules, ids at their edges,
//!   `Closing`, end of stream, `ECONNRESET`, a write left unfinished) to
//!   drive client-side checks.
//! - `wire`: expected frames with the client's own choices left free, the
//!   daemon frames the kit writes, hex.
//!
//! ```no_run
//! # async fn example() -> Result<(), keyhole::conformance::KitError> {
//! use keyhole::conformance::{Kit, KitOptions};
//! let kit = Kit::start(KitOptions::new("/tmp/kit"))?;
//! // ... start the driver with KEYHOLE_DIR=/tmp/kit ...
//! let report = kit.run().await?;
//! println!("{report}");
//! assert!(report.passed());
//! # Ok(()) }
//! ```

mod extra;
mod relay;
mod run;
mod script;
mod service;
mod wire;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use self::run::Run;
pub use self::script::{CONTROL_TOPIC, HELLO, REPORT_TOPIC};
use self::service::{KitHub, lock};
use crate::daemon::{Daemon, StartError};
use crate::error::TokenFileError;
use crate::limits::{MAX_FRAME_LEN, MIN_FRAME_LEN};
use crate::paths::RuntimePaths;
use crate::server::{Server, ServerConfig};
use crate::token_file::{current_uid, ensure_private_dir};
use crate::transport::TransportCode;

/// How long a step waits for the driver's report by default.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the kit waits for a driver to connect by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Between the end instruction and the kit's shutdown: time for the
/// driver to read it.
const END_GRACE: Duration = Duration::from_millis(300);
/// How often the kit looks at the clock for its timeouts.
const TICK: Duration = Duration::from_millis(50);

/// What a run is made of.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KitOptions {
    /// The runtime directory: the kit's socket and token file go there,
    /// as keyholed's do.
    pub dir: PathBuf,
    /// How long each step waits for the driver's report.
    pub step_timeout: Duration,
    /// How long the kit waits for the driver to connect.
    pub connect_timeout: Duration,
    /// Steps not run (each is listed as skipped in the report).
    pub skip: Vec<String>,
    /// Only these steps (besides `hello`), in the kit's order; `None`: all.
    pub only: Option<Vec<String>>,
    /// The frame limit of the main connection, which sizes the steps at
    /// the limit (1024 to 16777216).
    pub max_frame_len: usize,
}

impl KitOptions {
    /// Every step, the default timeouts and the protocol's frame limit.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            step_timeout: DEFAULT_STEP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            skip: Vec::new(),
            only: None,
            max_frame_len: MAX_FRAME_LEN,
        }
    }

    /// Skips `step`.
    pub fn skip(mut self, step: impl Into<String>) -> Self {
        self.skip.push(step.into());
        self
    }

    /// Runs only these steps (after `hello`).
    pub fn only<S: Into<String>>(mut self, steps: impl IntoIterator<Item = S>) -> Self {
        self.only = Some(steps.into_iter().map(Into::into).collect());
        self
    }

    /// Each step waits this long for its report.
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// The kit waits this long for a driver.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// Why the kit could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// The runtime directory, the lock, the socket or the token file.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The private directory of the kit's own hub socket.
    #[error("the kit's private directory {path}")]
    Private {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: TokenFileError,
    },
    /// A step named in the options does not exist.
    #[error("no step is named {0:?} (keyhole-conformance --list names them)")]
    NoSuchStep(String),
    /// The socket could not be served.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The first step that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The step's name.
    pub step: String,
    /// What was wrong.
    pub why: String,
    /// The offset in the frame of the first byte that differs.
    pub offset: Option<usize>,
    /// The bytes the client should have sent (hex; `??` the client's
    /// choice, `**` the token, never shown).
    pub expected: Option<String>,
    /// The bytes it sent (hex).
    pub received: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The steps passed, in order (`hello` not counted).
    pub passed: Vec<String>,
    /// The steps skipped by the options.
    pub skipped: Vec<String>,
    /// The first failure, if any.
    pub failure: Option<Failure>,
    /// Steps in the run, `hello` included.
    pub(crate) steps: usize,
}

impl Report {
    /// Whether every step of the run passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.passed.len() + 1 == self.steps
    }

    /// The report as JSON (the binary's `--json`).
    pub fn to_json(&self) -> Value {
        json!({
            "verdict": if self.passed() { "pass" } else { "fail" },
            "steps": self.steps.saturating_sub(1),
            "passed": self.passed,
            "skipped": self.skipped,
            "failed": self.failure.as_ref().map(|f| json!({
                "step": f.step,
                "why": f.why,
                "offset": f.offset,
                "expected": f.expected,
                "received": f.received,
            })),
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.steps.saturating_sub(1);
        match &self.failure {
            None if self.passed() => write!(f, "PASS: {total} of {total} steps passed")?,
            None => write!(
                f,
                "FAIL: {} of {total} steps passed; the run ended early",
                self.passed.len()
            )?,
            Some(failure) => {
                writeln!(
                    f,
                    "FAIL at step {} ({} of {total} steps passed before it)",
                    failure.step,
                    self.passed.len()
                )?;
                write!(f, "  why:      {}", failure.why)?;
                if let Some(offset) = failure.offset {
                    write!(f, "\n  at byte:  {offset}")?;
                }
                if let Some(expected) = &failure.expected {
                    write!(f, "\n  expected: {expected}")?;
                }
                if let Some(received) = &failure.received {
                    write!(f, "\n  received: {received}")?;
                }
            }
        }
        if !self.skipped.is_empty() {
            write!(f, "\n  skipped:  {}", self.skipped.join(", "))?;
        }
        Ok(())
    }
}

/// The steps of a full run, `hello` first: (name, what it checks).
pub fn steps() -> Vec<(&'static str, &'static str)> {
    let mut all = vec![(HELLO, "connect, subscribe to the control topic, report")];
    // The smallest limit: the names do not depend on it, the payloads do.
    all.extend(
        script::steps(MIN_FRAME_LEN)
            .iter()
            .map(|s| (s.name, s.about)),
    );
    all
}

/// A kit started on its runtime directory, waiting for a driver.
#[derive(Debug)]
pub struct Kit {
    daemon: Daemon,
    options: KitOptions,
}

impl Kit {
    /// Takes the runtime directory as keyholed does (lock, socket bound,
    /// fresh token file). Call [`Self::run`] from a tokio runtime next.
    pub fn start(options: KitOptions) -> Result<Self, KitError> {
        let names: Vec<&str> = steps().into_iter().map(|(name, _)| name).collect();
        for name in options.skip.iter().chain(options.only.iter().flatten()) {
            if !names.contains(&name.as_str()) {
                return Err(KitError::NoSuchStep(name.clone()));
            }
        }
        let daemon = Daemon::start(RuntimePaths::in_dir(&options.dir))?;
        Ok(Self { daemon, options })
    }

    /// The socket, token file and directory the driver uses.
    pub fn paths(&self) -> &RuntimePaths {
        self.daemon.paths()
    }

    /// Serves one run: waits for the driver, plays every step, and returns
    /// the report once the run has ended (then the socket and token file
    /// are removed).
    pub async fn run(mut self) -> Result<Report, KitError> {
        let socket = self.daemon.paths().socket.clone();
        let listener = self.daemon.take_listener().map_err(|source| KitError::Io {
            op: "listen on",
            path: socket.clone(),
            source,
        })?;
        let private = self.options.dir.join(".conformance");
        ensure_private_dir(&private).map_err(|source| KitError::Private {
            path: private.clone(),
            source,
        })?;
        let hub_socket = private.join("hub.sock");
        let _ = std::fs::remove_file(&hub_socket);
        let hub_listener = UnixListener::bind(&hub_socket).map_err(|source| KitError::Io {
            op: "bind",
            path: hub_socket.clone(),
            source,
        })?;
        let report = self.serve(listener, hub_listener, &hub_socket).await;
        let _ = std::fs::remove_file(&hub_socket);
        let _ = std::fs::remove_dir(&private);
        let _ = self.daemon.cleanup();
        Ok(report)
    }

    async fn serve(
        &self,
        listener: UnixListener,
        hub_listener: UnixListener,
        hub: &Path,
    ) -> Report {
        let options = &self.options;
        let max = options.max_frame_len.clamp(1024, MAX_FRAME_LEN);
        let mut steps = script::steps(max);
        if let Some(only) = &options.only {
            steps.retain(|step| only.iter().any(|name| name == step.name));
        }
        let token = Arc::clone(self.daemon.token());
        let run = Arc::new(Mutex::new(Run::new(
            steps,
            &options.skip,
            Arc::clone(&token),
            max,
        )));
        let config = ServerConfig {
            max_frame_len: max,
            // An instruction and an event of the frame limit wait together.
            outbound_queue_bytes: 3 * (max + 64),
            ..ServerConfig::default()
        };
        // The hub asks for the listener's backlog to be taken before it
        // judges a report (see `KitHub::report`).
        let (backlog_tx, mut backlog_rx) =
            tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
        let server = Server::new(
            KitHub {
                run: Arc::clone(&run),
                backlog: backlog_tx,
            },
            config,
            Arc::clone(&token),
        );
        let handle = server.handle();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = Arc::clone(&stop);
        let serving = tokio::spawn(async move {
            server
                .run(hub_listener, async move { stopped.notified().await })
                .await
        });
        let end = Arc::clone(&lock(&run).end);
        let started = Instant::now();
        let mut main_taken = false;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = end.notified() => break,
                _ = tick.tick() => {
                    let mut state = lock(&run);
                    if !main_taken && started.elapsed() > options.connect_timeout {
                        state.fail(format!("no driver connected within {:?}", options.connect_timeout), None);
                    } else if main_taken && state.step_age() > options.step_timeout {
                        state.fail(format!("no report within {:?}", options.step_timeout), None);
                    }
                }
                Some(taken) = backlog_rx.recv() => {
                    // Every connection the driver made before its report is
                    // queued by now: each belongs to the step that ends, not
                    // to the next one (a busy retry begun just before its
                    // connect timeout, say).
                    while let Some(stream) = accept_queued(&listener) {
                        self.admit(stream, &mut main_taken, &run, hub, &token).await;
                    }
                    let _ = taken.send(());
                }
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    self.admit(stream, &mut main_taken, &run, hub, &token).await;
                }
            }
        }
        // (A report from now on is judged without waiting for the queue.)
        drop(backlog_rx);
        tokio::time::sleep(END_GRACE).await;
        handle.shutdown();
        stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        lock(&run).report()
    }
}

impl Kit {
    /// A connection accepted on the kit's socket: the peer's uid checked
    /// first, as keyholed does; then the driver's main connection (the
    /// first) or one of the current step's extra connections.
    async fn admit(
        &self,
        mut stream: tokio::net::UnixStream,
        main_taken: &mut bool,
        run: &Arc<Mutex<Run>>,
        hub: &Path,
        token: &Arc<crate::token::SessionToken>,
    ) {
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == current_uid() => {}
            _ => {
                let refusal = wire::error(
                    None,
                    wire::code(TransportCode::PeerNotAllowed),
                    "this uid may not use the conformance kit",
                );
                let _ = stream.write_all(&refusal).await;
                return;
            }
        }
        if !*main_taken {
            *main_taken = true;
            lock(run).restart_clock();
            tokio::spawn(relay::relay(stream, hub.to_path_buf(), Arc::clone(run)));
            return;
        }
        let taken = lock(run).take_extra();
        match taken {
            Some((script, done)) => {
                tokio::spawn(extra::play(
                    stream,
                    script,
                    Arc::clone(run),
                    Arc::clone(token),
                    done,
                ));
            }
            None => lock(run).fail("a new connection the step does not expect", None),
        }
    }
}

/// A connection already queued on `listener`, taken without waiting (and
/// whether or not the event loop has reported it yet).
fn accept_queued(listener: &UnixListener) -> Option<tokio::net::UnixStream> {
    use std::os::fd::AsFd;
    let fd = rustix::net::accept_with(
        listener.as_fd(),
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
    )
    .ok()?;
    tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)).ok()
}
