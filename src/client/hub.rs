//! [`HubClient`]: the hub's API (status, publish, subscribe) as a thin
//! layer over the generic client, with events routed to one
//! [`Subscription`] stream per subscribed topic.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::mpsc;

use super::mux::{EventPermit, EventSink};
use super::{ClientError, ConnectOptions, RawClient};
use crate::encoding::{self, Payload};
use crate::error::DecodeError;
use crate::hub::{Hub, HubEvent, HubReply, HubRequest, HubStatus};
use crate::service::Interface;
use crate::transport::Welcome;

/// An event received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The topic.
    pub topic: String,
    /// Per-topic sequence number; consecutive while subscribed.
    pub sequence: u64,
    /// The publisher's bytes.
    pub payload: Bytes,
}

type Sender = mpsc::UnboundedSender<Result<(Event, EventPermit), ClientError>>;

/// Routes each event to the subscriptions of its topic.
#[derive(Default)]
struct Router {
    topics: Mutex<HashMap<String, Vec<Sender>>>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Sender>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventSink for Router {
    fn deliver(&self, body: Bytes, permit: EventPermit) -> Result<(), DecodeError> {
        let HubEvent::Message {
            topic,
            sequence,
            payload,
        } = encoding::decode_shared::<HubEvent>(&body)?;
        let mut topics = self.lock();
        if let Some(subs) = topics.get_mut(&topic) {
            let event = Event {
                topic,
                sequence,
                payload: payload.into_bytes(),
            };
            // One permit for the event: the first subscription carries it,
            // the others (the same topic subscribed twice) share the bytes.
            let mut permit = Some(permit);
            subs.retain(|tx| match permit.take() {
                Some(p) => tx.send(Ok((event.clone(), p))).is_ok(),
                None => tx.send(Ok((event.clone(), EventPermit::none()))).is_ok(),
            });
        }
        Ok(())
    }

    fn end(&self, error: &dyn Fn() -> ClientError) {
        for tx in std::mem::take(&mut *self.lock()).into_values().flatten() {
            let _ = tx.send(Err(error()));
        }
    }
}

/// A client of the hub (keyholed's service). Cheap to clone; all clones
/// share the connection, which closes when the last clone (and the last
/// [`Subscription`]) is dropped.
///
/// ```no_run
/// use keyhole::client::HubClient;
/// use futures_util::StreamExt;
///
/// # async fn example() -> Result<(), keyhole::client::ClientError> {
/// let hub = HubClient::connect().await?;
/// let mut news = hub.subscribe("news").await?;
/// hub.publish("news", "hello").await?;
/// let event = news.next().await.expect("an event")?;
/// assert_eq!(&event.payload[..], b"hello");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HubClient {
    raw: RawClient,
    router: Arc<Router>,
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
            .connect_with_sink(Arc::clone(&router) as Arc<dyn EventSink>)
            .await?;
        raw.require::<Hub>()?;
        Ok(HubClient { raw, router })
    }

    /// [`Self::connect_hub`] until `deadline`, as
    /// [`ConnectOptions::connect_retrying`].
    pub async fn connect_hub_retrying(&self, deadline: Duration) -> Result<HubClient, ClientError> {
        let until = std::time::Instant::now() + deadline;
        loop {
            match self.connect_hub().await {
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

    /// What the daemon said in `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        self.raw.welcome()
    }

    /// The transport-level client.
    pub fn raw(&self) -> &RawClient {
        &self.raw
    }

    /// Sends a hub request and waits for its reply.
    pub async fn call(&self, request: HubRequest) -> Result<HubReply, ClientError> {
        let body = self.raw.call_raw(&request, self.raw.timeout).await?;
        encoding::decode_shared(&body).map_err(|err| {
            ClientError::Protocol(format!(
                "a reply that is not a reply of {}: {err}",
                Hub::NAME
            ))
        })
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

    /// Publishes; returns once the event is queued for every current subscriber.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        let request = HubRequest::Publish {
            topic: topic.to_owned(),
            payload: Payload::from(payload.into()),
        };
        match self.call(request).await? {
            HubReply::Published => Ok(()),
            other => Err(unexpected("Published", &other)),
        }
    }

    /// Subscribes to `topic`; events arrive on the returned stream.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Registered before the request is sent, so no event that follows
        // the reply can be missed.
        self.router
            .lock()
            .entry(topic.to_owned())
            .or_default()
            .push(tx.clone());
        let result = self
            .call(HubRequest::Subscribe {
                topic: topic.to_owned(),
            })
            .await;
        let failed = match result {
            Ok(HubReply::Subscribed) => None,
            Ok(other) => Some(unexpected("Subscribed", &other)),
            Err(err) => Some(err),
        };
        if let Some(err) = failed {
            let mut topics = self.router.lock();
            if let Some(subs) = topics.get_mut(topic) {
                subs.retain(|s| !s.same_channel(&tx));
                if subs.is_empty() {
                    topics.remove(topic);
                }
            }
            return Err(err);
        }
        Ok(Subscription {
            events: rx,
            _client: self.clone(),
        })
    }

    /// Unsubscribes from `topic`; every [`Subscription`] to it on this
    /// client ends.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        match self
            .call(HubRequest::Unsubscribe {
                topic: topic.to_owned(),
            })
            .await?
        {
            HubReply::Unsubscribed => {
                self.router.lock().remove(topic);
                Ok(())
            }
            other => Err(unexpected("Unsubscribed", &other)),
        }
    }
}

fn unexpected(wanted: &str, got: &HubReply) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

/// Events of one subscription, in order; ends with an error item if the
/// daemon closes the connection (`Closed{SlowConsumer}`, say), then `None`.
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::UnboundedReceiver<Result<(Event, EventPermit), ClientError>>,
    _client: HubClient,
}

impl Subscription {
    /// The next event; `None` once the subscription has ended.
    pub async fn next_event(&mut self) -> Option<Result<Event, ClientError>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, ClientError>>> {
        self.events
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(|(event, _permit)| event)))
    }
}

impl Stream for Subscription {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_event(cx)
    }
}
