"""Workload shapes beyond the suite's rows, each side by side with nats-server in one run.

    python -m bench.shapes [--only payload_16k,wildcard,...] [--workers 1,2] [--skip-peers]
                           [--seconds S] [--out DIR]

The suite (:mod:`bench.run`) measures one payload size (64 bytes) and exact subscriptions. A
user's traffic has other shapes, and a broker can be ahead on the suite's rows and behind on
those. Each shape here is small and bounded (a few hundred connections, a window of a few
seconds, under 30 s a server), runs against this broker with 1 and 2 workers and against
nats-server with the same load generator, and reports the server's CPU per delivery (per
publication where nothing is delivered) and the ratio to nats-server's:

  fanout_1k / fanout_16k / fanout_48k
                    1 publisher -> 200 subscribers of one topic, payloads of 1 KiB, 16 KiB,
                    48 KiB (the largest that fits the broker's default ``max_message_size``
                    of 64 KiB with its envelope), bursts of 5
  topics_1k / topics_16k
                    2,000 topics x 5 subscribers over 200 connections, payloads of 1 KiB and
                    16 KiB
  wildcard          2,000 topics in 20 groups, reached only through 100 subscribers of
                    ``bench.wild.G.*`` or ``bench.wild.G.>`` (5 a topic)
  topics_monitor    2,000 topics x 5 subscribers over 200 connections, and one more
                    connection subscribed to ``>`` (a monitor: every publication, 6 a topic)
  own_topics        32 publishers, each on its own topic with 2 subscribers
  nobody            one publisher, 20,000 publications/s over 100 topics nobody subscribes
                    to: CPU per publication
  request_rate      5,000 tiny publications/s to one subscriber of one topic: latency p50/p99
                    and CPU per delivery

It writes ``shapes.json`` into ``--out`` (default: a temporary folder it prints) and prints
one table; it never touches ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.run import raise_nofile
from bench.servers import Server, start_broker, start_nats

Shape = Callable[[Server, str, float], dict[str, Any]]


def _fanout(size: int) -> Shape:
    def run(s: Server, a: str, seconds: float) -> dict[str, Any]:
        return workloads.fanout(
            s, a, subscribers=200, burst=5, size=size, duration=seconds, prompt=False
        )

    return run


def _topics(size: int) -> Shape:
    def run(s: Server, a: str, seconds: float) -> dict[str, Any]:
        return workloads.many_topics(
            s, a, topics=2000, connections=200, size=size, duration=seconds
        )

    return run


SHAPES: dict[str, Shape] = {
    "fanout_1k": _fanout(1024),
    "fanout_16k": _fanout(16384),
    "fanout_48k": _fanout(49152),
    "topics_1k": _topics(1024),
    "topics_16k": _topics(16384),
    "wildcard": lambda s, a, t: workloads.wildcard_topics(s, a, duration=t),
    "topics_monitor": lambda s, a, t: workloads.many_topics(
        s, a, topics=2000, connections=200, monitors=1, duration=t
    ),
    "own_topics": lambda s, a, t: workloads.many_topics(
        s, a, topics=32, per_topic=2, connections=64, publishers=32, own=True, duration=t
    ),
    "nobody": lambda s, a, t: workloads.publish_only(s, a, duration=t),
    "request_rate": lambda s, a, t: workloads.latency(
        s, a, subscribers=1, topics=1, rate=5000, duration=t
    ),
}


def cost(figures: dict[str, Any]) -> float | None:
    """The shape's CPU figure: µs per delivery, or per publication where none is delivered."""
    value = figures.get("cpu_us_per_publication") or figures.get("cpu_us_per_delivery")
    return float(value) if value else None


def run_shape(
    shape: Shape, servers: list[str], workdir: Path, seconds: float
) -> dict[str, dict[str, Any]]:
    """Run one shape against each named server (``broker-Nw`` or ``nats``), in turn."""
    rows: dict[str, dict[str, Any]] = {}
    for name in servers:
        if name == "nats":
            server = start_nats(workdir)
        else:
            server = start_broker(workdir, workers=int(name.removeprefix("broker-")[:-1]))
        with server:
            adapter = "nats" if name == "nats" else "broker"
            try:
                rows[name] = shape(server, adapter, seconds)
            except Exception as exc:  # one failed run must not lose the others
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return rows


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per shape and server: CPU figure, rate, ratio to nats-server, latency."""
    lines = [
        "| shape | server | CPU µs | deliveries/s | / nats | p50 ms | p99 ms | other CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, rows in results.items():
        nats = cost(rows.get("nats", {}))
        for name, r in rows.items():
            c = cost(r)
            if c is None:
                lines.append(f"| {shape} | {name} | {r.get('error', '-')} | | | | | |")
                continue
            ratio = f"{c / nats:.2f}x" if nats and name != "nats" else ""
            lines.append(
                f"| {shape} | {name} | {c:.3f} | {r.get('deliveries_per_s', '-')} | {ratio} | "
                f"{r.get('p50_ms', '')} | {r.get('p99_ms', '')} | {r.get('other_cpu_pct')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--workers", default="1,2", help="broker worker counts to run")
    parser.add_argument("--skip-peers", action="store_true", help="only this broker")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window")
    parser.add_argument("--out", type=Path, default=None, help="folder for shapes.json")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    servers = [f"broker-{int(w)}w" for w in args.workers.split(",") if w.strip()]
    if not args.skip_peers:
        servers.append("nats")
    raise_nofile()
    out = args.out or Path(tempfile.mkdtemp(prefix="pubsub-shapes-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="pubsub-shapes-") as tmp:
        for shape in only:
            results[shape] = run_shape(SHAPES[shape], servers, Path(tmp), args.seconds)
            print(table({shape: results[shape]}).splitlines()[-len(servers) :], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'shapes.json'}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
