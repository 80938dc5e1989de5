"""Topics nobody has published to, on the Redis bus: reading them stores nothing in Redis, the
epoch a read announces is the one the first publication carries (from any node), so recovery
from a position read before it is exact, and a topic whose keys were evicted never gets its
old epoch back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.bus.base import StreamPosition
from tests.support.broker import BrokerProcess

from .busutil import clear_of_a_window_change, running_bus, two_buses, wait_until
from .conftest import RedisServer
from .test_redis_nodes import Client, open_ws, two_nodes


def key_count(redis: RedisServer) -> int:
    return int(redis.cli("DBSIZE"))


async def test_reads_of_unknown_topics_store_nothing(redis_server: RedisServer) -> None:
    clear_of_a_window_change(redis_server)
    async with two_buses(redis_server.url) as ((a, _), (b, _)):
        announced = {}
        for i in range(100):
            topic = f"made.up.{i}"
            announced[topic] = await a.position(topic)
            await a.history(topic, None, None)
            await b.history(topic, StreamPosition(7, "elsewhere"), 5)
            await b.history(topic, None, 0, newest=True)
            await a.watch(topic)  # reads where the topic stands, as a subscribe does
        assert key_count(redis_server) == 0
        # Every node announces the same epoch, offset 0; the first publication carries it.
        for topic, position in announced.items():
            assert position.offset == 0
            assert await b.position(topic) == position
        first = await b.publish("made.up.3", '"hi"', None)
        assert (first.offset, first.epoch) == (1, announced["made.up.3"].epoch)
        assert key_count(redis_server) == 2  # its meta hash and its history stream
        # Different topics get different epochs.
        assert len({p.epoch for p in announced.values()}) == len(announced)


async def test_a_position_read_before_the_first_publication_resumes_exactly(
    redis_server: RedisServer,
) -> None:
    clear_of_a_window_change(redis_server)
    async with two_buses(redis_server.url) as ((a, ra), (b, _)):
        await a.watch("feed")
        before = await a.position("feed")
        pubs = [await b.publish("feed", str(i), "p") for i in range(3)]
        assert {p.epoch for p in pubs} == {before.epoch}
        # Live delivery continues the announced epoch: no epoch change for a subscriber.
        await wait_until(lambda: ra.offsets("feed") == [1, 2, 3], what="live delivery")
        assert {p.epoch for p in ra.publications} == {before.epoch}
        # A client that read the position on one node resumes on the other: nothing missed.
        resumed = await b.history("feed", before, None)
        assert resumed.recovered and resumed.missed is None
        assert [p.offset for p in resumed.publications] == [1, 2, 3]


async def test_an_evicted_topic_never_gets_its_old_epoch_back(redis_server: RedisServer) -> None:
    async with running_bus(redis_server.url) as (bus, _):
        old = [await bus.publish("t.evicted", str(i), None) for i in range(2)]
        unknown = await bus.position("t.unknown")
        assert int(redis_server.cli("EXISTS", "{ps:t.evicted}:meta")) == 1
        # Redis full under volatile-ttl: every key with an expiry goes (the broker's all do).
        redis_server.cli("CONFIG", "SET", "maxmemory-policy", "volatile-ttl")
        redis_server.cli("CONFIG", "SET", "maxmemory", "1")
        redis_server.cli("SET", "push", "out", check=False)  # refused, after evicting
        redis_server.cli("CONFIG", "SET", "maxmemory", "0")
        assert key_count(redis_server) == 0
        again = await bus.publish("t.evicted", "new", None)
        assert again.offset == 1 and again.epoch != old[0].epoch
        lost = await bus.history("t.evicted", StreamPosition(2, old[0].epoch), None)
        assert not lost.recovered and lost.missed == (1, 0)
        assert [p.data for p in lost.publications] == ["new"]
        # The epoch announced for a topic nobody published to moves on too: a client that read
        # it before the eviction hears of a gap rather than assume an unbroken stream.
        assert (await bus.position("t.unknown")).epoch != unknown.epoch


async def reads_then_resume(
    node_a: BrokerProcess, node_b: BrokerProcess, redis: RedisServer
) -> None:
    reader = await open_ws(node_a, "reader")
    watcher = await open_ws(node_a, "watcher")
    publisher = await open_ws(node_b, "publisher")
    epochs = {}
    for i in range(40):
        reply = await reader.call(op="subscribe", topic=f"made.up.{i}", id=i)
        assert reply["ok"] and reply["offset"] == 0, reply
        epochs[i] = reply["epoch"]
        since = {"offset": 4, "epoch": "elsewhere"}
        reply = await reader.call(op="history", topic=f"also.{i}", since=since, id=f"h{i}")
        assert reply["ok"] and reply["messages"] == [], reply
    assert key_count(redis) == 0
    epoch = epochs[7]
    assert (await watcher.call(op="subscribe", topic="made.up.7", id=1))["epoch"] == epoch
    reader.abort()
    for k in range(3):
        reply = await publisher.call(op="publish", topic="made.up.7", data=k, id=k)
        assert (reply["offset"], reply["epoch"]) == (k + 1, epoch), reply
    live = [await watcher.next_push("message") for _ in range(3)]
    assert [(m["offset"], m["epoch"]) for m in live] == [(1, epoch), (2, epoch), (3, epoch)]
    moved: Client = await open_ws(node_b, "reader")
    since = {"offset": 0, "epoch": epoch}
    reply = await moved.call(op="subscribe", topic="made.up.7", since=since, id=1)
    assert reply["ok"] and reply["recovered"] is True, reply
    assert "missed" not in reply and (reply["offset"], reply["epoch"]) == (3, epoch)
    replayed = [await moved.next_push("message") for _ in range(3)]
    assert [m["data"] for m in replayed] == [0, 1, 2]
    for client in (moved, watcher, publisher):
        await client.close()


@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
def test_brokers_read_unknown_topics_without_keys_and_resume_exactly(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    clear_of_a_window_change(redis_server)
    with two_nodes(tmp_path, redis_server, workers=workers) as (node_a, node_b):
        asyncio.run(asyncio.wait_for(reads_then_resume(node_a, node_b, redis_server), 60))
