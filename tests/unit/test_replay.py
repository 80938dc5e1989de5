"""Paced replays (broker.replay): history read in pages up to the position announced, a
``history`` reply bounded by the send queue, and a replay that the history window overtakes
ending as a slow consumer, never with a gap."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio_websocket

from broker.brokermetrics import snapshot_from_stats
from broker.bus.base import Bus, StreamPosition
from broker.replay import FIRST_PAGE, MAX_PAGE, PAGE_BYTES, HistoryPager, reply_budget
from broker.worker import Worker
from tests.support.inmemory import call, connect, make_worker, running, token

TOPIC = "replay.topic"


def payload(n: int, size: int) -> str:
    return json.dumps(f"{n}:" + "x" * size)


async def fill(bus: Bus, count: int, size: int) -> None:
    for n in range(count):
        await bus.publish(TOPIC, payload(n, size), "publisher")


async def read_all(pager: HistoryPager) -> list[list[int]]:
    """The offsets of every page, the first included."""
    pages = [[m.offset for m in (await pager.first()).publications]]
    while page := await pager.next():
        pages.append([m.offset for m in page])
    return pages


async def test_pages_are_sized_by_bytes_and_end_at_the_first_position() -> None:
    worker = make_worker(history=[{"pattern": ">", "size": 1000, "ttl": 600, "max_bytes": 1 << 30}])
    bus = worker.bus
    await fill(bus, 300, 2000)
    pager = HistoryPager(bus, TOPIC, StreamPosition(10, (await bus.position(TOPIC)).epoch))
    first = await pager.first()
    assert [m.offset for m in first.publications] == list(range(11, 11 + FIRST_PAGE))
    # Published after the first read: not part of the replay (it comes live, from pending).
    await fill(bus, 5, 10)
    pages = [[m.offset for m in first.publications]]
    while page := await pager.next():
        pages.append([m.offset for m in page])
    assert [o for page in pages for o in page] == list(range(11, 301))
    assert all(len(page) <= PAGE_BYTES // 2000 + 1 for page in pages[1:])
    assert len(pages) > 2 and not pager.lost


async def test_small_publications_are_read_in_pages_of_at_most_max_page() -> None:
    worker = make_worker(history=[{"pattern": ">", "size": 5000, "ttl": 600}])
    await fill(worker.bus, 2500, 1)
    pager = HistoryPager(worker.bus, TOPIC, None)
    pages = await read_all(pager)
    assert [len(page) for page in pages] == [FIRST_PAGE, MAX_PAGE, MAX_PAGE, 500 - FIRST_PAGE]


async def test_a_limit_bounds_the_pages_read() -> None:
    worker = make_worker()
    await fill(worker.bus, 100, 1)
    pages = await read_all(HistoryPager(worker.bus, TOPIC, None, limit=40))
    assert [o for page in pages for o in page] == list(range(1, 41))


async def test_a_history_that_moves_on_between_pages_is_lost_not_skipped() -> None:
    worker = make_worker(history=[{"pattern": ">", "size": 40, "ttl": 600}])
    bus = worker.bus
    await fill(bus, 40, 1)
    pager = HistoryPager(bus, TOPIC, StreamPosition(0, ""))
    await pager.first()
    await fill(bus, 30, 1)  # offsets 1 to 30 leave the window
    assert await pager.next() == () and pager.lost


async def test_a_history_reply_holds_what_half_the_send_queue_holds_and_reads_on() -> None:
    queue = 64 * 1024
    worker = make_worker(limits={"send_queue_max_bytes": queue})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await ws.get_message()  # welcome
        await fill(worker.bus, 100, 8000)  # 800 KB: whole in one reply, a slow consumer
        offsets: list[int] = []
        since: dict[str, Any] | None = None
        while not offsets or offsets[-1] < 100:
            frame: dict[str, Any] = {"op": "history", "id": len(offsets), "topic": TOPIC}
            if since is not None:
                frame["since"] = since
            reply = await call(ws, **frame)
            assert reply["ok"] and reply["offset"] == 100
            size = sum(len(json.dumps(m, separators=(",", ":"))) for m in reply["messages"])
            assert 0 < size <= reply_budget(queue)
            offsets += [m["offset"] for m in reply["messages"]]
            since = {"offset": offsets[-1], "epoch": reply["epoch"]}
        assert offsets == list(range(1, 101))
        await ws.aclose()


async def subscribe_from_start(
    worker: Worker, nursery: trio.Nursery
) -> tuple[trio_websocket.WebSocketConnection, dict[str, Any]]:
    """A new client subscribed to everything :data:`TOPIC` holds; its subscribe reply."""
    ws = await connect(worker, nursery, f"/ws?token={token()}")
    await ws.get_message()  # welcome
    sub = {"op": "subscribe", "id": 1, "topic": TOPIC, "since": {"offset": 0, "epoch": ""}}
    await ws.send_message(json.dumps(sub))
    return ws, json.loads(await ws.get_message())


def small_queue_worker() -> Worker:
    """A worker whose send queue is 64 KiB and whose history window holds a lot."""
    return make_worker(
        limits={"send_queue_max_bytes": 64 * 1024},
        history=[{"pattern": ">", "size": 5000, "ttl": 600, "max_bytes": 1 << 30}],
    )


async def replayed(worker: Worker, nursery: trio.Nursery) -> list[int]:
    """Subscribe from the start of the 100 publications :data:`TOPIC` holds; the offsets
    received until the subscription is done (a later request's reply)."""
    ws, reply = await subscribe_from_start(worker, nursery)
    assert reply["ok"] and reply["offset"] == 100
    await ws.send_message(json.dumps({"op": "ping", "id": "end"}))
    offsets = []
    while (frame := json.loads(await ws.get_message())).get("id") != "end":
        offsets.append(frame["offset"])
    await ws.aclose()
    return offsets


async def overtaking(worker: Worker, extra: int, size: int = 1, rounds: int = 1000) -> None:
    """Around each of the next ``rounds`` reads of history but the first, publish ``extra``
    more of ``size`` before the read and as many after it (pushing the oldest out of a small
    window, or arriving while nothing holds them)."""
    inner = worker.bus.history
    reads = 0

    async def history(topic: str, *args: Any) -> Any:
        nonlocal reads
        reads += 1
        busy = 1 < reads <= rounds + 1
        if busy:
            await fill(worker.bus, extra, size)
        result = await inner(topic, *args)
        if busy:
            await fill(worker.bus, extra, size)
        return result

    worker.bus.history = history  # type: ignore[method-assign]


async def test_a_replay_the_window_overtakes_ends_as_a_slow_consumer_without_a_gap() -> None:
    worker = make_worker(history=[{"pattern": ">", "size": 40, "ttl": 600}])
    await overtaking(worker, 40)
    async with running(worker) as nursery:
        await fill(worker.bus, 40, 1)
        ws, reply = await subscribe_from_start(worker, nursery)
        assert reply["ok"] and reply["offset"] == 40
        offsets = []
        with trio.fail_after(10):
            try:
                while True:
                    offsets.append(json.loads(await ws.get_message())["offset"])
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason.code == 4008
                assert closed.reason.reason is not None
                assert "history_overtaken" in closed.reason.reason
        # What it got is contiguous: it resumes after the last one and is told what is gone.
        assert offsets == list(range(1, FIRST_PAGE + 1))
    assert worker.closes[4008] == 1
    assert worker.replays == {"overtaken": 1}


async def test_a_client_that_reads_gets_a_replay_many_times_its_send_queue() -> None:
    worker = make_worker(limits={"send_queue_max_bytes": 64 * 1024})
    async with running(worker) as nursery:
        await fill(worker.bus, 100, 8000)
        ws, reply = await subscribe_from_start(worker, nursery)
        assert reply["ok"] and reply["offset"] == 100
        await fill(worker.bus, 3, 1)  # live, held while the replay goes out
        got = [json.loads(await ws.get_message())["offset"] for _ in range(103)]
        assert got == list(range(1, 104))
        await ws.aclose()
    assert worker.closes[4008] == 0


async def test_live_traffic_past_what_is_held_is_read_from_history_not_lost() -> None:
    # 96 kB published around page reads, more than the 64 KiB a subscription holds while its
    # replay goes out: what is held is dropped, and read from history after the replay.
    worker = small_queue_worker()
    await overtaking(worker, 12, 8000, rounds=6)
    async with running(worker) as nursery:
        await fill(worker.bus, 100, 8000)
        offsets = await replayed(worker, nursery)
        latest = (await worker.bus.position(TOPIC)).offset
        assert latest == 100 + 6 * 2 * 12
        assert offsets == list(range(1, latest + 1))
    assert worker.closes[4008] == 0
    assert worker.replays == {"complete": 1} and worker.replay_refills >= 1
    families = snapshot_from_stats(worker.stats())
    assert families["pubsub_replays_total"]["samples"] == [
        [{"worker": "0", "outcome": "complete"}, 1.0]
    ]
    assert families["pubsub_replay_refills_total"]["samples"][0][1] == worker.replay_refills


async def test_what_arrives_while_reading_on_from_history_is_held() -> None:
    # Dropped once (96 kB between two pages), the subscription holds anew before it reads on
    # from history: two publications made right after that read arrive, after it.
    worker = small_queue_worker()
    inner = worker.bus.history
    reads: list[StreamPosition | None] = []

    async def history(topic: str, since: StreamPosition | None, limit: int | None) -> Any:
        reads.append(since)
        if len(reads) == 2:
            await fill(worker.bus, 12, 8000)
        result = await inner(topic, since, limit)
        if since is not None and since.offset == 100 and since.epoch:
            await fill(worker.bus, 2, 8000)  # reading on after the replay: held
        return result

    worker.bus.history = history  # type: ignore[method-assign]
    async with running(worker) as nursery:
        await fill(worker.bus, 100, 8000)
        offsets = await replayed(worker, nursery)
        assert offsets == list(range(1, 115))
