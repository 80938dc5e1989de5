"""The subscribe seam (tests/support/seam.py): a publication forced in at each await point of
subscribe, with and without ``since``, on the in-process bus and on the machine's hub (a real
:class:`~broker.hub.Hub` over a Unix socket, the worker on an :class:`~broker.bus.ipc.IpcBus`).
The client must get every publication after the position it resumes from exactly once."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from broker.bus.base import Bus, BusHandlers, Publication
from broker.bus.ipc import HubClient, IpcBus
from broker.bus.local import LocalBus
from broker.config import Config
from broker.hub import Hub
from broker.worker import Worker
from tests.support.inmemory import make_worker, running
from tests.support.seam import POINTS, SeamProbe, check_seam

# Each point alone, and all of them in one subscribe.
CASES = [(p,) for p in POINTS] + [POINTS]
counter = itertools.count()


def data() -> str:
    return str(next(counter))


@asynccontextmanager
async def local_worker(points: tuple[str, ...]) -> AsyncIterator[tuple[Worker, SeamProbe]]:
    async def publish(topic: str) -> Publication:
        # Another client of the same worker: delivered in the publishing call, as the local
        # bus does.
        return await worker.bus.publish(topic, data(), "publisher")

    async def settle(topic: str, offset: int) -> None:
        pass

    worker = make_worker()
    probe = SeamProbe(publish, settle, points)
    probe.instrument(worker.bus)
    assert isinstance(worker.bus, LocalBus)
    yield worker, probe


@asynccontextmanager
async def hub_worker(points: tuple[str, ...]) -> AsyncIterator[tuple[Worker, SeamProbe]]:
    with tempfile.TemporaryDirectory(prefix="seam") as directory:
        path = Path(directory) / "hub.sock"
        worker_holder: list[Worker] = []
        hub = Hub(lambda topic: worker_holder[0].config.history_rule(topic))
        client = HubClient(str(path), index=0, node="test")

        def ipc_bus(config: Config, handlers: BusHandlers) -> Bus:
            return IpcBus(client, handlers)

        async def publish(topic: str) -> Publication:
            # As another worker's (or the operations listener's) publication reaches the hub.
            return hub.publish(topic, data(), "publisher")

        async def settle(topic: str, offset: int) -> None:
            # The hub forwards a publication on the worker's link before it answers a later
            # request on that link: one round trip, and the publication has been handed over.
            await client.call("presence", topic)

        worker = make_worker(bus_factory=ipc_bus)
        worker_holder.append(worker)
        probe = SeamProbe(publish, settle, points)
        probe.instrument(worker.bus)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.serve, path)
            await nursery.start(client.run)
            yield worker, probe
            nursery.cancel_scope.cancel()


BUSES = {"local": local_worker, "hub": hub_worker}


@pytest.mark.parametrize("since", [False, True], ids=["fresh", "since"])
@pytest.mark.parametrize("points", CASES, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("bus", sorted(BUSES))
async def test_a_publication_at_any_await_of_subscribe_arrives_once(
    bus: str, points: tuple[str, ...], since: bool
) -> None:
    async with BUSES[bus](points) as (worker, probe), running(worker) as nursery:
        await check_seam(worker, nursery, probe, since=since)
