//! The one mapping from failures inside the server to what a client sees.
//!
//! Handlers and tools return [`Failure`] (or use `?` on a `Result<_, Failure>` where an
//! [`McpError`] is expected): the `From` conversions below are the only place that decides the
//! code and text a client gets. The cause is logged there, once; a client gets a stable message
//! and, in `data.reason`, a machine-readable reason, never the internal detail (driver messages,
//! Redis errors, serializer errors).
//!
//! Refusals of a client's own input (bad arguments, a statement PostgreSQL rejects, a missing
//! resource) are not failures: they are answered where they are found, with the client's own
//! words.

use rmcp::transport::streamable_http_server::session::local::LocalSessionManagerError;
use rmcp::{
    ErrorData as McpError,
    model::{CallToolResult, ContentBlock},
};
use serde_json::json;
use shoal_shared::{backend::BackendError, db::DbError, feed::FeedError, rpc::RpcError};

/// Something inside the server went wrong while answering a request.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The shared state backend (Redis) did not answer `operation`.
    #[error("shared state unavailable during {operation}: {cause}")]
    SharedState {
        /// What was being done, for the log.
        operation: &'static str,
        /// The backend's error.
        #[source]
        cause: BackendError,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The JSON-RPC upstreams failed. Their messages are written for clients: endpoints appear
    /// by their `host:port` label only, never with the path or query that may carry a key.
    #[error(transparent)]
    Upstream(#[from] RpcError),
    /// The MRTR request-state key could not be loaded.
    #[error("request-state key unavailable: {0}")]
    RequestState(#[source] BackendError),
    /// This replica holds as many streams as it may.
    #[error("stream limit reached")]
    TooManyStreams,
    /// A bug or an unexpected state: the client learns only that it happened.
    #[error("{what}: {detail}")]
    Internal {
        /// What was being done.
        what: &'static str,
        /// The cause, for the log.
        detail: String,
    },
}

impl Failure {
    /// An unexpected internal failure while doing `what`.
    pub fn internal(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Failure::Internal {
            what,
            detail: detail.to_string(),
        }
    }

    /// The reason a client sees in `data.reason` (and telemetry records).
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::SharedState { .. } => "shared_state_unavailable",
            Failure::Database(error) => error.kind(),
            Failure::Upstream(RpcError::Upstream { .. }) => "upstream_error",
            Failure::Upstream(_) => "upstream_unavailable",
            Failure::RequestState(_) => "request_state_unavailable",
            Failure::TooManyStreams => "too_many_streams",
            Failure::Internal { .. } => "internal",
        }
    }

    /// What the client reads: written here, never taken from a cause.
    fn client_message(&self) -> String {
        match self {
            Failure::SharedState { .. } => {
                "shared state is temporarily unavailable; retry shortly".to_owned()
            }
            Failure::Database(error) => database_message(error),
            Failure::Upstream(RpcError::Config(_)) => {
                "the upstreams are misconfigured; the replica's log has the detail".to_owned()
            }
            Failure::Upstream(error) => error.to_string(),
            Failure::RequestState(_) => {
                "request state cannot be sealed right now; retry shortly".to_owned()
            }
            Failure::TooManyStreams => "this replica has too many open streams; retry later".into(),
            Failure::Internal { .. } => {
                "internal error; the replica's log has the detail".to_owned()
            }
        }
    }

    fn log(&self) {
        match self {
            Failure::Internal { .. } => tracing::error!(error = %self, "internal failure"),
            Failure::TooManyStreams => tracing::debug!("stream refused: limit reached"),
            Failure::Database(error) if !error.is_client_error() => {
                tracing::warn!(%error, "database failure");
            }
            Failure::Database(_) | Failure::Upstream(RpcError::Upstream { .. }) => {}
            _ => tracing::warn!(error = %self, "request failed"),
        }
    }

    /// The failure as a tool result (`isError`): for tools whose callers should read the failure
    /// as the outcome of the call rather than as a protocol error.
    pub fn into_tool_result(self) -> CallToolResult {
        self.log();
        CallToolResult::error(vec![ContentBlock::text(self.client_message())])
    }
}

impl From<Failure> for McpError {
    fn from(failure: Failure) -> Self {
        failure.log();
        McpError::internal_error(
            failure.client_message(),
            Some(json!({"reason": failure.reason()})),
        )
    }
}

/// The text a client reads for a database error: the client's own statement's problems in full,
/// a server-side failure only as its SQLSTATE.
fn database_message(error: &DbError) -> String {
    if error.is_client_error() {
        return error.to_string();
    }
    match error {
        DbError::Other {
            sqlstate: Some(code),
            ..
        } => format!(
            "the database failed to run the statement (SQLSTATE {}); the replica's log has the detail",
            code.code()
        ),
        _ => {
            "the database failed to run the statement; the replica's log has the detail".to_owned()
        }
    }
}

/// Names the operation a shared-state call was doing, turning its error into a [`Failure`].
pub trait During<T> {
    /// `operation` failed because the shared state did not answer.
    ///
    /// # Errors
    /// [`Failure::SharedState`] carrying the backend's error.
    fn during(self, operation: &'static str) -> Result<T, Failure>;
}

impl<T> During<T> for Result<T, BackendError> {
    fn during(self, operation: &'static str) -> Result<T, Failure> {
        self.map_err(|cause| Failure::SharedState { operation, cause })
    }
}

/// Why a session operation of the cluster session manager failed (rmcp's `SessionManager` error
/// type). The text reaches clients (rmcp puts it in 500 bodies), so it never carries
/// infrastructure details; those are logged where the error is handled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The local worker failed.
    #[error("session worker error")]
    Local(#[from] LocalSessionManagerError),
    /// The shared state backend failed (built through `From`, which notes the refusal).
    #[error("shared session state is unavailable")]
    Backend(BackendError),
    /// The session is gone.
    #[error("session not found")]
    SessionGone,
    /// This replica holds as many sessions or streams as it may.
    #[error("replica at capacity")]
    Capacity,
    /// The replica is shutting down.
    #[error("replica is shutting down")]
    ShuttingDown,
    /// The `initialize` message was not an initialize request.
    #[error("malformed initialize request")]
    BadInitialize,
    /// A client's response to a server request (sampling, elicitation, roots) whose replica is
    /// gone: the request was abandoned with it.
    #[error("the replica that sent the request this answers is gone; the request was abandoned")]
    RequesterGone,
    /// A `Last-Event-ID` that does not belong to this session or replica.
    #[error("unknown event id")]
    ForeignEventId,
}

impl From<BackendError> for ClusterError {
    fn from(error: BackendError) -> Self {
        override_status(StatusOverride::SharedState);
        ClusterError::Backend(error)
    }
}

impl From<FeedError> for ClusterError {
    fn from(error: FeedError) -> Self {
        match error {
            FeedError::SessionGone => ClusterError::SessionGone,
            FeedError::ShuttingDown => ClusterError::ShuttingDown,
            FeedError::Backend(error) => ClusterError::from(error),
        }
    }
}

/// Why rmcp's answer to an HTTP request must be replaced: rmcp turns every session-manager error
/// into `500 Internal Server Error`, but some have a better status that clients act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOverride {
    /// The shared state failed during a session operation: `503` with `Retry-After` (retry).
    SharedState,
    /// A client's response to a server request whose replica died: `410 Gone` (the request was
    /// abandoned; the client can drop its pending answer).
    RequesterGone,
}

tokio::task_local! {
    /// The override noted while rmcp handled the current HTTP request ([`override_status`]); scoped
    /// by [`crate::http`] around each request it hands to rmcp.
    pub static STATUS_OVERRIDE: std::cell::Cell<Option<StatusOverride>>;
}

/// Notes why the HTTP request being handled failed, when it is handled in a [`STATUS_OVERRIDE`] scope.
/// The first one noted wins.
pub fn override_status(status: StatusOverride) {
    STATUS_OVERRIDE
        .try_with(|noted| {
            if noted.get().is_none() {
                noted.set(Some(status));
            }
        })
        .ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_never_read_internal_detail() {
        let secret = "password=hunter2 at 10.0.0.7:5432";
        let failures = [
            Failure::SharedState {
                operation: "kv_get",
                cause: BackendError::Protocol(secret.into()),
            },
            Failure::Database(DbError::Other {
                sqlstate: None,
                detail: secret.into(),
            }),
            Failure::Database(DbError::Privileged(secret.into())),
            Failure::RequestState(BackendError::Protocol(secret.into())),
            Failure::internal("serializing a result", secret),
        ];
        for failure in failures {
            let reason = failure.reason();
            let error = McpError::from(failure);
            assert!(!error.message.contains("hunter2"), "{}", error.message);
            assert_eq!(error.data, Some(json!({"reason": reason})));
        }
    }

    #[test]
    fn a_statement_the_database_refuses_is_explained_to_its_author() {
        let refused = Failure::Database(DbError::Rejected {
            sqlstate: shoal_shared::db::SqlState::UNDEFINED_TABLE,
            message: "relation \"nope\" does not exist".into(),
        });
        let result = refused.into_tool_result();
        assert_eq!(result.is_error, Some(true));
        let text = serde_json::to_string(&result.content).expect("json");
        assert!(
            text.contains("relation \\\"nope\\\" does not exist (SQLSTATE 42P01)"),
            "{text}"
        );
    }
}
