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
        let entry_key = self.inner.keys.cache_entry(id);
        let keys = vec![entry_key.clone(), self.inner.keys.cache_lock(id)];
        // The release script's arguments, storing `entry` or not.
        let args = |entry: Option<CacheEntry<'_>>| {
            let mut args: Vec<Value> = vec![
                owner.into(),
                self.inner.keys.cache_channel().into(),
                BusMessage::CacheFilled { id }.encode().into(),
            ];
            match entry {
                Some(entry) => args.extend([
                    "1".into(),
                    entry.value.into(),
                    Value::from(entry.ttl.as_millis().max(1) as i64),
                ]),
                None => args.push("0".into()),
            }
            args
        };
        // The entry and its lock share a slot; each tag's set is in the tag's. The entry is
        // recorded under its tags first and stored only when every tag took it, so no stored
        // entry escapes an invalidation of its tags. (An invalidation between the two can only
        // miss an entry filled from data read before the write that invalidates, which an
        // invalidation racing a fill misses anyway: docs/architecture.md.)
        if let Some(entry) = entry {
            let ttl = entry.ttl.as_millis().max(1) as i64;
            let tagging = entry.tags.iter().map(|tag| {
                self.eval::<i64>(
                    &CACHE_TAG_SCRIPT,
                    vec![self.inner.keys.cache_tag(tag)],
                    vec![entry_key.as_str().into(), Value::from(ttl)],
                )
            });
            let tagged = futures::future::join_all(tagging)
                .await
                .into_iter()
                .collect::<BackendResult<Vec<i64>>>();
            if let Err(error) = tagged {
                // Not stored: end the fill without the entry (waiters look again and fill).
                let _: BackendResult<i64> =
                    self.eval(&CACHE_RELEASE_SCRIPT, keys, args(None)).await;
                return Err(error);
            }
        }
        let _: i64 = self.eval(&CACHE_RELEASE_SCRIPT, keys, args(entry)).await?;
        Ok(())
    }

    pub(super) async fn cache_invalidate(&self, tags: &[String]) -> BackendResult<u64> {
        // Each tag's set is taken (read and deleted) in its slot, then the entries it names are
        // deleted, each in its own.
        let taken = tags.iter().map(|tag| {
            self.eval::<Vec<String>>(
                &CACHE_TAKE_TAG_SCRIPT,
                vec![self.inner.keys.cache_tag(tag)],
                vec![],
            )
        });
        // Every entry of a set that was taken is deleted, whatever happened to the other sets
        // (a taken set is gone: its entries would escape a later invalidation).
        let mut entries = std::collections::BTreeSet::new();
        let mut failure = None;
        for result in futures::future::join_all(taken).await {
            match result {
                Ok(taken) => entries.extend(taken),
                Err(error) => failure = Some(error),
            }
        }
        let deletions = entries.iter().map(|key| self.client().del::<i64, _>(key));
        let mut deleted = 0;
        for result in futures::future::join_all(deletions).await {
            match result {
                Ok(count) => deleted += count.max(0) as u64,
                Err(error) => failure = Some(error.into()),
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(deleted),
        }
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
/// '0' not, value, ttl ms. Ends a fill in one round trip: stores the entry when asked, announces
/// the fill so waiters look again, and releases the lock if `owner` still holds it.
pub const CACHE_RELEASE: &str = r"
if ARGV[4] == '1' then redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
";

/// KEYS: a tag's set. ARGV: entry key, ttl ms. Records the entry under the tag, for invalidation;
/// a tag set lives as long as its longest entry.
pub const CACHE_TAG: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// KEYS: a tag's set. Takes it: returns the entries recorded under the tag and deletes the set.
pub const CACHE_TAKE_TAG: &str = r"
local entries = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return entries
";

pub(super) static CACHE_RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CACHE_RELEASE));
pub(super) static CACHE_TAG_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CACHE_TAG));
pub(super) static CACHE_TAKE_TAG_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CACHE_TAKE_TAG));
