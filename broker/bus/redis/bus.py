"""The Redis bus itself: publishing, history, watching and delivery, over the parts beside it.

Theory of operation
-------------------
:class:`RedisBus` ties together the key layout and scripts (:mod:`.scripts`, :mod:`.names`),
the connection and its reconnection (:mod:`.connection`), the subscriber connection
(:mod:`.subscriber`) and presence (:mod:`.presence`). Publishing and reading history are one
script each, so they are atomic in Redis.

**Delivery** goes through one task per bus, which takes what the subscriber queued. Per topic
the task remembers the last ``(epoch, offset)`` it delivered: duplicates (an exact and a
wildcard subscription both matching) are dropped, and a gap (messages lost while disconnected,
or a late subscription) is filled from the history stream before the publication that revealed
it, so each worker sees every topic in offset order. A position read from Redis may be ahead of
the subscriber connection; :meth:`RedisBus.position` and :meth:`RedisBus.history` of a watched
topic return only once the publications up to that position were handed to the worker, which
stitches a subscription's replayed history and its live publications at that position. After
a reconnection every topic delivered so far is caught up from history.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

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
from broker.bus.redis.connection import Connection
from broker.bus.redis.names import Names, decode
from broker.bus.redis.presence import Presence
from broker.bus.redis.subscriber import CatchUp, Item, Subscriber
from broker.config import DEFAULT_HISTORY, Config, HistoryRule, node_name
from broker.errors import BusUnavailable
from broker.topics import is_wildcard, pattern_matches

__all__ = ["FILL_PAGE", "HistoryRuleFn", "RedisBus"]

log = structlog.get_logger("broker.bus.redis")

HistoryRuleFn = Callable[[str], "HistoryRule | tuple[int, float]"]
"""Gives a topic's history rule (:class:`broker.config.HistoryRule`, or ``(size, ttl)``): at
most ``size`` publications (0 keeps none), each kept ``ttl`` seconds (0 = no expiry)."""

#: The most publications one read of a gap asks Redis for (see ``RedisBus._fill``).
FILL_PAGE = 256


class RedisBus(Bus):
    """A :class:`~broker.bus.base.Bus` on Redis or Redis Cluster (through coredis).

    ``url`` is ``redis://[:PASSWORD@]HOST:PORT/DB`` or ``rediss://...`` (TLS); with
    ``cluster=True`` it names any one node of a Redis Cluster (the DB must be 0). ``node``
    names this node and worker in connection names and logs. ``history_rule(topic)`` gives the
    topic's :class:`~broker.config.HistoryRule` (or a ``(size, ttl_seconds)`` tuple); a topic's
    position (offset and epoch) is kept ``position_ttl`` seconds after its last publication,
    and at least as long as its history, so that clients coming back learn exactly what they
    lost; reading a topic nobody has published to stores nothing, and announces the epoch its
    first publication will carry (every node must then have the same ``position_ttl``).
    ``presence_ttl`` is how long a presence entry lives without a refresh. ``timeout`` bounds
    every Redis command (publishes fail with ``BusUnavailable`` after it at worst, at
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
        if not 0 < position_ttl < math.inf:
            raise ValueError("position_ttl must be positive and finite")
        self.url = url
        self.node = node
        self.cluster = cluster
        self.presence_ttl = presence_ttl
        self.handlers = handlers or BusHandlers(lambda p: None, lambda e: None)
        self._history_rule = history_rule
        self._max_tracked = max_tracked_topics
        self._position_ttl = position_ttl
        # The window of the epochs that topics without one are announced and created with
        # (see the scripts' "Epochs"): every node of a deployment must use the same one.
        self._epoch_window_ms = max(1, int(position_ttl * 1000))
        self._names = Names(prefix, cluster)
        self._conn = Connection(
            url,
            node=node,
            cluster=cluster,
            timeout=timeout,
            reconnect_max=reconnect_max,
            on_state=lambda up: self.handlers.on_state(up),
        )
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Item](queue_size)
        self._subscriber = Subscriber(
            self._conn,
            self._names,
            self._inbox_send,
            keepalive=max(1.0, min(5.0, presence_ttl / 3)),
            on_up=self._on_up,
        )
        self._presence = Presence(self._conn, self._names, presence_ttl, self._watched_topics)
        self._watches_in_progress: dict[str, trio.Event] = {}
        # Per topic: (epoch, offset) of the last publication delivered ("" = no epoch yet).
        self._last: dict[str, tuple[str, int]] = {}
        # Readers of a position waiting for its delivery: topic -> [(epoch, offset, event)].
        self._waiters: dict[str, list[tuple[str, int, trio.Event]]] = {}

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

    # ---------------------------------------------------------------- state and run

    @property
    def is_up(self) -> bool:
        return self._conn.up

    @property
    def _exact_ps(self) -> Any:
        """The subscriber connection of exact topics (None while disconnected)."""
        return self._subscriber.exact_ps

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_loop)
            nursery.start_soon(self._presence.loop)
            await self._conn.maintain(self._subscriber.serve, task_status)

    async def _on_up(self) -> None:
        """The subscriber connection is (again) subscribed to everything and reading."""
        self._presence.kick()  # refresh our presence entries now
        if self._conn.ever_down:
            # Whatever was published while we were away is in history: fetch it.
            for topic in list(self._last):
                await self._inbox_send.send(CatchUp(topic))

    def _watched_topics(self) -> list[str]:
        return list(self._subscriber.exact)

    def _wanted(self, topic: str) -> bool:
        return self._subscriber.wants(topic)

    # ---------------------------------------------------------------- delivery

    async def _deliver_loop(self) -> None:
        async for item in self._inbox_recv:
            if isinstance(item, Publication):
                await self._deliver(item)
            elif isinstance(item, PresenceEvent):
                if item.topic in self._subscriber.exact:
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
                    self._inbox_send.send_nowait(CatchUp(topic))
                with trio.move_on_after(self._conn.timeout):
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
        with self._conn.ops("hmget") as client:
            epoch, offset = await client.hmget(self._names.key(topic, "meta"), ["e", "o"])
        if epoch is None:
            return None
        return decode(epoch), int(offset or 0)

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
        offset, epoch = await self._conn.script(
            "publish",
            [self._names.key(topic, "meta"), self._names.key(topic, "hist")],
            [
                topic,
                data,
                sender or "",
                "0" if sender is None else "1",
                self._epoch_window_ms,
                size,
                ttl_ms,
                self._names.channel(topic),
                self._names.publish_cmd,
                self._names.wild_channel(topic) if self._names.cluster else "",
                meta_ttl_ms,
                max_bytes,
            ],
        )
        return Publication(topic, int(offset), decode(epoch), sender, data)

    async def _read(
        self, topic: str, since: StreamPosition | None, limit: int | None, newest: bool = False
    ) -> HistoryResult:
        _, ttl_ms, _, _ = self._rule(topic)
        offset, epoch_raw, first, entries = await self._conn.script(
            "history",
            [self._names.key(topic, "meta"), self._names.key(topic, "hist")],
            [
                "" if since is None else since.epoch,
                0 if since is None else max(0, since.offset),
                0 if limit is None else limit,
                self._epoch_window_ms,
                ttl_ms,
                "1" if newest else "0",
            ],
        )
        epoch = decode(epoch_raw)
        offset, first = int(offset), int(first)
        pubs = []
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            sender = values.get(b"s")
            pubs.append(
                Publication(
                    topic,
                    int(decode(entry_id).partition("-")[0]),
                    epoch,
                    None if sender is None else decode(sender),
                    decode(values[b"d"]),
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
            with trio.move_on_after(self._conn.timeout):
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
        subscriber = self._subscriber
        async with subscriber.lock:
            if is_wildcard(pattern):
                await subscriber.add_pattern(pattern)
                return
            if pattern in subscriber.exact:
                return
            # When nothing on this worker receives the topic yet, note where it stands before
            # subscribing: deliveries then continue from there (what came before is no one's
            # here), gaps after it are filled, and position reads can wait for deliveries
            # to catch up with them (see _delivered).
            baseline: tuple[str, int] | None = None
            if not self._wanted(pattern) and self._conn.client is not None:
                with contextlib.suppress(BusUnavailable):
                    baseline = await self._meta(pattern) or ("", 0)
            await subscriber.add_topic(pattern)
            if baseline is not None:
                state = self._last.get(pattern)
                # Keep what live messages (necessarily newer) established meanwhile.
                if state is None or (state[0] == baseline[0] and state[1] < baseline[1]):
                    self._remember(pattern, *baseline)

    async def unwatch(self, pattern: str) -> None:
        subscriber = self._subscriber
        async with subscriber.lock:
            if is_wildcard(pattern):
                if not await subscriber.remove_pattern(pattern):
                    return
                for topic in [t for t in self._last if pattern_matches(pattern, t)]:
                    if not self._wanted(topic):
                        del self._last[topic]
                return
            if not await subscriber.remove_topic(pattern):
                return
            if not self._wanted(pattern):
                self._last.pop(pattern, None)

    # ---------------------------------------------------------------- presence

    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        await self._presence.join(topic, client, key)

    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        await self._presence.leave(topic, client, key)

    async def presence(self, topic: str) -> list[str]:
        return await self._presence.clients(topic)

    def presence_members(self) -> int:
        """This process's own entries (the deployment's live in Redis)."""
        return self._presence.members()
