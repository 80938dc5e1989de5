"""The 100,000-connection row (``idle100k``): many idle connections on one machine.

    python -m bench.scale [--connections N] [--workers 8] [--json]

Theory of operation
-------------------
The idle workload (:func:`bench.workloads.idle_connections`) at a size where one process is
not enough on either side. Three per-process or per-address limits decide how the load is cut:

- **open files**: a process holds at most its hard ``RLIMIT_NOFILE`` descriptors (20,000 on the
  project's machines), one per connection. The broker runs ``workers`` = 8, so each worker
  holds about N/8 = 12,500 (the kernel spreads accepted connections over the workers'
  ``SO_REUSEPORT`` sockets by a hash of the addresses, evenly to about one percent), and
  ``[limits] max_connections`` per worker is raised to what its limit leaves room for. The
  generator uses one process per 12,500 connections as well.
- **ephemeral ports**: loopback has about 28,000 local ports per (source address, server
  address, server port). Each generator process connects from an address of its own
  (127.0.0.2, 127.0.0.3, ...), so none comes near that.
- **memory**: about 9 KiB per connection in the broker, and nearly as much again in the kernel
  and the generator; :func:`plan` allows :data:`KIB_PER_CONNECTION` per connection of the
  available memory.

:func:`plan` takes the number asked for and returns the number that fits, with the reason when
it is smaller; the row records both. The row is bounded in time: connecting has ``timeout``
seconds (120), each broadcast 30, so a broker that stalls fails the row instead of the suite.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.servers import Server, start_broker

__all__ = ["BROKER_OPTIONS", "Plan", "idle_many", "plan"]

CONNECTIONS = 100_000
WORKERS = 8
#: Connections per generator process (and about per broker worker at 8 workers).
PER_AGENT = 12_500
#: Descriptors a broker worker keeps besides its clients (broker.rlimit.RESERVED_FDS), and the
#: connections it may hold before they authenticate (``max_pending_connections``).
RESERVED_FDS = 128
PENDING = 1000
#: Broker, kernel and generator memory to allow per connection, KiB (measured: about 9 in
#: the broker, 7-8 in the kernel for both socket ends, under 1 in the generator; twice that
#: leaves the machine room for everything else).
KIB_PER_CONNECTION = 40
#: The broadcasts are repeated with subscribers that read every 5 ms (as in the fan-out row).
READ_PACE = 0.005
#: The share of the workers' room that is filled at most: the spread is not perfectly even.
SPREAD_MARGIN = 0.9


class Plan(NamedTuple):
    """How many connections this machine takes, over how many generator processes."""

    connections: int
    agents: int
    limited_by: str  # "" when the number asked for fits


def _hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def worker_connections() -> int:
    """``[limits] max_connections`` for a worker: what its open-file limit leaves room for."""
    return _hard_nofile() - RESERVED_FDS - PENDING


def plan(wanted: int, workers: int = WORKERS) -> Plan:
    """The connections that fit (at most ``wanted``), and why fewer when they do not."""
    limits = {
        f"{workers} workers x {worker_connections()} connections (open-file limit "
        f"{_hard_nofile()})": int(workers * worker_connections() * SPREAD_MARGIN),
        f"available memory at {KIB_PER_CONNECTION} KiB a connection": workloads.meminfo_kib(
            "MemAvailable"
        )
        // KIB_PER_CONNECTION,
    }
    n, limited_by = wanted, ""
    for reason, cap in limits.items():
        if cap < n:
            n, limited_by = cap, reason
    per_agent = min(PER_AGENT, _hard_nofile() - 100)
    return Plan(max(1, n), max(1, math.ceil(n / per_agent)), limited_by)


#: How :func:`bench.servers.start_broker` starts the broker for this row.
BROKER_OPTIONS: dict[str, Any] = {"limits": {"max_connections": worker_connections()}}


def idle_many(
    server: Server, adapter: str, connections: int = CONNECTIONS, timeout: float = 120.0
) -> dict[str, Any]:
    """The idle workload with as many of ``connections`` as fit (:func:`plan`), each generator
    process connecting from its own loopback address."""
    p = plan(connections, server.extra.get("workers", WORKERS))
    sources = [f"127.0.0.{2 + i}" for i in range(p.agents + 1)]
    figures = workloads.idle_connections(
        server,
        adapter,
        p.connections,
        sub_procs=p.agents,
        sources=sources,
        timeout=timeout,
        paced=READ_PACE,
    )
    figures["asked"] = connections
    if p.limited_by:
        figures["limited_by"] = p.limited_by
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    from bench.run import raise_nofile

    raise_nofile()
    with (
        tempfile.TemporaryDirectory(prefix="pubsub-scale-") as tmp,
        start_broker(Path(tmp), args.workers, **BROKER_OPTIONS) as server,
    ):
        r = idle_many(server, "broker", args.connections)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    limited = f" ({r['limited_by']})" if "limited_by" in r else ""
    print(
        f"broker-{args.workers}w  {r['connections']:,} connections{limited}: up in "
        f"{r['connect_s']} s ({r['connects_per_s']:,}/s), {r['pss_kib_per_connection']} KiB "
        f"PSS each (kernel, both ends: {r['kernel_kib_per_connection']} KiB)"
    )
    for prefix, readers in (("", "prompt readers"), ("paced_", "readers every 5 ms")):
        print(
            f"  one broadcast to all, {readers}: {r[prefix + 'broadcast_ms']} ms (median "
            f"{r[prefix + 'broadcast_median_ms']}); CPU during the median one: broker "
            f"{r[prefix + 'broadcast_server_cpu_s']} s, generator "
            f"{r[prefix + 'broadcast_loadgen_cpu_s']} s, rest of the machine "
            f"{r[prefix + 'broadcast_other_cpu_pct']} %"
        )
    if r["errors"] or r["closes"]:
        print(f"errors {r['errors']} closes {r['closes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
