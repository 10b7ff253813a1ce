//! The embedded default: the same operations as the Redis backend, on in-process maps.
//!
//! Expiry uses `tokio::time::Instant`, so tests can pause and advance time. Expired entries are
//! invisible at once (every read checks the deadline) and are swept by [`MemoryBackend::janitor_pass`].
//! Messages are published by calling [`Bus::dispatch`] with the exact wire formats Redis would
//! carry, so the bus code is the same in both modes.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use super::{
    BackendConfig, CacheEntry, FeedClaim, FeedStart, KvSetOutcome, LoggedEvent, QuotaCheck,
    QuotaKind, QuotaRefusal, SESSION_RECHECK, SubscribeOutcome,
};
use crate::{
    bus::{Bus, BusMessage, ListKind, SessionEvent},
    ids::{EventId, ReplicaTag},
    metrics::Metrics,
};

#[derive(Debug)]
struct SessionRecord {
    init: String,
    fields: HashMap<String, String>,
    subscriptions: HashSet<String>,
    feed: Option<String>,
    cursor: Option<EventId>,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct EventLog {
    entries: VecDeque<LoggedEvent>,
    expires_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<String, SessionRecord>,
    logs: HashMap<String, EventLog>,
    subscribers: HashMap<String, HashSet<String>>,
    kv: BTreeMap<String, String>,
    secrets: HashMap<String, String>,
    cache: HashMap<String, (String, Instant)>,
    cache_locks: HashMap<String, (String, Instant)>,
    cache_tags: HashMap<String, HashSet<String>>,
    leases: HashMap<String, (String, Instant)>,
    maps: HashMap<String, BTreeMap<String, String>>,
    /// GCRA arrival times of the rate quotas, by subject.
    quota_rates: HashMap<String, Instant>,
    /// Members of the cap quotas with their deadline (lease expiry, or session recheck).
    quota_caps: HashMap<(QuotaKind, String), HashMap<String, Instant>>,
    last_id: EventId,
}

impl State {
    fn live_session(&mut self, session: &str, now: Instant) -> Option<&mut SessionRecord> {
        match self.sessions.get(session) {
            Some(record) if record.expires_at > now => self.sessions.get_mut(session),
            _ => None,
        }
    }

    fn next_id(&mut self) -> EventId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        self.last_id = if ms > self.last_id.ms {
            EventId { ms, seq: 0 }
        } else {
            EventId {
                ms: self.last_id.ms,
                seq: self.last_id.seq + 1,
            }
        };
        self.last_id
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    config: BackendConfig,
    bus: Bus,
    metrics: Metrics,
}

/// Shared state in process memory (one replica). Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

impl MemoryBackend {
    /// An empty in-memory backend publishing into `bus`.
    pub fn new(config: BackendConfig, bus: Bus, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                config,
                bus,
                metrics,
            }),
        }
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, channel: &str, message: &str) {
        self.inner.bus.dispatch(channel, message.as_bytes());
    }

    pub(super) fn ping(&self) {}

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

    pub(super) fn subscribe(&self, session: &str, uri: &str) -> SubscribeOutcome {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let max = self.inner.config.max_subscriptions_per_session as usize;
        let mut state = self.state();
        let Some(record) = state.live_session(session, now) else {
            return SubscribeOutcome::SessionGone;
        };
        if !record.subscriptions.contains(uri) && record.subscriptions.len() >= max {
            return SubscribeOutcome::TooMany;
        }
        let subscribers = state.subscribers.get(uri).map_or(0, |set| set.len());
        let record = state.live_session(session, now).expect("checked above");
        if !record.subscriptions.contains(uri)
            && subscribers as u64 >= self.inner.config.max_subscribers_per_uri
        {
            return SubscribeOutcome::TooManySubscribers;
        }
        record.subscriptions.insert(uri.to_owned());
        record.expires_at = now + ttl;
        state
            .subscribers
            .entry(uri.to_owned())
            .or_default()
            .insert(session.to_owned());
        SubscribeOutcome::Subscribed
    }

    pub(super) fn unsubscribe(&self, session: &str, uri: &str) {
        let mut state = self.state();
        if let Some(record) = state.sessions.get_mut(session) {
            record.subscriptions.remove(uri);
        }
        if let Some(set) = state.subscribers.get_mut(uri) {
            set.remove(session);
            if set.is_empty() {
                state.subscribers.remove(uri);
            }
        }
    }

    /// Appends under the state lock and returns the message to publish, if any.
    fn append_locked(
        &self,
        state: &mut State,
        session: &str,
        payload: &str,
    ) -> (EventId, Option<String>) {
        let id = state.next_id();
        let max_len = self.inner.config.event_log_max_len as usize;
        let expires_at = Instant::now() + self.inner.config.event_retention;
        let log = state.logs.entry(session.to_owned()).or_default();
        let prev = log.entries.back().map_or(EventId::ZERO, |event| event.id);
        log.entries.push_back(LoggedEvent {
            id,
            payload: Arc::from(payload),
        });
        while log.entries.len() > max_len {
            log.entries.pop_front();
        }
        log.expires_at = Some(expires_at);
        let message = state
            .sessions
            .get(session)
            .and_then(|record| record.feed.as_deref())
            .and_then(|feed| feed.split_once(':'))
            .and_then(|(tag, stream)| Some((tag.to_owned(), stream.parse::<u64>().ok()?)))
            .map(|(tag, stream)| {
                (
                    self.inner.bus.keys().replica_channel(&tag),
                    BusMessage::Event(SessionEvent {
                        session,
                        stream,
                        id,
                        prev,
                        payload,
                    })
                    .encode(),
                )
            });
        (
            id,
            message.map(|(channel, message)| format!("{channel}\n{message}")),
        )
    }

    fn publish_framed(&self, framed: &str) {
        if let Some((channel, message)) = framed.split_once('\n') {
            self.publish(channel, message);
        }
    }

    pub(super) fn event_append(&self, session: &str, payload: &str) -> Option<EventId> {
        let (id, message) = {
            let mut state = self.state();
            state.live_session(session, Instant::now())?;
            self.append_locked(&mut state, session, payload)
        };
        if let Some(message) = message {
            self.publish_framed(&message);
        }
        Some(id)
    }

    pub(super) fn feed_open(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        after: Option<EventId>,
        limit: u64,
    ) -> Option<FeedStart> {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        let record = state.live_session(session, now)?;
        let previous = record.feed.replace(holder.to_owned());
        let cursor = record.cursor;
        record.expires_at = now + ttl;
        let log = state
            .logs
            .get(session)
            .filter(|log| log.expires_at.is_some_and(|at| at > now));
        let from = match after {
            // Clamped to the newest event, as FEED_OPEN does.
            Some(after) => after.min(
                log.and_then(|log| log.entries.back())
                    .map_or(EventId::ZERO, |e| e.id),
            ),
            // Another stream holds the session: start at the end of the log (see FEED_OPEN).
            None if previous.is_some() => {
                let last = log
                    .and_then(|log| log.entries.back())
                    .map_or(EventId::ZERO, |e| e.id);
                return Some(FeedStart {
                    from: last,
                    events: Vec::new(),
                });
            }
            None => cursor.unwrap_or(EventId::ZERO),
        };
        let events = log
            .map(|log| {
                log.entries
                    .iter()
                    .filter(|event| event.id > from)
                    .take(limit as usize)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Some(FeedStart { from, events })
    }

    pub(super) fn feed_checkpoint(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        last: EventId,
        release: bool,
    ) -> bool {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        let Some(record) = state.live_session(session, now) else {
            return false;
        };
        if record.feed.as_deref() == Some(holder) {
            record.cursor = Some(last);
            if release {
                record.feed = None;
            }
        }
        record.expires_at = now + ttl;
        true
    }

    pub(super) fn events_after(
        &self,
        session: &str,
        after: EventId,
        limit: u64,
    ) -> Vec<LoggedEvent> {
        let now = Instant::now();
        let state = self.state();
        state
            .logs
            .get(session)
            .filter(|log| log.expires_at.is_some_and(|at| at > now))
            .map(|log| {
                log.entries
                    .iter()
                    .filter(|event| event.id > after)
                    .take(limit as usize)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn resource_updated(&self, uri: &str, legacy_payload: &str) -> u64 {
        let now = Instant::now();
        let messages = {
            let mut state = self.state();
            let sessions: Vec<String> = state
                .subscribers
                .get(uri)
                .map(|set| set.iter().cloned().collect())
                .unwrap_or_default();
            let mut messages = Vec::new();
            for session in sessions {
                if state.live_session(&session, now).is_some() {
                    let (_, message) = self.append_locked(&mut state, &session, legacy_payload);
                    messages.push(message);
                } else if let Some(set) = state.subscribers.get_mut(uri) {
                    set.remove(&session);
                }
            }
            messages
        };
        let delivered = messages.len() as u64;
        for message in messages.into_iter().flatten() {
            self.publish_framed(&message);
        }
        self.publish(
            &self.inner.bus.keys().resource_channel(),
            &BusMessage::ResourceUpdated {
                uri,
                trace: crate::telemetry::current_traceparent().as_deref(),
            }
            .encode(),
        );
        delivered
    }

    pub(super) fn list_changed(&self, list: ListKind) {
        self.publish(
            &self.inner.bus.keys().resource_channel(),
            &BusMessage::ListChanged(list).encode(),
        );
    }

    pub(super) fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> bool {
        // One process: a tag other than ours names a replica (an earlier run) nobody hears.
        if target.as_str() != self.inner.bus.tag().as_str() {
            return false;
        }
        self.publish(
            &self.inner.bus.keys().replica_channel(target.as_str()),
            &BusMessage::Forward {
                session,
                trace: crate::telemetry::current_traceparent().as_deref(),
                payload,
            }
            .encode(),
        );
        true
    }

    pub(super) fn publish_probe(&self, probe: &str) {
        self.publish(
            &self
                .inner
                .bus
                .keys()
                .replica_channel(self.inner.bus.tag().as_str()),
            probe,
        );
    }

    pub(super) fn publish_cancel(&self, session: &str, payload: &str) {
        // One replica: nothing else can run the request.
        let _ = (session, payload);
    }

    pub(super) fn kv_set(&self, key: &str, value: &str) -> KvSetOutcome {
        let mut state = self.state();
        if !state.kv.contains_key(key) && state.kv.len() as u64 >= self.inner.config.kv_max_keys {
            return KvSetOutcome::Full;
        }
        match state.kv.insert(key.to_owned(), value.to_owned()) {
            None => KvSetOutcome::Created,
            Some(_) => KvSetOutcome::Updated,
        }
    }

    pub(super) fn kv_get(&self, key: &str) -> Option<String> {
        self.state().kv.get(key).cloned()
    }

    pub(super) fn kv_delete(&self, key: &str) -> bool {
        self.state().kv.remove(key).is_some()
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

    pub(super) fn shared_secret(&self, name: &str, candidate: &str) -> String {
        self.state()
            .secrets
            .entry(name.to_owned())
            .or_insert_with(|| candidate.to_owned())
            .clone()
    }

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

    pub(super) fn quota_admit(
        &self,
        checks: &[QuotaCheck<'_>],
        member: &str,
        lease: Duration,
    ) -> Option<QuotaRefusal> {
        let now = Instant::now();
        let mut state = self.state();
        let mut arrivals = Vec::with_capacity(checks.len());
        for (index, check) in checks.iter().enumerate() {
            if check.kind == QuotaKind::Rate {
                let interval = Duration::from_secs_f64(1.0 / f64::from(check.limit));
                let tat = state
                    .quota_rates
                    .get(check.subject)
                    .copied()
                    .unwrap_or(now)
                    .max(now);
                let next = tat + interval;
                let allowed_until = now + interval * check.burst.max(1);
                if next > allowed_until {
                    return Some(QuotaRefusal {
                        index,
                        retry_after: Some(next - allowed_until),
                    });
                }
                arrivals.push((check.subject, next));
                continue;
            }
            let State {
                sessions,
                quota_caps,
                ..
            } = &mut *state;
            let members = quota_caps
                .entry((check.kind, check.subject.to_owned()))
                .or_default();
            members.retain(|member, deadline| {
                if *deadline > now {
                    return true;
                }
                let live = check.kind == QuotaKind::Sessions
                    && sessions
                        .get(member)
                        .is_some_and(|record| record.expires_at > now);
                if live {
                    *deadline = now + SESSION_RECHECK;
                }
                live
            });
            if members.len() >= check.limit as usize {
                return Some(QuotaRefusal {
                    index,
                    retry_after: None,
                });
            }
        }
        for (subject, next) in arrivals {
            state.quota_rates.insert(subject.to_owned(), next);
        }
        for check in checks.iter().filter(|check| check.kind != QuotaKind::Rate) {
            state
                .quota_caps
                .entry((check.kind, check.subject.to_owned()))
                .or_default()
                .insert(member.to_owned(), now + lease);
        }
        None
    }

    pub(super) fn quota_release(&self, releases: &[(QuotaKind, &str, &str)]) {
        let mut state = self.state();
        for (kind, subject, member) in releases {
            if let Some(members) = state.quota_caps.get_mut(&(*kind, (*subject).to_owned())) {
                members.remove(*member);
            }
        }
    }

    pub(super) fn quota_renew(
        &self,
        (kind, subject): (QuotaKind, &str),
        members: &[String],
        lease: Duration,
    ) {
        let until = Instant::now() + lease;
        let mut state = self.state();
        if let Some(held) = state.quota_caps.get_mut(&(kind, subject.to_owned())) {
            for member in members {
                if let Some(deadline) = held.get_mut(member) {
                    *deadline = until;
                }
            }
        }
    }

    pub(super) fn quota_bind_session(&self, subjects: &[&str], token: &str, session: &str) {
        let at = Instant::now() + SESSION_RECHECK;
        let mut state = self.state();
        for subject in subjects {
            if let Some(members) = state
                .quota_caps
                .get_mut(&(QuotaKind::Sessions, (*subject).to_owned()))
                && members.remove(token).is_some()
            {
                members.insert(session.to_owned(), at);
            }
        }
    }

    pub(super) fn janitor_pass(&self, _holder: &ReplicaTag, _lease: Duration) -> u64 {
        let now = Instant::now();
        let mut state = self.state();
        let before = state.sessions.len() + state.logs.len();
        state.sessions.retain(|_, record| record.expires_at > now);
        state.cache.retain(|_, (_, expires)| *expires > now);
        state
            .logs
            .retain(|_, log| log.expires_at.is_some_and(|at| at > now));
        let State {
            sessions,
            subscribers,
            ..
        } = &mut *state;
        for set in subscribers.values_mut() {
            set.retain(|session| sessions.contains_key(session));
        }
        subscribers.retain(|_, set| !set.is_empty());
        state.quota_rates.retain(|_, tat| *tat > now);
        let State {
            sessions,
            quota_caps,
            ..
        } = &mut *state;
        for ((kind, _), members) in quota_caps.iter_mut() {
            members.retain(|member, deadline| {
                *deadline > now
                    || (*kind == QuotaKind::Sessions
                        && sessions
                            .get(member)
                            .is_some_and(|record| record.expires_at > now))
            });
        }
        state.quota_caps.retain(|_, members| !members.is_empty());
        (before - state.sessions.len() - state.logs.len()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::Backend, bus::ControlMessage, keys::Keys};

    fn config() -> BackendConfig {
        BackendConfig {
            session_ttl: Duration::from_secs(60),
            event_log_max_len: 3,
            event_retention: Duration::from_secs(600),
            max_subscriptions_per_session: 2,
            max_subscribers_per_uri: 100,
            kv_max_keys: 2,
            redis_timeout: Duration::from_secs(1),
            redis_pool_size: 1,
        }
    }

    fn backend() -> (Backend, Bus, tokio::sync::mpsc::Receiver<ControlMessage>) {
        let metrics = Metrics::new();
        let (bus, control) = Bus::new(Keys::new("t"), ReplicaTag::generate(), metrics.clone());
        let backend = Backend::Memory(MemoryBackend::new(config(), bus.clone(), metrics));
        (backend, bus, control)
    }

    #[tokio::test(start_paused = true)]
    async fn quotas_limit_rates_and_caps_and_free_again() {
        use crate::backend::{QuotaCheck, QuotaKind};
        let (backend, _bus, _control) = backend();
        let lease = Duration::from_secs(60);
        let rate = [QuotaCheck {
            kind: QuotaKind::Rate,
            subject: "p",
            limit: 2,
            burst: 3,
        }];
        for _ in 0..3 {
            assert_eq!(
                backend.quota_admit(&rate, "", lease).await.expect("admit"),
                None
            );
        }
        let refused = backend
            .quota_admit(&rate, "", lease)
            .await
            .expect("admit")
            .expect("over the burst");
        assert_eq!(refused.index, 0);
        assert_eq!(refused.retry_after, Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            backend.quota_admit(&rate, "", lease).await.expect("admit"),
            None
        );

        // A cap refuses nothing it cannot also record: the rate is not spent by a refused call.
        let calls = |subject| QuotaCheck {
            kind: QuotaKind::Calls,
            subject,
            limit: 1,
            burst: 0,
        };
        let both = [calls("p"), calls("cluster")];
        assert_eq!(
            backend
                .quota_admit(&both, "c1", lease)
                .await
                .expect("admit"),
            None
        );
        let refused = backend
            .quota_admit(&[calls("q"), calls("cluster")], "c2", lease)
            .await
            .expect("admit")
            .expect("the cluster cap");
        assert_eq!((refused.index, refused.retry_after), (1, None));
        backend
            .quota_release(&[
                (QuotaKind::Calls, "p", "c1"),
                (QuotaKind::Calls, "cluster", "c1"),
            ])
            .await
            .expect("release");
        assert_eq!(
            backend
                .quota_admit(&[calls("q"), calls("cluster")], "c2", lease)
                .await
                .expect("admit"),
            None
        );
        // An unrenewed lease lapses.
        tokio::time::advance(lease + Duration::from_secs(1)).await;
        assert_eq!(
            backend
                .quota_admit(&both, "c3", lease)
                .await
                .expect("admit"),
            None
        );

        // Sessions: a reservation bound to a session holds the slot until the session is gone.
        let sessions = [QuotaCheck {
            kind: QuotaKind::Sessions,
            subject: "p",
            limit: 1,
            burst: 0,
        }];
        assert_eq!(
            backend
                .quota_admit(&sessions, "r1", lease)
                .await
                .expect("admit"),
            None
        );
        backend
            .session_create("s1", "{}", "p")
            .await
            .expect("create");
        backend
            .quota_bind_session(&["p"], "r1", "s1")
            .await
            .expect("bind");
        // Past its recheck, the session is found alive and still counts.
        tokio::time::advance(super::SESSION_RECHECK + Duration::from_secs(1)).await;
        assert!(
            backend
                .quota_admit(&sessions, "r2", lease)
                .await
                .expect("admit")
                .is_some()
        );
        // Deleted: its slot is given back (by the DELETE, or at the next recheck).
        backend.session_delete("s1").await.expect("delete");
        tokio::time::advance(super::SESSION_RECHECK).await;
        assert_eq!(
            backend
                .quota_admit(&sessions, "r2", lease)
                .await
                .expect("admit"),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_slide_and_expire() {
        let (backend, _bus, _control) = backend();
        backend
            .session_create("s1", "{}", "p")
            .await
            .expect("create");
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(backend.session_touch("s1").await.expect("touch"));
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(
            backend.session_load("s1").await.expect("load").as_deref(),
            Some("{}")
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!backend.session_touch("s1").await.expect("touch"));
        assert_eq!(backend.session_load("s1").await.expect("load"), None);
        assert!(
            backend
                .janitor_pass(&ReplicaTag::generate(), Duration::from_secs(1))
                .await
                .expect("janitor")
                >= 1
        );
    }

    #[tokio::test]
    async fn events_reach_the_feed_holder_and_are_bounded() {
        let (backend, bus, _control) = backend();
        backend
            .session_create("s1", "{}", "p")
            .await
            .expect("create");
        let mut feed = bus.register_feed("s1").expect("feed");
        let holder = crate::bus::feed_holder(bus.tag(), feed.stream());
        let start = backend
            .feed_open(
                FeedClaim {
                    session: "s1",
                    holder: &holder,
                },
                None,
                10,
            )
            .await
            .expect("open")
            .expect("live");
        assert_eq!(
            start,
            FeedStart {
                from: EventId::ZERO,
                events: Vec::new()
            }
        );
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(
                backend
                    .event_append("s1", &format!("{{\"n\":{n}}}"))
                    .await
                    .expect("append")
                    .expect("live"),
            );
        }
        for id in &ids {
            assert_eq!(feed.events.recv().await.expect("event").id, *id);
        }
        // Only the last three are kept.
        let kept = backend
            .events_after("s1", EventId::ZERO, 10)
            .await
            .expect("read");
        assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
        let start = backend
            .feed_open(
                FeedClaim {
                    session: "s1",
                    holder: &holder,
                },
                Some(ids[3]),
                10,
            )
            .await
            .expect("open")
            .expect("live");
        assert_eq!(
            start.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ids[4]]
        );
        assert!(
            backend
                .event_append("gone", "{}")
                .await
                .expect("append")
                .is_none()
        );
    }

    #[tokio::test]
    async fn subscriptions_fan_out_and_are_bounded() {
        let (backend, _bus, _control) = backend();
        backend
            .session_create("a", "{}", "p")
            .await
            .expect("create");
        backend
            .session_create("b", "{}", "p")
            .await
            .expect("create");
        assert_eq!(
            backend.subscribe("a", "kv://x").await.expect("sub"),
            SubscribeOutcome::Subscribed
        );
        assert_eq!(
            backend.subscribe("b", "kv://x").await.expect("sub"),
            SubscribeOutcome::Subscribed
        );
        assert_eq!(
            backend.subscribe("a", "kv://y").await.expect("sub"),
            SubscribeOutcome::Subscribed
        );
        assert_eq!(
            backend.subscribe("a", "kv://z").await.expect("sub"),
            SubscribeOutcome::TooMany
        );
        assert_eq!(
            backend.subscribe("nope", "kv://x").await.expect("sub"),
            SubscribeOutcome::SessionGone
        );
        assert_eq!(
            backend
                .resource_updated("kv://x", "{}")
                .await
                .expect("update"),
            2
        );
        backend.unsubscribe("b", "kv://x").await.expect("unsub");
        assert_eq!(
            backend
                .resource_updated("kv://x", "{}")
                .await
                .expect("update"),
            1
        );
        assert!(backend.session_delete("a").await.expect("delete"));
        assert_eq!(
            backend
                .resource_updated("kv://x", "{}")
                .await
                .expect("update"),
            0
        );
    }

    #[tokio::test]
    async fn deletion_is_broadcast() {
        let (backend, _bus, mut control) = backend();
        backend
            .session_create("a", "{}", "p")
            .await
            .expect("create");
        assert!(backend.session_delete("a").await.expect("delete"));
        assert!(!backend.session_delete("a").await.expect("delete"));
        assert_eq!(
            control.recv().await,
            Some(ControlMessage::SessionDeleted {
                session: "a".into()
            })
        );
    }

    #[tokio::test]
    async fn kv_is_bounded_and_listed_in_order() {
        let (backend, _bus, _control) = backend();
        assert_eq!(
            backend.kv_set("b", "1").await.expect("set"),
            KvSetOutcome::Created
        );
        assert_eq!(
            backend.kv_set("a", "2").await.expect("set"),
            KvSetOutcome::Created
        );
        assert_eq!(
            backend.kv_set("a", "3").await.expect("set"),
            KvSetOutcome::Updated
        );
        assert_eq!(
            backend.kv_set("c", "4").await.expect("set"),
            KvSetOutcome::Full
        );
        assert_eq!(
            backend.kv_list(None, 10).await.expect("list"),
            vec!["a", "b"]
        );
        assert_eq!(
            backend.kv_list(Some("a"), 10).await.expect("list"),
            vec!["b"]
        );
        assert_eq!(
            backend.kv_get("a").await.expect("get").as_deref(),
            Some("3")
        );
        assert!(backend.kv_delete("a").await.expect("delete"));
        assert_eq!(backend.kv_get("a").await.expect("get"), None);
    }
}
