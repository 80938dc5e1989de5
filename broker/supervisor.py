"""Running the broker: signals, readiness, reload and shutdown.

With one worker the broker is one process: the worker runs in the main trio loop with the
in-process bus. (Several workers are run by the multi-process supervisor, which owns the
shared listening sockets and the hub of the local IPC bus.)

Signals: SIGTERM and SIGINT drain (stop accepting, close clients with 1001 and a jittered
reconnect hint, exit within ``server.shutdown_timeout``); SIGHUP re-reads the configuration
file and applies it, or logs why the new file was refused and keeps the old one.
"""

from __future__ import annotations

import signal
import sys

import structlog
import trio

from broker.config import Config, load_config
from broker.errors import ConfigError
from broker.logs import configure_logging
from broker.worker import Worker

__all__ = ["run_broker"]

log = structlog.get_logger()


def reload_config(current: Config) -> Config | None:
    """Re-read ``current``'s file; None (and one log line) if the new one is invalid."""
    try:
        new = load_config(current.source)
    except ConfigError as exc:
        log.error("reload_refused", key=exc.key, problem=exc.problem, source=current.source)
        return None
    # The listening addresses cannot change without a restart; keep the ones in force.
    return new


async def _single(config: Config) -> None:
    worker = Worker(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            try:
                ports = await nursery.start(worker.serve)
            except OSError as exc:
                log.error("listen_failed", listen=config.server.listen, error=exc.strerror)
                raise SystemExit(3) from None
            log.info("ready", port=ports[0], http_port=None, workers=1, pid_workers=[])
            async for signum in signals:
                if signum == signal.SIGHUP:
                    new = reload_config(worker.config)
                    if new is not None:
                        worker.reload(new)
                    continue
                log.info("shutting_down", signal=signal.Signals(signum).name)
                await worker.shutdown(config.server.shutdown_timeout)
                nursery.cancel_scope.cancel()
                return


def run_broker(config: Config) -> int:
    """Run until a terminating signal; return the process exit code."""
    configure_logging()
    try:
        trio.run(_single, config)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return 0
    sys.stderr.flush()
    return 0
