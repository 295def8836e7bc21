//! Support shared by the benchmarks that run servers as processes: starting
//! and stopping them, Redis as a baseline, and figures from `/proc`.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not come up in 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn keyholed_bin() -> PathBuf {
    std::env::var_os("KEYHOLED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_keyholed")))
}

/// A release keyholed on a temp dir (its log in `keyholed.log` there), up
/// and serving.
pub struct Keyholed {
    pub proc: Proc,
    pub socket: PathBuf,
    pub token: Arc<keyhole::token::SessionToken>,
    pub dir: tempfile::TempDir,
}

/// Starts [`keyholed_bin`] with `extra` flags and waits until it serves.
pub fn start_keyholed(extra: &[&str]) -> Keyholed {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("run");
    let log = std::fs::File::create(dir.path().join("keyholed.log")).expect("log");
    let mut child = Command::new(keyholed_bin())
        .arg("--dir")
        .arg(&run)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", keyholed_bin().display()));
    let socket = run.join("keyhole.sock");
    let token_file = run.join("session-token");
    wait_for(
        "keyholed",
        || {
            keyhole::token_file::read_token_file(&token_file).is_ok()
                && std::os::unix::net::UnixStream::connect(&socket).is_ok()
        },
        &mut child,
    );
    let token = Arc::new(keyhole::token_file::read_token_file(&token_file).expect("token"));
    Keyholed {
        proc: Proc { child },
        socket,
        token,
        dir,
    }
}

pub struct RedisServer {
    pub proc: Proc,
    pub socket: PathBuf,
    pub _dir: tempfile::TempDir,
}

pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(name);
            f.is_file()
                && std::fs::metadata(&f).is_ok_and(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o111 != 0
                })
        })
    })
}

pub fn start_redis() -> RedisServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("redis.sock");
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&socket)
        .args([
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--loglevel", "warning", "--daemonize", "no", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    wait_for(
        "redis-server",
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        &mut child,
    );
    RedisServer {
        proc: Proc { child },
        socket,
        _dir: dir,
    }
}

/// `nats-server`: `NATS_SERVER_BIN`, else on PATH, else where Debian's
/// package puts it (`/usr/sbin`, often not on a user's PATH).
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(bin));
    }
    if on_path("nats-server") {
        return Some(PathBuf::from("nats-server"));
    }
    ["/usr/sbin/nats-server", "/usr/local/sbin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

pub struct NatsServer {
    pub proc: Proc,
    /// 127.0.0.1 and the port it listens on.
    pub addr: std::net::SocketAddr,
    pub _dir: tempfile::TempDir,
}

/// `nats-server` with default settings on loopback TCP (it has no
/// Unix-socket listener), on a port that was free a moment before (tried
/// again on another one if it was taken in between), its log in a temp dir.
pub fn start_nats(bin: &std::path::Path) -> NatsServer {
    let dir = tempfile::tempdir().expect("temp dir");
    for attempt in 0.. {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.path().join("nats-server.log")).expect("log");
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return NatsServer {
                    proc: Proc { child },
                    addr,
                    _dir: dir,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("nats-server.log")).unwrap_or_default();
                assert!(attempt < 3, "nats-server exited early: {status}: {log}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not come up in 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------
// /proc

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_secs(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f[11].parse().expect("utime");
    let stime: f64 = f[12].parse().expect("stime");
    (utime + stime) / ticks
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

pub fn loadavg() -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open("/proc/loadavg") {
        let _ = f.read_to_string(&mut s);
    }
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
