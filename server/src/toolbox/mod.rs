//! The toolset interface: all that MCP code and the HTTP layer know of tools, resources and
//! prompts. A [`Toolset`] is a value that supplies its tools (a router over the [`ToolHost`]), their
//! policies, its resources, templates and prompts, which URIs it owns, how to read them, and the
//! background work it starts; the [`Toolbox`] gathers the enabled ones at start. Nothing here, in
//! `mcp` or in `http` names a toolset: the toolsets themselves live in [`crate::tools`], and
//! adding one is a file there and one arm in [`crate::tools::enabled`].

mod access;
pub mod policy;

use std::sync::Arc;

use futures::{FutureExt as _, future::BoxFuture};
use rmcp::{
    ErrorData as McpError,
    handler::server::router::tool::ToolRouter,
    model::{
        CacheScope, CallToolResult, CompleteRequestParams, ContentBlock, GetPromptRequestParams,
        GetPromptResponse, ListResourcesResult, Prompt, ReadResourceResult, Resource,
        ResourceTemplate,
    },
};

use crate::{background::Background, principal::Principal, state::AppState};

/// How long clients may cache lists that only change with a deployment (SEP-2549 `ttlMs`).
const STATIC_TTL_MS: u64 = 5 * 60 * 1000;

/// What tools run on: the replica's shared services. Tools are methods of this type (each
/// toolset's `#[tool_router]` block), not of the MCP handler.
#[derive(Clone)]
pub struct ToolHost {
    /// The services every request shares.
    pub state: Arc<AppState>,
}

impl std::fmt::Debug for ToolHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ToolHost")
    }
}

/// The replica services a toolset uses (the shared result cache and the backend are always there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The PostgreSQL pools (`SHOAL_DATABASE_URL`).
    pub postgres: bool,
    /// The JSON-RPC upstreams (`SHOAL_RPC_*`).
    pub rpc: bool,
}

impl Needs {
    /// What any of `toolsets` needs.
    pub fn of(toolsets: &[Arc<dyn Toolset>]) -> Self {
        toolsets.iter().fold(Self::default(), |all, toolset| {
            let needs = toolset.needs();
            Self {
                postgres: all.postgres || needs.postgres,
                rpc: all.rpc || needs.rpc,
            }
        })
    }
}

/// A page of resources a toolset lists after the fixed ones, with the cursor of the next page.
pub type ResourcePage = (Vec<Resource>, Option<String>);

/// One toolset, enabled by `SHOAL_TOOLSETS`. Everything but its name and tools has a default: a
/// toolset supplies what it has.
pub trait Toolset: Send + Sync + std::fmt::Debug {
    /// Its name in `SHOAL_TOOLSETS`, and its scope (`<name>` for its read-only tools and its
    /// resources, `<name>:write` for the others).
    fn name(&self) -> &'static str;

    /// Its tools.
    fn router(&self) -> ToolRouter<ToolHost>;

    /// The replica services its tools use, connected at start only when some toolset needs them.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    /// Its tools' declared policies (freshness class, timeout, concurrency).
    fn policies(&self) -> Vec<(String, policy::Declared)> {
        Vec::new()
    }

    /// Its fixed resources, listed first by `resources/list`.
    fn resources(&self) -> Vec<Resource> {
        Vec::new()
    }

    /// Its resource templates.
    fn templates(&self) -> Vec<ResourceTemplate> {
        Vec::new()
    }

    /// Its prompts.
    fn prompts(&self) -> Vec<Prompt> {
        Vec::new()
    }

    /// Whether the resource (or template) `uri` is its own: its scope covers it.
    fn owns(&self, _uri: &str) -> bool {
        false
    }

    /// Whether clients may subscribe to (or listen for) its resource `uri`.
    fn subscribable(&self, _uri: &str) -> bool {
        false
    }

    /// `resources/read` of its resource `uri`.
    fn read<'a>(
        &'a self,
        _host: &'a ToolHost,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<ReadResourceResult, McpError>> {
        futures::future::ready(Err(resource_not_found(uri))).boxed()
    }

    /// Resources it lists after every toolset's fixed ones, a page after `cursor`; `None` when it
    /// lists none that way (at most one enabled toolset does).
    fn list_page<'a>(
        &'a self,
        _host: &'a ToolHost,
        _cursor: Option<&'a str>,
    ) -> Option<BoxFuture<'a, Result<ResourcePage, McpError>>> {
        None
    }

    /// Makes its resources `uris` ready to be followed, before a subscription or a listen is
    /// acknowledged (so nothing changed after the acknowledgment goes unnoticed).
    fn prepare_follow<'a>(
        &'a self,
        _host: &'a ToolHost,
        _uris: Vec<&'a str>,
    ) -> BoxFuture<'a, Result<(), McpError>> {
        futures::future::ready(Ok(())).boxed()
    }

    /// `completion/complete` values it offers for `request`.
    fn complete(&self, _request: &CompleteRequestParams) -> Vec<String> {
        Vec::new()
    }

    /// `prompts/get` of one of its prompts (`None` when `request` names none of them).
    fn get_prompt<'a>(
        &'a self,
        _host: &'a ToolHost,
        _request: &'a GetPromptRequestParams,
    ) -> Option<BoxFuture<'a, Result<GetPromptResponse, McpError>>> {
        None
    }

    /// Starts its background work, if any, tracked and stopped by `background`.
    fn start(&self, _host: &ToolHost, _background: &Background) {}
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

/// What the enabled toolsets offer, built once at start and shared by every handler: the tool
/// router, each tool's policy, the grants, and the catalog of resources, templates and prompts.
#[derive(Debug)]
pub struct Toolbox {
    /// Routes `tools/call` and answers `tools/list`.
    pub router: ToolRouter<ToolHost>,
    /// Per-tool cache, timeout and concurrency policies.
    pub policies: policy::Policies,
    /// Resources, templates and prompts.
    pub catalog: Catalog,
    /// What `initialize` announces.
    pub info: rmcp::model::ServerConfig,
    /// The scope each tool needs.
    pub grants: Arc<Grants>,
}

impl Toolbox {
    /// The toolbox of `toolsets`, with the policy overrides of `config`, announcing `info`.
    pub fn new(
        config: &shoal_shared::config::Config,
        toolsets: &[Arc<dyn Toolset>],
        info: rmcp::model::ServerConfig,
    ) -> Self {
        let mut router = ToolRouter::new();
        let mut grants = Grants::new();
        let mut declared = Vec::new();
        for toolset in toolsets {
            let tools = toolset.router();
            grants.extend(tools.list_all().into_iter().map(|tool| {
                let read_only = tool
                    .annotations
                    .as_ref()
                    .and_then(|a| a.read_only_hint)
                    .unwrap_or(false);
                let grant = Grant {
                    toolset: toolset.name(),
                    write: !read_only,
                };
                (tool.name.to_string(), grant)
            }));
            router += tools;
            declared.extend(toolset.policies());
        }
        Self {
            router,
            policies: policy::Policies::new(config, declared),
            catalog: Catalog::new(toolsets),
            info,
            grants: Arc::new(grants),
        }
    }
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

/// Resources, templates and prompts of the enabled toolsets, and which toolset owns what.
#[derive(Debug, Clone)]
pub struct Catalog {
    toolsets: Vec<Arc<dyn Toolset>>,
    /// Fixed resources listed first by `resources/list`.
    pub resources: Vec<Resource>,
    /// Resource templates.
    pub templates: Vec<ResourceTemplate>,
    /// Prompts, with the toolset each belongs to.
    prompts: Vec<(Arc<dyn Toolset>, Prompt)>,
}

impl Catalog {
    /// The catalog of `toolsets`.
    pub fn new(toolsets: &[Arc<dyn Toolset>]) -> Self {
        Catalog {
            toolsets: toolsets.to_vec(),
            resources: toolsets.iter().flat_map(|t| t.resources()).collect(),
            templates: toolsets.iter().flat_map(|t| t.templates()).collect(),
            prompts: toolsets
                .iter()
                .flat_map(|t| t.prompts().into_iter().map(|p| (t.clone(), p)))
                .collect(),
        }
    }

    /// The enabled toolset that owns the resource (or template) `uri`.
    fn owner(&self, uri: &str) -> Option<&Arc<dyn Toolset>> {
        self.toolsets.iter().find(|toolset| toolset.owns(uri))
    }

    /// The toolset whose scope covers the resource (or template) `uri`.
    pub fn toolset_of(&self, uri: &str) -> Option<&'static str> {
        self.owner(uri).map(|toolset| toolset.name())
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
        self.owner(uri)
            .is_some_and(|toolset| toolset.subscribable(uri))
    }

    /// `resources/list`: every toolset's fixed resources `caller` may read, then the paged ones
    /// (the kv keys), whose cursor the toolset defines.
    ///
    /// # Errors
    /// An invalid cursor; the toolset's errors (shared state unavailable).
    pub async fn list_resources(
        &self,
        host: &ToolHost,
        cursor: Option<&str>,
        caller: &Principal,
    ) -> Result<ListResourcesResult, McpError> {
        let mut resources: Vec<Resource> = if cursor.is_none() {
            self.resources
                .iter()
                .filter(|resource| self.may_read(caller, &resource.uri))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut next_cursor = None;
        let paged = self
            .toolsets
            .iter()
            .filter(|toolset| Self::may_use(caller, toolset.name()))
            .find_map(|toolset| toolset.list_page(host, cursor));
        match paged {
            Some(page) => {
                let (more, next) = page.await?;
                resources.extend(more);
                next_cursor = next;
            }
            None if cursor.is_some() => {
                return Err(McpError::invalid_params("invalid cursor", None));
            }
            None => {}
        }
        let mut result = ListResourcesResult::with_all_items(resources);
        result.next_cursor = next_cursor;
        // Paged resources (kv keys) change at any time: clients should not reuse the list.
        result.ttl_ms = Some(0);
        result.cache_scope = Some(scope_for(caller));
        Ok(result)
    }

    /// `resources/read`.
    ///
    /// # Errors
    /// `resource_not_found` for unknown URIs; the toolset's errors.
    pub async fn read(&self, host: &ToolHost, uri: &str) -> Result<ReadResourceResult, McpError> {
        match self.owner(uri) {
            Some(toolset) => toolset.read(host, uri).await,
            None => Err(resource_not_found(uri)),
        }
    }

    /// Makes the resources `uris` ready to be followed, each by its toolset.
    ///
    /// # Errors
    /// The toolsets' errors.
    pub async fn prepare_follow(&self, host: &ToolHost, uris: &[&str]) -> Result<(), McpError> {
        for toolset in &self.toolsets {
            let own: Vec<&str> = uris
                .iter()
                .copied()
                .filter(|uri| toolset.owns(uri))
                .collect();
            if !own.is_empty() {
                toolset.prepare_follow(host, own).await?;
            }
        }
        Ok(())
    }

    /// `completion/complete` values.
    pub fn complete(&self, request: &CompleteRequestParams) -> Vec<String> {
        self.toolsets
            .iter()
            .flat_map(|toolset| toolset.complete(request))
            .collect()
    }

    /// `prompts/get` for `caller`: a prompt outside its grants does not exist for it.
    ///
    /// # Errors
    /// `invalid_params` for unknown prompts or missing arguments.
    pub async fn get_prompt(
        &self,
        host: &ToolHost,
        request: &GetPromptRequestParams,
        caller: &Principal,
    ) -> Result<GetPromptResponse, McpError> {
        let unknown =
            || McpError::invalid_params(format!("unknown prompt: {}", request.name), None);
        let Some((toolset, _)) = self.prompts.iter().find(|(_, p)| p.name == request.name) else {
            return Err(unknown());
        };
        if !Self::may_use(caller, toolset.name()) {
            return Err(unknown());
        }
        toolset.get_prompt(host, request).ok_or_else(unknown)?.await
    }
}

/// A tool's failure the model should see (`isError`), with `message` as its text.
pub fn failed(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
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
