"""Two real broker nodes sharing one redis-server, driven by independent WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

from .busutil import clear_of_a_window_change
from .conftest import RedisCluster, RedisServer


@contextlib.contextmanager
def two_nodes(
    tmp_path: Path,
    redis: RedisServer | RedisCluster,
    *,
    workers: int = 1,
    extra: dict[str, Any] | None = None,
    **bus: Any,
) -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    def config(node: str) -> dict[str, Any]:
        return {"server": {"node_id": node}, "bus": {"url": redis.url, **bus}, **(extra or {})}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        BrokerProcess.start(tmp_path / "a", config("node-a"), workers=workers) as a,
        BrokerProcess.start(tmp_path / "b", config("node-b"), workers=workers) as b,
    ):
        yield a, b


class Client:
    """A WebSocket client that keeps the pushes it reads while waiting for a reply."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []

    async def call(self, **frame: Any) -> dict[str, Any]:
        await self.ws.send(json.dumps(frame))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if "ok" in msg and msg.get("id") == frame.get("id"):
                return msg  # type: ignore[no-any-return]
            self.pushes.append(msg)

    async def next_push(self, op: str, within: float = 10) -> dict[str, Any]:
        for i, msg in enumerate(self.pushes):
            if msg.get("op") == op:
                return self.pushes.pop(i)
        async with asyncio.timeout(within):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg.get("op") == op:
                    return msg  # type: ignore[no-any-return]
                self.pushes.append(msg)

    async def close(self) -> None:
        await self.ws.close()

    def abort(self) -> None:
        self.ws.transport.abort()


async def open_ws(b: BrokerProcess, sub: str) -> Client:
    ws = await connect(
        b.url,
        additional_headers={"Authorization": f"Bearer {b.token(sub)}"},
        subprotocols=["pubsub.v1"],  # type: ignore[list-item]
        max_size=None,
        # A client that stops reading mid-stream must still read the server's close frame
        # behind the backlog, or close() waits for its whole timeout.
        max_queue=None,
    )
    welcome = json.loads(await ws.recv())
    assert welcome["op"] == "welcome" and welcome["client"] == sub
    return Client(ws)


async def call(client: Client, **frame: Any) -> dict[str, Any]:
    return await client.call(**frame)


async def next_push(client: Client, op: str, within: float = 10) -> dict[str, Any]:
    return await client.next_push(op, within)


def readyz(node: BrokerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{node.http_url}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_cross_node_delivery_presence_and_wildcards(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with two_nodes(tmp_path, redis_server, extra=PRESENCE_EVERYWHERE) as (node_a, node_b):

        async def main() -> None:
            alice = await open_ws(node_a, "alice")
            bob = await open_ws(node_b, "bob")
            reply = await call(alice, op="subscribe", topic="chat.room", presence=True, id=1)
            assert reply["ok"] and reply["offset"] == 0, reply
            assert (await next_push(alice, "join"))["client"] == "alice"
            assert (await call(alice, op="subscribe", topic="news.>", id=2))["ok"]
            assert (await call(bob, op="subscribe", topic="chat.room", id=3))["ok"]
            join = await next_push(alice, "join")
            assert join == {"op": "join", "topic": "chat.room", "client": "bob"}
            presence = await call(bob, op="presence", topic="chat.room", id=4)
            assert presence["clients"] == ["alice", "bob"]
            for k in range(20):
                sender = bob if k % 2 else alice
                ok = await call(sender, op="publish", topic="chat.room", data=k, id=100 + k)
                assert ok["ok"], ok
            await call(bob, op="publish", topic="news.eu.fr", data="x", id=5)
            for ws in (alice, bob):
                got = [await next_push(ws, "message") for _ in range(20)]
                assert [m["offset"] for m in got] == list(range(1, 21))
                assert [m["data"] for m in got] == list(range(20))
                assert {m["from"] for m in got} == {"alice", "bob"}
            news = await next_push(alice, "message")
            assert (news["topic"], news["data"]) == ("news.eu.fr", "x")
            await bob.close()
            leave = await next_push(alice, "leave")
            assert leave == {"op": "leave", "topic": "chat.room", "client": "bob"}
            await alice.close()

        asyncio.run(main())


def test_client_moves_to_the_other_node_and_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    clear_of_a_window_change(redis_server)  # the epoch read before publishing holds
    with two_nodes(tmp_path, redis_server) as (node_a, node_b):

        async def main() -> None:
            publisher = await open_ws(node_b, "pub")
            reader = await open_ws(node_a, "reader")
            reply = await call(reader, op="subscribe", topic="feed", id=1)
            epoch = reply["epoch"]
            for k in range(5):
                await call(publisher, op="publish", topic="feed", data=k, id=k)
            got = [await next_push(reader, "message") for _ in range(5)]
            assert [m["offset"] for m in got] == [1, 2, 3, 4, 5]
            reader.abort()  # gone without a goodbye
            for k in range(5, 12):
                await call(publisher, op="publish", topic="feed", data=k, id=k)
            moved = await open_ws(node_b, "reader")
            since = {"offset": 5, "epoch": epoch}
            reply = await call(moved, op="subscribe", topic="feed", since=since, id=2)
            assert reply["ok"] and reply["recovered"] is True, reply
            assert (reply["offset"], reply["epoch"]) == (12, epoch)
            await call(publisher, op="publish", topic="feed", data=12, id=99)
            rest = [await next_push(moved, "message") for _ in range(8)]
            assert [m["offset"] for m in rest] == list(range(6, 14))
            assert [m["data"] for m in rest] == list(range(5, 13))
            await moved.close()
            await publisher.close()

        asyncio.run(main())


@pytest.mark.parametrize("workers", [2])
def test_redis_restart_under_a_steady_stream_between_nodes(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    with two_nodes(tmp_path, redis_server, workers=workers) as (node_a, node_b):

        async def main() -> None:
            reader = await open_ws(node_a, "reader")
            assert (await call(reader, op="subscribe", topic="live", id=1))["ok"]
            publisher = await open_ws(node_b, "pub")
            results: list[dict[str, Any]] = []
            received: list[dict[str, Any]] = []
            stop = asyncio.Event()

            async def publish() -> None:
                k = 0
                while not stop.is_set():
                    k += 1
                    results.append(await call(publisher, op="publish", topic="live", data=k, id=k))
                    await asyncio.sleep(0.01)

            async def read() -> None:
                while True:
                    received.append(await next_push(reader, "message", within=30))

            async def until(predicate: Any, what: str, within: float = 15) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + within
                while not predicate():
                    if loop.time() > deadline:
                        raise AssertionError(f"timed out waiting for {what}")
                    await asyncio.sleep(0.02)

            tasks = [asyncio.create_task(publish()), asyncio.create_task(read())]
            await until(lambda: len(received) >= 10, "first deliveries")
            redis_server.kill()
            await until(
                lambda: any(r.get("error", {}).get("code") == "unavailable" for r in results),
                "publishes refused with unavailable",
            )
            # Readiness says so, for load balancers.
            status, body = await asyncio.to_thread(readyz, node_a)
            assert status == 503 and body["bus"] is False, body
            redis_server.start()
            count = len([r for r in results if r["ok"]])
            await until(lambda: len([r for r in results if r["ok"]]) >= count + 10, "publishing")
            status, body = await asyncio.to_thread(readyz, node_a)
            assert status == 200 and body["bus"] is True, body
            # The reader's node is not deaf: it delivers what was published after the restart.
            target = [r for r in results if r["ok"]][-1]
            await until(
                lambda: any(
                    m["offset"] == target["offset"] and m["epoch"] == target["epoch"]
                    for m in received
                ),
                "deliveries after the restart",
            )
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # In each epoch the reader saw offsets in order and never twice.
            for epoch in {m["epoch"] for m in received}:
                offsets = [m["offset"] for m in received if m["epoch"] == epoch]
                assert offsets == sorted(set(offsets)), offsets
            await reader.close()
            await publisher.close()

        asyncio.run(main())
        # Each bus (one per worker, and the operations listener's) said once that Redis went
        # away and once that it came back.
        downs = node_a.events("bus_down")
        assert workers <= len(downs) <= workers + 1, downs
        assert "Connection lost" in downs[0]["error"] or "connect" in downs[0]["error"]
        assert len(node_a.events("bus_up")) == 2 * len(downs)


def test_killed_node_presence_expires(tmp_path: Path, redis_server: RedisServer) -> None:
    nodes = two_nodes(tmp_path, redis_server, extra=PRESENCE_EVERYWHERE, presence_ttl=1.0)
    with nodes as (node_a, node_b):

        async def main() -> None:
            watcher = await open_ws(node_b, "watcher")
            assert (await call(watcher, op="subscribe", topic="room", presence=True, id=1))["ok"]
            assert (await next_push(watcher, "join"))["client"] == "watcher"
            ghost = await open_ws(node_a, "ghost")
            assert (await call(ghost, op="subscribe", topic="room", id=1))["ok"]
            assert (await next_push(watcher, "join"))["client"] == "ghost"
            node_a.kill()  # the whole node dies: no leave, no goodbye
            loop = asyncio.get_running_loop()
            died = loop.time()
            leave = await next_push(watcher, "leave", within=10)
            assert leave == {"op": "leave", "topic": "room", "client": "ghost"}
            assert loop.time() - died < 1.0 + 1.0 / 3 + 1.5
            presence = await call(watcher, op="presence", topic="room", id=2)
            assert presence["clients"] == ["watcher"]
            await watcher.close()

        asyncio.run(main())


def test_two_nodes_on_a_redis_cluster(tmp_path: Path, redis_cluster: RedisCluster) -> None:
    with two_nodes(tmp_path, redis_cluster, workers=2, cluster=True) as (node_a, node_b):

        async def main() -> None:
            alice = await open_ws(node_a, "alice")
            bob = await open_ws(node_b, "bob")
            topics = [f"room.{i}" for i in range(6)]  # spread over the shards
            for i, topic in enumerate(topics):
                assert (await call(alice, op="subscribe", topic=topic, id=i))["ok"]
            assert (await call(alice, op="subscribe", topic="news.*", id=99))["ok"]
            for k in range(3):
                for i, topic in enumerate(topics):
                    reply = await call(bob, op="publish", topic=topic, data=k, id=100 + 10 * k + i)
                    assert reply["ok"] and reply["offset"] == k + 1, reply
            await call(bob, op="publish", topic="news.x", data="n", id=1000)
            got: dict[str, list[int]] = {}
            for _ in range(3 * len(topics) + 1):
                msg = await next_push(alice, "message")
                got.setdefault(msg["topic"], []).append(msg["offset"])
            assert got == {**{t: [1, 2, 3] for t in topics}, "news.x": [1]}
            await alice.close()
            await bob.close()

        asyncio.run(main())
