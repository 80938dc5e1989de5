"""Fair share from outside, against the real broker with one worker and with two: a client that
pipelines a thousand history requests in one write does not lock out a bystander on the same
worker, is refused with rate_limited past its read budget, and once condemned (4029) gets
nothing more of what it had sent.

Raw sockets, so that the whole pipeline leaves in one write."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.support.broker import BrokerProcess
from tests.support.metrics import metric
from tests.support.rawws import FrameReader, close_code, encode_frame, handshake


class Client:
    def __init__(self, sock: socket.socket, reader: FrameReader, welcome: dict[str, Any]) -> None:
        self.sock = sock
        self.reader = reader
        self.worker = welcome["worker"]

    def send(self, *frames: dict[str, Any]) -> None:
        """Every frame in one write."""
        self.sock.sendall(b"".join(encode_frame(json.dumps(f).encode()) for f in frames))

    def next(self) -> dict[str, Any] | int:
        """The next text frame as JSON, or the close frame's code."""
        while True:
            opcode, payload = self.reader.frame()
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]
            if opcode == 0x8:
                return close_code(payload)

    def reply(self) -> dict[str, Any]:
        frame = self.next()
        assert isinstance(frame, dict), f"closed with {frame}"
        return frame


@contextmanager
def clients(b: BrokerProcess) -> Iterator[tuple[Client, Client]]:
    """A bystander and an attacker served by the same worker (with several workers, the
    kernel spreads connections: connect until one lands beside the bystander)."""
    with ExitStack() as stack:

        def connect(sub: str) -> Client:
            status, _, rest, sock = handshake(b.port, f"/ws?token={b.token(sub)}", timeout=60)
            stack.callback(sock.close)
            assert status == 101
            reader = FrameReader(sock, rest)
            return Client(sock, reader, reader.json())

        bystander = connect("bystander")
        for _ in range(64):
            attacker = connect("attacker")
            if attacker.worker == bystander.worker:
                break
        else:
            raise AssertionError("no connection landed on the bystander's worker")
        yield bystander, attacker


def fill(client: Client, topic: str, count: int) -> None:
    """``count`` publications of 500 bytes: every history reply of the topic is about 12 KB."""
    client.send(
        *({"op": "publish", "id": i, "topic": topic, "data": "x" * 500} for i in range(count))
    )
    for _ in range(count):
        assert client.reply()["ok"]


def history_pipeline(n: int) -> list[dict[str, Any]]:
    return [{"op": "history", "id": i, "topic": "t"} for i in range(n)]


def test_a_bystander_is_served_before_a_pipelined_attacker_is_through(
    tmp_path: Path, workers: int
) -> None:
    # A generous queue and read budget: this test is about turns alone.
    big = 64 * 1024 * 1024
    config = {"limits": {"send_queue_max_bytes": big, "read_burst_bytes": big}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, clients(b) as (by, at):
        fill(by, "t", 20)
        n = 800  # about 60 KB of requests: one write, and one read of the broker's
        at.send(*history_pipeline(n))
        first = at.reply()
        assert first["ok"] and first["offset"] == 20
        by.send({"op": "ping", "id": "p"}, {"op": "publish", "id": "q", "topic": "t", "data": 1})
        assert by.reply() == {"id": "p", "ok": True}
        assert by.reply()["offset"] == 21
        offsets = [first["offset"]] + [at.reply()["offset"] for _ in range(n - 1)]
        # Some of the attacker's requests were served after the bystander's publication.
        assert offsets[-1] == 21, "the bystander waited for the attacker's whole pipeline"
        assert offsets == sorted(offsets)
        assert not b.events("internal_error")


def test_an_attacker_is_refused_past_its_read_budget_and_then_served_nothing(
    tmp_path: Path, workers: int
) -> None:
    config = {"limits": {"read_burst_bytes": 50_000, "read_rate_bytes": 1000, "max_violations": 10}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, clients(b) as (by, at):
        fill(by, "t", 20)
        at.send(*history_pipeline(500))
        frames = []
        while isinstance(frame := at.next(), dict):
            frames.append(frame)
        served = [f for f in frames if f["ok"]]
        refused = [f for f in frames if not f["ok"]]
        # About four replies of 12 KB fit the 50 KB burst (the last one overdraws it); then
        # every request is refused, the eleventh refusal is one violation too many, and the
        # rest of the pipeline is never served.
        assert 1 <= len(served) <= 6, len(served)
        assert [f["error"]["code"] for f in refused] == ["rate_limited"] * 11
        assert frames == served + refused
        assert frame == 4029
        assert metric(b, "pubsub_read_refusals_total", op="history") == 11
        # The bystander was never in the way, nor hurt.
        by.send({"op": "history", "id": "h", "topic": "t", "limit": 1})
        assert by.reply()["ok"]
