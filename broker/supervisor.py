"""Running the broker: sockets, processes, signals, readiness, reload and shutdown.

Theory of operation
-------------------
With one worker the broker is one process: the worker runs in the main trio loop with the
in-process bus, beside the operations listener.

With several, this process is the *supervisor*. It owns the listening sockets (one
``SO_REUSEPORT`` socket per worker on the same port, so the kernel spreads connections and a
restarted worker finds its queue of pending connections intact; or the one socket systemd
passed), runs the hub of the local IPC bus and the operations listener, and starts each worker
as ``python -m broker.workerproc`` with its socket passed as a file descriptor. With ``[server]
topic_owner = "workers"`` the workers own the topics (:mod:`broker.bus.sharded`): the hub then
carries the control plane only, the operations listener reaches the owners through a bus of
its own, and before anything starts the store files are moved into the layout of this start
(:func:`broker.shards.reshard`). It restarts a
worker that exits, and kills and restarts one whose heartbeat stops (its loop is blocked).
It tells systemd READY=1 once every worker listens, WATCHDOG=1 while they all beat,
RELOADING=1 around SIGHUP and STOPPING=1 at SIGTERM.

Signals: SIGTERM and SIGINT drain (stop accepting, close clients with 1001 and a jittered
reconnect hint, exit within ``server.shutdown_timeout``); SIGHUP re-reads the configuration
file and applies it in every worker, or logs why the new file was refused and keeps the old
one in force.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from broker import gctune, native, rlimit, systemd
from broker.brokermetrics import history_snapshot, hub_presence_snapshot, snapshot_from_stats
from broker.bus.base import Bus, BusHandlers, HistoryResult, Publication, StreamPosition
from broker.bus.sharded import PEER_WAIT, ShardedBus
from broker.config import Config, load_config, node_name, parse_hostport
from broker.errors import ConfigError, ListenError
from broker.hub import Hub
from broker.logs import configure_logging
from broker.metrics import merge, render
from broker.protocol import check_data_size
from broker.shards import reshard, shard_sockets
from broker.store import StoreError
from broker.topics import validate_pattern, validate_topic
from broker.worker import Worker, make_listen_socket, make_redis_bus

__all__ = ["Listeners", "bind_listeners", "find_store_error", "log_listen_error", "run_broker"]

log = structlog.get_logger()

RESTART_BACKOFF_MAX = 5.0
TERMINATING = (signal.SIGTERM, signal.SIGINT)


def reload_config(current: Config, overrides: dict[str, Any]) -> Config | None:
    """Re-read ``current``'s file; None (and one log line) if the new one is invalid."""
    try:
        return load_config(current.source, overrides=overrides)
    except ConfigError as exc:
        log.error("reload_refused", key=exc.key, problem=exc.problem, source=current.source)
        return None


async def _serve_http(
    nursery: trio.Nursery, config: Config, backend: Any, sock: socket.socket | None
) -> tuple[int | None, Any]:
    """Start the operations listener on ``sock`` (None: not configured); its port and the
    server object (whose API keys a reload replaces)."""
    if sock is None:
        return None, None
    from broker.http import HttpServer, http_limits, serve_http

    host, port = parse_hostport(config.server.http_listen, "server.http_listen")
    server = HttpServer(backend, config.api_keys, limits=http_limits(config))
    http_port: int = await nursery.start(
        functools.partial(serve_http, host, port, backend, (), server=server, sock=sock)
    )
    return http_port, server


# --- listening sockets ------------------------------------------------------------------


@attrs.define
class Listeners:
    """Every socket the broker listens on, bound before anything else starts (so a busy port
    is one log line and exit 3, before a banner or a worker): per worker its WebSocket
    sockets, and the operations listener's socket (None when ``server.http_listen`` is
    empty)."""

    ws: list[list[socket.socket]]
    http: socket.socket | None


def bind_listeners(config: Config) -> Listeners:
    """Bind ``server.listen`` (one socket per worker, or the one systemd passed) and
    ``server.http_listen``. Raises :class:`ListenError` naming the key whose address could
    not be bound; nothing stays bound then."""
    ws = _listen_sockets(config, config.worker_count)
    http: socket.socket | None = None
    if config.server.http_listen:
        host, port = parse_hostport(config.server.http_listen, "server.http_listen")
        try:
            http = make_listen_socket(host, port)
        except OSError as exc:
            for socks in ws:
                for s in socks:
                    s.close()
            raise ListenError(
                "server.http_listen", config.server.http_listen, _strerror(exc)
            ) from None
    return Listeners(ws, http)


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def log_listen_error(exc: ListenError) -> None:
    """The one log line a busy (or forbidden) listening address gets."""
    flag = "--listen" if exc.key == "server.listen" else "--http-listen"
    log.error(
        "listen_failed",
        key=exc.key,
        address=exc.address,
        problem=exc.problem,
        hint=f"change {exc.key} (or {flag}) to an address this process may listen on",
    )


# --- one process ------------------------------------------------------------------------


async def _single(config: Config, overrides: dict[str, Any], listeners: Listeners) -> None:
    from broker.http import WorkerBackend

    worker = Worker(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*TERMINATING, signal.SIGHUP) as signals:
            ports = await nursery.start(worker.serve, listeners.ws[0])
            http_port, http = await _serve_http(
                nursery,
                config,
                WorkerBackend(
                    [worker],
                    ws_port=ports[0],
                    extra_metrics=lambda: [history_snapshot(worker.bus.history_stats())],
                ),
                listeners.http,
            )
            log.info("ready", port=ports[0], http_port=http_port, workers=1)
            gctune.freeze_startup_objects()
            systemd.ready(status=f"serving on port {ports[0]}")
            nursery.start_soon(systemd.watchdog_loop, lambda: True)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    systemd.reloading()
                    new = reload_config(worker.config, overrides)
                    if new is not None:
                        worker.reload(new)
                        if http is not None:
                            http.set_api_keys(new.api_keys)
                    systemd.ready()
                    continue
                log.info("shutting_down", signal=signal.Signals(signum).name)
                systemd.stopping()
                await worker.shutdown(worker.config.server.shutdown_timeout)
                nursery.cancel_scope.cancel()
                return


# --- several processes ------------------------------------------------------------------


def _listen_sockets(config: Config, count: int) -> list[list[socket.socket]]:
    """Per worker, its listening sockets: the systemd-passed one shared by all, or one
    SO_REUSEPORT socket each on the configured address (port 0: one free port for all).
    Raises :class:`ListenError` (nothing stays bound)."""
    passed = systemd.listen_fds_with_names()
    if passed:
        chosen = [s for name, s in passed if name == "ws"] or [passed[0][1]]
        for s in chosen:
            s.setblocking(False)
        return [chosen] * count
    host, port = parse_hostport(config.server.listen, "server.listen")
    socks: list[list[socket.socket]] = []
    try:
        if count > 1 and port != 0:
            # SO_REUSEPORT would let these sockets join another broker's group on the same
            # port, silently splitting its clients between two brokers. A socket without it
            # cannot bind where anyone listens: bind one first, as the check.
            make_listen_socket(host, port).close()
        for _ in range(count):
            s = make_listen_socket(host, port, reuse_port=count > 1)
            port = s.getsockname()[1]
            socks.append([s])
    except OSError as exc:
        for bound in socks:
            bound[0].close()
        raise ListenError("server.listen", config.server.listen, _strerror(exc)) from None
    return socks


class Supervisor:
    def __init__(self, config: Config, overrides: dict[str, Any], listeners: Listeners) -> None:
        self.config = config
        self.listeners = listeners
        self.overrides = overrides
        self.count = config.worker_count
        # With Redis, Redis holds history, and with topics owned by the workers, they do: the
        # hub then keeps none on disk.
        keeps = not config.bus.url and not config.owner_count
        self.hub = Hub(config.history_rule, config.limits, config.store if keeps else None)
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        self._tmp = None if runtime else tempfile.TemporaryDirectory(prefix="pubsub-broker-")
        base = Path(runtime.split(":")[0]) if runtime else Path(self._tmp.name)  # type: ignore[union-attr]
        self.hub_path = base / f"hub-{os.getpid()}.sock"
        self.procs: dict[int, trio.Process] = {}
        self.stopping = False
        self.port = 0
        self.http: Any = None
        # One name for the whole broker: the workers are handed the supervisor's.
        self.node = node_name(config)
        # With Redis, or with topics owned by the workers, the operations listener publishes
        # and reads through a bus of its own; the hub then only carries the workers' control
        # traffic.
        self.ops_bus: Bus | None = None
        ignore = BusHandlers(lambda p: None, lambda e: None)
        if config.bus.url:
            self.ops_bus = make_redis_bus(config, ignore)
        elif config.owner_count:
            self.ops_bus = ShardedBus(
                ignore,
                paths=shard_sockets(self.hub_path, config.owner_count),
                index=None,
                node=self.node,
                wait_for_peers=False,
            )

    def alive(self) -> bool:
        """Every worker connected, ready and beating recently (for the systemd watchdog)."""
        now = trio.current_time()
        links = self.hub.workers
        return len(links) == self.count and all(
            w.ready and now - w.last_seen < self.config.server.worker_hang_timeout
            for w in links.values()
        )

    async def run(self) -> None:
        socks = self.listeners.ws
        self.port = socks[0][0].getsockname()[1]
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(*TERMINATING, signal.SIGHUP) as signals:
                await nursery.start(self.hub.serve, self.hub_path)
                if self.ops_bus is not None:
                    await nursery.start(self.ops_bus.run)
                for index in range(self.count):
                    nursery.start_soon(self._keep_running, index, socks[index])
                with trio.move_on_after(30) as waited:
                    while (
                        not all(w.ready for w in self.hub.workers.values())
                        or len(self.hub.workers) < self.count
                    ):
                        await self.hub.worker_ready.wait()
                if waited.cancelled_caught:
                    log.error("workers_not_ready", ready=len(self.hub.workers), expected=self.count)
                    raise SystemExit(3)
                if isinstance(self.ops_bus, ShardedBus):  # the HTTP API reaches every owner
                    with trio.move_on_after(PEER_WAIT):
                        await self.ops_bus.wait_connected()
                http_port, self.http = await _serve_http(
                    nursery, self.config, SupervisorBackend(self), self.listeners.http
                )
                log.info(
                    "ready",
                    port=self.port,
                    http_port=http_port,
                    workers=self.count,
                    worker_pids=[p.pid for p in self.procs.values()],
                )
                systemd.ready(status=f"{self.count} workers serving on port {self.port}")
                nursery.start_soon(systemd.watchdog_loop, self.alive)
                nursery.start_soon(self._hang_detector)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self._reload()
                        continue
                    log.info("shutting_down", signal=signal.Signals(signum).name)
                    systemd.stopping()
                    await self._shutdown()
                    nursery.cancel_scope.cancel()
                    return

    def _reload(self) -> None:
        systemd.reloading()
        new = reload_config(self.config, self.overrides)
        if new is not None:
            self.config = new
            self.hub.store.rule_for = new.history_rule
            if self.http is not None:
                self.http.set_api_keys(new.api_keys)
            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGHUP)
            log.info("reloaded", source=new.source, workers=len(self.procs))
        systemd.ready()

    async def _shutdown(self) -> None:
        self.stopping = True
        grace = self.config.server.shutdown_timeout
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace + 1):
            for proc in list(self.procs.values()):
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
        log.info("stopped")

    async def _keep_running(self, index: int, socks: list[socket.socket]) -> None:
        backoff = 0.1
        while not self.stopping:
            fds = [s.fileno() for s in socks]
            cmd = [
                sys.executable,
                "-m",
                "broker.workerproc",
                "--config",
                self.config.source,
                "--index",
                str(index),
                "--hub",
                str(self.hub_path),
                "--fds",
                ",".join(map(str, fds)),
                "--overrides",
                json.dumps({**self.overrides, "server.node_id": self.node}),
            ]
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
            self.procs[index] = proc
            log.info("worker_started", worker=index, pid=proc.pid)
            code = await proc.wait()
            if self.stopping:
                return
            log.error("worker_exited", worker=index, pid=proc.pid, code=code)
            # Its connections are gone: forget them now, not when the link's EOF is read.
            wl = self.hub.workers.get(index)
            if wl is not None and wl.pid == proc.pid and wl.link is not None:
                wl.link.close()
                self.hub.forget(wl)
            backoff = (
                0.1 if trio.current_time() - started > 10 else min(backoff * 2, RESTART_BACKOFF_MAX)
            )
            await trio.sleep(backoff)

    async def _hang_detector(self) -> None:
        while True:
            await trio.sleep(1)
            now = trio.current_time()
            for index, wl in list(self.hub.workers.items()):
                if wl.ready and now - wl.last_seen > self.config.server.worker_hang_timeout:
                    proc = self.procs.get(index)
                    if proc is not None and proc.returncode is None and proc.pid == wl.pid:
                        log.error(
                            "worker_hung",
                            worker=index,
                            pid=proc.pid,
                            silent_for=round(now - wl.last_seen, 1),
                        )
                        proc.kill()


class SupervisorBackend:
    """The operations listener's view of a multi-process broker: the hub answers publish,
    history and presence itself; statistics and disconnects are asked of every worker."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def ready(self) -> tuple[bool, dict[str, object]]:
        workers = {
            str(i): (i in self.sup.hub.workers and self.sup.hub.workers[i].ready)
            for i in range(self.sup.count)
        }
        bus = self.sup.ops_bus.is_up if self.sup.ops_bus is not None else True
        ok = all(workers.values()) and bus and not self.sup.stopping
        return ok, {"workers": workers, "bus": bus}

    async def _worker_stats(self) -> list[dict[str, Any]]:
        return sorted(await self.sup.hub.ask_all("stats"), key=lambda s: s.get("worker", 0))

    async def metrics_text(self) -> str:
        stats = await self._worker_stats()
        snaps = [snapshot_from_stats(s) for s in stats]
        snaps.append(hub_presence_snapshot(self.sup.hub.store.presence_members))
        if self.sup.config.owner_count:  # each worker holds its topics' history: added up
            snaps += [history_snapshot(s.get("history", {})) for s in stats]
        elif self.sup.ops_bus is None:  # the hub holds the history
            snaps.append(history_snapshot(self.sup.hub.history_stats()))
        return render(merge(snaps))

    async def stats(self) -> dict[str, Any]:
        return {"workers": await self._worker_stats()}

    async def publish(self, topic: str, data_json: str) -> Publication:
        validate_topic(topic)
        check_data_size(data_json, self.sup.config.limits.max_data_size)
        if self.sup.ops_bus is not None:
            return await self.sup.ops_bus.publish(topic, data_json, None)
        pub = self.sup.hub.publish(topic, data_json, None)
        if self.sup.hub.journal is not None:
            await self.sup.hub.journal.acknowledged()
        return pub

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int, *, newest: bool = False
    ) -> HistoryResult:
        if self.sup.ops_bus is not None:
            return await self.sup.ops_bus.history(topic, since, limit, newest=newest)
        return self.sup.hub.store.history(topic, since, limit, newest=newest)

    async def presence(self, topic: str) -> list[str]:
        self.sup.config.presence.check(topic)
        if self.sup.ops_bus is not None:
            return await self.sup.ops_bus.presence(topic)
        return self.sup.hub.store.members(topic)

    async def disconnect(self, client_id: str) -> int:
        return sum(await self.sup.hub.ask_all("disconnect", client_id))

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        (validate_pattern if wildcard else validate_topic)(topic)

    def info(self) -> dict[str, object]:
        return {
            "ws_port": self.sup.port,
            "ws_scheme": "wss" if self.sup.config.server.tls_cert else "ws",
            "node": self.sup.node,
            "workers": self.sup.count,
        }


def needed_files(config: Config) -> int:
    """The client connections one worker's limits may hold (authenticated and pending)."""
    return config.limits.max_connections + config.limits.max_pending_connections


def run_broker(
    config: Config, overrides: dict[str, Any] | None = None, listeners: Listeners | None = None
) -> int:
    """Run until a terminating signal; return the process exit code (3: could not listen).
    ``listeners`` are the sockets :func:`bind_listeners` bound (default: bind them here)."""
    configure_logging()
    if listeners is None:
        try:
            listeners = bind_listeners(config)
        except ListenError as exc:
            log_listen_error(exc)  # the only line: nothing else has started
            return 3
    one_process = config.worker_count == 1
    rlimit.log_file_limit(
        rlimit.raise_file_limit(), needed=needed_files(config) if one_process else None
    )
    gctune.tune()
    native.log_status(log)
    overrides = overrides or {}
    try:
        reshard(config)  # before anything reads the store files
        if one_process:
            trio.run(_single, config, overrides, listeners)
        else:
            trio.run(Supervisor(config, overrides, listeners).run)
    except (SystemExit, KeyboardInterrupt, StoreError, BaseExceptionGroup) as exc:
        store_error = find_store_error(exc)
        if store_error is None:
            return _exit_code(exc)
        log.error(
            "store_unusable",
            path=store_error.path,
            problem=store_error.problem,
            hint="fix the file's permissions, stop the other broker using it, "
            "or set [store] path to another file",
        )
        return 2
    return 0


def _exit_code(exc: BaseException) -> int:
    """The exit code a SystemExit or KeyboardInterrupt asks for, also when a nursery wrapped
    it in an exception group; a group holding anything else is raised as it is."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split((SystemExit, KeyboardInterrupt))
        if matched is None or rest is not None:
            raise exc
        return _exit_code(matched.exceptions[0])
    if isinstance(exc, SystemExit):
        return int(exc.code or 0)
    return 0


def find_store_error(exc: BaseException) -> StoreError | None:
    """The :class:`StoreError` that ended the broker, unwrapped from trio's groups."""
    if isinstance(exc, BaseExceptionGroup):
        found = (find_store_error(e) for e in exc.exceptions)
        return next((e for e in found if e is not None), None)
    return exc if isinstance(exc, StoreError) else None
