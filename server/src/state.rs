//! The state every request shares: built once at start, then only read (cheap `Arc` clones).

use std::sync::{Arc, atomic::AtomicBool};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rmcp::{
    handler::server::router::tool::ToolRouter,
    model::{RequestStateCodec, ServerConfig},
};
use secrecy::ExposeSecret;
use shoal_shared::{
    backend::{Backend, BackendError},
    bus::Bus,
    cache::ResultCache,
    config::Config,
    db::Database,
    metrics::Metrics,
    rpc::RpcPool,
};
use tokio::sync::OnceCell;

use crate::{
    mcp::handler::ShoalHandler,
    tools::{Catalog, policy::Policies},
};

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
    /// Per-tool cache, timeout and concurrency policies.
    pub policies: Policies,
    /// The shared result cache.
    pub cache: ResultCache,
    /// PostgreSQL, when the postgres toolset is on.
    pub db: Option<Database>,
    /// JSON-RPC upstreams, when the rpc toolset is on.
    pub rpc: Option<RpcPool>,
    /// Resources, templates and prompts of the enabled toolsets.
    pub catalog: Catalog,
    /// What `initialize` announces.
    pub server_info: ServerConfig,
    /// Set when shutdown began: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Seals MRTR `requestState`; created on first use (see [`AppState::request_state`]).
    pub request_state: OnceCell<RequestStateCodec>,
}

impl AppState {
    /// The codec that seals MRTR `requestState`. Every replica must use the same key, since each
    /// round of a request may land on another replica: `SHOAL_REQUEST_STATE_KEY` when set, else a
    /// random key the first replica stores in the shared backend for the others.
    ///
    /// # Errors
    /// Fails when the key cannot be read from the shared backend.
    pub async fn request_state(&self) -> Result<&RequestStateCodec, BackendError> {
        self.request_state
            .get_or_try_init(|| async {
                let key = match &self.config.request_state_key {
                    Some(key) => key.expose_secret().as_bytes().to_vec(),
                    None => {
                        let candidate: [u8; 32] = rand::random();
                        let shared = self
                            .backend
                            .shared_secret("request-state", &URL_SAFE_NO_PAD.encode(candidate))
                            .await?;
                        shared.into_bytes()
                    }
                };
                Ok(RequestStateCodec::new_unchecked(key))
            })
            .await
    }
}
