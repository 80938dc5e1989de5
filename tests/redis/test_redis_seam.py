"""The subscribe seam (tests/support/seam.py) on the Redis bus: a publication from another node
forced in at each await point of subscribe, and at the Redis bus's own awaits inside a watch
(after it noted where the topic stood, after it subscribed), with and without ``since``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from broker.bus.base import Bus, BusHandlers, Publication
from broker.bus.redis import RedisBus
from broker.config import Config
from broker.worker import Worker
from tests.support.inmemory import make_worker, running
from tests.support.seam import POINTS, TOPIC, SeamProbe, check_seam

from .busutil import running_bus, wait_until
from .conftest import RedisServer

# Inside RedisBus.watch: after reading the topic's baseline, after subscribing to its channel.
REDIS_POINTS = ("after_baseline", "after_subscribe")
CASES = [(p,) for p in (*POINTS, *REDIS_POINTS)] + [(*POINTS, *REDIS_POINTS)]


@asynccontextmanager
async def redis_worker(
    url: str, points: tuple[str, ...]
) -> AsyncIterator[tuple[Worker, SeamProbe, trio.Nursery]]:
    """The worker's RedisBus (node "a"), instrumented, and a probe publishing from node "b"."""
    handed: list[int] = []
    async with running_bus(url, node="b") as (other, _):

        def redis_bus(config: Config, handlers: BusHandlers) -> Bus:
            def on_publication(pub: Publication) -> None:
                handed.append(pub.offset)
                handlers.on_publication(pub)

            recording = BusHandlers(on_publication, handlers.on_presence, handlers.on_state)
            return RedisBus(url, node="a", history_rule=config.history_rule, handlers=recording)

        async def publish(topic: str) -> Publication:
            return await other.publish(topic, '"x"', "publisher")

        worker = make_worker(bus_factory=redis_bus)
        bus = worker.bus
        assert isinstance(bus, RedisBus)

        async def settle(topic: str, offset: int) -> None:
            # A node that watches the topic gets it over its subscriber connection; one that
            # does not yet never gets it live (its watch or a position read catches up).
            if bus._wanted(topic):
                await wait_until(lambda: offset in handed, what=f"offset {offset} handed over")

        probe = SeamProbe(publish, settle, points)
        probe.instrument(bus)
        probe.wrap(bus, "_meta", None, "after_baseline")
        async with running(worker) as nursery:
            assert bus._exact_ps is not None
            probe.wrap(
                bus._exact_ps, "subscribe", None, "after_subscribe", about=bus._names.channel(TOPIC)
            )
            yield worker, probe, nursery


@pytest.mark.parametrize("since", [False, True], ids=["fresh", "since"])
@pytest.mark.parametrize("points", CASES, ids=lambda c: "+".join(c))
async def test_a_publication_at_any_await_of_subscribe_arrives_once(
    redis_server: RedisServer, points: tuple[str, ...], since: bool
) -> None:
    async with redis_worker(redis_server.url, points) as (worker, probe, nursery):
        await check_seam(worker, nursery, probe, since=since)
