"""Offsets, epochs, history and presence of topics, held in memory, without I/O.

This is the store behind the in-process bus and the supervisor's hub (the Redis bus keeps the
same state in Redis, with the same rules).

Theory of operation
-------------------
Each topic has an offset counter, an epoch and a bounded buffer of its latest publications,
sized and aged by the first ``[[history]]`` rule that matches it. Only topics that hold history
live in the topic table; a topic whose last held publication goes (aged out, pushed out, or
never kept because its rule keeps none) leaves its position ``(epoch, offset)`` in a bounded
table of tombstones, so that a topic that comes back continues its epoch and clients learn
exactly which offsets are gone. Only when the tombstone too is gone (or the process restarts)
does the topic get a new epoch, which tells clients that their old positions cannot be resumed.

Reads never create state: the position of a topic the store does not know is offset 0 and
the epoch its first publication will carry, derived from the topic, a per-process secret and a
generation that moves on whenever a tombstone is forgotten (so a forgotten topic never gets an
epoch it had before, and a restart changes every epoch). Generations are kept per bucket of
topics (:data:`EPOCH_BUCKETS`), so forgetting one topic rarely changes the epoch announced for
another one that nobody has published to yet.

Memory is bounded three ways, oldest first: per topic by ``size`` publications and
``max_bytes`` bytes, and over every topic by a global byte budget (``history_max_bytes``). An
entry's bytes are what it holds: its data and sender strings plus :data:`ENTRY_OVERHEAD` for the
objects around them (the topic and epoch strings are shared by every entry of a topic); each
topic holding history adds :data:`TOPIC_OVERHEAD` to the global count. A
global first-in-first-out queue of ``(topic, offset)`` names the oldest entry anywhere; entries
that left their topic earlier stay in it as stale marks, skipped when reached and compacted
away when they outnumber the live ones. Eviction always takes a topic's oldest entries, so what
is held stays contiguous and a recovering client is told exactly which offsets are gone. The
number of topics holding history is capped too (``max_topics``): a publication that would add
one more fails with ``too_many_topics``.

Presence counts connections per client id: :meth:`TopicStore.join` reports a new *member*
only for the first connection of a client id, :meth:`TopicStore.leave` only for the last.
Only topics that track presence are ever joined (the worker decides, see
:class:`~broker.config.PresenceConfig`), so the others hold no presence state here at all.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs

from broker.bus.base import (
    ConnKey,
    HistoryResult,
    PresenceEvent,
    Publication,
    StreamPosition,
    recovery,
)
from broker.config import HistoryRule, LimitsConfig
from broker.errors import FrameError

__all__ = [
    "ENTRY_OVERHEAD",
    "EVICTION_REASONS",
    "TOPIC_OVERHEAD",
    "TopicStore",
    "entry_bytes",
    "new_epoch",
    "select_history",
]

TOMBSTONE_LIMIT = 100_000
EPOCH_BUCKETS = 4096
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_TOPICS = 100_000

#: Bytes counted per held entry besides its strings: the Publication, its (time, publication)
#: tuple, the float and int objects, and the slots in the topic's and the global queues
#: (measured on CPython 3.11: about 300).
ENTRY_OVERHEAD = 300

#: Bytes counted per topic holding history: its table entry, its state and its queue's first
#: block (measured on CPython 3.11: about 900). Topics without history cost a tombstone (about
#: 200 bytes, at most ``tombstone_limit`` of them), not counted.
TOPIC_OVERHEAD = 900

#: Why entries leave history, as counted in :meth:`TopicStore.stats`: the global byte budget,
#: the topic's ``max_bytes``, its ``ttl``, its ``size``.
EVICTION_REASONS = ("budget", "topic_cap", "ttl", "size")


def new_epoch() -> str:
    """A fresh, unguessable epoch id."""
    return secrets.token_hex(6)


def entry_bytes(pub: Publication) -> int:
    """The bytes one held publication costs: its data and sender strings as Python holds them
    (up to 4 bytes a character) plus :data:`ENTRY_OVERHEAD`."""
    sender = 0 if pub.sender is None else sys.getsizeof(pub.sender)
    return sys.getsizeof(pub.data) + sender + ENTRY_OVERHEAD


@attrs.define
class _Topic:
    name: str
    offset: int
    epoch: str
    rule: HistoryRule
    touched: float  # the last publication
    bytes: int = 0
    # (time kept, publication, its bytes as entry_bytes counts them)
    buffer: deque[tuple[float, Publication, int]] = attrs.field(factory=deque)


def select_history(
    publications: list[Publication],
    position: StreamPosition,
    since: StreamPosition | None,
    limit: int | None,
    *,
    newest: bool = False,
) -> HistoryResult:
    """Apply the recovery rules of :class:`~broker.bus.base.HistoryResult` to the publications
    still held for a topic (oldest first, contiguous offsets): at most ``limit`` of those
    after ``since``, the oldest ones, or the newest ones when ``newest``. Shared by every
    bus."""
    first = publications[0].offset if publications else position.offset + 1
    recovered, missed = recovery(position, first, since, limit if newest else None)
    selected = publications
    if since is not None and since.epoch == position.epoch:
        selected = [p for p in publications if p.offset > since.offset]
    if limit is not None:
        # Not selected[-limit:], which selects everything when the limit is 0.
        selected = selected[max(0, len(selected) - limit) :] if newest else selected[:limit]
    return HistoryResult(tuple(selected), position, recovered, missed)


class TopicStore:
    """In-memory offsets, history and presence for every topic.

    ``rule_for`` gives the history rule of a topic; ``clock`` gives the current time in
    seconds (monotonic); ``max_bytes`` is the byte budget of all history together;
    ``max_topics`` bounds the topics holding history; ``tombstone_limit`` bounds the positions
    kept for topics that hold none.
    """

    def __init__(
        self,
        rule_for: Callable[[str], HistoryRule],
        clock: Callable[[], float],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_topics: int = DEFAULT_MAX_TOPICS,
        tombstone_limit: int = TOMBSTONE_LIMIT,
    ) -> None:
        self.rule_for = rule_for
        self.max_bytes = max_bytes
        self.max_topics = max_topics
        self._clock = clock
        # Ordered by last publication: the least recently published topics come first, which
        # is what the sweep pops.
        self._topics: OrderedDict[str, _Topic] = OrderedDict()
        self._tombstones: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tombstone_limit = tombstone_limit
        self._secret = secrets.token_bytes(16)
        self._generations = array("Q", bytes(8 * EPOCH_BUCKETS))
        # Every kept entry in publication order, as (topic, offset); see the module docstring.
        self._order: deque[tuple[_Topic, int]] = deque()
        self.bytes = 0
        self.entries = 0
        self.evicted = dict.fromkeys(EVICTION_REASONS, 0)
        self.evicted_bytes = dict.fromkeys(EVICTION_REASONS, 0)
        self.topics_refused = 0
        self._presence: dict[str, dict[str, set[ConnKey]]] = {}
        self.presence_members = 0  # (topic, client id) pairs held, for the metrics

    @classmethod
    def bounded(
        cls,
        rule_for: Callable[[str], HistoryRule],
        clock: Callable[[], float],
        limits: LimitsConfig,
    ) -> TopicStore:
        """A store with the budgets of ``[limits]`` (``history_max_bytes``, ``max_topics``)."""
        return cls(
            rule_for, clock, max_bytes=limits.history_max_bytes, max_topics=limits.max_topics
        )

    def __len__(self) -> int:
        return len(self._topics)

    def stats(self) -> dict[str, Any]:
        """Plain figures for the metrics: bytes held (entries and topics), entries, topics
        holding history, tombstones, evictions and evicted bytes by reason, refused topics."""
        return {
            "history_bytes": self.bytes,
            "history_entries": self.entries,
            "history_topics": len(self._topics),
            "history_tombstones": len(self._tombstones),
            "history_evicted": dict(self.evicted),
            "history_evicted_bytes": dict(self.evicted_bytes),
            "topics_refused": self.topics_refused,
        }

    # --- positions ------------------------------------------------------------------------

    def _fresh_epoch(self, topic: str) -> str:
        """The epoch an unknown topic's first publication will carry (see the docstring)."""
        h = hashlib.blake2b(digest_size=6, key=self._secret)
        h.update(self._generations[hash(topic) % EPOCH_BUCKETS].to_bytes(8, "big"))
        h.update(topic.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def _known(self, topic: str) -> tuple[str, int]:
        """``(epoch, offset)`` of a topic that holds no history; creates nothing."""
        return self._tombstones.get(topic) or (self._fresh_epoch(topic), 0)

    def _bury(self, topic: str, epoch: str, offset: int) -> None:
        self._tombstones[topic] = (epoch, offset)
        self._tombstones.move_to_end(topic)
        if len(self._tombstones) > self._tombstone_limit:
            forgotten, _ = self._tombstones.popitem(last=False)
            self._generations[hash(forgotten) % EPOCH_BUCKETS] += 1

    def _drop(self, t: _Topic, reason: str) -> None:
        """Move a topic out of the table (evicting what it still holds) into a tombstone."""
        while t.buffer:
            self._evict_first(t, reason)
        del self._topics[t.name]
        self.bytes -= TOPIC_OVERHEAD
        self._bury(t.name, t.epoch, t.offset)

    # --- history --------------------------------------------------------------------------

    def _evict_first(self, t: _Topic, reason: str) -> None:
        n = t.buffer.popleft()[2]
        t.bytes -= n
        self.bytes -= n
        self.entries -= 1
        self.evicted[reason] += 1
        self.evicted_bytes[reason] += n

    def _expire(self, t: _Topic, now: float) -> None:
        horizon = now - t.rule.ttl
        buf = t.buffer
        while buf and buf[0][0] <= horizon:
            self._evict_first(t, "ttl")

    def _evict_oldest(self) -> None:
        """Evict the oldest entry held anywhere (for the global budget)."""
        while self._order:
            t, offset = self._order.popleft()
            if t.buffer and t.buffer[0][1].offset == offset:
                self._evict_first(t, "budget")
                if not t.buffer:
                    self._drop(t, "budget")
                return

    def _admit(self, topic: str, rule: HistoryRule, now: float) -> _Topic:
        """A new entry in the table for ``topic``. Raises :class:`FrameError`
        (``too_many_topics``) when the table is full even after dropping expired topics."""
        if len(self._topics) >= self.max_topics:
            self.sweep()
            if len(self._topics) >= self.max_topics:
                self.topics_refused += 1
                raise FrameError(
                    "too_many_topics",
                    f"the broker holds history for {self.max_topics} topics, its limit; "
                    "try again later",
                )
        epoch, offset = self._known(topic)
        self._tombstones.pop(topic, None)
        t = _Topic(topic, offset, epoch, rule, now)
        self._topics[topic] = t
        self.bytes += TOPIC_OVERHEAD
        return t

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Assign the next offset of ``topic`` and keep the publication as its rule says.
        Raises :class:`FrameError` (``too_many_topics``) when a new topic would pass
        ``max_topics``; nothing is published then."""
        now = self._clock()
        t = self._topics.get(topic)
        if t is None:
            rule = self.rule_for(topic)
            if not rule.size:
                # Nothing to hold: the position alone lives on, as a tombstone.
                epoch, offset = self._known(topic)
                self._bury(topic, epoch, offset + 1)
                return Publication(topic, offset + 1, epoch, sender, data)
            t = self._admit(topic, rule, now)
        else:
            self._topics.move_to_end(topic)
            if t.buffer and t.buffer[0][0] <= now - t.rule.ttl:
                self._expire(t, now)
        t.touched = now
        t.offset += 1
        pub = Publication(t.name, t.offset, t.epoch, sender, data)
        n = entry_bytes(pub)
        buf = t.buffer
        buf.append((now, pub, n))
        t.bytes += n
        self.bytes += n
        self.entries += 1
        self._order.append((t, t.offset))
        rule = t.rule
        while len(buf) > rule.size:
            self._evict_first(t, "size")
        while buf and t.bytes > rule.max_bytes:
            self._evict_first(t, "topic_cap")
        if not buf:
            self._drop(t, "topic_cap")
        while self.bytes > self.max_bytes and self._order:
            self._evict_oldest()
        if len(self._order) > 2 * self.entries + 1024:
            self._order = deque(
                (tt, off) for tt, off in self._order if tt.buffer and off >= tt.buffer[0][1].offset
            )
        return pub

    def _read(self, topic: str) -> tuple[list[Publication], StreamPosition]:
        """What ``topic`` holds and its position, without creating anything."""
        t = self._topics.get(topic)
        if t is not None:
            self._expire(t, self._clock())
            pubs = [p for _, p, _ in t.buffer]
            position = StreamPosition(t.offset, t.epoch)
            if not t.buffer:
                self._drop(t, "ttl")
            return pubs, position
        epoch, offset = self._known(topic)
        return [], StreamPosition(offset, epoch)

    def position(self, topic: str) -> StreamPosition:
        """The topic's latest position; creates no state for an unknown topic."""
        t = self._topics.get(topic)
        if t is not None:
            return StreamPosition(t.offset, t.epoch)
        epoch, offset = self._known(topic)
        return StreamPosition(offset, epoch)

    def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        """What ``topic`` still holds after ``since`` (see :func:`select_history`)."""
        pubs, position = self._read(topic)
        return select_history(pubs, position, since, limit, newest=newest)

    def sweep(self) -> int:
        """Drop topics not published to for longer than their ttl (everything they held has
        aged out); return how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._topics:
            t = next(iter(self._topics.values()))
            if now - t.touched < t.rule.ttl:
                # Topics are ordered by last publication, but rules differ in ttl: stop at the
                # first live one; a long-ttl topic may shield short-ttl ones behind it until it
                # goes (their bytes still count against the budget meanwhile).
                break
            self._drop(t, "ttl")
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
