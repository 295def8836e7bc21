//! What the harness watches from outside the attack: the daemon's own
//! figures through `Status` ([`Prober`]), and the `keyhole` CLI as a user
//! runs it ([`CliPinger`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyhole::client::ConnectOptions;
use tokio::sync::watch;

/// What [`Prober`] saw.
#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    pub samples: u64,
    pub peak_pending: u64,
    pub peak_authenticated: u64,
    /// The `pending` figure that counts as saturated (the pending slots).
    pub threshold: u64,
    /// Samples with `pending >= threshold`.
    pub saturated: u64,
    pub errors: Vec<String>,
}

impl ProbeStats {
    pub fn saturated_share(&self) -> f64 {
        self.saturated as f64 / self.samples.max(1) as f64
    }
}

/// A client authenticated before the attack starts that asks `Status`
/// every `every` until finished: the daemon's own count of pending
/// connections (holding a slot or waiting for one) all through the attack.
pub struct Prober {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<ProbeStats>,
    last: Arc<AtomicU64>,
}

impl Prober {
    /// Connects (inside a runtime) and starts asking.
    pub async fn start(
        options: ConnectOptions,
        threshold: usize,
        every: Duration,
    ) -> Result<Self, String> {
        let client = options
            .connect_hub()
            .await
            .map_err(|e| format!("prober: connect: {e}"))?;
        let (stop, mut stopped) = watch::channel(false);
        let last = Arc::new(AtomicU64::new(0));
        let shared = Arc::clone(&last);
        let task = tokio::spawn(async move {
            let mut stats = ProbeStats {
                threshold: threshold as u64,
                ..ProbeStats::default()
            };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                match tokio::time::timeout(Duration::from_secs(10), client.status()).await {
                    Ok(Ok(status)) => {
                        shared.store(status.pending, Ordering::Relaxed);
                        stats.samples += 1;
                        stats.peak_pending = stats.peak_pending.max(status.pending);
                        stats.peak_authenticated =
                            stats.peak_authenticated.max(status.authenticated);
                        if status.pending >= stats.threshold {
                            stats.saturated += 1;
                        }
                    }
                    Ok(Err(e)) => {
                        stats.errors.push(format!("prober: Status: {e}"));
                        break;
                    }
                    Err(_) => {
                        stats
                            .errors
                            .push("prober: Status not answered in 10 s".into());
                        break;
                    }
                }
            }
            stats
        });
        Ok(Self { stop, task, last })
    }

    /// The `pending` figure of the last answer.
    pub fn last_pending(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Stops asking; the connection is closed.
    pub async fn finish(self) -> ProbeStats {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_else(|e| ProbeStats {
            errors: vec![format!("prober task: {e}")],
            ..ProbeStats::default()
        })
    }
}

/// `keyhole ping` runs: how many, how many succeeded, how long each took.
#[derive(Debug, Clone, Default)]
pub struct PingStats {
    pub attempted: u64,
    pub ok: u64,
    pub ms: Vec<u32>,
    pub failure_samples: Vec<String>,
}

impl PingStats {
    pub fn merge(&mut self, other: &PingStats) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        self.ms.extend(&other.ms);
        for f in &other.failure_samples {
            if self.failure_samples.len() < 10 {
                self.failure_samples.push(f.clone());
            }
        }
    }
}

/// Threads that run `keyhole ping` (with its default timeout, 10 s) one
/// after the other until stopped, each run a process of its own.
pub struct CliPinger {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<PingStats>>,
}

impl CliPinger {
    /// `dir`: the daemon's runtime directory (`KEYHOLE_DIR`); `gap`: the
    /// pause between two runs of a thread.
    pub fn start(dir: PathBuf, threads: usize, gap: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (stop, dir) = (Arc::clone(&stop), dir.clone());
                std::thread::spawn(move || {
                    let mut stats = PingStats::default();
                    while !stop.load(Ordering::Relaxed) {
                        ping_once(&dir, &mut stats);
                        std::thread::sleep(gap);
                    }
                    stats
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Lets the runs in flight finish; their figures.
    pub fn finish(self) -> PingStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = PingStats::default();
        for t in self.threads {
            if let Ok(stats) = t.join() {
                all.merge(&stats);
            }
        }
        all
    }
}

/// Longer than any `keyhole ping` may take (its 10 s timeout, and the
/// start of the process): a run still going then is killed and failed.
const PING_KILL_AFTER: Duration = Duration::from_secs(15);

fn ping_once(dir: &PathBuf, stats: &mut PingStats) {
    stats.attempted += 1;
    let start = Instant::now();
    let child = Command::new(crate::common::keyhole_bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KEYHOLE_DIR", dir)
        .arg("ping")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            fail(stats, format!("spawn keyhole: {e}"));
            return;
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() < PING_KILL_AFTER => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = child.wait_with_output();
    let (stdout, stderr) = match &output {
        Ok(o) => (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(_) => (String::new(), String::new()),
    };
    match status {
        Some(status) if status.success() && stdout.starts_with("pong from") => {
            stats.ok += 1;
            stats.ms.push(start.elapsed().as_millis() as u32);
        }
        Some(status) => fail(
            stats,
            format!(
                "keyhole ping: {status} after {:.2} s: {}",
                start.elapsed().as_secs_f64(),
                stderr.trim()
            ),
        ),
        None => fail(
            stats,
            format!("keyhole ping still running after {PING_KILL_AFTER:?}: killed"),
        ),
    }
}

fn fail(stats: &mut PingStats, what: String) {
    if stats.failure_samples.len() < 10 {
        stats.failure_samples.push(what);
    }
}

/// Shared by the phases: the figures of a set of attacker processes merged
/// by (kind, outcome), for the tables.
pub fn merge_groups(reports: &[super::hostile::AttackReport]) -> Vec<super::hostile::Group> {
    let mut merged: Vec<super::hostile::Group> = Vec::new();
    let mut p50s: Vec<Vec<f64>> = Vec::new();
    for r in reports {
        for g in &r.groups {
            let at = match merged
                .iter()
                .position(|m| m.kind == g.kind && m.outcome == g.outcome)
            {
                Some(at) => at,
                None => {
                    merged.push(super::hostile::Group {
                        count: 0,
                        close_ms: None,
                        over_bound: 0,
                        ..g.clone()
                    });
                    p50s.push(Vec::new());
                    merged.len() - 1
                }
            };
            let m = &mut merged[at];
            m.count += g.count;
            m.over_bound += g.over_bound;
            m.expected &= g.expected;
            if let Some(s) = g.close_ms {
                p50s[at].push(s.p50);
                m.close_ms = Some(match m.close_ms {
                    None => s,
                    Some(old) => super::hostile::Spread {
                        p50: old.p50,
                        p99: old.p99.max(s.p99),
                        max: old.max.max(s.max),
                    },
                });
            }
        }
    }
    // p50: the median of the processes' medians; p99: the worst process's.
    for (m, mut p) in merged.iter_mut().zip(p50s) {
        if let Some(s) = m.close_ms.as_mut() {
            p.sort_by(|a, b| a.total_cmp(b));
            s.p50 = p[p.len() / 2];
        }
    }
    merged
}

/// Polls `cond` every 20 ms for at most `limit`; whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
