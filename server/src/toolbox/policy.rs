//! Per-tool policies: freshness class and cache TTL, cache scope, timeout and concurrency limit.
//!
//! Every tool call goes through its policy (see `ShoalHandler::call_tool`): a bounded wait for one
//! of the tool's concurrency slots ("busy" beyond), the shared result cache when the tool's class
//! allows it, and a timeout. So one slow tool, or one client flooding it, cannot delay the others.
//! Defaults live in [`defaults`]; operators override TTLs, timeouts and limits per tool
//! (`SHOAL_CACHE_TTLS`, `SHOAL_TOOL_TIMEOUTS`, `SHOAL_TOOL_CONCURRENCY_LIMITS`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::Value;
use shoal_shared::{cache::Freshness, config::Config};
use tokio::sync::Semaphore;

/// Who may share a cached result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every caller sees the same result.
    Public,
    /// Results are cached per principal (the caller's `Authorization`).
    Private,
}

/// Which cache tags a call's result depends on (for invalidation by writes).
pub type TagFn = fn(&Value) -> Vec<String>;

fn no_tags(_: &Value) -> Vec<String> {
    Vec::new()
}

/// The policy of one tool.
#[derive(Debug, Clone)]
pub struct ToolPolicy {
    /// The tool's name, interned for metric labels.
    pub name: &'static str,
    /// Freshness class.
    pub freshness: Freshness,
    /// Cache TTL; `None` means not cached.
    pub ttl: Option<Duration>,
    /// Cache scope.
    pub scope: Scope,
    /// Longest a call may run.
    pub timeout: Duration,
    /// Concurrent calls allowed on this replica.
    pub limit: usize,
    /// Slots of the concurrency limit.
    pub slots: Arc<Semaphore>,
    /// Cache tags of a call.
    pub tags: TagFn,
}

/// What a toolset declares about one of its tools.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    /// Freshness class.
    pub freshness: Freshness,
    /// TTL instead of the class default.
    pub ttl: Option<Duration>,
    /// Cache scope.
    pub scope: Scope,
    /// Timeout instead of the default.
    pub timeout: Option<Duration>,
    /// Concurrency limit instead of the default.
    pub limit: Option<usize>,
    /// Cache tags.
    pub tags: TagFn,
}

impl Declared {
    /// A tool of `freshness`, public, with the defaults.
    pub const fn new(freshness: Freshness) -> Self {
        Self {
            freshness,
            ttl: None,
            scope: Scope::Public,
            timeout: None,
            limit: None,
            tags: no_tags,
        }
    }
    /// With a TTL other than the class default.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
    /// Cached per principal.
    pub const fn private(mut self) -> Self {
        self.scope = Scope::Private;
        self
    }
    /// With its own timeout.
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// With its own concurrency limit.
    pub const fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
    /// With cache tags.
    pub const fn tags(mut self, tags: TagFn) -> Self {
        self.tags = tags;
        self
    }
}

/// The policies of every tool a replica serves.
#[derive(Debug)]
pub struct Policies {
    by_tool: HashMap<String, ToolPolicy>,
    fallback: ToolPolicy,
    /// How long a call waits for a slot.
    pub queue_timeout: Duration,
}

impl Policies {
    /// Builds the policies of `tools` from their declarations and the configuration overrides.
    pub fn new(config: &Config, tools: impl IntoIterator<Item = (String, Declared)>) -> Self {
        let build = |name: &str, declared: Declared| {
            let ttl = match config.cache_ttl_override(name) {
                Some(ttl) if ttl.is_zero() => None,
                Some(ttl) => Some(ttl),
                None if declared.freshness == Freshness::Write => None,
                None => declared.ttl.or_else(|| declared.freshness.default_ttl()),
            };
            let limit = config
                .tool_concurrency_override(name)
                .or(declared.limit)
                .unwrap_or(config.tools.concurrency)
                .max(1);
            ToolPolicy {
                // Tool names form a closed set fixed at start-up: interning them once gives the
                // metrics `'static` labels.
                name: Box::leak(name.to_owned().into_boxed_str()),
                freshness: declared.freshness,
                ttl: if declared.freshness == Freshness::Write {
                    None
                } else {
                    ttl
                },
                scope: declared.scope,
                timeout: config
                    .tool_timeout_override(name)
                    .or(declared.timeout)
                    .unwrap_or(Duration::from_millis(config.tools.timeout_ms)),
                limit,
                slots: Arc::new(Semaphore::new(limit)),
                tags: declared.tags,
            }
        };
        let by_tool = tools
            .into_iter()
            .map(|(name, declared)| {
                let policy = build(&name, declared);
                (name, policy)
            })
            .collect();
        Self {
            by_tool,
            fallback: build("other", Declared::new(Freshness::Realtime)),
            queue_timeout: Duration::from_millis(config.tools.queue_timeout_ms),
        }
    }

    /// The policy of `tool`.
    pub fn get(&self, tool: &str) -> &ToolPolicy {
        self.by_tool.get(tool).unwrap_or(&self.fallback)
    }

    /// Every policy, by tool name (for docs and tests).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &ToolPolicy)> {
        self.by_tool.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["shoal-server"];
        all.extend_from_slice(args);
        Config::from_args(all).expect("config")
    }

    #[test]
    fn classes_overrides_and_writes() {
        let config = config(&[
            "--cache-ttls",
            "b=2s,c=0",
            "--tool-concurrency-limits",
            "a=3",
            "--tool-timeouts",
            "a=1s",
        ]);
        let policies = Policies::new(
            &config,
            [
                ("a".to_owned(), Declared::new(Freshness::Static)),
                ("b".to_owned(), Declared::new(Freshness::Dynamic)),
                ("c".to_owned(), Declared::new(Freshness::Dynamic)),
                (
                    "w".to_owned(),
                    Declared::new(Freshness::Write).ttl(Duration::from_secs(9)),
                ),
                (
                    "r".to_owned(),
                    Declared::new(Freshness::Realtime).ttl(Duration::from_secs(1)),
                ),
            ],
        );
        assert_eq!(policies.get("a").ttl, Some(Duration::from_secs(300)));
        assert_eq!(policies.get("a").limit, 3);
        assert_eq!(policies.get("a").timeout, Duration::from_secs(1));
        assert_eq!(policies.get("b").ttl, Some(Duration::from_secs(2)));
        assert_eq!(policies.get("c").ttl, None, "0 disables caching");
        assert_eq!(policies.get("w").ttl, None, "writes are never cached");
        assert_eq!(policies.get("r").ttl, Some(Duration::from_secs(1)));
        assert_eq!(policies.get("unknown").ttl, None);
        assert_eq!(policies.get("unknown").limit, 64);
    }
}
