"""The operations listener: health, metrics, the HTTP publish API, the browser client and pages.

Theory of operation
-------------------
Four layers, each importing only the ones before it:

- :mod:`broker.http.messages`: the values passed around (:class:`Request`, :class:`Response`,
  :class:`HttpError`, :class:`Route`, :class:`HttpLimits`); no I/O.
- :mod:`broker.http.files` and :mod:`broker.http.routes`: what is answered. A request is
  routed on its head alone, and the API key is checked then, before any body is read.
  Handlers return responses or raise :class:`HttpError`, which becomes a JSON body
  ``{"error": {"code": ..., "message": ...}}`` with one of the protocol's error codes;
  anything else a handler raises is logged and answered with 500 ``internal``.
- :mod:`broker.http.connection`: HTTP/1.1 with h11, one trio task per connection, and the
  budget of connections (idle ones make room for new ones; slots reserved for health,
  readiness and metrics); nothing a client sends takes the listener or the process down.
- :mod:`broker.http.server`: :class:`HttpServer` puts the two together and
  :func:`serve_http` runs it on a port.

The listener knows nothing of workers and buses: it asks an :class:`OpsBackend`, which the
broker implements (:class:`WorkerBackend` in one process, the supervisor's with several), for
readiness, metrics, publications, history, presence and disconnects.

Routes
------
==========================  ======  =====================================================
``/healthz``                GET     200 ``{"status": "ok"}`` while the process runs
``/readyz``                 GET     200 or 503 ``{"ready": bool, ...details}``
``/metrics``                GET     Prometheus text format 0.0.4, every worker
``/api/publish``            POST    ``{"topic", "data"}`` -> ``{"topic", "offset", "epoch"}``
``/api/history``            GET     ``?topic=&since=&epoch=&limit=`` or ``&last=`` -> as ``history``
``/api/presence``           GET     ``?topic=`` -> ``{"topic", "clients"}`` (404 ``not_tracked``)
``/api/disconnect``         POST    ``{"client"}`` -> ``{"client", "closed"}``
``/client.js``              GET     the browser client (an ES module)
``/client-shared.js``       GET     what it loads with ``shared: true`` (tabs share a socket)
``/client-hub.js``          GET     the hub multiplexing the tabs over that socket
``/client-worker.js``       GET     the SharedWorker holding that shared socket
``/demo/``, ``/status/``    GET     the demo page and the operators' status page
``/demo/config``            GET     where the page finds the WebSocket listener
``/client/config``          GET     the same, for client.js on any origin (CORS)
``/status/data``            GET     per-worker figures for the status page's charts
``/static/NAME``            GET     the pages' assets
==========================  ======  =====================================================

``/api/*`` needs ``Authorization: Bearer KEY`` with one of the configured ``[api] keys``; with
no keys configured the API answers 401 to everything. Only the ``POST`` routes take a body.
"""

from broker.http.backend import WorkerBackend
from broker.http.messages import HttpError, HttpLimits, Request, Response
from broker.http.routes import OpsBackend
from broker.http.server import HttpServer, http_limits, serve_http

__all__ = [
    "HttpError",
    "HttpLimits",
    "HttpServer",
    "OpsBackend",
    "Request",
    "Response",
    "WorkerBackend",
    "http_limits",
    "serve_http",
]
