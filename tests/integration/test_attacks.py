"""Load and abuse from outside, against the real broker: slowloris, a thousand subscribers
that never read, and a stream of malformed frames. Each is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import socket
import time
from pathlib import Path

import psutil
from websockets.asyncio.client import ClientConnection

from tests.support.broker import BrokerProcess
from tests.support.clients import call, open_client
from tests.support.rawws import FrameReader, encode_frame, handshake, http_request


def open_fds(pid: int) -> int:
    """File descriptors of the broker's whole process tree (supervisor and workers)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs)


def test_slowloris_is_cut_off_and_legitimate_clients_still_connect(
    tmp_path: Path, workers: int
) -> None:
    with BrokerProcess.start(
        tmp_path, {"timeouts": {"handshake_timeout": 3.0}}, workers=workers
    ) as b:
        baseline = open_fds(b.pid)
        request = http_request(f"/ws?token={b.token('x')}", port=b.port)
        attackers = []
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", b.port))
            s.setblocking(False)
            attackers.append(s)
        start = time.monotonic()
        sent = 0
        legit_times = []
        closed: set[int] = set()
        while len(closed) < len(attackers) and time.monotonic() - start < 10:
            # One more byte of the request on every attacking connection.
            if sent < len(request) - 1:
                for i, s in enumerate(attackers):
                    if i not in closed:
                        try:
                            s.send(request[sent : sent + 1])
                        except OSError:
                            closed.add(i)
                sent += 1
            if len(legit_times) < 5:
                t0 = time.monotonic()
                status, _, _, ok = handshake(b.port, f"/ws?token={b.token('legit')}")
                legit_times.append(time.monotonic() - t0)
                ok.close()
                assert status == 101
            readable, _, _ = select.select(
                [s for i, s in enumerate(attackers) if i not in closed], [], [], 0.3
            )
            for s in readable:
                try:
                    if s.recv(1024) == b"":
                        closed.add(attackers.index(s))
                except OSError:
                    closed.add(attackers.index(s))
        elapsed = time.monotonic() - start
        assert len(closed) == len(attackers), (
            f"{len(attackers) - len(closed)} slow handshakes still open"
        )
        assert elapsed < 3.0 + 4.0
        assert max(legit_times) < 2.0, legit_times
        for s in attackers:
            s.close()
        deadline = time.monotonic() + 5
        while open_fds(b.pid) > baseline + 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_fds(b.pid) <= baseline + 5


def test_a_thousand_subscribers_that_never_read(tmp_path: Path) -> None:
    limit = 64 * 1024
    config = {
        "limits": {
            "send_queue_max_bytes": limit,
            "max_connections": 5000,
            "max_connections_per_client": 5000,  # one client id, 1,000 connections
        }
    }
    with BrokerProcess.start(tmp_path, config) as b:
        proc = psutil.Process(b.pid)
        rss_baseline = proc.memory_info().rss
        token = b.token("slow")
        subscribe = encode_frame(b'{"op":"subscribe","topic":"feed"}')
        slow = []
        for _ in range(1000):
            status, _, _, s = handshake(b.port, f"/ws?token={token}", rcvbuf=4096)
            assert status == 101
            s.sendall(subscribe)
            slow.append(s)
        n = 400
        payload = "z" * 1000

        async def main() -> list[float]:
            fast: list[ClientConnection] = []
            for i in range(50):
                ws, _ = await open_client(b, f"fast{i}")
                assert (await call(ws, op="subscribe", topic="feed", id=1))["ok"]
                fast.append(ws)
            pub, _ = await open_client(b, "pub")
            latencies: list[float] = []

            async def consume(ws: ClientConnection) -> None:
                expected = 1
                while expected <= n:
                    msg = json.loads(await ws.recv())
                    if msg.get("op") != "message":
                        continue
                    assert msg["offset"] == expected
                    expected += 1
                    latencies.append(time.monotonic() - msg["data"]["t"])

            async with asyncio.timeout(90):
                tasks = [asyncio.create_task(consume(ws)) for ws in fast]
                for k in range(n):
                    await pub.send(
                        json.dumps(
                            {
                                "op": "publish",
                                "topic": "feed",
                                "data": {"t": time.monotonic(), "p": payload},
                            }
                        )
                    )
                    if k % 5 == 4:
                        await asyncio.sleep(0.05)  # a steady ~100 publications/s
                await asyncio.gather(*tasks)
            for ws in [*fast, pub]:
                await ws.close()
            return latencies

        latencies = sorted(asyncio.run(main()))
        p99 = latencies[int(len(latencies) * 0.99)]
        print(f"fast subscribers beside 1000 slow ones: p99 {p99 * 1000:.1f} ms")
        assert len(latencies) == 50 * n
        # Speed is the benchmark's business: bench/'s "slow" workload measures this p99
        # with a raw-socket load generator in its own processes, against the 100 ms target.
        # Here the readers are full Python clients sharing a process with the 1,000 stalled
        # sockets, so only a stall that no machine excuses fails the test.
        assert p99 < 1.0, f"p99 {p99 * 1000:.1f} ms"
        deadline = time.monotonic() + 20
        while len(b.events("slow_consumer")) < 1000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(b.events("slow_consumer")) == 1000
        growth = proc.memory_info().rss - rss_baseline
        assert growth < 1050 * limit + 64 * 1024 * 1024, growth
        for s in slow:
            s.close()


def test_malformed_frames_never_hurt_the_connection_or_the_worker(
    tmp_path: Path, workers: int
) -> None:
    # Abuse is otherwise cut off with 4029 after max_violations; here every answer is checked.
    with BrokerProcess.start(
        tmp_path, {"limits": {"max_violations": 100_000}}, workers=workers
    ) as broker:
        fuzz_connection(broker)
        assert not broker.events("connection_failed")
        assert not broker.events("internal_error")


def fuzz_connection(broker: BrokerProcess) -> None:
    rng = random.Random(1234)
    status, _, rest, sock = handshake(broker.port, f"/ws?token={broker.token('fuzz')}")
    assert status == 101
    reader = FrameReader(sock, rest)
    assert reader.json()["op"] == "welcome"
    pieces = [
        '{"op":',
        '"publish"',
        '"subscribe"',
        '"topic":',
        '"a.b"',
        '"a..b"',
        '"*"',
        '">"',
        '"data":',
        "null",
        "1e999",
        "[",
        "]",
        "{",
        "}",
        ",",
        '"id":',
        "true",
        '"since":',
        '{"offset":-1}',
        "\\u0000",
        "é",
    ]
    for i in range(300):
        if rng.random() < 0.3:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:
            body = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).encode()
        try:
            body.decode()
            opcode = 0x1
        except UnicodeDecodeError:
            opcode = 0x2  # invalid UTF-8 may only travel in a binary frame
        sock.sendall(encode_frame(body, opcode=opcode))
        sock.sendall(encode_frame(json.dumps({"op": "ping", "id": i}).encode()))
        while True:
            frame = reader.json()
            if frame.get("id") == i and frame.get("ok") is True:
                break
            if frame.get("ok") is False:
                assert frame["error"]["code"] in {
                    "bad_request",
                    "bad_topic",
                    "forbidden",
                    "not_subscribed",
                    "too_large",
                    "too_many_subscriptions",
                }, frame
    sock.close()
