//! The client's multiplexer: many requests in flight on one authenticated
//! connection, replies matched to their callers, events handed to a sink.
//!
//! A writer task sends request frames (batches written at once) and a
//! reader task reads daemon frames; they run independently, so a long
//! pipeline cannot deadlock. Requests get ids 1, 2, 3, ... and a FIFO of
//! outstanding ones: replies come in request order, and each must carry the
//! id of the oldest outstanding request and be of the kind it expects
//! (`Reply` for a call, `Ack` for `Ping`/`Shutdown`, or an `Error` with the
//! id); anything else is a protocol violation and ends the connection.
//!
//! Events are bounded by the event budget: before an event is handed on,
//! the reader takes its size from a semaphore, given back when the
//! application takes the event. When the budget is spent the reader stops
//! reading, so the daemon's slow-consumer policy applies instead of the
//! client's memory growing without bound.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::ClientError;
use crate::codec::FrameCodec;
use crate::error::{DecodeError, FrameError};
use crate::limits::{LENGTH_PREFIX_LEN, WRITE_BATCH_BYTES};
use crate::transport::{CloseReason, DaemonFrame, ErrorCode, ErrorFrame, RequestKind};

/// A successful answer to a request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The body of a `Reply` (the service's reply message).
    Reply(Bytes),
    /// An `Ack`.
    Ack,
}

/// A received event's share of the event budget; given back on drop.
#[derive(Debug)]
pub struct EventPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl EventPermit {
    /// No share (a second copy of an event whose first copy holds it).
    pub(crate) fn none() -> Self {
        Self(None)
    }
}

/// Where received events go.
pub(crate) trait EventSink: Send + Sync + 'static {
    /// An event's body (the service's event message). An error means the
    /// daemon sent something that is not an event of the service: the
    /// connection ends.
    fn deliver(&self, stream: u64, body: Bytes, permit: EventPermit) -> Result<(), DecodeError>;
    /// `missed` events of `stream` were dropped by the daemon.
    fn lagged(&self, stream: u64, missed: u64);
    /// The connection is over.
    fn end(&self, error: &dyn Fn() -> ClientError);
}

/// Discards events (a client without a service type).
pub(crate) struct Discard;

impl EventSink for Discard {
    fn deliver(&self, _stream: u64, _body: Bytes, _permit: EventPermit) -> Result<(), DecodeError> {
        Ok(())
    }
    fn lagged(&self, _stream: u64, _missed: u64) {}
    fn end(&self, _error: &dyn Fn() -> ClientError) {}
}

struct Pending {
    id: u64,
    kind: RequestKind,
    reply: oneshot::Sender<Result<Answer, ClientError>>,
}

/// Why the connection is over.
#[derive(Debug, Clone, Default)]
struct Ended {
    reason: Option<CloseReason>,
    fatal: Option<ErrorFrame>,
    protocol: Option<String>,
    /// The event budget, if the reader had stopped for it and the
    /// application had not caught up when the socket ended.
    behind: Option<usize>,
}

impl Ended {
    fn error(&self) -> ClientError {
        if let Some(why) = &self.protocol {
            return ClientError::Protocol(why.clone());
        }
        match &self.fatal {
            Some(fatal) => ClientError::from_error_frame(fatal.clone()),
            None => match (self.reason, self.behind) {
                (None, Some(budget)) => ClientError::FellBehind { budget },
                (reason, _) => ClientError::Closed { reason },
            },
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: VecDeque<Pending>,
    ended: Option<Ended>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sending half, shared by every clone of a client.
pub(crate) struct Mux {
    state: Arc<Mutex<State>>,
    writer: mpsc::UnboundedSender<Bytes>,
    max_frame_len: usize,
}

impl Mux {
    /// Starts the writer and reader tasks on an authenticated stream.
    pub fn start(
        stream: UnixStream,
        max_frame_len: usize,
        budget: usize,
        sink: Arc<dyn EventSink>,
    ) -> Self {
        let (read, write) = stream.into_split();
        let state = Arc::new(Mutex::new(State {
            next_id: 1,
            ..State::default()
        }));
        let (writer, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, rx));
        let budget = budget.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
        tokio::spawn(read_loop(
            FramedRead::new(read, FrameCodec::new(max_frame_len)),
            Arc::clone(&state),
            sink,
            Budget {
                semaphore: Arc::new(Semaphore::new(budget)),
                total: budget as u32,
            },
        ));
        Self {
            state,
            writer,
            max_frame_len,
        }
    }

    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Sends a request frame built by `encode` (with id 0: the real id is
    /// patched in) and returns where its answer will arrive.
    pub fn send(
        &self,
        kind: RequestKind,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        self.send_with(kind, encode, |_| {})
    }

    /// [`Self::send`], telling `on_id` the request's id before the frame
    /// can reach the daemon (so that whatever answers it later, an event
    /// naming the id, finds its route in place).
    pub fn send_with(
        &self,
        kind: RequestKind,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
        on_id: impl FnOnce(u64),
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        let mut frame = BytesMut::new();
        encode(&mut frame)?;
        let (reply, rx) = oneshot::channel();
        let mut st = lock(&self.state);
        if let Some(ended) = &st.ended {
            return Err(ended.error());
        }
        let id = st.next_id;
        st.next_id += 1;
        frame[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + 8].copy_from_slice(&id.to_le_bytes());
        on_id(id);
        // Queued and sent under one lock: the FIFO is in the wire's order.
        if self.writer.send(frame.freeze()).is_err() {
            return Err(ClientError::Closed { reason: None });
        }
        st.pending.push_back(Pending { id, kind, reply });
        Ok(rx)
    }

    /// Sends a `Call` whose answer nobody waits for (an unsubscribe from a
    /// `Drop`, say): the reply is read and discarded.
    pub fn send_detached<R: serde::Serialize + ?Sized>(&self, request: &R) {
        let max = self.max_frame_len;
        let _ = self.send(RequestKind::Call, |dst| {
            crate::transport::encode_request(dst, 0, RequestKind::Call, Some(request), max)
        });
    }

    /// Why requests fail now that the connection is over.
    pub fn ended_error(&self) -> ClientError {
        lock(&self.state)
            .ended
            .as_ref()
            .map(Ended::error)
            .unwrap_or(ClientError::Closed { reason: None })
    }
}

async fn write_loop(mut write: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if frame.len() >= WRITE_BATCH_BYTES {
                // Large: written as it is, after what was gathered before it.
                if write.write_all(&batch).await.is_err() || write.write_all(&frame).await.is_err()
                {
                    return;
                }
                batch.clear();
            } else {
                batch.put_slice(&frame);
            }
            if batch.len() < WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
        if batch.capacity() > WRITE_BATCH_BYTES * 4 {
            batch = BytesMut::new();
        }
    }
    let _ = write.shutdown().await;
}

async fn read_loop(
    mut frames: FramedRead<OwnedReadHalf, FrameCodec>,
    state: Arc<Mutex<State>>,
    sink: Arc<dyn EventSink>,
    budget: Budget,
) {
    let mut ended = Ended::default();
    while let Some(frame) = frames.next().await {
        // Caught up: the application has taken every event it was given.
        if ended.behind.is_some() && budget.semaphore.available_permits() == budget.total as usize {
            ended.behind = None;
        }
        let frame = match frame {
            Ok(frame) => frame.freeze(),
            Err(FrameError::FrameTooLarge { len, max }) => {
                ended.protocol = Some(format!(
                    "the daemon sent a frame of {len} bytes, over its announced limit of {max}"
                ));
                break;
            }
            Err(_) => break,
        };
        let msg = match DaemonFrame::decode(&frame) {
            Ok(msg) => msg,
            Err(err) => {
                ended.protocol = Some(format!("undecodable frame from the daemon: {err}"));
                break;
            }
        };
        // An Error whose id presence contradicts its code (section 8):
        // codes that close have none, the others always have one.
        if let DaemonFrame::Error(ErrorFrame { id, code, .. }) = &msg {
            let closes = matches!(code, ErrorCode::Transport(t) if t.closes_connection());
            if id.is_some() == closes {
                ended.protocol = Some(format!(
                    "an Error with code {} {} an id",
                    code.wire(),
                    if closes { "carries" } else { "lacks" }
                ));
                break;
            }
        }
        let (id, answer) = match msg {
            DaemonFrame::Reply { id, body } => (id, Ok(Answer::Reply(body))),
            DaemonFrame::Ack { id } => (id, Ok(Answer::Ack)),
            DaemonFrame::Error(ErrorFrame {
                id: Some(id),
                code,
                message,
            }) => (
                id,
                Err(ClientError::from_error_frame(ErrorFrame {
                    id: Some(id),
                    code,
                    message,
                })),
            ),
            DaemonFrame::Lagged { stream, missed } => {
                sink.lagged(stream, missed);
                continue;
            }
            DaemonFrame::Event { stream, body } => {
                // An event larger than the whole budget takes all of it.
                let want = u32::try_from(frame.len())
                    .unwrap_or(u32::MAX)
                    .clamp(1, budget.total);
                let permit = match Arc::clone(&budget.semaphore).try_acquire_many_owned(want) {
                    Ok(permit) => permit,
                    Err(_) => {
                        // The application is not taking its events: stop
                        // reading until it does (the daemon's queue for us
                        // fills meanwhile, and it may cut us).
                        ended.behind = Some(budget.total as usize);
                        let Ok(permit) =
                            Arc::clone(&budget.semaphore).acquire_many_owned(want).await
                        else {
                            break;
                        };
                        permit
                    }
                };
                if let Err(err) = sink.deliver(stream, body, EventPermit(Some(permit))) {
                    ended.protocol = Some(format!("the daemon sent an undecodable event: {err}"));
                    break;
                }
                continue;
            }
            DaemonFrame::Closing(reason) => {
                ended.reason = Some(reason);
                break;
            }
            DaemonFrame::Error(fatal) => {
                ended.fatal = Some(fatal);
                break;
            }
            DaemonFrame::Welcome(_) => {
                ended.protocol = Some("a second Welcome".into());
                break;
            }
        };
        let pending = lock(&state).pending.pop_front();
        let Some(pending) = pending else {
            ended.protocol = Some(format!("a reply (id {id}) with no request outstanding"));
            break;
        };
        let kind_ok = matches!(
            (&answer, pending.kind),
            (Ok(Answer::Reply(_)), RequestKind::Call)
                | (Ok(Answer::Ack), RequestKind::Ping | RequestKind::Shutdown)
                | (Err(_), _)
        );
        if pending.id != id || !kind_ok {
            let why = format!(
                "a reply with id {id} ({}) where the reply to request {} ({:?}) was due",
                match &answer {
                    Ok(Answer::Reply(_)) => "Reply",
                    Ok(Answer::Ack) => "Ack",
                    Err(_) => "Error",
                },
                pending.id,
                pending.kind
            );
            let _ = pending.reply.send(Err(ClientError::Protocol(why.clone())));
            ended.protocol = Some(why);
            break;
        }
        let _ = pending.reply.send(answer);
    }
    let pending = {
        let mut st = lock(&state);
        st.ended = Some(ended.clone());
        std::mem::take(&mut st.pending)
    };
    for p in pending {
        let _ = p.reply.send(Err(ended.error()));
    }
    sink.end(&|| ended.error());
}

/// The event budget: a semaphore of bytes, and its size.
struct Budget {
    semaphore: Arc<Semaphore>,
    total: u32,
}

impl ClientError {
    pub(crate) fn from_error_frame(frame: ErrorFrame) -> Self {
        match frame.code {
            ErrorCode::Service(code) => ClientError::Service {
                code,
                message: frame.message,
            },
            ErrorCode::Transport(code) => ClientError::Daemon {
                id: frame.id,
                code,
                message: frame.message,
            },
        }
    }
}
