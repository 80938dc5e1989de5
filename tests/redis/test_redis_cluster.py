"""RedisBus on a three-master Redis Cluster: sharded pub/sub, topics on different shards."""

from __future__ import annotations

import trio
from coredis._utils import hash_slot

from broker.bus.base import ConnKey, PresenceEvent, StreamPosition
from broker.bus.redis import RedisBus
from broker.errors import BusUnavailable

from .busutil import clear_of_a_window_change, running_bus, wait_until
from .conftest import RedisCluster


def topics_on_each_shard(stem: str = "room.n") -> list[str]:
    """One topic per master, each ``stem`` and a number (``redis-cli --cluster create`` splits
    the slots in three equal ranges, in the order the nodes were given)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < 3:
        topic = f"{stem}{i}"
        slot = hash_slot(f"ps:{topic}".encode())
        found.setdefault(min(2, slot * 3 // 16384), topic)
        i += 1
    return [found[k] for k in sorted(found)]


async def test_cluster_sharded_delivery_history_and_presence(redis_cluster: RedisCluster) -> None:
    topics = topics_on_each_shard()
    async with (
        running_bus(redis_cluster.url, node="a", cluster=True) as (a, ra),
        running_bus(redis_cluster.url, node="b", cluster=True) as (b, rb),
    ):
        for t in topics:
            await a.watch(t)
        await a.watch("room.*")  # wildcards too; each publication still delivered once
        await b.watch("other.>")
        # Exact subscriptions are sharded: each shard holds the channel of its own topic.
        for server, topic in zip(redis_cluster.servers, topics, strict=True):
            channels = server.cli("PUBSUB", "SHARDCHANNELS").split()
            assert channels == [f"{{ps:{topic}}}"], (server.port, channels)

        async def burst(bus: RedisBus, who: str) -> None:
            for i in range(10):
                for t in topics:
                    await bus.publish(t, f'"{who}{i}"', who)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, a, "a")
            nursery.start_soon(burst, b, "b")
        await b.publish("room.wild", "1", None)
        await b.publish("other.x.y", "2", None)
        await wait_until(lambda: len(ra.publications) == 61, what="deliveries on node a")
        for t in topics:
            assert ra.offsets(t) == list(range(1, 21))
            hist = await b.history(t, None, None)
            assert list(hist.publications) == [p for p in ra.publications if p.topic == t]
            assert hist.position.offset == 20
            again = await a.history(t, StreamPosition(15, hist.position.epoch), 2)
            assert [p.offset for p in again.publications] == [16, 17] and again.recovered
        assert [p.topic for p in ra.publications if p.topic not in topics] == ["room.wild"]
        await wait_until(lambda: len(rb.publications) == 1)
        assert rb.publications[0].topic == "other.x.y"

        # Presence, sharded as well.
        await b.presence_join(topics[1], "dora", ConnKey("b", 0, 1))
        await wait_until(lambda: len(ra.presence) == 1)
        assert ra.presence == [PresenceEvent(topics[1], "join", "dora")]
        assert await a.presence(topics[1]) == ["dora"]
        await b.presence_leave(topics[1], "dora", ConnKey("b", 0, 1))
        await wait_until(lambda: len(ra.presence) == 2)
        assert await a.presence(topics[1]) == []

        # Unwatching unsubscribes from the shard.
        await a.unwatch(topics[0])
        assert redis_cluster.servers[0].cli("PUBSUB", "SHARDCHANNELS").split() == []


async def test_cluster_reads_of_unknown_topics_store_nothing(redis_cluster: RedisCluster) -> None:
    topics = topics_on_each_shard("unknown.")
    clear_of_a_window_change(redis_cluster.servers[0])
    async with (
        running_bus(redis_cluster.url, node="a", cluster=True) as (a, _),
        running_bus(redis_cluster.url, node="b", cluster=True) as (b, _),
    ):
        announced = [await a.position(t) for t in topics]
        for t in topics:
            await b.history(t, StreamPosition(3, "elsewhere"), None)
            await a.watch(t)
        assert [int(s.cli("DBSIZE")) for s in redis_cluster.servers] == [0, 0, 0]
        for t, position in zip(topics, announced, strict=True):
            pub = await b.publish(t, "1", None)
            assert (position.offset, pub.offset, pub.epoch) == (0, 1, position.epoch)
            resumed = await a.history(t, position, None)
            assert resumed.recovered and [p.data for p in resumed.publications] == ["1"]


async def test_cluster_node_restart_restores_every_subscription(
    redis_cluster: RedisCluster,
) -> None:
    topics = topics_on_each_shard()
    async with (
        running_bus(redis_cluster.url, node="a", cluster=True, reconnect_max=0.5) as (a, ra),
        running_bus(redis_cluster.url, node="b", cluster=True, reconnect_max=0.5) as (b, _),
    ):
        for t in topics:
            await a.watch(t)
        await a.watch("room.*")
        for t in topics:
            await b.publish(t, "1", None)
        await wait_until(lambda: all(ra.offsets(t) == [1] for t in topics))
        # Kill the node the URL names (it holds the first shard), then bring it back.
        redis_cluster.servers[0].kill()
        await wait_until(lambda: not a.is_up, within=10, what="node a sees the outage")
        redis_cluster.servers[0].start()
        redis_cluster.wait_ok()
        await wait_until(lambda: a.is_up and b.is_up, within=15, what="both up again")

        async def publish_all() -> None:
            for t in topics:
                await b.publish(t, "2", None)
            await b.publish("room.extra", "x", None)

        # The restarted shard may answer CLUSTERDOWN for a moment after the state turns ok.
        for _ in range(50):
            try:
                await publish_all()
                break
            except BusUnavailable:
                await trio.sleep(0.1)
        await wait_until(
            lambda: (
                len(ra.offsets("room.extra")) == 1 and all(len(ra.offsets(t)) >= 2 for t in topics)
            ),
            within=10,
            what="deliveries after the restart",
        )
        # The shards that stayed up kept their history; the restarted one starts a new epoch.
        for t in topics:
            pubs = [p for p in ra.publications if p.topic == t]
            assert pubs[-1].data == "2"


def topic_on_slot(slot: int) -> str:
    i = 0
    while hash_slot(f"ps:mv.t{i}".encode()) != slot:
        i += 1
    return f"mv.t{i}"


def move_slot(cluster: RedisCluster, slot: int, source: int, target: int) -> None:
    """Migrate one slot, with its keys, the way redis-cli --cluster reshard does."""
    src, dst = cluster.servers[source], cluster.servers[target]
    src_id, dst_id = src.cli("CLUSTER", "MYID").strip(), dst.cli("CLUSTER", "MYID").strip()
    dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    keys = src.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
    if keys:
        src.cli("MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", *keys)
    for server in cluster.servers:
        server.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)


async def test_cluster_slot_moved_subscription_follows(redis_cluster: RedisCluster) -> None:
    topic = topic_on_slot(0)  # the first master serves slot 0
    async with (
        running_bus(redis_cluster.url, node="a", cluster=True, reconnect_max=0.5) as (a, ra),
        running_bus(redis_cluster.url, node="b", cluster=True, reconnect_max=0.5) as (b, _),
    ):
        await a.watch(topic)
        await b.publish(topic, "1", None)
        await wait_until(lambda: ra.offsets(topic) == [1])
        move_slot(redis_cluster, 0, source=0, target=1)
        try:
            # The channel now lives on the second master, and so does the topic's history.
            for _ in range(100):
                try:
                    await b.publish(topic, "2", None)
                    break
                except BusUnavailable:
                    await trio.sleep(0.1)
            await wait_until(lambda: ra.offsets(topic) == [1, 2], within=15, what="after move")
            assert redis_cluster.servers[1].cli("PUBSUB", "SHARDCHANNELS").split() == [
                f"{{ps:{topic}}}"
            ]
            assert ra.states == [True], "the subscription followed the slot without a reconnect"
        finally:
            move_slot(redis_cluster, 0, source=1, target=0)
