//! The single configuration tree of a replica.
//!
//! Every setting is a command-line flag with an environment equivalent (`SHOAL_*`), so the same
//! binary is configured by flags in development and by the environment in containers. Defaults live
//! here and nowhere else; `docs/configuration.md` lists them. Validation of cross-field rules happens
//! once in [`Config::validate`]. Toolset names are validated by the server, which owns the toolsets.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when standard error is not a terminal, human-readable text otherwise.
    Auto,
    /// One JSON object per line (production).
    Json,
    /// Human-readable text.
    Text,
}

/// Configuration of one shoal replica.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "shoal-server",
    version,
    about = "shoal: one replica of a horizontally scaled MCP server cluster",
    long_about = "shoal: one replica of a horizontally scaled MCP server cluster.\n\n\
        Replicas keep MCP session state, the resumable event log, subscriptions and the cluster bus in \
        Redis, so any replica behind any load balancer serves any request. Without SHOAL_REDIS_URL the \
        replica runs alone on in-memory backends.\n\n\
        Every flag can also be set through the environment variable shown with it."
)]
pub struct Config {
    /// HTTP front: listeners, request checks, streams and shutdown.
    #[command(flatten)]
    pub http: HttpConfig,

    /// Authentication: who may call /mcp.
    #[command(flatten)]
    pub auth: AuthConfig,

    /// Quotas: what one principal, and everyone together, may use (cluster-wide).
    #[command(flatten)]
    pub quota: QuotaConfig,

    /// Shared state (Redis).
    #[command(flatten)]
    pub redis: RedisConfig,

    /// Sessions, subscriptions and streams.
    #[command(flatten)]
    pub sessions: SessionConfig,

    /// Tools: toolsets, timeouts, concurrency and the result cache.
    #[command(flatten)]
    pub tools: ToolConfig,

    /// The kv toolset.
    #[command(flatten)]
    pub kv: KvConfig,

    /// The postgres toolset.
    #[command(flatten)]
    pub postgres: PostgresConfig,

    /// The rpc toolset (JSON-RPC upstreams).
    #[command(flatten)]
    pub rpc: UpstreamConfig,

    /// Logs and telemetry.
    #[command(flatten)]
    pub telemetry: TelemetryConfig,

    /// What to do instead of serving (none: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// HTTP front: listeners, request checks, streams and shutdown.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "HTTP front: listeners, request checks, streams and shutdown")]
pub struct HttpConfig {
    /// Address to listen on (host:port).
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A listener of its own for /metrics (and /healthz, /readyz with the reason when not ready),
    /// for deployments that keep metrics off the serving port: then the serving port answers
    /// /metrics with 404. The admin listener checks no Host header: bind it to a private network.
    #[arg(long, env = "SHOAL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Comma-separated Host header values accepted on /mcp (DNS-rebinding protection). Behind a
    /// balancer, list the public host names clients use. An entry without a port matches any port.
    #[arg(
        long,
        env = "SHOAL_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    pub allowed_hosts: Vec<String>,

    /// Comma-separated browser origins accepted on /mcp (scheme://host[:port], `:*` for any port).
    /// When empty, `http(s)://<host>:*` is accepted for every allowed host. Requests without an
    /// Origin header are not affected.
    #[arg(long, env = "SHOAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Maximum size of a POST body in bytes; larger bodies get 413.
    #[arg(long, env = "SHOAL_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest initialize request, in bytes: its params are stored with the session, in Redis and
    /// on every replica that serves it.
    #[arg(long, env = "SHOAL_MAX_INITIALIZE_BYTES", default_value_t = 65_536)]
    pub max_initialize_bytes: usize,

    /// Milliseconds a client has to send a request's headers, counted from the connection's start
    /// or, on a kept-alive connection, from the first byte of the request; a connection that has
    /// not sent them by then is closed.
    #[arg(long, env = "SHOAL_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub header_read_timeout_ms: u64,

    /// Seconds a kept-alive connection may stay idle (no request open, none begun) before the
    /// replica closes it. Longer than the idle timeout of the balancers in front (nginx, AWS ALB,
    /// ingress-nginx: 60 s; Google Cloud's load balancers: 600 s), so that the balancer, not the
    /// replica, closes an idle connection: a request a balancer sends on a connection the replica is
    /// closing fails (502), and balancers do not resend a POST.
    #[arg(
        long = "http-idle-timeout-secs",
        env = "SHOAL_HTTP_IDLE_TIMEOUT_SECS",
        default_value_t = 620
    )]
    pub idle_timeout_secs: u64,

    /// Connections a replica holds at once (HTTP/1 and h2c, the balancer's included); one more is
    /// answered `503 Service Unavailable` with `Retry-After: 1` and closed. Each connection also
    /// closes after `SHOAL_HEADER_READ_TIMEOUT_MS` without an open request (an h2c connection
    /// with a GOAWAY), so an idle peer cannot hold its place.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,

    /// Seconds between SSE keep-alive comments on open streams (also how fast a vanished client
    /// is noticed).
    #[arg(long, env = "SHOAL_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,

    /// Milliseconds clients are told to wait before reconnecting a closed stream (SSE `retry:`).
    #[arg(long, env = "SHOAL_SSE_RETRY_MS", default_value_t = 1000)]
    pub sse_retry_ms: u64,

    /// Seconds to wait for in-flight requests on shutdown before the rest is cut off.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

/// How callers of /mcp are authenticated (`SHOAL_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// OAuth 2.1 bearer JWTs from the issuers of `SHOAL_OAUTH_ISSUERS`, for `SHOAL_RESOURCE_URL`.
    Oauth,
    /// Static API keys from `SHOAL_API_KEYS_FILE`, sent as `Authorization: Bearer <key>`.
    ApiKeys,
    /// No authentication: every caller is the same anonymous principal.
    None,
}

/// Authentication: who may call /mcp.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthConfig {
    /// How callers are authenticated: `oauth`, `api-keys` or `none`. When unset: `none` if every
    /// listener is on loopback (with a warning), else the replica refuses to start.
    #[arg(long = "auth", id = "auth_mode", env = "SHOAL_AUTH", value_enum)]
    pub mode: Option<AuthMode>,

    /// Allows `SHOAL_AUTH=none` on a listener that is not loopback-only (anyone who reaches the
    /// port can then use every tool). Without it such a configuration is refused.
    #[arg(long, env = "SHOAL_AUTH_ALLOW_NONE_REMOTE", default_value_t = false)]
    pub auth_allow_none_remote: bool,

    /// Comma-separated issuer URLs of the OAuth authorization servers whose access tokens are
    /// accepted; each issuer's JWKS is found through its metadata (RFC 8414, else OpenID
    /// discovery).
    #[arg(long, env = "SHOAL_OAUTH_ISSUERS", value_delimiter = ',')]
    pub oauth_issuers: Vec<String>,

    /// This server's canonical resource URI (e.g. `https://mcp.example.com/mcp`): the audience
    /// access tokens must carry (RFC 8707) and the `resource` of the protected resource metadata.
    #[arg(long, env = "SHOAL_RESOURCE_URL")]
    pub resource_url: Option<String>,

    /// Comma-separated JWS algorithms accepted on access tokens (`none` and HMAC are never).
    #[arg(
        long,
        env = "SHOAL_OAUTH_ALGORITHMS",
        value_delimiter = ',',
        default_value = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA"
    )]
    pub oauth_algorithms: Vec<String>,

    /// Clock skew tolerated on a token's `exp` and `nbf`, in seconds.
    #[arg(long, env = "SHOAL_OAUTH_LEEWAY_SECS", default_value_t = 30)]
    pub oauth_leeway_secs: u64,

    /// Least number of seconds between two JWKS fetches of one issuer caused by a token with an
    /// unknown key id (a key rotation is picked up at the first such token; a flood of forged
    /// key ids costs one fetch per interval).
    #[arg(long, env = "SHOAL_OAUTH_JWKS_REFRESH_SECS", default_value_t = 10)]
    pub oauth_jwks_refresh_secs: u64,

    /// Longest a fetched JWKS is trusted, in seconds: each issuer's keys are fetched again at
    /// least this often (sooner when the JWKS response's `Cache-Control: max-age` says so, never
    /// sooner than `SHOAL_OAUTH_JWKS_REFRESH_SECS`). A key the issuer stopped publishing (a
    /// compromised one, removed) stops verifying at that fetch, and tokens it verified are
    /// checked again.
    #[arg(long, env = "SHOAL_OAUTH_JWKS_MAX_AGE_SECS", default_value_t = 300)]
    pub oauth_jwks_max_age_secs: u64,

    /// Accepts `http://` issuers (development only: keys fetched in clear text can be replaced
    /// by anyone on the path). Without it an `http://` issuer is refused at start.
    #[arg(long, env = "SHOAL_OAUTH_ALLOW_HTTP", default_value_t = false)]
    pub oauth_allow_http: bool,

    /// Timeout of each request to an issuer (metadata, JWKS), in milliseconds.
    #[arg(long, env = "SHOAL_OAUTH_TIMEOUT_MS", default_value_t = 5000)]
    pub oauth_timeout_ms: u64,

    /// The API keys file (TOML, `[[key]]` tables with `principal`, `scopes` and `sha256`, the hex
    /// SHA-256 of the key); re-read when it changes and on SIGHUP.
    #[arg(long, env = "SHOAL_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
}

/// Quotas, enforced cluster-wide in the shared state: per principal (defaults here, overridden per
/// API key in the keys file and per scope or claim in `SHOAL_QUOTA_TIERS_FILE`) and for everyone
/// together (the `GLOBAL` settings). `0` means unlimited. The anonymous principal of
/// `SHOAL_AUTH=none` has no per-principal quotas (it is every caller); the global ones apply.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Quotas (cluster-wide; 0 = unlimited)")]
pub struct QuotaConfig {
    /// The most of one replica's slots of a tool, and of each of its database pools, one
    /// principal may hold at once, in percent (at least one): past it, its calls are refused at
    /// once, so another principal always finds room. 100 turns it off; a key or tier may set its
    /// own (`share_percent`); the anonymous principal of SHOAL_AUTH=none is not limited.
    #[arg(
        long = "principal-share-percent",
        id = "principal_share_percent",
        env = "SHOAL_PRINCIPAL_SHARE_PERCENT",
        default_value_t = 50,
        value_parser = clap::value_parser!(u8).range(1..=100)
    )]
    pub principal_share_percent: u8,

    /// Requests per second one principal may send to /mcp, sustained (every POST, GET and DELETE).
    #[arg(
        long = "quota-requests-per-sec",
        id = "quota_requests_per_sec",
        env = "SHOAL_QUOTA_REQUESTS_PER_SEC",
        default_value_t = 100
    )]
    pub requests_per_sec: u32,

    /// Requests one principal may send at once above its rate (0: one second's worth).
    #[arg(
        long = "quota-burst",
        id = "quota_burst",
        env = "SHOAL_QUOTA_BURST",
        default_value_t = 200
    )]
    pub burst: u32,

    /// Tool calls one principal may have running at once, across the cluster.
    #[arg(
        long = "quota-concurrent-calls",
        id = "quota_concurrent_calls",
        env = "SHOAL_QUOTA_CONCURRENT_CALLS",
        default_value_t = 32
    )]
    pub concurrent_calls: u32,

    /// Legacy (2025-11-25 era) sessions one principal may hold open, across the cluster.
    #[arg(
        long = "quota-sessions",
        id = "quota_sessions",
        env = "SHOAL_QUOTA_SESSIONS",
        default_value_t = 100
    )]
    pub sessions: u32,

    /// Long-lived streams (GET streams and `subscriptions/listen`) one principal may hold open,
    /// across the cluster.
    #[arg(
        long = "quota-streams",
        id = "quota_streams",
        env = "SHOAL_QUOTA_STREAMS",
        default_value_t = 100
    )]
    pub streams: u32,

    /// Requests per second the whole cluster accepts, from every principal together.
    #[arg(
        long = "quota-global-requests-per-sec",
        id = "quota_global_requests_per_sec",
        env = "SHOAL_QUOTA_GLOBAL_REQUESTS_PER_SEC",
        default_value_t = 0
    )]
    pub global_requests_per_sec: u32,

    /// Burst above the global rate (0: one second's worth).
    #[arg(
        long = "quota-global-burst",
        id = "quota_global_burst",
        env = "SHOAL_QUOTA_GLOBAL_BURST",
        default_value_t = 0
    )]
    pub global_burst: u32,

    /// Tool calls running at once in the whole cluster.
    #[arg(
        long = "quota-global-concurrent-calls",
        id = "quota_global_concurrent_calls",
        env = "SHOAL_QUOTA_GLOBAL_CONCURRENT_CALLS",
        default_value_t = 0
    )]
    pub global_concurrent_calls: u32,

    /// Legacy sessions open in the whole cluster.
    #[arg(
        long = "quota-global-sessions",
        id = "quota_global_sessions",
        env = "SHOAL_QUOTA_GLOBAL_SESSIONS",
        default_value_t = 0
    )]
    pub global_sessions: u32,

    /// Long-lived streams open in the whole cluster.
    #[arg(
        long = "quota-global-streams",
        id = "quota_global_streams",
        env = "SHOAL_QUOTA_GLOBAL_STREAMS",
        default_value_t = 0
    )]
    pub global_streams: u32,

    /// Quota tiers (TOML, `[[tier]]` tables with `scope`, or `claim` and `value`, and a `quota`
    /// table of overrides): a principal gets the first tier whose scope it holds or whose token
    /// claim matches. Read at start.
    #[arg(
        long = "quota-tiers-file",
        id = "quota_tiers_file",
        env = "SHOAL_QUOTA_TIERS_FILE"
    )]
    pub tiers_file: Option<std::path::PathBuf>,
}

/// Shared state (Redis).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Shared state (Redis)")]
pub struct RedisConfig {
    /// Redis URL for the shared cluster state: one Redis (redis[s]://[user:password@]host:port[/db])
    /// or a Sentinel set (redis[s]-sentinel://[user:password@]sentinel:port?node=sentinel:port&
    /// sentinelServiceName=NAME). When unset (and REDIS_URL is unset too) the replica runs alone on
    /// embedded in-memory backends.
    #[arg(
        long = "redis-url",
        id = "redis_url", env = "SHOAL_REDIS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub url: Option<SecretString>,

    /// Prefix of every Redis key and channel, so environments and tests sharing a Redis never collide.
    #[arg(long, env = "SHOAL_KEY_PREFIX", default_value = "shoal")]
    pub key_prefix: String,

    /// Timeout of every Redis command, in milliseconds.
    #[arg(
        long = "redis-timeout-ms",
        id = "redis_timeout_ms",
        env = "SHOAL_REDIS_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub timeout_ms: u64,

    /// A replica whose PINGs (one every 250 ms) have had no answer for this long, in milliseconds,
    /// takes Redis for lost: it ends its GET and listen streams so their clients resume on another
    /// replica, and refuses new ones until Redis answers again. A Redis that answers late, but
    /// within this window less 250 ms, is merely slow and ends nothing. At least 500.
    #[arg(
        long = "redis-lost-after-ms",
        id = "redis_lost_after_ms",
        env = "SHOAL_REDIS_LOST_AFTER_MS",
        default_value_t = 1500
    )]
    pub lost_after_ms: u64,

    /// Redis connections used for commands (the bus subscriber has one more of its own).
    #[arg(
        long = "redis-pool-size",
        id = "redis_pool_size",
        env = "SHOAL_REDIS_POOL_SIZE",
        default_value_t = 2
    )]
    pub pool_size: usize,
}

/// Sessions, subscriptions and streams.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Sessions, subscriptions and streams")]
pub struct SessionConfig {
    /// Seconds a legacy session may stay idle before it expires everywhere (its Redis keys too).
    /// Every request, and every open GET stream, slides the window.
    #[arg(
        long = "session-idle-ttl-secs",
        id = "session_idle_ttl_secs",
        env = "SHOAL_SESSION_IDLE_TTL_SECS",
        default_value_t = 1800
    )]
    pub idle_ttl_secs: u64,

    /// Seconds an idle session keeps its in-memory worker on one replica before the worker is
    /// dropped (it is restored from Redis on the next request, one round trip). A worker costs
    /// about 100 KB; capped at the session idle TTL.
    #[arg(long, env = "SHOAL_WORKER_IDLE_SECS", default_value_t = 60)]
    pub worker_idle_secs: u64,

    /// Milliseconds during which a replica that has just slid a session's idle TTL in Redis trusts
    /// its own worker instead of sliding it again on every request (one Redis round trip saved per
    /// request of a busy session). A DELETE answers only after this interval, so every replica
    /// answers 404 for the session once the DELETE has returned. 0: slide on every request. Capped
    /// at a tenth of the session idle TTL; ignored without Redis.
    #[arg(
        long = "session-touch-interval-ms",
        id = "session_touch_interval_ms",
        env = "SHOAL_SESSION_TOUCH_INTERVAL_MS",
        default_value_t = 250
    )]
    pub touch_interval_ms: u64,

    /// Maximum session workers held in memory by one replica; beyond it, new sessions get 503.
    #[arg(long, env = "SHOAL_MAX_LOCAL_SESSIONS", default_value_t = 20_000)]
    pub max_local_sessions: usize,

    /// Maximum open server-to-client streams (GET streams and subscriptions/listen) on one replica;
    /// beyond it, new streams get 503.
    #[arg(long, env = "SHOAL_MAX_STREAMS", default_value_t = 10_000)]
    pub max_streams: usize,

    /// Maximum `resources/subscribe` subscriptions of one legacy session.
    #[arg(
        long,
        env = "SHOAL_MAX_SUBSCRIPTIONS_PER_SESSION",
        default_value_t = 1000
    )]
    pub max_subscriptions_per_session: u64,

    /// Most tool calls one legacy session runs at once on one replica; more are answered with a
    /// tool error at once, so one client cannot take every slot of a tool.
    #[arg(long, env = "SHOAL_MAX_CALLS_PER_SESSION", default_value_t = 32)]
    pub max_calls_per_session: usize,

    /// Maximum legacy sessions subscribed to one resource URI, cluster-wide (the fanout of one
    /// change runs in one Redis script, so its length is bounded).
    #[arg(long, env = "SHOAL_MAX_SUBSCRIBERS_PER_URI", default_value_t = 10_000)]
    pub max_subscribers_per_uri: u64,

    /// Longest resource URI accepted by resources/subscribe and subscriptions/listen, in bytes.
    #[arg(long, env = "SHOAL_MAX_URI_BYTES", default_value_t = 2048)]
    pub max_uri_bytes: usize,

    /// Most resource URIs one subscriptions/listen stream may name.
    #[arg(long, env = "SHOAL_MAX_LISTEN_URIS", default_value_t = 256)]
    pub max_listen_uris: usize,

    /// Maximum events kept in one session's resumable event log (approximate, trimmed by Redis).
    #[arg(long, env = "SHOAL_EVENT_LOG_MAX_LEN", default_value_t = 1000)]
    pub event_log_max_len: u64,

    /// Seconds an event log is kept after its last event; resuming from an older event id replays
    /// what is left.
    #[arg(long, env = "SHOAL_EVENT_RETENTION_SECS", default_value_t = 900)]
    pub event_retention_secs: u64,

    /// Key that seals MRTR `requestState` values (HMAC-SHA256, at least 32 bytes). When unset,
    /// replicas on the same Redis share a random key generated once and kept in Redis; the
    /// embedded default uses a random key per process.
    #[arg(long, env = "SHOAL_REQUEST_STATE_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub request_state_key: Option<SecretString>,
}

/// Tools: toolsets, timeouts, concurrency and the result cache.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Tools: toolsets, timeouts, concurrency and the result cache")]
pub struct ToolConfig {
    /// Comma-separated toolsets to serve: kv, postgres (needs SHOAL_DATABASE_URL), rpc (needs
    /// SHOAL_RPC_ENDPOINTS), compute, conformance, time.
    #[arg(
        long,
        env = "SHOAL_TOOLSETS",
        value_delimiter = ',',
        default_value = "kv,postgres,rpc,compute"
    )]
    pub toolsets: Vec<String>,

    /// Default timeout of a tool call, in milliseconds.
    #[arg(
        long = "tool-timeout-ms",
        id = "tool_timeout_ms",
        env = "SHOAL_TOOL_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub timeout_ms: u64,

    /// Per-tool timeout overrides, tool=duration (e.g. pg_query=10s).
    #[arg(
        long = "tool-timeouts",
        id = "tool_timeouts", env = "SHOAL_TOOL_TIMEOUTS", value_delimiter = ',', value_parser = parse_tool_duration)]
    pub timeouts: Vec<(String, Duration)>,

    /// Default number of concurrent calls of one tool on one replica.
    #[arg(
        long = "tool-concurrency",
        id = "tool_concurrency",
        env = "SHOAL_TOOL_CONCURRENCY",
        default_value_t = 64
    )]
    pub concurrency: usize,

    /// Per-tool concurrency overrides, tool=n (e.g. hash=2).
    #[arg(
        long = "tool-concurrency-limits",
        id = "tool_concurrency_limits", env = "SHOAL_TOOL_CONCURRENCY_LIMITS", value_delimiter = ',', value_parser = parse_tool_count)]
    pub concurrency_limits: Vec<(String, usize)>,

    /// Milliseconds a call waits for a free slot of its tool before failing ("busy").
    #[arg(
        long = "tool-queue-timeout-ms",
        id = "tool_queue_timeout_ms",
        env = "SHOAL_TOOL_QUEUE_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub queue_timeout_ms: u64,

    /// Per-tool cache TTL overrides, tool=duration (e.g. pg_query=30s,get_balance=5s; 0 disables).
    #[arg(long, env = "SHOAL_CACHE_TTLS", value_delimiter = ',', value_parser = parse_tool_duration)]
    pub cache_ttls: Vec<(String, Duration)>,

    /// Largest cached result, in bytes (bigger results are served but not stored).
    #[arg(long, env = "SHOAL_CACHE_MAX_ENTRY_BYTES", default_value_t = 256 * 1024)]
    pub cache_max_entry_bytes: usize,
}

/// The kv toolset.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "The kv toolset")]
pub struct KvConfig {
    /// Maximum number of keys in the kv scratchpad.
    #[arg(
        long = "kv-max-keys",
        id = "kv_max_keys",
        env = "SHOAL_KV_MAX_KEYS",
        default_value_t = 10_000
    )]
    pub max_keys: u64,

    /// Maximum size of one kv value in bytes.
    #[arg(
        long = "kv-max-value-bytes",
        id = "kv_max_value_bytes", env = "SHOAL_KV_MAX_VALUE_BYTES", default_value_t = 64 * 1024)]
    pub max_value_bytes: usize,
}

/// The postgres toolset.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "The postgres toolset")]
pub struct PostgresConfig {
    /// PostgreSQL for the postgres toolset (postgres://user:password@host:port/db). The toolset
    /// is off while unset (DATABASE_URL is used when this is unset).
    #[arg(
        long = "database-url",
        id = "database_url", env = "SHOAL_DATABASE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub url: Option<SecretString>,

    /// PostgreSQL role for pg_execute (postgres://user:password@host:port/db), separate from the
    /// read role; needed when SHOAL_POSTGRES_ALLOW_WRITES is true.
    #[arg(
        long = "database-write-url",
        id = "database_write_url", env = "SHOAL_DATABASE_WRITE_URL", value_parser = parse_secret, hide_env_values = true)]
    pub write_url: Option<SecretString>,

    /// Accept a database role that is a superuser, may create roles, or holds
    /// pg_execute_server_program / pg_read_server_files / pg_write_server_files (logged as a
    /// warning). Off: the postgres toolset refuses such a role.
    #[arg(
        long = "postgres-allow-privileged-role",
        id = "postgres_allow_privileged_role",
        env = "SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE",
        default_value_t = false
    )]
    pub allow_privileged_role: bool,

    /// Most bytes of row data (as JSON) pg_query returns; rows past it are left out and the
    /// result marked truncated.
    #[arg(
        long = "postgres-max-result-bytes",
        id = "postgres_max_result_bytes",
        env = "SHOAL_POSTGRES_MAX_RESULT_BYTES",
        default_value_t = 1_048_576
    )]
    pub max_result_bytes: usize,

    /// PostgreSQL connections per replica: size it by concurrent tool calls, not sessions.
    #[arg(
        long = "postgres-pool-max",
        id = "postgres_pool_max",
        env = "SHOAL_POSTGRES_POOL_MAX",
        default_value_t = 10
    )]
    pub pool_max: u32,

    /// PostgreSQL connections kept open while idle.
    #[arg(
        long = "postgres-pool-min-idle",
        id = "postgres_pool_min_idle",
        env = "SHOAL_POSTGRES_POOL_MIN_IDLE",
        default_value_t = 1
    )]
    pub pool_min_idle: u32,

    /// Milliseconds a call waits for a free PostgreSQL connection before failing ("database busy").
    #[arg(
        long = "postgres-acquire-timeout-ms",
        id = "postgres_acquire_timeout_ms",
        env = "SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub acquire_timeout_ms: u64,

    /// Statement timeout of every PostgreSQL query, in milliseconds.
    #[arg(
        long = "postgres-statement-timeout-ms",
        id = "postgres_statement_timeout_ms",
        env = "SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub statement_timeout_ms: u64,

    /// Most rows pg_query returns.
    #[arg(
        long = "postgres-row-cap",
        id = "postgres_row_cap",
        env = "SHOAL_POSTGRES_ROW_CAP",
        default_value_t = 500
    )]
    pub row_cap: usize,

    /// Serve the pg_execute write tool.
    #[arg(
        long = "postgres-allow-writes",
        id = "postgres_allow_writes",
        env = "SHOAL_POSTGRES_ALLOW_WRITES",
        default_value_t = false
    )]
    pub allow_writes: bool,

    /// Milliseconds between polls for changes made by other writers (one replica polls, elected
    /// through Redis).
    #[arg(
        long = "postgres-poll-ms",
        id = "postgres_poll_ms",
        env = "SHOAL_POSTGRES_POLL_MS",
        default_value_t = 1000
    )]
    pub poll_ms: u64,
}

/// The rpc toolset (JSON-RPC upstreams).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "The rpc toolset (JSON-RPC upstreams)")]
pub struct UpstreamConfig {
    /// Comma-separated JSON-RPC upstream URLs for the rpc toolset (off while empty).
    #[arg(
        long = "rpc-endpoints",
        id = "rpc_endpoints",
        env = "SHOAL_RPC_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// Comma-separated methods rpc_call may call.
    #[arg(
        long = "rpc-allowed-methods",
        id = "rpc_allowed_methods",
        env = "SHOAL_RPC_ALLOWED_METHODS",
        value_delimiter = ',',
        default_value = "getBalance,getSlot,getBlockHeight,getHealth,getVersion,getLatestBlockhash,getAccountInfo,getTransaction,getEpochInfo"
    )]
    pub allowed_methods: Vec<String>,

    /// Timeout of one upstream attempt, in milliseconds.
    #[arg(
        long = "rpc-timeout-ms",
        id = "rpc_timeout_ms",
        env = "SHOAL_RPC_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub timeout_ms: u64,

    /// Milliseconds a failing upstream endpoint is left alone (a 429's Retry-After overrides it).
    #[arg(
        long = "rpc-cooldown-ms",
        id = "rpc_cooldown_ms",
        env = "SHOAL_RPC_COOLDOWN_MS",
        default_value_t = 10_000
    )]
    pub cooldown_ms: u64,

    /// Upstream endpoints tried per call at most.
    #[arg(
        long = "rpc-max-attempts",
        id = "rpc_max_attempts",
        env = "SHOAL_RPC_MAX_ATTEMPTS",
        default_value_t = 3
    )]
    pub max_attempts: usize,

    /// Largest upstream JSON-RPC response body, in bytes; a larger one fails the attempt.
    #[arg(
        long = "rpc-max-response-bytes",
        id = "rpc_max_response_bytes",
        env = "SHOAL_RPC_MAX_RESPONSE_BYTES",
        default_value_t = 4 * 1024 * 1024
    )]
    pub max_response_bytes: usize,
}

/// Logs and telemetry.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Logs and telemetry")]
pub struct TelemetryConfig {
    /// Log format.
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Human-readable replica name for logs and traces (defaults to the host name). The replica's
    /// identity is a random id generated at start; the name only helps people find it.
    #[arg(long, env = "SHOAL_REPLICA_NAME")]
    pub replica_name: Option<String>,
}

/// One-shot commands of the replica binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Container healthcheck: GET /readyz of the replica listening on SHOAL_LISTEN (an unspecified
    /// address such as 0.0.0.0 is reached through loopback); exits 0 when it answers 200, 1 otherwise.
    Healthcheck,
}

fn parse_secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value.to_owned()))
}

fn split_pair(value: &str) -> Result<(String, &str), String> {
    let (tool, rest) = value
        .split_once('=')
        .ok_or_else(|| format!("expected tool=value, got {value:?}"))?;
    let tool = tool.trim();
    if tool.is_empty() {
        return Err(format!("missing tool name in {value:?}"));
    }
    Ok((tool.to_owned(), rest.trim()))
}

fn parse_tool_duration(value: &str) -> Result<(String, Duration), String> {
    let (tool, duration) = split_pair(value)?;
    let duration = if duration == "0" {
        Duration::ZERO
    } else {
        humantime::parse_duration(duration)
            .map_err(|e| format!("bad duration in {value:?}: {e}"))?
    };
    Ok((tool, duration))
}

fn parse_tool_count(value: &str) -> Result<(String, usize), String> {
    let (tool, count) = split_pair(value)?;
    let count = count
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad count in {value:?}"))?;
    Ok((tool, count))
}

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag or variable could not be parsed (the parser's own message, naming it).
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A setting breaks a rule.
    #[error("invalid configuration: {setting} {rule}")]
    Rule {
        /// The variable of the setting (`SHOAL_…`).
        setting: &'static str,
        /// What it must be.
        rule: &'static str,
    },
}

impl ConfigError {
    fn rule(setting: &'static str, rule: &'static str) -> Self {
        ConfigError::Rule { setting, rule }
    }

    /// The variable of the setting at fault, when one setting is.
    pub fn setting(&self) -> Option<&'static str> {
        match self {
            ConfigError::Rule { setting, .. } => Some(setting),
            ConfigError::Parse(_) => None,
        }
    }
}

impl Config {
    /// Parses flags and environment, applies the standard fallbacks (`REDIS_URL`) and validates.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the first rule that is broken.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(std::env::args_os())
    }

    /// Like [`Config::load`], with explicit arguments (the first one is the program name).
    ///
    /// # Errors
    /// Returns a [`ConfigError`] when parsing or validation fails. `--help` and `--version` exit
    /// the process, as command-line tools do.
    pub fn from_args<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut config = match Self::try_parse_from(args) {
            Ok(config) => config,
            Err(error) if error.use_stderr() => return Err(ConfigError::Parse(error.to_string())),
            Err(error) => error.exit(),
        };
        if config.redis.url.is_none()
            && let Ok(url) = std::env::var("REDIS_URL")
            && !url.is_empty()
        {
            config.redis.url = Some(SecretString::from(url));
        }
        if config.postgres.url.is_none()
            && let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            config.postgres.url = Some(SecretString::from(url));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that involve more than one field and normalises lists.
    ///
    /// # Errors
    /// Returns a [`ConfigError`] naming the broken rule.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if let Some((name, _)) = self
            .nonzero_settings()
            .iter()
            .find(|(_, value)| *value == 0)
        {
            return Err(ConfigError::rule(name, "must be greater than zero"));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(ConfigError::rule(
                "SHOAL_MAX_BODY_BYTES",
                "must be at least 1024",
            ));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::rule(
                "SHOAL_KEY_PREFIX",
                "must be non-empty and contain no whitespace",
            ));
        }
        self.normalise();
        self.check_rules()
    }

    /// The settings that must be greater than zero, by environment name.
    fn nonzero_settings(&self) -> [(&'static str, u64); 32] {
        [
            ("SHOAL_MAX_CONNECTIONS", self.http.max_connections as u64),
            (
                "SHOAL_MAX_LOCAL_SESSIONS",
                self.sessions.max_local_sessions as u64,
            ),
            ("SHOAL_MAX_STREAMS", self.sessions.max_streams as u64),
            ("SHOAL_REDIS_POOL_SIZE", self.redis.pool_size as u64),
            ("SHOAL_SESSION_IDLE_TTL_SECS", self.sessions.idle_ttl_secs),
            ("SHOAL_WORKER_IDLE_SECS", self.sessions.worker_idle_secs),
            ("SHOAL_EVENT_LOG_MAX_LEN", self.sessions.event_log_max_len),
            (
                "SHOAL_EVENT_RETENTION_SECS",
                self.sessions.event_retention_secs,
            ),
            ("SHOAL_SSE_KEEPALIVE_SECS", self.http.sse_keepalive_secs),
            ("SHOAL_REDIS_TIMEOUT_MS", self.redis.timeout_ms),
            ("SHOAL_REDIS_LOST_AFTER_MS", self.redis.lost_after_ms),
            ("SHOAL_KV_MAX_KEYS", self.kv.max_keys),
            (
                "SHOAL_HEADER_READ_TIMEOUT_MS",
                self.http.header_read_timeout_ms,
            ),
            ("SHOAL_HTTP_IDLE_TIMEOUT_SECS", self.http.idle_timeout_secs),
            (
                "SHOAL_MAX_CALLS_PER_SESSION",
                self.sessions.max_calls_per_session as u64,
            ),
            (
                "SHOAL_MAX_SUBSCRIBERS_PER_URI",
                self.sessions.max_subscribers_per_uri,
            ),
            ("SHOAL_MAX_URI_BYTES", self.sessions.max_uri_bytes as u64),
            (
                "SHOAL_MAX_LISTEN_URIS",
                self.sessions.max_listen_uris as u64,
            ),
            (
                "SHOAL_MAX_INITIALIZE_BYTES",
                self.http.max_initialize_bytes as u64,
            ),
            (
                "SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS",
                self.postgres.acquire_timeout_ms,
            ),
            (
                "SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS",
                self.postgres.statement_timeout_ms,
            ),
            ("SHOAL_POSTGRES_POLL_MS", self.postgres.poll_ms),
            ("SHOAL_RPC_TIMEOUT_MS", self.rpc.timeout_ms),
            ("SHOAL_TOOL_TIMEOUT_MS", self.tools.timeout_ms),
            ("SHOAL_POSTGRES_POOL_MAX", u64::from(self.postgres.pool_max)),
            ("SHOAL_POSTGRES_ROW_CAP", self.postgres.row_cap as u64),
            (
                "SHOAL_POSTGRES_MAX_RESULT_BYTES",
                self.postgres.max_result_bytes as u64,
            ),
            ("SHOAL_TOOL_CONCURRENCY", self.tools.concurrency as u64),
            ("SHOAL_RPC_MAX_ATTEMPTS", self.rpc.max_attempts as u64),
            (
                "SHOAL_RPC_MAX_RESPONSE_BYTES",
                self.rpc.max_response_bytes as u64,
            ),
            ("SHOAL_OAUTH_TIMEOUT_MS", self.auth.oauth_timeout_ms),
            (
                "SHOAL_OAUTH_JWKS_REFRESH_SECS",
                self.auth.oauth_jwks_refresh_secs,
            ),
        ]
    }

    /// Trims and deduplicates the lists, and caps values that depend on others.
    fn normalise(&mut self) {
        // An idle worker never outlives its session: a replica holds no memory for expired sessions.
        self.sessions.worker_idle_secs = self
            .sessions
            .worker_idle_secs
            .min(self.sessions.idle_ttl_secs);
        for list in [
            &mut self.http.allowed_hosts,
            &mut self.http.allowed_origins,
            &mut self.tools.toolsets,
            &mut self.auth.oauth_issuers,
            &mut self.auth.oauth_algorithms,
        ] {
            list.iter_mut()
                .for_each(|item| *item = item.trim().to_owned());
            list.retain(|item| !item.is_empty());
            list.dedup();
        }
    }

    /// The rules between settings, checked after [`Config::normalise`].
    fn check_rules(&self) -> Result<(), ConfigError> {
        if self.redis.lost_after_ms < 500 {
            return Err(ConfigError::rule(
                "SHOAL_REDIS_LOST_AFTER_MS",
                "must be at least 500: the watchdog sends a PING every 250 ms, and a shorter \
                 window would end streams on every ordinary hiccup",
            ));
        }
        if self.http.allowed_hosts.is_empty() {
            return Err(ConfigError::rule(
                "SHOAL_ALLOWED_HOSTS",
                "is empty, which would turn off the DNS-rebinding check: list the host \
                 names clients use to reach the server, or `*` to accept any Host (not recommended)",
            ));
        }
        if self.http.allowed_hosts.len() > 1
            && self.http.allowed_hosts.iter().any(|host| host == "*")
        {
            return Err(ConfigError::rule(
                "SHOAL_ALLOWED_HOSTS",
                "must be `*` (any Host) alone, not `*` in a list",
            ));
        }
        if self
            .sessions
            .request_state_key
            .as_ref()
            .is_some_and(|key| key.expose_secret().len() < 32)
        {
            return Err(ConfigError::rule(
                "SHOAL_REQUEST_STATE_KEY",
                "must be at least 32 bytes long",
            ));
        }
        if let Some(url) = &self.redis.url
            && !REDIS_SCHEMES
                .iter()
                .any(|scheme| url.expose_secret().starts_with(scheme))
        {
            return Err(ConfigError::rule(
                "SHOAL_REDIS_URL",
                "must start with redis://, rediss:// (one Redis), redis-sentinel://, \
                 rediss-sentinel:// (a Sentinel set), redis-cluster:// or rediss-cluster:// \
                 (a Redis Cluster)",
            ));
        }
        let prefix = &self.redis.key_prefix;
        if (prefix.contains('{') || prefix.contains('}')) && hash_tag(prefix).is_none() {
            return Err(ConfigError::rule(
                "SHOAL_KEY_PREFIX",
                "may hold braces only as a Redis hash tag, e.g. {shoal} (which puts every key in \
                 one slot of a Redis Cluster: docs/operations.md, \"Redis Cluster\"); a stray \
                 brace would split one session's keys over several slots",
            ));
        }
        self.check_auth()
    }

    /// The authentication rules: what each mode needs, and no unauthenticated network listener
    /// unless asked for twice.
    fn check_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        match auth.mode {
            Some(AuthMode::Oauth) => check_oauth(auth)?,
            Some(AuthMode::ApiKeys) if auth.api_keys_file.is_none() => {
                return Err(ConfigError::rule(
                    "SHOAL_API_KEYS_FILE",
                    "must name the keys file when SHOAL_AUTH=api-keys",
                ));
            }
            Some(AuthMode::ApiKeys) => {}
            Some(AuthMode::None)
                if !self.http.listen.ip().is_loopback() && !auth.auth_allow_none_remote =>
            {
                return Err(ConfigError::rule(
                    "SHOAL_AUTH",
                    "is none on a listener that is not loopback: anyone who reaches it could \
                     use every tool; set SHOAL_AUTH to oauth or api-keys, or confirm with \
                     SHOAL_AUTH_ALLOW_NONE_REMOTE=true",
                ));
            }
            Some(AuthMode::None) => {}
            None if !self.http.listen.ip().is_loopback() => {
                return Err(ConfigError::rule(
                    "SHOAL_AUTH",
                    "is unset and the listener is not loopback: set SHOAL_AUTH to oauth or \
                     api-keys (or none, with SHOAL_AUTH_ALLOW_NONE_REMOTE=true)",
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// The authentication mode in force: `SHOAL_AUTH`, or `none` when unset (validation allows
    /// that only on loopback).
    pub fn auth_mode(&self) -> AuthMode {
        self.auth.mode.unwrap_or(AuthMode::None)
    }

    /// The TTL override for `tool`, if configured (`Some(ZERO)` disables caching).
    pub fn cache_ttl_override(&self, tool: &str) -> Option<Duration> {
        self.tools
            .cache_ttls
            .iter()
            .rev()
            .find(|(name, _)| name == tool)
            .map(|(_, ttl)| *ttl)
    }

    /// The timeout override for `tool`, if configured.
    pub fn tool_timeout_override(&self, tool: &str) -> Option<Duration> {
        self.tools
            .timeouts
            .iter()
            .rev()
            .find(|(name, _)| name == tool)
            .map(|(_, t)| *t)
    }

    /// The concurrency override for `tool`, if configured.
    pub fn tool_concurrency_override(&self, tool: &str) -> Option<usize> {
        self.tools
            .concurrency_limits
            .iter()
            .rev()
            .find(|(name, _)| name == tool)
            .map(|(_, n)| *n)
    }

    /// The session idle TTL.
    pub fn session_idle_ttl(&self) -> Duration {
        Duration::from_secs(self.sessions.idle_ttl_secs)
    }

    /// How long a replica trusts its own recent slide of a session's TTL (see
    /// `session_touch_interval_ms`): at most a tenth of the idle TTL.
    pub fn session_touch_interval(&self) -> Duration {
        Duration::from_millis(self.sessions.touch_interval_ms).min(self.session_idle_ttl() / 10)
    }

    /// The idle time after which a replica drops a session's in-memory worker.
    pub fn worker_idle(&self) -> Duration {
        Duration::from_secs(self.sessions.worker_idle_secs)
    }

    /// Whether `SHOAL_REDIS_URL` names a Redis Cluster.
    pub fn redis_is_cluster(&self) -> bool {
        self.redis.url.as_ref().is_some_and(|url| {
            let url = url.expose_secret();
            url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://")
        })
    }

    /// The Redis URL with any password replaced by `***`, for logs.
    pub fn redis_url_redacted(&self) -> Option<String> {
        self.redis
            .url
            .as_ref()
            .map(|url| redact_url(url.expose_secret()))
    }

    /// Whether `SHOAL_ALLOWED_HOSTS=*` turned the Host check off.
    pub fn any_host(&self) -> bool {
        self.http.allowed_hosts.iter().any(|host| host == "*")
    }

    /// Host header values accepted on /mcp; empty (no check) only with `SHOAL_ALLOWED_HOSTS=*`.
    pub fn host_allow_list(&self) -> Vec<String> {
        if self.any_host() {
            Vec::new()
        } else {
            self.http.allowed_hosts.clone()
        }
    }

    /// Origins accepted on /mcp: the configured list, or one derived from the allowed hosts
    /// (none with `SHOAL_ALLOWED_HOSTS=*`: then only a configured list checks origins).
    pub fn effective_allowed_origins(&self) -> Vec<String> {
        if !self.http.allowed_origins.is_empty() {
            return self.http.allowed_origins.clone();
        }
        self.host_allow_list()
            .iter()
            .filter_map(|host| {
                let bare = host_without_port(host);
                (!bare.is_empty()).then(|| {
                    let bare = if bare.contains(':') {
                        format!("[{bare}]")
                    } else {
                        bare.to_owned()
                    };
                    [format!("http://{bare}:*"), format!("https://{bare}:*")]
                })
            })
            .flatten()
            .collect()
    }

    /// The replica's human-readable name: `SHOAL_REPLICA_NAME`, else the host name, else none
    /// (empty counts as unset). Never an identity: two replicas may share it.
    pub fn replica_name(&self) -> Option<String> {
        self.telemetry
            .replica_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    }
}

/// The JWS algorithms `SHOAL_OAUTH_ALGORITHMS` may name: asymmetric ones only, so no shared
/// secret and no unsigned token is ever accepted.
pub const ALLOWED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

fn is_http_url(value: &str) -> bool {
    (value.starts_with("https://") || value.starts_with("http://"))
        && reqwest::Url::parse(value).is_ok_and(|url| url.host_str().is_some())
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match host.rsplit_once(':') {
        // `::1` and other bare IPv6 addresses have more than one colon: no port.
        Some((bare, port)) if !bare.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            bare
        }
        _ => host,
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`, and a Sentinel URL's
/// `sentinelPassword=` query value) with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let mut redacted = match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => format!("{scheme}://{rest}"),
    };
    if let Some(query) = query {
        // A Sentinel URL may carry the sentinels' own password in its query.
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("sentinelPassword") => {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&pairs.join("&"));
    }
    redacted
}

/// The `SHOAL_REDIS_URL` schemes shoal runs on (fred's syntax): one Redis, the sentinels of a
/// Sentinel set (`?node=host:port&sentinelServiceName=NAME`), or seed nodes of a Redis Cluster
/// (`?node=host:port…`).
const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis-sentinel://",
    "rediss-sentinel://",
    "redis-cluster://",
    "rediss-cluster://",
];

/// The hash tag of a Redis key name: what lies between its first `{` and the next `}`, when
/// that is not empty (only that part decides the key's slot on a Redis Cluster).
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The OAuth mode's rules: issuers over https (unless allowed), a JWKS that may not outlive its
/// refresh, the resource URL tokens must name, asymmetric algorithms only.
fn check_oauth(auth: &AuthConfig) -> Result<(), ConfigError> {
    if auth.oauth_issuers.is_empty() || !auth.oauth_issuers.iter().all(|i| is_http_url(i)) {
        return Err(ConfigError::rule(
            "SHOAL_OAUTH_ISSUERS",
            "must list at least one issuer, each an http(s) URL, when SHOAL_AUTH=oauth",
        ));
    }
    if !auth.oauth_allow_http
        && auth
            .oauth_issuers
            .iter()
            .any(|i| i.to_ascii_lowercase().starts_with("http://"))
    {
        return Err(ConfigError::rule(
            "SHOAL_OAUTH_ISSUERS",
            "names an http:// issuer, whose keys anyone on the path could replace: use \
                 https://, or set SHOAL_OAUTH_ALLOW_HTTP=true for development",
        ));
    }
    if auth.oauth_jwks_max_age_secs < auth.oauth_jwks_refresh_secs {
        return Err(ConfigError::rule(
            "SHOAL_OAUTH_JWKS_MAX_AGE_SECS",
            "must be at least SHOAL_OAUTH_JWKS_REFRESH_SECS",
        ));
    }
    if !auth
        .resource_url
        .as_deref()
        .is_some_and(|url| is_http_url(url) && !url.contains('#'))
    {
        return Err(ConfigError::rule(
            "SHOAL_RESOURCE_URL",
            "must be this server's http(s) URL without a fragment (the token audience, \
                 e.g. https://mcp.example.com/mcp) when SHOAL_AUTH=oauth",
        ));
    }
    if auth.oauth_algorithms.is_empty()
        || !auth
            .oauth_algorithms
            .iter()
            .all(|a| ALLOWED_ALGORITHMS.contains(&a.as_str()))
    {
        return Err(ConfigError::rule(
            "SHOAL_OAUTH_ALGORITHMS",
            "must list asymmetric JWS algorithms (RS256, RS384, RS512, PS256, PS384, \
                 PS512, ES256, ES384, EdDSA)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["shoal-server"];
        all.extend_from_slice(args);
        Config::from_args(all)
    }

    /// Every setting keeps one flag, one id and one environment variable across the groups of
    /// the tree (clap's own consistency checks, and names unique tree-wide).
    #[test]
    fn the_tree_has_one_flag_and_one_variable_per_setting() {
        use clap::CommandFactory as _;
        let command = Config::command();
        command.clone().debug_assert();
        let mut seen = std::collections::HashSet::new();
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy().into_owned();
                assert!(env.starts_with("SHOAL_"), "{env}");
                assert!(seen.insert(env.clone()), "{env} declared twice");
                let flag = arg.get_long().expect("a long flag");
                assert_eq!(
                    env.trim_start_matches("SHOAL_")
                        .to_lowercase()
                        .replace('_', "-"),
                    flag,
                    "the flag of {env}"
                );
            }
        }
        assert_eq!(seen.len(), 82, "settings in the tree");
    }

    /// No listener that is not loopback serves without authentication unless asked twice, and each
    /// mode names what it lacks.
    #[test]
    fn authentication_is_required_off_loopback() {
        let refused = |args: &[&str]| parse(args).expect_err("refused").setting();
        assert_eq!(parse(&[]).expect("loopback").auth_mode(), AuthMode::None);
        assert_eq!(refused(&["--listen", "0.0.0.0:8080"]), Some("SHOAL_AUTH"));
        assert_eq!(
            refused(&["--listen", "0.0.0.0:8080", "--auth", "none"]),
            Some("SHOAL_AUTH")
        );
        let open = parse(&[
            "--listen",
            "0.0.0.0:8080",
            "--auth",
            "none",
            "--auth-allow-none-remote",
        ])
        .expect("confirmed");
        assert_eq!(open.auth_mode(), AuthMode::None);
        assert_eq!(
            refused(&["--listen", "0.0.0.0:8080", "--auth", "api-keys"]),
            Some("SHOAL_API_KEYS_FILE")
        );
        assert_eq!(
            refused(&[
                "--auth",
                "oauth",
                "--resource-url",
                "https://mcp.example/mcp"
            ]),
            Some("SHOAL_OAUTH_ISSUERS")
        );
        let issuer = ["--auth", "oauth", "--oauth-issuers", "https://id.example"];
        assert_eq!(refused(&issuer), Some("SHOAL_RESOURCE_URL"));
        // An http:// issuer only when asked for (development).
        let plain = [
            "--auth",
            "oauth",
            "--oauth-issuers",
            "http://127.0.0.1:9000",
            "--resource-url",
            "http://127.0.0.1:8080/mcp",
        ];
        assert_eq!(refused(&plain), Some("SHOAL_OAUTH_ISSUERS"));
        let mut allowed = plain.to_vec();
        allowed.push("--oauth-allow-http");
        assert_eq!(
            parse(&allowed).expect("allowed").auth_mode(),
            AuthMode::Oauth
        );
        let with = |extra: &[&'static str]| {
            let mut args = issuer.to_vec();
            args.extend_from_slice(&["--resource-url", "https://mcp.example/mcp"]);
            args.extend_from_slice(extra);
            args
        };
        assert_eq!(
            refused(&with(&["--oauth-algorithms", "HS256"])),
            Some("SHOAL_OAUTH_ALGORITHMS")
        );
        let config = parse(&with(&["--listen", "0.0.0.0:8080"])).expect("oauth");
        assert_eq!(config.auth_mode(), AuthMode::Oauth);
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.redis.key_prefix, "shoal");
        assert_eq!(
            config.tools.toolsets,
            vec!["kv", "postgres", "rpc", "compute"]
        );
        assert_eq!(config.sessions.idle_ttl_secs, 1800);
    }

    #[test]
    fn lists_are_split_and_trimmed() {
        let config = parse(&[
            "--toolsets",
            "kv, conformance,,",
            "--allowed-hosts",
            "a.example, b:8080",
        ])
        .expect("parse");
        assert_eq!(config.tools.toolsets, vec!["kv", "conformance"]);
        assert_eq!(config.http.allowed_hosts, vec!["a.example", "b:8080"]);
    }

    #[test]
    fn an_empty_host_list_is_refused_and_any_host_is_explicit() {
        let error =
            Config::from_args(["shoal-server", "--allowed-hosts", ""]).expect_err("refused");
        assert!(error.to_string().contains("DNS-rebinding"), "{error}");
        let error =
            Config::from_args(["shoal-server", "--allowed-hosts", " , "]).expect_err("refused");
        assert!(error.to_string().contains("SHOAL_ALLOWED_HOSTS"), "{error}");
        assert!(Config::from_args(["shoal-server", "--allowed-hosts", "*,a.example"]).is_err());
        let config = Config::from_args(["shoal-server", "--allowed-hosts", "*"]).expect("parse");
        assert!(config.any_host());
        assert!(config.host_allow_list().is_empty());
        assert!(config.effective_allowed_origins().is_empty());
    }

    #[test]
    fn worker_idle_is_capped_by_session_ttl() {
        let config =
            parse(&["--session-idle-ttl-secs", "5", "--worker-idle-secs", "300"]).expect("parse");
        assert_eq!(config.sessions.worker_idle_secs, 5);
    }

    #[test]
    fn per_tool_overrides_parse() {
        let config = parse(&[
            "--cache-ttls",
            "pg_query=30s,get_balance=0",
            "--tool-timeouts",
            "sleep=11m",
            "--tool-concurrency-limits",
            "hash=2",
        ])
        .expect("parse");
        assert_eq!(
            config.cache_ttl_override("pg_query"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            config.cache_ttl_override("get_balance"),
            Some(Duration::ZERO)
        );
        assert_eq!(config.cache_ttl_override("other"), None);
        assert_eq!(
            config.tool_timeout_override("sleep"),
            Some(Duration::from_secs(660))
        );
        assert_eq!(config.tool_concurrency_override("hash"), Some(2));
        assert!(parse(&["--tool-concurrency-limits", "hash=0"]).is_err());
        assert!(parse(&["--cache-ttls", "=5s"]).is_err());
    }

    #[test]
    fn zero_ttl_is_rejected() {
        let error = parse(&["--session-idle-ttl-secs", "0"]).expect_err("must fail");
        assert_eq!(
            error.setting(),
            Some("SHOAL_SESSION_IDLE_TTL_SECS"),
            "{error}"
        );
        assert!(
            error.to_string().contains("must be greater than zero"),
            "{error}"
        );
    }

    #[test]
    fn a_lost_redis_window_under_two_pings_is_refused() {
        let error = parse(&["--redis-lost-after-ms", "300"]).expect_err("must fail");
        assert_eq!(
            error.setting(),
            Some("SHOAL_REDIS_LOST_AFTER_MS"),
            "{error}"
        );
        assert_eq!(
            parse(&["--redis-lost-after-ms", "500"])
                .expect("parse")
                .redis
                .lost_after_ms,
            500
        );
    }

    #[test]
    fn redis_url_scheme_is_checked_and_redacted() {
        assert!(parse(&["--redis-url", "http://x"]).is_err());
        let sentinel = "redis-sentinel://shoal:hunter2@s1:26379?node=s2:26379\
            &sentinelServiceName=main&sentinelUsername=watch&sentinelPassword=hunter3";
        let config = parse(&["--redis-url", sentinel]).expect("a Sentinel URL is accepted");
        assert_eq!(
            config.redis_url_redacted().as_deref(),
            Some(
                "redis-sentinel://shoal:***@s1:26379?node=s2:26379\
                 &sentinelServiceName=main&sentinelUsername=watch&sentinelPassword=***"
            )
        );
        let cluster = "redis-cluster://shoal:x@n1:7000?node=n2:7000";
        assert!(
            parse(&["--redis-url", cluster]).is_ok(),
            "keys spread over the shards"
        );
        assert!(parse(&["--redis-url", cluster, "--key-prefix", "{shoal}"]).is_ok());
        assert!(
            parse(&["--redis-url", cluster, "--key-prefix", "sh{oal"]).is_err(),
            "a stray brace would split a session's keys"
        );
        assert_eq!(hash_tag("{shoal}:sess:x"), Some("shoal"));
        assert_eq!(hash_tag("a{}b{c}"), None, "an empty tag is no tag");
        let config = parse(&["--redis-url", "redis://user:hunter2@db:6379/0"]).expect("parse");
        assert_eq!(
            config.redis_url_redacted().as_deref(),
            Some("redis://user:***@db:6379/0")
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn origins_are_derived_from_hosts() {
        let config =
            parse(&["--allowed-hosts", "localhost:8080,::1,[::2]:9,lb.example"]).expect("parse");
        assert_eq!(
            config.effective_allowed_origins(),
            vec![
                "http://localhost:*",
                "https://localhost:*",
                "http://[::1]:*",
                "https://[::1]:*",
                "http://[::2]:*",
                "https://[::2]:*",
                "http://lb.example:*",
                "https://lb.example:*",
            ]
        );
    }
}
