"""The in-memory topic store: offsets, epochs, bounded history, expiry, presence."""

from __future__ import annotations

from broker.bus.base import ConnKey, StreamPosition
from broker.config import HistoryRule
from broker.history import TopicStore


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
