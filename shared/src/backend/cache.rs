//! The shared tool-result cache: entries with a TTL, single-flight fill locks, invalidation by tag.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::{sync::LazyLock, time::Duration};

use fred::{
    interfaces::KeysInterface,
    prelude::{Expiration, SetOptions, Value},
    types::scripts::Script,
};
use tokio::time::Instant;

use super::{Backend, BackendResult, memory::MemoryBackend, redis::RedisBackend};
use crate::{bus::BusMessage, telemetry::attr};

/// A result to store in the cache (see [`Backend::cache_release`]).
#[derive(Debug, Clone, Copy)]
pub struct CacheEntry<'a> {
    /// The stored text.
    pub value: &'a str,
    /// How long it is kept.
    pub ttl: Duration,
    /// Tags it is recorded under, for invalidation.
    pub tags: &'a [String],
}

impl Backend {
    /// Reads a cache entry.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_get(&self, id: &str) -> BackendResult<Option<String>> {
        delegate!(self, "cache_get", cache_get(id))
    }

    /// Takes the fill lock of a cache entry for `ttl` unless someone holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_lock(&self, id: &str, owner: &str, ttl: Duration) -> BackendResult<bool> {
        delegate!(self, "cache_lock", cache_lock(id, owner, ttl))
    }

    /// Ends a fill of entry `id` in one round trip: stores `entry` when given, announces the fill
    /// (waiters look again, and fill it themselves when nothing was stored) and releases the fill
    /// lock if `owner` still holds it.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (the lock then expires by itself).
    pub async fn cache_release(
        &self,
        id: &str,
        owner: &str,
        entry: Option<CacheEntry<'_>>,
    ) -> BackendResult<()> {
        delegate!(self, "cache_release", cache_release(id, owner, entry))
    }

    /// Deletes every cache entry recorded under `tags`; returns how many.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn cache_invalidate(&self, tags: &[String]) -> BackendResult<u64> {
        delegate!(self, "cache_invalidate", cache_invalidate(tags))
    }
}

impl RedisBackend {
    pub(super) async fn cache_get(&self, id: &str) -> BackendResult<Option<String>> {
        Ok(self.client().get(self.inner.keys.cache_entry(id)).await?)
    }

    pub(super) async fn cache_lock(
        &self,
        id: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let taken: Option<String> = self
            .client()
            .set(
                self.inner.keys.cache_lock(id),
                owner,
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(taken.is_some())
    }

    pub(super) async fn cache_release(
        &self,
        id: &str,
        owner: &str,
        entry: Option<CacheEntry<'_>>,
    ) -> BackendResult<()> {
        let mut args: Vec<Value> = vec![
            owner.into(),
            self.inner.keys.cache_channel().into(),
            BusMessage::CacheFilled { id }.encode().into(),
        ];
        if let Some(entry) = entry {
            args.extend([
                "1".into(),
                entry.value.into(),
                Value::from(entry.ttl.as_millis().max(1) as i64),
                self.inner.keys.cache_tag_prefix().into(),
            ]);
            args.extend(entry.tags.iter().map(|tag| Value::from(tag.as_str())));
        } else {
            args.push("0".into());
        }
        let _: i64 = self
            .eval(
                &CACHE_RELEASE_SCRIPT,
                vec![
                    self.inner.keys.cache_entry(id),
                    self.inner.keys.cache_lock(id),
                ],
                args,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn cache_invalidate(&self, tags: &[String]) -> BackendResult<u64> {
        if tags.is_empty() {
            return Ok(0);
        }
        // The tag sets are declared as the script's keys (a script without keys would run on a
        // random node of a Redis Cluster).
        let prefix = self.inner.keys.cache_tag_prefix();
        let keys: Vec<String> = tags.iter().map(|tag| format!("{prefix}{tag}")).collect();
        let deleted: i64 = self.eval(&CACHE_INVALIDATE_SCRIPT, keys, vec![]).await?;
        Ok(deleted.max(0) as u64)
    }
}

impl MemoryBackend {
    pub(super) fn cache_get(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        self.state()
            .cache
            .get(id)
            .filter(|(_, expires)| *expires > now)
            .map(|(value, _)| value.clone())
    }

    pub(super) fn cache_lock(&self, id: &str, owner: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        match state.cache_locks.get(id) {
            Some((_, expires)) if *expires > now => false,
            _ => {
                state
                    .cache_locks
                    .insert(id.to_owned(), (owner.to_owned(), now + ttl));
                true
            }
        }
    }

    pub(super) fn cache_release(&self, id: &str, owner: &str, entry: Option<CacheEntry<'_>>) {
        {
            let mut state = self.state();
            if let Some(entry) = entry {
                state.cache.insert(
                    id.to_owned(),
                    (entry.value.to_owned(), Instant::now() + entry.ttl),
                );
                for tag in entry.tags {
                    state
                        .cache_tags
                        .entry(tag.clone())
                        .or_default()
                        .insert(id.to_owned());
                }
            }
            if state
                .cache_locks
                .get(id)
                .is_some_and(|(holder, _)| holder == owner)
            {
                state.cache_locks.remove(id);
            }
        }
        self.publish(
            &self.inner.bus.keys().cache_channel(),
            &BusMessage::CacheFilled { id }.encode(),
        );
    }

    pub(super) fn cache_invalidate(&self, tags: &[String]) -> u64 {
        let mut state = self.state();
        let mut deleted = 0;
        for tag in tags {
            for id in state.cache_tags.remove(tag).unwrap_or_default() {
                deleted += u64::from(state.cache.remove(&id).is_some());
            }
        }
        deleted
    }
}

/// KEYS: cache entry, fill lock. ARGV: owner, cache channel, fill announcement, '1' to store or
/// '0' not, value, ttl ms, tag-key prefix, tag... Ends a fill in one round trip: stores the entry
/// (recorded under each tag, for invalidation; tag sets live as long as their longest entry) when
/// asked, announces the fill so waiters look again, and releases the lock if `owner` still holds
/// it.
pub const CACHE_RELEASE: &str = r"
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
  for i = 8, #ARGV do
    local tag = ARGV[7] .. ARGV[i]
    redis.call('SADD', tag, KEYS[1])
    if redis.call('PTTL', tag) < tonumber(ARGV[6]) then redis.call('PEXPIRE', tag, ARGV[6]) end
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
";

/// ARGV: tag-key prefix, tag... Deletes every entry recorded under the tags. Returns the number
/// of entries deleted.
pub const CACHE_INVALIDATE: &str = r"
local deleted = 0
for _, tag in ipairs(KEYS) do
  local keys = redis.call('SMEMBERS', tag)
  for _, key in ipairs(keys) do deleted = deleted + redis.call('DEL', key) end
  redis.call('DEL', tag)
end
return deleted
";

pub(super) static CACHE_RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CACHE_RELEASE));
pub(super) static CACHE_INVALIDATE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CACHE_INVALIDATE));
