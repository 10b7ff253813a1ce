//! Toolset `kv`: a small scratchpad shared by the whole cluster, which doubles as the cluster's own
//! test surface (cross-replica notifications, cancellation, progress).
//!
//! - `kv_set {key, value}` stores a value and notifies every subscriber of `kv://{key}`, on every
//!   replica, in both protocol eras.
//! - `kv_get {key}` returns the value (an `isError` result when the key is missing).
//! - `kv_delete {key}` removes a key (and notifies subscribers).
//! - `echo {text}` returns the text (the trivial tool of the benchmarks).
//! - `sleep {ms}` waits, reports progress about every second when asked to, and stops promptly when
//!   cancelled.
//! - Resource template `kv://{key}` (text/plain), subscribable.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rmcp::{
    ErrorData as McpError, RoleServer,
    handler::server::wrapper::Parameters,
    model::{
        CacheScope, CallToolResult, ContentBlock, ProgressNotificationParam, ReadResourceResult,
        Resource, ResourceContents, ResourceTemplate,
    },
    service::RequestContext,
    tool, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use shoal_shared::backend::{KvSetOutcome, ResourceChange};

use futures::{FutureExt as _, future::BoxFuture};

use crate::{
    mcp::error::{During as _, Failure},
    state::AppState,
    toolbox::{ResourcePage, ToolHost, Toolset, failed, policy::Declared},
    tools::model,
};

/// Page size of `resources/list` (the kv keys after the fixed resources).
const PAGE_SIZE: u64 = 100;

/// The toolset.
#[derive(Debug)]
pub struct Kv;

impl Toolset for Kv {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        ToolHost::kv_tools()
    }

    fn policies(&self) -> Vec<(String, Declared)> {
        policies()
    }

    fn templates(&self) -> Vec<ResourceTemplate> {
        vec![template()]
    }

    fn owns(&self, uri: &str) -> bool {
        uri.starts_with(SCHEME)
    }

    fn subscribable(&self, uri: &str) -> bool {
        key_of(uri).is_some()
    }

    fn read<'a>(
        &'a self,
        host: &'a ToolHost,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<ReadResourceResult, McpError>> {
        async move {
            match key_of(uri) {
                Some(key) => read(&host.state, uri, key).await,
                None => Err(crate::toolbox::resource_not_found(uri)),
            }
        }
        .boxed()
    }

    fn list_page<'a>(
        &'a self,
        host: &'a ToolHost,
        cursor: Option<&'a str>,
    ) -> Option<BoxFuture<'a, Result<ResourcePage, McpError>>> {
        Some(async move { list_page(&host.state, cursor).await }.boxed())
    }
}

/// The kv keys after the cursor (the last key of the previous page), as resources.
async fn list_page(state: &AppState, cursor: Option<&str>) -> Result<ResourcePage, McpError> {
    let after = match cursor {
        Some(cursor) => Some(
            decode_cursor(cursor)
                .ok_or_else(|| McpError::invalid_params("invalid cursor", None))?,
        ),
        None => None,
    };
    let keys = state
        .backend
        .kv_list(after.as_deref(), PAGE_SIZE)
        .await
        .during("kv_list")?;
    let next = if keys.len() as u64 == PAGE_SIZE {
        keys.last().map(|key| encode_cursor(key))
    } else {
        None
    };
    Ok((keys.iter().map(|key| resource(key)).collect(), next))
}

/// Policies of the toolset's tools: nothing is cached (values change at any time and subscribers
/// are told), `sleep` may run for its full ten minutes.
pub fn policies() -> Vec<(String, Declared)> {
    use shoal_shared::cache::Freshness;
    vec![
        ("kv_set".into(), Declared::new(Freshness::Write)),
        ("kv_delete".into(), Declared::new(Freshness::Write)),
        ("kv_get".into(), Declared::new(Freshness::Realtime)),
        ("echo".into(), Declared::new(Freshness::Realtime)),
        (
            "sleep".into(),
            Declared::new(Freshness::Realtime)
                .timeout(std::time::Duration::from_millis(MAX_SLEEP_MS + 60_000)),
        ),
    ]
}

pub(crate) const SCHEME: &str = "kv://";
const MAX_KEY_LEN: usize = 256;
/// Upper bound of `sleep`.
pub const MAX_SLEEP_MS: u64 = 10 * 60 * 1000;

/// Arguments of `kv_set`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct KvSetParams {
    /// Key: 1 to 256 characters from A-Z a-z 0-9 and `. _ - : / @`.
    pub key: String,
    /// Value: UTF-8 text, at most 64 KiB unless the operator configured otherwise.
    pub value: String,
}

/// Arguments of `kv_get` and `kv_delete`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct KvKeyParams {
    /// Key: 1 to 256 characters from A-Z a-z 0-9 and `. _ - : / @`.
    pub key: String,
}

/// Arguments of `echo`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct EchoParams {
    /// Text to send back.
    pub text: String,
}

/// Arguments of `sleep`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SleepParams {
    /// How long to sleep, in milliseconds (0 to 600000).
    pub ms: u64,
}

fn valid_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!("key must be 1 to {MAX_KEY_LEN} characters long"));
    }
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@')))
    {
        return Err(format!(
            "key contains {bad:?}; allowed are A-Z a-z 0-9 and . _ - : / @"
        ));
    }
    Ok(())
}

/// The key named by a `kv://` URI.
pub fn key_of(uri: &str) -> Option<&str> {
    uri.strip_prefix(SCHEME)
        .filter(|key| valid_key(key).is_ok())
}

/// The URI of `key` (the backend places the key's value by it).
pub fn uri_of(key: &str) -> String {
    shoal_shared::backend::kv_uri(key)
}

/// The resource entry of a key.
pub fn resource(key: &str) -> Resource {
    model(serde_json::json!({
        "uri": uri_of(key),
        "name": key,
        "mimeType": "text/plain",
        "description": "A value of the cluster-wide kv scratchpad",
    }))
}

/// The `kv://{key}` template.
pub fn template() -> ResourceTemplate {
    model(serde_json::json!({
        "uriTemplate": "kv://{key}",
        "name": "kv",
        "title": "kv scratchpad entry",
        "mimeType": "text/plain",
        "description": "A value of the cluster-wide kv scratchpad. Subscribe to be notified when it changes.",
    }))
}

/// Encodes a `resources/list` cursor.
pub fn encode_cursor(last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(last_key)
}

/// Decodes a `resources/list` cursor.
pub fn decode_cursor(cursor: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let key = String::from_utf8(bytes).ok()?;
    valid_key(&key).ok()?;
    Some(key)
}

/// `resources/read` of `kv://{key}`.
///
/// # Errors
/// `resource_not_found` when the key is missing.
pub async fn read(state: &AppState, uri: &str, key: &str) -> Result<ReadResourceResult, McpError> {
    let value = state
        .backend
        .kv_get(key)
        .await
        .during("kv_get")?
        .ok_or_else(|| crate::toolbox::resource_not_found(uri))?;
    let mut result = ReadResourceResult::new(vec![ResourceContents::text(value, uri)]);
    // Values change at any time; subscribers are told when they do.
    result.ttl_ms = Some(0);
    result.cache_scope = Some(CacheScope::Public);
    Ok(result)
}

/// The change a write to `key` makes, told to its subscribers in the same step as the write.
fn change_of<'a>(uri: &'a str, legacy_payload: &'a str) -> ResourceChange<'a> {
    ResourceChange {
        uri,
        legacy_payload,
    }
}

#[tool_router(router = kv_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Store a text value under a key in the scratchpad shared by every replica of the cluster. \
                       Clients subscribed to the resource kv://{key} are notified. Keys: 1-256 characters from \
                       A-Z a-z 0-9 and . _ - : / @; values: UTF-8 text up to 64 KiB.",
        annotations(
            idempotent_hint = true,
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn kv_set(
        &self,
        Parameters(params): Parameters<KvSetParams>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(message) = valid_key(&params.key) {
            return Ok(failed(message));
        }
        let limit = self.state.config.kv.max_value_bytes;
        if params.value.len() > limit {
            return Ok(failed(format!(
                "value is {} bytes; the limit is {limit} bytes",
                params.value.len()
            )));
        }
        let uri = uri_of(&params.key);
        let notification = super::updated_notification(&uri);
        let change = change_of(&uri, &notification);
        match self
            .state
            .backend
            .kv_set(&params.key, &params.value, change)
            .await
        {
            Ok(KvSetOutcome::Full) => Ok(failed(format!(
                "the scratchpad is full ({} keys); delete keys first",
                self.state.config.kv.max_keys
            ))),
            Ok(_) => Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                "stored {}",
                params.key
            ))])),
            Err(cause) => Ok(Failure::SharedState {
                operation: "kv_set",
                cause,
            }
            .into_tool_result()),
        }
    }

    #[tool(
        description = "Read the text value stored under a key in the cluster-wide scratchpad. Fails when the key \
                       does not exist.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn kv_get(
        &self,
        Parameters(params): Parameters<KvKeyParams>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(message) = valid_key(&params.key) {
            return Ok(failed(message));
        }
        match self.state.backend.kv_get(&params.key).await {
            Ok(Some(value)) => Ok(CallToolResult::success(vec![ContentBlock::text(value)])),
            Ok(None) => Ok(failed(format!("no value is stored under {}", params.key))),
            Err(cause) => Ok(Failure::SharedState {
                operation: "kv_get",
                cause,
            }
            .into_tool_result()),
        }
    }

    #[tool(
        description = "Delete a key from the cluster-wide scratchpad. Subscribers of kv://{key} are notified.",
        annotations(
            idempotent_hint = true,
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn kv_delete(
        &self,
        Parameters(params): Parameters<KvKeyParams>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(message) = valid_key(&params.key) {
            return Ok(failed(message));
        }
        let uri = uri_of(&params.key);
        let notification = super::updated_notification(&uri);
        match self
            .state
            .backend
            .kv_delete(&params.key, change_of(&uri, &notification))
            .await
        {
            Ok(existed) => Ok(CallToolResult::success(vec![ContentBlock::text(
                if existed {
                    format!("deleted {}", params.key)
                } else {
                    format!("{} did not exist", params.key)
                },
            )])),
            Err(cause) => Ok(Failure::SharedState {
                operation: "kv_delete",
                cause,
            }
            .into_tool_result()),
        }
    }

    #[tool(
        description = "Send the given text back unchanged. Touches no shared state: the cheapest call there is.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn echo(
        &self,
        Parameters(params): Parameters<EchoParams>,
    ) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::text(
            params.text,
        )]))
    }

    #[tool(
        description = "Wait for the given number of milliseconds (at most 600000), then answer. Sends progress \
                       notifications about every second when the request carries a progress token, and stops \
                       promptly when the request is cancelled. Useful to test long-running calls.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn sleep(
        &self,
        Parameters(params): Parameters<SleepParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if params.ms > MAX_SLEEP_MS {
            return Ok(failed(format!("ms must be at most {MAX_SLEEP_MS}")));
        }
        let total = Duration::from_millis(params.ms);
        let start = tokio::time::Instant::now();
        let deadline = start + total;
        let token = context.meta.get_progress_token();
        let mut tick =
            tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            tokio::select! {
                () = context.ct.cancelled() => {
                    return Ok(failed("cancelled"));
                }
                () = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick(), if token.is_some() => {
                    if let Some(token) = &token {
                        let elapsed = start.elapsed().as_millis().min(u128::from(params.ms)) as f64;
                        let progress = ProgressNotificationParam::new(token.clone(), elapsed)
                            .with_total(params.ms as f64)
                            .with_message(format!("slept {elapsed} of {} ms", params.ms));
                        if let Err(error) = context.peer.notify_progress(progress).await {
                            tracing::debug!(%error, "progress notification not delivered");
                        }
                    }
                }
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
            "slept {} ms",
            params.ms
        ))]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(valid_key("user:42/profile@v1.2_x-y").is_ok());
        assert!(valid_key("").is_err());
        assert!(valid_key("has space").is_err());
        assert!(valid_key("brace{").is_err());
        assert!(valid_key(&"k".repeat(257)).is_err());
        assert_eq!(key_of("kv://a.b"), Some("a.b"));
        assert_eq!(key_of("kv://"), None);
        assert_eq!(key_of("file://a"), None);
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(
            decode_cursor(&encode_cursor("a/b:c")).as_deref(),
            Some("a/b:c")
        );
        assert_eq!(decode_cursor("!!"), None);
    }
}
