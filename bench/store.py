"""How many publications per second the history store keeps up with, on a real file.

    python -m bench.store [--duration S] [--topics N] [--ack memory|disk]

One trio loop publishes into a :class:`~broker.history.TopicStore` (the broker's own, its history
large enough that every publication must be written) as fast as it can, in bursts that yield to the scheduler between them, while
the store's :class:`~broker.store.DiskJournal` commits every ``flush_interval`` from its worker
thread, exactly as in the broker. The figure that counts is ``committed_per_s``: publications
written to disk per second, sustained (the run ends with a final flush, and the time includes
it). With ``--ack disk`` the publisher waits for every batch's commit before the next burst, as
publishers acknowledged on disk do.

The broker's own cost with the store on is measured by ``python -m bench.run --only
fanout,topics --skip-peers`` (servers ``broker-1w-store`` and ``broker-2w-store`` beside
``broker-1w`` and ``broker-2w``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from broker.config import HistoryRule, StoreConfig
from broker.history import TopicStore
from broker.store import DiskJournal

__all__ = ["store_throughput"]


def store_throughput(
    duration: float = 2.0,
    topics: int = 1000,
    payload: int = 64,
    burst: int = 500,
    ack: str = "memory",
    flush_interval: float = 0.1,
) -> dict[str, Any]:
    """Publish for ``duration`` seconds over ``topics`` topics; the figures of the run."""
    data = '"' + "x" * (payload - 2) + '"'
    names = [f"bench.store.{i}" for i in range(topics)]
    with tempfile.TemporaryDirectory(prefix="pubsub-store-bench-") as tmp:
        path = str(Path(tmp) / "history.db")
        config = StoreConfig(path=path, flush_interval=flush_interval, ack=ack)

        async def main() -> dict[str, Any]:
            # History large enough that every publication of the run must reach the disk.
            rule = HistoryRule(">", 10_000, 600.0, 64 * 1024 * 1024)
            store = TopicStore(lambda t: rule, trio.current_time, max_bytes=2**31)
            journal = DiskJournal(config)
            journal.start(store)
            published = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(journal.run, store)
                end = trio.current_time() + duration
                k = 0
                while trio.current_time() < end:
                    for _ in range(burst):
                        store.publish(names[k % topics], data, "bench")
                        k += 1
                    published += burst
                    if ack == "disk":
                        await journal.durable()
                    else:
                        await trio.lowlevel.checkpoint()
                await journal.flush(store)  # what is left, so every row is counted
                bytes_on_disk = journal.stats()["bytes"]
                nursery.cancel_scope.cancel()  # the journal closes the file
            elapsed = time.perf_counter() - t0
            stats = {**journal.stats(), "bytes": bytes_on_disk}
            batches = max(1, stats["batches"] - 1)  # the start's batch is not the stream's
            return {
                "published": published,
                "committed_rows": stats["rows"],
                "committed_per_s": round(stats["rows"] / elapsed),
                "batches": stats["batches"] - 1,
                "rows_per_batch": round(stats["rows"] / batches),
                "commit_ms_per_batch": round(1000 * stats["commit_seconds"] / batches, 2),
                "process_cpu_pct": round(100 * (time.process_time() - cpu0) / elapsed, 1),
                "refused": stats["refused"],
                "failures": stats["failures"],
                "file_mib": round(stats["bytes"] / 2**20, 1),
                "topics": topics,
                "payload_bytes": payload,
                "ack": ack,
                "flush_interval_s": flush_interval,
                "duration_s": round(elapsed, 2),
            }

        return trio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--ack", choices=("memory", "disk"), default="memory")
    args = parser.parse_args(argv)
    figures = store_throughput(args.duration, args.topics, args.payload, ack=args.ack)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
