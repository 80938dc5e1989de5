"""Delivery against the real broker, with the `websockets` library and raw sockets as
independent clients: a slow consumer never slows anyone else; recovery is exact at the seam;
presence counts clients, not connections."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection

from tests.support.broker import BrokerProcess
from tests.support.clients import call, open_client
from tests.support.rawws import FrameReader, encode_frame, handshake


async def open_ws(b: BrokerProcess, sub: str) -> ClientConnection:
    return (await open_client(b, sub))[0]


def test_slow_consumer_is_closed_and_nobody_else_waits(tmp_path: Path) -> None:
    limit = 256 * 1024
    config = {
        "limits": {
            "send_queue_max_bytes": limit,
            "publish_rate": 10000.0,
            "publish_burst": 10000,
            "max_message_size": 1 << 20,
            "max_data_size": 1 << 20,
        }
    }
    with BrokerProcess.start(tmp_path, config) as b:
        proc = psutil.Process(b.pid)
        # The slow one: a raw socket with a tiny receive buffer that never reads after the
        # subscribe replies. It takes the bulk topic (to fill every buffer) and the live one.
        status, _, rest, slow = handshake(b.port, f"/ws?token={b.token('slow')}", rcvbuf=4096)
        assert status == 101
        reader = FrameReader(slow, rest)
        reader.json()
        for i, topic in enumerate(["bulk", "live"]):
            slow.sendall(
                encode_frame(json.dumps({"op": "subscribe", "topic": topic, "id": i}).encode())
            )
            assert reader.json()["ok"]
        rss_before = proc.memory_info().rss
        n_live = 300

        async def main() -> list[list[int]]:
            fast = [await open_ws(b, f"fast{i}") for i in range(50)]
            for ws in fast:
                assert (await call(ws, op="subscribe", topic="live", id=1))["ok"]
            pub = await open_ws(b, "publisher")
            bulk = "x" * 60_000
            received: list[list[int]] = [[] for _ in fast]

            async def consume(i: int, ws: ClientConnection) -> None:
                while len(received[i]) < n_live:
                    msg = json.loads(await ws.recv())
                    if msg.get("op") == "message":
                        received[i].append(msg["offset"])

            async with asyncio.timeout(60):
                consumers = [asyncio.create_task(consume(i, ws)) for i, ws in enumerate(fast)]
                for k in range(n_live):
                    # 8 MB of bulk in all: far past the kernel's buffers and the queue limit.
                    if k < 140:
                        await pub.send(json.dumps({"op": "publish", "topic": "bulk", "data": bulk}))
                    await call(pub, op="publish", topic="live", data=k, id=k)
                await asyncio.gather(*consumers)
            for ws in [*fast, pub]:
                await ws.close()
            return received

        received = asyncio.run(main())
        for offsets in received:
            assert offsets == list(range(1, n_live + 1))
        closes = b.wait_for("disconnect", timeout=20, client="slow")
        assert closes["code"] == 4008
        assert b.events("slow_consumer")
        # Bounded: the slow client's queue is capped; the broker did not buffer megabytes for it.
        growth = proc.memory_info().rss - rss_before
        assert growth < 40 * 1024 * 1024, growth
        slow.close()


def test_recovery_is_exact_across_reconnects_under_a_steady_stream(broker: BrokerProcess) -> None:
    rng = random.Random(7)
    total = 400

    async def main() -> list[int]:
        pub = await open_ws(broker, "pub")
        seen: list[int] = []
        done = asyncio.Event()

        async def publisher() -> None:
            for k in range(total):
                await call(pub, op="publish", topic="feed", data=k, id=k)
                if k % 7 == 0:
                    await asyncio.sleep(0.001)
            done.set()

        async def subscriber() -> None:
            position: dict[str, Any] | None = None
            while True:
                ws = await open_ws(broker, "sub")
                frame: dict[str, Any] = {"op": "subscribe", "topic": "feed", "id": "s"}
                if position is not None:
                    frame["since"] = position
                await ws.send(json.dumps(frame))
                reply = json.loads(await ws.recv())
                assert reply["ok"], reply
                if position is not None:
                    assert reply["recovered"] is True, reply
                epoch = reply["epoch"]
                budget = rng.randint(1, 40)
                try:
                    while budget:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if msg.get("op") != "message":
                            continue
                        seen.append(msg["offset"])
                        position = {"offset": msg["offset"], "epoch": epoch}
                        budget -= 1
                        if msg["offset"] == total:
                            return
                    if position is None:
                        position = {"offset": reply["offset"], "epoch": epoch}
                finally:
                    # Drop the connection without a goodbye half the time.
                    if rng.random() < 0.5:
                        ws.transport.abort()
                    else:
                        await ws.close()

        async with asyncio.timeout(60):
            await asyncio.gather(publisher(), subscriber())
        await pub.close()
        return seen

    seen = asyncio.run(main())
    first = seen[0]
    assert seen == list(range(first, total + 1)), "each offset exactly once, in order"


def test_presence_counts_clients_and_sees_abrupt_disconnects(
    presence_broker: BrokerProcess,
) -> None:
    broker = presence_broker

    async def main() -> None:
        watcher = await open_ws(broker, "watcher")
        assert (await call(watcher, op="subscribe", topic="room", presence=True, id=1))["ok"]
        assert json.loads(await watcher.recv()) == {
            "op": "join",
            "topic": "room",
            "client": "watcher",
        }
        tabs = [await open_ws(broker, "alice") for _ in range(5)]
        for ws in tabs:
            assert (await call(ws, op="subscribe", topic="room", id=1))["ok"]
        assert json.loads(await watcher.recv()) == {
            "op": "join",
            "topic": "room",
            "client": "alice",
        }
        assert (await call(watcher, op="presence", topic="room", id=2))["clients"] == [
            "alice",
            "watcher",
        ]
        for ws in tabs[:4]:
            await ws.close()
        await asyncio.sleep(0.2)
        assert (await call(watcher, op="presence", topic="room", id=3))["clients"] == [
            "alice",
            "watcher",
        ]
        tabs[4].transport.abort()  # the last tab dies without a close frame
        msg = json.loads(await asyncio.wait_for(watcher.recv(), 5))
        assert msg == {"op": "leave", "topic": "room", "client": "alice"}
        assert (await call(watcher, op="presence", topic="room", id=4))["clients"] == ["watcher"]
        await watcher.close()

    asyncio.run(main())


def test_a_stream_of_messages_through_wildcards_in_order(broker: BrokerProcess) -> None:
    async def main() -> None:
        a = await open_ws(broker, "a")
        for i, pattern in enumerate(["news.*", "news.>", "news.sport"]):
            assert (await call(a, op="subscribe", topic=pattern, id=i))["ok"]
        p = await open_ws(broker, "p")
        for k in range(50):
            await p.send(json.dumps({"op": "publish", "topic": "news.sport", "data": k}))
            await p.send(json.dumps({"op": "publish", "topic": "news.sport.tennis", "data": k}))
        got: dict[str, list[int]] = {"news.sport": [], "news.sport.tennis": []}
        async with asyncio.timeout(10):
            while sum(map(len, got.values())) < 100:
                msg = json.loads(await a.recv())
                got[msg["topic"]].append(msg["offset"])
        assert got["news.sport"] == list(range(1, 51))
        assert got["news.sport.tennis"] == list(range(1, 51))
        with_timeout = asyncio.wait_for(a.recv(), 0.3)
        try:
            extra = await with_timeout
            raise AssertionError(f"delivered twice: {extra}")
        except TimeoutError:
            pass
        await a.close()
        await p.close()

    asyncio.run(main())


def test_half_speed_reader_is_closed_in_bounded_time(tmp_path: Path) -> None:
    config = {
        "limits": {
            "send_queue_max_bytes": 64 * 1024,
            "publish_rate": 10000.0,
            "publish_burst": 10000,
        },
        "timeouts": {"write_timeout": 2},
    }
    with BrokerProcess.start(tmp_path, config) as b:
        _status, _, rest, slow = handshake(b.port, f"/ws?token={b.token('half')}", rcvbuf=4096)
        reader = FrameReader(slow, rest)
        reader.json()
        slow.sendall(encode_frame(b'{"op":"subscribe","topic":"t","id":1}'))
        reader.json()
        slow.setblocking(False)

        async def main() -> float:
            pub = await open_ws(b, "pub")
            start = time.monotonic()
            payload = "y" * 2000
            async with asyncio.timeout(60):
                while True:
                    for _ in range(20):
                        await pub.send(json.dumps({"op": "publish", "topic": "t", "data": payload}))
                    await call(pub, op="ping", id=1)
                    try:
                        slow.recv(2000)  # reads, but far slower than the stream
                    except BlockingIOError:
                        pass
                    except OSError:
                        break
                    if b.events("slow_consumer"):
                        break
                    await asyncio.sleep(0.01)
            await pub.close()
            return time.monotonic() - start

        elapsed = asyncio.run(main())
        assert b.wait_for("disconnect", timeout=20, client="half")["code"] == 4008
        assert elapsed < 30
        slow.close()
