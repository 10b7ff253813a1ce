//! The test kit: a raw MCP client, real-process cluster topologies (Redis,
//! PostgreSQL, replicas, nginx), fake JSON-RPC upstreams, an in-memory OTLP receiver and a TCP
//! proxy that injects network faults, with an HTTP control endpoint for faults.

pub mod client;
pub mod control;
pub mod fault;
pub mod oidc;
pub mod otlp;
pub mod postgres;
pub mod redis_cluster;
pub mod sentinel;
pub mod topology;
pub mod upstream;
