"""The subscribe seam (tests/support/seam.py): a publication forced in at each await point of
subscribe, with and without ``since``, on the in-process bus, on the machine's hub (a real
:class:`~broker.hub.Hub` over a Unix socket, the worker on an :class:`~broker.bus.ipc.IpcBus`)
and with topics owned by workers (a :class:`~broker.bus.sharded.ShardedBus`, the topic owned
by the worker itself or by another over a Unix socket).
The client must get every publication after the position it resumes from exactly once."""

from __future__ import annotations

import functools
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
from broker.bus.sharded import ShardedBus
from broker.config import Config, HistoryRule
from broker.hub import Hub
from broker.owner import TopicOwner, owner_index
from broker.worker import Worker
from tests.support.inmemory import make_worker, running
from tests.support.seam import POINTS, TOPIC, SeamProbe, check_seam

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


@asynccontextmanager
async def owned_worker(
    points: tuple[str, ...], paced: bool = False, *, local: bool = False
) -> AsyncIterator[tuple[Worker, SeamProbe]]:
    """A worker on a :class:`~broker.bus.sharded.ShardedBus`, one of two owners: the topic's
    owner itself (``local``: the other owner's publications reach it in-process) or not (they
    reach it over its link to the owner, a real socket)."""
    with tempfile.TemporaryDirectory(prefix="seam") as directory:
        paths = [str(Path(directory) / f"shard{i}.sock") for i in range(2)]
        topic_owner = owner_index(TOPIC, 2)
        index = topic_owner if local else 1 - topic_owner
        worker_holder: list[Worker] = []

        def rule(topic: str) -> HistoryRule:
            return worker_holder[0].config.history_rule(topic)

        other = TopicOwner(rule)
        buses: list[ShardedBus] = []

        def sharded_bus(config: Config, handlers: BusHandlers) -> Bus:
            owner = TopicOwner(rule)
            buses.append(ShardedBus(handlers, paths=paths, index=index, node="t", owner=owner))
            return buses[0]

        async def publish(topic: str) -> Publication:
            # Another worker's publication, as it reaches the topic's owner.
            owner = buses[0].owner if local else other
            assert owner is not None
            return owner.publish(topic, data(PACED_DATA if paced else 0), "publisher")

        async def settle(topic: str, offset: int) -> None:
            # In-process it was handed over in the publishing call; over the link, the owner
            # forwards it before it answers a later request on that link.
            if not local:
                await buses[0].shards[topic_owner].call("presence", topic)

        worker = make_worker(bus_factory=sharded_bus, limits=PACED_LIMITS if paced else {})
        worker_holder.append(worker)
        probe = SeamProbe(publish, settle, points)
        make_probe(worker, probe, paced)
        async with trio.open_nursery() as nursery:
            await nursery.start(other.serve, Path(paths[1 - index]))
            yield worker, probe
            nursery.cancel_scope.cancel()


BUSES = {
    "local": local_worker,
    "hub": hub_worker,
    "owned-here": functools.partial(owned_worker, local=True),
    "owned-elsewhere": owned_worker,
}


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
