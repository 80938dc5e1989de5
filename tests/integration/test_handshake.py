"""The upgrade against the real broker: every refusal is an HTTP status with a JSON body and
no upgrade; the subprotocol is selected; compression is declined."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess
from tests.support.rawws import FrameReader, encode_frame, handshake, http_request, read_response


def refused(
    b: BrokerProcess, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None
) -> tuple[int, dict[str, object]]:
    status, hdrs, body, sock = handshake(b.port, path, headers)
    sock.close()
    assert status != 101
    assert hdrs.get("content-type") == "application/json"
    return status, json.loads(body)


def test_refusals_are_json_and_never_upgrade(any_broker: BrokerProcess) -> None:
    good = any_broker.token("alice")
    status, body = refused(any_broker, f"/elsewhere?token={good}")
    assert status == 404 and body["error"]["code"] == "not_found"  # type: ignore[index]
    # found by the fuzzer: urlsplit raises on an unclosed IPv6 bracket
    status, body = refused(any_broker, f"//[/ws?token={good}")
    assert status == 400 and body["error"]["code"] == "bad_request"  # type: ignore[index]
    status, body = refused(
        any_broker, f"/ws?token={good}", {"Sec-WebSocket-Protocol": "mqtt, stomp"}
    )
    assert status == 400 and body["error"]["code"] == "bad_request"  # type: ignore[index]
    status, body = refused(any_broker, "/ws?token=forged.token.here")
    assert status == 401 and body["error"]["code"] == "unauthorized"  # type: ignore[index]
    expired = any_broker.token("alice", ttl=-10)
    status, body = refused(any_broker, "/ws", {"Authorization": f"Bearer {expired}"})
    assert status == 401 and "expired" in body["error"]["message"]  # type: ignore[index]
    not_yet = any_broker.token("alice", nbf=int(time.time()) + 600)
    assert refused(any_broker, f"/ws?token={not_yet}")[0] == 401


def test_origin_is_checked_before_the_token(tmp_path: Path, workers: int) -> None:
    config = {"server": {"allowed_origins": ["https://app.example.com"]}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:
        for origin in [
            "https://evil.example",
            "https://app.example.com.evil.com",
            "null",
            "http://app.example.com",
            "https://app.example.com:444",
        ]:
            status, body = refused(b, "/ws?token=garbage", {"Origin": origin})
            assert status == 403, origin
            assert body["error"]["code"] == "forbidden"  # type: ignore[index]
        # the operator can tell which origin to allow from the log line alone
        b.wait_for("rejected", detail="origin 'null' is not allowed", status=403)
        dup = [("Origin", "https://app.example.com"), ("Origin", "https://app.example.com")]
        assert refused(b, f"/ws?token={b.token('a')}", dup)[0] == 400
        status, _, _, sock = handshake(
            b.port, f"/ws?token={b.token('a')}", {"Origin": "https://app.example.com"}
        )
        sock.close()
        assert status == 101


def test_subprotocol_selected_and_compression_declined(any_broker: BrokerProcess) -> None:
    status, hdrs, rest, sock = handshake(
        any_broker.port,
        "/ws",
        {
            "Authorization": f"Bearer {any_broker.token('alice')}",
            "Sec-WebSocket-Protocol": "other, pubsub.v1",
            "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
        },
    )
    with sock:
        assert status == 101
        assert hdrs["sec-websocket-protocol"] == "pubsub.v1"
        assert "sec-websocket-extensions" not in hdrs
        assert FrameReader(sock, rest).json()["op"] == "welcome"


def test_max_connections_gives_503(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, {"limits": {"max_connections": 2}}) as b:
        socks = []
        for _ in range(2):
            status, _, _, s = handshake(b.port, f"/ws?token={b.token('a')}")
            assert status == 101
            socks.append(s)
        status, _, body, s = handshake(b.port, f"/ws?token={b.token('a')}")
        s.close()
        assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"
        for s in socks:
            s.close()


def test_header_abuse_is_refused_quickly(any_broker: BrokerProcess) -> None:
    token = any_broker.token("a")
    many = [(f"X-H{i}", "v") for i in range(300)]
    assert refused(any_broker, f"/ws?token={token}", many)[0] == 400
    status, _, _, sock = handshake(
        any_broker.port, f"/ws?token={token}", {"Sec-WebSocket-Protocol": "p" * 10_000}
    )
    sock.close()
    assert status == 400
    # Larger than the request head may be: refused with 431, and the connection closed.
    sock = socket.create_connection(("127.0.0.1", any_broker.port), timeout=5)
    with sock:
        sock.sendall(
            http_request(f"/ws?token={token}", {"X-Big": "b" * 70_000}, port=any_broker.port)
        )
        status, _, _ = read_response(sock)
        assert status == 431


def test_oversized_frame_closes_with_1009_and_others_continue(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(
        tmp_path, {"limits": {"max_message_size": 1000}}, workers=workers
    ) as b:
        _, _, rest, other = handshake(b.port, f"/ws?token={b.token('b')}")
        other_reader = FrameReader(other, rest)
        other_reader.json()
        _status, _, rest, sock = handshake(b.port, f"/ws?token={b.token('a')}")
        reader = FrameReader(sock, rest)
        reader.json()
        sock.sendall(encode_frame(b'{"op":"publish","topic":"a","data":"' + b"x" * 1000 + b'"}'))
        assert reader.close_code() == 1009
        # A header that claims 2**63 bytes: closed at once, memory untouched.
        _, _, rest, liar = handshake(b.port, f"/ws?token={b.token('c')}")
        liar_reader = FrameReader(liar, rest)
        liar_reader.json()
        liar.sendall(encode_frame(b"", length=2**63 - 1)[:14])
        assert liar_reader.close_code() in (1009, 1002)
        other.sendall(encode_frame(json.dumps({"op": "ping", "id": 1}).encode()))
        assert other_reader.json() == {"id": 1, "ok": True}
        for s in (sock, other, liar):
            s.close()


def test_tokens_never_reach_the_logs(any_broker: BrokerProcess) -> None:
    token = any_broker.token("alice")
    for path, headers in [
        (f"/ws?token={token}", None),
        ("/ws", {"Authorization": f"Bearer {token}"}),
        ("/ws?token=forged.bad.token", None),
    ]:
        _, _, _, sock = handshake(any_broker.port, path, headers)
        sock.close()
    time.sleep(0.3)
    log = any_broker.log_path.read_text()
    assert "connect" in log
    assert token not in log and "forged.bad.token" not in log
    assert token.split(".")[2] not in log


@pytest.mark.parametrize("bad", [b"\xff\xfe not json", b'{"op":"ping","id":'])
def test_bad_text_frames_get_an_error_and_the_connection_stays(
    any_broker: BrokerProcess, bad: bytes
) -> None:
    _, _, rest, sock = handshake(any_broker.port, f"/ws?token={any_broker.token('a')}")
    with sock:
        reader = FrameReader(sock, rest)
        reader.json()
        sock.sendall(encode_frame(bad, opcode=0x2))
        assert reader.json()["error"]["code"] == "bad_request"
        sock.sendall(encode_frame(b'{"op":"ping","id":7}'))
        assert reader.json() == {"id": 7, "ok": True}


def test_a_reload_forgets_remembered_tokens(any_broker: BrokerProcess) -> None:
    """Tokens the workers remember (``[auth] token_cache_size``) are checked again against the
    new key after a reload: a rotated secret refuses the old tokens at once."""
    import signal

    import jwt

    from tests.support.broker import to_toml

    b = any_broker
    token = b.token("alice")

    def status() -> int:
        code, _, _, sock = handshake(b.port, f"/ws?token={token}")
        sock.close()
        return code

    assert [status() for _ in range(8)] == [101] * 8  # remembered by every worker that saw it
    rotated = "rotated-secret-0123456789-abcdefghijklmnopqrstuvw"
    b.config_path.write_text(
        to_toml({**b.config, "auth": {**b.config["auth"], "jwt_secret": rotated}})
    )
    b.signal(signal.SIGHUP)
    b.wait_for("reloaded", timeout=10)
    time.sleep(0.5)  # every worker applies it
    assert [status() for _ in range(8)] == [401] * 8
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, rotated, algorithm="HS256")
    assert status() == 101
