//! Serving another user, for real: the test creates users and a group
//! (`useradd`, `groupadd`; removed again when it ends), starts keyholed with
//! `--socket-group` and `--allow-uid`, and runs the real `keyhole` binary as
//! those users (`setpriv --reuid`). An allowed user pings and publishes; a
//! user of the group who is not allowed is refused by the daemon even with
//! the token; a user outside the group cannot reach the socket at all.
//!
//! Needs root (creating users, giving a file to another uid). Run as
//! another user it fails, saying so: the whole suite runs as root, as CI
//! does.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{DaemonProcess, keyhole_bin, keyholed_bin};
use keyhole::paths::RuntimePaths;

fn require_root() {
    let uid = rustix::process::geteuid().as_raw();
    assert_eq!(
        uid, 0,
        "tests/other_users.rs creates users and runs clients as them, so it must run as root (uid {uid} here); the full suite runs as root, as CI does"
    );
}

/// useradd, groupadd, userdel and groupdel lock /etc/passwd and /etc/group
/// and fail when another of them holds the lock: the tests of this file,
/// run in parallel, take turns.
static ACCOUNTS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs an account command (one at a time; see [`ACCOUNTS_LOCK`]).
fn account(cmd: &mut Command) -> Output {
    let _turn = ACCOUNTS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    run(cmd)
}

/// [`account`] for a clean-up step whose failure is not the test's.
fn account_quiet(cmd: &mut Command) {
    let _turn = ACCOUNTS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let _ = cmd.output();
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn id(flag: &str, name: &str) -> u32 {
    let out = run(Command::new("id").arg(flag).arg(name));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number from id")
}

/// Users and groups made for one test, deleted on drop (even when the test
/// fails).
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn new() -> Self {
        require_root();
        Self {
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// A group; returns its gid.
    fn group(&mut self, name: &str) -> u32 {
        account_quiet(Command::new("groupdel").arg(name));
        account(Command::new("groupadd").arg("--system").arg(name));
        self.groups.push(name.to_owned());
        let out = run(Command::new("getent").args(["group", name]));
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .nth(2)
            .and_then(|gid| gid.trim().parse().ok())
            .expect("gid from getent")
    }

    /// A system user (no home, no login shell) in `groups`; returns its uid.
    fn user(&mut self, name: &str, groups: &[&str]) -> u32 {
        account_quiet(Command::new("userdel").arg(name));
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.arg("--groups").arg(groups.join(","));
        }
        account(cmd.arg(name));
        self.users.push(name.to_owned());
        id("-u", name)
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            account_quiet(Command::new("userdel").arg(user));
        }
        for group in &self.groups {
            account_quiet(Command::new("groupdel").arg(group));
        }
    }
}

/// A name unique to this test run (user names are at most 32 characters).
fn name(tag: &str) -> String {
    format!("kh{tag}{}", std::process::id())
}

/// A temp dir everyone may traverse (the runtime directories go inside),
/// with a copy of the `keyhole` binary everyone may run.
struct Base {
    dir: tempfile::TempDir,
    keyhole: PathBuf,
}

impl Base {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755");
        let keyhole = dir.path().join("keyhole");
        std::fs::copy(keyhole_bin(), &keyhole).expect("copy keyhole");
        std::fs::set_permissions(&keyhole, std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755");
        Self { dir, keyhole }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The real `keyhole ARGS` run as `user`, with exactly `env`.
    fn keyhole_as(&self, user: &str, args: &[&str], env: &[(&str, String)]) -> Output {
        self.run_as(user, &self.keyhole, args, env)
    }

    fn run_as(&self, user: &str, program: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .arg("--init-groups")
            .arg("--")
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(self.path())
            .stdin(Stdio::null());
        for (key, value) in env {
            cmd.env(key, value);
        }
        cmd.output().expect("run setpriv")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

/// A daemon run as root serves another user: the socket and the directory
/// go to the group, the allowed user gets a token file of its own, pings
/// and publishes with the real CLI; a member of the group who is not
/// allowed is refused by the daemon (even holding the token), and a user
/// outside the group cannot reach the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_daemon_serves_an_allowed_user_of_its_socket_group_and_no_one_else() {
    let mut accounts = Accounts::new();
    let group = name("g");
    let gid = accounts.group(&group);
    let allowed = name("ok");
    let allowed_uid = accounts.user(&allowed, &[&group]);
    let denied = name("no");
    let denied_uid = accounts.user(&denied, &[&group]);
    let outsider = name("out");
    accounts.user(&outsider, &[]);

    let base = Base::new();
    let paths = RuntimePaths::in_dir(base.path().join("run"));
    let allowed_uid_text = allowed_uid.to_string();
    let mut daemon = DaemonProcess::start_in(
        tempfile::tempdir().expect("log dir"),
        paths.clone(),
        &["--socket-group", &group, "--allow-uid", &allowed_uid_text],
    );

    // The layout: each mode bit is the README's.
    assert_eq!(mode(&paths.dir), (0o710, 0, gid), "runtime directory");
    assert_eq!(mode(&paths.socket), (0o660, 0, gid), "socket");
    assert_eq!(mode(&paths.token).0, 0o600, "the daemon's token file");
    assert_eq!(mode(&paths.token).1, 0);
    let uid_token = PathBuf::from(format!("{}.{allowed_uid}", paths.token.display()));
    assert_eq!(
        (mode(&uid_token).0, mode(&uid_token).1),
        (0o600, allowed_uid),
        "the allowed user's token file"
    );
    assert!(
        !PathBuf::from(format!("{}.{denied_uid}", paths.token.display())).exists(),
        "a token file for a uid that is not allowed"
    );
    assert_eq!(
        std::fs::read(&uid_token).expect("read"),
        std::fs::read(&paths.token).expect("read"),
        "the allowed user's file holds the session token"
    );

    let allowed_env = vec![
        ("KEYHOLE_DIR", paths.dir.display().to_string()),
        ("KEYHOLE_TOKEN_FILE", uid_token.display().to_string()),
        ("KEYHOLE_DAEMON_UID", "0".to_string()),
    ];

    // The allowed user pings with the real CLI.
    let out = base.keyhole_as(&allowed, &["ping"], &allowed_env);
    assert!(
        out.status.success(),
        "ping as the allowed user: {}\n{}",
        text(&out.stderr),
        daemon.log_text()
    );
    assert!(
        text(&out.stdout).starts_with("pong from hub"),
        "{}",
        text(&out.stdout)
    );

    // ... and publishes to a subscriber of the daemon's own uid.
    let owner = daemon.client().await;
    let mut sub = owner.subscribe("shared.news").await.expect("subscribe");
    let out = base.keyhole_as(
        &allowed,
        &["pub", "shared.news", "hello from another user"],
        &allowed_env,
    );
    assert!(out.status.success(), "pub: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim_end(), "published to 1 subscription");
    let event = tokio::time::timeout(Duration::from_secs(10), sub.next_event())
        .await
        .expect("the event within 10 s")
        .expect("subscription open")
        .expect("event");
    assert_eq!(&event.payload[..], b"hello from another user");

    // Without KEYHOLE_DAEMON_UID the client will not send the token to a
    // daemon of another uid.
    let out = base.keyhole_as(&allowed, &["ping"], &allowed_env[..2]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("uid 0"), "{}", text(&out.stderr));

    // The allowed user can read neither the daemon's token file nor the
    // directory's listing.
    let mut own_token_env = allowed_env.clone();
    own_token_env[1].1 = paths.token.display().to_string();
    let out = base.keyhole_as(&allowed, &["ping"], &own_token_env);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    let out = base.run_as(
        &allowed,
        Path::new("/bin/ls"),
        &[&paths.dir.display().to_string()],
        &[],
    );
    assert!(
        !out.status.success(),
        "the allowed user listed the directory"
    );

    // A member of the group who is not allowed: refused by the daemon, even
    // with the token in hand.
    let token_hex = std::fs::read_to_string(&paths.token).expect("token");
    let denied_env = vec![
        ("KEYHOLE_DIR", paths.dir.display().to_string()),
        ("KEYHOLE_TOKEN", token_hex.trim().to_string()),
        ("KEYHOLE_DAEMON_UID", "0".to_string()),
    ];
    let out = base.keyhole_as(&denied, &["ping"], &denied_env);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("uid {denied_uid} may not use this daemon")),
        "{}",
        text(&out.stderr)
    );
    let out = base.keyhole_as(&denied, &["pub", "shared.news", "sneaky"], &denied_env);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // A user outside the group cannot even reach the socket.
    let out = base.keyhole_as(&outsider, &["ping"], &denied_env);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ermission denied"),
        "{}",
        text(&out.stderr)
    );

    // Nothing but the allowed user's publish reached the subscriber.
    owner
        .publish("shared.news", &b"end"[..])
        .await
        .expect("publish");
    let event = tokio::time::timeout(Duration::from_secs(10), sub.next_event())
        .await
        .expect("the event within 10 s")
        .expect("subscription open")
        .expect("event");
    assert_eq!(&event.payload[..], b"end");

    // At shutdown the per-uid token file goes too.
    drop(sub);
    drop(owner);
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.log_text());
    assert!(
        !uid_token.exists(),
        "the allowed user's token file was left"
    );
    assert!(!paths.token.exists());
}

/// A daemon run by an ordinary user (a member of the group) serves another
/// user: it cannot give a file to another uid, says so, and the other user
/// gets the token the documented way, `KEYHOLE_TOKEN` from `keyhole token`
/// run by the daemon's user.
#[test]
fn a_user_daemon_serves_an_allowed_user_who_is_handed_the_token() {
    let mut accounts = Accounts::new();
    let group = name("h");
    accounts.group(&group);
    let owner = name("own");
    let owner_uid = accounts.user(&owner, &[&group]);
    let allowed = name("ok2");
    let allowed_uid = accounts.user(&allowed, &[&group]);

    let base = Base::new();
    // The owner's own directory, where its daemon makes the runtime directory.
    let home = base.path().join("owner");
    std::fs::create_dir(&home).expect("mkdir");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    rustix::fs::chown(
        &home,
        Some(rustix::fs::Uid::from_raw(owner_uid)),
        Some(rustix::fs::Gid::from_raw(id("-g", &owner))),
    )
    .expect("chown");
    let dir = home.join("run");
    let keyholed = base.path().join("keyholed");
    std::fs::copy(keyholed_bin(), &keyholed).expect("copy keyholed");
    std::fs::set_permissions(&keyholed, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let log_path = base.path().join("keyholed.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = Killed(
        Command::new("setpriv")
            .arg(format!("--reuid={owner}"))
            .arg(format!("--regid={owner}"))
            .arg("--init-groups")
            .arg("--")
            .arg(&keyholed)
            .arg("--dir")
            .arg(&dir)
            .args(["--socket-group", &group])
            .args(["--allow-uid", &allowed_uid.to_string()])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("RUST_LOG", "keyhole=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start keyholed as the owner"),
    );
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_text().contains("listening") {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!("keyholed exited with {status}: {}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "keyholed did not start: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        log_text().contains(&format!(
            "no token file for uid {allowed_uid}: giving {}/session-token.{allowed_uid} to another uid takes root (CAP_CHOWN); hand that user the token in KEYHOLE_TOKEN instead",
            dir.display()
        )),
        "{}",
        log_text()
    );
    assert_eq!(mode(&dir).0, 0o710);
    assert_eq!(mode(&dir.join("keyhole.sock")).0, 0o660);

    // The recipe: the owner prints the token, the allowed user takes it in
    // KEYHOLE_TOKEN.
    let out = base.keyhole_as(
        &owner,
        &["token"],
        &[("KEYHOLE_DIR", dir.display().to_string())],
    );
    assert!(out.status.success(), "keyhole token: {}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(token.len(), 64, "{token:?}");
    let env = [
        (
            "KEYHOLE_SOCKET",
            dir.join("keyhole.sock").display().to_string(),
        ),
        ("KEYHOLE_TOKEN", token),
        ("KEYHOLE_DAEMON_UID", owner_uid.to_string()),
    ];
    let out = base.keyhole_as(&allowed, &["ping"], &env);
    assert!(
        out.status.success(),
        "ping: {}\n{}",
        text(&out.stderr),
        log_text()
    );
    let out = base.keyhole_as(&allowed, &["pub", "x.y", "hi"], &env);
    assert!(out.status.success(), "pub: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim_end(), "published to 0 subscriptions");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.0.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let status = daemon.0.wait().expect("wait");
    assert!(status.success(), "{}", log_text());
}

/// A child killed (SIGKILL) and reaped on drop if it is still running, so
/// that a failed assertion leaves no daemon behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn without_root_this_file_fails_loudly() {
    // What the other tests assert first, checked on its own so that a
    // non-root run reports one clear reason.
    require_root();
}

/// `keyhole --help` names the variable a client of another uid needs, and
/// `keyholed --help` the flags that serve one.
#[test]
fn the_help_says_how_to_reach_a_daemon_of_another_uid() {
    let out = Command::new(keyhole_bin())
        .arg("--help")
        .output()
        .expect("keyhole --help");
    let help = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("KEYHOLE_DAEMON_UID: the uid the daemon must run as when it is not yours"),
        "{help}"
    );
    let out = Command::new(keyholed_bin())
        .arg("--help")
        .output()
        .expect("keyholed --help");
    let help = text(&out.stdout);
    for flag in ["--allow-uid <UID>", "--socket-group <GROUP>"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
}
