"""Sessions over in-memory streams, with trio's autojump clock: every timer of a connection
(idle, auth, token expiry, handshake) runs in milliseconds, and the whole op set is exercised
without a socket."""

from __future__ import annotations

import gc
import json
from typing import Any

import jwt
import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from broker.errors import BusUnavailable
from broker.frames import FrameReader
from tests.support.inmemory import (
    call,
    closed_with,
    connect,
    make_worker,
    recv,
    running,
    token,
)


async def test_idle_connection_is_closed_with_4009(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker(timeouts={"idle_timeout": 60, "ping_interval": 1000})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        assert (await recv(ws))["op"] == "welcome"
        start = trio.current_time()
        assert await closed_with(ws) == 4009
        assert 60 <= trio.current_time() - start < 61


async def test_any_frame_resets_the_idle_timer(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker(timeouts={"idle_timeout": 60, "ping_interval": 1000})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        start = trio.current_time()
        for _ in range(5):
            await trio.sleep(50)
            await ws.ping()  # a control frame counts too
        assert await closed_with(ws) == 4009
        assert trio.current_time() - start >= 250 + 60 - 1


async def test_server_pings_keep_a_responsive_client_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # trio-websocket answers pings automatically: the pongs count as traffic.
    worker = make_worker(timeouts={"idle_timeout": 60, "ping_interval": 20})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        with trio.move_on_after(600):
            await ws.get_message()
        assert ws.closed is None


async def test_unauthenticated_connection_is_closed_with_4001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(timeouts={"auth_timeout": 5})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery)
        reply = await call(ws, op="subscribe", topic="a", id=1)
        assert reply["error"]["code"] == "unauthorized"
        start = trio.current_time()
        assert await closed_with(ws) == 4001
        assert trio.current_time() - start <= 5


async def test_inband_auth_welcomes_then_replies(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        ws = await connect(worker, nursery)
        await ws.send_message(json.dumps({"op": "auth", "token": token("bob"), "id": "a"}))
        welcome = await recv(ws)
        assert (
            welcome["op"] == "welcome" and welcome["client"] == "bob" and welcome["node"] == "test"
        )
        reply = await recv(ws)
        assert reply["id"] == "a" and reply["ok"] and reply["client"] == "bob"


async def test_inband_auth_failure_closes_with_4001(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        ws = await connect(worker, nursery)
        reply = await call(ws, op="auth", token="forged", id=1)
        assert reply["error"]["code"] == "unauthorized"
        start = trio.current_time()
        assert await closed_with(ws) == 4001
        assert trio.current_time() - start < 1  # at once, not at the auth deadline


async def test_a_failed_refresh_leaves_an_authenticated_connection_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        good = token("bob", ttl=600)
        ws = await connect(worker, nursery, f"/ws?token={good}")
        welcome = await recv(ws)
        assert welcome["expires_at"] == jwt.decode(good, options={"verify_signature": False})["exp"]
        reply = await call(ws, op="auth", token="forged", id=1)
        assert reply["error"]["code"] == "unauthorized"
        assert (await call(ws, op="ping", id=2))["ok"]  # the token it has still holds


async def test_history_and_subscribe_name_the_offsets_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(history=[{"pattern": ">", "size": 2, "ttl": 600}])  # type: ignore[arg-type]
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        for i in range(5):
            published = await call(ws, op="publish", topic="t", data=i, id=f"p{i}")
        since = {"offset": 1, "epoch": published["epoch"]}
        hist = await call(ws, op="history", topic="t", since=since, id=1)
        assert [m["offset"] for m in hist["messages"]] == [4, 5]
        assert hist["recovered"] is False and hist["missed"] == {"from": 2, "to": 3}
        sub = await call(ws, op="subscribe", topic="t", since=since, id=2)
        assert sub["recovered"] is False and sub["missed"] == {"from": 2, "to": 3}
        wild = await call(ws, op="subscribe", topic="t.*", presence=True, id=3)
        assert wild["error"]["code"] == "bad_request"


async def test_expired_token_closes_with_4003_unless_refreshed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The token's expiry is wall-clock time; the session turns it into a trio deadline.
    worker = make_worker(timeouts={"idle_timeout": 10000, "ping_interval": 10000})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token(ttl=30)}")
        await recv(ws)
        await trio.sleep(20)
        refreshed = await call(ws, op="auth", token=token(ttl=100), id=1)
        assert refreshed["ok"]
        other = await call(ws, op="auth", token=token("mallory", ttl=100), id=2)
        assert other["error"]["code"] == "unauthorized"
        start = trio.current_time()
        assert await closed_with(ws) == 4003
        assert 95 <= trio.current_time() - start <= 101


async def test_refresh_that_revokes_a_subscription_closes_with_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        assert (await call(ws, op="subscribe", topic="a.b", id=1))["ok"]
        await ws.send_message(
            json.dumps({"op": "auth", "token": token(pubsub={"subscribe": ["x.>"]})})
        )
        assert await closed_with(ws) == 1008


async def test_handshake_that_never_completes_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(timeouts={"handshake_timeout": 3})
    async with running(worker):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            n.start_soon(worker._handle, server_stream)
            await client_stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            start = trio.current_time()
            assert await client_stream.receive_some() == b""  # closed by the server
            assert trio.current_time() - start == pytest.approx(3, abs=0.01)
        assert worker.handshaking == 0 and not worker.sessions


async def test_a_client_that_never_reads_the_101_is_a_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A client that sends a valid upgrade and then never reads: on a lockstep stream the 101
    # cannot go out. The 101 is queued like any frame, so the write timeout ends it, without
    # a failure and without holding anything (trio-websocket once failed here with an
    # UnboundLocalError).
    worker = make_worker(timeouts={"handshake_timeout": 3, "write_timeout": 2})
    async with running(worker):
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as n:
                n.start_soon(worker._handle, server_stream)
                await client_stream.send_all(
                    b"GET /ws?token=" + token().encode() + b" HTTP/1.1\r\nHost: x\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await trio.sleep(10)
                n.cancel_scope.cancel()
        events = [e["event"] for e in logs]
        assert events == ["connect", "slow_consumer", "disconnect"]
        assert worker.handshaking == 0 and not worker.sessions


async def test_ops_and_errors_in_memory(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker(
        limits={
            "max_subscriptions": 2,
            "publish_rate": 1.0,
            "publish_burst": 2,
            "max_data_size": 100,
        },
        presence={"topics": ["a.>"]},
    )
    claims = {"publish": ["a.>"], "subscribe": ["a.>", "!a.secret.>"], "presence": ["a.>"]}
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token(pubsub=claims)}")
        await recv(ws)
        assert (await call(ws, op="subscribe", topic="a.*", id=1))["ok"]
        assert (await call(ws, op="subscribe", topic="a.*", id=2))["error"]["code"] == "bad_request"
        assert (await call(ws, op="subscribe", topic="a.>", id=3))["error"]["code"] == "forbidden"
        assert (await call(ws, op="subscribe", topic="a..b", id=4))["error"]["code"] == "bad_topic"
        assert (await call(ws, op="subscribe", topic="a.x", id=5))["ok"]
        assert (await call(ws, op="subscribe", topic="a.y", id=6))["error"][
            "code"
        ] == "too_many_subscriptions"
        assert (await call(ws, op="unsubscribe", topic="a.y", id=7))["error"][
            "code"
        ] == "not_subscribed"
        assert (await call(ws, op="publish", topic="b.x", data=1, id=8))["error"][
            "code"
        ] == "forbidden"
        assert (await call(ws, op="publish", topic="a.*", data=1, id=9))["error"][
            "code"
        ] == "bad_topic"
        assert (await call(ws, op="publish", topic="a.x", data="x" * 200, id=10))["error"][
            "code"
        ] == "too_large"
        await ws.send_message(json.dumps({"op": "publish", "topic": "a.x", "data": 1, "id": 11}))
        frames = [await recv(ws), await recv(ws)]
        # One publication, two matching subscriptions (a.* and a.x): delivered once.
        assert sorted(f.get("op", "reply") for f in frames) == ["message", "reply"]
        assert {f["offset"] for f in frames} == {1}
        with trio.move_on_after(0.1):
            extra = await recv(ws)
            pytest.fail(f"delivered twice: {extra}")
        await call(ws, op="publish", topic="a.x", data=2, id=12)
        assert (await call(ws, op="publish", topic="a.x", data=3, id=13))["error"][
            "code"
        ] == "rate_limited"
        assert (await call(ws, op="ping", id=14)) == {"id": 14, "ok": True}
        assert (await call(ws, op="history", topic="a.secret.x", id=15))["error"][
            "code"
        ] == "forbidden"
        hist = await call(ws, op="history", topic="a.x", id=16)
        assert [m["data"] for m in hist["messages"]] == [1, 2]
        assert (await call(ws, op="presence", topic="a.x", id=17))["clients"] == ["alice"]


async def test_too_many_violations_close_with_4029(autojump_clock: trio.testing.MockClock) -> None:
    worker = make_worker(limits={"max_violations": 5})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        for _ in range(6):
            await ws.send_message("nope")
        assert await closed_with(ws) == 4029


async def test_a_broken_socket_ends_the_session_without_a_close_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        assert (await call(ws, op="subscribe", topic="t", id=1))["ok"]
        (session,) = worker.sessions.values()
        with structlog.testing.capture_logs() as logs:
            # What the send queue reports when a write fails (the socket reset, say).
            session.queue.on_broken("Connection reset by peer")
            assert await closed_with(ws) == 1006  # no close frame: the socket is released
            await trio.testing.wait_all_tasks_blocked()
        assert not worker.sessions and worker.closes == {1006: 1}
        assert not worker.router.index.exact  # its subscription went with it
        disconnects = [e for e in logs if e["event"] == "disconnect"]
        assert [(e["code"], e["reason"]) for e in disconnects] == [
            (1006, "Connection reset by peer")
        ]


async def test_violations_are_counted_over_a_sliding_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(limits={"max_violations": 5})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        for i in range(5):  # exactly the limit: still served
            assert (await call(ws, op="nope", id=i))["ok"] is False
        await trio.sleep(11)  # the window has passed: those no longer count
        for i in range(5):
            assert (await call(ws, op="nope", id=10 + i))["ok"] is False
        assert (await call(ws, op="ping", id=20))["ok"]
        await ws.send_message(json.dumps({"op": "nope", "id": 21}))
        assert await closed_with(ws) == 4029


@pytest.mark.parametrize(
    ("kind", "code"), [(BusUnavailable, "unavailable"), (RuntimeError, "internal")]
)
async def test_a_publication_the_bus_fails_is_answered_with_an_error(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    kind: type[Exception],
    code: str,
) -> None:
    # Made here, not in the parameters: a raised exception's traceback holds the session.
    failure = kind("the bus failed")
    worker = make_worker()

    def publish_nowait(topic: str, data: str, sender: str | None, done: Any) -> bool:
        done(failure)  # as a bus that lost the publication reports it
        return True

    async def publish(topic: str, data: str, sender: str | None) -> None:
        raise failure

    def publish_now(topic: str, data: str, sender: str | None) -> None:
        raise failure

    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        monkeypatch.setattr(worker.bus, "publish_now", publish_now)  # failed at once
        assert (await call(ws, op="publish", topic="t", data=1, id=0))["error"]["code"] == code
        monkeypatch.setattr(worker.bus, "publish_now", lambda *args: None)  # settled later
        monkeypatch.setattr(worker.bus, "publish_nowait", publish_nowait)
        assert (await call(ws, op="publish", topic="t", data=1, id=1))["error"]["code"] == code
        monkeypatch.setattr(worker.bus, "publish_nowait", lambda *args: False)
        monkeypatch.setattr(worker.bus, "publish", publish)
        assert (await call(ws, op="publish", topic="t", data=1, id=2))["error"]["code"] == code
        assert (await call(ws, op="ping", id=3))["ok"]  # not left waiting for an answer


async def test_a_crash_in_one_connection_reaches_no_other(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        a = await connect(worker, nursery, f"/ws?token={token('a')}")
        b = await connect(worker, nursery, f"/ws?token={token('b')}")
        await recv(a)
        await recv(b)

        async def boom(*args: object) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(worker.bus, "history", boom)
        assert (await call(a, op="history", topic="t", id=1))["error"]["code"] == "internal"
        assert (await call(b, op="ping", id=2))["ok"]
        assert (await call(a, op="ping", id=3))["ok"]


def live(cls: type) -> list[object]:
    """The instances of ``cls`` the collector knows (garbage included)."""
    return [o for o in gc.get_objects() if type(o) is cls]


async def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    # The soak test's memory growth: callbacks closing over the session made every closed
    # connection cyclic garbage, freed only by a rare full collection. With the collector
    # off, reference counting alone must free everything of a closed connection.
    worker = make_worker()
    gc.collect()
    gc.disable()
    try:
        async with running(worker) as nursery:
            ws = await connect(worker, nursery, f"/ws?token={token()}")
            await recv(ws)
            assert (await call(ws, op="subscribe", topic="a.>", id=1))["ok"]
            # the server side's frame reader: it must be freed (and not left as garbage)
            assert len(live(FrameReader)) == 1
            await ws.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert not worker.sessions
            assert not live(FrameReader)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = {type(o).__qualname__ for o in gc.garbage}
            gc.garbage.clear()
            assert not left & {"Session", "SendQueue", "ServerWebSocket", "FrameReader"}, sorted(
                left
            )
            nursery.cancel_scope.cancel()
    finally:
        gc.set_debug(0)
        gc.enable()


async def test_replies_keep_request_order_while_publications_are_pipelined(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bus that answers later (as the hub does): a refusal and the requests after it are
    # answered only once the publications before them are, in request order; a publication
    # without an id is answered only when it fails.
    worker = make_worker()
    waiting: list[Any] = []

    def publish_nowait(topic: str, data: str, sender: str | None, done: Any) -> bool:
        waiting.append(done)
        return True

    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        bus = worker.bus
        publish = bus.publish_nowait
        monkeypatch.setattr(bus, "publish_now", lambda *args: None)  # never settled at once
        monkeypatch.setattr(bus, "publish_nowait", publish_nowait)
        frames: list[dict[str, Any]] = [
            {"op": "publish", "topic": "t", "data": 1, "id": 1},
            {"op": "publish", "topic": "t", "data": 2},
            {"op": "publish", "topic": "bad topic", "data": 3, "id": 3},
            {"op": "publish", "topic": "t", "data": 4, "id": 4},
            {"op": "nope", "id": 5},
            {"op": "ping", "id": 6},
        ]
        for frame in frames:
            await ws.send_message(json.dumps(frame))
        await trio.sleep(1)
        assert len(waiting) == 2  # the refusal of 3 waits, and the reader with it
        publish("t", "1", "alice", waiting[0])  # the real bus settles it
        waiting[1](BusUnavailable("lost"))
        await trio.sleep(1)
        assert len(waiting) == 3  # 4 was read, and 5's error waits for it
        publish("t", "4", "alice", waiting[2])
        replies = [await recv(ws) for _ in range(6)]
        assert [(r["id"], r["ok"]) for r in replies] == [
            (1, True),
            (None, False),
            (3, False),
            (4, True),
            (5, False),
            (6, True),
        ]
        assert replies[0]["offset"] == 1 and replies[3]["offset"] == 2
        codes = [r["error"]["code"] for r in replies if not r["ok"]]
        assert codes == ["unavailable", "bad_topic", "bad_request"]
