//! Faults around a real `keyholed`, each a test: SIGKILL and SIGTERM under
//! load, an unusable runtime directory at start-up, the token file deleted
//! or replaced while running, and the descriptor limit reached.

mod common;
#[path = "torture_harness/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{DaemonProcess, Launch, Msg, cpu_secs, subscribe, wait_for};
use keyhole::client::{ClientError, ConnectOptions, HubClient, Subscription};
use keyhole::error::TokenFileError;
use keyhole::hub::{HubError, HubEvent, HubReply};
use keyhole::token::SessionToken;
use keyhole::token_file::write_token_file;
use keyhole::transport::{CloseReason, ErrorCode, TransportCode};
use rustix::process::Signal;
use wire::Stamp;

// ---------------------------------------------------------------------------
// Load: publishers and subscribers through the client library, every event
// checked (per-topic sequence, per-publisher order, payload checksum).

const TOPIC: &str = "faults";

/// How a publisher ended: publishes Ack'ed (0..acked), the error that
/// stopped it, and its client (to probe the connection afterwards).
struct PubEnd {
    acked: u64,
    error: ClientError,
    client: HubClient,
}

/// How a subscriber ended: events received per publisher and the error
/// (or end) of its stream.
struct SubEnd {
    received: Vec<u64>,
    end: Option<ClientError>,
    /// A check failed (a gap, a duplicate, a corrupted payload).
    broken: Option<String>,
}

fn spawn_publisher(
    client: HubClient,
    idx: u32,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<PubEnd> {
    tokio::spawn(async move {
        let mut counter = 0u64;
        loop {
            let payload = wire::make_payload(Stamp {
                publisher: idx,
                counter,
                sent_us: wire::now_us(),
            });
            match client.publish(TOPIC, payload).await {
                Ok(_) => {
                    counter += 1;
                    acked.store(counter, Ordering::Release);
                }
                Err(error) => {
                    return PubEnd {
                        acked: counter,
                        error,
                        client,
                    };
                }
            }
        }
    })
}

fn spawn_subscriber(
    mut sub: Subscription,
    publishers: usize,
    seen: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<SubEnd> {
    tokio::spawn(async move {
        let mut received = vec![0u64; publishers];
        let mut last_seq = None;
        loop {
            let event = match sub.next_event().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    return SubEnd {
                        received,
                        end: Some(e),
                        broken: None,
                    };
                }
                None => {
                    return SubEnd {
                        received,
                        end: None,
                        broken: None,
                    };
                }
            };
            let broken = |why: String| SubEnd {
                received: received.clone(),
                end: None,
                broken: Some(why),
            };
            if let Some(last) = last_seq {
                if event.sequence != last + 1 {
                    return broken(format!("sequence {} after {last}", event.sequence));
                }
            }
            last_seq = Some(event.sequence);
            let stamp = match wire::check_payload(&event.payload) {
                Ok(s) => s,
                Err(e) => return broken(e),
            };
            let p = stamp.publisher as usize;
            if p >= publishers || stamp.counter != received[p] {
                return broken(format!(
                    "publisher {p} message {} after {:?}",
                    stamp.counter, received
                ));
            }
            received[p] += 1;
            seen.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn spawn_pinger(client: HubClient) -> tokio::task::JoinHandle<ClientError> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = client.ping().await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_then_restart_reconnects_with_the_new_token() {
    let mut daemon = DaemonProcess::start(&[]);
    let old_token = daemon.token();
    let old_pid = daemon.pid();
    const P: usize = 3;
    let seen = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for _ in 0..3 {
        let client = daemon.client().await;
        let sub = client.subscribe(TOPIC).await.unwrap();
        subs.push(spawn_subscriber(sub, P, Arc::clone(&seen)));
    }
    let pubs: Vec<_> = futures_util::future::join_all((0..P).map(|_| daemon.client()))
        .await
        .into_iter()
        .enumerate()
        .map(|(i, c)| spawn_publisher(c, i as u32, Arc::new(AtomicU64::new(0))))
        .collect();
    let pinger = spawn_pinger(daemon.client().await);
    wait_for(Duration::from_secs(20), "load to flow", || {
        seen.load(Ordering::Relaxed) >= 300
    });

    daemon.signal(Signal::KILL);
    let _ = daemon.child.wait();

    // Every client gets a clear error, promptly: the connection ended
    // without a word from the daemon.
    let clear = |e: &ClientError| {
        matches!(e, ClientError::Closed { reason: None }) && e.to_string() == "connection closed"
    };
    for p in pubs {
        let end = within(Duration::from_secs(5), "publisher error", p)
            .await
            .unwrap();
        assert!(end.acked > 0);
        assert!(clear(&end.error), "publisher: {:?}", end.error);
    }
    for s in subs {
        let end = within(Duration::from_secs(5), "subscriber error", s)
            .await
            .unwrap();
        assert_eq!(end.broken, None);
        let err = end.end.expect("the subscription ends with an error item");
        assert!(clear(&err), "subscriber: {err:?}");
    }
    let err = within(Duration::from_secs(5), "pinger error", pinger)
        .await
        .unwrap();
    assert!(clear(&err), "pinger: {err:?}");
    // While it is down: "daemon not running", naming the socket.
    let err = daemon.options().connect_hub().await.unwrap_err();
    assert!(
        matches!(err, ClientError::DaemonNotRunning { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&daemon.paths.socket.display().to_string())
    );

    // What SIGKILL left behind: the socket, the token and the lock file.
    let stale_socket = std::fs::symlink_metadata(&daemon.paths.socket).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &stale_socket.file_type()
    ));
    assert_eq!(daemon.token(), old_token);
    assert_eq!(
        std::fs::read_to_string(&daemon.paths.lock).unwrap().trim(),
        old_pid.to_string()
    );

    // Clients start reconnecting before the daemon is back: they must ride
    // out "not running" and the stale token until the new one is written.
    let reconnecting: Vec<_> = (0..3)
        .map(|_| {
            let options = daemon.options();
            tokio::spawn(async move { options.connect_hub_retrying(Duration::from_secs(30)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::task::block_in_place(|| daemon.respawn());
    let new_token = daemon.token();
    assert_ne!(new_token, old_token, "token not rotated");
    assert_eq!(
        std::fs::read_to_string(&daemon.paths.lock).unwrap().trim(),
        daemon.pid().to_string()
    );
    assert!(daemon.log_text().contains("removing stale socket"));
    let mut clients = Vec::new();
    for r in reconnecting {
        let client = within(Duration::from_secs(30), "reconnect", r)
            .await
            .unwrap()
            .expect("reconnected through connect_retrying");
        client.ping().await.unwrap();
        clients.push(client);
    }
    // The old token is refused (the verdict comes with the first reply).
    let err = ConnectOptions::new()
        .socket(&daemon.paths.socket)
        .token(old_token)
        .connect_hub()
        .await
        .unwrap()
        .ping()
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Transport(TransportCode::BadToken))
    );

    // Load again, on the reconnected clients: every Ack'ed publish arrives.
    let seen = Arc::new(AtomicU64::new(0));
    let sub = clients[0].subscribe(TOPIC).await.unwrap();
    let sub = spawn_subscriber(sub, 1, Arc::clone(&seen));
    for counter in 0..500 {
        let payload = wire::make_payload(Stamp {
            publisher: 0,
            counter,
            sent_us: 0,
        });
        clients[1].publish(TOPIC, payload).await.unwrap();
    }
    wait_for(
        Duration::from_secs(20),
        "500 events after the restart",
        || seen.load(Ordering::Relaxed) == 500,
    );
    clients[0].unsubscribe(TOPIC).await.unwrap();
    let end = within(Duration::from_secs(5), "subscription end", sub)
        .await
        .unwrap();
    assert_eq!((end.received, end.broken), (vec![500], None));
    // And the CLI, which reads the token file itself.
    let out = daemon.cli().arg("ping").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_everyone_after_every_acked_publish() {
    let mut daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    const P: usize = 3;
    let seen = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for _ in 0..4 {
        let client = daemon.client().await;
        let sub = client.subscribe(TOPIC).await.unwrap();
        subs.push(spawn_subscriber(sub, P, Arc::clone(&seen)));
    }
    // One subscriber leaves half-way: it is not owed the rest.
    let leaver = daemon.client().await;
    let mut leaver_sub = leaver.subscribe(TOPIC).await.unwrap();
    // A raw subscriber, to see the very frames: events, then Closing{Shutdown}.
    let mut raw = daemon.raw();
    raw.authenticate(&token);
    raw.request(subscribe(TOPIC));
    assert_eq!(raw.read_msg(), Msg::Reply(1, HubReply::Subscribed));
    let raw_reader = std::thread::spawn(move || {
        let mut received = vec![0u64; P];
        let mut last_seq = None;
        loop {
            match raw.read_msg() {
                Msg::Event(
                    _,
                    HubEvent::Message {
                        sequence, payload, ..
                    },
                ) => {
                    if let Some(last) = last_seq {
                        assert_eq!(sequence, last + 1, "raw subscriber: sequence gap");
                    }
                    last_seq = Some(sequence);
                    let stamp = wire::check_payload(&payload).unwrap();
                    assert_eq!(stamp.counter, received[stamp.publisher as usize]);
                    received[stamp.publisher as usize] += 1;
                }
                Msg::Closing(reason) => {
                    assert_eq!(reason, CloseReason::Shutdown);
                    assert!(raw.read_frame().is_none(), "a frame after Closing");
                    return received;
                }
                other => panic!("raw subscriber got {other:?}"),
            }
        }
    });
    let acked: Vec<Arc<AtomicU64>> = (0..P).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut pubs = Vec::new();
    for (i, a) in acked.iter().enumerate() {
        pubs.push(spawn_publisher(
            daemon.client().await,
            i as u32,
            Arc::clone(a),
        ));
    }
    let idle = daemon.client().await;
    let pinger = spawn_pinger(daemon.client().await);
    wait_for(Duration::from_secs(20), "load to flow", || {
        seen.load(Ordering::Relaxed) >= 1000
    });
    for _ in 0..50 {
        leaver_sub.next_event().await.unwrap().unwrap();
    }
    leaver.unsubscribe(TOPIC).await.unwrap();
    wait_for(Duration::from_secs(20), "more load", || {
        seen.load(Ordering::Relaxed) >= 2000
    });
    let mut pending = daemon.raw();

    daemon.signal(Signal::TERM);

    // Publishers: Ack'ed, then refused (the hub's ShuttingDown, in answer
    // to the publish) or closed with Shutdown.
    let mut acked_at_end = Vec::new();
    for p in pubs {
        let end = within(Duration::from_secs(10), "publisher end", p)
            .await
            .unwrap();
        match &end.error {
            ClientError::Service { code, .. } if *code == HubError::SHUTTING_DOWN => {
                // The refusal answered that publish (it carried its id): it
                // did not end the connection, which goes on to be closed
                // with Shutdown. (A refusal without an id would have ended
                // it, and this ping would fail with the same error.)
                match end.client.ping().await {
                    Ok(())
                    | Err(ClientError::Closed {
                        reason: Some(CloseReason::Shutdown),
                    }) => {}
                    Err(other) => panic!("after ShuttingDown, ping failed with {other:?}"),
                }
            }
            ClientError::Closed {
                reason: Some(CloseReason::Shutdown),
            } => {}
            other => panic!("publisher ended with {other:?}"),
        }
        acked_at_end.push(end.acked);
    }
    // Every subscriber that stayed: everything Ack'ed, in order, then
    // Closing{Shutdown}.
    for s in subs {
        let end = within(Duration::from_secs(10), "subscriber end", s)
            .await
            .unwrap();
        assert_eq!(end.broken, None);
        assert!(
            matches!(
                end.end,
                Some(ClientError::Closed {
                    reason: Some(CloseReason::Shutdown)
                })
            ),
            "{:?}",
            end.end.map(|e| e.to_string())
        );
        for (p, got) in end.received.iter().enumerate() {
            assert!(
                *got >= acked_at_end[p],
                "publisher {p}: {got} delivered, {} Ack'ed",
                acked_at_end[p]
            );
        }
    }
    let raw_received = raw_reader.join().expect("raw subscriber");
    for (p, got) in raw_received.iter().enumerate() {
        assert!(*got >= acked_at_end[p], "raw subscriber: publisher {p}");
    }
    // Idle and busy request/response clients were told too.
    let err = pinger.await.unwrap();
    assert!(
        matches!(
            err,
            ClientError::Closed {
                reason: Some(CloseReason::Shutdown)
            }
        ),
        "{err:?}"
    );
    let err = idle.ping().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Closed {
                reason: Some(CloseReason::Shutdown)
            }
        ),
        "{err:?}"
    );
    pending.expect_error_then_close(TransportCode::ShuttingDown);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(!daemon.paths.socket.exists(), "socket left behind");
    assert!(!daemon.paths.token.exists(), "token left behind");
}

// ---------------------------------------------------------------------------
// An unusable runtime directory at start-up.

/// What is observable about one file: inode, mtime (s, ns), mode, owner,
/// content (regular files only).
type FileState = (u64, i64, i64, u32, u32, Vec<u8>);

/// Everything observable about a directory and its entries.
fn snapshot(dir: &Path) -> BTreeMap<String, FileState> {
    let mut out = BTreeMap::new();
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.insert(
        ".".into(),
        (
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.mode(),
            meta.uid(),
            Vec::new(),
        ),
    );
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let content = if meta.is_file() {
            std::fs::read(entry.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.mode(),
                meta.uid(),
                content,
            ),
        );
    }
    out
}

/// A runtime directory holding what a killed daemon leaves: a token, a lock
/// with a pid, and a stale socket.
fn stale_runtime_dir() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    write_token_file(
        &dir.join("session-token"),
        &SessionToken::generate().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("keyholed.lock"), "4242\n").unwrap();
    drop(std::os::unix::net::UnixListener::bind(dir.join("keyhole.sock")).unwrap());
    (base, dir)
}

/// Starts keyholed on `dir` and expects it to refuse: exit 4, an error that
/// names the directory and says `why`, and the directory untouched.
fn assert_refused_touching_nothing(dir: &Path, why: &str) {
    let before = snapshot(dir);
    // Stale mtimes would hide a rewrite within the same clock tick.
    std::thread::sleep(Duration::from_millis(20));
    let mut child = Command::new(common::keyholed_bin())
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyholed started on {} instead of refusing", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&dir.display().to_string()) && stderr.contains(why),
        "the error must name {} and say {why:?}: {stderr}",
        dir.display()
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert_eq!(
        snapshot(dir),
        before,
        "the daemon touched {}",
        dir.display()
    );
}

#[test]
fn a_read_only_runtime_dir_is_refused_touching_nothing() {
    let (_base, dir) = stale_runtime_dir();
    // Root may write anyway: the daemon checks the owner rwx bits itself.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    assert_refused_touching_nothing(&dir, "runtime directory is not writable (mode 0500)");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_runtime_dir_owned_by_another_uid_is_refused_touching_nothing() {
    let (_base, dir) = stale_runtime_dir();
    if let Err(e) = std::os::unix::fs::chown(&dir, Some(65534), Some(65534)) {
        // Only root can give a directory away.
        eprintln!(
            "skipped: cannot chown to 65534 as uid {}: {e}",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    assert_refused_touching_nothing(&dir, "directory is owned by uid 65534, not by this user");
}

#[test]
fn a_world_writable_runtime_dir_is_refused_touching_nothing() {
    for mode in [0o777, 0o1777, 0o702] {
        let (_base, dir) = stale_runtime_dir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        assert_refused_touching_nothing(
            &dir,
            &format!("directory mode is {mode:04o}; it must grant nothing to group or others"),
        );
    }
}

// ---------------------------------------------------------------------------
// The token file deleted or replaced while the daemon runs.

/// The daemon's log without terminal colours.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `probe_connect_from_environment` in a child copy of this test
/// binary with exactly `env` (plus `PATH`), so that the library resolves
/// the token from an environment of its own: changing variables in this
/// multi-threaded process would race with the other tests.
fn connect_from_environment(env: &[(&str, &Path)]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["probe_connect_from_environment", "--exact", "--nocapture"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KEYHOLE_FAULTS_PROBE", "1")
        .envs(
            env.iter()
                .map(|(k, v)| (OsString::from(k), v.as_os_str().to_owned())),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("PROBE: "))
        .unwrap_or_else(|| {
            panic!(
                "no probe output: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

/// Only does something when run by [`connect_from_environment`].
#[tokio::test]
async fn probe_connect_from_environment() {
    if std::env::var_os("KEYHOLE_FAULTS_PROBE").is_none() {
        return;
    }
    // The handshake's verdict comes with the first reply.
    let connected = async { ConnectOptions::new().connect_hub().await?.ping().await };
    let line = match connected.await {
        Ok(()) => "connected".to_string(),
        Err(e @ ClientError::NoToken { .. }) => format!("NoToken: {e}"),
        Err(e @ ClientError::AuthRefused { .. }) => format!("AuthRefused {:?}: {e}", e.code()),
        Err(e) => format!("other: {e:?}"),
    };
    println!("PROBE: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_token_file_keeps_clients_and_refuses_new_ones_clearly() {
    let mut daemon = DaemonProcess::start(&[]);
    let original = daemon.token();
    let client = daemon.client().await;
    let mut sub = client.subscribe(TOPIC).await.unwrap();
    let mut raw = daemon.raw();
    raw.authenticate(&original);

    std::fs::remove_file(&daemon.paths.token).unwrap();

    // Current clients keep working.
    for i in 0..20u8 {
        client.publish(TOPIC, vec![i]).await.unwrap();
        assert_eq!(&sub.next_event().await.unwrap().unwrap().payload[..], &[i]);
    }
    raw.request(common::Req::Ping);
    assert!(matches!(raw.read_msg(), Msg::Ack(_)));
    // A new client: the documented "no session token" error, exit 4 from
    // the CLI, `ClientError::NoToken` from the library's default lookup.
    let out = daemon.cli().arg("ping").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("no session token"), "{stderr}");
    assert!(
        stderr.contains(&daemon.paths.token.display().to_string()),
        "{stderr}"
    );
    let probe = connect_from_environment(&[("KEYHOLE_DIR", &daemon.paths.dir)]);
    assert!(probe.starts_with("NoToken: no session token"), "{probe}");
    // With the token file named explicitly, the library says which file.
    match daemon.options().connect_hub().await.unwrap_err() {
        ClientError::TokenFile(TokenFileError::NotFound { path }) => {
            assert_eq!(path, daemon.paths.token)
        }
        other => panic!("{other:?}"),
    }
    // The daemon still knows its token (it never reads the file back).
    let again = ConnectOptions::new()
        .socket(&daemon.paths.socket)
        .token(original)
        .connect_hub()
        .await
        .unwrap();
    again.ping().await.unwrap();
    // It does not write the file again either, and shuts down cleanly.
    daemon.signal(Signal::TERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!daemon.paths.token.exists());
    assert!(!daemon.paths.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_token_file_is_not_adopted() {
    let mut daemon = DaemonProcess::start(&[]);
    let original = daemon.token();
    let client = daemon.client().await;
    client.ping().await.unwrap();

    // Another valid-looking token, written as the daemon writes its own.
    let impostor = Arc::new(SessionToken::generate().unwrap());
    write_token_file(&daemon.paths.token, &impostor).unwrap();
    let written = std::fs::read(&daemon.paths.token).unwrap();

    client.ping().await.unwrap();
    // New clients reading the file present the impostor: BadToken.
    match daemon
        .options()
        .connect_hub()
        .await
        .unwrap()
        .ping()
        .await
        .unwrap_err()
    {
        ClientError::AuthRefused {
            code: ErrorCode::Transport(TransportCode::BadToken),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let out = daemon.cli().arg("ping").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("BadToken"), "{stderr}");
    let probe = connect_from_environment(&[("KEYHOLE_DIR", &daemon.paths.dir)]);
    assert!(
        probe.starts_with("AuthRefused Some(Transport(BadToken))"),
        "{probe}"
    );
    // The original is still the only token accepted, however many tries.
    for _ in 0..20 {
        let err = ConnectOptions::new()
            .socket(&daemon.paths.socket)
            .token(Arc::clone(&impostor))
            .connect_hub()
            .await
            .unwrap()
            .ping()
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(ErrorCode::Transport(TransportCode::BadToken))
        );
    }
    let again = ConnectOptions::new()
        .socket(&daemon.paths.socket)
        .token(original)
        .connect_hub()
        .await
        .unwrap();
    again.ping().await.unwrap();
    // At shutdown the file it did not write is left alone.
    daemon.signal(Signal::TERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(std::fs::read(&daemon.paths.token).unwrap(), written);
    assert!(!daemon.paths.socket.exists());
    let log = strip_ansi(&daemon.log_text());
    assert!(
        log.contains("stopped socket_removed=true token_removed=false"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// The descriptor limit.

/// Descriptors of `pid` numbered below `limit`: all of them are taken when
/// the process is at its limit (it may hold higher ones it inherited).
fn fds_below(pid: i32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|fd| *fd < limit)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_the_daemon_serves_its_clients_and_recovers_without_spinning() {
    const LIMIT: usize = 64;
    let daemon = DaemonProcess::start_with(
        // Long enough that nothing times out on its own while saturated,
        // and no pending slot is evicted: only descriptors run out.
        &["--auth-timeout", "120", "--max-pending", "1000"],
        Launch {
            fd_limit: Some(LIMIT as u32),
            ..Launch::default()
        },
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    let pinger = daemon.client().await;
    let publisher = daemon.client().await;
    let mut sub = publisher.subscribe(TOPIC).await.unwrap();
    wait_for(
        Duration::from_secs(5),
        "the readiness probe to close",
        || daemon.sample().fds <= 20,
    );
    let baseline = daemon.sample().fds;

    // Connections that never authenticate, until accept fails for lack of
    // descriptors (the rest wait in the listen backlog).
    let hogs: Vec<std::os::unix::net::UnixStream> = (0..2 * LIMIT)
        .map(|_| std::os::unix::net::UnixStream::connect(&daemon.paths.socket).unwrap())
        .collect();
    wait_for(
        Duration::from_secs(10),
        "the daemon at its descriptor limit",
        || {
            fds_below(daemon.pid(), LIMIT) == LIMIT
                && daemon
                    .log_text()
                    .contains("accept failed for lack of resources")
        },
    );
    // A new client now waits in the backlog.
    let options = daemon.options().timeout(Duration::from_secs(30));
    // (Its connect returns once the socket is connected; it is in when
    // `Welcome` comes, which waits for the daemon to accept it.)
    let newcomer = tokio::spawn(async move {
        let client = options.connect_hub().await?;
        client.welcome().await?;
        Ok::<_, ClientError>(client)
    });

    // Existing clients keep being served.
    for _ in 0..50 {
        within(
            Duration::from_secs(5),
            "ping while saturated",
            pinger.ping(),
        )
        .await
        .unwrap();
    }
    for i in 0..50u8 {
        publisher.publish(TOPIC, vec![i]).await.unwrap();
        let ev = within(
            Duration::from_secs(5),
            "event while saturated",
            sub.next_event(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(&ev.payload[..], &[i]);
    }
    // Without spinning: CPU time over 2 s at the limit stays low.
    let pid = daemon.pid();
    let cpu0 = cpu_secs(pid).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_secs(pid).unwrap() - cpu0;
    assert_eq!(fds_below(pid, LIMIT), LIMIT, "no longer saturated");
    assert!(
        used < 0.3,
        "keyholed used {used:.2} s of CPU in 2 s while at its descriptor limit"
    );
    assert!(!newcomer.is_finished(), "a client got in while saturated");

    // Descriptors free up: the daemon recovers, the waiting client gets in.
    drop(hogs);
    let newcomer = within(Duration::from_secs(20), "the newcomer", newcomer)
        .await
        .unwrap()
        .expect("the waiting client is served once descriptors free up");
    newcomer.ping().await.unwrap();
    pinger.ping().await.unwrap();
    let late = daemon.client().await;
    late.ping().await.unwrap();
    drop((newcomer, late));
    wait_for(
        Duration::from_secs(10),
        "descriptors back to the baseline",
        || daemon.sample().fds == baseline,
    );
}
