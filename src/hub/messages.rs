//! The hub's messages (Part II of proto-spec.md): what a client of keyholed
//! asks, what it is answered and what it is pushed. **The order of variants
//! is the wire format**: a variant's position is its `u32` tag.

use serde::{Deserialize, Serialize};

use crate::encoding::Payload;
#[allow(unused_imports)] // named in the docs
use crate::limits::{MAX_REQUESTS_IN_FLIGHT, MAX_SERVED_NAMES, MAX_SUBSCRIPTIONS};
use crate::service::{Interface, ServiceError};

pub use super::subject::SubjectError;

/// The hub's interface: name `hub`, version 2.
#[derive(Debug, Clone, Copy)]
pub struct Hub;

impl Interface for Hub {
    const NAME: &'static str = "hub";
    const VERSION: u32 = 2;
    type Request = HubRequest;
    type Reply = HubReply;
    type Event = HubEvent;
}

/// What a subscription's events do when its connection's queue is full.
/// Tags: Disconnect 0, DropOldest 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Lag {
    /// The connection is cut as a slow consumer (`Closing{SlowConsumer}`):
    /// while it lives, the subscription misses nothing. The default.
    #[default]
    Disconnect,
    /// The subscription's oldest queued events are dropped and the
    /// connection is sent `Lagged` with their number, before the
    /// subscription's next event.
    DropOldest,
}

/// What a hub client asks. Tags in declaration order: Status 0, Subscribe
/// 1, Unsubscribe 2, Publish 3, Serve 4, Unserve 5, Request 6, Respond 7,
/// Fail 8, Topics 9, PublishMemfd 10.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubRequest {
    /// Answered with [`HubReply::Status`].
    Status,
    /// Start receiving events published on topics `pattern` matches, as
    /// the connection's event stream `sid`; answered with
    /// [`HubReply::Subscribed`].
    Subscribe {
        /// Chosen by the client, not 0, not in use on this connection; the
        /// `stream` of every `Event` and `Lagged` of this subscription.
        sid: u64,
        /// A topic, or a pattern with `*` and a final `>`.
        pattern: String,
        /// What happens when the connection's queue is full.
        lag: Lag,
    },
    /// Ends subscription `sid`; answered with [`HubReply::Unsubscribed`]
    /// (also when no such subscription exists).
    Unsubscribe {
        /// The subscription.
        sid: u64,
    },
    /// Queue `payload` for every subscription whose pattern matches
    /// `topic`; answered with [`HubReply::Published`] once it is queued.
    Publish {
        /// A topic (no wildcards).
        topic: String,
        /// Opaque bytes, delivered unchanged.
        payload: Payload,
    },
    /// Serve requests sent to `name`; answered with [`HubReply::Serving`].
    /// Requests arrive as [`HubEvent::Request`].
    Serve {
        /// A name (the syntax of a topic).
        name: String,
    },
    /// Stop serving `name`; answered with [`HubReply::Unserved`]. Requests
    /// already given to this connection stay its to answer.
    Unserve {
        /// The name.
        name: String,
    },
    /// Send `payload` to one of the connections serving `name`; answered
    /// with [`HubReply::Requested`] once it is on its way, and later with
    /// [`HubEvent::Response`] carrying this request's id.
    Request {
        /// The name.
        name: String,
        /// Milliseconds to wait for the response; 0 means the default
        /// (30 s); at most one hour.
        timeout_ms: u32,
        /// Opaque bytes, delivered unchanged.
        payload: Payload,
    },
    /// Answers the request `token` (from [`HubEvent::Request`]) with
    /// `payload`; answered with [`HubReply::Responded`].
    Respond {
        /// The request's token.
        token: u64,
        /// Opaque bytes, delivered unchanged.
        payload: Payload,
    },
    /// Answers the request `token` with a failure instead of a payload;
    /// answered with [`HubReply::Responded`].
    Fail {
        /// The request's token.
        token: u64,
        /// What went wrong.
        failure: Failure,
    },
    /// Answered with [`HubReply::Topics`].
    Topics,
    /// Publish the bytes of a sealed memfd on `topic` (sent as a `CallFds`
    /// carrying exactly that descriptor, section 19): subscribers that
    /// accept descriptors get it ([`HubEvent::MessageMemfd`]), the others
    /// its bytes as a [`HubEvent::Message`]. Answered like
    /// [`HubRequest::Publish`].
    PublishMemfd {
        /// A topic (no wildcards).
        topic: String,
    },
}

/// Why a responder answers a request without a payload. Tags:
/// ReplyTooLarge 0, Failed 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// Its reply would be over the frame limit.
    ReplyTooLarge {
        /// The reply's payload length in bytes.
        len: u64,
    },
    /// It could not answer (a failed command, say).
    Failed {
        /// What it says (at most 512 bytes).
        message: String,
    },
}

/// What the hub answers. Tags in declaration order: Status 0, Subscribed
/// 1, Unsubscribed 2, Published 3, Serving 4, Unserved 5, Requested 6,
/// Responded 7, Topics 8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubReply {
    /// The figures.
    Status(HubStatus),
    /// The subscription is in place.
    Subscribed,
    /// The subscription is gone (or never was).
    Unsubscribed,
    /// The event is queued.
    Published {
        /// Subscriptions it was queued for.
        receivers: u64,
    },
    /// This connection serves the name.
    Serving,
    /// This connection no longer serves the name (or never did).
    Unserved,
    /// The request went to a responder; its outcome follows as
    /// [`HubEvent::Response`].
    Requested,
    /// The answer was taken.
    Responded {
        /// Whether it went to the requester: `false` when the request is no
        /// longer waiting (it timed out, its requester left) or was never
        /// given to this connection.
        delivered: bool,
    },
    /// What is subscribed and served.
    Topics(TopicList),
}

/// What the hub pushes. Tags in declaration order: Message 0, Request 1,
/// Response 2, MessageMemfd 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubEvent {
    /// A payload published on a topic that a subscription of this
    /// connection matches; the `Event` frame's stream is the subscription.
    Message {
        /// The topic it was published on.
        topic: String,
        /// Per topic and daemon instance, +1 for each publish that reaches
        /// a subscription: contiguous for a subscription while it lives.
        sequence: u64,
        /// The publisher's bytes, unchanged.
        payload: Payload,
    },
    /// A request for a name this connection serves (stream 0).
    Request {
        /// To answer it with ([`HubRequest::Respond`]).
        token: u64,
        /// The name it was sent to.
        name: String,
        /// The requester's uid.
        uid: u32,
        /// The requester's pid (0 if the daemon cannot see it).
        pid: u32,
        /// The requester's bytes, unchanged.
        payload: Payload,
    },
    /// The outcome of this connection's request `request` (stream 0).
    Response {
        /// The id of the `Call` that carried the [`HubRequest::Request`].
        request: u64,
        /// What came of it.
        outcome: Outcome,
    },
    /// A publish by sealed memfd ([`HubRequest::PublishMemfd`]), to a
    /// connection that accepts descriptors: always an `EventFds` frame
    /// carrying the memfd (sealed against writing, shrinking and growing),
    /// whose first `len` bytes are the payload. Fields as for `Message`.
    MessageMemfd {
        /// The topic it was published on.
        topic: String,
        /// As for `Message`: one numbering for both kinds of publish.
        sequence: u64,
        /// The payload's length: the memfd's size.
        len: u64,
    },
}

/// What came of a request. Tags: Reply 0, ResponderGone 1, Timeout 2,
/// ReplyTooLarge 3, Failed 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The responder's bytes.
    Reply {
        /// Unchanged.
        payload: Payload,
    },
    /// The responder's connection ended before it answered.
    ResponderGone,
    /// The request's timeout passed first.
    Timeout,
    /// The responder's reply would be over the frame limit.
    ReplyTooLarge {
        /// Its payload length in bytes.
        len: u64,
    },
    /// The responder could not answer.
    Failed {
        /// What it says.
        message: String,
    },
}

/// The hub's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubStatus {
    /// Connections that completed the handshake and are open.
    pub authenticated: u64,
    /// Connections that have not completed the handshake yet.
    pub pending: u64,
    /// Distinct patterns with at least one subscription.
    pub topics: u64,
    /// Subscriptions over all patterns.
    pub subscriptions: u64,
    /// Names with at least one responder.
    pub names: u64,
    /// Requests given to a responder and not answered yet.
    pub requests_in_flight: u64,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The daemon's software version.
    pub version: String,
}

/// What is subscribed and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicList {
    /// Each pattern subscribed, with its number of subscriptions.
    pub patterns: Vec<(String, u64)>,
    /// Each name served, with its number of responders.
    pub names: Vec<(String, u64)>,
    /// Whether the lists were cut to fit the reply in the frame limit.
    pub truncated: bool,
}

/// The hub's errors; each is answered with an `Error` frame carrying the
/// request's id and the code `1000 + code()`. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Code 0: the topic or pattern is not a valid subject.
    #[error("invalid topic {subject:?}: {why}")]
    InvalidTopic {
        /// The subject, cut to 64 bytes.
        subject: String,
        /// What is wrong with it.
        why: SubjectError,
    },
    /// Code 1: the daemon is shutting down; nothing was published or sent.
    #[error("the daemon is shutting down; nothing was published or sent")]
    ShuttingDown,
    /// Code 2: this connection already has the most subscriptions allowed.
    #[error("this connection already has {max} subscriptions, the most allowed")]
    TooManySubscriptions {
        /// The cap ([`MAX_SUBSCRIPTIONS`]).
        max: usize,
    },
    /// Code 3: the subscription id is 0 or already in use on this
    /// connection.
    #[error("subscription id {sid} is {}", if *sid == 0 { "reserved" } else { "already in use on this connection" })]
    SidInUse {
        /// The id.
        sid: u64,
    },
    /// Code 4: nobody serves the name (answered at once).
    #[error("no responders: nobody serves {name:?}")]
    NoResponders {
        /// The name.
        name: String,
    },
    /// Code 5: every responder of the name has the most requests in flight
    /// allowed.
    #[error("every responder of {name:?} has {max} requests in flight already")]
    Busy {
        /// The name.
        name: String,
        /// The cap ([`MAX_REQUESTS_IN_FLIGHT`]).
        max: usize,
    },
    /// Code 6: this connection already serves the most names allowed.
    #[error("this connection already serves {max} names, the most allowed")]
    TooManyNames {
        /// The cap ([`MAX_SERVED_NAMES`]).
        max: usize,
    },
    /// Code 7: the event this would send is over the frame limit (an event
    /// is a few bytes larger than the request that causes it; see the
    /// spec's byte layouts); nothing was sent.
    #[error(
        "the event this would send is {len} bytes, over the frame limit of {max} bytes; nothing was sent"
    )]
    TooLarge {
        /// The event frame's payload length.
        len: u64,
        /// The frame limit.
        max: usize,
    },
    /// Code 8: a `PublishMemfd` whose descriptor is not one sealed memfd
    /// (not a memfd, seals missing, more than one descriptor, too large),
    /// or a request carrying descriptors it does not take; nothing was
    /// published.
    #[error("{why}; nothing was published")]
    BadMemfd {
        /// What is wrong.
        why: String,
    },
}

impl HubError {
    /// The code of [`HubError::InvalidTopic`].
    pub const INVALID_TOPIC: u32 = 0;
    /// The code of [`HubError::ShuttingDown`].
    pub const SHUTTING_DOWN: u32 = 1;
    /// The code of [`HubError::TooManySubscriptions`].
    pub const TOO_MANY_SUBSCRIPTIONS: u32 = 2;
    /// The code of [`HubError::SidInUse`].
    pub const SID_IN_USE: u32 = 3;
    /// The code of [`HubError::NoResponders`].
    pub const NO_RESPONDERS: u32 = 4;
    /// The code of [`HubError::Busy`].
    pub const BUSY: u32 = 5;
    /// The code of [`HubError::TooManyNames`].
    pub const TOO_MANY_NAMES: u32 = 6;
    /// The code of [`HubError::TooLarge`].
    pub const TOO_LARGE: u32 = 7;
    /// The code of [`HubError::BadMemfd`].
    pub const BAD_MEMFD: u32 = 8;

    pub(crate) fn too_large(err: &crate::error::FrameError) -> Self {
        match err {
            crate::error::FrameError::FrameTooLarge { len, max } => HubError::TooLarge {
                len: *len,
                max: *max,
            },
            // Encoding a hub event cannot fail otherwise; say the limit.
            _ => HubError::TooLarge {
                len: 0,
                max: crate::limits::MAX_FRAME_LEN,
            },
        }
    }

    pub(crate) fn invalid(subject: &str, why: SubjectError) -> Self {
        let mut cut = subject.len().min(64);
        while !subject.is_char_boundary(cut) {
            cut -= 1;
        }
        HubError::InvalidTopic {
            subject: subject[..cut].to_owned(),
            why,
        }
    }
}

impl ServiceError for HubError {
    fn code(&self) -> u32 {
        match self {
            HubError::InvalidTopic { .. } => Self::INVALID_TOPIC,
            HubError::ShuttingDown => Self::SHUTTING_DOWN,
            HubError::TooManySubscriptions { .. } => Self::TOO_MANY_SUBSCRIPTIONS,
            HubError::SidInUse { .. } => Self::SID_IN_USE,
            HubError::NoResponders { .. } => Self::NO_RESPONDERS,
            HubError::Busy { .. } => Self::BUSY,
            HubError::TooManyNames { .. } => Self::TOO_MANY_NAMES,
            HubError::TooLarge { .. } => Self::TOO_LARGE,
            HubError::BadMemfd { .. } => Self::BAD_MEMFD,
        }
    }
}

/// Whether a topic (for a publish) is acceptable.
pub fn valid_topic(topic: &str) -> bool {
    super::subject::check_topic(topic).is_ok()
}

/// [`HubEvent::Message`] by reference, encoded exactly like it (checked in
/// the tests): the hub encodes events without cloning their topic.
#[derive(Serialize)]
pub(crate) enum HubEventRef<'a> {
    Message {
        topic: &'a str,
        sequence: u64,
        payload: &'a Payload,
    },
    Request {
        token: u64,
        name: &'a str,
        uid: u32,
        pid: u32,
        payload: &'a Payload,
    },
    Response {
        request: u64,
        outcome: &'a Outcome,
    },
    MessageMemfd {
        topic: &'a str,
        sequence: u64,
        len: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{decode, encode};

    #[test]
    fn the_borrowed_events_encode_like_the_owned_ones() {
        let payload = Payload::from(vec![1, 2, 3]);
        let outcome = Outcome::Failed {
            message: "no".into(),
        };
        let pairs = [
            (
                HubEvent::Message {
                    topic: "news.ünï".into(),
                    sequence: 42,
                    payload: payload.clone(),
                },
                encode(&HubEventRef::Message {
                    topic: "news.ünï",
                    sequence: 42,
                    payload: &payload,
                }),
            ),
            (
                HubEvent::Request {
                    token: 7,
                    name: "svc.time".into(),
                    uid: 1000,
                    pid: 42,
                    payload: payload.clone(),
                },
                encode(&HubEventRef::Request {
                    token: 7,
                    name: "svc.time",
                    uid: 1000,
                    pid: 42,
                    payload: &payload,
                }),
            ),
            (
                HubEvent::Response {
                    request: 9,
                    outcome: outcome.clone(),
                },
                encode(&HubEventRef::Response {
                    request: 9,
                    outcome: &outcome,
                }),
            ),
        ];
        for (owned, borrowed) in pairs {
            let bytes = borrowed.unwrap();
            assert_eq!(bytes, encode(&owned).unwrap());
            assert_eq!(decode::<HubEvent>(&bytes).unwrap(), owned);
        }
    }
}
