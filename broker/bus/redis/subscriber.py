"""The Redis bus's subscriber: what this node subscribes to, and the listener that receives it.

Theory of operation
-------------------
The subscriptions the worker wants (exact topics and wildcard patterns; see
:mod:`broker.bus.redis.names` for how they are spelled in Redis) are kept across
reconnections. Each connected period, :meth:`Subscriber.serve` subscribes to all of them again
(under the lock that orders subscription changes), reports the bus up, and reads: one reader
per pub/sub connection (two in a cluster, sharded for exact topics and plain for patterns).
Received messages are parsed and queued for delivery in a bounded queue: when the node cannot
keep up, the session ends (:class:`~broker.bus.redis.connection.Reconnect`), and the bus
reconnects and catches up from history instead of buffering without limit.

A (un)subscription that fails while connected leaves the subscriber connection in doubt: the
session is ended, so the reconnection subscribes to exactly what is wanted. Redis Cluster
drops shard subscriptions whose slot moved; the unsubscribe notice is read, and a dropped
subscription that is still wanted is renewed, then caught up from history.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import structlog
import trio

from broker.bus.base import PresenceEvent, Publication
from broker.bus.redis.connection import Connection, Reconnect, leaf, redis_failures
from broker.bus.redis.names import Names, decode, parse_message
from broker.topics import SubscriptionIndex, is_wildcard

__all__ = ["CatchUp", "Item", "Subscriber"]

log = structlog.get_logger("broker.bus.redis")

_UNSUBSCRIBED = frozenset({"unsubscribe", "punsubscribe", "sunsubscribe"})


@attrs.frozen
class CatchUp:
    """Deliver what ``topic``'s history holds past what was delivered."""

    topic: str


#: What the delivery queue holds.
Item = Publication | PresenceEvent | CatchUp


def _batches(items: list[str], size: int = 256) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Subscriber:
    """Subscribes to what is wanted over ``conn`` and queues what arrives on ``inbox``.

    ``on_up()`` runs once each session has subscribed everything and started reading;
    ``keepalive`` is how long a pub/sub connection may stay quiet before it is PINGed.
    """

    def __init__(
        self,
        conn: Connection,
        names: Names,
        inbox: trio.MemorySendChannel[Item],
        *,
        keepalive: float,
        on_up: Callable[[], Awaitable[None]],
    ) -> None:
        self._conn = conn
        self._names = names
        self._inbox = inbox
        self._keepalive = keepalive
        self._on_up = on_up
        # What the worker wants to receive, kept across reconnections.
        self.exact: dict[str, None] = {}
        self._wild: SubscriptionIndex[str] = SubscriptionIndex()
        self._wild_patterns: dict[str, None] = {}
        # The live subscriber objects (None while disconnected) and the lock that orders
        # subscription changes against (re)subscribing.
        self.exact_ps: Any = None
        self.wild_ps: Any = None
        self.lock = trio.Lock()
        self._reset_session = trio.Event()

    def wants(self, topic: str) -> bool:
        """Whether an exact subscription or a wildcard pattern covers ``topic``."""
        if topic in self.exact:
            return True
        if not self._wild.has_wildcards:
            return False
        return next(iter(self._wild.match(topic)), None) is not None

    # ---------------------------------------------------------------- changes (under lock)

    async def add_pattern(self, pattern: str) -> None:
        """Subscribe to wildcard ``pattern`` (once); hold :attr:`lock`."""
        if pattern in self._wild_patterns:
            return
        self._wild_patterns[pattern] = None
        self._wild.add(pattern, pattern)
        ps = self.wild_ps
        if ps is not None:
            with self._resubscribe_on_failure("psubscribe"):
                await ps.psubscribe(self._names.glob(pattern))

    async def add_topic(self, topic: str) -> None:
        """Subscribe to exact ``topic`` (not yet subscribed); hold :attr:`lock`."""
        self.exact[topic] = None
        ps = self.exact_ps
        if ps is not None:
            with self._resubscribe_on_failure("subscribe"):
                await ps.subscribe(self._names.channel(topic))

    async def remove_pattern(self, pattern: str) -> bool:
        """Unsubscribe from wildcard ``pattern``; False when it was not subscribed. Hold
        :attr:`lock`."""
        if self._wild_patterns.pop(pattern, 0) == 0:
            return False
        self._wild.remove(pattern, pattern)
        ps = self.wild_ps
        if ps is not None:
            with self._resubscribe_on_failure("punsubscribe"):
                await ps.punsubscribe(self._names.glob(pattern))
        return True

    async def remove_topic(self, topic: str) -> bool:
        """Unsubscribe from exact ``topic``; False when it was not subscribed. Hold
        :attr:`lock`."""
        if self.exact.pop(topic, 0) == 0:
            return False
        ps = self.exact_ps
        if ps is not None:
            with self._resubscribe_on_failure("unsubscribe"):
                await ps.unsubscribe(self._names.channel(topic))
        return True

    @contextlib.contextmanager
    def _resubscribe_on_failure(self, what: str) -> Iterator[None]:
        """A (un)subscription that fails while connected leaves the subscriber connection in
        doubt: close it, so the reconnection subscribes to exactly what is wanted."""
        try:
            with trio.fail_after(self._conn.timeout):
                yield
        except* redis_failures() as group:
            log.warning("bus_subscription_failed", op=what, error=repr(leaf(group)))
            self.exact_ps = self.wild_ps = None
            self._reset_session.set()

    # ---------------------------------------------------------------- a session

    async def serve(self, client: Any) -> None:
        """One connected period: subscribe everything, report up, then read until it breaks."""
        try:
            if self._conn.cluster:
                async with (
                    client.sharded_pubsub(**self._pubsub_options()) as exact_ps,
                    client.pubsub(**self._pubsub_options()) as wild_ps,
                ):
                    await self._serve(exact_ps, wild_ps)
            else:
                async with client.pubsub(**self._pubsub_options()) as ps:
                    await self._serve(ps, ps)
        finally:
            self.exact_ps = self.wild_ps = None

    def _pubsub_options(self) -> dict[str, Any]:
        from coredis.retry import NoRetryPolicy

        return {
            "retry_policy": NoRetryPolicy(),
            # Unsubscribe notices are read: Redis Cluster drops shard subscriptions whose
            # slot moved, and a dropped subscription that is still wanted must be renewed.
            "ignore_subscribe_messages": False,
            "subscription_timeout": self._conn.timeout,
            # A PING when the connection has been quiet this long, so that a silently dead
            # connection is noticed.
            "max_idle_seconds": self._keepalive,
        }

    async def _serve(self, exact_ps: Any, wild_ps: Any) -> None:
        async with self.lock:
            with trio.fail_after(self._conn.timeout * 10):
                for batch in _batches([self._names.channel(t) for t in self.exact]):
                    await exact_ps.subscribe(*batch)
                for batch in _batches([self._names.glob(p) for p in self._wild_patterns]):
                    await wild_ps.psubscribe(*batch)
            self.exact_ps, self.wild_ps = exact_ps, wild_ps
        self._reset_session = trio.Event()
        self._conn.announce_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_reset)
            nursery.start_soon(self._reader, exact_ps, False, nursery)
            if wild_ps is not exact_ps:
                nursery.start_soon(self._reader, wild_ps, True, nursery)
            await self._on_up()

    def _check_unsubscribed(self, kind: str, name: str, nursery: trio.Nursery) -> None:
        """The server says a subscription ended. Ours end that way when we unwatch; one that
        is still wanted was dropped by the server (a cluster slot moved): renew it."""
        if kind == "punsubscribe":
            wanted = [p for p in self._wild_patterns if self._names.glob(p) == name]
        else:
            topic = self._names.channel_topic(name)
            wanted = [topic] if topic is not None and topic in self.exact else []
        for pattern in wanted:
            log.warning("bus_subscription_dropped", channel=name)
            nursery.start_soon(self._renew, pattern)

    async def _renew(self, pattern: str) -> None:
        async with self.lock:
            wildcard = is_wildcard(pattern)
            if pattern not in (self._wild_patterns if wildcard else self.exact):
                return  # unwatched meanwhile
            ps = self.wild_ps if wildcard else self.exact_ps
            if ps is None:
                return  # the session is over; the next one subscribes everything
            with self._resubscribe_on_failure("resubscribe"):
                if wildcard:
                    await ps.psubscribe(self._names.glob(pattern))
                else:
                    client = self._conn.client
                    if self._conn.cluster and client is not None:
                        # The slot moved: learn where to before subscribing there.
                        await client.connection_pool.cluster_layout.initialize()
                    try:
                        await ps.subscribe(self._names.channel(pattern))
                    except KeyError:  # a master this subscriber has no connection to
                        self._reset_session.set()
                        return
        if not wildcard:
            # What was published while it was dropped is in history.
            await self._inbox.send(CatchUp(pattern))

    async def _watch_reset(self) -> None:
        await self._reset_session.wait()
        raise Reconnect("a subscription change failed")

    async def _reader(self, ps: Any, wildcard_only: bool, nursery: trio.Nursery) -> None:
        while True:
            msg = await ps.get_message()
            if msg is None:
                continue
            kind = msg["type"]
            if kind in _UNSUBSCRIBED:
                self._check_unsubscribed(kind, decode(msg["channel"]), nursery)
                continue
            if kind not in ("message", "pmessage", "smessage"):
                continue
            item = parse_message(msg["data"])
            if item is None or (isinstance(item, PresenceEvent) and msg["type"] == "pmessage"):
                # Presence events are for exact subscriptions: a pattern's copy is a duplicate.
                continue
            if wildcard_only and item.topic in self.exact:
                # In a cluster the exact subscription delivers it in order; this copy would
                # only arrive out of order with it.
                continue
            try:
                self._inbox.send_nowait(item)
            except trio.WouldBlock:
                raise Reconnect("overloaded: the delivery queue was full") from None
