//! Integration tests: real shoal-server processes, real Redis, PostgreSQL and nginx, fake JSON-RPC
//! upstreams on real sockets. See `helpers`.

mod admin_endpoints;
mod auth;
mod backend_contract;
mod bad_input;
mod bus_frames;
mod cache;
mod cluster;
mod database_security;
mod deploy_assets;
mod embedded;
mod failover;
mod helpers;
mod interop;
mod isolation;
mod postgres;
mod quota;
mod resilience;
mod rpc;
mod session_security;
mod stale_writes;
mod telemetry;
mod toolsets;
