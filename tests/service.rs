//! A second, tiny service on the framework's public API, served in-process
//! (the real server on a real socket, as mini-redis tests its server): an
//! async handler that takes its time without holding up other connections,
//! a broadcast from a background task, a typed handler error, the peer's
//! credentials, the connect/disconnect/shutdown hooks, descriptors received
//! with a request and sent with its reply and an event, and the client's
//! refusal of a daemon that serves another service.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use keyhole::client::{ClientError, ConnectOptions, Delivery};
use keyhole::fds::Descriptors;
use keyhole::hub::Hub;
use keyhole::server::PushError;
use keyhole::server::{Connection, Server, ServerConfig, ServerHandle};
use keyhole::service::{Call, Interface, Service, ServiceError};
use keyhole::token::SessionToken;
use keyhole::transport::EncodedEvent;
use keyhole::transport::{CloseReason, TransportCode};
use serde::{Deserialize, Serialize};

mod common;

struct Probe;

impl Interface for Probe {
    const NAME: &'static str = "probe";
    const VERSION: u32 = 3;
    type Request = Ask;
    type Reply = Answer;
    type Event = Note;
}

#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    /// Answered after `ms` milliseconds (an awaiting handler), pushing one
    /// event to this connection halfway.
    Slow {
        ms: u64,
    },
    Echo(String),
    Fail,
    WhoAmI,
    /// A bug in the service.
    Panic,
    /// Writes "hello" into each descriptor it came with, answers with a
    /// pipe holding "reply" and pushes an event with one holding "event".
    Fds,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Answer {
    Done,
    Echo(String),
    Peer {
        uid: u32,
        gid: u32,
        pid: i32,
        connection: u64,
        served: u64,
    },
    /// How many descriptors the request brought.
    Got(usize),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Note {
    Halfway,
    Tick(u64),
}

#[derive(Debug, thiserror::Error)]
#[error("asked to fail (request {id})")]
struct Refused {
    id: u64,
}

impl ServiceError for Refused {
    fn code(&self) -> u32 {
        7
    }
}

#[derive(Default)]
struct ProbeService {
    /// Requests handed to `call`.
    calls: AtomicUsize,
    opened: AtomicUsize,
    closed: AtomicUsize,
    shutdowns: AtomicUsize,
    connections: Mutex<Vec<Connection<Probe>>>,
    /// `open` panics while set (a bug in the service).
    panic_in_open: std::sync::atomic::AtomicBool,
}

impl Service for ProbeService {
    type Interface = Probe;
    type Error = Refused;
    /// Requests served on this connection.
    type Session = u64;

    fn open(&self, connection: &Connection<Probe>) -> u64 {
        if self.panic_in_open.load(Ordering::SeqCst) {
            panic!("a bug in the service's open");
        }
        self.opened.fetch_add(1, Ordering::SeqCst);
        self.connections.lock().unwrap().push(connection.clone());
        0
    }

    async fn call(&self, cx: Call<'_, Self>, request: Ask) -> Result<Answer, Refused> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *cx.session += 1;
        match request {
            Ask::Slow { ms } => {
                tokio::time::sleep(Duration::from_millis(ms / 2)).await;
                let _ = cx.connection().push(&Note::Halfway);
                tokio::time::sleep(Duration::from_millis(ms / 2)).await;
                Ok(Answer::Done)
            }
            Ask::Echo(text) => Ok(Answer::Echo(text)),
            Ask::Fail => Err(Refused { id: cx.id() }),
            Ask::Panic => panic!("a bug in the service"),
            Ask::Fds => {
                let mut cx = cx;
                let received = cx.take_fds();
                for fd in &received {
                    rustix::io::write(fd, b"hello").unwrap();
                }
                let reply = pipe_holding(b"reply");
                cx.reply_with_fds(Descriptors::new(vec![reply]));
                let event = EncodedEvent::with_fds(
                    &Note::Tick(7),
                    Descriptors::new(vec![pipe_holding(b"event")]),
                    1 << 20,
                )
                .unwrap();
                cx.connection().push_encoded(&event).unwrap();
                Ok(Answer::Got(received.len()))
            }
            Ask::WhoAmI => {
                let peer = *cx.peer();
                Ok(Answer::Peer {
                    uid: peer.uid,
                    gid: peer.gid,
                    pid: peer.pid,
                    connection: cx.connection().id(),
                    served: *cx.session,
                })
            }
        }
    }

    async fn close(&self, _served: u64, connection: &Connection<Probe>) {
        self.closed.fetch_add(1, Ordering::SeqCst);
        self.connections.lock().unwrap().retain(|c| c != connection);
    }

    fn shutdown(&self) {
        self.shutdowns.fetch_add(1, Ordering::SeqCst);
    }
}

/// The read end of a pipe that holds `bytes` and whose write end is closed.
fn pipe_holding(bytes: &[u8]) -> OwnedFd {
    let (read, write) = rustix::pipe::pipe().unwrap();
    rustix::io::write(&write, bytes).unwrap();
    read
}

fn read_all(fd: BorrowedFd<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match rustix::io::read(fd, &mut buf).unwrap() {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

struct Running {
    _dir: tempfile::TempDir,
    options: ConnectOptions,
    handle: ServerHandle<Probe>,
    service: Arc<ProbeService>,
    stopped: tokio::task::JoinHandle<()>,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("probe.sock");
    let token = Arc::new(SessionToken::generate().unwrap());
    let service = Arc::new(ProbeService::default());
    let server = Server::with_service(
        Arc::clone(&service),
        ServerConfig::default(),
        Arc::clone(&token),
    );
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let handle = server.handle();
    let stopped = tokio::spawn(async move { server.run(listener, std::future::pending()).await });
    Running {
        _dir: dir,
        options: ConnectOptions::new().socket(socket).token(token),
        handle,
        service,
        stopped,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awaiting_handler_holds_up_only_its_own_connection() {
    let probe = start().await;
    let slow = probe.options.connect::<Probe>().await.unwrap();
    let other = probe.options.connect::<Probe>().await.unwrap();
    let mut slow_events = slow.events().unwrap();
    let started = Instant::now();
    let pending = tokio::spawn({
        let slow = slow.clone();
        async move { slow.call(Ask::Slow { ms: 600 }).await }
    });
    // Meanwhile the other connection is answered at once, many times over.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        other.ping().await.unwrap();
        assert_eq!(
            other.call(Ask::Echo(format!("{i}"))).await.unwrap(),
            Answer::Echo(format!("{i}"))
        );
        worst = worst.max(t.elapsed());
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the other connection's 20 round trips took {:?}",
        started.elapsed()
    );
    assert!(
        worst < Duration::from_millis(200),
        "worst round trip {worst:?}"
    );
    // The event pushed while the slow handler awaited arrives before its reply.
    let halfway = tokio::time::timeout(Duration::from_secs(5), slow_events.next_event())
        .await
        .unwrap();
    assert_eq!(
        halfway.unwrap().unwrap(),
        Delivery::Event {
            stream: 0,
            event: Note::Halfway
        }
    );
    assert!(!pending.is_finished(), "the reply came before the event");
    assert_eq!(pending.await.unwrap().unwrap(), Answer::Done);
    assert!(started.elapsed() >= Duration::from_millis(600));
    // Requests of the slow connection queued behind it are answered in order.
    let a = slow.call(Ask::Slow { ms: 100 });
    let b = slow.call(Ask::Echo("after".into()));
    let (a, b) = tokio::join!(a, b);
    assert_eq!(
        (a.unwrap(), b.unwrap()),
        (Answer::Done, Answer::Echo("after".into()))
    );
}

#[tokio::test]
async fn a_background_task_broadcasts_to_every_authenticated_connection_only() {
    let probe = start().await;
    let clients: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| probe.options.connect::<Probe>()))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut streams: Vec<_> = clients.iter().map(|c| c.events().unwrap()).collect();
    // Connected; authenticated once `Welcome` is in.
    for client in &clients {
        client.welcome().await.unwrap();
    }
    // A pending connection that never authenticates.
    let socket = probe.options.resolve_socket().unwrap();
    let mut pending = tokio::net::UnixStream::connect(&socket).await.unwrap();
    // Out of band: no request causes these.
    let handle = probe.handle.clone();
    let ticker = tokio::spawn(async move {
        for i in 0..10 {
            assert_eq!(handle.broadcast(&Note::Tick(i)).unwrap(), 3);
        }
    });
    ticker.await.unwrap();
    for stream in &mut streams {
        for i in 0..10 {
            assert_eq!(
                stream.next_event().await.unwrap().unwrap(),
                Delivery::Event {
                    stream: 0,
                    event: Note::Tick(i)
                }
            );
        }
    }
    assert_eq!(probe.handle.stats().authenticated, 3);
    assert_eq!(probe.handle.stats().pending, 1);
    // The pending connection got nothing at all.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(200), async {
        use tokio::io::AsyncReadExt;
        pending.read(&mut buf).await
    })
    .await;
    assert!(read.is_err(), "a pending connection received {read:?}");
    // Pushing to a connection that has gone fails, it does not queue.
    let kept = probe.service.connections.lock().unwrap()[0].clone();
    drop(clients);
    drop(streams);
    tokio::time::timeout(Duration::from_secs(5), async {
        while probe.service.closed.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every connection's close hook ran");
    assert!(kept.is_closed());
    assert!(kept.push(&Note::Tick(99)).is_err());
    assert_eq!(probe.service.opened.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_typed_handler_error_becomes_an_error_with_the_id_and_the_connection_stays() {
    let probe = start().await;
    let client = probe.options.connect::<Probe>().await.unwrap();
    client.call(Ask::Echo("first".into())).await.unwrap();
    match client.call(Ask::Fail).await {
        Err(ClientError::Service { code: 7, message }) => {
            // The second request on this connection has id 2.
            assert_eq!(message, "asked to fail (request 2)");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.call(Ask::Echo("still open".into())).await.unwrap(),
        Answer::Echo("still open".into())
    );
}

#[tokio::test]
async fn handlers_see_the_peers_credentials_and_per_connection_state() {
    let probe = start().await;
    let a = probe.options.connect::<Probe>().await.unwrap();
    let b = probe.options.connect::<Probe>().await.unwrap();
    let me = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
        std::process::id() as i32,
    );
    for _ in 0..2 {
        a.call(Ask::Echo(String::new())).await.unwrap();
    }
    match a.call(Ask::WhoAmI).await.unwrap() {
        Answer::Peer {
            uid,
            gid,
            pid,
            connection,
            served,
        } => {
            assert_eq!((uid, gid, pid), me);
            assert_eq!(connection, a.welcome().await.unwrap().connection_id);
            assert_eq!(served, 3, "this connection's third request");
        }
        other => panic!("{other:?}"),
    }
    match b.call(Ask::WhoAmI).await.unwrap() {
        Answer::Peer {
            served, connection, ..
        } => {
            assert_eq!(served, 1, "state is per connection");
            assert_eq!(connection, b.welcome().await.unwrap().connection_id);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_welcome_names_the_service_and_a_client_of_another_refuses_it() {
    let probe = start().await;
    let client = probe.options.connect::<Probe>().await.unwrap();
    let welcome = client.welcome().await.unwrap();
    assert_eq!(
        (welcome.service.as_str(), welcome.service_version),
        ("probe", 3)
    );
    // Any keyhole client can ping it; a hub client is refused, naming both.
    probe
        .options
        .connect_raw()
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    // The hub client's first request went out with its handshake: it fails
    // with the handshake's verdict.
    let hub = probe.options.connect_hub().await.unwrap();
    let err = hub.status().await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ClientError::WrongService { expected: "hub", ref found, found_version: 3, .. } if found == "probe"),
        "{err:?}"
    );
    assert!(text.contains("probe") && text.contains("hub"), "{text}");
    let hub = probe.options.connect::<Hub>().await.unwrap();
    assert!(matches!(
        hub.welcome().await,
        Err(ClientError::WrongService { .. })
    ));
}

/// A client of a service with the probe's messages but another name (or
/// version): what it pipelines behind its handshake must never be run by
/// the probe, which would decode it as one of its own requests.
struct Impostor<const V: u32>;

impl<const V: u32> Interface for Impostor<V> {
    const NAME: &'static str = if V == 3 { "impostor" } else { "probe" };
    const VERSION: u32 = V;
    type Request = Ask;
    type Reply = Answer;
    type Event = Note;
}

#[tokio::test]
async fn a_request_pipelined_for_another_service_never_reaches_this_one() {
    let probe = start().await;
    for (name, version) in [("impostor", 3), ("probe", 4)] {
        let err = match name {
            "impostor" => {
                let client = probe.options.connect::<Impostor<3>>().await.unwrap();
                client.call(Ask::Echo("run me".into())).await.unwrap_err()
            }
            _ => {
                let client = probe.options.connect::<Impostor<4>>().await.unwrap();
                client.call(Ask::Echo("run me".into())).await.unwrap_err()
            }
        };
        assert!(
            matches!(&err, ClientError::WrongService { expected, expected_version, found, found_version: 3, .. }
                if *expected == name && *expected_version == version && found == "probe"),
            "{err:?}"
        );
    }
    // The probe served its own client, and nothing of the impostors'.
    let client = probe.options.connect::<Probe>().await.unwrap();
    assert_eq!(
        client.call(Ask::Echo("mine".into())).await.unwrap(),
        Answer::Echo("mine".into())
    );
    assert_eq!(probe.service.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_tells_the_service_once_and_every_client_gets_closing() {
    let probe = start().await;
    let client = probe.options.connect::<Probe>().await.unwrap();
    let mut events = client.events().unwrap();
    client.call(Ask::Echo("x".into())).await.unwrap();
    probe.handle.shutdown();
    probe.handle.shutdown();
    match tokio::time::timeout(Duration::from_secs(5), events.next_event())
        .await
        .unwrap()
    {
        Some(Err(ClientError::Closed {
            reason: Some(CloseReason::Shutdown),
        })) => {}
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), probe.stopped)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(probe.service.shutdowns.load(Ordering::SeqCst), 1);
    assert_eq!(probe.service.closed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panicking_handler_fails_its_request_not_the_connection() {
    let probe = start().await;
    let client = probe.options.connect::<Probe>().await.unwrap();
    match client.call(Ask::Panic).await {
        Err(ClientError::Daemon {
            id: Some(1),
            code: TransportCode::Internal,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.call(Ask::Echo("after".into())).await.unwrap(),
        Answer::Echo("after".into())
    );
}

#[tokio::test]
async fn a_service_that_panics_opening_a_connection_loses_that_connection_only() {
    // A new connection is run by the accept task itself at first: a panic
    // there must end that connection, not the accepting.
    let probe = start().await;
    probe.service.panic_in_open.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let client = probe.options.connect::<Probe>().await.unwrap();
        assert!(
            client.call(Ask::Echo("lost".into())).await.is_err(),
            "a connection whose open panicked was served"
        );
    }
    probe.service.panic_in_open.store(false, Ordering::SeqCst);
    let client = tokio::time::timeout(Duration::from_secs(10), async {
        let client = probe.options.connect::<Probe>().await.unwrap();
        client.welcome().await.map(|_| client)
    })
    .await
    .expect("the daemon still accepts within 10 s")
    .expect("the next connection is served");
    assert_eq!(
        client.call(Ask::Echo("after".into())).await.unwrap(),
        Answer::Echo("after".into())
    );
    assert!(!probe.stopped.is_finished(), "the server stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_receives_descriptors_and_sends_them_with_its_reply_and_events() {
    let probe = start().await;
    let client = probe.options.connect::<Probe>().await.unwrap();
    let mut events = client.events().unwrap();
    let (read, write) = rustix::pipe::pipe().unwrap();
    let (answer, fds) = client.call_with_fds(Ask::Fds, vec![write]).await.unwrap();
    assert_eq!(answer, Answer::Got(1));
    // The handler wrote into the descriptor it got, then it was closed.
    assert_eq!(read_all(read.as_fd()), b"hello");
    // The reply came with one descriptor, the event with another.
    assert_eq!(fds.len(), 1);
    assert_eq!(read_all(fds[0].as_fd()), b"reply");
    match events.next_event().await.unwrap().unwrap() {
        Delivery::EventFds { stream, event, fds } => {
            assert_eq!((stream, event), (0, Note::Tick(7)));
            let fd = fds.first().unwrap();
            assert!(
                rustix::io::fcntl_getfd(fd)
                    .unwrap()
                    .contains(rustix::io::FdFlags::CLOEXEC)
            );
            assert_eq!(read_all(fd), b"event");
        }
        other => panic!("{other:?}"),
    }

    // A connection that never sent AcceptFds is never sent a descriptor.
    let plain = probe.options.connect::<Probe>().await.unwrap();
    plain.ping().await.unwrap();
    let event = EncodedEvent::with_fds(
        &Note::Tick(8),
        Descriptors::new(vec![pipe_holding(b"x")]),
        1 << 20,
    )
    .unwrap();
    let connections = probe.service.connections.lock().unwrap().clone();
    let (with, without): (Vec<_>, Vec<_>) = connections.iter().partition(|c| c.accepts_fds());
    assert_eq!((with.len(), without.len()), (1, 1));
    assert!(matches!(
        without[0].push_encoded(&event),
        Err(PushError::DescriptorsNotAccepted)
    ));
}

#[test]
fn the_server_keeps_its_deadlines_on_a_runtime_without_a_time_driver() {
    // The framework arms its deadlines on its own timer thread: a runtime
    // built with I/O only (no `enable_time`, where `tokio::time` panics)
    // serves, times out a silent peer at its deadline and shuts down
    // within its bound.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("probe.sock");
    let token = Arc::new(SessionToken::generate().unwrap());
    let config = ServerConfig {
        auth_timeout: Duration::from_millis(400),
        ..ServerConfig::default()
    };
    let server = Server::new(ProbeService::default(), config, Arc::clone(&token));
    let handle = server.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(&socket).unwrap()
    };
    let serving = std::thread::spawn(move || {
        runtime.block_on(server.run(listener, std::future::pending()));
    });

    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let options = ConnectOptions::new()
        .socket(&socket)
        .token(Arc::clone(&token));
    let client = client_rt.block_on(options.connect::<Probe>()).unwrap();
    let echoed = client_rt.block_on(client.call(Ask::Echo("io only".into())));
    assert_eq!(echoed.unwrap(), Answer::Echo("io only".into()));

    let connected = Instant::now();
    let mut silent = common::RawConn::connect(&socket);
    silent.expect_error_then_close(TransportCode::AuthTimeout);
    let after = connected.elapsed();
    assert!(
        after >= Duration::from_millis(380) && after < Duration::from_secs(3),
        "a silent peer timed out after {after:?}, not at its deadline of 400 ms"
    );

    let asked = Instant::now();
    handle.shutdown();
    serving.join().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    drop(client);
}
