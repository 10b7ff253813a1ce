//! Resource subscriptions and their fanout: who follows a URI, and an update appended to the log of
//! every live subscriber (and broadcast to `subscriptions/listen` streams).
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::sync::LazyLock;

use fred::{prelude::Value, types::scripts::Script};
use tokio::time::Instant;

use super::{
    Backend, BackendError, BackendResult, events::APPEND_FN, memory::MemoryBackend,
    redis::RedisBackend,
};
use crate::{
    bus::{BusMessage, LUA_NETSTRING},
    telemetry::attr,
};

/// Outcome of a legacy `resources/subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Subscribed.
    Subscribed,
    /// The session no longer exists.
    SessionGone,
    /// The session reached its subscription limit.
    TooMany,
    /// The URI reached its subscriber limit.
    TooManySubscribers,
}

impl Backend {
    /// Subscribes a legacy session to updates of `uri`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn subscribe(&self, session: &str, uri: &str) -> BackendResult<SubscribeOutcome> {
        delegate!(self, "subscribe", subscribe(session, uri))
    }

    /// Removes a legacy subscription.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn unsubscribe(&self, session: &str, uri: &str) -> BackendResult<()> {
        delegate!(self, "unsubscribe", unsubscribe(session, uri))
    }

    /// A resource changed: append `legacy_payload` (the serialized
    /// `notifications/resources/updated`) to the log of every legacy subscriber, and broadcast the
    /// change for `subscriptions/listen` streams. Returns the number of legacy sessions notified.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn resource_updated(&self, uri: &str, legacy_payload: &str) -> BackendResult<u64> {
        delegate!(
            self,
            "resource_updated",
            resource_updated(uri, legacy_payload)
        )
    }
}

impl RedisBackend {
    pub(super) async fn subscribe(
        &self,
        session: &str,
        uri: &str,
    ) -> BackendResult<SubscribeOutcome> {
        let outcome: i64 = self
            .eval(
                &SUBSCRIBE_SCRIPT,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.subscribers(uri),
                ],
                vec![
                    uri.into(),
                    session.into(),
                    self.ttl(),
                    Value::from(self.inner.config.max_subscriptions_per_session as i64),
                    Value::from(self.inner.config.max_subscribers_per_uri as i64),
                ],
            )
            .await?;
        match outcome {
            1 => Ok(SubscribeOutcome::Subscribed),
            -1 => Ok(SubscribeOutcome::SessionGone),
            -2 => Ok(SubscribeOutcome::TooMany),
            -3 => Ok(SubscribeOutcome::TooManySubscribers),
            other => Err(BackendError::Protocol(format!(
                "subscribe returned {other}"
            ))),
        }
    }

    pub(super) async fn unsubscribe(&self, session: &str, uri: &str) -> BackendResult<()> {
        let _: Value = self
            .eval(
                &UNSUBSCRIBE_SCRIPT,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.subscribers(uri),
                ],
                vec![uri.into(), session.into()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn resource_updated(
        &self,
        uri: &str,
        legacy_payload: &str,
    ) -> BackendResult<u64> {
        let delivered: i64 = self
            .eval(
                &RESOURCE_UPDATED_SCRIPT,
                vec![self.inner.keys.subscribers(uri)],
                self.fanout_args(uri, legacy_payload),
            )
            .await?;
        Ok(delivered.max(0) as u64)
    }

    /// The eight arguments of the Lua `fanout` of `uri` with `legacy_payload` ([`FANOUT_FN`]);
    /// its key is the URI's subscriber set.
    pub(super) fn fanout_args(&self, uri: &str, legacy_payload: &str) -> Vec<Value> {
        vec![
            self.inner.session_prefix.as_str().into(),
            self.inner.log_prefix.as_str().into(),
            legacy_payload.into(),
            Value::from(self.inner.config.event_log_max_len as i64),
            Value::from(self.inner.config.retention_secs() as i64),
            self.inner.replica_prefix.as_str().into(),
            self.inner.keys.resource_channel().into(),
            BusMessage::ResourceUpdated {
                uri,
                trace: crate::telemetry::current_traceparent().as_deref(),
            }
            .encode()
            .into(),
        ]
    }
}

impl MemoryBackend {
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
}

/// KEYS: session, subscriber set. ARGV: uri, session id, ttl, max subscriptions per session,
/// max subscribers per URI. The session counts its subscriptions in its field `nsubs`. Returns 1
/// (subscribed), -1 (session gone), -2 (too many subscriptions) or -3 (too many subscribers of the
/// URI).
pub const SUBSCRIBE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = 'sub:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'nsubs') or '0') >= tonumber(ARGV[4]) then return -2 end
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -3 end
  redis.call('HINCRBY', KEYS[1], 'nsubs', 1)
end
redis.call('HSET', KEYS[1], field, '1')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: session, subscriber set. ARGV: uri, session id.
pub const UNSUBSCRIBE: &str = r"
if redis.call('HDEL', KEYS[1], 'sub:' .. ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'nsubs', -1)
end
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 1
";

/// KEYS: subscriber set. ARGV: session prefix, event-log prefix, payload, max length, retention,
/// replica-channel prefix, resource channel, resource message. Appends the notification to the log
/// of every live subscriber (dropping expired ones from the set) and broadcasts the change for
/// `subscriptions/listen` streams. Returns the number of sessions notified.
pub fn resource_updated() -> String {
    format!("{LUA_NETSTRING}{APPEND_FN}{FANOUT_FN}\nreturn fanout(KEYS[1], ARGV, 1)\n")
}

/// A resource change to tell the subscribers of `uri` about, in the same step as the change that
/// makes it (a write that lands and whose subscribers are not told would be a lost notification).
#[derive(Debug, Clone, Copy)]
pub struct ResourceChange<'a> {
    /// The resource.
    pub uri: &'a str,
    /// The `notifications/resources/updated` message appended to each legacy subscriber's log.
    pub legacy_payload: &'a str,
}

/// Shared helper: the fanout of [`resource_updated`], for scripts that change a resource and tell
/// its subscribers in the same step (so a change is never made without being told). `fanout(set,
/// args, i)` reads its eight arguments from `args[i]` on, in the order of [`RedisBackend::fanout_args`].
/// Needs [`LUA_NETSTRING`] and the events' `append`.
pub(super) const FANOUT_FN: &str = r"
local function fanout(set, a, i)
  local sids = redis.call('SMEMBERS', set)
  local delivered = 0
  for _, sid in ipairs(sids) do
    local skey = a[i] .. sid
    if redis.call('EXISTS', skey) == 1 then
      append(skey, a[i + 1] .. sid, sid, a[i + 2], a[i + 3], a[i + 4], a[i + 5])
      delivered = delivered + 1
    else
      redis.call('SREM', set, sid)
    end
  end
  redis.call('PUBLISH', a[i + 6], a[i + 7])
  return delivered
end
";

/// KEYS: subscriber set. ARGV: session prefix. Drops members whose session expired.
pub const PRUNE_SUBSCRIBERS: &str = r"
local sids = redis.call('SMEMBERS', KEYS[1])
local removed = 0
for _, sid in ipairs(sids) do
  if redis.call('EXISTS', ARGV[1] .. sid) == 0 then
    redis.call('SREM', KEYS[1], sid)
    removed = removed + 1
  end
end
return removed
";

pub(super) static SUBSCRIBE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SUBSCRIBE));
pub(super) static UNSUBSCRIBE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(UNSUBSCRIBE));
pub(super) static RESOURCE_UPDATED_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(resource_updated()));
pub(super) static PRUNE_SUBSCRIBERS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(PRUNE_SUBSCRIBERS));
