//! The periodic sweep one replica at a time runs (under a lease): expired subscribers and session
//! quota entries.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::time::Duration;

use fred::{
    interfaces::KeysInterface,
    prelude::{Expiration, SetOptions, Value},
};
use tokio::time::Instant;

use super::{
    Backend, BackendResult,
    memory::{MemoryBackend, State},
    quota::{QuotaKind, SESSION_RECHECK},
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
        use futures::TryStreamExt;
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
        let client = self.client();
        let sets: Vec<fred::types::Key> = client
            .scan_buffered(self.inner.keys.subscribers_pattern(), Some(200), None)
            .try_collect()
            .await?;
        let mut removed = 0;
        for set in sets {
            let Some(set) = set.as_str().map(str::to_owned) else {
                continue;
            };
            let pruned: i64 = self
                .eval(
                    &super::subscriptions::PRUNE_SUBSCRIBERS_SCRIPT,
                    vec![set],
                    vec![self.inner.session_prefix.as_str().into()],
                )
                .await?;
            removed += pruned.max(0) as u64;
        }
        // Session quota indexes of principals that open no new session (their next initialize
        // would prune them too): bounded by the sessions that still exist.
        let indexes: Vec<fred::types::Key> = client
            .scan_buffered(self.inner.keys.quota_sessions_pattern(), Some(200), None)
            .try_collect()
            .await?;
        for index in indexes {
            let Some(index) = index.as_str().map(str::to_owned) else {
                continue;
            };
            let _: i64 = self
                .eval(
                    &super::quota::QUOTA_PRUNE_SESSIONS_SCRIPT,
                    vec![index],
                    vec![
                        self.inner.session_prefix.as_str().into(),
                        Value::from(SESSION_RECHECK.as_millis() as i64),
                    ],
                )
                .await?;
        }
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
