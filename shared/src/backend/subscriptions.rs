//! Resource subscriptions and their fanout: who follows a URI, and an update appended to the log of
//! every live subscriber (and broadcast to `subscriptions/listen` streams).
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::sync::LazyLock;

use fred::{interfaces::SetsInterface, prelude::Value, types::scripts::Script};
use std::time::Duration;
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
        // The resource's subscriber set first (its bound), then the session's record (its own
        // bound): two slots. A refusal of the second takes back what the first added. Between the
        // two, a fanout may already tell the session about the resource it is subscribing to.
        let added: i64 = self
            .eval(
                &SUBSCRIBERS_ADD_SCRIPT,
                vec![self.inner.keys.subscribers(uri)],
                vec![
                    session.into(),
                    Value::from(self.inner.config.max_subscribers_per_uri as i64),
                ],
            )
            .await?;
        if added == -3 {
            return Ok(SubscribeOutcome::TooManySubscribers);
        }
        let outcome: BackendResult<i64> = self
            .eval(
                &SUBSCRIBE_SCRIPT,
                vec![self.inner.keys.session(session)],
                vec![
                    uri.into(),
                    self.ttl(),
                    Value::from(self.inner.config.max_subscriptions_per_session as i64),
                ],
            )
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                // The client hears of a failure: take back what the first step added, as far as
                // Redis lets us now (a member left behind is told about the resource until its
                // session ends, when the next fanout drops it).
                if added == 1 {
                    let _: Result<i64, _> = self
                        .client()
                        .srem(self.inner.keys.subscribers(uri), session)
                        .await;
                }
                return Err(error);
            }
        };
        let outcome = match outcome {
            1 => SubscribeOutcome::Subscribed,
            -1 => SubscribeOutcome::SessionGone,
            -2 => SubscribeOutcome::TooMany,
            other => {
                return Err(BackendError::Protocol(format!(
                    "subscribe returned {other}"
                )));
            }
        };
        if outcome != SubscribeOutcome::Subscribed && added == 1 {
            let _: i64 = self
                .client()
                .srem(self.inner.keys.subscribers(uri), session)
                .await?;
        }
        Ok(outcome)
    }

    pub(super) async fn unsubscribe(&self, session: &str, uri: &str) -> BackendResult<()> {
        // The session's record first, then the resource's set (an empty set is gone with its
        // last member).
        let _: i64 = self
            .eval(
                &UNSUBSCRIBE_SCRIPT,
                vec![self.inner.keys.session(session)],
                vec![uri.into()],
            )
            .await?;
        let _: i64 = self
            .client()
            .srem(self.inner.keys.subscribers(uri), session)
            .await?;
        Ok(())
    }

    pub(super) async fn resource_updated(
        &self,
        uri: &str,
        legacy_payload: &str,
    ) -> BackendResult<u64> {
        let change = Change::new(uri, legacy_payload);
        let reply: Vec<Value> = self
            .eval(
                &RESOURCE_UPDATED_SCRIPT,
                self.change_keys(uri),
                self.change_args(&change),
            )
            .await?;
        let (told, sessions) = told_and_sessions(&reply);
        Ok(told + self.fan_out(change, sessions).await)
    }

    /// The keys of a change's first step ([`RECORD_CHANGE_FN`]): the resource's subscriber set
    /// and its pending changes.
    pub(super) fn change_keys(&self, uri: &str) -> Vec<String> {
        vec![
            self.inner.keys.subscribers(uri),
            self.inner.keys.pending_changes(uri),
        ]
    }

    /// The four arguments of the Lua `record_change` ([`RECORD_CHANGE_FN`]).
    pub(super) fn change_args(&self, change: &Change) -> Vec<Value> {
        use fred::interfaces::ClientLike as _;
        let [sessions, logs, seen] = self.inner.keys.session_name_prefixes();
        vec![
            change.id.as_str().into(),
            change.payload.as_str().into(),
            self.inner.keys.resource_channel().into(),
            BusMessage::ResourceUpdated {
                uri: &change.uri,
                trace: crate::telemetry::current_traceparent().as_deref(),
            }
            .encode()
            .into(),
            // On one Redis (standalone or Sentinel-managed) every key is on the node that runs the
            // script: the change reaches its subscribers in the same script, as one step.
            if self.client().is_clustered() {
                "0"
            } else {
                "1"
            }
            .into(),
            Value::from(self.inner.config.event_log_max_len as i64),
            Value::from(self.inner.config.retention_secs() as i64),
            self.inner.replica_prefix.as_str().into(),
            sessions.into(),
            logs.into(),
            seen.into(),
        ]
    }

    /// The second and third steps of a change whose first step recorded it as pending and named
    /// `sessions`: appends it to each session's log (concurrently, each in its session's slot,
    /// idempotently), then drops the pending mark and the sessions found gone, in the resource's
    /// slot. Returns the number of sessions told. A step that fails (Redis failing over, a node
    /// unreachable) leaves the change pending, and this replica tries again in the background for
    /// up to [`FANOUT_RETRY_FOR`] (or until it shuts down); the janitor finishes what is left. Either way
    /// the notification is late, never lost or doubled, and the write it belongs to stands.
    pub(super) async fn fan_out(&self, change: Change, sessions: Vec<String>) -> u64 {
        if sessions.is_empty() {
            return 0;
        }
        let (told, finished) = self.fan_out_once(&change, sessions.clone()).await;
        if !finished {
            self.inner.metrics.fanout_unfinished();
            let backend = self.clone();
            let stop = self.inner.background.stop.clone();
            self.inner.background.spawn(async move {
                let mut pause = Duration::from_millis(100);
                let give_up = tokio::time::Instant::now() + FANOUT_RETRY_FOR;
                while tokio::time::Instant::now() < give_up {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    if backend.fan_out_once(&change, sessions.clone()).await.1 {
                        return;
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                tracing::warn!(uri = change.uri, "a resource change is still pending after a minute of attempts; the janitor takes it over");
            });
        }
        told
    }

    /// One attempt at the second and third steps: the sessions told, and whether the change is
    /// no longer pending.
    async fn fan_out_once(&self, change: &Change, sessions: Vec<String>) -> (u64, bool) {
        use futures::StreamExt;
        let batches = self.batches_by_node(sessions);
        let results: Vec<(Vec<String>, BackendResult<Vec<i64>>)> = futures::stream::iter(batches)
            .map(|batch| async move {
                let result = self.deliver(change, &batch).await;
                (batch, result)
            })
            .buffer_unordered(FANOUT_CONCURRENCY)
            .collect()
            .await;
        let mut told = 0;
        let mut gone = Vec::new();
        let mut failed = 0;
        for (batch, result) in results {
            match result {
                Ok(outcomes) => {
                    for (sid, outcome) in batch.into_iter().zip(outcomes) {
                        match outcome {
                            1 => told += 1,
                            0 => gone.push(sid),
                            _ => {}
                        }
                    }
                }
                Err(error) => {
                    failed += batch.len();
                    tracing::debug!(%error, "a fanout append failed");
                }
            }
        }
        if failed > 0 {
            tracing::debug!(
                failed,
                uri = change.uri,
                "a resource change reached some subscribers only; trying again"
            );
            return (told, false);
        }
        let mut args: Vec<Value> = vec![change.id.as_str().into()];
        args.extend(gone.into_iter().map(Value::from));
        let done: BackendResult<i64> = self
            .eval(&CHANGE_DONE_SCRIPT, self.change_keys(&change.uri), args)
            .await;
        if let Err(error) = &done {
            tracing::debug!(%error, uri = change.uri, "a resource change stays pending; trying again");
        }
        (told, done.is_ok())
    }

    /// `sessions` in batches of at most [`FANOUT_BATCH`] whose records live on one Redis node (all
    /// of them on one Redis; by fred's slot map on a Redis Cluster), each batch one script.
    fn batches_by_node(&self, sessions: Vec<String>) -> Vec<Vec<String>> {
        let mut by_node: std::collections::HashMap<
            Option<fred::types::config::Server>,
            Vec<String>,
        > = std::collections::HashMap::new();
        for sid in sessions {
            let node = self.node_of(&self.inner.keys.session(&sid));
            by_node.entry(node).or_default().push(sid);
        }
        by_node
            .into_values()
            .flat_map(|group| {
                group
                    .chunks(FANOUT_BATCH)
                    .map(<[String]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Appends `change` to the log of each session of `batch` (one node's) unless it is there
    /// already: per session, 1 appended, 2 already there, 0 the session is gone.
    async fn deliver(&self, change: &Change, batch: &[String]) -> BackendResult<Vec<i64>> {
        let Some(first) = batch.first() else {
            return Ok(Vec::new());
        };
        let mut args: Vec<Value> = vec![
            change.id.as_str().into(),
            change.payload.as_str().into(),
            Value::from(self.inner.config.event_log_max_len as i64),
            Value::from(self.inner.config.retention_secs() as i64),
            self.inner.replica_prefix.as_str().into(),
        ];
        for sid in batch {
            args.push(sid.as_str().into());
            args.push(self.inner.keys.session(sid).into());
            args.push(self.inner.keys.event_log(sid).into());
            args.push(self.inner.keys.seen(sid).into());
        }
        // The first session's keys route the script to the batch's node (a Redis Cluster refuses
        // declared keys of several slots, whatever the script's flags).
        let keys = vec![
            self.inner.keys.session(first),
            self.inner.keys.event_log(first),
            self.inner.keys.seen(first),
        ];
        let result = self.eval(&DELIVER_SCRIPT, keys, args).await;
        if let Err(BackendError::Redis(error)) = &result
            && error.details().contains("non local key")
        {
            // A session's slot moved off the node fred's map names: read the map again before
            // the next attempt.
            use fred::interfaces::ClusterInterface as _;
            let _ = self.client().sync_cluster().await;
        }
        result
    }

    /// The janitor's part: finishes the changes of every resource left pending for longer than
    /// `age` (their replica died, or Redis failed it, between the steps). Returns how many.
    pub(super) async fn finish_pending_changes(
        &self,
        age: std::time::Duration,
    ) -> BackendResult<u64> {
        use fred::interfaces::{HashesInterface as _, SetsInterface as _};
        let prefix = format!("{}:pend:", self.inner.keys.prefix());
        let mut finished = 0;
        for key in self
            .scan_all(self.inner.keys.pending_changes_pattern())
            .await?
        {
            // `{p}:pend:{u:<h>}:<uri>`: the URI follows the tag.
            let Some(uri) = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once("}:"))
                .map(|(_, uri)| uri.to_owned())
            else {
                continue;
            };
            let pending: std::collections::HashMap<String, String> =
                match self.client().hgetall(&key).await {
                    Ok(pending) => pending,
                    Err(error) => {
                        tracing::debug!(%error, key, "pending changes not readable now");
                        continue;
                    }
                };
            let now = self.redis_now_secs();
            for (id, record) in pending {
                let Some((at, payload)) = record.split_once(':') else {
                    continue;
                };
                let at: i64 = at.parse().unwrap_or(0);
                if now - at < age.as_secs() as i64 {
                    continue;
                }
                let Ok(sessions) = self
                    .client()
                    .smembers::<Vec<String>, _>(self.inner.keys.subscribers(&uri))
                    .await
                else {
                    continue;
                };
                let change = Change {
                    id,
                    uri: uri.clone(),
                    payload: payload.to_owned(),
                };
                if sessions.is_empty() {
                    let done: BackendResult<i64> = self
                        .eval(
                            &CHANGE_DONE_SCRIPT,
                            self.change_keys(&uri),
                            vec![change.id.as_str().into()],
                        )
                        .await;
                    if done.is_err() {
                        continue;
                    }
                } else if !self.fan_out_once(&change, sessions).await.1 {
                    continue;
                }
                finished += 1;
            }
        }
        Ok(finished)
    }
}

/// A first step's reply, `{told, session...}`: the sessions it told itself (on one Redis) and
/// those left to tell.
pub(super) fn told_and_sessions(reply: &[Value]) -> (u64, Vec<String>) {
    let told = reply.first().and_then(Value::as_i64).unwrap_or(0).max(0) as u64;
    let sessions = reply.iter().skip(1).filter_map(Value::as_string).collect();
    (told, sessions)
}

/// How long a replica keeps trying to finish a fanout of its own before it leaves it to the
/// janitor (which finishes it at its next pass, however long a node is away).
const FANOUT_RETRY_FOR: Duration = Duration::from_secs(60);
/// How many append scripts of one fanout are in flight at once.
const FANOUT_CONCURRENCY: usize = 16;
/// Most sessions one append script serves (it runs alone on its node while it runs).
const FANOUT_BATCH: usize = 100;

/// One resource change on its way to the subscribers: its identity (a fresh UUID, so a fanout run
/// again appends nothing twice), the resource, and the notification appended to each log.
pub(super) struct Change {
    pub(super) id: String,
    pub(super) uri: String,
    pub(super) payload: String,
}

impl Change {
    pub(super) fn new(uri: &str, payload: &str) -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            uri: uri.to_owned(),
            payload: payload.to_owned(),
        }
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

/// KEYS: a resource's subscriber set. ARGV: session id, max subscribers. Returns 1 (added), 0
/// (already there) or -3 (the URI reached its subscriber limit).
pub const SUBSCRIBERS_ADD: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -3 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// KEYS: session. ARGV: uri, ttl, max subscriptions per session. The session counts its
/// subscriptions in its field `nsubs`. Returns 1 (subscribed), -1 (session gone) or -2 (too many
/// subscriptions).
pub const SUBSCRIBE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = 'sub:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'nsubs') or '0') >= tonumber(ARGV[3]) then return -2 end
  redis.call('HINCRBY', KEYS[1], 'nsubs', 1)
  redis.call('HSET', KEYS[1], field, '1')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
";

/// KEYS: session. ARGV: uri.
pub const UNSUBSCRIBE: &str = r"
if redis.call('HDEL', KEYS[1], 'sub:' .. ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'nsubs', -1)
end
return 1
";

/// KEYS: subscriber set, pending changes. ARGV: the eleven arguments of `record_change`. The first
/// step of telling a resource's subscribers about a change with no write attached (the PostgreSQL
/// change poller): returns `{told, session left to tell...}`.
pub fn resource_updated() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}{DELIVER_ONE_FN}{RECORD_CHANGE_FN}\nreturn record_change(KEYS[1], KEYS[2], ARGV, 1)\n"
    )
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

/// Shared helper: append a resource change (id `cid`) to one session's log, unless the session is
/// gone (0) or, with `seen` (the session's seen-changes key, or false), it was appended before
/// (2); 1 when appended. Needs [`LUA_NETSTRING`] and the events' `append`.
pub(super) const DELIVER_ONE_FN: &str = r"
local function deliver_one(skey, lkey, seen, sid, cid, payload, maxlen, retention, rprefix)
  if redis.call('EXISTS', skey) == 0 then return 0 end
  if seen and redis.call('ZSCORE', seen, cid) then return 2 end
  local id = append(skey, lkey, sid, payload, maxlen, retention, rprefix)
  if seen then
    redis.call('ZADD', seen, tonumber(string.match(id, '^(%d+)')), cid)
    redis.call('ZREMRANGEBYRANK', seen, 0, -1 - tonumber(maxlen))
    redis.call('EXPIRE', seen, retention)
  end
  return 1
end
";

/// Shared helper, the first step of every fanout, in the resource's slot and in the same script as
/// the write it tells about (so a change is never made without being recorded): broadcasts the
/// change to `subscriptions/listen` streams and reads the subscribers. On one Redis (`inline`) it
/// appends the change to each subscriber's log itself, as one atomic step, and drops the gone;
/// on a Redis Cluster it records the change as pending (`id` → `<Redis seconds>:<payload>`)
/// until the appends in the sessions' slots are done ([`RedisBackend::fan_out`]; the janitor
/// finishes one a dead replica left). `record_change(set, pending, args, i)` reads its eleven
/// arguments from `args[i]` on, in the order of [`RedisBackend::change_args`]. Returns `{told,
/// session...}`: the sessions told here, and those left to tell. Needs `deliver_one`.
pub(super) const RECORD_CHANGE_FN: &str = r"
local function record_change(set, pending, a, i)
  redis.call('PUBLISH', a[i + 2], a[i + 3])
  local sids = redis.call('SMEMBERS', set)
  if #sids == 0 then return {0} end
  if a[i + 4] == '1' then
    local told = 0
    for _, sid in ipairs(sids) do
      local r = deliver_one(a[i + 8] .. sid .. '}', a[i + 9] .. sid .. '}', false, sid,
        a[i], a[i + 1], a[i + 5], a[i + 6], a[i + 7])
      if r == 0 then redis.call('SREM', set, sid) else told = told + 1 end
    end
    return {told}
  end
  local t = redis.call('TIME')
  redis.call('HSET', pending, a[i], t[1] .. ':' .. a[i + 1])
  table.insert(sids, 1, 0)
  return sids
end
";

/// KEYS: the first session's record, event log and seen changes (they route the script). ARGV:
/// change id, payload, max length, retention, replica-channel prefix, then per session (all of
/// one Redis node) its id, record, event log and seen changes. Appends a resource change to each
/// session's log unless it was appended before. Returns per session 1 (appended), 2 (there
/// already) or 0 (the session is gone). The seen set keeps as many change ids as the log keeps
/// events, for as long. On a Redis Cluster the other sessions' keys are in other slots of the same
/// node: the script says it may reach them (`allow-cross-slot-keys`, Redis 7), which a node
/// allows for keys it serves.
pub fn deliver() -> String {
    format!(
        "#!lua flags=allow-cross-slot-keys
{LUA_NETSTRING}{APPEND_FN}{DELIVER_ONE_FN}
local out = {{}}
for i = 6, #ARGV, 4 do
  out[#out + 1] = deliver_one(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i],
    ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
end
return out
"
    )
}

/// KEYS: subscriber set, pending changes. ARGV: change id, then the sessions found gone. The last
/// step of a fanout: the change is no longer pending; the gone sessions leave the set.
pub const CHANGE_DONE: &str = r"
redis.call('HDEL', KEYS[2], ARGV[1])
for i = 2, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end
return 1
";

pub(super) static SUBSCRIBERS_ADD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SUBSCRIBERS_ADD));
pub(super) static SUBSCRIBE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(SUBSCRIBE));
pub(super) static UNSUBSCRIBE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(UNSUBSCRIBE));
pub(super) static RESOURCE_UPDATED_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(resource_updated()));
pub(super) static DELIVER_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(deliver()));
pub(super) static CHANGE_DONE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(CHANGE_DONE));
