"""The sans-I/O core of the client: frames in and out.

Nothing here performs I/O or knows about trio, so it is tested with plain function calls. The
client moves frames and owns time (the connection loop in ``_connection.py``, requests and
subscriptions in ``_api.py``); this module decides what they mean. Recovery bookkeeping (what a
subscription has seen, and the gaps it reports) is in ``_recovery.py``; when to reconnect and
when to renew a token, in ``_schedule.py``.

Both drivers, trio (``client.py``) and asyncio (``aio.py``), share this core and the
connection logic of :class:`~client_sdk._api.Client`; JSON goes through the application's
``dumps``/``loads`` hooks when it gives them (:class:`Codec`).
"""

from __future__ import annotations

import decimal
import json
import math
import numbers
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any
from urllib.parse import urlsplit

import attrs

from client_sdk.errors import EncodeError
from client_sdk.models import (
    History,
    Message,
    Position,
    PresenceEvent,
    Welcome,
)

SUBPROTOCOL = "pubsub.v1"


class ProtocolViolation(Exception):
    """A frame from the broker that does not follow the protocol (logged and ignored)."""


@attrs.frozen
class Reply:
    """The reply to a request that carried an ``id``."""

    id: int | str | None
    ok: bool
    fields: dict[str, Any]
    error_code: str | None = None
    error_message: str | None = None


@attrs.frozen
class UnknownPush:
    """A push this SDK does not know; kept for forward compatibility (ignored by the client)."""

    op: str
    fields: dict[str, Any]


@attrs.frozen
class Skipped:
    """The ``skipped`` push: offsets ``from_offset``..``to_offset`` of ``topic`` (inclusive, in
    ``epoch``) will not be sent; the next message on the topic is newer."""

    topic: str
    from_offset: int
    to_offset: int
    epoch: str


Incoming = Reply | Welcome | Message | PresenceEvent | Skipped | UnknownPush


Dumps = Callable[[Any], str | bytes]
Loads = Callable[[str | bytes], Any]


def _std_dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@attrs.frozen
class Codec:
    """How frames become JSON text and back: the standard ``json`` module unless the
    application passes ``dumps`` (e.g. ``orjson.dumps``, or ``json.dumps`` with a ``default``)
    or ``loads``. ``dumps`` sees whole frames (``op``, ``topic``, ``data``, ...) and may return
    ``str`` or UTF-8 ``bytes``; it must write NaN and infinities as errors, not as JSON."""

    dumps: Dumps = _std_dumps
    loads: Loads = json.loads


DEFAULT_CODEC = Codec()


def _unencodable(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Where the standard ``json`` module fails on ``value``: (path, culprit) pairs, first one
    first."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                yield f"{path} key {key!r}", key
            yield from _unencodable(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _unencodable(item, f"{path}[{i}]")
    elif (isinstance(value, float) and not math.isfinite(value)) or (
        not isinstance(value, str | int | float | bool) and value is not None
    ):
        yield path, value


def _culprit(data: Any, codec: Codec) -> tuple[str, Any] | None:
    """The first value in ``data`` that ``codec`` cannot encode (of those the standard
    ``json`` module cannot: a ``dumps`` hook may handle some of them), with its place."""
    for path, value in _unencodable(data, "data"):
        if " key " in path:
            return path, value
        try:
            codec.dumps(value)
        except (TypeError, ValueError, OverflowError):
            return path, value
    return None


def encode(frame: dict[str, Any], codec: Codec = DEFAULT_CODEC) -> str:
    """Encode one client frame as the JSON text the broker expects.

    Raises EncodeError (a TypeError and a ValueError) naming the first value that is not JSON
    (its place in ``data`` and its type), and how to encode such values (``dumps=``).
    """
    try:
        text = codec.dumps(frame)
    except (TypeError, ValueError, OverflowError) as exc:
        where = _culprit(frame.get("data"), codec)
        what = f"{where[0]} = {where[1]!r} ({type(where[1]).__name__})" if where else str(exc)
        raise EncodeError(
            f"cannot encode {what} as JSON for {frame.get('op')} on {frame.get('topic')!r}: "
            "pass connect(dumps=...) to encode such values (e.g. orjson.dumps, or "
            "functools.partial(json.dumps, default=client_sdk.json_default))"
        ) from exc
    return text.decode() if isinstance(text, bytes) else text


def json_default(value: Any) -> Any:
    """A ``default`` for ``json.dumps`` that encodes what applications commonly publish:
    dataclasses and attrs classes (as objects), datetimes, dates and times (ISO 8601), UUIDs
    and Decimals (as strings), sets (as lists), enums (their value).

    Raises TypeError for anything else, as ``json`` expects.
    """
    import dataclasses
    import datetime
    import decimal
    import enum
    import uuid

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if attrs.has(type(value)):
        return attrs.asdict(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def rejection(body: bytes | None) -> tuple[str | None, str]:
    """The error ``code`` and ``message`` of the JSON body of an HTTP rejection of the upgrade
    (``{"error": {"code": ..., "message": ...}}``); ``(None, "")`` when it has none."""
    try:
        error = json.loads(body or b"{}").get("error", {})
        return error.get("code"), error.get("message", "")
    except (ValueError, AttributeError):
        return None, ""


@attrs.define(eq=False)
class PendingRequest:
    """One request waiting for its reply. ``on_done`` (the driver's way of waking the waiter)
    is called once, after ``reply`` or ``error`` is set."""

    id: int
    text: str  # the frame as sent
    hook: Callable[[Reply], None] | None  # run by the driver, in frame order, before waking
    on_done: Callable[[], None]
    reply: Reply | None = None
    error: Exception | None = None
    finished: bool = False

    def finish(self, reply: Reply | None = None, error: Exception | None = None) -> None:
        """Set the outcome and wake the waiter; later calls are ignored."""
        if self.finished:
            return
        self.finished = True
        self.reply, self.error = reply, error
        self.on_done()


class Requests:
    """Request ids and reply matching of one client, across its connections: each request
    gets a fresh integer ``id`` (never reused, so a late reply cannot be taken for another
    request's), and a reply finds its request by that ``id``."""

    def __init__(self) -> None:
        self._ids = count(1)
        self._pending: dict[int | str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def open(
        self,
        frame: dict[str, Any],
        codec: Codec,
        on_done: Callable[[], None],
        hook: Callable[[Reply], None] | None = None,
    ) -> PendingRequest:
        """Register ``frame`` under a new id and return it, encoded (raises EncodeError)."""
        rid = next(self._ids)
        pending = PendingRequest(rid, encode({**frame, "id": rid}, codec), hook, on_done)
        self._pending[rid] = pending
        return pending

    def close(self, pending: PendingRequest) -> None:
        """Forget ``pending`` (answered, failed or given up); a later reply is unmatched."""
        if self._pending.get(pending.id) is pending:
            del self._pending[pending.id]

    def match(self, reply: Reply) -> PendingRequest | None:
        """The request ``reply`` answers, if one waits for it."""
        return self._pending.get(reply.id) if reply.id is not None else None

    def fail_all(self, error: Exception, *, too_large: Exception | None = None) -> None:
        """Fail every waiting request with ``error``. ``too_large``: the broker closed with
        1009 (a frame over its ``max_message_size``), so the largest request in flight was
        that frame and was not executed: it fails with ``too_large`` instead of "unknown"."""
        pending, self._pending = self._pending, {}
        if too_large is not None and pending:
            largest = max(pending.values(), key=lambda p: len(p.text.encode()))
            largest.finish(error=too_large)
        for p in pending.values():
            p.finish(error=error)


def since_field(position: Position) -> dict[str, Any]:
    """The ``since`` object of a subscribe or history request."""
    return {"offset": position.offset, "epoch": position.epoch}


def subscribe_frame(topic: str, since: Position | None, presence: bool) -> dict[str, Any]:
    """The ``subscribe`` request (without ``id``); ``since`` must name its epoch."""
    frame: dict[str, Any] = {"op": "subscribe", "topic": topic}
    if since is not None:
        frame["since"] = since_field(since)
    if presence:
        frame["presence"] = True
    return frame


def history_frame(
    topic: str, since: Position | None, limit: int | None, last: int | None
) -> dict[str, Any]:
    """The ``history`` request (without ``id``): at most ``limit`` publications after
    ``since``, the oldest ones, or the newest ``last`` ones. ``since`` must name its epoch.

    Raises ValueError when both ``limit`` and ``last`` are given (the broker would refuse it
    with ``bad_request``)."""
    if limit is not None and last is not None:
        raise ValueError("history takes 'limit' (the oldest N) or 'last' (the newest N), not both")
    frame: dict[str, Any] = {"op": "history", "topic": topic}
    if since is not None:
        frame["since"] = since_field(since)
    if limit is not None:
        frame["limit"] = limit
    if last is not None:
        frame["last"] = last
    return frame


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    # bool is an int subclass in Python; the protocol never means true/false as a number
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolViolation(f"{key!r} is not an integer: {value!r}")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolViolation(f"{key!r} is not a string: {value!r}")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolViolation(f"{key!r} is not a string: {value!r}")
    return value


def opt_number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    # numbers.Real or Decimal: a ``loads`` hook may parse floats as Decimal
    if not isinstance(value, numbers.Real | decimal.Decimal) or isinstance(value, bool):
        raise ProtocolViolation(f"{key!r} is not a number: {value!r}")
    return float(value)


def parse_message(obj: dict[str, Any]) -> Message:
    """Parse a ``message`` push (also the items of a history reply).

    Raises ProtocolViolation when a field is missing or mistyped.
    """
    return Message(
        topic=_str(obj, "topic"),
        offset=_int(obj, "offset"),
        epoch=_str(obj, "epoch"),
        data=obj.get("data"),
        sender=_opt_str(obj, "from"),
    )


def decode(text: str | bytes, codec: Codec = DEFAULT_CODEC) -> Incoming:
    """Parse one frame from the broker.

    Raises ProtocolViolation for binary frames, invalid JSON, and known frames whose fields are
    missing or mistyped.
    """
    if isinstance(text, bytes):
        raise ProtocolViolation("binary frame")
    try:
        obj = codec.loads(text)
    except ValueError as exc:
        raise ProtocolViolation(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("not a JSON object")
    op = obj.get("op")
    if op is None and "ok" in obj:
        ok = obj["ok"]
        if not isinstance(ok, bool):
            raise ProtocolViolation(f"'ok' is not a boolean: {ok!r}")
        rid = obj.get("id")
        if ok:
            return Reply(id=rid, ok=True, fields=obj)
        error = obj.get("error")
        if not isinstance(error, dict):
            raise ProtocolViolation("error reply without an 'error' object")
        return Reply(
            id=rid,
            ok=False,
            fields=obj,
            error_code=str(error.get("code", "internal")),
            error_message=str(error.get("message", "")),
        )
    if op == "message":
        return parse_message(obj)
    if op == "skipped":
        return Skipped(_str(obj, "topic"), _int(obj, "from"), _int(obj, "to"), _str(obj, "epoch"))
    if op in ("join", "leave"):
        return PresenceEvent(kind=op, topic=_str(obj, "topic"), client=_str(obj, "client"))
    if op == "welcome":
        worker = obj.get("worker")
        return Welcome(
            client=_str(obj, "client"),
            expires_at=opt_number(obj, "expires_at"),
            node=_opt_str(obj, "node"),
            worker=worker if isinstance(worker, int) and not isinstance(worker, bool) else None,
            ping_interval=opt_number(obj, "ping_interval"),
            idle_timeout=opt_number(obj, "idle_timeout"),
        )
    if isinstance(op, str):
        return UnknownPush(op=op, fields=obj)
    raise ProtocolViolation("frame with neither 'op' nor 'ok'")


def parse_url(url: str) -> tuple[str, int, str, bool]:
    """Split a ``ws://`` or ``wss://`` URL into host, port, resource (path and query) and
    whether it is secure. Raises ValueError for other schemes or a missing host."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, resource, secure


def reply_int(fields: dict[str, Any], key: str) -> int:
    """The integer ``key`` of a reply (e.g. a publish's ``offset``); raises ProtocolViolation."""
    return _int(fields, key)


def reply_str(fields: dict[str, Any], key: str) -> str:
    """The string ``key`` of a reply (e.g. a subscribe's ``epoch``); raises ProtocolViolation."""
    return _str(fields, key)


def parse_history(topic: str, fields: dict[str, Any]) -> History:
    """The :class:`History` of ``topic`` in a history reply; items that are not objects are
    skipped. Raises ProtocolViolation when ``messages`` or ``offset`` is missing or mistyped."""
    raw = fields.get("messages")
    if not isinstance(raw, list):
        raise ProtocolViolation("'messages' is not a list")
    recovered = fields.get("recovered")
    return History(
        topic=topic,
        messages=tuple(parse_message(m) for m in raw if isinstance(m, dict)),
        offset=_int(fields, "offset"),
        epoch=str(fields.get("epoch")),
        recovered=recovered if isinstance(recovered, bool) else None,
        missed=parse_missed(fields),
    )


def parse_presence(fields: dict[str, Any]) -> tuple[str, ...]:
    """The client ids of a presence reply; raises ProtocolViolation without a ``clients`` list."""
    clients = fields.get("clients")
    if not isinstance(clients, list):
        raise ProtocolViolation("'clients' is not a list")
    return tuple(str(c) for c in clients)


def parse_missed(fields: dict[str, Any]) -> tuple[int, int] | None:
    """The ``missed: {"from": a, "to": b}`` of a subscribe or history reply, if present."""
    missed = fields.get("missed")
    if not isinstance(missed, dict):
        return None
    return _int(missed, "from"), _int(missed, "to")
