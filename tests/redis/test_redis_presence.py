"""Opt-in presence on the Redis bus, two real nodes: a topic that does not track presence gets
no presence keys in Redis, a tracked one is readable only with the permission, and with both
members, joins and leaves cross the nodes as before."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support.broker import BrokerProcess

from .conftest import RedisServer
from .test_redis_nodes import Client, two_nodes

TRACK_ROOMS = {"presence": {"topics": ["room.>"]}}


async def open_as(b: BrokerProcess, sub: str, **claims: Any) -> Client:
    """A client of node ``b``; with ``claims`` its token carries a ``pubsub`` claim."""
    token = b.token(sub, subscribe=[">"], **claims) if claims else b.token(sub)
    ws = await connect(
        b.url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["pubsub.v1"],  # type: ignore[list-item]
    )
    assert json.loads(await ws.recv())["op"] == "welcome"
    return Client(ws)


def presence_keys(redis: RedisServer) -> set[str]:
    keys = redis.cli("--scan", "--pattern", "*").split()
    return {k for k in keys if k.endswith(":pres") or ":pc:" in k}


def members_metric(b: BrokerProcess) -> float:
    with urllib.request.urlopen(f"{b.http_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pubsub_presence_members{")
    )


@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
def test_presence_is_opt_in_across_nodes(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    with two_nodes(tmp_path, redis_server, workers=workers, extra=TRACK_ROOMS) as (a, b):

        async def main() -> None:
            alice = await open_as(a, "alice")  # default permissions: may not read presence
            reader = await open_as(b, "reader", presence=[">"])
            for i, topic in enumerate(("news.x", "room.1")):
                assert (await alice.call(op="subscribe", topic=topic, id=i))["ok"]
            assert (await alice.call(op="ping", id="settled"))["ok"]  # its joins are done
            # Untracked: no presence keys at all, and a clear answer.
            assert presence_keys(redis_server) == {"{ps:room.1}:pres", "{ps:room.1}:pc:alice"}
            reply = await reader.call(op="presence", topic="news.x", id=1)
            assert reply["error"]["code"] == "not_tracked"
            reply = await reader.call(op="subscribe", topic="news.x", presence=True, id=2)
            assert reply["error"]["code"] == "not_tracked"
            # Tracked, but no permission.
            reply = await alice.call(op="presence", topic="room.1", id=3)
            assert reply["error"]["code"] == "forbidden"
            reply = await alice.call(op="subscribe", topic="room.2", presence=True, id=4)
            assert reply["error"]["code"] == "forbidden"
            # Both: members and events across the nodes.
            assert (await reader.call(op="subscribe", topic="room.1", presence=True, id=5))["ok"]
            assert (await reader.next_push("join"))["client"] == "reader"
            members = (await reader.call(op="presence", topic="room.1", id=6))["clients"]
            assert members == ["alice", "reader"]
            assert members_metric(a) == 1 and members_metric(b) == 1  # each node's own entry
            await alice.close()
            leave = await reader.next_push("leave")
            assert leave == {"op": "leave", "topic": "room.1", "client": "alice"}
            await reader.close()

        asyncio.run(asyncio.wait_for(main(), 60))
