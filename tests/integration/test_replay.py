"""Large replays against the real broker, with one worker and with two (where the hub holds
history): a replay many times the send queue reaches a client that reads, whole, with the
live publications made meanwhile after it in exact order; a client that never reads is cut
off as a slow consumer (4008) while the broker's memory stays bounded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.integration.test_history_budget import publish_all
from tests.support.broker import BrokerProcess
from tests.support.rawws import encode_frame, handshake

DATA = "z" * 60_000
BACKLOG = 100  # 6 MB: six times the default send queue (1 MiB)
LIVE = 20
#: Room for the backlog, and more, in the topic's window.
CONFIG: dict[str, Any] = {
    "history": [{"pattern": ">", "size": 2000, "ttl": 600, "max_bytes": 256 * 1024 * 1024}],
    "limits": {"read_burst_bytes": 256 * 1024 * 1024},
}
FROM_START = {"offset": 0, "epoch": ""}


@contextmanager
def big_client(b: BrokerProcess, sub: str) -> Iterator[ClientConnection]:
    """A client that takes frames of any size, past its welcome."""
    with connect(
        b.url,
        subprotocols=["pubsub.v1"],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {b.token(sub)}"},
        max_size=None,
        open_timeout=10,
    ) as conn:
        assert json.loads(conn.recv(timeout=10))["op"] == "welcome"
        yield conn


def replay_then_live(b: BrokerProcess, topic: str = "big") -> None:
    """Publish :data:`BACKLOG` publications of 60 kB, subscribe from the start while
    :data:`LIVE` more are published, and check every offset arrives once, in order."""
    with big_client(b, "pub") as pub, big_client(b, "reader") as reader:
        assert all(r["ok"] for r in publish_all(pub, [{"topic": topic, "data": DATA}] * BACKLOG))
        reader.send(json.dumps({"op": "subscribe", "id": 1, "topic": topic, "since": FROM_START}))
        reply = json.loads(reader.recv(timeout=30))
        assert reply["ok"] and reply["offset"] == BACKLOG, reply
        # Live publications while the replay is still going out: held, then sent after it.
        live = threading.Thread(
            target=publish_all, args=(pub, [{"topic": topic, "data": DATA}] * LIVE)
        )
        live.start()
        try:
            offsets = []
            for _ in range(BACKLOG + LIVE):
                message = json.loads(reader.recv(timeout=30))
                assert message["op"] == "message" and message["data"] == DATA
                offsets.append(message["offset"])
        finally:
            live.join()
        assert offsets == list(range(1, BACKLOG + LIVE + 1))
        # Nothing after it: a ping's reply comes next.
        reader.send(json.dumps({"op": "ping", "id": "end"}))
        assert json.loads(reader.recv(timeout=10)).get("id") == "end"
    assert not b.events("slow_consumer")


def test_a_large_replay_reaches_a_reader_whole_and_live_traffic_follows_it(
    tmp_path: Path, workers: int
) -> None:
    with BrokerProcess.start(tmp_path, CONFIG, workers=workers) as b:
        replay_then_live(b)


def rss_kib(pid: int) -> int:
    """What a process of the broker (and its children: the workers) hold in memory."""
    total = 0
    for p in [pid, *children(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_a_client_that_never_reads_a_replay_is_cut_off_and_memory_stays_bounded(
    tmp_path: Path, workers: int
) -> None:
    # It does not read: the replay stops at the send queue, the live publications made
    # meanwhile are held up to the same bound and then dropped (history has them), and the
    # write timeout makes it a slow consumer.
    config = {**CONFIG, "timeouts": {"write_timeout": 3.0}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, big_client(b, "pub") as pub:
        assert all(r["ok"] for r in publish_all(pub, [{"topic": "big", "data": DATA}] * 400))
        before = rss_kib(b.pid)
        status, _, _, sock = handshake(b.port, f"/ws?token={b.token('sleeper')}", rcvbuf=4096)
        with sock:
            assert status == 101
            subscribe = {"op": "subscribe", "id": 1, "topic": "big", "since": FROM_START}
            sock.sendall(encode_frame(json.dumps(subscribe).encode()))
            for _ in range(3):
                assert all(r["ok"] for r in publish_all(pub, [{"topic": "big", "data": DATA}] * 10))
            event = b.wait_for("disconnect", timeout=30, client="sleeper", code=4008)
            assert event["reason"] == "slow consumer (write_timeout)"
        # A 24 MB replay, and nothing of it stays: bounded by the send queue and the page.
        assert rss_kib(b.pid) - before < 12 * 1024
        # The others go on.
        assert publish_all(pub, [{"topic": "big", "data": 1}])[0]["ok"]
