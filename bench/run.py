"""The benchmark suite: this broker against nats-server and Socket.IO, same load, same generator.

    python -m bench.run [--quick] [--only fanout,latency,...] [--skip-peers]

Runs every workload against a freshly started server each time (all on 127.0.0.1), bounded by
a time budget (default 1200 s; a step that would not fit is recorded as skipped), and writes
``bench/results/latest.json``, ``latest.md`` (tables, with every figure also as a ratio to the
peers) and ``fanout.png``.

Workloads (see :mod:`bench.workloads`):
  1. fanout       1 publisher -> 1,000 subscribers of one topic, 64-byte payloads, bursts of
                  20; with 1 and 2 broker workers
  2. latency      2,000 publications/s to 1,000 subscribers: spread over 20 topics of 50
                  subscribers (100,000 deliveries/s), and on one topic (2,000,000/s asked)
  2c. slow        50 reading subscribers beside 1,000 that stopped reading, 200 publications/s:
                  the readers' latency and completeness, the server's memory growth
  3. idle         20,000 authenticated subscribed idle connections (or as many as the file
                  descriptor limit allows): memory per connection, time for one broadcast
  3b. idle100k    the same with 100,000 connections (or as many as the open-file limit and
                  memory allow) over 8 broker workers (bench.scale; the broker only)
  4. connect      handshakes with token verification per second, 2 broker workers
  5. topics       10,000 topics x 5 subscribers, publications spread over all of them
                  (fan-out and the topics rows also run broker-2w-owned: two workers owning
                  the topics, [server] topic_owner = "workers", no hub on the data path)
  6. abuse        a bystander's ping round trips on a worker where one client pipelines
                  history requests and another streams 1-byte fragments; with 1 and 2 broker
                  workers (the broker only: the peers have no history)
  7. store        publications per second the history store sustains (bench.store), and
                  fan-out / many topics with history on disk (servers broker-1w-store and
                  broker-2w-store beside broker-1w and broker-2w)
  8. replay       the latency workload's p99 with and without one reader replaying 50 MB of
                  history over and over; with 1 and 2 broker workers (the broker only)
  9. storm        a restart's reconnect storm: 20,000 clients (or as many as one process may
                  hold) come back within 5 s, retrying with backoff when refused; how long
                  until all are subscribed, with 1 and 2 broker workers (bench.storm; the
                  broker only)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import abuse, replay, report, scale, storm, workloads
from bench.loadgen import machine_busy_seconds
from bench.servers import Server, start_broker, start_nats, start_socketio

RESULTS = Path(__file__).resolve().parent / "results"

PEERS = ("nats", "socketio")
OWNED = report.OWNED


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nats_server": version(["nats-server", "--version"]),
        "node": version(["node", "--version"]),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "broker_modules": broker_modules(),
    }


def broker_modules() -> str:
    """Whether the brokers started by this run use the mypyc-compiled hot modules (they inherit
    this process's environment and files), and if not, why."""
    import broker
    from broker import native

    if os.environ.get(native.ENV) == "0":
        return f"pure Python ({native.ENV}=0)"
    status = native.check(Path(broker.__file__).parent)
    return "compiled (mypyc)" if status.compiled else f"pure Python: {status.reason}"


def background_cpu_pct(seconds: float = 1.0) -> float:
    """How busy the machine is before we start, in percent of one CPU."""
    b0 = machine_busy_seconds()
    time.sleep(seconds)
    return round(100 * (machine_busy_seconds() - b0) / seconds, 1)


class Suite:
    def __init__(
        self, workdir: Path, budget: float, quick: bool, peers: bool, wait_quiet: float = 0.0
    ) -> None:
        self.workdir = workdir
        self.wait_quiet = wait_quiet
        self.deadline = time.monotonic() + budget
        self.quick = quick
        self.peers = peers
        self.results: dict[str, Any] = {}

    def wait_until_quiet(self) -> float:
        """With ``--wait-quiet S``: wait up to S seconds for the rest of the machine to use
        under 25 % of a CPU. Returns the last sample."""
        deadline = time.monotonic() + min(self.wait_quiet, max(0.0, self.remaining() - 60))
        while True:
            busy = background_cpu_pct(0.5)
            if busy < 25 or time.monotonic() >= deadline:
                return busy

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, workload: str = "") -> Server:
        if name == "nats":
            return start_nats(self.workdir)
        if name == "socketio":
            return start_socketio(self.workdir)
        store = name.endswith("-store")
        owned = "-owned" in name
        workers = int(
            name.removeprefix("broker-").removesuffix("-store").removesuffix("-owned")[:-1]
        )
        options = BROKER_OPTIONS.get(workload, {})
        return start_broker(self.workdir, workers=workers, store=store, owned=owned, **options)

    def step(
        self,
        workload: str,
        name: str,
        run: Callable[[Server, str], dict[str, Any]],
        needs: float,
    ) -> None:
        """Start server ``name``, run one workload against it, record the figures (or why
        there are none), stop the server."""
        runs = self.results.setdefault(workload, {})
        if name in PEERS and not self.peers:
            return
        if self.remaining() < needs:
            runs[name] = {
                "not_run": f"time budget ({self.remaining():.0f} s left, needs {needs:.0f})"
            }
            print(f"{workload:10} {name:12} skipped: time budget", flush=True)
            return
        adapter = "broker" if name.startswith("broker") else name
        background = self.wait_until_quiet()
        t0 = time.monotonic()
        try:
            server = self.start(name, workload)
        except Exception as exc:
            runs[name] = {"not_run": f"could not start: {exc}"[:500]}
            print(f"{workload:10} {name:12} not run: {exc}", flush=True)
            return
        try:
            requested = server.extra.get("requested_workers")
            if requested and server.extra["workers"] < requested:
                runs[name] = {
                    "not_run": f"the broker started {server.extra['workers']} worker(s) for "
                    f"workers = {requested}: multi-worker is not available in this build"
                }
                print(f"{workload:10} {name:12} not run: multi-worker unavailable", flush=True)
                return
            figures = run(server, adapter)
            figures["wall_s"] = round(time.monotonic() - t0, 1)
            figures["background_cpu_pct_before"] = background
            runs[name] = figures
            print(f"{workload:10} {name:12} {report.headline(workload, figures)}", flush=True)
        except Exception as exc:
            runs[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{workload:10} {name:12} failed: {exc}", flush=True)
            traceback.print_exc()
        finally:
            alive = server.alive()
            server.stop()
            if not alive:
                runs[name]["server_died"] = True

    def run(self, only: set[str]) -> None:
        q = self.quick
        duration = 3.0 if q else 5.0
        hard = raise_nofile()
        # one process cannot hold more descriptors than the hard limit: servers that run in
        # one process (nats-server, node, a one-worker broker) top out just below it
        idle_n = 2000 if q else min(20000, hard - 100)

        def idle(s: Server, a: str) -> dict[str, Any]:
            # several workers share the connections, so they reach the full 20,000
            n = idle_n if q or s.extra.get("workers", 1) < 2 else 20000
            return workloads.idle_connections(s, a, connections=n)

        brokers_first = ("broker-1w", "broker-2w", *PEERS)
        # The throughput workloads also run two workers owning the topics (no hub on the
        # data path), beside the hub's.
        throughput = ("broker-1w", "broker-2w", OWNED, *PEERS)
        # With "store" asked for: each broker with history on disk right after it without, so
        # that the two runs of a pair see the same machine.
        with_store = "store" in only
        store_first = (
            ("broker-1w", "broker-1w-store", "broker-2w", "broker-2w-store", OWNED, *PEERS)
            if with_store
            else throughput
        )
        plan: list[tuple[str, tuple[str, ...], Callable[[Server, str], dict[str, Any]], float]]
        plan = [
            (
                "fanout",
                store_first,
                lambda s, a: workloads.fanout(s, a, duration=duration),
                25,
            ),
            (
                "latency",
                brokers_first,
                lambda s, a: workloads.latency(s, a, topics=20, rate=2000, duration=duration),
                25,
            ),
            (
                "latency_one_topic",
                brokers_first,
                lambda s, a: workloads.latency(s, a, topics=1, rate=2000, duration=3.0),
                25,
            ),
            (
                "slow",
                brokers_first,
                lambda s, a: workloads.slow_subscribers(s, a, duration=duration),
                25,
            ),
            (
                "idle",
                brokers_first,
                idle,
                60,
            ),
            (
                "idle100k",
                ("broker-8w",),
                lambda s, a: scale.idle_many(s, a, 5000 if q else scale.CONNECTIONS),
                180,
            ),
            (
                "connect",
                ("broker-2w", "broker-1w", *PEERS),
                lambda s, a: workloads.connect_rate(s, a, connections=2000 if q else 6000),
                30,
            ),
            (
                "connect_again",
                ("broker-2w", "broker-1w", *PEERS),
                lambda s, a: workloads.connect_rate(
                    s, a, connections=2000 if q else 6000, clients=1000
                ),
                30,
            ),
            (
                "topics",
                store_first,
                lambda s, a: workloads.many_topics(
                    s, a, topics=2000 if q else 10000, duration=duration
                ),
                40,
            ),
            (
                "topics_spread",
                throughput,
                lambda s, a: workloads.many_topics(
                    s, a, topics=2000 if q else 10000, duration=duration, publishers=8
                ),
                40,
            ),
            (
                "abuse",
                ("broker-1w", "broker-2w"),
                lambda s, a: abuse.abuse(s, a, baseline=2.0, duration=duration),
                25,
            ),
            (
                "replay",
                ("broker-1w", "broker-2w"),
                lambda s, a: replay.replay(s, a, history_mb=10 if q else 50, duration=duration),
                60,
            ),
            (
                # bounded by the storm's own timeout (45 s) and the generator's start and stop
                "storm",
                ("broker-1w", "broker-2w"),
                lambda s, a: storm.storm(
                    s,
                    a,
                    clients=2000 if q else (20000 if s.extra.get("workers", 1) > 1 else idle_n),
                    jitter=1.0 if q else 5.0,
                ),
                55,
            ),
        ]
        for workload, names, run, needs in plan:
            if workload.split("_")[0] not in only:
                if not (with_store and workload in ("fanout", "topics")):
                    continue
                names = tuple(n for n in names if n.startswith("broker"))  # the store's pairs
            for name in names:
                self.step(workload, name, run, needs)
        if "store" in only:
            self.store(duration)

    def store(self, duration: float) -> None:
        """The store's own rate, in this process (no server): ack memory, then ack disk."""
        from bench.store import store_throughput

        runs = self.results.setdefault("store", {})
        for ack in ("memory", "disk"):
            name = f"store-ack-{ack}"
            if self.remaining() < duration + 10:
                runs[name] = {"not_run": "time budget"}
                continue
            runs[name] = {
                **store_throughput(duration=min(duration, 3.0), ack=ack),
                "background_cpu_pct_before": self.wait_until_quiet(),
            }
            print(f"{'store':10} {name:16} {report.headline('store', runs[name])}", flush=True)


WORKLOADS = (
    "fanout",
    "latency",
    "slow",
    "idle",
    "idle100k",
    "connect",
    "topics",
    "abuse",
    "store",
    "replay",
    "storm",
)
#: How a workload's broker is started, when not with the suite's defaults.
BROKER_OPTIONS: dict[str, dict[str, Any]] = {
    "replay": replay.BROKER_OPTIONS,
    "idle100k": scale.BROKER_OPTIONS,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke run)")
    parser.add_argument("--skip-peers", action="store_true", help="only this broker")
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds for all workloads")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each step wait up to S seconds for other processes to go quiet",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if not args.skip_peers and shutil.which("nats-server") is None:
        print("note: nats-server is not installed; its runs are recorded as not run", flush=True)

    background = background_cpu_pct()
    if background > 20:
        print(f"note: the machine is busy ({background:.0f}% CPU in use by others)", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pubsub-bench-") as tmp:
        suite = Suite(Path(tmp), args.budget, args.quick, not args.skip_peers, args.wait_quiet)
        try:
            suite.run(only)
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", flush=True)
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine(), "background_cpu_pct": background},
        "workloads": suite.results,
    }
    doc["ratios"] = report.ratios(suite.results)
    doc["targets"] = report.targets(suite.results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "latest.md").write_text(report.markdown(doc))
    chart = report.chart(suite.results, args.out / "fanout.png")
    print(f"wrote {args.out / 'latest.json'}, latest.md{', fanout.png' if chart else ''}")
    print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
