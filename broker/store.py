"""History on disk: the offsets, epochs and history of a :class:`~broker.history.TopicStore`
kept in an SQLite file, so that a restart keeps every topic's epoch and history.

Theory of operation
-------------------
The event loop never waits for the disk. :class:`DiskJournal` is handed every publication the
store keeps (:meth:`kept`: one list append, while its objects are fresh in the processor's
cache) and told of every eviction (:meth:`evicted`) and of topics changed otherwise
(:meth:`touched`: a publication not kept, a gap closed; and every topic at a start); every
``flush_interval`` its flusher task turns the publications kept since the last batch, grouped
by topic, and the state of the touched topics read from the store (their position, gap and the
held entries newer than what was written last time) into a :class:`Batch` of plain tuples, and
a worker thread commits the batch in one transaction (:class:`Database`; WAL mode). Reading
every changed topic's state from history instead cost a few µs a topic (a walk over cold
memory), with many topics as much as the rest of a publication's path. What waits for the disk
is bounded: past :data:`PENDING_MAX_BYTES` of kept publications, their topics are read from
history instead, so what is queued is then their names only. A publication evicted before its
batch is not written. A batch appends one *chunk* per changed topic (its new entries,
marshalled), so SQLite writes new pages in order however many topics a batch touches; a topic's
row (position, reservation, gap) is rewritten only when its reservation runs low or its epoch
or gap changes, and at a graceful stop. Every :data:`TRIM_EVERY` seconds, chunks whose entries
have all left history are deleted, and forgotten topics' at once, so the file holds what memory
holds plus at most a few seconds of evictions and a partly evicted chunk per topic (it is
vacuumed incrementally). What the file holds beyond memory are real publications contiguous
with the held ones; a start applies the rules to them again.

Crash safety rests on two things written with every batch:

- **An offset reservation per topic.** A topic's row carries ``reserved``, a mark past its
  offset (:data:`RESERVE_MIN` or four batches' worth of its publications, whichever is more).
  An offset past the mark the disk holds is refused (``unavailable``) until a batch moves it:
  so every offset the broker ever used is at most its topic's reserved mark on disk. A topic
  without a row yet gets a new epoch after a crash (epochs of unsaved topics come from a
  per-process secret), so its offsets need no reservation.
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

A file that is not an SQLite database or fails its integrity check at start is moved aside
(``<name>.corrupt-<time>``) and a new one started: every topic gets a new epoch, which clients
are told, and one error is logged. A file that cannot be opened or is held by another broker
is :class:`StoreError`, a start-up error that names the file.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from broker.bus.base import Publication
from broker.config import StoreConfig
from broker.errors import BrokerError, FrameError
from broker.history import TopicStore

__all__ = ["RESERVE_MIN", "Batch", "Database", "DiskJournal", "StoreError", "make_journal"]

log = structlog.get_logger()

#: Bytes of publications held for the next batch at most (as history counts them); past it,
#: their topics are read from history instead: what waits for the disk stays bounded when
#: commits stall or fail.
PENDING_MAX_BYTES = 64 * 1024 * 1024
#: The fewest offsets reserved ahead of a topic's latest one (see the module docstring).
RESERVE_MIN = 10_000
FORMAT = 1
MAINTAIN_EVERY = 10.0  # seconds between checkpoints and incremental vacuums
#: Seconds between deletions of evicted entries: one per topic then, not one per batch (what a
#: topic evicts meanwhile stays on disk, at most this long).
TRIM_EVERY = 5.0
CACHE_KIB = 32768  # SQLite's page cache, per store
VACUUM_PAGES = 2048  # pages given back per incremental vacuum (8 MiB of 4 KiB pages)

#: SQLite's result codes for a file that is not a (sound) database.
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS topics (
    topic TEXT PRIMARY KEY, epoch TEXT NOT NULL, offset INTEGER NOT NULL,
    reserved INTEGER NOT NULL, gap_from INTEGER, gap_to INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, last INTEGER NOT NULL, entries BLOB NOT NULL
);
"""

#: An entry as a chunk holds it: (offset, wall time, sender, data).
Entry = tuple[int, float, str | None, str]


class StoreError(BrokerError):
    """The store file cannot be used (unreadable, not writable, held by another broker)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"history store {path}: {problem}")
        self.path = path
        self.problem = problem


@attrs.frozen
class Row:
    """A topic's row as saved: position, reservation, gap."""

    topic: str
    epoch: str
    offset: int
    reserved: int
    gap: tuple[int, int] | None


@attrs.frozen
class Batch:
    """One transaction: topics to forget, topic rows ``(topic, epoch, offset, reserved,
    gap_from, gap_to)``, chunks to delete ``(id, topic, last offset)``, new chunks ``(id,
    topic, last offset, marshalled entries)``; ``clean`` sets the clean-stop marker when not
    None. ``topics`` are the changed topics it was built from, ``count`` its new entries."""

    forget: list[str]
    rows: list[tuple[str, str, int, int, int | None, int | None]]
    deletes: list[tuple[int, str, int]]
    chunks: list[tuple[int, str, int, bytes]]
    clean: bool | None = None
    topics: tuple[str, ...] = ()
    count: int = 0


#: Chunks inserted per statement: SQLite steps once per statement, and each step lets the
#: event loop's thread take the interpreter lock; one step per row (a thousand topics changed)
#: made the writer and the loop trade the lock a thousand times a batch.
INSERT_ROWS = 200
_INSERT_ONE = "INSERT INTO chunks VALUES (?,?,?,?)"
_INSERT_MANY = "INSERT INTO chunks VALUES " + ",".join(["(?,?,?,?)"] * INSERT_ROWS)


def _insert_chunks(c: sqlite3.Connection, chunks: list[tuple[int, str, int, bytes]]) -> None:
    whole = len(chunks) - len(chunks) % INSERT_ROWS
    c.executemany(
        _INSERT_MANY,
        (
            list(chain.from_iterable(chunks[i : i + INSERT_ROWS]))
            for i in range(0, whole, INSERT_ROWS)
        ),
    )
    c.executemany(_INSERT_ONE, chunks[whole:])


class Database:
    """The SQLite file. Used by one thread at a time (the flusher hands it to a worker
    thread per commit and waits); raises :class:`StoreError` or :class:`sqlite3.Error`."""

    def __init__(self, path: str, *, durable: bool) -> None:
        self.path = path
        try:
            self.conn = sqlite3.connect(
                path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(path, f"cannot open: {exc}") from None
        c = self.conn
        # Exclusive locking: a second broker on the same file fails at start, and WAL needs
        # no shared-memory file. auto_vacuum must be set before the tables exist.
        c.execute("PRAGMA locking_mode=EXCLUSIVE")
        c.execute("PRAGMA auto_vacuum=INCREMENTAL")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        c.execute("PRAGMA journal_size_limit=67108864")
        c.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        ok = c.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {ok}")
        c.executescript(_SCHEMA)
        fmt = c.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if fmt is None:
            c.execute("INSERT INTO meta VALUES ('format', ?), ('clean', 1)", (FORMAT,))
        elif fmt[0] != FORMAT:
            raise StoreError(path, f"format {fmt[0]} is not {FORMAT}, the one this broker reads")

    def load(self) -> tuple[bool, list[Row], dict[str, list[tuple[int, int, list[Entry]]]]]:
        """Whether the last stop was clean, every topic row, and every topic's chunks ``(id,
        last offset, entries)`` oldest first. Raises :class:`sqlite3.DatabaseError` (or
        :class:`ValueError` for a chunk that does not decode)."""
        c = self.conn
        clean = bool(c.execute("SELECT value FROM meta WHERE key='clean'").fetchone()[0])
        rows = [
            Row(t, e, o, r, None if gf is None else (gf, gt))
            for t, e, o, r, gf, gt in c.execute("SELECT * FROM topics")
        ]
        chunks: dict[str, list[tuple[int, int, list[Entry]]]] = {}
        for cid, topic, last, blob in c.execute("SELECT * FROM chunks ORDER BY id"):
            chunks.setdefault(topic, []).append((cid, last, marshal.loads(blob)))
        return clean, rows, chunks

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` in one transaction."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("DELETE FROM topics WHERE topic=?", [(t,) for t in batch.forget])
            # One statement for every deleted chunk: SQLite walks the list without the
            # interpreter lock (a statement per id traded it with the event loop per row).
            ids = json.dumps([d[0] for d in batch.deletes])
            c.execute("DELETE FROM chunks WHERE id IN (SELECT value FROM json_each(?))", (ids,))
            c.executemany("INSERT OR REPLACE INTO topics VALUES (?,?,?,?,?,?)", batch.rows)
            _insert_chunks(c, batch.chunks)
            if batch.clean is not None:
                c.execute("UPDATE meta SET value=? WHERE key='clean'", (int(batch.clean),))
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def maintain(self) -> None:
        """Give freed pages back to the file system and keep the WAL short."""
        self.conn.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})").fetchall()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def size(self) -> int:
        """Bytes the store takes on disk (the file and its WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total

    def close(self) -> None:
        self.conn.close()


def open_database(path: str, *, durable: bool) -> Database:
    """Open (or create) the store at ``path``. A corrupt file is moved aside and a new one
    started (logged once); raises :class:`StoreError` for anything else."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _create_private(path)
    except OSError as exc:
        raise StoreError(path, f"cannot be created: {exc.strerror}") from None
    try:
        return Database(path, durable=durable)
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in _CORRUPT_CODES and "integrity" not in str(
            exc
        ):
            if "locked" in str(exc):
                raise StoreError(path, "held by another broker process; stop it first") from None
            raise StoreError(path, str(exc)) from None
    aside = f"{path}.corrupt-{int(time.time())}"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    log.error(
        "store_corrupt",
        path=path,
        moved_to=aside,
        action="started a new store: every topic gets a new epoch, which clients are told; "
        "the old file is kept for inspection and may be deleted",
    )
    _create_private(path)
    return Database(path, durable=durable)


def _create_private(path: str) -> None:
    """Create ``path`` if missing, readable by the broker's user only: history is what
    clients published."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


def _contiguous_tail(entries: list[Entry]) -> list[Entry]:
    """The newest run of consecutive offsets of a topic's entries on disk. Older chunks may
    outlive evictions for a while (trims are periodic), and a chunk may end where the next
    begins much later (what was evicted before being written): only the newest run is
    history without a hole."""
    start = len(entries) - 1
    while start > 0 and entries[start - 1][0] == entries[start][0] - 1:
        start -= 1
    return entries[max(start, 0) :]


def _across_gap(
    entries: list[Entry], tail: list[Entry], gap: tuple[int, int] | None
) -> tuple[list[Entry], tuple[int, int] | None]:
    """``tail`` (the newest run of ``entries``) and, when a crash's ``gap`` recorded earlier
    lies right before it, the run that ends right before the gap too, with that gap: what
    preceded a crash stays recoverable across restarts until it is evicted."""
    if gap is None or not tail or tail[0][0] != gap[1] + 1:
        return tail, None
    before = _contiguous_tail([e for e in entries if e[0] < gap[0]])
    if not before or before[-1][0] != gap[0] - 1:
        return tail, None
    return before + tail, gap


def make_journal(config: StoreConfig | None) -> DiskJournal | None:
    """The journal of ``[store]``, or None when history stays in memory (no ``path``)."""
    return DiskJournal(config) if config is not None and config.path else None


#: The error a publish gets when its commit failed (it was delivered; it may not be saved).
COMMIT_FAILED = FrameError("unavailable", "the history store could not save it; try again")


class DiskJournal:
    """Keeps a :class:`TopicStore` on disk (see the module docstring). Implements
    :class:`broker.history.Journal`; :meth:`run` is the flusher task."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        #: ``ack = "disk"``: a publish is answered once committed (else at once). Read on
        #: every publication, so a plain attribute.
        self.ack_on_disk = config.ack == "disk"
        self.db: Database | None = None
        self._dirty: set[str] = set()  # topics whose state the next batch reads from history
        # Publications held since the last batch, as (time kept, publication): the next
        # batch's new entries, but for the topics it reads from history.
        self._pending: list[tuple[float, Publication]] = []
        self._pending_bytes = 0
        # Each topic's newest evicted offset since the last batch: older pending
        # publications are not written (what memory no longer holds is not history).
        self._evicted: dict[str, int] = {}
        self._forgotten: set[str] = set()
        self._written: dict[str, int] = {}  # the newest offset of each topic on disk
        # Each topic's row on disk: (epoch, reserved mark, gap).
        self._rows: dict[str, tuple[str, int, tuple[int, int] | None]] = {}
        self._last_trim = 0.0
        # Each topic's chunks on disk, oldest first, as (id, last offset); the chunks to
        # delete with the next batch (of forgotten topics, or wholly evicted) as (id, topic,
        # last offset); topics forgotten while a batch was being committed.
        self._chunks: dict[str, deque[tuple[int, int]]] = {}
        self._doomed: list[tuple[int, str, int]] = []
        self._forgot_meanwhile: set[str] = set()
        self._next_chunk = 1
        self._waiting: list[Callable[[BaseException | None], None]] = []
        self._failing = False
        self._flushing = trio.Lock()
        self._last_maintain = 0.0
        self.stats_counts = {
            "batches": 0,
            "rows": 0,
            "failures": 0,
            "refused": 0,
            "commit_seconds": 0.0,
            "loaded_topics": 0,
            "loaded_entries": 0,
        }

    # --- the Journal protocol (on the event loop, never blocking) ---------------------------

    def publishing(self, topic: str, offset: int) -> None:
        row = self._rows.get(topic)
        if row is not None and offset > row[1]:
            self.stats_counts["refused"] += 1
            raise FrameError("unavailable", "the history store is behind; try again in a moment")

    def kept(self, when: float, pub: Publication, size: int) -> None:
        self._pending.append((when, pub))
        self._pending_bytes += size
        if self._pending_bytes > PENDING_MAX_BYTES:  # commits stalled or failing
            self._dirty.update(p.topic for _, p in self._pending)  # read history instead
            self._pending.clear()
            self._pending_bytes = 0

    def evicted(self, topic: str, offset: int) -> None:
        self._evicted[topic] = offset

    def touched(self, topic: str) -> None:
        self._dirty.add(topic)

    def forget(self, topic: str) -> None:
        self._forgotten.add(topic)
        self._forgot_meanwhile.add(topic)
        self._dirty.discard(topic)
        self._written.pop(topic, None)
        self._doomed.extend((cid, topic, last) for cid, last in self._chunks.pop(topic, ()))

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
        (marking the file not clean, renewing reservations). Blocks: call before serving.
        Raises :class:`StoreError`."""
        self.db = open_database(self.config.path, durable=self.config.ack == "disk")
        try:
            clean, rows, chunks = self.db.load()
        except (sqlite3.DatabaseError, ValueError, EOFError, TypeError) as exc:
            raise StoreError(
                self.config.path, f"cannot be read ({exc}); move it away to start afresh"
            ) from None
        store.journal = self
        to_local = store.now() - time.time()  # wall time -> the store's clock
        self._next_chunk = 1 + max((c[0] for cs in chunks.values() for c in cs), default=0)
        known = {row.topic for row in rows}
        for topic in set(chunks) - known:  # left by a forget that did not commit
            self._doomed.extend((cid, topic, last) for cid, last, _ in chunks.pop(topic))
        for row in rows:
            mine = chunks.get(row.topic, [])
            self._chunks[row.topic] = deque((cid, last) for cid, last, _ in mine)
            entries = [e for _, _, es in mine for e in es]
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
            self._rows[row.topic] = (row.epoch, offset, gap)
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
        )
        self._commit_now(store, clean=False)

    def build(self, store: TopicStore, *, clean: bool | None = None, trim: bool = False) -> Batch:
        """The batch of everything changed since the last one (on the event loop). A topic's
        row is written only when it is new, its epoch or gap changed, or its reservation runs
        low (else it is stale until a stop, ``clean``); trims are done with ``trim`` or
        ``clean`` (between them the file holds some evicted entries, which are real
        publications, contiguous with what is held: a load applies the rules to them again)."""
        dirty, self._dirty = self._dirty, set()
        pending, self._pending = self._pending, []
        evicted, self._evicted = self._evicted, {}
        self._pending_bytes = 0
        forget, self._forgotten = list(self._forgotten), set()
        self._forgot_meanwhile = set()
        rows: list[tuple[str, str, int, int, int | None, int | None]] = []
        chunks: list[tuple[int, str, int, bytes]] = []
        count = 0
        final = clean is not None
        rows_on_disk = self._rows
        cid = self._next_chunk
        dumps = marshal.dumps
        wall = time.time() - store.now()

        def add(
            topic: str, epoch: str, offset: int, gap: tuple[int, int] | None, new: list[Entry]
        ) -> None:
            nonlocal cid, count
            pace = len(new)
            if pace:
                # One chunk per topic and batch, appended: SQLite writes new pages in order,
                # however many topics a batch touches.
                chunks.append((cid, topic, new[-1][0], dumps(new)))
                cid += 1
                count += pace
            row = rows_on_disk.get(topic)
            if (
                final
                or row is None
                or row[0] != epoch
                or row[2] != gap
                or row[1] - offset < max(RESERVE_MIN // 2, 2 * pace)
            ):
                old = row[1] if row is not None else 0
                reserved = max(old, offset + max(RESERVE_MIN, 4 * pace))
                gap_from, gap_to = gap or (None, None)
                rows.append((topic, epoch, offset, reserved, gap_from, gap_to))

        # At a stop every row is rewritten: between stops a row's offset may lag.
        if final:
            dirty |= set(rows_on_disk)
        # Publications held since the last batch, by topic (in order: offsets ascending).
        # Read from these, not from history: their objects are fresh, while reading each
        # changed topic's state from history is a walk over cold memory, a few µs a topic.
        groups: dict[str, list[tuple[float, Publication]]] = {}
        for item in pending:
            group = groups.get(item[1].topic)
            if group is None:
                groups[item[1].topic] = [item]
            else:
                group.append(item)
        # A topic forgotten since is read from history too: its pending publications may
        # be of the forgotten epoch, and its evicted offsets of either.
        dirty |= set(forget).intersection(groups)
        for topic, group in groups.items():
            if topic in dirty:
                continue  # read from history below, these with it
            last = group[-1][1]
            row = rows_on_disk.get(topic)
            gone = evicted.get(topic, 0)
            new = [
                (p.offset, when + wall, p.sender, p.data) for when, p in group if p.offset > gone
            ]
            # A gap changes only at a start or when an eviction closes it, and both make
            # the topic one read from history: the gap on disk is the topic's (a new epoch
            # has none).
            gap = row[2] if row is not None and row[0] == last.epoch else None
            add(topic, last.epoch, last.offset, gap, new)
        for state in store.persisted_states(dirty, self._written, wall):
            add(*state)
        self._next_chunk = cid
        if trim or final:
            self._trim(store)
        deletes, self._doomed = self._doomed, []
        return Batch(forget, rows, deletes, chunks, clean, (*dirty, *groups), count)

    def _trim(self, store: TopicStore) -> None:
        """Doom the chunks whose entries have all left history (a pass over the topics on
        disk: every :data:`TRIM_EVERY` seconds and at a stop, not every batch)."""
        for topic, held in self._chunks.items():
            if held:
                first = store.first_held(topic)
                while held and held[0][1] < first:
                    cid, last = held.popleft()
                    self._doomed.append((cid, topic, last))

    def _committed(self, batch: Batch) -> None:
        """Record what ``batch`` put on disk (on the event loop, after the commit)."""
        for topic in batch.forget:
            self._rows.pop(topic, None)
        for topic, epoch, _offset, reserved, gap_from, gap_to in batch.rows:
            gap = None if gap_from is None or gap_to is None else (gap_from, gap_to)
            self._rows[topic] = (epoch, reserved, gap)
        on_disk, written, forgot = self._chunks, self._written, self._forgot_meanwhile
        for cid, topic, last, _blob in batch.chunks:
            if forgot and topic in forgot:  # of the epoch that was forgotten: it goes
                self._doomed.append((cid, topic, last))
                continue
            held = on_disk.get(topic)
            if held is None:
                on_disk[topic] = held = deque()
            held.append((cid, last))
            written[topic] = last
        self.stats_counts["batches"] += 1
        self.stats_counts["rows"] += batch.count
        if self._failing:
            self._failing = False
            log.info("store_recovered", path=self.config.path)

    def _failed(self, batch: Batch, exc: BaseException) -> None:
        """Keep ``batch``'s topics for the next one; log the first failure of a run."""
        self._dirty.update(batch.topics)
        self._dirty.update(r[0] for r in batch.rows)  # rewritten with the next batch
        self._forgotten.update(batch.forget)
        self._doomed.extend(batch.deletes)
        self.stats_counts["failures"] += 1
        if not self._failing:
            self._failing = True
            log.error("store_commit_failed", path=self.config.path, error=str(exc))

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
        if not (self._dirty or self._pending or self._forgotten or self._waiting):
            return
        now = trio.current_time()
        trim = now - self._last_trim > TRIM_EVERY
        if trim:
            self._last_trim = now
        batch = self.build(store, trim=trim)
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
        last batch; publishes waiting for a commit), batches, rows, commit seconds, failures,
        refusals, bytes."""
        return {
            **self.stats_counts,
            "queued_topics": len(self._dirty) + len(self._pending),
            "waiting": len(self._waiting),
            "bytes": self.db.size() if self.db is not None else 0,
        }
