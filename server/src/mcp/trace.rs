//! The MCP layer of a trace: one span per request, named `{mcp.method.name} {target}`, child of the
//! HTTP span of the request that carried it; and the spans of cross-replica deliveries, children of
//! the span that published them on the bus.
//!
//! Everything here returns [`Span::none`] while tracing is off, before computing anything.

use rmcp::{
    ErrorData as McpError, RoleServer,
    model::{
        Notification, NotificationMetaObject, ResourceUpdatedNotificationParam,
        ServerJsonRpcMessage, ServerNotification,
    },
    service::RequestContext,
};
use shoal_shared::telemetry::attr;
use shoal_shared::telemetry::{self, Context, KeyValue, Parent, Span, SpanKind};

/// The context of a request's HTTP span, put in the request's `http::request::Parts` extensions
/// by [`crate::http`], where rmcp hands it to the handler (also for a restore replay).
#[derive(Clone, Debug)]
pub struct HttpTrace {
    /// The HTTP span's context: the parent of the MCP request span.
    pub context: Context,
    /// The session's tag ([`telemetry::session_tag`]) computed for the HTTP span, reused by the
    /// MCP span instead of hashing the session id again.
    pub session_tag: Option<String>,
}

/// What an MCP request is about, for its span's name and attributes.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Nothing in particular.
    None,
    /// A tool (`tools/call`).
    Tool(&'a str),
    /// A prompt (`prompts/get`).
    Prompt(&'a str),
    /// A resource URI.
    Resource(&'a str),
}

/// The span of one MCP request of `method`, named `{method} {target}`, child of its HTTP span.
pub fn request_span(
    method: &'static str,
    target: Target<'_>,
    context: &RequestContext<RoleServer>,
) -> Span {
    if !telemetry::tracing_enabled() {
        return Span::none();
    }
    let parts = context.extensions.get::<http::request::Parts>();
    let http = parts.and_then(|parts| parts.extensions.get::<HttpTrace>());
    let parent = http.map(|trace| &trace.context);
    let name = match target {
        Target::Tool(name) | Target::Prompt(name) => format!("{method} {name}"),
        Target::None | Target::Resource(_) => method.to_owned(),
    };
    Span::start(name, SpanKind::Server, Parent::Context(parent), || {
        let mut attributes = Vec::with_capacity(8);
        attributes.push(KeyValue::new(attr::MCP_METHOD_NAME, method));
        attributes.push(KeyValue::new(
            attr::JSONRPC_REQUEST_ID,
            context.id.to_string(),
        ));
        if let Some(parts) = parts {
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            let tag = match http {
                Some(http) => http.session_tag.clone(),
                None => header("mcp-session-id").and_then(telemetry::session_tag),
            };
            if let Some(tag) = tag {
                attributes.push(KeyValue::new(attr::MCP_SESSION_ID, tag));
            }
            if let Some(version) = header("mcp-protocol-version") {
                attributes.push(KeyValue::new(
                    attr::MCP_PROTOCOL_VERSION,
                    version.to_owned(),
                ));
            }
        }
        match target {
            Target::Tool(name) => {
                attributes.push(KeyValue::new(attr::GEN_AI_TOOL_NAME, name.to_owned()));
                attributes.push(KeyValue::new(attr::GEN_AI_OPERATION_NAME, "execute_tool"));
            }
            Target::Prompt(name) => {
                attributes.push(KeyValue::new(attr::GEN_AI_PROMPT_NAME, name.to_owned()));
            }
            Target::Resource(uri) => {
                attributes.push(KeyValue::new(attr::MCP_RESOURCE_URI, uri.to_owned()));
            }
            Target::None => {}
        }
        attributes
    })
}

/// The span of `initialize`: the client's handshake, or its replay on a replica restoring the
/// session (`shoal.session.restored`).
pub fn initialize_span(
    context: &RequestContext<RoleServer>,
    request: &rmcp::model::InitializeRequestParams,
) -> Span {
    let span = request_span("initialize", Target::None, context);
    if span.is_recording() {
        let restored = context
            .extensions
            .get::<rmcp::transport::streamable_http_server::session::SessionRestoreMarker>()
            .is_some();
        span.set(attr::SHOAL_SESSION_RESTORED, restored);
        if context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.headers.get("mcp-protocol-version"))
            .is_none()
        {
            span.set(
                attr::MCP_PROTOCOL_VERSION,
                request.protocol_version.as_str().to_owned(),
            );
        }
    }
    span
}

/// Marks the span of a failed request with the JSON-RPC error code.
pub fn record_error(span: &Span, error: &McpError) {
    if span.is_recording() {
        let code = error.code.0;
        span.set(attr::RPC_RESPONSE_STATUS_CODE, i64::from(code));
        span.mark_error(&code.to_string());
    }
}

/// The span of a message another replica published on the bus and this one delivers: a
/// notification to a client stream, a forwarded response, a cancellation. `traceparent` is the
/// publishing span's, so the delivery joins the trace that caused it (as a child, and linked).
pub fn delivery_span(
    name: &'static str,
    method: &'static str,
    session: Option<&str>,
    uri: Option<&str>,
    traceparent: Option<&str>,
) -> Span {
    if !telemetry::tracing_enabled() {
        return Span::none();
    }
    let Some(parent) = traceparent.and_then(|tp| telemetry::context_from_traceparent(tp, None))
    else {
        return Span::none();
    };
    Span::start_linked(
        name,
        SpanKind::Producer,
        Parent::Context(Some(&parent)),
        Some(&parent),
        || {
            let mut attributes = vec![KeyValue::new(attr::MCP_METHOD_NAME, method)];
            if let Some(tag) = session.and_then(telemetry::session_tag) {
                attributes.push(KeyValue::new(attr::MCP_SESSION_ID, tag));
            }
            if let Some(uri) = uri {
                attributes.push(KeyValue::new(attr::MCP_RESOURCE_URI, uri.to_owned()));
            }
            attributes
        },
    )
}

/// The `notifications/resources/updated` message for `uri`, as logged for legacy sessions, typed.
/// While tracing, `params._meta.traceparent` names the span that raised it, so the replica that
/// delivers it (and the client) can link the delivery to the change.
pub fn updated_message(uri: &str, traceparent: Option<String>) -> ServerJsonRpcMessage {
    let mut notification = Notification::new(ResourceUpdatedNotificationParam::new(uri));
    if let Some(traceparent) = traceparent {
        // Where rmcp keeps a notification's `_meta` (and puts it when it reads one).
        let mut meta = NotificationMetaObject::new();
        meta.0.set_traceparent(traceparent);
        notification.extensions.insert(meta);
    }
    ServerJsonRpcMessage::notification(ServerNotification::ResourceUpdatedNotification(
        notification,
    ))
}

/// The URI and the `params._meta.traceparent` of a `notifications/resources/updated` message that
/// carries one (the only logged message that names the span that raised it).
pub fn traced_update(message: &ServerJsonRpcMessage) -> Option<(&str, &str)> {
    let ServerJsonRpcMessage::Notification(notification) = message else {
        return None;
    };
    let ServerNotification::ResourceUpdatedNotification(updated) = &notification.notification
    else {
        return None;
    };
    let meta = updated.extensions.get::<NotificationMetaObject>()?;
    Some((updated.params.uri.as_str(), meta.get_traceparent()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_carries_its_traceparent_through_the_log() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let logged =
            serde_json::to_string(&updated_message("kv://a", Some(tp.into()))).expect("json");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&logged).expect("json"),
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/resources/updated",
                "params": {"uri": "kv://a", "_meta": {"traceparent": tp}}})
        );
        let read: ServerJsonRpcMessage = serde_json::from_str(&logged).expect("json");
        assert_eq!(traced_update(&read), Some(("kv://a", tp)));
        let untraced = serde_json::to_string(&updated_message("kv://a", None)).expect("json");
        assert_eq!(
            traced_update(&serde_json::from_str(&untraced).expect("json")),
            None
        );
    }
}
