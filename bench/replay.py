"""The replay workload: does a large replay to one reader slow live traffic for the others?

A topic's history is filled with ``history_mb`` MB (publications of 60 kB). The latency
workload (:func:`bench.workloads.latency`: 2,000 publications/s over 20 topics of 50
subscribers, 1,000 subscribers) runs twice on the same broker: once alone, once while a
*replayer* subscribes to the full topic with ``since`` (offset 0, so everything it holds is
replayed), reads the whole replay as fast as it can, unsubscribes and starts again, for as long
as the second run lasts. The figures: the subscribers' p50/p99 without and with the replays,
the p99 ratio, and what the replayer got (replays completed, MB/s, seconds per replay).

The broker runs with a history window that holds the 50 MB (a ``[[history]]`` rule for the
topic) and a read budget large enough for back-to-back replays (``read_rate_bytes``,
``read_burst_bytes``); every other limit is the suite's. Only the broker runs this workload:
the peers have no history.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from bench import workloads
from bench.abuse import Link, seed
from bench.loadgen import client_frame
from bench.servers import Server, make_tokens

__all__ = ["BROKER_OPTIONS", "replay"]

TOPIC = "bench.replay"
SIZE = 60_000  # bytes of one publication's data
OFFSET = re.compile(rb'"offset":(\d+)')

#: How :func:`bench.servers.start_broker` starts the broker for this workload.
BROKER_OPTIONS: dict[str, Any] = {
    "limits": {
        "read_rate_bytes": 1 << 40,
        "read_burst_bytes": 1 << 40,
        "history_max_bytes": 512 * 1024 * 1024,
    },
    "history": [{"pattern": TOPIC, "size": 10_000, "ttl": 3600, "max_bytes": 256 * 1024 * 1024}],
}


def replayer(port: int, token: str, stop: Event, pipe: Connection) -> None:
    """Replay the whole topic again and again until ``stop``; send back what it got."""
    link = Link(port, token)
    replays, received, seconds = 0, 0, 0.0
    since = {"offset": 0, "epoch": ""}
    k = 0
    while not stop.is_set():
        k += 1
        t0 = time.monotonic()
        subscribe = {"op": "subscribe", "id": k, "topic": TOPIC, "since": since}
        link.sock.sendall(client_frame(json.dumps(subscribe).encode()))
        reply = json.loads(link.text(60.0))
        last, offset = reply["offset"], 0
        while offset < last:
            frame = link.text(60.0)
            received += len(frame)
            match = OFFSET.search(frame, 0, 200)
            if match is not None:
                offset = int(match.group(1))
        unsubscribe = {"op": "unsubscribe", "id": f"u{k}", "topic": TOPIC}
        link.sock.sendall(client_frame(json.dumps(unsubscribe).encode()))
        while b'"id":"u' not in link.text(60.0):
            pass
        replays += 1
        seconds += time.monotonic() - t0
    link.sock.close()
    pipe.send({"replays": replays, "bytes": received, "seconds": seconds})


def replay(
    server: Server, adapter: str, *, history_mb: int = 50, duration: float = 5.0
) -> dict[str, Any]:
    """The workload (see the module docstring)."""
    if adapter != "broker":
        raise RuntimeError("the replay workload needs the broker's history")
    tokens = make_tokens(server.secret, 2, prefix="replay")
    count = history_mb * 1_000_000 // SIZE
    for start in range(0, count, 100):  # in batches: a reply per publication comes back
        seed(server.port, tokens[0], count=min(100, count - start), size=SIZE, topic=TOPIC)
    mem0 = server.memory_kib()

    def live() -> dict[str, Any]:
        return workloads.latency(server, adapter, topics=20, rate=2000, duration=duration)

    alone = live()
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=replayer, args=(server.port, tokens[1], stop, theirs), daemon=True)
    proc.start()
    try:
        loaded = live()
        stop.set()
        got = mine.recv() if mine.poll(120) else {}
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    mem = server.memory_kib()
    replays = got.get("replays", 0)
    return {
        "p50_ms": loaded["p50_ms"],
        "p99_ms": loaded["p99_ms"],
        "max_ms": loaded["max_ms"],
        "baseline_p50_ms": alone["p50_ms"],
        "baseline_p99_ms": alone["p99_ms"],
        "p99_ratio": round(loaded["p99_ms"] / alone["p99_ms"], 2)
        if loaded["p99_ms"] and alone["p99_ms"]
        else None,
        "history_mb": round(count * SIZE / 1e6, 1),
        "replays": replays,
        "replay_mb_per_s": round(got["bytes"] / got["seconds"] / 1e6, 1)
        if got.get("seconds")
        else None,
        "seconds_per_replay": round(got["seconds"] / replays, 2) if replays else None,
        "delivered_ratio": round(loaded["delivered"] / loaded["expected"], 4)
        if loaded.get("expected")
        else None,
        "rss_growth_mib": round((mem["rss"] - mem0["rss"]) / 1024, 1),
        "closes": loaded.get("closes"),
        "errors": loaded.get("errors"),
    }
