//! Publish/subscribe: the subscriptions (a [`Trie`] of patterns), each
//! topic's numbering, and the fan-out of one publish.
//!
//! A topic is numbered while its publishes reach subscriptions: each such
//! publish takes the topic's next sequence number, so a subscription sees
//! consecutive numbers for as long as it lives. A publish that reaches
//! nobody forgets the topic's numbering (it starts again at 1), which also
//! bounds what is kept to topics that someone listens to, at most
//! [`MAX_NUMBERED_TOPICS`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::limits::MAX_NUMBERED_TOPICS;
use crate::server::{Connection, LagPolicy, PushError, Pushed};
use crate::transport::EncodedEvent;

use super::messages::{Hub, HubError};
use super::trie::{SubKey, Trie};

/// One subscription.
pub(crate) struct Sub {
    pub connection: Connection<Hub>,
    pub lag: LagPolicy,
    pub pattern: Arc<str>,
}

/// What one publish sends: `inline` to connections that do not accept
/// descriptors (and to every one when there is no `with_fds`), `with_fds`
/// to those that do.
struct Frames {
    inline: Option<EncodedEvent>,
    with_fds: Option<EncodedEvent>,
}

impl Frames {
    fn for_sub(&self, sub: &Sub) -> Option<&EncodedEvent> {
        match &self.with_fds {
            None => self.inline.as_ref(),
            Some(frame) if sub.connection.accepts_fds() => Some(frame),
            Some(_) => self.inline.as_ref(),
        }
    }
}

/// Subscriptions and numbering.
#[derive(Default)]
pub(crate) struct Topics {
    trie: Trie<Sub>,
    /// The last sequence number given, per topic.
    numbers: HashMap<Box<str>, u64>,
    /// Set at shutdown: every later publish is refused.
    pub(crate) closed: bool,
}

impl Topics {
    /// Subscribes `connection`'s stream `sid` to `pattern`.
    pub fn subscribe(
        &mut self,
        pattern: &Arc<str>,
        sid: u64,
        connection: &Connection<Hub>,
        lag: LagPolicy,
    ) {
        let key = SubKey {
            conn: connection.id(),
            sid,
        };
        self.trie.insert(
            pattern,
            key,
            Sub {
                connection: connection.clone(),
                lag,
                pattern: Arc::clone(pattern),
            },
        );
    }

    /// Ends `connection`'s subscription `sid` to `pattern`.
    pub fn unsubscribe(&mut self, pattern: &str, connection: u64, sid: u64) {
        self.trie.remove(
            pattern,
            &SubKey {
                conn: connection,
                sid,
            },
        );
    }

    /// Queues the run of `n` publishes on `topic`, encoded by `encode`
    /// (given the first sequence number) as one frame, for every matching
    /// subscription; the topic's numbers advance by `n`, and a failed
    /// encoding takes none (no gap). A topic nobody subscribes to forgets
    /// its numbering. Returns the subscriptions they were queued for.
    /// Subscriptions whose connection is closed or cut are dropped.
    pub fn publish(
        &mut self,
        topic: &str,
        n: u64,
        encode: impl FnOnce(u64) -> Result<EncodedEvent, HubError>,
        push: impl FnMut(&Connection<Hub>, &EncodedEvent, u64, LagPolicy) -> Result<Pushed, PushError>,
    ) -> Result<u64, HubError> {
        self.deliver(
            topic,
            n,
            |first, _| {
                Ok(Frames {
                    inline: Some(encode(first)?),
                    with_fds: None,
                })
            },
            push,
        )
    }

    /// Whether a subscription matching `topic` is on a connection that does
    /// not accept descriptors (a memfd publish must then be read).
    pub fn reaches_inline(&self, topic: &str) -> bool {
        let mut inline = false;
        self.trie.for_each_match(topic, |_, sub| {
            inline |= !sub.connection.accepts_fds();
        });
        inline
    }

    /// A publish by memfd: the frame `with_fd` makes goes to connections
    /// that accept descriptors, the one `inline` makes (the bytes, read
    /// only if some subscriber needs them) to the others. One number.
    pub fn publish_memfd(
        &mut self,
        topic: &str,
        with_fd: impl FnOnce(u64) -> Result<EncodedEvent, HubError>,
        inline: impl FnOnce(u64) -> Result<EncodedEvent, HubError>,
        push: impl FnMut(&Connection<Hub>, &EncodedEvent, u64, LagPolicy) -> Result<Pushed, PushError>,
    ) -> Result<u64, HubError> {
        self.deliver(
            topic,
            1,
            |sequence, matched| {
                let accepts = |wanted: bool| {
                    matched
                        .iter()
                        .any(|(_, sub)| sub.connection.accepts_fds() == wanted)
                };
                Ok(Frames {
                    with_fds: if accepts(true) {
                        Some(with_fd(sequence)?)
                    } else {
                        None
                    },
                    inline: if accepts(false) {
                        Some(inline(sequence)?)
                    } else {
                        None
                    },
                })
            },
            push,
        )
    }

    /// The one delivery loop: the matching subscriptions, numbered, each
    /// pushed the frame `encode` made for its kind of connection.
    fn deliver(
        &mut self,
        topic: &str,
        n: u64,
        encode: impl FnOnce(u64, &[(SubKey, &Sub)]) -> Result<Frames, HubError>,
        mut push: impl FnMut(
            &Connection<Hub>,
            &EncodedEvent,
            u64,
            LagPolicy,
        ) -> Result<Pushed, PushError>,
    ) -> Result<u64, HubError> {
        // Room for a typical fan-out at the first match (growing from
        // empty cost three or four reallocations a publish; a topic nobody
        // subscribes to allocates nothing).
        let mut matched: Vec<(SubKey, &Sub)> = Vec::new();
        self.trie.for_each_match(topic, |key, sub| {
            if matched.capacity() == 0 {
                matched.reserve(16);
            }
            matched.push((*key, sub));
        });
        if matched.is_empty() {
            self.numbers.remove(topic);
            return Ok(0);
        }
        let last = self.numbers.get(topic).copied().unwrap_or(0);
        // Encoded before the numbers are taken: a refused publish leaves
        // no gap.
        let frames = encode(last.wrapping_add(1), &matched)?;
        let mut receivers = 0;
        let mut gone = Vec::new();
        for (key, sub) in &matched {
            let Some(frame) = frames.for_sub(sub) else {
                continue;
            };
            match push(&sub.connection, frame, key.sid, sub.lag) {
                Ok(Pushed::Queued) => receivers += 1,
                Ok(Pushed::Dropped) => {}
                Err(_) => gone.push((*key, Arc::clone(&sub.pattern))),
            }
        }
        drop(matched);
        for (key, pattern) in gone {
            self.trie.remove(&pattern, &key);
        }
        self.number(topic, last.wrapping_add(n));
        Ok(receivers)
    }

    /// Whether a publish on `topic` would reach a subscription now. If not,
    /// the topic's numbering is forgotten, as by a publish that reaches
    /// nobody: publishes already received may then be answered as such
    /// without encoding them (a subscription made later could not have
    /// been known to their publisher).
    pub fn reaches_anyone(&mut self, topic: &str) -> bool {
        let any = self.trie.has_match(topic);
        if !any {
            self.numbers.remove(topic);
        }
        any
    }

    fn number(&mut self, topic: &str, last: u64) {
        if let Some(n) = self.numbers.get_mut(topic) {
            *n = last;
            return;
        }
        if self.numbers.len() >= MAX_NUMBERED_TOPICS {
            if let Some(other) = self.numbers.keys().next().cloned() {
                self.numbers.remove(&other);
            }
        }
        self.numbers.insert(topic.into(), last);
    }

    /// (distinct patterns, subscriptions)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.trie.patterns() as u64,
            self.trie.subscriptions() as u64,
        )
    }

    /// Each pattern with its number of subscriptions, until `f` says stop.
    pub fn each_pattern(&self, f: impl FnMut(&str, usize) -> bool) {
        self.trie.each_pattern(f);
    }
}
