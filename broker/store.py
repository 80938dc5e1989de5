"""History on disk: the offsets, epochs and history of a :class:`~broker.history.TopicStore`
kept in an SQLite file, so that a restart keeps every topic's epoch and history.

Theory of operation
-------------------
The event loop never waits for the disk. :class:`DiskJournal` is told which topics changed
(:meth:`touched`); every ``flush_interval`` its flusher task reads those topics' state from the
store (their position, gap, oldest held offset, and the held entries newer than what was
written last time) into a :class:`Batch` of plain tuples, and a worker thread commits the batch
in one transaction (:class:`Database`; WAL mode). Nothing is queued besides the names of the
changed topics: the entries to write are read from history itself when the batch is built, so
what waits for the disk is bounded by the history budgets, and an entry evicted before its
batch is never written. A batch appends one *chunk* per changed topic (its new entries,
marshalled), so SQLite writes new pages in order however many topics a batch touches; a
topic's row (position, reservation, gap) is rewritten only when its reservation runs low or
its epoch or gap changes, and at a graceful stop. Every :data:`TRIM_EVERY` seconds, chunks
whose entries have all left history are deleted, and forgotten topics' at once, so the file
holds what memory holds plus at most a few seconds of evictions and a partly evicted chunk
per topic (it is vacuumed incrementally). What the file holds beyond memory are real
publications contiguous with the held ones; a start applies the rules to them again.

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
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from broker.config import StoreConfig
from broker.errors import BrokerError, FrameError
from broker.history import TopicStore

__all__ = ["RESERVE_MIN", "Batch", "Database", "DiskJournal", "StoreError", "make_journal"]

log = structlog.get_logger()

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
            [v for chunk in chunks[i : i + INSERT_ROWS] for v in chunk]
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
        self.db: Database | None = None
        self._dirty: set[str] = set()
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

    def check(self, topic: str, offset: int) -> None:
        row = self._rows.get(topic)
        if row is not None and offset > row[1]:
            self.stats_counts["refused"] += 1
            raise FrameError("unavailable", "the history store is behind; try again in a moment")

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
        if self.config.ack == "disk":
            self.when_durable(answer)
        else:
            answer(None)

    async def acknowledged(self) -> None:
        """:meth:`acknowledge` for a task that can wait; raises :class:`FrameError`
        (``unavailable``) if the commit fails."""
        if self.config.ack == "disk":
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
        forget, self._forgotten = list(self._forgotten), set()
        self._forgot_meanwhile = set()
        wall = time.time() - store.now()
        rows, chunks = [], []
        count = 0
        final = clean is not None
        written, rows_on_disk = self._written, self._rows
        # At a stop every row is rewritten: between stops a row's offset may lag.
        for topic in dirty | set(rows_on_disk) if final else dirty:
            state = store.persisted_state(topic, written.get(topic, 0), wall)
            if state is None:
                continue
            epoch, offset, gap, _first, new = state
            pace = len(new)
            if pace:
                # One chunk per topic and batch, appended: SQLite writes new pages in order,
                # however many topics a batch touches.
                chunks.append((self._next_chunk, topic, new[-1][0], marshal.dumps(new)))
                self._next_chunk += 1
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
        if trim or final:
            self._trim(store)
        deletes, self._doomed = self._doomed, []
        return Batch(forget, rows, deletes, chunks, clean, tuple(dirty), count)

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
        for cid, topic, last, _blob in batch.chunks:
            if topic in self._forgot_meanwhile:  # of the epoch that was forgotten: it goes
                self._doomed.append((cid, topic, last))
                continue
            self._chunks.setdefault(topic, deque()).append((cid, last))
            self._written[topic] = last
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
        if not self._dirty and not self._forgotten and not self._waiting:
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
        """Figures for the metrics: the queue (topics changed since the last batch, publishes
        waiting for a commit), batches, rows, commit seconds, failures, refusals, bytes."""
        return {
            **self.stats_counts,
            "queued_topics": len(self._dirty),
            "waiting": len(self._waiting),
            "bytes": self.db.size() if self.db is not None else 0,
        }
