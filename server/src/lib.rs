//! shoal-server: one replica of a horizontally scaled MCP server cluster.
//!
//! [`App::build`] wires a replica from its [`Config`]; [`App::run`] serves it on a listener until a
//! shutdown future resolves, then drains. `main.rs` only loads the configuration, sets up
//! telemetry and calls these two; tests drive the same wiring.
//!
//! Modules:
//! - [`auth`]: who is calling (OAuth bearer tokens, API keys), before MCP.
//! - [`http`]: routing, pre-MCP checks, connection loop and graceful shutdown.
//! - [`mcp`]: the MCP handler, the cluster-aware session manager and the session-store adapter.
//! - [`toolbox`]: the toolset interface MCP code and the HTTP layer use.
//! - [`tools`]: the toolsets.
//! - [`state`]: the state every request shares.

pub mod auth;
pub mod background;
pub mod cli;
pub mod http;
pub mod mcp;
pub mod principal;
pub mod quota;
pub mod state;
pub mod toolbox;
pub mod tools;

use std::{
    future::Future,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use shoal_shared::{
    backend::{Backend, BackendConfig},
    bus::Bus,
    cache::{CacheOptions, ResultCache},
    config::Config,
    db::{Database, DbConfig},
    feed::FeedOptions,
    ids::ReplicaTag,
    keys::Keys,
    metrics::Metrics,
    rpc::{RpcConfig, RpcPool},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use shoal_shared::{config, ids};

use crate::background::Background;
use crate::{
    auth::Authenticator,
    http::HttpService,
    mcp::{
        handler::ShoalHandler,
        session::{ClusterOptions, ClusterSessionManager, ClusterSessionStore},
    },
    state::AppState,
    toolbox::{ToolHost, Toolbox, Toolset},
};

/// How often the janitor sweeps expired entries.
const JANITOR_EVERY: Duration = Duration::from_secs(60);

/// A wired replica, ready to serve.
pub struct App {
    state: Arc<AppState>,
    http: HttpService,
    mcp_shutdown: CancellationToken,
    background: Background,
}

impl App {
    /// Builds a replica: connects the backend (Redis is not required to be up yet), starts the bus
    /// and the background tasks, and mounts the MCP service.
    ///
    /// # Errors
    /// Fails on configuration the server rejects (unknown toolsets, malformed Redis URL).
    pub async fn build(config: Config, tag: ReplicaTag) -> anyhow::Result<Self> {
        let toolsets = tools::enabled(&config).map_err(anyhow::Error::msg)?;
        let names: Vec<&'static str> = toolsets.iter().map(|t| t.name()).collect();
        let auth = Arc::new(
            Authenticator::from_config(&config, auth::toolset_scopes(&names))
                .context("configuring authentication")?,
        );
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let keys = Keys::new(config.redis.key_prefix.clone());
        let (bus, control) = Bus::new(keys.clone(), tag.clone(), metrics.clone());
        let background = Background::default();
        let backend = Backend::connect(
            config.redis.url.as_ref(),
            BackendConfig::from_config(&config),
            bus.clone(),
            metrics.clone(),
            background.clone(),
        )
        .await
        .context("connecting the shared state backend")?;
        log_start(&config, &tag, &backend);
        let needs = toolbox::Needs::of(&toolsets);
        let (db, rpc, cache) =
            services(&config, needs, (&backend, &bus, &metrics), &background).await?;
        let state = Arc::new(AppState {
            cache,
            db,
            rpc,
            config: config.clone(),
            backend: backend.clone(),
            bus: bus.clone(),
            keys,
            metrics: metrics.clone(),
            draining: AtomicBool::new(false),
            shared_state_lost: AtomicBool::new(false),
            request_state: tokio::sync::OnceCell::new(),
            session_calls: state::SessionCalls::default(),
            tool_shares: shoal_shared::share::Shares::default(),
            streams: state::StreamSlots::new(config.sessions.max_streams, metrics.clone()),
        });

        let sessions = Arc::new(ClusterSessionManager::new(
            backend.clone(),
            bus.clone(),
            metrics.clone(),
            config.worker_idle(),
            cluster_options(&config, &backend, &state, background.clone()),
        ));

        let mcp_shutdown = CancellationToken::new();
        let toolbox = Arc::new(Toolbox::new(
            &config,
            &toolsets,
            crate::mcp::handler::server_info(),
        ));
        let mcp = mcp_service(
            &state,
            toolbox.clone(),
            sessions.clone(),
            mcp_shutdown.clone(),
        );

        start_background(&state, &sessions, control, tag, &background, &toolsets).await;
        auth.start(&background);
        let quotas = quota::Quotas::new(
            backend.clone(),
            &config.quota,
            metrics.clone(),
            background.tasks.clone(),
        );
        background.spawn(quotas.clone().run(background.stop.clone()));

        Ok(Self {
            http: HttpService::new(state.clone(), sessions, mcp, auth, toolbox, quotas),
            state,
            mcp_shutdown,
            background,
        })
    }

    /// The shared state (for tests).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves on `listener` until `shutdown` resolves, then drains: `/readyz` turns 503, the
    /// listener closes, GET and listen streams end (clients reconnect to other replicas), in-flight
    /// requests get up to `SHOAL_SHUTDOWN_GRACE_SECS` to finish, and the rest is cut.
    ///
    /// `shutdown` is boxed, not generic, so that the whole serving stack (hyper's connection code
    /// included) is compiled here, in the library, rather than again in every binary that calls
    /// this: a change to `main.rs` recompiles only `main.rs` (seconds, not minutes, in an image
    /// rebuild).
    ///
    /// # Errors
    /// When the admin listener (`SHOAL_ADMIN_LISTEN`) cannot be bound.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> anyhow::Result<()> {
        let addr = listener
            .local_addr()
            .context("reading the listen address")?;
        tracing::info!(%addr, "listening");
        let state = self.state.clone();
        let grace = Duration::from_secs(self.state.config.http.shutdown_grace_secs);
        // The admin listener (SHOAL_ADMIN_LISTEN) serves until the serving port has drained.
        let admin_stop = CancellationToken::new();
        let admin = match self.state.config.http.admin_listen {
            Some(admin_addr) => {
                let admin_listener = TcpListener::bind(admin_addr)
                    .await
                    .with_context(|| format!("binding the admin listener {admin_addr}"))?;
                tracing::info!(%admin_addr, "admin listener (/metrics, /healthz, /readyz)");
                Some(tokio::spawn(http::serve(
                    admin_listener,
                    self.http.admin(),
                    admin_stop.clone().cancelled_owned(),
                    Duration::from_secs(1),
                    || {},
                )))
            }
            None => None,
        };
        http::serve(listener, self.http, shutdown, grace, || {
            tracing::info!("shutting down: draining");
            state.draining.store(true, Ordering::SeqCst);
            state.bus.shut_down_streams();
        })
        .await;
        admin_stop.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        self.mcp_shutdown.cancel();
        self.background.finish().await;
        self.state.backend.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What this replica is and runs, logged once at start (the Redis URL without its password).
fn log_start(config: &Config, tag: &ReplicaTag, backend: &Backend) {
    tracing::info!(
        replica = %tag,
        name = config.replica_name().as_deref().unwrap_or("-"),
        backend = backend.kind(),
        redis = config.redis_url_redacted().as_deref().unwrap_or("-"),
        prefix = %config.redis.key_prefix,
        toolsets = ?config.tools.toolsets,
        "replica configured"
    );

    if config.any_host() {
        tracing::warn!(
            "SHOAL_ALLOWED_HOSTS=*: any Host header is accepted (no DNS-rebinding protection)"
        );
    }
}

/// How often the system probe samples CPU, memory and the runtime.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A bus round-trip probe goes out every this many system probes.
const BUS_PROBE_EVERY: u32 = 5;

/// Samples the system metrics every second: CPU time, RSS, the runtime's busy ratio and its
/// scheduling delay (how long a freshly spawned task waits to be polled: the event-loop lag); and
/// every few seconds sends a probe around the cluster bus to measure its lag.
async fn probe(state: Arc<AppState>, stop: CancellationToken) {
    let runtime = tokio::runtime::Handle::current().metrics();
    let busy_total = |runtime: &tokio::runtime::RuntimeMetrics| -> Duration {
        (0..runtime.num_workers())
            .map(|worker| runtime.worker_total_busy_duration(worker))
            .sum()
    };
    let mut last_busy = busy_total(&runtime);
    let mut last_cpu = shoal_shared::metrics::process_cpu_seconds().unwrap_or_default();
    let mut last_at = Instant::now();
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u32.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let metrics = &state.metrics;
        let spawned = Instant::now();
        if let Ok(delay) = tokio::spawn(async move { spawned.elapsed() }).await {
            metrics.scheduling_delay(delay);
        }
        let now = Instant::now();
        let busy = busy_total(&runtime);
        let workers = runtime.num_workers();
        let wall = now.duration_since(last_at).as_secs_f64() * workers as f64;
        if wall > 0.0 {
            let ratio = busy.saturating_sub(last_busy).as_secs_f64() / wall;
            metrics.runtime_sample(ratio.clamp(0.0, 1.0), workers);
        }
        last_busy = busy;
        last_at = now;
        if let Some(cpu) = shoal_shared::metrics::process_cpu_seconds() {
            metrics.process_cpu_add(cpu - last_cpu);
            last_cpu = cpu;
        }
        metrics.sample_process();
        metrics.set_ready(
            state.readiness_blocker().is_none() && !state.shared_state_lost.load(Ordering::SeqCst),
        );
        // Every second until the first probe comes back (readiness waits for it), then every few.
        if (round % BUS_PROBE_EVERY == 0 || !state.bus.has_round_tripped())
            && let Err(error) = state.backend.publish_probe(&state.bus.probe()).await
        {
            tracing::debug!(%error, "bus probe not sent");
        }
    }
}

/// The services the enabled toolsets use: the PostgreSQL pools, the JSON-RPC upstreams, and the
/// shared result cache.
async fn services(
    config: &Config,
    needs: toolbox::Needs,
    (backend, bus, metrics): (&Backend, &Bus, &Metrics),
    background: &Background,
) -> anyhow::Result<(Option<Database>, Option<RpcPool>, ResultCache)> {
    let db = connect_postgres(config, needs.postgres, metrics, background).await?;
    let rpc = needs
        .rpc
        .then(|| RpcPool::new(RpcConfig::from(&config.rpc), metrics.clone()))
        .transpose()
        .context("configuring the JSON-RPC upstreams")?;
    let cache = ResultCache::new(
        backend.clone(),
        bus.clone(),
        metrics.clone(),
        CacheOptions::from_config(&config.tools),
    );
    Ok((db, rpc, cache))
}

/// The postgres toolset's pools, when it is on and configured; its roles checked at once.
async fn connect_postgres(
    config: &Config,
    postgres: bool,
    metrics: &Metrics,
    background: &Background,
) -> anyhow::Result<Option<Database>> {
    let (Some(url), true) = (&config.postgres.url, postgres) else {
        return Ok(None);
    };
    let db = Database::connect(
        DbConfig::from_config(&config.postgres, url.clone(), config.postgres.allow_writes),
        metrics.clone(),
        background.clone(),
    )
    .context("configuring PostgreSQL")?;
    // A role that could reach the database host is refused now, not at the first call; a
    // database that is down is checked on the first connection that can be made.
    match tokio::time::timeout(Duration::from_secs(10), db.verify_roles()).await {
        Ok(Ok(())) => {}
        Ok(Err(error @ shoal_shared::db::DbError::Privileged(_))) => {
            return Err(anyhow::Error::new(error).context("the postgres toolset"));
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "PostgreSQL not reachable at start; its roles are checked on the first connection")
        }
        Err(_) => tracing::warn!(
            "PostgreSQL did not answer within 10 s at start; its roles are checked on the first connection"
        ),
    }
    Ok(Some(db))
}

/// The session manager's share of the configuration.
fn cluster_options(
    config: &Config,
    backend: &Backend,
    state: &AppState,
    background: Background,
) -> ClusterOptions {
    ClusterOptions {
        feed: FeedOptions {
            touch_every: (config.session_idle_ttl() / 3).max(Duration::from_secs(1)),
            read_batch: config.sessions.event_log_max_len.clamp(1, 1000),
            output_capacity: 64,
        },
        sse_retry: Duration::from_millis(config.http.sse_retry_ms),
        max_local_sessions: config.sessions.max_local_sessions,
        streams: state.streams.clone(),
        background,
        // Without Redis there is one replica and sliding the TTL costs no round trip.
        touch_interval: if backend.kind() == "redis" {
            config.session_touch_interval()
        } else {
            Duration::ZERO
        },
    }
}

/// rmcp's Streamable HTTP service over the handler and the cluster session manager.
fn mcp_service(
    state: &Arc<AppState>,
    toolbox: Arc<Toolbox>,
    sessions: Arc<ClusterSessionManager>,
    shutdown: CancellationToken,
) -> StreamableHttpService<ShoalHandler, ClusterSessionManager> {
    let config = &state.config;
    let mut mcp_config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(config.host_allow_list())
        .with_allowed_origins(config.effective_allowed_origins())
        .with_sse_keep_alive(Some(Duration::from_secs(config.http.sse_keepalive_secs)))
        // No `retry:` priming from rmcp itself: its GET priming carries the id "0", which names
        // no event. Our GET streams prime with a resumable id and the retry interval, and request
        // streams get theirs from the session layer (ClusterOptions::sse_retry).
        .with_sse_retry(None)
        .with_json_response(true)
        .with_max_request_body_bytes(config.http.max_body_bytes)
        .with_cancellation_token(shutdown);
    mcp_config.session_store = Some(Arc::new(ClusterSessionStore::new(state.backend.clone())));
    let state = state.clone();
    StreamableHttpService::new(
        move || Ok(ShoalHandler::new(state.clone(), toolbox.clone())),
        sessions,
        mcp_config,
    )
}

/// Starts the replica's background tasks, tracked and stopped by `background`: the session-tag key loader, the bus
/// control loop, the janitor, the bus probe and (with PostgreSQL) the change poller.
async fn start_background(
    state: &Arc<AppState>,
    sessions: &Arc<ClusterSessionManager>,
    control: tokio::sync::mpsc::Receiver<shoal_shared::bus::ControlMessage>,
    tag: ReplicaTag,
    background: &Background,
    toolsets: &[Arc<dyn Toolset>],
) {
    let stop = &background.stop;
    // Usually at once; with the shared state down, spans carry no session tag until it is back.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        state.load_session_tag_key(stop.clone()),
    )
    .await;
    {
        let (state, stop) = (state.clone(), stop.clone());
        background.spawn(async move { state.load_session_tag_key(stop).await });
    }
    background.spawn(sessions.clone().run_control(control, stop.clone()));
    background.spawn(janitor(state.backend.clone(), tag, stop.clone()));
    background.spawn(probe(state.clone(), stop.clone()));
    background.spawn(watchdog(state.clone(), stop.clone()));
    let host = ToolHost {
        state: state.clone(),
    };
    for toolset in toolsets {
        toolset.start(&host, background);
    }
}

/// How often the watchdog sends a PING to the shared state. PINGs overlap: one that Redis answers
/// late does not delay the next.
const WATCHDOG_EVERY: Duration = Duration::from_millis(250);

/// Ends the replica's GET and listen streams when it loses the shared state (Redis down, or a
/// partition between this replica and Redis that no connection error reveals), and refuses new
/// ones until it is back: a stream here would stay silent while the rest of the cluster goes on,
/// whereas an ended stream makes its client reconnect, with `Last-Event-ID`, to a replica that
/// can serve it.
///
/// Lost, as opposed to slow: no PING sent in the last `SHOAL_REDIS_LOST_AFTER_MS` has been
/// answered. A PING goes out every [`WATCHDOG_EVERY`] whatever became of the previous ones, so a
/// Redis that answers late (a stall, a slow network) keeps the replica connected as long as its
/// answers take less than that window minus one interval; a partition, where nothing comes back,
/// is known within the window plus one interval (1.75 s by default; two failed 2 s PINGs took 4–5 s).
async fn watchdog(state: Arc<AppState>, stop: CancellationToken) {
    if state.backend.kind() == "memory" {
        return;
    }
    let lost_after = Duration::from_millis(state.config.redis.lost_after_ms);
    // Each PING runs to its command timeout, so that one Redis never answers is recorded as a
    // failure (`Backend::in_trouble`, the door); this bound only guards against a PING that never
    // ends. At most bound / interval of them are in flight.
    let bound = Duration::from_millis(state.config.redis.timeout_ms) + Duration::from_secs(1);
    let mut every = tokio::time::interval(WATCHDOG_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings = tokio::task::JoinSet::new();
    // When the latest answered PING was sent.
    let mut answered = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // Answers first: one already in when the interval ticks must count before the
            // decision below.
            biased;
            () = stop.cancelled() => return,
            Some(ping) = pings.join_next() => {
                if let Ok(Some(sent)) = ping {
                    answered = answered.max(sent);
                    // Back only when the answer is recent: a PING answered after longer than the
                    // window says Redis is still too slow, and must not reopen streams that the
                    // next tick would end again.
                    if sent.elapsed() < lost_after
                        && state.shared_state_lost.swap(false, Ordering::SeqCst)
                    {
                        tracing::info!("shared state reachable again: accepting streams");
                    }
                }
            }
            _ = every.tick() => {
                // Answers that came in with the tick.
                while let Some(ping) = pings.try_join_next() {
                    if let Ok(Some(sent)) = ping {
                        answered = answered.max(sent);
                    }
                }
                let sent = tokio::time::Instant::now();
                let backend = state.backend.clone();
                pings.spawn(async move {
                    matches!(tokio::time::timeout(bound, backend.ping()).await, Ok(Ok(())))
                        .then_some(sent)
                });
                if sent.duration_since(answered) >= lost_after
                    && !state.shared_state_lost.swap(true, Ordering::SeqCst)
                {
                    let (feeds, listeners) = state.bus.stream_counts();
                    tracing::warn!(
                        feeds,
                        listeners,
                        silent_ms = sent.duration_since(answered).as_millis() as u64,
                        "shared state unreachable: ending this replica's streams so their clients reconnect elsewhere"
                    );
                    state.bus.interrupt_streams();
                }
            }
        }
    }
}

async fn janitor(backend: Backend, tag: ReplicaTag, stop: CancellationToken) {
    let mut every = tokio::time::interval(JANITOR_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => match backend.janitor_pass(&tag, JANITOR_EVERY).await {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "janitor removed expired entries"),
                Err(error) => tracing::debug!(%error, "janitor pass failed"),
            },
        }
    }
}
