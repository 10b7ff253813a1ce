//! PostgreSQL through bb8 pools: read-only queries, writes that report what they changed, table
//! metadata, and the change signatures the poller compares.
//!
//! The pools are sized by expected concurrent tool calls (`SHOAL_POSTGRES_POOL_MAX`), not by
//! sessions: sessions are idle most of the time. Checking out a connection waits at most
//! `SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS`; then the call fails with [`DbError::PoolTimeout`].
//!
//! What keeps one client's SQL from reaching the database host or another client:
//! - Reads and writes connect as separate least-privilege roles (`SHOAL_DATABASE_URL`,
//!   `SHOAL_DATABASE_WRITE_URL`). Every new connection checks its role: a superuser, a role that
//!   may create roles, or one holding `pg_execute_server_program`, `pg_read_server_files` or
//!   `pg_write_server_files` is refused unless `SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE` says so.
//! - A read only ever runs as a subquery of the wrapper, inside a READ ONLY transaction; what
//!   cannot be wrapped is refused. Rows stream in under the row cap and a byte budget.
//! - Every transaction sets its own statement timeout (`SET LOCAL`), whatever the session holds.
//! - A connection that ran client SQL is reset before another call can have it (settings, role,
//!   advisory locks, cursors, prepared statements, temporary tables, LISTEN); one whose call was
//!   abandoned mid-query (tool timeout, client gone) has its query cancelled on the server and is
//!   closed instead of being reused.

use crate::telemetry::attr;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use bb8::{ManageConnection, Pool, PooledConnection, RunError};
use bb8_postgres::PostgresConnectionManager;
use futures::TryStreamExt as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
pub use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, types::Type};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    telemetry::{KeyValue, Span, SpanKind},
};

/// Whose share of a pool a connection counts against: a principal's id, and the percent of the
/// pool it may hold at once.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The principal's id.
    pub id: Arc<str>,
    /// Its share, in percent.
    pub percent: u8,
}

/// Pool and statement settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `postgres://user:password@host:port/db`: the role reads run as.
    pub url: SecretString,
    /// The role `pg_execute` runs as; writes are off while unset.
    pub write_url: Option<SecretString>,
    /// Accept a superuser or a role with server-file/program privileges (logged as a warning).
    pub allow_privileged_role: bool,
    /// Maximum pooled connections (per pool).
    pub pool_max: u32,
    /// Connections kept open while idle.
    pub pool_min_idle: u32,
    /// How long a call waits for a free connection.
    pub acquire_timeout: Duration,
    /// Statement timeout of every query.
    pub statement_timeout: Duration,
    /// Most rows a read returns.
    pub row_cap: usize,
    /// Most bytes of row data (as JSON) a read returns.
    pub max_result_bytes: usize,
}

impl DbConfig {
    /// The pools' share of the configuration tree, reading as `url`; `pg_execute`'s role only
    /// when `writes` are served.
    pub fn from_config(
        config: &crate::config::PostgresConfig,
        url: SecretString,
        writes: bool,
    ) -> Self {
        Self {
            url,
            write_url: config.write_url.clone().filter(|_| writes),
            allow_privileged_role: config.allow_privileged_role,
            max_result_bytes: config.max_result_bytes,
            pool_max: config.pool_max,
            pool_min_idle: config.pool_min_idle,
            acquire_timeout: Duration::from_millis(config.acquire_timeout_ms),
            statement_timeout: Duration::from_millis(config.statement_timeout_ms),
            row_cap: config.row_cap,
        }
    }
}

/// Why a database operation failed. Every variant but [`DbError::Other`] and
/// [`DbError::Privileged`] describes the caller's own request and may be shown to it; those two
/// carry server-side detail for the log only ([`DbError::is_client_error`]).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Every connection was busy for the whole acquire timeout.
    #[error("the database is busy: no connection became free within {0:?}")]
    PoolTimeout(Duration),
    /// The caller already holds its share of the pool.
    #[error(
        "your calls already hold {held} of this replica's {pool} database connections, your share \
         (SHOAL_PRINCIPAL_SHARE_PERCENT); retry when one of them ends"
    )]
    Share {
        /// Connections the caller holds.
        held: usize,
        /// The pool's size.
        pool: u32,
    },
    /// The database cannot be reached.
    #[error("the database is unavailable")]
    Unavailable,
    /// The configured role has more privileges than the toolset accepts.
    #[error("{0}")]
    Privileged(String),
    /// The statement ran longer than the statement timeout.
    #[error("the query exceeded the statement timeout ({0:?})")]
    Timeout(Duration),
    /// A write was attempted in a read-only transaction.
    #[error("this tool only reads: the statement tried to write")]
    ReadOnly,
    /// The statement is not one query that can run as a subquery.
    #[error(
        "this tool only reads: pg_query runs exactly one query (SELECT, WITH … SELECT, VALUES or TABLE); {0}"
    )]
    NotAQuery(&'static str),
    /// `pg_execute` was given something other than one data-modifying statement.
    #[error(
        "pg_execute runs exactly one data-modifying statement (INSERT, UPDATE, DELETE or MERGE, optionally after WITH); {0}"
    )]
    NotAWrite(String),
    /// shoal refused the request before sending it (empty statement, bad parameters, bad URL).
    #[error("{0}")]
    Invalid(String),
    /// No table of that name.
    #[error("no table {0}")]
    NoSuchTable(String),
    /// PostgreSQL refused the statement: syntax, names, data or constraint errors (SQLSTATE
    /// classes 42, 22, 23).
    #[error("{message} (SQLSTATE {})", sqlstate.code())]
    Rejected {
        /// Why, as PostgreSQL says it.
        sqlstate: SqlState,
        /// PostgreSQL's message about the statement.
        message: String,
    },
    /// The role lacks a privilege the statement needs.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The request was cancelled and the query cancelled on the server.
    #[error("cancelled")]
    Cancelled,
    /// Writes are not configured.
    #[error("writes are not configured (SHOAL_DATABASE_WRITE_URL)")]
    NoWrites,
    /// Anything else: a server or driver failure, for the log.
    #[error("database error: {detail}")]
    Other {
        /// The SQLSTATE, when the server sent one.
        sqlstate: Option<SqlState>,
        /// The driver's or server's message.
        detail: String,
    },
}

impl DbError {
    fn from_pg(error: tokio_postgres::Error, statement_timeout: Duration) -> Self {
        let Some(db) = error.as_db_error() else {
            return if error.is_closed() {
                DbError::Unavailable
            } else {
                DbError::Other {
                    sqlstate: None,
                    detail: error.to_string(),
                }
            };
        };
        let code = db.code().clone();
        if code == SqlState::QUERY_CANCELED {
            DbError::Timeout(statement_timeout)
        } else if code == SqlState::READ_ONLY_SQL_TRANSACTION {
            DbError::ReadOnly
        } else if code == SqlState::INSUFFICIENT_PRIVILEGE {
            DbError::Denied(db.message().to_owned())
        } else if ["42", "22", "23"]
            .iter()
            .any(|class| code.code().starts_with(class))
        {
            // syntax and access rules, data exceptions, integrity constraints
            DbError::Rejected {
                sqlstate: code,
                message: db.message().to_owned(),
            }
        } else {
            DbError::Other {
                detail: format!("{} (SQLSTATE {})", db.message(), code.code()),
                sqlstate: Some(code),
            }
        }
    }

    /// Whether the error is about the caller's own request (its text may be shown to it).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, DbError::Other { .. } | DbError::Privileged(_))
    }

    /// The SQLSTATE-like class for telemetry.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::PoolTimeout(_) => "pool_timeout",
            DbError::Share { .. } => "principal_share",
            DbError::Unavailable => "unavailable",
            DbError::Privileged(_) => "privileged_role",
            DbError::Timeout(_) => "timeout",
            DbError::ReadOnly => "read_only",
            DbError::NotAQuery(_) => "not_a_query",
            DbError::NotAWrite(_) => "not_a_write",
            DbError::Invalid(_) | DbError::Rejected { .. } => "invalid",
            DbError::NoSuchTable(_) => "no_such_table",
            DbError::Denied(_) => "denied",
            DbError::Cancelled => "cancelled",
            DbError::NoWrites => "no_writes",
            DbError::Other { .. } => "other",
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

/// Which limit cut a read short.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// More rows existed than the row cap.
    RowCap,
    /// The rows' data would have passed the byte budget.
    ByteBudget,
}

/// The result of a read.
#[derive(Debug, Clone, Serialize)]
pub struct QueryOutput {
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Rows as JSON objects (column name → value).
    pub rows: Vec<Value>,
    /// Why the rows stop short of the query's whole result, if they do.
    pub truncated: Option<Truncation>,
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

/// What a role may do beyond reading and writing rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolePrivileges {
    /// The role's name.
    pub role: String,
    /// What makes it privileged (empty when it is not).
    pub privileged: Vec<&'static str>,
}

impl RolePrivileges {
    /// Reads the privileges of the connection's role. A superuser is a member of every role.
    async fn of(client: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_user::text, r.rolsuper, r.rolcreaterole, \
                        pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER'), \
                        pg_has_role(current_user, 'pg_read_server_files', 'MEMBER'), \
                        pg_has_role(current_user, 'pg_write_server_files', 'MEMBER') \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let flags = [
            (1, "a superuser"),
            (2, "allowed to create roles"),
            (3, "a member of pg_execute_server_program"),
            (4, "a member of pg_read_server_files"),
            (5, "a member of pg_write_server_files"),
        ];
        Ok(Self {
            role: row.get(0),
            privileged: flags
                .iter()
                .filter(|(index, _)| row.get::<_, bool>(*index))
                .map(|(_, what)| *what)
                .collect(),
        })
    }

    fn refusal(&self, purpose: &str) -> String {
        format!(
            "the database role {:?} ({purpose}) is {}: the postgres toolset refuses to run client SQL as it; \
             connect as a least-privilege role (docs/security.md) or set SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE=true",
            self.role,
            self.privileged.join(", ")
        )
    }
}

/// One pooled connection: the client, and whether it must be closed instead of reused.
pub struct PgConnection {
    client: tokio_postgres::Client,
    poisoned: bool,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Privileged(String),
}

/// Why the last connection attempt of a pool failed, and when. bb8 hands connect errors to its
/// error sink, never to the caller waiting for a connection (who times out instead): this is how a
/// caller learns that the database is down or the role refused, rather than "busy".
#[derive(Debug, Clone, Default)]
struct LastConnectError(Arc<std::sync::Mutex<Option<(Instant, ConnectFailure)>>>);

#[derive(Debug, Clone)]
enum ConnectFailure {
    Unreachable,
    Privileged(String),
}

impl LastConnectError {
    /// The failure of an attempt made since `since`, if any.
    fn since(&self, since: Instant) -> Option<ConnectFailure> {
        let last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, failure)| failure.clone())
    }
}

impl bb8::ErrorSink<ConnectError> for LastConnectError {
    fn sink(&self, error: ConnectError) {
        let failure = match error {
            ConnectError::Pg(error) => {
                tracing::warn!(%error, "cannot connect to PostgreSQL");
                ConnectFailure::Unreachable
            }
            ConnectError::Privileged(message) => {
                tracing::error!("{message}");
                ConnectFailure::Privileged(message)
            }
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), failure));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ConnectError>> {
        Box::new(self.clone())
    }
}

/// bb8-postgres's manager, plus the role check on every new connection and the poisoned flag.
struct Manager {
    inner: PostgresConnectionManager<NoTls>,
    purpose: &'static str,
    allow_privileged: bool,
    warned: AtomicBool,
}

impl ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = ConnectError;

    async fn connect(&self) -> Result<PgConnection, ConnectError> {
        let client = self.inner.connect().await?;
        let role = RolePrivileges::of(&client).await?;
        if !role.privileged.is_empty() {
            if !self.allow_privileged {
                return Err(ConnectError::Privileged(role.refusal(self.purpose)));
            }
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    role = %role.role,
                    privileges = ?role.privileged,
                    purpose = self.purpose,
                    "SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE: client SQL runs as a privileged database role"
                );
            }
        }
        Ok(PgConnection {
            client,
            poisoned: false,
        })
    }

    async fn is_valid(&self, connection: &mut PgConnection) -> Result<(), ConnectError> {
        Ok(self.inner.is_valid(&mut connection.client).await?)
    }

    fn has_broken(&self, connection: &mut PgConnection) -> bool {
        connection.poisoned || connection.client.is_closed()
    }
}

/// What a connection that ran client SQL runs before anyone else may use it: every session-level
/// thing a statement can leave behind (`set_config`, `SET ROLE`, advisory locks, cursors, prepared
/// statements, temporary tables, LISTEN). `DISCARD ALL` does the same but cannot run in the
/// implicit transaction of a multi-statement query.
const RESET_SQL: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; RESET ROLE; \
    SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; DEALLOCATE ALL; DISCARD TEMP; DISCARD SEQUENCES";
/// How long a reset or a server-side cancel may take before the connection is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// The database handle. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: Pool<Manager>,
    write_pool: Option<Pool<Manager>>,
    /// The last connect failure of either pool.
    connect_errors: LastConnectError,
    config: Arc<DbConfig>,
    metrics: Metrics,
    waiting: Arc<AtomicI64>,
    in_use: Arc<AtomicI64>,
    /// What each principal holds of each pool.
    shares: crate::share::Shares,
    /// Where connection resets run: shutdown waits for them.
    background: crate::background::Background,
}

/// A checked-out connection, counted in the in-use gauge until it goes back to the pool. When it
/// ran client SQL it is reset first (in a task of its own, off the answer's path); when its call
/// was abandoned mid-statement, the statement is cancelled on the server and the connection closed.
struct Checkout {
    connection: Option<PooledConnection<'static, Manager>>,
    in_use: Arc<AtomicI64>,
    metrics: Metrics,
    /// Client SQL ran on it: reset before reuse.
    dirty: AtomicBool,
    /// A statement is under way: if dropped now, cancel it and close the connection.
    busy: AtomicBool,
    /// A transaction is open: roll it back before the reset.
    in_transaction: AtomicBool,
    /// The caller's share of the pool, given back with the connection (after its reset).
    share: Option<crate::share::Share>,
    /// Where the reset runs.
    background: crate::background::Background,
}

impl Checkout {
    fn client(&self) -> &tokio_postgres::Client {
        &self.connection.as_ref().expect("present until drop").client
    }

    /// Opens a transaction whose statement timeout is its own (`SET LOCAL`), in one round trip.
    async fn begin(&self, read_only: bool, timeout: Duration) -> Result<(), tokio_postgres::Error> {
        let mode = if read_only { " READ ONLY" } else { "" };
        self.dirty.store(true, Ordering::SeqCst);
        self.in_transaction.store(true, Ordering::SeqCst);
        self.client()
            .batch_execute(&format!(
                "START TRANSACTION{mode}; SET LOCAL statement_timeout = {}",
                timeout.as_millis().max(1)
            ))
            .await
    }

    /// Commits and resets the connection in the same round trip, so it goes back to the pool
    /// clean without a second one.
    async fn commit(&self) -> Result<(), tokio_postgres::Error> {
        self.client()
            .batch_execute(&format!("COMMIT; {RESET_SQL}"))
            .await?;
        self.in_transaction.store(false, Ordering::SeqCst);
        self.dirty.store(false, Ordering::SeqCst);
        // DEALLOCATE ALL dropped the statements the driver keeps for type lookups too.
        self.client().clear_type_cache();
        Ok(())
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let now = self.in_use.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.db_pool_in_use(now);
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let busy = self.busy.load(Ordering::SeqCst);
        let dirty = self.dirty.load(Ordering::SeqCst);
        let in_transaction = self.in_transaction.load(Ordering::SeqCst);
        if !busy && !dirty {
            return; // only the replica's own statements ran: back to the pool as it is
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            connection.poisoned = true;
            return;
        };
        // The connection is not back in the pool until it is reset: neither is its share.
        let share = self.share.take();
        let reset = async move {
            let _share = share;
            if busy {
                // Abandoned mid-statement: stop it on the server, never reuse the connection.
                connection.poisoned = true;
                let cancel = connection.client.cancel_token();
                if let Ok(Err(error)) =
                    tokio::time::timeout(RESET_TIMEOUT, cancel.cancel_query(NoTls)).await
                {
                    tracing::debug!(%error, "could not cancel an abandoned query on the server");
                }
                return;
            }
            let reset = if in_transaction {
                format!("ROLLBACK; {RESET_SQL}")
            } else {
                RESET_SQL.to_owned()
            };
            match tokio::time::timeout(RESET_TIMEOUT, connection.client.batch_execute(&reset)).await
            {
                // DEALLOCATE ALL dropped the statements the driver keeps for type lookups too.
                Ok(Ok(())) => connection.client.clear_type_cache(),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "connection reset failed; closing it");
                    connection.poisoned = true;
                }
                Err(_) => connection.poisoned = true,
            }
        };
        self.background.spawn_on(reset, &runtime);
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
    /// Pools for `config`. Connections are opened on demand: a database that is down at start-up
    /// makes calls fail with [`DbError::Unavailable`] until it is back, instead of failing the
    /// replica ([`Database::verify_roles`] checks the roles once at start).
    ///
    /// # Errors
    /// When a URL does not parse.
    pub fn connect(
        config: DbConfig,
        metrics: Metrics,
        background: crate::background::Background,
    ) -> Result<Self, DbError> {
        let connect_errors = LastConnectError::default();
        let pool = Self::pool(
            &config,
            &config.url,
            ("SHOAL_DATABASE_URL", "reads"),
            &connect_errors,
        )?;
        let write_pool = match &config.write_url {
            Some(url) => Some(Self::pool(
                &config,
                url,
                ("SHOAL_DATABASE_WRITE_URL", "writes"),
                &connect_errors,
            )?),
            None => None,
        };
        metrics.db_pool_size(i64::from(config.pool_max));
        Ok(Self {
            pool,
            write_pool,
            connect_errors,
            config: Arc::new(config),
            metrics,
            waiting: Arc::new(AtomicI64::new(0)),
            in_use: Arc::new(AtomicI64::new(0)),
            shares: crate::share::Shares::default(),
            background,
        })
    }

    fn pool(
        config: &DbConfig,
        url: &SecretString,
        (variable, purpose): (&'static str, &'static str),
        connect_errors: &LastConnectError,
    ) -> Result<Pool<Manager>, DbError> {
        let mut pg_config: tokio_postgres::Config = url
            .expose_secret()
            .parse()
            .map_err(|_| DbError::Invalid(format!("{variable} is not a valid PostgreSQL URL")))?;
        pg_config.connect_timeout(Duration::from_secs(5));
        pg_config.application_name("shoal");
        // The session default; every transaction also sets its own (SET LOCAL).
        pg_config.options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
        let manager = Manager {
            inner: PostgresConnectionManager::new(pg_config, NoTls),
            purpose,
            allow_privileged: config.allow_privileged_role,
            warned: AtomicBool::new(false),
        };
        Ok(Pool::builder()
            .max_size(config.pool_max.max(1))
            .min_idle(Some(config.pool_min_idle.min(config.pool_max)))
            .connection_timeout(config.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .retry_connection(false)
            .error_sink(Box::new(connect_errors.clone()))
            .build_unchecked(manager))
    }

    /// The configuration.
    pub fn config(&self) -> &DbConfig {
        &self.config
    }

    /// Whether `pg_execute` has a role to run as.
    pub fn writes_configured(&self) -> bool {
        self.write_pool.is_some()
    }

    /// Opens one connection of each pool, which checks its role: [`DbError::Privileged`] when a
    /// role is refused, [`DbError::Unavailable`] when the database cannot be reached (the check
    /// then happens on the first connection that can be made).
    ///
    /// # Errors
    /// See above.
    pub async fn verify_roles(&self) -> Result<(), DbError> {
        drop(self.connection(&self.pool, "reads", None).await?);
        if let Some(pool) = &self.write_pool {
            drop(self.connection(pool, "writes", None).await?);
        }
        Ok(())
    }

    /// A connection of `pool` (`reads` or `writes`) for `holder` (a principal, within its share
    /// of the pool; `None`: counted against no one).
    async fn connection(
        &self,
        pool: &Pool<Manager>,
        purpose: &'static str,
        holder: Option<&Holder>,
    ) -> Result<Checkout, DbError> {
        let share = match holder {
            Some(holder) => Some(
                self.shares
                    .enter(
                        purpose,
                        &holder.id,
                        crate::share::share_of(self.config.pool_max as usize, holder.percent),
                    )
                    .map_err(|held| DbError::Share {
                        held,
                        pool: self.config.pool_max,
                    })?,
            ),
            None => None,
        };
        let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.db_pool_waiting(now);
        let _waiting = Waiting(&self.waiting, &self.metrics);
        let start = Instant::now();
        let result = pool.get_owned().await;
        self.metrics.db_pool_wait(start.elapsed());
        match result {
            Ok(connection) => {
                let now = self.in_use.fetch_add(1, Ordering::SeqCst) + 1;
                self.metrics.db_pool_in_use(now);
                Ok(Checkout {
                    connection: Some(connection),
                    in_use: self.in_use.clone(),
                    metrics: self.metrics.clone(),
                    dirty: AtomicBool::new(false),
                    busy: AtomicBool::new(false),
                    in_transaction: AtomicBool::new(false),
                    share,
                    background: self.background.clone(),
                })
            }
            // Busy, unless the connections it waited for could not be made.
            Err(RunError::TimedOut) => match self.connect_errors.since(start) {
                Some(ConnectFailure::Privileged(message)) => Err(DbError::Privileged(message)),
                Some(ConnectFailure::Unreachable) => Err(DbError::Unavailable),
                None => Err(DbError::PoolTimeout(self.config.acquire_timeout)),
            },
            Err(RunError::User(ConnectError::Privileged(message))) => {
                Err(DbError::Privileged(message))
            }
            Err(RunError::User(ConnectError::Pg(_))) => Err(DbError::Unavailable),
        }
    }

    fn pg(&self, error: tokio_postgres::Error) -> DbError {
        DbError::from_pg(error, self.config.statement_timeout)
    }

    /// Runs one step of client SQL on `checkout`: marked busy while it runs (so an abandoned call
    /// cancels it on the server), and cancelled on the server when `cancel` fires, after which the
    /// connection is closed rather than reused.
    async fn cancellable<T>(
        &self,
        checkout: &Checkout,
        cancel: &CancellationToken,
        step: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        checkout.busy.store(true, Ordering::SeqCst);
        let result = tokio::select! {
            result = step => result.map_err(|e| self.pg(e)),
            () = cancel.cancelled() => return Err(DbError::Cancelled), // still busy: drop cancels
        };
        checkout.busy.store(false, Ordering::SeqCst);
        result
    }

    /// Runs one read-only query (SELECT, WITH … SELECT, VALUES or TABLE) as a subquery of the
    /// wrapper, in a read-only transaction, and returns its rows as JSON up to the row cap and the
    /// byte budget.
    ///
    /// # Errors
    /// See [`DbError`]; any write attempt is [`DbError::ReadOnly`], anything that is not one
    /// query [`DbError::NotAQuery`].
    pub async fn read(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
        holder: Option<&Holder>,
    ) -> Result<QueryOutput, DbError> {
        let sql = trim_statement(sql)?;
        let span = db_span("SELECT", first_table(sql));
        let result = self
            .observed(
                "SELECT",
                &span,
                self.read_inner(sql, params, cancel, holder),
            )
            .await;
        if let Ok(output) = &result {
            span.set(attr::DB_RESPONSE_RETURNED_ROWS, output.rows.len() as i64);
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
        holder: Option<&Holder>,
    ) -> Result<QueryOutput, DbError> {
        let checkout = self.connection(&self.pool, "reads", holder).await?;
        let cap = self.config.row_cap;
        let budget = self.config.max_result_bytes;
        checkout
            .begin(true, self.config.statement_timeout)
            .await
            .map_err(|e| self.pg(e))?;
        // Parsed alone first: one complete statement (balanced, no second command), its columns
        // and parameter types.
        let statement = self
            .cancellable(&checkout, cancel, checkout.client().prepare(sql))
            .await?;
        let columns = columns_of(&statement);
        let values = bind(statement.params(), params)?;
        // PostgreSQL serializes each row itself, whatever the types, and says how long it is: a
        // row over the budget is never sent. The newline ends a trailing `--` comment.
        let wrapped = wrap_query(sql, cap + 1, budget);
        let typed = values.iter().zip(statement.params()).map(|(value, ty)| {
            (
                value.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync),
                ty.clone(),
            )
        });
        let rows = self
            .cancellable(&checkout, cancel, async {
                let stream = checkout.client().query_typed_raw(&wrapped, typed).await?;
                collect_rows(stream, cap, budget).await
            })
            .await
            .map_err(not_a_query)?;
        checkout.commit().await.map_err(|e| self.pg(e))?;
        let (texts, truncated) = rows;
        let rows = texts
            .iter()
            .map(|text| {
                serde_json::from_str(text).map_err(|e| DbError::Other {
                    sqlstate: None,
                    detail: format!("a row is not JSON: {e}"),
                })
            })
            .collect::<Result<Vec<Value>, _>>()?;
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
        holder: Option<&Holder>,
    ) -> Result<WriteOutput, DbError> {
        let sql = trim_statement(sql)?;
        data_modifying_only(sql)?;
        let span = db_span("WRITE", first_table(sql));
        self.observed(
            "WRITE",
            &span,
            self.write_inner(sql, params, cancel, holder),
        )
        .await
    }

    async fn write_inner(
        &self,
        sql: &str,
        params: &[Value],
        cancel: &CancellationToken,
        holder: Option<&Holder>,
    ) -> Result<WriteOutput, DbError> {
        let pool = self.write_pool.as_ref().ok_or(DbError::NoWrites)?;
        let checkout = self.connection(pool, "writes", holder).await?;
        checkout
            .begin(false, self.config.statement_timeout)
            .await
            .map_err(|e| self.pg(e))?;
        let client = checkout.client();
        let statement = self
            .cancellable(&checkout, cancel, client.prepare(sql))
            .await?;
        let values = bind(statement.params(), params)?;
        let refs = as_refs(&values);
        let rows_affected = self
            .cancellable(&checkout, cancel, client.execute(&statement, &refs))
            .await?;
        // This transaction's own table statistics say exactly which tables it changed.
        let changed = client
            .query(
                "SELECT schemaname || '.' || relname FROM pg_stat_xact_user_tables \
                 WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY 1",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        checkout.commit().await.map_err(|e| self.pg(e))?;
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
            let checkout = self.connection(&self.pool, "reads", None).await?;
            let rows = checkout
                .client()
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
    pub async fn describe(
        &self,
        table: &str,
        holder: Option<&Holder>,
    ) -> Result<TableInfo, DbError> {
        let span = db_span("DESCRIBE", Some(table));
        self.observed("DESCRIBE", &span, self.describe_inner(table, holder))
            .await
    }

    async fn describe_inner(
        &self,
        table: &str,
        holder: Option<&Holder>,
    ) -> Result<TableInfo, DbError> {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let checkout = self.connection(&self.pool, "reads", holder).await?;
        let connection = checkout.client();
        let columns = connection
            .query(
                "SELECT column_name, data_type, is_nullable = 'YES', column_default FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&schema, &name],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if columns.is_empty() {
            return Err(DbError::NoSuchTable(format!("{schema}.{name}")));
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
        let checkout = self.connection(&self.pool, "reads", None).await?;
        let rows = checkout
            .client()
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
        let checkout = self.connection(&self.pool, "reads", None).await?;
        checkout
            .client()
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }
}

/// The wrapped query's rows (each one's length and JSON text), until `cap` rows or `budget` bytes.
async fn collect_rows(
    stream: tokio_postgres::RowStream,
    cap: usize,
    budget: usize,
) -> Result<(Vec<String>, Option<Truncation>), tokio_postgres::Error> {
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0_usize;
    while let Some(row) = stream.try_next().await? {
        if rows.len() == cap {
            return Ok((rows, Some(Truncation::RowCap)));
        }
        let length = usize::try_from(row.get::<_, i32>(0)).unwrap_or(usize::MAX);
        let text: Option<String> = row.get(1);
        bytes = bytes.saturating_add(length);
        match text {
            Some(text) if bytes <= budget => rows.push(text),
            _ => return Ok((rows, Some(Truncation::ByteBudget))),
        }
    }
    Ok((rows, None))
}

/// A statement valid alone but not as a subquery (a data-modifying WITH, say) is not a query.
fn not_a_query(error: DbError) -> DbError {
    match error {
        DbError::Rejected { sqlstate, .. }
        | DbError::Other {
            sqlstate: Some(sqlstate),
            ..
        } if sqlstate == SqlState::FEATURE_NOT_SUPPORTED || sqlstate == SqlState::SYNTAX_ERROR => {
            DbError::NotAQuery("this statement is not one (use pg_execute for writes)")
        }
        other => other,
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
            KeyValue::new(attr::DB_SYSTEM_NAME, "postgresql"),
            KeyValue::new(attr::DB_OPERATION_NAME, operation),
        ];
        if let Some(table) = collection {
            attributes.push(KeyValue::new(attr::DB_COLLECTION_NAME, table.to_owned()));
        }
        attributes
    })
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

/// The wrapper every read runs in: the client's statement only ever as a subquery (after a newline,
/// so a trailing `--` comment ends before the wrapper goes on), at most `limit` rows, each row
/// serialized by PostgreSQL with its length, and sent only when it fits in `budget` bytes.
fn wrap_query(sql: &str, limit: usize, budget: usize) -> String {
    format!(
        "SELECT octet_length(shoal_json), CASE WHEN octet_length(shoal_json) <= {budget} THEN shoal_json END \
         FROM (SELECT row_to_json(shoal_row)::text AS shoal_json \
         FROM (SELECT * FROM ({sql}\n) AS shoal_query LIMIT {limit}) AS shoal_row) AS shoal_rows"
    )
}

/// Accepts exactly one data-modifying statement (INSERT, UPDATE, DELETE, MERGE, each optionally
/// after a WITH clause), parsed, not pattern-matched: the writer role may change rows, never itself
/// (`ALTER ROLE CURRENT_USER SET default_transaction_read_only = on` would lock every replica out
/// of writes once connections recycle; `… PASSWORD` out of the database), the schema, session
/// settings or anything else. What the parser does not understand is refused too.
fn data_modifying_only(sql: &str) -> Result<(), DbError> {
    use sqlparser::{
        ast::{SetExpr, Statement},
        dialect::PostgreSqlDialect,
        parser::Parser,
    };
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|error| {
        DbError::NotAWrite(format!("the statement could not be parsed ({error})"))
    })?;
    let [statement] = statements.as_slice() else {
        return Err(DbError::NotAWrite(format!(
            "got {} statements",
            statements.len()
        )));
    };
    let modifies = match statement {
        Statement::Insert { .. }
        | Statement::Update { .. }
        | Statement::Delete { .. }
        | Statement::Merge { .. } => true,
        Statement::Query(query) => matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ),
        _ => false,
    };
    if modifies {
        Ok(())
    } else {
        let kind = statement.to_string();
        let kind: String = kind
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        Err(DbError::NotAWrite(format!("refused: {kind} …")))
    }
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
    fn writes_are_data_modifying_statements_only() {
        for sql in [
            "INSERT INTO items (name) VALUES ($1)",
            "UPDATE items SET name = 'x' WHERE id = 1",
            "DELETE FROM items WHERE id = $1 RETURNING id",
            "MERGE INTO items t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "WITH gone AS (SELECT 1) INSERT INTO items (name) SELECT 'x' FROM gone",
        ] {
            assert!(data_modifying_only(sql).is_ok(), "{sql}");
        }
        for sql in [
            "ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
            "ALTER ROLE CURRENT_USER PASSWORD 'x'",
            "SET statement_timeout = 0",
            "SELECT pg_advisory_lock(1)",
            "CREATE TABLE t (id int)",
            "DROP TABLE items",
            "TRUNCATE items",
            "GRANT SELECT ON items TO PUBLIC",
            "COPY items TO PROGRAM 'id'",
            "DO $$ BEGIN PERFORM 1; END $$",
            "INSERT INTO items VALUES (1); DROP TABLE items",
            "VACUUM items",
            "not sql at all",
        ] {
            assert!(
                matches!(data_modifying_only(sql), Err(DbError::NotAWrite(_))),
                "{sql}"
            );
        }
    }

    #[test]
    fn statements_are_trimmed() {
        assert_eq!(trim_statement(" SELECT 1 ;; ").expect("ok"), "SELECT 1");
        assert!(trim_statement(" ; ").is_err());
    }

    proptest::proptest! {
        /// The SQL wrapper, on hostile text: nothing panics, the client's statement always sits
        /// inside the subquery followed by a newline (a trailing `--` cannot reach the wrapper),
        /// and the table named in telemetry is an identifier, never a value.
        #[test]
        fn the_sql_wrapper_keeps_client_text_inside_its_subquery(sql in ".{0,200}", limit in 1_usize..10_000, budget in 1_usize..10_000_000) {
            if let Ok(statement) = trim_statement(&sql) {
                let wrapped = wrap_query(statement, limit, budget);
                let inner = format!("FROM ({statement}\n) AS shoal_query LIMIT {limit}) AS shoal_row");
                proptest::prop_assert!(wrapped.contains(&inner));
                proptest::prop_assert!(wrapped.starts_with("SELECT octet_length(shoal_json)"));
                if let Some(table) = first_table(statement) {
                    proptest::prop_assert!(table.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '"')));
                }
            }
        }
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
