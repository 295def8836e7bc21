//! The hub: keyholed's service, a local message bus built on the
//! framework's public service API like any other service.
//!
//! - [`messages`]: the hub's requests, replies, events and errors.
//! - `subject`: what a topic, a pattern and a name may be.
//! - `trie`: the subscriptions, by pattern token.
//! - `topics`: publish/subscribe: numbering and the fan-out.
//! - `rpc`: request/reply between clients.
//!
//! The fast paths are the framework's public hooks: an event is encoded
//! once ([`EncodedEvent`]) and the same bytes queued for every subscription
//! (each `Event` frame is stamped with the subscription's id as it is
//! queued, [`Call::push_stream`]); a payload of 16 KiB or more is never
//! copied (it arrives as a slice of the publisher's frame and leaves as a
//! shared part of the event frame); and consecutive small publishes on one
//! topic are taken as a run ([`Service::call_batch`]) and queued for each
//! subscription as one buffer.

pub mod messages;
mod rpc;
pub(crate) mod subject;
mod topics;
pub(crate) mod trie;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::encoding::{self, Payload, SHARE_MIN};
use std::os::fd::{AsFd, BorrowedFd};

use crate::fds::Descriptors;
use crate::limits::{MAX_MEMFD_LEN, MAX_SERVED_NAMES, MAX_SUBSCRIPTIONS, WRITE_BATCH_BYTES};
use crate::memfd;
use crate::server::{Connection, LagPolicy};
use crate::service::{Batch, Call, Service};
use crate::transport::{EVENT_HEADER_LEN, EncodedEvent, EventBatch};

use self::messages::HubEventRef;
pub use self::messages::{
    Failure, Hub, HubError, HubEvent, HubReply, HubRequest, HubStatus, Lag, Outcome, TopicList,
    valid_topic,
};
use self::rpc::Rpc;
pub use self::subject::{SubjectError, check_pattern, check_topic};
use self::topics::Topics;

/// Subscriptions a closing connection gives up between yields.
const CLEANUP_RUN: usize = 128;

/// The hub service (what keyholed serves).
#[derive(Default)]
pub struct HubService {
    topics: Mutex<Topics>,
    rpc: Arc<Rpc>,
}

impl std::fmt::Debug for HubService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (topics, subscriptions) = self.counts();
        f.debug_struct("HubService")
            .field("topics", &topics)
            .field("subscriptions", &subscriptions)
            .finish()
    }
}

/// One connection's subscriptions and served names.
#[derive(Debug, Default)]
pub struct HubSession {
    /// Pattern by subscription id.
    subscriptions: HashMap<u64, Arc<str>>,
    served: HashSet<String>,
}

impl From<Lag> for LagPolicy {
    fn from(lag: Lag) -> Self {
        match lag {
            Lag::Disconnect => LagPolicy::Disconnect,
            Lag::DropOldest => LagPolicy::DropOldest,
        }
    }
}

/// Takes the next request if it is a small publish on `topic` (what a run
/// of publishes is made of).
fn take_publish(batch: &mut Batch<'_, HubService>, topic: &str) -> Option<HubRequest> {
    match batch.peek() {
        Some(HubRequest::Publish { topic: t, payload })
            if t == topic && payload.len() < SHARE_MIN =>
        {
            batch.take()
        }
        _ => None,
    }
}

impl HubService {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Topics> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way that matters more than stopping would: recover.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (distinct patterns, subscriptions)
    pub fn counts(&self) -> (u64, u64) {
        self.lock().counts()
    }

    fn publish(
        &self,
        cx: &mut Call<'_, Self>,
        topic: &str,
        payload: &Payload,
    ) -> Result<HubReply, HubError> {
        check_topic(topic).map_err(|why| HubError::invalid(topic, why))?;
        let max = cx.server().max_frame_len();
        let mut topics = self.lock();
        if topics.closed {
            return Err(HubError::ShuttingDown);
        }
        let receivers = topics.publish(
            topic,
            1,
            |sequence| {
                EncodedEvent::new(
                    &HubEventRef::Message {
                        topic,
                        sequence,
                        payload,
                    },
                    max,
                )
                .map_err(|err| HubError::too_large(&err))
            },
            |to, frame, sid, lag| cx.push_stream(to, frame, sid, lag),
        )?;
        Ok(HubReply::Published { receivers })
    }

    fn publish_memfd(&self, cx: &mut Call<'_, Self>, topic: &str) -> Result<HubReply, HubError> {
        check_topic(topic).map_err(|why| HubError::invalid(topic, why))?;
        let mut fds = cx.take_fds();
        let (Some(fd), true) = (fds.pop(), fds.is_empty()) else {
            return Err(HubError::BadMemfd {
                why: "PublishMemfd carries exactly one descriptor (sent as a CallFds)".into(),
            });
        };
        let len = memfd::check_sealed(&fd, MAX_MEMFD_LEN).map_err(|err| HubError::BadMemfd {
            why: err.to_string(),
        })?;
        let max = cx.server().max_frame_len();
        // Subscribers that do not take descriptors get the bytes, read once
        // and before the lock is taken (a large read under it would hold up
        // every publish and subscribe meanwhile); they must fit a frame.
        let overhead = 64 + topic.len() as u64;
        let read = |fd: BorrowedFd<'_>| -> Result<Payload, HubError> {
            if len + overhead > max as u64 {
                return Err(HubError::TooLarge {
                    len: len + overhead,
                    max,
                });
            }
            memfd::read_all(fd, len as usize)
                .map(Payload::from)
                .map_err(|err| HubError::BadMemfd {
                    why: err.to_string(),
                })
        };
        let mut early = None;
        if self.lock().reaches_inline(topic) {
            early = Some(read(fd.as_fd())?);
        }
        let fds = Descriptors::new(vec![fd]);
        let mut topics = self.lock();
        if topics.closed {
            return Err(HubError::ShuttingDown);
        }
        let receivers = topics.publish_memfd(
            topic,
            |sequence| {
                EncodedEvent::with_fds(
                    &HubEventRef::MessageMemfd {
                        topic,
                        sequence,
                        len,
                    },
                    fds.clone(),
                    max,
                )
                .map_err(|err| HubError::too_large(&err))
            },
            |sequence| {
                // (Read under the lock only if an inline subscriber came in
                // since the check.)
                let payload = match early.take() {
                    Some(payload) => payload,
                    None => match fds.first() {
                        Some(fd) => read(fd)?,
                        None => {
                            return Err(HubError::BadMemfd {
                                why: "no descriptor".into(),
                            });
                        }
                    },
                };
                EncodedEvent::new(
                    &HubEventRef::Message {
                        topic,
                        sequence,
                        payload: &payload,
                    },
                    max,
                )
                .map_err(|err| HubError::too_large(&err))
            },
            |to, frame, sid, lag| cx.push_stream(to, frame, sid, lag),
        )?;
        Ok(HubReply::Published { receivers })
    }

    fn topic_list(&self, max_frame_len: usize) -> TopicList {
        let mut patterns = Vec::new();
        self.lock().each_pattern(|pattern, n| {
            patterns.push((pattern.to_owned(), n as u64));
            true
        });
        let mut names = Vec::new();
        self.rpc.each_name(|name, n| {
            names.push((name.to_owned(), n as u64));
            true
        });
        patterns.sort_unstable();
        names.sort_unstable();
        // Each entry costs its text, its length and its count; the reply's
        // own bytes are well inside the margin. What does not fit is cut
        // from the end of each sorted list, patterns first served, so a
        // truncated reply is a prefix of each list.
        let mut room = max_frame_len.saturating_sub(256);
        let mut truncated = false;
        for list in [&mut patterns, &mut names] {
            let fits = list
                .iter()
                .take_while(|(text, _)| match room.checked_sub(text.len() + 16) {
                    Some(left) => {
                        room = left;
                        true
                    }
                    None => false,
                })
                .count();
            if fits < list.len() {
                truncated = true;
                list.truncate(fits);
                room = 0;
            }
        }
        TopicList {
            patterns,
            names,
            truncated,
        }
    }
}

impl Service for HubService {
    type Interface = Hub;
    type Error = HubError;
    type Session = HubSession;

    fn open(&self, _connection: &Connection<Hub>) -> HubSession {
        HubSession::default()
    }

    async fn call(
        &self,
        mut cx: Call<'_, Self>,
        request: HubRequest,
    ) -> Result<HubReply, HubError> {
        if !cx.fds().is_empty() && !matches!(request, HubRequest::PublishMemfd { .. }) {
            return Err(HubError::BadMemfd {
                why: "only PublishMemfd carries a descriptor".into(),
            });
        }
        match request {
            HubRequest::Status => {
                let stats = cx.server().stats();
                let (topics, subscriptions) = self.counts();
                let (names, requests_in_flight) = self.rpc.counts();
                Ok(HubReply::Status(HubStatus {
                    authenticated: stats.authenticated,
                    pending: stats.pending,
                    topics,
                    subscriptions,
                    names,
                    requests_in_flight,
                    uptime_ms: stats.uptime.as_millis() as u64,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }))
            }
            HubRequest::Subscribe { sid, pattern, lag } => {
                check_pattern(&pattern).map_err(|why| HubError::invalid(&pattern, why))?;
                if sid == 0 || cx.session.subscriptions.contains_key(&sid) {
                    return Err(HubError::SidInUse { sid });
                }
                if cx.session.subscriptions.len() >= MAX_SUBSCRIPTIONS {
                    return Err(HubError::TooManySubscriptions {
                        max: MAX_SUBSCRIPTIONS,
                    });
                }
                let pattern: Arc<str> = pattern.into();
                self.lock()
                    .subscribe(&pattern, sid, cx.connection(), lag.into());
                cx.session.subscriptions.insert(sid, pattern);
                Ok(HubReply::Subscribed)
            }
            HubRequest::Unsubscribe { sid } => {
                if let Some(pattern) = cx.session.subscriptions.remove(&sid) {
                    self.lock().unsubscribe(&pattern, cx.connection().id(), sid);
                    // Out of the table, so nothing new comes; what is queued
                    // goes too: no event of `sid` follows `Unsubscribed`,
                    // and the id can be used again.
                    cx.connection().discard_stream(sid);
                }
                Ok(HubReply::Unsubscribed)
            }
            HubRequest::Publish { topic, payload } => self.publish(&mut cx, &topic, &payload),
            HubRequest::PublishMemfd { topic } => self.publish_memfd(&mut cx, &topic),
            HubRequest::Serve { name } => {
                check_topic(&name).map_err(|why| HubError::invalid(&name, why))?;
                if !cx.session.served.contains(&name) {
                    if cx.session.served.len() >= MAX_SERVED_NAMES {
                        return Err(HubError::TooManyNames {
                            max: MAX_SERVED_NAMES,
                        });
                    }
                    self.rpc.serve(&name, cx.connection());
                    cx.session.served.insert(name);
                }
                Ok(HubReply::Serving)
            }
            HubRequest::Unserve { name } => {
                check_topic(&name).map_err(|why| HubError::invalid(&name, why))?;
                if cx.session.served.remove(&name) {
                    self.rpc.unserve(&name, cx.connection());
                }
                Ok(HubReply::Unserved)
            }
            HubRequest::Request {
                name,
                timeout_ms,
                payload,
            } => {
                check_topic(&name).map_err(|why| HubError::invalid(&name, why))?;
                let max = cx.server().max_frame_len();
                let requester = cx.connection().clone();
                let request = cx.request_id();
                self.rpc.request(
                    &requester,
                    request,
                    &name,
                    timeout_ms,
                    &payload,
                    max,
                    &mut |to, event| cx.push_encoded(to, event),
                )?;
                Ok(HubReply::Requested)
            }
            HubRequest::Respond { token, payload } => {
                let max = cx.server().max_frame_len();
                let responder = cx.connection().clone();
                let delivered = self.rpc.answer(
                    &responder,
                    token,
                    Outcome::Reply { payload },
                    max,
                    &mut |to, event| cx.push_encoded(to, event),
                )?;
                Ok(HubReply::Responded { delivered })
            }
            HubRequest::Fail { token, failure } => {
                let max = cx.server().max_frame_len();
                let outcome = match failure {
                    Failure::ReplyTooLarge { len } => Outcome::ReplyTooLarge { len },
                    Failure::Failed { mut message } => {
                        let mut cut = message.len().min(crate::limits::MAX_ERROR_MESSAGE_LEN);
                        while !message.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        message.truncate(cut);
                        Outcome::Failed { message }
                    }
                };
                let responder = cx.connection().clone();
                let delivered =
                    self.rpc
                        .answer(&responder, token, outcome, max, &mut |to, event| {
                            cx.push_encoded(to, event)
                        })?;
                Ok(HubReply::Responded { delivered })
            }
            HubRequest::Topics => Ok(HubReply::Topics(
                self.topic_list(cx.server().max_frame_len()),
            )),
        }
    }

    /// A run of small publishes on one topic: numbered under one lock (no
    /// other publish interleaves) and queued for each subscription as one
    /// buffer instead of one queue entry per event.
    ///
    /// Each publish is encoded into the batch as it is taken, before the
    /// lock, with its sequence number left 0 and written once the numbers
    /// are known: its payload is dropped at once, so the next request's is
    /// decoded into the allocation just freed (the allocator's per-thread
    /// cache holds only a few chunks of a size; a run of payloads all alive
    /// at once missed it, ~300 instructions a publish).
    fn call_batch(&self, batch: &mut Batch<'_, Self>) {
        let topic = match batch.peek() {
            Some(HubRequest::Publish { topic, payload })
                if payload.len() < SHARE_MIN && valid_topic(topic) =>
            {
                topic.clone()
            }
            _ => return,
        };
        // A run on a topic nobody listens to is answered without encoding
        // it: it reaches nobody now, whatever happens next (its publishes
        // were all received before this check).
        let answer = {
            let mut topics = self.lock();
            if topics.closed {
                Some(Err(HubError::ShuttingDown))
            } else if !topics.reaches_anyone(&topic) {
                Some(Ok(HubReply::Published { receivers: 0 }))
            } else {
                None
            }
        };
        if let Some(answer) = answer {
            let mut bytes = 0;
            while bytes < WRITE_BATCH_BYTES {
                let Some(HubRequest::Publish { payload, .. }) = take_publish(batch, &topic) else {
                    break;
                };
                bytes += payload.len() + topic.len() + 40;
                batch.reply(answer.clone());
            }
            return;
        }
        let max = batch.server().max_frame_len();
        // The event's encoding up to its payload, once for the run: only
        // the sequence number and the payload's length differ.
        let mut head = bytes::BytesMut::with_capacity(topic.len() + 40);
        let _ = encoding::encode_into(
            &HubEventRef::Message {
                topic: &topic,
                sequence: 0,
                payload: &Payload::new(),
            },
            &mut head,
        );
        let at = head.len().saturating_sub(16);
        let mut events = EventBatch::new();
        // The first frame that could not be encoded: the run is refused as
        // a whole, as one publish would be (and only if it reaches anyone).
        let mut failed = None;
        let mut taken = 0usize;
        let mut bytes = 0;
        while bytes < WRITE_BATCH_BYTES {
            let Some(HubRequest::Publish { payload, .. }) = take_publish(batch, &topic) else {
                break;
            };
            let frame = EVENT_HEADER_LEN + head.len() + payload.len();
            if taken == 0 {
                // Room for the whole run at once, judged by what is
                // buffered (grown from a frame, the buffer was reallocated
                // four or five times a run; made too large, it is copied
                // again by `finish`). A publish request is its event's
                // frame but for the sequence number.
                let more = batch.buffered_bytes() / (frame - 8);
                let frames = (1 + more).min(1 + WRITE_BATCH_BYTES / frame);
                events = EventBatch::with_capacity_for(frame * frames, frames);
            }
            taken += 1;
            bytes += payload.len() + topic.len() + 40;
            if failed.is_some() {
                continue;
            }
            let pushed = events.push_with(max, |dst| {
                let start = dst.len();
                dst.extend_from_slice(&head);
                dst[start + at + 8..start + at + 16]
                    .copy_from_slice(&(payload.len() as u64).to_le_bytes());
                dst.extend_from_slice(&payload);
            });
            if let Err(err) = pushed {
                failed = Some(HubError::too_large(&err));
            }
        }
        let mut topics = self.lock();
        if topics.closed {
            drop(topics);
            for _ in 0..taken {
                batch.reply(Err(HubError::ShuttingDown));
            }
            return;
        }
        let encode = |first: u64| {
            if let Some(err) = failed {
                return Err(err);
            }
            events.each_body_mut(|i, body| {
                if let Some(slot) = body.get_mut(at..at + 8) {
                    slot.copy_from_slice(&first.wrapping_add(i as u64).to_le_bytes());
                }
            });
            Ok(events.finish())
        };
        let result = topics.publish(&topic, taken as u64, encode, |to, frame, sid, lag| {
            batch.push_stream(to, frame, sid, lag)
        });
        drop(topics);
        for _ in 0..taken {
            batch.reply(
                result
                    .clone()
                    .map(|receivers| HubReply::Published { receivers }),
            );
        }
    }

    /// Gives every subscription up, 128 at a time (the worker thread is
    /// free between runs: a connection may hold [`MAX_SUBSCRIPTIONS`]), and
    /// every served name; requests it was serving end in `ResponderGone`.
    async fn close(&self, session: HubSession, connection: &Connection<Hub>) {
        let id = connection.id();
        let mut left = session.subscriptions.into_iter();
        loop {
            {
                let mut topics = self.lock();
                for (sid, pattern) in left.by_ref().take(CLEANUP_RUN) {
                    topics.unsubscribe(&pattern, id, sid);
                }
            }
            if left.len() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.rpc
            .close(connection, &session.served, crate::limits::MAX_FRAME_LEN);
    }

    /// From here on every publish and request is refused, so an
    /// acknowledged publish is one that is already in its subscribers'
    /// outboxes, which shutdown drains before `Closing`.
    fn shutdown(&self) {
        self.lock().closed = true;
        self.rpc.shut();
    }
}
