//! The state every request shares: built once at start, then only read (cheap `Arc` clones).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rmcp::model::RequestStateCodec;
use secrecy::ExposeSecret;
use shoal_shared::{
    backend::{Backend, BackendError},
    bus::Bus,
    cache::ResultCache,
    config::Config,
    db::Database,
    keys::Keys,
    metrics::Metrics,
    rpc::RpcPool,
    telemetry,
};
use tokio::sync::OnceCell;

/// Shared by every handler, request and background task of a replica.
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Shared state (Redis or memory).
    pub backend: Backend,
    /// The replica's message demultiplexer.
    pub bus: Bus,
    /// Names of Redis keys (for the coordination a toolset does itself: leases, shared maps).
    pub keys: Keys,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The shared result cache.
    pub cache: ResultCache,
    /// PostgreSQL, when the postgres toolset is on.
    pub db: Option<Database>,
    /// JSON-RPC upstreams, when the rpc toolset is on.
    pub rpc: Option<RpcPool>,
    /// Set when shutdown began: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Set while the replica cannot reach the shared state (see `watchdog` in the crate root):
    /// its streams were ended and new ones are refused (503), since they would stay silent.
    pub shared_state_lost: AtomicBool,
    /// Seals MRTR `requestState`; created on first use (see [`AppState::request_state`]).
    pub request_state: OnceCell<RequestStateCodec>,
    /// Tool calls running per legacy session on this replica.
    pub session_calls: SessionCalls,
    /// What each principal holds of each tool's slots on this replica (its fair share).
    pub tool_shares: shoal_shared::share::Shares,
    /// Long-lived streams (GET and `subscriptions/listen`) open on this replica.
    pub streams: StreamSlots,
}

/// Counts the long-lived streams a replica holds (`SHOAL_MAX_STREAMS`), and mirrors the count in
/// the `shoal_streams_active` gauge. Admission reads this count, never the gauge.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    open: Arc<AtomicUsize>,
    limit: usize,
    metrics: Metrics,
}

/// One open stream; dropping it frees its slot.
#[derive(Debug)]
pub struct StreamSlot {
    slots: StreamSlots,
    kind: &'static str,
}

impl StreamSlots {
    /// Slots for at most `limit` streams.
    pub fn new(limit: usize, metrics: Metrics) -> Self {
        Self {
            open: Arc::default(),
            limit,
            metrics,
        }
    }

    /// Whether a new stream would exceed the limit.
    pub fn is_full(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= self.limit
    }

    /// Counts a stream of `kind` (`get` or `listen`) until the returned slot is dropped.
    pub fn open(&self, kind: &'static str) -> StreamSlot {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.streams_active_add(kind, 1);
        StreamSlot {
            slots: self.clone(),
            kind,
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::Relaxed);
        self.slots.metrics.streams_active_add(self.kind, -1);
    }
}

/// Counts the tool calls each session runs on this replica (`SHOAL_MAX_CALLS_PER_SESSION`).
#[derive(Debug, Default, Clone)]
pub struct SessionCalls(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One running call of a session; dropping it ends the call.
#[derive(Debug)]
pub struct SessionCall {
    calls: SessionCalls,
    session: String,
}

impl SessionCalls {
    /// Starts a call of `session`, unless it already runs `limit`.
    pub fn enter(&self, session: &str, limit: usize) -> Option<SessionCall> {
        let mut running = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = running.entry(session.to_owned()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(SessionCall {
            calls: self.clone(),
            session: session.to_owned(),
        })
    }
}

impl Drop for SessionCall {
    fn drop(&mut self) {
        let mut running = self.calls.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = running.get_mut(&self.session) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.session);
            }
        }
    }
}

/// How long the bus may go without a probe coming back before the replica reports not ready (three
/// probe intervals).
const BUS_SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

impl AppState {
    /// Why the replica is not ready, as far as it knows without asking Redis (`/readyz` then
    /// pings it; the `shoal_ready` gauge takes the watchdog's view instead).
    pub fn readiness_blocker(&self) -> Option<&'static str> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            Some("draining")
        } else if !self.bus.has_round_tripped() {
            // Starting: until a probe it published comes back, what is published to this replica
            // may not reach it (not subscribed yet, or a subscription that delivers nothing).
            Some("cluster bus not confirmed yet")
        } else if self.bus.since_last_roundtrip() > BUS_SILENCE_LIMIT {
            // The bus probe (every 5 s) has not come back: this replica would miss notifications.
            Some("cluster bus silent")
        } else {
            None
        }
    }

    /// Loads the key of the session tags telemetry carries instead of session ids
    /// ([`telemetry::session_tag`]) from the shared backend, where the first replica created it,
    /// so every replica tags a session alike; retries every second until the backend answers or
    /// `stop` fires.
    pub async fn load_session_tag_key(&self, stop: tokio_util::sync::CancellationToken) {
        while !telemetry::session_tag_key_set() {
            let candidate: [u8; 32] = rand::random();
            match self
                .backend
                .shared_secret("session-tag", &URL_SAFE_NO_PAD.encode(candidate))
                .await
            {
                Ok(key) => telemetry::set_session_tag_key(key.into_bytes()),
                Err(error) => {
                    tracing::debug!(%error, "session-tag key not loaded yet");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// The codec that seals MRTR `requestState`. Every replica must use the same key, since each
    /// round of a request may land on another replica: `SHOAL_REQUEST_STATE_KEY` when set, else a
    /// random key the first replica stores in the shared backend for the others.
    ///
    /// # Errors
    /// Fails when the key cannot be read from the shared backend.
    pub async fn request_state(&self) -> Result<&RequestStateCodec, BackendError> {
        self.request_state
            .get_or_try_init(|| async {
                let key = match &self.config.sessions.request_state_key {
                    Some(key) => key.expose_secret().as_bytes().to_vec(),
                    None => {
                        let candidate: [u8; 32] = rand::random();
                        let shared = self
                            .backend
                            .shared_secret("request-state", &URL_SAFE_NO_PAD.encode(candidate))
                            .await?;
                        shared.into_bytes()
                    }
                };
                Ok(RequestStateCodec::new_unchecked(key))
            })
            .await
    }
}
