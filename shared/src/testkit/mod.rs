//! Test kit (feature `testkit`): a raw MCP client and real-process cluster topologies.

pub mod client;
pub mod topology;
