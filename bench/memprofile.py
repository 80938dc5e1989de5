"""Where the broker's memory per idle connection goes: allocation sites under tracemalloc.

    python -m bench.memprofile [--connections 5000] [--top 25]

Starts a one-worker broker with ``tracemalloc`` on, takes a heap snapshot with no clients,
connects ``--connections`` authenticated, subscribed, idle clients with the load generator,
takes a second snapshot, and prints the allocation sites that grew the most, in bytes per
connection. (tracemalloc sees the Python heap only; RSS also holds interpreter overhead and
fragmentation, so its per-connection figure is larger than the sum printed here.)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import servers, workloads
from bench.loadgen import Generator
from bench.run import raise_nofile

# Runs inside the broker process: SIGUSR1 writes a snapshot to BENCH_SNAPSHOT_PREFIX + n.
BOOT = """
import signal, sys, tracemalloc, os
tracemalloc.start(int(os.environ.get("BENCH_TRACE_FRAMES", "8")))
count = [0]
def dump(signum, frame):
    count[0] += 1
    tracemalloc.take_snapshot().dump(os.environ["BENCH_SNAPSHOT_PREFIX"] + str(count[0]))
signal.signal(signal.SIGUSR1, dump)
from broker.cli import main
sys.argv = ["pubsub-broker", *sys.argv[1:]]
sys.exit(main())
"""


def snapshot(proc: subprocess.Popen[bytes], path: Path, timeout: float = 120) -> object:
    import tracemalloc

    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:  # written when the dump finishes: wait for a stable size
        if path.exists():
            size = path.stat().st_size
            if size == last:
                return tracemalloc.Snapshot.load(str(path))
            last = size
        time.sleep(0.5)
    raise TimeoutError(f"no snapshot at {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by")
    args = parser.parse_args(argv)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="pubsub-mem-") as tmp:
        work = Path(tmp)
        prefix = str(work / "snap.")
        os.environ["BENCH_SNAPSHOT_PREFIX"] = prefix
        os.environ["BENCH_TRACE_FRAMES"] = str(max(1, args.frames))
        orig = servers.broker_command
        servers.broker_command = lambda: [sys.executable, "-c", BOOT]
        try:
            server = servers.start_broker(work, workers=1)
        finally:
            servers.broker_command = orig
        with server:
            time.sleep(0.5)
            before = snapshot(server.proc, Path(prefix + "1"))
            rss0 = server.memory_kib()
            n = args.connections
            with Generator("broker", "127.0.0.1", server.port, 2) as gen:
                workloads._connect(gen, server, n, [["bench.idle"]] * n)
                time.sleep(1.0)
                rss1 = server.memory_kib()
                after = snapshot(server.proc, Path(prefix + "2"))
    key = "traceback" if args.frames > 1 else "lineno"
    stats = after.compare_to(before, key)  # type: ignore[attr-defined]
    total = sum(s.size_diff for s in stats)
    print(
        f"{n} idle connections: RSS +{(rss1['rss'] - rss0['rss']) / n:.1f} KiB/conn "
        f"(under tracemalloc), traced Python heap +{total / n / 1024:.2f} KiB/conn"
    )
    by_file: dict[str, int] = {}
    for s in stats:
        name = s.traceback[-1].filename
        short = "/".join(name.split("/")[-2:])
        by_file[short] = by_file.get(short, 0) + s.size_diff
    print(f"{'bytes/conn':>10}  file")
    for name, size in sorted(by_file.items(), key=lambda kv: -kv[1])[: args.top // 2]:
        print(f"{size / n:10.0f}  {name}")
    print(f"{'bytes/conn':>10} {'blocks/conn':>11}  site")
    for s in stats[: args.top]:
        frames = reversed(s.traceback) if key == "traceback" else [s.traceback[-1]]
        where = " <- ".join(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}" for f in frames)
        print(f"{s.size_diff / n:10.0f} {s.count_diff / n:11.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
