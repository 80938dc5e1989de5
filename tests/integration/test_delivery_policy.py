"""Delivery policies against the real broker, with raw sockets as the slow readers: a reader
taking 10 messages a second from a `latest` topic published at 1,000 a second stays connected,
sees offsets increase (every one it does not get reported in a `skipped` push), ends with the
newest value, and what the broker holds for it stays bounded; a reader as slow on a `close`
topic beside it is cut off with 4008."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.broker import BrokerProcess
from tests.support.clients import open_client
from tests.support.metrics import metric
from tests.support.rawws import FrameReader, encode_frame, handshake

LIMIT = 64 * 1024
PAYLOAD = "p" * 1000


class SlowReader(threading.Thread):
    """A raw client with a tiny receive buffer that takes 10 messages a second from ``topic``
    until ``slow`` is cleared, then reads everything left until the stream stays quiet."""

    def __init__(self, b: BrokerProcess, client: str, topic: str) -> None:
        super().__init__(daemon=True)
        status, _, rest, self.sock = handshake(b.port, f"/ws?token={b.token(client)}", rcvbuf=4096)
        assert status == 101
        self.reader = FrameReader(self.sock, rest)
        assert self.reader.json()["op"] == "welcome"
        self.sock.sendall(
            encode_frame(json.dumps({"op": "subscribe", "topic": topic, "id": 1}).encode())
        )
        assert self.reader.json()["ok"]
        self.slow = threading.Event()
        self.slow.set()
        self.pushes: list[dict[str, Any]] = []
        self.closed: int | None = None  # the close code, or 1006 for a connection that broke

    def run(self) -> None:
        try:
            while self.slow.is_set():
                self._take()
                time.sleep(0.1)
            self.sock.settimeout(3)
            while True:
                self._take()
        except TimeoutError:
            pass  # quiet: everything sent has been read
        except (ConnectionError, OSError):
            self.closed = self.closed or 1006

    def _take(self) -> None:
        opcode, payload = self.reader.frame()
        if opcode == 0x8:
            self.closed = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            raise ConnectionError("closed")
        if opcode == 0x1:
            self.pushes.append(json.loads(payload))


def check_latest_stream(pushes: list[dict[str, Any]], last: int) -> None:
    """Offsets only increase, each offset 1..last is either delivered or inside a skipped
    range announced right before the next delivery, and the stream ends with ``last``."""
    covered: list[int] = []
    for i, push in enumerate(pushes):
        if push["op"] == "skipped":
            assert pushes[i + 1]["op"] == "message"
            assert pushes[i + 1]["offset"] == push["to"] + 1
            covered.extend(range(push["from"], push["to"] + 1))
        else:
            assert push["op"] == "message", push
            covered.append(push["offset"])
    assert covered == list(range(1, last + 1))
    assert pushes[-1]["op"] == "message" and pushes[-1]["offset"] == last
    assert pushes[-1]["data"] == {"n": last, "pad": PAYLOAD}


def test_latest_reader_stays_and_ends_with_the_newest_while_close_reader_is_cut(
    tmp_path: Path, workers: int
) -> None:
    config = {
        "limits": {"send_queue_max_bytes": LIMIT, "publish_rate": 10000.0, "publish_burst": 10000},
        "delivery": [{"pattern": "prices.>", "policy": "latest"}],
        "api": {"keys": ["k" * 24]},
    }
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:
        latest = SlowReader(b, "latest-reader", "prices.eur")
        close = SlowReader(b, "close-reader", "ticks.eur")
        latest.start()
        close.start()
        held: list[float] = []

        async def publish() -> int:
            ws, _ = await open_client(b, "publisher")
            n = 0
            cut_at: float | None = None
            # 1,000 a second on each topic, until the close reader has been cut off and a
            # little longer (bounded, in case it never is: the assertions below then fail).
            while n < 60_000 and (cut_at is None or time.monotonic() < cut_at + 2):
                for _ in range(10):
                    n += 1
                    data = {"n": n, "pad": PAYLOAD}
                    for topic in ("prices.eur", "ticks.eur"):
                        await ws.send(json.dumps({"op": "publish", "topic": topic, "data": data}))
                await asyncio.sleep(0.01)
                if n % 500 == 0:
                    held.append(metric(b, "pubsub_send_queue_bytes"))
                    if cut_at is None and metric(b, "pubsub_closes_total", reason="slow_consumer"):
                        cut_at = time.monotonic()
            # Every publication reached the bus (a ping's reply comes after their replies).
            await ws.send(json.dumps({"op": "ping", "id": "end"}))
            while json.loads(await ws.recv()).get("id") != "end":
                pass
            await ws.close()
            return n

        last = asyncio.run(publish())
        assert b.wait_for("disconnect", timeout=20, client="close-reader")["code"] == 4008
        latest.slow.clear()
        latest.join(timeout=120)
        close.join(timeout=30)
        assert not latest.is_alive()
        assert latest.closed is None, latest.closed
        check_latest_stream(latest.pushes, last)
        assert any(p["op"] == "skipped" for p in latest.pushes)
        assert metric(b, "pubsub_skipped_total") > 0
        # Bounded: the queue and the held frames of the one open slow connection, whatever
        # was published (samples taken while it was behind).
        assert max(held) <= 2 * LIMIT + 64 * 1024, held
        assert not b.events("slow_consumer") or all(
            e.get("client") != "latest-reader" for e in b.events("disconnect")
        )
        for reader in (latest, close):
            reader.sock.close()


def test_a_client_that_does_not_know_skipped_ignores_it(tmp_path: Path) -> None:
    """The push is an unknown op to an older client: the raw protocol allows ignoring it, and
    the message after it is an ordinary message push."""
    config = {
        "limits": {"send_queue_max_bytes": LIMIT, "publish_rate": 10000.0, "publish_burst": 10000},
        "delivery": [{"pattern": ">", "policy": "latest"}],
    }
    with BrokerProcess.start(tmp_path, config) as b:
        status, _, rest, sock = handshake(b.port, f"/ws?token={b.token('r')}", rcvbuf=4096)
        assert status == 101
        reader = FrameReader(sock, rest)
        reader.json()
        sock.sendall(encode_frame(json.dumps({"op": "subscribe", "topic": "t", "id": 1}).encode()))
        assert reader.json()["ok"]

        async def publish() -> None:
            ws, _ = await open_client(b, "publisher")
            for n in range(1, 3001):
                await ws.send(json.dumps({"op": "publish", "topic": "t", "data": [n, PAYLOAD]}))
            await ws.send(json.dumps({"op": "ping", "id": "end"}))
            while json.loads(await ws.recv()).get("id") != "end":
                pass
            await ws.close()

        asyncio.run(publish())
        sock.settimeout(3)
        pushes = []
        try:
            while True:
                pushes.append(reader.json())
        except TimeoutError:
            pass
        messages = [p for p in pushes if p["op"] == "message"]
        assert {p["op"] for p in pushes} == {"message", "skipped"}
        assert messages[-1]["offset"] == 3000
        offsets = [p["offset"] for p in messages]
        assert offsets == sorted(set(offsets))
        sock.close()
