//! Test kit (feature `testkit`): a raw MCP client, real-process cluster topologies (Redis,
//! PostgreSQL, replicas, nginx) and fake JSON-RPC upstreams.

pub mod client;
pub mod postgres;
pub mod topology;
pub mod upstream;
