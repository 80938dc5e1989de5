"""The table of topics holding history in memory: positions, epochs, budgets, eviction order.

This is the state of :class:`~broker.history.TopicStore` and what removes entries from it;
publishing and reading live there. Nothing here does I/O.

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
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from broker.bus.base import Publication
from broker.config import HistoryRule
from broker.journal import Journal

__all__ = [
    "ENTRY_OVERHEAD",
    "EVICTION_REASONS",
    "TOPIC_OVERHEAD",
    "HistoryTable",
    "TopicHistory",
    "entry_bytes",
    "new_epoch",
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

#: Why entries leave history, as counted in :meth:`HistoryTable.stats`: the global byte budget,
#: the topic's ``max_bytes``, its ``ttl``, its ``size``.
EVICTION_REASONS = ("budget", "topic_cap", "ttl", "size")


def new_epoch() -> str:
    """A fresh, unguessable epoch id."""
    return secrets.token_hex(6)


def entry_bytes(pub: Publication) -> int:
    """The bytes one held publication costs: its data and sender strings as Python holds them
    (up to 4 bytes a character) plus :data:`ENTRY_OVERHEAD`."""
    return entry_size(pub.data, pub.sender)


#: What ``sys.getsizeof`` says of an empty str; of an ASCII one, this plus its length.
_EMPTY_STR = sys.getsizeof("")


def entry_size(data: str, sender: str | None) -> int:
    """:func:`entry_bytes` of a publication of ``data`` from ``sender``, before it is made."""
    # sys.getsizeof costs a method lookup and call per string; an ASCII string's size (the
    # usual data and sender) is known from its length (str.isascii reads a flag).
    size = _EMPTY_STR + len(data) if data.isascii() else sys.getsizeof(data)
    if sender is not None:
        size += _EMPTY_STR + len(sender) if sender.isascii() else sys.getsizeof(sender)
    return size + ENTRY_OVERHEAD


@attrs.define
class TopicHistory:
    name: str
    offset: int
    epoch: str
    rule: HistoryRule
    touched: float  # the last publication
    bytes: int = 0
    # (time kept, publication, its bytes as entry_size counts them)
    buffer: deque[tuple[float, Publication, int]] = attrs.field(factory=deque)
    # Offsets lost in a crash between held entries (see the module docstring); None when none.
    gap: tuple[int, int] | None = None


class HistoryTable:
    """Topics holding history, tombstones of those holding none, and the global eviction order.

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
        super().__init__()  # the next class in the store's bases: its presence table
        self.rule_for = rule_for
        self.max_bytes = max_bytes
        self.max_topics = max_topics
        self._clock = clock
        # Ordered by last publication: the least recently published topics come first, which
        # is what the sweep pops.
        self._topics: OrderedDict[str, TopicHistory] = OrderedDict()
        self._tombstones: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tombstone_limit = tombstone_limit
        self._secret = secrets.token_bytes(16)
        self._generations = array("Q", bytes(8 * EPOCH_BUCKETS))
        # Every kept entry in publication order, as (topic, offset) in two deques side by side
        # (a tuple per publication costs an allocation the collector then tracks); see the
        # module docstring.
        self._order: deque[TopicHistory] = deque()
        self._order_offsets: deque[int] = deque()
        self.bytes = 0
        self.entries = 0
        self.evicted = dict.fromkeys(EVICTION_REASONS, 0)
        self.evicted_bytes = dict.fromkeys(EVICTION_REASONS, 0)
        self.topics_refused = 0
        self.journal: Journal | None = None

    def __len__(self) -> int:
        return len(self._topics)

    def known_topics(self) -> list[str]:
        """Every topic with a position: those holding history, then the tombstones."""
        return [*self._topics, *self._tombstones]

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read the time from ``clock`` from now on: the same clock, called more cheaply (the
        store reads it once per publication)."""
        self._clock = clock

    def now(self) -> float:
        """The store's clock (the times :meth:`~broker.history.TopicStore.restore` and
        :meth:`~broker.history.TopicStore.persisted_states` use)."""
        return self._clock()

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
            if self.journal is not None:
                self.journal.forget(forgotten)

    def _drop(self, t: TopicHistory, reason: str) -> None:
        """Move a topic out of the table (evicting what it still holds) into a tombstone."""
        while t.buffer:
            self._evict_first(t, reason)
        del self._topics[t.name]
        self.bytes -= TOPIC_OVERHEAD
        self._bury(t.name, t.epoch, t.offset)

    # --- history --------------------------------------------------------------------------

    def _evict_first(self, t: TopicHistory, reason: str) -> None:
        kept, pub, n = t.buffer.popleft()
        t.bytes -= n
        self.bytes -= n
        self.entries -= 1
        self.evicted[reason] += 1
        self.evicted_bytes[reason] += n
        if t.gap is not None and (not t.buffer or t.buffer[0][1].offset > t.gap[1]):
            t.gap = None  # nothing older than the gap is held: recovery is contiguous again
            if self.journal is not None:
                self.journal.touched(t.name)
        # Only what the journal may not have written yet: with history full, every
        # publication evicts one, and a call each would cost as much as the rest it pays for.
        if self.journal is not None and kept >= self.journal.since:
            self.journal.evicted(t.name, pub.offset, n)

    def _expire(self, t: TopicHistory, now: float) -> None:
        horizon = now - t.rule.ttl
        buf = t.buffer
        while buf and buf[0][0] <= horizon:
            self._evict_first(t, "ttl")

    def _evict_oldest(self) -> None:
        """Evict the oldest entry held anywhere (for the global budget)."""
        order, offsets = self._order, self._order_offsets
        while order:
            t = order.popleft()
            offset = offsets.popleft()
            if t.buffer and t.buffer[0][1].offset == offset:
                self._evict_first(t, "budget")
                if not t.buffer:
                    self._drop(t, "budget")
                return

    def _set_order(self, marks: Iterable[tuple[TopicHistory, int]]) -> None:
        """Make ``marks`` (topic, offset), oldest first, the global order of entries."""
        self._order = deque()
        self._order_offsets = deque()
        for t, offset in marks:
            self._order.append(t)
            self._order_offsets.append(offset)

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
