"""A page on an origin of its own, served by a throwaway HTTP server in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
