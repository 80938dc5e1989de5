"""The WebSocket layer's budgets against the real broker, with one worker and with two: floods
of empty and 1-byte fragments, a message that never finishes, frames pipelined behind the
upgrade request, the close after a violation, and the request head split every way. A
bystander on the same broker keeps being answered throughout."""

from __future__ import annotations

import json
import select
import socket
import struct
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.http.brokerkit import http
from tests.support.broker import BrokerProcess
from tests.support.rawws import FrameReader, encode_frame, handshake, http_request, read_response

MAX_FRAGMENTS = 1024  # broker.frames.MAX_FRAGMENTS, as a client must learn it: from the docs
MAX_REQUEST_HEAD = 16384


def tree_rss(pid: int) -> int:
    """Resident memory of the broker's whole process tree (supervisor and workers)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


def violations(b: BrokerProcess) -> dict[str, float]:
    """``pubsub_ws_violations_total`` by kind, summed over workers."""
    status, _, body = http(b, "GET", "/metrics", key=None)
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "pubsub_ws_violations_total":
                kind = sample.labels["kind"]
                out[kind] = out.get(kind, 0) + sample.value
    return out


class Conn:
    """A raw, upgraded connection."""

    def __init__(self, b: BrokerProcess, sub: str) -> None:
        status, _, rest, self.sock = handshake(b.port, f"/ws?token={b.token(sub)}")
        assert status == 101
        self.reader = FrameReader(self.sock, rest)
        assert self.reader.json()["op"] == "welcome"
        self.close: tuple[int, str] | None = None  # the server's close frame, once read

    def ping(self, i: int) -> None:
        """A ``ping`` op, answered (the socket's timeout bounds the wait)."""
        self.sock.sendall(encode_frame(json.dumps({"op": "ping", "id": i}).encode()))
        assert self.reader.json() == {"id": i, "ok": True}

    def closed(self) -> bool:
        """Read what the server has sent so far (pongs are dropped): whether its close
        frame came."""
        while self.close is None and (self.reader.buf or select.select([self.sock], [], [], 0)[0]):
            self._next()
        return self.close is not None

    def close_frame(self) -> tuple[int, str]:
        """Read past pongs to the close frame: its code and reason."""
        while self.close is None:
            self._next()
        return self.close

    def _next(self) -> None:
        opcode, payload = self.reader.frame()
        if opcode == 0x8:
            self.close = struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def flood(conns: list[Conn], chunk: bytes, rounds: int, bystander: Conn) -> None:
    """Send ``chunk`` on every connection in turn, ``rounds`` times or until the server
    answers it (a close frame, or pongs: read later), the bystander pinging in between."""
    live = list(conns)
    for r in range(rounds):
        for c in list(live):
            if c.closed():
                live.remove(c)
                continue
            try:
                c.sock.sendall(chunk)
            except OSError:
                live.remove(c)
        bystander.ping(r)
        if not live:
            return


def test_fragment_floods_are_closed_with_1009_and_memory_stays_bounded(
    tmp_path: Path, workers: int
) -> None:
    with BrokerProcess.start(tmp_path, workers=workers) as b:
        bystander = Conn(b, "bystander")
        bystander.ping(-1)
        baseline = tree_rss(b.pid)
        attackers = [Conn(b, f"attacker{i}") for i in range(40)]
        for c in attackers:
            c.sock.sendall(encode_frame(b"", 0x1, fin=False))
        half = len(attackers) // 2
        # Empty continuation frames on half of them, 1-byte ones on the others, a ping among
        # every hundred frames; far more than a message may have.
        empty = encode_frame(b"", 0x0, fin=False) * 100 + encode_frame(b"p", 0x9)
        tiny = encode_frame(b"x", 0x0, fin=False) * 100 + encode_frame(b"p", 0x9)
        flood(attackers[:half], empty, 200, bystander)
        flood(attackers[half:], tiny, 200, bystander)
        for c in attackers:
            c.sock.settimeout(5)
            assert c.close_frame() == (1009, "too many fragments")
        growth = tree_rss(b.pid) - baseline
        bystander.ping(10_000)
        assert growth < 32 * 1024 * 1024, growth
        assert violations(b).get("fragments") == len(attackers)
        for c in [*attackers, bystander]:
            c.sock.close()


def test_a_message_that_never_finishes_is_closed_at_its_deadline(
    tmp_path: Path, workers: int
) -> None:
    with BrokerProcess.start(
        tmp_path, {"timeouts": {"message_timeout": 1.0}}, workers=workers
    ) as b:
        bystander = Conn(b, "bystander")
        attacker = Conn(b, "attacker")
        attacker.sock.sendall(encode_frame(b'{"op":', 0x1, fin=False))
        # A byte and a ping at a time: each is answered or taken, none extends the deadline.
        piece = encode_frame(b" ", 0x0, fin=False) + encode_frame(b"p", 0x9)
        for i in range(100):
            if attacker.closed():
                break
            attacker.sock.sendall(piece)
            bystander.ping(i)
            select.select([attacker.sock], [], [], 0.1)
        assert attacker.close_frame() == (1008, "message not completed within 1 s")
        bystander.ping(1000)
        assert violations(b).get("message_timeout") == 1
        attacker.sock.close()
        bystander.sock.close()


def test_frames_pipelined_behind_the_upgrade_request_are_answered(
    any_broker: BrokerProcess,
) -> None:
    b = any_broker
    pings = b"".join(encode_frame(json.dumps({"op": "ping", "id": i}).encode()) for i in range(3))
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(http_request(f"/ws?token={b.token('eager')}", port=b.port) + pings)
        status, _, rest = read_response(sock)
        assert status == 101
        reader = FrameReader(sock, rest)
        assert reader.json()["op"] == "welcome"
        assert [reader.json() for _ in range(3)] == [{"id": i, "ok": True} for i in range(3)]


def test_after_a_violation_the_server_closes_tcp_first(any_broker: BrokerProcess) -> None:
    c = Conn(any_broker, "rude")
    with c.sock:
        c.sock.sendall(encode_frame(b'{"op":"ping"}', masked=False))
        assert c.close_frame()[0] == 1002
        # End of file right behind the close frame, though this client neither answers nor
        # closes: not after the 2 s the server once gave it.
        c.sock.settimeout(1.5)
        assert c.reader.buf == b"" and c.sock.recv(1) == b""


def head_of_size(b: BrokerProcess, size: int) -> bytes:
    """An upgrade request whose head is exactly ``size`` bytes long."""
    path = f"/ws?token={b.token('h')}"
    pad = size - len(http_request(path, {"X-Pad": ""}, port=b.port))
    request = http_request(path, {"X-Pad": "p" * pad}, port=b.port)
    assert len(request) == size
    return request


def test_the_request_head_limit_holds_however_it_is_split(any_broker: BrokerProcess) -> None:
    b = any_broker
    for size, status in ((MAX_REQUEST_HEAD, 101), (MAX_REQUEST_HEAD + 1, 431)):
        for step in (1, 1000, size):
            request = head_of_size(b, size)
            with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(0, size, step):
                    sock.sendall(request[i : i + step])
                got, _, body = read_response(sock)
                assert (got, step) == (status, step)
                if status == 431:
                    assert json.loads(body)["error"]["code"] == "bad_request"
                    assert sock.recv(1) == b""  # closed by the server
    assert violations(b).get("request_head") == 3


def test_a_non_ascii_host_gets_400_and_no_traceback(any_broker: BrokerProcess) -> None:
    b = any_broker
    request = http_request(f"/ws?token={b.token('h')}", port=b.port)
    request = request.replace(f"Host: 127.0.0.1:{b.port}".encode(), "Host: bücher.example".encode())
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(request)
        status, _, body = read_response(sock)
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_request"
    Conn(b, "after").ping(1)  # the worker is fine
    assert not b.events("connection_failed")
