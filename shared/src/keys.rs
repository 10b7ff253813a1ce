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

/// The hash tag of a resource URI: `u:` and the first 16 hex digits of its SHA-256. The URI itself
/// never sits between braces (it may contain `}`); names that must be exact carry it after the tag.
pub fn uri_tag(uri: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(uri.as_bytes());
    format!("u:{}", hex::encode(&digest[..8]))
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

    /// Hash holding one legacy session: `init` (initialize params), `owner`, `feed` (who holds the
    /// GET stream), `cursor`, `log` (logging level), `nsubs` and one `sub:{uri}` field per
    /// resource subscription. Its hash tag (`{s:<sid>}`) puts the session's keys in one slot.
    pub fn session(&self, sid: &str) -> String {
        format!("{}:sess:{{s:{sid}}}", self.prefix)
    }

    /// Redis Stream: the resumable event log of one session's GET stream.
    pub fn event_log(&self, sid: &str) -> String {
        format!("{}:ev:{{s:{sid}}}", self.prefix)
    }

    /// Sorted set of the resource changes already appended to one session's log (their change ids),
    /// so a fanout run twice (the janitor finishing one a dead replica left) appends each once.
    pub fn seen(&self, sid: &str) -> String {
        format!("{}:seen:{{s:{sid}}}", self.prefix)
    }

    /// What the fanout's Lua completes with `<sid>}` to name a session's record, event log and seen
    /// changes, on a Redis where it may reach any key (one node).
    pub fn session_name_prefixes(&self) -> [String; 3] {
        [
            format!("{}:sess:{{s:", self.prefix),
            format!("{}:ev:{{s:", self.prefix),
            format!("{}:seen:{{s:", self.prefix),
        ]
    }

    /// Set of session ids subscribed (legacy `resources/subscribe`) to one resource URI.
    pub fn subscribers(&self, uri: &str) -> String {
        format!("{}:subs:{{{}}}:{uri}", self.prefix, uri_tag(uri))
    }

    /// Pattern matching every subscriber set (for the janitor's SCAN).
    pub fn subscribers_pattern(&self) -> String {
        format!("{}:subs:*", self.prefix)
    }

    /// Hash of the changes of one resource whose fanout to its subscribers has not finished
    /// (change id → the change), in the resource's slot.
    pub fn pending_changes(&self, uri: &str) -> String {
        format!("{}:pend:{{{}}}:{uri}", self.prefix, uri_tag(uri))
    }

    /// Pattern matching every pending-change hash (for the janitor's SCAN).
    pub fn pending_changes_pattern(&self) -> String {
        format!("{}:pend:*", self.prefix)
    }

    /// The value of one kv key, in the slot of its resource URI (`uri`).
    pub fn kv(&self, uri: &str) -> String {
        format!("{}:kv:{{{}}}:{uri}", self.prefix, uri_tag(uri))
    }

    /// Sorted set of kv keys (all with score 0), for ordered, paginated listing and the key bound.
    pub fn kv_index(&self) -> String {
        format!("{}:kvkeys", self.prefix)
    }

    /// A secret shared by every replica (e.g. the MRTR request-state key), created by the first.
    pub fn secret(&self, name: &str) -> String {
        format!("{}:secret:{name}", self.prefix)
    }

    /// A result-cache entry (`id`, from [`crate::cache::entry_id`], is a tool name and hex digits).
    pub fn cache_entry(&self, id: &str) -> String {
        format!("{}:cache:{{c:{id}}}", self.prefix)
    }

    /// The lock a replica holds while it fills a cache entry (in the entry's slot).
    pub fn cache_lock(&self, id: &str) -> String {
        format!("{}:cache-lock:{{c:{id}}}", self.prefix)
    }

    /// The set recording which cache entries depend on a tag (e.g. a table).
    pub fn cache_tag(&self, tag: &str) -> String {
        format!("{}:ctag:{{{}}}:{tag}", self.prefix, uri_tag(tag))
    }

    /// Broadcast channel announcing filled cache entries (waiters on every replica pick them up).
    pub fn cache_channel(&self) -> String {
        format!("{}:cache", self.prefix)
    }

    /// A quota's state: `kind` is `rate` (a GCRA arrival time), `calls` or `streams` (sorted sets of
    /// leases) or `sessions` (sorted set of session ids); `subject` is a principal id, or `cluster` for
    /// the cluster-wide quota (principal ids are hex digits). One subject's keys share a slot.
    pub fn quota(&self, kind: &str, subject: &str) -> String {
        format!("{}:quota:{kind}:{{q:{subject}}}", self.prefix)
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

    /// Lease key that elects the replica running the janitor.
    pub fn janitor_lease(&self) -> String {
        format!("{}:lease:janitor", self.prefix)
    }

    /// Channel of messages addressed to one replica (GET-stream events, forwarded responses).
    pub fn replica_channel(&self, replica_tag: &str) -> String {
        format!("{}:r:{replica_tag}", self.prefix)
    }

    /// Prefix of [`Self::replica_channel`], which the Lua scripts complete with a replica tag.
    pub fn replica_channel_prefix(&self) -> String {
        self.replica_channel("")
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
    fn names_carry_the_prefix_and_the_tag_of_what_they_belong_to() {
        let keys = Keys::new("t1");
        let u = super::uri_tag("kv://a");
        assert_eq!(u.len(), 18);
        assert_eq!(keys.session("abc"), "t1:sess:{s:abc}");
        assert_eq!(keys.event_log("abc"), "t1:ev:{s:abc}");
        assert_eq!(keys.seen("abc"), "t1:seen:{s:abc}");
        let [sess, ev, seen] = keys.session_name_prefixes();
        assert_eq!(format!("{sess}abc}}"), keys.session("abc"));
        assert_eq!(format!("{ev}abc}}"), keys.event_log("abc"));
        assert_eq!(format!("{seen}abc}}"), keys.seen("abc"));
        assert_eq!(
            keys.subscribers("kv://a"),
            format!("t1:subs:{{{u}}}:kv://a")
        );
        assert_eq!(
            keys.pending_changes("kv://a"),
            format!("t1:pend:{{{u}}}:kv://a")
        );
        assert_eq!(keys.kv("kv://a"), format!("t1:kv:{{{u}}}:kv://a"));
        assert_eq!(keys.subscribers_pattern(), "t1:subs:*");
        assert_eq!(keys.pending_changes_pattern(), "t1:pend:*");
        assert_eq!(keys.kv_index(), "t1:kvkeys");
        assert_eq!(keys.replica_channel("r9"), "t1:r:r9");
        assert_eq!(keys.replica_channel_prefix(), "t1:r:");
        assert_eq!(keys.control_channel(), "t1:ctl");
        assert_eq!(keys.resource_channel(), "t1:res");
        assert_eq!(keys.cache_entry("x"), "t1:cache:{c:x}");
        assert_eq!(keys.cache_lock("x"), "t1:cache-lock:{c:x}");
        assert!(keys.cache_tag("tbl").starts_with("t1:ctag:{u:"));
        assert!(keys.cache_tag("tbl").ends_with("}:tbl"));
        assert_eq!(keys.cache_channel(), "t1:cache");
        assert_eq!(keys.quota("rate", "ab12"), "t1:quota:rate:{q:ab12}");
        assert_eq!(
            keys.quota("sessions", "cluster"),
            "t1:quota:sessions:{q:cluster}"
        );
        assert_eq!(keys.quota_sessions_pattern(), "t1:quota:sessions:*");
    }

    #[test]
    fn a_uri_with_braces_stays_outside_the_hash_tag() {
        let keys = Keys::new("t1");
        let name = keys.subscribers("kv://{a}");
        let tag_end = name.find('}').expect("a tag");
        assert!(name[..tag_end].starts_with("t1:subs:{u:"));
        assert_eq!(&name[tag_end + 1..], ":kv://{a}");
    }

    #[test]
    fn one_things_keys_share_a_slot_and_different_things_spread() {
        use fred::util::redis_keyslot as slot;
        let keys = Keys::new("shoal");
        let sid = "0a1b2c";
        assert_eq!(
            slot(keys.session(sid).as_bytes()),
            slot(keys.event_log(sid).as_bytes())
        );
        assert_eq!(
            slot(keys.session(sid).as_bytes()),
            slot(keys.seen(sid).as_bytes())
        );
        let uri = "kv://x";
        for name in [keys.pending_changes(uri), keys.kv(uri)] {
            assert_eq!(
                slot(name.as_bytes()),
                slot(keys.subscribers(uri).as_bytes())
            );
        }
        assert_eq!(
            slot(keys.cache_entry("t:1").as_bytes()),
            slot(keys.cache_lock("t:1").as_bytes())
        );
        assert_eq!(
            slot(keys.quota("rate", "ab").as_bytes()),
            slot(keys.quota("sessions", "ab").as_bytes())
        );
        let slots: std::collections::HashSet<u16> = (0..64)
            .map(|i| slot(keys.session(&format!("{i:032x}")).as_bytes()))
            .collect();
        assert!(
            slots.len() > 32,
            "sessions spread over slots: {}",
            slots.len()
        );
        // A prefix with a hash tag of its own pins every key to one slot.
        let pinned = Keys::new("{shoal}");
        assert_eq!(
            slot(pinned.session(sid).as_bytes()),
            slot(pinned.subscribers(uri).as_bytes())
        );
    }
}
