//! The hub's table of topics: each topic's subscribers and its sequence
//! counter, and the fan-out of one encoded event to every subscriber.
//!
//! A subscriber whose push fails (its connection has ended, or this push
//! overflowed its outbox and it is being cut as a slow consumer) is removed
//! from the topic right there, so a publisher never waits and never skips
//! anyone silently. A topic exists while it has a subscriber.

use std::collections::HashMap;

use crate::server::connection::IdHasher;
use crate::server::{Connection, PushError};
use crate::transport::EncodedEvent;

use super::messages::Hub;

/// Subscribers by connection id: subscribing, unsubscribing and a
/// connection's clean-up cost O(1) per topic, whatever the topic's size.
type Subscribers = HashMap<u64, Connection<Hub>, std::hash::BuildHasherDefault<IdHasher>>;

struct Topic {
    sequence: u64,
    subscribers: Subscribers,
}

/// Topics and subscriptions.
#[derive(Default)]
pub(crate) struct Topics {
    topics: HashMap<String, Topic>,
    subscriptions: u64,
    /// Set at shutdown: every later publish is refused.
    pub(crate) closed: bool,
}

/// What a fan-out did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FanOut {
    /// Subscribers the event was queued for.
    pub delivered: usize,
    /// Subscribers removed because their push failed.
    pub removed: usize,
}

impl Topics {
    /// Subscribes `connection` to `topic` (idempotent). Returns whether the
    /// subscription is new.
    pub fn subscribe(&mut self, topic: &str, connection: &Connection<Hub>) -> bool {
        let entry = self
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic {
                sequence: 0,
                subscribers: Subscribers::default(),
            });
        if entry.subscribers.contains_key(&connection.id()) {
            return false;
        }
        entry
            .subscribers
            .insert(connection.id(), connection.clone());
        self.subscriptions += 1;
        true
    }

    /// Removes `connection` from `topic`. Returns whether it was subscribed.
    pub fn unsubscribe(&mut self, topic: &str, connection: &Connection<Hub>) -> bool {
        let Some(entry) = self.topics.get_mut(topic) else {
            return false;
        };
        let removed = entry.subscribers.remove(&connection.id()).is_some();
        if entry.subscribers.is_empty() {
            self.topics.remove(topic);
        }
        self.subscriptions -= u64::from(removed);
        removed
    }

    /// The next `n` sequence numbers of `topic`, or `None` if nobody
    /// subscribes to it (then nothing is numbered).
    pub fn claim_sequences(&mut self, topic: &str, n: u64) -> Option<u64> {
        let entry = self.topics.get_mut(topic)?;
        let first = entry.sequence.wrapping_add(1);
        entry.sequence = entry.sequence.wrapping_add(n);
        Some(first)
    }

    /// Queues `frame` for every subscriber of `topic` through `push`.
    pub fn fan_out(
        &mut self,
        topic: &str,
        frame: &EncodedEvent,
        mut push: impl FnMut(&Connection<Hub>, &EncodedEvent) -> Result<(), PushError>,
    ) -> FanOut {
        let Some(entry) = self.topics.get_mut(topic) else {
            return FanOut::default();
        };
        let before = entry.subscribers.len();
        entry.subscribers.retain(|_, s| push(s, frame).is_ok());
        let delivered = entry.subscribers.len();
        if entry.subscribers.is_empty() {
            self.topics.remove(topic);
        }
        let removed = before - delivered;
        self.subscriptions -= removed as u64;
        FanOut { delivered, removed }
    }

    /// (topics, subscriptions)
    pub fn counts(&self) -> (u64, u64) {
        (self.topics.len() as u64, self.subscriptions)
    }
}
