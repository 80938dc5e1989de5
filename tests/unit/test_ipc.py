"""The hub-worker link (:mod:`broker.ipc`): framing, requests, pushes in order, and what a
corrupt stream does (closes the link with one log line; it must not crash the hub)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from broker.errors import BusError, BusUnavailable
from broker.ipc import MAX_MESSAGE, Link, encode


def echo_peer(received: list[list[Any]]) -> Any:
    """An ``on_message`` that records pushes and answers requests: ``add`` sums its
    arguments, ``fail`` fails, anything else is unknown."""

    def on_message(link: Link, message: list[Any]) -> None:
        received.append(message)
        if message[0] != "req":
            return
        rid, method, args = message[1], message[2], message[3:]
        if method == "add":
            link.reply(rid, True, sum(args))
        elif method == "fail":
            link.reply(rid, False, "unavailable: try later" if args else "broken")
        else:
            link.reply(rid, False, f"unknown method {method!r}")

    return on_message


async def test_requests_replies_and_pushes_cross_in_order() -> None:
    a_stream, b_stream = trio.testing.memory_stream_pair()
    pushes: list[list[Any]] = []
    at_b: list[list[Any]] = []
    a = Link(a_stream, lambda link, message: pushes.append(message))
    b = Link(b_stream, echo_peer(at_b))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        assert await a.call("add", 1, 2, 39) == 42
        with pytest.raises(BusUnavailable, match="try later"):
            await a.call("fail", True)
        with pytest.raises(BusError, match="broken") as failed:
            await a.call("fail")
        assert not isinstance(failed.value, BusUnavailable)

        results: list[Any] = []
        a.call_nowait(results.append, "add", 2, 3)
        # every shape the hub and the workers exchange: text with any character, JSON text
        # as a str, None, bools, nested lists and dicts
        pub = ["pub", "t.ü\u2028", 7, "e1", None, '{"x":[1,"\\u0000"]}']
        for i in range(100):
            b.send([*pub[:2], i, *pub[3:]])
        b.send(["presence", "t", "join", "c1"])
        b.send(["stats", {"closes": {"1000": 3}, "bus_up": True, "lat": [0.5, None]}])
        with trio.fail_after(5):
            while len(pushes) < 102 or not results:
                await trio.testing.wait_all_tasks_blocked()
        assert results == [5]
        assert [p[2] for p in pushes[:100]] == list(range(100))  # in order
        assert list(pushes[0]) == [*pub[:2], 0, *pub[3:]]
        assert list(pushes[100]) == ["presence", "t", "join", "c1"]
        assert pushes[101][1] == {"closes": {"1000": 3}, "bus_up": True, "lat": [0.5, None]}
        nursery.cancel_scope.cancel()


def test_encode_refuses_what_is_not_a_builtin_value() -> None:
    with pytest.raises(ValueError):
        encode(["res", 1, True, object()])


@pytest.mark.parametrize(
    ("garbage", "event"),
    [
        (struct.pack("!I", 3) + b"\xff\xfe\xfd", "ipc_message_undecodable"),
        (struct.pack("!I", MAX_MESSAGE + 1), "ipc_message_too_large"),
    ],
)
async def test_a_corrupt_stream_closes_the_link_and_fails_pending_calls(
    garbage: bytes, event: str
) -> None:
    a_stream, b_stream = trio.testing.memory_stream_pair()
    a = Link(a_stream, lambda link, message: None)
    outcome: list[Any] = []

    async def call() -> None:
        try:
            await a.call("add", 1)
        except BusUnavailable as exc:
            outcome.append(exc)

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            # the peer answers with one good message, then garbage
            await b_stream.send_all(encode(["presence", "t", "join", "c"]) + garbage)
            with trio.fail_after(5):
                await a.run()  # returns: the link is closed, not crashed
    assert a.closed and a.gone.is_set()
    assert len(outcome) == 1
    assert [e["event"] for e in logs] == [event]
