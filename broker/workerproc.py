"""A worker process of a multi-worker broker, started by the supervisor (not by hand):

    python -m broker.workerproc --config FILE --index N --hub PATH --fds 3 --overrides '{}'

It serves the listening socket(s) it was passed, talks to the supervisor's hub, drains on
SIGTERM, reloads its configuration on SIGHUP, and exits when the hub goes away. With
``[server] topic_owner = "workers"`` it also owns a shard of the topics
(:mod:`broker.bus.sharded`), served on a socket beside the hub's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from broker import gctune, native, rlimit
from broker.bus.base import Bus, BusHandlers
from broker.bus.ipc import HubClient, IpcBus
from broker.bus.sharded import ShardedBus
from broker.config import Config, load_config, node_name
from broker.errors import ConfigError
from broker.logs import configure_logging
from broker.owner import TopicOwner, owner_limits
from broker.shards import shard_sockets, shard_store
from broker.store import StoreError
from broker.supervisor import find_store_error, needed_files, reload_config
from broker.worker import Worker, make_redis_bus

log = structlog.get_logger()


async def run_worker(
    config: Config, index: int, hub: str, fds: list[int], overrides: dict[str, Any]
) -> None:
    socks = [socket.socket(fileno=fd) for fd in fds]
    for s in socks:
        s.setblocking(False)
    holder: dict[str, Worker] = {}

    async def control(method: str, args: list[Any]) -> Any:
        worker = holder["worker"]
        if method == "stats":
            # The history this worker holds as an owner of topics (none otherwise).
            return {**worker.stats(), "history": worker.bus.history_stats()}
        if method == "disconnect":
            return worker.disconnect(args[0])
        raise ValueError(f"unknown control method {method!r}")

    client = HubClient(hub, index=index, node=node_name(config), control=control)

    def make_bus(cfg: Config, handlers: BusHandlers) -> Bus:
        if cfg.bus.url:
            return make_redis_bus(cfg, handlers)
        count = cfg.owner_count
        if count:  # this worker owns a shard of the topics (broker.bus.sharded)
            owner = TopicOwner(
                cfg.history_rule,
                owner_limits(cfg.limits, count),
                shard_store(cfg.store, index, count),
            )
            return ShardedBus(
                handlers,
                paths=shard_sockets(Path(hub), count),
                index=index,
                node=node_name(cfg),
                owner=owner,
            )
        return IpcBus(client, handlers)

    worker = Worker(config, index=index, bus_factory=make_bus)
    holder["worker"] = worker
    structlog.contextvars.bind_contextvars(worker=index)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            await nursery.start(client.run)
            ports = await nursery.start(worker.serve, socks)
            await client.call("ready", ports[0])
            gctune.freeze_startup_objects()

            async def exit_when_hub_goes() -> None:
                await client.wait_closed()
                log.error("supervisor_gone")
                nursery.cancel_scope.cancel()

            nursery.start_soon(exit_when_hub_goes)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    new = reload_config(worker.config, overrides)
                    if new is not None:
                        worker.reload(new)
                    continue
                await worker.shutdown(worker.config.server.shutdown_timeout)
                nursery.cancel_scope.cancel()
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker.workerproc", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--overrides", default="{}")
    args = parser.parse_args(argv)
    configure_logging()
    gctune.tune()
    overrides = json.loads(args.overrides)
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        log.error("config_error", key=exc.key, problem=exc.problem)
        return 2
    structlog.contextvars.bind_contextvars(worker=args.index)
    rlimit.log_file_limit(rlimit.raise_file_limit(), needed=needed_files(config))
    native.log_status(log)
    fds = [int(f) for f in args.fds.split(",")]
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run_worker, config, args.index, args.hub, fds, overrides)
    except (StoreError, BaseExceptionGroup) as exc:  # its store file, as an owner of topics
        store_error = find_store_error(exc)
        if store_error is None:
            raise
        log.error("store_unusable", path=store_error.path, problem=store_error.problem)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
