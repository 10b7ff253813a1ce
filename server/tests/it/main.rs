//! Integration tests: real shoal-server processes, real Redis, real nginx. See `helpers`.

mod cluster;
mod embedded;
mod helpers;
