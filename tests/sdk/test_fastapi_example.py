"""examples/fastapi_app.py under a real ASGI server (uvicorn) against the real broker: a request
handler publishes, the app relays its rooms to server-sent-event streams, and its broker client
comes back by itself after the broker is killed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

import client_sdk.sync
from tests.sdk.test_examples import env_for, running
from tests.support.broker import BrokerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def app_server(b: BrokerProcess) -> Iterator[httpx.Client]:
    port = free_port()
    with (
        ExitStack() as stack,
        running("fastapi_app.py", ["--port", str(port)], env_for(b, "webapp")) as proc,
    ):
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        stack.callback(http.close)
        deadline = time.monotonic() + 20
        while True:  # until uvicorn listens and the lifespan has connected to the broker
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if http.get("/openapi.json").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.1)
        yield http
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert "Traceback" not in err, err


class Events:
    """One server-sent-event stream, read frame by frame."""

    def __init__(self, lines: Iterator[str]):
        self._lines = lines

    def next(self) -> dict[str, Any]:
        frame: dict[str, Any] = {}
        for line in self._lines:
            if not line:
                if frame:
                    return frame
                continue
            field, _, value = line.partition(": ")
            frame[field] = value
        raise AssertionError("the stream ended")


@contextmanager
def sse(http: httpx.Client, room: str) -> Iterator[Events]:
    with http.stream("GET", f"/rooms/{room}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = Events(response.iter_lines())
        assert events.next() == {"": "listening"}
        yield events


def test_publish_from_a_handler_and_relay_to_sse_streams(tmp_path: Path) -> None:
    with (
        BrokerProcess.start(tmp_path, {"server": {"shutdown_timeout": 1.0}}) as b,
        app_server(b) as http,
        sse(http, "lobby") as first,
        sse(http, "lobby") as second,
        sse(http, "other") as other,
    ):
        reply = http.post("/rooms/lobby/messages", json={"text": "hi"})
        assert reply.status_code == 200 and reply.json() == {"offset": 1}
        # Another program publishes on the broker directly: the app relays it too.
        with client_sdk.sync.connect(b.url, token=b.token("cli")) as cli:
            cli.publish("chat.lobby", {"text": "from outside"})
            cli.publish("chat.other", {"text": "elsewhere"})
        for stream in (first, second):
            one, two = stream.next(), stream.next()
            body = json.loads(one["data"])
            assert one["id"] == "1" and body["text"] == "hi" and body["from"] == "webapp"
            assert body["room"] == "lobby" and body["at"].startswith("20")  # a datetime
            assert json.loads(two["data"])["text"] == "from outside"
        assert json.loads(other.next()["data"])["text"] == "elsewhere"

        assert http.post("/rooms/bad..room/messages", json={"text": "x"}).status_code == 400
        assert http.post("/rooms/lobby/messages", json={}).status_code == 422

        b.restart(kill=True)
        gap = first.next()  # the app's client reconnected, and says what may be missing
        assert gap["event"] == "gap"
        assert json.loads(gap["data"])["reason"] == "wildcard_reconnect"
        deadline = time.monotonic() + 15
        while (reply := http.post("/rooms/lobby/messages", json={"text": "back"})).is_error:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.2)
        assert json.loads(first.next()["data"])["text"] == "back"
