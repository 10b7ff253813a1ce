//! The shared TTL result cache, in Redis for a cluster and in memory for the embedded default.
//!
//! Entries are keyed by tool, canonical arguments (key order does not matter) and the caller's
//! partition (`public`, or one per principal for private results). Concurrent misses for one key
//! run the backend **once in the whole cluster**: the first caller takes a Redis lock and fills the
//! entry; everyone else, on any replica, waits for the fill announcement on the bus and reads it.
//! Results that must not be cached (tool errors) are not stored; entries larger than the size cap
//! are not stored either. Entries are tagged (e.g. with the tables they read) so a write can
//! invalidate what it changed.
//!
//! An entry stays in Redis for twice its TTL: past its TTL it is *stale* and refilled on the next
//! lookup, and the stale value tells the caller whether the refreshed content differs (resources
//! use that to raise `notifications/resources/updated`).

use crate::telemetry::attr;
use std::{
    pin::pin,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    backend::{Backend, BackendError, CacheEntry},
    bus::Bus,
    metrics::Metrics,
    telemetry::{KeyValue, SpanKind},
};

/// How fresh a tool's data must be, which decides whether and how long it is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Configuration, schemas, documentation: minutes to hours.
    Static,
    /// Balances, prices, query results: seconds.
    Dynamic,
    /// Live data: at most a couple of seconds, or not cached.
    Realtime,
    /// Writes: never cached.
    Write,
}

impl Freshness {
    /// The default TTL of the class (`None`: not cached).
    pub fn default_ttl(self) -> Option<Duration> {
        match self {
            Freshness::Static => Some(Duration::from_secs(300)),
            Freshness::Dynamic => Some(Duration::from_secs(10)),
            Freshness::Realtime | Freshness::Write => None,
        }
    }

    /// Its name in docs and telemetry.
    pub fn name(self) -> &'static str {
        match self {
            Freshness::Static => "static",
            Freshness::Dynamic => "dynamic",
            Freshness::Realtime => "realtime",
            Freshness::Write => "write",
        }
    }
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Largest entry stored, in bytes.
    pub max_entry_bytes: usize,
    /// How long a filler holds the lock (and others wait) before the lock expires.
    pub lock_ttl: Duration,
}

impl CacheOptions {
    /// The cache's share of the configuration tree. A filler holds the lock at most as long as a
    /// tool call may run, and never more than 10 s.
    pub fn from_config(config: &crate::config::ToolConfig) -> Self {
        Self {
            max_entry_bytes: config.cache_max_entry_bytes,
            lock_ttl: Duration::from_millis(config.timeout_ms).min(Duration::from_secs(10)),
        }
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh entry.
    Hit,
    /// Filled by this call (the entry was missing).
    Miss,
    /// Filled by this call; a stale entry existed.
    Stale,
    /// Filled by a concurrent call, possibly on another replica, while this one waited.
    Coalesced,
    /// Not cached (the cache is unavailable, or the result may not be cached).
    Bypass,
}

impl Source {
    /// The telemetry label.
    pub fn label(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Stale => "stale",
            Source::Coalesced => "coalesced",
            Source::Bypass => "bypass",
        }
    }
}

/// The entry a lookup wants: its id, how long a fill stays fresh, and the tags it is stored under.
struct Wanted<'a> {
    id: &'a str,
    ttl: Duration,
    tags: &'a [String],
}

/// A value from the cache or from the backend.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    /// The value: the filler's own when this call ran it, else the stored form.
    pub content: Content<T>,
    /// Where it came from.
    pub source: Source,
    /// The stale value it replaced, when the entry was refilled after expiring.
    pub previous: Option<String>,
}

/// The value of an [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<T> {
    /// This call ran the filler: its result, never serialized and parsed back.
    Filled(T),
    /// Read from the cache: the stored (serialized) form.
    Stored(String),
}

impl<T> Content<T> {
    /// The value, parsing the stored form when there is one.
    ///
    /// # Errors
    /// What `parse` returns.
    pub fn into_value<E>(self, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T, E> {
        match self {
            Content::Filled(value) => Ok(value),
            Content::Stored(raw) => parse(&raw),
        }
    }
}

impl Answer<String> {
    /// The text of a cache of strings.
    pub fn text(&self) -> &str {
        match &self.content {
            Content::Filled(text) | Content::Stored(text) => text,
        }
    }
}

/// What a backend fill produced.
#[derive(Debug, Clone)]
pub struct Fill<T> {
    /// The result, handed back to the caller that ran the fill.
    pub result: T,
    /// Its serialized form to store, or `None` when it may not be stored (tool errors).
    pub stored: Option<String>,
}

impl Fill<String> {
    /// A text result, stored when `cacheable`.
    pub fn text(value: String, cacheable: bool) -> Self {
        Self {
            stored: cacheable.then(|| value.clone()),
            result: value,
        }
    }
}

/// The result cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResultCache {
    backend: Backend,
    bus: Bus,
    metrics: Metrics,
    options: CacheOptions,
}

/// JSON with object keys sorted at every level, compact.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// The entry id of `tool` called with `arguments` by `partition`.
pub fn entry_id(tool: &str, arguments: &Value, partition: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tool.as_bytes());
    hasher.update([0]);
    hasher.update(canonical_json(arguments).as_bytes());
    hasher.update([0]);
    hasher.update(partition.as_bytes());
    let digest = hasher.finalize();
    format!("{tool}:{}", hex::encode(&digest[..16]))
}

/// The partition name of a principal (the verified principal id the server authenticated; hashed
/// again so no partition names anything a client sent).
pub fn private_partition(principal: &str) -> String {
    let digest = Sha256::digest(principal.as_bytes());
    format!("p-{}", hex::encode(&digest[..12]))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `(fresh, value)` of a stored entry (`{fresh_until_ms}\n{value}`).
fn decode(raw: &str) -> Option<(bool, &str)> {
    let (until, value) = raw.split_once('\n')?;
    Some((until.parse::<u64>().ok()? > now_ms(), value))
}

impl ResultCache {
    /// A cache over `backend`, announcing fills on `bus`.
    pub fn new(backend: Backend, bus: Bus, metrics: Metrics, options: CacheOptions) -> Self {
        Self {
            backend,
            bus,
            metrics,
            options,
        }
    }

    /// Returns the entry `id` if fresh, else runs `fill` once for the whole cluster and stores its
    /// result for `ttl` under `tags`. Errors of `fill` are returned, not cached.
    ///
    /// # Errors
    /// Only what `fill` returns: an unavailable cache degrades to running `fill` directly.
    pub async fn get_or_fill<T, E>(
        &self,
        id: &str,
        ttl: Duration,
        tags: &[String],
        fill: impl Future<Output = Result<Fill<T>, E>>,
    ) -> Result<Answer<T>, E> {
        let span = crate::telemetry::Span::child("cache lookup", SpanKind::Internal, || {
            vec![KeyValue::new(
                attr::SHOAL_CACHE_TTL_MS,
                ttl.as_millis() as i64,
            )]
        });
        let wanted = Wanted { id, ttl, tags };
        let result = span.wrap(self.lookup(&wanted, fill)).await;
        match &result {
            Ok(answer) => span.set(attr::SHOAL_CACHE_OUTCOME, answer.source.label()),
            Err(_) => span.mark_error("fill_error"),
        }
        result
    }

    async fn lookup<T, E>(
        &self,
        wanted: &Wanted<'_>,
        fill: impl Future<Output = Result<Fill<T>, E>>,
    ) -> Result<Answer<T>, E> {
        let id = wanted.id;
        let start = Instant::now();
        let previous = match self.backend.cache_get(id).await {
            Ok(Some(raw)) => match decode(&raw) {
                Some((true, value)) => {
                    self.metrics.cache_lookup("hit");
                    self.metrics.cache_hit(start.elapsed());
                    return Ok(Answer {
                        content: Content::Stored(value.to_owned()),
                        source: Source::Hit,
                        previous: None,
                    });
                }
                Some((false, value)) => Some(value.to_owned()),
                None => None,
            },
            Ok(None) => None,
            Err(error) => return self.bypass(error, fill).await,
        };
        let owner = format!("{}:{}", self.bus.tag(), rand::random::<u64>());
        let mut fill = Some(fill);
        // A few rounds: a filler whose result could not be stored leaves the others to try.
        for _ in 0..3 {
            let waiter = self.bus.cache_waiter(id);
            let mut announced = pin!(waiter.notify.notified());
            announced.as_mut().enable();
            match self
                .backend
                .cache_lock(id, &owner, self.options.lock_ttl)
                .await
            {
                Ok(true) => {
                    let Some(fill) = fill.take() else { break };
                    return self.fill_and_store(wanted, &owner, previous, fill).await;
                }
                Ok(false) => {
                    let _ = tokio::time::timeout(self.options.lock_ttl, announced).await;
                    if let Ok(Some(raw)) = self.backend.cache_get(id).await
                        && let Some((true, value)) = decode(&raw)
                    {
                        self.metrics.cache_lookup("coalesced");
                        return Ok(Answer {
                            content: Content::Stored(value.to_owned()),
                            source: Source::Coalesced,
                            previous: None,
                        });
                    }
                }
                Err(error) => {
                    if let Some(fill) = fill.take() {
                        return self.bypass(error, fill).await;
                    }
                    break;
                }
            }
        }
        match fill.take() {
            Some(fill) => self.run_directly(fill).await,
            None => unreachable!("the fill runs at most once and returns"),
        }
    }

    async fn fill_and_store<T, E>(
        &self,
        wanted: &Wanted<'_>,
        owner: &str,
        previous: Option<String>,
        fill: impl Future<Output = Result<Fill<T>, E>>,
    ) -> Result<Answer<T>, E> {
        let result = fill.await;
        let raw = match &result {
            Ok(Fill {
                stored: Some(value),
                ..
            }) if value.len() <= self.options.max_entry_bytes => Some(format!(
                "{}\n{value}",
                now_ms() + wanted.ttl.as_millis() as u64
            )),
            _ => None,
        };
        // Kept for a second TTL as a stale copy, to compare the refreshed content with. Storing,
        // announcing and unlocking are one round trip.
        let entry = raw.as_deref().map(|value| CacheEntry {
            value,
            ttl: wanted.ttl * 2,
            tags: wanted.tags,
        });
        let stored = match self.backend.cache_release(wanted.id, owner, entry).await {
            Ok(()) => entry.is_some(),
            Err(error) => {
                tracing::debug!(%error, "cache store failed");
                false
            }
        };
        let filled = result?;
        let source = match (&previous, stored) {
            (_, false) => Source::Bypass,
            (Some(_), true) => Source::Stale,
            (None, true) => Source::Miss,
        };
        self.metrics.cache_lookup(source.label());
        Ok(Answer {
            content: Content::Filled(filled.result),
            source,
            previous,
        })
    }

    async fn bypass<T, E>(
        &self,
        error: BackendError,
        fill: impl Future<Output = Result<Fill<T>, E>>,
    ) -> Result<Answer<T>, E> {
        tracing::debug!(%error, "result cache unavailable; calling the backend directly");
        self.run_directly(fill).await
    }

    /// Runs `fill` without storing its result (counted as a bypass).
    async fn run_directly<T, E>(
        &self,
        fill: impl Future<Output = Result<Fill<T>, E>>,
    ) -> Result<Answer<T>, E> {
        self.metrics.cache_lookup("bypass");
        let filled = fill.await?;
        Ok(Answer {
            content: Content::Filled(filled.result),
            source: Source::Bypass,
            previous: None,
        })
    }

    /// Drops every entry recorded under `tags` (after a write changed what they depend on).
    pub async fn invalidate(&self, tags: &[String]) {
        match self.backend.cache_invalidate(tags).await {
            Ok(deleted) => self.metrics.cache_invalidated(deleted),
            Err(error) => {
                tracing::warn!(%error, "cache invalidation failed; entries expire with their TTL")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::{
        backend::{BackendConfig, MemoryBackend},
        ids::ReplicaTag,
        keys::Keys,
    };

    fn cache() -> ResultCache {
        let metrics = Metrics::new();
        let (bus, _control) = Bus::new(Keys::new("t"), ReplicaTag::generate(), metrics.clone());
        let config = BackendConfig {
            session_ttl: Duration::from_secs(60),
            event_log_max_len: 10,
            event_retention: Duration::from_secs(60),
            max_subscriptions_per_session: 10,
            max_subscribers_per_uri: 100,
            kv_max_keys: 10,
            redis_timeout: Duration::from_secs(1),
            redis_pool_size: 1,
        };
        let backend = Backend::Memory(MemoryBackend::new(
            config,
            bus.clone(),
            metrics.clone(),
            Default::default(),
        ));
        ResultCache::new(
            backend,
            bus,
            metrics,
            CacheOptions {
                max_entry_bytes: 1024,
                lock_ttl: Duration::from_secs(2),
            },
        )
    }

    #[test]
    fn key_order_does_not_matter() {
        let a = serde_json::json!({"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": null}});
        let b = serde_json::json!({"a": {"x": null, "y": [1, {"c": 2, "d": 1}]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(entry_id("t", &a, "public"), entry_id("t", &b, "public"));
        assert_ne!(
            entry_id("t", &a, "public"),
            entry_id("t", &a, &private_partition("bearer x"))
        );
        assert_ne!(entry_id("t", &a, "public"), entry_id("u", &a, "public"));
        assert!(!private_partition("Bearer secret").contains("secret"));
    }

    #[tokio::test]
    async fn concurrent_misses_fill_once() {
        let cache = cache();
        let executions = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let executions = executions.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fill::<String, ()>("k", Duration::from_secs(10), &[], async {
                        executions.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Fill::text("v".into(), true))
                    })
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.expect("join").expect("answer").text(), "v");
        }
        assert_eq!(executions.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_and_large_values_are_not_stored_and_tags_invalidate() {
        let cache = cache();
        let tags = ["t1".to_owned()];
        let run = |value: &'static str, cacheable: bool| {
            cache.get_or_fill::<String, ()>("k", Duration::from_secs(10), &tags, async move {
                Ok(Fill::text(value.into(), cacheable))
            })
        };
        assert_eq!(
            run("error", false).await.expect("answer").source,
            Source::Bypass
        );
        // The filler's own value comes back from a miss; a hit reads the stored form.
        let miss = run("v1", true).await.expect("answer");
        assert_eq!(
            (miss.source, miss.content),
            (Source::Miss, Content::Filled("v1".to_owned()))
        );
        let hit = run("v2", true).await.expect("answer");
        assert_eq!(
            (hit.source, hit.content),
            (Source::Hit, Content::Stored("v1".to_owned()))
        );
        cache.invalidate(&["t1".to_owned()]).await;
        assert_eq!(
            run("v3", true).await.expect("answer").text(),
            "v3",
            "invalidated"
        );
        let big: &'static str = Box::leak("x".repeat(2000).into_boxed_str());
        cache.invalidate(&["t1".to_owned()]).await;
        assert_eq!(run(big, true).await.expect("answer").source, Source::Bypass);
    }

    #[tokio::test]
    async fn expired_entries_are_refilled_with_the_previous_value() {
        let cache = cache();
        let run = |value: &'static str| {
            cache.get_or_fill::<String, ()>("k", Duration::from_millis(50), &[], async move {
                Ok(Fill::text(value.into(), true))
            })
        };
        run("v1").await.expect("answer");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let answer = run("v2").await.expect("answer");
        assert_eq!(
            (answer.source, answer.previous.as_deref(), answer.text()),
            (Source::Stale, Some("v1"), "v2")
        );
    }
}
