//! The key-value scratchpad: bounded, listed in key order; writes carry a deadline Redis checks, so
//! a write reported as failed never lands later.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::sync::LazyLock;

use fred::{
    interfaces::{KeysInterface, SortedSetsInterface},
    prelude::Value,
    types::{Limit, scripts::Script},
};

use super::{
    Backend, BackendError, BackendResult,
    events::APPEND_FN,
    memory::MemoryBackend,
    redis::RedisBackend,
    subscriptions::{Change, DELIVER_ONE_FN, RECORD_CHANGE_FN, ResourceChange, told_and_sessions},
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

/// The resource URI of a kv key, whose hash tag places the key's value (with the resource's
/// subscribers and pending changes) on a Redis Cluster.
pub fn kv_uri(key: &str) -> String {
    format!("kv://{key}")
}

impl RedisBackend {
    pub(super) async fn kv_set(
        &self,
        key: &str,
        value: &str,
        change: ResourceChange<'_>,
    ) -> BackendResult<KvSetOutcome> {
        // An update is one script in the resource's slot. A new key is first entered in the key
        // index (another slot, where the scratchpad's bound is kept), then written.
        let fresh = Change::new(change.uri, change.legacy_payload);
        let mut entered = false;
        loop {
            let written = self.kv_write(key, value, change.uri, &fresh, entered).await;
            let (outcome, sessions) = match written {
                Ok(Some(written)) => written,
                Ok(None) if !entered => {
                    let added: i64 = self
                        .eval(
                            &KV_INDEX_ADD_SCRIPT,
                            vec![self.inner.keys.kv_index()],
                            vec![
                                key.into(),
                                Value::from(self.inner.config.kv_max_keys as i64),
                            ],
                        )
                        .await?;
                    if added == -1 {
                        return Ok(KvSetOutcome::Full);
                    }
                    entered = true;
                    continue;
                }
                Ok(None) => {
                    return Err(BackendError::Protocol(
                        "kv_set: an indexed key was refused as not indexed".into(),
                    ));
                }
                Err(error) => {
                    if entered {
                        // The first write of a key failed: its index entry goes, unless another
                        // writer's value is there by now.
                        self.unindex_unless_present(key).await;
                    }
                    return Err(error);
                }
            };
            if outcome == KvSetOutcome::Created {
                // A delete of the same key may have removed the index entry this write relied on
                // (between its write and its unindexing): enter it again. Together with the
                // delete's own check, every interleaving ends with the key indexed.
                let reentered: Result<i64, _> = self
                    .client()
                    .zadd(
                        self.inner.keys.kv_index(),
                        None,
                        None,
                        false,
                        false,
                        (0.0, key),
                    )
                    .await;
                if let Err(error) = reentered {
                    tracing::warn!(%error, "a created kv key may be missing from the key index");
                }
            }
            self.fan_out(fresh, sessions).await;
            return Ok(outcome);
        }
    }

    /// The write script of [`Self::kv_set`]: the outcome and the subscribers to tell, or `None`
    /// when the key is new and not indexed yet (nothing written).
    async fn kv_write(
        &self,
        key: &str,
        value: &str,
        uri: &str,
        change: &Change,
        indexed: bool,
    ) -> BackendResult<Option<(KvSetOutcome, Vec<String>)>> {
        let value_key = self.inner.keys.kv(&kv_uri(key));
        let deadline = self.write_deadline(&value_key).await?;
        let mut args = vec![
            value.into(),
            Value::from(deadline),
            if indexed { "1" } else { "0" }.into(),
            BusMessage::ListChanged(ListKind::Resources).encode().into(),
        ];
        args.extend(self.change_args(change));
        let reply: Vec<Value> = self
            .eval(&KV_SET_SCRIPT, self.write_keys(key, uri), args)
            .await?;
        let (outcome, sessions) = reply
            .split_first()
            .ok_or_else(|| BackendError::Protocol("kv_set: empty reply".into()))?;
        let outcome = match outcome.as_i64() {
            Some(1) => KvSetOutcome::Created,
            Some(0) => KvSetOutcome::Updated,
            Some(-2) => return Err(too_late()),
            Some(-3) => return Ok(None),
            other => {
                return Err(BackendError::Protocol(format!("kv_set returned {other:?}")));
            }
        };
        let (_, sessions) = told_and_sessions(sessions);
        Ok(Some((outcome, sessions)))
    }

    /// Removes `key` from the key index, then enters it again if its value exists (a writer
    /// created it meanwhile). Best effort: a failure leaves the index as it was.
    async fn unindex_unless_present(&self, key: &str) {
        let index = self.inner.keys.kv_index();
        let removed: Result<i64, _> = self.client().zrem(&index, key).await;
        let present: Result<i64, _> = match removed {
            Ok(_) => self.client().exists(self.inner.keys.kv(&kv_uri(key))).await,
            Err(error) => Err(error),
        };
        let restored: Result<i64, fred::error::Error> = match present {
            Ok(0) => Ok(0),
            Ok(_) => {
                self.client()
                    .zadd(&index, None, None, false, false, (0.0, key))
                    .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = restored {
            tracing::warn!(%error, "the kv key index may be out of step with the values");
        }
    }

    /// The keys of a write's script: the value, and the subscriber set and pending changes of the
    /// resource it changes (one slot: the resource's).
    fn write_keys(&self, key: &str, uri: &str) -> Vec<String> {
        let mut keys = vec![self.inner.keys.kv(&kv_uri(key))];
        keys.extend(self.change_keys(uri));
        keys
    }

    pub(super) async fn kv_get(&self, key: &str) -> BackendResult<Option<String>> {
        Ok(self.client().get(self.inner.keys.kv(&kv_uri(key))).await?)
    }

    pub(super) async fn kv_delete(
        &self,
        key: &str,
        change: ResourceChange<'_>,
    ) -> BackendResult<bool> {
        let fresh = Change::new(change.uri, change.legacy_payload);
        let deadline = self
            .write_deadline(&self.inner.keys.kv(&kv_uri(key)))
            .await?;
        let mut args = vec![Value::from(deadline)];
        args.extend(self.change_args(&fresh));
        let reply: Vec<Value> = self
            .eval(&KV_DELETE_SCRIPT, self.write_keys(key, change.uri), args)
            .await?;
        let (existed, sessions) = reply
            .split_first()
            .ok_or_else(|| BackendError::Protocol("kv_delete: empty reply".into()))?;
        match existed.as_i64() {
            Some(1) => {}
            Some(0) => {
                // No value: an index entry left by a crash between a first write's steps goes.
                self.unindex_unless_present(key).await;
                return Ok(false);
            }
            Some(-1) => return Err(too_late()),
            other => {
                return Err(BackendError::Protocol(format!(
                    "kv_delete returned {other:?}"
                )));
            }
        }
        let (_, sessions) = told_and_sessions(sessions);
        self.fan_out(fresh, sessions).await;
        // The key leaves the index (in its own slot) before the listeners of the resource list
        // hear of it, so a listing they make then no longer shows it; a writer that created the
        // key again meanwhile keeps it indexed. The delete stands whatever happens here.
        self.unindex_unless_present(key).await;
        if let Err(error) = self.list_changed(ListKind::Resources).await {
            tracing::warn!(%error, "the resource list change of a kv delete was not announced");
        }
        Ok(true)
    }

    pub(super) async fn kv_list(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> BackendResult<Vec<String>> {
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

/// KEYS: the value, the resource's subscriber set and pending changes. ARGV: value, deadline (µs
/// since the Unix epoch on Redis's clock), '1' when the key is in the key index, the list-changed
/// message, then the eleven arguments of `record_change` ([`RECORD_CHANGE_FN`]). Writes and
/// records the change for the subscribers (and, for a new key, tells the listeners of the
/// resource list) in one step. Returns `{1 (created) or 0 (updated), told, session left to tell...}`,
/// `{-2}` (run after its deadline: nothing written, nobody told) or `{-3}` (a new key not in the
/// index yet: nothing written).
pub fn kv_set() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}{DELIVER_ONE_FN}{RECORD_CHANGE_FN}
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[2]) then return {{-2}} end
local existed = redis.call('EXISTS', KEYS[1])
if existed == 0 and ARGV[3] ~= '1' then return {{-3}} end
redis.call('SET', KEYS[1], ARGV[1])
if existed == 0 then redis.call('PUBLISH', ARGV[7], ARGV[4]) end
local out = record_change(KEYS[2], KEYS[3], ARGV, 5)
table.insert(out, 1, 1 - existed)
return out
"
    )
}

/// KEYS: the kv key index. ARGV: key, max keys. Enters a key being created, within the bound.
/// Returns 1 (entered), 0 (there already) or -1 (the scratchpad is full).
pub const KV_INDEX_ADD: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 1
";

/// KEYS: as [`kv_set`]. ARGV: deadline, then the eleven arguments of `record_change`. Deletes and,
/// when the key existed, records the change for the subscribers in one step. Returns `{1, told,
/// session left to tell...}` when the key existed, `{0}` when not, `{-1}` when run after its
/// deadline (nothing deleted, nobody told).
pub fn kv_delete() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}{DELIVER_ONE_FN}{RECORD_CHANGE_FN}
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then return {{-1}} end
if redis.call('DEL', KEYS[1]) == 0 then return {{0}} end
local out = record_change(KEYS[2], KEYS[3], ARGV, 2)
table.insert(out, 1, 1)
return out
"
    )
}

pub(super) static KV_SET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(kv_set()));
pub(super) static KV_DELETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(kv_delete()));
pub(super) static KV_INDEX_ADD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(KV_INDEX_ADD));
