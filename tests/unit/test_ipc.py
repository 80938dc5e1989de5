"""The hub-worker link (:mod:`broker.ipc`): framing, requests, pushes in order, and what a
corrupt stream does (closes the link with one log line; it must not crash the hub)."""

from __future__ import annotations

import marshal
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import broker.ipc
from broker.errors import BusError, BusUnavailable
from broker.ipc import MAX_MESSAGE, Link, encode


def echo_peer(received: list[list[Any]]) -> Any:
    """An ``on_message`` that records pushes and answers requests: ``add`` sums its
    arguments, ``fail`` fails, anything else is unknown; a run of ``add2`` requests
    (``[id, x, y, ...]``) is answered with a run of sums."""

    def on_message(link: Link, message: list[Any]) -> None:
        received.append(message)
        if message[0] == "add2":
            values = message[1]
            for i in range(0, len(values), 3):
                link.reply_run(values[i], values[i + 1] + values[i + 2], 64)
            return
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


@asynccontextmanager
async def running_pair() -> AsyncIterator[tuple[Link, Link, list[list[Any]], list[list[Any]]]]:
    """Two running links joined in memory: ``a`` records pushes, ``b`` is an
    :func:`echo_peer`; and what each received."""
    a_stream, b_stream = trio.testing.memory_stream_pair()
    pushes: list[list[Any]] = []
    at_b: list[list[Any]] = []
    a = Link(a_stream, lambda link, message: pushes.append(message))
    b = Link(b_stream, echo_peer(at_b))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        yield a, b, pushes, at_b
        nursery.cancel_scope.cancel()


async def test_requests_replies_and_pushes_cross_in_order() -> None:
    async with running_pair() as (a, b, pushes, _):
        assert await a.call("add", 1, 2, 39) == 42
        with pytest.raises(BusUnavailable, match="try later"):
            await a.call("fail", True)
        with pytest.raises(BusError, match="broken") as failed:
            await a.call("fail")
        assert not isinstance(failed.value, BusUnavailable)

        results: list[Any] = []
        a.call_run(results.append, "add2", (2, 3), 64)
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


def read_frames(data: bytes) -> list[list[Any]]:
    """The messages framed in ``data`` (which must hold whole frames only)."""
    messages, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from("!I", data, pos)
        messages.append(marshal.loads(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return messages


async def drain(stream: trio.abc.ReceiveStream) -> bytes:
    """What ``stream`` holds now."""
    out = bytearray()
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0.5):
        while True:
            out += await stream.receive_some()
            await trio.testing.wait_all_tasks_blocked()
    return bytes(out)


async def test_batched_messages_cross_as_one_in_order_with_the_others() -> None:
    a_stream, raw = trio.testing.memory_stream_pair()
    a = Link(a_stream, lambda link, message: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        a.send_batched(["pub", "t", 1], 64)
        a.send_batched(["pub", "t", 2], 64)
        a.send(["presence", "t", "join", "c"])  # seals the batch before it: order kept
        a.send_batched(["pub", "t", 3], 64)  # alone: crosses as itself
        frames = read_frames(await drain(raw))
        assert frames == [
            ["batch", [["pub", "t", 1], ["pub", "t", 2]]],
            ["presence", "t", "join", "c"],
            ["pub", "t", 3],
        ]
        nursery.cancel_scope.cancel()


async def test_runs_of_requests_replies_and_pushes_are_read_in_order() -> None:
    async with running_pair() as (a, b, pushes, at_b):
        results: list[Any] = []
        for i in range(50):
            a.call_run(results.append, "add2", (i, 1), 64)
        b.send_run("pubs", ("t", 1), 64)
        b.send_run("pubs", ("t", 2), 64)
        b.send_batched(["res", 999, True, None], 64)  # a reply nobody waits for: dropped
        b.send_run("oks", (998, None), 64)  # the same, in a run
        b.send_run("pubs", ("t", 3), 64)
        with trio.fail_after(5):
            while len(results) < 50 or len(pushes) < 2:
                await trio.testing.wait_all_tasks_blocked()
        # the requests, in order, in runs (the writer may have flushed between them)
        assert [v for m in at_b for v in m[1][::3]] == list(range(1, 51))
        assert all(m[0] == "add2" for m in at_b)
        assert results == [i + 1 for i in range(50)]
        assert pushes == [["pubs", ["t", 1, "t", 2]], ["pubs", ["t", 3]]]


async def test_a_batch_or_a_run_is_sealed_at_a_page_and_by_any_other_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker.ipc, "PAGE_BYTES", 1000)
    a_stream, raw = trio.testing.memory_stream_pair()
    a = Link(a_stream, lambda link, message: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        for i in range(5):
            a.send_batched(["pub", i], 400)  # two fit a page, the third does not
        a.send_batched(["big", 5], 5000)  # larger than a page: alone
        a.send_batched(["pub", 6], 400)
        a.send(["sealed"])
        for i in range(3):
            a.send_run("r", (i, "x"), 400)  # two fit a page, the third does not
        a.send_run("s", (3,), 100)  # another kind: another run, in the same batch
        a.send_run("r", (4,), 100)
        a.send(["presence", "t", "join", "c"])  # seals the batch before it: order kept
        a.send_run("r", (5,), 5000)  # larger than a page: alone, and grows no further
        a.send_run("r", (6,), 100)
        frames = read_frames(await drain(raw))
        assert frames == [
            ["batch", [["pub", 0], ["pub", 1]]],
            ["batch", [["pub", 2], ["pub", 3]]],
            ["pub", 4],
            ["big", 5],
            ["pub", 6],
            ["sealed"],
            ["r", [0, "x", 1, "x"]],
            ["batch", [["r", [2, "x"]], ["s", [3]], ["r", [4]]]],
            ["presence", "t", "join", "c"],
            ["r", [5]],
            ["r", [6]],
        ]
        nursery.cancel_scope.cancel()


def _unrun(message: list[Any]) -> list[list[Any]]:
    """The messages ``["m", i, text]`` a message read in the test below stands for (a run of
    them carries ``[i, text, ...]``)."""
    if message[0] == "run":
        assert message[1]  # a run is never empty
        values = message[1]
        return [["m", values[k], values[k + 1]] for k in range(0, len(values), 2)]
    return [message]


@settings(max_examples=80, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["plain", "batched", "run"]), st.integers(min_value=1, max_value=1500)
        ),
        max_size=40,
    ),
    yields=st.lists(st.booleans(), max_size=40),
)
def test_any_mix_of_batched_run_and_plain_messages_arrives_whole_and_in_order(
    plan: list[tuple[str, int]], yields: list[bool]
) -> None:
    """Whatever is batched, in a run or neither, of whatever size against a page, and
    whenever the writer gets to run: the peer gets every message once, in the order sent, in
    frames of at most a page of batched messages (or one message alone)."""
    page = 1000

    async def main() -> tuple[list[list[Any]], list[list[Any]]]:
        a_stream, raw = trio.testing.memory_stream_pair()
        a = Link(a_stream, lambda link, message: None)
        sent: list[list[Any]] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            for i, (mode, size) in enumerate(plan):
                message = ["m", i, "x" * (size // 8)]
                sent.append(message)
                if mode == "batched":
                    a.send_batched(message, size)
                elif mode == "run":
                    a.send_run("run", (i, message[2]), size)
                else:
                    a.send(message)
                if i < len(yields) and yields[i]:
                    await trio.testing.wait_all_tasks_blocked()  # the writer may flush here
            frames = read_frames(await drain(raw))
            nursery.cancel_scope.cancel()
        return sent, frames

    original = broker.ipc.PAGE_BYTES
    broker.ipc.PAGE_BYTES = page
    try:
        sent, frames = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        broker.ipc.PAGE_BYTES = original
    got: list[list[Any]] = []
    for frame in frames:
        if frame[0] == "batch":
            assert len(frame[1]) >= 2
            inside = [m for each in frame[1] for m in _unrun(each)]
            assert sum(plan[m[1]][1] for m in inside) <= page  # a batch stays within a page
            assert all(plan[m[1]][0] != "plain" for m in inside)  # only batched ones batched
            got.extend(inside)
        else:
            alone = _unrun(frame)
            if len(alone) > 1:  # a run sent as itself also stays within a page
                assert sum(plan[m[1]][1] for m in alone) <= page
            got.extend(alone)
    assert got == sent


async def writer_passes(
    monkeypatch: pytest.MonkeyPatch, script: list[int]
) -> tuple[list[list[Any]], int]:
    """Queue one batched message on a fresh link, then ``script[i]`` more before the writer's
    pass ``i + 1`` (as other tasks would between its passes), and return the messages that
    crossed and how many passes the writer made. Only the writer calls
    ``trio.lowlevel.checkpoint`` here, so counting those calls counts its passes."""
    passes = 0
    sent = [1]
    checkpoint = trio.lowlevel.checkpoint
    a_stream, raw = trio.testing.memory_stream_pair()
    a = Link(a_stream, lambda link, message: None)

    async def counting() -> None:
        nonlocal passes
        for _ in range(script[passes] if passes < len(script) else 0):
            sent.append(len(sent) + 1)
            a.send_batched(["pub", "t", sent[-1]], 64)
        passes += 1
        await checkpoint()

    monkeypatch.setattr(trio.lowlevel, "checkpoint", counting)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.testing.wait_all_tasks_blocked()
        a.send_batched(["pub", "t", 1], 64)
        frames = read_frames(await drain(raw))
        nursery.cancel_scope.cancel()
    return frames, passes


async def test_a_lone_message_is_written_after_one_quiet_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await writer_passes(monkeypatch, []) == ([["pub", "t", 1]], 1)


async def test_a_burst_with_quiet_passes_between_its_messages_crosses_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three messages, then one before every other pass: past LONE_MESSAGES, one quiet pass
    # does not end the burst.
    frames, passes = await writer_passes(monkeypatch, [2, 0, 1, 0, 1])
    assert frames == [["batch", [["pub", "t", i] for i in range(1, 6)]]]
    assert passes == 7  # the last message came before pass 5, then two quiet passes
