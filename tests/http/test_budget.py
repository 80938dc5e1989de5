"""What a client may cost the operations listener, against an in-memory backend over real
sockets: bodies of refused requests are never read, requests framed two ways are closed, idle
connections make room for new ones and health checks keep a reserve of their own."""

from __future__ import annotations

import json

import pytest
import trio

from broker.http import HttpLimits
from tests.http.httpkit import (
    API_KEY,
    HEALTHZ,
    Listener,
    MemoryBackend,
    open_idle,
    read_until_closed,
    running_listener,
    send_and_read,
)

AUTH = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"


async def metric(lst: Listener, name: str) -> float:
    reply = await lst.request("GET", "/metrics", key=None)
    for line in reply.body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\n"
        b"Content-Length: 1000000\r\n\r\n",
        b"POST /api/disconnect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000\r\n\r\n",
    ],
)
async def test_the_api_key_is_checked_before_the_body_is_read(
    listener: Listener, head: bytes
) -> None:
    # The body never comes: the answer and the close must not wait for it (the body timeout
    # is 30 s, and the declared length is within max_body).
    data = await send_and_read(listener.port, head)
    assert data.startswith(b"HTTP/1.1 401 "), data
    assert b"HTTP/1.1 100 " not in data
    assert b"connection: close" in data.lower()
    assert b'"code":"unauthorized"' in data


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", 404),
        (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", 405),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", 200),
    ],
)
async def test_routes_without_a_body_never_read_one(
    listener: Listener, head: bytes, status: int
) -> None:
    data = await send_and_read(listener.port, head)
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    assert b"connection: close" in data.lower()


async def test_a_valid_key_still_gets_its_body_read(listener: Listener) -> None:
    body = json.dumps({"topic": "a", "data": 1}).encode()
    data = await send_and_read(
        listener.port,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + AUTH
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body,
    )
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert listener.backend.offsets == {"a": 1}


@pytest.mark.parametrize(
    "path", [b"/api/publish", b"/healthz"], ids=["authorized-post", "public-get"]
)
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    listener: Listener, path: bytes
) -> None:
    body = json.dumps({"topic": "a", "data": 1}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    smuggled = (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked + HEALTHZ
    )
    data = await send_and_read(listener.port, smuggled)
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b'"code":"bad_request"' in data
    assert b"connection: close" in data.lower()
    assert data.count(b"HTTP/1.1 ") == 1  # the request behind it is not served
    assert listener.backend.offsets == {}


async def test_idle_connections_make_room_for_new_ones() -> None:
    limits = HttpLimits(max_connections=4, ops_reserve=1)
    async with running_listener(limits=limits) as lst:
        idle = [await open_idle(lst.port) for _ in range(4)]
        # one still sending its head, a byte at a time
        slow = await trio.open_tcp_stream("127.0.0.1", lst.port)
        await slow.send_all(b"GET /hea")
        try:
            for _ in range(3):
                reply = await lst.request("GET", "/healthz", key=None)
                assert reply.status == 200
            # the longest-waiting connections were closed to make room, oldest first
            assert await read_until_closed(idle[0]) == b""
            assert await read_until_closed(idle[1]) == b""
            assert await metric(lst, "pubsub_http_evicted_total") >= 2
            assert await metric(lst, "pubsub_http_refused_total") == 0
        finally:
            for s in [*idle, slow]:
                await s.aclose()


async def test_busy_connections_refuse_new_ones_but_not_health_checks() -> None:
    backend = MemoryBackend()
    backend.hold = trio.Event()
    limits = HttpLimits(max_connections=4, ops_reserve=2)
    async with running_listener(backend, limits=limits) as lst, trio.open_nursery() as nursery:
        answers: list[int] = []

        async def publish() -> None:
            reply = await lst.request("POST", "/api/publish", {"topic": "a", "data": 1})
            answers.append(reply.status)

        for _ in range(2):
            nursery.start_soon(publish)
        # Two publishes in progress use every slot that is not reserved.
        await backend.wait_holding(2)
        reply = await lst.request("POST", "/api/publish", {"topic": "a", "data": 2})
        assert (reply.status, reply.error_code) == (503, "unavailable")
        assert reply.headers["retry-after"] == "1"
        reply = await lst.request("GET", "/status/data", key=None)
        assert reply.status == 503
        for path in ("/healthz", "/readyz", "/metrics"):
            reply = await lst.request("GET", path, key=None)
            assert reply.status == 200, path
        refused = await lst.request("GET", "/metrics", key=None)
        assert b'pubsub_http_refused_total{reason="reserved"} 2' in refused.body
        backend.hold.set()
    assert answers == [200, 200]


async def test_a_listener_busy_everywhere_answers_503() -> None:
    backend = MemoryBackend()
    backend.hold = trio.Event()
    limits = HttpLimits(max_connections=2, ops_reserve=0)
    async with running_listener(backend, limits=limits) as lst:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lst.request, "POST", "/api/publish", {"topic": "a", "data": 1})
            await backend.wait_holding(2)
            data = await send_and_read(lst.port, HEALTHZ)
            assert data.startswith(b"HTTP/1.1 503 "), data
            assert b"too many HTTP connections" in data
            backend.hold.set()
        # the publishes answered, their connections no longer busy
        assert (await lst.request("GET", "/healthz")).status == 200
        assert (
            b'pubsub_http_refused_total{reason="full"} 1'
            in (await lst.request("GET", "/metrics")).body
        )


async def test_refused_requests_do_not_hold_the_api_budget() -> None:
    # Two requests refused for want of a key, their connections left open by the client (the
    # listener lingers to close them), must not count as API requests in progress.
    limits = HttpLimits(max_connections=4, ops_reserve=2)
    async with running_listener(limits=limits) as lst:
        refused = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", lst.port)
            refused.append(stream)
            await stream.send_all(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            )
            received = b""
            while not received.endswith(b"}"):
                received += await stream.receive_some(65536)
            assert received.startswith(b"HTTP/1.1 401 ")
        try:
            reply = await lst.request("POST", "/api/publish", {"topic": "a", "data": 1})
            assert reply.status == 200, reply.body
        finally:
            for s in refused:
                await s.aclose()


async def test_clients_that_do_not_read_make_room_too() -> None:
    # Each pipelines far more answers than the socket buffers hold and reads none of them.
    limits = HttpLimits(max_connections=2, ops_reserve=0)
    pipelined = b"GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
    async with running_listener(limits=limits) as lst:
        stuck = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", lst.port)
            stuck.append(stream)
            await stream.send_all(pipelined)
        try:
            reply = await lst.request("GET", "/healthz", key=None)
            assert reply.status == 200
            assert await metric(lst, "pubsub_http_evicted_total") >= 1
            assert await metric(lst, "pubsub_http_refused_total") == 0
        finally:
            for s in stuck:
                await s.aclose()
