"""The operations listener: health, metrics, the HTTP publish API, the browser client and pages.

Theory of operation
-------------------
One trio task per TCP connection drives an :class:`h11.Connection`: it reads one request (the
head within ``header_timeout``, the body within ``body_timeout`` and at most ``max_body``
bytes), routes it to a handler, writes the response within ``write_timeout``, and loops while
the client keeps the connection alive (waiting at most ``keepalive_timeout`` for the next
request). Handlers return :class:`Response` objects or raise :class:`HttpError`, which becomes
a JSON body ``{"error": {"code": ..., "message": ...}}`` with one of the protocol's error codes.
Anything else a handler raises is logged and answered with 500 ``internal``: nothing a client
sends can take the listener (or the process) down.

The listener knows nothing of workers and buses: it asks an :class:`OpsBackend`, which the
broker implements, for readiness, metrics, publications, history, presence and disconnects.

Routes
------
==========================  ======  =====================================================
``/healthz``                GET     200 ``{"status": "ok"}`` while the process runs
``/readyz``                 GET     200 or 503 ``{"ready": bool, ...details}``
``/metrics``                GET     Prometheus text format 0.0.4, every worker
``/api/publish``            POST    ``{"topic", "data"}`` -> ``{"topic", "offset", "epoch"}``
``/api/history``            GET     ``?topic=&since=&epoch=&limit=`` -> like the ``history`` op
``/api/presence``           GET     ``?topic=`` -> ``{"topic", "clients"}``
``/api/disconnect``         POST    ``{"client"}`` -> ``{"client", "closed"}``
``/client.js``              GET     the browser client (an ES module)
``/demo/``, ``/status/``    GET     the demo page and the operators' status page
``/demo/config``            GET     where the page finds the WebSocket listener
``/client/config``          GET     the same, for client.js on any origin (CORS)
``/status/data``            GET     per-worker figures for the status page's charts
``/static/NAME``            GET     the pages' assets
==========================  ======  =====================================================

``/api/*`` needs ``Authorization: Bearer KEY`` with one of the configured ``[api] keys``; with
no keys configured the API answers 401 to everything.
"""

from __future__ import annotations

import hmac
import http
import importlib.resources
import importlib.util
import json
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import h11
import structlog
import trio

from broker.bus.base import HistoryResult, Publication, StreamPosition
from broker.errors import BusUnavailable, FrameError
from broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broker.metrics import Registry, merge, render, snapshot_from_stats
from broker.protocol import check_data_size, encode_message
from broker.topics import validate_pattern, validate_topic

if TYPE_CHECKING:
    from broker.worker import Worker

__all__ = [
    "HttpError",
    "HttpLimits",
    "OpsBackend",
    "Request",
    "Response",
    "WorkerBackend",
    "serve_http",
]

log = structlog.get_logger("broker.http")


class OpsBackend(Protocol):
    """What the operations listener needs from the broker. Every method may be called
    concurrently from several connections' tasks, in the trio thread that runs the listener."""

    def ready(self) -> tuple[bool, dict[str, object]]:
        """Whether every worker is up and the bus connected, with details for the JSON body."""

    async def metrics_text(self) -> str:
        """The Prometheus text of every worker's metrics (``render(merge(snapshots))``)."""

    async def stats(self) -> dict[str, Any]:
        """Per-worker figures for the status page: ``{"workers": [{"worker": "0",
        "connections", "subscriptions", "topics", "publications_in", "deliveries_out"}, ...]}``
        (counters cumulative; :func:`broker.metrics.stats_from_snapshot` builds it)."""

    async def publish(self, topic: str, data_json: str) -> Publication:
        """Publish the JSON text ``data_json`` on the exact topic ``topic`` with no sender.
        Raises :class:`BusUnavailable`, or :class:`FrameError` (``too_large``, ...)."""

    async def history(self, topic: str, since: StreamPosition | None, limit: int) -> HistoryResult:
        """What the bus still holds of ``topic`` after ``since``; raises like :meth:`publish`."""

    async def presence(self, topic: str) -> list[str]:
        """The distinct client ids subscribed to ``topic``, sorted, on every worker."""

    async def disconnect(self, client_id: str) -> int:
        """Close every connection of ``client_id`` on every worker; the number closed."""

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        """Raise ``FrameError("bad_topic", ...)`` unless ``topic`` is a valid topic (a valid
        pattern when ``wildcard``)."""

    def info(self) -> dict[str, object]:
        """Public facts for the pages: ``ws_port`` (int), ``ws_scheme`` (``"ws"``/``"wss"``),
        ``node`` (str), ``workers`` (int)."""


@attrs.frozen
class HttpLimits:
    """Bounds on what one client may cost the listener."""

    max_body: int = 1024 * 1024
    max_header: int = 16 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    body_timeout: float = 30.0
    write_timeout: float = 10.0
    handler_timeout: float = 30.0
    max_connections: int = 512
    max_query_fields: int = 20


#: HTTP status for each protocol error code.
STATUS_FOR_CODE = {
    "bad_request": 400,
    "bad_topic": 400,
    "not_subscribed": 400,
    "too_many_subscriptions": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "rate_limited": 429,
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
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

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


def json_response(obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, "application/json", [("cache-control", "no-store"), *headers])


def error_response(err: HttpError) -> Response:
    return json_response(
        {"error": {"code": err.code, "message": err.message}}, err.status, err.headers
    )


def message_json(pub: Publication) -> str:
    """The ``message`` push of a publication, the same text the WebSocket sends."""
    return encode_message(pub.topic, pub.offset, pub.epoch, pub.sender, pub.data)


# Pages are same-origin only: no inline script, no framing, no referrer (a demo URL may hold
# ``?token=``). ``connect-src`` lets the page reach the WebSocket port, which is another origin.
_PAGE_HEADERS = [
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
]

_REASONS = {int(s): s.phrase.encode() for s in http.HTTPStatus}

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")


def _load_resources(package: str, folder: str) -> dict[str, bytes]:
    """Every file of a package's data folder, by name (read once, at start)."""
    files: dict[str, bytes] = {}
    try:
        root = importlib.resources.files(package).joinpath(folder)
        entries = [(e.name, e) for e in root.iterdir() if e.is_file()]
    except (ImportError, OSError, ValueError):
        # A namespace package (no __init__.py) is not a resource container on every Python:
        # look in its folders directly.
        spec = importlib.util.find_spec(package)
        dirs = [Path(d) / folder for d in (spec.submodule_search_locations or [])] if spec else []
        entries = [(f.name, f) for d in dirs if d.is_dir() for f in d.iterdir() if f.is_file()]
    for name, entry in entries:
        if _ASSET_NAME.match(name) and name not in files:
            try:
                files[name] = entry.read_bytes()
            except OSError as exc:
                log.warning("http_resource_unreadable", package=package, name=name, error=str(exc))
    if not files:
        log.warning("http_resources_missing", package=package, folder=folder)
    return files


def _content_type(name: str) -> str:
    dot = name.rfind(".")
    return _CONTENT_TYPES.get(name[dot:] if dot >= 0 else "", "application/octet-stream")


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """The routes and the connection loop; :func:`serve_http` runs one."""

    def __init__(
        self,
        backend: OpsBackend,
        api_keys: Iterable[str],
        *,
        limits: HttpLimits | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.backend = backend
        self.set_api_keys(api_keys)
        self.limits = limits or HttpLimits()
        self._connections = 0
        self._static = _load_resources("broker", "static")
        self._client_js = _load_resources("client_sdk", "js").get("pubsub.js")
        self.registry = registry or Registry()
        self._requests = self.registry.counter(
            "pubsub_http_requests_total",
            "Requests answered by the operations listener, by route and status.",
            ["route", "status"],
        )
        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/api/publish": {"POST": self._api_publish},
            "/api/history": {"GET": self._api_history},
            "/api/presence": {"GET": self._api_presence},
            "/api/disconnect": {"POST": self._api_disconnect},
            "/client.js": {"GET": self._client_js_route},
            "/": {"GET": self._redirect("/demo/")},
            "/demo": {"GET": self._redirect("/demo/")},
            "/demo/": {"GET": self._page("demo.html")},
            "/demo/config": {"GET": self._demo_config},
            "/client/config": {"GET": self._client_config},
            "/status": {"GET": self._redirect("/status/")},
            "/status/": {"GET": self._page("status.html")},
            "/status/data": {"GET": self._status_data},
        }

    # -- dispatch ---------------------------------------------------------------------------

    def _route_for(self, path: str) -> tuple[str, dict[str, Handler]]:
        routes = self._routes.get(path)
        if routes is not None:
            return path, routes
        if path.startswith("/static/"):
            return "/static/", {"GET": self._asset}
        return "other", {}

    async def handle(self, req: Request) -> Response:
        """Answer one request; never raises (except cancellation)."""
        route, methods = self._route_for(req.path)
        try:
            if not methods:
                raise HttpError("not_found", f"no such path: {req.path[:200]}")
            method = "GET" if req.method == "HEAD" else req.method
            handler = methods.get(method)
            if handler is None:
                allow = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
                raise HttpError(
                    "method_not_allowed",
                    f"{req.method} is not allowed on {req.path}",
                    headers=[("allow", allow)],
                )
            if req.path.startswith("/api/"):
                self._authorize(req)
            with trio.move_on_after(self.limits.handler_timeout) as scope:
                resp = await handler(req)
            if scope.cancelled_caught:
                raise HttpError("unavailable", "the broker did not answer in time")
        except Exception as exc:
            resp = error_response(self._http_error(_single_leaf(exc), req))
        self._requests.inc(route=route, status=str(resp.status))
        return resp

    def _http_error(self, exc: BaseException, req: Request) -> HttpError:
        if isinstance(exc, HttpError):
            return exc
        if isinstance(exc, FrameError):
            return HttpError(exc.code, exc.message)
        if isinstance(exc, BusUnavailable):
            return HttpError(
                "unavailable", f"the bus is unavailable: {exc}", headers=[("retry-after", "1")]
            )
        log.error("http_handler_failed", method=req.method, path=req.path[:200], exc_info=exc)
        return HttpError("internal", "internal error")

    def set_api_keys(self, api_keys: Iterable[str]) -> None:
        """Replace the accepted API keys (a configuration reload)."""
        self._keys = [k.encode() for k in api_keys if k]

    def _authorize(self, req: Request) -> None:
        challenge = [("www-authenticate", 'Bearer realm="pubsub"')]
        if not self._keys:
            raise HttpError(
                "unauthorized", "the HTTP API is disabled: no [api] keys", headers=challenge
            )
        scheme, _, key = req.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(
                "unauthorized",
                "an 'Authorization: Bearer KEY' header is required",
                headers=challenge,
            )
        given = key.strip().encode()
        # Compare against every key so the time taken does not say which one nearly matched.
        matched = False
        for k in self._keys:
            matched |= hmac.compare_digest(given, k)
        if not matched:
            raise HttpError("unauthorized", "unknown API key", headers=challenge)

    # -- operations ---------------------------------------------------------------------------

    async def _healthz(self, req: Request) -> Response:
        return json_response({"status": "ok"})

    async def _readyz(self, req: Request) -> Response:
        ok, details = self.backend.ready()
        return json_response({**details, "ready": ok}, 200 if ok else 503)

    async def _metrics(self, req: Request) -> Response:
        text = await self.backend.metrics_text()
        if text and not text.endswith("\n"):
            text += "\n"
        text += self.registry.render()
        return Response(200, text.encode(), METRICS_CONTENT_TYPE, [("cache-control", "no-store")])

    async def _status_data(self, req: Request) -> Response:
        stats = await self.backend.stats()
        ok, _ = self.backend.ready()
        return json_response({**self._public_info(), **stats, "ready": ok, "time": time.time()})

    def _public_info(self) -> dict[str, object]:
        info = self.backend.info()
        keys = ("ws_port", "ws_scheme", "node", "workers")
        return {k: info[k] for k in keys if k in info}

    async def _demo_config(self, req: Request) -> Response:
        return json_response(self._public_info())

    async def _client_config(self, req: Request) -> Response:
        # Read by client.js imported into pages of any origin, to find the WebSocket port.
        return json_response(self._public_info(), headers=[("access-control-allow-origin", "*")])

    # -- the API ------------------------------------------------------------------------------

    def _topic(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise HttpError("bad_request", f"{where} 'topic' (a string) is required")
        self.backend.validate_topic(value, False)
        return value

    def _json_object(self, req: Request) -> dict[str, Any]:
        body = req.json_body()
        if not isinstance(body, dict):
            raise HttpError("bad_request", "the body must be a JSON object")
        return body

    async def _api_publish(self, req: Request) -> Response:
        body = self._json_object(req)
        topic = self._topic(body.get("topic"), "field")
        if "data" not in body:
            raise HttpError("bad_request", "field 'data' is required")
        data = json.dumps(body["data"], separators=(",", ":"), ensure_ascii=False)
        pub = await self.backend.publish(topic, data)
        return json_response({"topic": pub.topic, "offset": pub.offset, "epoch": pub.epoch})

    async def _api_history(self, req: Request) -> Response:
        params = req.params(self.limits.max_query_fields)
        topic = self._topic(params.get("topic"), "query parameter")
        since: StreamPosition | None = None
        if ("since" in params) != ("epoch" in params):
            raise HttpError("bad_request", "'since' and 'epoch' go together")
        if "since" in params:
            since = StreamPosition(_int_param(params, "since", 0, 2**62), params["epoch"])
        limit = _int_param(params, "limit", 1, 1000) if "limit" in params else 100
        result = await self.backend.history(topic, since, limit)
        head: dict[str, Any] = {
            "topic": topic,
            "offset": result.position.offset,
            "epoch": result.position.epoch,
        }
        if since is not None:
            head["recovered"] = result.recovered
            head["missed"] = (
                None
                if result.missed is None
                else {"from": result.missed[0], "to": result.missed[1]}
            )
        messages = ",".join(message_json(p) for p in result.publications)
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False)
        body = f'{text[:-1]},"messages":[{messages}]}}'.encode()
        return Response(200, body, "application/json", [("cache-control", "no-store")])

    async def _api_presence(self, req: Request) -> Response:
        params = req.params(self.limits.max_query_fields)
        topic = self._topic(params.get("topic"), "query parameter")
        clients = await self.backend.presence(topic)
        return json_response({"topic": topic, "clients": sorted(clients)})

    async def _api_disconnect(self, req: Request) -> Response:
        body = self._json_object(req)
        client = body.get("client")
        if not isinstance(client, str) or not client or len(client) > 1024:
            raise HttpError("bad_request", "field 'client' (a client id) is required")
        closed = await self.backend.disconnect(client)
        return json_response({"client": client, "closed": closed})

    # -- files ---------------------------------------------------------------------------------

    async def _client_js_route(self, req: Request) -> Response:
        if self._client_js is None:
            raise HttpError("not_found", "the browser client is not installed")
        # Pages on other origins import it as a module, which needs CORS.
        return Response(
            200,
            self._client_js,
            _CONTENT_TYPES[".js"],
            [("access-control-allow-origin", "*"), ("cache-control", "no-cache")],
        )

    def _page(self, name: str) -> Handler:
        async def page(req: Request) -> Response:
            body = self._static.get(name)
            if body is None:
                raise HttpError("not_found", f"{name} is not installed")
            return Response(200, body, _content_type(name), [*_PAGE_HEADERS])

        return page

    def _redirect(self, location: str) -> Handler:
        async def redirect(req: Request) -> Response:
            target = location + (f"?{req.query}" if req.query else "")
            return Response(308, b"", "text/plain", [("location", target)])

        return redirect

    async def _asset(self, req: Request) -> Response:
        name = req.path[len("/static/") :]
        body = self._static.get(name) if _ASSET_NAME.match(name) else None
        if body is None:
            raise HttpError("not_found", f"no such asset: {name}")
        return Response(200, body, _content_type(name), [("cache-control", "no-cache")])

    # -- the connection loop ---------------------------------------------------------------

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection until it closes; never raises (except cancellation)."""
        if self._connections >= self.limits.max_connections:
            await _refuse_busy(stream, self.limits.write_timeout)
            return
        self._connections += 1
        try:
            await self._connection_loop(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            log.exception("http_connection_failed")
        finally:
            self._connections -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _connection_loop(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
        first = True
        while True:
            wait = self.limits.header_timeout if first else self.limits.keepalive_timeout
            first = False
            try:
                with trio.move_on_after(wait) as scope:
                    event = await _next_event(stream, conn)
                if scope.cancelled_caught:
                    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        return  # an idle keep-alive connection: just close it
                    raise HttpError("bad_request", "request head not received in time", status=408)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                req = await self._read_request(stream, conn, event)
            except HttpError as err:
                await self._send_error_and_close(stream, conn, err)
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = "too_large" if status == 431 else "bad_request"
                await self._send_error_and_close(
                    stream, conn, HttpError(code, f"bad HTTP request: {exc}", status=status)
                )
                return
            started = time.monotonic()
            resp = await self.handle(req)
            if req.method == "HEAD":
                resp.headers.append(("content-length", str(len(resp.body))))
                resp.body = b""
            await self._send_response(stream, conn, resp)
            log.debug(
                "http_request",
                method=req.method,
                path=req.path,
                status=resp.status,
                ms=round((time.monotonic() - started) * 1000, 2),
            )
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                await _linger_close(stream)
                return
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, event: h11.Request
    ) -> Request:
        target = event.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        length = headers.get("content-length")
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
        method = event.method.decode("ascii", "replace").upper()
        return Request(method, path, query, headers, b"".join(chunks))

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if data:
            with trio.fail_after(self.limits.write_timeout):
                await stream.send_all(data)

    async def _send_response(
        self, stream: trio.abc.Stream, conn: h11.Connection, resp: Response
    ) -> None:
        headers = [
            ("content-type", resp.content_type),
            ("x-content-type-options", "nosniff"),
            *resp.headers,
        ]
        if not any(name == "content-length" for name, _ in headers):
            headers.append(("content-length", str(len(resp.body))))
        if conn.their_state is not h11.DONE:
            # The request was not read to its end (an early error): the stream cannot be reused.
            headers.append(("connection", "close"))
        reason = _REASONS.get(resp.status, b"")
        await self._send(
            stream, conn, h11.Response(status_code=resp.status, headers=headers, reason=reason)
        )
        if resp.body:
            await self._send(stream, conn, h11.Data(data=resp.body))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _send_error_and_close(
        self, stream: trio.abc.Stream, conn: h11.Connection, err: HttpError
    ) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            resp = error_response(err)
            self._requests.inc(route="invalid", status=str(resp.status))
            try:
                await self._send_response(stream, conn, resp)
            except h11.LocalProtocolError:
                return
        await _linger_close(stream)


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups holding just one, else ``exc``: a
    backend that uses a nursery may wrap its BusUnavailable or FrameError in a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        return event


async def _linger_close(stream: trio.abc.Stream) -> None:
    """Close after a response without losing it: stop sending, then read (and drop) what the
    client still sends for a moment, so the kernel does not answer it with a reset that would
    discard our response from the client's receive buffer."""
    try:
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        with trio.move_on_after(1.0):
            received = 0
            while received < 4 * 1024 * 1024:
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
            await _linger_close(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await stream.aclose()


def _int_param(params: dict[str, str], name: str, low: int, high: int) -> int:
    raw = params[name]
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise HttpError("bad_request", f"query parameter {name!r} must be an integer")
    value = int(raw)
    if not low <= value <= high:
        raise HttpError("bad_request", f"query parameter {name!r} must be in {low}..{high}")
    return value


class WorkerBackend:
    """The :class:`OpsBackend` of workers that run in the listener's own trio loop (the
    one-process broker): it reads their figures directly and uses the first one's bus.

    ``ws_port`` is the WebSocket listener's port, for the pages. ``extra_metrics`` returns
    snapshots to add to ``/metrics`` (a registry with the handshake histogram, say)."""

    def __init__(
        self,
        workers: Sequence[Worker],
        *,
        ws_port: int,
        extra_metrics: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ) -> None:
        if not workers:
            raise ValueError("at least one worker")
        self.workers = list(workers)
        self.ws_port = ws_port
        self.extra_metrics = extra_metrics

    def ready(self) -> tuple[bool, dict[str, object]]:
        up = {str(w.index): bool(w.accepting) for w in self.workers}
        bus = all(w.bus.is_up for w in self.workers)
        return all(up.values()) and bus, {"workers": up, "bus": bus}

    async def metrics_text(self) -> str:
        extra = list(self.extra_metrics()) if self.extra_metrics else []
        snaps = [snapshot_from_stats(w.stats()) for w in self.workers]
        return render(merge([*snaps, *extra]))

    async def stats(self) -> dict[str, Any]:
        return {"workers": [w.stats() for w in self.workers]}

    async def publish(self, topic: str, data_json: str) -> Publication:
        worker = self.workers[0]
        check_data_size(data_json, worker.config.limits.max_data_size)
        return await worker.bus.publish(topic, data_json, None)

    async def history(self, topic: str, since: StreamPosition | None, limit: int) -> HistoryResult:
        return await self.workers[0].bus.history(topic, since, limit)

    async def presence(self, topic: str) -> list[str]:
        return await self.workers[0].bus.presence(topic)

    async def disconnect(self, client_id: str) -> int:
        closed = 0
        for worker in self.workers:
            for session in list(worker.sessions.values()):
                if session.identity is not None and session.identity.client == client_id:
                    session.close(1008, "disconnected by the operator")
                    closed += 1
        return closed

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        if wildcard:
            validate_pattern(topic)
        else:
            validate_topic(topic)

    def info(self) -> dict[str, object]:
        worker = self.workers[0]
        tls = getattr(worker, "ssl_context", None) is not None
        return {
            "ws_port": self.ws_port,
            "ws_scheme": "wss" if tls else "ws",
            "node": worker.node,
            "workers": len(self.workers),
        }


async def serve_http(
    listen_host: str,
    listen_port: int,
    backend: OpsBackend,
    api_keys: Iterable[str],
    *,
    limits: HttpLimits | None = None,
    registry: Registry | None = None,
    server: HttpServer | None = None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the operations listener on ``listen_host:listen_port`` until cancelled.

    Calls ``task_status.started(port)`` with the real port once listening (so port 0 picks a
    free one). ``registry`` (optional) receives the listener's own request counter, which
    ``/metrics`` appends to the backend's text. Pass ``server`` to keep a handle on it (to
    change its API keys on reload); ``backend``, ``api_keys``, ``limits`` and ``registry`` are
    then ignored. ``sock``, a socket already bound and listening, is served instead of
    binding ``listen_host:listen_port`` (so the caller can report a busy port before
    starting anything).
    """
    if server is None:
        server = HttpServer(backend, api_keys, limits=limits, registry=registry)
    host: str | None = listen_host or None
    if host is not None and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if sock is not None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    else:
        listeners = await trio.open_tcp_listeners(listen_port, host=host)
    port = listeners[0].socket.getsockname()[1]
    log.info("http_listening", host=listen_host, port=port)
    task_status.started(port)
    await trio.serve_listeners(server.serve_connection, listeners)  # type: ignore[arg-type]
