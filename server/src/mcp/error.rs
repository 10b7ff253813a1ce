//! The single mapping from infrastructure failures to what clients see. Details go to the log,
//! never to the client.

use rmcp::ErrorData as McpError;
use shoal_shared::backend::BackendError;

/// The shared state backend failed during `operation`: log the cause once, answer generically.
pub fn unavailable(operation: &'static str, cause: &BackendError) -> McpError {
    tracing::warn!(operation, error = %cause, "shared state unavailable");
    McpError::internal_error(
        "shared state is temporarily unavailable; retry shortly",
        None,
    )
}
