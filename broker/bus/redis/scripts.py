"""The key layout of the Redis bus and the Lua scripts that change it.

Theory of operation
-------------------
Everything a topic owns lives in Redis under keys that share one hash tag, so that in Redis
Cluster they sit on one slot and one Lua script can touch them all atomically::

    {ps:TOPIC}:meta        hash: e = epoch, o = latest offset, b = bytes the history holds
    {ps:TOPIC}:hist        stream: one entry per held publication, ID "OFFSET-0",
                           fields t (Redis time, ms), d (data) and s (sender, when any)
    {ps:TOPIC}:pres        zset: client id -> expiry (ms) of its longest-lived connection
    {ps:TOPIC}:pc:CLIENT   zset: "node|worker|conn" -> expiry (ms), one per connection

(:mod:`broker.bus.redis.names` spells these names, the channels and the messages.)

**Publishing** is one script (:data:`PUBLISH_LUA`): read or create the epoch, take the next
offset, ``XADD`` to the history, drop entries older than its TTL, then the oldest entries while
the topic holds more than its ``size`` publications or its ``max_bytes`` bytes (each entry counts
its field values plus :data:`REDIS_ENTRY_OVERHEAD`; the meta hash's ``b`` keeps the sum),
``PEXPIRE`` the keys by the TTL (an idle topic vanishes; the next publication then creates a new
epoch, which is how clients learn that history was lost) and ``PUBLISH`` the encoded
publication on the topic's channel ``{ps:TOPIC}``. Since Redis runs scripts one at a time, two
nodes never hand out the same offset, and what is delivered is exactly what history holds.
Redis Cluster uses ``SPUBLISH`` (sharded pub/sub: the message stays on the topic's shard) and,
for wildcard subscribers, also a plain ``PUBLISH`` on ``ps:w:TOPIC``.

**Reading** history (:data:`HISTORY_LUA`) trims what expired first. A read of a topic without
an epoch writes nothing, so that reads of made-up topic names cost Redis no memory: it answers
offset 0 and the epoch the topic's next publication will create.

**Epochs** of new topics are derived, not stored: both scripts compute one with
``fresh_epoch``, a digest of the topic's meta key name, the Redis server's ``run_id``, its count
of evicted keys, and the number of the current window of ``position_ttl`` (Redis time). So every
node announces the same epoch for a topic nobody has published to, and its first publication
carries it. A topic never gets an epoch it had before, because its meta key can vanish only by
expiring (at least ``position_ttl`` after it was created, so the next epoch falls in a later
window), by eviction (``evicted_keys`` moves on) or with the data of a Redis that restarts (a
new ``run_id``). When one of those changes between a read and the first publication, the
publication carries another epoch than the read announced: a client then learns of a gap that
names no offsets, never misses one. Keys deleted by hand (``DEL``, ``FLUSHALL``) or statistics
reset (``CONFIG RESETSTAT``) while nodes run escape this reasoning; restart Redis instead.

**Presence** scripts keep one zset entry per connection and one per client (the expiry of its
longest-lived connection). :data:`PRESENCE_JOIN_LUA` publishes ``join`` when a client's first
live entry appears, :data:`PRESENCE_LEAVE_LUA` ``leave`` when its last goes, and
:data:`PRESENCE_SWEEP_LUA` removes a client whose entries all expired (a node that died) and
announces its ``leave``: atomic, so only one node announces it.

All times are Redis's ``TIME``, never the nodes' clocks, so that nodes with skewed clocks agree.
Nothing here does I/O.
"""

from __future__ import annotations

__all__ = [
    "HISTORY_LUA",
    "PRESENCE_EXPIRED_LUA",
    "PRESENCE_JOIN_LUA",
    "PRESENCE_LEAVE_LUA",
    "PRESENCE_LIST_LUA",
    "PRESENCE_SWEEP_LUA",
    "PUBLISH_LUA",
    "REDIS_ENTRY_OVERHEAD",
    "SCRIPTS",
]

#: Bytes a history entry counts for in Redis besides its field values (time, data, sender):
#: its ID and the stream's per-entry bookkeeping. A topic's ``[[history]] max_bytes`` bounds
#: the sum (``{ps:TOPIC}:meta`` field ``b`` keeps it).
REDIS_ENTRY_OVERHEAD = 64

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The bytes a history entry counts for: its field values plus a fixed overhead (the entry
-- ID and the stream's own bookkeeping); see ENTRY_OVERHEAD in the module.
local function entry_bytes(fields)
  local n = ENTRY_OVERHEAD
  for i = 2, #fields, 2 do n = n + #fields[i] end
  return n
end
-- Drop history entries older than cutoff (ms) and return the bytes they counted for. Entries
-- are in time order, so the expired ones are a prefix of the stream. Field 1 of every entry
-- is 't'.
local function trim_expired(hist, cutoff)
  local freed = 0
  while true do
    local batch = redis.call('XRANGE', hist, '-', '+', 'COUNT', 64)
    local old = {}
    for _, entry in ipairs(batch) do
      if tonumber(entry[2][2]) > cutoff then break end
      old[#old + 1] = entry[1]
      freed = freed + entry_bytes(entry[2])
    end
    if #old > 0 then redis.call('XDEL', hist, unpack(old)) end
    if #old < 64 then return freed end
  end
end
-- The epoch a topic without one gets (see "Epochs" in the module): the same from every node
-- for one Redis, one eviction count and one window of window_ms, and so the one its next
-- publication will carry.
local function fresh_epoch(meta, window_ms)
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
  local evicted = string.match(redis.call('INFO', 'stats'), 'evicted_keys:(%d+)') or ''
  local window = string.format('%d', math.floor(now_ms() / window_ms))
  return string.sub(redis.sha1hex(table.concat({meta, run, evicted, window}, '|')), 1, 12)
end
""".replace("ENTRY_OVERHEAD", str(REDIS_ENTRY_OVERHEAD))

PUBLISH_LUA = (
    _LUA_COMMON
    + """
-- KEYS: meta, hist
-- ARGV: topic, data, sender, has_sender, epoch_window_ms, size, ttl_ms, channel, publish_cmd,
--       wildcard_channel ('' = none), position_ttl_ms (0 = none), max_bytes
local meta, hist = KEYS[1], KEYS[2]
local size, ttl, meta_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[11])
local max_bytes = tonumber(ARGV[12])
local now = now_ms()
local current = redis.call('HMGET', meta, 'e', 'o', 'b')
local epoch, offset, held = current[1], 1, 0
if epoch then
  offset = tonumber(current[2] or 0) + 1
  -- The stream expires on its own (PEXPIRE): then it holds nothing any more.
  if redis.call('EXISTS', hist) == 1 then held = tonumber(current[3] or 0) end
else
  epoch = fresh_epoch(meta, tonumber(ARGV[5]))
  redis.call('DEL', hist)
end
-- Scripts are not transactions: a command that fails leaves the earlier writes in place.
-- The offset is therefore written only after the history entry, so that a failed XADD
-- hands out no offset.
if size > 0 then
  local id = string.format('%d-0', offset)
  local fields = {'t', tostring(now), 'd', ARGV[2]}
  if ARGV[4] == '1' then fields[5] = 's'; fields[6] = ARGV[3] end
  redis.call('XADD', hist, id, unpack(fields))
  held = held + entry_bytes(fields)
  if ttl > 0 then
    held = held - trim_expired(hist, now - ttl)
    redis.call('PEXPIRE', hist, ttl)
  else
    redis.call('PERSIST', hist)
  end
  -- The topic's caps, in publications and in bytes: its oldest entries go first (the new
  -- one too when it alone is over max_bytes), so what is held stays contiguous.
  while held > max_bytes or redis.call('XLEN', hist) > size do
    local head = redis.call('XRANGE', hist, '-', '+', 'COUNT', 1)
    if #head == 0 then held = 0; break end
    held = held - entry_bytes(head[1][2])
    redis.call('XDEL', hist, head[1][1])
  end
else
  redis.call('DEL', hist)
  held = 0
end
redis.call('HSET', meta, 'e', epoch, 'o', offset, 'b', held)
if meta_ttl > 0 then redis.call('PEXPIRE', meta, meta_ttl) else redis.call('PERSIST', meta) end
local slen = -1
if ARGV[4] == '1' then slen = #ARGV[3] end
local msg = string.format('m|%d|%s|%s|%d|', offset, epoch, ARGV[1], slen) .. ARGV[3] .. ARGV[2]
redis.call(ARGV[9], ARGV[8], msg)
if ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[10], msg) end
return {offset, epoch}
"""
)

HISTORY_LUA = (
    _LUA_COMMON
    + """
-- KEYS: meta, hist
-- ARGV: since_epoch ('' = none), since_offset, limit (0 = all, -1 = none), epoch_window_ms,
--       ttl_ms, newest ('1': the newest limit entries after since, not the oldest)
-- Returns {offset, epoch, first held offset (0 = none), entries}
local meta, hist = KEYS[1], KEYS[2]
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[5])
local current = redis.call('HMGET', meta, 'e', 'o')
local epoch, offset = current[1], tonumber(current[2] or 0)
if not epoch then
  -- Nothing is written for a topic without an epoch (a stream left behind belongs to a lost
  -- one): offset 0, in the epoch its first publication will carry.
  return {0, fresh_epoch(meta, tonumber(ARGV[4])), 0, {}}
end
if ttl > 0 then
  local freed = trim_expired(hist, now_ms() - ttl)
  if freed > 0 then redis.call('HINCRBY', meta, 'b', -freed) end
end
local first = 0
local head = redis.call('XRANGE', hist, '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
local entries = {}
if limit >= 0 then
  local start = '-'
  if ARGV[1] == epoch then start = string.format('%d-0', tonumber(ARGV[2]) + 1) end
  if limit > 0 and ARGV[6] == '1' then
    -- Newest first from the end, then back into offset order.
    local rev = redis.call('XREVRANGE', hist, '+', start, 'COUNT', limit)
    for i = #rev, 1, -1 do entries[#entries + 1] = rev[i] end
  elseif limit > 0 then
    entries = redis.call('XRANGE', hist, start, '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', hist, start, '+')
  end
end
return {offset, epoch, first, entries}
"""
)

PRESENCE_JOIN_LUA = (
    _LUA_COMMON
    + """
-- KEYS: pres, pc(client)
-- ARGV: client, ttl_ms, topic, channel, publish_cmd, member...
local now = now_ms()
local ttl = tonumber(ARGV[2])
local exp = now + ttl
for i = 6, #ARGV do redis.call('ZADD', KEYS[2], exp, ARGV[i]) end
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], 'GT', exp, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
if (not old) or tonumber(old) <= now then
  redis.call(ARGV[5], ARGV[4], 'j|' .. ARGV[3] .. '|' .. ARGV[1])
  return 1
end
return 0
"""
)

PRESENCE_LEAVE_LUA = (
    _LUA_COMMON
    + """
-- KEYS: pres, pc(client)
-- ARGV: client, member, topic, channel, publish_cmd
local now = now_ms()
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if not old then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call(ARGV[5], ARGV[4], 'l|' .. ARGV[3] .. '|' .. ARGV[1])
return 1
"""
)

PRESENCE_EXPIRED_LUA = (
    _LUA_COMMON
    + """
-- KEYS: pres.  Returns the clients whose entry has expired (at most 100).
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, 100)
"""
)

PRESENCE_SWEEP_LUA = (
    _LUA_COMMON
    + """
-- KEYS: pres, pc(client)
-- ARGV: client, topic, channel, publish_cmd
-- Removes an expired client and announces its leave; a client that still has a live
-- connection only gets its expiry corrected.
local now = now_ms()
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not old) or tonumber(old) > now then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #top > 0 then
  redis.call('ZADD', KEYS[1], top[2], ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call(ARGV[4], ARGV[3], 'l|' .. ARGV[2] .. '|' .. ARGV[1])
return 1
"""
)

PRESENCE_LIST_LUA = (
    _LUA_COMMON
    + """
-- KEYS: pres.  The clients with a live entry.
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
"""
)


#: Every script by the name the bus runs it under.
SCRIPTS = {
    "publish": PUBLISH_LUA,
    "history": HISTORY_LUA,
    "join": PRESENCE_JOIN_LUA,
    "leave": PRESENCE_LEAVE_LUA,
    "expired": PRESENCE_EXPIRED_LUA,
    "sweep": PRESENCE_SWEEP_LUA,
    "presence": PRESENCE_LIST_LUA,
}
