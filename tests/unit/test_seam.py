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


# A paced replay: the backlog is many times the send queue, so it goes out in many pages.
PACED_LIMITS = {"send_queue_max_bytes": 64 * 1024}
PACED_BACKLOG = 60
PACED_DATA = 8000


def data(size: int = 0) -> str:
    return f'"{next(counter)}{"x" * size}"'


def make_probe(worker: Worker, probe: SeamProbe, paced: bool) -> None:
    probe.instrument(worker.bus)
    if paced:
        probe.instrument_pages(worker.bus)


@asynccontextmanager
async def local_worker(
    points: tuple[str, ...], paced: bool = False
) -> AsyncIterator[tuple[Worker, SeamProbe]]:
    async def publish(topic: str) -> Publication:
        # Another client of the same worker: delivered in the publishing call, as the local
        # bus does.
        return await worker.bus.publish(topic, data(PACED_DATA if paced else 0), "publisher")

    async def settle(topic: str, offset: int) -> None:
        pass

    worker = make_worker(limits=PACED_LIMITS) if paced else make_worker()
    probe = SeamProbe(publish, settle, points)
    make_probe(worker, probe, paced)
    assert isinstance(worker.bus, LocalBus)
    yield worker, probe


@asynccontextmanager
async def hub_worker(
    points: tuple[str, ...], paced: bool = False
) -> AsyncIterator[tuple[Worker, SeamProbe]]:
    with tempfile.TemporaryDirectory(prefix="seam") as directory:
        path = Path(directory) / "hub.sock"
        worker_holder: list[Worker] = []
        hub = Hub(lambda topic: worker_holder[0].config.history_rule(topic))
        client = HubClient(str(path), index=0, node="test")

        def ipc_bus(config: Config, handlers: BusHandlers) -> Bus:
            return IpcBus(client, handlers)

        async def publish(topic: str) -> Publication:
            # As another worker's (or the operations listener's) publication reaches the hub.
            return hub.publish(topic, data(PACED_DATA if paced else 0), "publisher")

        async def settle(topic: str, offset: int) -> None:
            # The hub forwards a publication on the worker's link before it answers a later
            # request on that link: one round trip, and the publication has been handed over.
            await client.call("presence", topic)

        limits = PACED_LIMITS if paced else {}
        worker = make_worker(bus_factory=ipc_bus, limits=limits)
        worker_holder.append(worker)
        probe = SeamProbe(publish, settle, points)
        make_probe(worker, probe, paced)
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


@pytest.mark.parametrize("points", [(), POINTS], ids=["pages", "pages+" + "+".join(POINTS)])
@pytest.mark.parametrize("bus", sorted(BUSES))
async def test_a_publication_between_the_pages_of_a_paced_replay_arrives_once(
    bus: str, points: tuple[str, ...]
) -> None:
    # The replay is several times the send queue: it is read and sent in pages, and each
    # page read lets another publication in, held until the replay is done.
    async with BUSES[bus](points, paced=True) as (worker, probe), running(worker) as nursery:
        await check_seam(worker, nursery, probe, since=True, backlog=PACED_BACKLOG)
    assert probe.between_pages >= 2
