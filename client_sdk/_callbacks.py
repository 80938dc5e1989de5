"""Callbacks instead of iteration: ``subscribe(topic, on_message=...)``.

A subscription made with callbacks is served by one task of the client (trio or asyncio, and
the blocking client's background thread) that takes its events in order and calls the callback
for each kind. A callback may be a plain function or a coroutine function (awaited before the
next event: the order of a topic's stream is kept). While it runs, later publications wait in
the subscription's buffer (``max_buffer``; beyond it they are dropped and reported as a gap), so
a slow callback delays only its own subscription.

What the application did not ask for is not lost silently: a gap with no ``on_gap`` is logged
at WARNING, an error ending the subscription with no ``on_error`` at ERROR, and so is an
exception raised by a callback (which does not end the subscription).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from client_sdk.errors import PubSubError
from client_sdk.models import Event, Gap, Message, PresenceEvent

log = logging.getLogger("client_sdk")

T = TypeVar("T")
Callback = Callable[[T], None] | Callable[[T], Awaitable[None]]


@attrs.frozen
class Callbacks:
    """The callbacks of one subscription (any may be None)."""

    on_message: Callback[Message] | None = None
    on_gap: Callback[Gap] | None = None
    on_presence: Callback[PresenceEvent] | None = None
    on_error: Callback[Exception] | None = None

    @property
    def any(self) -> bool:
        """Whether events go to callbacks rather than to iteration."""
        return any(
            cb is not None for cb in (self.on_message, self.on_gap, self.on_presence, self.on_error)
        )


async def _call(callback: Callable[[Any], object], arg: object) -> None:
    result = callback(arg)
    if inspect.isawaitable(result):
        await result


async def deliver(
    callbacks: Callbacks,
    topic: str,
    next_event: Callable[[], Awaitable[Event]],
    closed: Callable[[], bool],
) -> None:
    """Call ``callbacks`` with each event ``next_event`` returns, until it raises
    StopAsyncIteration (closed) or a PubSubError (handed to ``on_error``). Events still
    buffered when the application closes the subscription are not delivered. Raises nothing."""
    while True:
        try:
            event = await next_event()
        except StopAsyncIteration:
            return
        except PubSubError as error:
            if callbacks.on_error is None:
                log.error("the subscription to %s ended: %r", topic, error)
            else:
                await _guarded(callbacks, topic, callbacks.on_error, error)
            return
        if closed():
            return
        callback: Callable[[Any], object] | None
        if isinstance(event, Message):
            callback = callbacks.on_message
        elif isinstance(event, Gap):
            callback = callbacks.on_gap
            if callback is None:
                log.warning("gap on %s (no on_gap callback): %s", topic, event.describe())
        else:
            callback = callbacks.on_presence
        if callback is not None:
            await _guarded(callbacks, topic, callback, event)


async def _guarded(
    callbacks: Callbacks, topic: str, callback: Callable[[Any], object], arg: object
) -> None:
    try:
        await _call(callback, arg)
    except Exception as exc:
        # The subscription goes on: one bad event must not silence the stream.
        if callbacks.on_error is None or callback is callbacks.on_error:
            log.exception("a callback of the subscription to %s failed", topic)
        else:
            await _guarded(callbacks, topic, callbacks.on_error, exc)
