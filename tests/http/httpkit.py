"""What the HTTP tests share: an in-memory operations backend built on the bus's own types, a
listener running it on a free port of 127.0.0.1, and a small blocking HTTP client run in a
thread (real sockets, no mocks)."""

from __future__ import annotations

import functools
import http.client
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from broker.brokermetrics import broker_metrics, stats_from_snapshot
from broker.bus.base import HistoryResult, Publication, StreamPosition
from broker.errors import BusUnavailable, FrameError
from broker.historyread import select_history
from broker.http import HttpLimits, serve_http
from broker.metrics import merge, render

API_KEY = "test-api-key"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
_SEGMENT = r"[A-Za-z0-9_-]+"
_TOPIC = re.compile(rf"{_SEGMENT}(\.{_SEGMENT})*\Z")
_PATTERN = re.compile(rf"({_SEGMENT}|\*)(\.({_SEGMENT}|\*))*(\.>)?\Z|>\Z")


class MemoryBackend:
    """An :class:`~broker.http.OpsBackend` holding topics in memory, the way the one-worker
    bus does: offsets from 1, a bounded history, an epoch per topic."""

    def __init__(self, history_size: int = 5, max_data_size: int = 1000) -> None:
        self.is_ready = True
        self.bus_up = True
        self.history_size = history_size
        self.max_data_size = max_data_size
        self.topics: dict[str, list[Publication]] = {}
        self.offsets: dict[str, int] = {}
        self.epoch = uuid.uuid4().hex[:8]
        self.members: dict[str, set[str]] = {}
        self.connections: dict[str, int] = {}
        self.fail_with: BaseException | None = None
        self.delay = 0.0
        self.hold: trio.Event | None = None  # publishes wait for it while set
        self.holding = 0  # publishes waiting for hold
        self._holding_changed = trio.Event()
        self.metrics = [broker_metrics(0), broker_metrics(1)]

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if not self.bus_up:
            raise BusUnavailable("bus down")

    def ready(self) -> tuple[bool, dict[str, object]]:
        return self.is_ready, {"workers": {"0": True, "1": self.is_ready}, "bus": self.bus_up}

    async def metrics_text(self) -> str:
        return render(merge(m.registry.snapshot() for m in self.metrics))

    async def stats(self) -> dict[str, Any]:
        return stats_from_snapshot(merge(m.registry.snapshot() for m in self.metrics))

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        ok = len(topic.encode()) <= 255 and (_PATTERN if wildcard else _TOPIC).match(topic)
        if not ok:
            raise FrameError("bad_topic", f"invalid topic: {topic!r}")

    async def publish(self, topic: str, data_json: str) -> Publication:
        self._check()
        await trio.sleep(self.delay)
        if self.hold is not None:
            self.holding += 1
            self._holding_changed.set()
            await self.hold.wait()
        if len(data_json.encode()) > self.max_data_size:
            raise FrameError("too_large", "data too large")
        offset = self.offsets[topic] = self.offsets.get(topic, 0) + 1
        pub = Publication(topic, offset, self.epoch, None, data_json)
        held = self.topics.setdefault(topic, [])
        held.append(pub)
        del held[: -self.history_size]
        self.metrics[0].publications_in.inc()
        return pub

    async def wait_holding(self, count: int) -> None:
        """Return once ``count`` publishes wait for :attr:`hold`."""
        while self.holding < count:
            self._holding_changed = trio.Event()
            await self._holding_changed.wait()

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int, *, newest: bool = False
    ) -> HistoryResult:
        self._check()
        held = self.topics.get(topic, [])
        latest = StreamPosition(self.offsets.get(topic, 0), self.epoch)
        return select_history(held, latest, since, limit, newest=newest)

    async def presence(self, topic: str) -> list[str]:
        self._check()
        return sorted(self.members.get(topic, ()))

    async def disconnect(self, client_id: str) -> int:
        return self.connections.pop(client_id, 0)

    def info(self) -> dict[str, object]:
        return {"ws_port": 8765, "ws_scheme": "ws", "node": "test-node", "workers": 2}


@attrs.define
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        code: str = self.json()["error"]["code"]
        return code


def _request_sync(
    port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


@attrs.define
class Listener:
    port: int
    backend: MemoryBackend

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = API_KEY,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        return await trio.to_thread.run_sync(_request_sync, self.port, method, path, data, hdrs)

    async def raw(self, data: bytes, *, read_until_close: bool = True) -> bytes:
        """Send bytes on a fresh connection and return everything received until the server
        closes it (or 10 s pass)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        received = bytearray()
        async with stream:
            await stream.send_all(data)
            with trio.move_on_after(10):
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
                    if not read_until_close and b"\r\n\r\n" in received:
                        break
        return bytes(received)


@asynccontextmanager
async def running_listener(
    backend: MemoryBackend | None = None,
    keys: tuple[str, ...] = (API_KEY,),
    limits: HttpLimits | None = None,
) -> AsyncIterator[Listener]:
    backend = backend or MemoryBackend()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_http, "127.0.0.1", 0, backend, keys, limits=limits)
        )
        try:
            yield Listener(port, backend)
        finally:
            nursery.cancel_scope.cancel()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed within 5 s
    (every listener timeout that could close it otherwise is far longer)."""
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def send_and_read(port: int, data: bytes) -> bytes:
    """Send ``data`` (and nothing more, the connection stays open on our side) and return
    what the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        return await read_until_closed(stream)


async def open_idle(port: int, first: bytes = HEALTHZ) -> trio.SocketStream:
    """A connection that made one request, read its answer and stays open (keep-alive)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(first)
    received = b""
    while not received.endswith(b"}"):
        received += await stream.receive_some(65536)
    return stream
