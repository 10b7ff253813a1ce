//! The state every request shares: built once at start, then only read (cheap `Arc` clones).

use std::sync::{Arc, atomic::AtomicBool};

use rmcp::{handler::server::router::tool::ToolRouter, model::ServerConfig};
use shoal_shared::{backend::Backend, bus::Bus, config::Config, metrics::Metrics};

use crate::{mcp::handler::ShoalHandler, tools::Catalog};

/// Shared by every handler, request and background task of a replica.
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Shared state (Redis or memory).
    pub backend: Backend,
    /// The replica's message demultiplexer.
    pub bus: Bus,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Tools of the enabled toolsets.
    pub tools: ToolRouter<ShoalHandler>,
    /// Resources, templates and prompts of the enabled toolsets.
    pub catalog: Catalog,
    /// What `initialize` announces.
    pub server_info: ServerConfig,
    /// Set when shutdown began: `/readyz` answers 503.
    pub draining: AtomicBool,
}
