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
    /// [`Backend::quota_bind_session`]), or nothing is recorded and the first refusing check is
    /// returned.
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
        let keys = checks
            .iter()
            .map(|check| self.inner.keys.quota(check.kind.as_str(), check.subject))
            .collect();
        let mut args: Vec<Value> = vec![
            member.into(),
            Value::from(lease.as_millis().max(1) as i64),
            self.inner.session_prefix.as_str().into(),
            Value::from(SESSION_RECHECK.as_millis() as i64),
        ];
        for check in checks {
            args.push(check.kind.as_str().into());
            args.push(Value::from(i64::from(check.limit)));
            args.push(Value::from(i64::from(check.burst.max(1))));
        }
        let (index, retry_ms): (i64, i64) = self.eval(&QUOTA_ADMIT_SCRIPT, keys, args).await?;
        Ok(refusal(checks, index, retry_ms))
    }

    pub(super) async fn quota_release(
        &self,
        releases: &[(QuotaKind, &str, &str)],
    ) -> BackendResult<()> {
        if releases.is_empty() {
            return Ok(());
        }
        let keys = releases
            .iter()
            .map(|(kind, subject, _)| self.inner.keys.quota(kind.as_str(), subject))
            .collect();
        let members = releases
            .iter()
            .map(|(_, _, member)| Value::from(*member))
            .collect();
        let _: i64 = self.eval(&QUOTA_RELEASE_SCRIPT, keys, members).await?;
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
        let keys = subjects
            .iter()
            .map(|subject| self.inner.keys.quota(QuotaKind::Sessions.as_str(), subject))
            .collect();
        let _: i64 = self
            .eval(
                &QUOTA_BIND_SESSION_SCRIPT,
                keys,
                vec![
                    token.into(),
                    session.into(),
                    Value::from(SESSION_RECHECK.as_millis() as i64),
                ],
            )
            .await?;
        Ok(())
    }
}

/// The refusal a quota script's `{index, retry ms}` answer names (`index` 0: allowed).
fn refusal(checks: &[QuotaCheck<'_>], index: i64, retry_ms: i64) -> Option<QuotaRefusal> {
    let index = usize::try_from(index)
        .ok()
        .filter(|i| (1..=checks.len()).contains(i))?
        - 1;
    Some(QuotaRefusal {
        index,
        retry_after: (checks[index].kind == QuotaKind::Rate)
            .then(|| Duration::from_millis(retry_ms.max(1) as u64)),
    })
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

/// Shared helper of the session-quota scripts: drops from the index `key` the sessions that are
/// gone (their record `sprefix .. id` no longer exists) among those due for a recheck (score at or
/// before `now` ms); pushes the recheck of the live ones to `now + recheck`.
const PRUNE_SESSION_INDEX_FN: &str = r"
local function prune_sessions(key, now, sprefix, recheck)
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  for _, m in ipairs(due) do
    if redis.call('EXISTS', sprefix .. m) == 1 then
      redis.call('ZADD', key, now + recheck, m)
    else
      redis.call('ZREM', key, m)
    end
  end
end
";

/// One quota decision (see [`crate::backend::QuotaCheck`]). KEYS: one per check. ARGV: member,
/// lease ms, session key prefix, session recheck ms, then per check its kind (`rate`, `calls`,
/// `streams`, `sessions`), its limit and its burst.
///
/// Every check is decided before anything is recorded, so a refusal leaves every quota as it was.
/// Rates are GCRA on Redis's clock: the key holds the theoretical arrival time (µs); a request is
/// allowed when it is at most `burst` emission intervals ahead of now. Caps are sorted sets of
/// leases scored by their expiry (ms; the holder renews them), except sessions, scored by their
/// next recheck against the session records. Returns `{0, 0}` when allowed, else `{index of the
/// refusing check, retry after ms}`.
pub fn quota_admit() -> String {
    format!(
        "{PRUNE_SESSION_INDEX_FN}{}",
        r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local member, lease, sprefix, recheck = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local tats = {}
for i, key in ipairs(KEYS) do
  local kind, limit, burst = ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  if kind == 'rate' then
    local interval = 1000000 / limit
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now_us then tat = now_us end
    local next = tat + interval
    local over = next - now_us - interval * burst
    if over > 0 then return {i, math.ceil(over / 1000)} end
    tats[i] = next
  else
    if kind == 'sessions' then
      prune_sessions(key, now, sprefix, recheck)
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    end
    if redis.call('ZCARD', key) >= limit then return {i, 0} end
  end
end
for i, key in ipairs(KEYS) do
  if tats[i] then
    redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now_us) / 1000) + 1)
  else
    redis.call('ZADD', key, now + lease, member)
    if ARGV[3 * i + 2] ~= 'sessions' then redis.call('PEXPIRE', key, 2 * lease) end
  end
end
return {0, 0}
"
    )
}

/// KEYS: quota sorted sets. ARGV: one member per key. Drops each member (a lease or a session)
/// from its set: the releases of many calls and streams in one round trip.
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

/// KEYS: session quota indexes. ARGV: reservation token, session id, recheck ms. Replaces the
/// reservation an `initialize` held with the session it created.
pub const QUOTA_BIND_SESSION: &str = r"
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  if redis.call('ZREM', key, ARGV[1]) == 1 then redis.call('ZADD', key, at, ARGV[2]) end
end
return 1
";

/// KEYS: one session quota index. ARGV: session key prefix, recheck ms. The janitor's pass over
/// the indexes of principals that open no new sessions.
pub fn quota_prune_sessions() -> String {
    format!(
        "{PRUNE_SESSION_INDEX_FN}{}",
        r"
local t = redis.call('TIME')
prune_sessions(KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1], tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"
    )
}

pub(super) static QUOTA_ADMIT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(quota_admit()));
pub(super) static QUOTA_RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_RELEASE));
pub(super) static QUOTA_RENEW_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_RENEW));
pub(super) static QUOTA_BIND_SESSION_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(QUOTA_BIND_SESSION));
pub(super) static QUOTA_PRUNE_SESSIONS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(quota_prune_sessions()));
