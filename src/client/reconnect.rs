//! [`ReconnectingHub`]: a hub client that reconnects by itself and
//! subscribes again, and says so in every subscription's stream.
//!
//! One task watches the connection. When it ends (the daemon restarted,
//! was stopped, or cut this client), the task connects again (reading the
//! token again: a restart rotates it), with a pause that grows from 25 ms to
//! 1 s, until it succeeds or every handle is dropped. Then it subscribes
//! every live subscription again and puts [`Received::Reconnected`] in its
//! stream, with `restarted` when `Welcome.instance_id` changed: the gap is
//! never hidden. Calls made while no connection is up wait for one, within
//! the connect options' timeout.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::hub::{Received, RequestError, Subscription};
use super::mux::EventPermit;
use super::{ClientError, ConnectOptions, HubClient};
use crate::hub::{HubStatus, Lag};

type Item = Result<Received, ClientError>;

/// An item in the application's stream, holding its share of the event
/// budget until it is taken, so that the budget bounds this stream too.
type Held = Result<(Received, EventPermit), ClientError>;

/// Resolves when a connection ends.
type Closed = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A subscription the application holds: what to subscribe again.
struct Wanted {
    pattern: String,
    lag: Lag,
    tx: mpsc::UnboundedSender<Held>,
}

struct Shared {
    options: ConnectOptions,
    /// The connection now, if one is up.
    current: watch::Sender<Option<HubClient>>,
    wanted: Mutex<HashMap<u64, Wanted>>,
    next: AtomicU64,
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A hub client that reconnects and resubscribes by itself (see the module
/// doc). Cheap to clone; the connection and the task end when the last
/// clone and the last [`ReconnectingSubscription`] are dropped.
///
/// ```no_run
/// use keyhole::client::ConnectOptions;
/// use keyhole::client::hub::Received;
/// use futures_util::StreamExt;
///
/// # async fn example() -> Result<(), keyhole::client::ClientError> {
/// let hub = ConnectOptions::new().connect_hub_reconnecting().await?;
/// let mut temps = hub.subscribe("sensors.*.temp").await?;
/// while let Some(item) = temps.next().await {
///     match item? {
///         Received::Event(event) => println!("{} {}", event.topic, event.sequence),
///         Received::Lagged { missed } => eprintln!("{missed} events dropped"),
///         Received::Reconnected { restarted } => eprintln!("reconnected (restart: {restarted})"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReconnectingHub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReconnectingHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingHub")
            .field("connected", &self.shared.current.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Connects (as [`Self::connect_hub_retrying`], within the timeout) a
    /// hub client that then reconnects by itself.
    pub async fn connect_hub_reconnecting(&self) -> Result<ReconnectingHub, ClientError> {
        let client = self.connect_hub_retrying(self.timeout_or_default()).await?;
        let shared = Arc::new(Shared {
            options: self.clone(),
            current: watch::channel(None).0,
            wanted: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            stop: CancellationToken::new(),
        });
        let closed = client.closed();
        let instance = client.welcome().await?.instance_id;
        shared.current.send_replace(Some(client));
        tokio::spawn(supervise(
            Arc::downgrade(&shared),
            shared.stop.clone(),
            Box::pin(closed),
            instance,
        ));
        Ok(ReconnectingHub { shared })
    }
}

impl ReconnectingHub {
    /// The connection now, waiting for one (within the connect options'
    /// timeout) while reconnecting.
    pub async fn client(&self) -> Result<HubClient, ClientError> {
        let mut current = self.shared.current.subscribe();
        let wait = current.wait_for(Option::is_some);
        match tokio::time::timeout(self.shared.options.timeout_or_default(), wait).await {
            Ok(Ok(client)) => client.clone().ok_or(ClientError::Closed { reason: None }),
            Ok(Err(_)) => Err(ClientError::Closed { reason: None }),
            Err(_) => Err(ClientError::Timeout {
                what: "a connection to the daemon",
            }),
        }
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.current.borrow().is_some()
    }

    /// [`HubClient::publish`] on the connection now.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.client().await?.publish(topic, payload).await
    }

    /// [`HubClient::request`] on the connection now.
    pub async fn request(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, RequestError> {
        self.client().await?.request(name, payload).await
    }

    /// [`HubClient::status`] on the connection now.
    pub async fn status(&self) -> Result<HubStatus, ClientError> {
        self.client().await?.status().await
    }

    /// [`HubClient::subscribe`], kept across reconnects.
    pub async fn subscribe(&self, pattern: &str) -> Result<ReconnectingSubscription, ClientError> {
        self.subscribe_with(pattern, Lag::Disconnect).await
    }

    /// [`HubClient::subscribe_with`], kept across reconnects.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        lag: Lag,
    ) -> Result<ReconnectingSubscription, ClientError> {
        let client = self.client().await?;
        // Subscribed on this connection first: a pattern the daemon
        // refuses is an error here, not a silent retry forever.
        let subscription = client.subscribe_with(pattern, lag).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.wanted).insert(
            id,
            Wanted {
                pattern: pattern.to_owned(),
                lag,
                tx: tx.clone(),
            },
        );
        tokio::spawn(forward(subscription, tx));
        Ok(ReconnectingSubscription {
            id,
            items: rx,
            hub: self.clone(),
        })
    }
}

/// Moves one connection's items of a subscription into the application's
/// stream, until that connection ends (the supervisor subscribes again) or
/// the application drops the stream.
async fn forward(mut subscription: Subscription, tx: mpsc::UnboundedSender<Held>) {
    loop {
        let item = tokio::select! {
            item = subscription.receive_with_permit() => item,
            // The application dropped the stream: unsubscribe now.
            _ = tx.closed() => return,
        };
        let Some(item) = item else { return };
        match item {
            Ok(received) => {
                if tx.send(Ok(received)).is_err() {
                    return;
                }
            }
            // The connection ended: the supervisor takes it from here.
            Err(_) => return,
        }
    }
}

async fn supervise(
    shared: Weak<Shared>,
    stop: CancellationToken,
    mut closed: Closed,
    mut instance: u64,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut closed => {}
        }
        let Some(s) = shared.upgrade() else { return };
        s.current.send_replace(None);
        let options = s.options.clone();
        drop(s);
        let mut pause = Duration::from_millis(25);
        let client = loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                attempt = async {
                    let client = options.connect_hub().await?;
                    let welcome = client.welcome().await?;
                    Ok::<_, ClientError>((client, welcome))
                } => attempt,
            };
            match attempt {
                Ok(client) => break client,
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        };
        let Some(s) = shared.upgrade() else { return };
        let (client, welcome) = client;
        let restarted = welcome.instance_id != instance;
        instance = welcome.instance_id;
        let wanted: Vec<(u64, String, Lag, mpsc::UnboundedSender<Held>)> = {
            let mut wanted = lock(&s.wanted);
            wanted.retain(|_, w| !w.tx.is_closed());
            wanted
                .iter()
                .map(|(id, w)| (*id, w.pattern.clone(), w.lag, w.tx.clone()))
                .collect()
        };
        for (id, pattern, lag, tx) in wanted {
            match client.subscribe_with(&pattern, lag).await {
                Ok(subscription) => {
                    // The news first, then what the new subscription gets.
                    let news = (Received::Reconnected { restarted }, EventPermit::none());
                    if tx.send(Ok(news)).is_ok() {
                        tokio::spawn(forward(subscription, tx));
                    }
                }
                Err(err) => {
                    // Refused now (it was accepted before): the stream
                    // ends with why.
                    let _ = tx.send(Err(err));
                    lock(&s.wanted).remove(&id);
                }
            }
        }
        closed = Box::pin(client.closed());
        s.current.send_replace(Some(client));
    }
}

/// One subscription of a [`ReconnectingHub`]: its events, lag notices and
/// [`Received::Reconnected`] items, across connections. Dropping it
/// unsubscribes.
pub struct ReconnectingSubscription {
    id: u64,
    items: mpsc::UnboundedReceiver<Held>,
    hub: ReconnectingHub,
}

impl std::fmt::Debug for ReconnectingSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingSubscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ReconnectingSubscription {
    /// The next item; `None` once the subscription has ended for good.
    pub async fn receive(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.items.poll_recv(cx))
            .await
            .map(|held| held.map(|(received, _permit)| received))
    }
}

impl Stream for ReconnectingSubscription {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.items
            .poll_recv(cx)
            .map(|held| held.map(|r| r.map(|(received, _permit)| received)))
    }
}

impl Drop for ReconnectingSubscription {
    fn drop(&mut self) {
        // Its forwarder sees the stream gone at its next item and drops the
        // connection's subscription (which unsubscribes).
        lock(&self.hub.shared.wanted).remove(&self.id);
    }
}
