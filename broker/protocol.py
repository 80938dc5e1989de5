"""Protocol v1, without I/O: client frames in, commands out; replies and pushes in, bytes out.

Theory of operation
-------------------
:func:`parse_command` turns the text of one client frame into one of the small frozen command
classes below, or raises :class:`~broker.errors.FrameError` carrying the error code to answer
with and the frame's ``id`` when it could be read. Nothing here touches a socket or a clock, so
the whole layer is tested (and fuzzed) with plain function calls.

On the way out, :func:`encode_reply`, :func:`encode_error` and the push encoders build the JSON
text of a frame, and :func:`frame_text` wraps it in an unmasked WebSocket text frame. A
publication is encoded and framed once (:func:`encode_message`) and the same bytes are written
to every subscriber.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final

import attrs

from broker import frames
from broker.errors import FrameError
from broker.frames import PING, TEXT, encode_frame

__all__ = [
    "SUBPROTOCOL",
    "Auth",
    "CloseCode",
    "Command",
    "ErrorCode",
    "History",
    "Ping",
    "Presence",
    "Publish",
    "Since",
    "Subscribe",
    "Unsubscribe",
    "encode_error",
    "encode_history_reply",
    "encode_message",
    "encode_presence_event",
    "encode_reply",
    "encode_skipped",
    "encode_welcome",
    "frame_text",
    "parse_command",
]

SUBPROTOCOL: Final = "pubsub.v1"
MAX_ID_LENGTH: Final = 64
MAX_HISTORY_LIMIT: Final = 1000
DEFAULT_HISTORY_LIMIT: Final = 100


class ErrorCode(enum.StrEnum):
    """The ``error.code`` values of failure replies."""

    BAD_REQUEST = "bad_request"
    BAD_TOPIC = "bad_topic"
    FORBIDDEN = "forbidden"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_LARGE = "too_large"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_TOPICS = "too_many_topics"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    NOT_TRACKED = "not_tracked"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = frames.PROTOCOL_ERROR
    INVALID_DATA = frames.INVALID_DATA
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = frames.MESSAGE_TOO_BIG
    INTERNAL_ERROR = 1011
    NOT_AUTHENTICATED = 4001
    TOKEN_EXPIRED = 4003
    SLOW_CONSUMER = 4008
    IDLE_TIMEOUT = 4009
    TOO_MANY_VIOLATIONS = 4029


FrameId = int | str | None


@attrs.frozen
class Since:
    offset: int
    epoch: str


@attrs.frozen
class Auth:
    id: FrameId
    token: str


@attrs.frozen
class Subscribe:
    id: FrameId
    topic: str
    since: Since | None = None
    presence: bool = False


@attrs.frozen
class Unsubscribe:
    id: FrameId
    topic: str


@attrs.frozen
class Publish:
    id: FrameId
    topic: str
    data: str  # the JSON text of the value, encoded once here


@attrs.frozen
class History:
    id: FrameId
    topic: str
    since: Since | None = None
    limit: int = DEFAULT_HISTORY_LIMIT


@attrs.frozen
class Presence:
    id: FrameId
    topic: str


@attrs.frozen
class Ping:
    id: FrameId


Command = Auth | Subscribe | Unsubscribe | Publish | History | Presence | Ping

_OPS: Final = ("auth", "subscribe", "unsubscribe", "publish", "history", "presence", "ping")


# One encoder, built once: json.dumps with non-default options builds a new one per call.
_dumps: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
# What that encoder writes for a str, without its type dispatch (a publication has three).
_dumps_str: Final = json.encoder.encode_basestring


def _dumps_optional_str(value: str | None) -> str:
    return "null" if value is None else _dumps_str(value)


def _read_id(frame: dict[str, Any]) -> FrameId:
    if "id" not in frame or frame["id"] is None:
        return None
    fid = frame["id"]
    if isinstance(fid, bool) or not isinstance(fid, int | str):
        raise FrameError("bad_request", "'id' must be an integer or a string")
    if isinstance(fid, str) and len(fid) > MAX_ID_LENGTH:
        raise FrameError("bad_request", f"'id' strings are at most {MAX_ID_LENGTH} characters")
    if isinstance(fid, int) and not -(2**63) <= fid < 2**63:
        raise FrameError("bad_request", "'id' integers must fit in 64 bits")
    return fid


def _field(frame: dict[str, Any], name: str, kind: type | tuple[type, ...], fid: FrameId) -> Any:
    if name not in frame:
        raise FrameError("bad_request", f"missing field '{name}'", fid)
    value = frame[name]
    if isinstance(value, bool) and kind is not bool:
        raise FrameError("bad_request", f"field '{name}' has the wrong type", fid)
    if not isinstance(value, kind):
        raise FrameError("bad_request", f"field '{name}' has the wrong type", fid)
    return value


def _since(frame: dict[str, Any], fid: FrameId) -> Since | None:
    raw = frame.get("since")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FrameError("bad_request", "'since' must be an object {offset, epoch}", fid)
    offset = raw.get("offset")
    epoch = raw.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise FrameError("bad_request", "'since.offset' must be an integer >= 0", fid)
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise FrameError("bad_request", "'since.epoch' must be a string", fid)
    return Since(offset, epoch)


def parse_command(text: str | bytes) -> Command:
    """Parse one client frame.

    Raises :class:`FrameError` with code ``bad_request`` for binary frames, invalid JSON,
    non-objects, unknown ops and missing or mistyped fields. Topic syntax is *not* checked
    here (the session knows whether a wildcard is allowed): see :mod:`broker.topics`.
    """
    if isinstance(text, bytes | bytearray):
        raise FrameError("bad_request", "binary frames are not supported; send JSON text frames")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise FrameError("bad_request", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("bad_request", "frame must be a JSON object")
    fid = _read_id(frame)
    op = frame.get("op")
    if not isinstance(op, str):
        raise FrameError("bad_request", "missing field 'op'", fid)
    try:
        if op == "publish":
            topic = _field(frame, "topic", str, fid)
            if "data" not in frame:
                raise FrameError("bad_request", "missing field 'data'", fid)
            try:
                data = _dumps(frame["data"])
            except (ValueError, RecursionError):
                raise FrameError("bad_request", "'data' is not encodable JSON", fid) from None
            return Publish(fid, topic, data)
        if op == "subscribe":
            presence = frame.get("presence", False)
            if not isinstance(presence, bool):
                raise FrameError("bad_request", "field 'presence' must be a boolean", fid)
            return Subscribe(fid, _field(frame, "topic", str, fid), _since(frame, fid), presence)
        if op == "unsubscribe":
            return Unsubscribe(fid, _field(frame, "topic", str, fid))
        if op == "ping":
            return Ping(fid)
        if op == "auth":
            return Auth(fid, _field(frame, "token", str, fid))
        if op == "history":
            limit = frame.get("limit", DEFAULT_HISTORY_LIMIT)
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise FrameError("bad_request", "field 'limit' must be an integer", fid)
            if not 1 <= limit <= MAX_HISTORY_LIMIT:
                raise FrameError("bad_request", f"'limit' must be 1 to {MAX_HISTORY_LIMIT}", fid)
            return History(fid, _field(frame, "topic", str, fid), _since(frame, fid), limit)
        if op == "presence":
            return Presence(fid, _field(frame, "topic", str, fid))
    except FrameError as exc:
        exc.frame_id = fid
        raise
    raise FrameError("bad_request", f"unknown op {op[:32]!r}; ops are {', '.join(_OPS)}", fid)


def check_data_size(data: str, limit: int) -> None:
    """Raise :class:`FrameError` (``too_large``) if the JSON text ``data`` of a publication is
    over ``limit`` UTF-8 bytes. Shared by the WebSocket and the HTTP publish paths."""
    size = len(data) if data.isascii() else len(data.encode())
    if size > limit:
        raise FrameError("too_large", f"data is {size} bytes encoded; the limit is {limit}")


def encode_reply(frame_id: FrameId, **fields: Any) -> str:
    """A success reply: ``{"id": ..., "ok": true, **fields}``."""
    return _dumps({"id": frame_id, "ok": True, **fields})


def encode_error(frame_id: FrameId, code: str, message: str) -> str:
    """A failure reply: ``{"id": ..., "ok": false, "error": {"code", "message"}}``."""
    return _dumps({"id": frame_id, "ok": False, "error": {"code": code, "message": message}})


def encode_welcome(
    client: str,
    expires_at: int | None,
    node: str,
    worker: int,
    ping_interval: float,
    idle_timeout: float,
) -> str:
    return _dumps(
        {
            "op": "welcome",
            "client": client,
            "expires_at": expires_at,
            "node": node,
            "worker": worker,
            "ping_interval": ping_interval,
            "idle_timeout": idle_timeout,
        }
    )


def encode_message(topic: str, offset: int, epoch: str, sender: str | None, data: str) -> str:
    """A publication push. ``data`` is already JSON text and is inserted as is."""
    return (
        f'{{"op":"message","topic":{_dumps_str(topic)},"offset":{offset},'
        f'"epoch":{_dumps_str(epoch)},"from":{_dumps_optional_str(sender)},"data":{data}}}'
    )


def encode_history_reply(frame_id: FrameId, pushes: list[str], **fields: Any) -> str:
    """A ``history`` reply: ``{"id": ..., "ok": true, **fields, "messages": [...]}`` with
    ``pushes`` (texts of :func:`encode_message`) spliced in as they are, so that no
    publication's data is decoded and encoded again (a reply can hold a hundred of 64 KiB)."""
    head = encode_reply(frame_id, **fields)
    return f'{head[:-1]},"messages":[{",".join(pushes)}]}}'


def message_dict(
    topic: str, offset: int, epoch: str, sender: str | None, data: str
) -> dict[str, Any]:
    """The same push as a dict, for embedding in a ``history`` reply."""
    return {
        "op": "message",
        "topic": topic,
        "offset": offset,
        "epoch": epoch,
        "from": sender,
        "data": json.loads(data),
    }


def encode_skipped(topic: str, first: int, last: int, epoch: str) -> str:
    """The ``skipped`` push: offsets ``first``..``last`` of ``topic`` (inclusive, in ``epoch``)
    were published but not sent to this connection, which is behind on a ``latest`` topic."""
    return (
        f'{{"op":"skipped","topic":{_dumps_str(topic)},"from":{first},"to":{last},'
        f'"epoch":{_dumps_str(epoch)}}}'
    )


def encode_presence_event(kind: str, topic: str, client: str) -> str:
    return _dumps({"op": kind, "topic": topic, "client": client})


def frame_text(payload: bytes) -> bytes:
    """Wrap ``payload`` (UTF-8 JSON) in one final, unmasked WebSocket text frame.

    Server frames are not masked, so the result is the same for every recipient and is built
    once per publication.
    """
    return encode_frame(TEXT, payload)


PING_FRAME: Final = encode_frame(PING, b"")
