//! Toolsets: groups of tools, resources and prompts enabled by `SHOAL_TOOLSETS`.
//!
//! Each toolset lives in a module of its own and contributes a tool router (tools are methods of
//! [`ShoalHandler`]) plus resources, templates and prompts to the [`Catalog`].

pub mod compute;
pub mod conformance;
pub mod kv;
pub mod mrtr;
pub mod policy;
pub mod postgres;
pub mod rpc;

use rmcp::{
    ErrorData as McpError,
    handler::server::router::tool::ToolRouter,
    model::{
        CacheScope, CompleteRequestParams, GetPromptRequestParams, GetPromptResult,
        ListResourcesResult, Prompt, ReadResourceResult, Resource, ResourceTemplate,
    },
};

use crate::{
    mcp::{error::During as _, handler::ShoalHandler},
    principal::Principal,
    state::AppState,
};

/// The toolsets this build knows.
pub const KNOWN_TOOLSETS: [&str; 5] = ["kv", "postgres", "rpc", "compute", "conformance"];

/// How long clients may cache lists that only change with a deployment (SEP-2549 `ttlMs`).
const STATIC_TTL_MS: u64 = 5 * 60 * 1000;
/// Page size of `resources/list`.
const PAGE_SIZE: u64 = 100;

/// Which toolsets are enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Toolsets {
    /// The kv scratchpad.
    pub kv: bool,
    /// PostgreSQL (only with `SHOAL_DATABASE_URL`).
    pub postgres: bool,
    /// The PostgreSQL write tool.
    pub postgres_writes: bool,
    /// JSON-RPC upstreams (only with `SHOAL_RPC_ENDPOINTS`).
    pub rpc: bool,
    /// CPU-bound tools.
    pub compute: bool,
    /// The conformance-suite fixtures.
    pub conformance: bool,
}

impl Toolsets {
    /// The names of the enabled toolsets.
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("kv", self.kv),
            ("postgres", self.postgres),
            ("rpc", self.rpc),
            ("compute", self.compute),
            ("conformance", self.conformance),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }

    /// Parses `SHOAL_TOOLSETS`; toolsets whose backend is not configured stay off (logged).
    ///
    /// # Errors
    /// Names an unknown toolset.
    pub fn parse(config: &shoal_shared::config::Config) -> Result<Self, String> {
        let mut toolsets = Toolsets::default();
        for name in &config.tools.toolsets {
            match name.as_str() {
                "kv" => toolsets.kv = true,
                "conformance" => toolsets.conformance = true,
                "compute" => toolsets.compute = true,
                "postgres" if config.postgres.url.is_some() => {
                    toolsets.postgres = true;
                    toolsets.postgres_writes = config.postgres.allow_writes;
                    if config.postgres.allow_writes && config.postgres.write_url.is_none() {
                        return Err("SHOAL_POSTGRES_ALLOW_WRITES=true needs SHOAL_DATABASE_WRITE_URL: \
                                    pg_execute runs as a database role of its own (docs/security.md)"
                            .into());
                    }
                }
                "postgres" => {
                    tracing::info!("toolset postgres is off: SHOAL_DATABASE_URL is not set")
                }
                "rpc" if !config.rpc.endpoints.is_empty() => toolsets.rpc = true,
                "rpc" => tracing::info!("toolset rpc is off: SHOAL_RPC_ENDPOINTS is empty"),
                other => {
                    return Err(format!(
                        "unknown toolset {other:?} in SHOAL_TOOLSETS (known: {})",
                        KNOWN_TOOLSETS.join(", ")
                    ));
                }
            }
        }
        Ok(toolsets)
    }

    /// The tool router of every enabled toolset.
    pub fn tool_router(&self) -> ToolRouter<ShoalHandler> {
        self.routers()
            .into_iter()
            .fold(ToolRouter::new(), |mut all, (_, router)| {
                all += router;
                all
            })
    }

    /// The tools of each enabled toolset, by toolset name.
    fn routers(&self) -> Vec<(&'static str, ToolRouter<ShoalHandler>)> {
        let mut routers = Vec::new();
        if self.kv {
            routers.push(("kv", ShoalHandler::kv_tools()));
        }
        if self.postgres {
            let mut router = ShoalHandler::postgres_tools();
            if self.postgres_writes {
                router += ShoalHandler::postgres_write_tools();
            }
            routers.push(("postgres", router));
        }
        if self.rpc {
            routers.push(("rpc", ShoalHandler::rpc_tools()));
        }
        if self.compute {
            routers.push(("compute", ShoalHandler::compute_tools()));
        }
        if self.conformance {
            let mut router = ShoalHandler::conformance_tools();
            router += ShoalHandler::mrtr_tools();
            router.add_route(conformance::json_schema_tool());
            router.add_route(conformance::custom_header_tool());
            routers.push(("conformance", router));
        }
        routers
    }

    /// What calling each tool takes: its toolset's scope, with `:write` unless the tool is
    /// declared read-only.
    pub fn grants(&self) -> Grants {
        self.routers()
            .into_iter()
            .flat_map(|(toolset, router)| {
                router.list_all().into_iter().map(move |tool| {
                    let read_only = tool
                        .annotations
                        .as_ref()
                        .and_then(|a| a.read_only_hint)
                        .unwrap_or(false);
                    (
                        tool.name.to_string(),
                        Grant {
                            toolset,
                            write: !read_only,
                        },
                    )
                })
            })
            .collect()
    }
}

/// The scope a tool needs: `<toolset>` for a read-only tool, `<toolset>:write` for any other
/// (`*` grants both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The toolset the tool belongs to.
    pub toolset: &'static str,
    /// Whether the tool changes anything (not declared `readOnlyHint`).
    pub write: bool,
}

impl Grant {
    /// The scope that grants it.
    pub fn scope(&self) -> String {
        if self.write {
            format!("{}:write", self.toolset)
        } else {
            self.toolset.to_owned()
        }
    }
}

/// Each tool's [`Grant`], by tool name.
pub type Grants = std::collections::HashMap<String, Grant>;

/// The toolset whose scope covers the resource (or template) `uri`.
pub fn toolset_of(uri: &str) -> Option<&'static str> {
    if uri.starts_with(kv::SCHEME) {
        Some("kv")
    } else if uri.starts_with("postgres://") {
        Some("postgres")
    } else if uri.starts_with("test://") {
        Some("conformance")
    } else {
        None
    }
}

/// What the enabled toolsets offer, built once at start and shared by every handler: the tool
/// router, each tool's policy and the catalog of resources, templates and prompts.
#[derive(Debug)]
pub struct Toolbox {
    /// Routes `tools/call` and answers `tools/list`.
    pub router: ToolRouter<ShoalHandler>,
    /// Per-tool cache, timeout and concurrency policies.
    pub policies: policy::Policies,
    /// Resources, templates and prompts.
    pub catalog: Catalog,
    /// What `initialize` announces.
    pub info: rmcp::model::ServerConfig,
    /// The scope each tool needs.
    pub grants: std::sync::Arc<Grants>,
}

impl Toolbox {
    /// The toolbox of `toolsets`, with the policy overrides of `config`.
    pub fn new(config: &shoal_shared::config::Config, toolsets: Toolsets) -> Self {
        Self {
            router: toolsets.tool_router(),
            policies: policy::Policies::new(config, declared_policies(&toolsets)),
            catalog: Catalog::new(toolsets),
            info: crate::mcp::handler::server_info(),
            grants: std::sync::Arc::new(toolsets.grants()),
        }
    }
}

/// The declared policies of every tool of the enabled toolsets.
pub fn declared_policies(toolsets: &Toolsets) -> Vec<(String, policy::Declared)> {
    let mut declared = Vec::new();
    if toolsets.kv {
        declared.extend(kv::policies());
    }
    if toolsets.postgres {
        declared.extend(postgres::policies());
    }
    if toolsets.rpc {
        declared.extend(rpc::policies());
    }
    if toolsets.compute {
        declared.extend(compute::policies());
    }
    declared
}

/// Whether `caller` may read (list, read, subscribe to) the resource `uri`.
pub fn may_read(caller: &Principal, uri: &str) -> bool {
    toolset_of(uri).is_some_and(|toolset| caller.may(toolset, false)) || caller.is_unrestricted()
}

/// The cache scope of a list shown to `caller`: public when it sees everything, else private (its
/// grants filtered it).
fn scope_for(caller: &Principal) -> CacheScope {
    if caller.is_unrestricted() {
        CacheScope::Public
    } else {
        CacheScope::Private
    }
}

/// Resources, templates and prompts of the enabled toolsets.
#[derive(Debug, Clone)]
pub struct Catalog {
    toolsets: Toolsets,
    /// Fixed resources listed first by `resources/list`.
    pub resources: Vec<Resource>,
    /// Resource templates.
    pub templates: Vec<ResourceTemplate>,
    /// Prompts.
    pub prompts: Vec<Prompt>,
}

impl Catalog {
    /// The catalog of `toolsets`.
    pub fn new(toolsets: Toolsets) -> Self {
        let mut catalog = Catalog {
            toolsets,
            resources: Vec::new(),
            templates: Vec::new(),
            prompts: Vec::new(),
        };
        if toolsets.kv {
            catalog.templates.push(kv::template());
        }
        if toolsets.postgres {
            catalog.resources.extend(postgres::resources());
            catalog.templates.extend(postgres::templates());
        }
        if toolsets.conformance {
            catalog.resources.extend(conformance::resources());
            catalog.templates.extend(conformance::templates());
            catalog.prompts.extend(conformance::prompts());
        }
        catalog
    }

    /// Sets the cache hints of results that only change with a deployment (and, for a caller
    /// whose grants filter them, are its own: `private`).
    pub fn cache_hint_static(
        &self,
        ttl_ms: &mut Option<u64>,
        scope: &mut Option<CacheScope>,
        caller: &Principal,
    ) {
        *ttl_ms = Some(STATIC_TTL_MS);
        *scope = Some(scope_for(caller));
    }

    /// Whether `uri` names a resource clients may subscribe to.
    pub fn is_subscribable(&self, uri: &str) -> bool {
        (self.toolsets.kv && kv::key_of(uri).is_some())
            || (self.toolsets.postgres && postgres::is_resource(uri))
            || (self.toolsets.conformance && conformance::is_resource(uri))
    }

    /// `resources/list`: the fixed resources, then kv keys in byte order, paginated. The cursor is
    /// the last kv key of the previous page.
    ///
    /// # Errors
    /// Fails when the shared state is unavailable.
    pub async fn list_resources(
        &self,
        state: &AppState,
        cursor: Option<&str>,
        caller: &Principal,
    ) -> Result<ListResourcesResult, McpError> {
        let mut resources = if cursor.is_none() {
            self.resources
                .iter()
                .filter(|resource| may_read(caller, &resource.uri))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut next_cursor = None;
        if self.toolsets.kv && caller.may("kv", false) {
            let after = match cursor {
                Some(cursor) => Some(
                    kv::decode_cursor(cursor)
                        .ok_or_else(|| McpError::invalid_params("invalid cursor", None))?,
                ),
                None => None,
            };
            let keys = state
                .backend
                .kv_list(after.as_deref(), PAGE_SIZE)
                .await
                .during("kv_list")?;
            if keys.len() as u64 == PAGE_SIZE {
                next_cursor = keys.last().map(|key| kv::encode_cursor(key));
            }
            resources.extend(keys.iter().map(|key| kv::resource(key)));
        } else if cursor.is_some() {
            return Err(McpError::invalid_params("invalid cursor", None));
        }
        let mut result = ListResourcesResult::with_all_items(resources);
        result.next_cursor = next_cursor;
        // The kv keys change at any time: clients should not reuse the list.
        result.ttl_ms = Some(0);
        result.cache_scope = Some(scope_for(caller));
        Ok(result)
    }

    /// `resources/read`.
    ///
    /// # Errors
    /// `resource_not_found` for unknown URIs; internal errors when shared state is unavailable.
    pub async fn read(
        &self,
        state: &std::sync::Arc<AppState>,
        uri: &str,
    ) -> Result<ReadResourceResult, McpError> {
        if self.toolsets.kv
            && let Some(key) = kv::key_of(uri)
        {
            return kv::read(state, uri, key).await;
        }
        if self.toolsets.postgres && postgres::is_resource(uri) {
            return postgres::read(state, uri).await;
        }
        if self.toolsets.conformance
            && let Some(result) = conformance::read(uri)
        {
            return Ok(result);
        }
        Err(resource_not_found(uri))
    }

    /// `completion/complete` values.
    pub fn complete(&self, request: &CompleteRequestParams) -> Vec<String> {
        if self.toolsets.conformance {
            conformance::complete(request)
        } else {
            Vec::new()
        }
    }

    /// Whether `prompts/get` of `name` is a multi round-trip prompt served by the handler.
    pub fn is_input_required_prompt(&self, name: &str) -> bool {
        self.toolsets.conformance && name == conformance::INPUT_REQUIRED_PROMPT
    }

    /// `prompts/get`.
    ///
    /// # Errors
    /// `invalid_params` for unknown prompts or missing arguments.
    pub fn get_prompt(
        &self,
        request: &GetPromptRequestParams,
    ) -> Result<GetPromptResult, McpError> {
        let mut result = if self.toolsets.conformance {
            conformance::get_prompt(request)?
        } else {
            return Err(McpError::invalid_params(
                format!("unknown prompt: {}", request.name),
                None,
            ));
        };
        result.result_type = Some(rmcp::model::ResultType::COMPLETE);
        Ok(result)
    }
}

/// The refusal of a resource URI over `limit` bytes (`SHOAL_MAX_URI_BYTES`), naming its start.
pub fn uri_too_long(uri: &str, limit: usize) -> McpError {
    let shown: String = uri.chars().take(64).collect();
    McpError::invalid_params(
        format!("the resource URI {shown}… is longer than {limit} bytes"),
        Some(serde_json::json!({ "uri": shown })),
    )
}

/// The error for a resource that does not exist (SEP-2164: `-32602` with the URI in `data`).
pub fn resource_not_found(uri: &str) -> McpError {
    McpError::resource_not_found(
        "resource not found",
        Some(serde_json::json!({ "uri": uri })),
    )
}

/// A tool's failure the model should see (`isError`), with `message` as its text.
pub(crate) fn failed(message: impl Into<String>) -> rmcp::model::CallToolResult {
    rmcp::model::CallToolResult::error(vec![rmcp::model::ContentBlock::text(message.into())])
}

/// Deserializes a model value from JSON built in code (static fixtures).
pub(crate) fn model<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("static model value matches its schema")
}

/// The `notifications/resources/updated` message for `uri`, as logged for legacy sessions. While
/// tracing, `params._meta.traceparent` names the span that raised it, so the replica that delivers
/// it (and the client) can link the delivery to the change.
pub(crate) fn updated_notification(uri: &str) -> String {
    let mut params = serde_json::json!({ "uri": uri });
    if let Some(traceparent) = shoal_shared::telemetry::current_traceparent() {
        params["_meta"] = serde_json::json!({ "traceparent": traceparent });
    }
    serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/resources/updated",
        "params": params,
    })
    .to_string()
}
