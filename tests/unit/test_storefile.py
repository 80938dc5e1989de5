"""The history store's chunks (broker.storefile): what a chunk holds, that a file of format 2
(chunks of entry tuples) is read as it is and then written in format 3, and that a chunk that
does not decode is a clear error at start."""

from __future__ import annotations

import contextlib
import marshal
import sqlite3
import time
from pathlib import Path

import pytest

from broker.bus.base import StreamPosition
from broker.store import StoreError
from broker.storefile import _SCHEMA, decode_chunk, encode_chunk, encode_entries
from tests.unit.test_store import crash, journal, open_store, sql


def test_a_chunk_holds_its_entries_in_wall_time() -> None:
    fields = ["a", "e1", 1, 10.0, None, '"1"', "b", "e2", 7, 11.5, "x", '"2"']
    assert decode_chunk(encode_chunk(100.0, fields)) == [
        ("a", "e1", 1, 110.0, None, '"1"'),
        ("b", "e2", 7, 111.5, "x", '"2"'),
    ]
    entries = [("a", "e1", 1, 110.0, None, '"1"')]
    assert decode_chunk(encode_entries(entries)) == entries
    with pytest.raises(ValueError):  # fields that are not whole entries
        decode_chunk(encode_chunk(0.0, fields[:-1]))


def format_2_file(path: Path, at: float, *, clean: bool = True) -> None:
    """A file as the previous version of the broker wrote it: topic ``a`` at offset 3 of epoch
    ``e1``, its entries in two chunks of entry tuples (one with an entry of a forgotten
    epoch)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.executescript(_SCHEMA)
        c.execute("INSERT INTO meta VALUES ('format', 2), ('clean', ?)", (int(clean),))
        c.execute("INSERT INTO topics VALUES ('a', 'e1', 3, 10000, NULL, NULL)")
        chunks = [
            [("a", "e0", 1, at, None, '"old"'), ("a", "e1", 1, at, "x", '"1"')],
            [("a", "e1", 2, at, None, '"2"'), ("a", "e1", 3, at, None, '"3"')],
        ]
        for cid, entries in enumerate(chunks, 1):
            c.execute(
                "INSERT INTO journal VALUES (?,?,?)", (cid, len(entries), marshal.dumps(entries))
            )


async def test_a_file_of_format_2_is_read_as_it_is_and_written_in_format_3(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.db"
    format_2_file(path, time.time())
    s, j = open_store(path)
    r = s.history("a", StreamPosition(0, "e1"), None)
    assert r.recovered and [(p.offset, p.sender, p.data) for p in r.publications] == [
        (1, "x", '"1"'),
        (2, None, '"2"'),
        (3, None, '"3"'),
    ]
    s.publish("a", '"4"', None)
    await j.flush(s)
    crash(j)  # chunks of both formats in one file, read together
    assert journal(path)[-1] == ("a", 4)
    s2, j2 = open_store(path)
    assert [p.data for p in s2.history("a", None, None).publications] == [
        '"1"',
        '"2"',
        '"3"',
        '"4"',
    ]
    j2.close(s2)
    assert sql(path, "SELECT value FROM meta WHERE key = 'format'") == [(3,)]


def test_a_format_2_file_keeps_its_times(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    format_2_file(path, time.time() - 1000)  # older than the ttl below
    s, j = open_store(path, ttl=600)
    assert s.history("a", None, None).publications == ()
    assert s.position("a") == StreamPosition(3, "e1")
    j.close(s)


def test_a_chunk_that_does_not_decode_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    s.publish("a", '"1"', None)
    j.close(s)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("UPDATE journal SET entries = ?", (encode_chunk(0.0, ["a", "e1", 1]),))
    with pytest.raises(StoreError, match="cannot be read"):
        open_store(path)
