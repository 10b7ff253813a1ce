//! The MCP layer of a trace: one span per request, named `{mcp.method.name} {target}`, child of the
//! HTTP span of the request that carried it; and the spans of cross-replica deliveries, children of
//! the span that published them on the bus.
//!
//! Everything here is a no-op returning `Span::none()` while tracing is off.

use opentelemetry::{Context, trace::TraceContextExt};
use rmcp::{ErrorData as McpError, RoleServer, service::RequestContext};
use shoal_shared::{otel_span, telemetry};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The context of a request's HTTP span, put in the request's `http::request::Parts` extensions
/// by [`crate::http`], where rmcp hands it to the handler (also for a restore replay).
#[derive(Clone, Debug)]
pub struct HttpTrace(pub Context);

/// The span of one MCP request of `method`, parented to its HTTP span.
pub fn request_span(method: &'static str, context: &RequestContext<RoleServer>) -> Span {
    let span = otel_span!(
        "mcp",
        otel.name = method,
        otel.kind = "server",
        mcp.method.name = method,
        mcp.session.id = Empty,
        mcp.protocol.version = Empty,
        jsonrpc.request.id = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.tool.name = Empty,
        gen_ai.prompt.name = Empty,
        mcp.resource.uri = Empty,
        error.type = Empty,
        rpc.response.status_code = Empty,
        shoal.session.restored = Empty,
        shoal.cache.outcome = Empty,
    );
    if span.is_none() {
        return span;
    }
    let parts = context.extensions.get::<http::request::Parts>();
    if let Some(parent) = parts.and_then(|parts| parts.extensions.get::<HttpTrace>()) {
        let _ = span.set_parent(parent.0.clone());
    }
    if let Some(parts) = parts {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(session) = header("mcp-session-id") {
            span.record("mcp.session.id", session);
        }
        if let Some(version) = header("mcp-protocol-version") {
            span.record("mcp.protocol.version", version);
        }
    }
    span.record("jsonrpc.request.id", context.id.to_string());
    span
}

/// The span of a request on the resource `uri` (`mcp.resource.uri`).
pub fn resource_span(
    method: &'static str,
    context: &RequestContext<RoleServer>,
    uri: &str,
) -> Span {
    let span = request_span(method, context);
    if !span.is_none() {
        span.record("mcp.resource.uri", uri);
    }
    span
}

/// The span of `prompts/get` for the prompt `name`.
pub fn prompt_span(context: &RequestContext<RoleServer>, name: &str) -> Span {
    let span = request_span("prompts/get", context);
    record_target(&span, "prompts/get", "gen_ai.prompt.name", name);
    span
}

/// The span of `initialize`: the client's handshake, or its replay on a replica restoring the
/// session (`shoal.session.restored`).
pub fn initialize_span(
    context: &RequestContext<RoleServer>,
    request: &rmcp::model::InitializeRequestParams,
) -> Span {
    let span = request_span("initialize", context);
    if !span.is_none() {
        let restored = context
            .extensions
            .get::<rmcp::transport::streamable_http_server::session::SessionRestoreMarker>()
            .is_some();
        span.record("shoal.session.restored", restored);
        span.record("mcp.protocol.version", request.protocol_version.as_str());
    }
    span
}

/// Names the span after the request's target, e.g. `tools/call kv_get`, and records it under `key`
/// (`gen_ai.tool.name`, `gen_ai.prompt.name`).
pub fn record_target(span: &Span, method: &'static str, key: &'static str, target: &str) {
    if span.is_none() {
        return;
    }
    span.record("otel.name", format!("{method} {target}"));
    span.record(key, target);
}

/// Marks the span of a failed request with the JSON-RPC error code.
pub fn record_error(span: &Span, error: &McpError) {
    if span.is_none() {
        return;
    }
    let code = error.code.0;
    span.record("rpc.response.status_code", code);
    telemetry::mark_error(span, &code.to_string());
}

/// The span of a message another replica published on the bus and this one delivers: a
/// notification to a client stream, a forwarded response, a cancellation. `traceparent` is the
/// publishing span's, so the delivery joins the trace that caused it.
pub fn delivery_span(
    name: &'static str,
    method: &'static str,
    session: Option<&str>,
    traceparent: Option<&str>,
) -> Span {
    let Some(traceparent) = traceparent else {
        return Span::none();
    };
    let span = otel_span!(
        "deliver",
        otel.name = name,
        otel.kind = "producer",
        mcp.method.name = method,
        mcp.session.id = Empty,
        mcp.resource.uri = Empty,
    );
    if span.is_none() {
        return span;
    }
    if let Some(parent) = telemetry::context_from_traceparent(traceparent, None) {
        let link = parent.span().span_context().clone();
        let _ = span.set_parent(parent);
        // Also a link, for backends that show cross-trace relations only as links.
        span.add_link(link);
    }
    if let Some(session) = session {
        span.record("mcp.session.id", session);
    }
    span
}

/// The `params._meta.traceparent` of a serialized JSON-RPC message, if any.
pub fn traceparent_in(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Message {
        params: Option<Params>,
    }
    #[derive(serde::Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<Meta>,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        traceparent: Option<String>,
    }
    serde_json::from_str::<Message>(payload)
        .ok()?
        .params?
        .meta?
        .traceparent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_found_in_payloads() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let payload = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{{"uri":"kv://a","_meta":{{"traceparent":"{tp}"}}}}}}"#
        );
        assert_eq!(traceparent_in(&payload).as_deref(), Some(tp));
        assert_eq!(
            traceparent_in(r#"{"jsonrpc":"2.0","method":"x","params":{"uri":"kv://a"}}"#),
            None
        );
        assert_eq!(traceparent_in("not json"), None);
    }
}
