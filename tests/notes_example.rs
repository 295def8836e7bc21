//! `examples/notes.rs` end to end, as processes: a notes daemon, two
//! watchers that must both see every note a third client adds, a raw
//! unauthenticated socket that must receive no event byte meanwhile, the
//! keyhole CLI pointed at the notes daemon, and a clean SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The example's binary, built if `cargo test` has not built it yet.
fn notes_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/notes_example-<hash> -> target/<profile>/examples/notes
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("examples").join("notes");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "notes"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build --example notes");
        assert!(status.success());
    }
    bin
}

fn notes(dir: &Path) -> Command {
    let mut cmd = Command::new(notes_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KEYHOLE_DIR", dir);
    cmd
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run")
}

/// Starts `notes watch -c 3` and waits until it is connected.
fn watcher(dir: &Path) -> Child {
    let mut child = notes(dir)
        .args(["watch", "-c", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("watch's first line");
    assert_eq!(line.trim(), "watching notes", "{line}");
    child
}

#[test]
fn two_watchers_see_every_note_and_an_unauthenticated_socket_sees_nothing() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("run");
    let log = std::fs::File::create(base.path().join("serve.log")).unwrap();
    let mut daemon = notes(&dir)
        .arg("serve")
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn serve");
    let socket = dir.join("keyhole.sock");
    let token = dir.join("session-token");
    wait_for(Duration::from_secs(20), "the notes daemon", || {
        token.exists() && UnixStream::connect(&socket).is_ok()
    });

    // Held open, never authenticated.
    let mut raw = UnixStream::connect(&socket).unwrap();
    let watchers = [watcher(&dir), watcher(&dir)];
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let out = run(notes(&dir).args(["add", text]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (i + 1).to_string()
        );
    }
    let expected = "1\tone\n2\ttwo\n3\tthree\n";
    for watcher in watchers {
        let out = watcher.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }
    let out = run(notes(&dir).arg("list"));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    // A typed error reaches the client.
    let out = run(notes(&dir).args(["add", ""]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a note cannot be empty"));

    // The unauthenticated socket received no event: nothing at all so far,
    // and once its handshake deadline passes, exactly one Error frame.
    raw.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        matches!(raw.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "an unauthenticated socket received bytes"
    );
    raw.set_nonblocking(false).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut rest = Vec::new();
    raw.read_to_end(&mut rest).unwrap();
    assert!(rest.len() >= 9, "{rest:?}");
    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    assert_eq!(rest.len(), 4 + len, "more than one frame: {rest:?}");
    assert_eq!(&rest[4..8], &4u32.to_le_bytes(), "not an Error frame");
    assert_eq!(rest[8], 0, "an Error with an id");

    // The keyhole CLI: ping works with any keyhole daemon; the hub's
    // commands name the service they found.
    let keyhole = |args: &[&str]| {
        run(Command::new(env!("CARGO_BIN_EXE_keyhole"))
            .env_clear()
            .env("KEYHOLE_DIR", &dir)
            .args(args))
    };
    let out = keyhole(&["ping"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong from notes"));
    let out = keyhole(&["pub", "topic", "hello"]);
    assert_eq!(out.status.code(), Some(8));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("notes") && stderr.contains("hub"),
        "{stderr}"
    );

    // SIGTERM: drains, exits 0, removes the socket and the token.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket left behind");
    assert!(!token.exists(), "token left behind");
}
