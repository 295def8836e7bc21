//! Test support shared by the integration tests: a real `keyholed` process
//! on a private temp dir, and a raw blocking connection that speaks the
//! wire protocol byte by byte; figures of a process from `/proc`.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use keyhole::client::{ConnectOptions, HubClient};
use keyhole::encoding;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubEvent, HubReply, HubRequest};
use keyhole::limits::MAX_FRAME_LEN;
use keyhole::paths::RuntimePaths;
use keyhole::token::SessionToken;
use keyhole::token_file::read_token_file;
use keyhole::transport::{
    CloseReason, DaemonFrame, ErrorCode, ErrorFrame, RequestKind, TransportCode, Welcome,
    encode_request,
};

/// A running `keyholed` on a temp dir; killed on drop.
pub struct DaemonProcess {
    pub base: tempfile::TempDir,
    pub paths: RuntimePaths,
    pub child: Child,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// How it was launched (log filter, descriptor limit); reused by restarts.
    pub launch: Launch,
}

/// How `keyholed` is launched besides its flags.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `RUST_LOG` for the daemon. The tests read debug lines from the log.
    pub rust_log: String,
    /// Started through `sh -c 'ulimit -n N; exec keyholed ...'` when set.
    pub fd_limit: Option<u32>,
    /// Started through `unshare --pid --fork --kill-child` (needs root): in
    /// a pid namespace of its own, where no peer's pid is visible.
    pub pid_namespace: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            rust_log: "keyhole=debug,keyholed=debug".into(),
            fd_limit: None,
            pid_namespace: false,
        }
    }
}

pub fn keyholed_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyholed")
}

pub fn keyhole_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyhole")
}

impl DaemonProcess {
    /// Starts a daemon with `args` in a fresh temp dir and waits until it serves.
    pub fn start(args: &[&str]) -> Self {
        let base = tempfile::tempdir().expect("temp dir");
        let paths = RuntimePaths::in_dir(base.path().join("run"));
        Self::start_in(base, paths, args)
    }

    /// Starts a daemon on `paths` (kept in `base`) and waits until it serves.
    pub fn start_in(base: tempfile::TempDir, paths: RuntimePaths, args: &[&str]) -> Self {
        Self::start_in_with(base, paths, args, Launch::default())
    }

    /// [`Self::start`] with a launch other than the default.
    pub fn start_with(args: &[&str], launch: Launch) -> Self {
        let base = tempfile::tempdir().expect("temp dir");
        let paths = RuntimePaths::in_dir(base.path().join("run"));
        Self::start_in_with(base, paths, args, launch)
    }

    /// [`Self::start_in`] with a launch other than the default.
    pub fn start_in_with(
        base: tempfile::TempDir,
        paths: RuntimePaths,
        args: &[&str],
        launch: Launch,
    ) -> Self {
        let log = base.path().join(format!(
            "keyholed-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let child = spawn_daemon_with(&paths, &log, args, &launch);
        let mut daemon = Self {
            base,
            paths,
            child,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            launch,
        };
        daemon.wait_ready(None);
        daemon
    }

    /// Waits until the socket answers and the token file is there; with
    /// `stale` (the inode of a previous daemon's token file), until the
    /// token file is a new one, so a restart is not mistaken for ready
    /// while the old token is still on disk.
    fn wait_ready(&mut self, stale: Option<u64>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("keyholed exited early with {status}: {}", self.log_text());
            }
            let fresh = match stale {
                Some(old) => file_inode(&self.paths.token).is_some_and(|ino| ino != old),
                None => true,
            };
            if fresh
                && read_token_file(&self.paths.token).is_ok()
                && UnixStream::connect(&self.paths.socket).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "keyholed did not come up: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills (SIGKILL) and starts again on the same paths with the same args.
    pub fn restart_after_kill(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.child.wait();
        self.respawn();
    }

    /// Starts the daemon again on the same paths with the same args and
    /// launch (the previous one must have exited), and waits until it
    /// serves with a token file of its own.
    pub fn respawn(&mut self) {
        let stale = file_inode(&self.paths.token);
        let args: Vec<String> = self.args.clone();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.child = spawn_daemon_with(&self.paths, &self.log, &refs, &self.launch);
        self.wait_ready(stale);
    }

    /// The daemon's figures from `/proc` now.
    pub fn sample(&self) -> ProcSample {
        ProcSample::read(self.pid()).expect("keyholed is running")
    }

    pub fn token(&self) -> Arc<SessionToken> {
        Arc::new(read_token_file(&self.paths.token).expect("token file"))
    }

    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .socket(&self.paths.socket)
            .token_file(&self.paths.token)
    }

    /// A hub client, authenticated (its `Welcome` is in: connecting alone
    /// returns before the handshake is answered).
    pub async fn client(&self) -> HubClient {
        let client = self.options().connect_hub().await.expect("client connects");
        client.welcome().await.expect("client authenticates");
        client
    }

    pub fn raw(&self) -> RawConn {
        RawConn::connect(&self.paths.socket)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Waits for the daemon to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keyholed did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `keyhole` CLI command pointed at this daemon.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(keyhole_bin());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KEYHOLE_DIR", &self.paths.dir);
        cmd
    }
}

pub fn spawn_daemon(paths: &RuntimePaths, log: &Path, args: &[&str]) -> Child {
    spawn_daemon_with(paths, log, args, &Launch::default())
}

pub fn spawn_daemon_with(
    paths: &RuntimePaths,
    log: &Path,
    args: &[&str],
    launch: &Launch,
) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = match (launch.fd_limit, launch.pid_namespace) {
        // `exec` keeps the pid: the child's pid is the daemon's.
        (Some(limit), _) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(keyholed_bin());
            cmd
        }
        // The child is `unshare`; killing it kills the daemon.
        (None, true) => {
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--kill-child"])
                .arg(keyholed_bin());
            cmd
        }
        (None, false) => Command::new(keyholed_bin()),
    };
    cmd.arg("--dir")
        .arg(&paths.dir)
        .arg("--socket")
        .arg(&paths.socket)
        .arg("--token-file")
        .arg(&paths.token)
        .arg("--lock-file")
        .arg(&paths.lock)
        .args(args)
        .env("RUST_LOG", &launch.rust_log)
        .env_remove(if launch.rust_log.is_empty() {
            "RUST_LOG"
        } else {
            "KEYHOLE_UNUSED"
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn keyholed")
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A request, as the tests write it: the transport's own, or the hub's.
#[derive(Debug, Clone)]
pub enum Req {
    Ping,
    Shutdown,
    Hub(HubRequest),
}

/// A daemon frame with the hub's bodies decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Welcome(Welcome),
    Ack(u64),
    Reply(u64, HubReply),
    /// An event on `stream` (a subscription's id; 0 for requests and
    /// responses).
    Event(u64, HubEvent),
    Lagged {
        stream: u64,
        missed: u64,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    Closing(CloseReason),
}

impl Msg {
    /// Decodes a daemon frame's payload, the hub's bodies included.
    pub fn decode(payload: &[u8]) -> Msg {
        let payload = Bytes::copy_from_slice(payload);
        match DaemonFrame::decode(&payload).expect("a decodable daemon frame") {
            DaemonFrame::Welcome(w) => Msg::Welcome(w),
            DaemonFrame::Ack { id } => Msg::Ack(id),
            DaemonFrame::Reply { id, body } | DaemonFrame::ReplyFds { id, body, .. } => {
                Msg::Reply(id, encoding::decode(&body).expect("a hub reply"))
            }
            DaemonFrame::Event { stream, body } | DaemonFrame::EventFds { stream, body, .. } => {
                Msg::Event(stream, encoding::decode(&body).expect("a hub event"))
            }
            DaemonFrame::Lagged { stream, missed } => Msg::Lagged { stream, missed },
            DaemonFrame::Error(ErrorFrame { id, code, message }) => {
                Msg::Error { id, code, message }
            }
            DaemonFrame::Closing(reason) => Msg::Closing(reason),
        }
    }

    /// The id this answers, if it is a reply.
    pub fn reply_id(&self) -> Option<u64> {
        match self {
            Msg::Ack(id) | Msg::Reply(id, _) => Some(*id),
            Msg::Error { id, .. } => *id,
            _ => None,
        }
    }
}

/// The bytes of request `id`.
pub fn request_bytes(id: u64, req: Req) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let result = match &req {
        Req::Ping => encode_request::<()>(&mut buf, id, RequestKind::Ping, None, MAX_FRAME_LEN),
        Req::Shutdown => {
            encode_request::<()>(&mut buf, id, RequestKind::Shutdown, None, MAX_FRAME_LEN)
        }
        Req::Hub(call) => {
            encode_request(&mut buf, id, RequestKind::Call, Some(call), MAX_FRAME_LEN)
        }
    };
    result.expect("encode");
    buf.to_vec()
}

/// `Req::Hub(HubRequest::Publish { .. })`.
pub fn publish(topic: &str, payload: impl Into<Bytes>) -> Req {
    Req::Hub(HubRequest::Publish {
        topic: topic.into(),
        payload: keyhole::Payload::from(payload.into()),
    })
}

/// `Req::Hub(HubRequest::Subscribe { .. })` with a fresh subscription id
/// (unique in the test binary) and the disconnect lag policy.
pub fn subscribe(pattern: &str) -> Req {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    subscribe_as(
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        pattern,
    )
}

/// `Req::Hub(HubRequest::Subscribe { .. })` with subscription id `sid`.
pub fn subscribe_as(sid: u64, pattern: &str) -> Req {
    Req::Hub(HubRequest::Subscribe {
        sid,
        pattern: pattern.into(),
        lag: keyhole::hub::Lag::Disconnect,
    })
}

/// A raw, blocking protocol connection.
pub struct RawConn {
    pub stream: UnixStream,
    next_id: u64,
}

impl RawConn {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        Self { stream, next_id: 1 }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends the handshake and expects `Welcome`.
    pub fn authenticate(&mut self, token: &SessionToken) -> Welcome {
        self.send(&HandshakeFrame::new(token));
        match self.read_msg() {
            Msg::Welcome(welcome) => welcome,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends a request with the next id; returns the id.
    pub fn request(&mut self, req: Req) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&request_bytes(id, req));
        id
    }

    /// Reads one frame; `None` on a clean EOF (or reset) before any byte.
    pub fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.stream.read(&mut prefix[got..]) {
                Ok(0) => {
                    assert_eq!(got, 0, "EOF inside a length prefix");
                    return None;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::ConnectionReset && got == 0 => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        let len = u32::from_le_bytes(prefix) as usize;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).expect("frame payload");
        Some(payload)
    }

    pub fn read_msg(&mut self) -> Msg {
        let frame = self.read_frame().expect("a frame, not EOF");
        Msg::decode(&frame)
    }

    /// Every byte until EOF (a reset after the data counts as EOF).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
            }
        }
    }

    /// Asserts that the rest of the stream is exactly one `Error` frame with
    /// `code` (no id) and then EOF.
    pub fn expect_error_then_close(&mut self, code: TransportCode) -> String {
        let rest = self.read_to_end();
        assert!(
            rest.len() >= 4,
            "expected an Error frame, got {} bytes",
            rest.len()
        );
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert_eq!(
            rest.len(),
            4 + len,
            "bytes after the error frame: {:?}",
            &rest[4..]
        );
        match Msg::decode(&rest[4..]) {
            Msg::Error {
                id: None,
                code: got,
                message,
            } => {
                assert_eq!(got, ErrorCode::Transport(code), "message: {message}");
                message
            }
            other => panic!("expected Error {code:?}, got {other:?}"),
        }
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn file_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Figures of a process read from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// Resident set size now (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub hwm_kib: u64,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: usize,
    /// User + system CPU time consumed so far, seconds.
    pub cpu_secs: f64,
}

impl ProcSample {
    /// `None` once the process is gone.
    pub fn read(pid: i32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(Self {
            rss_kib: kib("VmRSS:")?,
            hwm_kib: kib("VmHWM:")?,
            fds,
            cpu_secs: cpu_secs(pid)?,
        })
    }
}

/// utime + stime of `pid` in seconds, from `/proc/PID/stat` (fields 14 and
/// 15, in clock ticks of USER_HZ, which Linux fixes at 100 for user space).
pub fn cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}
