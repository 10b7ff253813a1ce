//! Cluster-wide quotas: GCRA rates and caps held by leases or sessions, admitted together or not at
//! all.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::{sync::LazyLock, time::Duration};

use fred::{prelude::Value, types::scripts::Script};
use tokio::time::Instant;

use super::{
    Backend, BackendResult,
    memory::{MemoryBackend, State},
    redis::RedisBackend,
};
use crate::telemetry::attr;

/// How long a session quota entry goes before it is checked against the session records again
/// (sessions that expired idle leave their principal's quota within this time; a DELETE at once).
pub const SESSION_RECHECK: Duration = Duration::from_secs(30);

/// The kinds of quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaKind {
    /// Requests per second with a burst (GCRA).
    Rate,
    /// Tool calls running at once (leases).
    Calls,
    /// Long-lived streams open at once (leases).
    Streams,
    /// Legacy sessions open at once.
    Sessions,
}

impl QuotaKind {
    /// The name in keys and scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Rate => "rate",
            QuotaKind::Calls => "calls",
            QuotaKind::Streams => "streams",
            QuotaKind::Sessions => "sessions",
        }
    }
}

/// One limit a quota decision checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCheck<'a> {
    /// What is limited.
    pub kind: QuotaKind,
    /// Whose quota: a principal id, or [`QUOTA_CLUSTER`] for everyone together.
    pub subject: &'a str,
    /// Requests per second of a rate, or the cap (greater than zero).
    pub limit: u32,
    /// Requests allowed at once above a rate (at least 1; ignored by caps).
    pub burst: u32,
}

/// The subject of the cluster-wide quotas.
pub const QUOTA_CLUSTER: &str = "cluster";

/// A quota decision that said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// The check that refused (index into the checks).
    pub index: usize,
    /// When a retry can pass: exact for rates, `None` for caps (they free when something ends).
    pub retry_after: Option<Duration>,
}

impl Backend {
    /// One quota decision: every check passes and `member` is recorded in each cap (a lease
    /// expiring after `lease` unless renewed, or for sessions a reservation until
    /// [`Backend::quota_bind_session`]), or nothing stays recorded and a refusing check is
    /// returned. The checks are decided per subject (on Redis, one script per subject, whose keys
    /// share a slot), in the order their subjects first appear; within a subject the first
    /// refusing check is returned.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn quota_admit(
        &self,
        checks: &[QuotaCheck<'_>],
        member: &str,
        lease: Duration,
    ) -> BackendResult<Option<QuotaRefusal>> {
        delegate!(self, "quota_admit", quota_admit(checks, member, lease))
    }

    /// Drops each `(kind, subject, member)`: `member` leaves the cap `(kind, subject)` (a lease
    /// ended, a session was deleted). Many releases share one round trip.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (a lease then expires by itself).
    pub async fn quota_release(&self, releases: &[(QuotaKind, &str, &str)]) -> BackendResult<()> {
        delegate!(self, "quota_release", quota_release(releases))
    }

    /// Renews the leases `members` (still held by this replica) in one cap for another `lease`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn quota_renew(
        &self,
        cap: (QuotaKind, &str),
        members: &[String],
        lease: Duration,
    ) -> BackendResult<()> {
        delegate!(self, "quota_renew", quota_renew(cap, members, lease))
    }

    /// Replaces an `initialize`'s reservation `token` with the session it created, in the session
    /// caps of `subjects`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable (the reservation then lapses).
    pub async fn quota_bind_session(
        &self,
        subjects: &[&str],
        token: &str,
        session: &str,
    ) -> BackendResult<()> {
        delegate!(
            self,
            "quota_bind_session",
            quota_bind_session(subjects, token, session)
        )
    }
}

impl RedisBackend {
    pub(super) async fn quota_admit(
        &self,
        checks: &[QuotaCheck<'_>],
        member: &str,
        lease: Duration,
    ) -> BackendResult<Option<QuotaRefusal>> {
        // One script per subject (a subject's keys share a slot), in the order of the checks; a
        // refusal by a later subject gives back what the earlier ones admitted, so a decision
        // stays all or nothing.
        let groups = by_subject(checks);
        for (done, group) in groups.iter().enumerate() {
            let decided = self.admit_group(checks, group, member, lease).await;
            if !matches!(decided, Ok(None)) {
                // Refused, or failed: what the earlier subjects admitted goes back (best effort:
                // a lease not given back lapses after `lease`).
                let refunds = groups[..done]
                    .iter()
                    .map(|admitted| self.refund_group(checks, admitted, member));
                for refunded in futures::future::join_all(refunds).await {
                    if let Err(error) = refunded {
                        tracing::warn!(%error, "a quota admission was not given back; it lapses with its lease");
                    }
                }
                return decided;
            }
        }
        Ok(None)
    }

    /// Admits the checks `group` (indexes into `checks`, one subject), or returns the refusal.
    async fn admit_group(
        &self,
        checks: &[QuotaCheck<'_>],
        group: &[usize],
        member: &str,
        lease: Duration,
    ) -> BackendResult<Option<QuotaRefusal>> {
        let keys = self.group_keys(checks, group);
        let mut args: Vec<Value> =
            vec![member.into(), Value::from(lease.as_millis().max(1) as i64)];
        for &i in group {
            args.push(checks[i].kind.as_str().into());
            args.push(Value::from(i64::from(checks[i].limit)));
            args.push(Value::from(i64::from(checks[i].burst.max(1))));
        }
        let mut rechecked = false;
        loop {
            let reply: Vec<Value> = self
                .eval(&QUOTA_ADMIT_SCRIPT, keys.clone(), args.clone())
                .await?;
            let index = reply.first().and_then(Value::as_i64).unwrap_or(0);
            let retry_ms = reply.get(1).and_then(Value::as_i64).unwrap_or(0);
            let due: Vec<String> = reply.iter().skip(2).filter_map(Value::as_string).collect();
            // A full session cap whose entries are due for a recheck: drop the sessions that are
            // gone (their records live in their own slots) and decide again, once.
            if !due.is_empty() && !rechecked {
                let slot = usize::try_from(index - 1).unwrap_or(0);
                self.recheck_sessions(&keys[slot.min(keys.len() - 1)], due)
                    .await?;
                rechecked = true;
                continue;
            }
            let local = usize::try_from(index)
                .ok()
                .filter(|i| (1..=group.len()).contains(i));
            return Ok(local.map(|i| {
                let index = group[i - 1];
                QuotaRefusal {
                    index,
                    retry_after: (checks[index].kind == QuotaKind::Rate)
                        .then(|| Duration::from_millis(retry_ms.max(1) as u64)),
                }
            }));
        }
    }

    /// The quota keys of the checks `group` (indexes into `checks`).
    fn group_keys(&self, checks: &[QuotaCheck<'_>], group: &[usize]) -> Vec<String> {
        group
            .iter()
            .map(|&i| {
                self.inner
                    .keys
                    .quota(checks[i].kind.as_str(), checks[i].subject)
            })
            .collect()
    }

    /// Gives back what [`Self::admit_group`] recorded for `member` in the checks `group`.
    async fn refund_group(
        &self,
        checks: &[QuotaCheck<'_>],
        group: &[usize],
        member: &str,
    ) -> BackendResult<()> {
        let keys = self.group_keys(checks, group);
        let mut args: Vec<Value> = vec![member.into()];
        for &i in group {
            args.push(checks[i].kind.as_str().into());
            args.push(Value::from(i64::from(checks[i].limit)));
        }
        let _: i64 = self.eval(&QUOTA_REFUND_SCRIPT, keys, args).await?;
        Ok(())
    }

    /// Checks the sessions `due` of the session quota index `index` against their records: the
    /// gone leave the index, the live are rechecked after [`SESSION_RECHECK`].
    pub(super) async fn recheck_sessions(
        &self,
        index: &str,
        due: Vec<String>,
    ) -> BackendResult<()> {
        let mut args: Vec<Value> = vec![Value::from(SESSION_RECHECK.as_millis() as i64)];
        for (session, exists) in due.iter().zip(self.sessions_exist(&due).await) {
            args.push(session.as_str().into());
            args.push(if exists? { "1" } else { "0" }.into());
        }
        let _: i64 = self
            .eval(&QUOTA_RECHECK_SESSIONS_SCRIPT, vec![index.to_owned()], args)
            .await?;
        Ok(())
    }

    /// The janitor's part: rechecks the due entries of every session quota index (those of
    /// principals that open no new session, whose cap would otherwise never look at them).
    pub(super) async fn recheck_all_session_indexes(&self) -> BackendResult<()> {
        for index in self
            .scan_all(self.inner.keys.quota_sessions_pattern())
            .await?
        {
            let due: Vec<String> = self
                .eval(&QUOTA_DUE_SESSIONS_SCRIPT, vec![index.clone()], vec![])
                .await?;
            if !due.is_empty() {
                self.recheck_sessions(&index, due).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn quota_release(
        &self,
        releases: &[(QuotaKind, &str, &str)],
    ) -> BackendResult<()> {
        let mut subjects: Vec<&str> = releases.iter().map(|(_, subject, _)| *subject).collect();
        subjects.sort_unstable();
        subjects.dedup();
        let scripts = subjects.into_iter().map(|subject| {
            let of_subject = releases.iter().filter(|(_, s, _)| *s == subject);
            let keys = of_subject
                .clone()
                .map(|(kind, subject, _)| self.inner.keys.quota(kind.as_str(), subject))
                .collect();
            let members = of_subject
                .map(|(_, _, member)| Value::from(*member))
                .collect();
            self.eval::<i64>(&QUOTA_RELEASE_SCRIPT, keys, members)
        });
        for result in futures::future::join_all(scripts).await {
            result?;
        }
        Ok(())
    }

    pub(super) async fn quota_renew(
        &self,
        (kind, subject): (QuotaKind, &str),
        members: &[String],
        lease: Duration,
    ) -> BackendResult<()> {
        let mut args: Vec<Value> = Vec::with_capacity(members.len() + 1);
        args.push(Value::from(lease.as_millis().max(1) as i64));
        args.extend(members.iter().map(|member| Value::from(member.as_str())));
        let _: i64 = self
            .eval(
                &QUOTA_RENEW_SCRIPT,
                vec![self.inner.keys.quota(kind.as_str(), subject)],
                args,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn quota_bind_session(
        &self,
        subjects: &[&str],
        token: &str,
        session: &str,
    ) -> BackendResult<()> {
        let scripts = subjects.iter().map(|subject| {
            self.eval::<i64>(
                &QUOTA_BIND_SESSION_SCRIPT,
                vec![self.inner.keys.quota(QuotaKind::Sessions.as_str(), subject)],
                vec![
                    token.into(),
                    session.into(),
                    Value::from(SESSION_RECHECK.as_millis() as i64),
                ],
            )
        });
        for result in futures::future::join_all(scripts).await {
            result?;
        }
        Ok(())
    }
}

/// The checks grouped by subject (indexes into `checks`), in the order their subjects first
/// appear.
fn by_subject(checks: &[QuotaCheck<'_>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        match groups
            .iter_mut()
            .find(|(subject, _)| *subject == check.subject)
        {
            Some((_, group)) => group.push(i),
            None => groups.push((check.subject, vec![i])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

impl MemoryBackend {
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
}

/// One quota decision for the checks of one subject (see [`crate::backend::QuotaCheck`]). KEYS:
/// one per check. ARGV: member, lease ms, then per check its kind (`rate`, `calls`, `streams`,
/// `sessions`), its limit and its burst.
///
/// Every check is decided before anything is recorded, so a refusal leaves every quota as it was.
/// Rates are GCRA on Redis's clock: the key holds the theoretical arrival time (µs); a request is
/// allowed when it is at most `burst` emission intervals ahead of now. Caps are sorted sets of
/// leases scored by their expiry (ms; the holder renews them), except sessions, scored by their
/// next recheck against the session records (which live in other slots: a full session cap
/// answers the entries due for a recheck, and the caller rechecks them and asks again). Returns
/// `{0, 0}` when allowed, else `{index of the refusing check, retry after ms, due session...}`.
pub const QUOTA_ADMIT: &str = r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local member, lease = ARGV[1], tonumber(ARGV[2])
local tats = {}
for i, key in ipairs(KEYS) do
  local kind, limit, burst = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  if kind == 'rate' then
    local interval = 1000000 / limit
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now_us then tat = now_us end
    local next = tat + interval
    local over = next - now_us - interval * burst
    if over > 0 then return {i, math.ceil(over / 1000)} end
    tats[i] = next
  elseif kind == 'sessions' then
    if redis.call('ZCARD', key) >= limit then
      local out = {i, 0}
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 100)) do
        out[#out + 1] = m
      end
      return out
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= limit then return {i, 0} end
  end
end
for i, key in ipairs(KEYS) do
  if tats[i] then
    redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now_us) / 1000) + 1)
  else
    redis.call('ZADD', key, now + lease, member)
    if ARGV[3 * i] ~= 'sessions' then redis.call('PEXPIRE', key, 2 * lease) end
  end
end
return {0, 0}
";

/// KEYS: the quota keys of one subject that admitted `member`. ARGV: member, then per key its kind
/// and limit. Gives the admission back (another subject refused the same decision): a lease or
/// reservation leaves its cap, a rate's arrival time moves back one interval.
pub const QUOTA_REFUND: &str = r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local kind, limit = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  if kind == 'rate' then
    local tat = tonumber(redis.call('GET', key) or '0')
    local back = tat - 1000000 / limit
    if back > now_us then
      redis.call('SET', key, string.format('%.0f', back), 'PX', math.ceil((back - now_us) / 1000) + 1)
    elseif tat > 0 then
      redis.call('DEL', key)
    end
  else
    redis.call('ZREM', key, ARGV[1])
  end
end
return 1
";

/// KEYS: one session quota index. Returns the entries due for a recheck (at most 1000).
pub const QUOTA_DUE_SESSIONS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
";

/// KEYS: one session quota index. ARGV: recheck ms, then pairs of an entry and '1' (its session
/// lives) or '0' (gone). The gone leave the index; the live are rechecked later.
pub const QUOTA_RECHECK_SESSIONS: &str = r"
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '1' then
    redis.call('ZADD', KEYS[1], 'XX', at, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return 1
";

/// KEYS: quota sorted sets of one subject. ARGV: one member per key. Drops each member (a lease or
/// a session) from its set: the releases of many calls and streams in one round trip.
pub const QUOTA_RELEASE: &str = r"
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return 1
";

/// KEYS: one quota sorted set. ARGV: lease ms, members... Renews the leases still recorded.
pub const QUOTA_RENEW: &str = r"
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1
";

/// KEYS: one session quota index. ARGV: reservation token, session id, recheck ms. Replaces the
/// reservation an `initialize` held with the session it created.
pub const QUOTA_BIND_SESSION: &str = r"
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then redis.call('ZADD', KEYS[1], at, ARGV[2]) end
return 1
";

pub(super) static QUOTA_ADMIT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_ADMIT));
pub(super) static QUOTA_REFUND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_REFUND));
pub(super) static QUOTA_DUE_SESSIONS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_DUE_SESSIONS));
pub(super) static QUOTA_RECHECK_SESSIONS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_RECHECK_SESSIONS));
pub(super) static QUOTA_RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_RELEASE));
pub(super) static QUOTA_RENEW_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_RENEW));
pub(super) static QUOTA_BIND_SESSION_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_BIND_SESSION));
