//! The slot floods of the security review: silent pending connections from
//! many peer processes, fewer pending slots than connections, and real
//! clients that must still get in.
//!
//! - **Many-process flood**: N attacker processes (this binary,
//!   `--attacker`, role `one_silent`), each holding one silent pending
//!   connection and reconnecting as soon as the daemon closes it. Per-process
//!   fairness cannot tell them from N real users.
//! - **fd-passing flood**: one attacker process (role `fd_pass`) holding N
//!   silent connections, each made by a short-lived child process that
//!   passed it back with `SCM_RIGHTS` and exited: N sources for the daemon,
//!   one live process, pids of dead processes.
//!
//! Each runs against a daemon of its own with fewer pending slots than N
//! (`--max-pending P`; the grace, 0.2 s, and the connection cap are the
//! defaults). Once the flood is up, real clients, each process one user
//! (see [`super::real`]), connect one after the other, wait D in
//! {0, 20, 50} ms before their handshake, and must get in; `keyhole ping`
//! runs alongside. The daemon's CPU time is read from `/proc/PID/stat`
//! over the same window.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::hostile::{AttackConfig, AttackReport};
use super::observe::{CliPinger, PingStats, ProbeStats, Prober};
use super::real::{RealConfig, RealReport};
use super::{Mode, Sampler, finish_attacker, spawn_attacker, wait_fds};
use crate::common::{DaemonProcess, Launch, cpu_secs};

/// D, the real clients' wait between connect and handshake, ms.
pub const DELAYS_MS: [u64; 3] = [0, 20, 50];

/// The daemon's default grace (`--pending-grace`), which these floods run
/// against.
pub const GRACE: Duration = keyhole::limits::DEFAULT_PENDING_GRACE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    ManyProcess,
    FdPassing,
}

impl Variant {
    pub fn title(self) -> &'static str {
        match self {
            Variant::ManyProcess => "many-process flood",
            Variant::FdPassing => "fd-passing flood",
        }
    }
}

/// The floods' settings in one mode.
#[derive(Debug, Clone)]
pub struct SlotFlood {
    /// N: attacker processes (many-process), or connections held
    /// (fd-passing).
    pub attackers: usize,
    /// P: the daemon's `--max-pending`.
    pub max_pending: usize,
    /// From the attackers' start to the measurement's.
    pub settle: Duration,
    /// The measurement: real clients, CLI pings, daemon CPU.
    pub duration: Duration,
    /// Real-client processes per value of D.
    pub procs_per_delay: usize,
    /// fd-passing: children spawned at once.
    pub fd_spawners: usize,
}

/// One flood's figures.
#[derive(Debug, Default)]
pub struct FloodReport {
    pub variant: Option<Variant>,
    pub daemon_args: Vec<String>,
    pub attackers_wanted: usize,
    pub max_pending: usize,
    pub max_connections: usize,
    pub attackers: Vec<AttackReport>,
    pub clients: Vec<RealReport>,
    pub cli: PingStats,
    pub probe: ProbeStats,
    /// How long the flood took to fill the slots and queue (the prober's
    /// `pending` at N), if it did within the settle time.
    pub filled_in: Option<Duration>,
    pub window_secs: f64,
    pub cpu_secs: f64,
    pub fds_idle: usize,
    pub fds_peak: usize,
    pub fds_back: Option<Duration>,
    pub shutdown: Option<(Option<i32>, bool)>,
    pub bound: Duration,
    pub harness_errors: Vec<String>,
    /// Wall time of the whole phase, daemon start to exit.
    pub wall_secs: f64,
}

impl FloodReport {
    pub fn title(&self) -> &'static str {
        self.variant.map_or("flood", Variant::title)
    }

    pub fn cpu_per_sec(&self) -> f64 {
        self.cpu_secs / self.window_secs.max(0.001)
    }

    /// Distinct peer processes of the flood's connections: the attacker
    /// processes that made connections, or the fd-passing children.
    pub fn sources(&self) -> u64 {
        match self.variant {
            Some(Variant::FdPassing) => self.attackers.iter().map(|a| a.distinct_pids).sum(),
            _ => self.attackers.iter().filter(|a| a.connections > 0).count() as u64,
        }
    }
}

fn spawn_real(cfg: &RealConfig) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .arg("--real-client")
        .arg(serde_json::to_string(cfg).expect("json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn real client")
}

fn finish_real(mut child: Child, deadline: Instant) -> Result<RealReport, String> {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("real-client process did not finish in time; killed".into());
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    serde_json::from_str(out.trim())
        .map_err(|e| format!("real-client report unreadable: {e}: {out:?}"))
}

/// Runs one flood on a daemon of its own.
pub fn run(mode: &Mode, variant: Variant) -> FloodReport {
    let wall = Instant::now();
    let sf = &mode.slot_flood;
    let args: Vec<String> = vec![
        "--max-pending".into(),
        sf.max_pending.to_string(),
        "--auth-timeout".into(),
        format!("{}", mode.auth_timeout.as_secs_f64()),
    ];
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = DaemonProcess::start_with(
        &arg_refs,
        Launch {
            rust_log: "keyhole=info,keyholed=info".into(),
            ..Launch::default()
        },
    );
    let mut report = FloodReport {
        variant: Some(variant),
        daemon_args: args.clone(),
        attackers_wanted: sf.attackers,
        max_pending: sf.max_pending,
        max_connections: keyhole::limits::DEFAULT_MAX_CONNECTIONS,
        bound: mode.bound(),
        ..FloodReport::default()
    };
    let pid = daemon.pid();
    let socket = daemon.paths.socket.clone();
    let token_file = daemon.paths.token.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The readiness probe may still be closing.
    std::thread::sleep(Duration::from_millis(200));
    report.fds_idle = daemon.sample().fds;
    let sampler = Sampler::start(pid);
    let prober = runtime.block_on(Prober::start(
        daemon.options(),
        sf.max_pending,
        Duration::from_millis(10),
    ));
    let prober = match prober {
        Ok(p) => Some(p),
        Err(e) => {
            report.harness_errors.push(e);
            None
        }
    };

    let attack_start = Instant::now();
    let max_run = sf.settle + sf.duration + Duration::from_secs(60);
    let cfg = |role: &str, seed: u64| AttackConfig {
        role: role.into(),
        socket: socket.clone(),
        token_file: token_file.clone(),
        auth_timeout_ms: mode.auth_timeout.as_millis() as u64,
        max_run_ms: max_run.as_millis() as u64,
        seed,
        grace_ms: GRACE.as_millis() as u64,
        fd_connections: sf.attackers,
        fd_spawners: sf.fd_spawners,
        topic: mode.valid.topic.clone(),
        ..AttackConfig::default()
    };
    let attackers: Vec<Child> = match variant {
        Variant::ManyProcess => (0..sf.attackers)
            .map(|i| spawn_attacker(&cfg("one_silent", 100 + i as u64)))
            .collect(),
        Variant::FdPassing => vec![spawn_attacker(&cfg("fd_pass", 99))],
    };
    // Settle: every attacker connected, the slots full and the queue long.
    // The prober's samples say when `pending` reached 90% of N.
    let want = (sf.attackers as u64 * 9).div_ceil(10);
    let filled = super::observe::wait_until(sf.settle, || {
        prober.as_ref().is_some_and(|p| p.last_pending() >= want)
    });
    if filled {
        report.filled_in = Some(attack_start.elapsed());
    }
    let rest = sf.settle.saturating_sub(attack_start.elapsed());
    std::thread::sleep(rest);

    // The measurement.
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let mut clients = Vec::new();
    for &d in &DELAYS_MS {
        for _ in 0..sf.procs_per_delay {
            clients.push(spawn_real(&RealConfig {
                socket: socket.clone(),
                token_file: token_file.clone(),
                delay_ms: d,
                // With D = 0, every other client is the library itself.
                library_every: if d == 0 { 2 } else { 0 },
                gap_ms: 20,
                max_run_ms: max_run.as_millis() as u64,
            }));
        }
    }
    let pinger = CliPinger::start(daemon.paths.dir.clone(), 1, Duration::from_millis(20));
    std::thread::sleep(sf.duration);
    // Stop starting clients; those in flight finish (at most 10 s each).
    for child in &mut clients {
        drop(child.stdin.take());
    }
    report.cli = pinger.finish();
    let deadline = Instant::now() + Duration::from_secs(15);
    for child in clients {
        match finish_real(child, deadline) {
            Ok(r) => report.clients.push(r),
            Err(e) => report.harness_errors.push(e),
        }
    }
    report.window_secs = t0.elapsed().as_secs_f64();
    report.cpu_secs = cpu_secs(pid).unwrap_or(0.0) - cpu0;

    // Stop the flood: its connections in flight are closed by the
    // attackers; the daemon must release them all.
    let mut attackers = attackers;
    for child in &mut attackers {
        drop(child.stdin.take());
    }
    let deadline = Instant::now() + mode.bound() + Duration::from_secs(20);
    for child in attackers {
        match finish_attacker(child, deadline) {
            Ok(r) => report.attackers.push(r),
            Err(e) => report.harness_errors.push(e),
        }
    }
    if let Some(prober) = prober {
        report.probe = runtime.block_on(prober.finish());
        report.harness_errors.extend(report.probe.errors.clone());
    }
    drop(runtime);
    report.fds_back = wait_fds(pid, report.fds_idle, mode.bound() + Duration::from_secs(5));
    report.fds_peak = sampler.peak_fds(attack_start, Instant::now());
    drop(sampler);
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    report.shutdown = Some((
        status.code(),
        !daemon.paths.socket.exists() && !daemon.paths.token.exists(),
    ));
    report.wall_secs = wall.elapsed().as_secs_f64();
    report
}
