//! The Redis backend: a small pool of auto-pipelining connections for commands, and one subscriber
//! connection per replica for the bus.
//!
//! Connection policy: every command has a timeout (`SHOAL_REDIS_TIMEOUT_MS`: one sent while Redis
//! is unreachable waits for the reconnection at most that long, and the HTTP door refuses new
//! requests with 503 as soon as the replica knows), and both the pool and the subscriber
//! reconnect with capped exponential backoff for ever, the first connection included, so a
//! replica recovers by itself when Redis (or a new primary) is there. After the subscriber
//! reconnects, every GET stream re-reads its event log, so nothing published meanwhile is lost.
//!
//! Lua scripts, each beside its operation in the concern modules, make multi-key operations
//! atomic in a single round trip. Every script touches only the keys it declares, and those share
//! one hash slot (the tag of the session, resource, principal or cache entry they belong to, see
//! [`crate::keys::Keys`]); an operation that spans several things (a fanout to many sessions, a
//! session's deletion from the subscriber sets of its resources) is several scripts, each in its
//! slot (docs/architecture.md, "Redis Cluster"). The same layout serves a standalone Redis, a
//! Sentinel set and a Redis Cluster: only fred's routing differs.
//!
//! Messages published here are frames of [`crate::bus::BusMessage`], built with the codec's Lua
//! helper [`crate::bus::LUA_NETSTRING`] (`ns`); a test against a real Redis pins them to
//! [`crate::bus::BusMessage::encode`].

use std::{sync::Arc, time::Duration};

use fred::{
    clients::{Pool, SubscriberClient},
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    prelude::{Builder, Config as FredConfig, ReconnectPolicy, Value},
    types::config::{ReconnectError, Server},
    types::scripts::Script,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::broadcast::error::RecvError;

use super::{BackendConfig, BackendError, BackendResult};
use crate::{background::Background, bus::Bus, ids::ReplicaTag, keys::Keys, metrics::Metrics};

/// Capacity of fred's broadcast channel of pub/sub messages; if the bus dispatcher falls this far
/// behind, feeds re-read their logs.
const SUBSCRIBER_BROADCAST_CAPACITY: usize = 16 * 1024;

pub(super) struct Inner {
    pub(super) pool: Pool,
    pub(super) subscriber: SubscriberClient,
    pub(super) keys: Keys,
    pub(super) config: BackendConfig,
    pub(super) metrics: Metrics,
    /// Where the subscriber loop and the GET-stream feeds run: shutdown waits for them.
    pub(super) background: Background,
    pub(super) origin: ReplicaTag,
    /// The replica-channel prefix the scripts complete with a replica tag.
    pub(super) replica_prefix: String,
    /// When the last command failed for want of Redis (connection, timeout), in microseconds
    /// after `epoch` (0: never).
    pub(super) last_failure_us: std::sync::atomic::AtomicU64,
    /// When the last command succeeded, likewise.
    pub(super) last_success_us: std::sync::atomic::AtomicU64,
    pub(super) epoch: std::time::Instant,
    /// The best reading of each Redis primary's clock so far (see
    /// [`RedisBackend::write_deadline`]), by node (`None`: the one primary of a standalone or
    /// Sentinel-managed Redis).
    clocks: std::sync::Mutex<std::collections::HashMap<Option<Server>, ClockReading>>,
    /// The hash slot of the key prefix: on a Redis Cluster, the node the bus subscription lives on
    /// and its counted publishes go to.
    prefix_slot: u16,
    /// On a Redis Cluster, the node the bus subscription was last made on.
    bus_node: std::sync::Mutex<Option<Server>>,
    /// Woken when a probe found the bus subscription away from the prefix slot's node.
    bus_misplaced: tokio::sync::Notify,
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
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.keys.prefix())
            .finish_non_exhaustive()
    }
}

fn builder(url: &SecretString, config: &BackendConfig) -> BackendResult<Builder> {
    let mut fred_config = FredConfig::from_url(url.expose_secret())?;
    // Keep trying when the first connection fails (Redis, or every sentinel, down at start-up):
    // with `true`, fred would give up for good after one attempt. A command sent while the client
    // is disconnected waits for the reconnection at most its timeout.
    fred_config.fail_fast = false;
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
            // A primary demoted without dropping its connections (a Sentinel failover ordered by
            // an operator, a replica promoted in its place) answers writes READONLY: reconnect,
            // through the sentinels, to whichever node is the primary now.
            connection.reconnect_errors = vec![
                ReconnectError::Loading,
                ReconnectError::ReadOnly,
                ReconnectError::MasterDown,
            ];
        })
        // Unlimited attempts, 50 ms doubling up to 500 ms (plus fred's jitter of up to 100 ms):
        // a replica is back within about half a second of Redis (or, on a Sentinel set, of the
        // promotion of a new primary). fred cannot be woken from a backoff sleep, so the cap is
        // what bounds that delay; an attempt costs one connection (and one question to a
        // sentinel), nothing a Redis notices twice a second.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 500, 2));
    Ok(builder)
}

/// The primary serving `slot` in `client`'s routing table: `None` off a Redis Cluster, or before
/// the table is known.
fn slot_owner(client: &impl fred::interfaces::ClusterInterface, slot: u16) -> Option<Server> {
    if !client.is_clustered() {
        return None;
    }
    client
        .cached_cluster_state()
        .and_then(|routing| routing.get_server(slot).cloned())
}

/// Whether `server`, just (re)connected, is where the bus subscription lives: on a Redis
/// Cluster, the primary serving `slot` in fred's routing table (which a resynchronisation updates
/// before it reports the nodes it connected); any server otherwise, or when the table is not
/// known yet.
fn holds_the_bus(subscriber: &SubscriberClient, slot: u16, server: &Server) -> bool {
    slot_owner(subscriber, slot).is_none_or(|owner| owner == *server)
}

impl RedisBackend {
    pub(super) async fn connect(
        url: &SecretString,
        config: BackendConfig,
        bus: Bus,
        metrics: Metrics,
        background: Background,
    ) -> BackendResult<Self> {
        let builder = builder(url, &config)?;
        let pool = builder.build_pool(config.redis_pool_size)?;
        let subscriber = builder.build_subscriber_client()?;
        pool.connect();
        subscriber.connect();
        let keys = bus.keys().clone();
        let inner = Inner {
            replica_prefix: keys.replica_channel_prefix(),
            last_failure_us: std::sync::atomic::AtomicU64::new(0),
            last_success_us: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            clocks: std::sync::Mutex::new(std::collections::HashMap::new()),
            prefix_slot: fred::util::redis_keyslot(keys.prefix().as_bytes()),
            bus_node: std::sync::Mutex::new(None),
            bus_misplaced: tokio::sync::Notify::new(),
            origin: bus.tag().clone(),
            pool,
            subscriber,
            keys,
            config,
            metrics,
            background,
        };
        let backend = Self {
            inner: Arc::new(inner),
        };
        backend.spawn_subscriber(bus);
        backend.spawn_error_log();
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
        /// Subscribes to `channels` (again), retrying until Redis confirms. On a Redis Cluster
        /// the subscription goes to the primary of the key prefix's slot, where every replica
        /// subscribes and the bus channels (which carry the prefix's hash tag) are published:
        /// a `PUBLISH` there counts every replica listening, which is how a forwarded response
        /// learns that its replica is gone. (fred would pick a node from its client id, and its
        /// own resubscription would follow that choice: the loop below resubscribes instead.)
        async fn resubscribe(subscriber: &SubscriberClient, channels: &[String], slot: u16) {
            let on_the_prefix_slot = fred::types::config::Options {
                cluster_hash: Some(fred::types::ClusterHash::Custom(slot)),
                ..Default::default()
            };
            loop {
                match subscriber
                    .with_options(&on_the_prefix_slot)
                    .subscribe(channels.to_vec())
                    .await
                {
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
        let stop = self.inner.background.stop.clone();
        let slot = self.inner.prefix_slot;
        let backend = self.clone();
        self.inner.background.spawn(async move {
            // The first SUBSCRIBE may fail while Redis is down: keep trying until it is tracked.
            tokio::select! {
                () = stop.cancelled() => return,
                () = resubscribe(&subscriber, &channels, slot) => {}
            }
            backend.set_bus_node(slot_owner(&subscriber, slot));
            bus.mark_subscribed();
            // A first probe at once: readiness waits for one to come back.
            if let Err(error) = backend.publish_probe(&bus.probe()).await {
                tracing::debug!(%error, "first bus probe not sent");
            }
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = backend.inner.bus_misplaced.notified() => {
                        // A planned failover or a migration moved the prefix's slot without
                        // breaking the subscriber's connection: learn the new layout, subscribe
                        // on the slot's new node, then leave the old one. Messages reached the
                        // old node meanwhile (a cluster relays PUBLISH to every node); the GET
                        // streams re-read their logs and listen streams end anyway, as after a
                        // reconnection, for what the switch itself may drop or double.
                        let Some((old, new)) = backend.bus_move(&subscriber).await else {
                            continue;
                        };
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = resubscribe(&subscriber, &channels, slot) => {}
                        }
                        backend.set_bus_node(new.clone());
                        if let Some(old) = &old {
                            backend.leave_bus_node(&subscriber, old, &channels).await;
                        }
                        let listeners = bus.end_listeners();
                        tracing::info!(?old, ?new, listeners, "the prefix's slot moved; the bus subscription followed it");
                        bus.all_feeds_lagged();
                    }
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
                        Ok(server) if !holds_the_bus(&subscriber, slot, &server) => {
                            // On a Redis Cluster fred reports the (re)connection of every node;
                            // the bus subscription lives on the one serving the prefix's slot,
                            // and another node's connection changes nothing for it.
                            tracing::debug!(%server, "a cluster node reconnected; the bus subscription is elsewhere");
                        }
                        Ok(server) => {
                            // Catch up only once the channels are subscribed again: a read of the
                            // logs before that would miss what is published in between, for good.
                            // SUBSCRIBE is answered in order on the subscriber connection, so its
                            // reply means every later message reaches this replica.
                            // Listen streams have no log: what was published while the subscriber
                            // was away is lost to them, so they end and their clients listen again
                            // (after the resubscription, so the new listens miss nothing).
                            // Shutdown does not wait for a Redis that is down.
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = resubscribe(&subscriber, &channels, slot) => {}
                            }
                            backend.set_bus_node(slot_owner(&subscriber, slot));
                            let listeners = bus.end_listeners();
                            tracing::info!(%server, listeners, "bus subscriber reconnected and resubscribed; GET streams re-read their logs, listen streams end");
                            bus.all_feeds_lagged();
                        }
                        Err(RecvError::Lagged(_)) => {
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = resubscribe(&subscriber, &channels, slot) => {}
                            }
                            bus.end_listeners();
                            bus.all_feeds_lagged();
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
    }

    /// Logs why fred's connections fail (refused, reset, authentication, a node that left the
    /// cluster…), which commands only report as unreachable: at most one line every 10 s, with the
    /// number of errors it stands for.
    fn spawn_error_log(&self) {
        const EVERY: Duration = Duration::from_secs(10);
        let last = Arc::new(std::sync::Mutex::new((None::<std::time::Instant>, 0u64)));
        let receivers = self
            .inner
            .pool
            .clients()
            .iter()
            .map(EventInterface::error_rx)
            .chain(std::iter::once(self.inner.subscriber.error_rx()));
        for mut errors in receivers {
            let last = last.clone();
            let stop = self.inner.background.stop.clone();
            self.inner.background.spawn(async move {
                loop {
                    let (error, server) = tokio::select! {
                        () = stop.cancelled() => return,
                        received = errors.recv() => match received {
                            Ok(received) => received,
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => return,
                        },
                    };
                    let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    last.1 += 1;
                    if last.0.is_none_or(|at| at.elapsed() >= EVERY) {
                        let errors = std::mem::take(&mut last.1);
                        last.0 = Some(std::time::Instant::now());
                        let server = server.map(|server| server.to_string()).unwrap_or_default();
                        tracing::warn!(%error, server, errors, "redis connection error (at most one line every 10 s; errors counts those since the last)");
                    }
                }
            });
        }
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// After a probe found the bus subscription misplaced: reads the cluster layout again and
    /// answers where the subscription is and where the prefix's slot is now, when they differ.
    async fn bus_move(
        &self,
        subscriber: &SubscriberClient,
    ) -> Option<(Option<Server>, Option<Server>)> {
        use fred::interfaces::ClusterInterface as _;
        match tokio::time::timeout(self.inner.config.redis_timeout, subscriber.sync_cluster()).await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "the bus subscriber could not read the cluster layout");
                return None;
            }
            Err(_) => {
                tracing::debug!("the bus subscriber timed out reading the cluster layout");
                return None;
            }
        }
        let old = self.bus_node();
        let new = slot_owner(subscriber, self.inner.prefix_slot);
        (new != old).then_some((old, new))
    }

    /// Ends the bus subscription on the node `old` (best effort: it ends with its connection
    /// anyway).
    async fn leave_bus_node(
        &self,
        subscriber: &SubscriberClient,
        old: &Server,
        channels: &[String],
    ) {
        let on_old = fred::types::config::Options {
            cluster_node: Some(old.clone()),
            ..Default::default()
        };
        let left = tokio::time::timeout(
            self.inner.config.redis_timeout,
            subscriber
                .with_options(&on_old)
                .unsubscribe(channels.to_vec()),
        )
        .await;
        if !matches!(left, Ok(Ok(()))) {
            tracing::debug!(%old, "the bus subscription on the former node could not be ended; it ends with the connection");
        }
    }

    fn bus_node(&self) -> Option<Server> {
        self.inner
            .bus_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_bus_node(&self, node: Option<Server>) {
        *self
            .inner
            .bus_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = node;
    }

    /// A probe published on the prefix slot's node reached nobody: on a Redis Cluster, the bus
    /// subscription must follow the slot (see `spawn_subscriber`).
    pub(super) fn bus_misplaced(&self) {
        use fred::interfaces::ClientLike as _;
        if self.inner.subscriber.is_clustered() {
            self.inner.bus_misplaced.notify_one();
        }
    }

    /// The pool's client for the next command: a connected one when there is one (round robin
    /// over those), so a connection still reconnecting after an outage fails no command.
    pub(super) fn client(&self) -> &fred::clients::Client {
        self.inner.pool.next_connected()
    }

    /// Whether a connection of the pool is up (commands go to connected ones first).
    pub(super) fn is_connected(&self) -> bool {
        self.client().is_connected()
    }

    /// Microseconds from the backend's epoch to `at`.
    pub(super) fn micros(&self, at: std::time::Instant) -> u64 {
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

    pub(super) async fn eval<R: fred::types::FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> BackendResult<R> {
        Ok(script
            .evalsha_with_reload(self.client(), keys, args)
            .await?)
    }

    /// A round trip to Redis: reads its clock (`TIME`; on a Redis Cluster, every primary's), which
    /// also keeps the readings behind [`Self::write_deadline`] fresh (the watchdog calls this four
    /// times a second).
    pub(super) async fn ping(&self) -> BackendResult<()> {
        let nodes = self.primaries();
        let readings = nodes.iter().map(|node| self.read_clock(node.as_ref()));
        for result in futures::future::join_all(readings).await {
            result?;
        }
        Ok(())
    }

    /// The primaries to read clocks from: `[None]` (whichever node the client talks to) unless
    /// this is a Redis Cluster whose layout fred knows.
    fn primaries(&self) -> Vec<Option<Server>> {
        use fred::interfaces::ClusterInterface as _;
        match self.client().cached_cluster_state() {
            Some(routing) if self.client().is_clustered() => {
                let nodes = routing.unique_primary_nodes();
                if nodes.is_empty() {
                    vec![None]
                } else {
                    nodes.into_iter().map(Some).collect()
                }
            }
            _ => vec![None],
        }
    }

    /// The node serving `key` on a Redis Cluster (`None` elsewhere, or before the layout is known).
    pub(super) fn node_of(&self, key: &str) -> Option<Server> {
        slot_owner(self.client(), fred::util::redis_keyslot(key.as_bytes()))
    }

    /// Reads the clock of `node` (`None`: the only primary) and keeps the reading if it is at least
    /// as exact as the kept one.
    async fn read_clock(&self, node: Option<&Server>) -> BackendResult<()> {
        let started = std::time::Instant::now();
        let local_us = unix_micros();
        let command = fred::types::CustomCommand::new_static(
            "TIME",
            fred::types::ClusterHash::Custom(self.inner.prefix_slot),
            false,
        );
        let time: Vec<String> = match node {
            Some(node) => {
                self.client()
                    .with_cluster_node(node.clone())
                    .custom(command, Vec::<Value>::new())
                    .await?
            }
            None => self.client().custom(command, Vec::<Value>::new()).await?,
        };
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
        let mut clocks = self
            .inner
            .clocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = clocks.get(&node.cloned()).copied();
        // A reading that cannot be of the kept clock (the offsets differ by more than both
        // errors) is of another one: a failover to a primary on another host, or a stepped
        // clock. It replaces the kept reading however exact that was.
        let other_clock = kept.is_some_and(|kept| {
            (reading.offset_us - kept.offset_us).abs() > reading.error_us + kept.error_now()
        });
        if other_clock || kept.is_none_or(|kept| reading.error_us <= kept.error_now()) {
            clocks.insert(node.cloned(), reading);
        }
        Ok(())
    }

    /// The latest moment, on the clock of the Redis node serving `key` in microseconds since the
    /// Unix epoch, at which a write of `key` sent now may still run: before this replica's
    /// command timeout can have expired. A write carries it to its script, which refuses to run
    /// later, so a write this replica reported as failed (timed out) never lands afterwards: not
    /// when a partition heals and TCP delivers the bytes it held, not when a frozen Redis thaws and
    /// runs what queued up, not after a later write another replica acknowledged (which it would
    /// silently undo).
    pub(super) async fn write_deadline(&self, key: &str) -> BackendResult<i64> {
        let node = self.node_of(key);
        let kept = |this: &Self| {
            this.inner
                .clocks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&node)
                .copied()
        };
        let reading = match kept(self) {
            Some(reading) => reading,
            None => {
                self.read_clock(node.as_ref()).await?;
                kept(self)
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

    /// Redis's clock now, in seconds since the Unix epoch, as far as the kept readings tell (this
    /// host's clock before the first reading).
    pub(super) fn redis_now_secs(&self) -> i64 {
        let offset = self
            .inner
            .clocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .next()
            .map_or(0, |reading| reading.offset_us);
        unix_micros().saturating_add(offset) / 1_000_000
    }

    /// The client for publishes whose receiver count matters (a forwarded response, the bus
    /// probe): on a Redis Cluster they go to the node the bus subscription lives on (see
    /// `spawn_subscriber`), whose count is of every replica; elsewhere, any connection.
    pub(super) fn bus_publisher(&self) -> fred::clients::WithOptions<fred::clients::Client> {
        self.client().with_options(&fred::types::config::Options {
            cluster_hash: Some(fred::types::ClusterHash::Custom(self.inner.prefix_slot)),
            ..Default::default()
        })
    }

    /// Every key matching `pattern`: on a Redis Cluster, scanned on every primary.
    pub(super) async fn scan_all(&self, pattern: String) -> BackendResult<Vec<String>> {
        use futures::TryStreamExt;
        let client = self.client();
        let keys: Vec<fred::types::Key> = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(200), None)
                .try_collect()
                .await?
        } else {
            client
                .scan_buffered(pattern, Some(200), None)
                .try_collect()
                .await?
        };
        Ok(keys
            .into_iter()
            .filter_map(|key| key.as_str().map(str::to_owned))
            .collect())
    }

    pub(super) async fn shutdown(&self) {
        let _ = self.inner.subscriber.quit().await;
        let _ = self.inner.pool.quit().await;
    }
}
