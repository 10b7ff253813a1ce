//! Small pieces replicas agree on: a secret every replica shares, leases (one holder at a time),
//! and whole maps replaced at once.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::{collections::BTreeMap, sync::LazyLock, time::Duration};

use fred::{interfaces::HashesInterface, prelude::Value, types::scripts::Script};
use tokio::time::Instant;

use super::{Backend, BackendResult, memory::MemoryBackend, redis::RedisBackend};
use crate::telemetry::attr;

impl Backend {
    /// A secret shared by every replica: `candidate` is stored unless one exists; the stored value
    /// is returned.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn shared_secret(&self, name: &str, candidate: &str) -> BackendResult<String> {
        delegate!(self, "shared_secret", shared_secret(name, candidate))
    }

    /// Takes or renews the lease `key` for `holder`; returns whether `holder` holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn lease(&self, key: &str, holder: &str, ttl: Duration) -> BackendResult<bool> {
        delegate!(self, "lease", lease(key, holder, ttl))
    }

    /// Reads a small shared map (e.g. the PostgreSQL change signatures).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn map_get_all(
        &self,
        key: &str,
    ) -> BackendResult<std::collections::BTreeMap<String, String>> {
        delegate!(self, "map_get_all", map_get_all(key))
    }

    /// Replaces a small shared map.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn map_replace(
        &self,
        key: &str,
        entries: &std::collections::BTreeMap<String, String>,
    ) -> BackendResult<()> {
        delegate!(self, "map_replace", map_replace(key, entries))
    }
}

impl RedisBackend {
    pub(super) async fn shared_secret(&self, name: &str, candidate: &str) -> BackendResult<String> {
        self.eval(
            &SHARED_SECRET_SCRIPT,
            vec![self.inner.keys.secret(name)],
            vec![candidate.into()],
        )
        .await
    }

    pub(super) async fn lease(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let held: i64 = self
            .eval(
                &LEASE_SCRIPT,
                vec![key.to_owned()],
                vec![holder.into(), Value::from(ttl.as_millis().max(1) as i64)],
            )
            .await?;
        Ok(held == 1)
    }

    pub(super) async fn map_get_all(
        &self,
        key: &str,
    ) -> BackendResult<std::collections::BTreeMap<String, String>> {
        let map: std::collections::HashMap<String, String> = self.client().hgetall(key).await?;
        Ok(map.into_iter().collect())
    }

    pub(super) async fn map_replace(
        &self,
        key: &str,
        entries: &std::collections::BTreeMap<String, String>,
    ) -> BackendResult<()> {
        let args: Vec<Value> = entries
            .iter()
            .flat_map(|(k, v)| [Value::from(k.as_str()), Value::from(v.as_str())])
            .collect();
        let _: i64 = self
            .eval(&MAP_REPLACE_SCRIPT, vec![key.to_owned()], args)
            .await?;
        Ok(())
    }
}

impl MemoryBackend {
    pub(super) fn shared_secret(&self, name: &str, candidate: &str) -> String {
        self.state()
            .secrets
            .entry(name.to_owned())
            .or_insert_with(|| candidate.to_owned())
            .clone()
    }

    pub(super) fn lease(&self, key: &str, holder: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        match state.leases.get(key) {
            Some((current, expires)) if *expires > now && current != holder => false,
            _ => {
                state
                    .leases
                    .insert(key.to_owned(), (holder.to_owned(), now + ttl));
                true
            }
        }
    }

    pub(super) fn map_get_all(&self, key: &str) -> BTreeMap<String, String> {
        self.state().maps.get(key).cloned().unwrap_or_default()
    }

    pub(super) fn map_replace(&self, key: &str, entries: &BTreeMap<String, String>) {
        self.state().maps.insert(key.to_owned(), entries.clone());
    }
}

/// KEYS: secret. ARGV: candidate value. Stores the candidate unless a value exists; returns the
/// stored value, so every replica ends up with the same one.
pub const SHARED_SECRET: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return ARGV[1] end
return redis.call('GET', KEYS[1])
";

/// KEYS: lease. ARGV: holder, ttl ms. Takes the lease when free, renews it when `holder` has it.
/// Returns 1 when `holder` holds it afterwards.
pub const LEASE: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// KEYS: hash. ARGV: field, value, field, value... Replaces the hash.
pub const MAP_REPLACE: &str = r"
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
";

pub(super) static SHARED_SECRET_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SHARED_SECRET));
pub(super) static LEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(LEASE));
pub(super) static MAP_REPLACE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(MAP_REPLACE));
