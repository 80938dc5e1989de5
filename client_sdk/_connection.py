"""The connection loop shared by the trio and asyncio clients: :class:`Connection`.

It is written against anyio, so the same code (and the same guarantees) runs on trio and on
asyncio; only the WebSocket differs, and a driver gives it (an :data:`Opener`): ``client.py``
with trio-websocket, ``aio.py`` with ``websockets``. What frames mean (recovery, gaps, the
backoff schedule, JSON) is decided by the sans-I/O core (``_protocol.py``, ``_recovery.py``,
``_schedule.py``); this module moves
frames and owns time. The application's API (requests, subscriptions and the routing of
pushes to them) is :class:`~client_sdk._api.Client`, built on :class:`Connection`; this module
knows nothing of it but the four hooks at the end of the class.

Theory of operation: a driver's ``connect()`` (through :func:`~client_sdk._api.run_client`)
opens a task group holding one background task, the *connection loop* (:meth:`Connection._run`).
Each turn of the loop fetches a token, opens a WebSocket, waits for the broker's ``welcome``,
re-subscribes every live subscription (``_resubscribe``), then serves the connection with three
tasks: the reader (replies to waiting requests, pushes to ``_on_push``), the token refresher
(the ``auth`` op before the token expires) and the keepalive. When the connection ends the close
code decides what happens next: 4001 and 1008 stop the client (fatal), 4003 reconnects at once
with a fresh token, everything else reconnects after an exponential backoff with full jitter (or
after the delay a 1001 close asks for, plus jitter).

A request (:meth:`Connection._exchange`) sends a frame with a fresh ``id`` and waits for the
reply with that ``id``. A request in flight when its connection drops fails with
:class:`~client_sdk.errors.ConnectionLost`: it is never re-sent, because a publication re-sent
after a lost acknowledgement could be published twice.

Everything the reader does for one frame is synchronous, so the order of frames on the wire is
the order in which subscriptions see them: a subscribe reply (and the gap it reports) is
digested before the replayed publications that follow it.

The SDK logs to the ``client_sdk`` logger (which has a NullHandler: silent unless the
application configures logging), and only what the application is not told otherwise: errors
and gaps it receives are not logged above INFO.
"""

from __future__ import annotations

import abc
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypedDict, Unpack

import anyio
import anyio.abc
import attrs

from client_sdk._protocol import (
    DEFAULT_CODEC,
    Codec,
    Dumps,
    Loads,
    ProtocolViolation,
    Reply,
    Requests,
    Skipped,
    decode,
    opt_number,
    parse_url,
    rejection,
)
from client_sdk._schedule import backoff, reconnect_delay, reconnect_hint, refresh_delay
from client_sdk.errors import (
    AuthenticationFailed,
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    PermissionRevoked,
    PubSubError,
    TokenError,
    TooLarge,
)
from client_sdk.models import ConnectionState, Message, PresenceEvent, Welcome

__all__ = [
    "ConnectOptions",
    "Connection",
    "Opener",
    "TokenSource",
    "Transport",
    "TransportClosed",
]
log = logging.getLogger("client_sdk")
# A library stays silent unless the application configures logging (Python's logging HOWTO,
# "Configuring Logging for a Library"): without this, Python's last-resort handler would print
# every warning to stderr.
log.addHandler(logging.NullHandler())

TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]] | None
"""A token: a string, or a callable (plain or async) returning one, called for every connection
and again before the current token expires."""


class ConnectOptions(TypedDict, total=False):
    """Keyword options of :func:`connect` (and of ``client_sdk.sync.connect``).

    reconnect: reconnect when a connection is lost (default True); False makes the loss final.
    retry_first_connect: keep retrying the first connection instead of raising (default False).
    connect_timeout: seconds for one connection attempt, welcome included (default 10).
    request_timeout: default timeout of every request, in seconds (default 10).
    backoff_base, backoff_max: the reconnect delay is uniform in
        [0, min(backoff_max, backoff_base * 2**attempt)] (defaults 0.25 and 10 seconds).
    ping_timeout: seconds to wait for the reply to a keepalive ping before reconnecting
        (default 10); a ping is sent when nothing arrived for the broker's ping interval.
    max_buffer: publications a subscription holds for a slow application; beyond it they are
        dropped and reported as a ``Gap`` with reason ``"overflow"`` (default 10000).
    max_message_size: the largest frame accepted from the broker, in bytes (default 128 MiB:
        history replies can be large).
    ssl_context: for ``wss://`` URLs (default: the system's trust store).
    on_state_change: called (in the client's event loop) with each new ConnectionState.
    anonymous: connect without a token, to a broker that allows anonymous clients (default
        False: connecting without a token raises ``AuthenticationFailed`` at once).
    dumps: encodes every frame sent (a dict with ``data`` inside) as JSON ``str`` or ``bytes``
        (default ``json.dumps``; e.g. ``orjson.dumps``, or ``functools.partial(json.dumps,
        default=client_sdk.json_default)`` for dataclasses and datetimes).
    loads: decodes every frame received (default ``json.loads``; e.g. ``orjson.loads``).
    """

    reconnect: bool
    retry_first_connect: bool
    connect_timeout: float
    request_timeout: float
    backoff_base: float
    backoff_max: float
    ping_timeout: float
    max_buffer: int
    max_message_size: int
    ssl_context: ssl.SSLContext | None
    on_state_change: Callable[[ConnectionState], None] | None
    anonymous: bool
    dumps: Dumps
    loads: Loads


# A connection that stayed up this long resets the backoff: it was not a crash loop.
_STABLE_AFTER = 5.0
# Closes that end the client: the token or the permissions are wrong, and retrying cannot help.
_FATAL_CLOSES = {4001: AuthenticationFailed, 1008: PermissionRevoked}
# HTTP rejections of the upgrade worth retrying (the broker is full or shutting down).
_RETRY_STATUSES = {500, 502, 503, 504}


class _Retry(Exception):
    """Internal: this connection attempt failed in a way worth retrying."""

    def __init__(self, error: PubSubError, delay: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.delay = delay


class TransportClosed(Exception):
    """The WebSocket is closed: ``code`` and ``reason`` of its close frame (1006: none)."""

    def __init__(self, code: int, reason: str | None):
        super().__init__(f"closed: {code} {reason or ''}")
        self.code = code
        self.reason = reason


class Transport(Protocol):
    """One open WebSocket, as a driver gives it to :class:`Connection`."""

    async def send(self, text: str) -> None:
        """Send one text frame; raises TransportClosed (once closed, it may do so at once,
        without yielding: see :meth:`Connection._exchange`)."""

    async def receive(self) -> str | bytes:
        """The next message; raises TransportClosed once the connection is closed."""

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close (and wait briefly for the peer's answer); raises nothing."""


Opener = Callable[["Connection", list[tuple[str, str]]], AbstractAsyncContextManager[Transport]]
"""How a driver opens one connection for a client (given the handshake's extra headers): an
async context manager yielding the :class:`Transport` and closing it on exit. It raises
``_Retry`` for failures worth retrying and a PubSubError (see :meth:`Connection._rejected`) for
fatal ones."""


class Connection(abc.ABC):
    """The connection loop of a client: one connection to the broker at a time, reopened when
    it is lost. :class:`~client_sdk._api.Client` builds the application's API on it.

    All methods must be called from the event loop (trio run or asyncio loop) that entered
    ``connect()``. ``opener`` is the driver's way of opening a WebSocket (see :data:`Opener`).
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        opener: Opener,
        **options: Unpack[ConnectOptions],
    ):
        self._url = url
        self._endpoint = parse_url(url)  # a ValueError for a bad URL belongs to connect()
        if (token is None or token == "") and not options.get("anonymous", False):
            # Said now rather than after a round trip ending in the broker's 4001.
            raise AuthenticationFailed(
                "no token: pass token=... (a JWT string, or a callable returning one), or "
                "anonymous=True if the broker allows anonymous clients (allow_anonymous)"
            )
        self._token = token
        self._opener = opener
        self._codec = Codec(
            dumps=options.get("dumps", DEFAULT_CODEC.dumps),
            loads=options.get("loads", DEFAULT_CODEC.loads),
        )
        self._reconnect = options.get("reconnect", True)
        self._retry_first = options.get("retry_first_connect", False)
        self._connect_timeout = options.get("connect_timeout", 10.0)
        self._request_timeout = options.get("request_timeout", 10.0)
        self._backoff_base = options.get("backoff_base", 0.25)
        self._backoff_max = options.get("backoff_max", 10.0)
        self._ping_timeout = options.get("ping_timeout", 10.0)
        self._max_buffer = options.get("max_buffer", 10_000)
        self._max_message_size = options.get("max_message_size", 2**27)
        self._ssl_context = options.get("ssl_context")
        self._on_state_change = options.get("on_state_change")

        self._state = ConnectionState.CONNECTING
        self._state_event = anyio.Event()
        self._state_watchers: list[Callable[[ConnectionState], None]] = []
        self._closed = False
        self._fatal: PubSubError | None = None
        self._ws: Transport | None = None
        self._conn_nursery: anyio.abc.TaskGroup | None = None
        self._tasks: anyio.abc.TaskGroup | None = None  # run_client's, for callback tasks
        self._gen = 0  # connection generation: which connection a subscription is active on
        self._welcome: Welcome | None = None
        self._close_info: tuple[int, str | None] | None = None
        self._last_rx = 0.0
        self._requests = Requests()
        self._stats_reconnects = 0

    async def aclose(self) -> None:
        """Close the client: the connection (1000), its subscriptions and waiting calls
        (``ClientClosed``). Idempotent; raises nothing."""
        if self._closed:
            return
        self._closed = True
        self._stop(ClientClosed("the client is closed"))
        ws = self._ws
        if ws is not None:
            # Shielded: a close under cancellation should still say goodbye to the broker.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await ws.close(1000, "client closed")
        if self._conn_nursery is not None:
            self._conn_nursery.cancel_scope.cancel()

    # ----------------------------------------------------------------- state

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state or self._state is ConnectionState.CLOSED:
            return
        log.debug("state %s -> %s", self._state.value, state.value)
        self._state = state
        event, self._state_event = self._state_event, anyio.Event()
        event.set()
        for watcher in list(self._state_watchers):
            watcher(state)
        if self._on_state_change is not None:
            try:
                self._on_state_change(state)
            except Exception:
                log.exception("on_state_change callback failed")

    def _stop(self, error: PubSubError) -> None:
        """End everything: state CLOSED, pending requests and subscriptions see ``error``."""
        self._requests.fail_all(error)
        self._end_subscriptions(error)
        self._set_state(ConnectionState.CLOSED)

    def _fail(self, error: PubSubError) -> None:
        # INFO, not ERROR: the application receives the error from every call it makes.
        log.info("pubsub client stopped: %s", error)
        if self._fatal is None and not self._closed:
            self._fatal = error
        self._stop(error)

    async def _wait_connected(self) -> Transport:
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._state is ConnectionState.CONNECTED and self._ws is not None:
                return self._ws
            await self._state_event.wait()

    # ----------------------------------------------------------------- requests

    async def _exchange(
        self, ws: Transport, frame: dict[str, Any], hook: Callable[[Reply], None] | None
    ) -> Reply:
        """Send ``frame`` with a new id on ``ws`` and wait for its reply (no timeout here).

        Raises ConnectionLost when the connection ends first.
        """
        done = anyio.Event()
        pending = self._requests.open(frame, self._codec, done.set, hook)
        try:
            try:
                await ws.send(pending.text)
            except TransportClosed:
                # A closed transport refuses at once, without yielding. Were the connection
                # still offered, a caller retrying after ConnectionLost (a publish loop) would
                # get it back at once and spin, never letting the reader see the close: the
                # next requests wait for the next connection instead.
                if self._ws is ws:
                    self._ws = None
                raise ConnectionLost(f"connection lost before {frame['op']} was sent") from None
            await done.wait()
        finally:
            self._requests.close(pending)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    # ------------------------------------------- for the API above (client_sdk._api.Client)

    @abc.abstractmethod
    def _on_push(self, push: Message | Skipped | PresenceEvent) -> None:
        """Route a push of the current connection to the subscriptions it concerns; called by
        the reader, in frame order, so it must not block."""

    @abc.abstractmethod
    async def _resubscribe(self, ws: Transport, gen: int) -> None:
        """Re-establish every subscription on the new connection ``gen`` and return once each
        is answered (the loop bounds it with ``request_timeout``)."""

    @abc.abstractmethod
    def _subscribe_late(self, nursery: anyio.abc.TaskGroup, ws: Transport, gen: int) -> None:
        """Subscribe, in ``nursery``, those registered while the others were re-established."""

    @abc.abstractmethod
    def _end_subscriptions(self, error: PubSubError) -> None:
        """The client stopped with ``error``: end every subscription."""

    # ----------------------------------------------------------------- connection loop

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, self._backoff_base, self._backoff_max)

    async def _run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        attempt = 0
        started = False

        def on_connected() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            while not self._closed:
                delay = 0.0
                began = anyio.current_time()
                try:
                    code, reason = await self._session(on_connected)
                except _Retry as retry:
                    if not started and not self._retry_first:
                        raise retry.error from retry.error.__cause__
                    log.info("connection attempt failed: %s", retry.error)
                    delay = retry.delay if retry.delay is not None else self._backoff(attempt)
                    attempt += 1
                else:
                    if self._closed:
                        break
                    if code in _FATAL_CLOSES:
                        raise _FATAL_CLOSES[code](
                            f"closed by the broker: {code} {reason or ''}".strip(),
                            code=code,
                            reason=reason,
                        )
                    if not self._reconnect:
                        raise ConnectionLost(f"connection closed: {code}", code=code, reason=reason)
                    if anyio.current_time() - began >= _STABLE_AFTER:
                        attempt = 0
                    delay = reconnect_delay(
                        code, reason, attempt, self._backoff_base, self._backoff_max
                    )
                    attempt += 1
                    log.info(
                        "connection closed (%s %s); reconnecting in %.2fs", code, reason, delay
                    )
                if not self._closed:
                    if started:
                        self._set_state(ConnectionState.RECONNECTING)
                    await anyio.sleep(delay)
        except PubSubError as error:
            if not started:
                self._fail(error)
                raise
            self._fail(error)
        except Exception as exc:  # a bug here must not leave the application hanging
            log.exception("pubsub client failed")
            closed = ClientClosed(f"internal error: {exc!r}")
            closed.__cause__ = exc
            self._fail(closed)
            if not started:
                raise closed from exc

    async def _fetch_token(self) -> str | None:
        source = self._token
        if source is None or isinstance(source, str):
            return source
        try:
            value = source()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise TokenError(f"the token callable failed: {exc!r}") from exc
        if not isinstance(value, str):
            raise TokenError(f"the token callable returned {type(value).__name__}, not str")
        return value

    async def _session(self, on_connected: Callable[[], None]) -> tuple[int, str | None]:
        """One connection, from opening to its end; returns its close code and reason.

        Raises _Retry for failures worth retrying, a fatal PubSubError otherwise.
        """
        try:
            token = await self._fetch_token()
        except TokenError as exc:
            raise _Retry(exc) from exc
        headers = [("Authorization", f"Bearer {token}")] if token else []
        async with self._opener(self, headers) as ws:
            return await self._serve(ws, on_connected)

    def _cannot_connect(self, why: object) -> _Retry:
        """For drivers: a connection attempt failed in a way worth retrying."""
        return _Retry(ConnectFailed(f"cannot connect to {self._url}: {why}"))

    def _rejected(self, status: int, body: bytes | None) -> PubSubError:
        """For drivers: the broker answered the upgrade with HTTP ``status``. Returns the fatal
        error to raise; raises _Retry when the status is worth retrying."""
        code, message = rejection(body)
        text = f"broker rejected the connection: HTTP {status} {code or ''} {message}"
        if status == 401:
            return AuthenticationFailed(text.strip())
        failed = ConnectFailed(text.strip(), status=status, error_code=code)
        if status in _RETRY_STATUSES:
            raise _Retry(failed)
        return failed

    async def _await_welcome(self, ws: Transport) -> Welcome:
        with anyio.move_on_after(self._connect_timeout):
            try:
                while True:
                    try:
                        frame = decode(await ws.receive(), self._codec)
                    except ProtocolViolation as exc:
                        log.warning("ignoring a malformed frame: %s", exc)
                        continue
                    if isinstance(frame, Welcome):
                        return frame
                    if isinstance(frame, Reply) and frame.error_code == "unauthorized":
                        raise AuthenticationFailed(f"unauthorized: {frame.error_message}")
            except TransportClosed as exc:
                code, reason = exc.code, exc.reason
                if code in _FATAL_CLOSES:
                    raise _FATAL_CLOSES[code](
                        f"closed by the broker before welcome: {code} {reason or ''}".strip(),
                        code=code,
                        reason=reason,
                    ) from None
                hint = reconnect_hint(reason) if code == 1001 else None
                delay = None if hint is None else hint + self._backoff(0)
                error = ConnectFailed(f"closed before welcome: {code} {reason or ''}".strip())
                raise _Retry(error, delay) from None
        raise _Retry(ConnectFailed(f"no welcome within {self._connect_timeout}s"))

    async def _serve(
        self, ws: Transport, on_connected: Callable[[], None]
    ) -> tuple[int, str | None]:
        welcome = await self._await_welcome(ws)
        if self._closed:
            return (1000, "client closed")
        self._gen += 1
        gen = self._gen
        self._ws = ws
        self._welcome = welcome
        self._close_info = None
        self._last_rx = anyio.current_time()
        log.info("connected to %s as %s (node %s)", self._url, welcome.client, welcome.node)
        try:
            async with anyio.create_task_group() as nursery:
                self._conn_nursery = nursery
                nursery.start_soon(self._reader, ws, nursery.cancel_scope)
                # Every subscription is re-established before the state says CONNECTED, so an
                # application that waits for it knows its stream is whole again.
                with anyio.move_on_after(self._request_timeout) as resubscribing:
                    await self._resubscribe(ws, gen)
                if resubscribing.cancelled_caught:
                    self._close_info = (1006, "no reply to resubscribe")
                    nursery.cancel_scope.cancel()
                elif not nursery.cancel_scope.cancel_called:
                    self._subscribe_late(nursery, ws, gen)
                    if gen > 1:
                        self._stats_reconnects += 1
                    self._set_state(ConnectionState.CONNECTED)
                    on_connected()
                    nursery.start_soon(self._refresher, ws)
                    nursery.start_soon(self._keepalive, ws, nursery.cancel_scope)
        finally:
            self._ws = None
            self._conn_nursery = None
            code = self._close_info[0] if self._close_info else 1006
            too_large = TooLarge("the request exceeded the broker's max_message_size")
            self._requests.fail_all(
                ConnectionLost("connection lost; outcome unknown"),
                too_large=too_large if code == 1009 else None,
            )
        return self._close_info or (1006, None)

    async def _reader(self, ws: Transport, scope: anyio.CancelScope) -> None:
        try:
            while True:
                text = await ws.receive()
                self._last_rx = anyio.current_time()
                try:
                    frame = decode(text, self._codec)
                except ProtocolViolation as exc:
                    log.warning("ignoring a malformed frame: %s", exc)
                    continue
                try:
                    self._dispatch(frame)
                except Exception:  # a bug in one frame's handling must not kill the connection
                    log.exception("failed to handle %r", frame)
        except TransportClosed as exc:
            if self._close_info is None:
                self._close_info = (exc.code, exc.reason)
        finally:
            scope.cancel()

    def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, Reply):
            pending = self._requests.match(frame)
            if pending is None:
                if not frame.ok:
                    log.warning("error from broker: %s %s", frame.error_code, frame.error_message)
                return
            if pending.hook is not None:
                try:
                    pending.hook(frame)
                except Exception:
                    log.exception("reply hook failed")
            pending.finish(reply=frame)
        elif isinstance(frame, Welcome):
            self._welcome = frame
        elif isinstance(frame, Message | Skipped | PresenceEvent):
            self._on_push(frame)
        # Unknown pushes are ignored: a newer broker may send more than this SDK knows.

    async def _refresher(self, ws: Transport) -> None:
        """Refresh the token before it expires, with the ``auth`` op on this connection."""
        if not callable(self._token):
            return  # a fixed string cannot be renewed; expiry closes with 4003 and we reconnect
        while True:
            expires_at = self._welcome.expires_at if self._welcome else None
            if expires_at is None:
                return
            await anyio.sleep(refresh_delay(expires_at - time.time()))
            try:
                token = await self._fetch_token()
                with anyio.fail_after(self._request_timeout):
                    reply = await self._exchange(ws, {"op": "auth", "token": token}, None)
            except (TokenError, TimeoutError) as exc:
                log.warning("token refresh failed, will retry: %r", exc)
                continue
            if not reply.ok:
                log.warning("token refresh refused: %s %s", reply.error_code, reply.error_message)
                continue
            try:
                new_expiry = opt_number(reply.fields, "expires_at")
            except ProtocolViolation:
                new_expiry = None
            if self._welcome is not None:
                self._welcome = attrs.evolve(self._welcome, expires_at=new_expiry)
            log.debug("token refreshed; expires at %s", new_expiry)

    async def _keepalive(self, ws: Transport, scope: anyio.CancelScope) -> None:
        """Detect a dead broker (or network) that TCP would take minutes to notice."""
        interval = (self._welcome.ping_interval if self._welcome else None) or 20.0
        while True:
            await anyio.sleep(max(0.0, self._last_rx + interval - anyio.current_time()))
            if anyio.current_time() - self._last_rx < interval:
                continue
            with anyio.move_on_after(self._ping_timeout):
                try:
                    await self._exchange(ws, {"op": "ping"}, None)
                except ConnectionLost:
                    return
                continue
            log.warning("no reply to ping within %ss; reconnecting", self._ping_timeout)
            self._close_info = (1006, "ping timeout")
            scope.cancel()
            return
