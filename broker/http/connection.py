"""The operations listener's connection layer: HTTP/1.1 on trio streams with h11, and the
budget of connections the listener holds.

Theory of operation
-------------------
One trio task per TCP connection drives an :class:`h11.Connection`. For each request it reads
the head (within ``header_timeout`` for the first request, ``keepalive_timeout`` between
requests, at most ``max_header`` bytes), asks the :class:`Application` which :class:`Route`
the head resolves to, and only then reads the body: only when the route takes one (a
``POST`` route whose API key was accepted), at most ``max_body`` bytes within
``body_timeout``. A request is thus refused (404, 405, 401, 503) without a byte of its body
being read; its answer says ``connection: close`` and the connection ends, because the unread
body would otherwise be taken for the next request. A request framed two ways (both
``Content-Length`` and ``Transfer-Encoding``) is answered 400 and closed: RFC 9112 section
6.1 says such a message may be a smuggling attempt and the connection must not be reused.
Responses are written within ``write_timeout``; a connection that ends after a response
closes gracefully (its write side first, then what the client still sends is read and dropped
for a moment) so that the client sees the response rather than a reset.

The budget (:class:`Slots`) has ``max_connections`` slots, one per connection held. A
connection waiting for its next request head, for the client to read a response, or lingering
before its close, is *waiting*: when every slot is taken, a new connection takes the slot of
the one that has waited longest, which is closed. So idle keep-alive connections, heads sent a
byte at a time and clients that do not read cannot lock anyone out; only when every connection
is busy with a request (its body being read, its handler running) is a new one refused (503,
``pubsub_http_refused_total{reason="full"}``). Requests other than ``/healthz``, ``/readyz``
and ``/metrics`` may be in progress on at most ``max_connections - ops_reserve`` connections
at once (503 past it, ``reason="reserved"``), so those three always find a slot: whatever
the API and the pages are asked, health checks and scrapes keep answering.

The listener is hand-written on h11 rather than run by a general server (hypercorn, say)
because the budget works on connections in states such a server does not expose to its
application: waiting for a head or for the client to read, lingering, busy by route class.
"""

from __future__ import annotations

import http
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Protocol

import attrs
import h11
import structlog
import trio

from broker.http.messages import (
    HttpError,
    HttpLimits,
    Request,
    Response,
    Route,
    error_response,
    refusal,
)
from broker.metrics import Registry

__all__ = ["Application", "HttpConnections", "Slot", "Slots"]

log = structlog.get_logger("broker.http")

#: Seconds a closing connection reads (and drops) what the client still sends, so that the
#: kernel does not answer it with a reset that would discard our response at the client.
LINGER = 1.0
#: Bytes read at most while lingering.
LINGER_BYTES = 4 * 1024 * 1024

_REASONS = {int(s): s.phrase.encode() for s in http.HTTPStatus}


class Application(Protocol):
    """What the connection layer serves: :class:`broker.http.routes.OpsRoutes`."""

    def resolve(self, head: Request) -> Route:
        """The route for a request head (body not read); never raises."""

    async def respond(self, route: Route, req: Request) -> Response:
        """The answer to a request; never raises (except cancellation)."""


@attrs.define(eq=False)
class Slot:
    """One connection's place in the :class:`Slots` budget."""

    #: Set while the connection waits (for a request head, or lingering): cancelling it
    #: closes the connection to make room for another.
    waiting: trio.CancelScope | None = None
    #: A request other than health, readiness and metrics is in progress.
    busy: bool = False
    #: Its slot was taken by a newer connection.
    evicted: bool = False
    released: bool = False


class Slots:
    """The listener's connection budget (see the module's theory of operation). Plain
    bookkeeping in the listener's trio thread; its figures are metrics in ``registry``."""

    def __init__(self, limits: HttpLimits, registry: Registry) -> None:
        self.limits = limits
        self.held = 0
        self.busy = 0
        # Insertion order is waiting order: the first one has waited longest.
        self._waiting: dict[Slot, None] = {}
        registry.gauge(
            "pubsub_http_connections", "Connections the operations listener holds."
        ).set_function(lambda: self.held)
        self._refused = registry.counter(
            "pubsub_http_refused_total",
            "Operations listener answers 503 for lack of room, by reason: full (every "
            "connection busy with a request) or reserved (the rest is kept for /healthz, "
            "/readyz and /metrics).",
            ["reason"],
        )
        self._evicted = registry.counter(
            "pubsub_http_evicted_total",
            "Idle operations listener connections closed to make room for a new one.",
        )

    def acquire(self) -> Slot | None:
        """A slot for a new connection: a free one, else the one of the connection that has
        waited longest (its wait is cancelled, so it closes). None, counted, when every
        connection is busy with a request."""
        if self.held >= self.limits.max_connections:
            if not self._waiting:
                self._refused.inc(reason="full")
                return None
            oldest = next(iter(self._waiting))
            oldest.evicted = True
            if oldest.waiting is not None:
                oldest.waiting.cancel()
            self.release(oldest)
            self._evicted.inc()
        self.held += 1
        return Slot()

    @contextmanager
    def waiting(self, slot: Slot, timeout: float) -> Iterator[trio.CancelScope]:
        """A cancel scope of ``timeout`` seconds during which ``slot`` may be evicted (then
        the scope is cancelled and ``slot.evicted`` is set)."""
        with trio.move_on_after(timeout) as scope:
            if not slot.released:
                slot.waiting = scope
                self._waiting[slot] = None
            try:
                yield scope
            finally:
                slot.waiting = None
                self._waiting.pop(slot, None)

    def start_request(self, slot: Slot, ops: bool) -> bool:
        """Whether a request may proceed: a health, readiness or metrics one (``ops``)
        always; another while fewer than ``max_connections - ops_reserve`` are in progress
        (refusals are counted)."""
        if ops:
            return True
        if self.busy >= self.limits.max_connections - self.limits.ops_reserve:
            self._refused.inc(reason="reserved")
            return False
        self.busy += 1
        slot.busy = True
        return True

    def end_request(self, slot: Slot) -> None:
        if slot.busy:
            slot.busy = False
            self.busy -= 1

    def release(self, slot: Slot) -> None:
        """Give the slot back (idempotent)."""
        if not slot.released:
            slot.released = True
            self.end_request(slot)
            self._waiting.pop(slot, None)
            self.held -= 1


class HttpConnections:
    """Serves HTTP/1.1 connections for an :class:`Application`, within ``limits``."""

    def __init__(self, app: Application, *, limits: HttpLimits, registry: Registry) -> None:
        self.app = app
        self.limits = limits
        self.slots = Slots(limits, registry)
        self._requests = registry.counter(
            "pubsub_http_requests_total",
            "Requests answered by the operations listener, by route and status.",
            ["route", "status"],
        )

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection until it closes; never raises (except cancellation)."""
        slot = self.slots.acquire()
        if slot is None:
            await _refuse_busy(stream, self.limits.write_timeout)
            return
        try:
            await self._connection_loop(stream, slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("http_connection_failed")
        finally:
            self.slots.release(slot)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _connection_loop(self, stream: trio.abc.Stream, slot: Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
        wait = self.limits.header_timeout
        while True:
            try:
                with self.slots.waiting(slot, wait) as scope:
                    event = await _next_event(stream, conn)
                wait = self.limits.keepalive_timeout
                if slot.evicted:
                    return  # it made room for another connection
                if scope.cancelled_caught:
                    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        return  # an idle keep-alive connection: just close it
                    raise HttpError("bad_request", "request head not received in time", status=408)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                head = _request_head(event)
            except HttpError as err:
                await self._send_error_and_close(stream, conn, slot, err)
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = "too_large" if status == 431 else "bad_request"
                bad = HttpError(code, f"bad HTTP request: {exc}", status=status)
                await self._send_error_and_close(stream, conn, slot, bad)
                return
            route = self.app.resolve(head)
            if not self.slots.start_request(slot, route.ops):
                busy = HttpError(
                    "unavailable",
                    "too many HTTP requests in progress",
                    headers=[("retry-after", "1")],
                )
                route = refusal(route.label, busy)
            try:
                if not await self._serve_request(stream, conn, slot, route, head):
                    return
            finally:
                self.slots.end_request(slot)
            conn.start_next_cycle()

    async def _serve_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, slot: Slot, route: Route, head: Request
    ) -> bool:
        """Read the body if the route takes one, answer, and say whether the connection may
        serve another request."""
        started = time.monotonic()
        req = head
        if route.takes_body:
            try:
                req = await self._read_body(stream, conn, head)
            except HttpError as err:
                await self._send_error_and_close(stream, conn, slot, err)
                return False
        else:
            _end_of_empty_body(conn)
        resp = await self.app.respond(route, req)
        self._requests.inc(route=route.label, status=str(resp.status))
        if req.method == "HEAD":
            resp.headers.append(("content-length", str(len(resp.body))))
            resp.body = b""
        if not await self._send_response(stream, conn, slot, resp):
            return False
        log.debug(
            "http_request",
            method=req.method,
            path=req.path,
            status=resp.status,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            await self._linger_close(stream, slot)
            return False
        return True

    async def _read_body(
        self, stream: trio.abc.Stream, conn: h11.Connection, head: Request
    ) -> Request:
        length = head.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            raise HttpError("too_large", f"the body is over {self.limits.max_body} bytes")
        if conn.they_are_waiting_for_100_continue:
            await self._send(
                stream,
                conn,
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"),
            )
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.limits.body_timeout) as scope:
            while True:
                ev = await _next_event(stream, conn)
                if isinstance(ev, h11.Data):
                    size += len(ev.data)
                    if size > self.limits.max_body:
                        raise HttpError(
                            "too_large", f"the body is over {self.limits.max_body} bytes"
                        )
                    chunks.append(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise trio.BrokenResourceError("client closed mid-request")
        if scope.cancelled_caught:
            raise HttpError("bad_request", "request body not received in time", status=408)
        return attrs.evolve(head, body=b"".join(chunks))

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if data:
            with trio.fail_after(self.limits.write_timeout):
                await stream.send_all(data)

    async def _send_response(
        self, stream: trio.abc.Stream, conn: h11.Connection, slot: Slot, resp: Response
    ) -> bool:
        """Write ``resp``; False if the connection made room for another meanwhile (a client
        that does not read its answers waits on us like an idle one)."""
        headers = [
            ("content-type", resp.content_type),
            ("x-content-type-options", "nosniff"),
            *resp.headers,
        ]
        if not any(name == "content-length" for name, _ in headers):
            headers.append(("content-length", str(len(resp.body))))
        if conn.their_state is not h11.DONE:
            # The request was not read to its end (refused, or an early error): the stream
            # cannot be reused.
            headers.append(("connection", "close"))
        reason = _REASONS.get(resp.status, b"")
        with self.slots.waiting(slot, math.inf):
            await self._send(
                stream, conn, h11.Response(status_code=resp.status, headers=headers, reason=reason)
            )
            if resp.body:
                await self._send(stream, conn, h11.Data(data=resp.body))
            await self._send(stream, conn, h11.EndOfMessage())
        return not slot.evicted

    async def _send_error_and_close(
        self, stream: trio.abc.Stream, conn: h11.Connection, slot: Slot, err: HttpError
    ) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            resp = error_response(err)
            self._requests.inc(route="invalid", status=str(resp.status))
            try:
                if not await self._send_response(stream, conn, slot, resp):
                    return
            except h11.LocalProtocolError:
                return
        await self._linger_close(stream, slot)

    async def _linger_close(self, stream: trio.abc.Stream, slot: Slot) -> None:
        # A lingering connection is done with its request and waits for nothing of ours: it
        # may make room for another.
        self.slots.end_request(slot)
        with self.slots.waiting(slot, LINGER):
            await _linger(stream)


def _request_head(event: h11.Request) -> Request:
    """The request's head as a :class:`Request` without body. Raises :class:`HttpError` for
    a request framed both by Content-Length and Transfer-Encoding (RFC 9112 6.1)."""
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "content-length" in headers and "transfer-encoding" in headers:
        raise HttpError(
            "bad_request", "Content-Length and Transfer-Encoding together: ambiguous framing"
        )
    method = event.method.decode("ascii", "replace").upper()
    return Request(method, path, query, headers)


def _end_of_empty_body(conn: h11.Connection) -> None:
    """Take the end of a request that has no body, if it is at hand (no I/O). A body, or a
    chunked one not yet seen, is left unread: the request's side then is not DONE and the
    connection closes after the answer."""
    with suppress(h11.RemoteProtocolError):
        conn.next_event()


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        return event


async def _linger(stream: trio.abc.Stream) -> None:
    """Close after a response without losing it: stop sending, then read (and drop) what the
    client still sends, until it closes or ``LINGER_BYTES``; the caller bounds the time."""
    try:
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        received = 0
        while received < LINGER_BYTES:
            data = await stream.receive_some(65536)
            if not data:
                break
            received += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _refuse_busy(stream: trio.abc.Stream, write_timeout: float) -> None:
    body = b'{"error":{"code":"unavailable","message":"too many HTTP connections"}}'
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    ).encode()
    with trio.move_on_after(write_timeout):
        try:
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        else:
            with trio.move_on_after(LINGER):
                await _linger(stream)
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await stream.aclose()
