//! The state of one conformance run: which step is current, the frames
//! still due on the main connection, the extra connections still due, the
//! values the client chose, when busy refusals were written and the
//! connections after them arrived (the retry's pauses), and the verdict.
//! Every check lands here; the first failure ends the run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::script::{
    self, Answer, CONTROL_TOPIC, FrameSpec, HELLO, Push, REPORT_TOPIC, Script, Step,
};
use super::wire::{self, Captures, Mismatch, Pattern};
use super::{Failure, Report};
use crate::encoding::{self, Payload};
use crate::hub::{Hub, HubEvent, HubRequest};
use crate::limits::{HANDSHAKE_FRAME_LEN, LENGTH_PREFIX_LEN};
use crate::server::{Connection, LagPolicy};
use crate::token::SessionToken;
use crate::transport::{EncodedEvent, RequestHeader, RequestKind};

/// The run, shared by the main connection's relay, the extra connections
/// and the kit's hub service (behind one mutex: nothing awaits under it).
pub(crate) struct Run {
    steps: Vec<Step>,
    /// Index into `steps` of the current step.
    at: usize,
    skipped: Vec<String>,
    passed: Vec<String>,
    failure: Option<Failure>,
    ended: bool,
    step_started: Instant,
    pub(crate) captures: Captures,
    token: Arc<SessionToken>,
    max_frame_len: usize,
    // The main connection.
    handshake_seen: bool,
    /// An `Expect` of the hub may come before the first checked frame.
    expect_allowed: bool,
    frames: VecDeque<FrameSpec>,
    /// The front of `frames`, built (a frame of the limit is 16 MiB: built
    /// once, not at every read).
    due: Option<Pattern>,
    answers: VecDeque<Answer>,
    control: Option<(Connection<Hub>, u64)>,
    instructions_sent: u64,
    // Extra connections.
    extra: VecDeque<Script>,
    extra_done: Vec<watch::Receiver<bool>>,
    /// When the step's extra connections were accepted.
    accepted: Vec<Instant>,
    /// The last [`script::Act::Stamp`] not yet followed by a connection.
    stamp: Option<Instant>,
    /// Each pause from a stamp (a busy refusal) to the next connection.
    pauses: Vec<Duration>,
    /// Told when the run has ended.
    pub(crate) end: Arc<Notify>,
}

/// What a report from the driver leads to.
pub(crate) enum Verdict {
    /// The run goes on (the next instruction is pushed).
    Next,
    /// The run is over (the end instruction is pushed).
    End,
}

impl Run {
    pub(crate) fn new(
        mut steps: Vec<Step>,
        skip: &[String],
        token: Arc<SessionToken>,
        max_frame_len: usize,
    ) -> Self {
        let mut skipped = Vec::new();
        steps.retain(|step| {
            let skip = skip.iter().any(|s| s == step.name);
            if skip {
                skipped.push(step.name.to_owned());
            }
            !skip
        });
        let mut hello = Step {
            name: HELLO,
            about: "connect, subscribe to the control topic, report",
            ops: Vec::new(),
            results: Vec::new(),
            frames: Vec::new(),
            answers: Vec::new(),
            events: Vec::new(),
            extra: Vec::new(),
            give_up: None,
        };
        hello.frames = script::hello_frames();
        steps.insert(0, hello);
        let mut run = Self {
            steps,
            at: 0,
            skipped,
            passed: Vec::new(),
            failure: None,
            ended: false,
            step_started: Instant::now(),
            captures: Captures::new(),
            token,
            max_frame_len,
            handshake_seen: false,
            expect_allowed: true,
            frames: VecDeque::new(),
            due: None,
            answers: VecDeque::new(),
            control: None,
            instructions_sent: 0,
            extra: VecDeque::new(),
            extra_done: Vec::new(),
            accepted: Vec::new(),
            stamp: None,
            pauses: Vec::new(),
            end: Arc::new(Notify::new()),
        };
        run.enter(0);
        run
    }

    fn enter(&mut self, at: usize) {
        self.at = at;
        self.step_started = Instant::now();
        self.frames.clear();
        self.due = None;
        self.answers.clear();
        self.extra.clear();
        self.extra_done.clear();
        self.accepted.clear();
        self.stamp = None;
        self.pauses.clear();
        if let Some(step) = self.steps.get(at) {
            self.frames.extend(step.frames.iter().cloned());
            self.answers.extend(step.answers.iter().cloned());
            self.extra.extend(step.extra.iter().cloned());
        }
    }

    pub(crate) fn step_name(&self) -> &'static str {
        self.steps.get(self.at).map_or("end", |s| s.name)
    }

    /// The driver has connected: the first step's clock starts now.
    pub(crate) fn restart_clock(&mut self) {
        self.step_started = Instant::now();
    }

    /// Since when the current step waits for its report.
    pub(crate) fn step_age(&self) -> Duration {
        self.step_started.elapsed()
    }

    /// Records the first failure and ends the run.
    pub(crate) fn fail(&mut self, why: impl Into<String>, mismatch: Option<Mismatch>) {
        if self.failure.is_none() && !self.ended {
            let (expected, received, offset) = match mismatch {
                Some(m) => (Some(m.expected), Some(m.received), Some(m.offset)),
                None => (None, None, None),
            };
            self.failure = Some(Failure {
                step: self.step_name().to_owned(),
                why: why.into(),
                offset,
                expected,
                received,
            });
        }
        self.finish();
    }

    /// Ends the run: the driver is sent the end instruction, the kit told.
    pub(crate) fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let report = self.report();
        let end = json!({
            "step": "end",
            "verdict": if report.passed() { "pass" } else { "fail" },
            "passed": script::n(report.passed.len() as u64),
            "failed": report.failure.as_ref().map(|f| json!({
                "step": f.step,
                "why": f.why,
                "expected": f.expected,
                "received": f.received,
            })),
        });
        self.instruct(&end);
        self.end.notify_one();
    }

    pub(crate) fn report(&self) -> Report {
        Report {
            passed: self.passed.clone(),
            skipped: self.skipped.clone(),
            failure: self.failure.clone(),
            steps: self.steps.len(),
        }
    }

    /// Pushes an instruction on the control subscription.
    fn instruct(&mut self, instruction: &Value) {
        let Some((connection, sid)) = &self.control else {
            return;
        };
        self.instructions_sent += 1;
        let event = HubEvent::Message {
            topic: CONTROL_TOPIC.into(),
            sequence: self.instructions_sent,
            payload: Payload::from(instruction.to_string().into_bytes()),
        };
        // A closed or slow control connection ends the run anyway.
        if let Ok(encoded) = EncodedEvent::new(&event, self.max_frame_len) {
            let _ = connection.push_stream(&encoded, *sid, LagPolicy::Disconnect);
        }
    }

    fn push(&mut self, push: &Push) {
        let Some((connection, _)) = &self.control else {
            return;
        };
        let Ok(encoded) = EncodedEvent::new(&push.event, self.max_frame_len) else {
            return;
        };
        let _ = match push.stream {
            None => connection.push_encoded(&encoded),
            Some(label) => {
                let stream = self.captures.get(label).copied().unwrap_or(0);
                connection
                    .push_stream(&encoded, stream, LagPolicy::Disconnect)
                    .map(|_| ())
            }
        };
    }

    /// The pushes of an answer, done now (before the reply goes out).
    pub(crate) fn push_all(&mut self, pushes: &[Push]) {
        for push in pushes {
            self.push(push);
        }
    }

    // ---- the main connection ----

    /// The control subscription is in place (the kit's hub saw it).
    pub(crate) fn set_control(&mut self, connection: Connection<Hub>, sid: u64) {
        if self.control.is_none() {
            self.control = Some((connection, sid));
        }
    }

    /// The answer to the next `Call` of the current step.
    pub(crate) fn next_answer(&mut self) -> Option<Answer> {
        self.answers.pop_front()
    }

    /// Checks what the main connection sent, consuming every whole frame
    /// (and a handshake) from `buf`.
    pub(crate) fn main_input(&mut self, buf: &mut BytesMut) {
        loop {
            if self.ended {
                buf.clear();
                return;
            }
            if !self.handshake_seen {
                let pattern = wire::handshake(&self.token);
                let have = buf.len().min(HANDSHAKE_FRAME_LEN);
                if have >= LENGTH_PREFIX_LEN && buf[..LENGTH_PREFIX_LEN] != pattern.bytes[..4] {
                    let mismatch = pattern.compare(&buf[..have]).err();
                    return self.fail("the handshake's length prefix is not 40", mismatch);
                }
                if have < HANDSHAKE_FRAME_LEN {
                    return;
                }
                if let Err(mismatch) = pattern.compare(&buf[..HANDSHAKE_FRAME_LEN]) {
                    return self.fail("the handshake differs", Some(mismatch));
                }
                buf.advance(HANDSHAKE_FRAME_LEN);
                self.handshake_seen = true;
                continue;
            }
            let Some(len) = wire::read_u32(buf, 0) else {
                return;
            };
            let len = len as usize;
            if len > self.max_frame_len {
                let shown = buf.len().min(64);
                return self.fail(
                    format!(
                        "a frame of {len} bytes, over the frame limit of {}",
                        self.max_frame_len
                    ),
                    Some(Mismatch {
                        offset: 0,
                        expected: format!("a length prefix of at most {}", self.max_frame_len),
                        received: wire::spaced_hex(&buf[..shown]),
                    }),
                );
            }
            if self.due.is_none() {
                self.due = self.frames.pop_front().map(|spec| spec(&self.captures));
            }
            if let Some(pattern) = &self.due {
                let maybe_expect = self.expect_allowed && len == EXPECT_HUB_LEN;
                if len != pattern.payload_len() && !maybe_expect {
                    // Decided now: a frame of another length is wrong
                    // whatever follows (and may never end).
                    let shown = buf.len().min(pattern.bytes.len() + 16);
                    let mismatch = pattern.compare(&buf[..shown]).err();
                    return self.fail(
                        format!(
                            "expected {}; the frame's length prefix says {len} bytes, not {}",
                            pattern.what,
                            pattern.payload_len()
                        ),
                        mismatch,
                    );
                }
            }
            if buf.len() < LENGTH_PREFIX_LEN + len {
                return;
            }
            let frame = buf.split_to(LENGTH_PREFIX_LEN + len);
            if self.expect_allowed && wire::expect("hub", 2).compare(&frame).is_ok() {
                continue;
            }
            self.expect_allowed = false;
            match self.due.take() {
                Some(pattern) => match pattern.compare(&frame) {
                    Ok(()) => pattern.capture(&frame, &mut self.captures),
                    Err(mismatch) => {
                        return self.fail(format!("expected {}", pattern.what), Some(mismatch));
                    }
                },
                None if is_report(&frame) => {}
                None => {
                    let mismatch = Mismatch {
                        offset: 0,
                        expected: format!(
                            "a Publish on {REPORT_TOPIC} (the step's frames are all in)"
                        ),
                        received: wire::shown(&frame),
                    };
                    return self.fail("a frame the step does not expect", Some(mismatch));
                }
            }
        }
    }

    // ---- extra connections ----

    /// The script for an extra connection just accepted, if the step has
    /// one left; `done` is set once its checks are over.
    pub(crate) fn take_extra(&mut self) -> Option<(Script, watch::Sender<bool>)> {
        let now = Instant::now();
        self.accepted.push(now);
        if let Some(stamp) = self.stamp.take() {
            self.pauses.push(now.saturating_duration_since(stamp));
        }
        let script = match self.extra.front_mut() {
            Some(front) if front.repeat => {
                // Opened once: the step's need is met; later ones replay it.
                front.optional = true;
                front.clone()
            }
            _ => self.extra.pop_front()?,
        };
        let (tx, rx) = watch::channel(false);
        self.extra_done.push(rx);
        Some((script, tx))
    }

    /// Notes the time of a busy refusal (see [`script::Act::Stamp`]).
    pub(crate) fn stamp(&mut self, at: Instant) {
        self.stamp = Some(at);
    }

    /// The busy retry's pauses (section 9, "Admission"): each within
    /// [`PAUSE_MIN`] and [`PAUSE_MAX`] (plus [`PAUSE_SLACK`] for the
    /// scheduling of a loaded machine); under an imposed connect timeout,
    /// a client that retried at all went on until about its end.
    fn check_retries(&self, give_up: Option<Duration>) -> Result<(), String> {
        for (i, pause) in self.pauses.iter().enumerate() {
            if *pause < PAUSE_MIN {
                return Err(format!(
                    "attempt {} came {pause:?} after the busy refusal before it: a client pauses at least {PAUSE_MIN:?} between attempts (section 9)",
                    i + 2
                ));
            }
            if *pause > PAUSE_MAX + PAUSE_SLACK {
                return Err(format!(
                    "attempt {} came {pause:?} after the busy refusal before it: a client pauses at most {PAUSE_MAX:?} between attempts (section 9)",
                    i + 2
                ));
            }
        }
        let (Some(timeout), [first, .., last]) = (give_up, self.accepted.as_slice()) else {
            return Ok(());
        };
        let retried_for = last.saturating_duration_since(*first);
        let least = timeout.saturating_sub(PAUSE_MAX + GIVE_UP_SLACK);
        if retried_for < least {
            return Err(format!(
                "the client gave up {retried_for:?} after its first attempt ({} attempts), under a connect timeout of {timeout:?}: a client that retries a busy refusal goes on until its connect timeout (section 9)",
                self.accepted.len()
            ));
        }
        let reported = first.elapsed();
        if reported > timeout + REPORT_SLACK {
            return Err(format!(
                "the client reported {reported:?} after its first attempt, past its connect timeout of {timeout:?}"
            ));
        }
        Ok(())
    }

    /// The checks of the current step's extra connections still running.
    pub(crate) fn extra_checks(&self) -> Vec<watch::Receiver<bool>> {
        self.extra_done.clone()
    }

    // ---- reports ----

    /// Judges the driver's report of the current step and moves on.
    pub(crate) fn judge(&mut self, report: &[u8]) -> Verdict {
        if self.ended {
            return Verdict::End;
        }
        if let Err(why) = self.check_report(report) {
            self.fail(why, None);
            return Verdict::End;
        }
        let due = self
            .due
            .take()
            .or_else(|| self.frames.front().map(|spec| spec(&self.captures)));
        if let Some(frame) = due {
            let mismatch = Mismatch {
                offset: 0,
                expected: frame
                    .compare(&[])
                    .err()
                    .map(|m| m.expected)
                    .unwrap_or_default(),
                received: "nothing (the report came first)".into(),
            };
            self.fail(format!("expected {}", frame.what), Some(mismatch));
            return Verdict::End;
        }
        if self.extra.iter().any(|script| !script.optional) {
            self.fail("a new connection the step expects was not opened", None);
            return Verdict::End;
        }
        if !self.answers.is_empty() {
            self.fail("fewer Calls than the step expects", None);
            return Verdict::End;
        }
        let give_up = self.steps.get(self.at).and_then(|step| step.give_up);
        if let Err(why) = self.check_retries(give_up) {
            self.fail(why, None);
            return Verdict::End;
        }
        let name = self.step_name().to_owned();
        if self.at > 0 {
            self.passed.push(name);
        }
        self.enter(self.at + 1);
        match self.steps.get(self.at) {
            None => {
                self.finish();
                Verdict::End
            }
            Some(step) => {
                let instruction = json!({
                    "step": step.name,
                    "number": script::n(self.at as u64),
                    "ops": step.ops,
                });
                let events = step.events.clone();
                self.instruct(&instruction);
                self.push_all(&events);
                Verdict::Next
            }
        }
    }

    fn check_report(&self, report: &[u8]) -> Result<(), String> {
        let value: Value = serde_json::from_slice(report)
            .map_err(|err| format!("the report is not JSON: {err}"))?;
        let step = self
            .steps
            .get(self.at)
            .ok_or_else(|| "a report after the end".to_owned())?;
        match value.get("step").and_then(Value::as_str) {
            Some(name) if name == step.name => {}
            other => {
                return Err(format!(
                    "the report names the step {}, not {:?}",
                    other.map_or("(none)".into(), |n| format!("{n:?}")),
                    step.name
                ));
            }
        }
        let results = value
            .get("results")
            .and_then(Value::as_array)
            .ok_or_else(|| "the report has no \"results\" array".to_owned())?;
        if results.len() != step.results.len() {
            return Err(format!(
                "the report has {} results for the step's {} ops",
                results.len(),
                step.results.len()
            ));
        }
        for (i, (want, got)) in step.results.iter().zip(results).enumerate() {
            if !want.accepts(got) {
                let op = step.ops[i].get("op").and_then(Value::as_str).unwrap_or("?");
                return Err(format!(
                    "op {} ({op}): expected {}, the driver reported {}",
                    i + 1,
                    shorten(&want.describe()),
                    shorten(&got.to_string())
                ));
            }
        }
        Ok(())
    }
}

/// The shortest pause between two attempts after a busy refusal (section
/// 9, "Admission").
pub(crate) const PAUSE_MIN: Duration = Duration::from_millis(1);
/// The longest.
pub(crate) const PAUSE_MAX: Duration = Duration::from_secs(1);
/// What the kit allows beyond [`PAUSE_MAX`] for a loaded machine.
const PAUSE_SLACK: Duration = Duration::from_secs(1);
/// What the kit allows before an imposed connect timeout for the last
/// attempt: the client's clock starts before its first connection
/// arrives.
const GIVE_UP_SLACK: Duration = Duration::from_millis(500);
/// What it allows after that timeout for the report (the driver's own
/// work, a loaded machine).
const REPORT_SLACK: Duration = Duration::from_secs(2);

/// Payload length of `Expect` naming the hub, version 2.
const EXPECT_HUB_LEN: usize = 12 + 8 + 3 + 4;

/// Whether `frame` is a `Call` publishing on [`REPORT_TOPIC`].
fn is_report(frame: &[u8]) -> bool {
    let payload = &frame[LENGTH_PREFIX_LEN.min(frame.len())..];
    let Ok(header) = RequestHeader::parse(payload) else {
        return false;
    };
    if header.kind != RequestKind::Call.tag() {
        return false;
    }
    matches!(
        encoding::decode::<HubRequest>(&payload[12..]),
        Ok(HubRequest::Publish { topic, .. }) if topic == REPORT_TOPIC
    )
}

/// Long JSON cut for the report (a payload reported as hex, say).
fn shorten(text: &str) -> String {
    const MAX: usize = 600;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut cut = MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &text[..cut], text.len())
}
