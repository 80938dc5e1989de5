"""The history store's SQLite file (:mod:`broker.store` keeps history in it): its layout, the
conversion of the previous one, and its transactions.

Layout (format 3)
-----------------
``meta`` holds the format and the clean-stop marker; ``topics`` one row per topic (epoch,
offset, reserved mark, gap); ``journal`` the chunks, in the order written, each holding its
entries ``(topic, epoch, offset, wall time, sender, data)`` (:func:`decode_chunk`).

A chunk is marshalled (version 2) as ``(shift, fields)``: the entries' fields one after the
other in one flat list, each time on the broker's clock, and ``shift`` what turns those into
wall time. That is what costs the event loop least to build: the store extends that list as
it keeps each publication (:attr:`broker.journal.Journal.kept`), a batch marshals it as it is,
no tuple or float is kept per entry, and marshal's version 2 keeps no table of the objects it
has written (with every string shared by a publication, version 4 spent more on that table
than it saved in bytes). Format 2 (each chunk the marshalled list of entry tuples, in wall
time) differs only in that: its chunks are read as they are and the file is marked format 3
when opened. Format 1 (one chunk of ``(offset, time, sender, data)`` per topic and batch, in
a ``chunks`` table) is converted when opened. The file is opened with an exclusive lock (a
second broker fails) in WAL mode with incremental vacuum; a new file gets 64 KiB pages
(:data:`PAGE_SIZE`: a commit writes the WAL a page at a time, so large pages mean few system
calls).
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import structlog

from broker.errors import BrokerError

__all__ = [
    "ENTRY_FIELDS",
    "FORMAT",
    "UNDECODABLE",
    "Batch",
    "Database",
    "Entry",
    "Held",
    "Row",
    "RowValues",
    "StoreError",
    "decode_chunk",
    "encode_chunk",
    "open_database",
]

log = structlog.get_logger()

#: The layout this broker writes; 2 (chunks of entry tuples) is read as it is, 1 (one chunk
#: per topic and batch) is converted at start.
FORMAT = 3
#: The marshal version of a chunk (see the module docstring).
CHUNK_MARSHAL = 2
#: Fields of an entry, as a chunk's flat list holds them.
ENTRY_FIELDS = 6
#: Entries a converted format-1 file's chunks hold at most.
MIGRATE_ENTRIES = 50_000
CACHE_KIB = 32768  # SQLite's page cache, per store
VACUUM_BYTES = 8 * 1024 * 1024  # given back per incremental vacuum
CHECKPOINT_BYTES = 4 * 1024 * 1024  # WAL written back to the file at a commit past this
#: SQLite's page size for a new file (its largest). A commit appends every page it changes
#: to the WAL with two write system calls (frame header, page): a batch's chunk of a
#: megabyte took some 740 of them with the default 4 KiB pages, 37 with these, and half the
#: thread's CPU. A file made with another page size keeps it (WAL mode fixes it).
PAGE_SIZE = 65536

#: SQLite's result codes for a file that is not a (sound) database.
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS topics (
    topic TEXT PRIMARY KEY, epoch TEXT NOT NULL, offset INTEGER NOT NULL,
    reserved INTEGER NOT NULL, gap_from INTEGER, gap_to INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY, count INTEGER NOT NULL, entries BLOB NOT NULL
);
"""

#: An entry as the journal holds it: (topic, epoch, offset, wall time, sender, data).
Entry = tuple[str, str, int, float, str | None, str]
#: A topic's entry as its state holds it: (offset, wall time, sender, data).
Held = tuple[int, float, str | None, str]
#: A topic row as written: (topic, epoch, offset, reserved, gap_from, gap_to).
RowValues = tuple[str, str, int, int, int | None, int | None]
#: What a chunk that cannot be decoded raises (besides SQLite's own errors).
UNDECODABLE = (ValueError, EOFError, TypeError, IndexError)


def encode_chunk(shift: float, fields: list[Any]) -> bytes:
    """A chunk of the entries whose fields ``fields`` holds one after the other, their times on
    a clock that ``shift`` turns into wall time."""
    return marshal.dumps((shift, fields), CHUNK_MARSHAL)


def encode_entries(entries: list[Entry]) -> bytes:
    """A chunk of ``entries`` (times in wall time)."""
    return encode_chunk(0.0, [field for entry in entries for field in entry])


def decode_chunk(blob: bytes) -> list[Entry]:
    """The entries of a chunk (either format), times in wall time. Raises one of
    :data:`UNDECODABLE` when ``blob`` is not a chunk."""
    chunk = marshal.loads(blob)
    if isinstance(chunk, list):  # format 2: the entries themselves
        return chunk
    shift, fields = chunk
    n = ENTRY_FIELDS
    if len(fields) % n:
        raise ValueError(f"a chunk of {len(fields)} fields, not entries of {n}")
    times = [when + shift for when in fields[3::n]]
    columns = (fields[0::n], fields[1::n], fields[2::n], times, fields[4::n], fields[5::n])
    return list(zip(*columns, strict=True))


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
    """One transaction: topics to forget, topic rows to write, journal chunks to delete
    (``(id, entries)``, oldest first), and the new chunk ``chunk``, ``blob`` (none: no chunk),
    holding ``entries`` entries; ``clean`` sets the clean-stop marker when not None. ``count``
    is how many of the entries are new publications (the rest are written again by
    compaction), ``written`` the newest offset written for each topic read from history."""

    forget: list[str]
    rows: list[RowValues]
    deletes: list[tuple[int, int]]
    chunk: int
    entries: int
    clean: bool | None = None
    count: int = 0
    written: dict[str, int] = attrs.field(factory=dict)
    blob: bytes | None = None


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
        # no shared-memory file. auto_vacuum and page_size must be set before the tables exist.
        c.execute("PRAGMA locking_mode=EXCLUSIVE")
        c.execute(f"PRAGMA page_size={PAGE_SIZE}")
        c.execute("PRAGMA auto_vacuum=INCREMENTAL")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        c.execute("PRAGMA journal_size_limit=67108864")
        c.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # SQLite's default counts pages (1,000): keep the WAL as short with any page size.
        c.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_BYTES // self.page_size()}")
        ok = c.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {ok}")
        c.executescript(_SCHEMA)
        fmt = c.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if fmt is None:
            c.execute("INSERT INTO meta VALUES ('format', ?), ('clean', 1)", (FORMAT,))
        elif fmt[0] == 1:
            self._convert_format_1()
        elif fmt[0] == 2:  # its chunks are read as they are; new ones are of this format
            c.execute("UPDATE meta SET value=? WHERE key='format'", (FORMAT,))
        elif fmt[0] != FORMAT:
            raise StoreError(path, f"format {fmt[0]} is not {FORMAT}, the one this broker reads")

    def _convert_format_1(self) -> None:
        """Rewrite a format-1 file (a ``chunks`` table: one chunk of ``(offset, time, sender,
        data)`` per topic and batch) as a journal, in one transaction. Its chunks belong to
        their topic row's epoch (that layout deleted a forgotten topic's chunks with its row);
        those of topics without a row are left out."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            epochs = dict(c.execute("SELECT topic, epoch FROM topics").fetchall())
            entries: list[Entry] = []
            chunks = 0
            for topic, blob in c.execute("SELECT topic, entries FROM chunks ORDER BY id"):
                epoch = epochs.get(topic)
                if epoch is not None:
                    entries.extend((topic, epoch, *e) for e in marshal.loads(blob))
                if len(entries) >= MIGRATE_ENTRIES:
                    chunks += 1
                    self._insert(chunks, entries)
                    entries = []
            if entries:
                chunks += 1
                self._insert(chunks, entries)
            c.execute("DROP TABLE chunks")
            c.execute("UPDATE meta SET value=? WHERE key='format'", (FORMAT,))
            c.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            if isinstance(exc, UNDECODABLE):
                raise StoreError(self.path, f"cannot be converted ({exc})") from None
            raise
        log.info("store_migrated", path=self.path, from_format=1, to_format=FORMAT, chunks=chunks)

    def _insert(self, chunk: int, entries: list[Entry]) -> None:
        self.conn.execute(
            "INSERT INTO journal VALUES (?,?,?)", (chunk, len(entries), encode_entries(entries))
        )

    def load(self) -> tuple[bool, list[Row], list[tuple[int, int]], dict[str, list[Entry]]]:
        """Whether the last stop was clean, every topic row, the journal's chunks ``(id,
        entries)`` oldest first, and every topic's entries in the order written. Raises
        :class:`sqlite3.DatabaseError` (or one of ``UNDECODABLE`` for a chunk that does not
        decode)."""
        c = self.conn
        clean = bool(c.execute("SELECT value FROM meta WHERE key='clean'").fetchone()[0])
        rows = [
            Row(t, e, o, r, None if gf is None else (gf, gt))
            for t, e, o, r, gf, gt in c.execute("SELECT * FROM topics")
        ]
        chunks: list[tuple[int, int]] = []
        by_topic: dict[str, list[Entry]] = {}
        for cid, count, blob in c.execute("SELECT id, count, entries FROM journal ORDER BY id"):
            chunks.append((cid, count))
            for entry in decode_chunk(blob):
                mine = by_topic.get(entry[0])
                if mine is None:
                    by_topic[entry[0]] = [entry]
                else:
                    mine.append(entry)
        return clean, rows, chunks, by_topic

    def read(self, ids: list[int]) -> list[bytes]:
        """The chunks ``ids`` as stored (compaction; the caller decodes them with
        :func:`decode_chunk`, not this thread: see :meth:`commit`). Raises
        :class:`sqlite3.Error`."""
        return [
            blob
            for (blob,) in self.conn.execute(
                "SELECT entries FROM journal WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            )
        ]

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` in one transaction. Its chunk comes marshalled (``blob``): this
        thread holds the interpreter lock as little as it can, as the event loop, which
        releases it at every write to a socket, would then wait for it at the next."""
        c = self.conn
        blob = batch.blob
        if (
            blob is not None
            and not (batch.forget or batch.deletes or batch.rows)
            and batch.clean is None
        ):
            # Most batches: one statement, a transaction of its own. Every statement hands the
            # interpreter lock to this thread and back twice (the event loop waits each time).
            c.execute("INSERT INTO journal VALUES (?,?,?)", (batch.chunk, batch.entries, blob))
            return
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("DELETE FROM topics WHERE topic=?", [(t,) for t in batch.forget])
            if batch.deletes:
                c.execute(
                    "DELETE FROM journal WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps([cid for cid, _ in batch.deletes]),),
                )
            c.executemany("INSERT OR REPLACE INTO topics VALUES (?,?,?,?,?,?)", batch.rows)
            if blob is not None:
                c.execute("INSERT INTO journal VALUES (?,?,?)", (batch.chunk, batch.entries, blob))
            if batch.clean is not None:
                c.execute("UPDATE meta SET value=? WHERE key='clean'", (int(batch.clean),))
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def maintain(self) -> None:
        """Give freed pages back to the file system and keep the WAL short."""
        pages = VACUUM_BYTES // self.page_size()
        self.conn.execute(f"PRAGMA incremental_vacuum({pages})").fetchall()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def page_size(self) -> int:
        """The file's page size: :data:`PAGE_SIZE`, or what an older file was made with."""
        return int(self.conn.execute("PRAGMA page_size").fetchone()[0])

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
