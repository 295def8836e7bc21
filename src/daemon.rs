//! Starting and stopping a daemon on its runtime paths, in the order that
//! keeps every step safe:
//!
//! 1. The runtime directory is created 0700 if missing, and refused if it
//!    belongs to another uid, grants group/other bits, or is not writable
//!    (with a socket group, [`DaemonOptions::socket_group`], it is given
//!    to that group with mode 0710 instead).
//! 2. An exclusive `flock` on the lock file. A second daemon stops here with
//!    "already running (pid N)" and touches nothing.
//! 3. Only then a stale socket is removed: it is probed with a connect
//!    first, and a socket someone still answers on is left alone.
//! 4. The socket is bound under umask 077, so it is never accessible to
//!    anyone else, even briefly; with a socket group it is then given to
//!    the group, and only then made 0660.
//! 5. A fresh token is written (an old file is never reused), after a
//!    copy for each uid in [`DaemonOptions::token_uids`] beside it, named
//!    `session-token.UID`, 0600 and owned by that uid (giving a file away
//!    takes root: without it the copy is skipped with a warning).
//!
//! A socket passed by a service manager ([`DaemonOptions::inherited`],
//! see [`crate::activation`]) replaces steps 3 and 4: its path, mode and
//! group are the unit's, and it is not removed at clean-up (the manager
//! owns it). Steps 1, 2 and 5 are the same.
//!
//! [`Daemon::cleanup`] removes the socket and token only if they are still
//! the ones this daemon created; the lock is released when the daemon ends
//! (the kernel releases it even after SIGKILL).
//!
//! [`serve`] is the whole life of a daemon for any [`Service`]: signal
//! handlers first, then start-up, serving until a signal or a shutdown
//! request, then clean-up; a service manager is told when it is ready and
//! when it stops ([`crate::notify`]). keyholed is [`serve_with`] with the
//! hub.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

use crate::activation::Inherited;
use crate::error::{Report, TokenFileError};
use crate::notify::Notifier;
use crate::paths::{RuntimePaths, is_pathname};
use crate::server::{Server, ServerConfig};
use crate::service::{Interface, Service};
use crate::token::SessionToken;
use crate::token_file::{
    DirPolicy, current_uid, ensure_runtime_dir, remove_token_file_if_holding,
    remove_token_file_if_ours, write_token_file_with,
};

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
    /// The socket cannot be given to the socket group.
    #[error(
        "{path}: cannot give the socket to group {gid} (the daemon must be root or a member of the group)"
    )]
    SocketGroup {
        /// The socket path.
        path: PathBuf,
        /// The group.
        gid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The thread that ends the server's deadlines (the handshake's among
    /// them) could not be started.
    #[error("cannot start the timer thread")]
    Timer(#[source] io::Error),
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
            | StartError::BadSocketPath { .. }
            | StartError::SocketGroup { .. } => 5,
            StartError::Io { op: "bind", .. } => 5,
            _ => 1,
        }
    }
}

/// How a daemon gets its socket, and whom it serves besides its own uid.
/// `Default`: bind the socket itself, private to its uid.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct DaemonOptions {
    /// A listening socket passed by a service manager
    /// ([`crate::activation::listener_from_env`]); `None`: bind
    /// [`RuntimePaths::socket`].
    pub inherited: Option<Inherited>,
    /// Give the socket (mode 0660) and the runtime directory (mode 0710) to
    /// this group, so that its members can connect. The daemon must be root
    /// or a member of the group. With an inherited socket only the
    /// directory is given (the socket's group and mode are the unit's).
    pub socket_group: Option<u32>,
    /// Write a copy of the token for each of these uids, owned by it
    /// (`<token file>.UID`, 0600), for clients of another uid that the
    /// server admits ([`ServerConfig::allow_uids`]). The daemon's own uid is
    /// skipped.
    pub token_uids: Vec<u32>,
}

/// A started daemon: lock held, socket bound, token written.
#[derive(Debug)]
pub struct Daemon {
    paths: RuntimePaths,
    _lock: File,
    listener: Option<UnixListener>,
    token: Arc<SessionToken>,
    /// The socket this daemon bound (device, inode); `None` for a socket
    /// passed by a service manager, which is never removed.
    socket_id: Option<(u64, u64)>,
    /// The token files written for other uids, with their owners.
    uid_tokens: Vec<(PathBuf, u32)>,
}

/// The token file written for `uid` beside `token`: `<token>.UID`.
pub fn uid_token_path(token: &std::path::Path, uid: u32) -> PathBuf {
    let mut name = token.as_os_str().to_owned();
    name.push(format!(".{uid}"));
    PathBuf::from(name)
}

/// The first ancestor of `dir` (or `dir` itself) that members of group
/// `gid` cannot traverse by its mode bits (neither others' nor, with the
/// group `gid`, the group's execute bit), with its mode. ACLs are not read:
/// this is a hint, not a check.
fn untraversable_by_group(dir: &std::path::Path, gid: u32) -> Option<(PathBuf, u32)> {
    let absolute = std::path::absolute(dir).ok()?;
    absolute.ancestors().skip(1).find_map(|ancestor| {
        let meta = fs::metadata(ancestor).ok()?;
        let mode = meta.mode() & 0o7777;
        let passes = mode & 0o001 != 0 || (meta.gid() == gid && mode & 0o010 != 0);
        (!passes).then(|| (ancestor.to_path_buf(), mode))
    })
}

fn io_err(path: &std::path::Path, op: &'static str) -> impl FnOnce(io::Error) -> StartError {
    let path = path.to_path_buf();
    move |source| StartError::Io { path, op, source }
}

impl Daemon {
    /// Runs start-up steps 1 to 5 of the module doc. Synchronous: call it
    /// before the server starts.
    pub fn start(paths: RuntimePaths) -> Result<Self, StartError> {
        Self::start_with(paths, DaemonOptions::default())
    }

    /// [`Self::start`] with a passed socket, a socket group or token files
    /// for other uids. With a passed socket, [`RuntimePaths::socket`]
    /// becomes the path it is bound to.
    pub fn start_with(mut paths: RuntimePaths, options: DaemonOptions) -> Result<Self, StartError> {
        let policy = options
            .socket_group
            .map_or(DirPolicy::Private, DirPolicy::Group);
        let inherited = options.inherited.map(|inherited| {
            paths.socket = inherited.path;
            inherited.listener
        });
        if inherited.is_none() && !is_pathname(&paths.socket) {
            return Err(StartError::BadSocketPath {
                path: paths.socket.clone(),
            });
        }
        // 1. The runtime directory.
        ensure_runtime_dir(&paths.dir, policy).map_err(StartError::Insecure)?;
        if let Some(gid) = options.socket_group {
            if let Some((path, mode)) = untraversable_by_group(&paths.socket, gid) {
                tracing::warn!(
                    "{}: mode {mode:04o} keeps members of group {gid} from reaching the socket {} (they need execute permission on every directory above it)",
                    path.display(),
                    paths.socket.display()
                );
            }
        }
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

        let (listener, socket_id) = match inherited {
            Some(listener) => (listener, None),
            None => {
                let (listener, id) = bind_socket(&paths, options.socket_group)?;
                (listener, Some(id))
            }
        };

        // 5. A fresh token: the copies for other uids first, so that the
        // daemon's own token file, which says "started", comes last.
        let token = SessionToken::generate().map_err(StartError::Token)?;
        let mut uid_tokens = Vec::new();
        let undo = |uid_tokens: &[(PathBuf, u32)]| {
            if socket_id.is_some() {
                let _ = fs::remove_file(&paths.socket);
            }
            for (path, uid) in uid_tokens {
                let _ = remove_token_file_if_holding(path, &token, *uid);
            }
        };
        let own = current_uid();
        let mut uids = options.token_uids;
        uids.sort_unstable();
        uids.dedup();
        for uid in uids.into_iter().filter(|&uid| uid != own) {
            let path = uid_token_path(&paths.token, uid);
            match write_token_file_with(&path, &token, policy, Some(uid)) {
                Ok(()) => uid_tokens.push((path, uid)),
                Err(TokenFileError::Io { ref source, .. })
                    if source.kind() == io::ErrorKind::PermissionDenied =>
                {
                    tracing::warn!(
                        "no token file for uid {uid}: giving {} to another uid takes root (CAP_CHOWN); hand that user the token in KEYHOLE_TOKEN instead",
                        path.display()
                    );
                }
                Err(err) => {
                    undo(&uid_tokens);
                    return Err(StartError::Token(err));
                }
            }
        }
        if let Err(err) = write_token_file_with(&paths.token, &token, policy, None) {
            undo(&uid_tokens);
            return Err(StartError::Token(err));
        }
        Ok(Self {
            paths,
            _lock: lock,
            listener: Some(listener),
            token: Arc::new(token),
            socket_id,
            uid_tokens,
        })
    }
}

/// Steps 3 and 4 of the module doc: a stale socket is removed, the socket
/// is bound under umask 077, then given to the socket group and made 0660.
/// Returns the listener and the socket's (device, inode).
fn bind_socket(
    paths: &RuntimePaths,
    socket_group: Option<u32>,
) -> Result<(UnixListener, (u64, u64)), StartError> {
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
    if let Some(gid) = socket_group {
        // The group first, then the mode: the other order would open the
        // socket to the daemon's own primary group for a moment.
        let shared = rustix::fs::chownat(
            rustix::fs::CWD,
            &paths.socket,
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&paths.socket, fs::Permissions::from_mode(0o660))
        });
        if let Err(source) = shared {
            let _ = fs::remove_file(&paths.socket);
            return Err(StartError::SocketGroup {
                path: paths.socket.clone(),
                gid,
                source,
            });
        }
    }
    let meta = fs::symlink_metadata(&paths.socket).map_err(io_err(&paths.socket, "stat"))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

impl Daemon {
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

    /// Whether the socket was passed by a service manager.
    pub fn is_activated(&self) -> bool {
        self.socket_id.is_none()
    }

    /// The token files written for other uids, with their owners.
    pub fn uid_token_files(&self) -> &[(PathBuf, u32)] {
        &self.uid_tokens
    }

    /// Removes the socket and the token files if they are still this
    /// daemon's; returns (socket removed, token removed). A socket passed
    /// by a service manager is left in place. The lock is released when
    /// `self` drops.
    pub fn cleanup(self) -> (bool, bool) {
        let socket_removed = match fs::symlink_metadata(&self.paths.socket) {
            Ok(meta) if Some((meta.dev(), meta.ino())) == self.socket_id => {
                fs::remove_file(&self.paths.socket).is_ok()
            }
            _ => false,
        };
        for (path, uid) in &self.uid_tokens {
            remove_token_file_if_holding(path, &self.token, *uid);
        }
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
    serve_with(paths, config, service, DaemonOptions::default()).await
}

/// [`serve`] with [`DaemonOptions`]: a socket passed by a service manager,
/// a socket group, token files for other uids.
///
/// Whatever the options, a service manager that set `$NOTIFY_SOCKET` is
/// told `READY=1` once the socket is served, `STOPPING=1` when shutdown
/// begins, and a `STATUS=` line with each (and when start-up fails, why).
pub async fn serve_with<S: Service>(
    paths: RuntimePaths,
    config: ServerConfig,
    service: S,
    options: DaemonOptions,
) -> Result<(), StartError> {
    let notifier = Arc::new(Notifier::from_env());
    let started = start_serving(paths, &config, options);
    let (mut signals, mut daemon) = match started {
        Ok(started) => started,
        Err(err) => {
            notify(
                notifier.status(&format!("failed to start: {}", Report(&err))),
                "STATUS",
            );
            return Err(err);
        }
    };
    let listener = daemon.take_listener().map_err(|source| StartError::Io {
        path: daemon.paths().socket.clone(),
        op: "register the socket",
        source,
    })?;
    info!(
        service = <S::Interface as Interface>::NAME,
        dir = %daemon.paths().dir.display(),
        socket = %daemon.paths().socket.display(),
        activated = daemon.is_activated(),
        token_file = %daemon.paths().token.display(),
        pid = std::process::id(),
        "keyhole {} listening",
        env!("CARGO_PKG_VERSION")
    );
    for (path, uid) in daemon.uid_token_files() {
        info!(uid, token_file = %path.display(), "token file for an allowed uid");
    }
    let server = Server::new(service, config, Arc::clone(daemon.token()));
    let handle = server.handle();
    let on_stop = Arc::clone(&notifier);
    tokio::spawn(async move {
        handle.shutdown_requested().await;
        notify(on_stop.stopping("stopping"), "STOPPING=1");
    });
    notify(
        notifier.ready(&format!("serving on {}", daemon.paths().socket.display())),
        "READY=1",
    );
    server.run(listener, signals.recv()).await;
    notify(notifier.stopping("stopping"), "STOPPING=1");
    let (socket_removed, token_removed) = daemon.cleanup();
    info!(socket_removed, token_removed, "stopped");
    Ok(())
}

/// The signal handlers, the memory protection and [`Daemon::start_with`].
fn start_serving(
    paths: RuntimePaths,
    config: &ServerConfig,
    options: DaemonOptions,
) -> Result<(Signals, Daemon), StartError> {
    let signals = Signals::install()?;
    crate::timer::start().map_err(StartError::Timer)?;
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
    let daemon = Daemon::start_with(paths, options)?;
    Ok((signals, daemon))
}

/// Logs a notification that could not be sent (the service manager then
/// acts on its own timeouts).
fn notify(result: io::Result<()>, what: &str) {
    if let Err(err) = result {
        tracing::warn!(error = %err, "cannot tell the service manager {what}");
    }
}
