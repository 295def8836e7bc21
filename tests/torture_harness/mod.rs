//! The torture harness: a real `keyholed` on a temp-dir socket, valid
//! clients whose every operation is verified, and attacker processes, run
//! twice in one invocation: first the valid workload alone (the baseline),
//! then the same workload under attack. It reports what the valid clients
//! got, how the daemon closed every hostile connection and how fast, and
//! the daemon's memory, descriptors and CPU time from `/proc`.
//!
//! - [`wire`]: raw async connections, verdicts, self-checking payloads.
//! - [`valid`]: the valid clients.
//! - [`rpc`]: the valid clients' request/reply traffic (responders,
//!   requesters, a responder killed mid-run, a third party forging
//!   answers), every reply checked to have reached exactly its requester.
//! - [`hostile`]: the attacker processes (this same binary, `--attacker`).
//! - [`report`]: the figures, the targets and the table.
//! - [`observe`]: the daemon's `Status` all through an attack, and
//!   `keyhole ping` runs.
//!
//! After the main run, three more attacks, each on a daemon of its own:
//!
//! - [`floods`]: the many-process flood (N attacker processes, one silent
//!   pending connection each, over fewer pending slots) and the fd-passing
//!   flood (one process holding N connections made by dead children, see
//!   [`fdpass`]), with delayed real clients ([`real`]) that must get in;
//! - [`storm`]: a connect storm against the connection cap and the listen
//!   backlog while `keyhole ping` runs.
//!
//! Quick mode (the default, run by `cargo test`) and full mode
//! (`cargo test --release --test torture -- --full`) differ only in
//! duration, auth timeout, sizes and rates; the checks are the same, except
//! that quick mode reports latency-like figures (the latency ratio, the
//! share of real clients that got in through a flood, the daemon's CPU)
//! without enforcing them (a debug build on a shared CI machine is no place
//! to measure them). Every correctness check is enforced in both.

pub mod fdpass;
pub mod fdspray;
pub mod floods;
pub mod hostile;
pub mod observe;
pub mod real;
pub mod report;
pub mod rpc;
pub mod storm;
pub mod valid;
pub mod wire;

use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{DaemonProcess, Launch, ProcSample};
use hostile::{AttackConfig, AttackReport};
use report::{Check, Report};
use valid::ValidConfig;

/// One mode's settings.
#[derive(Debug, Clone)]
pub struct Mode {
    pub name: &'static str,
    pub command: &'static str,
    /// Length of each phase (baseline, then attack).
    pub duration: Duration,
    /// Unmeasured run of the valid workload before the baseline.
    pub warmup: Duration,
    pub auth_timeout: Duration,
    pub max_pending: usize,
    pub outbound_queue_bytes: usize,
    pub max_frame_len: usize,
    pub valid: ValidConfig,
    pub flood_connections: usize,
    pub flood_rate: f64,
    pub short_rate: f64,
    pub short_inflight: usize,
    pub dribblers: usize,
    pub silent: usize,
    pub never_readers: usize,
    pub never_reader_life: Duration,
    /// Hostile connections the run must reach.
    pub min_hostile: u64,
    /// Whether the latency-like targets are enforced (full mode) or only
    /// reported.
    pub enforce_latency: bool,
    /// The many-process and fd-passing floods.
    pub slot_flood: floods::SlotFlood,
    /// The connect storm.
    pub storm: storm::Storm,
}

fn valid_workload() -> ValidConfig {
    ValidConfig {
        rr_clients: 4,
        rr_interval: Duration::from_millis(10),
        raw_clients: 2,
        raw_interval: Duration::from_millis(50),
        raw_batch: 8,
        publishers: 4,
        publish_interval: Duration::from_millis(20),
        subscribers: 4,
        churn_interval: Duration::from_millis(100),
        topic: "torture.valid".into(),
        rpc: rpc::RpcConfig {
            name: "torture.rpc".into(),
            responders: 3,
            serial: 2,
            serial_interval: Duration::from_millis(20),
            windowed: 1,
            raw: 1,
            window_interval: Duration::from_millis(100),
            kill: true,
            kill_hold: Duration::from_millis(500),
            forgers: 1,
            forge_interval: Duration::from_millis(50),
            forge_batch: 16,
        },
    }
}

impl Mode {
    pub fn quick() -> Self {
        Self {
            name: "quick",
            command: "cargo test --test torture",
            duration: Duration::from_secs(8),
            warmup: Duration::from_secs(1),
            auth_timeout: Duration::from_secs(2),
            max_pending: 64,
            outbound_queue_bytes: 1024 * 1024,
            max_frame_len: 256 * 1024,
            valid: valid_workload(),
            flood_connections: 96,
            flood_rate: 100.0,
            short_rate: 150.0,
            short_inflight: 16,
            dribblers: 4,
            silent: 4,
            never_readers: 2,
            never_reader_life: Duration::from_secs(6),
            min_hostile: 500,
            enforce_latency: false,
            slot_flood: floods::SlotFlood {
                attackers: 64,
                max_pending: 16,
                settle: Duration::from_secs(1),
                duration: Duration::from_secs(3),
                procs_per_delay: 2,
                fd_spawners: 4,
            },
            storm: storm::Storm {
                processes: 8,
                holders: 80,
                churners: 2,
                max_connections: 512,
                settle: Duration::from_secs(1),
                duration: Duration::from_secs(3),
                ping_threads: 2,
            },
        }
    }

    pub fn full() -> Self {
        Self {
            name: "full",
            command: "cargo test --release --test torture -- --full",
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(5),
            max_pending: 64,
            outbound_queue_bytes: 1024 * 1024,
            max_frame_len: 256 * 1024,
            valid: valid_workload(),
            flood_connections: 96,
            flood_rate: 200.0,
            short_rate: 1000.0,
            short_inflight: 64,
            dribblers: 8,
            silent: 8,
            never_readers: 4,
            never_reader_life: Duration::from_secs(10),
            min_hostile: 1000,
            enforce_latency: true,
            slot_flood: floods::SlotFlood {
                attackers: 256,
                max_pending: 64,
                settle: Duration::from_secs(2),
                duration: Duration::from_secs(20),
                procs_per_delay: 3,
                fd_spawners: 8,
            },
            storm: storm::Storm {
                processes: 8,
                holders: 640,
                churners: 4,
                max_connections: keyhole::limits::DEFAULT_MAX_CONNECTIONS,
                settle: Duration::from_secs(2),
                duration: Duration::from_secs(20),
                ping_threads: 2,
            },
        }
    }

    fn daemon_args(&self) -> Vec<String> {
        vec![
            "--auth-timeout".into(),
            format!("{}", self.auth_timeout.as_secs_f64()),
            "--max-pending".into(),
            self.max_pending.to_string(),
            "--outbound-queue-bytes".into(),
            self.outbound_queue_bytes.to_string(),
            "--max-frame-len".into(),
            self.max_frame_len.to_string(),
        ]
    }

    /// The workload and the attack, in words, for the report.
    pub fn describe(&self) -> String {
        let v = &self.valid;
        let per_s = |d: Duration| 1.0 / d.as_secs_f64();
        format!(
            "Valid clients (both phases): {} request/response clients at {:.0} requests/s each; \
             {} publishers at {:.0} publishes/s each to {} subscribers (payloads 28 B to 32 KiB); \
             {} raw pipelining clients at {:.0} batches/s of {} requests; \
             1 client connecting afresh {:.0} times/s; \
             request/reply on {:?} (payloads 28 B to 32 KiB, each reply echoing its request): {} responders, \
             {} requesters one request at a time at {:.0}/s each, {} library and {} raw (pipelined) requesters \
             sending {} at once {:.0} times/s each, {}, and {} third party subscribed to \">\" \
             answering {} tokens {:.0} times/s (the live ones, as far as it can tell, and random ones) with Respond and Fail. \
             Attack (separate processes): a flood of {} silent connections from one process (reconnecting at up to {:.0}/s) \
             over {} pending slots; {:.0} short-lived hostile connections/s (at most {} at once) \
             cycling through the kinds in the table; {} handshake dribblers and {} silent connections; \
             {} subscribers that never read, for {:.0} s each.",
            v.rr_clients,
            per_s(v.rr_interval),
            v.publishers,
            per_s(v.publish_interval),
            v.subscribers,
            v.raw_clients,
            per_s(v.raw_interval),
            v.raw_batch,
            per_s(v.churn_interval),
            v.rpc.name,
            v.rpc.responders + usize::from(v.rpc.kill),
            v.rpc.serial,
            per_s(v.rpc.serial_interval),
            v.rpc.windowed,
            v.rpc.raw,
            rpc::WINDOW,
            per_s(v.rpc.window_interval),
            if v.rpc.kill {
                format!(
                    "one more responder (a raw connection) that stops answering halfway through each phase, holds what arrives for {:.1} s, then closes its end",
                    v.rpc.kill_hold.as_secs_f64()
                )
            } else {
                "no responder killed".into()
            },
            v.rpc.forgers,
            v.rpc.forge_batch + 2,
            per_s(v.rpc.forge_interval),
            self.flood_connections,
            self.flood_rate,
            self.max_pending,
            self.short_rate,
            self.short_inflight,
            self.dribblers,
            self.silent,
            self.never_readers,
            self.never_reader_life.as_secs_f64(),
        )
    }

    /// The close bound: auth timeout + 1 s.
    pub fn bound(&self) -> Duration {
        self.auth_timeout + Duration::from_secs(1)
    }
}

/// The binary's entry: the harness, or an attacker process (`--attacker`).
/// Accepts libtest's usual arguments, so `cargo test` with or without a
/// filter behaves as for any other test binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--attacker") {
        return hostile::main(args.get(i + 1).map(String::as_str).unwrap_or("{}"));
    }
    if let Some(i) = args.iter().position(|a| a == "--real-client") {
        return real::main(args.get(i + 1).map(String::as_str).unwrap_or("{}"));
    }
    if let Some(i) = args.iter().position(|a| a == "--fd-child") {
        return fdpass::child_main(args.get(i + 1).map(String::as_str).unwrap_or(""));
    }
    let full = args.iter().any(|a| a == "--full");
    let name = if full {
        "torture_full"
    } else {
        "torture_quick"
    };
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--list" => {
                println!("{name}: test");
                return ExitCode::SUCCESS;
            }
            "--ignored" => {
                println!("running 0 tests (torture has no ignored test)");
                return ExitCode::SUCCESS;
            }
            "--skip" => skips.extend(it.next().cloned()),
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            filter => filters.push(filter.to_string()),
        }
    }
    let exact = args.iter().any(|a| a == "--exact");
    let selected = (filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                f == name
            } else {
                name.contains(f.as_str())
            }
        }))
        && !skips.iter().any(|s| name.contains(s.as_str()));
    if !selected {
        println!("running 0 tests (filtered out: {name})");
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return ExitCode::SUCCESS;
    }
    let mode = if full { Mode::full() } else { Mode::quick() };
    println!(
        "running {name}: {} s baseline + {} s under attack, then the many-process flood, the fd-passing flood and the connect storm",
        mode.duration.as_secs(),
        mode.duration.as_secs()
    );
    let report = run(&mode);
    print!("{}", report.table());
    if report.passed() {
        println!("\ntest {name} ... ok");
        println!("\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        ExitCode::SUCCESS
    } else {
        println!("\ntest {name} ... FAILED");
        println!(
            "\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
        );
        ExitCode::FAILURE
    }
}

/// Samples the daemon's `/proc` figures every 50 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, ProcSample)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(s) = ProcSample::read(pid) {
                        samples.lock().unwrap().push((Instant::now(), s));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn peak_fds(&self, from: Instant, to: Instant) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, s)| s.fds)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_attacker(cfg: &AttackConfig) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .arg("--attacker")
        .arg(serde_json::to_string(cfg).expect("json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn attacker")
}

fn finish_attacker(mut child: Child, deadline: Instant) -> Result<AttackReport, String> {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("attacker did not finish in time; killed".into());
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    serde_json::from_str(out.trim())
        .map_err(|e| format!("attacker report unreadable: {e}: {out:?}"))
}

/// Polls until the daemon's descriptors are back to `baseline`.
fn wait_fds(pid: i32, baseline: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ProcSample::read(pid).is_some_and(|s| s.fds <= baseline) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Runs the baseline and the attack on one daemon and gathers the figures.
pub fn run(mode: &Mode) -> Report {
    wire::self_check();
    rpc::self_check();
    let wall = Instant::now();
    let args = mode.daemon_args();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = DaemonProcess::start_with(
        &arg_refs,
        Launch {
            // Production logging: per-connection debug lines are not free.
            rust_log: "keyhole=info,keyholed=info".into(),
            ..Launch::default()
        },
    );
    let pid = daemon.pid();
    let socket = daemon.paths.socket.clone();
    let token_file = daemon.paths.token.clone();
    let sampler = Sampler::start(pid);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The daemon's readiness probe may still be closing.
    std::thread::sleep(Duration::from_millis(200));
    let start = daemon.sample();
    let mut report = Report::new(mode, args.clone());
    report.rss_start_kib = start.rss_kib;
    report.fds_idle = start.fds;

    // Warm-up (not measured): first connections, allocator, caches.
    // The warm-up is too short for the killed responder's hold and what
    // must follow it: it runs without.
    let mut warmup_config = mode.valid.clone();
    warmup_config.rpc.kill = false;
    let warmup = runtime.block_on(valid::run(
        &warmup_config,
        socket.clone(),
        token_file.clone(),
        mode.warmup,
    ));
    if !warmup.all_verified() {
        report
            .harness_errors
            .push(format!("warm-up failed: {:?}", warmup.failure_samples));
    }
    wait_fds(pid, start.fds, Duration::from_secs(5));

    // Phase 1: the valid workload alone.
    let cpu0 = daemon.sample().cpu_secs;
    report.baseline = runtime.block_on(valid::run(
        &mode.valid,
        socket.clone(),
        token_file.clone(),
        mode.duration,
    ));
    report.cpu_baseline = daemon.sample().cpu_secs - cpu0;
    report.baseline_fds_back = wait_fds(pid, start.fds, Duration::from_secs(5));
    let before_attack = daemon.sample();
    report.rss_after_baseline_kib = before_attack.rss_kib;

    // Phase 2: the same workload under attack.
    let attack = |role: &str, seed: u64| AttackConfig {
        role: role.into(),
        socket: socket.clone(),
        token_file: token_file.clone(),
        auth_timeout_ms: mode.auth_timeout.as_millis() as u64,
        max_run_ms: (mode.duration + Duration::from_secs(30)).as_millis() as u64,
        seed,
        flood_connections: mode.flood_connections,
        flood_rate: mode.flood_rate,
        short_rate: mode.short_rate,
        short_inflight: mode.short_inflight,
        dribblers: mode.dribblers,
        silent: mode.silent,
        never_readers: mode.never_readers,
        never_reader_life_ms: mode.never_reader_life.as_millis() as u64,
        topic: mode.valid.topic.clone(),
        grace_ms: floods::GRACE.as_millis() as u64,
        ..AttackConfig::default()
    };
    // The daemon's count of pending connections from before the flood's
    // first burst until the valid clients start (whose `Status` calls
    // watch it from then on): not during the measured phase, so that its
    // calls do not weigh on the latency under attack.
    let prober = match runtime.block_on(observe::Prober::start(
        daemon.options(),
        mode.max_pending,
        Duration::from_millis(10),
    )) {
        Ok(p) => Some(p),
        Err(e) => {
            report.harness_errors.push(e);
            None
        }
    };
    let mut attackers = vec![
        spawn_attacker(&attack("flood", 1)),
        spawn_attacker(&attack("mixed", 2)),
    ];
    // Let the flood take every pending slot before the clients arrive.
    std::thread::sleep(Duration::from_secs(1));
    if let Some(prober) = prober {
        report.probe = runtime.block_on(prober.finish());
        report.harness_errors.extend(report.probe.errors.clone());
    }
    let attack_start = Instant::now();
    let cpu1 = daemon.sample().cpu_secs;
    report.attack = runtime.block_on(valid::run(
        &mode.valid,
        socket.clone(),
        token_file.clone(),
        mode.duration,
    ));
    // Stop the attack: attackers start nothing more and let what is in
    // flight end (the daemon must close it within the bound).
    for child in &mut attackers {
        drop(child.stdin.take());
    }
    let attack_end = Instant::now();
    report.cpu_attack = daemon.sample().cpu_secs - cpu1;
    report.attack_secs = (attack_end - attack_start).as_secs_f64();
    report.fds_back = wait_fds(pid, start.fds, mode.bound() + Duration::from_secs(10));
    report.fds_peak = sampler.peak_fds(attack_start, Instant::now());
    let deadline = Instant::now() + mode.bound() + Duration::from_secs(20);
    for child in attackers {
        match finish_attacker(child, deadline) {
            Ok(r) => report.attackers.push(r),
            Err(e) => report.harness_errors.push(e),
        }
    }
    drop(runtime);
    // Settle, then the end figures.
    wait_fds(pid, start.fds, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let end = daemon.sample();
    report.rss_end_kib = end.rss_kib;
    report.hwm_kib = end.hwm_kib;
    report.fds_end = end.fds;
    drop(sampler);

    // The daemon must still shut down cleanly.
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    report.shutdown = Some((
        status.code(),
        !daemon.paths.socket.exists() && !daemon.paths.token.exists(),
    ));
    let log = daemon.log_text();
    drop(daemon);

    // The three attacks of the security review, each on a daemon of its own.
    report
        .floods
        .push(floods::run(mode, floods::Variant::ManyProcess));
    report
        .floods
        .push(floods::run(mode, floods::Variant::FdPassing));
    report.storm = Some(storm::run(mode));

    report.wall_secs = wall.elapsed().as_secs_f64();
    report.evaluate(mode);
    if !report.passed() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        report.daemon_log_tail = tail.into_iter().rev().map(String::from).collect();
    }
    report
}

/// A check line for the table: `figure` is what was measured.
pub fn check(target: &str, figure: String, pass: bool, enforced: bool) -> Check {
    Check {
        target: target.into(),
        figure,
        pass,
        enforced,
    }
}
