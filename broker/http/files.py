"""The files the operations listener serves: the browser client (``/client.js``, and the two
modules it loads to share one connection between tabs: ``/client-shared.js``,
``/client-hub.js`` and the SharedWorker script ``/client-worker.js``), the demo and status pages and their assets. Read once at start from the installed packages; nothing a
request names is ever looked up on disk."""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from pathlib import Path

import structlog

from broker.http.messages import Handler, HttpError, Request, Response

__all__ = ["CONTENT_TYPES", "StaticFiles"]

log = structlog.get_logger("broker.http")

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

CONTENT_TYPES = {
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
    return CONTENT_TYPES.get(name[dot:] if dot >= 0 else "", "application/octet-stream")


class StaticFiles:
    """Handlers for the browser client, the pages and their assets."""

    def __init__(self) -> None:
        self._static = _load_resources("broker", "static")
        self._client = _load_resources("client_sdk", "js")

    def client_module(self, name: str) -> Handler:
        """The handler serving the browser client's module ``name`` (``pubsub.js`` is served as
        ``/client.js``)."""

        async def client_module(req: Request) -> Response:
            body = self._client.get(name)
            if body is None:
                raise HttpError("not_found", "the browser client is not installed")
            # Pages on other origins import it as a module, which needs CORS.
            return Response(
                200,
                body,
                CONTENT_TYPES[".js"],
                [("access-control-allow-origin", "*"), ("cache-control", "no-cache")],
            )

        return client_module

    def page(self, name: str) -> Handler:
        async def page(req: Request) -> Response:
            body = self._static.get(name)
            if body is None:
                raise HttpError("not_found", f"{name} is not installed")
            return Response(200, body, _content_type(name), [*_PAGE_HEADERS])

        return page

    @staticmethod
    def redirect(location: str) -> Handler:
        async def redirect(req: Request) -> Response:
            target = location + (f"?{req.query}" if req.query else "")
            return Response(308, b"", "text/plain", [("location", target)])

        return redirect

    async def asset(self, req: Request) -> Response:
        name = req.path[len("/static/") :]
        body = self._static.get(name) if _ASSET_NAME.match(name) else None
        if body is None:
            raise HttpError("not_found", f"no such asset: {name}")
        return Response(200, body, _content_type(name), [("cache-control", "no-cache")])
