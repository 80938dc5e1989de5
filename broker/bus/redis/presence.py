"""Presence on the Redis bus: this node's entries, their refresh, and the sweep of dead ones.

Theory of operation
-------------------
Only topics that ``[presence] topics`` tracks are joined (the worker decides), so only they
get presence keys (see :mod:`broker.bus.redis.scripts`). Each connection's entry expires
``presence_ttl`` seconds after its last refresh; every bus refreshes its own entries every
``presence_ttl / 3``, and at once after a reconnection (:meth:`Presence.kick`). The scripts
emit ``join`` when a client's first live entry appears and ``leave`` when its last goes, on
the topic's channel. A node that dies leaves entries that simply expire: every bus
periodically sweeps the topics it watches, and the sweep script (atomic, so only one node
announces it) removes the expired client and publishes its ``leave``.
:meth:`Presence.clients` counts only unexpired entries, so it is right even between sweeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import structlog
import trio

from broker.bus.base import ConnKey
from broker.bus.redis.connection import Connection
from broker.bus.redis.names import Names, decode
from broker.errors import BusUnavailable

__all__ = ["Presence"]

log = structlog.get_logger("broker.bus.redis")

# How many presence refreshes run at once (coredis pipelines them on its connections).
_CONCURRENCY = 32


class Presence:
    """This bus's presence entries in Redis, over ``conn``; ``ttl`` is how long an entry lives
    without a refresh, and ``watched()`` the topics whose expired entries are swept."""

    def __init__(
        self, conn: Connection, names: Names, ttl: float, watched: Callable[[], Iterable[str]]
    ) -> None:
        self._conn = conn
        self._names = names
        self.ttl = ttl
        self._watched = watched
        # This bus's own presence entries: topic -> client -> connection members.
        self._local: dict[str, dict[str, dict[str, None]]] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._kick = trio.Event()

    def kick(self) -> None:
        """Refresh and sweep now (after a reconnection), not at the end of the period."""
        self._kick.set()

    @contextlib.asynccontextmanager
    async def _lock(self, topic: str, client: str) -> AsyncIterator[None]:
        """Serialize this bus's joins, leaves and refreshes of one client on one topic, so
        that a refresh sent before a leave never lands after it (which would leave a ghost
        until the entry expires)."""
        key = (topic, client)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)

    async def join(self, topic: str, client: str, key: ConnKey) -> None:
        """Enter ``key``'s entry; raises :class:`~broker.errors.BusUnavailable` (and keeps
        no entry) when Redis is unavailable."""
        member = self._names.member(key)
        async with self._lock(topic, client):
            members = self._local.setdefault(topic, {}).setdefault(client, {})
            members[member] = None
            try:
                await self._join(topic, client, [member])
            except BusUnavailable:
                self._forget_local(topic, client, member)
                raise

    async def _join(self, topic: str, client: str, members: list[str]) -> None:
        names = self._names
        await self._conn.script(
            "join",
            [names.key(topic, "pres"), names.key(topic, "pc:" + client)],
            [
                client,
                int(self.ttl * 1000),
                topic,
                names.channel(topic),
                names.publish_cmd,
                *members,
            ],
        )

    def _forget_local(self, topic: str, client: str, member: str) -> None:
        clients = self._local.get(topic)
        if clients is None:
            return
        members = clients.get(client)
        if members is not None:
            members.pop(member, None)
            if not members:
                del clients[client]
        if not clients:
            del self._local[topic]

    async def leave(self, topic: str, client: str, key: ConnKey) -> None:
        """Remove ``key``'s entry (nothing when this bus holds none)."""
        member = self._names.member(key)
        names = self._names
        async with self._lock(topic, client):
            if member not in self._local.get(topic, {}).get(client, {}):
                return
            self._forget_local(topic, client, member)
            await self._conn.script(
                "leave",
                [names.key(topic, "pres"), names.key(topic, "pc:" + client)],
                [client, member, topic, names.channel(topic), names.publish_cmd],
            )

    async def clients(self, topic: str) -> list[str]:
        """The clients with a live entry in ``topic``, sorted."""
        clients = await self._conn.script("presence", [self._names.key(topic, "pres")], [])
        return sorted(decode(c) for c in clients)

    def members(self) -> int:
        """This process's own entries (the deployment's live in Redis)."""
        return sum(len(clients) for clients in self._local.values())

    async def loop(self) -> None:
        """Refresh this bus's presence entries and sweep expired ones of watched topics,
        every third of the TTL (and at once after a reconnection)."""
        period = self.ttl / 3
        while True:
            with trio.move_on_after(period):
                await self._kick.wait()
            self._kick = trio.Event()
            if not self._conn.up:
                continue
            pairs = [(t, c) for t, clients in self._local.items() for c in clients]
            await self._each("presence_refresh_failed", self._refresh, pairs)
            await self._each("presence_sweep_failed", self._sweep, [(t,) for t in self._watched()])

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
        async with self._lock(topic, client):
            members = list(self._local.get(topic, {}).get(client, {}))
            if members:
                await self._join(topic, client, members)

    async def _sweep(self, topic: str) -> None:
        names = self._names
        expired = await self._conn.script("expired", [names.key(topic, "pres")], [])
        for raw in expired:
            client = decode(raw)
            await self._conn.script(
                "sweep",
                [names.key(topic, "pres"), names.key(topic, "pc:" + client)],
                [client, topic, names.channel(topic), names.publish_cmd],
            )
