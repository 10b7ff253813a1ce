//! The shared-state backend: Redis for a cluster, memory for the embedded default.
//!
//! [`Backend`] is the one door through which replicas touch shared state: legacy session records
//! with their sliding idle TTL, the per-session event logs behind resumable GET streams, resource
//! subscriptions, the kv scratchpad, and publishing on the cluster bus. Both variants implement the
//! same operations with the same semantics and publish the same wire messages into the same
//! [`Bus`], so the embedded default exercises the code paths of the cluster.
//!
//! It knows bytes, JSON text and ids; it does not know MCP.

mod memory;
mod redis;
mod scripts;

use crate::telemetry::attr;
use std::{sync::Arc, time::Duration};

use secrecy::SecretString;

/// The field of a session record that names its owning principal.
pub const OWNER_FIELD: &str = "owner";

pub use self::{memory::MemoryBackend, redis::RedisBackend};
use crate::{
    bus::{Bus, ListKind},
    ids::{EventId, ReplicaTag},
    metrics::Metrics,
};

/// Limits and lifetimes the backend enforces.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Idle TTL of a legacy session.
    pub session_ttl: Duration,
    /// Maximum events kept per session log.
    pub event_log_max_len: u64,
    /// Lifetime of an event log after its last event.
    pub event_retention: Duration,
    /// Maximum resource subscriptions of one session.
    pub max_subscriptions_per_session: u64,
    /// Most sessions subscribed to one URI.
    pub max_subscribers_per_uri: u64,
    /// Maximum keys in the kv scratchpad.
    pub kv_max_keys: u64,
    /// Timeout of each Redis command.
    pub redis_timeout: Duration,
    /// Redis connections for commands.
    pub redis_pool_size: usize,
}

impl BackendConfig {
    /// The backend's share of the configuration tree.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            session_ttl: config.session_idle_ttl(),
            event_log_max_len: config.sessions.event_log_max_len,
            event_retention: Duration::from_secs(config.sessions.event_retention_secs),
            max_subscriptions_per_session: config.sessions.max_subscriptions_per_session,
            max_subscribers_per_uri: config.sessions.max_subscribers_per_uri,
            kv_max_keys: config.kv.max_keys,
            redis_timeout: Duration::from_millis(config.redis.timeout_ms),
            redis_pool_size: config.redis.pool_size,
        }
    }

    fn session_ttl_secs(&self) -> u64 {
        self.session_ttl.as_secs().max(1)
    }
    fn retention_secs(&self) -> u64 {
        self.event_retention.as_secs().max(1)
    }
}

/// A backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Redis answered with an error, timed out or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis answered something this version does not understand.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl BackendError {
    /// Whether retrying later may succeed (connection trouble, timeouts).
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Redis(error) => !matches!(
                error.kind(),
                fred::error::ErrorKind::InvalidArgument
                    | fred::error::ErrorKind::InvalidCommand
                    | fred::error::ErrorKind::Parse
            ),
            BackendError::Protocol(_) => false,
        }
    }

    /// Whether Redis could not be reached or did not answer in time (as opposed to an error reply
    /// to one command): what makes a replica fail closed (see [`Backend::in_trouble`]).
    pub fn is_unreachable(&self) -> bool {
        match self {
            BackendError::Redis(error) => matches!(
                error.kind(),
                fred::error::ErrorKind::IO
                    | fred::error::ErrorKind::Timeout
                    | fred::error::ErrorKind::Canceled
            ),
            BackendError::Protocol(_) => false,
        }
    }
}

/// Result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;

/// One event read from a session log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// Its id.
    pub id: EventId,
    /// The serialized JSON-RPC message.
    pub payload: Arc<str>,
}

/// A session's GET stream as the shared state records it: the session, and the holder that claims
/// its stream (`{replica}:{stream}`, see [`crate::bus::feed_holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedClaim<'a> {
    /// The session.
    pub session: &'a str,
    /// The replica and stream holding it.
    pub holder: &'a str,
}

/// Where a GET stream starts, as read atomically with claiming the stream: every event after
/// `from` is either in `events` (up to the read limit) or will be published to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedStart {
    /// The stream starts after this event.
    pub from: EventId,
    /// The first events after `from`.
    pub events: Vec<LoggedEvent>,
}

/// Outcome of a legacy `resources/subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Subscribed.
    Subscribed,
    /// The session no longer exists.
    SessionGone,
    /// The session reached its subscription limit.
    TooMany,
    /// The URI reached its subscriber limit.
    TooManySubscribers,
}

/// Outcome of a kv write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSetOutcome {
    /// A new key.
    Created,
    /// An existing key got a new value.
    Updated,
    /// The scratchpad is full.
    Full,
}

/// How long a session quota entry goes before it is checked against the session records again
/// (sessions that expired idle leave their principal's quota within this time; a DELETE at once).
pub const SESSION_RECHECK: Duration = Duration::from_secs(30);

/// The kinds of quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaKind {
    /// Requests per second with a burst (GCRA).
    Rate,
    /// Tool calls running at once (leases).
    Calls,
    /// Long-lived streams open at once (leases).
    Streams,
    /// Legacy sessions open at once.
    Sessions,
}

impl QuotaKind {
    /// The name in keys and scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Rate => "rate",
            QuotaKind::Calls => "calls",
            QuotaKind::Streams => "streams",
            QuotaKind::Sessions => "sessions",
        }
    }
}

/// One limit a quota decision checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCheck<'a> {
    /// What is limited.
    pub kind: QuotaKind,
    /// Whose quota: a principal id, or [`QUOTA_CLUSTER`] for everyone together.
    pub subject: &'a str,
    /// Requests per second of a rate, or the cap (greater than zero).
    pub limit: u32,
    /// Requests allowed at once above a rate (at least 1; ignored by caps).
    pub burst: u32,
}

/// The subject of the cluster-wide quotas.
pub const QUOTA_CLUSTER: &str = "cluster";

/// A quota decision that said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// The check that refused (index into the checks).
    pub index: usize,
    /// When a retry can pass: exact for rates, `None` for caps (they free when something ends).
    pub retry_after: Option<Duration>,
}

/// The shared-state backend of a replica. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Redis: state shared by every replica using the same prefix.
    Redis(RedisBackend),
    /// In-process memory: the embedded default, one replica.
    Memory(MemoryBackend),
}

macro_rules! delegate {
    ($self:ident, $op:literal, $call:ident ( $($arg:expr),* )) => {{
        let result = match $self {
            Backend::Redis(backend) => {
                let span = crate::telemetry::Span::child(
                    concat!("redis ", $op),
                    crate::telemetry::SpanKind::Client,
                    || vec![
                        crate::telemetry::KeyValue::new(attr::DB_SYSTEM_NAME, "redis"),
                        crate::telemetry::KeyValue::new(attr::DB_OPERATION_NAME, $op),
                    ],
                );
                let start = std::time::Instant::now();
                let result = span.wrap(backend.$call($($arg),*)).await;
                backend.metrics().redis_operation($op, result.is_ok(), start.elapsed());
                match &result {
                    Ok(_) => backend.note_success(start),
                    Err(error) => {
                        if error.is_unreachable() {
                            backend.note_failure(start);
                        }
                        span.mark_error("backend_error");
                    }
                }
                result
            }
            Backend::Memory(backend) => Ok(backend.$call($($arg),*)),
        };
        if let Err(error) = &result {
            $self.metrics().backend_error($op);
            tracing::debug!(operation = $op, error = %error, "backend operation failed");
        }
        result
    }};
}

/// A result to store in the cache (see [`Backend::cache_release`]).
#[derive(Debug, Clone, Copy)]
pub struct CacheEntry<'a> {
    /// The stored text.
    pub value: &'a str,
    /// How long it is kept.
    pub ttl: Duration,
    /// Tags it is recorded under, for invalidation.
    pub tags: &'a [String],
}

impl Backend {
    /// Connects to Redis when `redis_url` is set (commands start working as soon as Redis is
    /// reachable; until then they fail fast), or creates the in-memory backend.
    ///
    /// # Errors
    /// Returns an error when the Redis URL is malformed.
    pub async fn connect(
        redis_url: Option<&SecretString>,
        config: BackendConfig,
        bus: Bus,
        metrics: Metrics,
    ) -> BackendResult<Self> {
        Ok(match redis_url {
            Some(url) => Backend::Redis(RedisBackend::connect(url, config, bus, metrics).await?),
            None => Backend::Memory(MemoryBackend::new(config, bus, metrics)),
        })
    }

    /// `redis` or `memory`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        }
    }

    /// The metrics this backend reports to.
    pub(crate) fn metrics(&self) -> &Metrics {
        match self {
            Backend::Redis(backend) => backend.metrics(),
            Backend::Memory(backend) => backend.metrics(),
        }
    }

    /// Whether the backend is currently reachable, as far as the connection state tells (no round
    /// trip). Used to answer 503 instead of 500 while Redis is down.
    pub fn is_connected(&self) -> bool {
        match self {
            Backend::Redis(backend) => backend.is_connected(),
            Backend::Memory(_) => true,
        }
    }

    /// Whether this replica should refuse work that needs the shared state: not connected, or
    /// the latest operation (by start time) to fail could not reach Redis (a partition, a frozen
    /// or restarting Redis) and none started since has succeeded. Operations that run meanwhile
    /// (the watchdog's PING, every 250 ms while in trouble) clear it as soon as Redis answers
    /// again. Costs two atomic loads: checked on every request.
    pub fn in_trouble(&self) -> bool {
        match self {
            Backend::Redis(backend) => backend.in_trouble(),
            Backend::Memory(_) => false,
        }
    }

    /// Whether an operation started at or after `since` failed for want of Redis (the shared
    /// state is in trouble even if the connection state has not caught up yet).
    pub fn failed_since(&self, since: std::time::Instant) -> bool {
        match self {
            Backend::Redis(backend) => backend.failed_since(since),
            Backend::Memory(_) => false,
        }
    }

    /// One round trip to the backend.
    ///
    /// # Errors
    /// Fails when Redis is unreachable or does not answer within the command timeout.
    pub async fn ping(&self) -> BackendResult<()> {
        delegate!(self, "ping", ping())
    }

    /// Records a new legacy session with its initialize params (JSON).
    ///
    /// # Errors
    /// Fails when Redis is unreachable; the session must then not be handed to the client.
    pub async fn session_create(
        &self,
        session: &str,
        init: &str,
        owner: &str,
    ) -> BackendResult<()> {
        delegate!(self, "session_create", session_create(session, init, owner))
    }

    /// The principal that owns a session (recorded at its creation), or `None` when the session
    /// does not exist.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_owner(&self, session: &str) -> BackendResult<Option<String>> {
        self.session_get_field(session, OWNER_FIELD).await
    }

    /// Slides the session's idle TTL. Returns `false` when the session does not exist (deleted or
    /// expired).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_touch(&self, session: &str) -> BackendResult<bool> {
        delegate!(self, "session_touch", session_touch(session))
    }

    /// Loads a session's initialize params (JSON), sliding its TTL.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_load(&self, session: &str) -> BackendResult<Option<String>> {
        delegate!(self, "session_load", session_load(session))
    }

    /// Deletes a session everywhere: its record, event log and subscriptions; every replica is told
    /// on the control channel. Returns whether it existed.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_delete(&self, session: &str) -> BackendResult<bool> {
        delegate!(self, "session_delete", session_delete(session))
    }

    /// Sets a small per-session field (e.g. the logging level). Returns `false` when the session is
    /// gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_set_field(
        &self,
        session: &str,
        field: &str,
        value: &str,
    ) -> BackendResult<bool> {
        delegate!(
            self,
            "session_set_field",
            session_set_field(session, field, value)
        )
    }

    /// Reads a per-session field.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_get_field(
        &self,
        session: &str,
        field: &str,
    ) -> BackendResult<Option<String>> {
        delegate!(self, "session_get_field", session_get_field(session, field))
    }

    /// Subscribes a legacy session to updates of `uri`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn subscribe(&self, session: &str, uri: &str) -> BackendResult<SubscribeOutcome> {
        delegate!(self, "subscribe", subscribe(session, uri))
    }

    /// Removes a legacy subscription.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn unsubscribe(&self, session: &str, uri: &str) -> BackendResult<()> {
        delegate!(self, "unsubscribe", unsubscribe(session, uri))
    }

    /// Appends a server message (JSON) to the session's event log and delivers it to the replica
    /// holding the session's GET stream. Returns `None` when the session is gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn event_append(
        &self,
        session: &str,
        payload: &str,
    ) -> BackendResult<Option<EventId>> {
        let result = delegate!(self, "event_append", event_append(session, payload));
        if let Ok(Some(_)) = result {
            self.metrics().event_appended();
        }
        result
    }

    /// Claims the session's GET stream for `holder` (see [`crate::bus::feed_holder`]) and reads
    /// where it starts: after `after` when resuming, else where the previous stream stopped (see
    /// the `FEED_OPEN` script). Returns `None` when the session is gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn feed_open(
        &self,
        feed: FeedClaim<'_>,
        after: Option<EventId>,
        limit: u64,
    ) -> BackendResult<Option<FeedStart>> {
        delegate!(self, "feed_open", feed_open(feed, after, limit))
    }

    /// Records how far the feed `holder` got, and with `release` that it no longer holds the
    /// session; slides the session TTL. Returns `false` when the session is gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn feed_checkpoint(
        &self,
        feed: FeedClaim<'_>,
        last: EventId,
        release: bool,
    ) -> BackendResult<bool> {
        delegate!(
            self,
            "feed_checkpoint",
            feed_checkpoint(feed, last, release)
        )
    }

    /// Reads up to `limit` events after `after` from the session's log.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn events_after(
        &self,
        session: &str,
        after: EventId,
        limit: u64,
    ) -> BackendResult<Vec<LoggedEvent>> {
        delegate!(self, "events_after", events_after(session, after, limit))
    }

    /// A resource changed: append `legacy_payload` (the serialized
    /// `notifications/resources/updated`) to the log of every legacy subscriber, and broadcast the
    /// change for `subscriptions/listen` streams. Returns the number of legacy sessions notified.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn resource_updated(&self, uri: &str, legacy_payload: &str) -> BackendResult<u64> {
        delegate!(
            self,
            "resource_updated",
            resource_updated(uri, legacy_payload)
        )
    }

    /// Broadcasts that a list changed (for `subscriptions/listen` streams).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn list_changed(&self, list: ListKind) -> BackendResult<()> {
        delegate!(self, "list_changed", list_changed(list))
    }

    /// Sends a client's JSON-RPC response to the replica `target` that is waiting for it; `false`
    /// when no replica of that tag listens any more (it died or stopped: the request the
    /// response answers was abandoned with it).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> BackendResult<bool> {
        delegate!(
            self,
            "publish_forward",
            publish_forward(target, session, payload)
        )
    }

    /// Publishes a round-trip probe ([`Bus::probe`]) on this replica's own channel; its return is
    /// measured in `shoal_bus_roundtrip_seconds`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_probe(&self, probe: &str) -> BackendResult<()> {
        delegate!(self, "publish_probe", publish_probe(probe))
    }

    /// Broadcasts a client's `notifications/cancelled` to the other replicas.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_cancel(&self, session: &str, payload: &str) -> BackendResult<()> {
        delegate!(self, "publish_cancel", publish_cancel(session, payload))
    }

    /// Writes a kv entry.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_set(&self, key: &str, value: &str) -> BackendResult<KvSetOutcome> {
        delegate!(self, "kv_set", kv_set(key, value))
    }

    /// Reads a kv entry.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_get(&self, key: &str) -> BackendResult<Option<String>> {
        delegate!(self, "kv_get", kv_get(key))
    }

    /// Deletes a kv entry; returns whether it existed.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_delete(&self, key: &str) -> BackendResult<bool> {
        delegate!(self, "kv_delete", kv_delete(key))
    }

    /// Lists up to `limit` kv keys in byte order, starting after `after`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_list(&self, after: Option<&str>, limit: u64) -> BackendResult<Vec<String>> {
        delegate!(self, "kv_list", kv_list(after, limit))
    }

    /// A secret shared by every replica: `candidate` is stored unless one exists; the stored value
    /// is returned.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn shared_secret(&self, name: &str, candidate: &str) -> BackendResult<String> {
        delegate!(self, "shared_secret", shared_secret(name, candidate))
    }

    /// Reads a cache entry.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_get(&self, id: &str) -> BackendResult<Option<String>> {
        delegate!(self, "cache_get", cache_get(id))
    }

    /// Takes the fill lock of a cache entry for `ttl` unless someone holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_lock(&self, id: &str, owner: &str, ttl: Duration) -> BackendResult<bool> {
        delegate!(self, "cache_lock", cache_lock(id, owner, ttl))
    }

    /// Ends a fill of entry `id` in one round trip: stores `entry` when given, announces the fill
    /// (waiters look again, and fill it themselves when nothing was stored) and releases the fill
    /// lock if `owner` still holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (the lock then expires by itself).
    pub async fn cache_release(
        &self,
        id: &str,
        owner: &str,
        entry: Option<CacheEntry<'_>>,
    ) -> BackendResult<()> {
        delegate!(self, "cache_release", cache_release(id, owner, entry))
    }

    /// Deletes every cache entry recorded under `tags`; returns how many.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_invalidate(&self, tags: &[String]) -> BackendResult<u64> {
        delegate!(self, "cache_invalidate", cache_invalidate(tags))
    }

    /// Takes or renews the lease `key` for `holder`; returns whether `holder` holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn lease(&self, key: &str, holder: &str, ttl: Duration) -> BackendResult<bool> {
        delegate!(self, "lease", lease(key, holder, ttl))
    }

    /// Reads a small shared map (e.g. the PostgreSQL change signatures).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn map_get_all(
        &self,
        key: &str,
    ) -> BackendResult<std::collections::BTreeMap<String, String>> {
        delegate!(self, "map_get_all", map_get_all(key))
    }

    /// Replaces a small shared map.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn map_replace(
        &self,
        key: &str,
        entries: &std::collections::BTreeMap<String, String>,
    ) -> BackendResult<()> {
        delegate!(self, "map_replace", map_replace(key, entries))
    }

    /// Housekeeping that needs no single owner: drops expired sessions from subscriber sets (Redis,
    /// elected by a lease so one replica does it at a time) or expired entries (memory). Returns the
    /// number of entries removed.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn janitor_pass(
        &self,
        lease_holder: &ReplicaTag,
        lease: Duration,
    ) -> BackendResult<u64> {
        delegate!(self, "janitor", janitor_pass(lease_holder, lease))
    }

    /// One quota decision: every check passes and `member` is recorded in each cap (a lease
    /// expiring after `lease` unless renewed, or for sessions a reservation until
    /// [`Backend::quota_bind_session`]), or nothing is recorded and the first refusing check is
    /// returned.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn quota_admit(
        &self,
        checks: &[QuotaCheck<'_>],
        member: &str,
        lease: Duration,
    ) -> BackendResult<Option<QuotaRefusal>> {
        delegate!(self, "quota_admit", quota_admit(checks, member, lease))
    }

    /// Drops each `(kind, subject, member)`: `member` leaves the cap `(kind, subject)` (a lease
    /// ended, a session was deleted). Many releases share one round trip.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (a lease then expires by itself).
    pub async fn quota_release(&self, releases: &[(QuotaKind, &str, &str)]) -> BackendResult<()> {
        delegate!(self, "quota_release", quota_release(releases))
    }

    /// Renews the leases `members` (still held by this replica) in one cap for another `lease`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn quota_renew(
        &self,
        cap: (QuotaKind, &str),
        members: &[String],
        lease: Duration,
    ) -> BackendResult<()> {
        delegate!(self, "quota_renew", quota_renew(cap, members, lease))
    }

    /// Replaces an `initialize`'s reservation `token` with the session it created, in the session
    /// caps of `subjects`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (the reservation then lapses).
    pub async fn quota_bind_session(
        &self,
        subjects: &[&str],
        token: &str,
        session: &str,
    ) -> BackendResult<()> {
        delegate!(
            self,
            "quota_bind_session",
            quota_bind_session(subjects, token, session)
        )
    }

    /// Closes connections (after the server stopped using the backend).
    pub async fn shutdown(&self) {
        if let Backend::Redis(backend) = self {
            backend.shutdown().await;
        }
    }
}
