"""Protocol v1, without I/O: client frames in, commands out; replies and pushes in, bytes out.

Theory of operation
-------------------
:func:`parse_command` turns the text of one client frame into one of the small frozen command
classes below, or raises :class:`~broker.errors.FrameError` carrying the error code to answer
with and the frame's ``id`` when it could be read. Nothing here touches a socket or a clock, so
the whole layer is tested (and fuzzed) with plain function calls.

JSON lets a string carry a lone surrogate (``"\\ud800"``), which Python decodes but which no
UTF-8 frame can carry back: a frame holding one anywhere (its ``id``, a topic, publish
``data``) is refused as a whole with ``bad_request``, so nothing later fails while encoding a
reply or a publication. The check costs a scan only for frames with a ``\\u`` escape in them.

On the way out, :func:`encode_reply`, :func:`encode_error` and the push encoders build the JSON
text of a frame, and :func:`frame_text` wraps it in an unmasked WebSocket text frame. A
publication is encoded and framed once (:func:`encode_message`) and the same bytes are written
to every subscriber.
"""

from __future__ import annotations

import enum
import json
import json.scanner
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
    "encode_published",
    "encode_reply",
    "encode_skipped",
    "encode_welcome",
    "frame_text",
    "is_valid_unicode",
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
    TRY_AGAIN_LATER = 1013
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


class Publish:
    """A publication, the one command made per publication: a plain class, not attrs, so that
    compiled it is a native one (mypyc leaves an attrs class a Python class, whose frozen
    ``__init__`` costs 0.35 µs against 0.02). Immutable as the attrs commands are: ``Final``
    for the type checker, read-only attributes once compiled."""

    __slots__ = ("data", "id", "topic")

    def __init__(self, id: FrameId, topic: str, data: str) -> None:
        self.id: Final = id
        self.topic: Final = topic
        self.data: Final = data  # the JSON text of the value, encoded once here

    def __eq__(self, other: object) -> bool:
        if type(other) is not Publish:
            return NotImplemented
        return (self.id, self.topic, self.data) == (other.id, other.topic, other.data)

    def __hash__(self) -> int:
        return hash((self.id, self.topic, self.data))

    def __repr__(self) -> str:
        return f"Publish(id={self.id!r}, topic={self.topic!r}, data={self.data!r})"


@attrs.frozen
class History:
    """At most ``limit`` publications after ``since``: the oldest ones, or with ``newest``
    (the frame's ``last``) the newest ones."""

    id: FrameId
    topic: str
    since: Since | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    newest: bool = False


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


# json.loads without its three Python-level steps around the C scanner (a type check, the
# decoder's decode and raw_decode, and a whitespace regex twice): a client's frame rarely has
# whitespace around it, and when it has, or is not JSON, json.loads takes it over.
# (typeshed types the scanner's context as a scanner; it is the decoder whose options it reads)
_scan: Final = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def _loads(text: str) -> Any:
    """``json.loads(text)``, the same value or the same exception, sooner."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # leading whitespace, or not JSON: json.loads says which
        return json.loads(text)
    if end != len(text):  # trailing whitespace, or more after the value (refused there)
        return json.loads(text)
    return value


# The usual publication, as both SDKs write it: these keys in this order, no whitespace, an
# integer id last if any. It is read without the scanner's dict of the whole frame: string
# comparisons for the op, the topic and the id, the scanner for the data alone. What
# _usual_publish returns is what the general path returns for the same text (a property test
# compares them); it leaves everything else to that path: other keys, order or spacing, an
# escape anywhere (a lone surrogate needs one, and without any the text of a string is what
# the encoder writes for it), an id that is not a plain integer, data that is not JSON.
_PUBLISH_HEAD: Final = '{"op":"publish","topic":"'
_TOPIC_START: Final = len(_PUBLISH_HEAD)
_DATA_KEY: Final = '","data":'
_ID_KEY: Final = ',"id":'


def _usual_publish(text: str) -> Publish | None:
    """The :class:`Publish` of ``text`` if it is the usual publication (above), else None."""
    if not text.startswith(_PUBLISH_HEAD) or "\\" in text:
        return None
    quote = text.find('"', _TOPIC_START)  # no escape: the topic's end
    if quote < 0 or not text.startswith(_DATA_KEY, quote):
        return None
    topic = text[_TOPIC_START:quote]
    if not topic.isprintable():  # a control character, refused there as invalid JSON
        return None
    start = quote + len(_DATA_KEY)
    last = len(text) - 1
    try:
        data, end = _scan(text, start)
        if text[last] != "}":
            return None
        fid: int | None = None
        if end != last:
            if not text.startswith(_ID_KEY, end):
                return None
            fid = _plain_int(text[end + len(_ID_KEY) : last])
            if fid is None:
                return None
        # Without an escape a string's text is the encoder's: the frame's own slice.
        encoded = text[start:end] if type(data) is str else _dumps(data)
    except (StopIteration, ValueError, RecursionError):  # the general path says what is wrong
        return None
    return Publish(fid, topic, encoded)


def _plain_int(text: str) -> int | None:
    """``text`` as an int if it is a JSON integer of at most 18 digits (within 64 bits)."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        return None
    if digits[0] == "0" and len(digits) > 1:  # JSON has no leading zeros
        return None
    return int(text)


def is_valid_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _holds_lone_surrogate(frame: dict[str, Any]) -> bool:
    """Whether any string in ``frame`` (keys too, at any depth) holds a lone surrogate."""
    try:
        # ensure_ascii=False keeps a surrogate as it is, so the UTF-8 encoding finds it.
        text = _dumps(frame)
    except (ValueError, RecursionError):
        return False  # NaN and the like: refused by the field checks, with their own message
    return not is_valid_unicode(text)


def _read_id(frame: dict[str, Any]) -> FrameId:
    fid = frame.get("id")
    if fid is None:
        return None
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


def _history(frame: dict[str, Any], fid: FrameId) -> History:
    """A ``history`` frame: ``limit`` (the oldest N) or ``last`` (the newest N), not both."""
    newest = "last" in frame
    if newest and "limit" in frame:
        raise FrameError("bad_request", "'last' and 'limit' exclude each other", fid)
    name = "last" if newest else "limit"
    count = frame.get(name, DEFAULT_HISTORY_LIMIT)
    if isinstance(count, bool) or not isinstance(count, int):
        raise FrameError("bad_request", f"field {name!r} must be an integer", fid)
    if not 1 <= count <= MAX_HISTORY_LIMIT:
        raise FrameError("bad_request", f"{name!r} must be 1 to {MAX_HISTORY_LIMIT}", fid)
    return History(fid, _field(frame, "topic", str, fid), _since(frame, fid), count, newest)


def parse_command(text: str | bytes) -> Command:
    """Parse one client frame.

    Raises :class:`FrameError` with code ``bad_request`` for binary frames, invalid JSON,
    non-objects, unknown ops and missing or mistyped fields. Topic syntax is *not* checked
    here (the session knows whether a wildcard is allowed): see :mod:`broker.topics`.
    """
    if not isinstance(text, str) and isinstance(text, bytes | bytearray):  # text: one test
        raise FrameError("bad_request", "binary frames are not supported; send JSON text frames")
    usual = _usual_publish(text)
    if usual is not None:
        return usual
    return _parse_frame(text)


def _parse_frame(text: str) -> Command:
    """:func:`parse_command` of any text frame, through the scanner's dict of it."""
    try:
        frame = _loads(text)
    except (ValueError, RecursionError):
        raise FrameError("bad_request", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("bad_request", "frame must be a JSON object")
    fid = _read_id(frame)
    # A lone surrogate can only arrive as a \u escape: the frame's text itself is UTF-8.
    if "\\u" in text and _holds_lone_surrogate(frame):
        if isinstance(fid, str) and not is_valid_unicode(fid):
            fid = None  # an id that cannot be echoed back
        raise FrameError(
            "bad_request",
            "frame holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
            "strings must be valid Unicode",
            fid,
        )
    op = frame.get("op")
    if not isinstance(op, str):
        raise FrameError("bad_request", "missing field 'op'", fid)
    try:
        if op == "publish":  # the hot path: checks inlined where they pass
            topic = frame.get("topic")
            if type(topic) is not str:
                topic = _field(frame, "topic", str, fid)  # raises what is wrong
            if "data" not in frame:
                raise FrameError("bad_request", "missing field 'data'", fid)
            data = frame["data"]
            if type(data) is str:
                return Publish(fid, topic, _dumps_str(data))  # what _dumps writes for a str
            try:
                return Publish(fid, topic, _dumps(data))
            except (ValueError, RecursionError):
                raise FrameError("bad_request", "'data' is not encodable JSON", fid) from None
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
            return _history(frame, fid)
        if op == "presence":
            return Presence(fid, _field(frame, "topic", str, fid))
    except FrameError as exc:
        exc.frame_id = fid
        raise
    raise FrameError("bad_request", f"unknown op {op[:32]!r}; ops are {', '.join(_OPS)}", fid)


def check_data_size(data: str, limit: int) -> None:
    """Raise :class:`FrameError` (``too_large``) if the JSON text ``data`` of a publication is
    over ``limit`` UTF-8 bytes, or ``bad_request`` if it holds a lone surrogate (it could never
    be sent). Shared by the WebSocket and the HTTP publish paths."""
    try:
        size = len(data) if data.isascii() else len(data.encode())
    except UnicodeEncodeError:
        raise FrameError(
            "bad_request", "data holds a lone surrogate; strings must be valid Unicode"
        ) from None
    if size > limit:
        raise FrameError("too_large", f"data is {size} bytes encoded; the limit is {limit}")


def encode_reply(frame_id: FrameId, **fields: Any) -> str:
    """A success reply: ``{"id": ..., "ok": true, **fields}``."""
    return _dumps({"id": frame_id, "ok": True, **fields})


def encode_published(frame_id: FrameId, offset: int, epoch: str) -> str:
    """A publication's success reply, ``encode_reply(frame_id, offset=offset, epoch=epoch)``
    to the byte, written without building a dict (one per publication with an ``id``)."""
    if type(frame_id) is int:
        fid = int.__repr__(frame_id)  # what json writes for an int
    elif type(frame_id) is str:
        fid = _dumps_str(frame_id)
    else:
        fid = _dumps(frame_id)
    return f'{{"id":{fid},"ok":true,"offset":{offset},"epoch":{_dumps_str(epoch)}}}'


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
    fro = "null" if sender is None else _dumps_str(sender)  # once per publication: inlined
    return (
        f'{{"op":"message","topic":{_dumps_str(topic)},"offset":{offset},'
        f'"epoch":{_dumps_str(epoch)},"from":{fro},"data":{data}}}'
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
