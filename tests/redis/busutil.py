"""Helpers for driving RedisBus instances ("nodes") against a real Redis in tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from broker.bus.base import BusHandlers, PresenceEvent, Publication
from broker.bus.redis import RedisBus

from .conftest import RedisServer

#: A node's default ``position_ttl``: the window that new topics' epochs are derived in.
DAY = 86_400.0


@attrs.define
class Recorder:
    """Collects what a bus hands to its worker."""

    publications: list[Publication] = attrs.Factory(list)
    presence: list[PresenceEvent] = attrs.Factory(list)
    states: list[bool] = attrs.Factory(list)

    @property
    def handlers(self) -> BusHandlers:
        return BusHandlers(self.publications.append, self.presence.append, self.states.append)

    def offsets(self, topic: str) -> list[int]:
        return [p.offset for p in self.publications if p.topic == topic]


async def wait_until(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = trio.current_time() + within
    while not predicate():
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_bus(
    url: str,
    *,
    node: str = "node1",
    size: int = 100,
    ttl: float = 600.0,
    rule: Callable[[str], tuple[int, float]] | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[RedisBus, Recorder]]:
    recorder = Recorder()
    bus = RedisBus(
        url,
        node=node,
        history_rule=rule or (lambda topic: (size, ttl)),
        handlers=recorder.handlers,
        **kwargs,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        try:
            yield bus, recorder
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def two_buses(
    url: str, **kwargs: Any
) -> AsyncIterator[tuple[tuple[RedisBus, Recorder], tuple[RedisBus, Recorder]]]:
    """Two nodes, "a" and "b", on one Redis, each with its :class:`Recorder`."""
    async with (
        running_bus(url, node="a", **kwargs) as a,
        running_bus(url, node="b", **kwargs) as b,
    ):
        yield a, b


def epoch_window(redis: RedisServer, position_ttl: float = DAY) -> int:
    """The window (of ``position_ttl`` seconds, Redis time) that new epochs are derived in."""
    seconds, micros = redis.cli("TIME").split()
    return (int(seconds) * 1000 + int(micros) // 1000) // int(position_ttl * 1000)


def clear_of_a_window_change(redis: RedisServer, within: int = 60) -> None:
    """Return once the epoch window of a node's default ``position_ttl`` (a day, from midnight
    UTC) will not change for ``within`` seconds, so that a test may expect a topic's first
    publication to carry the epoch a read announced before it."""
    while True:
        seconds = int(redis.cli("TIME").split()[0])
        if seconds // int(DAY) == (seconds + within) // int(DAY):
            return
        time.sleep(1.0)
