"""The Redis bus: brokers on several machines share topics through one Redis (or Redis Cluster).

Theory of operation
-------------------
Everything a topic owns lives in Redis under keys that share one hash tag, so that in Redis
Cluster they sit on one slot and one Lua script can touch them all atomically::

    {ps:TOPIC}:meta        hash: e = epoch, o = latest offset, b = bytes the history holds
    {ps:TOPIC}:hist        stream: one entry per held publication, ID "OFFSET-0",
                           fields t (Redis time, ms), d (data) and s (sender, when any)
    {ps:TOPIC}:pres        zset: client id -> expiry (ms) of its longest-lived connection
    {ps:TOPIC}:pc:CLIENT   zset: "node|worker|conn" -> expiry (ms), one per connection

**Publishing** is one script (:data:`PUBLISH_LUA`): read or create the epoch, take the next
offset, ``XADD`` to the history, drop entries older than its TTL, then the oldest entries while
the topic holds more than its ``size`` publications or its ``max_bytes`` bytes (each entry counts
its field values plus :data:`REDIS_ENTRY_OVERHEAD`; the meta hash's ``b`` keeps the sum), ``PEXPIRE`` the keys by the TTL (an idle topic vanishes; the next publication
then creates a new epoch, which is how clients learn that history was lost) and ``PUBLISH`` the
encoded publication on the topic's channel ``{ps:TOPIC}``. Since Redis runs scripts one at a
time, two nodes never hand out the same offset, and what is delivered is exactly what history
holds. Redis Cluster uses ``SPUBLISH`` (sharded pub/sub: the message stays on the topic's
shard) and, for wildcard subscribers, also a plain ``PUBLISH`` on ``ps:w:TOPIC`` (see below).

**Subscribing.** A node subscribes only to what its clients need. An exact topic is
``SUBSCRIBE {ps:TOPIC}`` (``SSUBSCRIBE`` in a cluster). A wildcard pattern becomes a Redis
glob for ``PSUBSCRIBE``: ``*`` becomes ``*`` and a final ``>`` becomes ``?*``. Redis globs do
not know segments (``*`` also matches dots), so every received publication is checked again
with the exact matcher of :mod:`broker.topics` before it is delivered. Redis Cluster has no
sharded ``PSUBSCRIBE``: there the publish script also ``PUBLISH``-es the publication on
``ps:w:TOPIC``, which Redis Cluster broadcasts to every node, and wildcard patterns are
``PSUBSCRIBE``-d on one node. That costs one cluster-bus broadcast per publication; exact
subscriptions stay sharded.

**Delivery** goes through one task per bus. Received messages are parsed and queued (a
bounded queue: when the node cannot keep up, it drops its Redis subscriptions, reconnects and
catches up from history instead of buffering without limit). Per topic the task remembers the
last ``(epoch, offset)`` it delivered: duplicates (an exact and a wildcard subscription both
matching) are dropped, and a gap (messages lost while disconnected, or a late subscription) is
filled from the history stream before the publication that revealed it, so each worker sees
every topic in offset order. A position read from Redis may be ahead of the subscriber
connection; :meth:`RedisBus.position` and :meth:`RedisBus.history` of a watched topic return
only once the publications up to that position were handed to the worker, which stitches a
subscription's replayed history and its live publications at that position.

**Presence.** Only topics that ``[presence] topics`` tracks are joined (the worker decides),
so only they get presence keys. Each connection's entry expires ``presence_ttl`` seconds
after its last refresh; every bus refreshes its own entries every ``presence_ttl / 3``.
Scripts emit ``join`` when a client's first live entry appears and ``leave`` when its last
goes, on the topic's channel.
A node that dies leaves entries that simply expire: every bus periodically sweeps the topics
it watches, and the sweep script (atomic, so only one node announces it) removes the expired
client and publishes its ``leave``. :meth:`RedisBus.presence` counts only unexpired entries, so
it is right even between sweeps. All times are Redis's ``TIME``, never the nodes' clocks.

**Outages.** Every command runs under a short timeout, so :meth:`RedisBus.publish` fails fast
with :class:`~broker.errors.BusUnavailable` while Redis is unreachable. The subscriber
connection is watched: when it breaks, the bus reports itself down (``is_up``, ``on_state``,
one log line), reconnects with exponential backoff and jitter, subscribes to every channel and
pattern again, reports itself up, refreshes its presence entries and catches every topic it
has delivered up from history. coredis runs on trio through anyio and raises its errors inside
``ExceptionGroup``\\s; they are caught with ``except*`` and turned into ``BusUnavailable``.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import attrs
import structlog
import trio

from broker.bus.base import (
    Bus,
    BusHandlers,
    ConnKey,
    HistoryResult,
    PresenceEvent,
    Publication,
    StreamPosition,
    recovery,
)
from broker.config import DEFAULT_HISTORY, Config, HistoryRule, node_name
from broker.errors import BusUnavailable
from broker.topics import SubscriptionIndex, is_wildcard, pattern_matches

__all__ = ["RedisBus", "redis_glob"]

log = structlog.get_logger("broker.bus.redis")

HistoryRuleFn = Callable[[str], "HistoryRule | tuple[int, float]"]
"""Gives a topic's history rule (:class:`broker.config.HistoryRule`, or ``(size, ttl)``): at
most ``size`` publications (0 keeps none), each kept ``ttl`` seconds (0 = no expiry)."""

#: The most publications one read of a gap asks Redis for (see ``RedisBus._fill``).
FILL_PAGE = 256

#: Bytes a history entry counts for in Redis besides its field values (time, data, sender):
#: its ID and the stream's per-entry bookkeeping. A topic's ``[[history]] max_bytes`` bounds
#: the sum (``{ps:TOPIC}:meta`` field ``b`` keeps it).
REDIS_ENTRY_OVERHEAD = 64

# --------------------------------------------------------------------------------------------
# Lua. Scripts use Redis's own clock (TIME) so that nodes with skewed clocks agree.

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
""".replace("ENTRY_OVERHEAD", str(REDIS_ENTRY_OVERHEAD))

PUBLISH_LUA = (
    _LUA_COMMON
    + """
-- KEYS: meta, hist
-- ARGV: topic, data, sender, has_sender, new_epoch, size, ttl_ms, channel, publish_cmd,
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
  epoch = ARGV[5]
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
-- ARGV: since_epoch ('' = none), since_offset, limit (0 = all, -1 = none), new_epoch, ttl_ms,
--       position_ttl_ms, newest ('1': the newest limit entries after since, not the oldest)
-- Returns {offset, epoch, first held offset (0 = none), entries}
local meta, hist = KEYS[1], KEYS[2]
local limit, ttl, meta_ttl = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local epoch = redis.call('HGET', meta, 'e')
local offset = 0
if not epoch then
  -- A topic without an epoch gets one now, so that a position handed out before the first
  -- publication still names the epoch that publication will carry.
  epoch = ARGV[4]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
  if meta_ttl > 0 then redis.call('PEXPIRE', meta, meta_ttl) end
else
  offset = tonumber(redis.call('HGET', meta, 'o'))
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
  if limit > 0 and ARGV[7] == '1' then
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

# --------------------------------------------------------------------------------------------


def redis_glob(pattern: str) -> str:
    """Translate a topic pattern into a Redis glob that matches at least the same topics.

    ``*`` (one segment) becomes ``*`` and a final ``>`` (one or more segments) ``?*``; Redis
    globs are not segment-aware, so what they match must be filtered again with
    :func:`broker.topics.pattern_matches`.
    """
    out = []
    for seg in pattern.split("."):
        if seg == "*":
            out.append("*")
        elif seg == ">":
            out.append("?*")
        else:
            out.append(_glob_escape(seg))
    return ".".join(out)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


_REDIS_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    # coredis's connections are anyio streams: a connection that died mid-operation raises
    # these (for instance when a subscriber cleans up after its connection was lost).
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def _redis_failures() -> tuple[type[BaseException], ...]:
    from coredis.exceptions import RedisError

    return (RedisError, *_REDIS_FAILURES)


_UNSUBSCRIBED = frozenset({"unsubscribe", "punsubscribe", "sunsubscribe"})

# How many presence refreshes run at once (coredis pipelines them on its connections).
_CONCURRENCY = 32


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups: what to log."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Overloaded(Exception):
    """The delivery queue is full: the subscriber connection is reset and caught up."""


class _Reset(Exception):
    """A subscription change failed: reconnect, so that what is subscribed is known."""


@attrs.frozen
class _CatchUp:
    topic: str


_Item = Publication | PresenceEvent | _CatchUp


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_message(raw: bytes) -> Publication | PresenceEvent | None:
    """Decode what the scripts publish: ``m|OFFSET|EPOCH|TOPIC|SENDERLEN|SENDER DATA`` for a
    publication (SENDERLEN -1 = no sender), ``j|TOPIC|CLIENT`` and ``l|TOPIC|CLIENT`` for
    presence."""
    kind = raw[:2]
    if kind == b"m|":
        _, off, epoch, topic, slen, rest = raw.split(b"|", 5)
        n = int(slen)
        sender = rest[:n].decode() if n >= 0 else None
        data = rest[max(n, 0) :].decode()
        return Publication(topic.decode(), int(off), epoch.decode(), sender, data)
    if kind in (b"j|", b"l|"):
        _, topic, client = raw.split(b"|", 2)
        return PresenceEvent(topic.decode(), "join" if kind == b"j|" else "leave", client.decode())
    return None


class RedisBus(Bus):
    """A :class:`~broker.bus.base.Bus` on Redis or Redis Cluster (through coredis).

    ``url`` is ``redis://[:PASSWORD@]HOST:PORT/DB`` or ``rediss://...`` (TLS); with
    ``cluster=True`` it names any one node of a Redis Cluster (the DB must be 0). ``node``
    names this node and worker in connection names and logs. ``history_rule(topic)`` gives the
    topic's :class:`~broker.config.HistoryRule` (or a ``(size, ttl_seconds)`` tuple); a topic's
    position (offset and epoch) is kept ``position_ttl`` seconds after its last publication,
    and at least as long as its history, so that clients coming back learn exactly what they
    lost. ``presence_ttl`` is how long a presence entry lives without a refresh. ``timeout``
    bounds every Redis command (publishes fail with ``BusUnavailable`` after it at worst, at
    once when Redis is known to be down); ``reconnect_max`` caps the reconnection backoff.
    ``prefix`` starts every key and channel name (no ``{``, ``}`` or ``|``). ``queue_size``
    bounds the received messages waiting for delivery, ``max_tracked_topics`` the topics whose
    last delivered offset is remembered.

    :meth:`run` must be running for anything else to work; it calls ``task_status.started()``
    after the first connection attempt, successful or not (a node can start while Redis is
    down; it then answers ``unavailable`` until Redis comes back).
    """

    def __init__(
        self,
        url: str,
        *,
        node: str,
        history_rule: HistoryRuleFn,
        cluster: bool = False,
        presence_ttl: float = 30.0,
        handlers: BusHandlers | None = None,
        prefix: str = "ps",
        timeout: float = 2.0,
        reconnect_max: float = 5.0,
        position_ttl: float = 86_400.0,
        queue_size: int = 10_000,
        max_tracked_topics: int = 100_000,
    ) -> None:
        if any(c in prefix for c in "{}|") or not prefix:
            raise ValueError(f"bad Redis key prefix {prefix!r}")
        if presence_ttl <= 0:
            raise ValueError("presence_ttl must be positive")
        self.url = url
        self.node = node
        self.cluster = cluster
        self.presence_ttl = presence_ttl
        self.handlers = handlers or BusHandlers(lambda p: None, lambda e: None)
        self._history_rule = history_rule
        self._prefix = prefix
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._max_tracked = max_tracked_topics
        self._position_ttl = position_ttl
        self._publish_cmd = "SPUBLISH" if cluster else "PUBLISH"

        self._client: Any = None  # the coredis client while connected
        self._cluster_nodes: list[Any] = []  # addresses of the cluster nodes seen
        self._scripts: dict[str, Any] = {}
        self._up = False
        self._state_known = False
        self._ever_down = False

        # What the worker wants to receive, kept across reconnections.
        self._exact: dict[str, None] = {}
        self._wild: SubscriptionIndex[str] = SubscriptionIndex()
        self._wild_patterns: dict[str, None] = {}
        # The live subscriber objects (None while disconnected) and the lock that orders
        # subscription changes against (re)subscribing.
        self._exact_ps: Any = None
        self._wild_ps: Any = None
        self._sub_lock = trio.Lock()
        self._watches_in_progress: dict[str, trio.Event] = {}

        # Per topic: (epoch, offset) of the last publication delivered ("" = no epoch yet).
        self._last: dict[str, tuple[str, int]] = {}
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[_Item](queue_size)
        # Readers of a position waiting for its delivery: topic -> [(epoch, offset, event)].
        self._waiters: dict[str, list[tuple[str, int, trio.Event]]] = {}

        # This bus's own presence entries: topic -> client -> connection members.
        self._local_presence: dict[str, dict[str, dict[str, None]]] = {}
        self._presence_locks: dict[tuple[str, str], trio.Lock] = {}
        self._presence_kick = trio.Event()
        self._reset_session = trio.Event()
        self._on_connected: Callable[[], None] = lambda: None

    def reconfigure(self, history_rule: Callable[[str], HistoryRule]) -> None:
        """Reloaded ``[[history]]`` rules apply to the next publication of each topic."""
        self._history_rule = history_rule

    @classmethod
    def from_config(
        cls, config: Config, handlers: BusHandlers, *, node: str | None = None
    ) -> RedisBus:
        """The bus that ``[bus] url``, ``cluster`` and ``presence_ttl`` and the ``[[history]]``
        rules describe; ``node`` defaults to :func:`~broker.config.node_name`."""
        return cls(
            config.bus.url,
            node=node or node_name(config),
            history_rule=config.history_rule,
            cluster=config.bus.cluster,
            presence_ttl=config.bus.presence_ttl,
            handlers=handlers,
        )

    # ---------------------------------------------------------------- names

    def _key(self, topic: str, what: str) -> str:
        return f"{{{self._prefix}:{topic}}}:{what}"

    def _channel(self, topic: str) -> str:
        return f"{{{self._prefix}:{topic}}}"

    def _wild_channel(self, topic: str) -> str:
        return f"{self._prefix}:w:{topic}"

    def _glob(self, pattern: str) -> str:
        escaped = _glob_escape(self._prefix)
        if self.cluster:
            return f"{escaped}:w:{redis_glob(pattern)}"
        return f"\\{{{escaped}:{redis_glob(pattern)}\\}}"

    @staticmethod
    def _member(key: ConnKey) -> str:
        return f"{key.node}|{key.worker}|{key.conn}"

    # ---------------------------------------------------------------- state

    @property
    def is_up(self) -> bool:
        return self._up

    def _set_up(self, up: bool, reason: str = "") -> None:
        if up == self._up and self._state_known:
            return
        # The first state is reported too: a node that cannot reach Redis at startup (down,
        # wrong password) says so once.
        self._state_known = True
        self._up = up
        if up:
            log.info("bus_up", bus="redis", url=self._safe_url(), node=self.node)
        else:
            log.warning("bus_down", bus="redis", url=self._safe_url(), node=self.node, error=reason)
        try:
            self.handlers.on_state(up)
        except Exception:  # handlers must not raise; a bug there must not kill the bus
            log.exception("bus_handler_failed", handler="on_state")

    def _safe_url(self) -> str:
        # Never log a password.
        head, sep, tail = self.url.rpartition("@")
        if not sep:
            return self.url
        scheme, _, _ = head.partition("://")
        return f"{scheme}://***@{tail}"

    @contextlib.contextmanager
    def _ops(self, what: str) -> Iterator[Any]:
        """Run one Redis operation: fail at once while disconnected, bound it in time, and turn
        whatever coredis raises (in an ExceptionGroup or not) into BusUnavailable."""
        client = self._client
        if client is None or not self._up:
            raise BusUnavailable(f"redis is unavailable ({what})")
        failure: BaseException | None = None
        try:
            with trio.fail_after(self._timeout):
                yield client
        except* _redis_failures() as group:
            # Several failures at once (a timeout and a lost connection) still make one
            # BusUnavailable; anything else propagates unchanged.
            failure = _leaf(group)
        except* RuntimeError as group:
            # coredis's "connection pool has exited": the connection was lost meanwhile.
            if self._client is client:
                raise
            failure = _leaf(group)
        if failure is not None:
            if isinstance(failure, trio.TooSlowError):
                raise BusUnavailable(f"redis did not answer {what} within {self._timeout}s")
            raise BusUnavailable(f"redis {what} failed: {failure!r}") from failure

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        with self._ops(name) as client:
            return await self._scripts[name](keys=keys, args=args, client=client)

    # ---------------------------------------------------------------- run

    def _make_client(self) -> Any:
        import coredis
        from coredis.retry import NoRetryPolicy

        # No retries inside coredis: a retried publish could publish twice, and the bus has
        # its own reconnection loop.
        options: dict[str, Any] = {
            "decode_responses": False,
            "connect_timeout": self._timeout,
            # Bounds every reply, including the subscriber's keepalive PING, so that a
            # connection that went silent (not closed) is noticed too.
            "stream_timeout": self._timeout,
            "retry_policy": NoRetryPolicy(),
            # A password with reserved characters is percent-encoded in the URL.
            "decode_components": True,
        }
        if self.cluster:
            if self._cluster_nodes:
                # Every node seen so far, so that reconnecting works while the node named in
                # the URL is the one that is down.
                options["startup_nodes"] = self._cluster_nodes
            with warnings.catch_warnings():
                # coredis 6.9 builds its startup node from the URL with a deprecated type.
                warnings.simplefilter("ignore", DeprecationWarning)
                return coredis.RedisCluster.from_url(self.url, **options)
        return coredis.Redis.from_url(self.url, client_name=f"pubsub:{self.node}", **options)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from coredis.commands.script import Script

        sources = {
            "publish": PUBLISH_LUA,
            "history": HISTORY_LUA,
            "join": PRESENCE_JOIN_LUA,
            "leave": PRESENCE_LEAVE_LUA,
            "expired": PRESENCE_EXPIRED_LUA,
            "sweep": PRESENCE_SWEEP_LUA,
            "presence": PRESENCE_LIST_LUA,
        }
        self._scripts = {name: Script(script=src) for name, src in sources.items()}
        started = False

        def connected() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        self._on_connected = connected
        failures = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_loop)
            nursery.start_soon(self._presence_loop)
            while True:
                reason = ""
                was_up = False
                try:
                    async with self._make_client() as client:
                        await self._session(client)
                except* _redis_failures() as group:
                    reason = repr(_leaf(group))
                except* _Overloaded:
                    reason = "overloaded: the delivery queue was full"
                except* _Reset:
                    reason = "a subscription change failed"
                except* Exception as group:
                    # A bug must not leave the worker without a bus: log it and reconnect.
                    reason = repr(_leaf(group))
                    log.error("bus_session_failed", bus="redis", exc_info=group)
                finally:
                    was_up = self._up
                    self._client = None
                    self._exact_ps = self._wild_ps = None
                self._set_up(False, reason)
                self._ever_down = True
                connected()
                # Exponential backoff with jitter, capped; the first retry after a working
                # session comes quickly (a restarted Redis is usually back within a second).
                failures = 0 if was_up else failures + 1
                delay = min(self._reconnect_max, 0.05 * 2 ** min(failures, 16))
                await trio.sleep(random.uniform(delay / 2, delay))

    async def _session(self, client: Any) -> None:
        """One connected period: subscribe everything, report up, then read until it breaks."""
        self._client = client
        # Check the connection before announcing anything.
        with trio.fail_after(self._timeout):
            await client.ping()
        if self.cluster:
            from coredis.connection import TCPLocation

            seen = {(n.host, n.port) for n in client.connection_pool.cluster_layout.nodes}
            known = {(n.host, n.port) for n in self._cluster_nodes}
            self._cluster_nodes += [TCPLocation(h, p) for h, p in sorted(seen - known)]
            async with (
                client.sharded_pubsub(**self._pubsub_options()) as exact_ps,
                client.pubsub(**self._pubsub_options()) as wild_ps,
            ):
                await self._serve(exact_ps, wild_ps)
        else:
            async with client.pubsub(**self._pubsub_options()) as ps:
                await self._serve(ps, ps)

    def _pubsub_options(self) -> dict[str, Any]:
        from coredis.retry import NoRetryPolicy

        return {
            "retry_policy": NoRetryPolicy(),
            # Unsubscribe notices are read: Redis Cluster drops shard subscriptions whose
            # slot moved, and a dropped subscription that is still wanted must be renewed.
            "ignore_subscribe_messages": False,
            "subscription_timeout": self._timeout,
            # A PING when the connection has been quiet this long, so that a silently dead
            # connection is noticed.
            "max_idle_seconds": max(1.0, min(5.0, self.presence_ttl / 3)),
        }

    async def _serve(self, exact_ps: Any, wild_ps: Any) -> None:
        async with self._sub_lock:
            with trio.fail_after(self._timeout * 10):
                for batch in _batches([self._channel(t) for t in self._exact]):
                    await exact_ps.subscribe(*batch)
                for batch in _batches([self._glob(p) for p in self._wild_patterns]):
                    await wild_ps.psubscribe(*batch)
            self._exact_ps, self._wild_ps = exact_ps, wild_ps
        self._reset_session = trio.Event()
        self._set_up(True)
        self._on_connected()
        self._presence_kick.set()  # refresh our presence entries now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_reset)
            nursery.start_soon(self._reader, exact_ps, False, nursery)
            if wild_ps is not exact_ps:
                nursery.start_soon(self._reader, wild_ps, True, nursery)
            if self._ever_down:
                # Whatever was published while we were away is in history: fetch it.
                for topic in list(self._last):
                    await self._inbox_send.send(_CatchUp(topic))

    def _check_unsubscribed(self, kind: str, name: str, nursery: trio.Nursery) -> None:
        """The server says a subscription ended. Ours end that way when we unwatch; one that
        is still wanted was dropped by the server (a cluster slot moved): renew it."""
        if kind == "punsubscribe":
            wanted = [p for p in self._wild_patterns if self._glob(p) == name]
        else:
            topic = name[len(self._prefix) + 2 : -1]
            wanted = [topic] if self._channel(topic) == name and topic in self._exact else []
        for pattern in wanted:
            log.warning("bus_subscription_dropped", channel=name)
            nursery.start_soon(self._renew, pattern)

    async def _renew(self, pattern: str) -> None:
        async with self._sub_lock:
            wildcard = is_wildcard(pattern)
            if pattern not in (self._wild_patterns if wildcard else self._exact):
                return  # unwatched meanwhile
            ps = self._wild_ps if wildcard else self._exact_ps
            if ps is None:
                return  # the session is over; the next one subscribes everything
            with self._resubscribe_on_failure("resubscribe"):
                if wildcard:
                    await ps.psubscribe(self._glob(pattern))
                else:
                    if self.cluster and self._client is not None:
                        # The slot moved: learn where to before subscribing there.
                        await self._client.connection_pool.cluster_layout.initialize()
                    try:
                        await ps.subscribe(self._channel(pattern))
                    except KeyError:  # a master this subscriber has no connection to
                        self._reset_session.set()
                        return
        if not wildcard:
            # What was published while it was dropped is in history.
            await self._inbox_send.send(_CatchUp(pattern))

    async def _watch_reset(self) -> None:
        await self._reset_session.wait()
        raise _Reset()

    async def _reader(self, ps: Any, wildcard_only: bool, nursery: trio.Nursery) -> None:
        while True:
            msg = await ps.get_message()
            if msg is None:
                continue
            kind = msg["type"]
            if kind in _UNSUBSCRIBED:
                self._check_unsubscribed(kind, _decode(msg["channel"]), nursery)
                continue
            if kind not in ("message", "pmessage", "smessage"):
                continue
            item = _parse_message(msg["data"])
            if item is None or (isinstance(item, PresenceEvent) and msg["type"] == "pmessage"):
                # Presence events are for exact subscriptions: a pattern's copy is a duplicate.
                continue
            if wildcard_only and item.topic in self._exact:
                # In a cluster the exact subscription delivers it in order; this copy would
                # only arrive out of order with it.
                continue
            try:
                self._inbox_send.send_nowait(item)
            except trio.WouldBlock:
                raise _Overloaded() from None

    # ---------------------------------------------------------------- delivery

    def _wanted(self, topic: str) -> bool:
        if topic in self._exact:
            return True
        if not self._wild.has_wildcards:
            return False
        return next(iter(self._wild.match(topic)), None) is not None

    async def _deliver_loop(self) -> None:
        async for item in self._inbox_recv:
            if isinstance(item, Publication):
                await self._deliver(item)
            elif isinstance(item, PresenceEvent):
                if item.topic in self._exact:
                    self._call(self.handlers.on_presence, item)
            else:
                await self._catch_up(item.topic)

    def _call(self, handler: Callable[[Any], None], arg: Any) -> None:
        try:
            handler(arg)
        except Exception:
            log.exception("bus_handler_failed", handler=getattr(handler, "__name__", "?"))

    def _remember(self, topic: str, epoch: str, offset: int) -> None:
        last = self._last
        last.pop(topic, None)
        last[topic] = (epoch, offset)
        if len(last) > self._max_tracked:
            del last[next(iter(last))]
        waiters = self._waiters.get(topic)
        if waiters:
            for w_epoch, w_offset, event in waiters:
                if w_epoch == epoch and offset >= w_offset:
                    event.set()

    async def _delivered(self, topic: str, position: StreamPosition) -> None:
        """Return once this worker has been handed every publication up to ``position`` of a
        topic it watches.

        A position read from Redis can be ahead of what the subscriber connection has brought
        in yet (they are two connections). The worker announces the position it reads in a
        subscribe reply and drops live publications at or below it as already covered, so
        the bus must not let it read a position before delivering up to there, as the
        in-process bus never does. Usually nothing is missing and this returns at once; when
        something is, it comes live within a moment, or is fetched from history."""
        if position.offset == 0 or not self._wanted(topic):
            return
        state = self._last.get(topic)
        if state is not None and state[0] == position.epoch and state[1] >= position.offset:
            return
        event = trio.Event()
        entry = (position.epoch, position.offset, event)
        waiters = self._waiters.setdefault(topic, [])
        waiters.append(entry)
        try:
            with trio.move_on_after(0.05):
                await event.wait()
            # Without a state (only a wildcard brought the topic here, and nothing of it yet)
            # there is no knowing what the worker already had: give a publication in flight
            # that moment to land, and no more.
            if not event.is_set() and state is not None:
                with contextlib.suppress(trio.WouldBlock):
                    self._inbox_send.send_nowait(_CatchUp(topic))
                with trio.move_on_after(self._timeout):
                    await event.wait()
                if not event.is_set():
                    log.info("bus_delivery_lagging", topic=topic, offset=position.offset)
        finally:
            waiters.remove(entry)
            if not waiters:
                del self._waiters[topic]

    async def _deliver(self, pub: Publication) -> None:
        if not self._wanted(pub.topic):
            return
        state = self._last.get(pub.topic)
        if state is not None:
            epoch, last = state
            if epoch != pub.epoch:
                last = 0
            if pub.offset <= last:
                return
            if pub.offset > last + 1:
                await self._fill(pub.topic, pub.epoch, last, pub.offset)
                state = self._last.get(pub.topic)
                if state is not None and state[0] == pub.epoch and state[1] >= pub.offset:
                    return
        self._remember(pub.topic, pub.epoch, pub.offset)
        self._call(self.handlers.on_publication, pub)

    async def _fill(self, topic: str, epoch: str, after: int, upto: int) -> None:
        """Deliver the held publications of ``topic`` in ``epoch`` after offset ``after`` and
        before ``upto`` (a gap); what history no longer holds stays a gap for the client.
        Read in pages of :data:`FILL_PAGE`, so that no reply from Redis is larger, however
        long the gap (only the delivery loop calls this: nothing is delivered in between)."""
        while after + 1 < upto:
            try:
                result = await self._read(
                    topic, StreamPosition(after, epoch), min(FILL_PAGE, upto - after - 1)
                )
            except BusUnavailable as exc:
                log.info("bus_gap_unfilled", topic=topic, after=after, upto=upto, error=str(exc))
                return
            if result.position.epoch != epoch:
                return
            page = [pub for pub in result.publications if after < pub.offset < upto]
            if not page:
                return
            for pub in page:
                self._remember(topic, epoch, pub.offset)
                self._call(self.handlers.on_publication, pub)
            after = page[-1].offset

    async def _catch_up(self, topic: str) -> None:
        state = self._last.get(topic)
        if state is None or not self._wanted(topic):
            return
        try:
            meta = await self._meta(topic)
        except BusUnavailable:
            return
        if meta is None:
            return
        epoch, offset = meta
        after = state[1] if epoch == state[0] else 0
        if offset > after:
            await self._fill(topic, epoch, after, offset + 1)

    async def _meta(self, topic: str) -> tuple[str, int] | None:
        with self._ops("hmget") as client:
            epoch, offset = await client.hmget(self._key(topic, "meta"), ["e", "o"])
        if epoch is None:
            return None
        return _decode(epoch), int(offset or 0)

    # ---------------------------------------------------------------- publish and history

    def _rule(self, topic: str) -> tuple[int, int, int, int]:
        """``(size, history ttl ms, position ttl ms, max bytes)`` of a topic; 0 ms = no
        expiry."""
        rule = self._history_rule(topic)
        if isinstance(rule, HistoryRule):
            size, ttl, max_bytes = rule.size, rule.ttl, rule.max_bytes
        else:
            (size, ttl), max_bytes = rule, DEFAULT_HISTORY.max_bytes
        if ttl <= 0 or math.isinf(ttl):
            return max(0, int(size)), 0, 0, max_bytes
        ttl_ms = max(1, int(ttl * 1000))
        meta_ttl_ms = max(ttl_ms, int(self._position_ttl * 1000))
        return max(0, int(size)), ttl_ms, meta_ttl_ms, max_bytes

    async def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        size, ttl_ms, meta_ttl_ms, max_bytes = self._rule(topic)
        offset, epoch = await self._script(
            "publish",
            [self._key(topic, "meta"), self._key(topic, "hist")],
            [
                topic,
                data,
                sender or "",
                "0" if sender is None else "1",
                secrets.token_hex(6),
                size,
                ttl_ms,
                self._channel(topic),
                self._publish_cmd,
                self._wild_channel(topic) if self.cluster else "",
                meta_ttl_ms,
                max_bytes,
            ],
        )
        return Publication(topic, int(offset), _decode(epoch), sender, data)

    async def _read(
        self, topic: str, since: StreamPosition | None, limit: int | None, newest: bool = False
    ) -> HistoryResult:
        _, ttl_ms, meta_ttl_ms, _ = self._rule(topic)
        offset, epoch_raw, first, entries = await self._script(
            "history",
            [self._key(topic, "meta"), self._key(topic, "hist")],
            [
                "" if since is None else since.epoch,
                0 if since is None else max(0, since.offset),
                0 if limit is None else limit,
                secrets.token_hex(6),
                ttl_ms,
                meta_ttl_ms,
                "1" if newest else "0",
            ],
        )
        epoch = _decode(epoch_raw)
        offset, first = int(offset), int(first)
        pubs = []
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            sender = values.get(b"s")
            pubs.append(
                Publication(
                    topic,
                    int(_decode(entry_id).partition("-")[0]),
                    epoch,
                    None if sender is None else _decode(sender),
                    _decode(values[b"d"]),
                )
            )
        position = StreamPosition(offset, epoch)
        # Offsets lost from the current epoch: those before the first one still held (all of
        # them when none is held, first = 0); of those, missed names only the ones asked for.
        asked = max(0, limit) if newest and limit is not None else None
        recovered, missed = recovery(position, first or offset + 1, since, asked)
        return HistoryResult(tuple(pubs), position, recovered, missed)

    async def _watch_settled(self, topic: str) -> None:
        """Wait for a watch of ``topic`` in progress (the worker asks the bus once per pattern,
        so a second subscriber may read a position while the first one's subscription is
        still being made: a position read before it is active could miss what follows)."""
        event = self._watches_in_progress.get(topic)
        if event is not None:
            with trio.move_on_after(self._timeout):
                await event.wait()

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        await self._watch_settled(topic)
        if limit is not None and limit <= 0:
            result = attrs.evolve(await self._read(topic, since, -1, newest), publications=())
        else:
            result = await self._read(topic, since, limit, newest)
        await self._delivered(topic, result.position)
        return result

    async def position(self, topic: str) -> StreamPosition:
        await self._watch_settled(topic)
        position = (await self._read(topic, None, -1)).position
        await self._delivered(topic, position)
        return position

    # ---------------------------------------------------------------- watching

    async def watch(self, pattern: str) -> None:
        """Subscribe to what ``pattern`` needs. While Redis is down the wish is recorded and
        fulfilled on reconnection, so this never raises."""
        if is_wildcard(pattern) or pattern in self._watches_in_progress:
            await self._watch(pattern)
            return
        event = self._watches_in_progress[pattern] = trio.Event()
        try:
            await self._watch(pattern)
        finally:
            del self._watches_in_progress[pattern]
            event.set()

    async def _watch(self, pattern: str) -> None:
        async with self._sub_lock:
            if is_wildcard(pattern):
                if pattern in self._wild_patterns:
                    return
                self._wild_patterns[pattern] = None
                self._wild.add(pattern, pattern)
                ps = self._wild_ps
                if ps is not None:
                    with self._resubscribe_on_failure("psubscribe"):
                        await ps.psubscribe(self._glob(pattern))
                return
            if pattern in self._exact:
                return
            # When nothing on this worker receives the topic yet, note where it stands before
            # subscribing: deliveries then continue from there (what came before is no one's
            # here), gaps after it are filled, and position reads can wait for deliveries
            # to catch up with them (see _delivered).
            baseline: tuple[str, int] | None = None
            if not self._wanted(pattern) and self._client is not None:
                with contextlib.suppress(BusUnavailable):
                    baseline = await self._meta(pattern) or ("", 0)
            self._exact[pattern] = None
            ps = self._exact_ps
            if ps is not None:
                with self._resubscribe_on_failure("subscribe"):
                    await ps.subscribe(self._channel(pattern))
            if baseline is not None:
                state = self._last.get(pattern)
                # Keep what live messages (necessarily newer) established meanwhile.
                if state is None or (state[0] == baseline[0] and state[1] < baseline[1]):
                    self._remember(pattern, *baseline)

    async def unwatch(self, pattern: str) -> None:
        async with self._sub_lock:
            if is_wildcard(pattern):
                if self._wild_patterns.pop(pattern, 0) == 0:
                    return
                self._wild.remove(pattern, pattern)
                ps = self._wild_ps
                if ps is not None:
                    with self._resubscribe_on_failure("punsubscribe"):
                        await ps.punsubscribe(self._glob(pattern))
                for topic in [t for t in self._last if pattern_matches(pattern, t)]:
                    if not self._wanted(topic):
                        del self._last[topic]
                return
            if self._exact.pop(pattern, 0) == 0:
                return
            ps = self._exact_ps
            if ps is not None:
                with self._resubscribe_on_failure("unsubscribe"):
                    await ps.unsubscribe(self._channel(pattern))
            if not self._wanted(pattern):
                self._last.pop(pattern, None)

    @contextlib.contextmanager
    def _resubscribe_on_failure(self, what: str) -> Iterator[None]:
        """A (un)subscription that fails while connected leaves the subscriber connection in
        doubt: close it, so the reconnection subscribes to exactly what is wanted."""
        try:
            with trio.fail_after(self._timeout):
                yield
        except* _redis_failures() as group:
            log.warning("bus_subscription_failed", op=what, error=repr(_leaf(group)))
            self._exact_ps = self._wild_ps = None
            self._reset_session.set()

    # ---------------------------------------------------------------- presence

    @contextlib.asynccontextmanager
    async def _presence_lock(self, topic: str, client: str) -> AsyncIterator[None]:
        """Serialize this bus's joins, leaves and refreshes of one client on one topic, so
        that a refresh sent before a leave never lands after it (which would leave a ghost
        until the entry expires)."""
        key = (topic, client)
        lock = self._presence_locks.get(key)
        if lock is None:
            lock = self._presence_locks[key] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._presence_locks.pop(key, None)

    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        member = self._member(key)
        async with self._presence_lock(topic, client):
            members = self._local_presence.setdefault(topic, {}).setdefault(client, {})
            members[member] = None
            try:
                await self._join(topic, client, [member])
            except BusUnavailable:
                self._forget_local(topic, client, member)
                raise

    async def _join(self, topic: str, client: str, members: list[str]) -> None:
        await self._script(
            "join",
            [self._key(topic, "pres"), self._key(topic, "pc:" + client)],
            [
                client,
                int(self.presence_ttl * 1000),
                topic,
                self._channel(topic),
                self._publish_cmd,
                *members,
            ],
        )

    def _forget_local(self, topic: str, client: str, member: str) -> None:
        clients = self._local_presence.get(topic)
        if clients is None:
            return
        members = clients.get(client)
        if members is not None:
            members.pop(member, None)
            if not members:
                del clients[client]
        if not clients:
            del self._local_presence[topic]

    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        member = self._member(key)
        async with self._presence_lock(topic, client):
            if member not in self._local_presence.get(topic, {}).get(client, {}):
                return
            self._forget_local(topic, client, member)
            await self._script(
                "leave",
                [self._key(topic, "pres"), self._key(topic, "pc:" + client)],
                [client, member, topic, self._channel(topic), self._publish_cmd],
            )

    async def presence(self, topic: str) -> list[str]:
        clients = await self._script("presence", [self._key(topic, "pres")], [])
        return sorted(_decode(c) for c in clients)

    def presence_members(self) -> int:
        """This process's own entries (the deployment's live in Redis)."""
        return sum(len(clients) for clients in self._local_presence.values())

    async def _presence_loop(self) -> None:
        """Refresh this bus's presence entries and sweep expired ones of watched topics,
        every third of the TTL (and at once after a reconnection)."""
        period = self.presence_ttl / 3
        while True:
            with trio.move_on_after(period):
                await self._presence_kick.wait()
            self._presence_kick = trio.Event()
            if not self._up:
                continue
            pairs = [(t, c) for t, clients in self._local_presence.items() for c in clients]
            await self._each("presence_refresh_failed", self._refresh, pairs)
            await self._each("presence_sweep_failed", self._sweep, [(t,) for t in self._exact])

    async def _each(
        self, failure: str, job: Callable[..., Awaitable[None]], items: list[Any]
    ) -> None:
        """Run ``job(*item)`` for every item, a few at a time; stop at the first failure (Redis
        is down: the next round after reconnection does it all again)."""
        failed: list[str] = []
        limiter = trio.CapacityLimiter(_CONCURRENCY)

        async def one(item: tuple[Any, ...]) -> None:
            async with limiter:
                if failed:
                    return
                try:
                    await job(*item)
                except BusUnavailable as exc:
                    failed.append(str(exc))

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)
        if failed:
            log.info(failure, error=failed[0])

    async def _refresh(self, topic: str, client: str) -> None:
        async with self._presence_lock(topic, client):
            members = list(self._local_presence.get(topic, {}).get(client, {}))
            if members:
                await self._join(topic, client, members)

    async def _sweep(self, topic: str) -> None:
        expired = await self._script("expired", [self._key(topic, "pres")], [])
        for raw in expired:
            client = _decode(raw)
            await self._script(
                "sweep",
                [self._key(topic, "pres"), self._key(topic, "pc:" + client)],
                [client, topic, self._channel(topic), self._publish_cmd],
            )


def _batches(items: list[str], size: int = 256) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
