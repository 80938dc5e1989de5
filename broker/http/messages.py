"""The values the operations listener passes between its layers: requests, responses, errors,
routes and limits. No I/O here; :mod:`broker.http.connection` moves the bytes and
:mod:`broker.http.routes` decides the answers."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs

__all__ = [
    "STATUS_FOR_CODE",
    "Handler",
    "HttpError",
    "HttpLimits",
    "Request",
    "Response",
    "Route",
    "error_response",
    "json_response",
    "refusal",
]


@attrs.frozen
class HttpLimits:
    """Bounds on what one client may cost the listener.

    ``max_connections`` counts every connection the listener holds. When it is reached, the
    connection that has waited longest for its next request head (an idle keep-alive one, or
    one still sending its head) is closed to make room; only when every connection is busy
    with a request is a new one refused with 503. ``ops_reserve`` of those slots serve only
    ``/healthz``, ``/readyz`` and ``/metrics``: other requests in progress are refused with
    503 once ``max_connections - ops_reserve`` of them are, so health checks and scrapes keep
    answering whatever the API and the pages are asked."""

    max_body: int = 1024 * 1024
    max_header: int = 16 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    body_timeout: float = 30.0
    write_timeout: float = 10.0
    handler_timeout: float = 30.0
    max_connections: int = 512
    max_query_fields: int = 20
    ops_reserve: int = 32

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.ops_reserve < self.max_connections:
            raise ValueError("ops_reserve must be at least 0 and below max_connections")


#: HTTP status for each protocol error code.
STATUS_FOR_CODE = {
    "bad_request": 400,
    "bad_topic": 400,
    "not_subscribed": 400,
    "too_many_subscriptions": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "not_tracked": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "rate_limited": 429,
    "too_many_topics": 503,
    "internal": 500,
    "unavailable": 503,
}


class HttpError(Exception):
    """An error response: ``status`` and a JSON body with ``code`` and ``message``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_FOR_CODE.get(code, 400)
        self.headers = list(headers)


@attrs.frozen
class Request:
    """One request. Routes are chosen on its head alone, before ``body`` is read (it is
    ``b""`` until then, and stays so for routes that take no body)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""

    def params(self, max_fields: int) -> dict[str, str]:
        """The query string's parameters; a repeated or undecodable one is a ``bad_request``."""
        try:
            pairs = urllib.parse.parse_qsl(
                self.query, keep_blank_values=True, errors="strict", max_num_fields=max_fields
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError("bad_request", f"bad query string: {exc}") from None
        result: dict[str, str] = {}
        for key, value in pairs:
            if key in result:
                raise HttpError("bad_request", f"query parameter {key!r} given twice")
            result[key] = value
        return result

    def json_body(self) -> Any:
        """The body parsed as JSON (no NaN or Infinity, no absurd nesting)."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError("bad_request", "body is not UTF-8") from None

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            return json.loads(text, parse_constant=no_constants)
        except RecursionError:
            raise HttpError("bad_request", "body is nested too deeply") from None
        except ValueError as exc:
            raise HttpError("bad_request", f"body is not JSON: {exc}") from None


@attrs.define
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = attrs.Factory(list)


Handler = Callable[[Request], Awaitable[Response]]


@attrs.frozen
class Route:
    """What a request head resolved to. ``label`` names it in metrics; ``ops`` marks the
    health, readiness and metrics routes, which may use the reserved slots; the body is read
    only when ``takes_body`` (and the route was allowed: a refused request's body is never
    read, its connection is closed after the answer)."""

    label: str
    handler: Handler
    ops: bool = False
    takes_body: bool = False


def json_response(obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, "application/json", [("cache-control", "no-store"), *headers])


def error_response(err: HttpError) -> Response:
    return json_response(
        {"error": {"code": err.code, "message": err.message}}, err.status, err.headers
    )


def refusal(label: str, err: HttpError) -> Route:
    """A route that only answers ``err``: it takes no body, so a refused request's body is
    never read."""

    async def refuse(req: Request) -> Response:
        raise err

    return Route(label, refuse)
