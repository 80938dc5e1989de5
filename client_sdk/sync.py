"""A blocking client for code that does not run on trio (scripts, threads, WSGI apps).

    with client_sdk.sync.connect("ws://127.0.0.1:8765/ws", token=token) as client:
        offset = client.publish("chat.room1", {"text": "hi"})
        with client.subscribe("chat.room1") as sub:
            for event in sub:
                ...

Theory of operation: :func:`connect` starts one background thread that runs ``trio.run`` with the
asynchronous :class:`~client_sdk.client.Client` inside, so the blocking client has exactly the
same behaviour (reconnects, recovery, gaps, typed errors). Each blocking call hands a coroutine
to that thread with ``trio.from_thread.run`` and waits for its outcome, so any number of threads
may share one client. :meth:`SyncClient.close` ends the trio run and joins the thread; a client
that was never closed is closed at interpreter exit, so no thread is left behind.

Subscriptions made with callbacks (``subscribe(topic, on_message=...)``) are served in that
thread too, so a single-threaded program can publish while it receives.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from types import TracebackType
from typing import Any, TypeVar, Unpack

import trio

from client_sdk._callbacks import Callback
from client_sdk.client import Client, ConnectOptions, Subscription, TokenSource
from client_sdk.client import connect as _aconnect
from client_sdk.errors import ClientClosed, SubscriptionClosed
from client_sdk.models import (
    ConnectionState,
    Event,
    Gap,
    History,
    Message,
    Position,
    PresenceEvent,
    Welcome,
)

__all__ = ["SyncClient", "SyncSubscription", "connect"]

T = TypeVar("T")

log = logging.getLogger("client_sdk")

_OPEN: weakref.WeakSet[SyncClient] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Close what the application forgot, so the broker sees a clean 1000 close rather than a
    # dropped TCP connection when the interpreter kills the daemon thread.
    for client in list(_OPEN):
        client.close(timeout=2.0)


def connect(url: str, token: TokenSource = None, **options: Unpack[ConnectOptions]) -> SyncClient:
    """Connect to the broker at ``url`` and return a :class:`SyncClient` once authenticated.

    Takes the options of :func:`client_sdk.connect`; a token callable and ``on_state_change``
    are called in the client's background thread. Use it as a context manager, or call
    :meth:`SyncClient.close`.

    Raises ``AuthenticationFailed``, ``ConnectFailed`` or ``TokenError`` when the first
    connection fails (unless ``retry_first_connect=True``).
    """
    return SyncClient(url, token, **options)


class SyncClient:
    """The blocking face of :class:`~client_sdk.client.Client`; made by :func:`connect`.

    Every method may be called from any thread except the client's own (callbacks).
    """

    def __init__(self, url: str, token: TokenSource = None, **options: Unpack[ConnectOptions]):
        self._url = url
        self._token = token
        self._options = options
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._client: Client | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._inflight = 0
        self._idle: trio.Event | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._thread_main, name="pubsub-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        _OPEN.add(self)

    # ------------------------------------------------------------ the trio thread

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.is_set():
                self._startup_error = exc  # raised by the constructor, in the caller's thread
            else:
                log.exception("the pubsub client's thread failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with _aconnect(self._url, self._token, **self._options) as client:
            self._client = client
            self._trio_token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
        # The client is closed now, which ended every subscription; let calls already woken
        # by that return their outcome before the run ends (else they would see Cancelled).
        if self._inflight:
            self._idle = trio.Event()
            with trio.move_on_after(2.0):
                await self._idle.wait()

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._closed or self._trio_token is None:
            raise ClientClosed("the client is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking SyncClient calls cannot be made from its own thread")

        async def run() -> T:
            self._inflight += 1
            try:
                return await fn()
            finally:
                self._inflight -= 1
                if not self._inflight and self._idle is not None:
                    self._idle.set()

        try:
            return trio.from_thread.run(run, trio_token=self._trio_token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise ClientClosed("the client is closed") from None

    # ------------------------------------------------------------ public API

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState` (``CLOSED`` once closed)."""
        if self._client is None or self._closed:
            return ConnectionState.CLOSED
        return self._client.state

    @property
    def welcome(self) -> Welcome | None:
        """What the broker said about the current connection (see ``Client.welcome``)."""
        return self._client.welcome if self._client is not None else None

    @property
    def client_id(self) -> str | None:
        """This client's identity (the token's ``sub``)."""
        return self._client.client_id if self._client is not None else None

    @property
    def reconnects(self) -> int:
        """How many times the client has reconnected."""
        return self._client.reconnects if self._client is not None else 0

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until connected; raises ``RequestTimeout``, ``ClientClosed`` or the fatal error."""
        client = self._require()
        self._call(lambda: client.wait_connected(timeout))

    def publish(self, topic: str, data: Any, *, timeout: float | None = None) -> int:
        """Publish ``data`` on ``topic`` and return its offset; see ``Client.publish`` for the
        exceptions (``ServerError`` subclasses, ``RequestTimeout``, ``ConnectionLost``, ...)."""
        client = self._require()
        return self._call(lambda: client.publish(topic, data, timeout=timeout))

    def history(
        self,
        topic: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        last: int | None = None,
        timeout: float | None = None,
    ) -> History:
        """Fetch the publications still held for ``topic``: the oldest ``limit`` or the newest
        ``last``; see ``Client.history``."""
        client = self._require()
        return self._call(
            lambda: client.history(topic, since=since, limit=limit, last=last, timeout=timeout)
        )

    def presence(self, topic: str, *, timeout: float | None = None) -> tuple[str, ...]:
        """The client ids subscribed to ``topic``; see ``Client.presence``."""
        client = self._require()
        return self._call(lambda: client.presence(topic, timeout=timeout))

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
    ) -> SyncSubscription:
        """Subscribe now and return a :class:`SyncSubscription` (iterable, context manager).

        With callbacks (see ``Client.subscribe``) the events go to them instead of to
        iteration, from the client's background thread, until the subscription or the client
        is closed: the calling thread stays free to publish. Keep callbacks short (they hold
        up the connection); they must not call this client's blocking methods (that raises
        RuntimeError), but may hand work to other threads.

        Raises what ``Client.subscribe`` raises on entering (``Forbidden``, ``BadTopic``,
        ``BadRequest``, ``RequestTimeout``, ``ClientClosed``, ...).
        """
        client = self._require()

        async def open_() -> Subscription:
            sub = client.subscribe(
                topic,
                since=since,
                presence=presence,
                strict=strict,
                timeout=timeout,
                on_message=on_message,
                on_gap=on_gap,
                on_presence=on_presence,
                on_error=on_error,
            )
            await sub.__aenter__()
            return sub

        return SyncSubscription(self, self._call(open_))

    def close(self, timeout: float | None = 10.0) -> None:
        """Close the client and join its thread (at most ``timeout`` seconds). Idempotent;
        every call waits for the thread, whichever thread closed the client first.

        Subscriptions end (their iterators stop), waiting calls raise ``ClientClosed``.
        """
        first = not self._closed
        self._closed = True
        _OPEN.discard(self)
        stop, token = self._stop, self._trio_token
        if first and stop is not None and token is not None:
            try:
                trio.from_thread.run_sync(stop.set, trio_token=token)
            except trio.RunFinishedError:
                pass
            except RuntimeError:
                stop.set()  # called from the client's own thread (a callback)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _require(self) -> Client:
        if self._client is None or self._closed:
            raise ClientClosed("the client is closed")
        return self._client

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncSubscription:
    """A blocking subscription: ``for event in sub`` yields what ``Subscription`` yields.

    Iteration stops when the subscription or the client is closed, and raises what the
    asynchronous iteration raises (``GapError`` when strict, the client's fatal error, ...).
    """

    def __init__(self, client: SyncClient, sub: Subscription):
        self._client = client
        self._sub = sub

    @property
    def topic(self) -> str:
        """The subscribed topic or pattern."""
        return self._sub.topic

    @property
    def position(self) -> Position | None:
        """The last position delivered (exact topics); persist it to resume with ``since``."""
        return self._sub.position

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._client._call(self._sub.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None
        except ClientClosed:
            raise StopIteration from None

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds.

        Raises ``RequestTimeout`` if none came in time, ``SubscriptionClosed`` once the
        subscription or its client is closed, and what iteration raises.
        """
        try:
            return self._client._call(lambda: self._sub.get(timeout))
        except SubscriptionClosed:
            raise
        except ClientClosed as exc:
            raise SubscriptionClosed(f"the subscription to {self.topic} is closed") from exc

    def close(self) -> None:
        """Unsubscribe and end iteration. Idempotent; raises nothing."""
        with suppress(ClientClosed):
            self._client._call(self._sub.aclose)

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
