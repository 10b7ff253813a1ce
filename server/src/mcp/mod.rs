//! Everything that speaks MCP: the handler (and its call pipeline), the one error mapping, the
//! request spans, and the sessions of legacy clients across the cluster.

pub mod error;
pub mod handler;
pub mod listen;
pub mod session;
pub mod trace;
