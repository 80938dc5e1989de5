"""The supervisor's hub over real Unix sockets: history replies travel in bounded pages, and a
link that cannot be written to (its worker died, or a message would pass the link's size) ends
alone: the hub and every other worker's link go on."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import broker.ipc
from broker.bus.base import BusHandlers, Publication, StreamPosition
from broker.bus.ipc import HubClient, IpcBus
from broker.config import HistoryRule, LimitsConfig
from broker.errors import BusError, FrameError
from broker.hub import Hub
from broker.ipc import encode


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (up to 5 s) for something another task or process does."""
    for _ in range(500):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


def rule(topic: str) -> HistoryRule:
    return HistoryRule(">", 10_000, 600.0, 10**9)


@asynccontextmanager
async def hub_and_bus(
    path: Path, limits: LimitsConfig | None = None
) -> AsyncIterator[tuple[Hub, IpcBus, list[Publication]]]:
    """A hub serving ``path`` and one worker's bus connected to it (as worker 0)."""
    hub = Hub(rule, limits)
    received: list[Publication] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve, path)
        client = HubClient(str(path), index=0, node="n")
        bus = IpcBus(client, BusHandlers(received.append, lambda e: None))
        await nursery.start(client.run)
        yield hub, bus, received
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def two_workers(
    path: Path,
) -> AsyncIterator[tuple[IpcBus, list[Publication], IpcBus, list[Publication]]]:
    """A hub and two workers' buses (0 and 1), each with what it was delivered."""
    async with hub_and_bus(path) as (_, bus, received):
        other_seen: list[Publication] = []
        other = IpcBus(
            HubClient(str(path), index=1, node="n"), BusHandlers(other_seen.append, print)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(other.client.run)
            yield bus, received, other, other_seen
            nursery.cancel_scope.cancel()


@pytest.fixture
def small_link(monkeypatch: pytest.MonkeyPatch) -> int:
    """Links carry at most 64 KiB a message, pages 16 KiB (the same rules, smaller)."""
    monkeypatch.setattr(broker.ipc, "MAX_MESSAGE", 64 * 1024)
    monkeypatch.setattr(broker.ipc, "PAGE_BYTES", 16 * 1024)
    return 64 * 1024


async def test_history_larger_than_a_link_message_arrives_in_pages(
    tmp_path: Path, small_link: int
) -> None:
    sent: list[int] = []
    real_send_all = trio.SocketStream.send_all

    async def counting_send_all(self: trio.SocketStream, data: Any) -> None:
        sent.append(len(data))
        await real_send_all(self, data)

    async with hub_and_bus(tmp_path / "hub.sock") as (hub, bus, _):
        data = '"' + "x" * 4000 + '"'
        for _ in range(60):  # 240 KB of history: nearly four link messages' worth
            await bus.publish("t", data, "alice")
        epoch = (await bus.position("t")).epoch
        trio.SocketStream.send_all = counting_send_all  # type: ignore[method-assign]
        try:
            everything = await bus.history("t", None, None)
            after = await bus.history("t", StreamPosition(20, epoch), None)
        finally:
            trio.SocketStream.send_all = real_send_all  # type: ignore[method-assign]
        assert [p.offset for p in everything.publications] == list(range(1, 61))
        assert all(p.data == data and p.sender == "alice" for p in everything.publications)
        assert everything.position == StreamPosition(60, epoch)
        assert after.recovered and [p.offset for p in after.publications] == list(range(21, 61))
        assert hub.workers[0].link.closed is False
        assert sent and max(sent) > small_link  # the writes coalesce; the messages do not


async def test_a_refusal_reaches_the_worker_with_its_code(tmp_path: Path) -> None:
    async with hub_and_bus(tmp_path / "hub.sock", LimitsConfig(max_topics=1)) as (hub, bus, _):
        await bus.publish("a", "1", None)
        with pytest.raises(FrameError) as refused:
            await bus.publish("b", "1", None)
        assert refused.value.code == "too_many_topics"
        done: list[Any] = []
        bus.publish_nowait("c", "1", None, done.append)
        await until(lambda: bool(done))
        assert isinstance(done[0], FrameError) and done[0].code == "too_many_topics"
        assert hub.store.stats()["topics_refused"] == 2


async def test_a_refusal_in_a_run_of_publications_answers_only_its_own(tmp_path: Path) -> None:
    async with hub_and_bus(tmp_path / "hub.sock", LimitsConfig(max_topics=1)) as (hub, bus, _):
        await bus.watch("a")
        done: list[Any] = []
        for topic in ("a", "b", "a", "c", "a"):  # one run: nothing else is sent between them
            bus.publish_nowait(topic, "1", None, done.append)
        await until(lambda: len(done) == 5)
        assert [type(d).__name__ for d in done] == [
            "Publication",
            "FrameError",
            "Publication",
            "FrameError",
            "Publication",
        ]
        assert [d.offset for d in done[::2]] == [1, 2, 3]
        assert {d.code for d in done[1::2]} == {"too_many_topics"}
        assert not hub.workers[0].link.closed


async def raw_worker(path: Path, index: int, watch: str) -> socket.socket:
    """A worker that says hello and watches ``watch``, then is never read again."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(encode(["req", 1, "hello", index, 4242, "n"]))
    sock.sendall(encode(["req", 2, "watch", watch]))
    return sock


async def test_a_failed_write_closes_only_that_link(tmp_path: Path) -> None:
    path = tmp_path / "hub.sock"
    async with hub_and_bus(path) as (hub, bus, received):
        dead = await raw_worker(path, 1, "t")
        await bus.watch("t")
        await until(lambda: 1 in hub.workers and "t" in hub.workers[1].patterns)
        # The worker stops reading for good (as a dead one does): writes to it fail.
        dead.shutdown(socket.SHUT_RD)
        for i in range(3):
            await bus.publish("t", str(i), None)
            await trio.sleep(0.05)
        await until(lambda: 1 not in hub.workers)
        # The hub and the other worker go on.
        assert (await bus.publish("t", "after", None)).offset == 4
        await until(lambda: len(received) >= 4)
        assert [p.offset for p in received] == [1, 2, 3, 4]
        dead.close()


async def test_a_message_past_the_link_size_ends_that_link_or_fails_that_request(
    tmp_path: Path, small_link: int
) -> None:
    path = tmp_path / "hub.sock"
    async with hub_and_bus(path) as (hub, bus, _):
        watcher = await raw_worker(path, 1, "big")
        await until(lambda: 1 in hub.workers and "big" in hub.workers[1].patterns)
        # The operations listener publishes without a link: a publication larger than a link
        # message. Its watcher cannot be sent it: that link ends, and only that one.
        hub.publish("big", '"' + "x" * (small_link + 10) + '"', None)
        await until(lambda: 1 not in hub.workers)
        # A history reply holding it cannot be sent either: the request fails, the link stays.
        with pytest.raises(BusError, match="too large"):
            await bus.history("big", None, None)
        assert (await bus.publish("small", "1", None)).offset == 1
        assert not hub.workers[0].link.closed
        watcher.close()


async def test_a_publication_the_link_cannot_carry_is_refused_as_too_large(
    tmp_path: Path, small_link: int
) -> None:
    async with hub_and_bus(tmp_path / "hub.sock") as (hub, bus, _):
        big = "x" * (small_link + 1)
        with pytest.raises(FrameError) as refused:
            await bus.publish("t", big, None)
        assert refused.value.code == "too_large"
        done: list[Any] = []
        bus.publish_nowait("t", big, None, done.append)
        assert isinstance(done[0], FrameError) and done[0].code == "too_large"
        # Near the limit in ASCII it still crosses (the 4-bytes-a-character bound is not
        # the rule), and the link stays up.
        assert (await bus.publish("t", "y" * (small_link - 2048), None)).offset == 1
        assert not hub.workers[0].link.closed


async def test_a_worker_that_stops_reading_cannot_grow_the_hub(
    tmp_path: Path, small_link: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.ipc, "MAX_QUEUED", 4 * small_link)
    path = tmp_path / "hub.sock"
    async with hub_and_bus(path) as (hub, bus, received):
        stuck = await raw_worker(path, 1, "t")  # never read: the socket buffers fill, then
        await until(lambda: 1 in hub.workers and "t" in hub.workers[1].patterns)
        await bus.watch("t")
        data = "z" * 30_000
        for i in range(200):  # 6 MB for the stuck worker: far past the kernel's buffers
            hub.publish("t", data, None)
            await until(lambda n=i + 1: len(received) == n)  # the live worker keeps up
        await until(lambda: 1 not in hub.workers)
        assert 0 in hub.workers and not hub.workers[0].link.closed
        stuck.close()


async def test_the_publisher_hears_its_own_publication_once_in_offset_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.sock"
    forwarded: list[int] = []  # the offsets of the publications the hub forwarded
    real_on_message = HubClient._on_message

    # Watched where the workers receive them: the link is compiled code, whose calls to its
    # own methods a patch of the class would not see.
    def spy(self: HubClient, link: broker.ipc.Link, message: list[Any]) -> None:
        if message[0] == "pubs":
            forwarded.extend(message[1][1::5])
        real_on_message(self, link, message)

    monkeypatch.setattr(HubClient, "_on_message", spy)
    async with two_workers(path) as (bus, received, other, other_seen):
        await bus.watch("t")
        await other.watch("t")
        await bus.watch("u")
        done: list[Any] = []
        for i in range(20):  # both publish, pipelined, to a watched and an unwatched topic
            bus.publish_nowait("t", str(i), "a", done.append)
            other.publish_nowait("t", str(i), "b", done.append)
            bus.publish_nowait("v", str(i), "a", done.append)
        await until(lambda: len(done) == 60 and len(received) == 40 and len(other_seen) == 40)
        assert [p.offset for p in received] == list(range(1, 41))  # each once, in order
        assert [p.offset for p in other_seen] == list(range(1, 41))
        assert received == other_seen
        # every publication of "t" crossed the hub once, to the worker that did not send it
        assert sorted(forwarded) == list(range(1, 41))
        assert all(isinstance(d, Publication) for d in done)
        # the awaited publish delivers locally too (also to a second watched topic)
        pub = await bus.publish("u", "1", None)
        await until(lambda: received[-1] == pub)


async def test_a_worker_matching_through_several_patterns_gets_a_publication_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.sock"
    async with two_workers(path) as (bus, received, other, other_seen):
        for pattern in ("x.y", "x.*", "x.>"):
            await bus.watch(pattern)
            await other.watch(pattern)
        await bus.publish("x.y", "1", None)
        await other.publish("x.y", "2", None)
        await bus.publish("x.z", "3", None)
        await until(lambda: len(received) >= 3 and len(other_seen) >= 3)
        await trio.sleep(0.1)  # room for a duplicate to arrive
        assert [p.offset for p in received] == [1, 2, 1]
        assert received == other_seen
