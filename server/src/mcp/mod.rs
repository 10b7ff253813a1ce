//! Everything that speaks MCP: the handler, the cluster session manager, and the rmcp session-store
//! adapter over the shared backend.

pub mod cluster;
pub mod error;
pub mod handler;
pub mod store;
pub mod trace;
