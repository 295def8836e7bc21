//! The hub: keyholed's service, a local publish/subscribe bus built on the
//! framework's public service API like any other service.
//!
//! - [`messages`]: the hub's requests, replies, events and errors.
//! - `topics`: the topic table and the fan-out.
//!
//! The fast paths are the framework's public hooks: an event is encoded
//! once ([`EncodedEvent`]) and the same bytes queued for every subscriber
//! ([`Call::push_encoded`], which wakes each subscriber once per batch); a
//! payload of 16 KiB or more is never copied (it arrives as a slice of the
//! publisher's frame and leaves as a shared part of the event frame); and
//! consecutive small publishes on one topic are taken as a run
//! ([`Service::call_batch`]) and queued for each subscriber as one buffer.

pub mod messages;
mod topics;

use std::sync::{Mutex, MutexGuard};

use crate::encoding::{self, Payload, SHARE_MIN};
use crate::limits::{MAX_SUBSCRIPTIONS, WRITE_BATCH_BYTES};
use crate::server::Connection;
use crate::service::{Batch, Call, Service};
use crate::transport::{EncodedEvent, EventBatch};

use self::messages::HubEventRef;
pub use self::messages::{Hub, HubError, HubEvent, HubReply, HubRequest, HubStatus, valid_topic};
use self::topics::Topics;

/// Subscriptions a closing connection gives up between yields.
const CLEANUP_RUN: usize = 128;

/// The topic table is split in this many shards, each behind its own lock:
/// connections on different topics rarely wait for each other, and a shard
/// growing (a rehash of its topics) holds up only its own.
const SHARDS: usize = 16;

/// The hub service (what keyholed serves).
pub struct HubService {
    shards: Box<[Mutex<Topics>]>,
}

impl Default for HubService {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// Which shard `topic` lives in: a multiplicative hash of all its bytes, 8
/// at a time. (It need not resist collisions: a peer whose topics all land
/// in one shard gets the unsharded table, no worse.)
fn shard_of(topic: &str) -> usize {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = topic.len() as u64;
    let mut words = topic.as_bytes().chunks_exact(8);
    for word in &mut words {
        h = mix(
            h,
            u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or_default()),
        );
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    h = mix(h, u64::from_le_bytes(last));
    (h >> 32) as usize % SHARDS
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

/// One connection's subscriptions.
#[derive(Debug, Default)]
pub struct HubSession {
    topics: std::collections::HashSet<String>,
}

impl HubService {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shard holding `topic`, locked.
    fn lock(&self, topic: &str) -> MutexGuard<'_, Topics> {
        lock(&self.shards[shard_of(topic)])
    }

    /// (topics, subscriptions)
    pub fn counts(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(t, s), shard| {
            let (topics, subscriptions) = lock(shard).counts();
            (t + topics, s + subscriptions)
        })
    }

    fn publish(
        &self,
        cx: &mut Call<'_, Self>,
        topic: &str,
        payload: &Payload,
    ) -> Result<HubReply, HubError> {
        let max = cx.server().max_frame_len();
        let mut topics = self.lock(topic);
        if topics.closed {
            return Err(HubError::ShuttingDown);
        }
        let Some(sequence) = topics.claim_sequences(topic, 1) else {
            return Ok(HubReply::Published);
        };
        let event = HubEventRef::Message {
            topic,
            sequence,
            payload,
        };
        // An event is exactly as long as the publish that caused it, so it
        // fits the frame limit that the publish met.
        if let Ok(frame) = EncodedEvent::new(&event, max) {
            topics.fan_out(topic, &frame, |to, frame| cx.push_encoded(to, frame));
        }
        Ok(HubReply::Published)
    }
}

fn check(topic: &str) -> Result<(), HubError> {
    if valid_topic(topic) {
        Ok(())
    } else {
        Err(HubError::InvalidTopic { len: topic.len() })
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
        match request {
            HubRequest::Status => {
                let stats = cx.server().stats();
                let (topics, subscriptions) = self.counts();
                Ok(HubReply::Status(HubStatus {
                    authenticated: stats.authenticated,
                    pending: stats.pending,
                    topics,
                    subscriptions,
                    uptime_ms: stats.uptime.as_millis() as u64,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }))
            }
            HubRequest::Subscribe { topic } => {
                check(&topic)?;
                if cx.session.topics.contains(&topic) {
                    return Ok(HubReply::Subscribed);
                }
                if cx.session.topics.len() >= MAX_SUBSCRIPTIONS {
                    return Err(HubError::TooManySubscriptions {
                        max: MAX_SUBSCRIPTIONS,
                    });
                }
                if self.lock(&topic).subscribe(&topic, cx.connection()) {
                    cx.session.topics.insert(topic);
                }
                Ok(HubReply::Subscribed)
            }
            HubRequest::Unsubscribe { topic } => {
                check(&topic)?;
                if cx.session.topics.remove(&topic) {
                    self.lock(&topic).unsubscribe(&topic, cx.connection());
                }
                Ok(HubReply::Unsubscribed)
            }
            HubRequest::Publish { topic, payload } => {
                check(&topic)?;
                self.publish(&mut cx, &topic, &payload)
            }
        }
    }

    /// A run of small publishes on one topic: numbered under one lock (no
    /// other publish interleaves) and queued for each subscriber as one
    /// buffer instead of one queue entry per event.
    fn call_batch(&self, batch: &mut Batch<'_, Self>) {
        let topic = match batch.peek() {
            Some(HubRequest::Publish { topic, payload })
                if payload.len() < SHARE_MIN && valid_topic(topic) =>
            {
                topic.clone()
            }
            _ => return,
        };
        let mut payloads = Vec::new();
        let mut bytes = 0;
        while bytes < WRITE_BATCH_BYTES {
            match batch.peek() {
                Some(HubRequest::Publish { topic: t, payload })
                    if *t == topic && payload.len() < SHARE_MIN => {}
                _ => break,
            }
            let Some(HubRequest::Publish { payload, .. }) = batch.take() else {
                break;
            };
            bytes += payload.len() + topic.len() + 32;
            payloads.push(payload);
        }
        let max = batch.server().max_frame_len();
        let mut topics = self.lock(&topic);
        if topics.closed {
            drop(topics);
            for _ in &payloads {
                batch.reply(Err(HubError::ShuttingDown));
            }
            return;
        }
        if let Some(first) = topics.claim_sequences(&topic, payloads.len() as u64) {
            // The event's encoding up to its payload, once for the run: only
            // the sequence number and the payload's length differ.
            let head = encoding::encode(&HubEventRef::Message {
                topic: &topic,
                sequence: 0,
                payload: &Payload::new(),
            })
            .unwrap_or_default();
            let at = head.len().saturating_sub(16);
            let mut events = EventBatch::with_capacity(bytes + payloads.len() * 8);
            for (i, payload) in payloads.iter().enumerate() {
                let sequence = first.wrapping_add(i as u64);
                // Each event is exactly as long as its publish: it fits.
                let _ = events.push_with(max, |dst| {
                    let start = dst.len();
                    dst.extend_from_slice(&head);
                    dst[start + at..start + at + 8].copy_from_slice(&sequence.to_le_bytes());
                    dst[start + at + 8..start + at + 16]
                        .copy_from_slice(&(payload.len() as u64).to_le_bytes());
                    dst.extend_from_slice(payload);
                });
            }
            let frame = events.finish();
            topics.fan_out(&topic, &frame, |to, frame| batch.push_encoded(to, frame));
        }
        drop(topics);
        for _ in &payloads {
            batch.reply(Ok(HubReply::Published));
        }
    }

    /// Gives every subscription up, 128 at a time: the worker thread is
    /// free between runs (a connection may hold [`MAX_SUBSCRIPTIONS`]).
    async fn close(&self, session: HubSession, connection: &Connection<Hub>) {
        let mut left = session.topics.into_iter();
        loop {
            for topic in left.by_ref().take(CLEANUP_RUN) {
                self.lock(&topic).unsubscribe(&topic, connection);
            }
            if left.len() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// From here on every publish is refused, so an acknowledged publish is
    /// one that is already in its subscribers' outboxes, which shutdown
    /// drains before `Closing`.
    fn shutdown(&self) {
        for shard in &self.shards {
            lock(shard).closed = true;
        }
    }
}

fn lock(shard: &Mutex<Topics>) -> MutexGuard<'_, Topics> {
    // A panic while holding the lock cannot leave the table half-updated in
    // a way that matters more than stopping would: recover.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_that_differ_anywhere_spread_over_every_shard() {
        for name in [
            |i: usize| format!("sensor/{i}/temperature"),
            |i: usize| format!("{}{i}", "x".repeat(200)),
            |i: usize| format!("{i}{}", "x".repeat(200)),
        ] {
            let mut seen = [0usize; SHARDS];
            for i in 0..1600 {
                seen[shard_of(&name(i))] += 1;
            }
            assert!(seen.iter().all(|&n| n > 50), "{}: {seen:?}", name(0));
        }
    }
}
