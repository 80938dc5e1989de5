"""The reconnect storm: how long a freshly restarted broker takes to take every client back.

After a restart every client of the old broker comes back at once, each with a token the new
broker has never checked (its verified-token cache starts empty). The clients here behave as
well-written ones do: client k reconnects at a random moment of [0, ``jitter``] s after the
restart, and after each refusal or failure (a refused TCP connect, a 503, a 1013 close, a
timeout) tries again after an exponential backoff (0.25 s doubling up to 8 s, each delay drawn
from its upper half). A client is back once it is authenticated and subscribed to its topic.

The figures: the time until every client is back (and the median client), the retries the
broker's budgets caused (pending slots, ``max_connections``, the accept backlog), and the
broker's CPU per client taken back. Broker only: the peers' clients would need their own
refusal semantics. ``python -m bench.storm [--workers 2] [--clients 20000] [--jitter 5]`` runs
it alone; ``bench.run --only storm`` runs it for one and two workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.loadgen import Generator, machine_busy_seconds
from bench.servers import Server, start_broker
from bench.workloads import HOST, tokens_for

__all__ = ["storm"]

BACKOFF = 0.25  # the first retry's delay, doubled per attempt
BACKOFF_MAX = 8.0


def storm(
    server: Server,
    adapter: str,
    clients: int = 20000,
    jitter: float = 5.0,
    sub_procs: int = 2,
    timeout: float = 45.0,
) -> dict[str, Any]:
    """``clients`` clients arriving as after a restart (see the module): when all are back."""
    tokens = tokens_for(server, clients)
    topics = [["bench.storm"]] * clients
    with Generator(adapter, HOST, server.port, sub_procs) as gen:
        agents = gen.subscriber_agents
        pids = server.pids()
        c0, g0, m0 = server.cpu_seconds(pids), gen.cpu_seconds(), machine_busy_seconds()
        for i, a in enumerate(agents):
            mine = range(i, clients, len(agents))
            gen.pipes[a].send(
                {
                    "kind": "storm",
                    "count": len(mine),
                    "tokens": [tokens[k] for k in mine],
                    "topics": [topics[k] for k in mine],
                    "jitter": jitter,
                    "backoff": BACKOFF,
                    "backoff_max": BACKOFF_MAX,
                    "timeout": timeout,
                    "seed": 17,
                }
            )
        replies = [gen.pipes[a].recv() for a in agents]
        c1, g1, m1 = server.cpu_seconds(pids), gen.cpu_seconds(), machine_busy_seconds()
    back = sorted(t for r in replies for t in r["back"])
    ok = len(back)
    elapsed = back[-1] if back else timeout
    return {
        "clients": clients,
        "jitter_s": jitter,
        "back": ok,
        "not_back": clients - ok,
        "all_back_s": round(elapsed, 2) if ok == clients else None,
        "median_back_s": round(statistics.median(back), 2) if back else None,
        "retries": sum(r["retries"] for r in replies),
        "errors": {k: v for r in replies for k, v in r["errors"].items()},
        "server_cpu_us_per_client": round(1e6 * (c1 - c0) / ok, 1) if ok else None,
        "loadgen_cpu_us_per_client": round(1e6 * (g1 - g0) / ok, 1) if ok else None,
        "other_cpu_pct": round(100 * ((m1 - m0) - (c1 - c0) - (g1 - g0)) / max(elapsed, 1e-3), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=20000)
    parser.add_argument("--jitter", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, start_broker(Path(tmp), args.workers) as server:
        result = storm(server, "broker", clients=args.clients, jitter=args.jitter)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
