"""The router on its own: who gets a publication or a presence event, once, and what it counts.
Queues are recorders and the bus a recorder, so each decision is visible."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.bus.base import PresenceEvent, Publication
from broker.errors import BusUnavailable
from broker.router import FRAME_OVERHEAD, Router, Subscription
from broker.sendqueue import SendQueue
from tests.support.topicref import reference_match


class Queue(SendQueue):
    """Stands in for a connection's SendQueue: records the frames sent to it. (A subclass,
    and without the queue's own state: compiled, the router takes nothing else.)"""

    def __init__(self, max_bytes: int = 1 << 20) -> None:  # no flusher, no socket
        self.frames: list[bytes] = []
        self.max_bytes = max_bytes

    def send(self, frame: bytes, pub: Publication | None = None) -> bool:
        self.frames.append(frame)
        return True

    def texts(self) -> list[dict[str, Any]]:
        return [payload(frame) for frame in self.frames]


def payload(frame: bytes) -> dict[str, Any]:
    """The JSON of one unmasked server text frame."""
    assert frame[0] == 0x81  # FIN, text
    n, start = frame[1] & 0x7F, 2
    if n == 126:
        n, start = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, start = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == start + n
    return json.loads(frame[start:])  # type: ignore[no-any-return]


class Bus:
    """Records what the router asks the bus to watch."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def watch(self, pattern: str) -> None:
        self.calls.append(("watch", pattern))

    async def unwatch(self, pattern: str) -> None:
        self.calls.append(("unwatch", pattern))


def pub(topic: str, offset: int) -> Publication:
    return Publication(topic, offset, "e1", "alice", str(offset))


def router() -> tuple[Router, Bus]:
    r, bus = Router(), Bus()
    r.bus = bus  # type: ignore[assignment]
    return r, bus


async def test_the_bus_watches_a_pattern_from_its_first_subscriber_to_its_last() -> None:
    r, bus = router()
    a = Subscription(Queue(), "t.x")
    b = Subscription(Queue(), "t.x")
    await r.add(a)
    await r.add(b)
    await r.remove(a)
    assert bus.calls == [("watch", "t.x")]
    await r.remove(b)
    assert bus.calls == [("watch", "t.x"), ("unwatch", "t.x")]


@pytest.mark.parametrize("wildcards", [False, True], ids=["exact-only", "with-wildcards"])
async def test_each_session_gets_a_publication_once_and_deliveries_are_counted(
    wildcards: bool,
) -> None:
    r, _ = router()
    q1, q2, q3 = Queue(), Queue(), Queue()
    subs = [Subscription(q1, "t.x"), Subscription(q2, "t.x")]
    if wildcards:
        subs += [Subscription(q1, "t.*"), Subscription(q3, "t.>")]
    for sub in subs:
        await r.add(sub)
    r.on_publication(pub("t.x", 1))
    r.on_publication(pub("t.x", 2))
    r.on_publication(pub("other", 3))  # nobody's
    expected = [q1, q2, q3] if wildcards else [q1, q2]
    for q in expected:
        assert [m["offset"] for m in q.texts()] == [1, 2]
    assert r.publications_in == 3
    assert r.deliveries == 2 * len(expected)


PATTERNS = ["t.x", "t.y", "t.*", "t.>", "*.x", ">", "*.*", "u.x"]


@settings(max_examples=150)
@given(st.lists(st.sets(st.sampled_from(PATTERNS), max_size=4), min_size=1, max_size=6))
def test_whatever_the_patterns_each_session_gets_a_matching_publication_once(
    sessions: list[set[str]],
) -> None:
    r = Router()
    queues = [Queue() for _ in sessions]
    for q, patterns in zip(queues, sessions, strict=True):
        for pattern in sorted(patterns):  # a session subscribes to a pattern at most once
            r.index.add(pattern, Subscription(q, pattern))  # type: ignore[arg-type]
    topics = ["t.x", "t.y", "u.x", "v.w.z"]
    for offset, topic in enumerate(topics, 1):
        r.on_publication(pub(topic, offset))
    for q, patterns in zip(queues, sessions, strict=True):
        wanted = [
            o for o, t in enumerate(topics, 1) if any(reference_match(p, t) for p in patterns)
        ]
        assert [m["offset"] for m in q.texts()] == wanted
    assert r.deliveries == sum(len(q.frames) for q in queues)


async def test_a_pending_subscription_collects_unless_a_live_wildcard_delivers_it() -> None:
    r, _ = router()
    q_both, q_pending = Queue(), Queue()
    exact_both = Subscription(q_both, "t.x", pending=[])
    exact_only = Subscription(q_pending, "t.x", pending=[])
    for sub in (exact_both, exact_only, Subscription(q_both, "t.*")):
        await r.add(sub)
    r.on_publication(pub("t.x", 1))
    # Held back in pending, the seam would drop it as covered by the position announced:
    # a session that also has a live wildcard subscription gets it live, now, once.
    assert [m["offset"] for m in q_both.texts()] == [1]
    assert exact_both.pending == []
    # A session with only the subscription being set up collects it for the stitch.
    assert q_pending.frames == [] and exact_only.pending == [pub("t.x", 1)]
    assert r.deliveries == 1


@pytest.mark.parametrize("wildcards", [False, True], ids=["exact-only", "with-wildcards"])
async def test_what_a_pending_subscription_holds_is_bounded_by_its_queue(wildcards: bool) -> None:
    # A replay is paced by its client, so publications may pile up in pending meanwhile: past
    # the queue's bound they are dropped (history has them) and nothing more is held.
    r, _ = router()
    q = Queue(max_bytes=10 * (len("t.x") + 3 + FRAME_OVERHEAD))
    sub = Subscription(q, "t.x", pending=[])
    await r.add(sub)
    if wildcards:
        await r.add(Subscription(Queue(), "t.*"))
    for offset in range(100, 110):
        r.on_publication(pub("t.x", offset))
    assert sub.pending is not None and len(sub.pending) == 10 and not sub.dropped
    r.on_publication(pub("t.x", 110))
    assert sub.dropped and sub.pending == []
    r.on_publication(pub("t.x", 111))
    assert sub.pending == [] and q.frames == []
    sub.restart_pending()
    r.on_publication(pub("t.x", 112))
    assert sub.pending == [pub("t.x", 112)] and not sub.dropped


async def test_presence_events_reach_only_settled_presence_subscribers() -> None:
    r, _ = router()
    watching, pending, silent = Queue(), Queue(), Queue()
    for sub in (
        Subscription(watching, "room", presence=True),
        Subscription(pending, "room", presence=True, pending=[]),
        Subscription(silent, "room"),
    ):
        await r.add(sub)
    r.on_presence(PresenceEvent("room", "join", "bob"))
    r.on_presence(PresenceEvent("room", "leave", "bob"))
    r.on_presence(PresenceEvent("elsewhere", "join", "bob"))
    assert watching.texts() == [
        {"op": "join", "topic": "room", "client": "bob"},
        {"op": "leave", "topic": "room", "client": "bob"},
    ]
    assert pending.frames == [] and silent.frames == []


async def test_without_wildcards_a_pending_subscription_collects_and_is_not_counted() -> None:
    r, _ = router()
    live, settling = Queue(), Queue()
    pending = Subscription(settling, "t.x", pending=[])
    await r.add(Subscription(live, "t.x"))
    await r.add(pending)
    r.on_publication(pub("t.x", 1))
    assert [m["offset"] for m in live.texts()] == [1]
    assert settling.frames == [] and pending.pending == [pub("t.x", 1)]
    assert r.deliveries == 1


async def test_a_subscription_the_bus_cannot_watch_is_not_left_in_the_index() -> None:
    r, bus = router()

    async def unavailable(pattern: str) -> None:
        raise BusUnavailable("down")

    bus.watch = unavailable  # type: ignore[method-assign]
    sub = Subscription(Queue(), "t.x")
    with pytest.raises(BusUnavailable):
        await r.add(sub)
    assert len(r.index) == 0 and not r.index.has("t.x")
    r.on_publication(pub("t.x", 1))
    assert r.deliveries == 0
