//! Lua scripts run by Redis. Each one makes a multi-key operation atomic and costs the replica a
//! single round trip. Key names that depend on data (session ids read from a set, the holder of a
//! feed) are rebuilt from prefixes passed in ARGV, matching [`crate::keys::Keys`]; this ties the
//! deployment to a standalone (or Sentinel-managed) Redis, not Redis Cluster.
//!
//! Messages published here are frames of [`crate::bus::BusMessage`], built with the codec's Lua
//! helper [`crate::bus::LUA_NETSTRING`] (`ns`); a test against a real Redis pins them to
//! [`crate::bus::BusMessage::encode`].

use crate::bus::LUA_NETSTRING;

/// Shared helper: append `payload` to a session's log and, when some replica holds the session's
/// GET stream, publish the event to that replica with the id of the event before it (so the
/// receiver notices a live event it missed). Returns the event id. Needs [`LUA_NETSTRING`].
const APPEND_FN: &str = r"
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

/// KEYS: session. ARGV: initialize params JSON, ttl, owning principal.
pub const SESSION_CREATE: &str = r"
redis.call('HSET', KEYS[1], 'init', ARGV[1], 'owner', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
";

/// KEYS: session. ARGV: ttl. Returns the initialize params and slides the TTL.
pub const SESSION_LOAD: &str = r"
local init = redis.call('HGET', KEYS[1], 'init')
if init then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return init
";

/// KEYS: session, event log. ARGV: subscriber-set prefix, session id, control channel, message.
/// Removes the session from every subscriber set, deletes its keys and, when it existed, tells
/// every replica.
pub const SESSION_DELETE: &str = r"
local fields = redis.call('HKEYS', KEYS[1])
for _, field in ipairs(fields) do
  if string.sub(field, 1, 4) == 'sub:' then
    redis.call('SREM', ARGV[1] .. string.sub(field, 5), ARGV[2])
  end
end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
if existed == 1 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return existed
";

/// KEYS: session. ARGV: field, value, ttl. Returns 0 when the session is gone.
pub const SESSION_SET_FIELD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: session, subscriber set. ARGV: uri, session id, ttl, max subscriptions per session,
/// max subscribers per URI. Returns 1 (subscribed), -1 (session gone), -2 (too many
/// subscriptions) or -3 (too many subscribers of the URI).
pub const SUBSCRIBE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = 'sub:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 0 then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -3 end
end
redis.call('HSET', KEYS[1], field, '1')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: session, subscriber set. ARGV: uri, session id.
pub const UNSUBSCRIBE: &str = r"
redis.call('HDEL', KEYS[1], 'sub:' .. ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 1
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
/// session alive. Returns 0 when the session is gone.
pub const FEED_CHECKPOINT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'feed') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
  if ARGV[4] == '1' then redis.call('HDEL', KEYS[1], 'feed') end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: subscriber set. ARGV: session prefix, event-log prefix, payload, max length, retention,
/// replica-channel prefix, resource channel, resource message. Appends the notification to the log
/// of every live subscriber (dropping expired ones from the set) and broadcasts the change for
/// `subscriptions/listen` streams. Returns the number of sessions notified.
pub fn resource_updated() -> String {
    format!(
        "{LUA_NETSTRING}{APPEND_FN}
local sids = redis.call('SMEMBERS', KEYS[1])
local delivered = 0
for _, sid in ipairs(sids) do
  local skey = ARGV[1] .. sid
  if redis.call('EXISTS', skey) == 1 then
    append(skey, ARGV[2] .. sid, sid, ARGV[3], ARGV[4], ARGV[5], ARGV[6])
    delivered = delivered + 1
  else
    redis.call('SREM', KEYS[1], sid)
  end
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return delivered
"
    )
}

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

/// KEYS: kv hash, kv key index (sorted set). ARGV: key, value, max keys, deadline (µs since the
/// Unix epoch on Redis's clock). Returns 1 (created), 0 (updated), -1 (full) or -2 (run after its
/// deadline: nothing written).
pub const KV_SET: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[4]) then return -2 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
";

/// KEYS: kv hash, kv key index. ARGV: key, deadline (as in [`KV_SET`]). Returns 1 when the key
/// existed, 0 when not, -1 when run after its deadline (nothing deleted).
pub const KV_DELETE: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[2]) then return -1 end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
";

/// KEYS: secret. ARGV: candidate value. Stores the candidate unless a value exists; returns the
/// stored value, so every replica ends up with the same one.
pub const SHARED_SECRET: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return ARGV[1] end
return redis.call('GET', KEYS[1])
";

/// KEYS: cache entry, fill lock. ARGV: owner, cache channel, fill announcement, '1' to store or
/// '0' not, value, ttl ms, tag-key prefix, tag... Ends a fill in one round trip: stores the entry
/// (recorded under each tag, for invalidation; tag sets live as long as their longest entry) when
/// asked, announces the fill so waiters look again, and releases the lock if `owner` still holds
/// it.
pub const CACHE_RELEASE: &str = r"
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
  for i = 8, #ARGV do
    local tag = ARGV[7] .. ARGV[i]
    redis.call('SADD', tag, KEYS[1])
    if redis.call('PTTL', tag) < tonumber(ARGV[6]) then redis.call('PEXPIRE', tag, ARGV[6]) end
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
";

/// ARGV: tag-key prefix, tag... Deletes every entry recorded under the tags. Returns the number
/// of entries deleted.
pub const CACHE_INVALIDATE: &str = r"
local deleted = 0
for i = 2, #ARGV do
  local tag = ARGV[1] .. ARGV[i]
  local keys = redis.call('SMEMBERS', tag)
  for _, key in ipairs(keys) do deleted = deleted + redis.call('DEL', key) end
  redis.call('DEL', tag)
end
return deleted
";

/// KEYS: lease. ARGV: holder, ttl ms. Takes the lease when free, renews it when `holder` has it.
/// Returns 1 when `holder` holds it afterwards.
pub const LEASE: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// KEYS: hash. ARGV: field, value, field, value... Replaces the hash.
pub const MAP_REPLACE: &str = r"
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
";

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
