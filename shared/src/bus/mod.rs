//! The in-process side of the cluster bus: it demultiplexes the messages one replica receives on its
//! single subscriber connection (or, in the embedded default, from the in-memory backend) to the
//! local streams and tasks that want them.
//!
//! Three kinds of consumer register here:
//! - **feeds**: the GET streams of legacy sessions held by this replica. A session has one live GET
//!   stream in the cluster: a newer one replaces the primary here, or (`end`, published by the
//!   script that opens it) the one another replica holds, and the replaced stream ends.
//! - **listeners**: `subscriptions/listen` streams of 2026-07-28 clients, indexed by resource URI.
//! - **control**: one task of the server that closes local session workers, forwards cancellations
//!   and client responses into them.
//!
//! Dispatch never blocks and never awaits: a consumer that cannot keep up loses live messages but is
//! told so (feeds re-read the durable event log; see [`crate::feed`]), so one slow client never delays
//! another. The one wire format of the messages is [`BusMessage`] (module `codec`).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

mod codec;

pub use codec::{BusMessage, FrameError, LUA_NETSTRING, MAX_FRAME_BYTES, SessionEvent};

use crate::{
    ids::{EventId, ReplicaTag},
    keys::Keys,
    metrics::Metrics,
};

/// Capacity of one feed's live channel; past it the feed falls back to reading the event log.
pub const FEED_CHANNEL_CAPACITY: usize = 256;
/// Capacity of one listener's channel.
pub const LISTENER_CHANNEL_CAPACITY: usize = 256;
/// Capacity of the control channel to the server.
pub const CONTROL_CHANNEL_CAPACITY: usize = 4096;

/// An event of a session's event log, delivered live to the feed holding the session's GET stream.
#[derive(Debug, Clone)]
pub struct FeedEvent {
    /// Its id in the session's event log.
    pub id: EventId,
    /// The id of the event before it in the log ([`EventId::ZERO`] when none): a feed that has
    /// not emitted `prev` missed an event and re-reads the log.
    pub prev: EventId,
    /// The JSON-RPC message, serialized.
    pub payload: Arc<str>,
}

/// A message for the server's control task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// A session was deleted somewhere in the cluster: drop its local worker.
    SessionDeleted {
        /// The session.
        session: String,
    },
    /// A client's `notifications/cancelled` arrived at another replica: deliver it to the local
    /// worker of the session, which cancels the request if it runs here.
    Cancel {
        /// The session.
        session: String,
        /// The notification, serialized.
        payload: String,
        /// The W3C `traceparent` of the span that broadcast it, while tracing.
        trace: Option<String>,
    },
    /// A client's JSON-RPC response to a request this replica sent (sampling, elicitation, ping)
    /// arrived at another replica: deliver it to the local worker of the session.
    Forward {
        /// The session.
        session: String,
        /// The response, serialized.
        payload: String,
        /// The W3C `traceparent` of the span that forwarded it, while tracing.
        trace: Option<String>,
    },
}

/// What a `subscriptions/listen` stream is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent {
    /// `notifications/resources/updated`.
    ResourceUpdated {
        /// The resource.
        uri: String,
        /// The W3C `traceparent` of the span that raised it, while tracing.
        trace: Option<String>,
    },
    /// A list changed.
    ListChanged(ListKind),
}

/// Which list changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// `notifications/tools/list_changed`.
    Tools,
    /// `notifications/prompts/list_changed`.
    Prompts,
    /// `notifications/resources/list_changed`.
    Resources,
}

impl ListKind {
    /// Its name on the bus.
    pub fn code(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
        }
    }
    /// Parses [`ListKind::code`].
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "tools" => Some(ListKind::Tools),
            "prompts" => Some(ListKind::Prompts),
            "resources" => Some(ListKind::Resources),
            _ => None,
        }
    }
}

/// The handle a feed keeps while it is registered; dropping it unregisters the feed.
#[derive(Debug)]
pub struct FeedRegistration {
    bus: Bus,
    session: String,
    stream: u64,
    /// Live events for this feed while it is the primary; closed when a newer GET stream of the
    /// same session takes over (the feed then ends).
    pub events: mpsc::Receiver<FeedEvent>,
    /// Set when live events were dropped (full channel, bus reconnect): re-read the log.
    pub lagged: Arc<LagSignal>,
    /// Cancelled when the session is deleted anywhere in the cluster, or this replica shuts its
    /// streams down or interrupts them.
    pub gone: CancellationToken,
    /// The streams' generation this feed belongs to.
    generation: CancellationToken,
}

impl FeedRegistration {
    /// The feed's identity within this replica, as written into the session's `feed` field.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// Whether [`FeedRegistration::gone`] fired because the session was deleted (rather than
    /// because the replica shuts its streams down or interrupts them).
    pub fn session_deleted(&self) -> bool {
        self.gone.is_cancelled() && !self.generation.is_cancelled()
    }
}

impl Drop for FeedRegistration {
    fn drop(&mut self) {
        self.bus.unregister_feed(&self.session, self.stream);
    }
}

/// A flag with a wake-up: set by the dispatcher when live messages were lost.
#[derive(Debug, Default)]
pub struct LagSignal {
    flag: AtomicBool,
    notify: Notify,
}

impl LagSignal {
    /// Marks the feed as lagged and wakes it.
    pub fn raise(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
    /// Returns whether the feed lagged since the last call, clearing the flag.
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::SeqCst)
    }
    /// Waits until [`LagSignal::raise`] is called.
    pub async fn raised(&self) {
        self.notify.notified().await;
    }
}

/// Waits for cache entry fills announced on the bus; dropping the last waiter of an entry
/// unregisters it.
#[derive(Debug)]
pub struct CacheWaiter {
    bus: Bus,
    id: String,
    /// Fired on each announcement.
    pub notify: Arc<Notify>,
}

impl Drop for CacheWaiter {
    fn drop(&mut self) {
        let mut waiters = self
            .bus
            .inner
            .cache_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Two references left: the map's and ours.
        if waiters
            .get(&self.id)
            .is_some_and(|n| Arc::strong_count(n) <= 2)
        {
            waiters.remove(&self.id);
        }
    }
}

/// The handle a listener keeps; dropping it unregisters the listener.
#[derive(Debug)]
pub struct ListenerRegistration {
    bus: Bus,
    id: u64,
    /// Events matching the listener's filter.
    pub events: mpsc::Receiver<ListenEvent>,
}

impl Drop for ListenerRegistration {
    fn drop(&mut self) {
        self.bus.unregister_listener(self.id);
    }
}

#[derive(Debug)]
struct PrimaryFeed {
    stream: u64,
    tx: mpsc::Sender<FeedEvent>,
    lagged: Arc<LagSignal>,
}

#[derive(Debug)]
struct SessionFeeds {
    primary: Option<PrimaryFeed>,
    gone: CancellationToken,
    /// The streams' generation `gone` descends from.
    generation: CancellationToken,
    streams: usize,
}

#[derive(Debug)]
struct Listener {
    uris: HashSet<String>,
    lists: HashSet<ListKind>,
    tx: mpsc::Sender<ListenEvent>,
}

#[derive(Debug, Default)]
struct Listeners {
    by_id: HashMap<u64, Listener>,
    by_uri: HashMap<String, HashSet<u64>>,
}

impl Listeners {
    /// Drops listener `id` (its stream's channel closes).
    fn remove(&mut self, id: u64) {
        if let Some(listener) = self.by_id.remove(&id) {
            for uri in listener.uris {
                if let Some(ids) = self.by_uri.get_mut(&uri) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_uri.remove(&uri);
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct BusInner {
    keys: Keys,
    tag: ReplicaTag,
    replica_channel: String,
    control_channel: String,
    resource_channel: String,
    cache_channel: String,
    cache_waiters: Mutex<HashMap<String, Arc<Notify>>>,
    feeds: Mutex<HashMap<String, SessionFeeds>>,
    listeners: Mutex<Listeners>,
    next_id: AtomicU64,
    control_tx: mpsc::Sender<ControlMessage>,
    shutdown: CancellationToken,
    /// The streams' generation: a child of `shutdown`, cancelled and replaced by
    /// [`Bus::interrupt_streams`] (the streams open now end, later ones are accepted).
    streams: Mutex<CancellationToken>,
    metrics: Metrics,
    /// Reference point of round-trip probes.
    epoch: Instant,
    /// When (nanoseconds after `epoch`) the last probe came back: the bus is live.
    last_roundtrip: AtomicU64,
    /// The replica's channels were subscribed at least once ([`Bus::mark_subscribed`]).
    subscribed: AtomicBool,
}

/// The replica's message demultiplexer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

impl Bus {
    /// A bus for the replica `tag`; control messages go to the returned receiver.
    pub fn new(
        keys: Keys,
        tag: ReplicaTag,
        metrics: Metrics,
    ) -> (Self, mpsc::Receiver<ControlMessage>) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let shutdown = CancellationToken::new();
        let inner = BusInner {
            replica_channel: keys.replica_channel(tag.as_str()),
            control_channel: keys.control_channel(),
            resource_channel: keys.resource_channel(),
            cache_channel: keys.cache_channel(),
            cache_waiters: Mutex::default(),
            keys,
            tag,
            feeds: Mutex::default(),
            listeners: Mutex::default(),
            next_id: AtomicU64::new(1),
            control_tx,
            streams: Mutex::new(shutdown.child_token()),
            shutdown,
            metrics,
            epoch: Instant::now(),
            last_roundtrip: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            control_rx,
        )
    }

    /// A round-trip probe to publish on this replica's own channel (see
    /// [`crate::backend::Backend::publish_probe`]).
    pub fn probe(&self) -> String {
        BusMessage::Probe {
            sent_nanos: self.inner.epoch.elapsed().as_nanos() as u64,
        }
        .encode()
    }

    /// How long ago a probe last came back through the shared backend (since the bus was created
    /// when none has yet): a bus that stopped delivering makes the replica not ready.
    pub fn since_last_roundtrip(&self) -> Duration {
        let last = Duration::from_nanos(self.inner.last_roundtrip.load(Ordering::Relaxed));
        self.inner.epoch.elapsed().saturating_sub(last)
    }

    /// The replica's channels are subscribed (for the first time: later reconnections are
    /// noticed by the probe, [`Bus::since_last_roundtrip`]). Feeds opened before re-read their
    /// logs and check that they still hold their sessions: what was published to this replica
    /// before did not reach it.
    pub fn mark_subscribed(&self) {
        if !self.inner.subscribed.swap(true, Ordering::SeqCst) {
            self.all_feeds_lagged();
        }
    }

    /// Whether a probe this replica published ever came back to it: its subscription is in place
    /// and delivers (a `SUBSCRIBE` reported done is not proof: fred reports one refused by the
    /// server's ACL as done).
    pub fn has_round_tripped(&self) -> bool {
        self.inner.last_roundtrip.load(Ordering::Relaxed) > 0
    }

    /// This replica's tag.
    pub fn tag(&self) -> &ReplicaTag {
        &self.inner.tag
    }

    /// Key and channel names.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The channels this replica must be subscribed to.
    pub fn channels(&self) -> [&str; 4] {
        [
            &self.inner.replica_channel,
            &self.inner.control_channel,
            &self.inner.resource_channel,
            &self.inner.cache_channel,
        ]
    }

    /// A signal fired when any replica announces that cache entry `id` was filled. Create it
    /// (and enable its `notified()` future) before checking the cache, so no announcement is
    /// missed in between.
    pub fn cache_waiter(&self, id: &str) -> CacheWaiter {
        let notify = self
            .inner
            .cache_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone();
        CacheWaiter {
            bus: self.clone(),
            id: id.to_owned(),
            notify,
        }
    }

    /// Registers a feed (GET stream) for `session`. It becomes the session's primary feed on this
    /// replica; a previous primary is demoted to a shadow.
    ///
    /// # Errors
    /// Returns `None` when the replica is shutting its streams down.
    pub fn register_feed(&self, session: &str) -> Option<FeedRegistration> {
        if self.inner.shutdown.is_cancelled() {
            return None;
        }
        let stream = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(FEED_CHANNEL_CAPACITY);
        let lagged = Arc::new(LagSignal::default());
        let generation = self.stream_token();
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let entry = feeds
            .entry(session.to_owned())
            .or_insert_with(|| SessionFeeds {
                primary: None,
                gone: generation.child_token(),
                generation: generation.clone(),
                streams: 0,
            });
        if entry.generation.is_cancelled() {
            // The session's streams of an interrupted generation are still winding down: this
            // one belongs to the current generation.
            entry.gone = generation.child_token();
            entry.generation = generation.clone();
        }
        entry.streams += 1;
        entry.primary = Some(PrimaryFeed {
            stream,
            tx,
            lagged: lagged.clone(),
        });
        let gone = entry.gone.clone();
        drop(feeds);
        Some(FeedRegistration {
            generation,
            bus: self.clone(),
            session: session.to_owned(),
            stream,
            events: rx,
            lagged,
            gone,
        })
    }

    /// A newer GET stream of `session` opened elsewhere: the feed `stream` of this replica stops
    /// being the primary, which ends it.
    fn end_feed(&self, session: &str, stream: u64) {
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = feeds.get_mut(session)
            && entry.primary.as_ref().is_some_and(|p| p.stream == stream)
        {
            entry.primary = None;
        }
    }

    fn unregister_feed(&self, session: &str, stream: u64) {
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = feeds.get_mut(session) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.primary.as_ref().is_some_and(|p| p.stream == stream) {
                entry.primary = None;
            }
            if entry.streams == 0 {
                feeds.remove(session);
            }
        }
    }

    /// Registers a `subscriptions/listen` stream interested in `uris` and `lists`.
    ///
    /// Returns `None` when the replica is shutting its streams down.
    pub fn register_listener(
        &self,
        uris: impl IntoIterator<Item = String>,
        lists: impl IntoIterator<Item = ListKind>,
    ) -> Option<ListenerRegistration> {
        if self.inner.shutdown.is_cancelled() {
            return None;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LISTENER_CHANNEL_CAPACITY);
        let listener = Listener {
            uris: uris.into_iter().collect(),
            lists: lists.into_iter().collect(),
            tx,
        };
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for uri in &listener.uris {
            listeners.by_uri.entry(uri.clone()).or_default().insert(id);
        }
        listeners.by_id.insert(id, listener);
        drop(listeners);
        Some(ListenerRegistration {
            bus: self.clone(),
            id,
            events: rx,
        })
    }

    fn unregister_listener(&self, id: u64) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Number of feeds and listeners registered (for tests and gauges).
    pub fn stream_counts(&self) -> (usize, usize) {
        let feeds = self
            .inner
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|f| f.streams)
            .sum();
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .len();
        (feeds, listeners)
    }

    /// Ends every feed and refuses new streams and listeners (graceful shutdown: clients reconnect
    /// to another replica). Listeners are told through [`Bus::shutdown_token`].
    pub fn shut_down_streams(&self) {
        self.inner.shutdown.cancel();
    }

    /// Cancelled once [`Bus::shut_down_streams`] was called.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// The token a stream opened now watches: cancelled by [`Bus::shut_down_streams`] and by the
    /// next [`Bus::interrupt_streams`].
    pub fn stream_token(&self) -> CancellationToken {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends every GET and listen stream open now, and keeps accepting new ones: the replica lost
    /// the shared state, so its streams would stay silent; ended, their clients reconnect (with
    /// `Last-Event-ID`) to a replica that can serve them.
    pub fn interrupt_streams(&self) {
        let mut current = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        current.cancel();
        *current = self.inner.shutdown.child_token();
    }

    /// Marks every feed as lagged: live messages may have been lost (subscriber reconnect or a
    /// lagging subscriber), so each feed re-reads its session's log.
    pub fn all_feeds_lagged(&self) {
        let feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        for entry in feeds.values() {
            if let Some(primary) = &entry.primary {
                primary.lagged.raise();
            }
        }
    }

    /// Delivers one message received on `channel`. Never blocks.
    pub fn dispatch(&self, channel: &str, frame: &[u8]) {
        let outcome = BusMessage::decode(frame)
            .map_err(|e| e.0)
            .and_then(|message| {
                let expected = if channel == self.inner.replica_channel {
                    matches!(
                        message,
                        BusMessage::Event(_)
                            | BusMessage::Forward { .. }
                            | BusMessage::FeedEnd { .. }
                            | BusMessage::Probe { .. }
                    )
                } else if channel == self.inner.control_channel {
                    matches!(
                        message,
                        BusMessage::SessionDeleted { .. } | BusMessage::Cancel { .. }
                    )
                } else if channel == self.inner.resource_channel {
                    matches!(
                        message,
                        BusMessage::ResourceUpdated { .. } | BusMessage::ListChanged(_)
                    )
                } else if channel == self.inner.cache_channel {
                    matches!(message, BusMessage::CacheFilled { .. })
                } else {
                    return Err("unknown channel");
                };
                if expected {
                    Ok(self.deliver(message))
                } else {
                    Err("message kind not carried on this channel")
                }
            });
        match outcome {
            Ok(kind) => self.inner.metrics.bus_message(kind),
            Err(reason) => {
                self.inner.metrics.bus_message("invalid");
                tracing::warn!(channel, reason, "dropping malformed bus message");
            }
        }
    }

    /// Hands one decoded message to its consumers; returns the metric label of its kind.
    fn deliver(&self, message: BusMessage<'_>) -> &'static str {
        match message {
            BusMessage::Event(event) => {
                self.deliver_feed_event(event);
                "event"
            }
            BusMessage::Forward {
                session,
                trace,
                payload,
            } => {
                self.control(ControlMessage::Forward {
                    session: session.to_owned(),
                    payload: payload.to_owned(),
                    trace: trace.map(str::to_owned),
                });
                "forward"
            }
            BusMessage::FeedEnd { session, stream } => {
                self.end_feed(session, stream);
                "feed_end"
            }
            BusMessage::Probe { sent_nanos } => {
                self.probe_returned(sent_nanos);
                "probe"
            }
            BusMessage::SessionDeleted { session } => {
                self.session_deleted(session);
                "deleted"
            }
            BusMessage::Cancel {
                origin,
                session,
                trace,
                payload,
            } => {
                if origin != self.inner.tag.as_str() {
                    self.control(ControlMessage::Cancel {
                        session: session.to_owned(),
                        payload: payload.to_owned(),
                        trace: trace.map(str::to_owned),
                    });
                }
                "cancel"
            }
            BusMessage::ResourceUpdated { uri, trace } => {
                self.resource_updated(uri, trace);
                "resource"
            }
            BusMessage::ListChanged(list) => {
                let mut listeners = self
                    .inner
                    .listeners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let targets: Vec<u64> = listeners
                    .by_id
                    .iter()
                    .filter(|(_, l)| l.lists.contains(&list))
                    .map(|(id, _)| *id)
                    .collect();
                self.notify_listeners(&mut listeners, targets, &ListenEvent::ListChanged(list));
                "resource"
            }
            BusMessage::CacheFilled { id } => {
                if let Some(notify) = self
                    .inner
                    .cache_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                {
                    notify.notify_waiters();
                }
                "cache_fill"
            }
        }
    }

    /// A probe this replica sent came back: the bus round trip.
    fn probe_returned(&self, sent_nanos: u64) {
        let now = self.inner.epoch.elapsed().as_nanos() as u64;
        self.inner
            .metrics
            .bus_roundtrip(Duration::from_nanos(now.saturating_sub(sent_nanos)));
        self.inner.last_roundtrip.fetch_max(now, Ordering::Relaxed);
    }

    /// A session was deleted somewhere: its GET stream here ends, its worker is dropped.
    fn session_deleted(&self, session: &str) {
        if let Some(entry) = self
            .inner
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
        {
            entry.gone.cancel();
        }
        self.control(ControlMessage::SessionDeleted {
            session: session.to_owned(),
        });
    }

    /// A resource changed: every listener here that listens to its URI is told.
    fn resource_updated(&self, uri: &str, trace: Option<&str>) {
        let event = ListenEvent::ResourceUpdated {
            uri: uri.to_owned(),
            trace: trace.map(str::to_owned),
        };
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let targets: Vec<u64> = listeners
            .by_uri
            .get(uri)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        self.notify_listeners(&mut listeners, targets, &event);
    }

    /// Hands `event` to each listener of `targets`. A listener whose buffer is full would miss it
    /// for good (a listen stream has no log to re-read): it is ended instead, so that its client
    /// listens again and knows to re-read what it follows.
    fn notify_listeners(&self, listeners: &mut Listeners, targets: Vec<u64>, event: &ListenEvent) {
        for id in targets {
            let Some(listener) = listeners.by_id.get(&id) else {
                continue;
            };
            if listener.tx.try_send(event.clone()).is_err() {
                self.inner.metrics.listener_dropped();
                listeners.remove(id);
            }
        }
    }

    /// Ends every `subscriptions/listen` stream open now (their registrations are dropped, so each
    /// stream's next read finds its channel closed): live messages may have been missed (the
    /// bus subscriber reconnected or lagged), and a listen stream has no log to catch up from.
    /// Ended, their clients listen again, on this replica or another. Returns how many ended.
    pub fn end_listeners(&self) -> usize {
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ended = listeners.by_id.len();
        *listeners = Listeners::default();
        ended
    }

    fn deliver_feed_event(&self, event: SessionEvent<'_>) {
        let feeds = self.inner.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let Some(primary) = feeds.get(event.session).and_then(|f| f.primary.as_ref()) else {
            return; // the stream closed, or a newer stream on another replica took over
        };
        if primary.stream != event.stream {
            return;
        }
        let event = FeedEvent {
            id: event.id,
            prev: event.prev,
            payload: Arc::from(event.payload),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = primary.tx.try_send(event) {
            self.inner.metrics.feed_lagged();
            primary.lagged.raise();
        }
    }

    fn control(&self, message: ControlMessage) {
        if self.inner.control_tx.try_send(message).is_err() {
            self.inner.metrics.bus_message("control_dropped");
            tracing::warn!("control channel full, dropping a cluster control message");
        }
    }
}

/// The value of a session's `feed` field: which replica and stream hold its GET stream.
pub fn feed_holder(tag: &ReplicaTag, stream: u64) -> String {
    format!("{tag}:{stream}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn bus() -> (Bus, mpsc::Receiver<ControlMessage>) {
        Bus::new(Keys::new("t"), ReplicaTag::generate(), Metrics::new())
    }

    fn ev(session: &str, stream: u64, id: EventId) -> String {
        BusMessage::Event(SessionEvent {
            session,
            stream,
            id,
            prev: EventId::ZERO,
            payload: "{}",
        })
        .encode()
    }

    fn replica_channel(bus: &Bus) -> String {
        bus.keys().replica_channel(bus.tag().as_str())
    }

    #[tokio::test]
    async fn feed_events_reach_only_the_primary_feed() {
        let (bus, _control) = bus();
        let mut old = bus.register_feed("s1").expect("register");
        let mut new = bus.register_feed("s1").expect("register");
        let id = EventId { ms: 1, seq: 0 };
        bus.dispatch(
            &replica_channel(&bus),
            ev("s1", new.stream(), id).as_bytes(),
        );
        // The old feed was demoted: its live channel is closed and it received nothing.
        assert!(old.events.recv().await.is_none());
        let event = new.events.recv().await.expect("event");
        assert_eq!(event.id, id);
        assert_eq!(&*event.payload, "{}");
        // A message naming a stale stream is dropped.
        bus.dispatch(
            &replica_channel(&bus),
            ev("s1", old.stream(), id).as_bytes(),
        );
        assert!(new.events.try_recv().is_err());
        drop(old);
        drop(new);
        assert_eq!(bus.stream_counts(), (0, 0));
    }

    #[tokio::test]
    async fn full_feed_is_marked_lagged() {
        let (bus, _control) = bus();
        let feed = bus.register_feed("s1").expect("register");
        for seq in 0..=FEED_CHANNEL_CAPACITY as u64 {
            let id = EventId { ms: 1, seq };
            bus.dispatch(
                &replica_channel(&bus),
                ev("s1", feed.stream(), id).as_bytes(),
            );
        }
        assert!(feed.lagged.take());
        assert!(!feed.lagged.take());
    }

    #[tokio::test]
    async fn session_deletion_ends_feeds_and_tells_the_server() {
        let (bus, mut control) = bus();
        let feed = bus.register_feed("s1").expect("register");
        bus.dispatch(
            &bus.keys().control_channel(),
            BusMessage::SessionDeleted { session: "s1" }
                .encode()
                .as_bytes(),
        );
        assert!(feed.gone.is_cancelled());
        assert_eq!(
            control.recv().await,
            Some(ControlMessage::SessionDeleted {
                session: "s1".into()
            })
        );
    }

    #[tokio::test]
    async fn own_cancellations_are_not_echoed() {
        let (bus, mut control) = bus();
        let other = ReplicaTag::generate();
        bus.dispatch(
            &bus.keys().control_channel(),
            BusMessage::Cancel {
                origin: bus.tag().as_str(),
                session: "s1",
                trace: None,
                payload: "{}",
            }
            .encode()
            .as_bytes(),
        );
        bus.dispatch(
            &bus.keys().control_channel(),
            BusMessage::Cancel {
                origin: other.as_str(),
                session: "s1",
                trace: Some(TRACE),
                payload: "{\"x\":1}",
            }
            .encode()
            .as_bytes(),
        );
        assert_eq!(
            control.recv().await,
            Some(ControlMessage::Cancel {
                session: "s1".into(),
                payload: "{\"x\":1}".into(),
                trace: Some(TRACE.into()),
            })
        );
        assert!(control.try_recv().is_err());
    }

    #[tokio::test]
    async fn listeners_get_their_uris_and_lists() {
        let (bus, _control) = bus();
        let mut a = bus
            .register_listener(["kv://a".to_owned()], [])
            .expect("register");
        let mut b = bus
            .register_listener(["kv://b".to_owned()], [ListKind::Resources])
            .expect("register");
        let channel = bus.keys().resource_channel();
        bus.dispatch(
            &channel,
            BusMessage::ResourceUpdated {
                uri: "kv://a",
                trace: Some(TRACE),
            }
            .encode()
            .as_bytes(),
        );
        bus.dispatch(
            &channel,
            BusMessage::ListChanged(ListKind::Resources)
                .encode()
                .as_bytes(),
        );
        assert_eq!(
            a.events.recv().await,
            Some(ListenEvent::ResourceUpdated {
                uri: "kv://a".into(),
                trace: Some(TRACE.into())
            })
        );
        assert!(a.events.try_recv().is_err());
        assert_eq!(
            b.events.recv().await,
            Some(ListenEvent::ListChanged(ListKind::Resources))
        );
        drop(a);
        drop(b);
        assert_eq!(bus.stream_counts(), (0, 0));
    }

    #[tokio::test]
    async fn messages_on_the_wrong_channel_are_dropped() {
        let (bus, mut control) = bus();
        // "Session deleted" is a control message: arriving on a replica channel it is refused.
        let feed = bus.register_feed("s1").expect("register");
        bus.dispatch(
            &replica_channel(&bus),
            BusMessage::SessionDeleted { session: "s1" }
                .encode()
                .as_bytes(),
        );
        bus.dispatch(&bus.keys().control_channel(), b"del s1");
        assert!(!feed.gone.is_cancelled());
        assert!(control.try_recv().is_err());
    }

    #[tokio::test]
    async fn interrupted_streams_end_and_new_ones_are_accepted() {
        let (bus, _control) = bus();
        let old = bus.register_feed("s1").expect("register");
        let listener = bus.stream_token();
        bus.interrupt_streams();
        assert!(old.gone.is_cancelled() && listener.is_cancelled());
        assert!(!old.session_deleted(), "an interruption is not a deletion");
        // The old stream is still winding down when the client comes back.
        let new = bus
            .register_feed("s1")
            .expect("accepted after an interruption");
        assert!(!new.gone.is_cancelled() && !bus.stream_token().is_cancelled());
        bus.dispatch(
            &bus.keys().control_channel(),
            BusMessage::SessionDeleted { session: "s1" }
                .encode()
                .as_bytes(),
        );
        assert!(new.gone.is_cancelled() && new.session_deleted());
    }

    #[tokio::test]
    async fn shutdown_refuses_new_streams() {
        let (bus, _control) = bus();
        let feed = bus.register_feed("s1").expect("register");
        bus.shut_down_streams();
        assert!(feed.gone.is_cancelled());
        assert!(bus.register_feed("s2").is_none());
        assert!(bus.register_listener([], []).is_none());
    }

    #[tokio::test]
    async fn feeds_opened_before_the_first_subscription_resync_once_it_is_confirmed() {
        let (bus, _control) = bus();
        let early = bus.register_feed("s1").expect("register");
        assert!(!early.lagged.take());
        bus.mark_subscribed();
        assert!(
            early.lagged.take(),
            "what was published before may be missing"
        );
        // Later confirmations (reconnections raise lag by themselves) change nothing.
        bus.mark_subscribed();
        assert!(!early.lagged.take());
    }
}
