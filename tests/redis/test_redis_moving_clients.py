"""Two nodes, one Redis, independent clients moving between the nodes while Redis and a node
are restarted: every subscriber's stream is checked offset by offset."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import attrs

from tests.support.broker import BrokerProcess

from .conftest import RedisServer
from .test_redis_nodes import Client, open_ws, two_nodes

TOPIC = "feed.main"


@attrs.define
class Stream:
    """What one subscriber saw, checked as it arrives."""

    name: str
    epoch: str | None = None
    offset: int = 0  # the last offset received (or declared missed) in ``epoch``
    received: int = 0
    missed: list[tuple[str, int, int]] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    trace: list[Any] = attrs.Factory(list)

    def on_reply(self, reply: dict[str, Any], since: dict[str, Any] | None) -> None:
        self.trace.append(
            ("reply", since, {k: reply.get(k) for k in ("offset", "recovered", "missed")})
        )
        if since is None:
            self.epoch, self.offset = reply["epoch"], reply["offset"]
            return
        if reply["recovered"]:
            if reply["epoch"] != since["epoch"]:
                self.errors.append(f"recovered across epochs: {reply}")
            return
        first, last = reply["missed"]["from"], reply["missed"]["to"]
        if reply["epoch"] == since["epoch"]:
            if first != since["offset"] + 1:
                self.errors.append(f"missed range does not start after since: {reply} {since}")
        elif first != 1:
            self.errors.append(f"missed range in a new epoch must start at 1: {reply}")
        self.missed.append((reply["epoch"], first, last))
        self.epoch = reply["epoch"]
        self.offset = max(last, first - 1)

    def on_message(self, msg: dict[str, Any], published: dict[tuple[str, int], Any]) -> None:
        self.trace.append(("msg", msg["epoch"][:4], msg["offset"]))
        key = (msg["epoch"], msg["offset"])
        if key in published and published[key] != msg["data"]:
            self.errors.append(f"wrong data at {key}: {msg['data']} != {published[key]}")
        if msg["epoch"] != self.epoch:
            # History was lost while connected (Redis restarted empty): a new epoch starts.
            if msg["offset"] != 1:
                self.errors.append(f"new epoch {msg['epoch']} starts at {msg['offset']}")
            self.epoch, self.offset = msg["epoch"], msg["offset"]
        elif msg["offset"] != self.offset + 1:
            acked = {o: (msg["epoch"], o) in published for o in range(self.offset, msg["offset"])}
            self.errors.append(
                f"{self.name}: expected {self.offset + 1}, got {msg['offset']}; "
                f"acknowledged: {acked}; last events: {self.trace[-30:]}"
            )
            self.offset = max(self.offset, msg["offset"])
        else:
            self.offset = msg["offset"]
        self.received += 1

    @property
    def position(self) -> dict[str, Any] | None:
        return None if self.epoch is None else {"offset": self.offset, "epoch": self.epoch}


def test_clients_move_between_nodes_while_redis_and_a_node_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    rng = random.Random(11)
    # History large enough for every absence: recovery must then always be exact, and the
    # only loss is Redis restarting empty (a new epoch).
    history = {"history": [{"pattern": ">", "size": 5000, "ttl": 600}]}
    with two_nodes(tmp_path, redis_server, workers=2, extra=history, presence_ttl=2.0) as nodes:
        published: dict[tuple[str, int], Any] = {}
        streams = [Stream(f"sub{i}") for i in range(3)]

        async def connect_somewhere(sub: str) -> tuple[Client, BrokerProcess]:
            while True:
                node = rng.choice(nodes)
                try:
                    return await open_ws(node, sub), node
                except Exception:  # the node is restarting: try again, maybe the other one
                    await asyncio.sleep(0.05)

        async def publisher(stop: asyncio.Event) -> None:
            k = 0
            client: Client | None = None
            while not stop.is_set():
                if client is None:
                    client, _ = await connect_somewhere("publisher")
                k += 1
                try:
                    reply = await client.call(op="publish", topic=TOPIC, data=k, id=k)
                except Exception:
                    client = None  # its node went away; the publication's fate is unknown
                    continue
                if reply["ok"]:
                    published[(reply["epoch"], reply["offset"])] = k
                elif reply["error"]["code"] != "unavailable":
                    raise AssertionError(reply)
                await asyncio.sleep(0.005)

        async def subscriber(stream: Stream, stop: asyncio.Event) -> None:
            while not stop.is_set():
                client, _ = await connect_somewhere(stream.name)
                since = stream.position
                frame: dict[str, Any] = {"op": "subscribe", "topic": TOPIC, "id": "s"}
                if since is not None:
                    frame["since"] = since
                try:
                    reply = await client.call(**frame)
                    if not reply["ok"]:
                        assert reply["error"]["code"] == "unavailable", reply
                        await asyncio.sleep(0.1)
                        continue
                    stream.on_reply(reply, since)
                    budget = rng.randint(5, 60)
                    async with asyncio.timeout(rng.uniform(0.3, 1.5)):
                        while budget:
                            msg = await client.next_push("message")
                            stream.on_message(msg, published)
                            budget -= 1
                except Exception:  # TimeoutError, or the node went away under us
                    pass
                finally:
                    if rng.random() < 0.5:
                        client.abort()
                    else:
                        await client.close()

        async def chaos() -> None:
            await asyncio.sleep(1.2)
            await asyncio.to_thread(redis_server.kill)
            await asyncio.sleep(0.4)
            await asyncio.to_thread(redis_server.start)
            await asyncio.sleep(1.2)
            await asyncio.to_thread(nodes[0].restart, kill=True)
            await asyncio.sleep(1.2)

        async def main() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(publisher(stop))]
            tasks += [asyncio.create_task(subscriber(s, stop)) for s in streams]
            await chaos()
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks)
            # Finally every subscriber catches up to the last publication.
            last_epoch = list(published)[-1][0]
            last = max(o for e, o in published if e == last_epoch)
            for stream in streams:
                client, _ = await connect_somewhere(stream.name)
                since = stream.position
                frame: dict[str, Any] = {"op": "subscribe", "topic": TOPIC, "id": "f"}
                if since is not None:
                    frame["since"] = since
                stream.on_reply(await client.call(**frame), since)
                while (stream.epoch, stream.offset) != (last_epoch, last):
                    stream.on_message(await client.next_push("message"), published)
                await client.close()

        asyncio.run(main())
        for stream in streams:
            assert stream.errors == [], stream.errors
            assert stream.received > 20, stream
            # Not recovered only across the epoch change, and then nothing of the new epoch
            # was lost.
            assert all(first == 1 and last == 0 for _, first, last in stream.missed), stream
        epochs = {e for e, _ in published}
        # Redis restarted empty once: two epochs, each with its offsets contiguous.
        assert len(epochs) == 2, epochs
        for epoch in epochs:
            offsets = sorted(o for e, o in published if e == epoch)
            assert offsets[-1] - offsets[0] + 1 >= len(offsets)
