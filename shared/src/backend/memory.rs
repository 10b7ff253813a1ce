//! The embedded default: the same operations as the Redis backend, on in-process maps.
//!
//! Expiry uses `tokio::time::Instant`, so tests can pause and advance time. Expired entries are
//! invisible at once (every read checks the deadline) and are swept by
//! [`MemoryBackend::janitor_pass`].
//! Messages are published by calling [`Bus::dispatch`] with the exact wire formats Redis would
//! carry, so the bus code is the same in both modes.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use super::{BackendConfig, LoggedEvent, QuotaKind};
use crate::{background::Background, bus::Bus, ids::EventId, metrics::Metrics};

#[derive(Debug)]
pub(super) struct SessionRecord {
    pub(super) init: String,
    pub(super) fields: HashMap<String, String>,
    pub(super) subscriptions: HashSet<String>,
    pub(super) feed: Option<String>,
    pub(super) cursor: Option<EventId>,
    pub(super) expires_at: Instant,
}

#[derive(Debug, Default)]
pub(super) struct EventLog {
    pub(super) entries: VecDeque<LoggedEvent>,
    pub(super) expires_at: Option<Instant>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) sessions: HashMap<String, SessionRecord>,
    pub(super) logs: HashMap<String, EventLog>,
    pub(super) subscribers: HashMap<String, HashSet<String>>,
    pub(super) kv: BTreeMap<String, String>,
    pub(super) secrets: HashMap<String, String>,
    pub(super) cache: HashMap<String, (String, Instant)>,
    pub(super) cache_locks: HashMap<String, (String, Instant)>,
    pub(super) cache_tags: HashMap<String, HashSet<String>>,
    pub(super) leases: HashMap<String, (String, Instant)>,
    pub(super) maps: HashMap<String, BTreeMap<String, String>>,
    /// GCRA arrival times of the rate quotas, by subject.
    pub(super) quota_rates: HashMap<String, Instant>,
    /// Members of the cap quotas with their deadline (lease expiry, or session recheck).
    pub(super) quota_caps: HashMap<(QuotaKind, String), HashMap<String, Instant>>,
    pub(super) last_id: EventId,
}

impl State {
    pub(super) fn live_session(
        &mut self,
        session: &str,
        now: Instant,
    ) -> Option<&mut SessionRecord> {
        match self.sessions.get(session) {
            Some(record) if record.expires_at > now => self.sessions.get_mut(session),
            _ => None,
        }
    }

    pub(super) fn next_id(&mut self) -> EventId {
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
pub(super) struct Inner {
    pub(super) state: Mutex<State>,
    pub(super) config: BackendConfig,
    pub(super) bus: Bus,
    pub(super) metrics: Metrics,
    /// Where the GET-stream feeds run: shutdown waits for them.
    pub(super) background: Background,
}

/// Shared state in process memory (one replica). Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    pub(super) inner: Arc<Inner>,
}

impl MemoryBackend {
    /// An empty in-memory backend publishing into `bus`.
    pub fn new(config: BackendConfig, bus: Bus, metrics: Metrics, background: Background) -> Self {
        // In one process the bus hears everything from the start.
        bus.mark_subscribed();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                config,
                bus,
                metrics,
                background,
            }),
        }
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn publish(&self, channel: &str, message: &str) {
        self.inner.bus.dispatch(channel, message.as_bytes());
    }

    pub(super) fn ping(&self) {}
}

#[cfg(test)]
mod tests {
    //! What needs control of time (expiry, rates refilling); everything else is in the contract
    //! tests, which run on both backends (`server/tests/it/backend_contract.rs`).
    use std::time::Duration;

    use super::*;
    use crate::{backend::Backend, bus::ControlMessage, ids::ReplicaTag, keys::Keys};

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
        let backend = Backend::Memory(MemoryBackend::new(
            config(),
            bus.clone(),
            metrics,
            Background::default(),
        ));
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
        tokio::time::advance(crate::backend::SESSION_RECHECK + Duration::from_secs(1)).await;
        assert!(
            backend
                .quota_admit(&sessions, "r2", lease)
                .await
                .expect("admit")
                .is_some()
        );
        // Deleted: its slot is given back (by the DELETE, or at the next recheck).
        backend.session_delete("s1").await.expect("delete");
        tokio::time::advance(crate::backend::SESSION_RECHECK).await;
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
}
