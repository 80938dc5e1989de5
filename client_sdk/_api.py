"""The client's API, one for trio and asyncio: :class:`Client`.

:class:`Client` is what an application holds: requests (``publish``, ``history``,
``presence``), subscriptions, and the connection's state. It is built on the connection loop
of :class:`~client_sdk._connection.Connection` (connect, welcome, keepalive, reconnects, token
refresh, sending a request and matching its reply), which calls back into it through four
hooks: re-subscribe everything on a new connection, subscribe the late ones, route a push, end
the subscriptions. What frames mean is decided by the sans-I/O core in ``_protocol.py``;
subscriptions are in ``_subscription.py``, their callbacks in ``_callbacks.py``.

Theory of operation: requests wait for a connection, send a frame with a fresh ``id`` and wait
for the reply with that ``id``, all of it within one timeout. A request in flight when its
connection drops fails with :class:`~client_sdk.errors.ConnectionLost` and is never re-sent (a
publication re-sent after a lost acknowledgement could be published twice).

A subscription is registered in ``_subs`` by topic (one per topic or pattern on a client) and
subscribed once per connection: ``_sent_gen`` says on which connection its subscribe went out,
``_active_gen`` on which one the broker confirmed it; only pushes of that connection reach it.
The subscribe reply is digested by a hook that runs in the reader, so the gap it reports comes
before the replayed publications that follow it. A subscription given up while its subscribe
is on the wire waits in ``_leaving`` until it is answered (and undone), so that a new one to
the same topic is not refused as a duplicate. A re-subscription refused with ``rate_limited``
or ``unavailable`` is asked again after a backoff on the same connection instead of ending the
subscription. A subscription made with callbacks (``on_message=...``) is served by its own task
in the client's task group, which calls them in frame order; a slow callback delays only its
own subscription (up to ``max_buffer``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn, TypeVar, Unpack

import anyio
import anyio.abc

from client_sdk._callbacks import Callback, Callbacks
from client_sdk._connection import (
    Connection,
    ConnectOptions,
    Opener,
    TokenSource,
    Transport,
    log,
)
from client_sdk._protocol import (
    ProtocolViolation,
    Reply,
    Skipped,
    encode,
    history_frame,
    parse_history,
    parse_presence,
    reply_int,
    subscribe_frame,
)
from client_sdk._recovery import Tracker, is_pattern
from client_sdk._subscription import Subscription
from client_sdk.errors import (
    BadRequest,
    ClientClosed,
    ConnectionLost,
    PubSubError,
    RateLimited,
    RequestTimeout,
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

__all__ = ["Client", "run_client"]

# Refusals of a re-subscription that mean "not now" (the broker's read budget for `since`
# replays is spent, or its bus is down): asked again after a backoff, on the same connection,
# instead of ending a subscription the application holds.
_RETRY_LATER = (RateLimited, Unavailable)

_T = TypeVar("_T")


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


class Client(Connection):
    """A connection to the broker that survives reconnects. Made by :func:`connect`.

    All methods must be called from the event loop (trio run or asyncio loop) that entered
    ``connect()``. ``opener`` is the driver's way of opening a WebSocket (see
    :data:`~client_sdk._connection.Opener`); the options are those of
    :class:`~client_sdk._connection.ConnectOptions`.
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        opener: Opener,
        **options: Unpack[ConnectOptions],
    ):
        super().__init__(url, token, opener, **options)
        self._subs: dict[str, Subscription] = {}
        self._leaving: dict[str, Subscription] = {}  # given up, their subscribe still in flight

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
        return _parsed(reply_int, fields, "offset")

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
            return _parsed(parse_history, topic, fields)
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
        return _parsed(parse_presence, fields)

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

    # ----------------------------------------------------------------- requests

    def _deadline(self, timeout: float | None) -> anyio.CancelScope:
        return anyio.move_on_after(self._request_timeout if timeout is None else timeout)

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
        frame = subscribe_frame(sub.topic, sent, sub.presence)

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

    # ----------------------------------------------------------------- for the connection loop

    def _on_push(self, push: Message | Skipped | PresenceEvent) -> None:
        if isinstance(push, PresenceEvent):
            sub = self._subs.get(push.topic)
            if sub is not None and sub.presence and sub._active_gen == self._gen:
                sub._push(push)
            return
        for sub in list(self._subs.values()):
            tracker = sub._tracker
            if sub._active_gen != self._gen or tracker is None or not tracker.covers(push.topic):
                continue
            events = tracker.message(push) if isinstance(push, Message) else tracker.skipped(push)
            for event in events:
                if isinstance(event, Gap):
                    log.debug("gap on %s: %s", sub.topic, event.describe())
                sub._push(event)

    async def _resubscribe(self, ws: Transport, gen: int) -> None:
        async with anyio.create_task_group() as inner:
            for sub in list(self._subs.values()):
                self._start_subscribe(inner, ws, sub, gen)

    def _subscribe_late(self, nursery: anyio.abc.TaskGroup, ws: Transport, gen: int) -> None:
        for sub in list(self._subs.values()):
            if sub._sent_gen != gen:
                self._start_subscribe(nursery, ws, sub, gen)

    def _end_subscriptions(self, error: PubSubError) -> None:
        for sub in list(self._subs.values()):
            sub._finish(None if isinstance(error, ClientClosed) and not self._fatal else error)


def _parsed(parse: Callable[..., _T], *args: Any) -> _T:
    """``parse(*args)`` for a reply, a malformed one raising ``InternalError``."""
    try:
        return parse(*args)
    except ProtocolViolation as exc:
        raise error_from_reply("internal", f"malformed reply: {exc}") from None
