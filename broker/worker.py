"""A worker: one trio loop that accepts WebSocket connections and runs their sessions.

The worker owns what its connections share: the configuration in force, the token verifier,
the router, the bus, the flusher and the connection slots (:mod:`broker.slots`: a pending
budget from accept to authentication, an admitted one, and one per client id). It applies the
handshake verdict of :mod:`broker.handshake`, starts one :class:`~broker.session.Session` per
accepted connection, and contains every failure of a connection to that connection: an
exception escaping a connection handler would otherwise take the whole listener down.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import math
import random
import socket
import ssl
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import structlog
import trio
import trio.lowlevel

from broker import handshake
from broker.auth import TokenVerifier
from broker.brokermetrics import HANDSHAKE_BUCKETS
from broker.bus.base import Bus, BusHandlers
from broker.bus.local import LocalBus
from broker.config import Config, node_name, parse_hostport
from broker.logs import info_line
from broker.protocol import CloseCode
from broker.router import Router, latest_topics
from broker.sendqueue import Flusher, SendQueue
from broker.session import CLOSE_GRACE, Session
from broker.slots import CAPACITY, PER_CLIENT, Slots
from broker.timers import Deadlines
from broker.wsserver import FrameLimits, ServerWebSocket

__all__ = ["Worker", "make_listen_socket"]

log = structlog.get_logger()

CLOSE_BATCH = 16  # slow consumers closed per scheduler pass
#: accept() failures that mean "no room now" (trio's own list): retried after ACCEPT_RETRY s
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1
#: accept() failures of one connection that went away before it was taken (trio's own list
#: for its listeners): skipped
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
#: connections accepted from a plain socket per wake-up before the others run
ACCEPT_BATCH = 64
# What trio's SocketStream sets on each TCP connection (16 KiB unsent at most: the kernel
# says writable only once that little is left), set once on a plain listener instead: an
# accepted socket inherits both (Linux copies the listener's TCP options to its children).
_INHERITED_OPTIONS = tuple(
    (getattr(socket, name), value)
    for name, value in (("TCP_NODELAY", 1), ("TCP_NOTSENT_LOWAT", 2**14))
    if hasattr(socket, name)
)


def tune_listener(sock: socket.socket) -> None:
    """Set on the listening ``sock`` the TCP options trio's ``SocketStream`` sets on each
    connection, which its accepted sockets then inherit; best effort, as trio's (a socket
    that is not TCP takes none of them)."""
    for option, value in _INHERITED_OPTIONS:
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def make_listen_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def make_redis_bus(config: Config, handlers: BusHandlers) -> Bus:
    """The Redis bus of ``[bus] url``, for this node."""
    from broker.bus.redis import RedisBus

    return RedisBus.from_config(config, handlers, node=node_name(config))


def default_bus(config: Config, handlers: BusHandlers) -> Bus:
    """Redis when ``[bus] url`` is set, else the in-process bus (one worker)."""
    if config.bus.url:
        return make_redis_bus(config, handlers)
    return LocalBus(config.history_rule, handlers, config.limits, config.store)


class Worker:
    """Serves WebSocket clients on the given listening sockets.

    ``bus_factory`` builds the bus from the worker's handlers (default: the in-process bus).
    """

    def __init__(
        self,
        config: Config,
        *,
        index: int = 0,
        node: str | None = None,
        bus_factory: Callable[[Config, BusHandlers], Bus] | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.node = node or node_name(config)
        self.verifier = TokenVerifier(config.auth)  # a new one (and cache) per reload
        self.router = Router()
        self.router.latest = latest_topics(config)
        self.flusher = Flusher(lambda: self.router.publications_in)
        self.deadlines = Deadlines()
        handlers = BusHandlers(
            self.router.on_publication, self.router.on_presence, self._on_bus_state
        )
        self.bus = (bus_factory or default_bus)(config, handlers)
        self.router.bus = self.bus
        self.sessions: dict[int, Session] = {}
        self._nursery: trio.Nursery  # set by services(): where the send queues' drainers run
        self.handshaking = 0
        self.slots = Slots(config.limits)
        self._sessions_changed = trio.Event()
        self._to_close: deque[tuple[Session, str]] = deque()
        self._closer_wakeup = trio.Event()
        self._ids = itertools.count(1)
        self.closes: Counter[int] = Counter()
        self.auth_failures: Counter[str] = Counter()
        # Handshake latency, as per-bucket counts of broker.brokermetrics.HANDSHAKE_BUCKETS.
        self.handshake_counts = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.handshake_sum = 0.0
        self.connections_total = 0
        self.bytes_in_closed = 0
        self.errors: Counter[str] = Counter()
        # Shared by every connection: its refusals are this worker's pubsub_ws_violations_total.
        self.frame_limits = FrameLimits.from_config(config)
        self.presence_refused: Counter[str] = Counter()
        self.read_refusals: Counter[str] = Counter()  # over the read budget, by op
        self.replays: Counter[str] = Counter()  # subscribe-with-since replays, by outcome
        self.replay_refills = 0  # held publications dropped and read from history instead
        self.accepting = True
        self.ssl_context: ssl.SSLContext | None = None
        if config.server.tls_cert:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(config.server.tls_cert, config.server.tls_key)

    # --- statistics (read by the operations listener and the supervisor) -------------------

    def count_close(self, code: int) -> None:
        self.closes[code] += 1

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures[reason] += 1

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def count_presence_refused(self, code: str) -> None:
        self.presence_refused[code] += 1

    def count_read_refusal(self, op: str) -> None:
        self.read_refusals[op] += 1

    def count_replay(self, outcome: str) -> None:
        self.replays[outcome] += 1

    def count_replay_refill(self) -> None:
        self.replay_refills += 1

    def _on_bus_state(self, up: bool) -> None:
        log.warning("bus_state", up=up)

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "connections": len(self.sessions),
            "subscriptions": len(self.router.index),
            "topics": len(self.router.index.exact),
            "publications_in": self.router.publications_in,
            "deliveries_out": self.router.deliveries,
            "bytes_out": self.flusher.bytes_written,
            "bytes_in": self.bytes_in_closed
            + sum(s.ws.bytes_received for s in self.sessions.values()),
            "connections_total": self.connections_total,
            "closes": {str(k): v for k, v in self.closes.items()},
            "auth_failures": dict(self.auth_failures),
            "token_cache": dict(self.verifier.counts),
            "errors": dict(self.errors),
            "ws_violations": dict(self.frame_limits.refused),
            "read_refusals": dict(self.read_refusals),
            "pending": len(self.slots.pending),
            "refused": dict(self.slots.refused),
            "replays": dict(self.replays),
            "replay_refills": self.replay_refills,
            "bus_up": self.bus.is_up,
            "presence_members": self.bus.presence_members(),
            "presence_refused": dict(self.presence_refused),
            "handshake": {
                "counts": list(self.handshake_counts),
                "sum": self.handshake_sum,
                "count": sum(self.handshake_counts),
            },
            "skipped": self.flusher.skipped,
            "send_queue_bytes": sum(
                s.queue.queued + s.queue.held_bytes for s in self.sessions.values()
            ),
        }

    def disconnect(self, client: str) -> int:
        """Close every connection of ``client`` with 1008; return how many."""
        closed = 0
        for session in list(self.sessions.values()):
            if session.identity is not None and session.identity.client == client:
                session.close(CloseCode.POLICY_VIOLATION, "disconnected by the operator")
                closed += 1
        return closed

    # --- configuration ----------------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Apply a new configuration to new connections and to limits read per operation.
        Keys, secrets, origins, limits, history and delivery rules change; listening addresses do
        not."""
        self.verifier = TokenVerifier(config.auth, self.verifier.counts)
        self.config = config
        self.frame_limits = FrameLimits.from_config(config, self.frame_limits.refused)
        self.slots.limits = config.limits
        self.bus.reconfigure(config.history_rule)
        self.router.latest = latest_topics(config)
        log.info("reloaded", source=config.source)

    # --- serving --------------------------------------------------------------------------

    def listeners(self, socks: list[socket.socket]) -> list[trio.abc.Listener[Any]]:
        result: list[trio.abc.Listener[Any]] = []
        for sock in socks:
            listener: trio.abc.Listener[Any] = trio.SocketListener(
                trio.socket.from_stdlib_socket(sock)
            )
            if self.ssl_context is not None:
                listener = trio.SSLListener(listener, self.ssl_context, https_compatible=False)
            result.append(listener)
        return result

    async def serve(
        self,
        socks: list[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled. ``socks`` are listening sockets (default: one
        bound to ``server.listen``). ``task_status.started`` receives the bound ports."""
        if socks is None:
            host, port = parse_hostport(self.config.server.listen, "server.listen")
            socks = [make_listen_socket(host, port)]
        ports = [s.getsockname()[1] for s in socks]
        # Bound here, inherited by every connection's task (one shared context, not a copy each).
        structlog.contextvars.bind_contextvars(worker=self.index)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.services)
            self._accept_scope = trio.CancelScope()
            nursery.start_soon(self._accept, socks, nursery)
            log.info(
                "listening", port=ports[0], worker=self.index, tls=self.ssl_context is not None
            )
            task_status.started(ports)
            await trio.sleep_forever()

    async def services(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run what every connection of this worker shares: the bus, the flusher, the
        deadlines and the slow-consumer closer. Started by :meth:`serve` (and by tests that
        feed the worker in-memory streams)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # where the send queues' drainers run
            await nursery.start(self.bus.run)
            nursery.start_soon(self.flusher.run)
            nursery.start_soon(self.deadlines.run)
            nursery.start_soon(self._closer)
            task_status.started()

    async def _accept(self, socks: list[socket.socket], nursery: trio.Nursery) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as accepting:
                if self.ssl_context is None:
                    for sock in socks:
                        accepting.start_soon(self._accept_plain, sock, nursery)
                else:
                    for listener in self.listeners(socks):
                        accepting.start_soon(self._accept_from, listener, nursery)

    async def _accept_plain(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """:meth:`_accept_from` for a plain listening socket, without trio's listener: every
        connection waiting is taken per wake-up (up to :data:`ACCEPT_BATCH`), with the
        standard library's ``accept``. trio's listener yields after each accepted connection
        and wraps the call in its socket machinery: about 7 µs of CPU a connection more,
        measured, some 3 % of a short connection. The connection goes to :meth:`_handle` as
        the accepted socket itself, made non-blocking: trio's socket and ``SocketStream``
        around it would set ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` on each one, which an
        accepted socket inherits from its listener, where they are set here once. Failures are
        handled as trio's listener and :meth:`_accept_from` handle them. Closes ``sock`` when
        cancelled."""
        sock.setblocking(False)  # (a socket handed over by its descriptor may not be)
        tune_listener(sock)
        with sock:
            while True:
                for _ in range(ACCEPT_BATCH):
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in ACCEPT_SKIP_ERRNOS:
                            continue
                        await self._accept_failed(exc)
                        break
                    try:
                        conn.setblocking(False)
                    except BaseException:
                        conn.close()
                        raise
                    nursery.start_soon(self._handle, conn)
                else:  # a full batch: let the connections just taken run first
                    await trio.lowlevel.checkpoint()
                    continue
                await trio.lowlevel.wait_readable(sock)

    async def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors or memory: log it once and retry after :data:`ACCEPT_RETRY` s
        (the connections already held go on). Any other failure is raised."""
        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
            raise exc
        log.error("accept_failed", error=errno.errorcode.get(exc.errno or 0, "?"))
        await trio.sleep(ACCEPT_RETRY)

    async def _accept_from(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        """Accept from a TLS listener (plain sockets: :meth:`_accept_plain`). What
        ``trio.serve_listeners`` does, less its wrapper task per connection: that
        wrapper closed every stream again with ``aclose_forcefully`` after :meth:`_handle`
        had closed it (a cancel scope and a checkpoint, about 7 % of a short connection's
        CPU), and kept one more coroutine frame per idle connection."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    await self._accept_failed(exc)
                else:
                    nursery.start_soon(self._handle, stream)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close every client with 1001 and a jittered reconnect hint, and
        wait up to ``grace`` seconds for them to go."""
        self.accepting = False
        self._accept_scope.cancel()
        # Spread the reconnects over half the grace period (at least a second), so that
        # thousands of clients do not all come back in the same instant.
        spread_ms = max(1000, int(grace * 1000) // 2)
        for s in list(self.sessions.values()):
            delay = random.randint(100, spread_ms)
            s.close(CloseCode.GOING_AWAY, f"shutting down; reconnect_after_ms={delay}")
        with trio.move_on_after(grace):
            while self.sessions:
                self._sessions_changed = trio.Event()
                await self._sessions_changed.wait()
        log.info("stopped", remaining=len(self.sessions))

    async def _handle(self, stream: trio.abc.Stream | socket.socket) -> None:
        conn_id = next(self._ids)
        structlog.contextvars.bind_contextvars(conn=conn_id)
        cfg = self.config
        try:
            queue = SendQueue(
                self.flusher,
                self._nursery,
                max_bytes=cfg.limits.send_queue_max_bytes,
                write_timeout=cfg.timeouts.write_timeout,
            )
            ws = ServerWebSocket(stream, queue, self.frame_limits)
        except BaseException:  # nothing owns the stream yet: close it here
            if isinstance(stream, socket.socket):
                stream.close()
            else:
                await trio.aclose_forcefully(stream)
            raise
        try:
            await self._connection(conn_id, ws)
        except Exception:
            # Contain it: one connection's bug must not reach another connection.
            log.exception("connection_failed")
        finally:
            await ws.aclose()

    def refusal(self, reason: str) -> tuple[int, str, str]:
        """The close code, error code and message a refused admission gets (see
        :meth:`Slots.admit`)."""
        if reason == PER_CLIENT:
            limit = self.config.limits.max_connections_per_client
            return (
                CloseCode.TOO_MANY_VIOLATIONS,
                "rate_limited",
                f"too many connections for this client (at most {limit} per worker)",
            )
        return (
            CloseCode.TRY_AGAIN_LATER,
            "unavailable",
            "this worker is at its connection limit; try again later",
        )

    async def _connection(self, conn_id: int, ws: ServerWebSocket) -> None:
        cfg = self.config
        started = trio.current_time()
        self.handshaking += 1
        session: Session | None = None
        verdict: handshake.Accept | handshake.Reject | None = None
        # The connection's one cancel scope: ended by the handshake timeout or to make room
        # for newer connections (see broker.slots) while the handshake lasts (pending from
        # the accept on, however slowly the request comes), then, without its deadline, the
        # session's (Session.close cancels it). One scope rather than one for each costs a
        # short connection about 4 µs of CPU less.
        scope = trio.CancelScope(deadline=started + cfg.timeouts.handshake_timeout)
        self.slots.arrive(conn_id, scope.cancel)
        try:
            with scope:
                request = await ws.receive_request()
                if request is None:
                    return  # the client went away, or its request was invalid (answered)
                verdict = handshake.evaluate(
                    request.target,
                    request.extra_headers,
                    tuple(request.subprotocols),
                    allowed_origins=cfg.server.allowed_origins,
                    verifier=self.verifier,
                    at_capacity=not self.accepting or self.slots.full(),
                )
                del request  # its headers hold the token: keep them no longer than needed
                if isinstance(verdict, handshake.Reject):
                    await self._reject(ws, verdict)
                    return
                scope.deadline = math.inf  # the handshake is over
                ws.accept(verdict.subprotocol)
                identity = verdict.identity
                if identity is not None:
                    refused = self.slots.admit(
                        conn_id, identity.client, limited=verdict.token_source != "anonymous"
                    )
                    if refused is not None:
                        await self._refuse_upgraded(ws, refused, identity.client)
                        return
                session = self._open(conn_id, ws, verdict, started)
                try:
                    await session.run(scope)
                finally:
                    ws.queue.release_callbacks()
            if not isinstance(verdict, handshake.Accept):
                # the timeout struck (or room was made) before the verdict, or while a
                # refusal went out
                dropped = conn_id not in self.slots.pending
                log.info("pending_dropped" if dropped else "handshake_timeout")
        finally:
            if session is not None and session.identity is not None:
                self.slots.release(session.identity.client)
            else:
                self.slots.leave(conn_id)
            if session is None:
                self.handshaking -= 1
            else:
                self.sessions.pop(conn_id, None)
                # A counter must never go down: keep what closed connections received.
                self.bytes_in_closed += ws.bytes_received
                self._sessions_changed.set()

    async def _reject(self, ws: ServerWebSocket, verdict: handshake.Reject) -> None:
        """Answer the upgrade request with ``verdict``'s refusal, counted and logged."""
        if verdict.status == 401:
            self.count_auth_failure(verdict.reason)
        elif verdict.status == 503:
            self.slots.refuse(CAPACITY)
        # detail: what the client was told (e.g. which origin was refused), so the operator
        # can act on the line; it never holds the token
        log.info("rejected", status=verdict.status, reason=verdict.reason, detail=verdict.message)
        await ws.reject(verdict.status, [(b"Content-Type", b"application/json")], verdict.body())

    def _open(
        self, conn_id: int, ws: ServerWebSocket, verdict: handshake.Accept, started: float
    ) -> Session:
        """The session of an accepted (and admitted) upgrade, counted, logged and registered."""
        self.handshaking -= 1
        elapsed = trio.current_time() - started
        self.handshake_counts[bisect.bisect_left(HANDSHAKE_BUCKETS, elapsed)] += 1
        self.handshake_sum += elapsed
        self.connections_total += 1
        identity = verdict.identity
        if identity is not None:
            structlog.contextvars.bind_contextvars(client=identity.client)
        info_line("connect", token_source=verdict.token_source)  # (log.info's line, for less)
        session = Session(self, conn_id, ws, identity)
        if identity is None:
            self.slots.wait_for_auth(conn_id, session.make_room)
        # bound methods rather than closures: a few hundred bytes less per connection
        ws.queue.on_slow = session.on_slow
        ws.queue.on_broken = session.on_broken
        self.sessions[conn_id] = session
        return session

    async def _refuse_upgraded(self, ws: ServerWebSocket, reason: str, client: str) -> None:
        """Close an upgraded connection whose client has no slot (no welcome is sent)."""
        code, _, message = self.refusal(reason)
        log.info("refused", reason=reason, client=client, code=code)
        self.count_close(code)
        ws.send_close(code, message)
        with trio.move_on_after(CLOSE_GRACE):
            await ws.finish_close()

    def slow_consumer(self, session: Session, reason: str) -> None:
        """``session``'s queue went over its limit (or its writes timed out): log it and
        close the session with 4008, paced."""
        log.warning(
            "slow_consumer",
            conn=session.conn_id,
            reason=reason,
            queued_limit=self.config.limits.send_queue_max_bytes,
        )
        # The queue has already dropped its bytes, so memory is safe now; the close itself
        # is paced by the closer, so that a thousand consumers falling behind on the same
        # publication do not stall the flush of everyone else for one long scheduler tick.
        self._to_close.append((session, reason))
        self._closer_wakeup.set()

    async def _closer(self) -> None:
        while True:
            await self._closer_wakeup.wait()
            self._closer_wakeup = trio.Event()
            while self._to_close:
                for _ in range(min(CLOSE_BATCH, len(self._to_close))):
                    session, reason = self._to_close.popleft()
                    session.close(CloseCode.SLOW_CONSUMER, f"slow consumer ({reason})")
                # Let the flusher and the live sessions run before the next batch.
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
