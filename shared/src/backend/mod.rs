//! The shared-state backend: Redis for a cluster, memory for the embedded default.
//!
//! [`Backend`] is the one door through which replicas touch shared state: legacy session records
//! with their sliding idle TTL, the per-session event logs behind resumable GET streams, resource
//! subscriptions, the kv scratchpad, and publishing on the cluster bus. Both variants implement the
//! same operations with the same semantics and publish the same wire messages into the same
//! [`Bus`], so the embedded default exercises the code paths of the cluster.
//!
//! It knows bytes, JSON text and ids; it does not know MCP.

/// Runs one operation on whichever implementation this is: on Redis inside a client span, timed
/// and counted, noting success or failure for the health of the connection.
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

mod cache;
mod coordination;
mod events;
mod janitor;
mod kv;
mod memory;
mod publish;
mod quota;
mod redis;
mod session;
mod subscriptions;

use crate::telemetry::attr;
use std::time::Duration;

use secrecy::SecretString;

pub use self::{
    cache::CacheEntry,
    events::{FeedClaim, FeedHold, FeedStart, LoggedEvent},
    kv::{KvSetOutcome, kv_uri},
    memory::MemoryBackend,
    quota::{QUOTA_CLUSTER, QuotaCheck, QuotaKind, QuotaRefusal, SESSION_RECHECK},
    redis::RedisBackend,
    session::OWNER_FIELD,
    subscriptions::{ResourceChange, SubscribeOutcome},
};
use crate::{background::Background, bus::Bus, metrics::Metrics};

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

/// The shared-state backend of a replica. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Redis: state shared by every replica using the same prefix.
    Redis(RedisBackend),
    /// In-process memory: the embedded default, one replica.
    Memory(MemoryBackend),
}

impl Backend {
    /// Connects to Redis when `redis_url` is set (commands start working as soon as Redis is
    /// reachable; until then each fails after its timeout), or creates the in-memory backend.
    ///
    /// # Errors
    /// Returns an error when the Redis URL is malformed.
    pub async fn connect(
        redis_url: Option<&SecretString>,
        config: BackendConfig,
        bus: Bus,
        metrics: Metrics,
        background: Background,
    ) -> BackendResult<Self> {
        Ok(match redis_url {
            Some(url) => {
                Backend::Redis(RedisBackend::connect(url, config, bus, metrics, background).await?)
            }
            None => Backend::Memory(MemoryBackend::new(config, bus, metrics, background)),
        })
    }

    /// The tracker the backend's own tasks (the bus subscriber, GET-stream feeds) run under.
    pub fn background(&self) -> &Background {
        match self {
            Backend::Redis(backend) => &backend.inner.background,
            Backend::Memory(backend) => &backend.inner.background,
        }
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

    /// Closes connections (after the server stopped using the backend).
    pub async fn shutdown(&self) {
        if let Backend::Redis(backend) = self {
            backend.shutdown().await;
        }
    }
}
