"""Permissions end to end (reliability case 10): through a real worker's sessions, over
in-memory streams, no generated subscription or publication ever moves a denied topic.

The clients hold ``a.>`` allowed and ``a.secret.>`` denied, for publishing and subscribing;
a privileged publisher sends every generated topic, secret ones included. The oracle is
independent of the broker's pattern algebra: a pattern may be subscribed only if every topic
it can match is allowed, decided by brute force over all topics of the generated segments
(with one segment more than the longest pattern, which is enough for ``>`` to reach
``a.secret.x``), and matching is a regular expression.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.inmemory import call, connect, make_worker, recv, running, token
from tests.support.topicref import reference_match

RULES = ["a.>", "!a.secret.>"]
SEGMENTS = ["a", "b", "secret", "x"]
MARKER = "a.x.end"  # allowed, subscribed last: once it arrives, every delivery before it has

topics = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.sampled_from([*SEGMENTS, "*"]), min_size=1, max_size=3))
    if draw(st.booleans()):
        segs.append(">")
    return ".".join(segs)


def allowed(topic: str) -> bool:
    return reference_match("a.>", topic) and not reference_match("a.secret.>", topic)


UNIVERSE = [
    ".".join(segs)
    for n in range(1, 6)
    for segs in itertools.product([*SEGMENTS, "other"], repeat=n)
]


def may_subscribe(pattern: str) -> bool:
    return all(allowed(t) for t in UNIVERSE if reference_match(pattern, t))


async def scenario(subscriptions: list[str], publications: list[str]) -> None:
    worker = make_worker(
        limits={"publish_rate": 1e6, "publish_burst": 10**6, "max_subscriptions": 64}
    )
    limited = {"pubsub": {"publish": RULES, "subscribe": RULES}}
    async with running(worker) as nursery:
        sub = await connect(worker, nursery, f"/ws?token={token('sub', **limited)}")
        pub = await connect(worker, nursery, f"/ws?token={token('pub', **limited)}")
        root = await connect(worker, nursery, f"/ws?token={token('root')}")
        for ws in (sub, pub, root):
            assert (await recv(ws))["op"] == "welcome"

        accepted: list[str] = []
        for n, pattern in enumerate(dict.fromkeys([*subscriptions, MARKER])):
            reply = await call(sub, op="subscribe", topic=pattern, id=n)
            if reply.get("ok"):
                accepted.append(pattern)
            else:
                assert reply["error"]["code"] == "forbidden", (pattern, reply)
            assert bool(reply.get("ok")) == may_subscribe(pattern), (pattern, reply)

        expected: list[tuple[str, int]] = []
        for n, topic in enumerate(publications):
            reply = await call(pub, op="publish", topic=topic, data=n, id=n)
            assert bool(reply.get("ok")) == allowed(topic), (topic, reply)
            await call(root, op="publish", topic=topic, data=n, id=n)
            if any(reference_match(p, topic) for p in accepted):
                # once from the limited publisher (if it was allowed), once from root
                expected += [(topic, n)] * (1 + allowed(topic))
        await call(root, op="publish", topic=MARKER, data=-1, id=-1)

        delivered: list[tuple[str, int]] = []
        while True:
            frame = await next_message(sub)
            if frame["topic"] == MARKER and frame["data"] == -1:
                break
            delivered.append((frame["topic"], frame["data"]))
        assert not [t for t, _ in delivered if not allowed(t)], delivered
        assert delivered == expected
        nursery.cancel_scope.cancel()


async def next_message(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    while True:
        frame = json.loads(await ws.get_message())
        if frame.get("op") == "message":
            return frame  # type: ignore[no-any-return]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(patterns(), max_size=6), st.lists(topics, max_size=12))
def test_no_denied_topic_is_ever_delivered(
    subscriptions: list[str], publications: list[str]
) -> None:
    trio.run(scenario, subscriptions, publications)
