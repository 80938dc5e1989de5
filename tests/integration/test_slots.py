"""Connection slots and odd input, from outside against the real broker (one worker and two):
connections that never authenticate cannot keep a client with a token out, one client id
cannot take every slot, a token signed for another key type is a 401, and lone surrogates
get a bad_request. Each test bounds its own connections and closes them."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.broker import API_KEY, BrokerProcess
from tests.support.rawws import FrameReader, encode_frame, handshake, http_request


def metric(b: BrokerProcess, name: str, **labels: str) -> float:
    """The sum over workers of ``name``'s samples with ``labels``."""
    with urllib.request.urlopen(f"{b.http_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def welcome_or_close(sock: socket.socket, rest: bytes) -> dict[str, Any] | int:
    """The first frame after a 101: the welcome (as JSON), or the close code."""
    reader = FrameReader(sock, rest)
    while True:
        opcode, payload = reader.frame()
        if opcode == 0x1:
            return json.loads(payload)  # type: ignore[no-any-return]
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


def auth_in_band(b: BrokerProcess, opened: list[socket.socket], token: str) -> tuple[str, int]:
    """Upgrade without a token, send an auth op: its error code, then the close code."""
    status, _, rest, s = handshake(b.port)
    opened.append(s)
    assert status == 101
    s.sendall(encode_frame(json.dumps({"op": "auth", "token": token, "id": 1}).encode()))
    reader = FrameReader(s, rest)
    reply = reader.json()
    assert reply["id"] == 1 and not reply["ok"], reply
    return reply["error"]["code"], reader.close_code()


def test_unauthenticated_connections_cannot_lock_out_a_client_with_a_token(
    tmp_path: Path, workers: int
) -> None:
    pending = 20
    config = {
        # Far fewer authenticated slots than attackers: connections that never authenticate
        # must not take them (they used to, and clients with tokens then got 503).
        "limits": {"max_pending_connections": pending, "max_connections": 10},
        # Nothing expires by itself during the test: only the pending budget makes room.
        "timeouts": {"handshake_timeout": 60.0, "auth_timeout": 60.0},
    }
    per_kind = 3 * pending * workers
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, sockets() as opened:
        # Upgraded without a token, never sending an auth op (the oldest, dropped first).
        unauthenticated = []
        for _ in range(per_kind):
            status, _, _, s = handshake(b.port)
            assert status == 101
            opened.append(s)
            unauthenticated.append(s)
        # Half-sent upgrades: a request line and nothing more.
        half = http_request("/ws", port=b.port)[:20]
        for _ in range(per_kind):
            s = socket.create_connection(("127.0.0.1", b.port))
            s.sendall(half)
            opened.append(s)
        # A client with a token still gets in, each time.
        for i in range(5):
            status, _, rest, s = handshake(b.port, f"/ws?token={b.token(f'legit{i}')}")
            opened.append(s)
            assert status == 101
            welcome = welcome_or_close(s, rest)
            assert isinstance(welcome, dict) and welcome["client"] == f"legit{i}", welcome
        # The oldest unauthenticated session was dropped with 1013 (try again later), not
        # with 4001 (which clients take as a refused token).
        unauthenticated[0].settimeout(10)
        assert FrameReader(unauthenticated[0]).close_code() == 1013
        # Every connection that never authenticated, beyond the budget, was dropped and
        # counted (the clients with tokens left the pending set when admitted).
        assert metric(b, "pubsub_connections_pending") <= pending * workers
        refused = metric(b, "pubsub_connections_refused_total", reason="pending")
        assert refused >= 2 * per_kind - pending * workers, refused
        assert not b.events("connection_failed")


def test_one_client_id_cannot_take_every_slot(tmp_path: Path, workers: int) -> None:
    limit = 2
    config = {"limits": {"max_connections_per_client": limit}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, sockets() as opened:
        token = b.token("alice")
        per_worker: dict[int, int] = {}
        refused = 0
        # Until every worker holds `limit` of alice's connections (the limit is per worker).
        for _ in range(60):
            status, _, rest, s = handshake(b.port, f"/ws?token={token}")
            opened.append(s)
            assert status == 101
            first = welcome_or_close(s, rest)
            if isinstance(first, dict):
                per_worker[first["worker"]] = per_worker.get(first["worker"], 0) + 1
            else:
                assert first == 4029  # no welcome: closed at once
                refused += 1
            if sum(per_worker.values()) == limit * workers and refused >= 2:
                break
        assert sorted(per_worker.values()) == [limit] * workers, per_worker
        # In-band authentication is refused the same way, with an error reply first.
        assert auth_in_band(b, opened, token) == ("rate_limited", 4029)
        refused += 1
        # Another client is not affected.
        status, _, rest, s = handshake(b.port, f"/ws?token={b.token('bob')}")
        opened.append(s)
        first = welcome_or_close(s, rest)
        assert isinstance(first, dict) and first["client"] == "bob"
        assert metric(b, "pubsub_connections_refused_total", reason="per_client") == refused
        # A connection that ends gives its slot back.
        for s in opened:
            s.close()
        opened.clear()
        deadline = time.monotonic() + 10
        while metric(b, "pubsub_connections") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _, rest, s = handshake(b.port, f"/ws?token={token}")
        opened.append(s)
        assert isinstance(welcome_or_close(s, rest), dict)


def test_a_token_for_another_key_type_is_unauthorized(tmp_path: Path, workers: int) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "rsa.pem"
    key_file.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = {"auth": {"jwt_secret": "", "jwt_public_key_file": str(key_file)}}
    claims = {"sub": "k", "exp": int(time.time()) + 600}
    es256 = jwt.encode(claims, ec_key, algorithm="ES256")
    with BrokerProcess.start(tmp_path, config, workers=workers) as b, sockets() as opened:
        # At the upgrade: 401 with the documented body.
        status, _, body, s = handshake(b.port, f"/ws?token={es256}")
        opened.append(s)
        assert status == 401
        assert json.loads(body)["error"]["code"] == "unauthorized"
        # In-band: `unauthorized`, then 4001.
        assert auth_in_band(b, opened, es256) == ("unauthorized", 4001)
        # The key's own algorithm works.
        rs256 = jwt.encode(claims, rsa_key, algorithm="RS256")
        status, _, rest, s = handshake(b.port, f"/ws?token={rs256}")
        opened.append(s)
        assert isinstance(welcome_or_close(s, rest), dict)
        assert not b.events("connection_failed") and not b.events("internal_error")


def test_lone_surrogates_are_bad_requests(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(tmp_path, workers=workers) as b, sockets() as opened:
        status, _, rest, s = handshake(b.port)
        opened.append(s)
        assert status == 101
        reader = FrameReader(s, rest)

        def send(text: str) -> dict[str, Any]:
            s.sendall(encode_frame(text.encode()))
            return reader.json()

        # Before authentication, in the id: answered, with no id to echo.
        reply = send('{"op":"auth","token":"x","id":"\\ud800"}')
        assert reply["id"] is None and reply["error"]["code"] == "bad_request", reply
        assert send(json.dumps({"op": "auth", "token": b.token("alice"), "id": 1}))["op"] == (
            "welcome"
        )
        assert reader.json()["id"] == 1  # the auth op's own reply
        # In publish data, a topic, a key: each a bad_request with its id.
        for n, frame in enumerate(
            [
                '{"op":"publish","topic":"t","data":"\\udc00","id":%d}',
                '{"op":"publish","topic":"t","data":{"\\ud800":[1]},"id":%d}',
                '{"op":"subscribe","topic":"a\\ud800","id":%d}',
            ],
            start=10,
        ):
            reply = send(frame % n)
            assert reply["id"] == n and reply["error"]["code"] == "bad_request", reply
        # The connection is still served.
        assert send('{"op":"ping","id":99}')["ok"]
        # The HTTP publish API gives the same answer for the same data.
        request = urllib.request.Request(
            f"{b.http_url}/api/publish",
            data=b'{"topic":"t","data":"\\ud800"}',
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 400
        assert json.loads(info.value.read())["error"]["code"] == "bad_request"
        assert not b.events("connection_failed") and not b.events("internal_error")
