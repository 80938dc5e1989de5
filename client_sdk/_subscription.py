"""One subscription of a :class:`~client_sdk._api.Client`: its buffer, iteration and
callbacks. The client routes events to it (``_push``) and settles it (``_finish``); the
application reads them with ``async for``, ``get()``, or the callbacks."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import attrs

from client_sdk._callbacks import Callbacks, deliver
from client_sdk._recovery import Tracker
from client_sdk.errors import GapError, PubSubError, RequestTimeout, SubscriptionClosed
from client_sdk.models import Event, Gap, Message, Position

if TYPE_CHECKING:
    from client_sdk._api import Client

__all__ = ["Subscription"]


class Subscription:
    """One subscription; made by :meth:`Client.subscribe`, used with ``async with``.

    Iterate with ``async for event in sub`` (see :data:`~client_sdk.models.Event`). Iteration
    ends when the subscription or the client is closed, and raises the fatal error if the
    client stopped on one (``AuthenticationFailed``, ``PermissionRevoked``, ...) or the error
    with which the broker refused a re-subscription (``Forbidden``, ...).
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        since: Position | None,
        presence: bool,
        strict: bool,
        timeout: float | None,
        callbacks: Callbacks | None = None,
    ):
        self._client = client
        self.topic = topic
        self.presence = presence
        self.strict = strict
        self._callbacks = callbacks if callbacks is not None and callbacks.any else None
        self._since = since
        self._timeout = timeout
        self._tracker: Tracker | None = None
        self._queue: deque[Event] = deque()
        self._wakeup = anyio.Event()
        self._settled = anyio.Event()
        self._sent_gen = -1
        self._active_gen = -1
        self._confirmed = False
        self._retries = 0  # re-subscriptions refused in a row with rate_limited or unavailable
        self._inflight = 0  # subscribe requests of this subscription on the wire
        self._idle = anyio.Event()
        self._closed = False
        self._entered = False
        self._error: PubSubError | None = None
        #: Publications dropped because the application did not keep up (see ``max_buffer``);
        #: each run of them was reported as a ``Gap`` with reason ``"overflow"``.
        self.dropped = 0

    @property
    def position(self) -> Position | None:
        """The last position delivered on this exact topic (persist it to resume later with
        ``since``); ``None`` for patterns."""
        if self._tracker is None or self._tracker.wildcard:
            return None
        return self._tracker.positions.get(self.topic)

    @property
    def pending(self) -> int:
        """How many events wait to be read."""
        return len(self._queue)

    async def __aenter__(self) -> Subscription:
        if self._entered:
            raise RuntimeError("a Subscription can be entered only once")
        self._entered = True
        await self._client._open(self)
        if self._callbacks is not None:
            assert self._client._tasks is not None
            self._client._tasks.start_soon(
                deliver, self._callbacks, self.topic, self._next_event, lambda: self._closed
            )
        return self

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            "client.subscribe(...) is not awaited: enter it with "
            "'async with client.subscribe(topic) as sub:' and iterate 'async for event in sub', "
            "or pass on_message=... and keep the 'async with' block open while it should run"
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe (telling the broker, if connected) and end iteration. Raises nothing."""
        if self._closed:
            return
        self._finish(None)
        await self._client._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event.

        Raises ``GapError`` for a gap when ``strict``; the client's fatal error, or the
        broker's refusal of a re-subscription; ``StopAsyncIteration`` once closed.
        """
        if not self._entered:
            raise RuntimeError("use 'async with client.subscribe(...) as sub' first")
        if self._callbacks is not None:
            raise RuntimeError(
                f"the subscription to {self.topic} delivers its events to its callbacks; "
                "subscribe without on_message/on_gap/on_presence/on_error to iterate"
            )
        event = await self._next_event()
        if self.strict and isinstance(event, Gap):
            raise GapError(event)
        return event

    async def _next_event(self) -> Event:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()

    async def get(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        """The next event, waiting at most ``timeout`` seconds.

        Raises ``RequestTimeout`` when none came in time, ``SubscriptionClosed`` once closed,
        and what iteration raises.
        """
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                raise SubscriptionClosed(f"the subscription to {self.topic} is closed") from None
        raise RequestTimeout(f"no event on {self.topic} within {timeout}s")

    def _push(self, event: Event) -> None:
        if self._closed:
            return
        if isinstance(event, Message) and len(self._queue) >= self._client._max_buffer:
            self._overflow(event)
        else:
            self._queue.append(event)
        self._wakeup.set()

    def _overflow(self, msg: Message) -> None:
        # Dropping with a precise gap beats stalling the reader: a full subscription would
        # otherwise hold back every reply (a publish awaited inside the loop would deadlock).
        self.dropped += 1
        last = self._queue[-1] if self._queue else None
        if (
            isinstance(last, Gap)
            and last.reason == "overflow"
            and last.topic == msg.topic
            and last.epoch == msg.epoch
            and last.to_offset == msg.offset - 1
        ):
            self._queue[-1] = attrs.evolve(last, to_offset=msg.offset)
        else:
            self._queue.append(
                Gap(msg.topic, msg.offset, msg.offset, msg.epoch, False, "overflow", None)
            )

    def _finish(self, error: PubSubError | None) -> None:
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        self._settled.set()
        self._wakeup.set()
