//! The hub's messages (section 11 of proto-spec.md): what a client of
//! keyholed asks, what it is answered and what it is pushed. **The order of
//! variants is the wire format**: a variant's position is its `u32` tag.

use serde::{Deserialize, Serialize};

use crate::encoding::Payload;
use crate::limits::MAX_TOPIC_LEN;
use crate::service::{Interface, ServiceError};

/// The hub's interface: name `hub`, version 1.
#[derive(Debug, Clone, Copy)]
pub struct Hub;

impl Interface for Hub {
    const NAME: &'static str = "hub";
    const VERSION: u32 = 1;
    type Request = HubRequest;
    type Reply = HubReply;
    type Event = HubEvent;
}

/// What a hub client asks. Tags: Status 0, Subscribe 1, Unsubscribe 2,
/// Publish 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubRequest {
    /// Answered with [`HubReply::Status`].
    Status,
    /// Start receiving events published on `topic`; answered with
    /// [`HubReply::Subscribed`].
    Subscribe {
        /// UTF-8, 1 to [`MAX_TOPIC_LEN`] bytes.
        topic: String,
    },
    /// Stop receiving them; answered with [`HubReply::Unsubscribed`].
    Unsubscribe {
        /// UTF-8, 1 to [`MAX_TOPIC_LEN`] bytes.
        topic: String,
    },
    /// Queue `payload` for every current subscriber of `topic`; answered
    /// with [`HubReply::Published`] once it is queued for all of them.
    Publish {
        /// UTF-8, 1 to [`MAX_TOPIC_LEN`] bytes.
        topic: String,
        /// Opaque bytes, delivered unchanged.
        payload: Payload,
    },
}

/// What the hub answers. Tags: Status 0, Subscribed 1, Unsubscribed 2,
/// Published 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubReply {
    /// The figures.
    Status(HubStatus),
    /// The subscription is in place.
    Subscribed,
    /// The subscription is gone (or never was).
    Unsubscribed,
    /// The event is queued for every current subscriber.
    Published,
}

/// What the hub pushes. Tags: Message 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubEvent {
    /// A payload published on a topic this connection subscribes to.
    Message {
        /// The topic.
        topic: String,
        /// Per topic, +1 for each publish; contiguous for a subscriber for
        /// as long as it stays subscribed.
        sequence: u64,
        /// The publisher's bytes, unchanged.
        payload: Payload,
    },
}

/// The hub's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubStatus {
    /// Connections that completed the handshake and are open.
    pub authenticated: u64,
    /// Connections that have not completed the handshake yet.
    pub pending: u64,
    /// Topics with at least one subscriber.
    pub topics: u64,
    /// Subscriptions over all topics.
    pub subscriptions: u64,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The daemon's software version.
    pub version: String,
}

/// The hub's errors; each is answered with an `Error` frame carrying the
/// request's id and the code `1000 + code()`. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Code 0: the topic is empty or longer than 255 bytes.
    #[error("topic must be 1 to {MAX_TOPIC_LEN} bytes of UTF-8; got {len} bytes")]
    InvalidTopic {
        /// The topic's length in bytes.
        len: usize,
    },
    /// Code 1: the daemon is shutting down; nothing was published.
    #[error("the daemon is shutting down; nothing was published")]
    ShuttingDown,
    /// Code 2: this connection already has the most subscriptions allowed.
    #[error("this connection already has {max} subscriptions, the most allowed")]
    TooManySubscriptions {
        /// The cap ([`crate::limits::MAX_SUBSCRIPTIONS`]).
        max: usize,
    },
}

impl HubError {
    /// The code of [`HubError::InvalidTopic`].
    pub const INVALID_TOPIC: u32 = 0;
    /// The code of [`HubError::ShuttingDown`].
    pub const SHUTTING_DOWN: u32 = 1;
    /// The code of [`HubError::TooManySubscriptions`].
    pub const TOO_MANY_SUBSCRIPTIONS: u32 = 2;
}

impl ServiceError for HubError {
    fn code(&self) -> u32 {
        match self {
            HubError::InvalidTopic { .. } => Self::INVALID_TOPIC,
            HubError::ShuttingDown => Self::SHUTTING_DOWN,
            HubError::TooManySubscriptions { .. } => Self::TOO_MANY_SUBSCRIPTIONS,
        }
    }
}

/// Whether a topic name is acceptable: 1 to [`MAX_TOPIC_LEN`] bytes.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{decode, encode};

    #[test]
    fn the_borrowed_event_encodes_like_the_owned_one() {
        let owned = HubEvent::Message {
            topic: "news/ünï".into(),
            sequence: 42,
            payload: Payload::from(vec![1, 2, 3]),
        };
        let HubEvent::Message {
            topic,
            sequence,
            payload,
        } = &owned;
        let borrowed = HubEventRef::Message {
            topic,
            sequence: *sequence,
            payload,
        };
        let bytes = encode(&borrowed).unwrap();
        assert_eq!(bytes, encode(&owned).unwrap());
        assert_eq!(decode::<HubEvent>(&bytes).unwrap(), owned);
    }
}
