"""RedisBus against one real redis-server: offsets, delivery, history, presence, outages."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from broker.bus.base import ConnKey, PresenceEvent, Publication, StreamPosition
from broker.bus.redis import REDIS_ENTRY_OVERHEAD, RedisBus, redis_glob
from broker.config import HistoryRule
from broker.errors import BusUnavailable
from broker.topics import pattern_matches

from .busutil import clear_of_a_window_change, epoch_window, running_bus, wait_until
from .conftest import RedisServer


def test_glob_translation_is_a_superset_of_the_pattern() -> None:
    import fnmatch

    cases = {
        "chat.*": ["chat.a", "chat.a.b"],
        "chat.>": ["chat.a", "chat.a.b"],
        "*.x.>": ["a.x.b", "a.b.x.c"],
        ">": ["a", "a.b"],
    }
    for pattern, topics in cases.items():
        glob = redis_glob(pattern)
        for topic in topics:
            assert fnmatch.fnmatchcase(topic, glob), (pattern, topic)
    assert redis_glob("chat.>") == "chat.?*"
    assert not fnmatch.fnmatchcase("chat", redis_glob("chat.>"))
    # Globs are not segment-aware, hence the exact matcher on receipt:
    assert fnmatch.fnmatchcase("chat.a.b", redis_glob("chat.*"))
    assert not pattern_matches("chat.*", "chat.a.b")


async def test_two_nodes_share_offsets_and_history_agrees(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, rb),
    ):
        await a.watch("chat.room")
        await b.watch("chat.room")
        results = []

        async def burst(bus: RedisBus, who: str) -> None:
            for i in range(40):
                results.append(await bus.publish("chat.room", f'"{who}{i}"', who))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, a, "a")
            nursery.start_soon(burst, b, "b")
        offsets = sorted(p.offset for p in results)
        assert offsets == list(range(1, 81))
        assert len({p.epoch for p in results}) == 1
        await wait_until(lambda: len(ra.offsets("chat.room")) == 80, what="node a deliveries")
        await wait_until(lambda: len(rb.offsets("chat.room")) == 80, what="node b deliveries")
        assert ra.offsets("chat.room") == list(range(1, 81))
        assert rb.offsets("chat.room") == list(range(1, 81))
        assert ra.publications == rb.publications
        hist = await a.history("chat.room", None, None)
        assert list(hist.publications) == ra.publications
        assert hist.position == StreamPosition(80, results[0].epoch)
        by_offset = {p.offset: p for p in results}
        assert all(by_offset[p.offset] == p for p in ra.publications)


async def test_cross_node_exact_and_wildcard_delivery(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, rb),
    ):
        await a.watch("chat.*")
        await a.watch("news.>")
        await a.watch("chat.x")  # also matched by chat.*: delivered once
        await b.publish("chat.x", '{"n":1}', "bob")
        await b.publish("chat.x.deep", "2", None)  # not chat.*
        await b.publish("news.eu.fr", "3", None)
        await b.publish("newsy.a", "4", None)
        await b.publish("chat.y", "5", None)
        await wait_until(lambda: len(ra.publications) == 3)
        await trio.sleep(0.1)
        got = [(p.topic, p.offset, p.sender, p.data) for p in ra.publications]
        assert got == [
            ("chat.x", 1, "bob", '{"n":1}'),
            ("news.eu.fr", 1, None, "3"),
            ("chat.y", 1, None, "5"),
        ]
        assert rb.publications == []
        # Unwatching stops delivery.
        await a.unwatch("chat.*")
        await a.unwatch("chat.x")
        await b.publish("chat.x", "6", None)
        await b.publish("news.a", "7", None)
        await wait_until(lambda: len(ra.publications) == 4)
        await trio.sleep(0.1)
        assert [p.topic for p in ra.publications][-1] == "news.a"


async def test_history_size_limit_and_recovery(redis_server: RedisServer) -> None:
    clear_of_a_window_change(redis_server)  # the epoch read before publishing holds
    async with running_bus(redis_server.url, size=3) as (bus, _):
        empty = await bus.position("t.a")
        assert empty.offset == 0
        pubs = [await bus.publish("t.a", str(i), "x") for i in range(1, 6)]
        epoch = pubs[0].epoch
        assert empty.epoch == epoch  # the epoch handed out before the first publication holds
        all_held = await bus.history("t.a", None, None)
        assert [p.offset for p in all_held.publications] == [3, 4, 5]
        assert all_held.recovered and all_held.missed is None
        lost = await bus.history("t.a", StreamPosition(0, epoch), None)
        assert [p.offset for p in lost.publications] == [3, 4, 5]
        assert not lost.recovered and lost.missed == (1, 2)
        ok = await bus.history("t.a", StreamPosition(3, epoch), None)
        assert [p.offset for p in ok.publications] == [4, 5]
        assert ok.recovered and ok.missed is None
        limited = await bus.history("t.a", StreamPosition(2, epoch), 2)
        assert [p.offset for p in limited.publications] == [3, 4]
        assert limited.recovered
        current = await bus.history("t.a", StreamPosition(5, epoch), None)
        assert current.publications == () and current.recovered
        other = await bus.history("t.a", StreamPosition(4, "other-epoch"), None)
        assert not other.recovered and other.missed == (1, 2)
        assert [p.offset for p in other.publications] == [3, 4, 5]
        assert other.position == StreamPosition(5, epoch)
        # Nothing lost in another epoch: (1, 0).
        await bus.publish("t.b", "1", None)
        fresh = await bus.history("t.b", StreamPosition(9, "gone"), None)
        assert not fresh.recovered and fresh.missed == (1, 0)
        assert len(fresh.publications) == 1


async def test_history_byte_cap_evicts_oldest_and_recovery_reports_it(
    redis_server: RedisServer,
) -> None:
    # Each entry counts its data, its sender, its time field and REDIS_ENTRY_OVERHEAD.
    data = "x" * 1000
    cap = 3 * (len(data) + 1 + 13 + REDIS_ENTRY_OVERHEAD) + 10
    rule = HistoryRule(">", 100, 600.0, cap)
    async with running_bus(redis_server.url, rule=lambda t: rule) as (bus, _):
        pubs = [await bus.publish("t.bytes", data, "s") for _ in range(6)]
        epoch = pubs[0].epoch
        held = await bus.history("t.bytes", None, None)
        assert [p.offset for p in held.publications] == [4, 5, 6]
        lost = await bus.history("t.bytes", StreamPosition(1, epoch), None)
        assert not lost.recovered and lost.missed == (2, 3)
        # One publication alone over the cap is not kept; its offset is still handed out.
        big = await bus.publish("t.bytes", "y" * cap, None)
        assert big.offset == 7
        after = await bus.history("t.bytes", StreamPosition(6, epoch), None)
        assert after.publications == () and after.missed == (7, 7)
        # The count of bytes held follows the evictions: small ones fit again.
        for _ in range(3):
            await bus.publish("t.bytes", data, "s")
        again = await bus.history("t.bytes", StreamPosition(7, epoch), None)
        assert again.recovered and [p.offset for p in again.publications] == [8, 9, 10]


async def test_size_zero_keeps_offsets_but_no_history(redis_server: RedisServer) -> None:
    async with running_bus(redis_server.url, size=0) as (bus, _):
        pubs = [await bus.publish("t.none", str(i), None) for i in range(3)]
        assert [p.offset for p in pubs] == [1, 2, 3]
        hist = await bus.history("t.none", StreamPosition(1, pubs[0].epoch), None)
        assert hist.publications == ()
        assert hist.missed == (2, 3) and not hist.recovered
        assert (await bus.position("t.none")).offset == 3


async def test_ttl_drops_old_entries_then_the_idle_topic(redis_server: RedisServer) -> None:
    async with running_bus(redis_server.url, ttl=0.6, position_ttl=1.2) as (bus, _):
        first = await bus.publish("t.ttl", "1", None)
        await trio.sleep(0.35)
        await bus.publish("t.ttl", "2", None)
        await trio.sleep(0.35)
        # Entry 1 is older than the TTL, entry 2 is not.
        hist = await bus.history("t.ttl", StreamPosition(0, first.epoch), None)
        assert [p.offset for p in hist.publications] == [2]
        assert hist.missed == (1, 1)
        await trio.sleep(0.5)
        # Idle for longer than the TTL: the history is gone, the position is still known, so
        # a client learns exactly what it lost.
        gone = await bus.history("t.ttl", StreamPosition(0, first.epoch), None)
        assert gone.publications == () and gone.missed == (1, 2)
        assert gone.position == StreamPosition(2, first.epoch)
        await trio.sleep(0.6)
        # Idle past the position TTL too: a new epoch records the loss.
        window = epoch_window(redis_server, 1.2)
        pos = await bus.position("t.ttl")
        assert pos.offset == 0 and pos.epoch != first.epoch
        again = await bus.publish("t.ttl", "3", None)
        assert again.offset == 1 and again.epoch != first.epoch
        if epoch_window(redis_server, 1.2) == window:  # else the announced epoch moved on
            assert again.epoch == pos.epoch
        old = await bus.history("t.ttl", StreamPosition(2, first.epoch), None)
        assert not old.recovered and old.missed == (1, 0)
        assert [p.data for p in old.publications] == ["3"]


async def test_presence_across_nodes(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, rb),
    ):
        await a.watch("room.1")
        await a.watch("room.*")  # a pattern's copy of the events is not delivered again
        alice1, alice2 = ConnKey("b", 0, 1), ConnKey("b", 0, 2)
        await b.presence_join("room.1", "alice", alice1)
        await wait_until(lambda: len(ra.presence) == 1)
        assert ra.presence == [PresenceEvent("room.1", "join", "alice")]
        await b.presence_join("room.1", "alice", alice2)  # a second tab: no event
        await a.presence_join("room.1", "bob", ConnKey("a", 0, 7))
        await wait_until(lambda: len(ra.presence) == 2)
        assert await a.presence("room.1") == ["alice", "bob"]
        assert await b.presence("room.1") == ["alice", "bob"]
        await b.presence_leave("room.1", "alice", alice1)
        await trio.sleep(0.1)
        assert len(ra.presence) == 2
        await b.presence_leave("room.1", "alice", alice2)
        await b.presence_leave("room.1", "alice", alice2)  # unknown key: no-op
        await wait_until(lambda: len(ra.presence) == 3)
        assert ra.presence[1:] == [
            PresenceEvent("room.1", "join", "bob"),
            PresenceEvent("room.1", "leave", "alice"),
        ]
        assert await b.presence("room.1") == ["bob"]
        assert rb.presence == []  # b does not watch the topic


async def test_dead_node_presence_expires(redis_server: RedisServer) -> None:
    async with running_bus(redis_server.url, node="a", presence_ttl=0.9) as (a, ra):
        await a.watch("room.2")
        async with running_bus(redis_server.url, node="b", presence_ttl=0.9) as (b, _):
            await b.presence_join("room.2", "carol", ConnKey("b", 1, 1))
            await wait_until(lambda: len(ra.presence) == 1)
            # Heartbeats keep carol present well past the TTL.
            await trio.sleep(1.5)
            assert await a.presence("room.2") == ["carol"]
            assert len(ra.presence) == 1
        # Node b is gone without a goodbye: its heartbeat stopped.
        died = time.monotonic()
        await wait_until(lambda: len(ra.presence) == 2, within=4)
        assert ra.presence[-1] == PresenceEvent("room.2", "leave", "carol")
        assert time.monotonic() - died < 0.9 + 0.9 / 3 + 0.5
        assert await a.presence("room.2") == []


async def test_subscriber_reconnects_and_catches_up_from_history(
    redis_server: RedisServer,
) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, _),
    ):
        await a.watch("feed.x")
        await a.watch("wild.*")
        await b.publish("feed.x", "1", None)
        await b.publish("wild.y", "1", None)
        await wait_until(lambda: len(ra.publications) == 2)
        # Cut node a's subscriber connection; publish while it is away.
        redis_server.cli("CLIENT", "KILL", "TYPE", "pubsub")
        for i in range(2, 6):
            await b.publish("feed.x", str(i), None)
            await b.publish("wild.y", str(i), None)
        await wait_until(lambda: len(ra.publications) == 10, what="catch-up")
        assert ra.offsets("feed.x") == [1, 2, 3, 4, 5]
        assert ra.offsets("wild.y") == [1, 2, 3, 4, 5]
        assert ra.states.count(False) == 1 and ra.states[-1] is True


async def test_redis_restart_under_a_steady_stream(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a", reconnect_max=0.5) as (a, ra),
        running_bus(redis_server.url, node="b", reconnect_max=0.5) as (b, rb),
    ):
        await a.watch("live.t")
        await a.watch("live.*")
        assert a.is_up and b.is_up
        published = []
        failures: list[float] = []
        stop = trio.Event()

        async def stream() -> None:
            while not stop.is_set():
                started = trio.current_time()
                try:
                    published.append(await b.publish("live.t", str(len(published)), "b"))
                except BusUnavailable:
                    failures.append(trio.current_time() - started)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(4):  # concurrent publishers: several commands in flight at the kill
                nursery.start_soon(stream)
            await wait_until(lambda: len(published) >= 10)
            redis_server.kill()
            await wait_until(lambda: not a.is_up and not b.is_up, what="both down")
            await wait_until(lambda: len(failures) >= 5, what="failed publishes")
            # Publishes fail at once while Redis is down (those in flight at the kill within
            # the command timeout at worst; the margin is for a loaded machine).
            assert sorted(failures)[len(failures) // 2] < 0.05, failures
            assert max(failures) < 2.5, failures
            redis_server.start()
            await wait_until(lambda: a.is_up and b.is_up, within=10, what="both up")
            count = len(published)
            await wait_until(lambda: len(published) >= count + 10, what="publishing again")
            stop.set()
        # Redis came back empty: the stream continues in a new epoch. The watcher gets every
        # publication of the new epoch, and all of them in offset order, once. (Concurrent
        # publishers: acknowledged in any order, delivered in offset order.)
        epochs = list(dict.fromkeys(p.epoch for p in published))
        assert len(epochs) == 2
        old, new = epochs

        def delivered(epoch: str) -> list[int]:
            return [p.offset for p in ra.publications if p.epoch == epoch]

        acknowledged_new = {p.offset for p in published if p.epoch == new}
        await wait_until(lambda: acknowledged_new <= set(delivered(new)), what="deliveries")
        got = [(epochs.index(p.epoch), p.offset) for p in ra.publications]
        assert got == sorted(set(got))
        assert delivered(new) == list(range(1, len(delivered(new)) + 1))
        # Of the old epoch, a publication acknowledged just before the kill may never have
        # reached the watcher's connection, and its history died with Redis: only such a
        # tail may be missing (the new epoch is how clients learn of that loss), never one
        # in between (a publish cut off by the kill may have been applied unacknowledged).
        assert delivered(old) == list(range(1, len(delivered(old)) + 1))
        assert len(delivered(old)) >= 5
        for states in (ra.states, rb.states):
            # Up, down once for the outage (a reconnection attempt that fails on a loaded
            # machine may add a flap), up at the end.
            assert states[:2] == [True, False] and states[-1] is True, states


async def test_what_was_published_before_resubscribing_is_caught_up(
    redis_server: RedisServer,
) -> None:
    """Redis comes back empty, and b publishes before a has subscribed again: a catches up
    from history (the new epoch's) every topic it delivered, exact or through a pattern."""
    async with (
        running_bus(redis_server.url, node="a", reconnect_max=0.3) as (a, ra),
        running_bus(redis_server.url, node="b", reconnect_max=0.3) as (b, _),
    ):
        await a.watch("back.t")
        await a.watch("back.*")
        for topic in ("back.t", "back.u"):  # back.u reaches a through the pattern only
            for i in range(2):
                await b.publish(topic, str(i), None)
        await wait_until(lambda: ra.offsets("back.t") == [1, 2] == ra.offsets("back.u"))
        old = {p.topic: p.epoch for p in ra.publications}  # each topic has its own epoch
        # a's next session waits before subscribing, until b has published.
        held, release = trio.Event(), trio.Event()
        serve = a._subscriber._serve

        async def held_serve(exact_ps: object, wild_ps: object) -> None:
            held.set()
            await release.wait()
            await serve(exact_ps, wild_ps)

        a._subscriber._serve = held_serve  # type: ignore[method-assign]
        redis_server.kill()
        await wait_until(lambda: not a.is_up and not b.is_up, what="both down")
        redis_server.start()
        await wait_until(lambda: b.is_up and held.is_set(), within=10, what="b up, a held")
        for topic in ("back.t", "back.u", "back.v"):
            for i in range(3):
                await b.publish(topic, str(i), None)
        release.set()
        await wait_until(lambda: a.is_up, what="a up")

        def new_offsets(topic: str) -> list[int]:
            return [
                p.offset for p in ra.publications if p.topic == topic and p.epoch != old.get(topic)
            ]

        # Caught up without a further publication revealing the gap.
        await wait_until(lambda: new_offsets("back.t") == [1, 2, 3] == new_offsets("back.u"))
        for topic in ("back.t", "back.u", "back.v"):
            await b.publish(topic, "3", None)
        await wait_until(lambda: new_offsets("back.t") == [1, 2, 3, 4] == new_offsets("back.u"))
        # A topic that only a pattern brings, and that a never delivered, has no position to
        # catch up from: it is delivered from the resubscription on.
        await wait_until(lambda: new_offsets("back.v") == [4])
        assert ra.offsets("back.t") == [1, 2, 1, 2, 3, 4] == ra.offsets("back.u")


async def test_starts_while_redis_is_down(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.kill()
    async with running_bus(url, reconnect_max=0.3) as (bus, rec):
        assert not bus.is_up
        with pytest.raises(BusUnavailable):
            await bus.publish("x.y", "1", None)
        await bus.watch("x.y")  # recorded, fulfilled on connection
        redis_server.start()
        await wait_until(lambda: bus.is_up, within=5)
        async with running_bus(url, node="other") as (other, _):
            await other.publish("x.y", "1", None)
        await wait_until(lambda: rec.offsets("x.y") == [1])


async def test_late_watch_starts_after_the_current_position(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, _),
    ):
        for i in range(3):
            await b.publish("late.t", str(i), None)
        await a.watch("late.t")
        await b.publish("late.t", "3", None)
        await wait_until(lambda: ra.offsets("late.t") == [4])
        # What a knows of the topic lets it catch up after losing its subscriber connection.
        redis_server.cli("CLIENT", "KILL", "TYPE", "pubsub")
        await b.publish("late.t", "4", None)
        await b.publish("late.t", "5", None)
        await wait_until(lambda: ra.offsets("late.t") == [4, 5, 6], what="catch-up")


async def test_overload_resets_the_subscription_and_catches_up(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a", queue_size=4) as (a, ra),
        running_bus(redis_server.url, node="b") as (b, _),
    ):
        await a.watch("flood.t")
        deliver = a._deliver
        stalls = [0.2]

        async def stalling_deliver(pub: Publication) -> None:
            # The worker's side stalls once, long enough for the queue to fill up.
            if stalls:
                await trio.sleep(stalls.pop())
            await deliver(pub)

        a._deliver = stalling_deliver  # type: ignore[method-assign]
        for i in range(50):
            await b.publish("flood.t", str(i), None)
        await wait_until(lambda: len(ra.offsets("flood.t")) == 50, within=10, what="all 50")
        assert ra.offsets("flood.t") == list(range(1, 51))
        assert False in ra.states, "the overloaded subscriber should have been reset"


async def test_a_position_is_read_only_after_its_delivery(redis_server: RedisServer) -> None:
    async with (
        running_bus(redis_server.url, node="a") as (a, ra),
        running_bus(redis_server.url, node="b") as (b, _),
    ):
        await a.watch("seam.t")
        await b.publish("seam.t", "1", None)
        await wait_until(lambda: ra.offsets("seam.t") == [1])
        deliver = a._deliver

        async def slow_deliver(pub: Publication) -> None:
            await trio.sleep(0.3)
            await deliver(pub)

        a._deliver = slow_deliver  # type: ignore[method-assign]
        await b.publish("seam.t", "2", None)
        # The worker stitches history and live publications at the position it reads: that
        # position must not be ahead of what it was handed.
        position = await a.position("seam.t")
        assert position.offset == 2
        assert ra.offsets("seam.t") == [1, 2]
        await b.publish("seam.t", "3", None)
        result = await a.history("seam.t", StreamPosition(2, position.epoch), None)
        assert [p.offset for p in result.publications] == [3]
        assert ra.offsets("seam.t") == [1, 2, 3]


async def test_password_in_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", password="s3cret/+x")
    try:
        server.start()
        quoted = server.url.replace("s3cret/+x", quote("s3cret/+x", safe=""))
        async with running_bus(quoted) as (bus, rec):
            await bus.watch("p.t")
            await bus.publish("p.t", "1", "me")
            await wait_until(lambda: rec.offsets("p.t") == [1])
        wrong = quoted.replace("s3cret", "wrong")
        async with running_bus(wrong, reconnect_max=0.2) as (bus, rec):
            assert not bus.is_up
            assert rec.states == [False]  # said once, not at every attempt
            with pytest.raises(BusUnavailable):
                await bus.publish("p.t", "2", None)
            await trio.sleep(0.5)
            assert rec.states == [False]
    finally:
        server.kill()


async def test_a_position_waits_for_the_watch_in_progress(redis_server: RedisServer) -> None:
    async with running_bus(redis_server.url, node="a") as (a, _):
        ps = a._exact_ps
        subscribe = ps.subscribe
        done: list[str] = []

        async def slow_subscribe(*channels: str) -> None:
            await trio.sleep(0.3)
            await subscribe(*channels)

        ps.subscribe = slow_subscribe

        async def first_subscriber() -> None:
            await a.watch("w.t")
            done.append("watch")

        async def second_subscriber() -> None:
            await trio.sleep(0.05)  # the worker asked the bus to watch once, for the first
            await a.position("w.t")
            done.append("position")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_subscriber)
            nursery.start_soon(second_subscriber)
        assert done == ["watch", "position"]
