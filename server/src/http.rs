//! The HTTP front of a replica: routing, the checks that run before MCP, and the connection loop
//! with graceful shutdown.
//!
//! Routes: `/mcp` (MCP Streamable HTTP: POST, GET, DELETE), `/healthz` (alive), `/readyz` (ready:
//! not draining and the shared state reachable), `/metrics` (Prometheus text).
//!
//! Before a message reaches rmcp this layer enforces, each with its status and a JSON-RPC error
//! body where the client speaks JSON-RPC: Host and Origin allow-lists (403), the body size limit
//! (413), a body read timeout (408), JSON syntax (400, -32700), JSON-RPC framing (400, -32600),
//! the replica's session and stream limits (503), and a shared state that is down (503 instead of
//! rmcp's 500). DELETE is handled here entirely, so that a session is only reported deleted once
//! it is gone from the shared state.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use rmcp::{model::ProtocolVersion, transport::streamable_http_server::StreamableHttpService};
use serde::Deserialize;
use shoal_shared::telemetry::{KeyValue, Parent, Span, SpanKind};
use shoal_shared::{ids::is_session_id, telemetry};
use tokio::{net::TcpListener, time::Instant};

use crate::{
    mcp::{cluster::ClusterSessionManager, handler::ShoalHandler, trace::HttpTrace},
    state::AppState,
};

/// Response body type shared with rmcp.
pub type Body = BoxBody<Bytes, Infallible>;

type McpService = StreamableHttpService<ShoalHandler, ClusterSessionManager>;

/// How long the bus may go without a probe coming back before the replica reports not ready (three
/// probe intervals).
const BUS_SILENCE_LIMIT: Duration = Duration::from_secs(15);

/// How long a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The replica's HTTP service. Cheap to clone.
#[derive(Clone)]
pub struct HttpService {
    state: Arc<AppState>,
    sessions: Arc<ClusterSessionManager>,
    mcp: McpService,
    policy: Arc<OriginPolicy>,
    replica: HeaderValue,
    /// The admin listener's service: /metrics, /healthz and /readyz only, no Host check.
    admin: bool,
    /// Whether the last readiness check passed (its failures are logged once, on the change).
    ready: Arc<AtomicBool>,
}

impl HttpService {
    /// The service over `mcp`, whose session manager is `sessions`.
    pub fn new(
        state: Arc<AppState>,
        sessions: Arc<ClusterSessionManager>,
        mcp: McpService,
    ) -> Self {
        let policy = Arc::new(OriginPolicy::new(
            &state.config.host_allow_list(),
            &state.config.effective_allowed_origins(),
        ));
        // Names the replica that answered: operators and tests see where a balancer sent a request.
        let replica =
            HeaderValue::from_str(state.bus.tag().as_str()).expect("a replica id is 12 hex digits");
        Self {
            state,
            sessions,
            mcp,
            policy,
            replica,
            admin: false,
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The same service for the admin listener (`SHOAL_ADMIN_LISTEN`).
    pub fn admin(&self) -> Self {
        Self {
            admin: true,
            ..self.clone()
        }
    }

    /// Handles one request. Measured in `shoal_http_request_duration_seconds` until its response
    /// body ends; an MCP request is traced in an HTTP server span that lives as long.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let method = method_label(request.method());
        let route = route_label(request.uri().path());
        let mut span = Span::none();
        let mut response = self.route(request, &mut span).await;
        response
            .headers_mut()
            .insert("x-shoal-replica", self.replica.clone());
        let status = response.status().as_u16();
        if span.is_recording() {
            span.set("http.response.status_code", i64::from(status));
            if status >= 500 {
                span.mark_error(&status.to_string());
            }
        }
        let finish = Finish {
            metrics: self.state.metrics.clone(),
            method,
            route,
            status,
            start,
            _span: span,
        };
        response.map(|body| {
            ObservedBody {
                inner: body,
                finish: Some(finish),
            }
            .boxed()
        })
    }

    async fn route(&self, request: Request<Incoming>, span: &mut Span) -> Response<Body> {
        let path = request.uri().path();
        match (request.method(), path) {
            (_, "/mcp") if !self.admin => self.mcp(request, span).await,
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => self.readyz().await,
            (&Method::GET, "/metrics")
                if !self.admin && self.state.config.admin_listen.is_some() =>
            {
                text(StatusCode::NOT_FOUND, "not found\n")
            }
            (&Method::GET, "/metrics") => {
                if !self.admin
                    && let Err(rejection) = self.policy.check_host(request.uri(), request.headers())
                {
                    return self
                        .reject(rejection.reason, text(rejection.status, rejection.message));
                }
                self.metrics()
            }
            (_, "/healthz" | "/readyz" | "/metrics") => method_not_allowed("GET"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn metrics(&self) -> Response<Body> {
        Response::builder()
            .status(StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(full(self.state.metrics.render()))
            .expect("valid response")
    }

    /// Ready or not, and nothing more on the serving port; the reason on the admin listener and
    /// in the log (once, when readiness is lost).
    async fn readyz(&self) -> Response<Body> {
        let reason = if self.state.draining.load(Ordering::SeqCst) {
            Some("draining")
        } else if self.state.bus.since_last_roundtrip() > BUS_SILENCE_LIMIT {
            // The bus probe (every 5 s) has not come back: this replica would miss notifications.
            Some("cluster bus silent")
        } else {
            match tokio::time::timeout(Duration::from_secs(2), self.state.backend.ping()).await {
                Ok(Ok(())) => None,
                _ => Some("shared state unreachable"),
            }
        };
        let was_ready = self.ready.swap(reason.is_none(), Ordering::SeqCst);
        match reason {
            None => text(StatusCode::OK, "ready\n"),
            Some(reason) => {
                if was_ready {
                    tracing::warn!(reason, "not ready");
                }
                let body = if self.admin {
                    format!("not ready: {reason}\n")
                } else {
                    "not ready\n".to_owned()
                };
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
    }

    fn reject(&self, reason: &'static str, response: Response<Body>) -> Response<Body> {
        self.state.metrics.http_rejection(reason);
        response
    }

    async fn mcp(&self, request: Request<Incoming>, span: &mut Span) -> Response<Body> {
        if let Err(rejection) = self.policy.check(request.uri(), request.headers()) {
            tracing::info!(
                reason = rejection.reason,
                "rejected request: host or origin not allowed"
            );
            return self.reject(rejection.reason, text(rejection.status, rejection.message));
        }
        // Session ids only in their exact generated form, on every method: nothing else reaches
        // storage, the bus or telemetry.
        let mut session_ids = request.headers().get_all("mcp-session-id").iter();
        if let Some(first) = session_ids.next()
            && (session_ids.next().is_some() || !first.to_str().is_ok_and(is_session_id))
        {
            tracing::info!("rejected request: malformed session id");
            return self.reject(
                "bad_session_id",
                text(StatusCode::NOT_FOUND, "Not Found: Session not found\n"),
            );
        }
        match *request.method() {
            Method::POST => self.post(request, span).await,
            Method::GET => {
                if self.streams_full() {
                    return self.reject(
                        "streams_full",
                        busy(None, "this replica has too many open streams"),
                    );
                }
                let (mut parts, _) = request.into_parts();
                *span = http_span(&mut parts, None);
                span.wrap(self.forward(Request::from_parts(parts, Full::new(Bytes::new())), None))
                    .await
            }
            Method::DELETE => {
                let (mut parts, _) = request.into_parts();
                *span = http_span(&mut parts, None);
                span.wrap(self.delete(&parts.headers)).await
            }
            _ => method_not_allowed("GET, POST, DELETE"),
        }
    }

    fn streams_full(&self) -> bool {
        let open =
            self.state.metrics.streams_active("get") + self.state.metrics.streams_active("listen");
        open.max(0) as usize >= self.state.config.max_streams
    }

    async fn post(&self, request: Request<Incoming>, span: &mut Span) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        // Accept and Content-Type are checked by rmcp (406, 415) before it reads the body: send it
        // nothing to read when they are wrong.
        if !is_json(&parts.headers) {
            return self
                .forward(Request::from_parts(parts, Full::new(Bytes::new())), None)
                .await;
        }
        let limit = self.state.config.max_body_bytes;
        let collected =
            tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect()).await;
        let bytes = match collected {
            Err(_) => {
                return self.reject(
                    "body_timeout",
                    jsonrpc_error(
                        StatusCode::REQUEST_TIMEOUT,
                        -32600,
                        "request body not received in time",
                    ),
                );
            }
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
                tracing::info!(limit, "rejected request: body too large");
                return self.reject(
                    "body_too_large",
                    jsonrpc_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        -32600,
                        &format!("request body exceeds {limit} bytes"),
                    ),
                );
            }
            Ok(Err(_)) => {
                return self.reject(
                    "body_read",
                    jsonrpc_error(
                        StatusCode::BAD_REQUEST,
                        -32600,
                        "request body could not be read",
                    ),
                );
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let envelope = match Envelope::peek(&bytes) {
            Ok(envelope) => envelope,
            Err((code, message)) => {
                tracing::info!(code, message, "rejected request: malformed JSON-RPC");
                let reason = if code == -32700 {
                    "parse_error"
                } else {
                    "invalid_request"
                };
                return self.reject(
                    reason,
                    jsonrpc_error(StatusCode::BAD_REQUEST, code, message),
                );
            }
        };
        if envelope.is_initialize && bytes.len() > self.state.config.max_initialize_bytes {
            let limit = self.state.config.max_initialize_bytes;
            tracing::info!(limit, "rejected request: initialize too large");
            return self.reject(
                "initialize_too_large",
                jsonrpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    -32602,
                    &format!("initialize request exceeds {limit} bytes"),
                ),
            );
        }
        if envelope.is_initialize
            && self.sessions.local_sessions().await >= self.state.config.max_local_sessions
        {
            return self.reject(
                "sessions_full",
                busy(envelope.id.as_ref(), "this replica holds too many sessions"),
            );
        }
        *span = http_span(&mut parts, envelope.traceparent.as_deref());
        span.wrap(self.forward(
            Request::from_parts(parts, Full::new(bytes)),
            envelope.id.as_ref(),
        ))
        .await
    }

    async fn forward(
        &self,
        request: Request<Full<Bytes>>,
        id: Option<&serde_json::Value>,
    ) -> Response<Body> {
        let started = std::time::Instant::now();
        let response = self.mcp.handle(request).await;
        if response.status() == StatusCode::INTERNAL_SERVER_ERROR
            && (!self.state.backend.is_connected() || self.state.backend.failed_since(started))
        {
            // rmcp reports a failed session lookup as 500; the cause is a shared state that is down
            // (the connection state may not know yet when the failure is fresh), which clients
            // should retry.
            return self.reject("backend_unavailable", unavailable(id));
        }
        response
    }

    async fn delete(&self, headers: &HeaderMap) -> Response<Body> {
        if let Some(version) = headers.get("mcp-protocol-version") {
            let Some(version) = version.to_str().ok().and_then(known_version) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Bad Request: Unsupported MCP-Protocol-Version\n",
                );
            };
            if version.as_str() >= ProtocolVersion::V_2026_07_28.as_str() {
                return method_not_allowed("GET, POST"); // no sessions from 2026-07-28 on
            }
        }
        let Some(session) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "Bad Request: Session ID is required\n",
            );
        };
        match self.state.backend.session_delete(session).await {
            Ok(existed) => {
                self.sessions.close_local(session).await;
                if existed {
                    // Replicas that slid the session's TTL just before it was deleted trust that
                    // slide for this long (unless the bus told them first): wait it out, so the
                    // session is gone everywhere once the client has the answer.
                    tokio::time::sleep(self.sessions.delete_settle()).await;
                    empty(StatusCode::ACCEPTED)
                } else {
                    text(StatusCode::NOT_FOUND, "Not Found: Session not found\n")
                }
            }
            Err(error) => {
                tracing::warn!(%error, "DELETE failed: shared state unavailable");
                self.reject("backend_unavailable", unavailable(None))
            }
        }
    }
}

/// The HTTP server span of an MCP request (`POST /mcp`, ...), child of the trace context the client
/// sent: `params._meta.traceparent` when the message has one, else the `traceparent` header. Its
/// context goes into the request's extensions, where the MCP handler finds its parent.
fn http_span(parts: &mut http::request::Parts, meta_traceparent: Option<&str>) -> Span {
    if !telemetry::tracing_enabled() {
        return Span::none();
    }
    let method = method_label(&parts.method);
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let parent = match meta_traceparent {
        Some(traceparent) => telemetry::context_from_traceparent(traceparent, None),
        None => header("traceparent").and_then(|traceparent| {
            telemetry::context_from_traceparent(traceparent, header("tracestate"))
        }),
    };
    let name = match method {
        "POST" => "POST /mcp",
        "GET" => "GET /mcp",
        "DELETE" => "DELETE /mcp",
        _ => "HTTP /mcp",
    };
    let span = Span::start(
        name,
        SpanKind::Server,
        Parent::Context(parent.as_ref()),
        || {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.route", "/mcp"),
                KeyValue::new("url.path", "/mcp"),
                KeyValue::new("url.scheme", "http"),
                KeyValue::new("network.protocol.name", "http"),
                KeyValue::new(
                    "network.protocol.version",
                    match parts.version {
                        http::Version::HTTP_2 => "2",
                        http::Version::HTTP_10 => "1.0",
                        _ => "1.1",
                    },
                ),
            ];
            if let Some(agent) = header("user-agent") {
                attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
            }
            // Never the id itself (a bearer credential): its keyed hash.
            if let Some(tag) = header("mcp-session-id").and_then(telemetry::session_tag) {
                attributes.push(KeyValue::new("mcp.session.tag", tag));
            }
            attributes
        },
    );
    if let Some(context) = span.context() {
        parts.extensions.insert(HttpTrace(context.clone()));
    }
    span
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/mcp" => "/mcp",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// Records the request in the HTTP metrics, and ends its span, when the response body ends or is
/// dropped.
struct Finish {
    metrics: shoal_shared::metrics::Metrics,
    method: &'static str,
    route: &'static str,
    status: u16,
    start: Instant,
    _span: Span,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.metrics
            .http_request(self.method, self.route, self.status, self.start.elapsed());
    }
}

/// A response body that reports its end to [`Finish`].
struct ObservedBody {
    inner: Body,
    finish: Option<Finish>,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.finish.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn known_version(value: &str) -> Option<ProtocolVersion> {
    ProtocolVersion::KNOWN_VERSIONS
        .iter()
        .find(|version| version.as_str() == value)
        .cloned()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// What this layer needs to know of a JSON-RPC message, read without building it.
#[derive(Debug, Default)]
struct Envelope {
    is_initialize: bool,
    id: Option<serde_json::Value>,
    /// `params._meta.traceparent` (2026-07-28 trace context propagation).
    traceparent: Option<String>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<&'a str>,
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    params: Option<RawParams>,
    #[serde(default)]
    result: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawParams {
    #[serde(rename = "_meta", default)]
    meta: Option<RawMeta>,
}

#[derive(Deserialize)]
struct RawMeta {
    #[serde(default)]
    traceparent: Option<serde_json::Value>,
}

impl Envelope {
    /// Checks JSON syntax and JSON-RPC framing: `(code, message)` on failure.
    fn peek(bytes: &[u8]) -> Result<Self, (i64, &'static str)> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            // Still check the syntax, so malformed JSON is a parse error whatever its shape.
            serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                .map_err(|_| (-32700, "Parse error: invalid JSON"))?;
            return Err((
                -32600,
                "Invalid Request: JSON-RPC batches are not supported",
            ));
        }
        let raw: RawEnvelope<'_> = match serde_json::from_slice(bytes) {
            Ok(raw) => raw,
            Err(error) if error.is_data() => {
                return Err((
                    -32600,
                    "Invalid Request: expected a JSON-RPC message object",
                ));
            }
            Err(_) => return Err((-32700, "Parse error: invalid JSON")),
        };
        if raw.jsonrpc != Some("2.0") {
            return Err((-32600, "Invalid Request: jsonrpc must be \"2.0\""));
        }
        if raw.method.is_none() && raw.result.is_none() && raw.error.is_none() {
            return Err((
                -32600,
                "Invalid Request: a message needs a method, a result or an error",
            ));
        }
        Ok(Envelope {
            is_initialize: raw.method.as_deref() == Some("initialize"),
            id: raw.id,
            traceparent: raw
                .params
                .and_then(|p| p.meta)
                .and_then(|m| m.traceparent)
                .and_then(|tp| tp.as_str().map(str::to_owned)),
        })
    }
}

/// The Host and Origin allow-lists (DNS-rebinding protection), with the same matching rules as
/// rmcp's, which enforces them again behind this layer.
#[derive(Debug)]
struct OriginPolicy {
    hosts: Vec<(String, Option<u16>)>,
    origins: Vec<(String, String, PortRule)>,
}

/// Why the Host/Origin check refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rejection {
    reason: &'static str,
    status: StatusCode,
    message: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortRule {
    Any,
    Exact(u16),
}

fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority: http::uri::Authority = authority.trim().parse().ok()?;
    let host = authority
        .host()
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    Some((host, authority.port_u16()))
}

/// A 403 refusal of the Host/Origin check.
fn forbidden(reason: &'static str, message: &'static str) -> Rejection {
    Rejection {
        reason,
        status: StatusCode::FORBIDDEN,
        message,
    }
}

impl OriginPolicy {
    fn new(hosts: &[String], origins: &[String]) -> Self {
        let hosts = hosts
            .iter()
            .filter_map(|host| {
                // Bare IPv6 addresses (`::1`) do not parse as authorities.
                split_authority(host)
                    .or_else(|| Some((host.trim_matches(['[', ']']).to_ascii_lowercase(), None)))
            })
            .collect();
        let origins = origins
            .iter()
            .filter_map(|origin| {
                let (base, any_port) = match origin.strip_suffix(":*") {
                    Some(base) => (base, true),
                    None => (origin.as_str(), false),
                };
                let (scheme, authority) = base.split_once("://")?;
                let (host, port) = split_authority(authority)?;
                let rule = match (any_port, port) {
                    (true, _) | (false, None) => PortRule::Any,
                    (false, Some(port)) => PortRule::Exact(port),
                };
                Some((scheme.to_ascii_lowercase(), host, rule))
            })
            .collect();
        Self { hosts, origins }
    }

    fn check(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<(), Rejection> {
        self.check_host(uri, headers)?;
        self.check_origin(headers)
    }

    /// The Host allow-list alone (also guards /metrics on the serving port).
    fn check_host(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<(), Rejection> {
        let bad_host = |message| Rejection {
            reason: "bad_host",
            status: StatusCode::BAD_REQUEST,
            message,
        };
        if !self.hosts.is_empty() {
            let authority = match headers.get(header::HOST) {
                Some(value) => value
                    .to_str()
                    .ok()
                    .and_then(split_authority)
                    .ok_or(bad_host("Bad Request: Invalid Host header\n"))?,
                None => uri
                    .authority()
                    .and_then(|a| split_authority(a.as_str()))
                    .ok_or(bad_host("Bad Request: missing Host header\n"))?,
            };
            let allowed = self.hosts.iter().any(|(host, port)| {
                *host == authority.0 && port.is_none_or(|p| Some(p) == authority.1)
            });
            if !allowed {
                return Err(forbidden("host", "Forbidden: Host header is not allowed\n"));
            }
        }
        Ok(())
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        if self.origins.is_empty() {
            return Ok(());
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let parsed = origin.to_str().ok().and_then(|origin| {
            let (scheme, authority) = origin.split_once("://")?;
            let (host, port) = split_authority(authority)?;
            let scheme = scheme.to_ascii_lowercase();
            let port = port.or(match scheme.as_str() {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            });
            Some((scheme, host, port))
        });
        let Some((scheme, host, port)) = parsed else {
            return Err(forbidden("origin", "Forbidden: Invalid Origin header\n"));
        };
        let allowed = self.origins.iter().any(|(s, h, rule)| {
            *s == scheme
                && *h == host
                && match rule {
                    PortRule::Any => true,
                    PortRule::Exact(p) => Some(*p) == port,
                }
        });
        if allowed {
            Ok(())
        } else {
            Err(forbidden(
                "origin",
                "Forbidden: Origin header is not allowed\n",
            ))
        }
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body))
        .expect("valid response")
}

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(full(Bytes::new()))
        .expect("valid response")
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::METHOD_NOT_ALLOWED)
        .header(header::ALLOW, allow)
        .body(full("Method Not Allowed\n"))
        .expect("valid response")
}

/// A JSON-RPC error response. `id` is the request's id when it could be read (errors echo it),
/// otherwise `null` as JSON-RPC prescribes for unreadable requests.
fn jsonrpc_error_for(
    id: Option<&serde_json::Value>,
    status: StatusCode,
    code: i64,
    message: &str,
) -> Response<Body> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(&serde_json::Value::Null),
        "error": { "code": code, "message": message },
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("valid response")
}

fn jsonrpc_error(status: StatusCode, code: i64, message: &str) -> Response<Body> {
    jsonrpc_error_for(None, status, code, message)
}

fn busy(id: Option<&serde_json::Value>, message: &str) -> Response<Body> {
    let mut response = jsonrpc_error_for(
        id,
        StatusCode::SERVICE_UNAVAILABLE,
        -32000,
        &format!("{message}; retry shortly"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn unavailable(id: Option<&serde_json::Value>) -> Response<Body> {
    busy(id, "shared session state is unavailable")
}

/// Accepts connections until `shutdown` resolves, then drains: stops accepting, lets `on_drain`
/// end the long-lived streams, and waits up to `grace` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    on_drain: impl FnOnce(),
) {
    let graceful = GracefulShutdown::new();
    let header_read_timeout = Duration::from_millis(service.state.config.header_read_timeout_ms);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    // h2c: pings find peers that vanished without closing (no FIN), so their streams end.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // rmcp writes an SSE reply in several small writes: without NODELAY, Nagle's
                    // algorithm holds each reply for the client's delayed ACK (~40 ms).
                    let _ = stream.set_nodelay(true);
                    let service = service.clone();
                    let handler = hyper::service::service_fn(move |request| {
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(service.handle(request).await) }
                    });
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        // Protocol detection (HTTP/1 or h2c) waits for the first bytes without a
                        // limit: a connection that sends nothing is closed after the header read
                        // timeout instead of being held forever.
                        let mut first = [0_u8; 1];
                        match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                            Ok(Ok(read)) if read > 0 => {}
                            _ => return,
                        }
                        let connection = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), handler)
                            .into_owned();
                        if let Err(error) = watcher.watch(connection).await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    on_drain();
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; cutting remaining connections"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The JSON-RPC entry on hostile bytes: a clean verdict or a JSON-RPC error code, never a
        /// panic; any JSON object with a method is at least looked at, never refused as unparsable.
        #[test]
        fn the_json_rpc_entry_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), method in ".{0,20}", id in proptest::prelude::any::<i64>()) {
            if let Err((code, _)) = Envelope::peek(&bytes) {
                proptest::prop_assert!(code == -32700 || code == -32600, "{code}");
            }
            let message = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method});
            if let Err((code, _)) = Envelope::peek(message.to_string().as_bytes()) {
                proptest::prop_assert_ne!(code, -32700);
            }
        }

        /// Host headers of any shape are answered (allowed, 400 or 403), never a panic.
        #[test]
        fn host_checks_never_panic(host in ".{0,60}", origin in ".{0,60}") {
            let policy = OriginPolicy::new(&["localhost".to_owned(), "a.example:8080".to_owned()], &["https://a.example".to_owned()]);
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, value);
            }
            if let Ok(value) = HeaderValue::from_str(&origin) {
                headers.insert(header::ORIGIN, value);
            }
            let _ = policy.check(&http::Uri::from_static("/mcp"), &headers);
        }
    }

    #[test]
    fn envelopes_are_checked() {
        assert!(
            Envelope::peek(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#)
                .expect("ok")
                .is_initialize
        );
        assert!(
            !Envelope::peek(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#)
                .expect("ok")
                .is_initialize
        );
        assert_eq!(Envelope::peek(b"{nope").expect_err("parse").0, -32700);
        assert_eq!(Envelope::peek(b"[1,").expect_err("parse").0, -32700);
        assert_eq!(Envelope::peek(b"[]").expect_err("batch").0, -32600);
        assert_eq!(Envelope::peek(b"42").expect_err("shape").0, -32600);
        assert_eq!(
            Envelope::peek(br#"{"id":1,"method":"x"}"#)
                .expect_err("version")
                .0,
            -32600
        );
        assert_eq!(
            Envelope::peek(br#"{"jsonrpc":"2.0","id":1}"#)
                .expect_err("empty")
                .0,
            -32600
        );
    }

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).expect("header"));
        if let Some(origin) = origin {
            headers.insert(
                header::ORIGIN,
                HeaderValue::from_str(origin).expect("header"),
            );
        }
        headers
    }

    #[test]
    fn hosts_and_origins_are_enforced() {
        let hosts = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "lb.example:8080".to_owned(),
        ];
        let origins = vec![
            "http://localhost:*".to_owned(),
            "https://app.example".to_owned(),
        ];
        let policy = OriginPolicy::new(&hosts, &origins);
        let uri = http::Uri::from_static("/mcp");
        assert!(policy.check(&uri, &headers("localhost:3000", None)).is_ok());
        assert!(policy.check(&uri, &headers("[::1]:3000", None)).is_ok());
        assert!(
            policy
                .check(&uri, &headers("lb.example:8080", None))
                .is_ok()
        );
        assert_eq!(
            policy
                .check(&uri, &headers("lb.example:9090", None))
                .map_err(|e| e.reason),
            Err("host")
        );
        assert_eq!(
            policy
                .check(&uri, &headers("evil.example.com", None))
                .map_err(|e| e.reason),
            Err("host")
        );
        assert!(
            policy
                .check(&uri, &headers("localhost", Some("http://localhost:5173")))
                .is_ok()
        );
        assert!(
            policy
                .check(&uri, &headers("localhost", Some("https://app.example")))
                .is_ok()
        );
        assert_eq!(
            policy
                .check(&uri, &headers("localhost", Some("http://evil.example.com")))
                .map_err(|e| e.reason),
            Err("origin")
        );
    }
}
