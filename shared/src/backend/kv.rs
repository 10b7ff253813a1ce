//! The key-value scratchpad: bounded, listed in key order; writes carry a deadline Redis checks, so
//! a write reported as failed never lands later.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::sync::LazyLock;

use fred::{
    interfaces::HashesInterface,
    prelude::Value,
    types::{Limit, scripts::Script},
};

use super::{
    Backend, BackendError, BackendResult,
    events::APPEND_FN,
    memory::MemoryBackend,
    redis::RedisBackend,
    subscriptions::{FANOUT_FN, ResourceChange},
};
use crate::{
    bus::{BusMessage, LUA_NETSTRING, ListKind},
    telemetry::attr,
};

/// Outcome of a kv write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSetOutcome {
    /// A new key.
    Created,
    /// An existing key got a new value.
    Updated,
    /// The scratchpad is full.
    Full,
}

impl Backend {
    /// Writes a kv entry and, in the same step, tells the subscribers of its resource (`change`),
    /// and `subscriptions/listen` streams that the resource list changed when the key is new.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_set(
        &self,
        key: &str,
        value: &str,
        change: ResourceChange<'_>,
    ) -> BackendResult<KvSetOutcome> {
        delegate!(self, "kv_set", kv_set(key, value, change))
    }

    /// Reads a kv entry.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_get(&self, key: &str) -> BackendResult<Option<String>> {
        delegate!(self, "kv_get", kv_get(key))
    }

    /// Deletes a kv entry; returns whether it existed. When it did, tells the subscribers of its
    /// resource (`change`) and that the resource list changed, in the same step.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_delete(&self, key: &str, change: ResourceChange<'_>) -> BackendResult<bool> {
        delegate!(self, "kv_delete", kv_delete(key, change))
    }

    /// Lists up to `limit` kv keys in byte order, starting after `after`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn kv_list(&self, after: Option<&str>, limit: u64) -> BackendResult<Vec<String>> {
        delegate!(self, "kv_list", kv_list(after, limit))
    }
}

impl RedisBackend {
    pub(super) async fn kv_set(
        &self,
        key: &str,
        value: &str,
        change: ResourceChange<'_>,
    ) -> BackendResult<KvSetOutcome> {
        let deadline = self.write_deadline().await?;
        let mut args = vec![
            key.into(),
            value.into(),
            Value::from(self.inner.config.kv_max_keys as i64),
            Value::from(deadline),
            BusMessage::ListChanged(ListKind::Resources).encode().into(),
        ];
        args.extend(self.fanout_args(change.uri, change.legacy_payload));
        let outcome: i64 = self
            .eval(&KV_SET_SCRIPT, self.write_keys(change.uri), args)
            .await?;
        match outcome {
            1 => Ok(KvSetOutcome::Created),
            0 => Ok(KvSetOutcome::Updated),
            -1 => Ok(KvSetOutcome::Full),
            -2 => Err(too_late()),
            other => Err(BackendError::Protocol(format!("kv_set returned {other}"))),
        }
    }

    /// The keys of a write's script: the kv hash, its key index, and the subscribers of the
    /// resource it changes.
    fn write_keys(&self, uri: &str) -> Vec<String> {
        vec![
            self.inner.keys.kv(),
            self.inner.keys.kv_index(),
            self.inner.keys.subscribers(uri),
        ]
    }

    pub(super) async fn kv_get(&self, key: &str) -> BackendResult<Option<String>> {
        Ok(self.client().hget(self.inner.keys.kv(), key).await?)
    }

    pub(super) async fn kv_delete(
        &self,
        key: &str,
        change: ResourceChange<'_>,
    ) -> BackendResult<bool> {
        let deadline = self.write_deadline().await?;
        let mut args = vec![
            key.into(),
            Value::from(deadline),
            BusMessage::ListChanged(ListKind::Resources).encode().into(),
        ];
        args.extend(self.fanout_args(change.uri, change.legacy_payload));
        let existed: i64 = self
            .eval(&KV_DELETE_SCRIPT, self.write_keys(change.uri), args)
            .await?;
        match existed {
            1 => Ok(true),
            0 => Ok(false),
            -1 => Err(too_late()),
            other => Err(BackendError::Protocol(format!(
                "kv_delete returned {other}"
            ))),
        }
    }

    pub(super) async fn kv_list(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> BackendResult<Vec<String>> {
        use fred::interfaces::SortedSetsInterface;
        let min = match after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        Ok(self
            .client()
            .zrange(
                self.inner.keys.kv_index(),
                min,
                "+",
                Some(fred::types::sorted_sets::ZSort::ByLex),
                false,
                Some(Limit::from((0, limit as i64))),
                false,
            )
            .await?)
    }
}

/// A write Redis refused to run past its deadline: to the caller, a timeout like any other.
fn too_late() -> BackendError {
    BackendError::Redis(fred::error::Error::new(
        fred::error::ErrorKind::Timeout,
        "redis ran the write after its deadline and refused it",
    ))
}

impl MemoryBackend {
    pub(super) fn kv_set(
        &self,
        key: &str,
        value: &str,
        change: ResourceChange<'_>,
    ) -> KvSetOutcome {
        let outcome = {
            let mut state = self.state();
            if !state.kv.contains_key(key) && state.kv.len() as u64 >= self.inner.config.kv_max_keys
            {
                return KvSetOutcome::Full;
            }
            match state.kv.insert(key.to_owned(), value.to_owned()) {
                None => KvSetOutcome::Created,
                Some(_) => KvSetOutcome::Updated,
            }
        };
        // In memory nothing can fail between the write and the telling.
        self.resource_updated(change.uri, change.legacy_payload);
        if outcome == KvSetOutcome::Created {
            self.list_changed(ListKind::Resources);
        }
        outcome
    }

    pub(super) fn kv_get(&self, key: &str) -> Option<String> {
        self.state().kv.get(key).cloned()
    }

    pub(super) fn kv_delete(&self, key: &str, change: ResourceChange<'_>) -> bool {
        let existed = self.state().kv.remove(key).is_some();
        if existed {
            self.resource_updated(change.uri, change.legacy_payload);
            self.list_changed(ListKind::Resources);
        }
        existed
    }

    pub(super) fn kv_list(&self, after: Option<&str>, limit: u64) -> Vec<String> {
        use std::ops::Bound;
        let state = self.state();
        let lower = after.map_or(Bound::Unbounded, |after| Bound::Excluded(after.to_owned()));
        state
            .kv
            .range((lower, Bound::Unbounded))
            .take(limit as usize)
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// KEYS: kv hash, kv key index (sorted set), the resource's subscriber set. ARGV: key, value, max
/// keys, deadline (µs since the Unix epoch on Redis's clock), the list-changed message, then the
/// eight arguments of `fanout` (see [`super::subscriptions::FANOUT_FN`]). Writes and tells the
/// subscribers (and, for a new key, the listeners of the resource list) in one step. Returns 1
/// (created), 0 (updated), -1 (full) or -2 (run after its deadline: nothing written, nobody told).
pub fn kv_set() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}{FANOUT_FN}
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[4]) then return -2 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
fanout(KEYS[3], ARGV, 6)
if created == 1 then redis.call('PUBLISH', ARGV[12], ARGV[5]) end
return created
"
    )
}

/// KEYS: as [`kv_set`]. ARGV: key, deadline, the list-changed message, then the eight arguments of
/// `fanout`. Deletes and, when the key existed, tells in one step. Returns 1 when the key existed,
/// 0 when not, -1 when run after its deadline (nothing deleted, nobody told).
pub fn kv_delete() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}{FANOUT_FN}
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[2]) then return -1 end
redis.call('ZREM', KEYS[2], ARGV[1])
local existed = redis.call('HDEL', KEYS[1], ARGV[1])
if existed == 1 then
  fanout(KEYS[3], ARGV, 4)
  redis.call('PUBLISH', ARGV[10], ARGV[3])
end
return existed
"
    )
}

pub(super) static KV_SET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(kv_set()));
pub(super) static KV_DELETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(kv_delete()));
