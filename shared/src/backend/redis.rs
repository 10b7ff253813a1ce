//! The Redis backend: a small pool of auto-pipelining connections for commands, and one subscriber
//! connection per replica for the bus.
//!
//! Connection policy: commands fail fast while Redis is unreachable (no unbounded queueing), every
//! command has a timeout, and both the pool and the subscriber reconnect with capped exponential
//! backoff for ever, so a replica recovers by itself when Redis returns. After the subscriber
//! reconnects, every GET stream re-reads its event log, so nothing published meanwhile is lost.

use std::{sync::Arc, time::Duration};

use fred::{
    clients::{Pool, SubscriberClient},
    interfaces::{
        ClientLike, EventInterface, HashesInterface, KeysInterface, PubsubInterface,
        StreamsInterface,
    },
    prelude::{Builder, Config as FredConfig, Expiration, ReconnectPolicy, SetOptions, Value},
    types::{Limit, scripts::Script},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::broadcast::error::RecvError;

use super::{
    BackendConfig, BackendError, BackendResult, CacheEntry, FeedClaim, FeedStart, KvSetOutcome,
    LoggedEvent, QuotaCheck, QuotaKind, QuotaRefusal, SESSION_RECHECK, SubscribeOutcome, scripts,
};
use crate::{
    bus::{Bus, BusMessage, ListKind},
    ids::{EventId, ReplicaTag},
    keys::Keys,
    metrics::Metrics,
};

/// Capacity of fred's broadcast channel of pub/sub messages; if the bus dispatcher falls this far
/// behind, feeds re-read their logs.
const SUBSCRIBER_BROADCAST_CAPACITY: usize = 16 * 1024;

struct Scripts {
    session_create: Script,
    session_load: Script,
    session_delete: Script,
    session_set_field: Script,
    subscribe: Script,
    unsubscribe: Script,
    event_append: Script,
    feed_open: Script,
    feed_checkpoint: Script,
    resource_updated: Script,
    prune_subscribers: Script,
    kv_set: Script,
    kv_delete: Script,
    shared_secret: Script,
    cache_release: Script,
    cache_invalidate: Script,
    lease: Script,
    map_replace: Script,
    quota_admit: Script,
    quota_release: Script,
    quota_renew: Script,
    quota_bind_session: Script,
    quota_prune_sessions: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            session_create: Script::from_lua(scripts::SESSION_CREATE),
            session_load: Script::from_lua(scripts::SESSION_LOAD),
            session_delete: Script::from_lua(scripts::SESSION_DELETE),
            session_set_field: Script::from_lua(scripts::SESSION_SET_FIELD),
            subscribe: Script::from_lua(scripts::SUBSCRIBE),
            unsubscribe: Script::from_lua(scripts::UNSUBSCRIBE),
            event_append: Script::from_lua(scripts::event_append()),
            feed_open: Script::from_lua(scripts::feed_open()),
            feed_checkpoint: Script::from_lua(scripts::FEED_CHECKPOINT),
            resource_updated: Script::from_lua(scripts::resource_updated()),
            prune_subscribers: Script::from_lua(scripts::PRUNE_SUBSCRIBERS),
            kv_set: Script::from_lua(scripts::KV_SET),
            kv_delete: Script::from_lua(scripts::KV_DELETE),
            shared_secret: Script::from_lua(scripts::SHARED_SECRET),
            cache_release: Script::from_lua(scripts::CACHE_RELEASE),
            cache_invalidate: Script::from_lua(scripts::CACHE_INVALIDATE),
            lease: Script::from_lua(scripts::LEASE),
            map_replace: Script::from_lua(scripts::MAP_REPLACE),
            quota_admit: Script::from_lua(scripts::quota_admit()),
            quota_release: Script::from_lua(scripts::QUOTA_RELEASE),
            quota_renew: Script::from_lua(scripts::QUOTA_RENEW),
            quota_bind_session: Script::from_lua(scripts::QUOTA_BIND_SESSION),
            quota_prune_sessions: Script::from_lua(scripts::quota_prune_sessions()),
        }
    }
}

struct Inner {
    pool: Pool,
    subscriber: SubscriberClient,
    keys: Keys,
    config: BackendConfig,
    scripts: Scripts,
    metrics: Metrics,
    origin: ReplicaTag,
    session_prefix: String,
    log_prefix: String,
    replica_prefix: String,
    subscribers_prefix: String,
    /// When the last command failed for want of Redis (connection, timeout), in microseconds
    /// after `epoch` (0: never).
    last_failure_us: std::sync::atomic::AtomicU64,
    /// When the last command succeeded, likewise.
    last_success_us: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// The best reading of Redis's clock so far (see [`RedisBackend::write_deadline`]).
    clock: std::sync::Mutex<Option<ClockReading>>,
}

/// Redis's clock as this replica last read it, to give writes a deadline Redis checks itself.
#[derive(Debug, Clone, Copy)]
struct ClockReading {
    /// Redis's clock less this host's, in microseconds.
    offset_us: i64,
    /// How far `offset_us` may be off when read: half the round trip of the `TIME` that gave it.
    error_us: i64,
    taken: std::time::Instant,
}

impl ClockReading {
    /// How far the offset may be off now: two clocks drift apart by at most 100 ppm (a free
    /// running quartz's worst case; NTP keeps them much closer). A clock that is *stepped* is not
    /// covered (docs/operations.md).
    fn error_now(&self) -> i64 {
        let drift = self.taken.elapsed().as_micros() / 10_000;
        self.error_us
            .saturating_add(i64::try_from(drift).unwrap_or(i64::MAX))
    }
}

/// Microseconds since the Unix epoch on this host's clock.
fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
}

/// Shared state in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.keys.prefix())
            .finish_non_exhaustive()
    }
}

/// A write Redis refused to run past its deadline: to the caller, a timeout like any other.
fn too_late() -> BackendError {
    BackendError::Redis(fred::error::Error::new(
        fred::error::ErrorKind::Timeout,
        "redis ran the write after its deadline and refused it",
    ))
}

fn builder(url: &SecretString, config: &BackendConfig) -> BackendResult<Builder> {
    let mut fred_config = FredConfig::from_url(url.expose_secret())?;
    // Fail commands at once while disconnected instead of queueing them without bound.
    fred_config.fail_fast = true;
    let timeout = config.redis_timeout;
    let mut builder = Builder::from_config(fred_config);
    builder
        .with_performance_config(|performance| {
            performance.default_command_timeout = timeout;
            performance.broadcast_channel_capacity = SUBSCRIBER_BROADCAST_CAPACITY;
        })
        .with_connection_config(|connection| {
            connection.connection_timeout = timeout;
            connection.internal_command_timeout = timeout;
            connection.max_command_attempts = 1;
            connection.tcp.nodelay = Some(true);
        })
        // Unlimited attempts, 50 ms doubling up to 2 s.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(builder)
}

impl RedisBackend {
    pub(super) async fn connect(
        url: &SecretString,
        config: BackendConfig,
        bus: Bus,
        metrics: Metrics,
    ) -> BackendResult<Self> {
        let builder = builder(url, &config)?;
        let pool = builder.build_pool(config.redis_pool_size)?;
        let subscriber = builder.build_subscriber_client()?;
        pool.connect();
        subscriber.connect();
        // Resubscribes to the tracked channels after every reconnect.
        subscriber.manage_subscriptions();
        let keys = bus.keys().clone();
        let [
            session_prefix,
            log_prefix,
            replica_prefix,
            subscribers_prefix,
        ] = keys.script_prefixes();
        let inner = Inner {
            session_prefix,
            log_prefix,
            replica_prefix,
            subscribers_prefix,
            last_failure_us: std::sync::atomic::AtomicU64::new(0),
            last_success_us: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            clock: std::sync::Mutex::new(None),
            origin: bus.tag().clone(),
            pool,
            subscriber,
            keys,
            config,
            scripts: Scripts::new(),
            metrics,
        };
        let backend = Self {
            inner: Arc::new(inner),
        };
        backend.spawn_subscriber(bus);
        // Give a reachable Redis a moment so the first requests find it connected; an unreachable
        // one does not block start-up (the replica reports not-ready until it is back).
        let wait = backend.inner.config.redis_timeout;
        if tokio::time::timeout(wait, backend.inner.pool.wait_for_connect())
            .await
            .is_err()
        {
            tracing::warn!("redis is not reachable yet; commands fail until it is");
        }
        Ok(backend)
    }

    fn spawn_subscriber(&self, bus: Bus) {
        /// Subscribes to `channels` (again), retrying until Redis confirms.
        async fn resubscribe(subscriber: &SubscriberClient, channels: &[String]) {
            loop {
                match subscriber.subscribe(channels.to_vec()).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::debug!(%error, "bus subscribe failed, retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if !subscriber.is_connected() {
                            let _ = subscriber.wait_for_connect().await;
                        }
                    }
                }
            }
        }
        let subscriber = self.inner.subscriber.clone();
        let channels: Vec<String> = bus.channels().iter().map(|c| (*c).to_owned()).collect();
        let mut messages = subscriber.message_rx();
        let mut reconnects = subscriber.reconnect_rx();
        tokio::spawn(async move {
            // The first SUBSCRIBE may fail while Redis is down: keep trying until it is tracked.
            resubscribe(&subscriber, &channels).await;
            loop {
                tokio::select! {
                    message = messages.recv() => match message {
                        Ok(message) => {
                            let payload = match &message.value {
                                Value::String(s) => s.as_bytes(),
                                Value::Bytes(b) => b.as_ref(),
                                _ => continue,
                            };
                            bus.dispatch(&message.channel, payload);
                        }
                        Err(RecvError::Lagged(missed)) => {
                            let listeners = bus.end_listeners();
                            tracing::warn!(missed, listeners, "bus subscriber lagged; GET streams re-read their logs, listen streams end");
                            bus.all_feeds_lagged();
                        }
                        Err(RecvError::Closed) => break,
                    },
                    reconnect = reconnects.recv() => match reconnect {
                        Ok(server) => {
                            // Catch up only once the channels are subscribed again: a read of the
                            // logs before that would miss what is published in between, for good.
                            // SUBSCRIBE is answered in order on the subscriber connection, so its
                            // reply means every later message reaches this replica.
                            // Listen streams have no log: what was published while the subscriber
                            // was away is lost to them, so they end and their clients listen again
                            // (after the resubscription, so the new listens miss nothing).
                            resubscribe(&subscriber, &channels).await;
                            let listeners = bus.end_listeners();
                            tracing::info!(%server, listeners, "bus subscriber reconnected and resubscribed; GET streams re-read their logs, listen streams end");
                            bus.all_feeds_lagged();
                        }
                        Err(RecvError::Lagged(_)) => {
                            resubscribe(&subscriber, &channels).await;
                            bus.end_listeners();
                            bus.all_feeds_lagged();
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The pool's client for the next command: a connected one when there is one (round robin
    /// over those), so a connection still reconnecting after an outage fails no command.
    fn client(&self) -> &fred::clients::Client {
        self.inner.pool.next_connected()
    }

    /// Whether a connection of the pool is up (commands go to connected ones first).
    pub(super) fn is_connected(&self) -> bool {
        self.client().is_connected()
    }

    /// Microseconds from the backend's epoch to `at`.
    fn micros(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.inner.epoch).as_micros() as u64
    }

    /// Notes that an operation started at `started` failed for want of Redis.
    pub(super) fn note_failure(&self, started: std::time::Instant) {
        let at = self.micros(started).max(1);
        self.inner
            .last_failure_us
            .fetch_max(at, std::sync::atomic::Ordering::Relaxed);
    }

    /// Notes that an operation started at `started` succeeded.
    pub(super) fn note_success(&self, started: std::time::Instant) {
        let at = self.micros(started).max(1);
        self.inner
            .last_success_us
            .fetch_max(at, std::sync::atomic::Ordering::Relaxed);
    }

    /// Not connected, or the latest operation to fail for want of Redis started after the latest
    /// one to succeed. Operations are ordered by when they started, not when they ended: a
    /// command queued during an outage that times out just after Redis is back says nothing about
    /// Redis now, whereas a PING sent since and answered does.
    pub(super) fn in_trouble(&self) -> bool {
        let failure = self
            .inner
            .last_failure_us
            .load(std::sync::atomic::Ordering::Relaxed);
        let success = self
            .inner
            .last_success_us
            .load(std::sync::atomic::Ordering::Relaxed);
        !self.is_connected() || failure > success
    }

    pub(super) fn failed_since(&self, since: std::time::Instant) -> bool {
        let last = self
            .inner
            .last_failure_us
            .load(std::sync::atomic::Ordering::Relaxed);
        last != 0
            && self.inner.epoch + std::time::Duration::from_micros(last)
                >= since.max(self.inner.epoch)
    }

    async fn eval<R: fred::types::FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> BackendResult<R> {
        Ok(script
            .evalsha_with_reload(self.client(), keys, args)
            .await?)
    }

    /// A round trip to Redis: reads its clock (`TIME`), which also keeps the reading behind
    /// [`Self::write_deadline`] fresh (the watchdog calls this four times a second).
    pub(super) async fn ping(&self) -> BackendResult<()> {
        self.read_clock().await
    }

    /// Reads Redis's clock and keeps the reading if it is at least as exact as the kept one.
    async fn read_clock(&self) -> BackendResult<()> {
        let started = std::time::Instant::now();
        let local_us = unix_micros();
        let time: Vec<String> = self
            .client()
            .custom(
                fred::types::CustomCommand::new_static(
                    "TIME",
                    fred::types::ClusterHash::Random,
                    false,
                ),
                Vec::<Value>::new(),
            )
            .await?;
        let round_trip = i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX);
        let (Some(secs), Some(micros)) = (
            time.first().and_then(|s| s.parse::<i64>().ok()),
            time.get(1).and_then(|s| s.parse::<i64>().ok()),
        ) else {
            return Err(BackendError::Protocol(format!("TIME answered {time:?}")));
        };
        let redis_us = secs.saturating_mul(1_000_000).saturating_add(micros);
        // Redis read its clock somewhere within the round trip: the middle is at most half of it
        // off (plus a microsecond of rounding on each side).
        let reading = ClockReading {
            offset_us: redis_us - (local_us + round_trip / 2),
            error_us: round_trip / 2 + 2,
            taken: std::time::Instant::now(),
        };
        let mut kept = self
            .inner
            .clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.is_none_or(|kept| reading.error_us <= kept.error_now()) {
            *kept = Some(reading);
        }
        Ok(())
    }

    /// The latest moment, on Redis's clock in microseconds since the Unix epoch, at which a write
    /// sent now may still run: before this replica's command timeout can have expired. A write
    /// carries it to its script, which refuses to run later, so a write this replica reported as
    /// failed (timed out) never lands afterwards: not when a partition heals and TCP delivers the
    /// bytes it held, not when a frozen Redis thaws and runs what queued up, not after a later
    /// write another replica acknowledged (which it would silently undo).
    async fn write_deadline(&self) -> BackendResult<i64> {
        let kept = *self
            .inner
            .clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let reading = match kept {
            Some(reading) => reading,
            None => {
                self.read_clock().await?;
                self.inner
                    .clock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .ok_or_else(|| BackendError::Protocol("no reading of Redis's clock".into()))?
            }
        };
        let timeout =
            i64::try_from(self.inner.config.redis_timeout.as_micros()).unwrap_or(i64::MAX);
        Ok(unix_micros()
            .saturating_add(reading.offset_us)
            .saturating_add(timeout)
            .saturating_sub(reading.error_now()))
    }

    fn ttl(&self) -> Value {
        Value::from(self.inner.config.session_ttl_secs() as i64)
    }

    pub(super) async fn session_create(
        &self,
        session: &str,
        init: &str,
        owner: &str,
    ) -> BackendResult<()> {
        let _: Value = self
            .eval(
                &self.inner.scripts.session_create,
                vec![self.inner.keys.session(session)],
                vec![init.into(), self.ttl(), owner.into()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn session_touch(&self, session: &str) -> BackendResult<bool> {
        let ttl = self.inner.config.session_ttl_secs() as i64;
        Ok(self
            .client()
            .expire(self.inner.keys.session(session), ttl, None)
            .await?)
    }

    pub(super) async fn session_load(&self, session: &str) -> BackendResult<Option<String>> {
        self.eval(
            &self.inner.scripts.session_load,
            vec![self.inner.keys.session(session)],
            vec![self.ttl()],
        )
        .await
    }

    pub(super) async fn session_delete(&self, session: &str) -> BackendResult<bool> {
        let existed: i64 = self
            .eval(
                &self.inner.scripts.session_delete,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                ],
                vec![
                    self.inner.subscribers_prefix.as_str().into(),
                    session.into(),
                    self.inner.keys.control_channel().into(),
                    BusMessage::SessionDeleted { session }.encode().into(),
                ],
            )
            .await?;
        Ok(existed == 1)
    }

    pub(super) async fn session_set_field(
        &self,
        session: &str,
        field: &str,
        value: &str,
    ) -> BackendResult<bool> {
        let set: i64 = self
            .eval(
                &self.inner.scripts.session_set_field,
                vec![self.inner.keys.session(session)],
                vec![field.into(), value.into(), self.ttl()],
            )
            .await?;
        Ok(set == 1)
    }

    pub(super) async fn session_get_field(
        &self,
        session: &str,
        field: &str,
    ) -> BackendResult<Option<String>> {
        Ok(self
            .client()
            .hget(self.inner.keys.session(session), field)
            .await?)
    }

    pub(super) async fn subscribe(
        &self,
        session: &str,
        uri: &str,
    ) -> BackendResult<SubscribeOutcome> {
        let outcome: i64 = self
            .eval(
                &self.inner.scripts.subscribe,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.subscribers(uri),
                ],
                vec![
                    uri.into(),
                    session.into(),
                    self.ttl(),
                    Value::from(self.inner.config.max_subscriptions_per_session as i64 + 4),
                    Value::from(self.inner.config.max_subscribers_per_uri as i64),
                ],
            )
            .await?;
        match outcome {
            1 => Ok(SubscribeOutcome::Subscribed),
            -1 => Ok(SubscribeOutcome::SessionGone),
            -2 => Ok(SubscribeOutcome::TooMany),
            -3 => Ok(SubscribeOutcome::TooManySubscribers),
            other => Err(BackendError::Protocol(format!(
                "subscribe returned {other}"
            ))),
        }
    }

    pub(super) async fn unsubscribe(&self, session: &str, uri: &str) -> BackendResult<()> {
        let _: Value = self
            .eval(
                &self.inner.scripts.unsubscribe,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.subscribers(uri),
                ],
                vec![uri.into(), session.into()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn event_append(
        &self,
        session: &str,
        payload: &str,
    ) -> BackendResult<Option<EventId>> {
        let id: Option<String> = self
            .eval(
                &self.inner.scripts.event_append,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                ],
                vec![
                    payload.into(),
                    Value::from(self.inner.config.event_log_max_len as i64),
                    Value::from(self.inner.config.retention_secs() as i64),
                    self.inner.replica_prefix.as_str().into(),
                    session.into(),
                ],
            )
            .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    pub(super) async fn feed_open(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        after: Option<EventId>,
        limit: u64,
    ) -> BackendResult<Option<FeedStart>> {
        let reply: Option<Vec<Value>> = self
            .eval(
                &self.inner.scripts.feed_open,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                ],
                vec![
                    holder.into(),
                    after.map(|id| id.to_string()).unwrap_or_default().into(),
                    Value::from(limit as i64),
                    self.ttl(),
                    self.inner.replica_prefix.as_str().into(),
                    session.into(),
                ],
            )
            .await?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let (from, rest) = reply
            .split_first()
            .ok_or_else(|| BackendError::Protocol("feed_open: empty reply".into()))?;
        let from = parse_id(&from.as_str().unwrap_or_default())?;
        let mut events = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks(2) {
            let [id, payload] = pair else {
                return Err(BackendError::Protocol("feed_open: odd reply".into()));
            };
            events.push(LoggedEvent {
                id: parse_id(&id.as_str().unwrap_or_default())?,
                payload: Arc::from(payload.as_str().unwrap_or_default().as_ref()),
            });
        }
        Ok(Some(FeedStart { from, events }))
    }

    pub(super) async fn feed_checkpoint(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        last: EventId,
        release: bool,
    ) -> BackendResult<bool> {
        let live: i64 = self
            .eval(
                &self.inner.scripts.feed_checkpoint,
                vec![self.inner.keys.session(session)],
                vec![
                    holder.into(),
                    last.to_string().into(),
                    self.ttl(),
                    if release { "1" } else { "0" }.into(),
                ],
            )
            .await?;
        Ok(live == 1)
    }

    pub(super) async fn events_after(
        &self,
        session: &str,
        after: EventId,
        limit: u64,
    ) -> BackendResult<Vec<LoggedEvent>> {
        let entries: Vec<(String, Vec<(String, String)>)> = self
            .client()
            .xrange(
                self.inner.keys.event_log(session),
                format!("({after}"),
                "+",
                Some(limit),
            )
            .await?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let payload = fields
                    .into_iter()
                    .find(|(name, _)| name == "m")
                    .map(|(_, value)| value)
                    .ok_or_else(|| BackendError::Protocol("event without payload".into()))?;
                Ok(LoggedEvent {
                    id: parse_id(&id)?,
                    payload: Arc::from(payload),
                })
            })
            .collect()
    }

    pub(super) async fn resource_updated(
        &self,
        uri: &str,
        legacy_payload: &str,
    ) -> BackendResult<u64> {
        let delivered: i64 = self
            .eval(
                &self.inner.scripts.resource_updated,
                vec![self.inner.keys.subscribers(uri)],
                vec![
                    self.inner.session_prefix.as_str().into(),
                    self.inner.log_prefix.as_str().into(),
                    legacy_payload.into(),
                    Value::from(self.inner.config.event_log_max_len as i64),
                    Value::from(self.inner.config.retention_secs() as i64),
                    self.inner.replica_prefix.as_str().into(),
                    self.inner.keys.resource_channel().into(),
                    BusMessage::ResourceUpdated {
                        uri,
                        trace: crate::telemetry::current_traceparent().as_deref(),
                    }
                    .encode()
                    .into(),
                ],
            )
            .await?;
        Ok(delivered.max(0) as u64)
    }

    pub(super) async fn list_changed(&self, list: ListKind) -> BackendResult<()> {
        let _: i64 = self
            .client()
            .publish(
                self.inner.keys.resource_channel(),
                BusMessage::ListChanged(list).encode(),
            )
            .await?;
        Ok(())
    }

    pub(super) async fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> BackendResult<bool> {
        let receivers: i64 = self
            .client()
            .publish(
                self.inner.keys.replica_channel(target.as_str()),
                BusMessage::Forward {
                    session,
                    trace: crate::telemetry::current_traceparent().as_deref(),
                    payload,
                }
                .encode(),
            )
            .await?;
        Ok(receivers > 0)
    }

    pub(super) async fn publish_probe(&self, probe: &str) -> BackendResult<()> {
        let _: i64 = self
            .client()
            .publish(
                self.inner.keys.replica_channel(self.inner.origin.as_str()),
                probe,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn publish_cancel(&self, session: &str, payload: &str) -> BackendResult<()> {
        let _: i64 = self
            .client()
            .publish(
                self.inner.keys.control_channel(),
                BusMessage::Cancel {
                    origin: self.inner.origin.as_str(),
                    session,
                    trace: crate::telemetry::current_traceparent().as_deref(),
                    payload,
                }
                .encode(),
            )
            .await?;
        Ok(())
    }

    pub(super) async fn kv_set(&self, key: &str, value: &str) -> BackendResult<KvSetOutcome> {
        let deadline = self.write_deadline().await?;
        let outcome: i64 = self
            .eval(
                &self.inner.scripts.kv_set,
                vec![self.inner.keys.kv(), self.inner.keys.kv_index()],
                vec![
                    key.into(),
                    value.into(),
                    Value::from(self.inner.config.kv_max_keys as i64),
                    Value::from(deadline),
                ],
            )
            .await?;
        Ok(match outcome {
            1 => KvSetOutcome::Created,
            0 => KvSetOutcome::Updated,
            -1 => KvSetOutcome::Full,
            _ => return Err(too_late()),
        })
    }

    pub(super) async fn kv_get(&self, key: &str) -> BackendResult<Option<String>> {
        Ok(self.client().hget(self.inner.keys.kv(), key).await?)
    }

    pub(super) async fn kv_delete(&self, key: &str) -> BackendResult<bool> {
        let deadline = self.write_deadline().await?;
        let existed: i64 = self
            .eval(
                &self.inner.scripts.kv_delete,
                vec![self.inner.keys.kv(), self.inner.keys.kv_index()],
                vec![key.into(), Value::from(deadline)],
            )
            .await?;
        match existed {
            -1 => Err(too_late()),
            existed => Ok(existed == 1),
        }
    }

    pub(super) async fn kv_list(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> BackendResult<Vec<String>> {
        use fred::interfaces::SortedSetsInterface;
        let min = match after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        Ok(self
            .client()
            .zrange(
                self.inner.keys.kv_index(),
                min,
                "+",
                Some(fred::types::sorted_sets::ZSort::ByLex),
                false,
                Some(Limit::from((0, limit as i64))),
                false,
            )
            .await?)
    }

    pub(super) async fn shared_secret(&self, name: &str, candidate: &str) -> BackendResult<String> {
        self.eval(
            &self.inner.scripts.shared_secret,
            vec![self.inner.keys.secret(name)],
            vec![candidate.into()],
        )
        .await
    }

    pub(super) async fn cache_get(&self, id: &str) -> BackendResult<Option<String>> {
        Ok(self.client().get(self.inner.keys.cache_entry(id)).await?)
    }

    pub(super) async fn cache_lock(
        &self,
        id: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let taken: Option<String> = self
            .client()
            .set(
                self.inner.keys.cache_lock(id),
                owner,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(taken.is_some())
    }

    pub(super) async fn cache_release(
        &self,
        id: &str,
        owner: &str,
        entry: Option<CacheEntry<'_>>,
    ) -> BackendResult<()> {
        let mut args: Vec<Value> = vec![
            owner.into(),
            self.inner.keys.cache_channel().into(),
            BusMessage::CacheFilled { id }.encode().into(),
        ];
        if let Some(entry) = entry {
            args.extend([
                "1".into(),
                entry.value.into(),
                Value::from(entry.ttl.as_millis().max(1) as i64),
                self.inner.keys.cache_tag_prefix().into(),
            ]);
            args.extend(entry.tags.iter().map(|tag| Value::from(tag.as_str())));
        } else {
            args.push("0".into());
        }
        let _: i64 = self
            .eval(
                &self.inner.scripts.cache_release,
                vec![
                    self.inner.keys.cache_entry(id),
                    self.inner.keys.cache_lock(id),
                ],
                args,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn cache_invalidate(&self, tags: &[String]) -> BackendResult<u64> {
        if tags.is_empty() {
            return Ok(0);
        }
        let mut args: Vec<Value> = vec![self.inner.keys.cache_tag_prefix().into()];
        args.extend(tags.iter().map(|tag| Value::from(tag.as_str())));
        let deleted: i64 = self
            .eval(&self.inner.scripts.cache_invalidate, vec![], args)
            .await?;
        Ok(deleted.max(0) as u64)
    }

    pub(super) async fn lease(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let held: i64 = self
            .eval(
                &self.inner.scripts.lease,
                vec![key.to_owned()],
                vec![holder.into(), Value::from(ttl.as_millis().max(1) as i64)],
            )
            .await?;
        Ok(held == 1)
    }

    pub(super) async fn map_get_all(
        &self,
        key: &str,
    ) -> BackendResult<std::collections::BTreeMap<String, String>> {
        let map: std::collections::HashMap<String, String> = self.client().hgetall(key).await?;
        Ok(map.into_iter().collect())
    }

    pub(super) async fn map_replace(
        &self,
        key: &str,
        entries: &std::collections::BTreeMap<String, String>,
    ) -> BackendResult<()> {
        let args: Vec<Value> = entries
            .iter()
            .flat_map(|(k, v)| [Value::from(k.as_str()), Value::from(v.as_str())])
            .collect();
        let _: i64 = self
            .eval(&self.inner.scripts.map_replace, vec![key.to_owned()], args)
            .await?;
        Ok(())
    }

    pub(super) async fn quota_admit(
        &self,
        checks: &[QuotaCheck<'_>],
        member: &str,
        lease: Duration,
    ) -> BackendResult<Option<QuotaRefusal>> {
        let keys = checks
            .iter()
            .map(|check| self.inner.keys.quota(check.kind.as_str(), check.subject))
            .collect();
        let mut args: Vec<Value> = vec![
            member.into(),
            Value::from(lease.as_millis().max(1) as i64),
            self.inner.session_prefix.as_str().into(),
            Value::from(SESSION_RECHECK.as_millis() as i64),
        ];
        for check in checks {
            args.push(check.kind.as_str().into());
            args.push(Value::from(i64::from(check.limit)));
            args.push(Value::from(i64::from(check.burst.max(1))));
        }
        let (index, retry_ms): (i64, i64) = self
            .eval(&self.inner.scripts.quota_admit, keys, args)
            .await?;
        Ok(refusal(checks, index, retry_ms))
    }

    pub(super) async fn quota_release(
        &self,
        releases: &[(QuotaKind, &str, &str)],
    ) -> BackendResult<()> {
        if releases.is_empty() {
            return Ok(());
        }
        let keys = releases
            .iter()
            .map(|(kind, subject, _)| self.inner.keys.quota(kind.as_str(), subject))
            .collect();
        let members = releases
            .iter()
            .map(|(_, _, member)| Value::from(*member))
            .collect();
        let _: i64 = self
            .eval(&self.inner.scripts.quota_release, keys, members)
            .await?;
        Ok(())
    }

    pub(super) async fn quota_renew(
        &self,
        (kind, subject): (QuotaKind, &str),
        members: &[String],
        lease: Duration,
    ) -> BackendResult<()> {
        let mut args: Vec<Value> = Vec::with_capacity(members.len() + 1);
        args.push(Value::from(lease.as_millis().max(1) as i64));
        args.extend(members.iter().map(|member| Value::from(member.as_str())));
        let _: i64 = self
            .eval(
                &self.inner.scripts.quota_renew,
                vec![self.inner.keys.quota(kind.as_str(), subject)],
                args,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn quota_bind_session(
        &self,
        subjects: &[&str],
        token: &str,
        session: &str,
    ) -> BackendResult<()> {
        let keys = subjects
            .iter()
            .map(|subject| self.inner.keys.quota(QuotaKind::Sessions.as_str(), subject))
            .collect();
        let _: i64 = self
            .eval(
                &self.inner.scripts.quota_bind_session,
                keys,
                vec![
                    token.into(),
                    session.into(),
                    Value::from(SESSION_RECHECK.as_millis() as i64),
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn janitor_pass(
        &self,
        lease_holder: &ReplicaTag,
        lease: Duration,
    ) -> BackendResult<u64> {
        use futures::TryStreamExt;
        let won: Option<String> = self
            .client()
            .set(
                self.inner.keys.janitor_lease(),
                lease_holder.as_str(),
                Some(Expiration::EX(lease.as_secs().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if won.is_none() {
            return Ok(0);
        }
        let client = self.client();
        let sets: Vec<fred::types::Key> = client
            .scan_buffered(self.inner.keys.subscribers_pattern(), Some(200), None)
            .try_collect()
            .await?;
        let mut removed = 0;
        for set in sets {
            let Some(set) = set.as_str().map(str::to_owned) else {
                continue;
            };
            let pruned: i64 = self
                .eval(
                    &self.inner.scripts.prune_subscribers,
                    vec![set],
                    vec![self.inner.session_prefix.as_str().into()],
                )
                .await?;
            removed += pruned.max(0) as u64;
        }
        // Session quota indexes of principals that open no new session (their next initialize
        // would prune them too): bounded by the sessions that still exist.
        let indexes: Vec<fred::types::Key> = client
            .scan_buffered(self.inner.keys.quota_sessions_pattern(), Some(200), None)
            .try_collect()
            .await?;
        for index in indexes {
            let Some(index) = index.as_str().map(str::to_owned) else {
                continue;
            };
            let _: i64 = self
                .eval(
                    &self.inner.scripts.quota_prune_sessions,
                    vec![index],
                    vec![
                        self.inner.session_prefix.as_str().into(),
                        Value::from(SESSION_RECHECK.as_millis() as i64),
                    ],
                )
                .await?;
        }
        Ok(removed)
    }

    pub(super) async fn shutdown(&self) {
        let _ = self.inner.subscriber.quit().await;
        let _ = self.inner.pool.quit().await;
    }
}

/// The refusal a quota script's `{index, retry ms}` answer names (`index` 0: allowed).
fn refusal(checks: &[QuotaCheck<'_>], index: i64, retry_ms: i64) -> Option<QuotaRefusal> {
    let index = usize::try_from(index)
        .ok()
        .filter(|i| (1..=checks.len()).contains(i))?
        - 1;
    Some(QuotaRefusal {
        index,
        retry_after: (checks[index].kind == QuotaKind::Rate)
            .then(|| Duration::from_millis(retry_ms.max(1) as u64)),
    })
}

fn parse_id(id: &str) -> BackendResult<EventId> {
    id.parse()
        .map_err(|_| BackendError::Protocol(format!("malformed stream id {id:?}")))
}
