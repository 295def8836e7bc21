//! `keyholed`: the daemon, the hub service on `keyhole::daemon::serve_with`.
//! Parses flags, sets up logging, takes a socket passed by systemd (socket
//! activation) or binds its own, starts on its runtime paths, serves until
//! SIGINT, SIGTERM or a `Shutdown` request, then cleans up and exits 0.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keyhole::daemon::DaemonOptions;
use keyhole::hub::HubService;
use keyhole::limits;
use keyhole::paths::RuntimePaths;
use keyhole::server::ServerConfig;

/// The daemon's allocator: jemalloc. A connection's life is a dozen small
/// allocations freed together, and a request's buffers are allocated and
/// freed on the hot path; glibc's malloc spent ~2,400 of the ~17,000
/// instructions of a connect cycle on them (callgrind). With jemalloc the
/// cycle is ~12% cheaper and each connection holds less RSS (its size
/// classes fit the session's allocations; `cargo bench --bench compare --
/// --memory-only`). mimalloc was tried too: as cheap, but 2-4 KiB a
/// connection and 13 MiB at rest. A library user's daemon picks its own.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The keyhole daemon: an authenticated local message hub on a Unix socket.
///
/// Exit codes: 0 clean shutdown; 1 other error; 2 bad usage; 3 another
/// daemon already runs on these paths; 4 the runtime directory is unsafe or
/// unusable (wrong owner, group/other permissions, not writable, symlink);
/// 5 the socket cannot be bound (in use, not a socket, bad path, a passed
/// socket that is not a listening Unix stream socket).
///
/// Under systemd: with socket activation (LISTEN_FDS, LISTEN_PID) keyholed
/// serves the socket the unit passed, whose path and mode are the unit's;
/// with $NOTIFY_SOCKET it reports READY=1 and STOPPING=1 (Type=notify).
/// Units are in contrib/systemd/.
#[derive(Debug, Parser)]
#[command(name = "keyholed", version)]
struct Args {
    /// Runtime directory [default: $KEYHOLE_DIR, else $XDG_RUNTIME_DIR/keyhole, else ~/.keyhole]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Socket path [default: DIR/keyhole.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Token file path [default: DIR/session-token]
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Lock file path [default: DIR/keyholed.lock]
    #[arg(long, value_name = "PATH")]
    lock_file: Option<PathBuf>,
    /// Seconds a new connection has to complete the handshake (more than 0, at most 3600)
    #[arg(long, value_name = "SECS", default_value_t = limits::DEFAULT_AUTH_TIMEOUT.as_secs_f64(), value_parser = parse_auth_timeout)]
    auth_timeout: f64,
    /// Seconds a pending connection may hold its slot without completing the handshake while others wait for one (more than 0, at most 3600)
    #[arg(long, value_name = "SECS", default_value_t = limits::DEFAULT_PENDING_GRACE.as_secs_f64(), value_parser = parse_auth_timeout)]
    pending_grace: f64,
    /// Unauthenticated connections read from at once; more wait for a slot (at least 1)
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_PENDING,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_pending: usize,
    /// Connections held at once (at least 1)
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,
    /// Largest frame payload in bytes (1024 to 16777216)
    #[arg(long, value_name = "BYTES", default_value_t = limits::DEFAULT_MAX_FRAME_LEN,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(limits::MIN_FRAME_LEN as u64..=limits::MAX_FRAME_LEN as u64))]
    max_frame_len: usize,
    /// Bytes of events that may wait for one subscriber before it is cut as a slow consumer
    #[arg(long, value_name = "BYTES", default_value_t = limits::DEFAULT_OUTBOUND_QUEUE_BYTES)]
    outbound_queue_bytes: usize,
    /// Bytes of input buffers and events waiting to be written, over all connections; past it
    /// the connection holding the most is closed with OverBudget (at least 1 MiB and two frames)
    #[arg(long, value_name = "BYTES", default_value_t = limits::DEFAULT_MEMORY_BUDGET)]
    memory_budget: usize,
    /// Also allow this uid to connect (repeatable); the daemon's own uid always may.
    /// A daemon run as root also writes it a token file it may read,
    /// TOKEN_FILE.UID; the user also needs to reach the socket (--socket-group)
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Give the socket (mode 0660) and the runtime directory (mode 0710: its
    /// members can reach the socket but not list or change the directory)
    /// to this group, a name or a gid; the daemon must be root or a member
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Threads serving connections: 1 runs every connection on one event-loop
    /// thread, as Redis does, and leaves the other cores to the clients; 2 or
    /// more run a work-stealing pool of that many (for many busy clients on
    /// many cores)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    threads: usize,
    /// More logging: -v logs every connection, -vv everything (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Print this manual page (roff, for man(1)) on stdout and exit
    /// (`keyholed --man > keyholed.1`; `keyhole man` writes keyhole's)
    #[arg(long)]
    man: bool,
    /// Keep the process dumpable, for debugging: by default keyholed makes
    /// itself non-dumpable and turns core dumps off, so that no process of
    /// your uid can read the session token out of its memory
    #[arg(long)]
    dumpable: bool,
}

/// stderr for the log, whatever became of it: a write that fails (the
/// reader of a pipe has gone) is dropped, never a panic, and the daemon
/// keeps serving and still cleans up at shutdown.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Closes every descriptor above 2 that the parent left open (a file, the
/// write end of a pipe, a socket), so that nothing the daemon did not open
/// is held by it: a reader of an inherited pipe sees EOF. The descriptors
/// systemd passes for socket activation (`LISTEN_FDS` from 3, when
/// `LISTEN_PID` is this process) are kept. Runs first thing in `main`,
/// before anything in this process opens a descriptor.
fn close_inherited_descriptors() {
    let keep_up_to = match (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) {
        (Ok(pid), Ok(n)) if pid.trim() == std::process::id().to_string() => {
            3 + n.trim().parse::<i32>().unwrap_or(0)
        }
        _ => 3,
    };
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds.into_iter().filter(|&fd| fd >= keep_up_to) {
        // The listing's own descriptor was among them and is gone now.
        if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
            continue;
        }
        // SAFETY: at this point of `main` no object in this process owns a
        // descriptor above 2 (nothing has opened one but the listing, whose
        // descriptor was closed and is skipped above): every one left is
        // inherited and unowned, so closing it cannot invalidate a handle.
        #[allow(unsafe_code)]
        unsafe {
            rustix::io::close(fd);
        }
    }
}

/// A group as `--socket-group` takes it: a gid, or a name from
/// `/etc/group` (groups that only a name service knows are given by gid).
fn parse_group(text: &str) -> Result<u32, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(gid) if gid != u32::MAX => Ok(gid),
            _ => Err(format!("{text} is not a gid")),
        };
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(|err| {
        format!("cannot read /etc/group to look up {text:?} ({err}); give the gid")
    })?;
    group_id_in(&groups, text).ok_or_else(|| {
        format!("no group {text:?} in /etc/group (a group of a name service: give its gid)")
    })
}

/// The gid of group `name` in the text of `/etc/group`.
fn group_id_in(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

fn parse_auth_timeout(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 3600.0 {
        Ok(secs)
    } else {
        Err(format!("{secs} is not in (0, 3600] seconds"))
    }
}

fn main() -> ExitCode {
    close_inherited_descriptors();
    // Before any thread exists: it removes LISTEN_PID and LISTEN_FDS from
    // the environment.
    let inherited = keyhole::activation::listener_from_env();
    let args = Args::parse();
    if args.man {
        return print_man();
    }
    let default_level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "keyhole={default_level},keyholed={default_level}"
        ))
    });
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(colour)
        .log_internal_errors(false)
        .init();

    let result = inherited
        .context("cannot serve the socket passed by the service manager")
        .and_then(|inherited| run(args, inherited));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = if let Some(e) = err.downcast_ref::<keyhole::daemon::StartError>() {
                e.exit_code()
            } else if err.is::<keyhole::activation::ActivationError>() {
                // serve_with reports its own start errors; this one came first.
                let _ = keyhole::notify::Notifier::from_env()
                    .status(&format!("failed to start: {err:#}"));
                5
            } else {
                1
            };
            let _ = writeln!(std::io::stderr(), "keyholed: {err:#}");
            ExitCode::from(code)
        }
    }
}

/// `keyholed --man`: the page generated from the clap definition above.
fn print_man() -> ExitCode {
    use clap::CommandFactory;
    let mut page = Vec::new();
    if let Err(err) = clap_mangen::Man::new(Args::command()).render(&mut page) {
        let _ = writeln!(
            std::io::stderr(),
            "keyholed: cannot render the man page: {err}"
        );
        return ExitCode::from(1);
    }
    let mut out = std::io::stdout().lock();
    // A reader that has gone (`keyholed --man | head`) is not an error.
    let _ = out.write_all(&page).and_then(|()| out.flush());
    ExitCode::SUCCESS
}

fn run(args: Args, inherited: Option<keyhole::activation::Inherited>) -> anyhow::Result<()> {
    if !(args.auth_timeout.is_finite() && args.auth_timeout > 0.0) {
        anyhow::bail!(
            "--auth-timeout must be a positive number of seconds, got {}",
            args.auth_timeout
        );
    }
    let dir = match args.dir.clone() {
        Some(dir) => dir,
        None => RuntimePaths::default_dir()
            .context("cannot locate the runtime directory: set KEYHOLE_DIR, XDG_RUNTIME_DIR or HOME, or pass --dir")?,
    };
    let mut paths = RuntimePaths::in_dir(dir);
    if let Some(p) = args.socket {
        if let Some(passed) = inherited.as_ref().filter(|i| i.path != p) {
            tracing::warn!(
                "--socket {} ignored: serving the socket the service manager passed, {}",
                p.display(),
                passed.path.display()
            );
        }
        paths.socket = p;
    }
    if let Some(p) = args.token_file {
        paths.token = p;
    }
    if let Some(p) = args.lock_file {
        paths.lock = p;
    }
    let config = ServerConfig {
        auth_timeout: Duration::from_secs_f64(args.auth_timeout),
        max_pending: args.max_pending,
        pending_grace: Duration::from_secs_f64(args.pending_grace),
        max_connections: args.max_connections,
        max_frame_len: args.max_frame_len,
        outbound_queue_bytes: args.outbound_queue_bytes,
        memory_budget: args.memory_budget,
        allow_uids: args.allow_uids.clone(),
        dumpable: args.dumpable,
    };
    let mut options = DaemonOptions::default();
    options.inherited = inherited;
    options.socket_group = args.socket_group;
    options.token_uids = args.allow_uids;

    // No time driver: the server's deadlines run on keyhole's own timer
    // thread, and tokio's driver would read the clock and walk its wheel at
    // every park (~300 instructions a strict request).
    let runtime = runtime_builder(args.threads)
        .enable_io()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(keyhole::daemon::serve_with(
        paths,
        config,
        HubService::new(),
        options,
    ))?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// The runtime for `--threads n`. One thread is tokio's current-thread
/// runtime, not a pool of one: no work-stealing queues, no wake-ups of other
/// workers, no cross-thread hand-off of a connection's task. On the 2-core
/// machine of the README's Performance section, with the load generator on
/// the same cores (as a local daemon's clients always are), one thread
/// served 50 strict connections 1.50x as fast as a pool of two workers, 50
/// connections with 16 requests in flight 1.28x and a 1-to-16 fan-out 1.44x,
/// at 0.72x, 0.83x and 0.59x the daemon's CPU per operation (`cargo bench
/// --bench compare`, one run of each, back to back).
fn runtime_builder(threads: usize) -> tokio::runtime::Builder {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::group_id_in;

    #[test]
    fn one_thread_is_a_current_thread_runtime_and_more_a_pool() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |n| {
            super::runtime_builder(n)
                .build()
                .map(|rt| rt.handle().runtime_flavor())
                .map_err(|e| e.to_string())
        };
        assert_eq!(flavor(1), Ok(RuntimeFlavor::CurrentThread));
        assert_eq!(flavor(2), Ok(RuntimeFlavor::MultiThread));
    }

    #[test]
    fn groups_are_found_by_name_in_etc_group() {
        let groups = "root:x:0:\nkeyhole-users:x:1234:alice,bob\nbroken\nodd:x:notanumber:\n";
        assert_eq!(group_id_in(groups, "root"), Some(0));
        assert_eq!(group_id_in(groups, "keyhole-users"), Some(1234));
        assert_eq!(group_id_in(groups, "keyhole"), None);
        assert_eq!(group_id_in(groups, "odd"), None);
        assert_eq!(group_id_in(groups, "broken"), None);
    }
}
