"""Presence against the real broker, with one worker and with two: only configured topics
track it (the others hold nothing), only permitted tokens read it, and where both hold it
works as before (members, join and leave)."""

from __future__ import annotations

import json
import re
import signal
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection

from tests.http.brokerkit import http, next_op, request, ws_client
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess, to_toml

CONFIG = {"presence": {"topics": ["room.>", "!room.private"]}}


def client(b: BrokerProcess, sub: str, **claims: Any) -> AbstractContextManager[ClientConnection]:
    """A connection as ``sub``; with ``claims`` its token carries a ``pubsub`` claim."""
    return ws_client(b, sub, b.token(sub, subscribe=[">"], **claims) if claims else None)


def metric(b: BrokerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples (over workers and the hub) that carry ``labels``."""
    status, _, body = http(b, "GET", "/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def settle(conn: ClientConnection) -> None:
    """Wait until the broker has carried out everything ``conn`` sent so far, the presence
    join that follows a subscribe reply included (a session serves its frames in order)."""
    assert request(conn, op="ping", id="settle")["ok"]


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


def test_untracked_topics_hold_no_presence(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(tmp_path, CONFIG, workers=workers) as b:
        reader_claims = {"presence": [">"]}
        with (
            client(b, "reader", **reader_claims) as reader,
            client(b, "alice") as alice,
            client(b, "bob") as bob,
        ):
            for i, conn in enumerate((reader, alice, bob)):
                assert request(conn, op="subscribe", topic="news.x", id=i)["ok"]
                assert request(conn, op="subscribe", topic="room.private", id=f"p{i}")["ok"]
            for topic in ("news.x", "room.private", "nobody.here"):
                reply = request(reader, op="presence", topic=topic, id=f"q-{topic}")
                assert error_code(reply) == "not_tracked"
                reply = request(reader, op="subscribe", topic=topic, presence=True, id=f"s{topic}")
                assert error_code(reply) == "not_tracked"
            # Three subscribers on two untracked topics: no presence entry anywhere.
            assert metric(b, "pubsub_presence_members") == 0
            assert metric(b, "pubsub_presence_refused_total", code="not_tracked") == 6
            status, _, body = http(b, "GET", "/api/presence?topic=news.x")
            assert status == 404 and json.loads(body)["error"]["code"] == "not_tracked"


def test_tracked_topic_needs_the_permission(tmp_path: Path, workers: int) -> None:
    with (
        BrokerProcess.start(tmp_path, CONFIG, workers=workers) as b,
        client(b, "plain") as plain,  # default permissions: no presence
        client(b, "narrow", presence=["room.other"]) as narrow,
    ):
        for conn, who in ((plain, "plain"), (narrow, "narrow")):
            reply = request(conn, op="presence", topic="room.1", id=1)
            assert error_code(reply) == "forbidden"
            reply = request(conn, op="subscribe", topic="room.1", presence=True, id=2)
            assert error_code(reply) == "forbidden", who
            # Subscribing without presence events is still allowed (and lists the client).
            assert request(conn, op="subscribe", topic="room.1", id=3)["ok"]
            settle(conn)
        assert metric(b, "pubsub_presence_refused_total", code="forbidden") == 4
        assert metric(b, "pubsub_presence_members") == 2
        status, _, body = http(b, "GET", "/api/presence?topic=room.1")
        assert status == 200 and json.loads(body)["clients"] == ["narrow", "plain"]


def test_tracked_and_permitted_members_join_and_leave(tmp_path: Path, workers: int) -> None:
    config = {**CONFIG, "auth": {"default_presence": ["room.>"]}}
    with (
        BrokerProcess.start(tmp_path, config, workers=workers) as b,
        client(b, "watcher") as watcher,
    ):
        reply = request(watcher, op="subscribe", topic="room.1", presence=True, id=1)
        assert reply["ok"]
        assert next_op(watcher, "join") == {
            "op": "join",
            "topic": "room.1",
            "client": "watcher",
        }
        # Several connections of one client are one member, on whichever worker.
        with client(b, "alice") as tab1, client(b, "alice") as tab2:
            for tab in (tab1, tab2):
                assert request(tab, op="subscribe", topic="room.1", id="s")["ok"]
                settle(tab)
            assert next_op(watcher, "join")["client"] == "alice"
            members = request(watcher, op="presence", topic="room.1", id=2)["clients"]
            assert members == ["alice", "watcher"]
            assert metric(b, "pubsub_presence_members") == 2
        assert next_op(watcher, "leave") == {
            "op": "leave",
            "topic": "room.1",
            "client": "alice",
        }
        assert request(watcher, op="presence", topic="room.1", id=3)["clients"] == ["watcher"]
        # A token whose claim lists no presence patterns cannot read, whatever the default.
        with client(b, "claimed", publish=[">"]) as claimed:
            reply = request(claimed, op="presence", topic="room.1", id=4)
            assert error_code(reply) == "forbidden"
        status, _, body = http(b, "GET", "/api/presence?topic=room.1")
        assert status == 200 and json.loads(body)["clients"] == ["watcher"]


def reload(b: BrokerProcess, config: dict[str, Any]) -> None:
    """Apply ``config`` with SIGHUP and wait until every process has reloaded it."""
    b.config_path.write_text(to_toml(config))
    b.signal(signal.SIGHUP)
    for _ in range(b.workers + (b.workers > 1)):  # each worker, and the supervisor
        b.wait_for("reloaded", timeout=10)


def test_a_reload_applies_to_new_subscriptions_and_leaves_no_ghost(
    tmp_path: Path, workers: int
) -> None:
    with (
        BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE, workers=workers) as b,
        client(b, "watcher") as watcher,
    ):
        assert request(watcher, op="subscribe", topic="room", presence=True, id=1)["ok"]
        with client(b, "alice") as alice:
            assert request(alice, op="subscribe", topic="room", id=1)["ok"]
            settle(alice)
            # From now on no topic tracks presence...
            reload(b, {**b.config, "presence": {"topics": []}})
            reply = request(watcher, op="presence", topic="room", id=2)
            assert error_code(reply) == "not_tracked"
            with client(b, "bob") as bob:
                reply = request(bob, op="subscribe", topic="room", presence=True, id=1)
                assert error_code(reply) == "not_tracked"
                assert request(bob, op="subscribe", topic="room", id=2)["ok"]
                settle(bob)
                assert metric(b, "pubsub_presence_members") == 2  # bob is not listed
        # ...but the members listed before it still leave, with their events: no ghost.
        assert next_op(watcher, "leave") == {"op": "leave", "topic": "room", "client": "alice"}
        assert metric(b, "pubsub_presence_members") == 1  # the watcher, until it goes
