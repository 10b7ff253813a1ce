//! The periodic sweep one replica at a time runs (under a lease): expired subscribers and session
//! quota entries.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::time::Duration;

use fred::{
    interfaces::KeysInterface,
    prelude::{Expiration, SetOptions},
};
use tokio::time::Instant;

use super::{
    Backend, BackendResult,
    memory::{MemoryBackend, State},
    quota::QuotaKind,
    redis::RedisBackend,
};
use crate::{ids::ReplicaTag, telemetry::attr};

impl Backend {
    /// Housekeeping that needs no single owner: drops expired sessions from subscriber sets (Redis,
    /// elected by a lease so one replica does it at a time) or expired entries (memory). Returns the
    /// number of entries removed.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn janitor_pass(
        &self,
        lease_holder: &ReplicaTag,
        lease: Duration,
    ) -> BackendResult<u64> {
        delegate!(self, "janitor", janitor_pass(lease_holder, lease))
    }
}

impl RedisBackend {
    pub(super) async fn janitor_pass(
        &self,
        lease_holder: &ReplicaTag,
        lease: Duration,
    ) -> BackendResult<u64> {
        use fred::interfaces::SetsInterface as _;
        let won: Option<String> = self
            .client()
            .set(
                self.inner.keys.janitor_lease(),
                lease_holder.as_str(),
                Some(Expiration::EX(lease.as_secs().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if won.is_none() {
            return Ok(0);
        }
        // Resource changes whose fanout a replica left unfinished (it died, or Redis failed it,
        // between the steps): finished now, late but neither lost nor doubled. Two command
        // timeouts (and a second) are more than any fanout in progress takes.
        let age = self.inner.config.redis_timeout * 2 + Duration::from_secs(1);
        let finished = self.finish_pending_changes(age).await?;
        if finished > 0 {
            tracing::info!(
                finished,
                "the janitor finished resource changes left pending"
            );
            self.inner.metrics.fanouts_finished_by_janitor(finished);
        }
        // Subscriber sets: members whose session expired (or was deleted by a replica that died
        // before cleaning its sets) leave. The records live in the sessions' slots.
        let mut removed = 0;
        for set in self.scan_all(self.inner.keys.subscribers_pattern()).await? {
            let members: Vec<String> = self.client().smembers(&set).await?;
            let gone: Vec<&String> = members
                .iter()
                .zip(self.sessions_exist(&members).await)
                .filter_map(|(session, exists)| matches!(exists, Ok(false)).then_some(session))
                .collect();
            if !gone.is_empty() {
                let count = gone.len() as u64;
                let _: i64 = self.client().srem(&set, gone).await?;
                removed += count;
            }
        }
        // Session quota indexes of principals that open no new session (a full cap rechecks its
        // own): bounded by the sessions that still exist.
        self.recheck_all_session_indexes().await?;
        Ok(removed)
    }
}

impl MemoryBackend {
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
