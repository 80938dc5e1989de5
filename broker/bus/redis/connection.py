"""The Redis bus's connection: the coredis client, up or down, and reconnection after outages.

Theory of operation
-------------------
Every command runs under a short timeout (:meth:`Connection.ops`), so a publish fails fast
with :class:`~broker.errors.BusUnavailable` while Redis is unreachable, and at once while the
connection is known to be down. :meth:`Connection.maintain` keeps one connected period (a
*session*, run by :mod:`broker.bus.redis.subscriber`) going: when it breaks, the bus reports
itself down (``is_up``, ``on_state``, one log line) and reconnects with exponential backoff
and jitter; the session reports it up again (:meth:`Connection.announce_up`) once it has
subscribed to everything. coredis runs on trio through anyio and raises its errors inside
``ExceptionGroup``\\s; they are caught with ``except*`` and turned into ``BusUnavailable``.
coredis itself never retries: a retried publish could publish twice.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import structlog
import trio

from broker.bus.redis.scripts import SCRIPTS
from broker.errors import BusUnavailable

__all__ = ["Connection", "Reconnect", "leaf", "redis_failures"]

log = structlog.get_logger("broker.bus.redis")

_REDIS_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    # coredis's connections are anyio streams: a connection that died mid-operation raises
    # these (for instance when a subscriber cleans up after its connection was lost).
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def redis_failures() -> tuple[type[BaseException], ...]:
    """What a failing Redis or a lost connection raises."""
    from coredis.exceptions import RedisError

    return (RedisError, *_REDIS_FAILURES)


def leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups: what to log."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class Reconnect(Exception):
    """End the session and connect again; the message says why (it is logged)."""


class Connection:
    """The client of ``url`` (see :class:`~broker.bus.redis.RedisBus` for the parameters),
    and whether it is up; ``on_state(up)`` hears every change (and the first state)."""

    def __init__(
        self,
        url: str,
        *,
        node: str,
        cluster: bool,
        timeout: float,
        reconnect_max: float,
        on_state: Callable[[bool], None],
    ) -> None:
        self.url = url
        self.node = node
        self.cluster = cluster
        self.timeout = timeout
        self._reconnect_max = reconnect_max
        self._on_state = on_state
        self.client: Any = None  # the coredis client while connected
        self._cluster_nodes: list[Any] = []  # addresses of the cluster nodes seen
        self._scripts: dict[str, Any] = {}
        self.up = False
        self._state_known = False
        self.ever_down = False
        self._on_connected: Callable[[], None] = lambda: None

    # ---------------------------------------------------------------- state

    def set_up(self, up: bool, reason: str = "") -> None:
        if up == self.up and self._state_known:
            return
        # The first state is reported too: a node that cannot reach Redis at startup (down,
        # wrong password) says so once.
        self._state_known = True
        self.up = up
        if up:
            log.info("bus_up", bus="redis", url=self._safe_url(), node=self.node)
        else:
            log.warning("bus_down", bus="redis", url=self._safe_url(), node=self.node, error=reason)
        try:
            self._on_state(up)
        except Exception:  # handlers must not raise; a bug there must not kill the bus
            log.exception("bus_handler_failed", handler="on_state")

    def announce_up(self) -> None:
        """The session has subscribed to everything: report the bus up."""
        self.set_up(True)
        self._on_connected()

    def _safe_url(self) -> str:
        # Never log a password.
        head, sep, tail = self.url.rpartition("@")
        if not sep:
            return self.url
        scheme, _, _ = head.partition("://")
        return f"{scheme}://***@{tail}"

    # ---------------------------------------------------------------- commands

    @contextlib.contextmanager
    def ops(self, what: str) -> Iterator[Any]:
        """Run one Redis operation: fail at once while disconnected, bound it in time, and turn
        whatever coredis raises (in an ExceptionGroup or not) into BusUnavailable."""
        client = self.client
        if client is None or not self.up:
            raise BusUnavailable(f"redis is unavailable ({what})")
        failure: BaseException | None = None
        try:
            with trio.fail_after(self.timeout):
                yield client
        except* redis_failures() as group:
            # Several failures at once (a timeout and a lost connection) still make one
            # BusUnavailable; anything else propagates unchanged.
            failure = leaf(group)
        except* RuntimeError as group:
            # coredis's "connection pool has exited": the connection was lost meanwhile.
            if self.client is client:
                raise
            failure = leaf(group)
        if failure is not None:
            if isinstance(failure, trio.TooSlowError):
                raise BusUnavailable(f"redis did not answer {what} within {self.timeout}s")
            raise BusUnavailable(f"redis {what} failed: {failure!r}") from failure

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run the script :data:`~broker.bus.redis.scripts.SCRIPTS` names ``name``; raises
        :class:`~broker.errors.BusUnavailable` as :meth:`ops` does."""
        with self.ops(name) as client:
            return await self._scripts[name](keys=keys, args=args, client=client)

    # ---------------------------------------------------------------- connecting

    def _make_client(self) -> Any:
        import coredis
        from coredis.retry import NoRetryPolicy

        # No retries inside coredis: a retried publish could publish twice, and the bus has
        # its own reconnection loop.
        options: dict[str, Any] = {
            "decode_responses": False,
            "connect_timeout": self.timeout,
            # Bounds every reply, including the subscriber's keepalive PING, so that a
            # connection that went silent (not closed) is noticed too.
            "stream_timeout": self.timeout,
            "retry_policy": NoRetryPolicy(),
            # A password with reserved characters is percent-encoded in the URL.
            "decode_components": True,
        }
        if self.cluster:
            if self._cluster_nodes:
                # Every node seen so far, so that reconnecting works while the node named in
                # the URL is the one that is down.
                options["startup_nodes"] = self._cluster_nodes
            with warnings.catch_warnings():
                # coredis 6.9 builds its startup node from the URL with a deprecated type.
                warnings.simplefilter("ignore", DeprecationWarning)
                return coredis.RedisCluster.from_url(self.url, **options)
        return coredis.Redis.from_url(self.url, client_name=f"pubsub:{self.node}", **options)

    async def maintain(
        self,
        session: Callable[[Any], Awaitable[None]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect and run ``session(client)`` for as long as it lasts, again and again; never
        returns. ``task_status.started()`` is called after the first connection attempt,
        successful (:meth:`announce_up`) or not."""
        from coredis.commands.script import Script

        self._scripts = {name: Script(script=src) for name, src in SCRIPTS.items()}
        started = False

        def connected() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        self._on_connected = connected
        failures = 0
        while True:
            reason = ""
            was_up = False
            try:
                async with self._make_client() as client:
                    try:
                        await self._session(client, session)
                    finally:
                        # Before the client's pool exits: a command started from now on
                        # fails at once with BusUnavailable, and one in flight that meets
                        # the exited pool ("not initialized or has exited") is told apart
                        # from a bug by ops() (the client is no longer the current one).
                        self.client = None
            except* redis_failures() as group:
                reason = repr(leaf(group))
            except* Reconnect as group:
                reason = str(leaf(group))
            except* Exception as group:
                # A bug must not leave the worker without a bus: log it and reconnect.
                reason = repr(leaf(group))
                log.error("bus_session_failed", bus="redis", exc_info=group)
            finally:
                was_up = self.up
                self.client = None
            self.set_up(False, reason)
            self.ever_down = True
            connected()
            # Exponential backoff with jitter, capped; the first retry after a working
            # session comes quickly (a restarted Redis is usually back within a second).
            failures = 0 if was_up else failures + 1
            delay = min(self._reconnect_max, 0.05 * 2 ** min(failures, 16))
            await trio.sleep(random.uniform(delay / 2, delay))

    async def _session(self, client: Any, session: Callable[[Any], Awaitable[None]]) -> None:
        """One connected period: check the connection, note the cluster's nodes (for the
        next reconnection), then run ``session``."""
        self.client = client
        # Check the connection before announcing anything.
        with trio.fail_after(self.timeout):
            await client.ping()
        if self.cluster:
            from coredis.connection import TCPLocation

            seen = {(n.host, n.port) for n in client.connection_pool.cluster_layout.nodes}
            known = {(n.host, n.port) for n in self._cluster_nodes}
            self._cluster_nodes += [TCPLocation(h, p) for h, p in sorted(seen - known)]
        await session(client)
