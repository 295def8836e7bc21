//! The connect storm of the security review: 8 attacker processes (role
//! `storm`) against a daemon of its own, each running
//!
//! - holders: a silent connection each, held until the daemon closes it
//!   and made again at once. There are 1.25 times as many as the
//!   connection cap, so the cap is always reached: the excess is refused
//!   `TooManyConnections` in the accept loop and reconnects at once, in a
//!   loop as tight as the daemon's accept allows, while the connections
//!   under the cap wait for, hold and lose the pending slots;
//! - churners: connect and close at once, as fast as they can, to keep the
//!   listen backlog full (a connect that finds it full, `EAGAIN`, is
//!   counted and made again at once).
//!
//! Meanwhile `keyhole ping` (the CLI, a process per run, its default 10 s
//! timeout) runs back to back from two threads: every run must succeed.
//! The daemon's descriptors (entries of `/proc/PID/fd`, sampled every
//! 50 ms) must stay within its cap plus 32.

use std::process::Child;
use std::time::{Duration, Instant};

use super::hostile::{AttackConfig, AttackReport};
use super::observe::{CliPinger, PingStats, ProbeStats, Prober};
use super::{Mode, Sampler, finish_attacker, spawn_attacker, wait_fds};
use crate::common::{DaemonProcess, Launch, cpu_secs};

/// The storm's settings in one mode.
#[derive(Debug, Clone)]
pub struct Storm {
    pub processes: usize,
    /// Per process.
    pub holders: usize,
    /// Per process; they start after half the settle time.
    pub churners: usize,
    /// The daemon's `--max-connections`.
    pub max_connections: usize,
    /// From the attackers' start to the pings'.
    pub settle: Duration,
    /// While the pings run.
    pub duration: Duration,
    pub ping_threads: usize,
}

/// Descriptors the daemon may hold beyond its connection cap: its own
/// (listener, log, epoll, lock...) and the one being refused.
pub const FD_SLACK: usize = 32;

#[derive(Debug, Default)]
pub struct StormReport {
    pub daemon_args: Vec<String>,
    pub max_connections: usize,
    pub attackers: Vec<AttackReport>,
    pub pings: PingStats,
    pub probe: ProbeStats,
    pub fds_idle: usize,
    pub fds_peak: usize,
    pub fds_back: Option<Duration>,
    pub window_secs: f64,
    pub cpu_secs: f64,
    pub shutdown: Option<(Option<i32>, bool)>,
    pub bound: Duration,
    pub harness_errors: Vec<String>,
    /// Holding and connect-and-close tasks, over all the processes.
    pub holders: usize,
    pub churners: usize,
    pub churn_delay: Duration,
    /// Wall time of the whole phase, daemon start to exit.
    pub wall_secs: f64,
}

impl StormReport {
    /// Connect attempts of the attackers that found the backlog full.
    pub fn eagain(&self) -> u64 {
        self.attackers
            .iter()
            .flat_map(|a| &a.groups)
            .filter(|g| g.outcome == "no connection" && g.kind.contains("WouldBlock"))
            .map(|g| g.count)
            .sum()
    }

    pub fn connections(&self) -> u64 {
        self.attackers.iter().map(|a| a.connections).sum()
    }
}

pub fn run(mode: &Mode) -> StormReport {
    let wall = Instant::now();
    let st = &mode.storm;
    let args: Vec<String> = vec![
        "--max-connections".into(),
        st.max_connections.to_string(),
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
    let mut report = StormReport {
        daemon_args: args.clone(),
        max_connections: st.max_connections,
        bound: mode.bound(),
        holders: st.holders * st.processes,
        churners: st.churners * st.processes,
        churn_delay: st.settle / 2,
        ..StormReport::default()
    };
    let pid = daemon.pid();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    std::thread::sleep(Duration::from_millis(200));
    report.fds_idle = daemon.sample().fds;
    let sampler = Sampler::start(pid);
    let prober = match runtime.block_on(Prober::start(
        daemon.options(),
        keyhole::limits::DEFAULT_MAX_PENDING,
        Duration::from_millis(20),
    )) {
        Ok(p) => Some(p),
        Err(e) => {
            report.harness_errors.push(e);
            None
        }
    };
    let attack_start = Instant::now();
    let cfg = |seed: u64| AttackConfig {
        role: "storm".into(),
        socket: daemon.paths.socket.clone(),
        token_file: daemon.paths.token.clone(),
        auth_timeout_ms: mode.auth_timeout.as_millis() as u64,
        max_run_ms: (st.settle + st.duration + Duration::from_secs(60)).as_millis() as u64,
        seed,
        grace_ms: keyhole::limits::DEFAULT_PENDING_GRACE.as_millis() as u64,
        storm_holders: st.holders,
        storm_churners: st.churners,
        storm_churn_delay_ms: (st.settle / 2).as_millis() as u64,
        topic: mode.valid.topic.clone(),
        ..AttackConfig::default()
    };
    let mut attackers: Vec<Child> = (0..st.processes)
        .map(|i| spawn_attacker(&cfg(500 + i as u64)))
        .collect();
    std::thread::sleep(st.settle);
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let pinger = CliPinger::start(
        daemon.paths.dir.clone(),
        st.ping_threads,
        Duration::from_millis(10),
    );
    std::thread::sleep(st.duration);
    report.pings = pinger.finish();
    report.window_secs = t0.elapsed().as_secs_f64();
    report.cpu_secs = cpu_secs(pid).unwrap_or(0.0) - cpu0;
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
