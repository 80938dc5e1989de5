"""The broker's exceptions. Everything the broker raises on purpose derives from BrokerError.

BrokerError
├── ConfigError          a configuration file or option is wrong (names the key)
├── ListenError          a listening address cannot be bound, e.g. a busy port (names the key)
├── AuthError            a token or origin was refused (carries the HTTP status and reason)
├── FrameError           a client frame is invalid (carries the protocol error code)
├── WebSocketViolation   a client broke the WebSocket protocol (carries the close code)
└── BusError
    └── BusUnavailable   the bus (IPC hub or Redis) cannot be reached right now
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every exception the broker raises on purpose."""


class ConfigError(BrokerError):
    """A configuration value is missing, mistyped or inconsistent.

    ``key`` is the dotted name of the offending key (``"limits.max_connections"``), so the
    message can point at the line to fix.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key
        self.problem = problem


class ListenError(BrokerError):
    """A listening socket could not be bound (the port is in use, the address is not this
    machine's, a privileged port). ``key`` is the setting to change (``"server.listen"`` or
    ``"server.http_listen"``), ``address`` the ``HOST:PORT`` tried, ``problem`` the system's
    words for it. The broker exits with code 3."""

    def __init__(self, key: str, address: str, problem: str) -> None:
        super().__init__(f"cannot listen on {address} ({key}): {problem}")
        self.key = key
        self.address = address
        self.problem = problem


class AuthError(BrokerError):
    """A client could not be authenticated or authorised at the handshake or in-band.

    ``status`` is the HTTP status to refuse an upgrade with (401 or 403); ``reason`` is a short
    machine-readable word for logs and metrics (``"expired"``, ``"bad_signature"``, ...).
    """

    def __init__(self, message: str, *, reason: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class FrameError(BrokerError):
    """A client frame was refused. ``code`` is the protocol error code to reply with, and
    ``frame_id`` the client's ``id`` when it could be read (else ``None``)."""

    def __init__(self, code: str, message: str, frame_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


#: The metric label of a WebSocketViolation, by close code, when the raiser names none.
_VIOLATION_KINDS = {1002: "protocol", 1007: "invalid_data", 1008: "policy", 1009: "message_size"}


class WebSocketViolation(BrokerError):
    """A client broke the WebSocket protocol or one of its limits; the connection is closed
    with ``code`` (1002, 1007, 1008, 1009) and ``reason``. ``kind`` names what was broken, for
    metrics (``"protocol"``, ``"invalid_data"``, ``"message_size"``, ``"fragments"``,
    ``"message_timeout"``); by default it follows from the code."""

    def __init__(self, code: int, reason: str, *, kind: str = "") -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.kind = kind or _VIOLATION_KINDS.get(code, str(code))


class BusError(BrokerError):
    """The bus refused or failed an operation."""


class BusUnavailable(BusError):
    """The bus is down (hub or Redis unreachable); the operation may be retried later."""
