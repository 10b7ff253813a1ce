//! The HTTP front of a replica: routing, the checks that run before MCP, and the connection loop
//! with graceful shutdown.
//!
//! Routes: `/mcp` (MCP Streamable HTTP: POST, GET, DELETE), `/healthz` (alive), `/readyz` (ready:
//! not draining and the shared state reachable), `/metrics` (Prometheus text), and with
//! `SHOAL_AUTH=oauth` the protected resource metadata (RFC 9728) at
//! `/.well-known/oauth-protected-resource` and `/.well-known/oauth-protected-resource/mcp`.
//!
//! Before a message reaches rmcp this layer enforces, each with its status and a JSON-RPC error
//! body where the client speaks JSON-RPC: Host and Origin allow-lists (403), authentication
//! (401 with a `WWW-Authenticate` challenge, 403 `insufficient_scope`; [`crate::auth`]), a session
//! used only by the principal that opened it (404 otherwise, as for an unknown session), the
//! cluster-wide quotas (429 with `Retry-After`; [`crate::quota`]), the body size limit
//! (413), a body read timeout (408), JSON syntax (400, -32700), JSON-RPC framing (400, -32600),
//! the replica's session and stream limits (503), and a shared state that is down (503 instead of
//! rmcp's 500). DELETE is handled here entirely, so that a session is only reported deleted once
//! it is gone from the shared state.
//!
//! Rooms: [`guard`] (the checks on Host, Origin and the JSON-RPC envelope), [`observe`] (the HTTP
//! span and request metrics), [`serve`] (the connection loop and graceful shutdown); this module
//! routes and answers.

mod guard;
mod observe;
mod serve;

pub use serve::serve;

use guard::{Envelope, OriginPolicy, is_json, known_version};
use observe::{Finish, ObservedBody, http_span, method_label, route_label};
use shoal_shared::telemetry::attr;

use std::{
    convert::Infallible,
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
use rmcp::{model::ProtocolVersion, transport::streamable_http_server::StreamableHttpService};
use shoal_shared::ids::is_session_id;
use shoal_shared::telemetry::Span;
use tokio::time::Instant;

use crate::{
    auth::{AuthRefusal, Authenticator},
    mcp::{
        error::{STATUS_OVERRIDE, StatusOverride},
        handler::ShoalHandler,
        session::ClusterSessionManager,
    },
    principal::Principal,
    quota::{CallLease, Demand, Lease, Quotas, Refusal},
    state::AppState,
    toolbox::Toolbox,
};

/// Response body type shared with rmcp.
pub type Body = BoxBody<Bytes, Infallible>;

type McpService = StreamableHttpService<ShoalHandler, ClusterSessionManager>;

/// How long a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The replica's HTTP service. Cheap to clone.
#[derive(Clone)]
pub struct HttpService {
    state: Arc<AppState>,
    sessions: Arc<ClusterSessionManager>,
    mcp: McpService,
    policy: Arc<OriginPolicy>,
    auth: Arc<Authenticator>,
    /// The toolsets: the scope each tool needs (checked on `tools/call` before rmcp) and the
    /// resources a `subscriptions/listen` may name (checked before rmcp acknowledges it).
    tools: Arc<Toolbox>,
    /// Cluster-wide quotas, checked after authentication.
    quotas: Arc<Quotas>,
    replica: HeaderValue,
    /// The admin listener's service: /metrics, /healthz and /readyz only, no Host check.
    admin: bool,
    /// Whether the last readiness check passed (its failures are logged once, on the change).
    ready: Arc<AtomicBool>,
    /// The legacy-session request ids pending on this replica.
    pending: Arc<guard::PendingIds>,
}

impl HttpService {
    /// The service over `mcp`, whose session manager is `sessions`, authenticating with `auth`.
    pub fn new(
        state: Arc<AppState>,
        sessions: Arc<ClusterSessionManager>,
        mcp: McpService,
        auth: Arc<Authenticator>,
        tools: Arc<Toolbox>,
        quotas: Arc<Quotas>,
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
            auth,
            tools,
            quotas,
            replica,
            admin: false,
            ready: Arc::new(AtomicBool::new(true)),
            pending: Arc::default(),
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
        let lease = response.extensions_mut().remove::<Lease>();
        let pending = response.extensions_mut().remove::<Arc<guard::PendingId>>();
        let status = response.status().as_u16();
        if span.is_recording() {
            span.set(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status));
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
            _lease: lease,
            _pending: pending,
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
            (
                &Method::GET,
                "/.well-known/oauth-protected-resource"
                | "/.well-known/oauth-protected-resource/mcp",
            ) if !self.admin => self.resource_metadata(),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => Box::pin(self.readyz()).await,
            (&Method::GET, "/metrics")
                if !self.admin && self.state.config.http.admin_listen.is_some() =>
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
        let reason = if let Some(reason) = self.state.readiness_blocker() {
            Some(reason)
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

    /// The protected resource metadata (RFC 9728), when authenticating with OAuth.
    fn resource_metadata(&self) -> Response<Body> {
        let Some(document) = self.auth.resource_metadata() else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "max-age=300")
            // Browser clients (the MCP Inspector) read it from another origin.
            .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
            .body(full(document.to_string()))
            .expect("valid response")
    }

    /// The answer to a request authentication refused: the status, the challenge and an OAuth
    /// error body (RFC 6750 §3). `scope` names what one operation needs (a tool call outside the
    /// caller's grants, so a client may ask for it: step-up authorization); without it the
    /// challenge lists every scope of the server.
    fn refuse(&self, failure: &AuthRefusal, scope: Option<&str>) -> Response<Body> {
        self.state.metrics.auth_failure(failure.reason);
        tracing::info!(
            reason = failure.reason,
            scope,
            "refused request: authentication"
        );
        let (status, challenge) = self.auth.challenge(failure, scope);
        let error = failure.error_code().unwrap_or("unauthorized");
        let mut body =
            serde_json::json!({ "error": error, "error_description": failure.description });
        if let Some(scope) = scope {
            body["scope"] = scope.into();
        }
        let mut response = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body.to_string()))
            .expect("valid response");
        if let Some(challenge) = challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }

    /// Whether `session` belongs to the authenticated caller: `Err` holds the response when it
    /// does not (404, exactly as for an unknown session, so no one learns another's session
    /// exists) or when the shared state cannot say (503).
    async fn check_owner(&self, session: &str, principal: &str) -> Result<(), Response<Body>> {
        match self.sessions.owner(session).await {
            Ok(Some(owner)) if &*owner == principal => Ok(()),
            Ok(owner) => {
                if owner.is_some() {
                    self.state.metrics.auth_failure("foreign_session");
                    tracing::info!("refused request: session of another principal");
                }
                Err(text(
                    StatusCode::NOT_FOUND,
                    "Not Found: Session not found\n",
                ))
            }
            Err(error) => {
                tracing::warn!(%error, "session owner unknown: shared state unavailable");
                Err(self.reject("backend_unavailable", unavailable(None)))
            }
        }
    }

    /// The shared state cannot serve right now: Redis unreachable as far as this replica knows
    /// ([`shoal_shared::backend::Backend::in_trouble`]; the watchdog's failed PINGs count, and
    /// the first operation that succeeds again, such as a `/readyz` PING, clears it).
    fn shared_state_in_trouble(&self) -> bool {
        let in_trouble = self.state.backend.in_trouble();
        if in_trouble {
            tracing::debug!(
                connected = self.state.backend.is_connected(),
                "refused at the door: shared state in trouble"
            );
        }
        in_trouble
    }

    fn reject(&self, reason: &'static str, response: Response<Body>) -> Response<Body> {
        self.state.metrics.http_rejection(reason);
        response
    }

    async fn mcp(&self, mut request: Request<Incoming>, span: &mut Span) -> Response<Body> {
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
        let principal = match self.auth.authenticate(request.headers()).await {
            Ok(principal) => principal,
            Err(failure) => return self.refuse(&failure, None),
        };
        // A principal this replica knows to be over its rate is answered at once: no body read,
        // no lookup, no round trip (the body is dropped unread, and with it the connection).
        if let Some(refusal) = self.quotas.refused_from_memory(&principal) {
            return self.over_quota(&refusal, None);
        }
        if self.auth.is_on()
            && let Some(session) = request
                .headers()
                .get("mcp-session-id")
                .and_then(|value| value.to_str().ok())
            && let Err(refused) = Box::pin(self.check_owner(session, &principal.id)).await
        {
            // An unknown or foreign session (404) cost a lookup: charged to the caller's rate.
            return if refused.status() == StatusCode::NOT_FOUND {
                Box::pin(self.charged(&principal, refused, None)).await
            } else {
                refused
            };
        }
        let name = principal.name.clone();
        request.extensions_mut().insert(principal.clone());
        let response = self.dispatch(request, span, &principal).await;
        if span.is_recording() {
            span.set(attr::ENDUSER_ID, name.to_string());
        }
        response
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        span: &mut Span,
        principal: &Principal,
    ) -> Response<Body> {
        match *request.method() {
            Method::POST => self.post(request, span, principal).await,
            Method::GET => {
                if self.state.streams.is_full() {
                    return self.reject(
                        "streams_full",
                        busy(None, "this replica has too many open streams"),
                    );
                }
                if self.shared_state_in_trouble() {
                    return self.reject("backend_unavailable", unavailable(None));
                }
                let lease = match self.quotas.admit(principal, Demand::Stream).await {
                    Ok(lease) => lease,
                    Err(refusal) => return self.over_quota(&refusal, None),
                };
                let (mut parts, _) = request.into_parts();
                *span = http_span(&mut parts, None);
                let response = span
                    .wrap(self.forward(Request::from_parts(parts, Full::new(Bytes::new())), None))
                    .await;
                with_lease(response, lease)
            }
            Method::DELETE => {
                if let Err(refusal) = self.quotas.admit(principal, Demand::Request).await {
                    return self.over_quota(&refusal, None);
                }
                let (mut parts, _) = request.into_parts();
                *span = http_span(&mut parts, None);
                // Boxed, as is readiness: rare paths whose Redis futures would otherwise make
                // every request's future (moved by hyper) several KB larger.
                span.wrap(Box::pin(self.delete(&parts.headers, principal)))
                    .await
            }
            _ => method_not_allowed("GET, POST, DELETE"),
        }
    }

    /// `refused`, the answer to a request of `principal` refused for its own fault before
    /// admission (an unknown session, a scope it lacks, a malformed or oversized request), after
    /// charging the request to the principal's rate as an admitted one would be: refusals are not
    /// free work. Over its rate, the answer is that 429 instead. When the shared state cannot
    /// charge it, the refusal stands.
    async fn charged(
        &self,
        principal: &Principal,
        refused: Response<Body>,
        id: Option<&serde_json::Value>,
    ) -> Response<Body> {
        match self.quotas.admit(principal, Demand::Request).await {
            Err(refusal @ Refusal::Over { .. }) => self.over_quota(&refusal, id),
            Ok(_) | Err(Refusal::Unavailable) => refused,
        }
    }

    /// The answer to a request over a quota (429 with `Retry-After`), or one the quotas could
    /// not decide (503).
    fn over_quota(&self, refusal: &Refusal, id: Option<&serde_json::Value>) -> Response<Body> {
        match refusal {
            Refusal::Unavailable => self.reject("backend_unavailable", unavailable(id)),
            Refusal::Over { kind, retry_after } => {
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let body = serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": id.unwrap_or(&serde_json::Value::Null),
                    "error": {
                        "code": -32000,
                        "message": refusal.message(),
                        "data": { "quota": kind, "retryAfterSeconds": seconds },
                    },
                });
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::RETRY_AFTER, seconds)
                    .body(full(body.to_string()))
                    .expect("valid response")
            }
        }
    }

    /// A POST, as a sequence of named checks, each of which may answer instead: a body that is
    /// JSON-RPC ([`Self::read_envelope`]), a replica able to take it ([`Self::admissible`]), a
    /// caller allowed to do what it asks ([`Self::authorized`]), its quotas, and for a listen, URIs
    /// it may follow ([`Self::listenable`]); then rmcp answers it.
    async fn post(
        &self,
        request: Request<Incoming>,
        span: &mut Span,
        principal: &Principal,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        // Accept and Content-Type are checked by rmcp (406, 415) before it reads the body: send it
        // nothing to read when they are wrong.
        if !is_json(&parts.headers) {
            return self
                .forward(Request::from_parts(parts, Full::new(Bytes::new())), None)
                .await;
        }
        let (bytes, envelope) = match self.read_envelope(body, principal).await {
            Ok(read) => read,
            Err(refused) => return refused,
        };
        let id = envelope.id.as_ref();
        if let Err(refused) = self.admissible(&envelope, bytes.len(), principal).await {
            return refused;
        }
        let pending = match self.unique_id(&parts.headers, &envelope) {
            Ok(pending) => pending,
            Err(refused) => return self.charged(principal, *refused, id).await,
        };
        if let Err(refused) = self.authorized(&envelope, principal).await {
            return refused;
        }
        let demand = demand_of(&envelope);
        let lease = match self.quotas.admit(principal, demand).await {
            Ok(lease) => lease,
            Err(refusal) => return self.over_quota(&refusal, id),
        };
        if let Err(refused) = self.listenable(&envelope).await {
            return refused;
        }
        if demand == Demand::ToolCall
            && let Some(lease) = &lease
        {
            // The call holds its slot until it ends, whatever becomes of the response.
            parts.extensions.insert(CallLease::new(lease.clone()));
        }
        *span = http_span(&mut parts, envelope.traceparent.as_deref());
        let response = span
            .wrap(self.forward(Request::from_parts(parts, Full::new(bytes)), id))
            .await;
        if demand == Demand::Session
            && let Some(lease) = &lease
            && let Some(session) = response
                .headers()
                .get("mcp-session-id")
                .and_then(|value| value.to_str().ok())
        {
            // Boxed: a rare path (one per session).
            Box::pin(lease.bind_session(session)).await;
        }
        let mut response = with_lease(response, lease);
        if let Some(pending) = pending {
            response.extensions_mut().insert(Arc::new(pending));
        }
        response
    }

    /// A legacy-session request whose id is not pending in its session on this replica holds
    /// the id until its response ends; one whose id is pending is refused (400, -32600) naming
    /// the id, rather than queued behind the other.
    fn unique_id(
        &self,
        headers: &hyper::HeaderMap,
        envelope: &Envelope,
    ) -> Result<Option<guard::PendingId>, Box<Response<Body>>> {
        let (Some(id), Some(session)) = (
            envelope.id.as_ref().filter(|_| envelope.is_request),
            headers
                .get("mcp-session-id")
                .and_then(|value| value.to_str().ok()),
        ) else {
            return Ok(None);
        };
        match self.pending.claim(session, id) {
            Some(pending) => Ok(Some(pending)),
            None => {
                tracing::info!(%id, "rejected request: its id is pending in the session");
                // The error carries no id: one naming it would answer the pending request.
                Err(Box::new(self.reject(
                    "duplicate_request_id",
                    jsonrpc_error(
                        StatusCode::BAD_REQUEST,
                        -32600,
                        &format!(
                            "Invalid Request: request id {id} is already in use by a pending \
                             request of this session (an id must not be reused until its \
                             response has been received)"
                        ),
                    ),
                )))
            }
        }
    }

    /// Reads the body (bounded) and peeks at its JSON-RPC envelope; a body too large or not
    /// JSON-RPC is refused, charged to the caller's rate.
    async fn read_envelope(
        &self,
        body: Incoming,
        principal: &Principal,
    ) -> Result<(Bytes, Envelope), Response<Body>> {
        let bytes = match self.read_body(body).await {
            Ok(bytes) => bytes,
            Err(rejected) => return Err(self.charged(principal, rejected, None).await),
        };
        match Envelope::peek(&bytes) {
            Ok(envelope) => Ok((bytes, envelope)),
            Err((code, message)) => {
                tracing::info!(code, message, "rejected request: malformed JSON-RPC");
                let reason = if code == -32700 {
                    "parse_error"
                } else {
                    "invalid_request"
                };
                let rejected = self.reject(
                    reason,
                    jsonrpc_error(StatusCode::BAD_REQUEST, code, message),
                );
                Err(self.charged(principal, rejected, None).await)
            }
        }
    }

    /// Whether this replica can take the request now: the shared state reachable (else 503 at
    /// the door, failing closed), an initialize within its size bound, a session table with room.
    async fn admissible(
        &self,
        envelope: &Envelope,
        len: usize,
        principal: &Principal,
    ) -> Result<(), Response<Body>> {
        let id = envelope.id.as_ref();
        if self.shared_state_in_trouble() {
            // A call let in now would wait for a Redis command to time out and end in a tool
            // error; a 503 with Retry-After sends the client elsewhere.
            return Err(self.reject("backend_unavailable", unavailable(id)));
        }
        let limit = self.state.config.http.max_initialize_bytes;
        if envelope.is_initialize && len > limit {
            tracing::info!(limit, "rejected request: initialize too large");
            let rejected = self.reject(
                "initialize_too_large",
                jsonrpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    -32602,
                    &format!("initialize request exceeds {limit} bytes"),
                ),
            );
            return Err(self.charged(principal, rejected, id).await);
        }
        if envelope.is_initialize && self.sessions.is_full().await {
            return Err(self.reject(
                "sessions_full",
                busy(id, "this replica holds too many sessions"),
            ));
        }
        Ok(())
    }

    /// Whether the caller's grants cover what it asks: a tool call needs its toolset's scope
    /// (write scope for a writing tool), a listen stream read scope for each resource it follows.
    /// Refusals name the scope and are charged to the caller's rate.
    async fn authorized(
        &self,
        envelope: &Envelope,
        principal: &Principal,
    ) -> Result<(), Response<Body>> {
        let id = envelope.id.as_ref();
        if let Some(tool) = &envelope.tool
            && let Some(scope) = self.tools.scope_lacking_for_call(principal, tool)
        {
            let failure = AuthRefusal::new(
                "insufficient_scope",
                "the call needs a scope the token lacks",
            );
            let refused = self.refuse(&failure, Some(&scope));
            return Err(self.charged(principal, refused, id).await);
        }
        if let Some(toolset) = self
            .tools
            .scope_lacking_for_follow(principal, &envelope.listen_uris)
        {
            let failure = AuthRefusal::new(
                "insufficient_scope",
                "following this resource needs a scope the token lacks",
            );
            let refused = self.refuse(&failure, Some(toolset));
            return Err(self.charged(principal, refused, id).await);
        }
        Ok(())
    }

    /// For a listen: every bound checked before rmcp acknowledges it (the client then believes
    /// it listens), so a listen that will be refused is refused first, naming the URI. Runs after
    /// admission, so the check (a database query for table URIs) is charged like any request.
    async fn listenable(&self, envelope: &Envelope) -> Result<(), Response<Body>> {
        if !envelope.is_listen {
            return Ok(());
        }
        let Err(refusal) = self.check_listen(&envelope.listen_uris).await else {
            return Ok(());
        };
        tracing::info!(
            reason = refusal.reason,
            "refused subscriptions/listen: {}",
            refusal.message
        );
        Err(self.reject(
            "invalid_listen",
            jsonrpc_error_with(
                envelope.id.as_ref(),
                StatusCode::OK,
                -32602,
                &refusal.message,
                refusal.data,
            ),
        ))
    }

    /// Whether a `subscriptions/listen` naming `uris` may be acknowledged: at most
    /// `SHOAL_MAX_LISTEN_URIS` of them, each at most `SHOAL_MAX_URI_BYTES` long and naming a
    /// resource that exists and may be subscribed to (a PostgreSQL table the read role sees).
    async fn check_listen(&self, uris: &[String]) -> Result<(), ListenRefusal> {
        let limits = &self.state.config.sessions;
        if uris.len() > limits.max_listen_uris {
            return Err(ListenRefusal {
                reason: "too_many_uris",
                message: format!(
                    "subscriptions/listen names {} resources; at most {} are accepted",
                    uris.len(),
                    limits.max_listen_uris
                ),
                data: None,
            });
        }
        for uri in uris {
            if uri.len() > limits.max_uri_bytes {
                let error = crate::toolbox::uri_too_long(uri, limits.max_uri_bytes);
                return Err(ListenRefusal::of("uri_too_long", error));
            }
            if !self.tools.catalog.is_subscribable(uri) {
                return Err(ListenRefusal {
                    reason: "unknown_uri",
                    message: format!("no resource {uri} to listen to"),
                    data: Some(serde_json::json!({ "uri": uri })),
                });
            }
        }
        let host = crate::toolbox::ToolHost {
            state: self.state.clone(),
        };
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        self.tools
            .catalog
            .prepare_follow(&host, &uris)
            .await
            .map_err(|error| ListenRefusal::of("unknown_uri", error))
    }

    /// The request body, read within [`BODY_READ_TIMEOUT`] and `SHOAL_MAX_BODY_BYTES`, or the
    /// response that rejects it.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Response<Body>> {
        let limit = self.state.config.http.max_body_bytes;
        let collected =
            tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect()).await;
        match collected {
            Err(_) => Err(self.reject(
                "body_timeout",
                jsonrpc_error(
                    StatusCode::REQUEST_TIMEOUT,
                    -32600,
                    "request body not received in time",
                ),
            )),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
                tracing::info!(limit, "rejected request: body too large");
                Err(self.reject(
                    "body_too_large",
                    jsonrpc_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        -32600,
                        &format!("request body exceeds {limit} bytes"),
                    ),
                ))
            }
            Ok(Err(_)) => Err(self.reject(
                "body_read",
                jsonrpc_error(
                    StatusCode::BAD_REQUEST,
                    -32600,
                    "request body could not be read",
                ),
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    async fn forward(
        &self,
        request: Request<Full<Bytes>>,
        id: Option<&serde_json::Value>,
    ) -> Response<Body> {
        let started = std::time::Instant::now();
        // Boxed: rmcp's request future is ~10 KB, and held inline it would be copied with every
        // future that wraps it here (the span, the routing) and again by hyper.
        let (response, status_override) = STATUS_OVERRIDE
            .scope(std::cell::Cell::new(None), async {
                let response = Box::pin(self.mcp.handle(request)).await;
                (response, STATUS_OVERRIDE.with(std::cell::Cell::get))
            })
            .await;
        if response.status() != StatusCode::INTERNAL_SERVER_ERROR {
            return response;
        }
        match status_override {
            // A response to a server request whose replica died: the request was abandoned
            // with it. Reported to the client (which can drop its pending answer), not dropped.
            Some(StatusOverride::RequesterGone) => self.reject(
                "requester_gone",
                text(
                    StatusCode::GONE,
                    "Gone: the replica that sent the request this answers is gone; the request was abandoned\n",
                ),
            ),
            // rmcp reports a failed session operation as 500; the shared state failed it, which
            // clients should retry.
            Some(StatusOverride::SharedState) => self.reject("backend_unavailable", unavailable(id)),
            None if !self.state.backend.is_connected()
                || self.state.backend.failed_since(started) =>
            {
                self.reject("backend_unavailable", unavailable(id))
            }
            None => response,
        }
    }

    async fn delete(&self, headers: &HeaderMap, principal: &Principal) -> Response<Body> {
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
        match self.sessions.delete(session).await {
            Ok(true) => {
                self.quotas.session_closed(principal, session).await;
                // 204, not the 202 stock rmcp answers: the session is gone everywhere when this is
                // sent, and the official Python SDK accepts only 200 or 204 for a DELETE (it logs
                // "Session termination failed: 202" otherwise).
                empty(StatusCode::NO_CONTENT)
            }
            Ok(false) => text(StatusCode::NOT_FOUND, "Not Found: Session not found\n"),
            Err(error) => {
                tracing::warn!(%error, "DELETE failed: shared state unavailable");
                self.reject("backend_unavailable", unavailable(None))
            }
        }
    }
}

/// `response` holding `lease` until its body ends (see [`HttpService::handle`]).
fn with_lease(mut response: Response<Body>, lease: Option<Lease>) -> Response<Body> {
    if let Some(lease) = lease {
        response.extensions_mut().insert(lease);
    }
    response
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

/// Why a `subscriptions/listen` is refused before rmcp acknowledges it.
struct ListenRefusal {
    reason: &'static str,
    message: String,
    data: Option<serde_json::Value>,
}

impl ListenRefusal {
    /// The refusal carrying `error`'s message and data.
    fn of(reason: &'static str, error: rmcp::ErrorData) -> Self {
        Self {
            reason,
            message: error.message.to_string(),
            data: error.data,
        }
    }
}

/// A JSON-RPC error response. `id` is the request's id when it could be read (errors echo it),
/// otherwise `null` as JSON-RPC prescribes for unreadable requests.
fn jsonrpc_error_for(
    id: Option<&serde_json::Value>,
    status: StatusCode,
    code: i64,
    message: &str,
) -> Response<Body> {
    jsonrpc_error_with(id, status, code, message, None)
}

fn jsonrpc_error_with(
    id: Option<&serde_json::Value>,
    status: StatusCode,
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
) -> Response<Body> {
    let mut error = serde_json::json!({ "code": code, "message": message });
    if let Some(data) = data {
        error["data"] = data;
    }
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(&serde_json::Value::Null),
        "error": error,
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

/// What a request asks of the quotas besides its rate.
fn demand_of(envelope: &Envelope) -> Demand {
    if envelope.tool.is_some() {
        Demand::ToolCall
    } else if envelope.is_listen {
        Demand::Stream
    } else if envelope.is_initialize {
        Demand::Session
    } else {
        Demand::Request
    }
}
