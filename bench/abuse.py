"""The abuse workload: does one worker stay fair while two of its clients abuse it?

On one broker worker, a *bystander* sends a ``ping`` request every 10 ms and times each round
trip: first alone (the baseline), then while two attackers with valid tokens share its worker:

- a *history pipeliner* writes 1,000 ``history`` requests at a time (about 60 KB, one write, one
  read of the broker's) for a topic that holds a full default history window (100 publications
  of 1 KiB), reading what comes back and writing the next 1,000 once half are answered; closed
  (4029, 4008), it reconnects at once;
- a *fragment streamer* opens a text message and never ends it: 1-byte continuation frames,
  a ping after every 1,000 of them, as fast as the broker reads; closed, it reconnects.

The figures: the bystander's p50/p99/max round trip under attack, the same alone, their ratio,
and what the attackers got (history replies served and refused, close codes, bytes streamed).
The issue's target is a bystander p99 under 50 ms, with one worker and with two.

Every agent is a forked process with plain sockets to 127.0.0.1, and stops by itself at a
deadline set before it starts. Only the broker runs this workload: the peers have no history.
"""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.loadgen import client_frame
from bench.servers import Server, make_tokens
from bench.workloads import HOST, latency_ms

__all__ = ["abuse"]

TOPIC = "bench.abuse"
PIPELINE = 1000  # history requests per write
FRAGMENTS = 1000  # continuation frames between two pings
PING_EVERY = 0.010  # the bystander's pace
CONNECT_TRIES = 64  # with several workers: connections tried to land on the bystander's


class Link:
    """One raw WebSocket connection: upgraded and welcomed in blocking mode; then frames are
    read with :meth:`frames` after :meth:`receive`."""

    def __init__(self, port: int, token: str) -> None:
        sock = socket.create_connection((HOST, port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        self.sock = sock
        self.buf = b""
        self.pending: list[tuple[int, bytes]] = []  # frames received, not yet taken by text()
        while b"\r\n\r\n" not in self.buf:
            if not self.receive():
                raise ConnectionError("closed during the upgrade")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        welcome = self.text(30.0)
        self.worker: int = json.loads(welcome)["worker"]

    def receive(self) -> bool:
        """Append what the socket holds (blocking mode: wait for it); False once closed."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return True
        except TimeoutError:
            raise
        except OSError:
            return False
        self.buf += data
        return bool(data)

    def frames(self) -> list[tuple[int, bytes]]:
        """The complete frames received so far (opcode, payload)."""
        out = []
        buf, i, n = self.buf, 0, len(self.buf)
        while n - i >= 2:
            ln, s = buf[i + 1] & 127, i + 2
            if ln == 126:
                ln, s = int.from_bytes(buf[i + 2 : i + 4], "big"), i + 4
            elif ln == 127:
                ln, s = int.from_bytes(buf[i + 2 : i + 10], "big"), i + 10
            if s + ln > n:
                break
            out.append((buf[i] & 15, buf[s : s + ln]))
            i = s + ln
        self.buf = buf[i:]
        return out

    def text(self, timeout: float) -> bytes:
        """The next text frame, waiting up to ``timeout`` seconds (blocking mode)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                op, payload = self.pending.pop(0)
                if op == 1:
                    return payload
                if op == 8:
                    raise ConnectionError(f"closed: {close_code(payload)}")
            self.pending = self.frames()
            if self.pending:
                continue
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            if not self.receive():
                raise ConnectionError("closed")


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


def fragment(payload: bytes, opcode: int) -> bytes:
    """A masked client frame without FIN (a message still to be continued); under 126 bytes."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((opcode, 0x80 | len(payload))) + key + masked


def beside(port: int, token: str, worker: int) -> Link:
    """A connection served by ``worker``: with several workers the kernel spreads them, so
    connect until one lands there."""
    for _ in range(CONNECT_TRIES):
        link = Link(port, token)
        if link.worker == worker:
            link.sock.setblocking(False)
            return link
        link.sock.close()
    raise RuntimeError(f"no connection landed on worker {worker}")


class Attack:
    """An attacker's loop: connect beside the bystander, write :meth:`opening`, then
    :meth:`more` whenever it has something, reading everything meanwhile; reconnect whenever
    the broker closes; stop at ``until``. ``stats`` counts what happened."""

    def __init__(self, port: int, token: str, worker: int, until: float) -> None:
        self.port, self.token, self.worker, self.until = port, token, worker, until
        self.stats: Counter[str] = Counter()

    def opening(self) -> bytes:
        return b""

    def more(self) -> bytes:
        return b""

    def on_text(self, payload: bytes) -> None:
        self.stats["text_frames"] += 1

    def run(self, pipe: Connection) -> None:
        try:
            while time.monotonic() < self.until:
                self._connection()
        finally:
            pipe.send(dict(self.stats))

    def _connection(self) -> None:
        stats = self.stats
        link = beside(self.port, self.token, self.worker)
        stats["connections"] += 1
        out = self.opening()
        while time.monotonic() < self.until:
            if not out:
                out = self.more()
            readable, writable, _ = select.select([link.sock], [link.sock] if out else [], [], 0.05)
            if writable:
                try:
                    sent = link.sock.send(out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    stats["close_eof"] += 1
                    break
                stats["bytes_sent"] += sent
                out = out[sent:]
            if readable:
                alive = link.receive()
                code = 0
                for op, payload in link.frames():
                    if op == 1:
                        self.on_text(payload)
                    elif op == 8:
                        code = close_code(payload)
                if code or not alive:
                    stats[f"close_{code or 'eof'}"] += 1
                    break
        link.sock.close()


class HistoryPipeliner(Attack):
    """``PIPELINE`` history requests per write, the next write once half are answered."""

    pipeline = b"".join(
        client_frame(json.dumps({"op": "history", "topic": TOPIC, "id": i}).encode())
        for i in range(PIPELINE)
    )

    def opening(self) -> bytes:
        self.outstanding = 0
        return b""

    def more(self) -> bytes:
        if self.outstanding > PIPELINE // 2:
            return b""
        self.outstanding += PIPELINE
        return self.pipeline

    def on_text(self, payload: bytes) -> None:
        self.outstanding -= 1
        if b'"ok":true' in payload[:80]:
            self.stats["served"] += 1
        elif b"rate_limited" in payload:
            self.stats["rate_limited"] += 1
        else:
            self.stats["other_errors"] += 1


class FragmentStreamer(Attack):
    """A text message opened and never ended: 1-byte continuation frames, a ping after every
    ``FRAGMENTS`` of them."""

    chunk = fragment(b" ", 0x0) * FRAGMENTS + client_frame(b"", 0x9)

    def opening(self) -> bytes:
        return fragment(b"[", 0x1)

    def more(self) -> bytes:
        return self.chunk


def history_pipeliner(port: int, token: str, worker: int, until: float, pipe: Connection) -> None:
    HistoryPipeliner(port, token, worker, until).run(pipe)


def fragment_streamer(port: int, token: str, worker: int, until: float, pipe: Connection) -> None:
    FragmentStreamer(port, token, worker, until).run(pipe)


def bystander(port: int, token: str, until: float, pipe: Connection) -> None:
    """Tell the worker it landed on, then ping every ``PING_EVERY`` until ``until``; send back
    ``(sent_at, round_trip)`` pairs (a round trip that timed out counts as 10 s)."""
    link = Link(port, token)
    pipe.send(link.worker)
    samples: list[tuple[float, float]] = []
    k = 0
    while time.monotonic() < until:
        k += 1
        t0 = time.monotonic()
        link.sock.sendall(client_frame(b'{"op":"ping","id":%d}' % k))
        want = b'"id":%d,' % k
        try:
            while want not in link.text(10.0):
                pass
        except (ConnectionError, TimeoutError):
            samples.append((t0, 10.0))
            break
        rtt = time.monotonic() - t0
        samples.append((t0, rtt))
        time.sleep(max(0.0, PING_EVERY - rtt))
    link.sock.close()
    pipe.send(samples)


def seed(port: int, token: str, count: int = 100, size: int = 1024, topic: str = TOPIC) -> None:
    """Fill ``topic``'s history: ``count`` publications of ``size`` bytes."""
    link = Link(port, token)
    data = json.dumps("x" * (size - 2))
    link.sock.sendall(
        b"".join(
            client_frame(f'{{"op":"publish","topic":"{topic}","id":{i},"data":{data}}}'.encode())
            for i in range(count)
        )
    )
    for _ in range(count):
        reply = link.text(30.0)
        if b'"ok":true' not in reply:
            raise RuntimeError(f"seeding failed: {reply[:200]!r}")
    link.sock.close()


def _spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    return proc, mine


def _ms(samples: list[tuple[float, float]]) -> dict[str, float | None]:
    return latency_ms(sorted(int(rtt * 1e6) for _, rtt in samples))


def abuse(
    server: Server, adapter: str, baseline: float = 2.0, duration: float = 6.0
) -> dict[str, Any]:
    """The workload (see the module docstring): ``baseline`` seconds of the bystander alone,
    then ``duration`` seconds beside the two attackers."""
    if adapter != "broker":
        raise RuntimeError("the abuse workload needs the broker's history op")
    tokens = make_tokens(server.secret, 4, prefix="abuse")
    seed(server.port, tokens[3])
    start = time.monotonic() + 0.5
    attack_at = start + baseline
    until = attack_at + duration
    watcher, watch_pipe = _spawn(bystander, server.port, tokens[0], until)
    procs = [watcher]
    try:
        worker = watch_pipe.recv()
        time.sleep(max(0.0, attack_at - time.monotonic()))
        mem0, cpu0, t0 = server.memory_kib(), server.cpu_seconds(), time.monotonic()
        attackers = [
            _spawn(history_pipeliner, server.port, tokens[1], worker, until),
            _spawn(fragment_streamer, server.port, tokens[2], worker, until),
        ]
        procs += [p for p, _ in attackers]
        history, fragments = (pipe.recv() for _, pipe in attackers)
        cpu, elapsed = server.cpu_seconds() - cpu0, time.monotonic() - t0
        mem = server.memory_kib()
        samples = watch_pipe.recv()
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    alone = [s for s in samples if s[0] < attack_at]
    attacked = [s for s in samples if s[0] >= attack_at + 0.2]  # once both are connected
    base_ms, ms = _ms(alone), _ms(attacked)
    return {
        **ms,
        "baseline_p50_ms": base_ms["p50_ms"],
        "baseline_p99_ms": base_ms["p99_ms"],
        "p99_ratio": round(ms["p99_ms"] / base_ms["p99_ms"], 2)
        if ms["p99_ms"] and base_ms["p99_ms"]
        else None,
        "samples": len(attacked),
        "history_served": history.get("served", 0),
        "history_rate_limited": history.get("rate_limited", 0),
        "history_connections": history.get("connections", 0),
        "fragment_mib_sent": round(fragments.get("bytes_sent", 0) / 2**20, 1),
        "fragment_connections": fragments.get("connections", 0),
        "server_cpu_pct": round(100 * cpu / elapsed, 1),
        "rss_growth_mib": round((mem["rss"] - mem0["rss"]) / 1024, 1),
        "closes": {
            f"{who}:{k.removeprefix('close_')}": v
            for who, stats in (("history", history), ("fragments", fragments))
            for k, v in stats.items()
            if k.startswith("close_")
        },
        "worker": worker,
    }
