//! A feed: the cluster-wide, resumable server-to-client stream of one legacy session (what the
//! client's GET stream shows).
//!
//! Events are appended to the session's event log by whichever replica raises them. The replica
//! holding the GET stream receives each one live over the bus; when live delivery fell behind
//! (a slow client, a bus reconnect) the feed re-reads the log from the last event it emitted. So a
//! feed emits every event of the log exactly once and in order, whatever happened to the bus, and a
//! client that reconnects with `Last-Event-ID` on any replica continues where it left off.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::{
    backend::{Backend, BackendResult, FeedStart, LoggedEvent},
    bus::{self, Bus, FeedRegistration},
    ids::EventId,
};

/// What a feed emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// A fresh stream starts after this event: clients resume from here if nothing else arrives.
    Start(EventId),
    /// One event.
    Event(LoggedEvent),
}

/// How a feed behaves.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How often the feed slides the session's idle TTL while it is open (an open GET stream keeps
    /// its session alive) and checks that the session still exists.
    pub touch_every: Duration,
    /// Events read from the log per round trip when catching up.
    pub read_batch: u64,
    /// Capacity of the channel between the feed task and the HTTP response.
    pub output_capacity: usize,
}

/// Why a feed could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The session no longer exists.
    #[error("session not found")]
    SessionGone,
    /// The replica is shutting its streams down.
    #[error("replica is shutting down")]
    ShuttingDown,
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

/// Opens the feed of `session` on this replica, fresh (`after == None`) or resuming after an event
/// the client already has. Returns the receiving end; the feed ends when the receiver is dropped,
/// the session is deleted or expires, or the replica shuts its streams down.
///
/// # Errors
/// See [`FeedError`].
pub async fn open(
    backend: &Backend,
    bus: &Bus,
    session: &str,
    after: Option<EventId>,
    options: FeedOptions,
) -> Result<mpsc::Receiver<FeedItem>, FeedError> {
    let registration = bus.register_feed(session).ok_or(FeedError::ShuttingDown)?;
    let holder = bus::feed_holder(bus.tag(), registration.stream());
    let start = backend
        .feed_open(session, &holder, after, options.read_batch)
        .await?
        .ok_or(FeedError::SessionGone)?;
    let (tx, rx) = mpsc::channel(options.output_capacity.max(1));
    let task = FeedTask {
        backend: backend.clone(),
        session: session.to_owned(),
        registration,
        out: tx,
        last: after.unwrap_or(EventId::ZERO),
        options,
    };
    tokio::spawn(task.run(start));
    Ok(rx)
}

struct FeedTask {
    backend: Backend,
    session: String,
    registration: FeedRegistration,
    out: mpsc::Sender<FeedItem>,
    last: EventId,
    options: FeedOptions,
}

/// The feed's consumer is gone.
struct Closed;

impl FeedTask {
    async fn run(mut self, start: FeedStart) {
        let _ = self.drive(start).await;
    }

    async fn drive(&mut self, start: FeedStart) -> Result<(), Closed> {
        match start {
            FeedStart::Fresh(last) => {
                self.last = last;
                self.send(FeedItem::Start(last)).await?;
            }
            FeedStart::Resumed(events) => {
                let full = events.len() as u64 >= self.options.read_batch;
                self.emit_all(events).await?;
                if full {
                    self.catch_up().await?;
                }
            }
        }
        let mut touch = tokio::time::interval(self.options.touch_every);
        touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        touch.tick().await; // the first tick is immediate; the open itself just touched
        let mut primary = true;
        loop {
            tokio::select! {
                biased;
                () = self.registration.gone.cancelled() => return Ok(()),
                () = self.out.closed() => return Err(Closed),
                _ = touch.tick() => {
                    if let Ok(false) = self.backend.session_touch(&self.session).await {
                        return Ok(()); // expired or deleted
                    }
                }
                () = self.registration.lagged.raised(), if primary => {
                    self.registration.lagged.take();
                    self.catch_up().await?;
                }
                event = self.registration.events.recv(), if primary => match event {
                    Some(event) => {
                        if event.id > self.last {
                            self.last = event.id;
                            self.send(FeedItem::Event(LoggedEvent { id: event.id, payload: event.payload })).await?;
                        }
                        if self.registration.lagged.take() {
                            self.catch_up().await?;
                        }
                    }
                    // A newer GET stream of the session on this replica took over: stay open as a
                    // silent shadow so the client does not reconnect in a loop.
                    None => primary = false,
                },
            }
        }
    }

    async fn send(&self, item: FeedItem) -> Result<(), Closed> {
        self.out.send(item).await.map_err(|_| Closed)
    }

    async fn emit_all(&mut self, events: Vec<LoggedEvent>) -> Result<(), Closed> {
        for event in events {
            if event.id > self.last {
                self.last = event.id;
                self.send(FeedItem::Event(event)).await?;
            }
        }
        Ok(())
    }

    /// Re-reads the log after the last emitted event until it is exhausted. Retries while the
    /// backend is unreachable, as long as the consumer is there.
    async fn catch_up(&mut self) -> Result<(), Closed> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let batch: BackendResult<Vec<LoggedEvent>> = self
                .backend
                .events_after(&self.session, self.last, self.options.read_batch)
                .await;
            match batch {
                Ok(events) => {
                    let done = (events.len() as u64) < self.options.read_batch;
                    self.emit_all(events).await?;
                    if done {
                        return Ok(());
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(error) => {
                    tracing::debug!(%error, "feed catch-up failed, retrying");
                    tokio::select! {
                        () = self.out.closed() => return Err(Closed),
                        () = self.registration.gone.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::{BackendConfig, MemoryBackend},
        ids::ReplicaTag,
        keys::Keys,
        metrics::Metrics,
    };

    fn setup(max_len: u64) -> (Backend, Bus) {
        let metrics = Metrics::new();
        let (bus, _control) = Bus::new(Keys::new("t"), ReplicaTag::generate(), metrics.clone());
        let config = BackendConfig {
            session_ttl: Duration::from_secs(60),
            event_log_max_len: max_len,
            event_retention: Duration::from_secs(600),
            max_subscriptions_per_session: 10,
            kv_max_keys: 10,
            redis_timeout: Duration::from_secs(1),
            redis_pool_size: 1,
        };
        (Backend::Memory(MemoryBackend::new(config, bus.clone(), metrics)), bus)
    }

    fn options() -> FeedOptions {
        FeedOptions {
            touch_every: Duration::from_secs(10),
            read_batch: 4,
            output_capacity: 2,
        }
    }

    async fn next_event(rx: &mut mpsc::Receiver<FeedItem>) -> LoggedEvent {
        match rx.recv().await.expect("feed item") {
            FeedItem::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_slow_consumer_loses_nothing() {
        let (backend, bus) = setup(1000);
        backend.session_create("s", "{}").await.expect("create");
        let mut rx = open(&backend, &bus, "s", None, options()).await.expect("open");
        assert_eq!(rx.recv().await, Some(FeedItem::Start(EventId::ZERO)));
        // Far more events than the live channel and the output hold, before anything is read.
        let mut ids = Vec::new();
        for n in 0..(crate::bus::FEED_CHANNEL_CAPACITY + 50) {
            ids.push(backend.event_append("s", &n.to_string()).await.expect("append").expect("live"));
        }
        for (n, id) in ids.iter().enumerate() {
            let event = next_event(&mut rx).await;
            assert_eq!((event.id, &*event.payload), (*id, n.to_string().as_str()));
        }
    }

    #[tokio::test]
    async fn resuming_replays_exactly_what_followed() {
        let (backend, bus) = setup(1000);
        backend.session_create("s", "{}").await.expect("create");
        let mut ids = Vec::new();
        for n in 0..10 {
            ids.push(backend.event_append("s", &n.to_string()).await.expect("append").expect("live"));
        }
        let mut rx = open(&backend, &bus, "s", Some(ids[2]), options()).await.expect("open");
        for id in &ids[3..] {
            assert_eq!(next_event(&mut rx).await.id, *id);
        }
        let live = backend.event_append("s", "live").await.expect("append").expect("live");
        assert_eq!(next_event(&mut rx).await.id, live);
    }

    #[tokio::test]
    async fn a_deleted_session_ends_its_feed() {
        let (backend, bus) = setup(1000);
        backend.session_create("s", "{}").await.expect("create");
        let mut rx = open(&backend, &bus, "s", None, options()).await.expect("open");
        assert!(matches!(rx.recv().await, Some(FeedItem::Start(_))));
        backend.session_delete("s").await.expect("delete");
        assert_eq!(rx.recv().await, None);
        assert!(matches!(
            open(&backend, &bus, "s", None, options()).await,
            Err(FeedError::SessionGone)
        ));
    }
}
