//! Attacks and faults that used to get through (issue "Hardening"), each
//! against a real keyholed: the secret in memory, closed pipes, signals,
//! inherited descriptors, a FIFO as token file, an unsafe ancestor of the
//! runtime directory, a directory at the token path, refusals in the log.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DaemonProcess, keyhole_bin, keyholed_bin, wait_for};
use rustix::process::Signal;

/// Occurrences of `needle` in the readable memory of process `pid`.
fn count_in_memory(pid: i32, needle: &[u8]) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut count = 0;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        count += buf.windows(needle.len()).filter(|w| *w == needle).count();
    }
    count
}

#[test]
fn the_daemon_holds_exactly_one_copy_of_the_token_and_a_connected_client_none() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    // Serve a few connections first: no copy may be left behind by them.
    for _ in 0..5 {
        let out = daemon.cli().arg("ping").output().unwrap();
        assert!(out.status.success());
    }
    let copies = count_in_memory(daemon.pid(), token.as_bytes());
    assert_eq!(
        copies, 1,
        "the daemon holds {copies} copies of the raw token"
    );
    assert_eq!(
        count_in_memory(daemon.pid(), token.to_hex().as_bytes()),
        0,
        "the daemon holds the token's text"
    );
    // A connected client that did not keep the token holds no copy.
    let mut sub = daemon
        .cli()
        .args(["sub", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "the subscriber", || {
        String::from_utf8_lossy(&daemon.cli().arg("status").output().unwrap().stdout)
            .contains("subscriptions  1")
    });
    let pid = sub.id() as i32;
    assert_eq!(
        count_in_memory(pid, token.as_bytes()),
        0,
        "raw token in the client"
    );
    assert_eq!(
        count_in_memory(pid, token.to_hex().as_bytes()),
        0,
        "hex token in the client"
    );
    let _ = sub.kill();
    let _ = sub.wait();
}

/// Runs `script` with `sh -c` as an unprivileged uid (65534 when the tests
/// run as root; our own otherwise), returning its stdout.
fn as_unprivileged(script: &str) -> String {
    let out = if rustix::process::geteuid().is_root() {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    } else {
        Command::new("sh").args(["-c", script]).output().unwrap()
    };
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_process_of_the_same_uid_cannot_open_the_daemons_memory_unless_it_is_dumpable() {
    let root = rustix::process::geteuid().is_root();
    for (args, readable) in [(vec![], false), (vec!["--dumpable"], true)] {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = base.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        if root {
            rustix::fs::chown(
                &dir,
                Some(rustix::fs::Uid::from_raw(65534)),
                Some(rustix::fs::Gid::from_raw(65534)),
            )
            .unwrap();
        }
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(keyholed_bin());
            c
        } else {
            Command::new(keyholed_bin())
        };
        let mut child = cmd
            .arg("--dir")
            .arg(&dir)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(20), "keyholed", || {
            dir.join("keyhole.sock").exists()
        });
        let pid = child.id();
        let got = as_unprivileged(&format!("exec 3</proc/{pid}/mem && echo opened"));
        assert_eq!(got.trim() == "opened", readable, "{args:?}: {got:?}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = status
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        if !readable {
            assert!(
                core.split_whitespace().nth(4) == Some("0"),
                "core dumps not off: {core}"
            );
        }
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            Signal::TERM,
        );
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_closed_log_pipe_neither_stops_service_nor_cleanup() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("run");
    // `keyholed -v 2>&1 | head -1`: the log's reader goes after one line.
    let mut child = Command::new(keyholed_bin())
        .arg("--dir")
        .arg(&dir)
        .arg("-v")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    log.read_line(&mut first).unwrap();
    drop(log);
    let cli = || {
        let mut c = Command::new(keyhole_bin());
        c.env_clear().env("KEYHOLE_DIR", &dir);
        c
    };
    wait_for(Duration::from_secs(10), "the socket", || {
        dir.join("keyhole.sock").exists()
    });
    for i in 0..5 {
        let out = cli().arg("ping").output().unwrap();
        assert!(
            out.status.success(),
            "ping {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        Signal::TERM,
    );
    assert!(child.wait().unwrap().success());
    assert!(!dir.join("keyhole.sock").exists() && !dir.join("session-token").exists());
}

#[test]
fn sub_exits_when_its_reader_goes() {
    let daemon = DaemonProcess::start(&[]);
    let mut sub = daemon
        .cli()
        .args(["sub", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "the subscriber", || {
        String::from_utf8_lossy(&daemon.cli().arg("status").output().unwrap().stdout)
            .contains("subscriptions  1")
    });
    assert!(
        daemon
            .cli()
            .args(["pub", "t", "one"])
            .status()
            .unwrap()
            .success()
    );
    let mut out = BufReader::new(sub.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.ends_with("one\n"), "{line:?}");
    drop(out); // `| head -1`
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The next event's write fails with EPIPE: sub must exit.
        assert!(
            daemon
                .cli()
                .args(["pub", "t", "two"])
                .status()
                .unwrap()
                .success()
        );
        if let Some(status) = sub.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sub still runs after its reader went"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hangup_and_quit_shut_down_cleanly_and_usr1_usr2_are_ignored() {
    for signal in [Signal::HUP, Signal::QUIT, Signal::INT, Signal::TERM] {
        let mut daemon = DaemonProcess::start(&[]);
        daemon.signal(signal);
        let status = daemon.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{signal:?}: {status}");
        assert!(
            !daemon.paths.socket.exists(),
            "{signal:?}: socket left behind"
        );
        assert!(
            !daemon.paths.token.exists(),
            "{signal:?}: token left behind"
        );
    }
    let mut daemon = DaemonProcess::start(&[]);
    daemon.signal(Signal::USR1);
    daemon.signal(Signal::USR2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(daemon.cli().arg("ping").output().unwrap().status.success());
    daemon.signal(Signal::TERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    assert!(!daemon.paths.socket.exists());
}

#[test]
fn descriptors_inherited_from_the_parent_are_closed_at_start() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("run");
    let file = base.path().join("inherited-file");
    std::fs::write(&file, b"x").unwrap();
    // fd 7: the write end of our stdout pipe; fd 8: a file. Neither has
    // close-on-exec in the shell that execs keyholed.
    let script = format!(
        "exec 8<'{}'; exec '{}' --dir '{}' 7>&1 >/dev/null 2>/dev/null",
        file.display(),
        keyholed_bin(),
        dir.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdout.take().unwrap();
    // The reader of the inherited pipe sees EOF while the daemon runs.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = pipe.read_to_end(&mut rest);
        let _ = tx.send(());
    });
    wait_for(Duration::from_secs(10), "the socket", || {
        dir.join("keyhole.sock").exists()
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "no EOF on the inherited pipe"
    );
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !fds.iter().any(|f| f.contains("inherited-file")),
        "the inherited file is still open: {fds:?}"
    );
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        Signal::TERM,
    );
    assert!(child.wait().unwrap().success());
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn a_fifo_as_token_file_is_refused_at_once() {
    let daemon = DaemonProcess::start(&[]);
    let fifo = daemon.base.path().join("fifo");
    mkfifo(&fifo);
    for args in [vec!["ping"], vec!["token"], vec!["--timeout", "1", "ping"]] {
        let started = Instant::now();
        let mut child = daemon
            .cli()
            .env("KEYHOLE_TOKEN_FILE", &fifo)
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} hangs on a FIFO token file");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn an_ancestor_another_uid_can_change_is_refused() {
    let root = rustix::process::geteuid().is_root();
    let base = tempfile::tempdir().unwrap();
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sticky = base.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut cases = vec![(open.join("run"), Some(open.clone()))];
    if root {
        let foreign = base.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        rustix::fs::chown(&foreign, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
        cases.push((foreign.join("run"), Some(foreign)));
    }
    cases.push((sticky.join("run"), None));
    for (dir, bad) in cases {
        let mut child = Command::new(keyholed_bin())
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        match bad {
            Some(ancestor) => {
                let out = child.wait_with_output().unwrap();
                assert_eq!(out.status.code(), Some(4), "{}", dir.display());
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    stderr.contains(&format!("{}:", ancestor.display())),
                    "{stderr}"
                );
                assert!(!dir.join("session-token").exists());
            }
            None => {
                // A sticky, world-writable ancestor (like /tmp) is fine.
                wait_for(Duration::from_secs(10), "keyholed", || {
                    dir.join("keyhole.sock").exists()
                });
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
                    Signal::TERM,
                );
                assert!(child.wait().unwrap().success());
            }
        }
    }
}

#[test]
fn a_directory_at_the_token_path_is_an_unusable_path() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(dir.join("session-token")).unwrap();
    let out = Command::new(keyholed_bin())
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("session-token: not a regular file"),
        "{stderr}"
    );
    assert!(
        !dir.join("keyhole.sock").exists(),
        "the socket was left behind"
    );
}

#[test]
fn refused_handshakes_are_logged_at_warn_with_uid_and_pid_never_the_token() {
    let daemon = DaemonProcess::start_with(
        &[],
        common::Launch {
            rust_log: String::new(),
            ..common::Launch::default()
        },
    );
    let wrong = keyhole::SessionToken::generate().unwrap();
    for _ in 0..30 {
        let mut raw = daemon.raw();
        raw.send(&keyhole::handshake::HandshakeFrame::new(&wrong));
        raw.expect_error_then_close(keyhole::transport::TransportCode::BadToken);
    }
    let log = daemon.log_text();
    // (The readiness probe's empty connection is a refusal too.)
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("code=BadToken"))
        .collect();
    assert!(
        !lines.is_empty(),
        "no refusal logged at the default level:\n{log}"
    );
    assert!(
        lines.len() < 30,
        "{} refusals logged one by one",
        lines.len()
    );
    for line in &lines {
        assert!(
            line.contains("WARN") && line.contains("connection refused"),
            "{line}"
        );
        assert!(
            line.contains(&format!("pid={}", std::process::id())),
            "{line}"
        );
        assert!(
            line.contains(&format!("uid={}", rustix::process::geteuid().as_raw())),
            "{line}"
        );
    }
    for secret in [wrong.to_hex(), daemon.token().to_hex()] {
        assert!(!log.contains(&*secret), "a token is in the log");
    }
}

#[test]
fn a_waiting_connection_whose_peer_hangs_up_gives_its_place_back() {
    // One slot, a cap of 3, a grace long enough that nobody is evicted.
    let daemon = DaemonProcess::start(&[
        "--max-pending",
        "1",
        "--max-connections",
        "3",
        "--pending-grace",
        "30",
        "--auth-timeout",
        "30",
    ]);
    let connect = || {
        let s = std::os::unix::net::UnixStream::connect(&daemon.paths.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    };
    let _holder = connect();
    std::thread::sleep(Duration::from_millis(100));
    // Waits for the slot, then hangs up: its place in the cap must go.
    drop(connect());
    std::thread::sleep(Duration::from_millis(200));
    let _second = connect();
    let mut third = connect();
    let mut buf = [0u8; 64];
    match third.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "the third live connection was refused (the one that hung up still counts): {other:?}"
        ),
    }
    // The cap itself holds: a fourth live one is refused.
    let mut fourth = connect();
    let n = fourth.read(&mut buf).unwrap();
    let frame = common::Msg::decode(&buf[4..n]);
    assert!(
        matches!(
            frame,
            common::Msg::Error {
                code: keyhole::transport::ErrorCode::Transport(
                    keyhole::transport::TransportCode::TooManyConnections
                ),
                ..
            }
        ),
        "{frame:?}"
    );
}

/// A daemon in a pid namespace of its own (as in a container) cannot see
/// its peers' pids: the kernel reports them as 0. It serves them all the
/// same, and hands the pid it sees, 0, to a responder as the requester's
/// (the credentials are read with the pid as a plain integer; a type that
/// holds a non-zero pid could not represent it). Needs root, as the suite.
#[tokio::test]
async fn a_daemon_in_its_own_pid_namespace_serves_peers_whose_pid_it_cannot_see() {
    let daemon = DaemonProcess::start_with(
        &[],
        common::Launch {
            pid_namespace: true,
            ..common::Launch::default()
        },
    );
    let responder_client = daemon.client().await;
    let mut responder = responder_client.serve("svc.who").await.expect("serve");
    let requester = daemon.client().await;
    requester
        .ping()
        .await
        .expect("a peer whose pid reads 0 is served");
    let asked = tokio::spawn(async move { requester.request("svc.who", &b"hi"[..]).await });
    let request = tokio::time::timeout(Duration::from_secs(10), responder.next_request())
        .await
        .expect("a request within 10 s")
        .expect("responder open")
        .expect("request");
    assert_eq!(request.pid(), 0, "the pid the daemon sees");
    assert_eq!(request.uid(), rustix::process::geteuid().as_raw());
    request.reply(&b"you"[..]).await.expect("reply");
    let reply = asked.await.expect("requester task").expect("reply");
    assert_eq!(&reply[..], b"you");
}
