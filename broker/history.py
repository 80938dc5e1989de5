"""Offsets, epochs, history and presence of topics, held in memory, without I/O.

This is the store behind the in-process bus and the supervisor's hub (the Redis bus keeps the
same state in Redis, with the same rules).

Theory of operation
-------------------
:class:`TopicStore` publishes into and reads from the table of
:class:`~broker.historytable.HistoryTable` (its positions, epochs, budgets and eviction order
are described there): :meth:`TopicStore.publish` assigns the next offset and keeps the
publication as the topic's first matching ``[[history]]`` rule says, then applies the budgets;
reads never create state, and what a reader gets of what is held is
:func:`broker.historyread.select_history`'s to say.

With a journal attached (:class:`~broker.journal.Journal`, implemented by :mod:`broker.store`),
the store hands it every publication it holds as it is kept, tells it of every eviction, of
the topics changed otherwise (a publication not held, a gap closed) and of those forgotten,
and asks it before assigning an offset whether that offset is covered by what is reserved on disk
(:meth:`~broker.journal.Journal.publishing`); :meth:`TopicStore.persisted_states` and
:meth:`TopicStore.restore` are how the journal reads topics' state and brings it back at start.
After a crash a topic may resume past offsets that were never saved: its *gap*
``(first, last)`` names them, until every entry older than the gap has left history; what a
reader is told of it is :func:`broker.historyread.select_history`'s to say.

Presence is a :class:`~broker.presence.PresenceTable` the store inherits (same state, same
methods: ``join``, ``leave``, ``members``...), so that one object serves the buses and the hub.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from itertools import islice

from broker.bus.base import HistoryResult, Publication, StreamPosition
from broker.config import HistoryRule, LimitsConfig
from broker.errors import FrameError
from broker.historyread import select_history
from broker.historytable import TOPIC_OVERHEAD, HistoryTable, TopicHistory, entry_bytes, entry_size
from broker.journal import PersistedState
from broker.presence import PresenceTable

__all__ = ["TopicStore"]


class TopicStore(HistoryTable, PresenceTable):
    """In-memory offsets, history and presence for every topic.

    ``rule_for`` gives the history rule of a topic; ``clock`` gives the current time in
    seconds (monotonic); ``max_bytes`` is the byte budget of all history together;
    ``max_topics`` bounds the topics holding history; ``tombstone_limit`` bounds the positions
    kept for topics that hold none.
    """

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

    def _admit(self, topic: str, rule: HistoryRule, now: float) -> TopicHistory:
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
        t = TopicHistory(topic, offset, epoch, rule, now)
        self._topics[topic] = t
        self.bytes += TOPIC_OVERHEAD
        return t

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Assign the next offset of ``topic`` and keep the publication as its rule says.
        Raises :class:`FrameError` (``too_many_topics``) when a new topic would pass
        ``max_topics``; nothing is published then."""
        now = self._clock()
        t = self._topics.get(topic)
        journal = self.journal
        if journal is not None:
            last = t.offset if t is not None else self._known(topic)[1]
            if not last % journal.block:  # the next offset is the first of a block
                journal.publishing(topic, last + 1)
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
        n = entry_size(data, sender)
        buf = t.buffer
        buf.append((now, pub, n))
        if journal is not None:
            journal.kept.extend((t.name, t.epoch, offset, now, sender, data))
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
        t = TopicHistory(topic, offset, epoch, rule, entries[-1][0], gap=gap)
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
