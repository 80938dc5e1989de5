"""The in-memory topic store: offsets, epochs, bounded history, expiry, presence."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

from broker.bus.base import ConnKey, Publication, StreamPosition
from broker.config import HistoryRule
from broker.errors import FrameError
from broker.history import TopicStore
from broker.historytable import ENTRY_OVERHEAD, TOPIC_OVERHEAD, entry_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(size: int = 3, ttl: float = 10.0, tombstones: int = 100) -> tuple[TopicStore, Clock]:
    clock = Clock()
    return TopicStore(
        lambda t: HistoryRule(">", size, ttl), clock, tombstone_limit=tombstones
    ), clock


def test_offsets_start_at_one_and_grow_by_one() -> None:
    s, _ = store()
    offsets = [s.publish("t", "1", "a").offset for _ in range(5)]
    assert offsets == [1, 2, 3, 4, 5]
    assert s.publish("u", "1", None).offset == 1
    assert s.position("t").offset == 5


def test_history_is_bounded_and_missed_is_exact() -> None:
    s, _ = store(size=3)
    for i in range(5):
        s.publish("t", str(i), "a")
    epoch = s.position("t").epoch
    full = s.history("t", None, None)
    assert [p.offset for p in full.publications] == [3, 4, 5]
    ok = s.history("t", StreamPosition(3, epoch), None)
    assert ok.recovered and ok.missed is None and [p.offset for p in ok.publications] == [4, 5]
    gap = s.history("t", StreamPosition(0, epoch), None)
    assert not gap.recovered and gap.missed == (1, 2)
    assert [p.offset for p in gap.publications] == [3, 4, 5]
    limited = s.history("t", StreamPosition(2, epoch), 1)
    assert [p.offset for p in limited.publications] == [3]


def test_epoch_mismatch_is_never_recovered() -> None:
    s, _ = store(size=3)
    s.publish("t", "1", "a")
    r = s.history("t", StreamPosition(1, "another-epoch"), None)
    assert not r.recovered and r.missed == (1, 0)
    assert [p.offset for p in r.publications] == [1]


def test_ttl_expires_publications() -> None:
    s, clock = store(size=10, ttl=10)
    s.publish("t", "1", "a")
    clock.now = 5
    s.publish("t", "2", "a")
    clock.now = 12
    r = s.history("t", StreamPosition(0, s.position("t").epoch), None)
    assert r.missed == (1, 1) and [p.offset for p in r.publications] == [2]


def test_idle_topics_are_dropped_and_continue_from_their_tombstone() -> None:
    s, clock = store(size=10, ttl=10)
    for _ in range(3):
        s.publish("t", "x", "a")
    epoch = s.position("t").epoch
    clock.now = 11
    assert s.sweep() == 1 and len(s) == 0
    # Same epoch, offsets continue, and what is gone is reported exactly.
    assert s.position("t") == StreamPosition(3, epoch)
    assert s.publish("t", "y", "a").offset == 4
    r = s.history("t", StreamPosition(1, epoch), None)
    assert r.missed == (2, 3) and [p.offset for p in r.publications] == [4]


def test_a_forgotten_tombstone_starts_a_new_epoch() -> None:
    s, clock = store(size=10, ttl=1, tombstones=1)
    s.publish("t", "x", "a")
    old = s.position("t").epoch
    s.publish("u", "x", "a")
    clock.now = 5
    s.sweep()  # t and u dropped; only u's tombstone fits
    pos = s.position("t")
    assert pos.epoch != old and pos.offset == 0


def test_size_zero_keeps_offsets_but_no_history() -> None:
    s, _ = store(size=0)
    s.publish("t", "x", "a")
    r = s.history("t", StreamPosition(0, s.position("t").epoch), None)
    assert r.publications == () and r.missed == (1, 1)


def test_presence_counts_clients_not_connections() -> None:
    s, _ = store()
    k = [ConnKey("n", 0, i) for i in range(3)]
    assert s.join("t", "alice", k[0])
    assert not s.join("t", "alice", k[1])
    assert s.join("t", "bob", k[2])
    assert s.members("t") == ["alice", "bob"]
    assert not s.leave("t", "alice", k[0])
    assert s.leave("t", "alice", k[1])
    assert not s.leave("t", "alice", k[1])
    assert s.members("t") == ["bob"]


def test_a_dead_workers_connections_leave_at_once() -> None:
    s, _ = store()
    s.join("t", "alice", ConnKey("n", 1, 1))
    s.join("t", "alice", ConnKey("n", 2, 1))
    s.join("t", "bob", ConnKey("n", 1, 2))
    events = s.leave_worker("n", 1)
    assert [(e.kind, e.client) for e in events] == [("leave", "bob")]
    assert s.members("t") == ["alice"]


# --- budgets: bytes per topic and overall, the topic cap, reads that create nothing ----------


def capped(
    *, size: int = 1000, ttl: float = 60.0, topic_bytes: int = 10**9, **kw: int
) -> tuple[TopicStore, Clock]:
    clock = Clock()
    rule = HistoryRule(">", size, ttl, topic_bytes)
    return TopicStore(lambda t: rule, clock, **kw), clock


def one_entry() -> int:
    """The bytes one publication of data "x" * 1000 without sender costs."""
    return entry_bytes(Publication("t", 1, "e", None, "x" * 1000))


def offsets(s: TopicStore, topic: str) -> list[int]:
    return [p.offset for p in s.history(topic, None, None).publications]


def test_bytes_count_data_sender_and_overhead() -> None:
    s, _ = capped()
    s.publish("t", "x" * 1000, None)
    s.publish("t", "x" * 1000, "alice")
    assert one_entry() >= 1000 + ENTRY_OVERHEAD
    assert s.bytes == TOPIC_OVERHEAD + 2 * one_entry() + sys.getsizeof("alice")
    # A character outside Latin-1 makes CPython hold 4 bytes for every character: counted.
    s2, _ = capped()
    s2.publish("t", "x" * 999 + "\U0001f600", None)
    assert s2.bytes >= 4000


def test_the_topic_cap_evicts_the_topics_oldest_and_recovery_reports_it() -> None:
    s, _ = capped(topic_bytes=3 * one_entry())
    for _ in range(5):
        s.publish("t", "x" * 1000, None)
    assert offsets(s, "t") == [3, 4, 5]
    assert s.bytes == TOPIC_OVERHEAD + 3 * one_entry()
    r = s.history("t", StreamPosition(1, s.position("t").epoch), None)
    assert not r.recovered and r.missed == (2, 2)
    stats = s.stats()
    assert stats["history_evicted"]["topic_cap"] == 2
    assert stats["history_evicted_bytes"]["topic_cap"] == 2 * one_entry()


def test_a_publication_over_the_topic_cap_is_not_kept_but_has_its_offset() -> None:
    s, _ = capped(topic_bytes=100)
    pub = s.publish("t", "x" * 1000, None)
    assert pub.offset == 1 and s.bytes == 0 and len(s) == 0
    r = s.history("t", StreamPosition(0, pub.epoch), None)
    assert r.position == StreamPosition(1, pub.epoch) and r.missed == (1, 1)
    assert s.publish("t", "y", None).offset == 2  # the position lived on


def test_the_global_budget_evicts_the_oldest_anywhere_first() -> None:
    s, _ = capped(max_bytes=3 * TOPIC_OVERHEAD + 4 * one_entry())
    for topic in ["a", "b", "a", "c", "b", "c"]:
        s.publish(topic, "x" * 1000, None)
    # Six entries published, four fit: the two oldest ones (a:1 and b:1) are gone.
    assert s.bytes <= 3 * TOPIC_OVERHEAD + 4 * one_entry()
    assert (offsets(s, "a"), offsets(s, "b"), offsets(s, "c")) == ([2], [2], [1, 2])
    epoch = s.position("a").epoch
    r = s.history("a", StreamPosition(0, epoch), None)
    assert not r.recovered and r.missed == (1, 1) and [p.offset for p in r.publications] == [2]
    assert s.stats()["history_evicted"]["budget"] == 2


def test_a_topic_emptied_by_the_budget_keeps_its_position() -> None:
    s, _ = capped(max_bytes=TOPIC_OVERHEAD + 2 * one_entry())
    s.publish("a", "x" * 1000, None)
    epoch = s.position("a").epoch
    s.publish("b", "x" * 1000, None)
    s.publish("b", "x" * 1000, None)  # pushes a:1 out, and with it topic a
    assert len(s) == 1 and offsets(s, "a") == []
    r = s.history("a", StreamPosition(0, epoch), None)
    assert r.position == StreamPosition(1, epoch) and r.missed == (1, 1)
    assert s.publish("a", "y", None) == Publication("a", 2, epoch, None, "y")


def test_many_topics_stay_under_the_budget() -> None:
    budget = 50 * (one_entry() + TOPIC_OVERHEAD)
    s, _ = capped(max_bytes=budget, topic_bytes=5 * one_entry())
    for i in range(2000):
        s.publish(f"t{i % 300}", "x" * 1000, None)
        assert s.bytes <= budget
    stats = s.stats()
    # Each topic holds one entry (300 topics in turn): 50 topics' worth fit.
    assert stats["history_entries"] == stats["history_topics"] == 50
    assert s.bytes == budget
    evicted = sum(stats["history_evicted"].values())
    assert evicted == 2000 - 50
    # The stale marks of evicted entries do not pile up.
    assert len(s._order) <= 2 * s.entries + 1024


async def test_ttl_evictions_are_counted_and_idle_topics_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s = TopicStore(lambda t: HistoryRule(">", 10, 5.0, 10**6), trio.current_time)
    s.publish("t", "x", None)
    await trio.sleep(3)
    s.publish("t", "y", None)
    await trio.sleep(3)
    # The first entry aged out (seen by a read), the second not yet; the topic stays.
    assert offsets(s, "t") == [2] and s.sweep() == 0
    await trio.sleep(3)
    assert s.sweep() == 1 and len(s) == 0 and s.bytes == 0 and s.entries == 0
    assert s.stats()["history_evicted"]["ttl"] == 2


def test_reads_create_no_state() -> None:
    s, _ = capped()
    before = (len(s), len(s._tombstones), len(s._presence))
    pos = s.position("never.published")
    s.history("never.published", StreamPosition(3, "old"), 10)
    s.history("other", None, None)
    assert s.members("other") == []
    assert not s.leave("other", "alice", ConnKey("n", 0, 1))
    assert (len(s), len(s._tombstones), len(s._presence)) == before
    # The epoch a read announced is the one the first publication carries.
    assert pos.offset == 0 and s.position("never.published") == pos
    assert s.publish("never.published", "1", None).epoch == pos.epoch


def test_the_topic_cap_refuses_new_topics_with_an_error() -> None:
    s, clock = capped(ttl=10.0, max_topics=3)
    for topic in "abc":
        s.publish(topic, "1", None)
    with pytest.raises(FrameError) as refused:
        s.publish("d", "1", None)
    assert refused.value.code == "too_many_topics"
    assert s.stats()["topics_refused"] == 1 and len(s) == 3
    assert s.publish("a", "2", None).offset == 2  # known topics go on
    assert s.position("d").offset == 0  # nothing was published
    # Once topics age out, new ones are admitted again.
    clock.now = 11
    assert s.publish("d", "1", None).offset == 1


def test_size_zero_topics_hold_no_table_entry() -> None:
    s, _ = capped(size=0, max_topics=1)
    for topic in "abc":
        assert s.publish(topic, "1", None).offset == 1
    assert len(s) == 0
    assert s.publish("a", "2", None).offset == 2


def test_a_forgotten_topic_never_gets_an_old_epoch_again() -> None:
    s, clock = capped(size=10, ttl=1.0, tombstone_limit=1)
    seen = set()
    for life in range(5):
        pub = s.publish("t", "x", None)
        assert pub.offset == 1 and pub.epoch not in seen
        seen.add(pub.epoch)
        clock.now += 2
        s.publish(f"other{life}", "x", None)
        clock.now += 2
        s.sweep()  # t and other are dropped; only one tombstone fits: t's is forgotten


# --- at the edges: a resume right at the oldest held offset, ttls to the second --------------


def test_resuming_just_before_the_oldest_held_offset_is_recovered() -> None:
    s, _ = store(size=3)
    for i in range(5):
        s.publish("t", str(i), "a")
    epoch = s.position("t").epoch
    edge = s.history("t", StreamPosition(2, epoch), None)  # 3 is the oldest held
    assert edge.recovered and edge.missed is None
    assert [p.offset for p in edge.publications] == [3, 4, 5]
    caught_up = s.history("t", StreamPosition(5, epoch), None)
    assert caught_up.recovered and caught_up.publications == ()


def test_a_publication_expires_at_its_ttl_not_before() -> None:
    s, clock = store(size=10, ttl=10)
    s.publish("t", "1", "a")
    clock.now = 9.5
    assert [p.offset for p in s.history("t", None, None).publications] == [1]
    clock.now = 10  # exactly ttl old: gone (the read at 9.5 kept the topic, not it)
    assert s.history("t", None, None).publications == ()


def test_a_topic_is_swept_only_once_idle_for_its_whole_ttl() -> None:
    s, clock = store(size=10, ttl=10)
    s.publish("t", "x", "a")
    clock.now = 9.9
    assert s.sweep() == 0 and len(s) == 1
    clock.now = 10
    assert s.sweep() == 1 and len(s) == 0


def test_the_oldest_tombstone_is_forgotten_first() -> None:
    s, clock = store(size=10, ttl=1, tombstones=2)
    epochs = {}
    for topic in ("a", "b", "c"):
        s.publish(topic, "x", None)
        epochs[topic] = s.position(topic).epoch
        clock.now += 0.1
    clock.now = 5
    assert s.sweep() == 3
    assert s.position("a").epoch != epochs["a"]  # forgotten: a new epoch
    assert s.position("b") == StreamPosition(1, epochs["b"])
    assert s.position("c") == StreamPosition(1, epochs["c"])


def test_leaving_what_was_never_joined_changes_nothing() -> None:
    s, _ = store()
    k = ConnKey("n", 0, 1)
    assert s.join("t", "alice", k)
    assert not s.leave("t", "bob", k)
    assert not s.leave("t", "alice", ConnKey("n", 0, 2))
    assert not s.leave("elsewhere", "alice", k)
    assert s.members("t") == ["alice"]
    assert s.leave("t", "alice", k) and s.members("t") == []


@pytest.mark.parametrize("data", ['"x"', "1" * 5000, '"é"', '"😀"', '"\\u00e9 ascii"'])
@pytest.mark.parametrize("sender", [None, "alice", "ünïcode"])
def test_entry_bytes_are_what_python_holds(data: str, sender: str | None) -> None:
    held = sys.getsizeof(data) + (0 if sender is None else sys.getsizeof(sender))
    assert entry_bytes(Publication("t", 1, "e", sender, data)) == held + ENTRY_OVERHEAD
    store = TopicStore(lambda topic: HistoryRule(">", 10, 60.0), lambda: 0.0)
    store.publish("t", data, sender)
    assert store.bytes == held + ENTRY_OVERHEAD + TOPIC_OVERHEAD
