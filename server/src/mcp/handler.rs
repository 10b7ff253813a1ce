//! The MCP handler: one cheap value per session (legacy) or per request (2026-07-28), all state in
//! [`AppState`].
//!
//! Every request method goes through [`ShoalHandler::observe`], the one place that measures MCP
//! requests. Tools come from the enabled toolsets' routers; resources and prompts from
//! [`crate::toolbox::Catalog`]. It names no toolset: tools run on the [`ToolHost`], and
//! everything else a toolset offers is reached through the [`Toolbox`].

#![allow(
    deprecated,
    reason = "logging, subscribe and unsubscribe are legacy-era features still served to legacy clients"
)]

use std::{borrow::Cow, future::Future, sync::Arc, time::Instant};

use futures::{FutureExt as _, future::BoxFuture};

use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    handler::server::tool::ToolCallContext,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams,
        CompleteResult, CompletionInfo, GetPromptRequestParams, GetPromptResponse, Implementation,
        InitializeRequestParams, InitializeResult, ListPromptsResult, ListResourceTemplatesResult,
        ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProtocolVersion,
        ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
        SetLevelRequestParams, SubscribeRequestParams, SubscriptionFilter,
        UnsubscribeRequestParams,
    },
    service::{NotificationContext, RequestContext, SubscriptionContext},
};
use serde_json::Value;
use shoal_shared::{
    backend::SubscribeOutcome,
    cache::{Fill, Source as CacheSource, entry_id, private_partition},
    db::Holder,
};

use shoal_shared::telemetry::Span;

use crate::{
    mcp::{
        error::{During as _, Failure},
        listen::EarlyListeners,
        trace::{self, Target},
    },
    principal::Principal,
    state::AppState,
    toolbox::{
        ToolHost, Toolbox,
        policy::{Scope, ToolPolicy},
        resource_not_found,
    },
};

/// The handler rmcp instantiates per session (legacy) or per request (2026-07-28).
pub struct ShoalHandler {
    pub(crate) state: Arc<AppState>,
    pub(crate) tools: Arc<Toolbox>,
    /// What the tools run on.
    host: ToolHost,
    /// Listeners registered before their acknowledgment (see [`crate::mcp::listen`]).
    pub(crate) early_listeners: EarlyListeners,
}

impl std::fmt::Debug for ShoalHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShoalHandler")
    }
}

/// Whose share of the replica's tool slots and database pools a call counts against: its
/// principal, unless its share is the whole (100 %: no share, as for the anonymous principal of
/// `SHOAL_AUTH=none`, which is every caller at once). A share of the whole is no share at all,
/// not a cap at capacity: its calls wait for a slot or a connection like anyone's.
pub(crate) fn share_holder(context: &RequestContext<RoleServer>) -> Option<Holder> {
    let principal = caller(context);
    (principal.limits.share_percent < 100).then_some(Holder {
        percent: principal.limits.share_percent,
        id: principal.id,
    })
}

/// The authenticated caller of the request behind `context` (put there by the HTTP layer; the
/// anonymous principal when authentication is off).
pub(crate) fn caller(context: &RequestContext<RoleServer>) -> Principal {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .unwrap_or_else(Principal::anonymous)
}

fn tool_error(message: String) -> CallToolResponse {
    CallToolResponse::Complete(crate::toolbox::failed(message))
}

/// The `Mcp-Session-Id` of the HTTP request behind `context`, if any (legacy sessions only).
pub(crate) fn session_id(context: &RequestContext<RoleServer>) -> Option<String> {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.headers.get("mcp-session-id"))
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

impl ShoalHandler {
    /// A handler over the shared services and the enabled toolsets.
    pub fn new(state: Arc<AppState>, tools: Arc<Toolbox>) -> Self {
        Self {
            host: ToolHost {
                state: state.clone(),
            },
            state,
            tools,
            early_listeners: EarlyListeners::default(),
        }
    }

    /// [`Self::observe`] with the request span of `method` on `target`.
    fn observe_request<'a, T: Send + 'a>(
        &'a self,
        method: &'static str,
        target: Target<'_>,
        context: &RequestContext<RoleServer>,
        future: impl Future<Output = Result<T, McpError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, McpError>> {
        self.observe(method, trace::request_span(method, target, context), future)
    }

    /// Measures one request (duration and outcome by method) and traces it in `span` (see
    /// [`trace::request_span`]).
    ///
    /// Returns the work boxed: rmcp spawns one task per request whose future is as large as the
    /// largest of this handler's methods, and moves it several times on the way in. Held inline,
    /// a PostgreSQL read or a Redis call made every request's task 12–50 KB, copied on every move
    /// (docs/architecture.md, "Futures stay small").
    fn observe<'a, T: Send + 'a>(
        &'a self,
        method: &'static str,
        span: Span,
        future: impl Future<Output = Result<T, McpError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, McpError>> {
        async move {
            let start = Instant::now();
            let result = span.wrap(future).await;
            if let Err(error) = &result {
                trace::record_error(&span, error);
            }
            let outcome = if result.is_ok() { "ok" } else { "error" };
            self.state
                .metrics
                .mcp_request(method, outcome, start.elapsed());
            result
        }
        .boxed()
    }

    async fn subscribe_legacy(
        &self,
        uri: &str,
        context: &RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let limit = self.state.config.sessions.max_uri_bytes;
        if uri.len() > limit {
            return Err(crate::toolbox::uri_too_long(uri, limit));
        }
        if !self.tools.catalog.is_subscribable(uri)
            || !self.tools.catalog.may_read(&caller(context), uri)
        {
            return Err(McpError::resource_not_found(
                "no such resource to subscribe to",
                Some(serde_json::json!({ "uri": uri })),
            ));
        }
        let session = session_id(context).ok_or_else(|| {
            McpError::invalid_request("resources/subscribe needs a session", None)
        })?;
        self.tools
            .catalog
            .prepare_follow(&self.host, &[uri])
            .await?;
        match self.state.backend.subscribe(&session, uri).await {
            Ok(SubscribeOutcome::Subscribed) => Ok(()),
            Ok(SubscribeOutcome::SessionGone) => {
                Err(McpError::invalid_request("session not found", None))
            }
            Ok(SubscribeOutcome::TooManySubscribers) => Err(McpError::invalid_request(
                format!(
                    "too many sessions are subscribed to this resource (limit {})",
                    self.state.config.sessions.max_subscribers_per_uri
                ),
                None,
            )),
            Ok(SubscribeOutcome::TooMany) => Err(McpError::invalid_request(
                format!(
                    "too many subscriptions for this session (limit {})",
                    self.state.config.sessions.max_subscriptions_per_session
                ),
                None,
            )),
            Err(cause) => Err(Failure::SharedState {
                operation: "subscribe",
                cause,
            }
            .into()),
        }
    }
}

impl ServerHandler for ShoalHandler {
    fn get_info(&self) -> ServerConfig {
        self.tools.info.clone()
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS)
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        // Replayed on every replica that restores the session (SessionRestoreMarker): it has no
        // side effects besides remembering the client's parameters in this replica's worker.
        self.observe(
            "initialize",
            trace::initialize_span(&context, &request),
            async {
                context.peer.set_peer_info(request.clone());
                self.negotiate_initialize(&request)
            },
        )
        .await
    }

    async fn on_initialized(&self, _context: NotificationContext<RoleServer>) {}

    async fn ping(&self, context: RequestContext<RoleServer>) -> Result<(), McpError> {
        self.observe_request("ping", Target::None, &context, async { Ok(()) })
            .await
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        self.observe_request("tools/list", Target::None, &context, async {
            let caller = caller(&context);
            let tools = self.tools.tools_for(&caller);
            let mut result = ListToolsResult::with_all_items(tools);
            self.tools.catalog.cache_hint_static(
                &mut result.ttl_ms,
                &mut result.cache_scope,
                &caller,
            );
            Ok(result)
        })
        .await
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        self.tools.router.get(name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let start = Instant::now();
        // This call's concurrent-call slot, held until the call returns or is cancelled (see
        // `CallLease`): the quota counts the work, not the HTTP response.
        let _slot = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<crate::quota::CallLease>())
            .and_then(crate::quota::CallLease::take);
        let policy = self.tools.policies.get(&request.name).clone();
        let span = trace::request_span("tools/call", Target::Tool(&request.name), &context);
        let cancelled = context.ct.clone();
        let result = span
            .wrap(self.call_with_policy(&policy, request, context))
            .await;
        let outcome = match &result {
            _ if cancelled.is_cancelled() => "cancelled",
            Ok(CallToolResponse::Complete(done)) if done.is_error == Some(true) => "tool_error",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        match &result {
            Err(error) => trace::record_error(&span, error),
            Ok(_) if outcome != "ok" => span.mark_error(outcome),
            Ok(_) => {}
        }
        self.state
            .metrics
            .tool_call(policy.name, outcome, start.elapsed());
        result
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        self.observe_request("resources/list", Target::None, &context, async {
            let cursor = request.and_then(|r| r.cursor);
            self.tools
                .catalog
                .list_resources(&self.host, cursor.as_deref(), &caller(&context))
                .await
        })
        .await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        self.observe_request("resources/templates/list", Target::None, &context, async {
            let caller = caller(&context);
            let templates = self
                .tools
                .catalog
                .templates
                .iter()
                .filter(|template| self.tools.catalog.may_read(&caller, &template.uri_template))
                .cloned()
                .collect();
            let mut result = ListResourceTemplatesResult::with_all_items(templates);
            self.tools.catalog.cache_hint_static(
                &mut result.ttl_ms,
                &mut result.cache_scope,
                &caller,
            );
            Ok(result)
        })
        .await
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        self.observe_request(
            "resources/read",
            Target::Resource(&request.uri),
            &context,
            async {
                // A resource outside the caller's grants does not exist for it.
                if !self.tools.catalog.may_read(&caller(&context), &request.uri) {
                    return Err(resource_not_found(&request.uri));
                }
                self.tools
                    .catalog
                    .read(&self.host, &request.uri)
                    .await
                    .map(ReadResourceResponse::Complete)
            },
        )
        .await
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.observe_request(
            "resources/subscribe",
            Target::Resource(&request.uri),
            &context,
            self.subscribe_legacy(&request.uri, &context),
        )
        .await
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.observe_request(
            "resources/unsubscribe",
            Target::Resource(&request.uri),
            &context,
            async {
                let session = session_id(&context).ok_or_else(|| {
                    McpError::invalid_request("resources/unsubscribe needs a session", None)
                })?;
                self.state
                    .backend
                    .unsubscribe(&session, &request.uri)
                    .await
                    .during("unsubscribe")
                    .map_err(McpError::from)
            },
        )
        .await
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = requested.clone();
        if let Some(uris) = &mut accepted.resource_subscriptions {
            uris.retain(|uri| self.tools.catalog.is_subscribable(uri));
        }
        self.register_early(requested, &accepted);
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let start = Instant::now();
        let span = trace::request_span(
            "subscriptions/listen",
            Target::None,
            context.request_context(),
        );
        let result = span.wrap(self.run_listener(&context).boxed()).await;
        if let Err(error) = &result {
            trace::record_error(&span, error);
        }
        self.state.metrics.mcp_request(
            "subscriptions/listen",
            if result.is_ok() { "ok" } else { "error" },
            start.elapsed(),
        );
        result
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.observe_request("logging/setLevel", Target::None, &context, async {
            let Some(session) = session_id(&context) else {
                return Ok(());
            };
            let level = serde_json::to_value(request.level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "info".to_owned());
            self.state
                .backend
                .session_set_field(&session, "log", &level)
                .await
                .during("set_level")?;
            Ok(())
        })
        .await
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        self.observe_request("completion/complete", Target::None, &context, async {
            let values = self.tools.catalog.complete(&request);
            let completion = CompletionInfo::with_all_values(values)
                .map_err(|message| Failure::internal("completion values", message))?;
            Ok(CompleteResult::new(completion))
        })
        .await
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        self.observe_request("prompts/list", Target::None, &context, async {
            // A prompt outside the caller's grants does not exist for it.
            let caller = caller(&context);
            let prompts = self.tools.catalog.prompts_for(&caller);
            let mut result = ListPromptsResult::with_all_items(prompts);
            self.tools.catalog.cache_hint_static(
                &mut result.ttl_ms,
                &mut result.cache_scope,
                &caller,
            );
            Ok(result)
        })
        .await
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        self.observe_request(
            "prompts/get",
            Target::Prompt(&request.name),
            &context,
            async {
                self.tools
                    .catalog
                    .get_prompt(&self.host, &request, &caller(&context))
                    .await
            },
        )
        .await
    }
}

impl ShoalHandler {
    /// Request isolation and caching around one tool call: a bounded wait for one of the tool's
    /// concurrency slots, the shared result cache when the tool's freshness class allows it, and
    /// the tool's timeout.
    async fn call_with_policy(
        &self,
        policy: &ToolPolicy,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let _admitted = match self.admit_call(policy, &context).await {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refused),
        };
        let ttl = policy
            .ttl
            .filter(|_| request.input_responses.is_none() && request.request_state.is_none());
        let Some(ttl) = ttl else {
            return self.run_tool(policy, request, context).await;
        };
        self.call_cached(policy, request, context, ttl).await
    }

    /// A call's admission on this replica: within its session's concurrent calls, within its
    /// principal's share of the tool's slots, then one of the slots (waited for, boundedly).
    /// Refused with the tool error the client is told.
    async fn admit_call(
        &self,
        policy: &ToolPolicy,
        context: &RequestContext<RoleServer>,
    ) -> Result<AdmittedCall, CallToolResponse> {
        let limit = self.state.config.sessions.max_calls_per_session;
        let session_call = match session_id(context) {
            Some(session) => match self.state.session_calls.enter(&session, limit) {
                Some(call) => Some(call),
                None => {
                    self.state
                        .metrics
                        .tool_rejected(policy.name, "session_busy");
                    return Err(tool_error(format!(
                        "this session already runs {limit} tool calls on this replica; \
                         wait for one to finish"
                    )));
                }
            },
            None => None,
        };
        // A principal's share of the tool's slots, before it waits for one: past it, refused at
        // once (its own calls will free them), so that another principal always finds a slot.
        let share = match share_holder(context) {
            Some(holder) => {
                let max = shoal_shared::share::share_of(policy.limit, holder.percent);
                match self.state.tool_shares.enter(policy.name, &holder.id, max) {
                    Ok(share) => Some(share),
                    Err(held) => {
                        self.state
                            .metrics
                            .tool_rejected(policy.name, "principal_share");
                        return Err(tool_error(format!(
                            "your calls already hold {held} of this replica's {} slots of {}, your \
                             share (SHOAL_PRINCIPAL_SHARE_PERCENT); retry when one of them ends",
                            policy.limit, policy.name
                        )));
                    }
                }
            }
            None => None,
        };
        let Ok(Ok(slot)) = tokio::time::timeout(
            self.tools.policies.queue_timeout,
            policy.slots.clone().acquire_owned(),
        )
        .await
        else {
            self.state.metrics.tool_rejected(policy.name, "busy");
            return Err(tool_error(format!(
                "{} is busy ({} calls already running on this replica); retry shortly",
                policy.name, policy.limit
            )));
        };
        Ok(AdmittedCall {
            _slot: InFlight::new(slot, &self.state.metrics, policy.name),
            _share: share,
            _session_call: session_call,
        })
    }

    /// A call through the shared result cache: one run per entry across the cluster, tool errors
    /// not stored.
    async fn call_cached(
        &self,
        policy: &ToolPolicy,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
        ttl: std::time::Duration,
    ) -> Result<CallToolResponse, McpError> {
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        let partition = match policy.scope {
            Scope::Public => "public".to_owned(),
            Scope::Private => private_partition(&caller(&context).id),
        };
        let id = entry_id(policy.name, &arguments, &partition);
        let tags = (policy.tags)(&arguments);
        let fill = async {
            match self.run_tool(policy, request, context).await? {
                // Tool errors are not stored, so not serialized.
                CallToolResponse::Complete(result) => Ok::<_, McpError>(Fill {
                    stored: match result.is_error {
                        Some(true) => None,
                        _ => Some(
                            serde_json::to_string(&result)
                                .map_err(|e| Failure::internal("serializing a result", e))?,
                        ),
                    },
                    result,
                }),
                _ => Err(
                    Failure::internal("a cached tool", "returned an intermediate result").into(),
                ),
            }
        };
        // Boxed so that only calls that use the cache carry its (Redis) future: see `observe`.
        let answer = Box::pin(self.state.cache.get_or_fill(&id, ttl, &tags, fill)).await?;
        if answer.source == CacheSource::Hit {
            tracing::trace!(tool = policy.name, "answered from the result cache");
        }
        let result: CallToolResult = answer
            .content
            .into_value(|raw| serde_json::from_str(raw))
            .map_err(|e| Failure::internal("reading a cached result", e))?;
        Ok(CallToolResponse::Complete(result))
    }

    async fn run_tool(
        &self,
        policy: &ToolPolicy,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let call = self
            .tools
            .router
            .call(ToolCallContext::new(&self.host, request, context));
        match tokio::time::timeout(policy.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                self.state.metrics.tool_rejected(policy.name, "timeout");
                Ok(tool_error(format!(
                    "{} did not finish within {} s",
                    policy.name,
                    policy.timeout.as_secs_f64()
                )))
            }
        }
    }
}

/// A held concurrency slot, counted in `shoal_tool_calls_in_flight` while it lives.
/// What an admitted call holds until it ends: its slot of the tool, its principal's share of the
/// slots, its place among its session's calls.
struct AdmittedCall {
    _slot: InFlight,
    _share: Option<shoal_shared::share::Share>,
    _session_call: Option<crate::state::SessionCall>,
}

struct InFlight {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: shoal_shared::metrics::Metrics,
    tool: &'static str,
}

impl InFlight {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        metrics: &shoal_shared::metrics::Metrics,
        tool: &'static str,
    ) -> Self {
        metrics.tool_in_flight(tool, 1);
        Self {
            _permit: permit,
            metrics: metrics.clone(),
            tool,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.tool_in_flight(self.tool, -1);
    }
}

/// The server description announced in `initialize` and `server/discover`.
pub fn server_info() -> ServerConfig {
    let capabilities = ServerCapabilities::builder()
        .enable_tools()
        .enable_tool_list_changed()
        .enable_resources()
        .enable_resources_subscribe()
        .enable_resources_list_changed()
        .enable_prompts()
        .enable_prompts_list_changed()
        .enable_logging()
        .enable_completions()
        .build();
    ServerConfig::new(capabilities)
        .with_server_info(Implementation::new("shoal", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "shoal: a horizontally scaled MCP server. The kv tools share a scratchpad across the whole \
             cluster; subscribe to kv://{key} to be told when a value changes.",
        )
}
