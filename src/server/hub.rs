//! The hub: topics, their subscribers and the fan-out of published events.
//!
//! An event is encoded once into a frame and the same bytes are queued for
//! every subscriber. A large payload (at least [`DIRECT_PAYLOAD`] bytes) is
//! not copied at all: the frame is its encoded head plus the publisher's
//! payload bytes, shared, and the connection writes both with one vectored
//! write. Each subscribing connection has one [`Outbox`], a queue
//! bounded in bytes: a push that would pass the bound marks the subscriber as
//! a slow consumer and it is removed, so a publisher never waits and never
//! skips anyone silently. No lock here is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::Notify;

use crate::codec::{encode_event_head, encode_events, encode_frame};
use crate::error::FrameError;
use crate::message::ServerMessage;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data
    // half-updated in a way that matters more than stopping would: recover.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What became of one push into an [`Outbox`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The bound was reached: the outbox is now closed as a slow consumer.
    Overflow,
    /// The outbox was already closed.
    Closed,
}

/// Payloads of at least this many bytes are queued and written without
/// being copied (see the module doc); smaller events are one buffer, which
/// is cheaper to gather into a connection's write buffer.
pub const DIRECT_PAYLOAD: usize = 16 * 1024;

/// One encoded event frame as queued: `head`, followed on the wire by
/// `body` (empty unless the payload is large, see [`DIRECT_PAYLOAD`]).
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// The frame, or its head up to and including the payload length.
    pub head: Bytes,
    /// The payload when it is not in `head`.
    pub body: Bytes,
}

impl Frame {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether nothing is left (of a partly written frame).
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.body.is_empty()
    }

    /// Drops the first `n` bytes (after a partial write).
    pub fn advance(&mut self, n: usize) {
        let from_head = n.min(self.head.len());
        self.head.advance(from_head);
        self.body.advance(n - from_head);
    }
}

impl From<Bytes> for Frame {
    fn from(head: Bytes) -> Self {
        Frame {
            head,
            body: Bytes::new(),
        }
    }
}

#[derive(Debug, Default)]
struct OutboxState {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: bool,
    overflowed: bool,
}

/// A subscriber connection's queue of encoded event frames.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    limit: usize,
}

/// What [`Outbox::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Frames moved out.
    pub frames: usize,
    /// The outbox overflowed: the connection must be closed as a slow consumer.
    pub overflowed: bool,
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            notify: Notify::new(),
            limit,
        }
    }

    /// Queues `frame`, or closes the outbox as a slow consumer if it would
    /// pass the bound (its queued frames are dropped at once, so a stalled
    /// subscriber holds no memory after it is cut).
    pub fn push(&self, frame: &Bytes) -> Push {
        self.push_frame(&Frame::from(frame.clone()))
    }

    /// [`Self::push`] for a frame that may be in two parts.
    pub fn push_frame(&self, frame: &Frame) -> Push {
        let (push, wake) = self.push_quiet(frame);
        if wake {
            self.wake();
        }
        push
    }

    /// Wakes the connection (after [`Self::push_quiet`] said so).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Queues like [`Self::push_frame`] but leaves the wake-up to the
    /// caller: the second value says whether the connection must be woken
    /// (the queue was empty). A publisher that handles a batch of publishes
    /// wakes each subscriber once, after the batch, instead of once per
    /// event while the subscriber drains the queue concurrently.
    pub fn push_quiet(&self, frame: &Frame) -> (Push, bool) {
        let mut st = lock(&self.state);
        if st.closed {
            return (Push::Closed, false);
        }
        if st.bytes + frame.len() > self.limit {
            st.closed = true;
            st.overflowed = true;
            st.frames = VecDeque::new();
            st.bytes = 0;
            drop(st);
            return (Push::Overflow, true);
        }
        let was_empty = st.frames.is_empty();
        st.bytes += frame.len();
        st.frames.push_back(frame.clone());
        (Push::Queued, was_empty)
    }

    /// Moves queued frames into `out` until `out` holds at least `max` bytes
    /// or the queue is empty.
    pub fn take(&self, out: &mut BytesMut, max: usize) -> Taken {
        let mut st = lock(&self.state);
        let mut frames = 0;
        while out.len() < max {
            let Some(frame) = st.frames.pop_front() else {
                break;
            };
            st.bytes -= frame.len();
            out.extend_from_slice(&frame.head);
            out.extend_from_slice(&frame.body);
            frames += 1;
        }
        Taken {
            frames,
            overflowed: st.overflowed,
        }
    }

    /// Like [`Self::take`], except that a frame with a large payload is not
    /// copied: when `out` is empty and `direct` is free, it is moved to
    /// `direct` whole, to be written before anything later put in `out`;
    /// otherwise taking stops in front of it, so frames stay in order.
    pub fn take_batch(&self, out: &mut BytesMut, max: usize, direct: &mut Option<Frame>) -> Taken {
        let mut st = lock(&self.state);
        let mut frames = 0;
        // Room for the batch at once rather than growing frame by frame.
        let want = st.bytes.min(max.saturating_sub(out.len()));
        if out.capacity() - out.len() < want {
            out.reserve(want);
        }
        while out.len() < max {
            let Some(front) = st.frames.front() else {
                break;
            };
            if !front.body.is_empty() {
                if out.is_empty() && direct.is_none() {
                    let frame = st.frames.pop_front().unwrap_or_default();
                    st.bytes -= frame.len();
                    *direct = Some(frame);
                    frames += 1;
                }
                break;
            }
            let Some(frame) = st.frames.pop_front() else {
                break;
            };
            st.bytes -= frame.len();
            out.extend_from_slice(&frame.head);
            frames += 1;
        }
        Taken {
            frames,
            overflowed: st.overflowed,
        }
    }

    /// Whether the outbox overflowed (the subscriber must be cut).
    pub fn is_overflowed(&self) -> bool {
        lock(&self.state).overflowed
    }

    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        lock(&self.state).frames.is_empty()
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        lock(&self.state).bytes
    }

    /// Refuses further pushes (the connection is going away).
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// Resolves after a push into an empty queue or an overflow since the
    /// last call (a notification sent while nobody waits is kept).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

struct Subscriber {
    conn_id: u64,
    outbox: Arc<Outbox>,
}

struct Topic {
    sequence: u64,
    subscribers: Vec<Subscriber>,
}

#[derive(Default)]
struct HubState {
    topics: HashMap<String, Topic>,
    subscriptions: u64,
    closed: bool,
}

/// Outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Queued for `delivered` subscribers; `cut` slow consumers were removed.
    Queued {
        /// Subscribers the event was queued for.
        delivered: usize,
        /// Subscribers removed as slow consumers by this publish.
        cut: usize,
    },
    /// The hub is shutting down; nothing was queued.
    ShuttingDown,
}

/// Topics and subscribers of one daemon.
pub struct Hub {
    state: Mutex<HubState>,
    max_frame_len: usize,
}

impl Hub {
    /// An empty hub; events are limited to `max_frame_len` like any frame.
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            max_frame_len,
        }
    }

    /// Subscribes `conn_id` to `topic` (idempotent). Returns whether it is new.
    pub fn subscribe(&self, topic: &str, conn_id: u64, outbox: &Arc<Outbox>) -> bool {
        let mut st = lock(&self.state);
        let entry = st.topics.entry(topic.to_owned()).or_insert_with(|| Topic {
            sequence: 0,
            subscribers: Vec::new(),
        });
        if entry.subscribers.iter().any(|s| s.conn_id == conn_id) {
            return false;
        }
        entry.subscribers.push(Subscriber {
            conn_id,
            outbox: Arc::clone(outbox),
        });
        st.subscriptions += 1;
        true
    }

    /// Removes `conn_id` from `topic`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, topic: &str, conn_id: u64) -> bool {
        let mut st = lock(&self.state);
        let Some(entry) = st.topics.get_mut(topic) else {
            return false;
        };
        let before = entry.subscribers.len();
        entry.subscribers.retain(|s| s.conn_id != conn_id);
        let removed = before - entry.subscribers.len();
        if entry.subscribers.is_empty() {
            st.topics.remove(topic);
        }
        st.subscriptions -= removed as u64;
        removed > 0
    }

    /// Queues one event for every current subscriber of `topic`. The event
    /// is encoded once; its sequence number is the topic's next.
    pub fn publish(&self, topic: &str, payload: Bytes) -> Result<Published, FrameError> {
        let mut wake = Vec::new();
        let published = self.publish_batched(topic, payload, &mut wake);
        for outbox in wake {
            outbox.wake();
        }
        published
    }

    /// [`Self::publish`] that appends the subscribers to wake to `wake`
    /// instead of waking them; the caller wakes them (see
    /// [`Outbox::push_quiet`]) once it has handled its batch of requests.
    pub fn publish_batched(
        &self,
        topic: &str,
        payload: Bytes,
        wake: &mut Vec<Arc<Outbox>>,
    ) -> Result<Published, FrameError> {
        let mut st = lock(&self.state);
        if st.closed {
            return Ok(Published::ShuttingDown);
        }
        let Some(entry) = st.topics.get_mut(topic) else {
            return Ok(Published::Queued {
                delivered: 0,
                cut: 0,
            });
        };
        let sequence = entry.sequence + 1;
        let frame = if payload.len() >= DIRECT_PAYLOAD {
            Frame {
                head: encode_event_head(topic, sequence, payload.len(), self.max_frame_len)?,
                body: payload,
            }
        } else {
            Frame::from(encode_frame(
                &ServerMessage::Event {
                    topic: topic.to_owned(),
                    sequence,
                    payload,
                },
                self.max_frame_len,
            )?)
        };
        entry.sequence = sequence;
        Ok(fan_out(&mut st, topic, &frame, wake))
    }

    /// Publishes a run of payloads on `topic` as consecutive events (one
    /// per payload, sequence numbers in order, under one lock so no other
    /// publish interleaves), queued for each subscriber as one buffer. All
    /// or nothing: on `FrameTooLarge` nothing is queued and the topic's
    /// numbering is unchanged. For payloads under [`DIRECT_PAYLOAD`]; the
    /// caller wakes `wake` as with [`Self::publish_batched`].
    pub fn publish_many(
        &self,
        topic: &str,
        payloads: &[Bytes],
        wake: &mut Vec<Arc<Outbox>>,
    ) -> Result<Published, FrameError> {
        let mut st = lock(&self.state);
        if st.closed {
            return Ok(Published::ShuttingDown);
        }
        let Some(entry) = st.topics.get_mut(topic) else {
            return Ok(Published::Queued {
                delivered: 0,
                cut: 0,
            });
        };
        if payloads.is_empty() {
            return Ok(Published::Queued {
                delivered: entry.subscribers.len(),
                cut: 0,
            });
        }
        let frame = Frame::from(encode_events(
            topic,
            entry.sequence + 1,
            payloads,
            self.max_frame_len,
        )?);
        entry.sequence += payloads.len() as u64;
        Ok(fan_out(&mut st, topic, &frame, wake))
    }

    /// Refuses every later publish: after this, an Ack'ed publish is one that
    /// is already in its subscribers' outboxes, which shutdown drains.
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// (topics, subscriptions)
    pub fn counts(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.topics.len() as u64, st.subscriptions)
    }
}

/// Queues `frame` for every subscriber of `topic`, removes the ones cut as
/// slow consumers (or already closed), drops the topic if none is left, and
/// collects the outboxes to wake.
fn fan_out(
    st: &mut HubState,
    topic: &str,
    frame: &Frame,
    wake: &mut Vec<Arc<Outbox>>,
) -> Published {
    let Some(entry) = st.topics.get_mut(topic) else {
        return Published::Queued {
            delivered: 0,
            cut: 0,
        };
    };
    let mut delivered = 0;
    let before = entry.subscribers.len();
    entry.subscribers.retain(|s| {
        let (push, needs_wake) = s.outbox.push_quiet(frame);
        if needs_wake {
            wake.push(Arc::clone(&s.outbox));
        }
        match push {
            Push::Queued => {
                delivered += 1;
                true
            }
            Push::Overflow | Push::Closed => false,
        }
    });
    let cut = before - entry.subscribers.len();
    if entry.subscribers.is_empty() {
        st.topics.remove(topic);
    }
    st.subscriptions -= cut as u64;
    Published::Queued { delivered, cut }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{FrameCodec, decode_server_message};
    use tokio_util::codec::Decoder;

    fn events(buf: &mut BytesMut) -> Vec<(String, u64, Bytes)> {
        let mut codec = FrameCodec::default();
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(buf).unwrap() {
            match decode_server_message(&frame).unwrap() {
                ServerMessage::Event {
                    topic,
                    sequence,
                    payload,
                } => out.push((topic, sequence, payload)),
                other => panic!("not an event: {other:?}"),
            }
        }
        out
    }

    #[test]
    fn fan_out_is_in_order_with_contiguous_sequences() {
        let hub = Hub::new(1 << 20);
        let a = Arc::new(Outbox::new(1 << 20));
        let b = Arc::new(Outbox::new(1 << 20));
        assert_eq!(
            hub.publish("t", Bytes::from_static(b"before")).unwrap(),
            Published::Queued {
                delivered: 0,
                cut: 0
            }
        );
        assert!(hub.subscribe("t", 1, &a));
        assert!(!hub.subscribe("t", 1, &a));
        assert!(hub.subscribe("t", 2, &b));
        assert_eq!(hub.counts(), (1, 2));
        for i in 0..10u8 {
            assert_eq!(
                hub.publish("t", Bytes::from(vec![i])).unwrap(),
                Published::Queued {
                    delivered: 2,
                    cut: 0
                }
            );
        }
        for outbox in [&a, &b] {
            let mut buf = BytesMut::new();
            assert_eq!(
                outbox.take(&mut buf, usize::MAX),
                Taken {
                    frames: 10,
                    overflowed: false
                }
            );
            let ev = events(&mut buf);
            assert_eq!(
                ev.iter().map(|e| e.1).collect::<Vec<_>>(),
                (1..=10).collect::<Vec<_>>()
            );
            assert_eq!(
                ev.iter().map(|e| e.2[0]).collect::<Vec<_>>(),
                (0..10).collect::<Vec<_>>()
            );
        }
        assert!(hub.unsubscribe("t", 1));
        assert!(!hub.unsubscribe("t", 1));
        assert_eq!(hub.counts(), (1, 1));
    }

    #[test]
    fn a_full_outbox_cuts_only_that_subscriber() {
        let hub = Hub::new(1 << 20);
        let slow = Arc::new(Outbox::new(100));
        let fast = Arc::new(Outbox::new(1 << 20));
        hub.subscribe("t", 1, &slow);
        hub.subscribe("t", 2, &fast);
        let mut cut_total = 0;
        for _ in 0..10 {
            match hub.publish("t", Bytes::from_static(&[0u8; 30])).unwrap() {
                Published::Queued { cut, .. } => cut_total += cut,
                Published::ShuttingDown => unreachable!(),
            }
        }
        assert_eq!(cut_total, 1);
        assert_eq!(hub.counts(), (1, 1));
        let mut buf = BytesMut::new();
        assert!(slow.take(&mut buf, usize::MAX).overflowed);
        assert!(buf.is_empty(), "an overflowed outbox keeps no frames");
        let mut buf = BytesMut::new();
        assert_eq!(fast.take(&mut buf, usize::MAX).frames, 10);
    }

    #[test]
    fn large_payloads_are_shared_and_stay_in_order() {
        let hub = Hub::new(1 << 20);
        let a = Arc::new(Outbox::new(1 << 22));
        hub.subscribe("t", 1, &a);
        let big = Bytes::from(vec![7u8; DIRECT_PAYLOAD]);
        hub.publish("t", Bytes::from_static(b"small 1")).unwrap();
        hub.publish("t", big.clone()).unwrap();
        hub.publish("t", Bytes::from_static(b"small 2")).unwrap();
        hub.publish("t", big.clone()).unwrap();
        let mut wire = BytesMut::new();
        let mut out = BytesMut::new();
        let mut direct = None;
        let mut rounds = 0;
        while !a.is_empty() || direct.is_some() {
            rounds += 1;
            assert!(rounds < 20);
            a.take_batch(&mut out, usize::MAX, &mut direct);
            // Write direct first, then what was gathered after it.
            if let Some(mut frame) = direct.take() {
                assert_eq!(frame.body.as_ptr(), big.as_ptr(), "the payload was copied");
                wire.extend_from_slice(&frame.head);
                wire.extend_from_slice(&frame.body);
                frame.advance(frame.len());
                assert!(frame.is_empty());
            }
            wire.extend_from_slice(&out);
            out.clear();
        }
        let ev = events(&mut wire);
        assert_eq!(ev.iter().map(|e| e.1).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(&ev[0].2[..], b"small 1");
        assert_eq!(ev[1].2, big);
        assert_eq!(&ev[2].2[..], b"small 2");
        assert_eq!(ev[3].2, big);
    }

    #[test]
    fn a_run_interleaves_in_order_with_single_publishes() {
        let hub = Hub::new(1 << 20);
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe("t", 1, &a);
        let mut wake = Vec::new();
        hub.publish("t", Bytes::from_static(b"0")).unwrap();
        let run: Vec<Bytes> = (1..=5u8).map(|i| Bytes::from(vec![i])).collect();
        assert_eq!(
            hub.publish_many("t", &run, &mut wake).unwrap(),
            Published::Queued {
                delivered: 1,
                cut: 0
            }
        );
        assert_eq!(wake.len(), 0, "the outbox was not empty");
        hub.publish("t", Bytes::from_static(&[6])).unwrap();
        // Too large for the frame limit: nothing queued, numbering kept.
        let small = Hub::new(1024);
        let b = Arc::new(Outbox::new(1 << 20));
        small.subscribe("t", 1, &b);
        let bad = [Bytes::new(), Bytes::from(vec![0u8; 2000])];
        assert!(small.publish_many("t", &bad, &mut wake).is_err());
        assert!(b.is_empty());
        let mut buf = BytesMut::new();
        a.take(&mut buf, usize::MAX);
        let ev = events(&mut buf);
        assert_eq!(
            ev.iter().map(|e| e.1).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        assert_eq!(
            ev.iter().map(|e| e.2[0]).collect::<Vec<_>>(),
            vec![b'0', 1, 2, 3, 4, 5, 6]
        );
        assert_eq!(
            hub.publish_many("none", &run, &mut wake).unwrap(),
            Published::Queued {
                delivered: 0,
                cut: 0
            }
        );
    }

    #[test]
    fn closed_hub_refuses_publishes() {
        let hub = Hub::new(1 << 20);
        let a = Arc::new(Outbox::new(1 << 20));
        hub.subscribe("t", 1, &a);
        hub.close();
        assert_eq!(
            hub.publish("t", Bytes::new()).unwrap(),
            Published::ShuttingDown
        );
        assert!(a.is_empty());
    }
}
