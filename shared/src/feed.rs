//! A feed: the cluster-wide, resumable server-to-client stream of one legacy session (what the
//! client's GET stream shows).
//!
//! Events are appended to the session's event log by whichever replica raises them. The replica
//! holding the GET stream receives each one live over the bus, with the id of the event before it;
//! when live delivery fell behind (a slow client, a bus reconnect) or a live event arrives whose
//! predecessor the feed has not emitted (one was lost in between), the feed re-reads the log from
//! the last event it emitted. So a
//! feed emits every event of the log exactly once and in order, whatever happened to the bus, and a
//! client that reconnects with `Last-Event-ID` on any replica continues where it left off.
//!
//! A fresh GET stream (no `Last-Event-ID`) starts where the session's previous stream stopped, so
//! events raised while no stream was open (before the first one, or between a clean close and the
//! next) are delivered too. While open, a feed checkpoints how far it got and keeps its session
//! alive; when it ends it releases the session with a final checkpoint.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::{
    backend::{Backend, BackendResult, FeedClaim, FeedHold, FeedStart, LoggedEvent},
    bus::{self, Bus, FeedRegistration},
    ids::EventId,
};

/// How long an ending stream waits for its final checkpoint before it closes anyway.
const FINAL_CHECKPOINT_HOLD: Duration = Duration::from_millis(250);

/// What a feed emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// A fresh stream starts after this event: clients resume from here if nothing else arrives.
    /// Only fresh streams emit it, first.
    Start(EventId),
    /// One event.
    Event(LoggedEvent),
}

/// How a feed behaves.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// How often the feed checkpoints, slides the session's idle TTL while it is open (an open GET
    /// stream keeps its session alive) and checks that the session still exists.
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
        .feed_open(
            FeedClaim {
                session,
                holder: &holder,
            },
            after,
            options.read_batch,
        )
        .await?
        .ok_or(FeedError::SessionGone)?;
    let (tx, rx) = mpsc::channel(options.output_capacity.max(1));
    let task = FeedTask {
        backend: backend.clone(),
        session: session.to_owned(),
        holder,
        registration,
        out: tx,
        last: start.from,
        options,
    };
    backend.background().spawn(task.run(start, after.is_none()));
    Ok(rx)
}

struct FeedTask {
    backend: Backend,
    session: String,
    holder: String,
    registration: FeedRegistration,
    out: mpsc::Sender<FeedItem>,
    last: EventId,
    options: FeedOptions,
}

/// The feed's consumer is gone.
struct Closed;

/// Why a feed stops between two events.
enum Stop {
    /// The consumer is gone.
    Closed,
    /// Another GET stream of the session holds it.
    Superseded,
}

impl From<Closed> for Stop {
    fn from(Closed: Closed) -> Self {
        Self::Closed
    }
}

/// Why a feed stopped.
enum End {
    /// The consumer went away, or the replica shuts its streams down: release the session.
    Release,
    /// The session is gone.
    SessionGone,
    /// A newer GET stream of the session replaced this one.
    Superseded,
}

impl FeedTask {
    fn claim(&self) -> FeedClaim<'_> {
        FeedClaim {
            session: &self.session,
            holder: &self.holder,
        }
    }

    async fn run(mut self, start: FeedStart, fresh: bool) {
        let end = self.drive(start, fresh).await;
        if let End::Release = end {
            // Record how far this stream got, so the client's next fresh stream continues there,
            // before the stream ends (a client reconnecting at once must find the checkpoint) -
            // unless Redis does not answer soon: then the stream ends first, so that a replica
            // that lost Redis does not hold its client for a command timeout.
            let claim = FeedClaim {
                session: &self.session,
                holder: &self.holder,
            };
            let checkpoint = self.backend.feed_checkpoint(claim, self.last, true);
            let mut checkpoint = std::pin::pin!(checkpoint);
            if tokio::time::timeout(FINAL_CHECKPOINT_HOLD, &mut checkpoint)
                .await
                .is_err()
            {
                drop(self.out);
                let _ = checkpoint.await;
            }
        }
    }

    async fn drive(&mut self, start: FeedStart, fresh: bool) -> End {
        if fresh && self.send(FeedItem::Start(start.from)).await.is_err() {
            return End::Release;
        }
        let full = start.events.len() as u64 >= self.options.read_batch;
        if self.emit_all(start.events).await.is_err() {
            return End::Release;
        }
        if full && self.catch_up().await.is_err() {
            return End::Release;
        }
        let mut touch = tokio::time::interval(self.options.touch_every);
        touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        touch.tick().await; // the first tick is immediate; the open itself just touched
        loop {
            let step: Result<(), Stop> = tokio::select! {
                biased;
                () = self.registration.gone.cancelled() => {
                    // Deleted (nothing to release) or shutting down (release for the next stream).
                    return if self.registration.session_deleted() { End::SessionGone } else { End::Release };
                }
                () = self.out.closed() => return End::Release,
                _ = touch.tick() => {
                    match self.checkpoint().await {
                        Some(FeedHold::Gone) => return End::SessionGone, // expired or deleted
                        Some(FeedHold::Superseded) => Err(Stop::Superseded),
                        _ => Ok(()),
                    }
                }
                () = self.registration.lagged.raised() => {
                    self.registration.lagged.take();
                    self.resync().await
                }
                event = self.registration.events.recv() => match event {
                    Some(event) => {
                        let mut step = Ok(());
                        if event.prev > self.last {
                            // An event before this one never arrived live (lost across a bus
                            // reconnect): the log has both, in order.
                            self.backend.metrics().feed_lagged();
                            step = self.resync().await;
                        } else if event.id > self.last {
                            self.last = event.id;
                            step = self.send(FeedItem::Event(LoggedEvent { id: event.id, payload: event.payload })).await.map_err(Stop::from);
                        }
                        if step.is_ok() && self.registration.lagged.take() {
                            step = self.resync().await;
                        }
                        step
                    }
                    // A newer GET stream of the session took over (here or on another replica): one
                    // live GET stream per session, so this one ends. The newer stream holds the
                    // session now: nothing to release.
                    None => Err(Stop::Superseded),
                },
            };
            match step {
                Ok(()) => {}
                Err(Stop::Superseded) => return End::Superseded,
                // A deleted session has nothing to release (a checkpoint would write to it again).
                Err(Stop::Closed) if self.registration.session_deleted() => {
                    return End::SessionGone;
                }
                Err(Stop::Closed) => return End::Release,
            }
        }
    }

    /// Records how far the feed got and learns whether it still holds the session; `None` when
    /// the feed ended meanwhile (the next turn says how) or the backend did not answer (the next
    /// touch asks again).
    async fn checkpoint(&self) -> Option<FeedHold> {
        let gone = self.registration.gone.clone();
        tokio::select! {
            biased;
            () = gone.cancelled() => None,
            checkpoint = self.backend.feed_checkpoint(self.claim(), self.last, false) => checkpoint.ok(),
        }
    }

    /// After live messages may have been lost (the bus reconnected or fell behind, or an event
    /// arrived without its predecessor): re-reads the log, then asks whether this stream still
    /// holds the session, since the message ending it when a newer stream opened may have been
    /// lost too. Without that a replaced stream would stay open, receiving nothing, until its
    /// client left.
    async fn resync(&mut self) -> Result<(), Stop> {
        self.catch_up().await?;
        match self.checkpoint().await {
            Some(FeedHold::Superseded) => Err(Stop::Superseded),
            _ => Ok(()),
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
        let gone = self.registration.gone.clone();
        loop {
            // An ended feed does not wait for a read from a Redis it may have lost.
            let batch: BackendResult<Vec<LoggedEvent>> = tokio::select! {
                biased;
                () = gone.cancelled() => return Err(Closed),
                batch = self
                    .backend
                    .events_after(&self.session, self.last, self.options.read_batch) => batch,
            };
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
                        () = self.registration.gone.cancelled() => return Err(Closed),
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
            max_subscribers_per_uri: 100,
            kv_max_keys: 10,
            redis_timeout: Duration::from_secs(1),
            redis_pool_size: 1,
        };
        (
            Backend::Memory(MemoryBackend::new(
                config,
                bus.clone(),
                metrics,
                Default::default(),
            )),
            bus,
        )
    }

    fn options() -> FeedOptions {
        FeedOptions {
            touch_every: Duration::from_secs(10),
            read_batch: 4,
            output_capacity: 2,
        }
    }

    async fn append(backend: &Backend, payload: &str) -> EventId {
        backend
            .event_append("s", payload)
            .await
            .expect("append")
            .expect("live")
    }

    /// A new session "s" and its first GET stream, past its start marker.
    /// Appends the events `0`, `1`, … up to `count` to session `s`; returns their ids.
    async fn append_numbered(backend: &Backend, count: usize) -> Vec<EventId> {
        let mut ids = Vec::new();
        for n in 0..count {
            ids.push(append(backend, &n.to_string()).await);
        }
        ids
    }

    async fn fresh_feed(backend: &Backend, bus: &Bus) -> mpsc::Receiver<FeedItem> {
        fresh_feed_with(backend, bus, options()).await
    }

    /// [`fresh_feed`] with `options`.
    async fn fresh_feed_with(
        backend: &Backend,
        bus: &Bus,
        options: FeedOptions,
    ) -> mpsc::Receiver<FeedItem> {
        backend
            .session_create("s", "{}", "p")
            .await
            .expect("create");
        let mut rx = open(backend, bus, "s", None, options).await.expect("open");
        assert_eq!(rx.recv().await, Some(FeedItem::Start(EventId::ZERO)));
        rx
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
        let mut rx = fresh_feed(&backend, &bus).await;
        // Far more events than the live channel and the output hold, before anything is read.
        let ids = append_numbered(&backend, crate::bus::FEED_CHANNEL_CAPACITY + 50).await;
        for (n, id) in ids.iter().enumerate() {
            let event = next_event(&mut rx).await;
            assert_eq!((event.id, &*event.payload), (*id, n.to_string().as_str()));
        }
    }

    #[tokio::test]
    async fn resuming_replays_exactly_what_followed() {
        let (backend, bus) = setup(1000);
        backend
            .session_create("s", "{}", "p")
            .await
            .expect("create");
        let ids = append_numbered(&backend, 10).await;
        let mut rx = open(&backend, &bus, "s", Some(ids[2]), options())
            .await
            .expect("open");
        // A resumed stream emits no start marker: the client already has an id.
        for id in &ids[3..] {
            assert_eq!(next_event(&mut rx).await.id, *id);
        }
        let live = append(&backend, "live").await;
        assert_eq!(next_event(&mut rx).await.id, live);
    }

    #[tokio::test]
    async fn a_fresh_stream_continues_where_the_last_one_stopped() {
        let (backend, bus) = setup(1000);
        backend
            .session_create("s", "{}", "p")
            .await
            .expect("create");
        // Raised before any GET stream was open: the first stream delivers it.
        let early = append(&backend, "early").await;
        let mut rx = open(&backend, &bus, "s", None, options())
            .await
            .expect("open");
        assert_eq!(rx.recv().await, Some(FeedItem::Start(EventId::ZERO)));
        assert_eq!(next_event(&mut rx).await.id, early);
        let seen = append(&backend, "seen").await;
        assert_eq!(next_event(&mut rx).await.id, seen);
        drop(rx);
        // The feed task releases the session, then drops its registration.
        for _ in 0..500 {
            if bus.stream_counts() == (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(bus.stream_counts(), (0, 0), "the closed feed ended");
        let missed = append(&backend, "missed").await;
        let mut rx = open(&backend, &bus, "s", None, options())
            .await
            .expect("open");
        assert_eq!(rx.recv().await, Some(FeedItem::Start(seen)));
        assert_eq!(next_event(&mut rx).await.id, missed);
        // A second fresh stream while this one holds the session starts at the end of the log.
        let mut other = open(&backend, &bus, "s", None, options())
            .await
            .expect("open");
        assert_eq!(other.recv().await, Some(FeedItem::Start(missed)));
    }

    #[tokio::test]
    async fn a_live_event_whose_predecessor_never_arrived_brings_it_from_the_log() {
        let (backend, bus) = setup(1000);
        let mut rx = fresh_feed(&backend, &bus).await;
        // The session's holder names a replica that does not exist: the next event is appended to
        // the log but its live message goes nowhere, as one published while this replica's
        // subscriber reconnects is lost.
        // A fresh bus numbers its first stream 1.
        let ours = crate::bus::feed_holder(bus.tag(), 1);
        let elsewhere = crate::bus::feed_holder(&ReplicaTag::generate(), 1);
        backend
            .feed_open(
                FeedClaim {
                    session: "s",
                    holder: &elsewhere,
                },
                None,
                1,
            )
            .await
            .expect("reassign")
            .expect("live");
        let lost = append(&backend, "lost").await;
        backend
            .feed_open(
                FeedClaim {
                    session: "s",
                    holder: &ours,
                },
                None,
                1,
            )
            .await
            .expect("give back")
            .expect("live");
        // The next live event names `lost` as its predecessor: the feed emits both, in order.
        let next = append(&backend, "next").await;
        assert_eq!(next_event(&mut rx).await.id, lost);
        assert_eq!(next_event(&mut rx).await.id, next);
    }

    #[tokio::test]
    async fn a_deleted_session_ends_its_feed() {
        let (backend, bus) = setup(1000);
        backend
            .session_create("s", "{}", "p")
            .await
            .expect("create");
        let mut rx = open(&backend, &bus, "s", None, options())
            .await
            .expect("open");
        assert!(matches!(rx.recv().await, Some(FeedItem::Start(_))));
        backend.session_delete("s").await.expect("delete");
        assert_eq!(rx.recv().await, None);
        assert!(matches!(
            open(&backend, &bus, "s", None, options()).await,
            Err(FeedError::SessionGone)
        ));
    }

    /// A newer GET stream opened on another replica, and the bus message telling this one to end
    /// was lost (the replica's bus connection was away): the claim is all that is left of it.
    async fn claimed_elsewhere(backend: &Backend) {
        backend
            .feed_open(
                FeedClaim {
                    session: "s",
                    holder: "another-replica:1",
                },
                None,
                1,
            )
            .await
            .expect("claim")
            .expect("live");
    }

    /// What a feed that must end yields within a bound: `None` when it ended.
    async fn ended(rx: &mut mpsc::Receiver<FeedItem>) -> Option<FeedItem> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the replaced feed ended within 5 s")
    }

    #[tokio::test]
    async fn a_replaced_feed_that_missed_its_end_ends_when_it_resyncs() {
        let (backend, bus) = setup(1000);
        let mut rx = fresh_feed(&backend, &bus).await;
        claimed_elsewhere(&backend).await;
        // The bus came back: every feed re-reads its log, and learns it no longer holds its session.
        bus.all_feeds_lagged();
        assert_eq!(ended(&mut rx).await, None);
    }

    #[tokio::test]
    async fn a_replaced_feed_that_missed_its_end_ends_at_its_next_touch() {
        let (backend, bus) = setup(1000);
        let options = FeedOptions {
            touch_every: Duration::from_millis(50),
            ..options()
        };
        let mut rx = fresh_feed_with(&backend, &bus, options).await;
        // Nothing tells this feed anything was lost: its periodic checkpoint finds out.
        claimed_elsewhere(&backend).await;
        assert_eq!(ended(&mut rx).await, None);
    }
}
