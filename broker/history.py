"""Offsets, epochs, history and presence of topics, held in memory, without I/O.

This is the store behind the in-process bus and the supervisor's hub (the Redis bus keeps the
same state in Redis, with the same rules).

Theory of operation
-------------------
Each topic has an offset counter, an epoch and a bounded buffer of its latest publications,
sized and aged by the first ``[[history]]`` rule that matches it. A topic with no publication
and no lookup for ``ttl`` seconds is dropped, so a million idle topics do not hold a million
buffers. Its position ``(epoch, offset)`` is kept in a bounded table of tombstones, so that a
topic that comes back continues its epoch and clients learn exactly which offsets are gone;
only when the tombstone too is gone (or the process restarts) does the topic get a new epoch,
which tells clients that their old positions cannot be resumed.

Presence counts connections per client id: :meth:`TopicStore.join` reports a new *member*
only for the first connection of a client id, :meth:`TopicStore.leave` only for the last.
Only topics that track presence are ever joined (the worker decides, see
:class:`~broker.config.PresenceConfig`), so the others hold no presence state here at all.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs

from broker.bus.base import ConnKey, HistoryResult, PresenceEvent, Publication, StreamPosition
from broker.config import HistoryRule

__all__ = ["TopicStore", "new_epoch", "select_history"]

TOMBSTONE_LIMIT = 100_000


def new_epoch() -> str:
    """A fresh, unguessable epoch id."""
    return secrets.token_hex(6)


@attrs.define
class _Topic:
    offset: int
    epoch: str
    rule: HistoryRule
    touched: float
    buffer: deque[tuple[float, Publication]] = attrs.field(factory=deque)


def select_history(
    publications: list[Publication],
    position: StreamPosition,
    since: StreamPosition | None,
    limit: int | None,
) -> HistoryResult:
    """Apply the recovery rules of :class:`~broker.bus.base.HistoryResult` to the publications
    still held for a topic (oldest first, contiguous offsets). Shared by every bus."""
    first = publications[0].offset if publications else position.offset + 1
    recovered = True
    missed: tuple[int, int] | None = None
    selected = publications
    if since is not None:
        if since.epoch != position.epoch:
            recovered = False
            missed = (1, first - 1)
        elif since.offset + 1 < first:
            recovered = False
            missed = (since.offset + 1, first - 1)
        else:
            selected = [p for p in publications if p.offset > since.offset]
    if limit is not None:
        selected = selected[:limit]
    return HistoryResult(tuple(selected), position, recovered, missed)


class TopicStore:
    """In-memory offsets, history and presence for every topic.

    ``rule_for`` gives the history rule of a topic; ``clock`` gives the current time in
    seconds (monotonic); ``tombstone_limit`` bounds the positions kept for dropped topics.
    """

    def __init__(
        self,
        rule_for: Callable[[str], HistoryRule],
        clock: Callable[[], float],
        *,
        tombstone_limit: int = TOMBSTONE_LIMIT,
    ) -> None:
        self.rule_for = rule_for
        self._clock = clock
        # Ordered by last touch: the least recently used topics come first, which is what the
        # sweep pops.
        self._topics: OrderedDict[str, _Topic] = OrderedDict()
        self._tombstones: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tombstone_limit = tombstone_limit
        self._presence: dict[str, dict[str, set[ConnKey]]] = {}
        self.presence_members = 0  # (topic, client id) pairs held, for the metrics

    def __len__(self) -> int:
        return len(self._topics)

    def _topic(self, topic: str) -> _Topic:
        now = self._clock()
        t = self._topics.get(topic)
        if t is None:
            epoch, offset = self._tombstones.pop(topic, (new_epoch(), 0))
            t = _Topic(offset, epoch, self.rule_for(topic), now)
            self._topics[topic] = t
        else:
            self._topics.move_to_end(topic)
            t.touched = now
            self._expire(t, now)
        return t

    @staticmethod
    def _expire(t: _Topic, now: float) -> None:
        horizon = now - t.rule.ttl
        buf = t.buffer
        while buf and buf[0][0] <= horizon:
            buf.popleft()

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Assign the next offset of ``topic`` and keep the publication as its rule says."""
        t = self._topic(topic)
        t.offset += 1
        pub = Publication(topic, t.offset, t.epoch, sender, data)
        if t.rule.size:
            t.buffer.append((t.touched, pub))
            if len(t.buffer) > t.rule.size:
                t.buffer.popleft()
        return pub

    def position(self, topic: str) -> StreamPosition:
        t = self._topic(topic)
        return StreamPosition(t.offset, t.epoch)

    def history(self, topic: str, since: StreamPosition | None, limit: int | None) -> HistoryResult:
        t = self._topic(topic)
        pubs = [p for _, p in t.buffer]
        return select_history(pubs, StreamPosition(t.offset, t.epoch), since, limit)

    def sweep(self) -> int:
        """Drop topics untouched for longer than their ttl; return how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._topics:
            topic, t = next(iter(self._topics.items()))
            if now - t.touched < t.rule.ttl:
                # Topics are ordered by last touch, but rules differ in ttl: stop at the first
                # live one; a long-ttl topic may shield short-ttl ones behind it until it goes.
                break
            del self._topics[topic]
            self._tombstones[topic] = (t.epoch, t.offset)
            if len(self._tombstones) > self._tombstone_limit:
                self._tombstones.popitem(last=False)
            dropped += 1
        return dropped

    # --- presence -------------------------------------------------------------------------

    def join(self, topic: str, client: str, key: ConnKey) -> bool:
        """Record a connection of ``client`` on ``topic``; True if the client is new there."""
        clients = self._presence.setdefault(topic, {})
        keys = clients.setdefault(client, set())
        first = not keys
        keys.add(key)
        self.presence_members += first
        return first

    def leave(self, topic: str, client: str, key: ConnKey) -> bool:
        """Forget a connection; True if it was the client's last one on ``topic``."""
        clients = self._presence.get(topic)
        if not clients or client not in clients:
            return False
        keys = clients[client]
        if key not in keys:
            return False
        keys.discard(key)
        if keys:
            return False
        del clients[client]
        self.presence_members -= 1
        if not clients:
            del self._presence[topic]
        return True

    def leave_worker(self, node: str, worker: int) -> list[PresenceEvent]:
        """Forget every connection of one worker (it died); return the resulting leaves."""
        events = []
        for topic in list(self._presence):
            for client, keys in list(self._presence[topic].items()):
                gone = {k for k in keys if k.node == node and k.worker == worker}
                if gone and self.leave_many(topic, client, gone):
                    events.append(PresenceEvent(topic, "leave", client))
        return events

    def leave_many(self, topic: str, client: str, keys: set[ConnKey]) -> bool:
        last = False
        for key in keys:
            last = self.leave(topic, client, key) or last
        return last

    def members(self, topic: str) -> list[str]:
        return sorted(self._presence.get(topic, {}))
