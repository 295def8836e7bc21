//! [`HubClient`]: the hub's API over the generic client: publish and
//! subscribe (each [`Subscription`] is one of the connection's event
//! streams), request/reply between clients ([`HubClient::request`],
//! [`HubClient::serve`]), and figures.
//!
//! Routes are put in place before the request that opens them is sent (a
//! subscription's id is chosen here, a request's id is known before its
//! frame is queued), so no event that answers a request can arrive before
//! its route. A dropped [`Subscription`] unsubscribes, a dropped
//! [`Responder`] stops serving, and a dropped [`IncomingRequest`] that was
//! not answered is failed, so that its requester is not left waiting.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::mux::{EventPermit, EventSink, Mux};
use super::{ClientError, ConnectOptions, RawClient};
use crate::encoding::{self, Payload};
use crate::error::DecodeError;
use crate::hub::{
    Failure, Hub, HubError, HubEvent, HubReply, HubRequest, HubStatus, Lag, Outcome, TopicList,
};
use crate::service::Interface;
use crate::transport::{EVENT_HEADER_LEN, Welcome};

/// An event received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The topic it was published on (matched by the subscription's
    /// pattern).
    pub topic: String,
    /// Per topic and daemon instance; consecutive while the subscription
    /// lives, unless a [`Received::Lagged`] says how many were dropped.
    pub sequence: u64,
    /// The publisher's bytes.
    pub payload: Bytes,
}

/// One item of a [`Subscription`]: an event, or the explicit news that
/// events were lost. Nothing is lost without one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// The next event.
    Event(Event),
    /// The daemon dropped this many of the subscription's events (it was
    /// subscribed with [`Lag::DropOldest`] and fell behind); the next event
    /// follows them.
    Lagged {
        /// Events dropped.
        missed: u64,
    },
    /// The connection was lost and a [`ReconnectingHub`] connected and
    /// subscribed again: events published meanwhile were missed. With
    /// `restarted`, the daemon is another instance (`Welcome.instance_id`
    /// changed), so sequence numbers start again.
    ///
    /// [`ReconnectingHub`]: super::ReconnectingHub
    Reconnected {
        /// Whether the daemon restarted.
        restarted: bool,
    },
}

impl Received {
    /// The event, if this is one.
    pub fn event(self) -> Option<Event> {
        match self {
            Received::Event(event) => Some(event),
            _ => None,
        }
    }
}

/// What can go wrong with a request to a served name: each outcome the
/// hub defines, and the client's own errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Nobody serves the name (answered at once).
    #[error("no responders: nobody serves {name:?}")]
    NoResponders {
        /// The name.
        name: String,
    },
    /// Every responder of the name has the most requests in flight.
    #[error("every responder of {name:?} is busy")]
    Busy {
        /// The name.
        name: String,
    },
    /// The responder's connection ended before it answered.
    #[error("the responder went away before answering")]
    ResponderGone,
    /// The request's timeout passed.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The responder's reply would be over the frame limit.
    #[error("the responder's reply of {len} bytes is over the frame limit")]
    ReplyTooLarge {
        /// Its length.
        len: u64,
    },
    /// The responder could not answer.
    #[error("the responder failed: {message}")]
    Failed {
        /// What it says.
        message: String,
    },
    /// A typed reply did not decode as the type asked for.
    #[error("the reply is not a {what}")]
    Decode {
        /// The type asked for.
        what: &'static str,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The client's own errors (the connection, the daemon's refusals).
    #[error(transparent)]
    Client(#[from] ClientError),
}

type Item<T> = Result<(T, EventPermit), ClientError>;
type Sender<T> = mpsc::UnboundedSender<Item<T>>;

/// A request for a served name, as the router hands it on.
#[derive(Debug)]
struct Incoming {
    token: u64,
    name: String,
    uid: u32,
    pid: u32,
    payload: Bytes,
}

/// Routes each event to its subscription, response or responder.
struct Router {
    /// Subscription id -> (pattern, route).
    subscriptions: Mutex<HashMap<u64, (String, Sender<Received>)>>,
    responses: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    served: Mutex<HashMap<String, Sender<Incoming>>>,
    /// The connection, to fail requests for names no longer served.
    mux: OnceLock<Weak<Mux>>,
    /// Set once the connection has ended.
    ended: tokio::sync::watch::Sender<bool>,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            subscriptions: Mutex::default(),
            responses: Mutex::default(),
            served: Mutex::default(),
            mux: OnceLock::new(),
            ended: tokio::sync::watch::channel(false).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    fn detached(&self, request: &HubRequest) {
        if let Some(mux) = self.mux.get().and_then(Weak::upgrade) {
            mux.send_detached(request);
        }
    }
}

impl EventSink for Router {
    fn deliver(&self, stream: u64, body: Bytes, permit: EventPermit) -> Result<(), DecodeError> {
        match encoding::decode_shared::<HubEvent>(&body)? {
            HubEvent::Message {
                topic,
                sequence,
                payload,
            } => {
                let event = Event {
                    topic,
                    sequence,
                    payload: payload.into_bytes(),
                };
                let mut subs = lock(&self.subscriptions);
                if let Some((_, tx)) = subs.get(&stream) {
                    if tx.send(Ok((Received::Event(event), permit))).is_err() {
                        subs.remove(&stream);
                    }
                }
            }
            HubEvent::Request {
                token,
                name,
                uid,
                pid,
                payload,
            } => {
                let incoming = Incoming {
                    token,
                    name,
                    uid,
                    pid,
                    payload: payload.into_bytes(),
                };
                let mut served = lock(&self.served);
                let refused = match served.get(&incoming.name) {
                    Some(tx) => match tx.send(Ok((incoming, permit))) {
                        Ok(()) => None,
                        Err(mpsc::error::SendError(Ok((incoming, _)))) => {
                            served.remove(&incoming.name);
                            Some(incoming.token)
                        }
                        Err(_) => None,
                    },
                    None => Some(incoming.token),
                };
                drop(served);
                if let Some(token) = refused {
                    self.detached(&HubRequest::Fail {
                        token,
                        failure: Failure::Failed {
                            message: "the responder no longer serves this name".into(),
                        },
                    });
                }
            }
            HubEvent::Response { request, outcome } => {
                if let Some(tx) = lock(&self.responses).remove(&request) {
                    let _ = tx.send(outcome);
                }
            }
        }
        Ok(())
    }

    fn lagged(&self, stream: u64, missed: u64) {
        if let Some((_, tx)) = lock(&self.subscriptions).get(&stream) {
            let _ = tx.send(Ok((Received::Lagged { missed }, EventPermit::none())));
        }
    }

    fn end(&self, error: &dyn Fn() -> ClientError) {
        for (_, tx) in std::mem::take(&mut *lock(&self.subscriptions)).into_values() {
            let _ = tx.send(Err(error()));
        }
        for tx in std::mem::take(&mut *lock(&self.served)).into_values() {
            let _ = tx.send(Err(error()));
        }
        // Waiting requesters see their sender dropped and report the end.
        lock(&self.responses).clear();
        self.ended.send_replace(true);
    }
}

/// A client of the hub (keyholed's service). Cheap to clone; all clones
/// share the connection, which closes when the last clone (and the last
/// [`Subscription`], [`Responder`] and [`IncomingRequest`]) is dropped.
///
/// ```no_run
/// use keyhole::client::HubClient;
/// use futures_util::StreamExt;
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = HubClient::connect().await?;
/// let mut temps = hub.subscribe("sensors.*.temp").await?;
/// assert_eq!(hub.publish("sensors.kitchen.temp", "21.5").await?, 1);
/// let event = temps.next().await.expect("an item")?.event().expect("an event");
/// assert_eq!(event.topic, "sensors.kitchen.temp");
///
/// let mut clock = hub.serve("svc.clock").await?;
/// tokio::spawn(async move {
///     while let Some(Ok(request)) = clock.next().await {
///         let _ = request.reply("12:00").await;
///     }
/// });
/// assert_eq!(&hub.request("svc.clock", "now?").await?[..], b"12:00");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HubClient {
    raw: RawClient,
    router: Arc<Router>,
    next_sid: Arc<AtomicU64>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Connects to a daemon serving the hub.
    pub async fn connect_hub(&self) -> Result<HubClient, ClientError> {
        let router = Arc::new(Router::default());
        let raw = self
            .connect_with_sink(
                Arc::clone(&router) as Arc<dyn EventSink>,
                Some((Hub::NAME, Hub::VERSION)),
            )
            .await?;
        let _ = router.mux.set(raw.downgrade());
        Ok(HubClient {
            raw,
            router,
            next_sid: Arc::new(AtomicU64::new(self.next_subscription_id_or_default())),
        })
    }

    /// [`Self::connect_hub`] until `deadline`, as
    /// [`ConnectOptions::connect_retrying`].
    pub async fn connect_hub_retrying(&self, deadline: Duration) -> Result<HubClient, ClientError> {
        let until = std::time::Instant::now() + deadline;
        loop {
            let attempt = async {
                let client = self.connect_hub().await?;
                client.welcome().await?;
                Ok::<_, ClientError>(client)
            };
            match attempt.await {
                Ok(client) => return Ok(client),
                Err(err) if std::time::Instant::now() < until && err.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl HubClient {
    /// Connects from the environment and defaults.
    pub async fn connect() -> Result<Self, ClientError> {
        ConnectOptions::new().connect_hub().await
    }

    /// What the daemon said in `Welcome` (see [`RawClient::welcome`]).
    pub async fn welcome(&self) -> Result<Arc<Welcome>, ClientError> {
        self.raw.welcome().await
    }

    /// The transport-level client.
    pub fn raw(&self) -> &RawClient {
        &self.raw
    }

    /// Resolves once the connection has ended (for whatever reason). It
    /// does not keep the connection open.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut ended = self.router.ended.subscribe();
        async move {
            let _ = ended.wait_for(|ended| *ended).await;
        }
    }

    /// Sends a hub request and waits for its reply (at most the connect
    /// options' timeout).
    pub async fn call(&self, request: HubRequest) -> Result<HubReply, ClientError> {
        self.call_timeout(request, self.raw.timeout()).await
    }

    /// [`Self::call`] with its own timeout.
    pub async fn call_timeout(
        &self,
        request: HubRequest,
        timeout: Duration,
    ) -> Result<HubReply, ClientError> {
        let body = self.raw.call_raw(&request, timeout).await?;
        decode_reply(&body)
    }

    /// Round trip with `Ping`/`Ack`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.raw.ping().await
    }

    /// Asks the daemon to shut down (allowed to the daemon's own uid).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.raw.shutdown().await
    }

    /// The daemon's figures.
    pub async fn status(&self) -> Result<HubStatus, ClientError> {
        match self.call(HubRequest::Status).await? {
            HubReply::Status(status) => Ok(status),
            other => Err(unexpected("Status", &other)),
        }
    }

    /// Every pattern subscribed and name served, with their counts.
    pub async fn topics(&self) -> Result<TopicList, ClientError> {
        match self.call(HubRequest::Topics).await? {
            HubReply::Topics(list) => Ok(list),
            other => Err(unexpected("Topics", &other)),
        }
    }

    /// Publishes on `topic`; returns once the event is queued, with the
    /// number of subscriptions it was queued for.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        let request = HubRequest::Publish {
            topic: topic.to_owned(),
            payload: Payload::from(payload.into()),
        };
        match self.call(request).await? {
            HubReply::Published { receivers } => Ok(receivers),
            other => Err(unexpected("Published", &other)),
        }
    }

    /// Subscribes to the topics `pattern` matches (`*` one token, a final
    /// `>` the rest); a subscriber that falls behind is disconnected
    /// ([`Lag::Disconnect`]).
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, ClientError> {
        self.subscribe_with(pattern, Lag::Disconnect).await
    }

    /// [`Self::subscribe`] with a lag policy.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        lag: Lag,
    ) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sid = {
            let mut subs = lock(&self.router.subscriptions);
            // Chosen under the routes' lock: never 0 (2^64 - 1 is followed
            // by 1), never a sid still in use. The routes are far fewer
            // than 2^64 - 1, so this ends.
            let sid = loop {
                let sid = self.next_sid.load(Ordering::Relaxed);
                let next = sid.checked_add(1).unwrap_or(1);
                self.next_sid.store(next, Ordering::Relaxed);
                if sid != 0 && !subs.contains_key(&sid) {
                    break sid;
                }
            };
            // In place before the request is sent: no event after the
            // reply can be missed.
            subs.insert(sid, (pattern.to_owned(), tx));
            sid
        };
        let result = self
            .call(HubRequest::Subscribe {
                sid,
                pattern: pattern.to_owned(),
                lag,
            })
            .await;
        match result {
            Ok(HubReply::Subscribed) => Ok(Subscription {
                sid,
                pattern: pattern.to_owned(),
                events: rx,
                client: self.clone(),
            }),
            other => {
                lock(&self.router.subscriptions).remove(&sid);
                Err(match other {
                    Ok(reply) => unexpected("Subscribed", &reply),
                    Err(err) => err,
                })
            }
        }
    }

    /// Ends every subscription of this client to `pattern`: their streams
    /// end (`None`) once the daemon has confirmed.
    pub async fn unsubscribe(&self, pattern: &str) -> Result<(), ClientError> {
        let sids: Vec<u64> = {
            let mut subs = lock(&self.router.subscriptions);
            let sids: Vec<u64> = subs
                .iter()
                .filter(|(_, (p, _))| p == pattern)
                .map(|(sid, _)| *sid)
                .collect();
            for sid in &sids {
                subs.remove(sid);
            }
            sids
        };
        for sid in sids {
            match self.call(HubRequest::Unsubscribe { sid }).await? {
                HubReply::Unsubscribed => {}
                other => return Err(unexpected("Unsubscribed", &other)),
            }
        }
        Ok(())
    }

    /// Serves `name`: requests sent to it arrive on the returned stream
    /// (spread over every connection serving it). Dropping the stream stops
    /// serving.
    pub async fn serve(&self, name: &str) -> Result<Responder, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        if lock(&self.router.served)
            .insert(name.to_owned(), tx)
            .is_some()
        {
            return Err(ClientError::Protocol(format!(
                "this client already serves {name:?}"
            )));
        }
        match self
            .call(HubRequest::Serve {
                name: name.to_owned(),
            })
            .await
        {
            Ok(HubReply::Serving) => Ok(Responder {
                name: name.to_owned(),
                requests: rx,
                client: self.clone(),
            }),
            other => {
                lock(&self.router.served).remove(name);
                Err(match other {
                    Ok(reply) => unexpected("Serving", &reply),
                    Err(err) => err,
                })
            }
        }
    }

    /// Sends `payload` to whoever serves `name` and waits for the reply, at
    /// most the connect options' timeout.
    pub async fn request(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, RequestError> {
        self.request_timeout(name, payload, self.raw.timeout())
            .await
    }

    /// [`Self::request`] with its own timeout (the daemon enforces it:
    /// after it, the outcome is [`RequestError::Timeout`]).
    pub async fn request_timeout(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let timeout_ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let request = HubRequest::Request {
            name: name.to_owned(),
            timeout_ms,
            payload: Payload::from(payload.into()),
        };
        let (tx, rx) = oneshot::channel();
        let mut id = None;
        let reply = self
            .raw
            .call_raw_with(&request, self.raw.timeout().max(timeout), |assigned| {
                id = Some(assigned);
                lock(&self.router.responses).insert(assigned, tx);
            })
            .await;
        let forget = |id: Option<u64>| {
            if let Some(id) = id {
                lock(&self.router.responses).remove(&id);
            }
        };
        match reply.and_then(|body| decode_reply(&body)) {
            Ok(HubReply::Requested) => {}
            Ok(other) => {
                forget(id);
                return Err(unexpected("Requested", &other).into());
            }
            Err(err) => {
                forget(id);
                return Err(match err {
                    ClientError::Service { code, .. } if code == HubError::NO_RESPONDERS => {
                        RequestError::NoResponders { name: name.into() }
                    }
                    ClientError::Service { code, .. } if code == HubError::BUSY => {
                        RequestError::Busy { name: name.into() }
                    }
                    other => other.into(),
                });
            }
        }
        // The daemon ends every request in an outcome, its timeout
        // included; a little more is allowed for the outcome to arrive.
        let outcome = match tokio::time::timeout(timeout + Duration::from_secs(5), rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => return Err(self.raw.ended().into()),
            Err(_) => {
                forget(id);
                return Err(RequestError::Timeout(timeout));
            }
        };
        match outcome {
            Outcome::Reply { payload } => Ok(payload.into_bytes()),
            Outcome::ResponderGone => Err(RequestError::ResponderGone),
            Outcome::Timeout => Err(RequestError::Timeout(timeout)),
            Outcome::ReplyTooLarge { len } => Err(RequestError::ReplyTooLarge { len }),
            Outcome::Failed { message } => Err(RequestError::Failed { message }),
        }
    }

    /// [`Self::request`] with typed messages, encoded as the protocol's
    /// other messages are (section 5 of proto-spec.md).
    pub async fn request_as<Q: Serialize, A: DeserializeOwned>(
        &self,
        name: &str,
        request: &Q,
    ) -> Result<A, RequestError> {
        let body = encoding::encode(request).map_err(|err| {
            RequestError::Client(ClientError::Frame(crate::error::FrameError::Encode(err)))
        })?;
        let reply = self.request(name, body).await?;
        encoding::decode(&reply).map_err(|source| RequestError::Decode {
            what: std::any::type_name::<A>(),
            source,
        })
    }
}

fn decode_reply(body: &Bytes) -> Result<HubReply, ClientError> {
    encoding::decode_shared(body).map_err(|err| {
        ClientError::Protocol(format!(
            "a reply that is not a reply of {}: {err}",
            Hub::NAME
        ))
    })
}

fn unexpected(wanted: &str, got: &HubReply) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

/// The items of one subscription, in order: events and lag notices; ends
/// with an error item if the connection ends (`Closed{SlowConsumer}`, say),
/// then `None`. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: u64,
    pattern: String,
    events: mpsc::UnboundedReceiver<Item<Received>>,
    client: HubClient,
}

impl Subscription {
    /// The next item; `None` once the subscription has ended.
    pub async fn receive(&mut self) -> Option<Result<Received, ClientError>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The next event. A loss is an error item,
    /// [`ClientError::Lagged`], after which the subscription goes on with
    /// the events that follow it.
    pub async fn next_event(&mut self) -> Option<Result<Event, ClientError>> {
        match self.receive().await? {
            Ok(Received::Event(event)) => Some(Ok(event)),
            Ok(Received::Lagged { missed }) => Some(Err(ClientError::Lagged { missed })),
            Ok(Received::Reconnected { restarted }) => {
                Some(Err(ClientError::Reconnected { restarted }))
            }
            Err(err) => Some(Err(err)),
        }
    }

    /// Ends the subscription, waiting for the daemon to confirm; events
    /// still on their way are discarded.
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        lock(&self.client.router.subscriptions).remove(&self.sid);
        match self
            .client
            .call(HubRequest::Unsubscribe { sid: self.sid })
            .await?
        {
            HubReply::Unsubscribed => Ok(()),
            other => Err(unexpected("Unsubscribed", &other)),
        }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The next item with its share of the event budget (given back when
    /// it is dropped): a [`super::ReconnectingHub`] hands items on without
    /// letting the budget go.
    pub(crate) async fn receive_with_permit(
        &mut self,
    ) -> Option<Result<(Received, EventPermit), ClientError>> {
        self.events.recv().await
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Received, ClientError>>> {
        // The event's share of the event budget is given back as it is
        // handed over.
        self.events
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(|(received, _permit)| received)))
    }
}

impl Stream for Subscription {
    type Item = Result<Received, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_item(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if lock(&self.client.router.subscriptions)
            .remove(&self.sid)
            .is_some()
        {
            self.client
                .router
                .detached(&HubRequest::Unsubscribe { sid: self.sid });
        }
    }
}

/// Requests sent to a name this client serves. Dropping it stops serving
/// (requests already given to this client are failed).
#[derive(Debug)]
pub struct Responder {
    name: String,
    requests: mpsc::UnboundedReceiver<Item<Incoming>>,
    client: HubClient,
}

impl Responder {
    /// The next request; `None` once the connection has ended.
    pub async fn next_request(&mut self) -> Option<Result<IncomingRequest, ClientError>> {
        std::future::poll_fn(|cx| self.poll_request(cx)).await
    }

    /// The name served.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn poll_request(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<IncomingRequest, ClientError>>> {
        self.requests.poll_recv(cx).map(|item| {
            item.map(|r| {
                r.map(|(incoming, _permit)| IncomingRequest {
                    incoming,
                    client: self.client.clone(),
                    answered: false,
                })
            })
        })
    }
}

impl Stream for Responder {
    type Item = Result<IncomingRequest, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_request(cx)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if lock(&self.client.router.served)
            .remove(&self.name)
            .is_some()
        {
            self.client.router.detached(&HubRequest::Unserve {
                name: self.name.clone(),
            });
        }
        // What had already arrived is failed, not left to time out.
        self.requests.close();
        while let Ok(Ok((incoming, _))) = self.requests.try_recv() {
            drop(IncomingRequest {
                incoming,
                client: self.client.clone(),
                answered: false,
            });
        }
    }
}

/// One request to answer, with who sent it. Dropping it unanswered fails
/// it ("dropped without an answer"), so its requester is not left waiting.
#[derive(Debug)]
pub struct IncomingRequest {
    incoming: Incoming,
    client: HubClient,
    answered: bool,
}

impl IncomingRequest {
    /// The name it was sent to.
    pub fn name(&self) -> &str {
        &self.incoming.name
    }

    /// The requester's uid.
    pub fn uid(&self) -> u32 {
        self.incoming.uid
    }

    /// The requester's pid (0 if the daemon could not see it).
    pub fn pid(&self) -> u32 {
        self.incoming.pid
    }

    /// The requester's bytes.
    pub fn payload(&self) -> &Bytes {
        &self.incoming.payload
    }

    /// The payload decoded as `T` (see [`HubClient::request_as`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        encoding::decode(&self.incoming.payload)
    }

    /// Answers with `payload`: `Ok(true)` if it reached the requester,
    /// `Ok(false)` if the request no longer waits (timed out, requester
    /// gone). A payload too large for the frame limit is not sent: the
    /// requester is told `ReplyTooLarge` and this fails with
    /// [`crate::error::FrameError::FrameTooLarge`].
    pub async fn reply(mut self, payload: impl Into<Bytes>) -> Result<bool, ClientError> {
        self.answered = true;
        let payload = payload.into();
        let max = self.client.welcome().await?.max_frame_len as usize;
        // The requester's `Response` frame: header, request id, outcome tag,
        // length, then the payload.
        let needed = EVENT_HEADER_LEN - 4 + 4 + 8 + 4 + 8 + payload.len();
        if needed > max {
            let len = payload.len() as u64;
            self.answer(HubRequest::Fail {
                token: self.incoming.token,
                failure: Failure::ReplyTooLarge { len },
            })
            .await?;
            return Err(ClientError::Frame(
                crate::error::FrameError::FrameTooLarge {
                    len: needed as u64,
                    max,
                },
            ));
        }
        self.answer(HubRequest::Respond {
            token: self.incoming.token,
            payload: Payload::from(payload),
        })
        .await
    }

    /// [`Self::reply`] with a typed message.
    pub async fn reply_as<T: Serialize>(self, reply: &T) -> Result<bool, ClientError> {
        let body = encoding::encode(reply).map_err(|err| ClientError::Frame(err.into()))?;
        self.reply(body).await
    }

    /// Answers with a failure: the requester gets [`RequestError::Failed`].
    pub async fn fail(mut self, message: &str) -> Result<bool, ClientError> {
        self.answered = true;
        self.answer(HubRequest::Fail {
            token: self.incoming.token,
            failure: Failure::Failed {
                message: message.to_owned(),
            },
        })
        .await
    }

    async fn answer(&self, request: HubRequest) -> Result<bool, ClientError> {
        match self.client.call(request).await? {
            HubReply::Responded { delivered } => Ok(delivered),
            other => Err(unexpected("Responded", &other)),
        }
    }
}

impl Drop for IncomingRequest {
    fn drop(&mut self) {
        if !self.answered {
            self.client.router.detached(&HubRequest::Fail {
                token: self.incoming.token,
                failure: Failure::Failed {
                    message: "the responder dropped the request without an answer".into(),
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RequestError;
    use crate::error::{DecodeError, Report};

    #[test]
    fn a_reply_that_does_not_decode_names_its_cause_once() {
        let err = RequestError::Decode {
            what: "u64",
            source: DecodeError::InvalidBool { got: 7 },
        };
        assert_eq!(
            Report(&err).to_string(),
            "the reply is not a u64: invalid boolean byte 7"
        );
    }
}
