"""The quick benchmark of the send path: 1 publisher -> 1,000 subscribers, 64-byte payloads.

    python -m bench.fanout [--workers N] [--subscribers N] [--seconds S] [--peers] [--latest]

Starts the broker on a free port of 127.0.0.1 with a throw-away configuration, connects the
subscribers with the raw-socket load generator, runs closed-loop bursts of 20 publications and
prints the broker's CPU per delivered message (utime + stime of all its processes over the
measured window), the delivery rate and the generator's own CPU. ``--peers`` runs nats-server
and Socket.IO through the same load for comparison; ``--latest`` adds a row with the topic under
the ``latest`` delivery policy (subscribers that keep up: the cost of the policy's fast path). Exits 0; the figures are the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.run import raise_nofile
from bench.servers import start_broker, start_nats, start_socketio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--peers", action="store_true", help="also nats-server and Socket.IO")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--latest", action="store_true", help="also the topic under the latest delivery policy"
    )
    args = parser.parse_args(argv)
    raise_nofile()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pubsub-fanout-") as tmp:
        starters = [(f"broker-{args.workers}w", lambda d: start_broker(d, args.workers))]
        if args.latest:
            starters.append(
                (
                    f"broker-{args.workers}w-latest",
                    lambda d: start_broker(d, args.workers, None, "latest"),
                )
            )
        if args.peers:
            starters += [("nats", start_nats), ("socketio", start_socketio)]
        for name, start in starters:
            with start(Path(tmp)) as server:
                adapter = "broker" if name.startswith("broker") else name
                rows[name] = workloads.fanout(
                    server, adapter, subscribers=args.subscribers, duration=args.seconds
                )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name, r in rows.items():
        print(
            f"{name:10} {r['cpu_us_per_delivery']:6.2f} µs CPU per delivery  "
            f"{r['deliveries_per_s']:>9,} deliveries/s  "
            f"{r['deliveries_per_write']:5.1f} deliveries per write  "
            f"server CPU {r['server_cpu_pct']:5.1f}%  "
            f"load generator {r['loadgen_cpu_us_per_delivery']:.2f} µs/delivery"
        )
        if r["errors"] or r["closes"]:
            print(f"{'':10} errors {r['errors']} closes {r['closes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
