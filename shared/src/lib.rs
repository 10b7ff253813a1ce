//! shoal's infrastructure: everything a replica needs that is not MCP.
//!
//! This crate knows bytes, JSON text, Redis and HTTP; it does not depend on rmcp. The server crate
//! adapts it to rmcp's traits.
//!
//! Layout:
//! - [`config`]: the single configuration tree (flags and `SHOAL_*` variables).
//! - [`keys`]: the only place Redis key and channel names are built.
//! - [`ids`]: replica tags and event ids.
//! - [`backend`]: shared state in Redis, or in memory for the embedded default.
//! - [`bus`]: the in-process demultiplexer of cluster messages.
//! - [`cache`]: the shared TTL result cache with cluster-wide single flight.
//! - [`db`]: PostgreSQL through a bounded pool.
//! - [`rpc`]: JSON-RPC upstreams with client-side load balancing and fallback.
//! - [`feed`]: resumable, cluster-wide GET streams over the event log.
//! - [`metrics`]: Prometheus metrics.
//! - [`telemetry`]: logging set-up.
#![warn(missing_docs)]

pub mod backend;
pub mod background;
pub mod bus;
pub mod cache;
pub mod config;
pub mod db;
pub mod feed;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod rpc;
pub mod share;
pub mod telemetry;
