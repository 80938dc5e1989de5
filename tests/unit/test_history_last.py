"""Reading the newest N of a topic's history (``history`` with ``last``): what is selected,
and which offsets ``missed`` names, alone and after ``since``, at the boundaries, across
eviction gaps and epochs. The rules are one function for every bus (:func:`recovery`), checked
here against their definition offset by offset."""

from __future__ import annotations

import pytest

from broker.bus.base import Publication, StreamPosition, recovery
from broker.config import HistoryRule
from broker.history import TopicStore
from broker.historyread import select_history

EPOCH = "e1"


def held(first: int, last: int) -> list[Publication]:
    """The publications first..last of topic ``t`` in :data:`EPOCH`."""
    return [Publication("t", o, EPOCH, None, str(o)) for o in range(first, last + 1)]


def newest(
    first: int, latest: int, n: int, since: StreamPosition | None = None
) -> tuple[list[int], bool, tuple[int, int] | None]:
    """Offsets, ``recovered`` and ``missed`` of the newest ``n`` after ``since`` of a topic
    holding first..latest."""
    r = select_history(held(first, latest), StreamPosition(latest, EPOCH), since, n, newest=True)
    return [p.offset for p in r.publications], r.recovered, r.missed


def test_last_alone_selects_the_newest_oldest_first() -> None:
    assert newest(3, 8, 2) == ([7, 8], True, None)


@pytest.mark.parametrize(
    ("n", "offsets"),
    [
        (0, []),
        (1, [8]),
        (6, [3, 4, 5, 6, 7, 8]),
        (7, [3, 4, 5, 6, 7, 8]),
        (1000, [3, 4, 5, 6, 7, 8]),
    ],
    ids=["zero", "one", "exactly_held", "one_more_than_held", "far_more_than_held"],
)
def test_last_at_the_boundaries(n: int, offsets: list[int]) -> None:
    assert newest(3, 8, n) == (offsets, True, None)


def test_last_of_a_topic_that_holds_nothing() -> None:
    assert newest(1, 0, 5) == ([], True, None)


def test_last_after_since_takes_the_newest_of_what_follows() -> None:
    since = StreamPosition(5, EPOCH)
    assert newest(3, 8, 2, since) == ([7, 8], True, None)
    assert newest(3, 8, 10, since) == ([6, 7, 8], True, None)
    assert newest(3, 8, 3, since) == ([6, 7, 8], True, None)
    assert newest(3, 8, 5, StreamPosition(8, EPOCH)) == ([], True, None)


def test_an_eviction_gap_is_missed_only_where_it_was_asked_for() -> None:
    # Offsets 1 and 2 are gone; the client saw offset 0.
    since = StreamPosition(0, EPOCH)
    assert newest(3, 8, 6, since) == ([3, 4, 5, 6, 7, 8], True, None)  # skipped by choice
    assert newest(3, 8, 7, since) == ([3, 4, 5, 6, 7, 8], False, (2, 2))
    assert newest(3, 8, 100, since) == ([3, 4, 5, 6, 7, 8], False, (1, 2))


def test_a_topic_whose_newest_is_gone_reports_it() -> None:
    # Offsets 1..3 published, none held (aged out): the newest one asked for is gone.
    assert newest(4, 3, 1, StreamPosition(1, EPOCH)) == ([], False, (3, 3))


def test_another_epoch_is_never_recovered_and_missed_stays_in_the_window() -> None:
    since = StreamPosition(7, "old")
    assert newest(3, 8, 2, since) == ([7, 8], False, (7, 6))  # nothing asked for is gone
    assert newest(3, 8, 7, since) == ([3, 4, 5, 6, 7, 8], False, (2, 2))
    assert newest(3, 8, 100, since) == ([3, 4, 5, 6, 7, 8], False, (1, 2))


def test_limit_and_last_read_the_two_ends_alike() -> None:
    pubs = held(3, 8)
    pos = StreamPosition(8, EPOCH)
    since = StreamPosition(4, EPOCH)
    oldest = select_history(pubs, pos, since, 2)
    latest = select_history(pubs, pos, since, 2, newest=True)
    assert [p.offset for p in oldest.publications] == [5, 6]
    assert [p.offset for p in latest.publications] == [7, 8]
    assert (oldest.recovered, oldest.missed) == (latest.recovered, latest.missed) == (True, None)


def test_returned_and_missed_are_exactly_what_was_asked_for() -> None:
    """For every position, count and epoch: the offsets returned and the offsets named missed
    are disjoint and together exactly the newest n of those after ``since`` (after 0 in
    another epoch); ``recovered`` is whether nothing of them is missed (never, across
    epochs)."""
    latest = 9
    for first in range(1, latest + 2):
        for epoch in (EPOCH, "old"):
            for s in range(latest + 2):
                for n in range(latest + 3):
                    since = StreamPosition(s, epoch)
                    offsets, recovered, missed = newest(first, latest, n, since)
                    after = s if epoch == EPOCH else 0
                    asked = list(range(max(after + 1, latest - n + 1), latest + 1))
                    gone = [] if missed is None else list(range(missed[0], missed[1] + 1))
                    assert sorted(offsets + gone) == asked, (first, epoch, s, n)
                    assert recovered == (epoch == EPOCH and not gone)
                    assert (missed is None) == recovered


def test_recovery_without_last_is_unchanged() -> None:
    pos = StreamPosition(8, EPOCH)
    assert recovery(pos, 3, None, None) == (True, None)
    assert recovery(pos, 3, StreamPosition(0, EPOCH), None) == (False, (1, 2))
    assert recovery(pos, 3, StreamPosition(2, EPOCH), None) == (True, None)
    assert recovery(pos, 3, StreamPosition(2, "old"), None) == (False, (1, 2))
    assert recovery(pos, 1, StreamPosition(2, "old"), None) == (False, (1, 0))


def test_the_store_reads_the_newest_after_size_evictions() -> None:
    s = TopicStore(lambda t: HistoryRule(">", 3, 60.0), lambda: 0.0)
    for i in range(6):
        s.publish("t", str(i), None)
    epoch = s.position("t").epoch
    r = s.history("t", None, 2, newest=True)
    assert [p.offset for p in r.publications] == [5, 6] and r.recovered
    r = s.history("t", StreamPosition(1, epoch), 5, newest=True)
    assert [p.offset for p in r.publications] == [4, 5, 6]
    assert (r.recovered, r.missed) == (False, (2, 3))
