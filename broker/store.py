"""History on disk: the offsets, epochs and history of a :class:`~broker.history.TopicStore`
kept in an SQLite file, so that a restart keeps every topic's epoch and history.

Theory of operation
-------------------
The event loop never waits for the disk. The store appends the fields of every publication
it keeps to :attr:`DiskJournal.kept` (one list extend, nothing else on the way of a
publication: the list is the next chunk's fields as they are, see :mod:`broker.storefile`)
and tells the journal of every eviction (:meth:`evicted`) and of topics changed otherwise
(:meth:`touched`: a publication not kept, a gap closed; and every topic at a start). Every
``flush_interval`` its flusher task makes a :class:`Batch` and a worker thread commits it in
one transaction (:class:`Database`; WAL mode).

The file is a *journal* in publication order: a batch appends **one chunk** holding every
entry kept since the last one, whatever its topic, its ``(topic, epoch, offset, time, sender,
data)`` marshalled together (one flat list of fields: :mod:`broker.storefile`). Building it is
marshalling the list the store extended as it kept them, in that order (no grouping by topic,
nothing done per publication), and the writer thread inserts one row however many topics
changed: with many topics a publication costs the store about the same as with one. (One chunk
per changed topic and batch, the previous layout, cost a row insert and a marshalled chunk per
topic, which with 10,000 topics was most of the store's cost.) Topics changed otherwise than by
a kept publication are read from history instead (:meth:`TopicStore.persisted_states`), and
what they add may repeat entries already written: a start reads a topic's entries from every
chunk, keeps those of its row's epoch, orders them by offset and drops repeats.

A topic's *row* (epoch, position, offset reservation, gap) is written only when it is new,
its epoch or gap changes, or half of its reservation has been used, and at a graceful stop:
rows are few per batch.

**Compaction** keeps the file bounded. Chunks are deleted oldest first; once the journal holds
more than twice the entries history holds plus :data:`COMPACT_SLACK`, a flush reads the oldest
chunks back until it holds twice what history holds (at most :data:`COMPACT_ENTRIES` entries a
flush, in the thread), keeps for the next chunk the entries history still holds (same epoch,
not older than the topic's oldest held offset) and deletes the chunks in the same transaction
that writes them again, so nothing held is ever missing from the file. Each entry is so read
about once per turn of the journal and copied at most once, and the file holds at most about
twice what memory holds (plus the slack and what a batch adds). A start that finds more than
twice what it loads rewrites it at once. What the file holds beyond memory are real
publications: a start applies the rules (ttl, size, bytes) to them again.

What waits for the disk is bounded: the publications kept for the next batch are the ones
history holds (the list holds their fields, not a copy), but for those history evicted
meanwhile; past :data:`PENDING_MAX_BYTES` of those, their topics are read from history
instead, so what is queued is then their names only. A publication evicted before its batch
is not written.

Crash safety rests on two things written with every batch:

- **An offset reservation per topic.** A topic's row carries ``reserved``, a mark past its
  offset (:data:`RESERVE_MIN` or four batches' worth of its publications, whichever is more),
  a multiple of the *block* (a tenth of :data:`RESERVE_MIN`). An offset past the mark the disk
  holds is refused (``unavailable``) until a batch moves it: so every offset the broker ever
  used is at most its topic's reserved mark on disk. Offsets grow by one, so the first offset
  past a mark is the first of a block: :meth:`DiskJournal.publishing` looks a topic's row up
  only there (once per block, not per publication: with many topics the look-up is a walk
  over cold memory), and notes there the topics past half their reservation or without a
  row. A topic without a row yet gets a new epoch after a crash (epochs of unsaved topics
  come from a per-process secret), so its offsets need no reservation; its row is written
  with its first entries, in the same transaction.
- **A clean-stop marker.** A graceful stop writes everything and marks the file clean; the
  first batch of every start marks it not clean. After an unclean stop each topic resumes at
  its reserved mark, and the offsets between its last saved one and the mark become its
  *gap*, reported as ``missed`` to any client recovering across it: the publications of the
  last flush interval that were lost are named exactly (with offsets that were reserved but
  never used), and no offset is ever used twice with different content.

With ``ack = "disk"`` a publish is answered once the batch holding it is committed
(:meth:`DiskJournal.when_durable`), and commits are synchronous (``synchronous=FULL``: they
survive a power loss). With ``ack = "memory"`` (the default) a commit survives the process,
not the machine (``synchronous=NORMAL``).

A file of the previous layout (format 1: one chunk per topic and batch) is converted at start,
in one transaction, and the conversion is logged (``store_migrated``): epochs and history are
kept. A file that is not an SQLite database or fails its integrity check at start is moved
aside (``<name>.corrupt-<time>``) and a new one started: every topic gets a new epoch, which
clients are told, and one error is logged. A file that cannot be opened, is held by another
broker, or whose contents cannot be decoded is :class:`StoreError`, a start-up error that
names the file.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import structlog
import trio

from broker.config import StoreConfig
from broker.errors import FrameError
from broker.history import TopicStore
from broker.journal import KEPT_FIELDS
from broker.storefile import (
    ENTRY_FIELDS,
    UNDECODABLE,
    Batch,
    Database,
    Entry,
    Held,
    RowValues,
    StoreError,
    decode_chunk,
    encode_chunk,
    open_database,
)

__all__ = ["RESERVE_MIN", "Batch", "Database", "DiskJournal", "StoreError", "make_journal"]

log = structlog.get_logger()

# A chunk's fields are the fields the store keeps, as they are (DiskJournal.build).
assert KEPT_FIELDS == ENTRY_FIELDS

#: Bytes of publications held for the next batch that history has evicted meanwhile (as
#: history counts them), at most: past it, their topics are read from history instead, so what
#: waits for the disk stays bounded when commits stall or fail. (What history still holds
#: costs the journal a list slot only.)
PENDING_MAX_BYTES = 64 * 1024 * 1024
#: The fewest offsets reserved ahead of a topic's latest one (see the module docstring).
RESERVE_MIN = 10_000
MAINTAIN_EVERY = 10.0  # seconds between checkpoints and incremental vacuums

#: Entries one compaction reads back at most: what it does on the event loop stays bounded.
COMPACT_ENTRIES = 50_000
#: Entries the journal may hold beyond twice what history holds before a flush compacts it
#: (back to twice): a compaction is a read and a transaction more, so one per flush would
#: cost a topic published to thousands of times a second, whose history is small, a few %.
COMPACT_SLACK = 10_000


def _contiguous_tail(entries: list[Held]) -> list[Held]:
    """The newest run of consecutive offsets of a topic's entries on disk (ordered, each
    once). Entries outlive their eviction on disk until compaction reaches them, and one may
    be followed by a much later one (what was evicted before being written): only the newest
    run is history without a hole."""
    start = len(entries) - 1
    while start > 0 and entries[start - 1][0] == entries[start][0] - 1:
        start -= 1
    return entries[max(start, 0) :]


def _across_gap(
    entries: list[Held], tail: list[Held], gap: tuple[int, int] | None
) -> tuple[list[Held], tuple[int, int] | None]:
    """``tail`` (the newest run of ``entries``) and, when a crash's ``gap`` recorded earlier
    lies right before it, the run that ends right before the gap too, with that gap: what
    preceded a crash stays recoverable across restarts until it is evicted."""
    if gap is None or not tail or tail[0][0] != gap[1] + 1:
        return tail, None
    before = _contiguous_tail([e for e in entries if e[0] < gap[0]])
    if not before or before[-1][0] != gap[0] - 1:
        return tail, None
    return before + tail, gap


def _still_held(store: TopicStore, entries: Iterable[Entry]) -> list[Entry]:
    """The ``entries`` that ``store`` still holds: of its topic's epoch and not older than the
    oldest it holds (what is held is contiguous from there, but for a gap the file never
    held). One look-up per topic, not per entry."""
    heads: dict[str, tuple[str, int]] = {}
    kept: list[Entry] = []
    for entry in entries:
        topic = entry[0]
        head = heads.get(topic)
        if head is None:
            head = heads[topic] = (store.position(topic).epoch, store.first_held(topic))
        if entry[1] == head[0] and entry[2] >= head[1]:
            kept.append(entry)
    return kept


class _NothingNew(Mapping[str, int]):
    """Every topic written up to its latest offset: :meth:`TopicStore.persisted_states` then
    reads positions only (a row to write, no entries)."""

    def __getitem__(self, topic: str) -> int:
        return sys.maxsize

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NOTHING_NEW = _NothingNew()


def make_journal(config: StoreConfig | None) -> DiskJournal | None:
    """The journal of ``[store]``, or None when history stays in memory (no ``path``)."""
    return DiskJournal(config) if config is not None and config.path else None


#: The error a publish gets when its commit failed (it was delivered; it may not be saved).
COMMIT_FAILED = FrameError("unavailable", "the history store could not save it; try again")


class DiskJournal:
    """Keeps a :class:`TopicStore` on disk (see the module docstring). Implements
    :class:`broker.journal.Journal`; :meth:`run` is the flusher task."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        #: ``ack = "disk"``: a publish is answered once committed (else at once). Read on
        #: every publication, so a plain attribute.
        self.ack_on_disk = config.ack == "disk"
        self.db: Database | None = None
        self._dirty: set[str] = set()  # topics whose state the next batch reads from history
        # The fields of the publications held since the last batch, in order: the next
        # chunk's, but for the topics it reads from history. The store extends it (see
        # broker.journal.Journal.kept).
        self.kept: list[Any] = []
        # Bytes of those that history evicted since (what only the list still holds), and
        # when the list was last taken: the store reports evictions of entries kept since.
        self._gone_bytes = 0
        self.since = -math.inf
        # Each topic's newest evicted offset of what was kept since the last batch: older
        # pending publications are not written (what memory no longer holds is not history).
        self._evicted: dict[str, int] = {}
        self._forgotten: set[str] = set()
        # Topics whose row the next batch checks: without a row on disk, or past half their
        # reservation (noted by publishing() at the first offset of a block).
        self._low: set[str] = set()
        self.block = max(1, RESERVE_MIN // 10)
        # The newest offset on disk of topics read from history (at a start, and after a
        # batch that read them); it may lag for the others: what lags is written again.
        self._written: dict[str, int] = {}
        # Each topic's row on disk: (epoch, reserved mark, gap, mark past which it is low).
        self._rows: dict[str, tuple[str, int, tuple[int, int] | None, int]] = {}
        # The journal's chunks on disk, oldest first, as (id, entries) and their entries in
        # all; the chunks the next batch deletes; the entries it writes again (compaction,
        # a failed batch).
        self._chunks: deque[tuple[int, int]] = deque()
        self._on_disk = 0
        self._doomed: list[tuple[int, int]] = []
        self._carry: list[Entry] = []
        self._next_chunk = 1
        self._waiting: list[Callable[[BaseException | None], None]] = []
        self._failing = False
        self._flushing = trio.Lock()
        self._last_maintain = 0.0
        self.stats_counts = {
            "batches": 0,
            "rows": 0,
            "compacted": 0,
            "failures": 0,
            "refused": 0,
            "commit_seconds": 0.0,
            "loaded_topics": 0,
            "loaded_entries": 0,
        }

    # --- the Journal protocol (on the event loop, never blocking) ---------------------------

    def publishing(self, topic: str, offset: int) -> None:
        # Called at the first offset of a block only: only it can pass a reservation (a
        # multiple of the block), and every topic starts at one, so a topic without a row is
        # seen at its first offset (the others known to the store have one on disk, or in the
        # batch being committed).
        row = self._rows.get(topic)
        if row is None or offset > row[3]:
            if row is not None and offset > row[1]:
                self.stats_counts["refused"] += 1
                raise FrameError(
                    "unavailable", "the history store is behind; try again in a moment"
                )
            self._low.add(topic)

    def evicted(self, topic: str, offset: int, size: int) -> None:
        self._evicted[topic] = offset
        self._gone_bytes += size
        if self._gone_bytes > PENDING_MAX_BYTES:  # commits stalled or failing
            self._dirty.update(self.kept[::KEPT_FIELDS])  # read history instead
            self.kept = []
            self._gone_bytes = 0

    def touched(self, topic: str) -> None:
        self._dirty.add(topic)

    def forget(self, topic: str) -> None:
        # Its entries on disk are of an epoch no row names any more: a start ignores them
        # and compaction deletes them.
        self._forgotten.add(topic)
        self._dirty.discard(topic)
        self._written.pop(topic, None)

    def when_durable(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback`` (with None, or the error) once everything published so far is
        committed."""
        self._waiting.append(callback)

    async def durable(self) -> None:
        """Return once everything published so far is committed; raises :class:`FrameError`
        (``unavailable``) if the commit fails."""
        done = trio.Event()
        failure: list[BaseException] = []

        def wake(error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            done.set()

        self.when_durable(wake)
        await done.wait()
        if failure:
            raise COMMIT_FAILED

    def acknowledge(self, answer: Callable[[BaseException | None], None]) -> None:
        """Call ``answer`` when a publication just made may be acknowledged: at once with
        ``ack = "memory"``, once it is committed with ``ack = "disk"``."""
        if self.ack_on_disk:
            self.when_durable(answer)
        else:
            answer(None)

    async def acknowledged(self) -> None:
        """:meth:`acknowledge` for a task that can wait; raises :class:`FrameError`
        (``unavailable``) if the commit fails."""
        if self.ack_on_disk:
            await self.durable()

    # --- start, flush, stop -----------------------------------------------------------------

    def start(self, store: TopicStore) -> None:
        """Open the file, bring its topics back into ``store`` and commit the first batch
        (marking the file not clean, renewing reservations; rewriting the journal when it
        holds more than twice what is loaded). Blocks: call before serving. Raises
        :class:`StoreError`."""
        self.db = open_database(self.config.path, durable=self.config.ack == "disk")
        try:
            clean, rows, chunks, by_topic = self.db.load()
        except (sqlite3.DatabaseError, *UNDECODABLE) as exc:
            raise StoreError(
                self.config.path, f"cannot be read ({exc}); move it away to start afresh"
            ) from None
        store.journal = self
        to_local = store.now() - time.time()  # wall time -> the store's clock
        self._chunks = deque(chunks)
        self._on_disk = sum(count for _, count in chunks)
        self._next_chunk = 1 + max((cid for cid, _ in chunks), default=0)
        for row in rows:
            # The row's epoch only (older ones were forgotten), by offset, each once (what was
            # read from history or compacted may be written twice).
            mine = {e[2]: e for e in by_topic.get(row.topic, ()) if e[1] == row.epoch}
            entries = [e[2:] for _, e in sorted(mine.items())]
            held = _contiguous_tail(entries)
            offset, gap = row.offset, None
            saved = held[-1][0] if held else row.offset
            if not clean and row.reserved > saved:
                # Offsets up to the reservation may have been used and lost: resume past it.
                # What is held is then one run of offsets (a gap recorded before it is behind
                # it: the store keeps one gap a topic).
                offset, gap = row.reserved, (saved + 1, row.reserved) if held else None
            else:
                held, gap = _across_gap(entries, held, row.gap)
            self._written[row.topic] = saved
            # Reserved up to the offset it resumes at: the first batch writes its row.
            self._rows[row.topic] = (row.epoch, offset, gap, offset)
            local = [(at + to_local, o, s, d) for o, at, s, d in held]
            store.restore(row.topic, row.epoch, offset, gap, local)
            self._dirty.add(row.topic)
            self.stats_counts["loaded_entries"] += len(held)
        store.restored()
        self.stats_counts["loaded_topics"] = len(rows)
        log.info(
            "store_loaded",
            path=self.config.path,
            clean=clean,
            topics=len(rows),
            entries=self.stats_counts["loaded_entries"],
            journal_entries=self._on_disk,
        )
        if self._on_disk > 2 * store.entries:  # compact what was read anyway, at once
            self._compacted(_still_held(store, (e for es in by_topic.values() for e in es)))
            self._doomed.extend(self._chunks)
            self._chunks.clear()
            self._on_disk = 0
        del by_topic
        self._commit_now(store, clean=False)

    def build(self, store: TopicStore, *, clean: bool | None = None) -> Batch:
        """The batch of everything changed since the last one (on the event loop): one chunk
        of the publications kept since, in order, and of the topics read from history; the
        rows that changed (every row with ``clean``, a stop); the compacted chunks."""
        dirty, self._dirty = self._dirty, set()
        pending, self.kept = self.kept, []
        self.since = store.now()
        evicted, self._evicted = self._evicted, {}
        low, self._low = self._low, set()
        self._gone_bytes = 0
        forget, self._forgotten = list(self._forgotten), set()
        for topic in forget:  # a batch committed since may have noted its old epoch
            self._written.pop(topic, None)
        # A forgotten topic is read from history: its pending publications may be of the
        # forgotten epoch, and its evicted offsets of either.
        dirty.update(forget)
        wall = time.time() - store.now()
        # The chunk's fields are those kept, times on the store's clock (the chunk says how
        # to make them wall time): but for topics read from history and what was evicted
        # before it was written, nothing is done per publication here.
        n = ENTRY_FIELDS
        fields: list[Any] = pending
        if dirty or evicted:
            gone = evicted.get
            fields = []
            for i in range(0, len(pending), n):
                topic = pending[i]
                if pending[i + 2] > gone(topic, 0) and topic not in dirty:
                    fields += pending[i : i + n]
        add = fields.extend
        count = len(fields) // n
        rows: list[RowValues] = []
        final = clean is not None
        rows_on_disk = self._rows
        block = self.block

        def row(
            topic: str, epoch: str, offset: int, gap: tuple[int, int] | None, pace: int
        ) -> None:
            old = rows_on_disk.get(topic)
            if (
                final
                or old is None
                or old[0] != epoch
                or old[2] != gap
                or old[1] - offset < max(RESERVE_MIN // 2, 2 * pace)
            ):
                # Two blocks more: publishing() notes a topic up to a block past its half mark.
                reserved = max(
                    old[1] if old else 0, offset + max(RESERVE_MIN, 4 * pace + 2 * block)
                )
                reserved = -(-reserved // block) * block  # a multiple of the block
                gap_from, gap_to = gap or (None, None)
                rows.append((topic, epoch, offset, reserved, gap_from, gap_to))

        written: dict[str, int] = {}
        for topic, epoch, offset, gap, new in store.persisted_states(dirty, self._written, 0.0):
            if new:
                for e in new:
                    add((topic, epoch, *e))
                count += len(new)
                written[topic] = new[-1][0]
            row(topic, epoch, offset, gap, len(new))
        # Rows only: topics low on reservation (or new on disk), and at a stop every one.
        others = (set(rows_on_disk) | low if final else low) - dirty
        if others:
            paces = dict.fromkeys(others, 0)
            for topic in pending[::n]:
                if topic in paces:
                    paces[topic] += 1
            for topic, epoch, offset, gap, _ in store.persisted_states(others, _NOTHING_NEW, 0):
                row(topic, epoch, offset, gap, paces[topic])
        for topic, epoch, offset, at, sender, data in self._carry:  # in wall time
            add((topic, epoch, offset, at - wall, sender, data))
        self._carry = []
        deletes, self._doomed = self._doomed, []
        chunk, blob = 0, None
        if fields:
            chunk, self._next_chunk = self._next_chunk, self._next_chunk + 1
            # Marshalled here, on the event loop, not in the writer thread: see
            # Database.commit.
            blob = encode_chunk(wall, fields)
        entries = len(fields) // n
        return Batch(forget, rows, deletes, chunk, entries, clean, count, written, blob)

    async def _compact(self, store: TopicStore) -> None:
        """While the journal holds more than twice what history holds: read its oldest chunks
        back (at most :data:`COMPACT_ENTRIES` entries) and have the next batch write again
        what history still holds of them and delete them."""
        read = 0
        bound = 2 * store.entries
        chunks = self._chunks
        taken: list[tuple[int, int]] = []
        while chunks and read < COMPACT_ENTRIES and self._on_disk - read > bound:
            taken.append(chunks.popleft())
            read += taken[-1][1]
        if not taken:
            return
        assert self.db is not None
        ids = [cid for cid, _ in taken]
        try:
            blobs = await trio.to_thread.run_sync(self.db.read, ids)
            entries = [e for blob in blobs for e in decode_chunk(blob)]
        except (sqlite3.Error, *UNDECODABLE) as exc:
            chunks.extendleft(reversed(taken))  # left as they are; tried again next flush
            self._note_failure("store_compaction_failed", exc)
            return
        self._on_disk -= read
        self._compacted(_still_held(store, entries))
        self._doomed.extend(taken)

    def _compacted(self, entries: list[Entry]) -> None:
        self._carry.extend(entries)
        self.stats_counts["compacted"] += len(entries)

    def _committed(self, batch: Batch) -> None:
        """Record what ``batch`` put on disk (on the event loop, after the commit)."""
        for topic in batch.forget:
            self._rows.pop(topic, None)
        for topic, epoch, offset, reserved, gap_from, gap_to in batch.rows:
            gap = None if gap_from is None or gap_to is None else (gap_from, gap_to)
            self._rows[topic] = (epoch, reserved, gap, reserved - (reserved - offset) // 2)
        if batch.entries:
            self._chunks.append((batch.chunk, batch.entries))
            self._on_disk += batch.entries
        self._written.update(batch.written)
        self.stats_counts["batches"] += 1
        self.stats_counts["rows"] += batch.count
        if self._failing:
            self._failing = False
            log.info("store_recovered", path=self.config.path)

    def _failed(self, batch: Batch, exc: BaseException) -> None:
        """Have the next batch redo ``batch``'s work; log the first failure of a run. Its
        topics are read from history then (not its entries kept: what waits for the disk
        stays bounded however long commits fail), and its compaction is undone: the chunks
        stay, with what they hold."""
        self._dirty.update(r[0] for r in batch.rows)
        if batch.blob is not None:  # rare: the chunk is read back rather than kept aside
            self._dirty.update(entry[0] for entry in decode_chunk(batch.blob))
        self._forgotten.update(batch.forget)
        self._chunks.extendleft(reversed(batch.deletes))
        self._on_disk += sum(count for _, count in batch.deletes)
        self._note_failure("store_commit_failed", exc)

    def _note_failure(self, event: str, exc: BaseException) -> None:
        """Count a failure; log the first of a run (the next commit ends the run)."""
        self.stats_counts["failures"] += 1
        if not self._failing:
            self._failing = True
            log.error(event, path=self.config.path, error=str(exc))

    def _timed_commit(self, batch: Batch) -> float:
        assert self.db is not None
        began = time.perf_counter()
        self.db.commit(batch)
        return time.perf_counter() - began

    def _commit_now(self, store: TopicStore, *, clean: bool) -> None:
        """Build and commit a batch on this thread (start and stop only)."""
        batch = self.build(store, clean=clean)
        waiting, self._waiting = self._waiting, []
        try:
            self.stats_counts["commit_seconds"] += self._timed_commit(batch)
        except sqlite3.Error as exc:
            self._failed(batch, exc)
            for cb in waiting:
                cb(exc)
            raise StoreError(self.config.path, f"cannot be written: {exc}") from None
        self._committed(batch)
        for cb in waiting:
            cb(None)

    async def flush(self, store: TopicStore) -> None:
        """Commit what changed, in a worker thread; answer whoever waits for it. Flushes
        run one at a time."""
        async with self._flushing:
            await self._flush(store)

    async def _flush(self, store: TopicStore) -> None:
        if self._on_disk > 2 * store.entries + COMPACT_SLACK:
            await self._compact(store)
        if not (
            self._dirty
            or self.kept
            or self._forgotten
            or self._waiting
            or self._low
            or self._carry
            or self._doomed
        ):
            return
        batch = self.build(store)
        waiting, self._waiting = self._waiting, []
        try:
            seconds = await trio.to_thread.run_sync(self._timed_commit, batch)
        except sqlite3.Error as exc:
            self._failed(batch, exc)
            self._waiting[:0] = waiting  # they wait for the retry
            return
        self.stats_counts["commit_seconds"] += seconds
        self._committed(batch)
        for cb in waiting:
            cb(None)
        if trio.current_time() - self._last_maintain > MAINTAIN_EVERY:
            self._last_maintain = trio.current_time()
            assert self.db is not None
            with contextlib.suppress(sqlite3.Error):
                await trio.to_thread.run_sync(self.db.maintain)

    async def run(self, store: TopicStore) -> None:
        """Flush every ``flush_interval`` until cancelled; then write everything, mark the
        file clean and close it."""
        self._last_maintain = trio.current_time()
        try:
            while True:
                await trio.sleep(self.config.flush_interval)
                await self.flush(store)
        finally:
            # Blocking, on purpose: the loop is stopping and nothing else waits for it.
            self.close(store)

    def close(self, store: TopicStore) -> None:
        """Write everything, mark the file clean, close it (a graceful stop)."""
        if self.db is None:
            return
        try:
            self._commit_now(store, clean=True)
            log.info("store_closed", path=self.config.path)
        except StoreError as exc:
            log.error("store_close_failed", path=self.config.path, error=exc.problem)
        finally:
            self.db.close()
            self.db = None

    def stats(self) -> dict[str, Any]:
        """Figures for the metrics: the queue (topics to read and publications held since the
        last batch; publishes waiting for a commit), batches, rows (publications written),
        entries compacted (written again), commit seconds, failures, refusals, entries in the
        journal, bytes."""
        return {
            **self.stats_counts,
            "queued_topics": len(self._dirty) + len(self.kept) // KEPT_FIELDS,
            "waiting": len(self._waiting),
            "journal_entries": self._on_disk,
            "bytes": self.db.size() if self.db is not None else 0,
        }
