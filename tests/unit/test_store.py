"""History on disk (broker.store) with a real SQLite file: what a graceful stop keeps, what a
crash loses and how it is reported, budgets on load, batching, damaged files."""

from __future__ import annotations

import contextlib
import marshal
import sqlite3
import time
from pathlib import Path

import pytest

from broker import store as store_module
from broker.bus.base import StreamPosition
from broker.config import HistoryRule, StoreConfig
from broker.errors import FrameError
from broker.history import TopicStore
from broker.store import DiskJournal, StoreError
from broker.storefile import PAGE_SIZE, Batch, Database, decode_chunk, encode_entries
from tests.unit.test_dev_banner import run_dev


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_store(
    path: Path, *, size: int = 100, ttl: float = 600.0, tombstones: int = 100, ack: str = "memory"
) -> tuple[TopicStore, DiskJournal]:
    """A topic store brought back from ``path`` (as a broker does at start)."""
    topics = TopicStore(lambda t: HistoryRule(">", size, ttl), Clock(), tombstone_limit=tombstones)
    journal = DiskJournal(StoreConfig(path=str(path), ack=ack))
    journal.start(topics)
    return topics, journal


def crash(journal: DiskJournal) -> None:
    """Lose the process: nothing more is written, the file is not marked clean."""
    assert journal.db is not None
    journal.db.close()
    journal.db = None


def sql(path: Path, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on the file (closed again, so the broker can lock it)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        return c.execute(statement).fetchall()


def rows(path: Path, table: str) -> int:
    return int(sql(path, f"SELECT count(*) FROM {table}")[0][0])  # type: ignore[call-overload]


def offsets(result: object) -> list[int]:
    return [p.offset for p in result.publications]  # type: ignore[attr-defined]


def test_a_graceful_stop_keeps_epochs_offsets_and_history(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    for i in range(5):
        s.publish("a", f'"{i}"', "alice")
    s.publish("b", "1", None)
    before = {t: s.position(t) for t in ("a", "b")}
    j.close(s)

    s2, j2 = open_store(path)
    assert {t: s2.position(t) for t in ("a", "b")} == before
    r = s2.history("a", StreamPosition(2, before["a"].epoch), None)
    assert r.recovered and offsets(r) == [3, 4, 5]
    assert [(p.sender, p.data) for p in r.publications] == [
        ("alice", '"2"'),
        ("alice", '"3"'),
        ("alice", '"4"'),
    ]
    assert s2.publish("a", "6", None).offset == 6
    j2.close(s2)


async def test_a_crash_loses_at_most_the_unflushed_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    for _ in range(3):
        s.publish("t", "1", None)
    await j.flush(s)  # offsets 1..3 are on disk
    for _ in range(4):
        s.publish("t", "2", None)  # 4..7 were delivered, never written
    epoch = s.position("t").epoch
    crash(j)

    s2, j2 = open_store(path)
    pos = s2.position("t")
    assert pos.epoch == epoch and pos.offset >= 7  # resumes past every offset it may have used
    # A client that saw 7 is told exactly what is gone, up to where the topic resumes.
    late = s2.history("t", StreamPosition(7, epoch), None)
    assert not late.recovered and late.missed == (8, pos.offset) and offsets(late) == []
    # One that saw 1 gets what is still held up to the hole, and nothing past it; reading on
    # from there, it is told exactly what the crash lost. A read never crosses the hole.
    early = s2.history("t", StreamPosition(1, epoch), None)
    assert early.recovered and early.missed is None and offsets(early) == [2, 3]
    at_hole = s2.history("t", StreamPosition(3, epoch), None)
    assert not at_hole.recovered and at_hole.missed == (4, pos.offset) and offsets(at_hole) == []
    assert offsets(s2.history("t", None, None)) == [1, 2, 3]  # still held, for reading
    nxt = s2.publish("t", "3", None)
    assert nxt.offset == pos.offset + 1  # no offset used twice
    again = s2.history("t", StreamPosition(5, epoch), None)
    assert again.missed == (6, pos.offset) and offsets(again) == [nxt.offset]
    other = s2.history("t", StreamPosition(5, "another"), None)
    assert other.missed == (1, pos.offset) and offsets(other) == [nxt.offset]
    assert s2.history("t", StreamPosition(nxt.offset, epoch), None).recovered
    j2.close(s2)

    # The gap survives a graceful restart until what precedes it is gone.
    s3, j3 = open_store(path, size=100)
    assert offsets(s3.history("t", StreamPosition(1, epoch), None)) == [2, 3]
    assert s3.history("t", StreamPosition(3, epoch), None).missed == (4, pos.offset)
    j3.close(s3)
    s4, j4 = open_store(path, size=1)  # only the newest is kept: the hole is behind it
    assert s4.history("t", StreamPosition(pos.offset, epoch), None).recovered
    assert s4.history("t", StreamPosition(1, epoch), None).missed == (2, pos.offset)
    j4.close(s4)


def test_a_topic_never_written_gets_a_new_epoch_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    s.publish("new", "1", None)
    epoch = s.position("new").epoch
    crash(j)
    s2, j2 = open_store(path)
    r = s2.history("new", StreamPosition(1, epoch), None)
    assert not r.recovered and s2.position("new").epoch != epoch
    j2.close(s2)


async def test_offsets_past_the_reservation_wait_for_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RESERVE_MIN", 5)  # blocks of 1 offset
    s, j = open_store(tmp_path / "h.db")
    s.publish("t", "1", None)
    await j.flush(s)  # reserved on disk: up to 1 + 6 (4 batches at 1 a batch, 2 blocks)
    for _ in range(6):
        s.publish("t", "1", None)
    with pytest.raises(FrameError) as refused:
        s.publish("t", "1", None)
    assert refused.value.code == "unavailable" and j.stats()["refused"] == 1
    await j.flush(s)
    assert s.publish("t", "1", None).offset == 8
    j.close(s)


async def test_reservations_are_whole_blocks_checked_at_their_first_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RESERVE_MIN", 50)  # blocks of 5 offsets
    path = tmp_path / "h.db"
    s, j = open_store(path)
    s.publish("t", "1", None)
    await j.flush(s)
    with pytest.raises(FrameError):
        for _ in range(100):
            s.publish("t", "1", None)
    used = s.position("t").offset
    epoch = s.position("t").epoch
    crash(j)
    # 1 + 50, up to a whole block: every offset used is within what the disk reserved.
    assert used == 55 and sql(path, "SELECT reserved FROM topics") == [(55,)]
    s2, j2 = open_store(path)
    assert s2.position("t") == StreamPosition(55, epoch)
    for _ in range(45):  # up to 100: past half of the new reservation (105)
        s2.publish("t", "2", None)
    await j2.flush(s2)  # noted at the first offset of a block past half: renewed
    for _ in range(10):
        s2.publish("t", "3", None)
    assert s2.position("t").offset == 110
    j2.close(s2)


def journal(path: Path) -> list[tuple[str, int]]:
    """``(topic, offset)`` of every entry the file's journal holds, in the order written."""
    return [
        (e[0], e[2])
        for (blob,) in sql(path, "SELECT entries FROM journal ORDER BY id")
        for e in decode_chunk(blob)  # type: ignore[arg-type]
    ]


def test_ttl_and_budgets_apply_to_what_is_loaded_and_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    for _ in range(10):
        s.publish("kept", "1", None)
        s.publish("old", "1", None)
    j.close(s)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        for cid, blob in c.execute("SELECT id, entries FROM journal").fetchall():
            aged = [(*e[:3], e[3] - 1000 * (e[0] == "old"), *e[4:]) for e in decode_chunk(blob)]
            c.execute("UPDATE journal SET entries = ? WHERE id = ?", (encode_entries(aged), cid))
    s2, j2 = open_store(path, size=4, ttl=600)
    assert offsets(s2.history("kept", None, None)) == [7, 8, 9, 10]
    old = s2.history("old", StreamPosition(10, s2.position("old").epoch), None)
    assert old.recovered and offsets(old) == [] and s2.position("old").offset == 10
    j2.close(s2)
    # The file held far more than memory now holds: the start rewrote what is held, alone.
    assert journal(path) == [("kept", o) for o in (7, 8, 9, 10)]


def test_forgotten_topics_leave_the_file(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path, size=0, tombstones=2)
    for topic in ("a", "b", "c", "d"):
        s.publish(topic, "1", None)
    j.close(s)
    assert rows(path, "topics") == 2


def test_a_new_file_has_large_pages_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    # Large pages: a commit writes its changed pages to the WAL two system calls a page.
    s, j = open_store(tmp_path / "new.db")
    assert j.db is not None and j.db.page_size() == PAGE_SIZE > 4096
    j.close(s)
    assert sql(tmp_path / "new.db", "PRAGMA page_size") == [(PAGE_SIZE,)]

    old = tmp_path / "old.db"
    sql(old, "PRAGMA page_size=4096")
    sql(old, "PRAGMA journal_mode=WAL")  # fixes the page size, as older brokers made it
    s, j = open_store(old)
    s.publish("a", "1", None)
    epoch = s.position("a").epoch
    j.close(s)
    s, j = open_store(old)
    assert s.position("a") == StreamPosition(1, epoch)
    assert j.db is not None and j.db.page_size() == 4096
    j.db.maintain()  # counts its vacuum in the file's own pages
    j.close(s)


async def test_many_publications_make_few_commits(tmp_path: Path) -> None:
    s, j = open_store(tmp_path / "h.db", size=100_000)
    base = j.stats()["batches"]
    for i in range(20_000):
        s.publish(f"t{i % 50}", "1", None)
    await j.flush(s)
    stats = j.stats()
    assert stats["batches"] - base == 1 and stats["rows"] == 20_000
    j.close(s)


async def test_ack_on_disk_waits_for_the_commit(tmp_path: Path) -> None:
    s, j = open_store(tmp_path / "h.db", ack="disk")
    answers: list[object] = []
    s.publish("t", "1", None)
    j.acknowledge(answers.append)
    assert answers == []
    await j.flush(s)
    assert answers == [None]
    j.close(s)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_file_is_moved_aside_and_a_new_epoch_starts(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    for i in range(2000):
        s.publish(f"t{i % 20}", '"' + "x" * 200 + '"', None)
    epoch = s.position("t1").epoch
    j.close(s)
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 3)
    s2, j2 = open_store(path)
    assert s2.position("t1").epoch != epoch  # clients learn that history was lost
    assert list(tmp_path.glob("h.db.corrupt-*"))
    assert "store_corrupt" in capsys.readouterr().out
    j2.close(s2)


def test_a_store_held_by_another_broker_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    with pytest.raises(StoreError, match="another broker"):
        open_store(path)
    j.close(s)


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"h\.db"):
        open_store(blocker / "h.db")


def test_the_development_broker_keeps_history_under_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config, _ = run_dev(tmp_path, monkeypatch, capsys, "--http-listen", "127.0.0.1:0")
    assert config.store.path == ".pubsub-dev/history.db"
    # A development file from before history went to disk keeps it there too.
    (tmp_path / ".pubsub-dev" / "broker.toml").write_text(f'[auth]\njwt_secret = "{"s" * 40}"\n')
    _, config, _ = run_dev(tmp_path, monkeypatch, capsys, "--http-listen", "127.0.0.1:0")
    assert config.store.path == ".pubsub-dev/history.db"


@pytest.mark.parametrize("moving", [False, True])
async def test_entries_evicted_before_they_were_written_leave_no_silent_hole(
    tmp_path: Path, moving: bool
) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path, size=1)
    clock = s._clock
    assert isinstance(clock, Clock)
    s.publish("t", "1", None)
    await j.flush(s)  # offset 1 on disk
    for _ in range(5):
        # With the clock moving, 1's eviction is of an entry written before: not reported.
        clock.now += moving
        s.publish("t", "2", None)  # 2..5 evicted before any batch: only 6 is written
    await j.flush(s)
    epoch = s.position("t").epoch
    crash(j)
    s2, j2 = open_store(path, size=100)
    # The file holds 1 and 6 (1's chunk is not trimmed yet): only 6 is history again, and
    # a client at 1 is told that 2 up to where the topic resumes are gone.
    end = s2.position("t").offset
    r = s2.history("t", StreamPosition(1, epoch), None)
    assert not r.recovered and r.missed == (2, end) and offsets(r) == []
    assert offsets(s2.history("t", None, None)) == [6]
    j2.close(s2)


def test_the_store_has_metrics_beside_history() -> None:
    from broker.brokermetrics import history_snapshot
    from broker.metrics import render

    store = {"batches": 3, "rows": 40, "failures": 1, "bytes": 9}
    stats = {"history_bytes": 1, "store": {**store, "compacted": 12, "journal_entries": 31}}
    text = render(history_snapshot(stats))
    for line in (
        "pubsub_store_batches_total 3",
        "pubsub_store_rows_total 40",
        "pubsub_store_failures_total 1",
        "pubsub_store_bytes 9",
        "pubsub_store_refused_total 0",
        "pubsub_store_compacted_total 12",
        "pubsub_store_journal_entries 31",
    ):
        assert line in text
    assert "pubsub_store" not in render(history_snapshot({"history_bytes": 1}))


@pytest.mark.parametrize(
    ("store", "key"),
    [
        ({"ack": "sometimes"}, "store.ack"),
        ({"flush_interval": 0}, "store.flush_interval"),
        ({"flush_interval": 60}, "store.flush_interval"),
        ({"path": "."}, "store.path"),
        ({"paht": "x"}, "store.paht"),
    ],
)
def test_bad_store_settings_name_the_key(store: dict[str, object], key: str) -> None:
    from broker.config import parse_config
    from broker.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_config({"auth": {"jwt_secret": "s" * 40}, "store": store})
    assert refused.value.key == key


async def test_a_topic_forgotten_and_published_again_between_batches_keeps_only_its_new_epoch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path, tombstones=1)
    for _ in range(3):  # on disk, in the journal, with offsets the new epoch will use too
        s.publish("a", "1", None)
    for _ in range(10):  # held: the file is not compacted, "a"'s old entries stay in it
        s.publish("c", "1", None)
    await j.flush(s)
    s.publish("a", "old", None)  # held for the next batch, then the topic is forgotten:
    s._drop(s._topics["a"], "ttl")  # its last entry goes (as if aged out) ...
    s.publish("b", "1", None)
    s._drop(s._topics["b"], "ttl")  # ... and another topic's tombstone pushes its out
    assert s.publish("a", "new", None).offset == 1  # a new epoch
    epoch = s.position("a").epoch
    await j.flush(s)
    crash(j)
    s2, j2 = open_store(path)
    assert s2.position("a").epoch == epoch
    assert [p.data for p in s2.history("a", None, None).publications] == ["new"]
    j2.close(s2)


async def test_when_commits_fall_behind_a_batch_reads_history_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PENDING_MAX_BYTES", 1000)
    path = tmp_path / "h.db"
    s, j = open_store(path, size=5)
    for i in range(100):  # far past the bound: what waits is each topic's name, not its entries
        s.publish(f"t{i % 4}", str(i), None)
    assert j.stats()["queued_topics"] <= 4 + 1000 // 50
    await j.flush(s)
    crash(j)
    s2, j2 = open_store(path, size=100)
    assert [p.data for p in s2.history("t1", None, None).publications] == [
        str(i) for i in range(81, 100, 4)
    ]
    j2.close(s2)


def spy_commits(monkeypatch: pytest.MonkeyPatch, *, fail_first: bool = False) -> list[Batch]:
    """Every batch committed from now on (the first one failing, with ``fail_first``)."""
    batches: list[Batch] = []
    original = Database.commit

    def commit(self: Database, batch: Batch) -> None:
        batches.append(batch)
        if fail_first and len(batches) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        original(self, batch)

    monkeypatch.setattr(Database, "commit", commit)
    return batches


async def test_a_batch_is_one_chunk_and_rows_only_where_they_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    batches = spy_commits(monkeypatch)
    for i in range(300):
        s.publish(f"t{i % 100}", str(i), None)
    await j.flush(s)
    for i in range(300):
        s.publish(f"t{i % 100}", str(i), None)
    await j.flush(s)
    new, known = batches
    # New topics get their row with their first entries; known ones, far from the end of
    # their reservation, none. Every entry goes into one chunk, in publication order.
    assert len(new.rows) == 100 and known.rows == []
    assert known.blob is not None
    assert [(e[0], e[2]) for e in decode_chunk(known.blob)] == [
        (f"t{i % 100}", 4 + i // 100) for i in range(300)
    ]
    j.close(s)
    assert len(journal(path)) == 600 and rows(path, "journal") == 2


async def test_compaction_keeps_what_history_holds_and_bounds_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMPACT_ENTRIES", 100)
    monkeypatch.setattr(store_module, "COMPACT_SLACK", 20)
    path = tmp_path / "h.db"
    s, j = open_store(path, size=5)
    s.publish("quiet", '"once"', None)  # held all along: compaction must write it again
    for r in range(200):
        for t in range(10):
            s.publish(f"t{t}", str(r), None)
        await j.flush(s)
        assert j.stats()["journal_entries"] <= 4 * s.entries
    assert j.stats()["compacted"] > 0
    before = {
        t: [(p.offset, p.data) for p in s.history(t, None, None).publications]
        for t in ("quiet", "t3")
    }
    epochs = {t: s.position(t).epoch for t in before}
    held = s.entries
    crash(j)
    on_disk = journal(path)
    assert len(on_disk) <= 4 * held and ("quiet", 1) in on_disk
    s2, j2 = open_store(path, size=5)
    for t, held in before.items():
        assert s2.position(t).epoch == epochs[t]
        assert [(p.offset, p.data) for p in s2.history(t, None, None).publications] == held
    j2.close(s2)


async def test_a_failed_commit_is_written_with_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "h.db"
    s, j = open_store(path)
    s.publish("a", "1", None)
    await j.flush(s)
    s.publish("a", "2", None)
    s.publish("b", "1", None)
    s.publish("b", "2", None)
    batches = spy_commits(monkeypatch, fail_first=True)
    await j.flush(s)
    assert j.stats()["failures"] == 1 and len(batches) == 1
    s.publish("a", "3", None)
    await j.flush(s)
    epochs = {t: s.position(t).epoch for t in ("a", "b")}
    crash(j)
    s2, j2 = open_store(path)
    assert {t: s2.position(t).epoch for t in ("a", "b")} == epochs
    # Each offset once, though the retry wrote some twice.
    assert [p.data for p in s2.history("a", None, None).publications] == ["1", "2", "3"]
    assert [p.data for p in s2.history("b", None, None).publications] == ["1", "2"]
    j2.close(s2)


_FORMAT_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE topics (
    topic TEXT PRIMARY KEY, epoch TEXT NOT NULL, offset INTEGER NOT NULL,
    reserved INTEGER NOT NULL, gap_from INTEGER, gap_to INTEGER
) WITHOUT ROWID;
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, last INTEGER NOT NULL, entries BLOB NOT NULL
);
"""


@pytest.mark.parametrize("clean", [True, False])
def test_a_file_of_the_previous_layout_is_converted(
    tmp_path: Path, clean: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.db"
    at = time.time()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.executescript(_FORMAT_1)
        c.execute("INSERT INTO meta VALUES ('format', 1), ('clean', ?)", (int(clean),))
        c.execute("INSERT INTO topics VALUES ('a', 'e1', 3, 10003, NULL, NULL)")
        chunks = [
            ("a", 2, [(1, at, "x", '"1"'), (2, at, None, '"2"')]),
            ("a", 3, [(3, at, None, '"3"')]),
        ]
        chunks.append(("forgotten", 1, [(1, at, None, '"f"')]))
        for cid, (topic, last, entries) in enumerate(chunks, 1):
            c.execute(
                "INSERT INTO chunks VALUES (?,?,?,?)", (cid, topic, last, marshal.dumps(entries))
            )
    s, j = open_store(path)
    assert "store_migrated" in capsys.readouterr().out
    r = s.history("a", StreamPosition(1, "e1"), None)
    assert [(p.offset, p.sender, p.data) for p in r.publications] == [
        (2, None, '"2"'),
        (3, None, '"3"'),
    ]
    if clean:
        assert r.recovered and s.position("a") == StreamPosition(3, "e1")
    else:  # the reservation of the previous layout holds: resumes past it, says what is gone
        assert s.position("a") == StreamPosition(10003, "e1")
        assert s.history("a", StreamPosition(3, "e1"), None).missed == (4, 10003)
    assert s.history("forgotten", None, None).publications == ()
    j.close(s)
    assert sql(path, "SELECT value FROM meta WHERE key = 'format'") == [(3,)]
    assert sql(path, "SELECT name FROM sqlite_master WHERE name = 'chunks'") == []


async def test_a_compaction_whose_commit_fails_leaves_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMPACT_SLACK", 0)
    path = tmp_path / "h.db"
    s, j = open_store(path, size=2)
    for r in range(5):
        for t in range(3):
            s.publish(f"t{t}", str(r), None)
        await j.flush(s)  # the journal holds 15 entries, history 6
    s.publish("t0", "5", None)
    batches = spy_commits(monkeypatch, fail_first=True)
    await j.flush(s)  # compacts, and the commit fails: nothing was deleted
    assert batches[0].deletes and j.stats()["failures"] == 1
    await j.flush(s)  # compacted again, and committed
    first = batches[0].deletes  # the chunks it meant to delete are still to be compacted
    assert len(batches) == 2 and batches[1].deletes[: len(first)] == first
    held = {t: [p.data for p in s.history(t, None, None).publications] for t in ("t0", "t1")}
    crash(j)
    assert len(journal(path)) <= 2 * 6 + 3
    s2, j2 = open_store(path, size=2)
    assert {t: [p.data for p in s2.history(t, None, None).publications] for t in held} == held
    assert held == {"t0": ["4", "5"], "t1": ["3", "4"]}
    j2.close(s2)
