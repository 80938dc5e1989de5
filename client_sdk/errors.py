"""Exceptions raised by the client SDK.

Every exception the SDK raises on purpose derives from :class:`PubSubError`, so one ``except
PubSubError`` catches them all. The tree::

    PubSubError
    +-- ConnectionFailed          the client cannot talk to the broker (any of the below)
    |   +-- ConnectFailed         could not connect (refused, DNS, TLS, HTTP rejection, timeout)
    |   +-- AuthenticationFailed  the broker refused the token (HTTP 401, close 4001) - fatal
    |   +-- PermissionRevoked     close 1008: the token no longer allows a subscription - fatal
    |   +-- ConnectionLost        the connection dropped while a request waited for its reply
    |   +-- ClientClosed          the client was closed (by the application or by a fatal error)
    |       +-- SubscriptionClosed    ``get()`` on a subscription that ended
    +-- ServerError               the broker answered a request with an error reply
    |   +-- BadRequest            bad_request
    |   +-- BadTopic              bad_topic
    |   +-- Forbidden             forbidden
    |   +-- NotSubscribed         not_subscribed
    |   +-- NotTracked            not_tracked (the topic does not track presence)
    |   +-- TooLarge              too_large
    |   +-- TooManySubscriptions  too_many_subscriptions
    |   +-- RateLimited           rate_limited
    |   +-- TooManyTopics         too_many_topics (the broker holds its most topics; try later)
    |   +-- Unauthorized          unauthorized
    |   +-- Unavailable           unavailable (the broker's bus is down; try again)
    |   +-- InternalError         internal (and any code this SDK does not know yet)
    +-- RequestTimeout            no reply within the timeout (also a ``TimeoutError``)
    +-- GapError                  strict subscriptions: publications were lost (carries the ``Gap``)
    +-- TokenError                the token callable raised or returned something that is not a str
    +-- EncodeError               data is not JSON (also a ``TypeError`` and a ``ValueError``)

Fatal errors (``AuthenticationFailed``, ``PermissionRevoked`` and an HTTP rejection other than 503)
stop the client: its state becomes ``CLOSED`` and every waiting call raises the error. Everything
else that breaks a connection is retried with backoff.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client_sdk.models import Gap

__all__ = [
    "AuthenticationFailed",
    "BadRequest",
    "BadTopic",
    "ClientClosed",
    "ConnectFailed",
    "ConnectionFailed",
    "ConnectionLost",
    "EncodeError",
    "Forbidden",
    "GapError",
    "InternalError",
    "NotSubscribed",
    "NotTracked",
    "PermissionRevoked",
    "PubSubError",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "SubscriptionClosed",
    "TokenError",
    "TooLarge",
    "TooManySubscriptions",
    "TooManyTopics",
    "Unauthorized",
    "Unavailable",
    "error_from_reply",
]


class PubSubError(Exception):
    """The root of every exception the SDK raises on purpose."""


class ConnectionFailed(PubSubError):
    """The client cannot talk to the broker; ``code``/``reason``: the WebSocket close, if any."""

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason


class ConnectFailed(ConnectionFailed):
    """A connection could not be opened.

    ``status`` is the HTTP status when the broker rejected the upgrade (400, 403, 404, 503, ...),
    ``error_code`` the ``code`` from the broker's JSON rejection body when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class AuthenticationFailed(ConnectionFailed):
    """The broker refused the token (HTTP 401 at the upgrade, or close 4001). Fatal."""


class PermissionRevoked(ConnectionFailed):
    """The broker closed with 1008: the current token no longer allows a subscription. Fatal."""


class ConnectionLost(ConnectionFailed):
    """The connection dropped while a request waited for its reply.

    For ``publish`` this means the outcome is unknown: the broker may or may not have accepted it
    (a subscriber sees it, or not, exactly once either way). The client itself reconnects.
    """


class ClientClosed(ConnectionFailed):
    """The client is closed: it was closed by the application, or stopped by a fatal error
    (then ``__cause__`` is that error)."""


class SubscriptionClosed(ClientClosed):
    """``get()`` on a subscription that ended (it, or its client, was closed)."""


class ServerError(PubSubError):
    """The broker answered with an error reply; ``code`` and ``message`` are the reply's."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(ServerError):
    """``bad_request``: the broker could not accept the request's shape (or it is a duplicate)."""

    code = "bad_request"


class BadTopic(ServerError):
    """``bad_topic``: the topic or pattern is not valid where it was used."""

    code = "bad_topic"


class Forbidden(ServerError):
    """``forbidden``: the token's permissions do not allow this topic."""

    code = "forbidden"


class NotSubscribed(ServerError):
    """``not_subscribed``: unsubscribing from something that is not subscribed."""

    code = "not_subscribed"


class NotTracked(ServerError):
    """``not_tracked``: presence was asked of a topic whose presence the broker does not track
    (its ``[presence] topics`` configuration)."""

    code = "not_tracked"


class TooLarge(ServerError):
    """``too_large``: the publication's data is larger than the broker accepts."""

    code = "too_large"


class TooManySubscriptions(ServerError):
    """``too_many_subscriptions``: this connection reached the broker's subscription limit."""

    code = "too_many_subscriptions"


class RateLimited(ServerError):
    """``rate_limited``: publishing faster than the broker allows; the publication was dropped,
    so retrying later is safe."""

    code = "rate_limited"


class TooManyTopics(ServerError):
    """``too_many_topics``: a publication to a new topic while the broker holds history for as
    many topics as it may; nothing was published, so retrying later is safe."""

    code = "too_many_topics"


class Unauthorized(ServerError):
    """``unauthorized``: a token refresh was refused, or a request came before authentication."""

    code = "unauthorized"


class Unavailable(ServerError):
    """``unavailable``: the broker's bus is down; the request had no effect, try again."""

    code = "unavailable"


class InternalError(ServerError):
    """``internal`` (or an error code this SDK does not know)."""

    code = "internal"


class RequestTimeout(PubSubError, TimeoutError):
    """No reply (or no connection to send the request on) within the timeout.

    For ``publish`` the outcome is unknown, as with :class:`ConnectionLost`.
    """


class GapError(PubSubError):
    """Raised by a ``strict=True`` subscription instead of yielding a :class:`Gap`.

    The subscription stays usable: iterating again continues after the gap.
    """

    def __init__(self, gap: Gap):
        super().__init__(f"publications lost on {gap.topic}: {gap.describe()}")
        self.gap = gap


class TokenError(PubSubError):
    """The token callable raised (the cause is chained) or returned something not a string."""


class EncodeError(PubSubError, TypeError, ValueError):
    """A value to send is not JSON (or the ``dumps`` hook refused it): the message names it and
    its place in ``data``; the hook's own exception is chained. A ``TypeError`` and a
    ``ValueError`` too, as the ``json`` module raises either."""


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        BadTopic,
        Forbidden,
        NotSubscribed,
        NotTracked,
        TooLarge,
        TooManySubscriptions,
        RateLimited,
        TooManyTopics,
        Unauthorized,
        Unavailable,
        InternalError,
    )
}


def error_from_reply(code: str, message: str) -> ServerError:
    """Build the typed exception for an error reply's ``code`` (unknown codes: InternalError)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, code=code)
