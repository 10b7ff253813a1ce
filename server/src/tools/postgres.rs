//! Toolset `postgres`: read-only queries, table listing and description, and (when enabled) a
//! write tool, over a bounded bb8 pool (`shoal_shared::db`).
//!
//! Resources: `postgres://tables` (the table list) and `postgres://table/{schema.table}` (schema
//! and row count), subscribable in both eras. Writes through `pg_execute` notify subscribers of the
//! tables they changed at once; changes by other writers are noticed by a poller (one replica at a
//! time, elected through a Redis lease) that compares the tables' statistics, and raise the same
//! notifications. Both invalidate the cached results that depend on the changed tables.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rmcp::{
    ErrorData as McpError, RoleServer,
    handler::server::wrapper::Parameters,
    model::{
        CacheScope, CallToolResult, ReadResourceResult, Resource, ResourceContents,
        ResourceTemplate,
    },
    service::RequestContext,
    tool, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_shared::{
    bus::ListKind,
    cache::{Fill, Freshness, entry_id},
    db::{Database, DbError},
};
use tokio_util::sync::CancellationToken;

use futures::{FutureExt as _, future::BoxFuture};

use crate::{
    background::Background,
    mcp::error::Failure,
    state::AppState,
    toolbox::{ToolHost, Toolset, policy::Declared, resource_not_found},
    tools::model,
};

/// The toolset, with its write tool when `SHOAL_POSTGRES_ALLOW_WRITES` is on.
#[derive(Debug)]
pub struct Postgres {
    writes: bool,
}

impl Postgres {
    /// The toolset as configured: off (logged) without `SHOAL_DATABASE_URL`.
    ///
    /// # Errors
    /// Writes allowed without the database role they run as.
    pub fn from_config(config: &shoal_shared::config::Config) -> Result<Option<Self>, String> {
        if config.postgres.url.is_none() {
            tracing::info!("toolset postgres is off: SHOAL_DATABASE_URL is not set");
            return Ok(None);
        }
        if config.postgres.allow_writes && config.postgres.write_url.is_none() {
            return Err(
                "SHOAL_POSTGRES_ALLOW_WRITES=true needs SHOAL_DATABASE_WRITE_URL: \
                        pg_execute runs as a database role of its own (docs/security.md)"
                    .into(),
            );
        }
        Ok(Some(Self {
            writes: config.postgres.allow_writes,
        }))
    }
}

impl Toolset for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn needs(&self) -> crate::toolbox::Needs {
        crate::toolbox::Needs {
            postgres: true,
            ..Default::default()
        }
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        let mut router = ToolHost::postgres_tools();
        if self.writes {
            router += ToolHost::postgres_write_tools();
        }
        router
    }

    fn policies(&self) -> Vec<(String, Declared)> {
        policies()
    }

    fn resources(&self) -> Vec<Resource> {
        resources()
    }

    fn templates(&self) -> Vec<ResourceTemplate> {
        templates()
    }

    fn owns(&self, uri: &str) -> bool {
        uri.starts_with("postgres://")
    }

    fn subscribable(&self, uri: &str) -> bool {
        is_resource(uri)
    }

    fn read<'a>(
        &'a self,
        host: &'a ToolHost,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<ReadResourceResult, McpError>> {
        async move {
            if !is_resource(uri) {
                return Err(resource_not_found(uri));
            }
            read(&host.state, uri).await
        }
        .boxed()
    }

    fn prepare_follow<'a>(
        &'a self,
        host: &'a ToolHost,
        uris: Vec<&'a str>,
    ) -> BoxFuture<'a, Result<(), McpError>> {
        async move { ensure_tables_exist(&host.state, uris).await }.boxed()
    }

    fn start(&self, host: &ToolHost, background: &Background) {
        background.spawn(run_change_poller(
            host.state.clone(),
            background.stop.clone(),
        ));
    }
}

/// The table-list resource.
pub const TABLES_URI: &str = "postgres://tables";
const TABLE_PREFIX: &str = "postgres://table/";
/// Tag of every cached result that reads PostgreSQL (any write invalidates it).
const ALL_TAG: &str = "pg";
/// How long resource contents are cached before a refresh (and change check).
const RESOURCE_TTL: Duration = Duration::from_secs(5);

fn table_tag(table: &str) -> String {
    format!("pg:{table}")
}

fn query_tags(_: &Value) -> Vec<String> {
    vec![ALL_TAG.to_owned()]
}

fn describe_tags(arguments: &Value) -> Vec<String> {
    let mut tags = vec![ALL_TAG.to_owned()];
    if let Some(table) = arguments.get("table").and_then(Value::as_str) {
        tags.push(table_tag(&qualified(table)));
    }
    tags
}

/// Every spelling of the resource URI of `table` (`schema.table`) a client may have subscribed
/// with: the qualified one and, in schema `public`, the bare table name. A change notifies each,
/// so every subscriber is told under the URI it used.
fn table_uris(table: &str) -> Vec<String> {
    let mut uris = vec![format!("{TABLE_PREFIX}{table}")];
    if let Some(bare) = table.strip_prefix("public.") {
        uris.push(format!("{TABLE_PREFIX}{bare}"));
    }
    uris
}

/// Whether `uri` names one table (rather than the table list).
pub fn is_table_uri(uri: &str) -> bool {
    uri.strip_prefix(TABLE_PREFIX)
        .is_some_and(|t| !t.is_empty())
}

/// Refuses subscriptions to tables that do not exist (or that the read role cannot see), so no
/// client can fill the shared state with subscriptions to nothing.
///
/// # Errors
/// `resource_not_found` for an unknown table; internal errors when the database is unavailable.
pub async fn ensure_tables_exist<'a>(
    state: &AppState,
    uris: impl IntoIterator<Item = &'a str>,
) -> Result<(), McpError> {
    let tables: Vec<(&str, String)> = uris
        .into_iter()
        .filter_map(|uri| Some((uri, qualified(uri.strip_prefix(TABLE_PREFIX)?))))
        .filter(|(_, table)| !table.ends_with('.'))
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    let db = state
        .db
        .as_ref()
        .ok_or_else(|| resource_not_found(tables[0].0))?;
    let known = db.list_tables().await.map_err(Failure::from)?;
    match tables.iter().find(|(_, table)| !known.contains(table)) {
        Some((uri, _)) => Err(resource_not_found(uri)),
        None => Ok(()),
    }
}

fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_owned()
    } else {
        format!("public.{table}")
    }
}

/// Policies of the toolset's tools.
pub fn policies() -> Vec<(String, Declared)> {
    vec![
        // Query results may be private to whoever asked.
        (
            "pg_query".into(),
            Declared::new(Freshness::Dynamic).private().tags(query_tags),
        ),
        (
            "pg_list_tables".into(),
            Declared::new(Freshness::Static)
                .ttl(Duration::from_secs(60))
                .tags(query_tags),
        ),
        (
            "pg_describe_table".into(),
            Declared::new(Freshness::Static)
                .ttl(Duration::from_secs(60))
                .tags(describe_tags),
        ),
        ("pg_execute".into(), Declared::new(Freshness::Write)),
    ]
}

/// Arguments of `pg_query` and `pg_execute`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SqlParams {
    /// One SQL statement. Positional parameters are `$1`, `$2`, …
    pub sql: String,
    /// Values of the positional parameters, in order (numbers, strings, booleans, JSON).
    #[serde(default)]
    pub params: Vec<Value>,
}

/// Arguments of `pg_describe_table`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct TableParams {
    /// Table name, `table` (schema `public`) or `schema.table`.
    pub table: String,
}

fn failure(error: DbError) -> CallToolResult {
    Failure::Database(error).into_tool_result()
}

impl ToolHost {
    fn database(&self) -> Result<&Database, McpError> {
        self.state.db.as_ref().ok_or_else(|| {
            Failure::internal("the postgres toolset", "used while not configured").into()
        })
    }

    /// Tells subscribers, invalidates cached reads: the given tables changed.
    pub(crate) async fn tables_changed(state: &AppState, tables: &[String], list_changed: bool) {
        let mut tags = vec![ALL_TAG.to_owned()];
        tags.extend(tables.iter().map(|t| table_tag(t)));
        state.cache.invalidate(&tags).await;
        let mut uris: Vec<String> = tables.iter().flat_map(|t| table_uris(t)).collect();
        if list_changed {
            uris.push(TABLES_URI.to_owned());
        }
        for uri in uris {
            let notification = super::updated_notification(&uri);
            if let Err(error) = state.backend.resource_updated(&uri, &notification).await {
                tracing::warn!(%error, "table change notification lost");
            }
        }
        if list_changed && let Err(error) = state.backend.list_changed(ListKind::Resources).await {
            tracing::warn!(%error, "list change notification lost");
        }
    }
}

#[tool_router(router = postgres_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Run one read-only SQL query (SELECT, WITH, VALUES or TABLE) against the PostgreSQL database. \
                       It runs in a READ ONLY transaction under a statement timeout and returns at most the row cap \
                       (500 by default) of rows and at most SHOAL_POSTGRES_MAX_RESULT_BYTES (1 MiB) of row data; `truncated` says \
                       when there were more (`truncated_by`: `row_cap` or `byte_budget`). Bind values with $1, $2… and \
                       `params`. Returns the columns (name, type) and the rows as JSON objects.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn pg_query(
        &self,
        Parameters(params): Parameters<SqlParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let db = self.database()?;
        let holder = crate::mcp::handler::share_holder(&context);
        match db
            .read(&params.sql, &params.params, &context.ct, holder.as_ref())
            .await
        {
            Ok(output) => {
                let mut result = json!({
                    "columns": output.columns,
                    "rows": output.rows,
                    "row_count": output.rows.len(),
                    "truncated": output.truncated.is_some(),
                });
                if let Some(reason) = output.truncated {
                    result["truncated_by"] = json!(reason);
                }
                Ok(CallToolResult::structured(result))
            }
            Err(error) => Ok(failure(error)),
        }
    }

    #[tool(
        description = "List the tables of the PostgreSQL database as schema.table names.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn pg_list_tables(&self) -> Result<CallToolResult, McpError> {
        match self.database()?.list_tables().await {
            Ok(tables) => Ok(CallToolResult::structured(json!({"tables": tables}))),
            Err(error) => Ok(failure(error)),
        }
    }

    #[tool(
        description = "Describe a PostgreSQL table: its columns (name, type, nullable, default), primary key and \
                       exact row count.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn pg_describe_table(
        &self,
        Parameters(params): Parameters<TableParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let holder = crate::mcp::handler::share_holder(&context);
        match self
            .database()?
            .describe(&params.table, holder.as_ref())
            .await
        {
            Ok(info) => Ok(CallToolResult::structured(
                serde_json::to_value(info).unwrap_or_default(),
            )),
            Err(error) => Ok(failure(error)),
        }
    }
}

#[tool_router(router = postgres_write_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Run one data-changing SQL statement (INSERT, UPDATE, DELETE or MERGE, optionally after WITH) in \
                       its own transaction; any other statement (DDL, ALTER, SET, SELECT…) is refused. Never \
                       cached. Returns the rows affected and the tables changed; subscribers of those tables are \
                       notified on every replica. Bind values with $1, $2… and `params`.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn pg_execute(
        &self,
        Parameters(params): Parameters<SqlParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let db = self.database()?;
        let holder = crate::mcp::handler::share_holder(&context);
        match db
            .write(&params.sql, &params.params, &context.ct, holder.as_ref())
            .await
        {
            Ok(output) => {
                Self::tables_changed(&self.state, &output.changed_tables, false).await;
                Ok(CallToolResult::structured(json!({
                    "rows_affected": output.rows_affected,
                    "changed_tables": output.changed_tables,
                })))
            }
            Err(error) => Ok(failure(error)),
        }
    }
}

/// The resource template of one table.
pub fn templates() -> Vec<ResourceTemplate> {
    vec![model(json!({
        "uriTemplate": "postgres://table/{table}",
        "name": "postgres-table",
        "title": "PostgreSQL table",
        "mimeType": "application/json",
        "description": "A table's columns, primary key and row count (table as schema.table). Subscribe to be told when its rows change.",
    }))]
}

/// The fixed resources.
pub fn resources() -> Vec<Resource> {
    vec![model(json!({
        "uri": TABLES_URI,
        "name": "postgres-tables",
        "mimeType": "application/json",
        "description": "The tables of the PostgreSQL database",
    }))]
}

/// Whether `uri` is a resource of this toolset.
pub fn is_resource(uri: &str) -> bool {
    uri == TABLES_URI
        || uri
            .strip_prefix(TABLE_PREFIX)
            .is_some_and(|t| !t.is_empty())
}

/// `resources/read` through the shared cache; a refresh whose content differs from the expired
/// copy notifies subscribers.
///
/// # Errors
/// `resource_not_found` for a missing table; internal errors when the database is unavailable.
pub async fn read(state: &Arc<AppState>, uri: &str) -> Result<ReadResourceResult, McpError> {
    let db = state.db.as_ref().ok_or_else(|| resource_not_found(uri))?;
    let table = uri.strip_prefix(TABLE_PREFIX).map(qualified);
    let mut tags = vec![ALL_TAG.to_owned()];
    if let Some(table) = &table {
        tags.push(table_tag(table));
    }
    // One cache entry per table, whichever spelling the client used.
    let canonical = table
        .as_ref()
        .map_or_else(|| TABLES_URI.to_owned(), |t| format!("{TABLE_PREFIX}{t}"));
    let id = entry_id("resources/read", &json!({"uri": canonical}), "public");
    let fill = async {
        let value = match &table {
            // Cached per table: one read per TTL whoever asks, so counted against no one's share.
            Some(table) => {
                serde_json::to_value(db.describe(table, None).await?).unwrap_or_default()
            }
            None => json!({"tables": db.list_tables().await?}),
        };
        Ok::<_, DbError>(Fill::text(value.to_string(), true))
    };
    let answer = match state
        .cache
        .get_or_fill(&id, RESOURCE_TTL, &tags, fill)
        .await
    {
        Ok(answer) => answer,
        Err(DbError::NoSuchTable(_)) => return Err(resource_not_found(uri)),
        Err(error) => return Err(Failure::from(error).into()),
    };
    if answer
        .previous
        .as_ref()
        .is_some_and(|previous| previous != answer.text())
    {
        let uris = match &table {
            Some(table) => table_uris(table),
            None => vec![TABLES_URI.to_owned()],
        };
        for uri in uris {
            let notification = super::updated_notification(&uri);
            if let Err(error) = state.backend.resource_updated(&uri, &notification).await {
                tracing::warn!(%error, "resource change notification lost");
            }
        }
    }
    let mut result = ReadResourceResult::new(vec![ResourceContents::TextResourceContents {
        uri: uri.to_owned(),
        mime_type: Some("application/json".into()),
        text: answer.text().to_owned(),
        meta: None,
    }]);
    result.ttl_ms = Some(RESOURCE_TTL.as_millis() as u64);
    result.cache_scope = Some(CacheScope::Public);
    Ok(result)
}

/// Polls the tables' statistics for changes by any writer, on the replica holding the poller
/// lease, until `stop`.
pub async fn run_change_poller(state: Arc<AppState>, stop: CancellationToken) {
    let Some(db) = state.db.clone() else { return };
    let every = Duration::from_millis(state.config.postgres.poll_ms);
    let lease_key = state.keys.poller_lease();
    let signatures_key = state.keys.pg_signatures();
    let holder = state.bus.tag().to_string();
    let mut known: Option<BTreeMap<String, String>> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.backend.lease(&lease_key, &holder, every * 5).await {
            Ok(true) => {}
            Ok(false) => {
                known = None; // someone else polls; re-read their view when we take over
                continue;
            }
            Err(_) => continue,
        }
        let previous = match known.take() {
            Some(previous) => previous,
            None => state
                .backend
                .map_get_all(&signatures_key)
                .await
                .unwrap_or_default(),
        };
        let current = match db.signatures().await {
            Ok(current) => current,
            Err(error) => {
                tracing::debug!(%error, "change poll failed");
                known = Some(previous);
                continue;
            }
        };
        if !previous.is_empty() && previous != current {
            let changed: Vec<String> = current
                .iter()
                .filter(|(table, signature)| previous.get(*table) != Some(*signature))
                .map(|(table, _)| table.clone())
                .chain(
                    previous
                        .keys()
                        .filter(|t| !current.contains_key(*t))
                        .cloned(),
                )
                .collect();
            let list_changed = previous.keys().ne(current.keys());
            tracing::debug!(?changed, list_changed, "PostgreSQL tables changed");
            ToolHost::tables_changed(&state, &changed, list_changed).await;
        }
        if previous != current
            && let Err(error) = state.backend.map_replace(&signatures_key, &current).await
        {
            tracing::debug!(%error, "cannot record table signatures");
        }
        known = Some(current);
    }
}
