//! The only place where Redis key and channel names are built.
//!
//! Every name starts with the configured prefix, so environments and tests that share one Redis never
//! collide. The layout is documented in `docs/architecture.md`; the Lua scripts in
//! [`crate::backend`] rebuild some of these names from the prefix they receive, and the unit tests
//! below pin the shapes they rely on.

/// Builds key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Key names under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefixes the Lua scripts append a session id, a replica tag or a URI to (they build
    /// those names inside Redis): `{prefix}:sess:`, `{prefix}:ev:`, `{prefix}:r:`,
    /// `{prefix}:subs:`, in that order. The names below are these prefixes plus the suffix.
    pub fn script_prefixes(&self) -> [String; 4] {
        [
            self.session(""),
            self.event_log(""),
            self.replica_channel(""),
            self.subscribers(""),
        ]
    }

    /// Hash holding one legacy session: `init` (initialize params), `feed` (who holds the GET
    /// stream), `log` (logging level) and one `sub:{uri}` field per resource subscription.
    pub fn session(&self, sid: &str) -> String {
        format!("{}:sess:{sid}", self.prefix)
    }

    /// Redis Stream: the resumable event log of one session's GET stream.
    pub fn event_log(&self, sid: &str) -> String {
        format!("{}:ev:{sid}", self.prefix)
    }

    /// Set of session ids subscribed (legacy `resources/subscribe`) to one resource URI.
    pub fn subscribers(&self, uri: &str) -> String {
        format!("{}:subs:{uri}", self.prefix)
    }

    /// Pattern matching every subscriber set (for the janitor's SCAN).
    pub fn subscribers_pattern(&self) -> String {
        format!("{}:subs:*", self.prefix)
    }

    /// Hash of the kv scratchpad.
    pub fn kv(&self) -> String {
        format!("{}:kv", self.prefix)
    }

    /// Sorted set of kv keys (all with score 0), for ordered, paginated listing.
    pub fn kv_index(&self) -> String {
        format!("{}:kvkeys", self.prefix)
    }

    /// A secret shared by every replica (e.g. the MRTR request-state key), created by the first.
    pub fn secret(&self, name: &str) -> String {
        format!("{}:secret:{name}", self.prefix)
    }

    /// A result-cache entry (`id` hashes the tool, its arguments and the caller's partition).
    pub fn cache_entry(&self, id: &str) -> String {
        format!("{}:cache:{id}", self.prefix)
    }

    /// The lock a replica holds while it fills a cache entry.
    pub fn cache_lock(&self, id: &str) -> String {
        format!("{}:cache-lock:{id}", self.prefix)
    }

    /// Prefix of the sets recording which cache entries depend on a tag (e.g. a table).
    pub fn cache_tag_prefix(&self) -> String {
        format!("{}:ctag:", self.prefix)
    }

    /// Broadcast channel announcing filled cache entries (waiters on every replica pick them up).
    pub fn cache_channel(&self) -> String {
        format!("{}:cache", self.prefix)
    }

    /// A quota's state: `kind` is `rate` (a GCRA arrival time), `calls` or `streams` (sorted sets of
    /// leases) or `sessions` (sorted set of session ids); `subject` is a principal id, or `cluster` for
    /// the cluster-wide quota (principal ids are hex digits).
    pub fn quota(&self, kind: &str, subject: &str) -> String {
        format!("{}:quota:{kind}:{subject}", self.prefix)
    }

    /// Pattern matching every session quota index (for the janitor's SCAN).
    pub fn quota_sessions_pattern(&self) -> String {
        format!("{}:quota:sessions:*", self.prefix)
    }

    /// Lease key that elects the replica polling PostgreSQL for outside changes.
    pub fn poller_lease(&self) -> String {
        format!("{}:lease:pg-poller", self.prefix)
    }

    /// Last-seen change signatures of PostgreSQL tables (shared so a new poller continues).
    pub fn pg_signatures(&self) -> String {
        format!("{}:pg-signatures", self.prefix)
    }

    /// Lease key that elects the replica running the subscriber-set janitor.
    pub fn janitor_lease(&self) -> String {
        format!("{}:lease:janitor", self.prefix)
    }

    /// Channel of messages addressed to one replica (GET-stream events, forwarded responses).
    pub fn replica_channel(&self, replica_tag: &str) -> String {
        format!("{}:r:{replica_tag}", self.prefix)
    }

    /// Broadcast channel for cluster control (session deleted, cancellation).
    pub fn control_channel(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// Broadcast channel for resource changes, consumed by `subscriptions/listen` streams.
    pub fn resource_channel(&self) -> String {
        format!("{}:res", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn names_carry_the_prefix() {
        let keys = Keys::new("t1");
        assert_eq!(keys.session("abc"), "t1:sess:abc");
        assert_eq!(keys.event_log("abc"), "t1:ev:abc");
        assert_eq!(keys.subscribers("kv://a"), "t1:subs:kv://a");
        assert_eq!(keys.subscribers_pattern(), "t1:subs:*");
        assert_eq!(keys.kv(), "t1:kv");
        assert_eq!(keys.kv_index(), "t1:kvkeys");
        assert_eq!(keys.replica_channel("r9"), "t1:r:r9");
        assert_eq!(keys.control_channel(), "t1:ctl");
        assert_eq!(keys.resource_channel(), "t1:res");
        assert_eq!(keys.cache_entry("x"), "t1:cache:x");
        assert_eq!(keys.cache_lock("x"), "t1:cache-lock:x");
        assert_eq!(keys.cache_channel(), "t1:cache");
        assert_eq!(keys.quota("rate", "ab12"), "t1:quota:rate:ab12");
        assert_eq!(
            keys.quota("sessions", "cluster"),
            "t1:quota:sessions:cluster"
        );
        assert_eq!(keys.quota_sessions_pattern(), "t1:quota:sessions:*");
        assert_eq!(
            keys.script_prefixes(),
            ["t1:sess:", "t1:ev:", "t1:r:", "t1:subs:"].map(String::from)
        );
    }
}
