//! Integration tests: real shoal-server processes, real Redis, real nginx. See `helpers`.

mod bad_input;
mod cluster;
mod embedded;
mod helpers;
mod resilience;
