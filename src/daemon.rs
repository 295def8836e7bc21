//! Starting and stopping a daemon on its runtime paths, in the order that
//! keeps every step safe:
//!
//! 1. The runtime directory is created 0700 if missing, and refused if it
//!    belongs to another uid, grants group/other bits, or is not writable.
//! 2. An exclusive `flock` on the lock file. A second daemon stops here with
//!    "already running (pid N)" and touches nothing.
//! 3. Only then a stale socket is removed: it is probed with a connect
//!    first, and a socket someone still answers on is left alone.
//! 4. The socket is bound under umask 077, so it is never accessible to
//!    anyone else, even briefly.
//! 5. A fresh token is written (an old file is never reused).
//!
//! [`Daemon::cleanup`] removes the socket and token only if they are still
//! the ones this daemon created; the lock is released when the daemon ends
//! (the kernel releases it even after SIGKILL).
//!
//! [`serve`] is the whole life of a daemon for any [`Service`]: signal
//! handlers first, then start-up, serving until a signal or a shutdown
//! request, then clean-up. keyholed is `serve` with the hub.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

use crate::error::TokenFileError;
use crate::paths::{RuntimePaths, is_pathname};
use crate::server::{Server, ServerConfig};
use crate::service::{Interface, Service};
use crate::token::SessionToken;
use crate::token_file::{ensure_private_dir, remove_token_file_if_ours, write_token_file};

/// Why a daemon could not start. Each variant names the path that is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The runtime directory (or the token path) is not safe to use.
    #[error("runtime directory refused")]
    Insecure(#[source] TokenFileError),
    /// The runtime directory has no owner write permission.
    #[error("{path}: runtime directory is not writable (mode {mode:04o})")]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another daemon holds the lock.
    #[error("already running (pid {}); lock held on {lock}", pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    AlreadyRunning {
        /// The pid recorded in the lock file, if readable.
        pid: Option<u32>,
        /// The lock file.
        lock: PathBuf,
    },
    /// Something already answers on the socket path, without holding our lock.
    #[error("{path}: a process is already serving this socket")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path is taken by something that is not a socket.
    #[error("{path}: exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket path cannot name a pathname socket (empty, NUL byte).
    #[error("{path:?}: not usable as a pathname socket")]
    BadSocketPath {
        /// The path.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("{path}: {op}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the token failed.
    #[error("cannot write the session token")]
    Token(#[source] TokenFileError),
    /// A signal handler could not be installed.
    #[error("cannot install the {signal} handler")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl StartError {
    /// Exit code for the daemon binary: 3 already running, 4 an unsafe or
    /// unusable runtime directory, 5 the socket cannot be bound, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::AlreadyRunning { .. } => 3,
            StartError::Insecure(_) | StartError::NotWritable { .. } => 4,
            StartError::Token(TokenFileError::Symlink { .. } | TokenFileError::NotAFile { .. }) => {
                4
            }
            StartError::SocketInUse { .. }
            | StartError::NotASocket { .. }
            | StartError::BadSocketPath { .. } => 5,
            StartError::Io { op: "bind", .. } => 5,
            _ => 1,
        }
    }
}

/// A started daemon: lock held, socket bound, token written.
#[derive(Debug)]
pub struct Daemon {
    paths: RuntimePaths,
    _lock: File,
    listener: Option<UnixListener>,
    token: Arc<SessionToken>,
    socket_id: (u64, u64),
}

fn io_err(path: &std::path::Path, op: &'static str) -> impl FnOnce(io::Error) -> StartError {
    let path = path.to_path_buf();
    move |source| StartError::Io { path, op, source }
}

impl Daemon {
    /// Runs start-up steps 1 to 5 of the module doc. Synchronous: call it
    /// before the server starts.
    pub fn start(paths: RuntimePaths) -> Result<Self, StartError> {
        if !is_pathname(&paths.socket) {
            return Err(StartError::BadSocketPath {
                path: paths.socket.clone(),
            });
        }
        // 1. The runtime directory.
        ensure_private_dir(&paths.dir).map_err(StartError::Insecure)?;
        let mode = fs::metadata(&paths.dir)
            .map_err(io_err(&paths.dir, "stat"))?
            .mode()
            & 0o7777;
        if mode & 0o700 != 0o700 {
            return Err(StartError::NotWritable {
                path: paths.dir.clone(),
                mode,
            });
        }
        // 2. The lock.
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&paths.lock)
            .map_err(io_err(&paths.lock, "open lock file"))?;
        if let Err(err) =
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if err == rustix::io::Errno::WOULDBLOCK {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                return Err(StartError::AlreadyRunning {
                    pid: text.trim().parse().ok(),
                    lock: paths.lock.clone(),
                });
            }
            return Err(io_err(&paths.lock, "lock")(err.into()));
        }
        lock.set_len(0)
            .map_err(io_err(&paths.lock, "truncate lock file"))?;
        lock.rewind()
            .map_err(io_err(&paths.lock, "rewind lock file"))?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err(&paths.lock, "write lock file"))?;

        // 3. A stale socket.
        match fs::symlink_metadata(&paths.socket) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(&paths.socket) {
                    Ok(_) => {
                        return Err(StartError::SocketInUse {
                            path: paths.socket.clone(),
                        });
                    }
                    Err(_) => {
                        tracing::info!(socket = %paths.socket.display(), "removing stale socket");
                        fs::remove_file(&paths.socket)
                            .map_err(io_err(&paths.socket, "remove stale socket"))?;
                    }
                }
            }
            Ok(_) => {
                return Err(StartError::NotASocket {
                    path: paths.socket.clone(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(&paths.socket, "stat")(err)),
        }

        // 4. Bind under umask 077.
        let old = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(&paths.socket);
        rustix::process::umask(old);
        let listener = bound.map_err(io_err(&paths.socket, "bind"))?;
        let meta = fs::symlink_metadata(&paths.socket).map_err(io_err(&paths.socket, "stat"))?;
        let socket_id = (meta.dev(), meta.ino());

        // 5. A fresh token.
        let token = SessionToken::generate().map_err(StartError::Token)?;
        if let Err(err) = write_token_file(&paths.token, &token) {
            let _ = fs::remove_file(&paths.socket);
            return Err(StartError::Token(err));
        }
        Ok(Self {
            paths,
            _lock: lock,
            listener: Some(listener),
            token: Arc::new(token),
            socket_id,
        })
    }

    /// The paths in use.
    pub fn paths(&self) -> &RuntimePaths {
        &self.paths
    }

    /// The session token (to hand to [`crate::server::Server::new`]).
    pub fn token(&self) -> &Arc<SessionToken> {
        &self.token
    }

    /// The bound listener, as a tokio listener (call inside a runtime, once).
    pub fn take_listener(&mut self) -> io::Result<tokio::net::UnixListener> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| io::Error::other("the listener was already taken"))?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    }

    /// Removes the socket and the token file if they are still this
    /// daemon's; returns (socket removed, token removed). The lock is
    /// released when `self` drops.
    pub fn cleanup(self) -> (bool, bool) {
        let socket_removed = match fs::symlink_metadata(&self.paths.socket) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.socket_id => {
                fs::remove_file(&self.paths.socket).is_ok()
            }
            _ => false,
        };
        let token_removed = remove_token_file_if_ours(&self.paths.token, &self.token);
        (socket_removed, token_removed)
    }
}

/// The signals a daemon handles. SIGTERM, SIGINT, SIGHUP (a terminal
/// hanging up) and SIGQUIT stop it gracefully; SIGUSR1 and SIGUSR2 are
/// ignored (logged), since their default action would kill the daemon and
/// leave its socket and token behind. Installed before anything is created
/// on disk, so that a signal that arrives once the socket and the token
/// exist shuts down cleanly instead of killing the daemon.
pub struct Signals {
    stop: Vec<(Signal, &'static str)>,
    ignored: Vec<(Signal, &'static str)>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    /// The signals that stop the daemon gracefully.
    pub const STOP: [&'static str; 4] = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"];
    /// The signals that are ignored.
    pub const IGNORED: [&'static str; 2] = ["SIGUSR1", "SIGUSR2"];

    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> Result<Self, StartError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind)
                .map(|s| (s, name))
                .map_err(|source| StartError::Signal {
                    signal: name,
                    source,
                })
        };
        Ok(Self {
            stop: vec![
                install(SignalKind::terminate(), "SIGTERM")?,
                install(SignalKind::interrupt(), "SIGINT")?,
                install(SignalKind::hangup(), "SIGHUP")?,
                install(SignalKind::quit(), "SIGQUIT")?,
            ],
            ignored: vec![
                install(SignalKind::user_defined1(), "SIGUSR1")?,
                install(SignalKind::user_defined2(), "SIGUSR2")?,
            ],
        })
    }

    /// Resolves at the first stopping signal.
    pub async fn recv(&mut self) {
        loop {
            let stop = futures_util::future::select_all(
                self.stop
                    .iter_mut()
                    .map(|(s, name)| Box::pin(async move { s.recv().await.map(|_| *name) })),
            );
            let ignored = futures_util::future::select_all(
                self.ignored
                    .iter_mut()
                    .map(|(s, name)| Box::pin(async move { s.recv().await.map(|_| *name) })),
            );
            tokio::select! {
                (name, _, _) = stop => {
                    info!(signal = name.unwrap_or("?"), "stopping on a signal");
                    return;
                }
                (name, _, _) = ignored => {
                    info!(signal = name.unwrap_or("?"), "signal ignored");
                }
            }
        }
    }
}

/// Makes the process non-dumpable (`PR_SET_DUMPABLE` 0, as ssh-agent does)
/// and turns core dumps off (`RLIMIT_CORE` 0): another process of the same
/// uid cannot then read the daemon's memory through `/proc/PID/mem` or
/// ptrace, where the session token lives, and no core file carries it.
pub fn protect_memory() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    Ok(())
}

/// Runs a daemon serving `service` on `paths` from start to clean-up:
/// installs the signal handlers ([`Signals`]), makes the process
/// non-dumpable ([`protect_memory`], unless `config.dumpable`), starts
/// ([`Daemon::start`]: directory checks, lock, stale socket, bind, fresh
/// token), serves until a stopping signal or a shutdown request, then
/// removes the socket and the token.
/// Call it inside a tokio runtime.
///
/// ```no_run
/// # use keyhole::service::{Call, Connection, Interface, Service};
/// # struct Echo;
/// # impl Interface for Echo {
/// #     const NAME: &'static str = "echo";
/// #     const VERSION: u32 = 1;
/// #     type Request = String;
/// #     type Reply = String;
/// #     type Event = String;
/// # }
/// # struct EchoService;
/// # impl Service for EchoService {
/// #     type Interface = Echo;
/// #     type Error = std::convert::Infallible;
/// #     type Session = ();
/// #     fn open(&self, _: &Connection<Echo>) {}
/// #     async fn call(&self, _: Call<'_, Self>, r: String) -> Result<String, Self::Error> { Ok(r) }
/// # }
/// use keyhole::paths::RuntimePaths;
/// use keyhole::server::ServerConfig;
///
/// # async fn example() -> Result<(), keyhole::daemon::StartError> {
/// let paths = RuntimePaths::from_env().expect("KEYHOLE_DIR, XDG_RUNTIME_DIR or HOME");
/// keyhole::daemon::serve(paths, ServerConfig::default(), EchoService).await?;
/// # Ok(()) }
/// ```
pub async fn serve<S: Service>(
    paths: RuntimePaths,
    config: ServerConfig,
    service: S,
) -> Result<(), StartError> {
    let mut signals = Signals::install()?;
    if config.dumpable {
        tracing::warn!(
            "the process stays dumpable (--dumpable): its memory, the session token included, is readable by processes of the same uid"
        );
    } else {
        protect_memory().map_err(|source| StartError::Io {
            path: PathBuf::from("/proc/self"),
            op: "make the process non-dumpable",
            source,
        })?;
    }
    let mut daemon = Daemon::start(paths)?;
    let listener = daemon.take_listener().map_err(|source| StartError::Io {
        path: daemon.paths().socket.clone(),
        op: "register the socket",
        source,
    })?;
    info!(
        service = <S::Interface as Interface>::NAME,
        dir = %daemon.paths().dir.display(),
        socket = %daemon.paths().socket.display(),
        token_file = %daemon.paths().token.display(),
        pid = std::process::id(),
        "keyhole {} listening",
        env!("CARGO_PKG_VERSION")
    );
    let server = Server::new(service, config, Arc::clone(daemon.token()));
    server.run(listener, signals.recv()).await;
    let (socket_removed, token_removed) = daemon.cleanup();
    info!(socket_removed, token_removed, "stopped");
    Ok(())
}
