//! The HTTP server span of each request and the request metrics taken when its body ends.

use shoal_shared::telemetry::attr;
use std::convert::Infallible;

use bytes::Bytes;
use http::Method;
use shoal_shared::telemetry::{self, KeyValue, Parent, Span, SpanKind};
use tokio::time::Instant;

use super::Body;
use crate::mcp::trace::HttpTrace;

/// The HTTP server span of an MCP request (`POST /mcp`, ...), child of the trace context the client
/// sent: `params._meta.traceparent` when the message has one, else the `traceparent` header. Its
/// context goes into the request's extensions, where the MCP handler finds its parent.
pub(super) fn http_span(parts: &mut http::request::Parts, meta_traceparent: Option<&str>) -> Span {
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
    let mut session_tag = None;
    let span = Span::start(
        name,
        SpanKind::Server,
        Parent::Context(parent.as_ref()),
        || {
            let mut attributes = vec![
                KeyValue::new(attr::HTTP_REQUEST_METHOD, method),
                KeyValue::new(attr::HTTP_ROUTE, "/mcp"),
                KeyValue::new(attr::URL_PATH, "/mcp"),
                KeyValue::new(attr::URL_SCHEME, "http"),
                KeyValue::new(attr::NETWORK_PROTOCOL_NAME, "http"),
                KeyValue::new(
                    attr::NETWORK_PROTOCOL_VERSION,
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
            session_tag = header("mcp-session-id").and_then(telemetry::session_tag);
            if let Some(tag) = &session_tag {
                attributes.push(KeyValue::new(attr::MCP_SESSION_ID, tag.clone()));
            }
            attributes
        },
    );
    if let Some(context) = span.context() {
        parts.extensions.insert(HttpTrace {
            context: context.clone(),
            session_tag,
        });
    }
    span
}

pub(super) fn method_label(method: &Method) -> &'static str {
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

pub(super) fn route_label(path: &str) -> &'static str {
    match path {
        "/mcp" => "/mcp",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/.well-known/oauth-protected-resource" | "/.well-known/oauth-protected-resource/mcp" => {
            "/.well-known/oauth-protected-resource"
        }
        _ => "other",
    }
}

/// Records the request in the HTTP metrics, and ends its span, when the response body ends or is
/// dropped.
pub(super) struct Finish {
    pub(super) metrics: shoal_shared::metrics::Metrics,
    pub(super) method: &'static str,
    pub(super) route: &'static str,
    pub(super) status: u16,
    pub(super) start: Instant,
    pub(super) _span: Span,
    /// The quota lease of a tool call or stream, given back when the response ends.
    pub(super) _lease: Option<crate::quota::Lease>,
    /// The request id held pending in its legacy session until the response ends.
    pub(super) _pending: Option<std::sync::Arc<super::guard::PendingId>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.metrics
            .http_request(self.method, self.route, self.status, self.start.elapsed());
    }
}

/// A response body that reports its end to [`Finish`].
pub(super) struct ObservedBody {
    pub(super) inner: Body,
    pub(super) finish: Option<Finish>,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        // Done at the end of the body, or with its last frame when the body says so (hyper then
        // writes the end without polling again): what the finish holds (a quota lease, a pending
        // request id) is free before the client can have read the end.
        let ended = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(_)) => self.inner.is_end_stream(),
            std::task::Poll::Pending => false,
        };
        if ended {
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
