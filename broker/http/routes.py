"""What the operations listener answers: the route table, the API key check and the handlers
of the health, metrics, API and page routes.

A request is routed on its head alone (:meth:`OpsRoutes.resolve`), before any body is read:
an unknown path, a method the path does not take or an ``/api/`` request without a valid key
resolves to a route that only answers the error, so the connection layer never reads the body
of a request it refuses. Handlers return :class:`Response` objects or raise :class:`HttpError`;
:meth:`OpsRoutes.respond` turns everything else into an answer too, so nothing a client sends
escapes as an exception.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Iterable
from typing import Any, Protocol

import structlog
import trio

from broker.bus.base import HistoryResult, Publication, StreamPosition
from broker.errors import BusUnavailable, FrameError
from broker.http.files import StaticFiles
from broker.http.messages import (
    Handler,
    HttpError,
    HttpLimits,
    Request,
    Response,
    Route,
    error_response,
    json_response,
    refusal,
)
from broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broker.metrics import Registry
from broker.protocol import encode_message

__all__ = ["OPS_ROUTES", "OpsBackend", "OpsRoutes", "message_json"]

log = structlog.get_logger("broker.http")

#: The routes that health checks and scrapers use: they may take the reserved slots.
OPS_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


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
        (counters cumulative; :func:`broker.brokermetrics.stats_from_snapshot` builds it)."""

    async def publish(self, topic: str, data_json: str) -> Publication:
        """Publish the JSON text ``data_json`` on the exact topic ``topic`` with no sender.
        Raises :class:`BusUnavailable`, or :class:`FrameError` (``too_large``, ...)."""

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int, *, newest: bool = False
    ) -> HistoryResult:
        """What the bus still holds of ``topic`` after ``since``: the oldest ``limit``, or the
        newest when ``newest``; raises like :meth:`publish`."""

    async def presence(self, topic: str) -> list[str]:
        """The distinct client ids subscribed to ``topic``, sorted, on every worker. Raises
        :class:`FrameError` ``not_tracked`` when ``[presence] topics`` does not track it."""

    async def disconnect(self, client_id: str) -> int:
        """Close every connection of ``client_id`` on every worker; the number closed."""

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        """Raise ``FrameError("bad_topic", ...)`` unless ``topic`` is a valid topic (a valid
        pattern when ``wildcard``)."""

    def info(self) -> dict[str, object]:
        """Public facts for the pages: ``ws_port`` (int), ``ws_scheme`` (``"ws"``/``"wss"``),
        ``node`` (str: :func:`broker.config.node_name`, never the host name unless
        ``[server] node_id`` says so), ``workers`` (int)."""


def message_json(pub: Publication) -> str:
    """The ``message`` push of a publication, the same text the WebSocket sends."""
    return encode_message(pub.topic, pub.offset, pub.epoch, pub.sender, pub.data)


class OpsRoutes:
    """The route table and its handlers, over an :class:`OpsBackend`."""

    def __init__(
        self,
        backend: OpsBackend,
        api_keys: Iterable[str],
        *,
        limits: HttpLimits,
        registry: Registry,
    ) -> None:
        self.backend = backend
        self.limits = limits
        self.registry = registry
        self.set_api_keys(api_keys)
        files = StaticFiles()
        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/api/publish": {"POST": self._api_publish},
            "/api/history": {"GET": self._api_history},
            "/api/presence": {"GET": self._api_presence},
            "/api/disconnect": {"POST": self._api_disconnect},
            "/client.js": {"GET": files.client_module("pubsub.js")},
            "/client-shared.js": {"GET": files.client_module("client-shared.js")},
            "/client-hub.js": {"GET": files.client_module("client-hub.js")},
            "/client-worker.js": {"GET": files.client_module("client-worker.js")},
            "/": {"GET": files.redirect("/demo/")},
            "/demo": {"GET": files.redirect("/demo/")},
            "/demo/": {"GET": files.page("demo.html")},
            "/demo/config": {"GET": self._demo_config},
            "/client/config": {"GET": self._client_config},
            "/status": {"GET": files.redirect("/status/")},
            "/status/": {"GET": files.page("status.html")},
            "/status/data": {"GET": self._status_data},
        }
        self._assets: dict[str, Handler] = {"GET": files.asset}

    # -- dispatch ---------------------------------------------------------------------------

    def resolve(self, head: Request) -> Route:
        """The route for a request head (its body not read yet); never raises. An unknown
        path, a method the path does not take and an ``/api/`` request without a valid key
        resolve to a :func:`refusal`. Only ``POST`` routes take a body."""
        label = head.path
        methods = self._routes.get(head.path)
        if methods is None and head.path.startswith("/static/"):
            label, methods = "/static/", self._assets
        if methods is None:
            return refusal("other", HttpError("not_found", f"no such path: {head.path[:200]}"))
        method = "GET" if head.method == "HEAD" else head.method
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            err = HttpError(
                "method_not_allowed",
                f"{head.method} is not allowed on {head.path}",
                headers=[("allow", allow)],
            )
            return refusal(label, err)
        if head.path.startswith("/api/"):
            try:
                self._authorize(head)
            except HttpError as err:
                return refusal(label, err)
        return Route(label, handler, ops=label in OPS_ROUTES, takes_body=method == "POST")

    async def respond(self, route: Route, req: Request) -> Response:
        """Run the route's handler within ``handler_timeout``; never raises (except
        cancellation): errors become their JSON answers, anything unexpected a logged 500."""
        try:
            with trio.move_on_after(self.limits.handler_timeout) as scope:
                resp = await route.handler(req)
            if scope.cancelled_caught:
                raise HttpError("unavailable", "the broker did not answer in time")
        except Exception as exc:
            resp = error_response(self._http_error(_single_leaf(exc), req))
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
        if "last" in params and "limit" in params:
            raise HttpError("bad_request", "'last' and 'limit' exclude each other")
        # ``last=N``: the newest N (after ``since``) instead of the oldest ``limit``.
        newest = "last" in params
        name = "last" if newest else "limit"
        limit = _int_param(params, name, 1, 1000) if name in params else 100
        result = await self.backend.history(topic, since, limit, newest=newest)
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


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups holding just one, else ``exc``: a
    backend that uses a nursery may wrap its BusUnavailable or FrameError in a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _int_param(params: dict[str, str], name: str, low: int, high: int) -> int:
    raw = params[name]
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise HttpError("bad_request", f"query parameter {name!r} must be an integer")
    value = int(raw)
    if not low <= value <= high:
        raise HttpError("bad_request", f"query parameter {name!r} must be in {low}..{high}")
    return value
