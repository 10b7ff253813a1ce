//! The test kit: a raw MCP client, real-process cluster topologies (Redis,
//! PostgreSQL, replicas, nginx), fake JSON-RPC upstreams and an in-memory OTLP receiver.

pub mod client;
pub mod oidc;
pub mod otlp;
pub mod postgres;
pub mod topology;
pub mod upstream;
