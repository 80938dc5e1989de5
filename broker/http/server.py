"""The operations listener put together: :class:`HttpServer` serves the routes of
:mod:`broker.http.routes` through the connection layer of :mod:`broker.http.connection`, and
:func:`serve_http` runs one on a TCP port."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import structlog
import trio

from broker.config import Config
from broker.http.connection import HttpConnections
from broker.http.messages import HttpLimits
from broker.http.routes import OpsBackend, OpsRoutes
from broker.metrics import Registry

__all__ = ["HttpServer", "http_limits", "serve_http"]

log = structlog.get_logger("broker.http")


def http_limits(config: Config) -> HttpLimits:
    """The listener's limits, with the ones ``[server]`` configures."""
    return HttpLimits(
        max_connections=config.server.http_max_connections,
        ops_reserve=config.server.http_ops_reserve,
    )


class HttpServer:
    """The routes over ``backend`` and the connections serving them. ``registry`` (optional)
    receives the listener's own metrics, which ``/metrics`` appends to the backend's text."""

    def __init__(
        self,
        backend: OpsBackend,
        api_keys: Iterable[str],
        *,
        limits: HttpLimits | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.limits = limits or HttpLimits()
        self.registry = registry or Registry()
        self.routes = OpsRoutes(backend, api_keys, limits=self.limits, registry=self.registry)
        self.connections = HttpConnections(self.routes, limits=self.limits, registry=self.registry)

    def set_api_keys(self, api_keys: Iterable[str]) -> None:
        """Replace the accepted API keys (a configuration reload)."""
        self.routes.set_api_keys(api_keys)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection until it closes; never raises (except cancellation)."""
        await self.connections.serve(stream)


async def serve_http(
    listen_host: str,
    listen_port: int,
    backend: OpsBackend,
    api_keys: Iterable[str],
    *,
    limits: HttpLimits | None = None,
    registry: Registry | None = None,
    server: HttpServer | None = None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the operations listener on ``listen_host:listen_port`` until cancelled.

    Calls ``task_status.started(port)`` with the real port once listening (so port 0 picks a
    free one). Pass ``server`` to keep a handle on it (to change its API keys on reload);
    ``backend``, ``api_keys``, ``limits`` and ``registry`` are then ignored. ``sock``, a socket
    already bound and listening, is served instead of binding ``listen_host:listen_port`` (so
    the caller can report a busy port before starting anything).
    """
    if server is None:
        server = HttpServer(backend, api_keys, limits=limits, registry=registry)
    host: str | None = listen_host or None
    if host is not None and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if sock is not None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    else:
        listeners = await trio.open_tcp_listeners(listen_port, host=host)
    port = listeners[0].socket.getsockname()[1]
    log.info("http_listening", host=listen_host, port=port)
    task_status.started(port)
    await trio.serve_listeners(server.serve_connection, listeners)  # type: ignore[arg-type]
