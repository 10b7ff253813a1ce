//! Legacy session records: created at initialize, their idle TTL sliding with use, their fields
//! (owner, log level...), deleted with everything hanging off them.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::{
    collections::{HashMap, HashSet},
    sync::LazyLock,
};

use fred::{
    interfaces::{HashesInterface, KeysInterface, SetsInterface},
    prelude::Value,
    types::scripts::Script,
};
use tokio::time::Instant;

use super::{
    Backend, BackendError, BackendResult,
    memory::{MemoryBackend, SessionRecord},
    redis::RedisBackend,
};
use crate::{bus::BusMessage, telemetry::attr};

/// The field of a session record that names its owning principal.
pub const OWNER_FIELD: &str = "owner";

impl Backend {
    /// Records a new legacy session with its initialize params (JSON).
    ///
    /// # Errors
    /// Fails when Redis is unreachable; the session must then not be handed to the client.
    pub async fn session_create(
        &self,
        session: &str,
        init: &str,
        owner: &str,
    ) -> BackendResult<()> {
        delegate!(self, "session_create", session_create(session, init, owner))
    }

    /// The principal that owns a session (recorded at its creation), or `None` when the session
    /// does not exist.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_owner(&self, session: &str) -> BackendResult<Option<String>> {
        self.session_get_field(session, OWNER_FIELD).await
    }

    /// Slides the session's idle TTL. Returns `false` when the session does not exist (deleted or
    /// expired).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_touch(&self, session: &str) -> BackendResult<bool> {
        delegate!(self, "session_touch", session_touch(session))
    }

    /// Loads a session's initialize params (JSON), sliding its TTL.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_load(&self, session: &str) -> BackendResult<Option<String>> {
        delegate!(self, "session_load", session_load(session))
    }

    /// Deletes a session everywhere: its record, event log and subscriptions; every replica is told
    /// on the control channel. Returns whether it existed.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_delete(&self, session: &str) -> BackendResult<bool> {
        delegate!(self, "session_delete", session_delete(session))
    }

    /// Sets a small per-session field (e.g. the logging level). Returns `false` when the session is
    /// gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_set_field(
        &self,
        session: &str,
        field: &str,
        value: &str,
    ) -> BackendResult<bool> {
        delegate!(
            self,
            "session_set_field",
            session_set_field(session, field, value)
        )
    }

    /// Reads a per-session field.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn session_get_field(
        &self,
        session: &str,
        field: &str,
    ) -> BackendResult<Option<String>> {
        delegate!(self, "session_get_field", session_get_field(session, field))
    }
}

impl RedisBackend {
    /// Whether each of `sessions` still exists, asked concurrently (each record in its own slot):
    /// one answer per session, in order.
    pub(super) async fn sessions_exist(&self, sessions: &[String]) -> Vec<BackendResult<bool>> {
        let asked = sessions.iter().map(|session| async move {
            self.client()
                .exists::<i64, _>(self.inner.keys.session(session))
                .await
                .map(|count| count > 0)
                .map_err(BackendError::from)
        });
        futures::future::join_all(asked).await
    }

    pub(super) fn ttl(&self) -> Value {
        Value::from(self.inner.config.session_ttl_secs() as i64)
    }

    pub(super) async fn session_create(
        &self,
        session: &str,
        init: &str,
        owner: &str,
    ) -> BackendResult<()> {
        let _: Value = self
            .eval(
                &SESSION_CREATE_SCRIPT,
                vec![self.inner.keys.session(session)],
                vec![init.into(), self.ttl(), owner.into()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn session_touch(&self, session: &str) -> BackendResult<bool> {
        let ttl = self.inner.config.session_ttl_secs() as i64;
        Ok(self
            .client()
            .expire(self.inner.keys.session(session), ttl, None)
            .await?)
    }

    pub(super) async fn session_load(&self, session: &str) -> BackendResult<Option<String>> {
        self.eval(
            &SESSION_LOAD_SCRIPT,
            vec![self.inner.keys.session(session)],
            vec![self.ttl()],
        )
        .await
    }

    pub(super) async fn session_delete(&self, session: &str) -> BackendResult<bool> {
        // The session's keys first (one slot), then the subscriber sets of its resources, each in
        // its resource's slot. One left behind (a crash in between, a failed SREM) names a session
        // that is gone: the next fanout to that resource, or the janitor, drops it.
        let reply: Vec<Value> = self
            .eval(
                &SESSION_DELETE_SCRIPT,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                    self.inner.keys.seen(session),
                ],
                vec![
                    self.inner.keys.control_channel().into(),
                    BusMessage::SessionDeleted { session }.encode().into(),
                ],
            )
            .await?;
        let existed = reply.first().and_then(Value::as_i64) == Some(1);
        let removals = reply.iter().skip(1).filter_map(Value::as_string).map(|uri| {
            let key = self.inner.keys.subscribers(&uri);
            async move {
                let removed: Result<i64, _> = self.client().srem(key, session).await;
                if let Err(error) = removed {
                    tracing::debug!(%error, "a deleted session stays in a subscriber set until the next fanout prunes it");
                }
            }
        });
        futures::future::join_all(removals).await;
        Ok(existed)
    }

    pub(super) async fn session_set_field(
        &self,
        session: &str,
        field: &str,
        value: &str,
    ) -> BackendResult<bool> {
        let set: i64 = self
            .eval(
                &SESSION_SET_FIELD_SCRIPT,
                vec![self.inner.keys.session(session)],
                vec![field.into(), value.into(), self.ttl()],
            )
            .await?;
        Ok(set == 1)
    }

    pub(super) async fn session_get_field(
        &self,
        session: &str,
        field: &str,
    ) -> BackendResult<Option<String>> {
        Ok(self
            .client()
            .hget(self.inner.keys.session(session), field)
            .await?)
    }
}

impl MemoryBackend {
    pub(super) fn session_create(&self, session: &str, init: &str, owner: &str) {
        let expires_at = Instant::now() + self.inner.config.session_ttl;
        self.state().sessions.insert(
            session.to_owned(),
            SessionRecord {
                init: init.to_owned(),
                fields: HashMap::from([(super::OWNER_FIELD.to_owned(), owner.to_owned())]),
                subscriptions: HashSet::new(),
                feed: None,
                cursor: None,
                expires_at,
            },
        );
    }

    pub(super) fn session_touch(&self, session: &str) -> bool {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        match state.live_session(session, now) {
            Some(record) => {
                record.expires_at = now + ttl;
                true
            }
            None => false,
        }
    }

    pub(super) fn session_load(&self, session: &str) -> Option<String> {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        state.live_session(session, now).map(|record| {
            record.expires_at = now + ttl;
            record.init.clone()
        })
    }

    pub(super) fn session_delete(&self, session: &str) -> bool {
        let existed = {
            let mut state = self.state();
            let now = Instant::now();
            let live = state.live_session(session, now).is_some();
            if let Some(record) = state.sessions.remove(session) {
                for uri in record.subscriptions {
                    if let Some(set) = state.subscribers.get_mut(&uri) {
                        set.remove(session);
                    }
                }
            }
            state.logs.remove(session);
            live
        };
        if existed {
            self.publish(
                &self.inner.bus.keys().control_channel(),
                &BusMessage::SessionDeleted { session }.encode(),
            );
        }
        existed
    }

    pub(super) fn session_set_field(&self, session: &str, field: &str, value: &str) -> bool {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        match state.live_session(session, now) {
            Some(record) => {
                record.fields.insert(field.to_owned(), value.to_owned());
                record.expires_at = now + ttl;
                true
            }
            None => false,
        }
    }

    pub(super) fn session_get_field(&self, session: &str, field: &str) -> Option<String> {
        let mut state = self.state();
        state
            .live_session(session, Instant::now())
            .and_then(|record| record.fields.get(field).cloned())
    }
}

/// KEYS: session. ARGV: initialize params JSON, ttl, owning principal.
pub const SESSION_CREATE: &str = r"
redis.call('HSET', KEYS[1], 'init', ARGV[1], 'owner', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
";

/// KEYS: session. ARGV: ttl. Returns the initialize params and slides the TTL.
pub const SESSION_LOAD: &str = r"
local init = redis.call('HGET', KEYS[1], 'init')
if init then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return init
";

/// KEYS: session, event log, seen changes. ARGV: control channel, message. Deletes the session's
/// keys and, when it existed, tells every replica. Returns `{existed, uri...}`: the resources it
/// was subscribed to, whose subscriber sets (in other slots) the caller cleans.
pub const SESSION_DELETE: &str = r"
local out = {0}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 4) == 'sub:' then out[#out + 1] = string.sub(field, 5) end
end
out[1] = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
if out[1] == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return out
";

/// KEYS: session. ARGV: field, value, ttl. Returns 0 when the session is gone.
pub const SESSION_SET_FIELD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

pub(super) static SESSION_CREATE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SESSION_CREATE));
pub(super) static SESSION_LOAD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SESSION_LOAD));
pub(super) static SESSION_DELETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SESSION_DELETE));
pub(super) static SESSION_SET_FIELD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SESSION_SET_FIELD));
