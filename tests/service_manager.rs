//! keyholed under a service manager, for real: socket activation through
//! `systemd-socket-activate` (Debian's `systemd` package; `.ci/run`
//! installs it), which binds the socket, waits for the first connection
//! and only then execs keyholed with `LISTEN_FDS`/`LISTEN_PID`; readiness
//! and stopping notifications received on a `NOTIFY_SOCKET` the test binds
//! in the abstract namespace (as a container manager may pass it); the
//! shipped unit files checked for what the README promises.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{keyhole_bin, keyholed_bin};

const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

/// The path of `systemd-socket-activate`, or a failure that says how to
/// get it (the test never passes without running it).
fn socket_activate() -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(SOCKET_ACTIVATE);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{SOCKET_ACTIVATE} not found: install Debian's systemd package (apt-get install -y systemd; .ci/run does)"
    );
}

/// A datagram socket in the abstract namespace standing in for the
/// service manager's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn bind(tag: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("keyhole-test-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        Self { socket, name }
    }

    /// `NOTIFY_SOCKET`'s value.
    fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next notification, within `limit`.
    fn next(&self, limit: Duration) -> String {
        self.socket.set_read_timeout(Some(limit)).expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|err| panic!("no notification within {limit:?}: {err}"));
        String::from_utf8(buf[..n].to_vec()).expect("notifications are text")
    }
}

/// `systemd-socket-activate -l SOCKET [-d] -E ... keyholed ARGS`, with the
/// environment the activated daemon gets (socket-activate passes only what
/// `-E` names).
struct Activator {
    child: Child,
    log: PathBuf,
}

impl Activator {
    fn spawn(
        socket: &Path,
        datagram: bool,
        env: &[(&str, String)],
        args: &[&str],
        log: PathBuf,
    ) -> Self {
        let mut cmd = Command::new(socket_activate());
        cmd.arg("-l").arg(socket);
        if datagram {
            cmd.arg("--datagram");
        }
        for (name, value) in env {
            cmd.arg("-E").arg(format!("{name}={value}"));
        }
        cmd.arg(keyholed_bin()).args(args);
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = cmd.spawn().expect("start systemd-socket-activate");
        Self { child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The program the process runs now (it execs keyholed when woken).
    fn exe(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/exe", self.pid())).expect("/proc/PID/exe")
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {limit:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path, activator: &mut Activator) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        if let Ok(Some(status)) = activator.child.try_wait() {
            panic!(
                "{SOCKET_ACTIVATE} exited with {status}: {}",
                activator.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{SOCKET_ACTIVATE} did not bind {}: {}",
            path.display(),
            activator.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn private_dir(base: &Path) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = base.join("run");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("runtime dir");
    dir
}

#[test]
fn the_first_connection_starts_the_daemon_on_the_passed_socket_and_sigterm_stops_it() {
    let base = tempfile::tempdir().expect("temp dir");
    let dir = private_dir(base.path());
    let socket = dir.join("keyhole.sock");
    let token = dir.join("session-token");
    let notify = NotifySocket::bind("activation");
    let mut activator = Activator::spawn(
        &socket,
        false,
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("KEYHOLE_DIR", dir.display().to_string()),
            ("RUST_LOG", "keyhole=debug".into()),
        ],
        &[],
        base.path().join("activated.log"),
    );
    wait_for_socket(&socket, &mut activator);

    // Nobody has connected: the daemon has not started, so no token yet.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        activator.exe().file_name().and_then(|n| n.to_str()),
        Some(SOCKET_ACTIVATE),
        "the daemon started before any connection"
    );
    assert!(!token.exists(), "a token file before the daemon started");

    // The first client's connect wakes it, and that very client is served.
    let out = Command::new(keyhole_bin())
        .arg("ping")
        .env("KEYHOLE_DIR", &dir)
        .env_remove("KEYHOLE_SOCKET")
        .env_remove("KEYHOLE_TOKEN")
        .env_remove("KEYHOLE_TOKEN_FILE")
        .output()
        .expect("run keyhole ping");
    assert!(
        out.status.success(),
        "first ping failed ({}): {}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        activator.log_text()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("pong from hub"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        activator.exe(),
        PathBuf::from(keyholed_bin())
            .canonicalize()
            .expect("keyholed path"),
        "the activated process is keyholed (exec'd in place, same pid)"
    );
    let ready = notify.next(Duration::from_secs(10));
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving on {}\n", socket.display()),
        "readiness notification"
    );
    assert!(
        activator.log_text().contains("activated=true"),
        "{}",
        activator.log_text()
    );

    // Peer credentials come from each accepted connection: a request from a
    // `keyhole req` process carries that process's pid, not the pid of
    // whoever made and passed the socket (which is the daemon's pid here).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let options = keyhole::ConnectOptions::new()
            .socket(&socket)
            .token_file(&token);
        let responder_client = options.connect_hub().await.expect("responder connects");
        let mut responder = responder_client.serve("svc.who").await.expect("serve");
        let requester = tokio::process::Command::new(keyhole_bin())
            .args(["req", "svc.who", "hi"])
            .env("KEYHOLE_DIR", &dir)
            .env_remove("KEYHOLE_SOCKET")
            .env_remove("KEYHOLE_TOKEN")
            .env_remove("KEYHOLE_TOKEN_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run keyhole req");
        let requester_pid = requester.id().expect("requester pid");
        let request = tokio::time::timeout(Duration::from_secs(10), responder.next_request())
            .await
            .expect("a request within 10 s")
            .expect("responder open")
            .expect("request");
        assert_eq!(request.pid(), requester_pid, "the requester's pid");
        assert_ne!(request.pid() as i32, activator.pid());
        assert_eq!(request.uid(), rustix::process::geteuid().as_raw());
        request.reply(&b"you"[..]).await.expect("reply");
        let out = requester.wait_with_output().await.expect("keyhole req");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "you");
    });
    drop(runtime);

    // SIGTERM: a clean stop, STOPPING=1 first; the token file goes, the
    // socket stays (it is the service manager's, for the next activation).
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(activator.pid()).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let stopping = notify.next(Duration::from_secs(10));
    assert_eq!(stopping, "STOPPING=1\nSTATUS=stopping\n");
    let status = activator.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit {status}: {}", activator.log_text());
    assert!(!token.exists(), "the token file was left behind");
    assert!(
        std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
        "the daemon removed the socket it was passed"
    );
    let log = activator.log_text();
    assert!(
        log.contains("socket_removed=false token_removed=true"),
        "{log}"
    );
}

#[test]
fn a_passed_socket_that_is_not_a_unix_stream_socket_is_refused_with_exit_5() {
    let base = tempfile::tempdir().expect("temp dir");
    let dir = private_dir(base.path());
    let socket = dir.join("keyhole.sock");
    let notify = NotifySocket::bind("datagram");
    let mut activator = Activator::spawn(
        &socket,
        true,
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("KEYHOLE_DIR", dir.display().to_string()),
        ],
        &[],
        base.path().join("datagram.log"),
    );
    wait_for_socket(&socket, &mut activator);
    // A datagram wakes a datagram socket's daemon.
    UnixDatagram::unbound()
        .expect("datagram socket")
        .send_to(b"wake up", &socket)
        .expect("send a datagram");
    let status = activator.wait_exit(Duration::from_secs(15));
    let log = activator.log_text();
    assert_eq!(status.code(), Some(5), "{log}");
    assert!(
        log.contains(
            "keyholed: cannot serve the socket passed by the service manager: cannot take the passed descriptor 3: fd 3 is not a valid unix stream socket"
        ),
        "{log}"
    );
    assert!(
        !dir.join("session-token").exists(),
        "a token for a daemon that did not start"
    );
    assert_eq!(
        notify.next(Duration::from_secs(5)),
        "STATUS=failed to start: cannot serve the socket passed by the service manager: cannot take the passed descriptor 3: fd 3 is not a valid unix stream socket\n"
    );
}

#[test]
fn a_failed_start_is_reported_to_the_service_manager() {
    let base = tempfile::tempdir().expect("temp dir");
    let dir = private_dir(base.path());
    // A runtime directory others can enter is refused, activated or not.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let socket = dir.join("keyhole.sock");
    let notify = NotifySocket::bind("refused");
    let mut activator = Activator::spawn(
        &socket,
        false,
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("KEYHOLE_DIR", dir.display().to_string()),
        ],
        &[],
        base.path().join("refused.log"),
    );
    wait_for_socket(&socket, &mut activator);
    let _wake = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let status = activator.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(4), "{}", activator.log_text());
    let message = notify.next(Duration::from_secs(5));
    assert_eq!(
        message,
        format!(
            "STATUS=failed to start: runtime directory refused: {}: directory mode is 0755; it must grant nothing to group or others (chmod 700)\n",
            dir.display()
        )
    );
}

/// The shipped units say what the README says they do.
#[test]
fn the_shipped_user_units_activate_on_the_runtime_socket_and_notify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let socket = std::fs::read_to_string(root.join("keyholed.socket")).expect("keyholed.socket");
    let service = std::fs::read_to_string(root.join("keyholed.service")).expect("keyholed.service");
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let socket = lines(&socket);
    for expected in [
        "ListenStream=%t/keyhole/keyhole.sock",
        "SocketMode=0600",
        "DirectoryMode=0700",
    ] {
        assert!(
            socket.iter().any(|l| l == expected),
            "{expected} in {socket:?}"
        );
    }
    let service = lines(&service);
    assert!(service.iter().any(|l| l == "Type=notify"), "{service:?}");
    assert!(
        service
            .iter()
            .any(|l| l.starts_with("ExecStart=") && l.contains("keyholed")),
        "{service:?}"
    );
}
