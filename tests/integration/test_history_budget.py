"""History and topic budgets of the real broker, with one worker and with two (where the
supervisor's hub holds the history): publishers spreading over many topics stay under the
global byte budget, what was evicted is reported exactly to a recovering client, read-only
requests create no topic, a new topic past ``max_topics`` is refused with ``too_many_topics``,
and history larger than one hub-worker message arrives whole; a worker whose link fails ends
alone (the supervisor and the other worker go on)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, connect

from tests.http.brokerkit import http, request, ws_client
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess


def samples(b: BrokerProcess, name: str) -> dict[str, float]:
    """The samples of one metric family, by their ``reason`` label ("" when none)."""
    status, _, body = http(b, "GET", "/metrics", key=None)
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("reason", "")] = out.get(s.labels.get("reason", ""), 0) + s.value
    return out


def publish_all(conn: ClientConnection, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pipeline ``frames`` (publications, ids 0..n-1) and return their replies in order."""
    for i, frame in enumerate(frames):
        conn.send(json.dumps({"op": "publish", "id": i, **frame}))
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < len(frames):
        reply = json.loads(conn.recv(timeout=30))
        if "id" in reply:
            replies[reply["id"]] = reply
    return [replies[i] for i in range(len(frames))]


BUDGET = 400_000


def test_spread_publishers_stay_under_the_budget_and_recovery_is_exact(
    tmp_path: Path, workers: int
) -> None:
    config = {
        "limits": {"history_max_bytes": BUDGET},
        "history": [{"pattern": ">", "size": 100, "ttl": 600, "max_bytes": 60_000}],
    }
    data = "x" * 5000
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, ws_client(b, "pub") as pub:
        first = publish_all(pub, [{"topic": "early", "data": data}] * 3)
        epoch = first[0]["epoch"]
        # 1.5 MB over 100 topics: almost four times the budget.
        spread = [{"topic": f"spread.{i % 100}", "data": data} for i in range(300)]
        assert all(r["ok"] for r in publish_all(pub, spread))
        held = samples(b, "pubsub_history_bytes")[""]
        assert 0 < held <= BUDGET
        evicted = samples(b, "pubsub_history_evicted_total")
        assert evicted["budget"] > 0
        # The oldest entries went first: "early" holds nothing, and a client that saw
        # offset 1 learns that exactly 2 and 3 are gone.
        with ws_client(b, "late") as late:
            sub = request(
                late, op="subscribe", topic="early", id=1, since={"offset": 1, "epoch": epoch}
            )
            assert sub["ok"] and sub["offset"] == 3 and sub["epoch"] == epoch
            assert sub["recovered"] is False and sub["missed"] == {"from": 2, "to": 3}
            hist = request(
                late, op="history", topic="spread.99", id=2, since={"offset": 0, "epoch": "x"}
            )
            assert hist["offset"] == 3 and hist["recovered"] is False
            kept = [m["offset"] for m in hist["messages"]]
            # Whatever is still held is the newest part, and the rest is named as missed.
            assert kept == list(range(hist["missed"]["to"] + 1, 4))


def test_reads_create_no_topic_and_new_topics_past_the_cap_are_refused(
    tmp_path: Path, workers: int
) -> None:
    # Presence tracked everywhere, so that the presence op reaches the store too.
    config = {"limits": {"max_topics": 5}, **PRESENCE_EVERYWHERE}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, ws_client(b, "a") as conn:
        for i in range(50):
            topic = f"lookup.{i}"
            assert request(conn, op="history", topic=topic, id=f"h{i}")["ok"]
            assert request(conn, op="presence", topic=topic, id=f"p{i}")["ok"]
            since = {"offset": 4, "epoch": "old"}
            assert request(conn, op="subscribe", topic=topic, since=since, id=f"s{i}")["ok"]
            assert request(conn, op="unsubscribe", topic=topic, id=f"u{i}")["ok"]
        replies = publish_all(conn, [{"topic": f"t.{i}", "data": i} for i in range(6)])
        assert [r["ok"] for r in replies] == [True] * 5 + [False]
        assert replies[5]["error"]["code"] == "too_many_topics"
        # The HTTP publish API gets the same answer, as 503.
        status, _, body = http(b, "POST", "/api/publish", {"topic": "t.http", "data": 1})
        assert (status, json.loads(body)["error"]["code"]) == (503, "too_many_topics")
        assert samples(b, "pubsub_topics_refused_total")[""] == 2
        assert samples(b, "pubsub_history_topics")[""] == 5
        # Topics that exist go on.
        assert publish_all(conn, [{"topic": "t.0", "data": 1}])[0]["offset"] == 2


def test_the_history_store_on_disk_reports_its_journal_in_metrics(
    tmp_path: Path, workers: int
) -> None:
    # With ack = "disk" a publish is answered once committed, so every answered publication
    # is in the file when /metrics is read; too few for a compaction.
    config = {
        "history": [{"pattern": ">", "size": 100, "ttl": 600}],
        "store": {"path": str(tmp_path / "history.db"), "ack": "disk"},
    }
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, ws_client(b, "pub") as pub:
        assert all(r["ok"] for r in publish_all(pub, [{"topic": "t", "data": 1}] * 30))
        assert samples(b, "pubsub_store_journal_entries") == {"": 30}
        assert samples(b, "pubsub_store_compacted_total") == {"": 0}


def test_history_larger_than_a_hub_message_arrives_whole(tmp_path: Path) -> None:
    # Each history item is estimated at up to 4 bytes a character: 60 kB items fill a 4 MiB
    # page at 17, so 100 of them cross the hub link in several pages.
    config = {
        "limits": {"send_queue_max_bytes": 64 * 1024 * 1024},
        "history": [{"pattern": ">", "size": 1000, "ttl": 600, "max_bytes": 64 * 1024 * 1024}],
    }
    data = "y" * 60_000
    with (
        BrokerProcess.start(tmp_path, config, workers=2) as b,
        connect(
            b.url,
            subprotocols=["pubsub.v1"],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {b.token('a')}"},
            max_size=None,
        ) as conn,
    ):
        assert all(r["ok"] for r in publish_all(conn, [{"topic": "big", "data": data}] * 100))
        hist = request(conn, op="history", topic="big", limit=1000, id="h")
        assert [m["offset"] for m in hist["messages"]] == list(range(1, 101))
        assert all(m["data"] == data for m in hist["messages"])
        assert not b.events("worker_exited")


def test_a_worker_that_stops_reading_its_link_ends_alone(tmp_path: Path) -> None:
    # A stopped worker leaves the hub's writes to it blocked; when it is killed as hung, those
    # writes fail. That ends its link only: the supervisor and the other worker go on.
    config = {"server": {"worker_hang_timeout": 2.0}}
    with BrokerProcess.start(tmp_path, config, workers=2) as b, contextlib.ExitStack() as stack:
        pids = {e["worker"]: e["pid"] for e in b.events("worker_started")}
        by_worker: dict[int, ClientConnection] = {}
        for i in range(40):  # one connection on each worker
            conn = stack.enter_context(
                connect(
                    b.url,
                    subprotocols=["pubsub.v1"],  # type: ignore[list-item]
                    additional_headers={"Authorization": f"Bearer {b.token(f'c{i}')}"},
                )
            )
            by_worker.setdefault(json.loads(conn.recv(timeout=10))["worker"], conn)
            if len(by_worker) == 2:
                break
        stuck, live = by_worker[1], by_worker[0]
        assert request(stuck, op="subscribe", topic="flood", id="s")["ok"]
        os.kill(pids[1], signal.SIGSTOP)
        data = "f" * 10_000
        for _ in range(4):  # 8 MB toward the stopped worker, far past the socket buffers
            frames = [{"topic": "flood", "data": data}] * 200
            assert all(r["ok"] for r in publish_all(live, frames))
        b.wait_for("worker_hung", timeout=15, worker=1)
        b.wait_for("worker_started", timeout=15, worker=1)
        assert b.proc is not None and b.proc.poll() is None
        assert publish_all(live, [{"topic": "flood", "data": 1}])[0]["offset"] == 801
        with ws_client(b, "after") as after:
            assert request(after, op="history", topic="flood", limit=1, id="h")["offset"] == 801
