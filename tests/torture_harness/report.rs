//! The figures of a run, the targets they are checked against, and the
//! table (Markdown, so that it can be pasted as is).

use std::fmt::Write as _;
use std::time::Duration;

use super::Mode;
use super::check;
use super::fdspray::Spray;
use super::floods::{DELAYS_MS, FloodReport, Variant};
use super::hostile::{AttackReport, Group, Spread};
use super::observe::{PingStats, ProbeStats, merge_groups};
use super::real::ClientStats;
use super::rpc::{GONE_BOUND, RpcResult};
use super::storm::{FD_SLACK, StormReport};
use super::valid::{Metric, ValidResult};

/// The most CPU the daemon may use while it absorbs a slot flood: half a
/// core (seconds of CPU per second of wall time). The flood's cost is
/// bounded by the rate of evictions, pending slots / grace, whatever N.
pub const MAX_FLOOD_CPU: f64 = 0.5;

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
    /// `Status` all through the main attack phase.
    pub probe: ProbeStats,
    pub floods: Vec<FloodReport>,
    pub storm: Option<StormReport>,
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

    /// Descriptors the sprayers passed to the daemon, and those it kept.
    fn spray_fds(&self) -> (u64, u64) {
        self.attackers
            .iter()
            .fold((0, 0), |(s, k), a| (s + a.fds_sent, k + a.fds_kept))
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
        rpc_checks(&self.baseline.rpc, &self.attack.rpc, &mut checks);
        let n = self.hostile_connections();
        checks.push(check(
            &format!("at least {} hostile connections", mode.min_hostile),
            n.to_string(),
            n >= mode.min_hostile,
            true,
        ));
        let cap = keyhole::limits::DEFAULT_MAX_CONNECTIONS as u64;
        let peak = self.probe.peak_pending.max(self.attack.peak_pending);
        checks.push(check(
            &format!(
                "the flood saturated the {} pending slots (peak pending >= {}), and pending never exceeded the connection cap ({cap})",
                mode.max_pending, mode.max_pending
            ),
            format!(
                "peak pending {} (Status every 10 ms over the flood's first second: {} samples, {:.0}% of them at >= {}); under attack, the valid clients' peak {}",
                self.probe.peak_pending,
                self.probe.samples,
                self.probe.saturated_share() * 100.0,
                mode.max_pending,
                self.attack.peak_pending
            ),
            peak >= mode.max_pending as u64 && peak <= cap && self.probe.samples > 0,
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
        let groups: Vec<&Group> = self.attackers.iter().flat_map(|a| &a.groups).collect();
        let sprays: u64 = groups
            .iter()
            .filter(|g| Spray::ALL.iter().any(|s| s.name() == g.kind))
            .map(|g| g.count)
            .sum();
        let kinds = Spray::ALL
            .iter()
            .filter(|s| {
                groups
                    .iter()
                    .any(|g| g.kind == s.name() && g.outcome == s.expected() && g.count > 0)
            })
            .count();
        let (sent, kept) = self.spray_fds();
        checks.push(check(
            "descriptor spraying: every kind seen and answered as specified, every descriptor passed closed by the daemon (its pipe saw EOF), and the daemon's open descriptors at the end back to the idle count",
            format!(
                "{kinds} of {} kinds in {sprays} connections; {sent} descriptors passed, {kept} kept; open fds idle {} / at end {}",
                Spray::ALL.len(),
                self.fds_idle,
                self.fds_end
            ),
            kinds == Spray::ALL.len() && sent > 0 && kept == 0 && self.fds_end <= self.fds_idle,
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
        for f in &self.floods {
            flood_checks(f, mode, &mut checks);
        }
        if let Some(st) = &self.storm {
            storm_checks(st, &mut checks);
        }
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
        rpc_table(w, &self.baseline.rpc, &self.attack.rpc);
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
            "Peak pending seen by `Status` (holding a slot or waiting for one) under attack: {} (a client asking every 10 ms over the flood's first second, before the valid clients start: {}, {:.0}% of {} samples at or over the {} slots). Close time: from the peer's last byte (or its connect, if it sent none) to the daemon's close; bound {:.0} s.\n",
            self.attack.peak_pending,
            self.probe.peak_pending,
            self.probe.saturated_share() * 100.0,
            self.probe.samples,
            self.probe.threshold,
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
        let (sent, kept) = self.spray_fds();
        let _ = writeln!(
            w,
            "| descriptors passed by the sprayers / still open after the daemon had to close them | {sent} / {kept} |"
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
        for f in &self.floods {
            flood_table(w, f);
        }
        if let Some(st) = &self.storm {
            storm_table(w, st);
        }
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

/// Outcomes other than a verified reply or a `ResponderGone`.
fn other_outcomes(r: &RpcResult) -> u64 {
    r.outcomes
        .iter()
        .filter(|(k, _)| *k != "Reply, verified" && *k != "ResponderGone")
        .map(|(_, v)| v)
        .sum()
}

fn rpc_checks(baseline: &RpcResult, attack: &RpcResult, checks: &mut Vec<Check>) {
    let phases = [("baseline", baseline), ("under attack", attack)];
    let replies = |r: &RpcResult| {
        r.requests()
            .iter()
            .fold((0, 0), |(v, a), m| (v + m.verified, a + m.attempted))
    };
    let figure = phases
        .iter()
        .map(|(phase, r)| {
            let (v, a) = replies(r);
            format!(
                "{phase}: {v} of {a} replies verified, {} served, {} other outcomes, {} duplicated, {} failures",
                r.served.verified,
                other_outcomes(r),
                r.duplicates,
                r.failures
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    checks.push(check(
        "request/reply: 100% of replies verified (the answer to that exact request, echoed, from a member of the group, its uid and pid checked by the responder), none lost, failed or duplicated, under attack too",
        figure,
        phases.iter().all(|(_, r)| {
            let (v, a) = replies(r);
            a > 0
                && v == a
                && r.requests().iter().all(|m| m.attempted > 0)
                && r.served.attempted == r.served.verified
                && r.served.verified == v
                && other_outcomes(r) == 0
                && r.duplicates == 0
                && r.failures == 0
        }),
        true,
    ));
    let figure = phases
        .iter()
        .map(|(phase, r)| {
            let exact = r.per_requester.iter().filter(|(_, t)| t.exact()).count();
            format!(
                "{phase}: {exact} of {} requesters exact ({}); {} requests left in flight at the daemon",
                r.per_requester.len(),
                r.per_requester
                    .iter()
                    .map(|(who, t)| format!("{who}: {} sent, {} outcomes", t.sent, t.answered))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.left_in_flight.map_or("?".into(), |n| n.to_string())
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    checks.push(check(
        "request/reply: every requester received exactly as many outcomes as it sent requests (raw: every Response on its connection, none after its last), each a verified reply or the killed responder's ResponderGone; none left in flight at the daemon",
        figure,
        phases.iter().all(|(_, r)| {
            !r.per_requester.is_empty()
                && r.per_requester.iter().all(|(_, t)| t.exact())
                && r.left_in_flight == Some(0)
        }),
        true,
    ));
    let figure = phases
        .iter()
        .map(|(phase, r)| {
            format!(
                "{phase}: {} crossed, {} forged deliveries; {} of {} forged answers refused ({} to tokens certainly in flight), {} Request/Response events to the third party ({} events on \">\")",
                r.crossed,
                r.forged_deliveries,
                r.forged_answers.verified,
                r.forged_answers.attempted,
                r.forged_in_flight,
                r.third_party_bad,
                r.third_party_events
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    checks.push(check(
        "request/reply: zero crossed replies and zero forged deliveries; the third party subscribed to \">\" got no Request or Response event, and every forged Respond/Fail was answered delivered: false, some of them to tokens certainly in flight",
        figure,
        phases.iter().all(|(_, r)| {
            r.crossed == 0
                && r.forged_deliveries == 0
                && r.third_party_bad == 0
                && r.forged_answers.attempted > 0
                && r.forged_answers.verified == r.forged_answers.attempted
                && r.forged_in_flight > 0
                && r.third_party_events > 0
        }),
        true,
    ));
    let figure = phases
        .iter()
        .map(|(phase, r)| {
            format!(
                "{phase}: {} held, {} of {} ended ResponderGone in time ({} never read by it), close -> ResponderGone max {} ms; {} replies after its end",
                r.held,
                r.killed.verified,
                r.killed.attempted,
                r.gone_unread,
                r.gone_delay().map_or("-".into(), |s| format!("{:.1}", s.max)),
                r.after_kill
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    checks.push(check(
        &format!(
            "request/reply: the killed responder's requests in flight all end in ResponderGone within {:.0} s of its close, and no other request does; later requests are served by the others",
            GONE_BOUND.as_secs_f64()
        ),
        figure,
        phases.iter().all(|(_, r)| {
            r.held > 0
                && r.killed.attempted > 0
                && r.killed.verified == r.killed.attempted
                && r.after_kill > 0
        }),
        true,
    ));
}

fn rpc_table(w: &mut String, baseline: &RpcResult, attack: &RpcResult) {
    let _ = writeln!(w, "\n### Request/reply between clients\n");
    let _ = writeln!(w, "| figure | baseline | under attack |");
    let _ = writeln!(w, "|---|---|---|");
    let mut row = |name: &str, f: &dyn Fn(&RpcResult) -> String| {
        let _ = writeln!(w, "| {name} | {} | {} |", f(baseline), f(attack));
    };
    row("outcomes of the requests", &|r| {
        if r.outcomes.is_empty() {
            "-".into()
        } else {
            r.outcomes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    });
    row(
        "round trips/s (verified replies per second): one at a time / 16 in flight (library) / 16 pipelined (raw) / all",
        &|r| {
            let [a, b, c, all] = r.round_trips_per_s();
            format!("{a:.0} / {b:.0} / {c:.0} / {all:.0}")
        },
    );
    row(
        "per requester: requests sent / outcomes received / verified replies / ResponderGone",
        &|r| {
            r.per_requester
                .iter()
                .map(|(who, t)| {
                    format!(
                        "{who}: {} / {} / {} / {}",
                        t.sent, t.answered, t.verified, t.gone
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    row(
        "requests left in flight at the daemon once every requester was done",
        &|r| r.left_in_flight.map_or("-".into(), |n| n.to_string()),
    );
    row(
        "crossed replies / forged deliveries / duplicates (a request given to responders twice, or a second Response)",
        &|r| format!("{} / {} / {}", r.crossed, r.forged_deliveries, r.duplicates),
    );
    row("requests answered, per responder", &|r| {
        r.per_responder
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row(
        "killed responder: requests it held when it closed / ended ResponderGone (given to it but never read by it)",
        &|r| format!("{} / {} ({})", r.held, r.killed.attempted, r.gone_unread),
    );
    row(
        "killed responder: its close -> the requester's ResponderGone, p50 / max ms",
        &|r| {
            r.gone_delay()
                .map_or("-".into(), |s| format!("{:.1} / {:.1}", s.p50, s.max))
        },
    );
    row(
        "replies verified for requests sent after the killed responder's end",
        &|r| r.after_kill.to_string(),
    );
    row(
        "third party: forged Respond/Fail sent / answered delivered: false / of them, to a token certainly in flight (held by the killed responder, refused before it closed)",
        &|r| {
            format!(
                "{} / {} / {}",
                r.forged_answers.attempted, r.forged_answers.verified, r.forged_in_flight
            )
        },
    );
    row(
        "third party: events received on \">\" / Request or Response events received",
        &|r| format!("{} / {}", r.third_party_events, r.third_party_bad),
    );
}

/// p50 / p99 / max of times in ms.
fn spread_ms(ms: &[u32]) -> Option<Spread> {
    let mut us: Vec<u64> = ms.iter().map(|&m| u64::from(m) * 1000).collect();
    Spread::of(&mut us)
}

fn fmt_spread(s: Option<Spread>) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.0} / {:.0} / {:.0}", s.p50, s.p99, s.max)
    })
}

fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// The delayed clients and the library's own clients with delay `d`.
fn by_delay(f: &FloodReport, d: u64) -> (ClientStats, ClientStats) {
    let mut delayed = ClientStats::default();
    let mut library = ClientStats::default();
    for c in f.clients.iter().filter(|c| c.delay_ms == d) {
        delayed.merge(&c.delayed);
        library.merge(&c.library);
    }
    (delayed, library)
}

/// (got in, clients) through the library path with D <= `max_d`, the CLI
/// runs counted as D = 0.
fn library_path(f: &FloodReport, max_d: u64) -> (u64, u64) {
    let (mut ok, mut n) = (f.cli.ok, f.cli.attempted);
    for c in f.clients.iter().filter(|c| c.delay_ms <= max_d) {
        ok += c.delayed.got_in + c.library.got_in;
        n += c.delayed.clients + c.library.clients;
    }
    (ok, n)
}

fn attack_totals(attackers: &[AttackReport]) -> (u64, u64, u64) {
    let violations = attackers.iter().map(|a| a.violations).sum();
    let over = attackers
        .iter()
        .flat_map(|a| &a.groups)
        .map(|g| g.over_bound)
        .sum();
    let connections = attackers.iter().map(|a| a.connections).sum();
    (violations, over, connections)
}

fn count_outcome(groups: &[Group], outcome: &str) -> u64 {
    groups
        .iter()
        .filter(|g| g.outcome == outcome)
        .map(|g| g.count)
        .sum()
}

fn flood_checks(f: &FloodReport, mode: &Mode, checks: &mut Vec<Check>) {
    let t = f.title();
    let groups = merge_groups(&f.attackers);
    let (violations, over, connections) = attack_totals(&f.attackers);
    let what = match f.variant {
        Some(Variant::FdPassing) => "distinct dead child processes made the flood's connections",
        _ => "attacker processes held flood connections",
    };
    checks.push(check(
        &format!("{t}: at least {} {what}", f.attackers_wanted),
        format!("{}, {connections} connections", f.sources()),
        f.sources() >= f.attackers_wanted as u64,
        true,
    ));
    checks.push(check(
        &format!(
            "{t}: every flood connection answered as specified (AuthTimeout, or TooManyUnauthenticated at least the grace after its connect) and closed within {:.0} s",
            f.bound.as_secs_f64()
        ),
        format!(
            "{violations} violations, {over} over the bound; {} evicted, {} timed out",
            count_outcome(&groups, "Error TooManyUnauthenticated"),
            count_outcome(&groups, "Error AuthTimeout")
        ),
        violations == 0 && over == 0 && f.harness_errors.is_empty(),
        true,
    ));
    let cap = f.max_connections as u64;
    checks.push(check(
        &format!(
            "{t}: the flood saturated the {} pending slots (peak pending >= {}), and pending never exceeded the connection cap ({cap})",
            f.max_pending, f.max_pending
        ),
        format!(
            "peak pending {} ({:.0}% of {} samples at >= {})",
            f.probe.peak_pending,
            f.probe.saturated_share() * 100.0,
            f.probe.samples,
            f.max_pending
        ),
        f.probe.samples > 0
            && f.probe.peak_pending >= f.max_pending as u64
            && f.probe.peak_pending <= cap,
        true,
    ));
    let (ok, n) = library_path(f, 50);
    checks.push(check(
        &format!(
            "{t}: at least 99% of real clients with D <= 50 ms get in within 10 s (library path, with its busy-retry)"
        ),
        format!("{ok} of {n} ({})", share(ok, n)),
        n > 0 && ok * 100 >= n * 99,
        mode.enforce_latency,
    ));
    let (ok0, n0) = library_path(f, 0);
    checks.push(check(
        &format!(
            "{t}: 100% of real clients with D = 0 get in within 10 s (library connect_raw, `keyhole ping`, the library's steps)"
        ),
        format!("{ok0} of {n0} ({})", share(ok0, n0)),
        n0 > 0 && ok0 == n0,
        mode.enforce_latency,
    ));
    checks.push(check(
        &format!("{t}: daemon CPU during the flood <= {MAX_FLOOD_CPU} s per second"),
        format!(
            "{:.3} s/s ({:.2} s in {:.1} s)",
            f.cpu_per_sec(),
            f.cpu_secs,
            f.window_secs
        ),
        f.window_secs > 0.0 && f.cpu_per_sec() <= MAX_FLOOD_CPU,
        mode.enforce_latency,
    ));
    checks.push(check(
        &format!(
            "{t}: descriptors back to idle within {:.0} s of the flood's end; clean shutdown",
            f.bound.as_secs_f64()
        ),
        format!(
            "{}; {}",
            f.fds_back
                .map_or(format!("NOT BACK to {}", f.fds_idle), |d| format!(
                    "{} fds after {:.2} s",
                    f.fds_idle,
                    d.as_secs_f64()
                )),
            shutdown_text(f.shutdown)
        ),
        f.fds_back.is_some_and(|d| d <= f.bound) && f.shutdown == Some((Some(0), true)),
        true,
    ));
}

fn shutdown_text(s: Option<(Option<i32>, bool)>) -> String {
    match s {
        Some((code, removed)) => format!(
            "exit {}, socket and token {}",
            code.map_or("by signal".into(), |c| c.to_string()),
            if removed { "removed" } else { "LEFT BEHIND" }
        ),
        None => "not reached".into(),
    }
}

fn storm_checks(st: &StormReport, checks: &mut Vec<Check>) {
    let (violations, over, _) = attack_totals(&st.attackers);
    let groups = merge_groups(&st.attackers);
    let p = &st.pings;
    checks.push(check(
        "connect storm: 100% of `keyhole ping` runs succeed (default 10 s timeout)",
        format!(
            "{} of {}; time p50 / p99 / max {} ms",
            p.ok,
            p.attempted,
            fmt_spread(spread_ms(&p.ms))
        ),
        p.attempted > 0 && p.ok == p.attempted,
        true,
    ));
    let cap = st.max_connections;
    checks.push(check(
        &format!("connect storm: daemon descriptors within the connection cap + {FD_SLACK}"),
        format!(
            "peak {} fds (cap {cap}, so at most {}; idle {})",
            st.fds_peak,
            cap + FD_SLACK,
            st.fds_idle
        ),
        st.fds_peak > 0 && st.fds_peak <= cap + FD_SLACK,
        true,
    ));
    let refused = count_outcome(&groups, "Error TooManyConnections");
    checks.push(check(
        &format!(
            "connect storm: the cap was reached (TooManyConnections), and pending never exceeded it ({cap})"
        ),
        format!(
            "{refused} refused TooManyConnections; peak pending {}",
            st.probe.peak_pending
        ),
        refused > 0 && st.probe.samples > 0 && st.probe.peak_pending <= cap as u64,
        true,
    ));
    checks.push(check(
        "connect storm: every storm connection answered as specified (a held one: TooManyConnections, AuthTimeout, or TooManyUnauthenticated at least the grace after its connect)",
        format!("{violations} violations, {over} over the bound"),
        violations == 0 && over == 0 && st.harness_errors.is_empty(),
        true,
    ));
    checks.push(check(
        &format!(
            "connect storm: descriptors back to idle within {:.0} s of the storm's end; clean shutdown",
            st.bound.as_secs_f64()
        ),
        format!(
            "{}; {}",
            st.fds_back.map_or(format!("NOT BACK to {}", st.fds_idle), |d| format!(
                "{} fds after {:.2} s",
                st.fds_idle,
                d.as_secs_f64()
            )),
            shutdown_text(st.shutdown)
        ),
        st.fds_back.is_some_and(|d| d <= st.bound) && st.shutdown == Some((Some(0), true)),
        true,
    ));
}

fn groups_table(w: &mut String, groups: &[Group], attackers: &[AttackReport]) {
    let _ = writeln!(
        w,
        "| attack | daemon's answer | count | close p50 ms | close p99 ms | close max ms |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|");
    for g in groups {
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
    let mut shown = 0;
    for a in attackers {
        for v in &a.violation_samples {
            if shown < 20 {
                let _ = writeln!(w, "\n- VIOLATION ({}): {v}", a.role);
                shown += 1;
            }
        }
    }
}

fn ping_row(w: &mut String, label: &str, p: &PingStats) {
    let _ = writeln!(
        w,
        "| {label} | - | {} / {} ({}) | {} | 1 |",
        p.ok,
        p.attempted,
        share(p.ok, p.attempted),
        fmt_spread(spread_ms(&p.ms))
    );
}

fn flood_table(w: &mut String, f: &FloodReport) {
    let who = match f.variant {
        Some(Variant::FdPassing) => format!(
            "1 attacker process holding {} silent connections, each made by a child process of its own that passed it back (SCM_RIGHTS) and exited ({} children in all, distinct pids; pid still in use when its connection ended: {})",
            f.attackers_wanted,
            f.sources(),
            f.attackers.iter().map(|a| a.alive_children).sum::<u64>()
        ),
        _ => format!(
            "{} attacker processes, each holding 1 silent connection and reconnecting as soon as it is closed",
            f.attackers_wanted
        ),
    };
    let _ = writeln!(
        w,
        "\n### {}: N = {}, {} pending slots\n",
        capitalized(f.title()),
        f.attackers_wanted,
        f.max_pending
    );
    let _ = writeln!(
        w,
        "`keyholed {}` (grace 0.2 s and cap {}: the defaults) · phase wall time {:.1} s. {who}. {}; then, for {:.1} s, real clients (one process per user, clients one after the other) that wait D before their handshake, and `keyhole ping` runs.\n",
        f.daemon_args.join(" "),
        f.max_connections,
        f.wall_secs,
        match f.filled_in {
            Some(d) => format!(
                "Pending reached 90% of N {:.2} s after the attack started",
                d.as_secs_f64()
            ),
            None => "Pending did NOT reach 90% of N before the measurement".into(),
        },
        f.window_secs
    );
    let _ = writeln!(
        w,
        "| real clients | first attempt (raw, no retry): Welcome / attempts | library path: in within 10 s / clients | time to Ack p50 / p99 / max, ms | most attempts |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    let mut first_failures = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for d in DELAYS_MS {
        let (delayed, library) = by_delay(f, d);
        let _ = writeln!(
            w,
            "| D = {d} ms (the library's steps) | {} / {} ({}) | {} / {} ({}) | {} | {} |",
            delayed.first_ok,
            delayed.clients,
            share(delayed.first_ok, delayed.clients),
            delayed.got_in,
            delayed.clients,
            share(delayed.got_in, delayed.clients),
            fmt_spread(spread_ms(&delayed.in_ms)),
            delayed.max_attempts
        );
        if library.clients > 0 {
            let _ = writeln!(
                w,
                "| D = {d} ms (library `connect_raw`) | - | {} / {} ({}) | {} | - |",
                library.got_in,
                library.clients,
                share(library.got_in, library.clients),
                fmt_spread(spread_ms(&library.in_ms))
            );
        }
        if d == 0 {
            ping_row(w, "D = 0 ms (`keyhole ping`)", &f.cli);
        }
        for (k, v) in &delayed.first_outcomes {
            if k != "Welcome" {
                *first_failures
                    .entry(format!("D = {d} ms: {k}"))
                    .or_insert(0u64) += v;
            }
        }
        failures.extend(delayed.failure_samples.clone());
        failures.extend(library.failure_samples.clone());
    }
    failures.extend(f.cli.failure_samples.clone());
    let (ok, n) = library_path(f, 50);
    let _ = writeln!(
        w,
        "\nLibrary path, all D <= 50 ms: {ok} of {n} ({}).",
        share(ok, n)
    );
    if !first_failures.is_empty() {
        let list: Vec<String> = first_failures
            .iter()
            .map(|(k, v)| format!("{k} ({v})"))
            .collect();
        let _ = writeln!(
            w,
            "First attempts that did not get in: {}.",
            list.join("; ")
        );
    }
    for e in failures.iter().take(10) {
        let _ = writeln!(w, "\n- CLIENT FAILURE: {e}");
    }
    let _ = writeln!(w);
    let groups = merge_groups(&f.attackers);
    groups_table(w, &groups, &f.attackers);
    for e in &f.harness_errors {
        let _ = writeln!(w, "\n- HARNESS: {e}");
    }
    let _ = writeln!(
        w,
        "\nDaemon: CPU {:.3} s per second ({:.2} s in {:.1} s); peak pending {} ({:.0}% of {} samples at >= {}); open fds idle / peak / back: {} / {} / {}; {}.",
        f.cpu_per_sec(),
        f.cpu_secs,
        f.window_secs,
        f.probe.peak_pending,
        f.probe.saturated_share() * 100.0,
        f.probe.samples,
        f.max_pending,
        f.fds_idle,
        f.fds_peak,
        f.fds_back.map_or("NOT BACK".into(), |d| format!(
            "after {:.2} s",
            d.as_secs_f64()
        )),
        shutdown_text(f.shutdown)
    );
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn storm_table(w: &mut String, st: &StormReport) {
    let holders = st.attackers.first().map_or(0, |a| a.peak_open);
    let _ = writeln!(
        w,
        "\n### Connect storm: {} attacker processes, connection cap {}\n",
        st.attackers.len(),
        st.max_connections
    );
    let _ = writeln!(
        w,
        "`keyholed {}` (pending slots 256, grace 0.2 s: the defaults) · phase wall time {:.1} s. Over all the attacker processes, {} tasks hold a silent connection each ({:.2} x the cap, so that the cap is always reached and the excess, refused TooManyConnections in the accept loop, reconnects at once), and from {:.1} s on, {} tasks connect and close as fast as they can, which keeps the listen backlog full; a connect that finds it full (EAGAIN) is made again at once. At most {holders} of one process's connections were open at once. Then `keyhole ping` runs back to back from 2 threads for {:.1} s. The close times include the time a connection spent in the backlog before the daemon accepted it, which its handshake deadline (from the accept) does not count, so the close bound is not applied here.\n",
        st.daemon_args.join(" "),
        st.wall_secs,
        st.holders,
        st.holders as f64 / st.max_connections.max(1) as f64,
        st.churn_delay.as_secs_f64(),
        st.churners,
        st.window_secs
    );
    let p = &st.pings;
    let _ = writeln!(
        w,
        "`keyhole ping`: {} of {} succeeded ({}); time p50 / p99 / max {} ms.",
        p.ok,
        p.attempted,
        share(p.ok, p.attempted),
        fmt_spread(spread_ms(&p.ms))
    );
    for e in p.failure_samples.iter().take(10) {
        let _ = writeln!(w, "\n- PING FAILURE: {e}");
    }
    let _ = writeln!(
        w,
        "\nStorm connections: {} made ({:.0}/s), {} connect attempts found the backlog full (EAGAIN).\n",
        st.connections(),
        st.connections() as f64 / st.window_secs.max(0.001),
        st.eagain()
    );
    let groups: Vec<Group> = merge_groups(&st.attackers)
        .into_iter()
        .filter(|g| g.outcome != "no connection")
        .collect();
    groups_table(w, &groups, &st.attackers);
    for e in &st.harness_errors {
        let _ = writeln!(w, "\n- HARNESS: {e}");
    }
    let _ = writeln!(
        w,
        "\nDaemon: open fds idle / peak / back: {} / {} (cap + {FD_SLACK} = {}) / {}; peak pending {}; CPU {:.3} s per second; {}.",
        st.fds_idle,
        st.fds_peak,
        st.max_connections + FD_SLACK,
        st.fds_back.map_or("NOT BACK".into(), |d| format!(
            "after {:.2} s",
            d.as_secs_f64()
        )),
        st.probe.peak_pending,
        st.cpu_secs / st.window_secs.max(0.001),
        shutdown_text(st.shutdown)
    );
}
