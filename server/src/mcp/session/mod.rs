//! Legacy (sessionful) MCP sessions across the cluster: the session manager mounted in rmcp
//! (liveness, GET streams over the event log, forwarded responses and cancellations, DELETE and
//! admission) and the session store rmcp restores a session from.

pub mod manager;
pub mod store;

pub use manager::{ClusterOptions, ClusterSessionManager};
pub use store::ClusterSessionStore;
