"""The ``latest`` delivery policy in the send queue and the router: a reader that keeps up gets
every frame as before; one that is behind gets, per topic, a ``skipped`` push and the newest
frame once what was queued before them is out; memory stays within the limits."""

from __future__ import annotations

import json
import socket
from typing import Any

import trio
import trio.testing

from broker.bus.base import Publication
from broker.config import parse_config
from broker.protocol import encode_message
from broker.router import Router, Subscription, latest_topics, message_frame
from broker.sendqueue import Flusher, SendQueue

SECRET = "s" * 32


def pub(topic: str, offset: int, size: int = 100) -> Publication:
    return Publication(topic, offset, "e1", "alice", json.dumps("v" * size))


def pushes(data: bytes) -> list[dict[str, Any]]:
    """The JSON of each unmasked server text frame in ``data``, which holds whole frames."""
    out = []
    i = 0
    while i < len(data):
        assert data[i] == 0x81
        n, start = data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, start = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
        elif n == 127:
            n, start = int.from_bytes(data[i + 2 : i + 10], "big"), i + 10
        out.append(json.loads(data[start : start + n]))
        i = start + n
    return out


def summary(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (m["op"], m["topic"], m["offset"])
        if m["op"] == "message"
        else (m["op"], m["topic"], m["from"], m["to"])
        for m in items
    ]


async def socket_queue(
    nursery: trio.Nursery, flusher: Flusher, max_bytes: int, write_timeout: float = 10.0
) -> tuple[SendQueue, socket.socket, list[str]]:
    """A queue writing to one end of a socket pair with small buffers; the other end, which
    nobody reads until the test does; and the slow-consumer verdicts."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(False)
    b.setblocking(False)
    verdicts: list[str] = []
    queue = SendQueue(
        flusher, nursery, max_bytes=max_bytes, write_timeout=write_timeout, on_slow=verdicts.append
    )
    queue.attach(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    return queue, b, verdicts


async def read_all(peer: socket.socket, quiet: float = 0.2) -> bytes:
    """Read from ``peer`` until nothing more arrives for ``quiet`` seconds."""
    got = bytearray()
    while True:
        with trio.move_on_after(quiet):
            await trio.lowlevel.wait_readable(peer)
            got.extend(peer.recv(1 << 16))
            continue
        return bytes(got)


async def test_a_reader_that_keeps_up_gets_every_frame_unchanged() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=1 << 20)
        sent = [pub("prices.a", i) for i in range(1, 21)]
        for p in sent:
            assert queue.send(message_frame(p), p)
        data = await read_all(peer)
        assert data == b"".join(message_frame(p) for p in sent)
        assert queue.held_bytes == 0 and flusher.skipped == 0 and verdicts == []
        nursery.cancel_scope.cancel()


async def test_a_reader_behind_gets_the_skipped_range_then_the_newest_per_topic() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=20_000)
        # Far more than the socket buffers and the queue hold, on two topics, nobody reading.
        for i in range(1, 401):
            for topic in ("prices.a", "prices.b"):
                p = pub(topic, i)
                assert queue.send(message_frame(p), p)
            if i % 50 == 0:
                await trio.sleep(0.01)  # let the flusher write what the sockets take
        assert verdicts == []
        assert queue.queued <= 20_000
        assert 0 < queue.held_bytes <= 20_000
        items = pushes(await read_all(peer))
        seen = summary(items)
        assert seen[-4:] == [
            ("skipped", "prices.a", seen[-4][2], 399),
            ("message", "prices.a", 400),
            ("skipped", "prices.b", seen[-2][2], 399),
            ("message", "prices.b", 400),
        ]
        assert items[-4]["epoch"] == "e1"
        # Every offset of each topic either arrived or was reported skipped, in order.
        for topic in ("prices.a", "prices.b"):
            covered: list[int] = []
            for m in items:
                if m["topic"] != topic:
                    continue
                if m["op"] == "skipped":
                    covered.extend(range(m["from"], m["to"] + 1))
                else:
                    covered.append(m["offset"])
            assert covered == list(range(1, 401))
        skipped = sum(m["to"] - m["from"] + 1 for m in items if m["op"] == "skipped")
        assert flusher.skipped == skipped > 0
        assert queue.held_bytes == 0 and queue.queued == 0
        nursery.cancel_scope.cancel()


async def test_publications_after_the_release_follow_in_order() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, _ = await socket_queue(nursery, flusher, max_bytes=10_000)
        for i in range(1, 301):
            p = pub("t", i)
            queue.send(message_frame(p), p)
        first = summary(pushes(await read_all(peer)))
        later = pub("t", 301)
        queue.send(message_frame(later), later)
        second = summary(pushes(await read_all(peer)))
        assert first[-1] == ("message", "t", 300)
        assert second == [("message", "t", 301)]
        nursery.cancel_scope.cancel()


def frame_len(topic: str, offset: int, size: int = 100) -> int:
    return len(message_frame(pub(topic, offset, size)))


async def test_past_the_limit_the_newest_is_held_behind_other_topics_frames() -> None:
    """Nothing is written until the test flushes: which frames were appended, held and
    replaced does not depend on what the socket takes."""
    flusher = Flusher()  # not running
    big, small = frame_len("t", 1), frame_len("u", 1, 10)
    async with trio.open_nursery() as nursery:
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=5 * big + 2 * small)
        for i in range(1, 11):  # 1-5 fit, 6 is held, 7-10 replace it in turn
            p = pub("t", i)
            assert queue.send(message_frame(p), p)
        assert queue.queued == 5 * big
        assert queue.held_bytes == frame_len("t", 10) and flusher.skipped == 4
        # Another latest topic and a close one still fit: appended, ahead of the held frame.
        u1, c1 = pub("u", 1, 10), pub("c", 1, 10)
        assert queue.send(message_frame(u1), u1)
        assert queue.send(message_frame(c1))
        assert queue.queued == queue.max_bytes
        queue.flush()  # what the socket takes; the drainer writes the rest as it is read
        items = pushes(await read_all(peer))
        assert summary(items) == [
            *(("message", "t", i) for i in range(1, 6)),
            ("message", "u", 1),
            ("message", "c", 1),
            ("skipped", "t", 6, 9),
            ("message", "t", 10),
        ]
        assert items[-1] == json.loads(encode_message("t", 10, "e1", "alice", pub("t", 10).data))
        assert queue.held_bytes == 0 and queue.queued == 0 and verdicts == []
        # Released, the topic is appended again.
        p = pub("t", 11)
        assert queue.send(message_frame(p), p)
        assert queue.queued == frame_len("t", 11) and queue.held_bytes == 0
        peer.close()
        nursery.cancel_scope.cancel()


async def test_a_frame_of_a_close_topic_past_the_limit_overflows_while_frames_are_held() -> None:
    flusher = Flusher()  # not running
    big = frame_len("t", 1)
    async with trio.open_nursery() as nursery:
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=3 * big)
        for i in range(1, 5):
            p = pub("t", i)
            assert queue.send(message_frame(p), p)
        assert queue.held_bytes > 0
        assert not queue.send(message_frame(pub("c", 1)))
        assert verdicts == ["send_queue_max_bytes"]
        assert queue.overflowed and queue.held_bytes == 0 and queue.queued == 0
        p = pub("t", 5)
        assert not queue.send(message_frame(p), p)
        peer.close()
        nursery.cancel_scope.cancel()


async def test_a_latest_frame_larger_than_the_whole_queue_makes_a_slow_consumer() -> None:
    flusher = Flusher()  # not running
    async with trio.open_nursery() as nursery:
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=1_000)
        p = pub("t", 1, 2_000)
        assert not queue.send(message_frame(p), p)
        assert verdicts == ["send_queue_max_bytes"] and queue.held_bytes == 0
        peer.close()
        nursery.cancel_scope.cancel()


async def test_a_held_topic_keeps_its_later_publications_when_room_comes_back() -> None:
    flusher = Flusher()  # not running: the test flushes once, then the drainer writes
    big = frame_len("t", 100, 1000)
    async with trio.open_nursery() as nursery:
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=40 * big)
        for i in range(1, 61):
            p = pub("t", i, 1000)
            assert queue.send(message_frame(p), p)
        skipped = flusher.skipped
        assert queue.held_bytes > 0 and skipped > 0
        queue.flush()  # what the socket takes; the drainer waits to write the rest
        queued = queue.queued
        assert 0 < queued <= queue.max_bytes - big and queue.held_bytes > 0
        # Room again, but the topic holds a frame: the newer one replaces it.
        p = pub("t", 61, 1000)
        assert queue.send(message_frame(p), p)
        assert queue.queued == queued and flusher.skipped == skipped + 1
        items = pushes(await read_all(peer))
        covered: list[int] = []
        for i, m in enumerate(items):
            if m["op"] == "skipped":
                assert items[i + 1]["offset"] == m["to"] + 1
                covered.extend(range(m["from"], m["to"] + 1))
            else:
                covered.append(m["offset"])
        assert covered == list(range(1, 62))
        assert summary(items)[-1] == ("message", "t", 61) and verdicts == []
        nursery.cancel_scope.cancel()


async def test_held_frames_are_bounded_by_the_limit_too() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await socket_queue(nursery, flusher, max_bytes=5_000)
        # Each of many topics holds one frame: together they pass the limit.
        for i in range(1, 400):
            p = pub(f"t{i}", 1)
            if not queue.send(message_frame(p), p):
                break
            if i % 20 == 0:
                await trio.sleep(0.01)
        assert verdicts == ["send_queue_max_bytes"]
        assert queue.overflowed and queue.held_bytes == 0 and queue.queued < 5_000
        peer.close()
        nursery.cancel_scope.cancel()


async def test_write_timeout_spares_a_latest_reader_but_not_a_close_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        latest, latest_peer, latest_verdicts = await socket_queue(
            nursery, flusher, max_bytes=1 << 20, write_timeout=5.0
        )
        close, close_peer, close_verdicts = await socket_queue(
            nursery, flusher, max_bytes=1 << 20, write_timeout=5.0
        )
        # The router tells a queue that it receives latest topics when it subscribes: the
        # queue's own frames never pass its limit here, so nothing else would.
        router = Router()
        router.bus = Bus()  # type: ignore[assignment]
        router.latest = latest_topics(
            parse_config(
                {"auth": {"jwt_secret": SECRET}, "delivery": [{"pattern": "l", "policy": "latest"}]}
            )
        )
        await router.add(Subscription(latest, "l"))
        await router.add(Subscription(close, "c"))
        for i in range(1, 201):  # far more than the socket buffers; nobody reads
            router.on_publication(pub("l", i, 1000))
            router.on_publication(pub("c", i, 1000))
        assert latest.held_bytes == 0
        await trio.sleep(60)
        assert close_verdicts == ["write_timeout"]
        assert latest_verdicts == [] and not latest.overflowed and latest.queued > 0
        latest_peer.close()
        close_peer.close()
        nursery.cancel_scope.cancel()


async def test_a_stream_without_a_socket_releases_held_frames_too() -> None:
    """The path of TLS streams: the drainer writes with send_all."""
    flusher = Flusher()
    server, client = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue = SendQueue(flusher, nursery, max_bytes=2_000, write_timeout=10.0)
        queue.attach(server)
        for i in range(1, 101):
            p = pub("t", i)
            queue.send(message_frame(p), p)
            await trio.lowlevel.checkpoint()
        got = bytearray()
        while True:
            with trio.move_on_after(0.2):
                got.extend(await client.receive_some(1 << 16))
                continue
            break
        seen = summary(pushes(bytes(got)))
        assert seen[-1] == ("message", "t", 100)
        assert seen[-2][0] == "skipped" and seen[-2][3] == 99
        nursery.cancel_scope.cancel()


class Recorder(SendQueue):
    """Stands in for a SendQueue: records which path each frame took. (A subclass, and
    without the queue's own state: compiled, the router takes nothing else.)"""

    def __init__(self) -> None:  # no flusher, no socket
        self.calls: list[tuple[str, int]] = []
        self.receives_latest = False

    def send(self, frame: bytes, p: Publication | None = None) -> bool:
        offset = pushes(frame)[0]["offset"]
        if p is not None:
            assert offset == p.offset
        self.calls.append(("send" if p is None else "latest", offset))
        return True


class Bus:
    async def watch(self, pattern: str) -> None:
        pass


PRICES = {
    "auth": {"jwt_secret": SECRET},
    "delivery": [
        {"pattern": "prices.slow", "policy": "close"},
        {"pattern": "prices.>", "policy": "latest"},
    ],
}


def prices_router(latest: bool = True) -> Router:
    """A router with a bus that watches nothing; ``prices.>`` but ``prices.slow`` delivered
    latest (unless not ``latest``)."""
    router = Router()
    router.bus = Bus()  # type: ignore[assignment]
    if latest:
        router.latest = latest_topics(parse_config(PRICES))
    return router


async def test_the_router_gives_latest_topics_their_publication_once_per_session() -> None:
    router = prices_router()
    queue = Recorder()
    for pattern in ("prices.a", "prices.>", "prices.slow"):
        await router.add(Subscription(queue, pattern))
    router.on_publication(pub("prices.a", 1))
    router.on_publication(pub("prices.slow", 2))
    assert queue.calls == [("latest", 1), ("send", 2)]
    assert router.deliveries == 2


async def test_the_router_tells_a_queue_that_it_receives_latest_topics() -> None:
    router = prices_router()
    exact, close, wild = Recorder(), Recorder(), Recorder()
    await router.add(Subscription(exact, "prices.a"))  # type: ignore[arg-type]
    await router.add(Subscription(close, "prices.slow"))  # type: ignore[arg-type]
    await router.add(Subscription(wild, "prices.*"))  # type: ignore[arg-type]
    assert (exact.receives_latest, close.receives_latest, wild.receives_latest) == (
        True,
        False,
        False,
    )
    router.on_publication(pub("prices.slow", 1))
    assert not close.receives_latest and not wild.receives_latest
    router.on_publication(pub("prices.b", 1))
    assert wild.receives_latest and not close.receives_latest
    # A reload that makes a subscribed topic latest tells its queues at once.
    later = prices_router(latest=False)
    queue = Recorder()
    await later.add(Subscription(queue, "prices.a"))  # type: ignore[arg-type]
    assert not queue.receives_latest
    later.latest = latest_topics(parse_config(PRICES))
    assert queue.receives_latest


def test_no_latest_rule_leaves_the_router_on_its_one_path() -> None:
    config = parse_config(
        {"auth": {"jwt_secret": SECRET}, "delivery": [{"pattern": ">", "policy": "close"}]}
    )
    assert latest_topics(config) is None


async def test_publications_stitched_after_a_subscribe_follow_the_policy_too() -> None:
    config = parse_config(
        {"auth": {"jwt_secret": SECRET}, "delivery": [{"pattern": "p.>", "policy": "latest"}]}
    )
    router = Router()
    router.latest = latest_topics(config)
    queue = Recorder()
    router.send_one(queue, pub("p.a", 1))
    router.send_one(queue, pub("q.a", 2))
    assert queue.calls == [("latest", 1), ("send", 2)]
