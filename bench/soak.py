"""The soak test (``make soak``, not part of ``make test``): an hour of connection churn and
publishing against a two-worker broker on loopback, sampling the broker's memory and file
descriptors, to show that both stay flat.

    python -m bench.soak [--duration 3600] [--workers 2] [--clients 200]

Writes ``bench/results/soak-latest.json`` and ``bench/results/soak-latest.md``. It stops by
itself after ``--duration`` seconds; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bench.servers import make_tokens, memory_kib, start_broker

RESULTS = Path(__file__).resolve().parent / "results"


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


async def churn(url: str, tokens: list[str], stop: float, counters: dict[str, int]) -> None:
    """One client slot: connect, subscribe to a few topics, stay a random while, leave
    (cleanly or abruptly), again, until ``stop``."""
    rng = random.Random()
    while time.monotonic() < stop:
        token = rng.choice(tokens)
        try:
            async with connect(f"{url}?token={token}", open_timeout=10) as ws:
                await ws.recv()
                for t in rng.sample(range(50), 3):
                    await ws.send(
                        json.dumps({"op": "subscribe", "topic": f"soak.t{t}", "since": None})
                    )
                deadline = time.monotonic() + rng.uniform(0.5, 10)
                while time.monotonic() < min(deadline, stop):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ws.recv(), 1)
                        counters["received"] += 1
                if rng.random() < 0.3:
                    ws.transport.abort()
                counters["sessions"] += 1
        except (OSError, WebSocketException, TimeoutError):
            counters["errors"] += 1
            await asyncio.sleep(0.5)


async def publisher(
    url: str, token: str, stop: float, rate: float, counters: dict[str, int]
) -> None:
    while time.monotonic() < stop:
        try:
            async with connect(f"{url}?token={token}") as ws:
                await ws.recv()
                while time.monotonic() < stop:
                    topic = f"soak.t{random.randrange(50)}"
                    await ws.send(
                        json.dumps(
                            {"op": "publish", "topic": topic, "data": {"n": counters["published"]}}
                        )
                    )
                    counters["published"] += 1
                    await asyncio.sleep(1 / rate)
        except (OSError, WebSocketException):
            counters["errors"] += 1
            await asyncio.sleep(0.5)


async def run(
    duration: float, workers: int, clients: int, rate: float, interval: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = start_broker(Path(tmp), workers=workers)
        try:
            url = f"ws://127.0.0.1:{server.port}/ws"
            tokens = make_tokens(server.secret, 100, prefix="soak", ttl=int(duration) + 3600)
            counters = {"sessions": 0, "received": 0, "published": 0, "errors": 0}
            stop = time.monotonic() + duration
            samples: list[dict[str, Any]] = []
            start = time.monotonic()

            async def sampler() -> None:
                while time.monotonic() < stop:
                    pids = server.pids()
                    samples.append(
                        {
                            "t": round(time.monotonic() - start, 1),
                            "rss_kib": server.memory_kib()["rss"],
                            # the first pid is the supervisor (it holds the hub), then the
                            # workers: where memory grows says which side leaks
                            "rss_by_process_kib": [memory_kib([p])["rss"] for p in pids],
                            "fds": fd_count(pids),
                            "processes": len(pids),
                            **counters,
                        }
                    )
                    await asyncio.sleep(interval)

            tasks = [churn(url, tokens, stop, counters) for _ in range(clients)]
            await asyncio.gather(sampler(), publisher(url, tokens[0], stop, rate, counters), *tasks)
            await asyncio.sleep(3)  # let the last connections close
            after = {"rss_kib": server.memory_kib()["rss"], "fds": fd_count(server.pids())}
        finally:
            server.stop()
    warm = [s for s in samples if s["t"] >= duration / 4] or samples
    rss = [s["rss_kib"] for s in warm]
    growth = (rss[-1] - rss[0]) / rss[0] if rss and rss[0] else 0.0
    return {
        "duration_s": duration,
        "workers": workers,
        "clients": clients,
        "publish_rate": rate,
        "counters": counters,
        "samples": samples,
        "after_idle": after,
        "rss_growth_after_warmup": round(growth, 4),
        "flat": abs(growth) < 0.10 and after["fds"] <= samples[0]["fds"] + 10 if samples else False,
    }


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak-latest.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Soak",
        "",
        f"{report['duration_s']:.0f} s, {report['workers']} workers, {report['clients']} churning clients, "
        f"{report['publish_rate']:g} publications/s: {report['counters']}",
        "",
        f"RSS growth after warm-up: {report['rss_growth_after_warmup'] * 100:.1f} %; "
        f"file descriptors after the load: {report['after_idle']['fds']}; flat: {report['flat']}",
        "",
        "RSS per process: the supervisor (which holds the hub), then each worker.",
        "",
        "| t (s) | RSS (MiB) | per process (MiB) | fds | sessions | published |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["samples"]:
        each = " / ".join(f"{kib / 1024:.1f}" for kib in s.get("rss_by_process_kib", []))
        lines.append(
            f"| {s['t']} | {s['rss_kib'] / 1024:.1f} | {each or '-'} | {s['fds']} "
            f"| {s['sessions']} | {s['published']} |"
        )
    (RESULTS / "soak-latest.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=200.0, help="publications per second")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    args = parser.parse_args()
    report = asyncio.run(
        run(
            args.duration,
            args.workers,
            args.clients,
            args.rate,
            min(args.interval, args.duration / 4),
        )
    )
    write(report)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
