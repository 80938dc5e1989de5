"""Where the browser tests' pages come from: the broker's own operations listener, or a page on
an origin of its own served by a throwaway HTTP server in a thread.

The broker's pages have the origin ``http://127.0.0.1:HTTP_PORT``; that port is only known once
the broker runs, so :func:`start_web_broker` adds it to ``[server] allowed_origins`` and reloads
the configuration (SIGHUP), as an operator would."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess, to_toml


@contextmanager
def static_site(html: str | Callable[[], str]) -> Iterator[str]:
    """Serve ``html`` (or what ``html()`` returns at each request) at every path of
    ``http://127.0.0.1:PORT``; yields that origin. The server is shut down on exit, even when
    the test fails."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (html() if callable(html) else html).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def allow_origins(b: BrokerProcess, *origins: str) -> None:
    """Rewrite the broker's configuration with these allowed origins and reload it."""
    b.config["server"] = {**b.config.get("server", {}), "allowed_origins": list(origins)}
    b.config_path.write_text(to_toml(b.config))
    b.signal(signal.SIGHUP)
    b.wait_for("reloaded", timeout=10)


@contextmanager
def start_web_broker(
    tmp_path: Path, config: dict[str, Any] | None = None, *, workers: int = 1
) -> Iterator[BrokerProcess]:
    """A broker whose own pages may open WebSockets to it (stopped on exit, even on failure),
    with presence tracked and readable everywhere, as `pubsub-broker dev` configures it."""
    config = {"server": {"shutdown_timeout": 1.0}, **PRESENCE_EVERYWHERE, **(config or {})}
    with BrokerProcess.start(tmp_path, config=config, workers=workers) as b:
        assert b.http_port, "the broker did not report an http_port"
        allow_origins(b, b.http_url)
        yield b


def wait_js(page: Any, expr: str, timeout: float = 15) -> Any:
    """Poll ``expr`` until it is truthy. (Not wait_for_function: the pages' Content Security
    Policy forbids the eval it relies on.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(f"() => ({expr})")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s: {expr}")
        time.sleep(0.05)
