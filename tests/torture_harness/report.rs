//! The figures of a run, the targets they are checked against, and the
//! table (Markdown, so that it can be pasted as is).

use std::fmt::Write as _;
use std::time::Duration;

use super::Mode;
use super::check;
use super::hostile::{AttackReport, Spread};
use super::valid::{Metric, ValidResult};

/// One target and how the run did against it.
#[derive(Debug, Clone)]
pub struct Check {
    pub target: String,
    pub figure: String,
    pub pass: bool,
    /// A failed check that is not enforced is reported but does not fail
    /// the run.
    pub enforced: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub mode: String,
    pub command: String,
    pub daemon_args: Vec<String>,
    /// What ran, in words.
    pub workload: String,
    pub phase_secs: f64,
    pub attack_secs: f64,
    pub bound: Duration,
    pub baseline: ValidResult,
    pub attack: ValidResult,
    pub attackers: Vec<AttackReport>,
    pub harness_errors: Vec<String>,
    pub rss_start_kib: u64,
    pub rss_after_baseline_kib: u64,
    pub rss_end_kib: u64,
    pub hwm_kib: u64,
    pub fds_idle: usize,
    pub fds_peak: usize,
    pub fds_end: usize,
    pub baseline_fds_back: Option<Duration>,
    pub fds_back: Option<Duration>,
    pub cpu_baseline: f64,
    pub cpu_attack: f64,
    /// (exit code, socket and token removed) after SIGTERM.
    pub shutdown: Option<(Option<i32>, bool)>,
    pub wall_secs: f64,
    pub checks: Vec<Check>,
    pub daemon_log_tail: Vec<String>,
}

fn spread(m: &Metric) -> Option<Spread> {
    Spread::of(&mut m.lat_us.clone())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    pub fn new(mode: &Mode, daemon_args: Vec<String>) -> Self {
        Self {
            mode: mode.name.into(),
            command: mode.command.into(),
            daemon_args,
            workload: mode.describe(),
            phase_secs: mode.duration.as_secs_f64(),
            bound: mode.bound(),
            ..Self::default()
        }
    }

    pub fn hostile_connections(&self) -> u64 {
        self.attackers.iter().map(|a| a.connections).sum()
    }

    fn violations(&self) -> u64 {
        self.attackers.iter().map(|a| a.violations).sum()
    }

    fn over_bound(&self) -> u64 {
        self.attackers
            .iter()
            .flat_map(|a| &a.groups)
            .map(|g| g.over_bound)
            .sum()
    }

    fn slowest_close_ms(&self) -> f64 {
        self.attackers
            .iter()
            .flat_map(|a| &a.groups)
            .filter_map(|g| g.close_ms.map(|s| s.max))
            .fold(0.0, f64::max)
    }

    /// (name, baseline, attack) for every latency measured.
    fn latencies(&self) -> Vec<(&'static str, Option<Spread>, Option<Spread>)> {
        self.baseline
            .metrics()
            .iter()
            .zip(self.attack.metrics().iter())
            .map(|((name, b), (_, a))| (*name, spread(b), spread(a)))
            .collect()
    }

    /// Checks every target; sets `checks`.
    pub fn evaluate(&mut self, mode: &Mode) {
        let mut checks = Vec::new();
        for (phase, r) in [("baseline", &self.baseline), ("under attack", &self.attack)] {
            let (ok, total) = r
                .metrics()
                .iter()
                .fold((0, 0), |(o, t), (_, m)| (o + m.verified, t + m.attempted));
            checks.push(check(
                &format!("100% of valid operations verified ({phase})"),
                format!("{ok} of {total}, {} failures", r.failures),
                r.all_verified() && total > 0,
                true,
            ));
        }
        let n = self.hostile_connections();
        checks.push(check(
            &format!("at least {} hostile connections", mode.min_hostile),
            n.to_string(),
            n >= mode.min_hostile,
            true,
        ));
        checks.push(check(
            &format!(
                "{} pending at once (the pre-auth cap, flooded)",
                mode.max_pending
            ),
            format!(
                "peak pending seen by Status: {} (never above the cap)",
                self.attack.peak_pending
            ),
            self.attack.peak_pending == mode.max_pending as u64,
            true,
        ));
        checks.push(check(
            &format!(
                "every hostile connection answered as specified and closed within {:.0} s of its last byte",
                self.bound.as_secs_f64()
            ),
            format!(
                "{} violations, {} over the bound; slowest close {:.0} ms",
                self.violations(),
                self.over_bound(),
                self.slowest_close_ms()
            ),
            self.violations() == 0 && self.over_bound() == 0 && self.harness_errors.is_empty(),
            true,
        ));
        checks.push(check(
            &format!(
                "descriptors back to baseline within {:.0} s of the attack's end",
                self.bound.as_secs_f64()
            ),
            match self.fds_back {
                Some(d) => format!("{} fds after {:.2} s", self.fds_idle, d.as_secs_f64()),
                None => format!("not back: {} fds, baseline {}", self.fds_end, self.fds_idle),
            },
            self.fds_back.is_some_and(|d| d <= self.bound) && self.baseline_fds_back.is_some(),
            true,
        ));
        let growth = self.rss_end_kib as i64 - self.rss_start_kib as i64;
        checks.push(check(
            "daemon RSS growth over the run <= 16 MiB",
            format!("{:+.1} MiB", growth as f64 / 1024.0),
            growth <= 16 * 1024,
            true,
        ));
        let worst = self
            .latencies()
            .iter()
            .filter_map(|(name, b, a)| Some((*name, a.as_ref()?.p99 / b.as_ref()?.p99.max(0.001))))
            .fold(("-", 0.0), |w, x| if x.1 > w.1 { x } else { w });
        checks.push(check(
            "valid-client p99 latency under attack <= 2x unattacked",
            format!("worst {:.2}x ({})", worst.1, worst.0),
            worst.1 <= 2.0,
            mode.enforce_latency,
        ));
        checks.push(check(
            "clean shutdown (SIGTERM) after the run",
            match self.shutdown {
                Some((code, removed)) => format!(
                    "exit {}, socket and token {}",
                    code.map_or("by signal".into(), |c| c.to_string()),
                    if removed { "removed" } else { "LEFT BEHIND" }
                ),
                None => "not reached".into(),
            },
            self.shutdown == Some((Some(0), true)),
            true,
        ));
        self.checks = checks;
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass || !c.enforced)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "\n## keyhole torture, {} mode\n", self.mode);
        let _ = writeln!(
            w,
            "`{}` · keyholed `{}` · {} CPUs · {:.0} s baseline, then {:.1} s under attack · wall time {:.1} s\n",
            self.command,
            self.daemon_args.join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.phase_secs,
            self.attack_secs,
            self.wall_secs
        );
        let _ = writeln!(w, "{}\n", self.workload);
        let _ = writeln!(w, "### Valid operations\n");
        let _ = writeln!(
            w,
            "| operation | baseline: verified / attempted | under attack: verified / attempted |"
        );
        let _ = writeln!(w, "|---|---:|---:|");
        for ((name, b), (_, a)) in self
            .baseline
            .metrics()
            .iter()
            .zip(self.attack.metrics().iter())
        {
            let _ = writeln!(
                w,
                "| {name} | {} / {} | {} / {} |",
                b.verified, b.attempted, a.verified, a.attempted
            );
        }
        for (phase, r) in [("baseline", &self.baseline), ("attack", &self.attack)] {
            for f in &r.failure_samples {
                let _ = writeln!(w, "\n- FAILURE ({phase}): {f}");
            }
        }
        let _ = writeln!(
            w,
            "\n### Valid-client latency, ms (under attack / baseline)\n"
        );
        let _ = writeln!(
            w,
            "| operation | baseline p50 | baseline p99 | attack p50 | attack p99 | p50 ratio | p99 ratio |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|");
        for (name, b, a) in self.latencies() {
            let f = |s: &Option<Spread>, p99: bool| {
                s.map_or("-".to_string(), |s| {
                    format!("{:.2}", if p99 { s.p99 } else { s.p50 })
                })
            };
            let ratio = |p99: bool| match (b, a) {
                (Some(b), Some(a)) => {
                    let (x, y) = if p99 { (a.p99, b.p99) } else { (a.p50, b.p50) };
                    format!("{:.2}x", x / y.max(0.001))
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                w,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                f(&b, false),
                f(&b, true),
                f(&a, false),
                f(&a, true),
                ratio(false),
                ratio(true)
            );
        }
        let _ = writeln!(
            w,
            "\n### Hostile connections: {} ({})\n",
            self.hostile_connections(),
            self.attackers
                .iter()
                .map(|a| format!(
                    "{} process: {}, at most {} open at once",
                    a.role, a.connections, a.peak_open
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            w,
            "Peak pending seen by `Status`: {}. Close time: from the peer's last byte (or its connect, if it sent none) to the daemon's close; bound {:.0} s.\n",
            self.attack.peak_pending,
            self.bound.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "| attack | daemon's answer | count | close p50 ms | close p99 ms | close max ms |"
        );
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|");
        for a in &self.attackers {
            for g in &a.groups {
                let s = |f: fn(&Spread) -> f64| {
                    g.close_ms
                        .as_ref()
                        .map_or("-".into(), |s| format!("{:.0}", f(s)))
                };
                let mark = if g.expected { "" } else { " **(unexpected)**" };
                let _ = writeln!(
                    w,
                    "| {} | {}{mark} | {} | {} | {} | {} |",
                    g.kind,
                    g.outcome,
                    g.count,
                    s(|s| s.p50),
                    s(|s| s.p99),
                    s(|s| s.max)
                );
            }
            for v in &a.violation_samples {
                let _ = writeln!(w, "\n- VIOLATION ({}): {v}", a.role);
            }
        }
        for e in &self.harness_errors {
            let _ = writeln!(w, "\n- HARNESS: {e}");
        }
        let _ = writeln!(w, "\n### Daemon\n");
        let _ = writeln!(w, "| figure | value |");
        let _ = writeln!(w, "|---|---|");
        let _ = writeln!(
            w,
            "| RSS at start / after baseline / at end | {} / {} / {} |",
            mib(self.rss_start_kib),
            mib(self.rss_after_baseline_kib),
            mib(self.rss_end_kib)
        );
        let _ = writeln!(w, "| peak RSS (VmHWM) | {} |", mib(self.hwm_kib));
        let _ = writeln!(
            w,
            "| RSS growth over the run / over the attack | {:+.1} MiB / {:+.1} MiB |",
            (self.rss_end_kib as f64 - self.rss_start_kib as f64) / 1024.0,
            (self.rss_end_kib as f64 - self.rss_after_baseline_kib as f64) / 1024.0
        );
        let _ = writeln!(
            w,
            "| open fds: idle / peak under attack / at end | {} / {} / {} |",
            self.fds_idle, self.fds_peak, self.fds_end
        );
        let _ = writeln!(
            w,
            "| fds back to baseline after the attack stopped | {} |",
            self.fds_back
                .map_or("NOT BACK".into(), |d| format!("{:.2} s", d.as_secs_f64()))
        );
        let _ = writeln!(
            w,
            "| daemon CPU time: baseline phase / attack phase | {:.2} s / {:.2} s |",
            self.cpu_baseline, self.cpu_attack
        );
        let _ = writeln!(w, "\n### Targets\n");
        let _ = writeln!(w, "| target | measured | result |");
        let _ = writeln!(w, "|---|---|---|");
        for c in &self.checks {
            let result = match (c.pass, c.enforced) {
                (true, _) => "pass",
                (false, true) => "**FAIL**",
                (false, false) => "missed (reported only in this mode)",
            };
            let _ = writeln!(w, "| {} | {} | {result} |", c.target, c.figure);
        }
        if !self.daemon_log_tail.is_empty() {
            let _ = writeln!(w, "\nDaemon log, last lines:\n```");
            for l in &self.daemon_log_tail {
                let _ = writeln!(w, "{l}");
            }
            let _ = writeln!(w, "```");
        }
        out
    }
}
