//! The kit's hub: a [`Service`] of the hub's interface (name `hub`,
//! version 2) on the framework, whose answers come from the script rather
//! than from topics and responders. It takes the driver's control
//! subscription and reports, and answers every other `Call` as the current
//! step says.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::run::{Run, Verdict};
use super::script::{Answer, CONTROL_TOPIC, REPORT_TOPIC};
use crate::encoding::Payload;
use crate::hub::{Hub, HubEvent, HubReply, HubRequest, HubStatus, TopicList};
use crate::service::{Call, Connection, Service, ServiceError};

/// How long a report waits for the step's extra connections to finish
/// their checks (a connection the driver already closed finishes at once).
const EXTRA_CHECKS_WAIT: Duration = Duration::from_secs(3);

/// The delay between `Requested` and the `Response` event that follows it
/// (the reply is written well within it, so the `Response` comes second,
/// as the hub guarantees).
const RESPONSE_DELAY: Duration = Duration::from_millis(30);

/// A scripted hub error: sent as `1000 + n`.
#[derive(Debug, thiserror::Error)]
#[error("scripted by the conformance kit (code {})", 1000 + .0)]
pub(crate) struct Scripted(u32);

impl ServiceError for Scripted {
    fn code(&self) -> u32 {
        self.0
    }
}

/// The kit's hub service.
pub(crate) struct KitHub {
    pub(crate) run: Arc<Mutex<Run>>,
    /// Asks the kit's accept loop to take every connection queued on its
    /// socket, and answers once it has.
    pub(crate) backlog: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
}

pub(crate) fn lock(run: &Mutex<Run>) -> MutexGuard<'_, Run> {
    run.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service for KitHub {
    type Interface = Hub;
    type Error = Scripted;
    type Session = ();

    fn open(&self, _connection: &Connection<Hub>) {}

    async fn call(&self, cx: Call<'_, Self>, request: HubRequest) -> Result<HubReply, Scripted> {
        match request {
            HubRequest::Subscribe { sid, pattern, .. } if pattern == CONTROL_TOPIC => {
                lock(&self.run).set_control(cx.connection().clone(), sid);
                Ok(HubReply::Subscribed)
            }
            HubRequest::Publish { topic, payload } if topic == REPORT_TOPIC => {
                self.report(&payload).await;
                Ok(HubReply::Published { receivers: 1 })
            }
            request => {
                let answer = lock(&self.run).next_answer();
                self.answer(&cx, answer, &request)
            }
        }
    }
}

impl KitHub {
    async fn report(&self, payload: &Payload) {
        // Connections the driver opened before this report belong to the
        // step it ends: taken from the socket's queue before judging.
        let (taken, drained) = tokio::sync::oneshot::channel();
        if self.backlog.send(taken).is_ok() {
            let _ = drained.await;
        }
        let checks = lock(&self.run).extra_checks();
        for mut done in checks {
            let _ = tokio::time::timeout(EXTRA_CHECKS_WAIT, done.wait_for(|d| *d)).await;
        }
        let mut run = lock(&self.run);
        match run.judge(payload.bytes()) {
            Verdict::Next | Verdict::End => {}
        }
    }

    fn answer(
        &self,
        cx: &Call<'_, Self>,
        answer: Option<Answer>,
        request: &HubRequest,
    ) -> Result<HubReply, Scripted> {
        match answer {
            Some(Answer::Reply(reply, pushes)) => {
                lock(&self.run).push_all(&pushes);
                Ok(reply)
            }
            Some(Answer::Error(wire_code)) => Err(Scripted(wire_code.saturating_sub(1000))),
            Some(Answer::Requested(outcome)) => {
                let connection = cx.connection().clone();
                let request = cx.id();
                tokio::spawn(async move {
                    tokio::time::sleep(RESPONSE_DELAY).await;
                    let _ = connection.push(&HubEvent::Response { request, outcome });
                });
                Ok(HubReply::Requested)
            }
            Some(Answer::Oversized) => {
                let max = cx.server().max_frame_len();
                Ok(HubReply::Topics(TopicList {
                    patterns: vec![("x".repeat(max), 1)],
                    names: Vec::new(),
                    truncated: false,
                }))
            }
            // A Call the step does not expect: the relay has recorded the
            // failure; answer as a hub would so the client goes on.
            None => Ok(default_reply(request)),
        }
    }
}

fn default_reply(request: &HubRequest) -> HubReply {
    match request {
        HubRequest::Status => HubReply::Status(HubStatus {
            authenticated: 1,
            pending: 0,
            topics: 0,
            subscriptions: 0,
            names: 0,
            requests_in_flight: 0,
            uptime_ms: 0,
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        HubRequest::Subscribe { .. } => HubReply::Subscribed,
        HubRequest::Unsubscribe { .. } => HubReply::Unsubscribed,
        HubRequest::Publish { .. } | HubRequest::PublishMemfd { .. } => {
            HubReply::Published { receivers: 0 }
        }
        HubRequest::Serve { .. } => HubReply::Serving,
        HubRequest::Unserve { .. } => HubReply::Unserved,
        HubRequest::Request { .. } => HubReply::Requested,
        HubRequest::Respond { .. } | HubRequest::Fail { .. } => {
            HubReply::Responded { delivered: false }
        }
        HubRequest::Topics => HubReply::Topics(TopicList {
            patterns: Vec::new(),
            names: Vec::new(),
            truncated: false,
        }),
    }
}
