//! Per-session event logs and the GET stream (feed) that holds each session: appending, opening a
//! feed where it must start, checkpointing where it stopped, reading after an id.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use std::{sync::Arc, sync::LazyLock};

use fred::{interfaces::StreamsInterface, prelude::Value, types::scripts::Script};
use tokio::time::Instant;

use super::{
    Backend, BackendError, BackendResult,
    memory::{MemoryBackend, State},
    redis::RedisBackend,
};
use crate::{
    bus::{BusMessage, LUA_NETSTRING, SessionEvent},
    ids::EventId,
    telemetry::attr,
};

/// One event read from a session log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// Its id.
    pub id: EventId,
    /// The serialized JSON-RPC message.
    pub payload: Arc<str>,
}

/// A session's GET stream as the shared state records it: the session, and the holder that claims
/// its stream (`{replica}:{stream}`, see [`crate::bus::feed_holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedClaim<'a> {
    /// The session.
    pub session: &'a str,
    /// The replica and stream holding it.
    pub holder: &'a str,
}

/// What a feed's checkpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedHold {
    /// The feed still holds the session's GET stream (or no stream does): the checkpoint was
    /// recorded.
    Held,
    /// A newer GET stream of the session holds it: the feed must end. Normally the newer stream's
    /// open tells the holder over the bus; this is how a holder that missed that message (its
    /// bus connection was away) learns it.
    Superseded,
    /// The session is gone (expired or deleted).
    Gone,
}

/// Where a GET stream starts, as read atomically with claiming the stream: every event after
/// `from` is either in `events` (up to the read limit) or will be published to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedStart {
    /// The stream starts after this event.
    pub from: EventId,
    /// The first events after `from`.
    pub events: Vec<LoggedEvent>,
}

impl Backend {
    /// Appends a server message (JSON) to the session's event log and delivers it to the replica
    /// holding the session's GET stream. Returns `None` when the session is gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn event_append(
        &self,
        session: &str,
        payload: &str,
    ) -> BackendResult<Option<EventId>> {
        let result = delegate!(self, "event_append", event_append(session, payload));
        if let Ok(Some(_)) = result {
            self.metrics().event_appended();
        }
        result
    }

    /// Claims the session's GET stream for `holder` (see [`crate::bus::feed_holder`]) and reads
    /// where it starts: after `after` when resuming, else where the previous stream stopped (see
    /// the `FEED_OPEN` script). Returns `None` when the session is gone.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn feed_open(
        &self,
        feed: FeedClaim<'_>,
        after: Option<EventId>,
        limit: u64,
    ) -> BackendResult<Option<FeedStart>> {
        delegate!(self, "feed_open", feed_open(feed, after, limit))
    }

    /// Records how far the feed `holder` got, and with `release` that it no longer holds the
    /// session; slides the session TTL. Says whether `holder` still holds the session's stream.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn feed_checkpoint(
        &self,
        feed: FeedClaim<'_>,
        last: EventId,
        release: bool,
    ) -> BackendResult<FeedHold> {
        delegate!(
            self,
            "feed_checkpoint",
            feed_checkpoint(feed, last, release)
        )
    }

    /// Reads up to `limit` events after `after` from the session's log.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn events_after(
        &self,
        session: &str,
        after: EventId,
        limit: u64,
    ) -> BackendResult<Vec<LoggedEvent>> {
        delegate!(self, "events_after", events_after(session, after, limit))
    }
}

impl RedisBackend {
    pub(super) async fn event_append(
        &self,
        session: &str,
        payload: &str,
    ) -> BackendResult<Option<EventId>> {
        let id: Option<String> = self
            .eval(
                &EVENT_APPEND_SCRIPT,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                ],
                vec![
                    payload.into(),
                    Value::from(self.inner.config.event_log_max_len as i64),
                    Value::from(self.inner.config.retention_secs() as i64),
                    self.inner.replica_prefix.as_str().into(),
                    session.into(),
                ],
            )
            .await?;
        id.map(|id| parse_id(&id)).transpose()
    }

    pub(super) async fn feed_open(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        after: Option<EventId>,
        limit: u64,
    ) -> BackendResult<Option<FeedStart>> {
        let reply: Option<Vec<Value>> = self
            .eval(
                &FEED_OPEN_SCRIPT,
                vec![
                    self.inner.keys.session(session),
                    self.inner.keys.event_log(session),
                ],
                vec![
                    holder.into(),
                    after.map(|id| id.to_string()).unwrap_or_default().into(),
                    Value::from(limit as i64),
                    self.ttl(),
                    self.inner.replica_prefix.as_str().into(),
                    session.into(),
                ],
            )
            .await?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let (from, rest) = reply
            .split_first()
            .ok_or_else(|| BackendError::Protocol("feed_open: empty reply".into()))?;
        let from = parse_id(&from.as_str().unwrap_or_default())?;
        let mut events = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks(2) {
            let [id, payload] = pair else {
                return Err(BackendError::Protocol("feed_open: odd reply".into()));
            };
            events.push(LoggedEvent {
                id: parse_id(&id.as_str().unwrap_or_default())?,
                payload: Arc::from(payload.as_str().unwrap_or_default().as_ref()),
            });
        }
        Ok(Some(FeedStart { from, events }))
    }

    pub(super) async fn feed_checkpoint(
        &self,
        FeedClaim { session, holder }: FeedClaim<'_>,
        last: EventId,
        release: bool,
    ) -> BackendResult<FeedHold> {
        let hold: i64 = self
            .eval(
                &FEED_CHECKPOINT_SCRIPT,
                vec![self.inner.keys.session(session)],
                vec![
                    holder.into(),
                    last.to_string().into(),
                    self.ttl(),
                    if release { "1" } else { "0" }.into(),
                ],
            )
            .await?;
        Ok(match hold {
            0 => FeedHold::Gone,
            2 => FeedHold::Superseded,
            _ => FeedHold::Held,
        })
    }

    pub(super) async fn events_after(
        &self,
        session: &str,
        after: EventId,
        limit: u64,
    ) -> BackendResult<Vec<LoggedEvent>> {
        let entries: Vec<(String, Vec<(String, String)>)> = self
            .client()
            .xrange(
                self.inner.keys.event_log(session),
                format!("({after}"),
                "+",
                Some(limit),
            )
            .await?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let payload = fields
                    .into_iter()
                    .find(|(name, _)| name == "m")
                    .map(|(_, value)| value)
                    .ok_or_else(|| BackendError::Protocol("event without payload".into()))?;
                Ok(LoggedEvent {
                    id: parse_id(&id)?,
                    payload: Arc::from(payload),
                })
            })
            .collect()
    }
}

fn parse_id(id: &str) -> BackendResult<EventId> {
    id.parse()
        .map_err(|_| BackendError::Protocol(format!("malformed stream id {id:?}")))
}

impl MemoryBackend {
    /// Appends under the state lock and returns the message to publish, if any.
    pub(super) fn append_locked(
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

    pub(super) fn publish_framed(&self, framed: &str) {
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
    ) -> FeedHold {
        let now = Instant::now();
        let ttl = self.inner.config.session_ttl;
        let mut state = self.state();
        let Some(record) = state.live_session(session, now) else {
            return FeedHold::Gone;
        };
        record.expires_at = now + ttl;
        match record.feed.as_deref() {
            Some(current) if current == holder => {
                record.cursor = Some(last);
                if release {
                    record.feed = None;
                }
                FeedHold::Held
            }
            Some(_) => FeedHold::Superseded,
            None => FeedHold::Held,
        }
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
}

/// Shared helper: append `payload` to a session's log and, when some replica holds the session's
/// GET stream, publish the event to that replica with the id of the event before it (so the
/// receiver notices a live event it missed). Returns the event id. Needs [`LUA_NETSTRING`].
pub(super) const APPEND_FN: &str = r"
local function append(skey, lkey, sid, payload, maxlen, retention, rprefix)
  local feed = redis.call('HGET', skey, 'feed')
  local prev = '0-0'
  if feed then
    local last = redis.call('XREVRANGE', lkey, '+', '-', 'COUNT', 1)
    if #last > 0 then prev = last[1][1] end
  end
  local id = redis.call('XADD', lkey, 'MAXLEN', '~', maxlen, '*', 'm', payload)
  redis.call('EXPIRE', lkey, retention)
  if feed then
    local sep = string.find(feed, ':', 1, true)
    if sep then
      redis.call('PUBLISH', rprefix .. string.sub(feed, 1, sep - 1),
        ns('ev') .. ns(sid) .. ns(string.sub(feed, sep + 1)) .. ns(id) .. ns(prev) .. ns(payload))
    end
  end
  return id
end
";

/// KEYS: session, event log. ARGV: payload, max length, retention, replica-channel prefix, session
/// id. Returns the event id, or nil when the session is gone.
pub fn event_append() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return append(KEYS[1], KEYS[2], ARGV[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"
    )
}

/// KEYS: session, event log. ARGV: feed holder (`tag:stream`), resume-after id or '' for a fresh
/// stream, max events, session ttl, replica-channel prefix, session id. A previous holder of the
/// session's GET stream is told to close it (`end`): a session has one live GET stream.
///
/// Atomically names the caller as the holder of the session's GET stream and reads where it starts:
/// every event appended afterwards is published to the caller and every earlier one after the
/// start is in the reply, so nothing falls in between. A resumed stream starts after the client's
/// `Last-Event-ID` (clamped to the newest event: a position past it was never handed out). A
/// fresh stream starts where the session's previous GET stream stopped (its
/// `cursor`), or at the beginning of the log if it never had one, so events raised while no stream
/// was open are delivered; but if another stream still holds the session (or its replica died
/// holding it), a fresh stream starts at the end of the log, to never deliver an event twice.
/// Returns nil when the session is gone, else `{start id, id1, payload1, id2, payload2, ...}`.
pub fn feed_open() -> String {
    format!("{LUA_NETSTRING}{FEED_OPEN}")
}

const FEED_OPEN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local previous = redis.call('HGET', KEYS[1], 'feed')
redis.call('HSET', KEYS[1], 'feed', ARGV[1])
if previous and previous ~= ARGV[1] then
  -- One live GET stream per session: the replica holding the previous one closes it.
  local sep = string.find(previous, ':', 1, true)
  if sep then
    redis.call('PUBLISH', ARGV[5] .. string.sub(previous, 1, sep - 1),
      ns('end') .. ns(ARGV[6]) .. ns(string.sub(previous, sep + 1)))
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
local start = ARGV[2]
if start == '' then
  if previous then
    local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if #last == 0 then return {'0-0'} end
    return {last[1][1]}
  end
  start = redis.call('HGET', KEYS[1], 'cursor') or '0-0'
else
  -- A Last-Event-ID past the newest event (none such was ever sent) starts at the newest event:
  -- a position from the future would skip every event until the log caught up with it.
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local top = '0-0'
  if #newest > 0 then top = newest[1][1] end
  local sm, ss = string.match(start, '^(%d+)-(%d+)$')
  local tm, ts = string.match(top, '^(%d+)-(%d+)$')
  local function greater(x, y)
    if #x ~= #y then return #x > #y end
    return x > y
  end
  if not sm or greater(sm, tm) or (sm == tm and greater(ss, ts)) then start = top end
end
local out = {start}
local entries = redis.call('XRANGE', KEYS[2], '(' .. start, '+', 'COUNT', ARGV[3])
for _, entry in ipairs(entries) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
end
return out
";

/// KEYS: session. ARGV: feed holder, last delivered id, session ttl, '1' to release the session.
/// While `holder` holds the session's GET stream, records how far it got (and, when releasing,
/// that no stream holds it any more). Slides the session TTL: an open GET stream keeps its
/// session alive. Returns 0 when the session is gone, 2 when another stream holds it (a newer
/// one opened: the caller ends), else 1.
pub const FEED_CHECKPOINT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local holder = redis.call('HGET', KEYS[1], 'feed')
local result = 1
if holder == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
  if ARGV[4] == '1' then redis.call('HDEL', KEYS[1], 'feed') end
elseif holder then
  result = 2
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return result
";

pub(super) static EVENT_APPEND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(event_append()));
pub(super) static FEED_OPEN_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(feed_open()));
pub(super) static FEED_CHECKPOINT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(FEED_CHECKPOINT));
