"""Topics owned by workers (``[server] topic_owner = "workers"``), from outside: a real broker
with 2 and 3 workers, clients on every worker.

One offset sequence per topic whoever publishes and wherever the subscribers are (exact and
wildcard), ``since`` recovery, ``history`` and ``last`` across workers, presence across
workers, the HTTP API reaching the owner; a SIGKILL of a topic's owner under a stream, with
the store (every offset got or reported missed exactly; with ``ack = "disk"`` nothing
acknowledged lost) and without (a new epoch, reported); and the store files moved between
layouts when the number of owners changes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from broker.owner import owner_index
from broker.shards import store_files
from tests.http.brokerkit import ws_client
from tests.integration.test_history_budget import publish_all, samples
from tests.integration.test_store import (
    TOPIC,
    Publisher,
    Subscriber,
    check_no_offset_has_two_contents,
    store_config,
)
from tests.support.broker import API_KEY, PRESENCE_EVERYWHERE, BrokerProcess, merge, to_toml
from tests.support.clients import call, open_client

OWNED: dict[str, Any] = {"server": {"topic_owner": "workers"}}


def worker_pids(b: BrokerProcess) -> dict[int, int]:
    return {e["worker"]: e["pid"] for e in b.events("worker_started")}


async def one_per_worker(b: BrokerProcess, name: str, workers: int) -> list[ClientConnection]:
    """A connection on each worker (by its welcome), ordered by worker."""
    mine: dict[int, ClientConnection] = {}
    tries = 0
    while len(mine) < workers:
        tries += 1
        assert tries < 400, f"connections never reached every worker: {sorted(mine)}"
        ws, welcome = await open_client(b, f"{name}{tries}")
        if welcome["worker"] in mine:
            await ws.close()
        else:
            mine[welcome["worker"]] = ws
    return [mine[w] for w in sorted(mine)]


def topics_of_every_owner(workers: int, per_owner: int = 2) -> list[str]:
    """``room.N`` topics, ``per_owner`` owned by each worker."""
    chosen: dict[int, list[str]] = {w: [] for w in range(workers)}
    n = 0
    while any(len(t) < per_owner for t in chosen.values()):
        topic = f"room.{n}"
        owned = chosen[owner_index(topic, workers)]
        if len(owned) < per_owner:
            owned.append(topic)
        n += 1
    return sorted(t for ts in chosen.values() for t in ts)


async def messages(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while len(got) < count:
            msg = json.loads(await ws.recv())
            if msg.get("op") == "message":
                got.append(msg)
    return got


@pytest.mark.parametrize("workers", [2, 3])
def test_every_topic_has_one_offset_sequence_whoever_publishes_and_subscribes(
    tmp_path: Path, workers: int
) -> None:
    topics = topics_of_every_owner(workers)
    rounds = 20
    with BrokerProcess.start(tmp_path, OWNED, workers=workers) as b:

        async def main() -> None:
            exact = await one_per_worker(b, "exact", workers)
            wild = await one_per_worker(b, "wild", workers)
            publishers = await one_per_worker(b, "pub", workers)
            for ws in exact:
                for i, topic in enumerate(topics):
                    assert (await call(ws, op="subscribe", topic=topic, id=i))["ok"]
            for ws in wild:
                assert (await call(ws, op="subscribe", topic="room.*", id="w"))["ok"]
            # Every publisher sends everything at once, without waiting: requests of every
            # worker for every owner cross at the same time.
            ids = [f"{k}/{topic}" for k in range(rounds) for topic in topics]
            for k in range(rounds):
                for p, ws in enumerate(publishers):
                    for topic in topics:
                        frame = {
                            "op": "publish",
                            "topic": topic,
                            "data": [p, k],
                            "id": f"{k}/{topic}",
                        }
                        await ws.send(json.dumps(frame))
            acked: dict[str, list[int]] = {t: [] for t in topics}
            sent: dict[tuple[str, int], list[int]] = {}
            for ws in publishers:
                replies = []
                async with asyncio.timeout(30):
                    while len(replies) < len(ids):
                        reply = json.loads(await ws.recv())
                        assert reply.get("ok"), reply
                        replies.append(reply["id"])
                # Owned here or elsewhere, answered in request order (protocol.md 4.3).
                assert replies == ids
            total = rounds * workers * len(topics)
            for ws in exact + wild:
                got = await messages(ws, total)
                by_topic: dict[str, list[int]] = {t: [] for t in topics}
                for msg in got:
                    by_topic[msg["topic"]].append(msg["offset"])
                    key = (msg["topic"], msg["offset"])
                    sent.setdefault(key, msg["data"])
                    assert sent[key] == msg["data"], f"offset {key} carries two publications"
                for topic, offsets in by_topic.items():
                    assert offsets == list(range(1, rounds * workers + 1)), (topic, offsets)
                    acked[topic] = offsets
            # Each publisher's publications of a topic keep their order in the topic.
            for topic in topics:
                for p in range(workers):
                    ks = [sent[(topic, o)][1] for o in acked[topic] if sent[(topic, o)][0] == p]
                    assert ks == list(range(rounds)), (topic, p, ks)

        asyncio.run(main())


@pytest.mark.parametrize("workers", [2, 3])
def test_recovery_history_and_presence_cross_workers(tmp_path: Path, workers: int) -> None:
    config = merge(merge(OWNED, PRESENCE_EVERYWHERE), {"auth": {"default_presence": [">"]}})
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:

        async def main() -> None:
            clients = await one_per_worker(b, "c", workers)
            for topic in topics_of_every_owner(workers, 1):
                # Published from the last worker, recovered on every worker with `since`.
                publisher = clients[-1]
                first = None
                for k in range(10):
                    reply = await call(publisher, op="publish", topic=topic, data=k, id=k)
                    first = first or reply
                assert first is not None
                for ws in clients:
                    since = {"offset": 3, "epoch": first["epoch"]}
                    reply = await call(ws, op="subscribe", topic=topic, since=since, id="s")
                    assert reply["ok"] and reply["recovered"], reply
                    assert [m["data"] for m in await messages(ws, 7)] == list(range(3, 10))
                    last = await call(ws, op="history", topic=topic, last=2, id="h")
                    assert [m["offset"] for m in last["messages"]] == [9, 10]
                    assert (await call(ws, op="unsubscribe", topic=topic, id="u"))["ok"]
            # Presence: a member on every worker, listed and announced on every worker.
            topic = "lobby"
            for i, ws in enumerate(clients):
                assert (await call(ws, op="subscribe", topic=topic, id=f"l{i}"))["ok"]
            for ws in clients:
                async with asyncio.timeout(10):
                    while True:
                        reply = await call(ws, op="presence", topic=topic, id="p")
                        if len(reply["clients"]) == workers:
                            break
                        await asyncio.sleep(0.05)
            for ws in clients:
                await ws.close()

        asyncio.run(main())


def test_the_http_api_publishes_and_reads_at_the_owner(tmp_path: Path) -> None:
    def http(b: BrokerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            f"{b.http_url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    topics = topics_of_every_owner(2, 1)
    with BrokerProcess.start(tmp_path, OWNED, workers=2) as b:

        async def subscribe() -> list[ClientConnection]:
            clients = await one_per_worker(b, "c", 2)
            for ws in clients:
                for topic in topics:
                    assert (await call(ws, op="subscribe", topic=topic, id=topic))["ok"]
            return clients

        async def main() -> None:
            clients = await subscribe()
            for topic in topics:
                for k in range(3):
                    reply = await asyncio.to_thread(
                        http, b, "/api/publish", {"topic": topic, "data": k}
                    )
                    assert reply["offset"] == k + 1, reply
            for ws in clients:
                got = await messages(ws, 3 * len(topics))
                assert sorted((m["topic"], m["offset"]) for m in got) == sorted(
                    (t, o) for t in topics for o in (1, 2, 3)
                )
            for topic in topics:
                held = await asyncio.to_thread(http, b, f"/api/history?topic={topic}")
                assert [m["data"] for m in held["messages"]] == [0, 1, 2]

        asyncio.run(main())


def owner_pid(b: BrokerProcess, topic: str, workers: int) -> int:
    return worker_pids(b)[owner_index(topic, workers)]


def stream_and_kill_the_owner(
    b: BrokerProcess, workers: int
) -> tuple[list[Subscriber], Publisher, int]:
    """Stream to :data:`TOPIC`, SIGKILL its owner mid-stream, stream on, end; and the latest
    offset acknowledged before the kill."""

    async def main() -> tuple[list[Subscriber], Publisher, int]:
        subs = [Subscriber(b, f"s{i}") for i in range(4)]
        pub = Publisher(b)
        async with asyncio.timeout(120):
            tasks = [asyncio.create_task(s.run()) for s in subs]
            for s in subs:
                await s.subscribed.wait()
            await pub.publish(150)
            before = max(o for _, o in pub.acked)
            victim = owner_pid(b, TOPIC, workers)
            os.kill(victim, signal.SIGKILL)
            await pub.publish(150)
            await pub.publish(1, data="end")
            await asyncio.gather(*tasks)
        assert owner_pid(b, TOPIC, workers) != victim, "the owner was restarted"
        return subs, pub, before

    return asyncio.run(main())


def check_in_order(subs: list[Subscriber]) -> None:
    """Each subscriber got each epoch's offsets in increasing order (a hole it saw as a jump,
    which tells a client that publications are gone: protocol.md 7.1)."""
    for s in subs:
        for epoch in {e for e, _ in s.got}:
            offsets = [o for e, o in s.got if e == epoch]
            assert offsets == sorted(offsets), f"{s.name} got epoch {epoch} out of order"


def after_the_kill(b: BrokerProcess, epoch: str, before: int) -> tuple[range, set[int]]:
    """What a client resuming from ``before`` is told is gone (empty when nothing), and the
    offsets it can still read after ``before`` (page by page)."""

    async def ask() -> tuple[range, set[int]]:
        ws, _ = await open_client(b, "reader")
        gap = range(0)
        held: set[int] = set()
        since = {"offset": before, "epoch": epoch}
        while True:
            reply = await call(ws, op="history", topic=TOPIC, since=since, limit=1000, id="h")
            assert reply["epoch"] == epoch, "the restarted owner read its store: same epoch"
            if not reply["recovered"]:
                gap = range(reply["missed"]["from"], reply["missed"]["to"] + 1)
            if not reply["messages"]:
                break
            held.update(m["offset"] for m in reply["messages"])
            since = {"offset": reply["messages"][-1]["offset"], "epoch": epoch}
        await ws.close()
        return gap, held

    return asyncio.run(ask())


def check_told_or_held(
    subs: list[Subscriber], pub: Publisher, before: int, gap: range, held: set[int]
) -> None:
    """Every acknowledged publication after the kill is held (a subscriber that did not get
    it live saw the jump and can read it) or in the gap clients are told of; each subscriber
    got everything from its start to the kill, and the end."""
    epoch = next(iter(pub.acked))[0]
    for e, o in pub.acked:
        assert e == epoch, "one epoch throughout"
        assert o <= before or o in held or o in gap, f"{o} silently lost (gap {gap})"
    for s in subs:
        assert {e for e, _ in s.got} == {epoch}, "one epoch throughout"
        assert s.first is not None
        missing = [o for e, o in pub.acked if s.first <= o <= before and (e, o) not in s.got]
        assert not missing, f"{s.name} did not get {missing[:10]}"


@pytest.mark.parametrize("workers", [2, 3])
def test_a_killed_owner_with_a_store_loses_at_most_what_it_reports(
    tmp_path: Path, workers: int
) -> None:
    config = merge(OWNED, store_config(tmp_path))
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:
        subs, pub, before = stream_and_kill_the_owner(b, workers)
        gap, held = after_the_kill(b, next(iter(pub.acked))[0], before)
    check_no_offset_has_two_contents(subs, pub)
    check_in_order(subs)
    check_told_or_held(subs, pub, before, gap, held)


def test_a_killed_owner_with_ack_on_disk_loses_nothing_acknowledged(tmp_path: Path) -> None:
    config = merge(merge(OWNED, store_config(tmp_path)), {"store": {"ack": "disk"}})
    with BrokerProcess.start(tmp_path, config, workers=2) as b:
        subs, pub, before = stream_and_kill_the_owner(b, 2)
        gap, held = after_the_kill(b, next(iter(pub.acked))[0], before)
    check_no_offset_has_two_contents(subs, pub)
    check_in_order(subs)
    check_told_or_held(subs, pub, before, gap, held)
    assert not [o for _, o in pub.acked if o in gap], f"acknowledged offsets in the gap {gap}"


def test_a_killed_owner_without_a_store_starts_a_new_epoch_and_says_so(tmp_path: Path) -> None:
    config = merge(OWNED, {"history": [{"pattern": ">", "size": 100000, "ttl": 600}]})
    with BrokerProcess.start(tmp_path, config, workers=2) as b:
        subs, pub, _ = stream_and_kill_the_owner(b, 2)
    check_no_offset_has_two_contents(subs, pub)
    check_in_order(subs)
    first, second = dict.fromkeys(e for e, _ in pub.acked)
    for s in subs:
        # Every subscriber saw the topic's new epoch (live, or told on resubscribing), and
        # got everything acknowledged in it after it came back.
        assert {e for e, _ in s.got} == {first, second}, s.name
        resumed = min(o for e, o in s.got if e == second)
        lost = [o for e, o in pub.acked if e == second and o >= resumed and (e, o) not in s.got]
        assert not lost, f"{s.name} lost {lost[:10]} of the new epoch"


def test_history_moves_between_layouts_when_the_owners_change(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    topics = [f"t.{i}" for i in range(12)]
    config = merge(store_config(tmp_path), {"server": {"topic_owner": "hub"}})

    async def publish(b: BrokerProcess, k: int) -> dict[str, tuple[str, int]]:
        ws, _ = await open_client(b, "p")
        positions = {}
        for topic in topics:
            reply = await call(ws, op="publish", topic=topic, data=k, id=topic)
            positions[topic] = (reply["epoch"], reply["offset"])
        await ws.close()
        return positions

    async def held(b: BrokerProcess) -> dict[str, list[tuple[str, int, Any]]]:
        ws, _ = await open_client(b, "r")
        out = {}
        for topic in topics:
            reply = await call(ws, op="history", topic=topic, id=topic)
            out[topic] = [(m["epoch"], m["offset"], m["data"]) for m in reply["messages"]]
        await ws.close()
        return out

    expected: dict[str, list[tuple[str, int, Any]]] = {t: [] for t in topics}
    with BrokerProcess.start(tmp_path, config, workers=2) as b:
        # hub -> owners of 2 -> of 3 -> one worker -> owners of 2 again
        for k, (mode, workers) in enumerate(
            [("hub", 2), ("workers", 2), ("workers", 3), ("hub", 1), ("workers", 2)]
        ):
            if k:
                b.config = merge(b.config, {"server": {"topic_owner": mode}})
                b.config_path.write_text(to_toml(b.config))
                b.workers = workers
                b.restart()
            assert asyncio.run(held(b)) == expected, f"after the start as {mode} x{workers}"
            for topic, (epoch, offset) in asyncio.run(publish(b, k)).items():
                expected[topic].append((epoch, offset, k))
            owners = workers if mode == "workers" and workers > 1 else 0
            present = sorted(
                str(f)
                for f in tmp_path.iterdir()
                if f.name.startswith("history") and not f.name.endswith(("-wal", "-shm"))
            )
            assert present == sorted(store_files(str(path), owners)), present
        assert b.events("store_resharded"), "the layout changes were logged"
    assert all(len(v) == 5 and len({e for e, _, _ in v}) == 1 for v in expected.values())


def test_each_owner_holds_its_share_of_the_history_budgets(tmp_path: Path) -> None:
    config = merge(OWNED, {"limits": {"max_topics": 4}})  # 2 topics a worker
    topics = topics_of_every_owner(2, 3)
    with BrokerProcess.start(tmp_path, config, workers=2) as b, ws_client(b, "p") as conn:
        replies = publish_all(conn, [{"topic": t, "data": 1} for t in topics])
        refused = [t for t, r in zip(topics, replies, strict=True) if not r["ok"]]
        assert {r["error"]["code"] for r in replies if not r["ok"]} == {"too_many_topics"}
        # Each owner took the first two of its topics, and refused its third.
        assert sorted(owner_index(t, 2) for t in refused) == [0, 1]
        assert samples(b, "pubsub_topics_refused_total")[""] == 2
        assert samples(b, "pubsub_history_topics")[""] == 4
