//! rmcp's [`SessionStore`] over the shared backend: what a replica restores a session from.

use rmcp::{
    model::InitializeRequestParams,
    transport::streamable_http_server::session::{SessionState, SessionStore, SessionStoreError},
};
use shoal_shared::backend::Backend;

/// Session records in Redis (or memory), keyed by session id.
#[derive(Debug, Clone)]
pub struct ClusterSessionStore {
    backend: Backend,
}

impl ClusterSessionStore {
    /// A store over `backend`.
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }
}

#[async_trait::async_trait]
impl SessionStore for ClusterSessionStore {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        let Some(json) = self.backend.session_load(session_id).await? else {
            return Ok(None);
        };
        let params: InitializeRequestParams = serde_json::from_str(&json)?;
        Ok(Some(SessionState::new(params)))
    }

    async fn store(
        &self,
        _session_id: &str,
        _state: &SessionState,
    ) -> Result<(), SessionStoreError> {
        // Already written by ClusterSessionManager::initialize_session, where a failure can still
        // fail the handshake (rmcp ignores errors returned here and hands the session out anyway).
        Ok(())
    }

    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        self.backend.session_delete(session_id).await?;
        Ok(())
    }
}
