"""The client's connection logic, one for trio and asyncio: :class:`Client`.

:class:`Client` is written against anyio, so the same code (and the same guarantees) runs on
trio and on asyncio; only the WebSocket differs, and a driver gives it (an :data:`Opener`):
``client.py`` with trio-websocket, ``aio.py`` with ``websockets``. What frames mean (recovery,
gaps, topic matching, the backoff schedule, JSON) is decided by the sans-I/O core in
``_protocol.py``; this module moves frames and owns time. Subscriptions are in
``_subscription.py``, their callbacks in ``_callbacks.py``.

Theory of operation: a driver's ``connect()`` (through :func:`run_client`) opens a task group
holding one background task, the
*connection loop*. Each turn of the loop opens a WebSocket, waits for the broker's ``welcome``,
re-subscribes every live :class:`Subscription` (exact topics with ``since`` = the last position
delivered), then serves the connection with three tasks: the reader (replies to waiting requests,
publications to subscriptions), the token refresher and the keepalive. When the connection ends
the close code decides what happens next: 4001 and 1008 stop the client (fatal), 4003 reconnects
at once with a fresh token, everything else reconnects after an exponential backoff with full
jitter (or after the delay a 1001 close asks for, plus jitter).

Requests (publish, history, ...) wait for a connection, send a frame with a fresh ``id`` and wait
for the reply with that ``id``; all of it within one timeout. A request in flight when its
connection drops fails with :class:`~client_sdk.errors.ConnectionLost`: it is never re-sent,
because a publication re-sent after a lost acknowledgement could be published twice.

Everything the reader does for one frame is synchronous, so the order of frames on the wire is
the order in which subscriptions see them: a subscribe reply (and the gap it reports) is
digested before the replayed publications that follow it. A subscription made with callbacks
(``on_message=...``) is served by its own task in the client's task group, which calls them in
that same order; a slow callback delays only its own subscription (up to ``max_buffer``).

The SDK logs to the ``client_sdk`` logger (which has a NullHandler: silent unless the
application configures logging), and only what the application is not told otherwise: errors
and gaps it receives are not logged above INFO.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, NoReturn, Protocol, TypedDict, Unpack

import anyio
import anyio.abc
import attrs

from client_sdk._callbacks import Callback, Callbacks
from client_sdk._protocol import (
    DEFAULT_CODEC,
    Codec,
    Dumps,
    Loads,
    ProtocolViolation,
    Reply,
    Requests,
    Skipped,
    Tracker,
    backoff,
    decode,
    encode,
    history_frame,
    is_pattern,
    opt_number,
    parse_message,
    parse_missed,
    parse_url,
    reconnect_hint,
    since_field,
    topic_matches,
)
from client_sdk._subscription import Subscription
from client_sdk.errors import (
    AuthenticationFailed,
    BadRequest,
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    PermissionRevoked,
    PubSubError,
    RateLimited,
    RequestTimeout,
    TokenError,
    TooLarge,
    Unavailable,
    error_from_reply,
)
from client_sdk.models import (
    ConnectionState,
    Gap,
    History,
    Message,
    Position,
    PresenceEvent,
    Welcome,
)

__all__ = [
    "Client",
    "ConnectOptions",
    "Opener",
    "TokenSource",
    "Transport",
    "TransportClosed",
    "run_client",
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
# Refusals of a re-subscription that mean "not now" (the broker's read budget for `since`
# replays is spent, or its bus is down): asked again after a backoff, on the same connection,
# instead of ending a subscription the application holds.
_RETRY_LATER = (RateLimited, Unavailable)


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
    """One open WebSocket, as a driver gives it to :class:`Client`."""

    async def send(self, text: str) -> None:
        """Send one text frame; raises TransportClosed."""

    async def receive(self) -> str | bytes:
        """The next message; raises TransportClosed once the connection is closed."""

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close (and wait briefly for the peer's answer); raises nothing."""


Opener = Callable[["Client", list[tuple[str, str]]], AbstractAsyncContextManager[Transport]]
"""How a driver opens one connection for a client (given the handshake's extra headers): an
async context manager yielding the :class:`Transport` and closing it on exit. It raises
``_Retry`` for failures worth retrying and a PubSubError (see :meth:`Client._rejected`) for
fatal ones."""


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the only exception of a nursery's group without the group around it, so the
    application's own exceptions come out of ``async with connect(...)`` as they went in."""
    if len(group.exceptions) == 1:
        exc = group.exceptions[0]
        if isinstance(exc, BaseExceptionGroup):
            _raise_single(exc)
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context
    raise group


@asynccontextmanager
async def run_client(client: Client) -> AsyncGenerator[Client, None]:
    """Run ``client`` in a task group of the current event loop (trio or asyncio) while the
    context is entered; see :func:`connect`."""
    try:
        async with anyio.create_task_group() as tasks:
            client._tasks = tasks
            await tasks.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


class Client:
    """A connection to the broker that survives reconnects. Made by :func:`connect`.

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
        self._subs: dict[str, Subscription] = {}
        self._leaving: dict[str, Subscription] = {}  # given up, their subscribe still in flight
        self._stats_reconnects = 0

    # ----------------------------------------------------------------- public API

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    @property
    def welcome(self) -> Welcome | None:
        """What the broker said about the current (or last) connection; ``expires_at`` follows
        token refreshes."""
        return self._welcome

    @property
    def client_id(self) -> str | None:
        """This client's identity (the token's ``sub``), once connected."""
        return self._welcome.client if self._welcome else None

    @property
    def reconnects(self) -> int:
        """How many times this client has reconnected (successfully) since it was created."""
        return self._stats_reconnects

    async def states(self) -> AsyncIterator[ConnectionState]:
        """Yield the current state, then every change, until (and including) ``CLOSED``.

        Intermediate states are kept (up to 100 unread), so an application can show each
        reconnect. Raises nothing; cancel or ``break`` to stop watching.
        """
        queue: deque[ConnectionState] = deque([self._state], maxlen=100)
        wakeup = anyio.Event()

        def watcher(state: ConnectionState) -> None:
            queue.append(state)
            wakeup.set()

        self._state_watchers.append(watcher)
        try:
            while True:
                while queue:
                    state = queue.popleft()
                    yield state
                    if state is ConnectionState.CLOSED:
                        return
                wakeup = anyio.Event()
                await wakeup.wait()
        finally:
            self._state_watchers.remove(watcher)

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the client is connected (every subscription re-established).

        Raises ``RequestTimeout`` after ``timeout`` seconds, ``ClientClosed`` or the fatal error
        if the client is closed.
        """
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            await self._wait_connected()
            return
        raise RequestTimeout(f"not connected within {timeout}s")

    # Per-call timeouts (ASYNC109) are part of this API on purpose: callers that are not trio
    # experts (and the blocking client) need them, as in nats-py and paho-mqtt.
    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Publish ``data`` (any JSON value) on exact ``topic``; return its offset.

        Waits for a connection and for the broker's acknowledgement, all within ``timeout``
        (default: the client's ``request_timeout``). Never re-sent by the SDK.

        Raises ``TypeError``/``ValueError`` if ``data`` is not JSON-serializable; a
        ``ServerError`` subclass (``Forbidden``, ``BadTopic``, ``TooLarge``, ``RateLimited``,
        ``Unavailable``, ...) if the broker refuses; ``RequestTimeout`` or ``ConnectionLost``
        when the outcome is unknown; ``ClientClosed`` or the fatal error once closed.
        """
        fields = await self._request({"op": "publish", "topic": topic, "data": data}, timeout)
        return _field_int(fields, "offset")

    async def history(
        self,
        topic: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        last: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> History:
        """Fetch the publications the broker still holds for exact ``topic``, oldest first.

        ``since``: only those after this position (``epoch=None``: the current epoch); ``limit``:
        at most this many, counted from the oldest (the broker allows 1..1000, default 100), so
        pages are read forward with ``since`` = the last message's position. ``last``: instead
        of ``limit``, the newest this many (1..1000); with ``since``, ``recovered`` and
        ``missed`` then concern only those newest ones.

        Raises ValueError when both ``limit`` and ``last`` are given;
        ``Forbidden``/``BadTopic``/``BadRequest`` (a ``ServerError``), ``RequestTimeout``,
        ``ConnectionLost``, ``ClientClosed``.
        """
        history_frame(topic, None, limit, last)  # refuse limit with last before any request
        with self._deadline(timeout):
            since = await self._resolve_since(topic, since)
            frame = history_frame(topic, since, limit, last)
            fields = await self._request(frame, math.inf)  # bounded by the deadline above
            raw = fields.get("messages")
            try:
                if not isinstance(raw, list):
                    raise ProtocolViolation("'messages' is not a list")
                messages = tuple(parse_message(m) for m in raw if isinstance(m, dict))
                recovered = fields.get("recovered")
                return History(
                    topic=topic,
                    messages=messages,
                    offset=_field_int(fields, "offset"),
                    epoch=str(fields.get("epoch")),
                    recovered=recovered if isinstance(recovered, bool) else None,
                    missed=parse_missed(fields),
                )
            except ProtocolViolation as exc:
                raise error_from_reply("internal", f"malformed history reply: {exc}") from None
        raise RequestTimeout(f"no history for {topic} within the timeout")

    async def presence(
        self,
        topic: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[str, ...]:
        """Return the client ids subscribed to exact ``topic`` (sorted), across the cluster.

        Raises ``Forbidden``/``BadTopic`` (a ``ServerError``), ``RequestTimeout``,
        ``ConnectionLost``, ``ClientClosed``.
        """
        fields = await self._request({"op": "presence", "topic": topic}, timeout)
        clients = fields.get("clients")
        if not isinstance(clients, list):
            raise error_from_reply("internal", "malformed presence reply")
        return tuple(str(c) for c in clients)

    def subscribe(
        self,
        topic: str,
        *,
        since: Position | None = None,
        presence: bool = False,
        strict: bool = False,
        timeout: float | None = None,
        on_message: Callback[Message] | None = None,
        on_gap: Callback[Gap] | None = None,
        on_presence: Callback[PresenceEvent] | None = None,
        on_error: Callback[Exception] | None = None,
    ) -> Subscription:
        """Subscribe to ``topic`` (an exact topic or a pattern with ``*``/``>``).

        Use as ``async with client.subscribe(topic) as sub: async for event in sub: ...``
        (not ``await``: that raises TypeError). The subscription yields :class:`Message` items
        in offset order, :class:`PresenceEvent` items when ``presence=True`` (exact topics
        only), and a :class:`Gap` wherever publications were lost; with ``strict=True`` a gap
        raises ``GapError`` instead. ``since``: resume after a position persisted earlier
        (exact topics only).

        With callbacks (``on_message``, ``on_gap``, ``on_presence``: plain or async functions
        taking the event; ``on_error``: the error that ended the subscription, or an exception a
        callback raised) the events go to them, in order, while the ``async with`` block is
        open, instead of to iteration (see ``_callbacks.py``).

        Entering raises ``Forbidden``/``BadTopic``/``BadRequest``/``TooManySubscriptions``,
        ``RequestTimeout`` (no confirmation within ``timeout``), ``ClientClosed``; subscribing
        twice to the same topic or pattern on one client raises ``BadRequest``.
        """
        callbacks = Callbacks(on_message, on_gap, on_presence, on_error)
        return Subscription(self, topic, since, presence, strict, timeout, callbacks)

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
        for sub in list(self._subs.values()):
            sub._finish(None if isinstance(error, ClientClosed) and not self._fatal else error)
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

    def _deadline(self, timeout: float | None) -> anyio.CancelScope:
        return anyio.move_on_after(self._request_timeout if timeout is None else timeout)

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
                raise ConnectionLost(f"connection lost before {frame['op']} was sent") from None
            await done.wait()
        finally:
            self._requests.close(pending)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    async def _request(
        self,
        frame: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        encode(frame, self._codec)  # a TypeError for data that is not JSON belongs to the caller
        with self._deadline(timeout):
            ws = await self._wait_connected()
            reply = await self._exchange(ws, frame, None)
            if not reply.ok:
                raise error_from_reply(reply.error_code or "internal", reply.error_message or "")
            return reply.fields
        raise RequestTimeout(f"no reply to {frame['op']} within the timeout")

    async def _resolve_since(self, topic: str, since: Position | None) -> Position | None:
        """A ``since`` without an epoch means "the topic's current epoch": ask for it (the
        caller's deadline bounds the request)."""
        if since is None or since.epoch is not None:
            return since
        fields = await self._request({"op": "history", "topic": topic, "limit": 1}, math.inf)
        return Position(since.offset, str(fields.get("epoch")))

    # ----------------------------------------------------------------- subscriptions

    async def _open(self, sub: Subscription) -> None:
        """Register ``sub`` and wait until the broker confirmed it (see ``subscribe``)."""
        if sub.topic in self._subs:
            raise BadRequest(f"already subscribed to {sub.topic!r} on this client")
        if sub._since is not None and is_pattern(sub.topic):
            raise BadRequest(f"'since' needs an exact topic, not the pattern {sub.topic!r}")
        with self._deadline(sub._timeout):
            leaving = self._leaving.get(sub.topic)
            if leaving is not None:
                await leaving._idle.wait()
            sub._tracker = Tracker(sub.topic, await self._resolve_since(sub.topic, sub._since))
            if sub.topic in self._subs:
                raise BadRequest(f"already subscribed to {sub.topic!r} on this client")
            self._subs[sub.topic] = sub
            try:
                await self._wait_connected()
                if sub._sent_gen != self._gen and self._conn_nursery is not None:
                    assert self._ws is not None
                    self._start_subscribe(self._conn_nursery, self._ws, sub, self._gen)
                await sub._settled.wait()
            finally:
                if not sub._confirmed:
                    # Closed, so that a confirmation still on its way is undone (see
                    # _subscribe_once) rather than leaving the broker holding it.
                    self._forget(sub)
                    sub._finish(None)
            if sub._error is not None:
                raise sub._error
            if not sub._confirmed:
                await self._wait_connected()  # raises the fatal error, or ClientClosed
                raise ClientClosed("the client is closed")
            return
        raise RequestTimeout(f"subscription to {sub.topic} not confirmed within the timeout")

    def _forget(self, sub: Subscription) -> None:
        if self._subs.get(sub.topic) is sub:
            del self._subs[sub.topic]
        if sub._inflight:
            # A subscribe of it is still on the wire: a new subscription to the same topic
            # waits until that one is answered (and undone), see _open.
            self._leaving[sub.topic] = sub

    async def _subscribe_task(self, ws: Transport, sub: Subscription, gen: int) -> None:
        """(Re)subscribe ``sub`` on connection ``gen``, keeping count of those on the wire."""
        try:
            if not sub._closed:  # else given up (timed out) before this task ran
                await self._subscribe_once(ws, sub, gen)
        except ConnectionLost:
            pass  # the next connection subscribes again (unless closed by then)
        finally:
            sub._inflight -= 1
            if not sub._inflight:
                sub._idle.set()
                if self._leaving.get(sub.topic) is sub:
                    del self._leaving[sub.topic]

    async def _subscribe_once(self, ws: Transport, sub: Subscription, gen: int) -> None:
        """The reply is digested by the hook, in the reader, before any publication that
        follows it. Raises ConnectionLost."""
        assert sub._tracker is not None
        tracker = sub._tracker
        sent = tracker.since()
        frame: dict[str, Any] = {"op": "subscribe", "topic": sub.topic}
        if sent is not None:
            frame["since"] = since_field(sent)
        if sub.presence:
            frame["presence"] = True

        def hook(reply: Reply) -> None:
            if sub._closed:
                return  # undone below
            if not reply.ok:
                error = error_from_reply(reply.error_code or "internal", reply.error_message or "")
                if sub._confirmed and isinstance(error, _RETRY_LATER):
                    log.info("resubscribing to %s refused (%s); retrying", sub.topic, error)
                    self._resubscribe_later(ws, sub, gen)
                    return
                self._forget(sub)
                sub._finish(error)
                return
            sub._retries = 0
            try:
                events = tracker.subscribed(reply.fields, sent)
            except ProtocolViolation as exc:
                log.warning("malformed subscribe reply for %s: %s", sub.topic, exc)
                events = []
            sub._active_gen = gen
            sub._confirmed = True
            for event in events:
                log.debug("gap on %s: %s", sub.topic, event)  # the application receives it
                sub._push(event)
            sub._settled.set()

        reply = await self._exchange(ws, frame, hook)
        if sub._closed and reply.ok and sub._active_gen != gen:
            # Given up or closed while this subscribe was in flight: the broker holds it
            # anyway, and would refuse the next subscribe to the topic until it is undone.
            undo = {"op": "unsubscribe", "topic": sub.topic}
            with anyio.move_on_after(self._request_timeout):
                await self._exchange(ws, undo, None)

    def _resubscribe_later(self, ws: Transport, sub: Subscription, gen: int) -> None:
        """Subscribe ``sub`` again on connection ``gen`` after a backoff (with the same
        ``since``); if the connection ends first, the next one subscribes it anyway."""
        nursery = self._conn_nursery
        if nursery is None or gen != self._gen:
            return
        delay = self._backoff(sub._retries)
        sub._retries += 1

        async def later() -> None:
            await anyio.sleep(delay)
            if gen == self._gen and self._subs.get(sub.topic) is sub and not sub._closed:
                self._start_subscribe(nursery, ws, sub, gen)

        nursery.start_soon(later)

    def _start_subscribe(
        self, nursery: anyio.abc.TaskGroup, ws: Transport, sub: Subscription, gen: int
    ) -> None:
        if not sub._inflight:
            sub._idle = anyio.Event()
        sub._inflight += 1
        # Marked now, not when the task runs: whoever looks next (the connection's sweep for
        # late subscriptions, or _open) must not send a second subscribe, which the broker
        # would refuse as a duplicate.
        sub._sent_gen = gen
        nursery.start_soon(self._subscribe_task, ws, sub, gen)

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._forget(sub)
        ws = self._ws
        if ws is None or sub._active_gen != self._gen or self._closed:
            return
        # Shielded and short: leaving an ``async with`` under cancellation should still tell the
        # broker, or a later subscribe to the same topic on this connection would be refused.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0), suppress(PubSubError):
            await self._exchange(ws, {"op": "unsubscribe", "topic": sub.topic}, None)

    def _route(self, msg: Message | Skipped) -> None:
        for sub in list(self._subs.values()):
            if sub._active_gen != self._gen or sub._tracker is None:
                continue
            if sub.topic == msg.topic or (
                sub._tracker.wildcard and topic_matches(sub.topic, msg.topic)
            ):
                tracker = sub._tracker
                events = tracker.message(msg) if isinstance(msg, Message) else tracker.skipped(msg)
                for event in events:
                    if isinstance(event, Gap):
                        log.debug("gap on %s: %s", sub.topic, event.describe())
                    sub._push(event)

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
                    hint = reconnect_hint(reason) if code == 1001 else None
                    if code == 4003:
                        delay = 0.0  # token expired: a fresh one is fetched for the next attempt
                    elif hint is not None:
                        delay = hint + self._backoff(attempt)
                    else:
                        delay = self._backoff(attempt)
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
        code, message = None, ""
        try:
            error = json.loads(body or b"{}").get("error", {})
            code, message = error.get("code"), error.get("message", "")
        except (ValueError, AttributeError):
            pass
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
                    async with anyio.create_task_group() as inner:
                        for sub in list(self._subs.values()):
                            self._start_subscribe(inner, ws, sub, gen)
                if resubscribing.cancelled_caught:
                    self._close_info = (1006, "no reply to resubscribe")
                    nursery.cancel_scope.cancel()
                elif not nursery.cancel_scope.cancel_called:
                    # Subscriptions registered while the others were re-established.
                    for sub in list(self._subs.values()):
                        if sub._sent_gen != gen:
                            self._start_subscribe(nursery, ws, sub, gen)
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
        if isinstance(frame, Message):
            self._route(frame)
        elif isinstance(frame, Reply):
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
        elif isinstance(frame, PresenceEvent):
            sub = self._subs.get(frame.topic)
            if sub is not None and sub.presence and sub._active_gen == self._gen:
                sub._push(frame)
        elif isinstance(frame, Welcome):
            self._welcome = frame
        elif isinstance(frame, Skipped):
            self._route(frame)
        # Unknown pushes are ignored: a newer broker may send more than this SDK knows.

    async def _refresher(self, ws: Transport) -> None:
        """Refresh the token before it expires, with the ``auth`` op on this connection."""
        if not callable(self._token):
            return  # a fixed string cannot be renewed; expiry closes with 4003 and we reconnect
        while True:
            expires_at = self._welcome.expires_at if self._welcome else None
            if expires_at is None:
                return
            remaining = expires_at - time.time()
            # Renew with 20% of the lifetime left (at least 1 s, at most 30 s ahead), never
            # more often than once a second, whatever the clocks say.
            await anyio.sleep(max(1.0, remaining - min(30.0, max(1.0, remaining * 0.2))))
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


def _field_int(fields: dict[str, Any], key: str) -> int:
    value = fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise error_from_reply("internal", f"reply without an integer {key!r}")
    return value
