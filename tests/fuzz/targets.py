"""What the broker's input-facing layers promise for arbitrary bytes, as one function that a
coverage-guided fuzzer (atheris, ``fuzz_atheris.py``) and Hypothesis (``test_fuzz.py``) both
drive.

:func:`check` takes raw bytes: the first byte picks a target, the rest is its input. Each
target asserts the layer's contract: only its documented exception escapes, and every refusal
is one the protocol documents. Any other exception, or a failed assertion, is a finding.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable

import attrs
import jwt

from broker import protocol
from broker.auth import Identity, TokenVerifier
from broker.config import AuthConfig, parse_config
from broker.errors import AuthError, ConfigError, FrameError, WebSocketViolation
from broker.frames import FrameReader, Ping
from broker.handshake import Accept, Reject, evaluate
from broker.topics import SubscriptionIndex, validate_pattern, validate_topic

SECRET = "f" * 40
VERIFIER = TokenVerifier(AuthConfig(jwt_secret=SECRET))
FRAME_ERROR_CODES = {code.value for code in protocol.ErrorCode}
REFUSALS = {400, 401, 403, 404, 503}
AUTH_REASONS = {
    "malformed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
    "missing_claim",
    "bad_claims",
}


def command(data: bytes) -> None:
    """A client frame: parsed, or refused with a documented code and a JSON error reply.

    Text frames are what reach the JSON parser; one input in eight stays a binary frame."""
    frame: str | bytes = data if data[:1] == b"\x00" else data.decode("utf-8", "replace")
    try:
        cmd = protocol.parse_command(frame)
    except FrameError as exc:
        assert exc.code in FRAME_ERROR_CODES, exc.code
        # The reply can be sent: valid JSON, and UTF-8 (no lone surrogate from the frame).
        json.loads(protocol.encode_error(exc.frame_id, exc.code, exc.message).encode())
    else:
        # Whatever the command carries can be echoed, published or answered in UTF-8.
        values = (
            (cmd.id, cmd.topic, cmd.data) if type(cmd) is protocol.Publish else attrs.astuple(cmd)
        )
        for value in values:
            if isinstance(value, str):
                value.encode()
        protocol.encode_reply(cmd.id).encode()


def frame_reader(data: bytes) -> None:
    """Raw bytes after an upgrade, fed in chunks: the reader hands out messages within the
    limit, pings and close frames with a code a peer may send, or refuses the stream with
    1002, 1007 or 1009 and nothing else."""
    reader = FrameReader(1000)
    try:
        for i in range(0, len(data), 7):
            reader.feed(data[i : i + 7])
            while (event := reader.next()) is not None:
                if isinstance(event, str):
                    assert len(event.encode()) <= 1000
                elif isinstance(event, bytes):
                    assert len(event) <= 1000
                elif isinstance(event, Ping):
                    assert len(event.payload) <= 125
                else:
                    assert event.code == 1005 or 1000 <= event.code <= 4999
    except WebSocketViolation as exc:
        assert exc.code in {1002, 1007, 1009}, exc.code


def upgrade(data: bytes) -> None:
    """An upgrade request's target, headers and subprotocols: accepted, or refused with a
    documented status and a JSON body."""
    lines = data.decode("latin-1").split("\n")
    target, rest = lines[0], lines[1:]
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, _, value in (line.partition(":") for line in rest if ":" in line)
    ]
    subprotocols = tuple(line for line in rest if ":" not in line)
    verdict = evaluate(
        target,
        headers,
        subprotocols,
        allowed_origins=("https://app.example.com",),
        verifier=VERIFIER,
        at_capacity=len(data) % 17 == 0,
    )
    if isinstance(verdict, Reject):
        assert verdict.status in REFUSALS, verdict
        json.loads(verdict.body())
    else:
        assert isinstance(verdict, Accept)


def _verify(token: str) -> None:
    try:
        identity = VERIFIER.verify(token)
    except AuthError as exc:
        assert exc.status == 401 and exc.reason in AUTH_REASONS, (exc.status, exc.reason)
    else:
        assert isinstance(identity, Identity)
        assert identity.client
        identity.client.encode()  # it goes into a welcome frame: valid UTF-8


def token(data: bytes) -> None:
    """Arbitrary text as a token: an identity, or a 401 with a documented reason."""
    _verify(data.decode("latin-1"))


def claims(data: bytes) -> None:
    """A correctly signed token with arbitrary JSON claims: still an identity or a 401 (the
    signature being right must not let malformed claims through as a crash)."""
    try:
        body = json.loads(data)
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    body.setdefault("exp", int(time.time()) + 60)
    try:
        encoded = jwt.encode(body, SECRET, algorithm="HS256")
    except (TypeError, ValueError):
        return  # PyJWT itself refuses to encode these claims
    _verify(encoded)


def topics(data: bytes) -> None:
    """Topics and patterns: valid ones index and match; invalid ones raise FrameError."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for n, text in enumerate(data.decode("latin-1").split("\n")):
        added = False
        try:
            validate_pattern(text)
        except FrameError as exc:
            assert exc.code in FRAME_ERROR_CODES
        else:
            added = index.add(text, n)
        try:
            validate_topic(text)
        except FrameError as exc:
            assert exc.code in FRAME_ERROR_CODES
        else:
            # a topic is also a pattern that matches itself
            assert not added or n in set(index.match(text))


def config(data: bytes) -> None:
    """A configuration file: a Config, or a ConfigError that names the key at fault."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    try:
        parse_config(raw, env={})
    except ConfigError as exc:
        assert exc.key, exc


TARGETS: list[Callable[[bytes], None]] = [
    command,
    frame_reader,
    upgrade,
    token,
    claims,
    topics,
    config,
]


def check(data: bytes) -> None:
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


#: Starting points for the coverage-guided fuzzer: one well-formed input per target.
SEEDS: list[bytes] = [
    bytes([0])
    + b'{"op": "subscribe", "topic": "a.*", "id": 1, "since": {"offset": 3, "epoch": "e"}}',
    bytes([0]) + b'{"op": "publish", "topic": "a.b", "data": {"x": [1, 2]}, "id": "p"}',
    bytes([0]) + b'{"op": "history", "topic": "a.b", "limit": 5, "since": {"offset": 1}}',
    bytes([0]) + b'{"op": "history", "topic": "a.b", "last": 5, "since": {"offset": 1}}',
    bytes([0]) + b'{"op": "unsubscribe", "topic": "a.b", "id": 2}',
    bytes([0]) + b'{"op": "presence", "topic": "a.b", "id": 3}',
    bytes([0]) + b'{"op": "auth", "token": "t", "id": 4}',
    bytes([0]) + b'{"op": "ping", "id": 5}',
    bytes([1]) + b"GET /ws HTTP/1.1|\x81\x85abcd\x01\x02\x03\x04\x05\x82\xfe\x04\x00",
    bytes([2]) + b"/ws?token=x\norigin:https://app.example.com\npubsub.v1",
    bytes([3]) + b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig",
    bytes([4]) + b'{"sub": "alice", "pubsub": {"publish": ["a.>"], "subscribe": ["!a.b"]}}',
    bytes([5]) + b"a.b.c\na.*.>\n>\n*.x",
    bytes([6]) + b'[server]\nworkers = 2\nlisten = "127.0.0.1:0"\n[limits]\nmax_connections = 5\n',
]
