"""The subscribe seam, made deterministic: a publication forced in at each await of subscribe.

A subscription to an exact topic is indexed first (publications for it then collect in its
``pending`` list), then the worker asks the bus to watch the topic, then reads the topic's
position (or its history after ``since``), then replies and stitches: the replayed history,
then what arrived meanwhile and is not covered by the position announced. Each ``await`` of
that sequence is a moment where another client's publication may land, and the exact-recovery
guarantee (no gap, no duplicate) must hold whichever moment it is.

A race that a real load hits now and then proves little; :class:`SeamProbe` instead wraps
methods of a worker's bus so that, at a chosen point, another publisher publishes one
publication to the topic and the probe waits until it has reached the worker (``settle``), or
cannot reach it any more because the worker does not watch the topic yet. The test then knows
where the publication landed, and :func:`check_seam` checks what the client received.
Nothing here is in the broker: the probe replaces bound methods of one bus instance.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
import trio_websocket

from broker.bus.base import Bus, Publication
from broker.worker import Worker
from tests.support.inmemory import connect, recv, token

__all__ = ["POINTS", "TOPIC", "SeamProbe", "check_seam"]

TOPIC = "seam.topic"
# Where subscribe awaits the bus: around its watch, around its position or history read.
POINTS = ("before_watch", "after_watch", "before_read", "after_read")


class SeamProbe:
    """Publishes one publication to :data:`TOPIC` at each point named in ``points`` (once).

    ``publish(topic)`` publishes from elsewhere (another client, worker or node) and returns
    the publication; ``settle(topic, offset)`` returns once the worker under test was handed
    that offset, or will never be (it does not watch the topic yet).
    """

    def __init__(
        self,
        publish: Callable[[str], Awaitable[Publication]],
        settle: Callable[[str, int], Awaitable[None]],
        points: Iterable[str] = (),
    ) -> None:
        self.publish = publish
        self.settle = settle
        self.points = set(points)
        self.hits: list[str] = []
        self.between_pages = 0
        self.latest = 0

    def wrap(
        self, obj: Any, name: str, before: str | None, after: str | None, about: str = TOPIC
    ) -> None:
        """Replace ``obj.name``, an async method whose first argument names a topic, by one
        that stops at point ``before`` ahead of the call and ``after`` behind it, when that
        argument is ``about``."""
        inner = getattr(obj, name)

        @functools.wraps(inner)
        async def at_the_seam(topic: str, *args: Any, **kwargs: Any) -> Any:
            if topic == about:
                await self._point(before)
            result = await inner(topic, *args, **kwargs)
            if topic == about:
                await self._point(after)
            return result

        setattr(obj, name, at_the_seam)

    def instrument(self, bus: Bus) -> None:
        """Put the points of :data:`POINTS` around the bus calls of subscribe."""
        self.wrap(bus, "watch", "before_watch", "after_watch")
        self.wrap(bus, "position", "before_read", "after_read")
        self.wrap(bus, "history", "before_read", "after_read")

    def instrument_pages(self, bus: Bus) -> None:
        """Publish one publication to :data:`TOPIC` before every read of its history but the
        first: between the pages of a paced replay (counted in ``between_pages``)."""
        inner = bus.history
        self.between_pages = 0
        self.latest = 0  # the last offset published between pages
        reads = 0

        @functools.wraps(inner)
        async def between_pages(topic: str, *args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            if topic == TOPIC:
                reads += 1
                if reads > 1:
                    self.between_pages += 1
                    pub = await self.publish(TOPIC)
                    self.latest = max(self.latest, pub.offset)
                    await self.settle(TOPIC, pub.offset)
            return await inner(topic, *args, **kwargs)

        bus.history = between_pages  # type: ignore[method-assign]

    async def _point(self, point: str | None) -> None:
        # Each point once: a bus may call a wrapped method again (a catch-up reads again).
        if point is None or point not in self.points or point in self.hits:
            return
        self.hits.append(point)
        pub = await self.publish(TOPIC)
        await self.settle(TOPIC, pub.offset)


async def _frame(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    frame = await recv(ws)
    while frame.get("op") == "ping":  # the broker's application-level keepalive, if any
        frame = await recv(ws)
    return frame


async def check_seam(
    worker: Worker, nursery: trio.Nursery, probe: SeamProbe, *, since: bool, backlog: int = 2
) -> None:
    """Subscribe to :data:`TOPIC` (with ``since`` = offset 1 when asked) while ``probe`` forces
    publications in at its points; fail unless the client gets every publication after the
    position it resumes from exactly once, in order, after the subscribe reply. ``backlog``
    publications are made before the subscription (what a resuming client replays)."""
    with trio.fail_after(20):
        ws = await connect(worker, nursery, f"/ws?token={token('subscriber')}")
        assert (await _frame(ws))["op"] == "welcome"
        # Publications before anyone here subscribes: what a resuming client replays.
        first = await probe.publish(TOPIC)
        for _ in range(backlog - 1):
            await probe.publish(TOPIC)
        frame: dict[str, Any] = {"op": "subscribe", "topic": TOPIC, "id": 1}
        if since:
            frame["since"] = {"offset": first.offset, "epoch": first.epoch}
        await ws.send_message(json.dumps(frame))
        reply = await _frame(ws)
        assert reply.get("id") == 1 and reply.get("ok"), f"the reply comes first: {reply}"
        assert reply["epoch"] == first.epoch
        assert sorted(probe.hits) == sorted(probe.points), "a seam point was never reached"
        resume_from = first.offset if since else reply["offset"]
        # One more, after the seam: it marks the end of the stream.
        last = await probe.publish(TOPIC)
        offsets: list[int] = []
        while not offsets or offsets[-1] < last.offset:
            message = await _frame(ws)
            assert message.get("op") == "message", message
            offsets.append(message["offset"])
        # A request is served only after the subscribe is done (replay, held publications and
        # all): whatever comes before its reply belongs to the seam too (a duplicate, say).
        await ws.send_message(json.dumps({"op": "ping", "id": "end"}))
        while (message := await _frame(ws)).get("id") != "end":
            offsets.append(message.get("offset", -1))
        # A paced replay may still read pages (and let publications in) after `last`.
        end = max(last.offset, probe.latest)
        assert offsets == list(range(resume_from + 1, end + 1)), (
            f"resuming after {resume_from} (reply {reply}), with publications forced in at "
            f"{probe.hits}: got offsets {offsets}"
        )
        await ws.aclose()
