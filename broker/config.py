"""The broker's configuration: a TOML file, checked key by key, turned into frozen values.

Every key has a safe default, so an empty file is a valid (if unusable: it has no secret)
configuration. :func:`load_config` raises :class:`~broker.errors.ConfigError` naming the first
bad key: an unknown key (likely a typo), a wrong type, an out-of-range value, or a missing
secret. The JWT secret may come from the environment (``PUBSUB_BROKER_JWT_SECRET``) so that it
stays out of files that get copied around.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from broker.errors import BrokerError, ConfigError, FrameError
from broker.keys import load_public_key
from broker.topics import pattern_matches, validate_pattern

__all__ = [
    "AuthConfig",
    "BusConfig",
    "Config",
    "DeliveryRule",
    "HistoryRule",
    "LimitsConfig",
    "PresenceConfig",
    "ServerConfig",
    "StoreConfig",
    "TimeoutsConfig",
    "load_config",
    "node_name",
    "parse_config",
    "parse_hostport",
]

SECRET_ENV = "PUBSUB_BROKER_JWT_SECRET"
API_KEYS_ENV = "PUBSUB_BROKER_API_KEYS"  # comma-separated; used when [api] keys is empty
#: What ``[server] topic_owner`` may say (see :class:`ServerConfig`).
TOPIC_OWNERS = ("hub", "workers")


@attrs.frozen
class ServerConfig:
    listen: str = "127.0.0.1:8765"
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    workers: int | str = 1
    http_listen: str = "127.0.0.1:8766"
    node_id: str = ""
    shutdown_timeout: float = 10.0
    worker_hang_timeout: float = 10.0
    http_max_connections: int = 512
    http_ops_reserve: int = 32
    # With several workers and no Redis, who orders a topic's publications and keeps its
    # history: "hub" (the supervisor's hub, for every topic) or "workers" (the worker the
    # topic's name hashes to; broker.owner).
    topic_owner: str = "hub"


@attrs.frozen
class AuthConfig:
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    allow_anonymous: bool = False
    default_publish: tuple[str, ...] = ()
    default_subscribe: tuple[str, ...] = ()
    audience: str = ""
    issuer: str = ""
    require_exp: bool = True
    default_presence: tuple[str, ...] = ()
    # Verified tokens remembered per worker (0: none), so that a client reconnecting with the
    # same token skips the signature check; see broker.auth.TokenVerifier.
    token_cache_size: int = 10_000


@attrs.frozen
class LimitsConfig:
    max_message_size: int = 65536
    max_data_size: int = 65536
    max_subscriptions: int = 128
    max_connections: int = 10000
    publish_rate: float = 50.0
    publish_burst: int = 100
    send_queue_max_bytes: int = 1024 * 1024
    max_violations: int = 50
    history_max_bytes: int = 256 * 1024 * 1024
    max_topics: int = 100_000
    # Bytes of history replies and `since` replays a connection may be sent: per second, and
    # saved up for a burst. The burst holds a full default history window (100 messages of
    # max_data_size, with their envelopes) recovered at once.
    read_rate_bytes: int = 1024 * 1024
    read_burst_bytes: int = 8 * 1024 * 1024
    # Connections not authenticated yet (from accept: the upgrade still being read, or
    # waiting for an in-band auth op), per worker; past it the oldest is dropped.
    max_pending_connections: int = 1000
    # Authenticated connections of one client id (``sub``) per worker; past it: close 4029.
    max_connections_per_client: int = 100


@attrs.frozen
class TimeoutsConfig:
    handshake_timeout: float = 10.0
    auth_timeout: float = 5.0
    idle_timeout: float = 60.0
    ping_interval: float = 20.0
    write_timeout: float = 10.0
    # A client message (all its fragments) must arrive within this many seconds of its first
    # byte: as long as the upgrade request may take, since both are one request's bytes that
    # an honest client sends at once (64 KiB in 10 s is a 52 kbit/s uplink).
    message_timeout: float = 10.0


@attrs.frozen
class BusConfig:
    url: str = ""
    cluster: bool = False
    presence_ttl: float = 30.0


@attrs.frozen
class HistoryRule:
    """History kept for topics matching ``pattern``: at most ``size`` publications and at most
    ``max_bytes`` bytes of them (counted as :func:`broker.historytable.entry_bytes` does), each
    kept at most ``ttl`` seconds. ``size == 0`` keeps none (offsets are still assigned)."""

    pattern: str
    size: int
    ttl: float
    max_bytes: int = 1024 * 1024


DEFAULT_HISTORY = HistoryRule(">", 100, 600.0)

#: What ``[[delivery]]`` ``policy`` may say: ``close`` cuts a subscriber whose send queue passes
#: ``send_queue_max_bytes`` (4008); ``latest`` keeps only its newest pending publication per
#: topic and tells it which offsets it skipped.
DELIVERY_POLICIES = ("close", "latest")


@attrs.frozen
class DeliveryRule:
    """What happens to a subscriber of a topic matching ``pattern`` once its send queue is full:
    ``policy`` is one of :data:`DELIVERY_POLICIES`."""

    pattern: str
    policy: str


@attrs.frozen
class PresenceConfig:
    """Which topics track presence: ``topics`` is a list of patterns, ``!`` denies and a deny
    wins (as in permissions). Empty, the default: no topic does. Presence lists who is
    subscribed, which is personal data, so a deployment opts in topic by topic."""

    topics: tuple[str, ...] = ()

    def tracks(self, topic: str) -> bool:
        """Whether the exact ``topic`` keeps a member list and announces joins and leaves."""
        tracked = False
        for pattern in self.topics:
            if pattern.startswith("!"):
                if pattern_matches(pattern[1:], topic):
                    return False
            elif not tracked:
                tracked = pattern_matches(pattern, topic)
        return tracked

    def check(self, topic: str) -> None:
        """Raise :class:`~broker.errors.FrameError` ``not_tracked`` unless ``topic`` tracks
        presence (the answer of the ``presence`` op and of ``/api/presence``)."""
        if not self.tracks(topic):
            raise FrameError("not_tracked", f"presence is not tracked on {topic}")


@attrs.frozen
class StoreConfig:
    """History on disk (:mod:`broker.store`): ``path`` of the SQLite file (empty, the default:
    history in memory only); ``flush_interval`` seconds between commits, the most a crash
    loses; ``ack``: ``"memory"`` answers a publish at once, ``"disk"`` once it is committed.
    Not used with a Redis bus (Redis holds history). Not reloadable."""

    path: str = ""
    flush_interval: float = 0.1
    ack: str = "memory"


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    bus: BusConfig = BusConfig()
    history: tuple[HistoryRule, ...] = ()
    api_keys: tuple[str, ...] = ()
    source: str = ""
    presence: PresenceConfig = PresenceConfig()
    delivery: tuple[DeliveryRule, ...] = ()
    store: StoreConfig = StoreConfig()

    def history_rule(self, topic: str) -> HistoryRule:
        """The first ``[[history]]`` rule whose pattern matches ``topic``, else the default
        (100 publications, 600 s)."""
        for rule in self.history:
            if pattern_matches(rule.pattern, topic):
                return rule
        return DEFAULT_HISTORY

    def delivery_policy(self, topic: str) -> str:
        """The policy of the first ``[[delivery]]`` rule whose pattern matches ``topic``, else
        ``"close"`` (a full queue cuts the subscriber, 4008)."""
        for rule in self.delivery:
            if pattern_matches(rule.pattern, topic):
                return rule.policy
        return "close"

    @property
    def worker_count(self) -> int:
        if self.server.workers == "auto":
            return max(1, os.cpu_count() or 1)
        assert isinstance(self.server.workers, int)
        return self.server.workers

    @property
    def owner_count(self) -> int:
        """How many workers own topics (:mod:`broker.owner`): the workers with
        ``topic_owner = "workers"``, several of them and no Redis; else 0 (the hub, the one
        worker or Redis orders every topic)."""
        count = self.worker_count
        owned = self.server.topic_owner == "workers" and count > 1 and not self.bus.url
        return count if owned else 0


#: This process's name for itself when ``[server] node_id`` is empty: random, so that nothing
#: a client sees reveals the host name. A supervisor hands its own to its workers.
_RANDOM_NODE_ID = secrets.token_hex(6)


def node_name(config: Config) -> str:
    """The name this broker gives itself wherever it can be seen (the ``welcome`` frame's
    ``node``, ``/client/config``, presence keys, the Redis connection name): ``[server]
    node_id`` when set, else 12 random hex digits chosen when the process starts (the host
    name is never used)."""
    return config.server.node_id or _RANDOM_NODE_ID


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6); raise ConfigError naming ``key``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _type_name(kind: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        tuple: "a list of strings",
    }.get(kind, str(kind))


def _coerce(key: str, value: Any, kind: Any) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if kind is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(kind)


_FIELD_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[str, ...]": tuple,
}


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(name: str) -> str:
    """``name`` as it would be written in the file: bare when it can be, else quoted (so an
    error about an empty or odd key still shows which one)."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)


def _section(cls: type[Any], name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(name, "expected a table")
    fields = {f.name: f for f in attrs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{_toml_key(key)}"
        field = fields.get(key)
        if field is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (known keys of [{name}]: {known})")
        ftype = str(field.type)
        if ftype == "int | str":  # server.workers
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(dotted, f'expected an integer or "auto", got {value!r}')
            values[key] = value
            continue
        values[key] = _coerce(dotted, value, _FIELD_TYPES[ftype])
    return cls(**values)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value!r}")


def _validate(cfg: Config) -> None:
    parse_hostport(cfg.server.listen, "server.listen")
    if cfg.server.http_listen:
        parse_hostport(cfg.server.http_listen, "server.http_listen")
    if isinstance(cfg.server.workers, int) and not 1 <= cfg.server.workers <= 256:
        raise ConfigError("server.workers", 'must be 1 to 256 or "auto"')
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("server.tls_key", "tls_cert and tls_key must be set together")
    for path_key in ("tls_cert", "tls_key"):
        path = getattr(cfg.server, path_key)
        if path and not Path(path).is_file():
            raise ConfigError(f"server.{path_key}", f"file not found: {path}")
    for origin in cfg.server.allowed_origins:
        if origin != "*" and ("://" not in origin or origin.endswith("/")):
            raise ConfigError(
                "server.allowed_origins",
                f'{origin!r} is not an origin like "https://app.example.com" (scheme://host[:port], no path) or "*"',
            )
    _positive("server.shutdown_timeout", cfg.server.shutdown_timeout)
    _positive("server.worker_hang_timeout", cfg.server.worker_hang_timeout)
    _positive("server.http_max_connections", cfg.server.http_max_connections)
    if not 0 <= cfg.server.http_ops_reserve < cfg.server.http_max_connections:
        raise ConfigError(
            "server.http_ops_reserve", "must be at least 0 and below server.http_max_connections"
        )
    if cfg.server.topic_owner not in TOPIC_OWNERS:
        raise ConfigError(
            "server.topic_owner", f'expected "hub" or "workers", got {cfg.server.topic_owner!r}'
        )
    if cfg.auth.jwt_secret and cfg.auth.jwt_public_key_file:
        raise ConfigError(
            "auth.jwt_public_key_file", "set jwt_secret or jwt_public_key_file, not both"
        )
    if not cfg.auth.jwt_secret and not cfg.auth.jwt_public_key_file:
        raise ConfigError(
            "auth.jwt_secret",
            f"missing: set auth.jwt_secret, the environment variable {SECRET_ENV}, "
            "or auth.jwt_public_key_file",
        )
    if cfg.auth.jwt_secret and len(cfg.auth.jwt_secret.encode()) < 32:
        raise ConfigError(
            "auth.jwt_secret", "must be at least 32 bytes long (HS256 needs a 256-bit key)"
        )
    if cfg.auth.jwt_public_key_file and not Path(cfg.auth.jwt_public_key_file).is_file():
        raise ConfigError(
            "auth.jwt_public_key_file", f"file not found: {cfg.auth.jwt_public_key_file}"
        )
    if cfg.auth.jwt_public_key_file:
        load_public_key(cfg.auth.jwt_public_key_file)  # an RSA or EC P-256 key, or ConfigError
    for key, patterns in (
        ("auth.default_publish", cfg.auth.default_publish),
        ("auth.default_subscribe", cfg.auth.default_subscribe),
        ("auth.default_presence", cfg.auth.default_presence),
        ("presence.topics", cfg.presence.topics),
    ):
        for pattern in patterns:
            try:
                validate_pattern(pattern.removeprefix("!"))
            except BrokerError as exc:
                raise ConfigError(key, str(exc)) from None
    for key in (
        "max_message_size",
        "max_data_size",
        "max_subscriptions",
        "max_connections",
        "publish_burst",
        "send_queue_max_bytes",
        "max_violations",
        "history_max_bytes",
        "max_topics",
        "read_rate_bytes",
        "read_burst_bytes",
        "max_pending_connections",
        "max_connections_per_client",
    ):
        _positive(f"limits.{key}", getattr(cfg.limits, key))
    _positive("limits.publish_rate", cfg.limits.publish_rate)
    if cfg.auth.token_cache_size < 0:
        raise ConfigError(
            "auth.token_cache_size", f"must be 0 or more, got {cfg.auth.token_cache_size!r}"
        )
    for key in (
        "handshake_timeout",
        "auth_timeout",
        "idle_timeout",
        "ping_interval",
        "write_timeout",
        "message_timeout",
    ):
        _positive(f"timeouts.{key}", getattr(cfg.timeouts, key))
    if cfg.bus.url and not cfg.bus.url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            "bus.url", f"expected redis://HOST:PORT/DB or rediss://..., got {cfg.bus.url!r}"
        )
    _positive("bus.presence_ttl", cfg.bus.presence_ttl)
    if not 0.001 <= cfg.store.flush_interval <= 10:
        raise ConfigError("store.flush_interval", "must be 0.001 to 10 seconds")
    if cfg.store.ack not in ("memory", "disk"):
        raise ConfigError("store.ack", f'expected "memory" or "disk", got {cfg.store.ack!r}')
    if cfg.store.path and Path(cfg.store.path).is_dir():
        raise ConfigError("store.path", f"{cfg.store.path} is a directory; name a file in it")


def _rule_tables(
    raw: Any, section: str, known: tuple[str, ...], required: tuple[str, ...]
) -> list[tuple[str, dict[str, Any], str]]:
    """The tables of a ``[[section]]`` array of rules, each as (its name in errors, the
    table, its checked ``pattern``); raises :class:`ConfigError` for an unknown or missing key
    or a bad pattern."""
    if not isinstance(raw, list):
        raise ConfigError(section, f"expected [[{section}]] tables")
    tables = []
    for i, entry in enumerate(raw):
        where = f"{section}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a table")
        unknown = set(entry) - set(known)
        if unknown:
            raise ConfigError(
                f"{where}.{_toml_key(sorted(unknown)[0])}",
                f"unknown key (known: {', '.join(known)})",
            )
        for key in required:
            if key not in entry:
                raise ConfigError(f"{where}.{key}", "missing")
        pattern = _coerce(f"{where}.pattern", entry["pattern"], str)
        try:
            validate_pattern(pattern)
        except BrokerError as exc:
            raise ConfigError(f"{where}.pattern", str(exc)) from None
        tables.append((where, entry, pattern))
    return tables


def _history(raw: Any) -> tuple[HistoryRule, ...]:
    rules = []
    for where, entry, pattern in _rule_tables(
        raw, "history", ("pattern", "size", "ttl", "max_bytes"), ("pattern", "size", "ttl")
    ):
        size = _coerce(f"{where}.size", entry["size"], int)
        ttl = _coerce(f"{where}.ttl", entry["ttl"], float)
        if size < 0 or size > 1_000_000:
            raise ConfigError(f"{where}.size", "must be 0 to 1000000")
        _positive(f"{where}.ttl", ttl)
        max_bytes = _coerce(f"{where}.max_bytes", entry.get("max_bytes", 1024 * 1024), int)
        _positive(f"{where}.max_bytes", max_bytes)
        rules.append(HistoryRule(pattern, size, ttl, max_bytes))
    return tuple(rules)


def _delivery(raw: Any) -> tuple[DeliveryRule, ...]:
    rules = []
    for where, entry, pattern in _rule_tables(
        raw, "delivery", ("pattern", "policy"), ("pattern", "policy")
    ):
        policy = _coerce(f"{where}.policy", entry["policy"], str)
        if policy not in DELIVERY_POLICIES:
            raise ConfigError(f"{where}.policy", f'expected "close" or "latest", got {policy!r}')
        rules.append(DeliveryRule(pattern, policy))
    return tuple(rules)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
    "timeouts": TimeoutsConfig,
    "bus": BusConfig,
    "presence": PresenceConfig,
    "store": StoreConfig,
}


def parse_config(
    raw: Mapping[str, Any],
    *,
    source: str = "<memory>",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a :class:`Config` from parsed TOML.

    ``overrides`` maps dotted keys (``"server.listen"``) to values that win over the file (the
    command line's options). Raises :class:`ConfigError` naming the first bad key.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    kwargs: dict[str, Any] = {"source": source}
    for name, value in data.items():
        if name in _SECTIONS:
            kwargs[name] = _section(_SECTIONS[name], name, value)
        elif name == "history":
            kwargs["history"] = _history(value)
        elif name == "delivery":
            kwargs["delivery"] = _delivery(value)
        elif name == "api":
            if not isinstance(value, dict) or set(value) - {"keys"}:
                raise ConfigError("api", "expected a table with the one key 'keys'")
            keys = _coerce("api.keys", value.get("keys", []), tuple)
            if any(len(k) < 16 for k in keys):
                raise ConfigError("api.keys", "each API key must be at least 16 characters")
            kwargs["api_keys"] = keys
        else:
            known = ", ".join([*sorted(_SECTIONS), "history", "api", "delivery"])
            raise ConfigError(_toml_key(name), f"unknown section (known: {known})")
    cfg = Config(**kwargs)
    if not cfg.auth.jwt_secret and env.get(SECRET_ENV):
        cfg = attrs.evolve(cfg, auth=attrs.evolve(cfg.auth, jwt_secret=env[SECRET_ENV]))
    if not cfg.api_keys and env.get(API_KEYS_ENV):
        keys = tuple(k.strip() for k in env[API_KEYS_ENV].split(",") if k.strip())
        if any(len(k) < 16 for k in keys):
            raise ConfigError(API_KEYS_ENV, "each API key must be at least 16 characters")
        cfg = attrs.evolve(cfg, api_keys=keys)
    _validate(cfg)
    return cfg


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read and check a TOML file (``None``: defaults only). Raises :class:`ConfigError`."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, source=source, env=env, overrides=overrides)
