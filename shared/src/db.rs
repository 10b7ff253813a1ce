//! PostgreSQL through a bb8 pool: read-only queries, writes that report what they changed, table
//! metadata, and the change signatures the poller compares.
//!
//! The pool is sized by expected concurrent tool calls (`SHOAL_POSTGRES_POOL_MAX`), not by
//! sessions: sessions are idle most of the time. Checking out a connection waits at most
//! `SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS`; then the call fails with [`DbError::PoolTimeout`]. Every
//! statement runs under a statement timeout. A cancelled call cancels its query on the server.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use bb8::{Pool, PooledConnection, RunError};
use bb8_postgres::PostgresConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{NoTls, error::SqlState, types::Type};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    telemetry::{KeyValue, Span, SpanKind},
};

type Manager = PostgresConnectionManager<NoTls>;

/// Pool and statement settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: SecretString,
    /// Maximum pooled connections.
    pub pool_max: u32,
    /// Connections kept open while idle.
    pub pool_min_idle: u32,
    /// How long a call waits for a free connection.
    pub acquire_timeout: Duration,
    /// Statement timeout of every query.
    pub statement_timeout: Duration,
    /// Most rows a read returns.
    pub row_cap: usize,
}

/// Why a database operation failed. Messages are safe to show to a model (no credentials).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Every connection was busy for the whole acquire timeout.
    #[error("the database is busy: no connection became free within {0:?}")]
    PoolTimeout(Duration),
    /// The database cannot be reached.
    #[error("the database is unavailable")]
    Unavailable,
    /// The statement ran longer than the statement timeout.
    #[error("the query exceeded the statement timeout ({0:?})")]
    Timeout(Duration),
    /// A write was attempted in a read-only transaction.
    #[error("this tool only reads: the statement tried to write")]
    ReadOnly,
    /// The statement is invalid or refers to something missing.
    #[error("{0}")]
    Invalid(String),
    /// The request was cancelled and the query cancelled on the server.
    #[error("cancelled")]
    Cancelled,
    /// Anything else.
    #[error("database error: {0}")]
    Other(String),
}

impl DbError {
    fn from_pg(error: tokio_postgres::Error, statement_timeout: Duration) -> Self {
        let Some(db) = error.as_db_error() else {
            return if error.is_closed() {
                DbError::Unavailable
            } else {
                DbError::Other(error.to_string())
            };
        };
        let code = db.code();
        if *code == SqlState::QUERY_CANCELED {
            DbError::Timeout(statement_timeout)
        } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            DbError::ReadOnly
        } else if code.code().starts_with("42")
            || code.code().starts_with("22")
            || code.code().starts_with("23")
        {
            // syntax and access rules, data exceptions, integrity constraints
            DbError::Invalid(format!("{} (SQLSTATE {})", db.message(), code.code()))
        } else {
            DbError::Other(format!("{} (SQLSTATE {})", db.message(), code.code()))
        }
    }

    /// The SQLSTATE-like class for telemetry.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::PoolTimeout(_) => "pool_timeout",
            DbError::Unavailable => "unavailable",
            DbError::Timeout(_) => "timeout",
            DbError::ReadOnly => "read_only",
            DbError::Invalid(_) => "invalid",
            DbError::Cancelled => "cancelled",
            DbError::Other(_) => "other",
        }
    }
}

/// A column of a query result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its PostgreSQL type.
    #[serde(rename = "type")]
    pub type_name: String,
}

/// The result of a read.
#[derive(Debug, Clone, Serialize)]
pub struct QueryOutput {
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Rows as JSON objects (column name → value).
    pub rows: Vec<Value>,
    /// Whether more rows existed than the row cap.
    pub truncated: bool,
}

/// The result of a write.
#[derive(Debug, Clone, Serialize)]
pub struct WriteOutput {
    /// Rows the statement affected.
    pub rows_affected: u64,
    /// Tables (`schema.table`) whose rows changed in the transaction.
    pub changed_tables: Vec<String>,
}

/// A table's schema and size.
#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    /// `schema.table`.
    pub table: String,
    /// Columns with type, nullability and default.
    pub columns: Vec<Value>,
    /// Primary key columns.
    pub primary_key: Vec<String>,
    /// Exact row count.
    pub row_count: i64,
}

/// The database handle. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: Pool<Manager>,
    config: Arc<DbConfig>,
    metrics: Metrics,
    waiting: Arc<AtomicI64>,
    in_use: Arc<AtomicI64>,
}

/// A checked-out connection, counted in the in-use gauge until it goes back to the pool.
struct Checkout<'a> {
    connection: PooledConnection<'a, Manager>,
    in_use: &'a AtomicI64,
    metrics: &'a Metrics,
}

impl std::ops::Deref for Checkout<'_> {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.connection
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.connection
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        let now = self.in_use.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.db_pool_in_use(now);
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").finish_non_exhaustive()
    }
}

/// Keeps the in-use/waiting gauges right however a call ends.
struct Waiting<'a>(&'a AtomicI64, &'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::SeqCst) - 1;
        self.1.db_pool_waiting(now);
    }
}

impl Database {
    /// A pool for `config`. Connections are opened on demand: a database that is down at start-up
    /// makes calls fail with [`DbError::Unavailable`] until it is back, instead of failing the
    /// replica.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub fn connect(config: DbConfig, metrics: Metrics) -> Result<Self, DbError> {
        let mut pg_config: tokio_postgres::Config =
            config.url.expose_secret().parse().map_err(|_| {
                DbError::Invalid("SHOAL_DATABASE_URL is not a valid PostgreSQL URL".into())
            })?;
        pg_config.connect_timeout(Duration::from_secs(5));
        pg_config.application_name("shoal");
        // Every statement of every pooled connection is bounded, whatever the tool forgets.
        pg_config.options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
        let manager = PostgresConnectionManager::new(pg_config, NoTls);
        let pool = Pool::builder()
            .max_size(config.pool_max.max(1))
            .min_idle(Some(config.pool_min_idle.min(config.pool_max)))
            .connection_timeout(config.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .retry_connection(false)
            .build_unchecked(manager);
        metrics.db_pool_size(i64::from(config.pool_max));
        Ok(Self {
            pool,
            config: Arc::new(config),
            metrics,
            waiting: Arc::new(AtomicI64::new(0)),
            in_use: Arc::new(AtomicI64::new(0)),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DbConfig {
        &self.config
    }

    async fn connection(&self) -> Result<Checkout<'_>, DbError> {
        let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.db_pool_waiting(now);
        let _waiting = Waiting(&self.waiting, &self.metrics);
        let start = Instant::now();
        let result = self.pool.get().await;
        self.metrics.db_pool_wait(start.elapsed());
        match result {
            Ok(connection) => {
                let now = self.in_use.fetch_add(1, Ordering::SeqCst) + 1;
                self.metrics.db_pool_in_use(now);
                Ok(Checkout {
                    connection,
                    in_use: &self.in_use,
                    metrics: &self.metrics,
                })
            }
            Err(RunError::TimedOut) => Err(DbError::PoolTimeout(self.config.acquire_timeout)),
            Err(RunError::User(error)) => {
                tracing::warn!(%error, "cannot connect to PostgreSQL");
                Err(DbError::Unavailable)
            }
        }
    }

    fn pg(&self, error: tokio_postgres::Error) -> DbError {
        DbError::from_pg(error, self.config.statement_timeout)
    }

    /// Runs `sql` as a cancellable step: when `cancel` fires, the query is cancelled on the server.
    async fn cancellable<T>(
        &self,
        client: &tokio_postgres::Client,
        cancel: &CancellationToken,
        step: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        tokio::select! {
            result = step => result.map_err(|e| self.pg(e)),
            () = cancel.cancelled() => {
                if let Err(error) = client.cancel_token().cancel_query(NoTls).await {
                    tracing::debug!(%error, "could not cancel the query on the server");
                }
                Err(DbError::Cancelled)
            }
        }
    }

    /// Runs a `SELECT` (or `WITH`/`VALUES`/`TABLE`) in a read-only transaction and returns at
    /// most the row cap of rows as JSON.
    ///
    /// # Errors
    /// See [`DbError`]; any write attempt is [`DbError::ReadOnly`].
    pub async fn read(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
    ) -> Result<QueryOutput, DbError> {
        let sql = trim_statement(sql)?;
        let span = db_span("SELECT", first_table(sql));
        let result = self
            .observed("SELECT", &span, self.read_inner(sql, params, cancel))
            .await;
        if let Ok(output) = &result {
            span.set("db.response.returned_rows", output.rows.len() as i64);
        }
        result
    }

    /// Measures one operation (`shoal_db_operation_duration_seconds`, and `span` while tracing).
    async fn observed<T>(
        &self,
        operation: &'static str,
        span: &Span,
        step: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let start = Instant::now();
        let result = span.wrap(step).await;
        let error = result.as_ref().err().map(DbError::kind);
        self.metrics.db_operation(operation, error, start.elapsed());
        if let Some(kind) = error {
            span.mark_error(kind);
        }
        result
    }

    async fn read_inner(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
    ) -> Result<QueryOutput, DbError> {
        let mut connection = self.connection().await?;
        let cap = self.config.row_cap;
        if is_query(sql) {
            let transaction = connection
                .build_transaction()
                .read_only(true)
                .start()
                .await
                .map_err(|e| self.pg(e))?;
            let statement = self
                .cancellable(transaction.client(), cancel, transaction.prepare(sql))
                .await?;
            let columns = columns_of(&statement);
            let values = bind(statement.params(), params)?;
            let refs = as_refs(&values);
            // PostgreSQL serializes the rows itself, whatever their types, in column order.
            let wrapped = format!(
                "SELECT coalesce(json_agg(q), '[]'::json)::text FROM (SELECT * FROM ({sql}) AS shoal_query LIMIT {}) AS q",
                cap + 1
            );
            match self
                .cancellable(
                    transaction.client(),
                    cancel,
                    transaction.query_one(&wrapped, &refs),
                )
                .await
            {
                Ok(row) => {
                    transaction.commit().await.map_err(|e| self.pg(e))?;
                    let text: String = row.get(0);
                    let mut rows: Vec<Value> =
                        serde_json::from_str(&text).map_err(|e| DbError::Other(e.to_string()))?;
                    let truncated = rows.len() > cap;
                    rows.truncate(cap);
                    return Ok(QueryOutput {
                        columns,
                        rows,
                        truncated,
                    });
                }
                // Statements that cannot be a subquery (a data-modifying WITH, say) run as they are.
                Err(DbError::Invalid(message))
                    if message.contains("SQLSTATE 0A000") || message.contains("SQLSTATE 42601") =>
                {
                    drop(transaction);
                }
                Err(error) => return Err(error),
            }
        }
        // As written, still in a read-only transaction: a write fails with READ ONLY, anything else
        // (EXPLAIN, SHOW) returns its rows converted here.
        let transaction = connection
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.pg(e))?;
        let statement = self
            .cancellable(transaction.client(), cancel, transaction.prepare(sql))
            .await?;
        let columns = columns_of(&statement);
        let values = bind(statement.params(), params)?;
        let refs = as_refs(&values);
        let rows = self
            .cancellable(
                transaction.client(),
                cancel,
                transaction.query(&statement, &refs),
            )
            .await?;
        transaction.commit().await.map_err(|e| self.pg(e))?;
        let truncated = rows.len() > cap;
        let rows = rows.iter().take(cap).map(row_to_json).collect();
        Ok(QueryOutput {
            columns,
            rows,
            truncated,
        })
    }

    /// Runs a data-changing statement in its own transaction and reports which tables it changed.
    ///
    /// # Errors
    /// See [`DbError`].
    pub async fn write(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
    ) -> Result<WriteOutput, DbError> {
        let sql = trim_statement(sql)?;
        let span = db_span("WRITE", first_table(sql));
        self.observed("WRITE", &span, self.write_inner(sql, params, cancel))
            .await
    }

    async fn write_inner(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
    ) -> Result<WriteOutput, DbError> {
        let mut connection = self.connection().await?;
        let transaction = connection.transaction().await.map_err(|e| self.pg(e))?;
        let statement = self
            .cancellable(transaction.client(), cancel, transaction.prepare(sql))
            .await?;
        let values = bind(statement.params(), params)?;
        let refs = as_refs(&values);
        let rows_affected = self
            .cancellable(
                transaction.client(),
                cancel,
                transaction.execute(&statement, &refs),
            )
            .await?;
        // This transaction's own table statistics say exactly which tables it changed.
        let changed = transaction
            .query(
                "SELECT schemaname || '.' || relname FROM pg_stat_xact_user_tables \
                 WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY 1",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        transaction.commit().await.map_err(|e| self.pg(e))?;
        Ok(WriteOutput {
            rows_affected,
            changed_tables: changed.iter().map(|row| row.get(0)).collect(),
        })
    }

    /// User tables as `schema.table`, sorted.
    ///
    /// # Errors
    /// See [`DbError`].
    pub async fn list_tables(&self) -> Result<Vec<String>, DbError> {
        let span = db_span("LIST", Some("information_schema.tables"));
        let list = async {
            let connection = self.connection().await?;
            let rows = connection
                .query(
                    "SELECT table_schema || '.' || table_name FROM information_schema.tables \
                     WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema') \
                     ORDER BY 1 LIMIT 1000",
                    &[],
                )
                .await
                .map_err(|e| self.pg(e))?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        };
        self.observed("LIST", &span, list).await
    }

    /// Columns, primary key and row count of `table` (`name` or `schema.name`).
    ///
    /// # Errors
    /// [`DbError::Invalid`] when the table does not exist.
    pub async fn describe(&self, table: &str) -> Result<TableInfo, DbError> {
        let span = db_span("DESCRIBE", Some(table));
        self.observed("DESCRIBE", &span, self.describe_inner(table))
            .await
    }

    async fn describe_inner(&self, table: &str) -> Result<TableInfo, DbError> {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let connection = self.connection().await?;
        let columns = connection
            .query(
                "SELECT column_name, data_type, is_nullable = 'YES', column_default FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&schema, &name],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if columns.is_empty() {
            return Err(DbError::Invalid(format!("no table {schema}.{name}")));
        }
        let primary_key = connection
            .query(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indisprimary AND i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass",
                &[&schema, &name],
            )
            .await
            .map_err(|e| self.pg(e))?;
        // The identifiers were just read from the catalog; quote_ident makes them safe to splice.
        let count_sql = connection
            .query_one(
                "SELECT format('SELECT count(*) FROM %I.%I', $1::text, $2::text)",
                &[&schema, &name],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let count_sql: String = count_sql.get(0);
        let row_count: i64 = connection
            .query_one(&count_sql, &[])
            .await
            .map_err(|e| self.pg(e))?
            .get(0);
        Ok(TableInfo {
            table: format!("{schema}.{name}"),
            columns: columns
                .iter()
                .map(|row| {
                    serde_json::json!({
                        "name": row.get::<_, String>(0),
                        "type": row.get::<_, String>(1),
                        "nullable": row.get::<_, bool>(2),
                        "default": row.get::<_, Option<String>>(3),
                    })
                })
                .collect(),
            primary_key: primary_key.iter().map(|row| row.get(0)).collect(),
            row_count,
        })
    }

    /// A cheap signature per user table that changes when its rows change (from the table
    /// statistics), for the change poller.
    ///
    /// # Errors
    /// See [`DbError`].
    pub async fn signatures(&self) -> Result<BTreeMap<String, String>, DbError> {
        let connection = self.connection().await?;
        let rows = connection
            .query(
                "SELECT schemaname || '.' || relname, n_tup_ins || ':' || n_tup_upd || ':' || n_tup_del || ':' || n_live_tup \
                 FROM pg_stat_user_tables ORDER BY 1 LIMIT 1000",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// One round trip, for readiness.
    ///
    /// # Errors
    /// When the database cannot be reached.
    pub async fn ping(&self) -> Result<(), DbError> {
        let connection = self.connection().await?;
        connection
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }
}

/// The table a statement names first (after FROM, INTO, UPDATE or JOIN), for `db.collection.name`:
/// an identifier, never a value.
fn first_table(sql: &str) -> Option<&str> {
    let mut words = sql.split_whitespace();
    while let Some(word) = words.next() {
        if ["from", "into", "update", "join"]
            .iter()
            .any(|k| word.eq_ignore_ascii_case(k))
        {
            let name = words.next()?.trim_end_matches([',', ';', ')']);
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '"'));
            return valid.then_some(name);
        }
    }
    None
}

/// The client span of one PostgreSQL operation: the operation and, when known, the table; never
/// the statement text or its parameters.
fn db_span(operation: &'static str, collection: Option<&str>) -> Span {
    if !crate::telemetry::tracing_enabled() {
        return Span::none();
    }
    let name = match collection {
        Some(table) => format!("{operation} {table}"),
        None => operation.to_owned(),
    };
    Span::child(name, SpanKind::Client, || {
        let mut attributes = vec![
            KeyValue::new("db.system.name", "postgresql"),
            KeyValue::new("db.operation.name", operation),
        ];
        if let Some(table) = collection {
            attributes.push(KeyValue::new("db.collection.name", table.to_owned()));
        }
        attributes
    })
}

/// Whether the statement reads rows and can be a subquery (SELECT, WITH, VALUES, TABLE).
fn is_query(sql: &str) -> bool {
    let mut rest = sql.trim_start();
    loop {
        if let Some(comment) = rest.strip_prefix("--") {
            rest = comment
                .split_once('\n')
                .map_or("", |(_, after)| after)
                .trim_start();
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment
                .split_once("*/")
                .map_or("", |(_, after)| after)
                .trim_start();
        } else if let Some(inner) = rest.strip_prefix('(') {
            rest = inner.trim_start();
        } else {
            break;
        }
    }
    let keyword: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    matches!(
        keyword.to_ascii_lowercase().as_str(),
        "select" | "with" | "values" | "table"
    )
}

fn columns_of(statement: &tokio_postgres::Statement) -> Vec<Column> {
    statement
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_owned(),
            type_name: c.type_().name().to_owned(),
        })
        .collect()
}

fn as_refs(values: &[BoxedParam]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// Converts a row of a statement PostgreSQL did not serialize itself (common types; others null).
fn row_to_json(row: &tokio_postgres::Row) -> Value {
    let mut object = serde_json::Map::new();
    for (index, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::BOOL => row.get::<_, Option<bool>>(index).map(Value::from),
            Type::INT2 => row.get::<_, Option<i16>>(index).map(Value::from),
            Type::INT4 => row.get::<_, Option<i32>>(index).map(Value::from),
            Type::INT8 => row.get::<_, Option<i64>>(index).map(Value::from),
            Type::FLOAT4 => row.get::<_, Option<f32>>(index).map(Value::from),
            Type::FLOAT8 => row.get::<_, Option<f64>>(index).map(Value::from),
            Type::JSON | Type::JSONB => row.get::<_, Option<Value>>(index),
            _ => row
                .try_get::<_, Option<String>>(index)
                .ok()
                .flatten()
                .map(Value::from),
        };
        object.insert(column.name().to_owned(), value.unwrap_or(Value::Null));
    }
    Value::Object(object)
}

/// Accepts one statement; strips trailing semicolons.
fn trim_statement(sql: &str) -> Result<&str, DbError> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    if sql.is_empty() {
        return Err(DbError::Invalid("the statement is empty".into()));
    }
    Ok(sql)
}

type BoxedParam = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// Converts JSON arguments to the parameter types the server inferred.
fn bind(types: &[Type], values: &[Value]) -> Result<Vec<BoxedParam>, DbError> {
    if types.len() != values.len() {
        return Err(DbError::Invalid(format!(
            "the statement has {} parameter(s) but {} value(s) were given",
            types.len(),
            values.len()
        )));
    }
    types
        .iter()
        .zip(values)
        .enumerate()
        .map(|(index, (ty, value))| {
            let position = index + 1;
            let wrong = || {
                DbError::Invalid(format!(
                    "parameter ${position} must be a {} (got {value})",
                    ty.name()
                ))
            };
            if value.is_null() {
                return Ok(Box::new(Option::<String>::None) as BoxedParam);
            }
            let boxed: BoxedParam = match *ty {
                Type::BOOL => Box::new(value.as_bool().ok_or_else(wrong)?),
                Type::INT2 => Box::new(i16::try_from(value.as_i64().ok_or_else(wrong)?).map_err(|_| wrong())?),
                Type::INT4 => Box::new(i32::try_from(value.as_i64().ok_or_else(wrong)?).map_err(|_| wrong())?),
                Type::INT8 => Box::new(value.as_i64().ok_or_else(wrong)?),
                Type::FLOAT4 => Box::new(value.as_f64().ok_or_else(wrong)? as f32),
                Type::FLOAT8 => Box::new(value.as_f64().ok_or_else(wrong)?),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    Box::new(value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string()))
                }
                Type::JSON | Type::JSONB => Box::new(value.clone()),
                _ => {
                    return Err(DbError::Invalid(format!(
                        "parameter ${position} has type {}, which cannot be bound from JSON; pass text and cast it (${position}::text::{})",
                        ty.name(),
                        ty.name()
                    )));
                }
            };
            Ok(boxed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_tables_are_identifiers_only() {
        assert_eq!(
            first_table("SELECT * FROM accounts WHERE id = 1"),
            Some("accounts")
        );
        assert_eq!(
            first_table("insert into public.notes (body) values ($1)"),
            Some("public.notes")
        );
        assert_eq!(
            first_table("UPDATE accounts SET balance = 0"),
            Some("accounts")
        );
        assert_eq!(first_table("SELECT 1"), None);
        assert_eq!(first_table("SELECT * FROM (SELECT 1) x"), None);
    }

    #[test]
    fn queries_are_recognised() {
        assert!(is_query("select 1"));
        assert!(is_query(
            "  -- comment\n /* more */ (SELECT 1) UNION (SELECT 2)"
        ));
        assert!(is_query("WITH x AS (SELECT 1) SELECT * FROM x"));
        assert!(is_query("VALUES (1)"));
        assert!(!is_query("INSERT INTO t VALUES (1)"));
        assert!(!is_query("EXPLAIN SELECT 1"));
    }

    #[test]
    fn statements_are_trimmed() {
        assert_eq!(trim_statement(" SELECT 1 ;; ").expect("ok"), "SELECT 1");
        assert!(trim_statement(" ; ").is_err());
    }

    #[test]
    fn parameters_follow_inferred_types() {
        let bound = bind(
            &[Type::INT4, Type::TEXT, Type::BOOL],
            &[
                serde_json::json!(5),
                serde_json::json!("x"),
                serde_json::json!(true),
            ],
        );
        assert_eq!(bound.expect("bound").len(), 3);
        assert!(bind(&[Type::INT4], &[serde_json::json!("five")]).is_err());
        assert!(bind(&[Type::INT2], &[serde_json::json!(100_000)]).is_err());
        assert!(bind(&[Type::INT4], &[]).is_err());
        assert!(bind(&[Type::TIMESTAMPTZ], &[serde_json::json!("2026-01-01")]).is_err());
    }
}
