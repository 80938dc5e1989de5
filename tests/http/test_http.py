"""The operations listener against an in-memory backend, over real sockets on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import trio

from broker.errors import FrameError
from broker.http import HttpLimits
from tests.http.httpkit import API_KEY, Listener, MemoryBackend, running_listener


async def test_healthz_and_head(listener: Listener) -> None:
    reply = await listener.request("GET", "/healthz", key=None)
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert reply.headers["content-type"] == "application/json"
    head = await listener.request("HEAD", "/healthz", key=None)
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(reply.body))


async def test_readyz_follows_the_backend(listener: Listener) -> None:
    reply = await listener.request("GET", "/readyz", key=None)
    assert reply.status == 200
    assert reply.json()["ready"] is True
    listener.backend.is_ready = False
    reply = await listener.request("GET", "/readyz", key=None)
    assert reply.status == 503
    assert reply.json() == {"ready": False, "workers": {"0": True, "1": False}, "bus": True}


async def test_unknown_path_and_wrong_method(listener: Listener) -> None:
    reply = await listener.request("GET", "/nope", key=None)
    assert reply.status == 404
    assert reply.error_code == "not_found"
    reply = await listener.request("GET", "/api/publish")
    assert reply.status == 405
    assert reply.headers["allow"] == "POST"
    assert reply.error_code == "method_not_allowed"
    reply = await listener.request("DELETE", "/healthz")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("key", "header"),
    [(None, None), ("wrong", None), (None, "Basic dGVzdDp0ZXN0"), (None, "Bearer "), ("", None)],
)
async def test_api_needs_a_known_key(
    listener: Listener, key: str | None, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path, body in [
        ("POST", "/api/publish", {"topic": "a", "data": 1}),
        ("GET", "/api/history?topic=a", None),
        ("GET", "/api/presence?topic=a", None),
        ("POST", "/api/disconnect", {"client": "x"}),
    ]:
        reply = await listener.request(method, path, body, key=key, headers=headers)
        assert reply.status == 401, path
        assert reply.error_code == "unauthorized"
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert listener.backend.offsets == {}


async def test_api_is_closed_without_configured_keys() -> None:
    async with running_listener(keys=()) as lst:
        reply = await lst.request("POST", "/api/publish", {"topic": "a", "data": 1}, key="")
        assert reply.status == 401
        assert "no [api] keys" in reply.json()["error"]["message"]


async def test_publish_returns_offsets(listener: Listener) -> None:
    for expected in (1, 2, 3):
        reply = await listener.request(
            "POST", "/api/publish", {"topic": "chat.room1", "data": {"n": expected}}
        )
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body == {"topic": "chat.room1", "offset": expected, "epoch": listener.backend.epoch}
    stored = listener.backend.topics["chat.room1"][-1]
    assert json.loads(stored.data) == {"n": 3}
    assert stored.sender is None
    # any JSON value is data, null included
    reply = await listener.request("POST", "/api/publish", {"topic": "t", "data": None})
    assert reply.status == 200
    assert listener.backend.topics["t"][0].data == "null"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'{"topic": "a"}', "bad_request"),
        (b'{"data": 1}', "bad_request"),
        (b'{"topic": 5, "data": 1}', "bad_request"),
        (b'{"topic": "a.*", "data": 1}', "bad_topic"),
        (b'{"topic": "a..b", "data": 1}', "bad_topic"),
        (b'{"topic": "a", "data": NaN}', "bad_request"),
        (b'{"topic": "a", "data": "\xff"}', "bad_request"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_request"),
        (b"", "bad_request"),
    ],
)
async def test_publish_rejects_bad_bodies(listener: Listener, raw: bytes, code: str) -> None:
    reply = await listener.request("POST", "/api/publish", raw=raw)
    assert reply.status == 400
    assert reply.error_code == code
    assert listener.backend.offsets == {}


async def test_publish_maps_backend_errors(listener: Listener) -> None:
    big = "x" * 2000
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": big})
    assert reply.status == 413
    assert reply.error_code == "too_large"
    listener.backend.bus_up = False
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert reply.status == 503
    assert reply.error_code == "unavailable"
    assert reply.headers["retry-after"] == "1"
    listener.backend.bus_up = True
    listener.backend.fail_with = FrameError("rate_limited", "slow down")
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert (reply.status, reply.error_code) == (429, "rate_limited")


async def test_errors_wrapped_in_exception_groups_keep_their_code(listener: Listener) -> None:
    listener.backend.fail_with = ExceptionGroup("nursery", [FrameError("forbidden", "no")])
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert (reply.status, reply.error_code) == (403, "forbidden")
    listener.backend.fail_with = ExceptionGroup("two", [ValueError(), KeyError()])
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert (reply.status, reply.error_code) == (500, "internal")


async def test_a_failing_backend_gives_500_and_the_listener_lives_on(listener: Listener) -> None:
    listener.backend.fail_with = RuntimeError("boom")
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert reply.status == 500
    assert reply.json() == {"error": {"code": "internal", "message": "internal error"}}
    listener.backend.fail_with = None
    reply = await listener.request("POST", "/api/publish", {"topic": "a", "data": 1})
    assert reply.status == 200


async def test_history(listener: Listener) -> None:
    for n in range(1, 8):
        await listener.request("POST", "/api/publish", {"topic": "news", "data": {"n": n}})
    epoch = listener.backend.epoch
    reply = await listener.request("GET", "/api/history?topic=news")
    assert reply.status == 200
    body = reply.json()
    assert body["offset"] == 7
    assert body["epoch"] == epoch
    assert [m["offset"] for m in body["messages"]] == [3, 4, 5, 6, 7]
    assert body["messages"][0] == {
        "op": "message",
        "topic": "news",
        "offset": 3,
        "epoch": epoch,
        "from": None,
        "data": {"n": 3},
    }
    assert "recovered" not in body

    reply = await listener.request("GET", f"/api/history?topic=news&since=5&epoch={epoch}")
    body = reply.json()
    assert [m["offset"] for m in body["messages"]] == [6, 7]
    assert body["recovered"] is True
    assert body["missed"] is None

    reply = await listener.request("GET", f"/api/history?topic=news&since=1&epoch={epoch}&limit=2")
    body = reply.json()
    assert [m["offset"] for m in body["messages"]] == [3, 4]
    assert body["recovered"] is False
    assert body["missed"] == {"from": 2, "to": 2}

    reply = await listener.request("GET", "/api/history?topic=news&since=3&epoch=other")
    body = reply.json()
    assert body["recovered"] is False
    assert body["missed"] == {"from": 1, "to": 2}

    reply = await listener.request("GET", "/api/history?topic=empty")
    assert reply.json() == {"topic": "empty", "offset": 0, "epoch": epoch, "messages": []}


async def test_history_last(listener: Listener) -> None:
    for n in range(1, 8):
        await listener.request("POST", "/api/publish", {"topic": "news", "data": {"n": n}})
    epoch = listener.backend.epoch  # 3..7 held
    body = (await listener.request("GET", "/api/history?topic=news&last=2")).json()
    assert [m["offset"] for m in body["messages"]] == [6, 7]
    assert (body["offset"], "recovered" in body) == (7, False)
    body = (
        await listener.request("GET", f"/api/history?topic=news&since=1&epoch={epoch}&last=5")
    ).json()
    assert [m["offset"] for m in body["messages"]] == [3, 4, 5, 6, 7]
    assert (body["recovered"], body["missed"]) == (True, None)  # offset 2 skipped by choice
    body = (
        await listener.request("GET", f"/api/history?topic=news&since=1&epoch={epoch}&last=6")
    ).json()
    assert (body["recovered"], body["missed"]) == (False, {"from": 2, "to": 2})


@pytest.mark.parametrize(
    "query",
    [
        "",
        "topic=",
        "topic=a.>",
        "topic=news&since=1",
        "topic=news&epoch=x",
        "topic=news&since=-1&epoch=x",
        "topic=news&since=abc&epoch=x",
        "topic=news&limit=0",
        "topic=news&limit=1001",
        "topic=news&limit=1e3",
        "topic=news&last=0",
        "topic=news&last=1001",
        "topic=news&last=-1",
        "topic=news&last=two",
        "topic=news&last=2&limit=2",
        "topic=news&topic=other",
        "topic=%ff",
        "&".join(f"f{i}=1" for i in range(50)),
    ],
)
async def test_history_rejects_bad_queries(listener: Listener, query: str) -> None:
    reply = await listener.request("GET", f"/api/history?{query}")
    assert reply.status == 400, query
    assert reply.error_code in ("bad_request", "bad_topic")


async def test_presence_and_disconnect(listener: Listener) -> None:
    listener.backend.members["room"] = {"bob", "alice"}
    reply = await listener.request("GET", "/api/presence?topic=room")
    assert reply.json() == {"topic": "room", "clients": ["alice", "bob"]}
    reply = await listener.request("GET", "/api/presence?topic=room.*")
    assert (reply.status, reply.error_code) == (400, "bad_topic")

    listener.backend.connections["alice"] = 3
    reply = await listener.request("POST", "/api/disconnect", {"client": "alice"})
    assert reply.json() == {"client": "alice", "closed": 3}
    reply = await listener.request("POST", "/api/disconnect", {"client": "alice"})
    assert reply.json() == {"client": "alice", "closed": 0}
    reply = await listener.request("POST", "/api/disconnect", {"client": ""})
    assert (reply.status, reply.error_code) == (400, "bad_request")


async def test_client_js_pages_and_assets(listener: Listener) -> None:
    reply = await listener.request("GET", "/client.js", key=None)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/javascript; charset=utf-8"
    assert reply.headers["access-control-allow-origin"] == "*"
    assert b"export class PubSubClient" in reply.body
    # what it loads to share one connection between tabs, importable from any origin too
    for path, marker in [
        ("/client-shared.js", b"export function sharedSocket"),
        ("/client-hub.js", b"export class Hub"),
        ("/client-worker.js", b"serveSharedWorker(self)"),
    ]:
        reply = await listener.request("GET", path, key=None)
        assert reply.status == 200, path
        assert reply.headers["content-type"] == "text/javascript; charset=utf-8"
        assert reply.headers["access-control-allow-origin"] == "*"
        assert marker in reply.body

    for path, marker in [("/demo/", b"demo.js"), ("/status/", b"status.js")]:
        reply = await listener.request("GET", path, key=None)
        assert reply.status == 200, path
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in reply.headers["content-security-policy"]
        assert reply.headers["referrer-policy"] == "no-referrer"
        assert marker in reply.body

    reply = await listener.request("GET", "/demo?token=abc", key=None)
    assert reply.status == 308
    assert reply.headers["location"] == "/demo/?token=abc"

    reply = await listener.request("GET", "/static/demo.js", key=None)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/javascript; charset=utf-8"
    for bad in ("/static/../http.py", "/static/", "/static/..%2fhttp.py", "/static/nope.js"):
        reply = await listener.request("GET", bad, key=None)
        assert reply.status == 404, bad

    reply = await listener.request("GET", "/demo/config", key=None)
    assert reply.json() == {"ws_port": 8765, "ws_scheme": "ws", "node": "test-node", "workers": 2}
    reply = await listener.request("GET", "/client/config", key=None)
    assert reply.json()["ws_port"] == 8765
    assert reply.headers["access-control-allow-origin"] == "*"


async def test_status_data(listener: Listener) -> None:
    m0, m1 = listener.backend.metrics
    m0.connections.set(3)
    m1.connections.set(4)
    m1.deliveries_out.inc(10)
    reply = await listener.request("GET", "/status/data", key=None)
    body = reply.json()
    assert body["ready"] is True
    assert body["workers"][0]["connections"] == 3
    assert body["workers"][1] == {
        "worker": "1",
        "connections": 4,
        "subscriptions": 0,
        "topics": 0,
        "publications_in": 0,
        "deliveries_out": 10,
        "bytes_out": 0,
    }


async def test_keep_alive_serves_several_requests_on_one_connection(listener: Listener) -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await listener.raw(one + one + last)
    assert data.count(b"HTTP/1.1 200 ") == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x00\xff\x16\x03\x01 tls hello",
    ],
)
async def test_malformed_requests_get_400(listener: Listener, raw: bytes) -> None:
    data = await listener.raw(raw)
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b'"code":"bad_request"' in data
    assert (await listener.request("GET", "/healthz")).status == 200


async def test_oversized_header_gets_431(listener: Listener) -> None:
    data = await listener.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]


async def test_oversized_bodies_get_413() -> None:
    async with running_listener(limits=HttpLimits(max_body=1000)) as lst:
        # declared too large: refused without reading it
        head = (
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
        )
        data = await lst.raw(head + b"x" * 100_000)
        assert data.startswith(b"HTTP/1.1 413 "), data[:100]
        assert b'"code":"too_large"' in data
        # chunked, growing past the limit
        head = (
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
        )
        chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
        data = await lst.raw(head + chunk * 4 + b"0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 413 "), data[:100]
        # under the limit, chunked: fine
        body = json.dumps({"topic": "a", "data": "y" * 100}).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        data = await lst.raw(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + chunked)
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]


async def test_expect_100_continue(listener: Listener) -> None:
    body = json.dumps({"topic": "a", "data": 1}).encode()
    head = (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
        b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (len(body), API_KEY.encode())
    )
    stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
    async with stream:
        await stream.send_all(head)
        with trio.fail_after(5):
            interim = await stream.receive_some(1000)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(body)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(1000):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")


async def test_slow_clients_are_timed_out() -> None:
    limits = HttpLimits(header_timeout=0.3, keepalive_timeout=0.3, body_timeout=0.3)
    async with running_listener(limits=limits) as lst:
        with trio.fail_after(5):
            data = await lst.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert data.startswith(b"HTTP/1.1 408 "), data
        with trio.fail_after(5):
            data = await lst.raw(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n{"
            )
        assert data.startswith(b"HTTP/1.1 408 "), data
        with trio.fail_after(5):
            data = await lst.raw(b"")  # says nothing: closed quietly
        assert data == b""


async def test_slow_backend_gives_503() -> None:
    backend = MemoryBackend()
    backend.delay = 5
    async with running_listener(backend, limits=HttpLimits(handler_timeout=0.2)) as lst:
        reply = await lst.request("POST", "/api/publish", {"topic": "a", "data": 1})
        assert (reply.status, reply.error_code) == (503, "unavailable")


async def test_many_concurrent_clients(listener: Listener) -> None:
    results: list[int] = []

    async def one(n: int) -> None:
        reply = await listener.request("POST", "/api/publish", {"topic": "load", "data": n})
        results.append(reply.json()["offset"])

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(one, n)
    assert sorted(results) == list(range(1, 41))
