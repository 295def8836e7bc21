//! The binaries' terminal manners, through the real binaries: colour only
//! on a terminal (a pseudo-terminal made here) and never with `NO_COLOR`;
//! shell completions that each shell loads and that complete; man pages
//! with every subcommand and flag; and the small fixes of issue 13 (usage
//! errors before connecting, `ping` like ping(8), plain words, each cause
//! once, `keyholed --version`, the token's sources in the README's order).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DaemonProcess, keyhole_bin, keyholed_bin, wait_for};
use keyhole::token::SessionToken;

const ESC: u8 = 0x1b;

/// A pseudo-terminal: the child gets the slave as stdout and stderr, this
/// process reads everything it writes from the master.
struct Pty {
    slave: File,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    fn new() -> Self {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("a pseudo-terminal");
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(name.to_str().unwrap())
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        let mut master = File::from(master);
        // Reads until every slave descriptor is closed (EIO).
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            slave,
            output,
            reader: Some(reader),
        }
    }

    /// `cmd` with stdout and stderr on this terminal.
    fn attach(&self, cmd: &mut Command) {
        cmd.stdin(Stdio::null())
            .stdout(self.slave.try_clone().unwrap())
            .stderr(self.slave.try_clone().unwrap());
    }

    fn text(&self) -> Vec<u8> {
        self.output.lock().unwrap().clone()
    }

    /// Everything written, once the child (and with it every other copy
    /// of the slave) is gone.
    fn finish(mut self) -> Vec<u8> {
        drop(self.slave);
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.output.lock().unwrap().clone()
    }
}

/// keyholed's log on a terminal, with `no_color` as NO_COLOR (or none):
/// from its start to its clean stop on SIGTERM.
fn daemon_log_on_a_terminal(no_color: Option<&str>) -> Vec<u8> {
    let base = tempfile::tempdir().unwrap();
    let pty = Pty::new();
    let mut cmd = Command::new(keyholed_bin());
    cmd.arg("--dir").arg(base.path().join("run")).arg("-v");
    cmd.env_remove("NO_COLOR").env_remove("RUST_LOG");
    if let Some(value) = no_color {
        cmd.env("NO_COLOR", value);
    }
    pty.attach(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    wait_for(Duration::from_secs(20), "keyholed to listen", || {
        String::from_utf8_lossy(&pty.text()).contains("listening")
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    pty.finish()
}

#[test]
fn the_daemon_log_is_coloured_only_on_a_terminal_and_never_with_no_color() {
    // On a terminal: colour (so the checks below can see it).
    let log = daemon_log_on_a_terminal(None);
    assert!(log.contains(&ESC), "{}", String::from_utf8_lossy(&log));
    // An empty NO_COLOR is no request (no-color.org).
    assert!(daemon_log_on_a_terminal(Some("")).contains(&ESC));
    // NO_COLOR on a terminal: none.
    let log = daemon_log_on_a_terminal(Some("1"));
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("listening") && text.contains("stopped"),
        "{text}"
    );
    assert!(!log.contains(&ESC), "{text}");
    // A file (the tests' daemons log to one), with every level: none.
    let daemon = DaemonProcess::start(&["-vv"]);
    assert!(daemon.cli().arg("ping").output().unwrap().status.success());
    let log = std::fs::read(&daemon.log).unwrap();
    assert!(String::from_utf8_lossy(&log).contains("listening"));
    assert!(!log.contains(&ESC), "{}", String::from_utf8_lossy(&log));
}

#[test]
fn cli_errors_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let on_terminal = |no_color: Option<&str>| {
        let pty = Pty::new();
        let mut cmd = Command::new(keyhole_bin());
        cmd.arg("frobnicate").env_remove("NO_COLOR");
        if let Some(value) = no_color {
            cmd.env("NO_COLOR", value);
        }
        pty.attach(&mut cmd);
        let status = cmd.status().unwrap();
        drop(cmd);
        assert_eq!(status.code(), Some(2));
        pty.finish()
    };
    let coloured = on_terminal(None);
    assert!(
        coloured.contains(&ESC),
        "{}",
        String::from_utf8_lossy(&coloured)
    );
    let plain = on_terminal(Some("1"));
    assert!(String::from_utf8_lossy(&plain).contains("frobnicate"));
    assert!(!plain.contains(&ESC), "{}", String::from_utf8_lossy(&plain));
    // A pipe: none.
    let out = Command::new(keyhole_bin())
        .arg("frobnicate")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!out.stderr.contains(&ESC) && !out.stderr.is_empty());
}

fn completion(shell: &str, dir: &Path) -> std::path::PathBuf {
    let out = Command::new(keyhole_bin())
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.len() > 1000,
        "{shell}: {} bytes",
        out.stdout.len()
    );
    let path = dir.join(format!("keyhole.{shell}"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

fn shell(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err} (.ci/run installs bash, zsh and fish)"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{program} {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn completions_load_in_bash_zsh_and_fish_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let bash = completion("bash", dir.path());
    let bash = bash.to_str().unwrap();
    shell("bash", &["-n", bash]);
    // What bash would offer after `keyhole su` and `keyhole sub --format `.
    let offer = |words: &str, cword: usize| {
        let script = format!(
            "source {bash}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _keyhole keyhole \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        String::from_utf8(shell("bash", &["-c", &script]).stdout).unwrap()
    };
    assert_eq!(offer("keyhole su", 1).trim(), "sub");
    let formats = offer("keyhole sub --format ''", 3);
    assert_eq!(
        formats.split_whitespace().collect::<Vec<_>>(),
        ["line", "raw", "hex", "json"]
    );

    let zsh = completion("zsh", dir.path());
    let zsh = zsh.to_str().unwrap();
    shell("zsh", &["-n", zsh]);
    let script =
        format!("autoload -U compinit; compinit -D -u; source {zsh}; print $_comps[keyhole]");
    assert_eq!(
        String::from_utf8(shell("zsh", &["-f", "-c", &script]).stdout)
            .unwrap()
            .trim(),
        "_keyhole"
    );

    let fish = completion("fish", dir.path());
    let fish = fish.to_str().unwrap();
    shell("fish", &["--no-execute", fish]);
    // Sourcing runs every `complete` line (`--no-execute` only parses).
    let complete = |line: &str| {
        let script = format!("source {fish}; complete -C '{line}'");
        String::from_utf8(shell("fish", &["--no-config", "-c", &script]).stdout).unwrap()
    };
    assert!(complete("keyhole su").starts_with("sub\t"));
    let formats: Vec<String> = complete("keyhole sub --format ")
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert_eq!(formats, ["hex", "json", "line", "raw"]);
}

/// The subcommands `--help` lists, read from its "Commands:" section.
fn subcommands() -> Vec<String> {
    let out = Command::new(keyhole_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let mut names = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line == "Commands:" {
            inside = true;
        } else if inside && line.is_empty() {
            break;
        } else if inside {
            let name = line.split_whitespace().next().unwrap().to_string();
            if name != "help" {
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{help}");
    names
}

/// The long flags `--help` of `binary` (and `args`) lists.
fn long_flags(binary: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect()
}

/// roff escapes each `-` of a flag as `\-`.
fn roff(flag: &str) -> String {
    flag.replace('-', "\\-")
}

#[test]
fn man_pages_have_every_subcommand_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(keyhole_bin())
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main = std::fs::read_to_string(dir.path().join("keyhole.1")).unwrap();
    assert!(main.contains(".TH keyhole 1"), "{main}");
    assert!(main.contains(".SH SUBCOMMANDS"));
    for sub in subcommands() {
        assert!(
            main.contains(&format!("keyhole\\-{}(1)", roff(&sub))),
            "{sub} in keyhole.1"
        );
        let page = std::fs::read_to_string(dir.path().join(format!("keyhole-{sub}.1")))
            .unwrap_or_else(|err| panic!("keyhole-{sub}.1: {err}"));
        assert!(page.contains(&format!(".TH keyhole-{sub} 1")), "{page}");
        for flag in long_flags(keyhole_bin(), &[&sub]) {
            if flag != "--help" {
                assert!(page.contains(&roff(&flag)), "{flag} in keyhole-{sub}.1");
            }
        }
    }
    // Without --out-dir: keyhole.1 on stdout.
    let out = Command::new(keyhole_bin()).arg("man").output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), main);

    let out = Command::new(keyholed_bin()).arg("--man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH keyholed 1"), "{page}");
    assert!(page.contains("Exit codes"), "{page}");
    let flags = long_flags(keyholed_bin(), &[]);
    assert!(flags.len() > 10, "{flags:?}");
    for flag in flags {
        assert!(page.contains(&roff(&flag)), "{flag} in keyholed.1");
    }
}

#[test]
fn keyholed_version_names_keyholed() {
    for (binary, name) in [(keyholed_bin(), "keyholed"), (keyhole_bin(), "keyhole")] {
        let out = Command::new(binary).arg("--version").output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{name} {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors_naming_the_value_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: an attempt to connect would exit 3.
    let socket = dir.path().join("nobody.sock");
    let cases: &[(&[&str], &str)] = &[
        (&["--timeout", "0", "ping"], "'0'"),
        (&["--timeout", "nan", "ping"], "'nan'"),
        (&["--timeout", "-1", "ping"], "'-1'"),
        (&["--timeout", "inf", "ping"], "'inf'"),
        (&["--timeout", "1e300", "ping"], "'1e300'"),
        (&["--timeout", "soon", "status"], "'soon'"),
        (&["ping", "-c", "0"], "'0'"),
        (&["ping", "-i", "-0.5"], "'-0.5'"),
        (&["sub", "-c", "0", "a"], "'0'"),
        (&["reply", "-c", "0", "a", "--", "true"], "'0'"),
        (&["pub", "a..b", "x"], "'a..b'"),
        (&["pub", "news.*", "x"], "'news.*'"),
        (&["sub", "ok", "a.>.b"], "'a.>.b'"),
        (&["sub", ""], "''"),
        (&["req", "svc.>", "x"], "'svc.>'"),
        (&["reply", "svc..x", "--", "true"], "'svc..x'"),
    ];
    for (args, value) in cases {
        let out = Command::new(keyhole_bin())
            .env_clear()
            .env("KEYHOLE_SOCKET", &socket)
            .env("KEYHOLE_TOKEN", "00".repeat(32))
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(value), "{args:?}: {stderr}");
        assert!(!stderr.contains("daemon not running"), "{args:?}: {stderr}");
    }
    // The hub's own reason is given.
    let out = Command::new(keyhole_bin())
        .args(["pub", "a..b", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty token"));
}

/// Pongs read from `stdout` until `n`, then SIGINT; the exit and stdout.
fn interrupt_after(mut child: std::process::Child, n: usize) -> (Option<i32>, String) {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    let mut pongs = 0;
    while pongs < n {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "stdout ended: {text}"
        );
        pongs += usize::from(line.starts_with("pong from"));
        text.push_str(&line);
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    stdout.read_to_string(&mut text).unwrap();
    (child.wait().unwrap().code(), text)
}

#[test]
fn ctrl_c_during_ping_prints_the_summary_like_ping() {
    let daemon = DaemonProcess::start(&[]);
    let child = daemon
        .cli()
        .args(["ping", "-c", "100000", "-i", "0.01"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let (code, text) = interrupt_after(child, 3);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    let header = format!("--- {} ping statistics ---", daemon.paths.socket.display());
    let summary: Vec<&str> = text.lines().skip_while(|l| *l != header).collect();
    assert_eq!(summary.len(), 3, "{text}");
    let pongs = text.lines().filter(|l| l.starts_with("pong from")).count();
    let counts: Vec<u64> = summary[1]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .take(2)
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(summary[1].contains("pings transmitted"), "{text}");
    // Every pong printed is counted; one more may have been on its way.
    assert_eq!(counts[1], pongs as u64, "{text}");
    assert!(
        counts[0] == counts[1] || counts[0] == counts[1] + 1,
        "{text}"
    );
    assert!(summary[2].starts_with("rtt min/avg/max/mdev = "), "{text}");

    // With --json: one document at the end, that says it was interrupted.
    let child = daemon
        .cli()
        .args(["ping", "-c", "100000", "-i", "0.01", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its connection is up (so its SIGINT handler is): the daemon counts
    // it beside the status command's own.
    wait_for(Duration::from_secs(20), "ping to connect", || {
        let out = daemon.cli().args(["status", "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|doc| doc["authenticated"].as_u64() >= Some(2))
    });
    std::thread::sleep(Duration::from_millis(100));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["interrupted"], true);
    let received = doc["received"].as_u64().unwrap();
    assert!(received < 100000, "{doc}");
    // Like ping(8): 0 if a pong came back, 1 if none did.
    assert_eq!(
        out.status.code(),
        Some(if received > 0 { 0 } else { 1 }),
        "{doc}"
    );
    assert_eq!(doc["times_ms"].as_array().unwrap().len() as u64, received);
}

/// A socket that accepts and never says anything.
fn silent_listener(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept() {
            held.push(conn);
        }
    })
}

#[test]
fn a_daemon_that_never_answers_is_a_timeout_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    let _listener = silent_listener(&socket);
    let started = Instant::now();
    let out = Command::new(keyhole_bin())
        .env_clear()
        .env("KEYHOLE_SOCKET", &socket)
        .env("KEYHOLE_TOKEN", "00".repeat(32))
        .args(["--timeout", "0.5", "ping"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        stderr.contains("timed out") && stderr.contains("handshake"),
        "{stderr}"
    );
    // No protocol message names: no Welcome, no frame.
    assert!(
        !stderr.contains("Welcome") && !stderr.contains("frame"),
        "{stderr}"
    );
}

/// Each `: `-separated part of each line once (a cause is never repeated).
fn assert_each_cause_once(stderr: &str) {
    for line in stderr.lines() {
        let mut seen = std::collections::BTreeSet::new();
        for part in line.split(": ") {
            assert!(seen.insert(part), "`{part}` twice in {line}");
        }
        assert!(!line.contains("Caused by"), "{line}");
    }
}

#[test]
fn errors_about_missing_paths_print_each_cause_once() {
    let daemon = DaemonProcess::start(&[]);
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--socket", "/nonexistent/x", "ping"],
            3,
            "daemon not running",
        ),
        (
            &["--socket", "/nonexistent/x", "status", "--json"],
            3,
            "daemon not running",
        ),
        (&["--token-file", "/nope", "ping"], 4, "/nope"),
        (&["--token-file", "/nope", "token"], 4, "/nope"),
        (
            &["--token-file", "/nope", "bench", "ping", "-n", "1"],
            4,
            "/nope",
        ),
        (
            &["--socket", "/nonexistent/x", "bench", "ping", "-n", "1"],
            3,
            "daemon not running",
        ),
    ];
    for (args, code, what) in cases {
        let out = daemon.cli().args(*args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(what), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert_each_cause_once(&stderr);
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    // The daemon's own errors.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    for args in [
        vec!["--dir".to_string(), file.join("run").display().to_string()],
        vec![
            "--dir".to_string(),
            dir.path().join("run").display().to_string(),
            "--lock-file".to_string(),
            file.join("lock").display().to_string(),
        ],
    ] {
        let out = Command::new(keyholed_bin())
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("keyholed: "), "{stderr}");
        assert_each_cause_once(&last);
    }
}

/// The order the README gives: `--token-file`, then `KEYHOLE_TOKEN`, then
/// `KEYHOLE_TOKEN_FILE`, then the runtime directory's `session-token`.
#[test]
fn the_token_comes_from_the_first_source_set_in_the_readme_order() {
    let daemon = DaemonProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let right = daemon.paths.token.clone();
    let wrong_hex = SessionToken::generate().unwrap().to_hex().to_string();
    let wrong = dir.path().join("wrong-token");
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&wrong)
            .unwrap();
        writeln!(f, "{wrong_hex}").unwrap();
    }
    let right_hex = daemon.token().to_hex().to_string();
    let ping = |flag: Option<&Path>, env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = daemon.cli();
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(file) = flag {
            cmd.arg("--token-file").arg(file);
        }
        cmd.arg("ping").output().unwrap().status.code()
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let (w, r) = (os(&wrong_hex), os(&right_hex));
    // 1. --token-file beats KEYHOLE_TOKEN and KEYHOLE_TOKEN_FILE.
    assert_eq!(
        ping(
            Some(&right),
            &[
                ("KEYHOLE_TOKEN", &w),
                ("KEYHOLE_TOKEN_FILE", wrong.as_os_str())
            ]
        ),
        Some(0)
    );
    assert_eq!(ping(Some(&wrong), &[("KEYHOLE_TOKEN", &r)]), Some(5));
    // 2. KEYHOLE_TOKEN beats KEYHOLE_TOKEN_FILE and the directory's file.
    assert_eq!(
        ping(
            None,
            &[
                ("KEYHOLE_TOKEN", &r),
                ("KEYHOLE_TOKEN_FILE", wrong.as_os_str())
            ]
        ),
        Some(0)
    );
    assert_eq!(ping(None, &[("KEYHOLE_TOKEN", &w)]), Some(5));
    // 3. KEYHOLE_TOKEN_FILE beats the directory's file.
    assert_eq!(
        ping(None, &[("KEYHOLE_TOKEN_FILE", wrong.as_os_str())]),
        Some(5)
    );
    // An empty variable counts as unset.
    assert_eq!(
        ping(
            None,
            &[("KEYHOLE_TOKEN", &os("")), ("KEYHOLE_TOKEN_FILE", &os(""))]
        ),
        Some(0)
    );
    // 4. KEYHOLE_DIR's session-token.
    assert_eq!(ping(None, &[]), Some(0));
}

#[test]
fn a_closed_stdout_is_no_panic() {
    let daemon = DaemonProcess::start(&[]);
    for args in [
        &["token"][..],
        &["completions", "bash"],
        &["man"],
        &["ping", "-c", "2"],
        &["status", "--json"],
        &["bench", "ping", "-n", "10", "-c", "1"],
    ] {
        // A socket whose other end is gone: every write is EPIPE.
        let (stdout, gone) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(gone);
        let out = daemon
            .cli()
            .args(args)
            .stdout(std::os::fd::OwnedFd::from(stdout))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
    }
}
