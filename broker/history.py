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

With a journal attached (:class:`Journal`, implemented by :mod:`broker.store`), the store hands
it every publication it holds as it is kept, tells it of every eviction, of the topics changed
otherwise (a publication not held, a gap closed) and of those forgotten, and asks it before
assigning an offset whether that offset is covered by what is reserved on disk
(:meth:`Journal.publishing`); :meth:`TopicStore.persisted_states` and :meth:`TopicStore.restore`
are how the journal reads topics' state and brings it back at start. After a crash a topic may
resume past offsets that were never saved: its *gap* ``(first, last)`` names them, and
:func:`select_history` reports it as ``missed`` to whoever recovers from before its end
(recovery resumes after it), until every entry older than the gap has left history.

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
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any, Protocol

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
    "Journal",
    "PersistedState",
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
    return _entry_bytes(pub.data, pub.sender)


#: What ``sys.getsizeof`` says of an empty str; of an ASCII one, this plus its length.
_EMPTY_STR = sys.getsizeof("")


def _entry_bytes(data: str, sender: str | None) -> int:
    # sys.getsizeof costs a method lookup and call per string; an ASCII string's size (the
    # usual data and sender) is known from its length (str.isascii reads a flag).
    size = _EMPTY_STR + len(data) if data.isascii() else sys.getsizeof(data)
    if sender is not None:
        size += _EMPTY_STR + len(sender) if sender.isascii() else sys.getsizeof(sender)
    return size + ENTRY_OVERHEAD


class Journal(Protocol):
    """What the store tells the keeper of its copy on disk (:class:`broker.store.DiskJournal`).
    Every method is called on the event loop and must not block."""

    def publishing(self, topic: str, offset: int) -> None:
        """``offset`` of ``topic`` is about to be used. Raise :class:`FrameError`
        (``unavailable``) when it may not be used yet (it is past what the disk has reserved
        for the topic)."""

    def kept(self, when: float, pub: Publication, size: int) -> None:
        """``pub`` is held from ``when`` (the store's clock), ``size`` bytes as
        :func:`entry_bytes` counts them. One call per held publication, while its objects are
        still in the processor's cache."""

    def evicted(self, topic: str, offset: int) -> None:
        """``topic``'s entries up to ``offset`` left history."""

    def touched(self, topic: str) -> None:
        """``topic``'s position or gap changed otherwise than by a held publication: the
        journal reads its state again."""

    def forget(self, topic: str) -> None:
        """``topic`` is forgotten (its tombstone went): its next epoch is a new one."""


#: A topic as the journal writes it (:meth:`TopicStore.persisted_states`): its name, epoch,
#: offset and gap, and its held entries newer than the journal asked for, oldest first, as
#: ``(offset, time kept + shift, sender, data)``. A plain tuple: the journal reads one per
#: changed topic per batch.
PersistedState = tuple[
    str, str, int, tuple[int, int] | None, list[tuple[int, float, str | None, str]]
]


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
    # Offsets lost in a crash between held entries (see the module docstring); None when none.
    gap: tuple[int, int] | None = None


def _held_up_to_gap(
    publications: list[Publication],
    since: StreamPosition,
    position: StreamPosition,
    gap: tuple[int, int],
    newest: bool,
) -> bool:
    """Whether a read of the oldest after ``since`` finds the offsets after it held without a
    hole up to the crash ``gap`` (so it can return them, and stop at the gap)."""
    if newest or since.epoch != position.epoch or since.offset >= gap[0] - 1:
        return False
    after = [p.offset for p in publications if since.offset < p.offset < gap[0]]
    return bool(after) and after[0] == since.offset + 1


def select_history(
    publications: list[Publication],
    position: StreamPosition,
    since: StreamPosition | None,
    limit: int | None,
    *,
    newest: bool = False,
    gap: tuple[int, int] | None = None,
) -> HistoryResult:
    """Apply the recovery rules of :class:`~broker.bus.base.HistoryResult` to the publications
    still held for a topic (oldest first, contiguous offsets but for ``gap``, the offsets a
    crash lost between them): at most ``limit`` of those after ``since``, the oldest ones, or
    the newest ones when ``newest``. Shared by every bus."""
    if gap is not None and since is not None:
        if _held_up_to_gap(publications, since, position, gap, newest):
            # A read from before the gap, with what follows ``since`` held up to it, stops at
            # the gap: nothing it returns is lost. The next read, from the gap's start, is told
            # exactly what the crash lost (below).
            publications = [p for p in publications if p.offset < gap[0]]
        elif since.epoch != position.epoch or since.offset < gap[1]:
            # Recovery never crosses the gap: a client from before its end resumes after it,
            # told that everything from its position to the gap's end is gone (as after an
            # eviction; clients take ``missed`` to end where the replay begins).
            publications = [p for p in publications if p.offset > gap[1]]
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
        # Every kept entry in publication order, as (topic, offset) in two deques side by side
        # (a tuple per publication costs an allocation the collector then tracks); see the
        # module docstring.
        self._order: deque[_Topic] = deque()
        self._order_offsets: deque[int] = deque()
        self.bytes = 0
        self.entries = 0
        self.evicted = dict.fromkeys(EVICTION_REASONS, 0)
        self.evicted_bytes = dict.fromkeys(EVICTION_REASONS, 0)
        self.topics_refused = 0
        self._presence: dict[str, dict[str, set[ConnKey]]] = {}
        self.presence_members = 0  # (topic, client id) pairs held, for the metrics
        self.journal: Journal | None = None

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

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read the time from ``clock`` from now on: the same clock, called more cheaply (the
        store reads it once per publication)."""
        self._clock = clock

    def now(self) -> float:
        """The store's clock (the times :meth:`restore` and :meth:`persisted_states` use)."""
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

    def _drop(self, t: _Topic, reason: str) -> None:
        """Move a topic out of the table (evicting what it still holds) into a tombstone."""
        while t.buffer:
            self._evict_first(t, reason)
        del self._topics[t.name]
        self.bytes -= TOPIC_OVERHEAD
        self._bury(t.name, t.epoch, t.offset)

    # --- history --------------------------------------------------------------------------

    def _evict_first(self, t: _Topic, reason: str) -> None:
        _, pub, n = t.buffer.popleft()
        t.bytes -= n
        self.bytes -= n
        self.entries -= 1
        self.evicted[reason] += 1
        self.evicted_bytes[reason] += n
        if t.gap is not None and (not t.buffer or t.buffer[0][1].offset > t.gap[1]):
            t.gap = None  # nothing older than the gap is held: recovery is contiguous again
            if self.journal is not None:
                self.journal.touched(t.name)
        if self.journal is not None:
            self.journal.evicted(t.name, pub.offset)

    def _expire(self, t: _Topic, now: float) -> None:
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

    def _set_order(self, marks: Iterable[tuple[_Topic, int]]) -> None:
        """Make ``marks`` (topic, offset), oldest first, the global order of entries."""
        self._order = deque()
        self._order_offsets = deque()
        for t, offset in marks:
            self._order.append(t)
            self._order_offsets.append(offset)

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Assign the next offset of ``topic`` and keep the publication as its rule says.
        Raises :class:`FrameError` (``too_many_topics``) when a new topic would pass
        ``max_topics``; nothing is published then."""
        now = self._clock()
        t = self._topics.get(topic)
        journal = self.journal
        if journal is not None:
            journal.publishing(topic, (t.offset if t is not None else self._known(topic)[1]) + 1)
        if t is None:
            rule = self.rule_for(topic)
            if not rule.size:
                # Nothing to hold: the position alone lives on, as a tombstone.
                epoch, offset = self._known(topic)
                self._bury(topic, epoch, offset + 1)
                if journal is not None:
                    journal.touched(topic)
                return Publication(topic, offset + 1, epoch, sender, data)
            t = self._admit(topic, rule, now)
        else:
            self._topics.move_to_end(topic)
            buf = t.buffer
            if buf and buf[0][0] <= now - t.rule.ttl:
                self._expire(t, now)
        t.touched = now
        offset = t.offset = t.offset + 1
        pub = Publication(t.name, offset, t.epoch, sender, data)
        n = _entry_bytes(data, sender)
        buf = t.buffer
        buf.append((now, pub, n))
        if journal is not None:
            journal.kept(now, pub, n)
        t.bytes += n
        self.bytes += n
        self.entries += 1
        self._order.append(t)
        self._order_offsets.append(offset)
        rule = t.rule
        # The bounds, each checked once on the way (a publication rarely passes one).
        if len(buf) > rule.size or t.bytes > rule.max_bytes:
            while len(buf) > rule.size:
                self._evict_first(t, "size")
            while buf and t.bytes > rule.max_bytes:
                self._evict_first(t, "topic_cap")
            if not buf:
                self._drop(t, "topic_cap")
        if self.bytes > self.max_bytes:
            while self.bytes > self.max_bytes and self._order:
                self._evict_oldest()
        if len(self._order) > 2 * self.entries + 1024:
            self._set_order(
                (tt, off)
                for tt, off in zip(self._order, self._order_offsets, strict=True)
                if tt.buffer and off >= tt.buffer[0][1].offset
            )
        return pub

    def _read(self, topic: str) -> tuple[list[Publication], StreamPosition, tuple[int, int] | None]:
        """What ``topic`` holds, its position and gap, without creating anything."""
        t = self._topics.get(topic)
        if t is not None:
            self._expire(t, self._clock())
            pubs = [p for _, p, _ in t.buffer]
            position = StreamPosition(t.offset, t.epoch)
            gap = t.gap
            if not t.buffer:
                self._drop(t, "ttl")
            return pubs, position, gap
        epoch, offset = self._known(topic)
        return [], StreamPosition(offset, epoch), None

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
        pubs, position, gap = self._read(topic)
        return select_history(pubs, position, since, limit, newest=newest, gap=gap)

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

    # --- persistence (see the module docstring) ---------------------------------------------

    def persisted_states(
        self, topics: Iterable[str], written: Mapping[str, int], shift: float
    ) -> list[PersistedState]:
        """``topics`` as the journal saves them, each with its held entries past the offset
        ``written`` names for it (0 when absent), their times moved by ``shift``; the topics
        the store no longer knows are left out. One call per batch, not per topic: the
        journal reads every changed topic on the event loop."""
        table, tombstones = self._topics, self._tombstones
        states: list[PersistedState] = []
        append = states.append
        for topic in topics:
            t = table.get(topic)
            if t is None:
                tomb = tombstones.get(topic)
                if tomb is not None:
                    append((topic, tomb[0], tomb[1], None, []))
                continue
            buf, gap = t.buffer, t.gap
            # The newest entries are contiguous (a gap only ever precedes them): count them.
            after = written.get(topic, 0)
            count = min(len(buf), t.offset - (after if gap is None else max(after, gap[1])))
            if count == 1:  # the common case with many topics: one publication a batch
                when, p, _ = buf[-1]
                new = [(p.offset, when + shift, p.sender, p.data)]
            elif count > 0:
                new = [
                    (p.offset, when + shift, p.sender, p.data)
                    for when, p, _ in islice(reversed(buf), count)
                ]
                new.reverse()
            else:
                new = []
            append((topic, t.epoch, t.offset, gap, new))
        return states

    def first_held(self, topic: str) -> int:
        """The oldest offset ``topic`` holds (its offset + 1 when none; 0 when unknown)."""
        t = self._topics.get(topic)
        if t is not None:
            return t.buffer[0][1].offset if t.buffer else t.offset + 1
        tomb = self._tombstones.get(topic)
        return 0 if tomb is None else tomb[1] + 1

    def restore(
        self,
        topic: str,
        epoch: str,
        offset: int,
        gap: tuple[int, int] | None,
        entries: list[tuple[float, int, str | None, str]],
    ) -> None:
        """Bring back a topic saved on disk: its position, its gap and its entries
        ``(time kept, offset, sender, data)``, oldest first, times on this store's clock.
        What its rule no longer keeps (ttl, size, max_bytes) is left out; call
        :meth:`restored` once every topic is back."""
        rule = self.rule_for(topic)
        horizon = self._clock() - rule.ttl
        entries = [e for e in entries if e[0] > horizon] if rule.size else []
        if not entries:
            self._bury(topic, epoch, offset)
            return
        self._tombstones.pop(topic, None)
        t = _Topic(topic, offset, epoch, rule, entries[-1][0], gap=gap)
        self._topics[topic] = t
        self.bytes += TOPIC_OVERHEAD
        for when, off, sender, data in entries:
            pub = Publication(topic, off, epoch, sender, data)
            n = entry_bytes(pub)
            t.buffer.append((when, pub, n))
            t.bytes += n
            self.bytes += n
            self.entries += 1
        while len(t.buffer) > rule.size:
            self._evict_first(t, "size")
        while t.buffer and t.bytes > rule.max_bytes:
            self._evict_first(t, "topic_cap")
        if not t.buffer:
            self._drop(t, "topic_cap")

    def restored(self) -> None:
        """After :meth:`restore`: order topics and entries by time, as if published in that
        order, and apply the global byte budget and ``max_topics`` (oldest first)."""
        self._topics = OrderedDict(sorted(self._topics.items(), key=lambda kv: kv[1].touched))
        order = sorted(
            (
                (when, t.name, pub.offset, t)
                for t in self._topics.values()
                for when, pub, _ in t.buffer
            ),
            key=lambda e: e[:3],
        )
        self._set_order((t, off) for _, _, off, t in order)
        while len(self._topics) > self.max_topics:
            self._drop(next(iter(self._topics.values())), "budget")
        while self.bytes > self.max_bytes and self._order:
            self._evict_oldest()

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
