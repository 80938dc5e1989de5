"""The ``pubsub-broker`` command: serve, check a configuration, mint development tokens."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import attrs
import jwt

from broker import __version__
from broker.config import Config, load_config
from broker.errors import ConfigError, ListenError

__all__ = ["main"]

DEV_DIR = Path(".pubsub-dev")
#: Where `pubsub-broker dev` keeps history, so that it survives a restart of the broker.
DEV_STORE = DEV_DIR / "history.db"

EPILOG = """\
examples:
  pubsub-broker serve --config /etc/pubsub-broker/broker.toml
  pubsub-broker serve --config broker.toml --listen 0.0.0.0:8765 --workers 4
  pubsub-broker check-config --config broker.toml
  pubsub-broker token --config broker.toml --sub alice --ttl 3600 --publish 'chat.>' --subscribe 'chat.>'
  pubsub-broker token --config broker.toml --sub alice --subscribe 'chat.>' --presence 'chat.>'
  pubsub-broker dev            # development: make a config with a random secret, print a token, serve
  pubsub-broker dev --listen 127.0.0.1:9000 --http-listen 127.0.0.1:9001   # other ports

exit codes: 0 ok, 1 bad usage, 2 bad configuration, 3 could not start (e.g. port in use)
"""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if getattr(args, "listen", None):
        o["server.listen"] = args.listen
    if getattr(args, "http_listen", None) is not None:
        o["server.http_listen"] = args.http_listen
    if getattr(args, "workers", None):
        o["server.workers"] = "auto" if args.workers == "auto" else int(args.workers)
    return o


def make_token(
    config: Config,
    sub: str,
    *,
    ttl: float | None = 3600,
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    presence: list[str] | None = None,
) -> str:
    """An HS256 token for ``sub`` signed with the configured secret (development and tests).
    Given any of ``publish``, ``subscribe`` or ``presence``, the token carries a ``pubsub``
    claim with all three (the ones not given empty); else the configured defaults apply."""
    if not config.auth.jwt_secret:
        raise ConfigError("auth.jwt_secret", "tokens can only be minted with a shared secret")
    claims: dict[str, Any] = {"sub": sub, "iat": int(time.time())}
    if ttl:
        claims["exp"] = int(time.time() + ttl)
    if config.auth.audience:
        claims["aud"] = config.auth.audience
    if config.auth.issuer:
        claims["iss"] = config.auth.issuer
    if publish is not None or subscribe is not None or presence is not None:
        claims["pubsub"] = {
            "publish": publish or [],
            "subscribe": subscribe or [],
            "presence": presence or [],
        }
    return jwt.encode(claims, config.auth.jwt_secret, algorithm="HS256")


def _serve(config: Config, overrides: dict[str, Any] | None = None) -> int:
    from broker.supervisor import run_broker

    return run_broker(config, overrides)


def _dev(overrides: dict[str, Any]) -> int:
    DEV_DIR.mkdir(exist_ok=True)
    path = DEV_DIR / "broker.toml"
    if not path.exists():
        secret = secrets.token_urlsafe(48)
        path.write_text(
            "# Development configuration made by `pubsub-broker dev`. Not for production.\n"
            "[server]\n"
            'listen = "127.0.0.1:8765"\n'
            'http_listen = "127.0.0.1:8766"\n'
            'allowed_origins = ["http://127.0.0.1:8766", "http://localhost:8766"]\n'
            "workers = 1\n\n"
            "[auth]\n"
            f'jwt_secret = "{secret}"\n'
            'default_publish = [">"]\n'
            'default_subscribe = [">"]\n'
            "# who is subscribed is personal data: here everyone may read it, on every topic\n"
            'default_presence = [">"]\n\n'
            "[presence]\n"
            'topics = [">"]\n\n'
            "[api]\n"
            f'keys = ["{secrets.token_urlsafe(24)}"]\n\n'
            '# history on disk: kept across restarts (path = "" keeps it in memory only)\n'
            "[store]\n"
            f'path = "{DEV_STORE}"\n'
        )
        os.chmod(path, 0o600)
    config = load_config(path, overrides=overrides)
    from broker.logs import configure_logging
    from broker.supervisor import bind_listeners, log_listen_error, run_broker

    # Bound before the banner: a busy port is one log line and exit 3, with no token printed
    # for a broker that never ran.
    configure_logging()
    try:
        listeners = bind_listeners(config)
    except ListenError as exc:
        log_listen_error(exc)
        return 3
    # The bound ports, not the configured ones: port 0 picks a free one.
    host = config.server.listen.rpartition(":")[0]
    url = f"ws://{host}:{listeners.ws[0][0].getsockname()[1]}/ws"
    http_origin = ""
    if listeners.http is not None:
        http_host = config.server.http_listen.rpartition(":")[0]
        http_origin = f"http://{http_host}:{listeners.http.getsockname()[1]}"
        if overrides.get("server.http_listen") and http_origin not in config.server.allowed_origins:
            # The demo page is served from the operations listener: let it connect from there.
            allowed = [*config.server.allowed_origins, http_origin]
            overrides = {**overrides, "server.allowed_origins": allowed}
            config = load_config(path, overrides=overrides)
    if "[store]" not in path.read_text(encoding="utf-8"):
        # A file written before history went to disk: keep it there too.
        config = attrs.evolve(config, store=attrs.evolve(config.store, path=str(DEV_STORE)))
    token = make_token(config, "dev-user", ttl=24 * 3600)
    print(_banner(config, path, url, http_origin, token), flush=True)
    if not config.presence.topics:
        # A file written before presence became opt-in: the demo's presence would be refused.
        print(
            f"  presence is off: delete {path} for a new one, or add [presence] "
            'topics = [">"] and [auth] default_presence = [">"]\n',
            flush=True,
        )
    return run_broker(config, overrides, listeners)


def _banner(config: Config, path: Path, url: str, http_origin: str, token: str) -> str:
    """What ``dev`` prints before serving: every address in it is one the broker is bound to
    (``url`` and ``http_origin`` come from the bound sockets), so each line can be pasted as
    it is. ``http_origin`` is empty when the operations listener is disabled."""
    if http_origin:
        ops = f"""  demo page:  {http_origin}/demo/?token={token}
  status:     {http_origin}/status/    metrics: {http_origin}/metrics
"""
        if config.api_keys:
            ops += f"""  HTTP API (key from [api] keys), publish from a shell or a backend:
    curl -s -H "Authorization: Bearer {config.api_keys[0]}" \\
         -d '{{"topic":"chat.room1","data":{{"text":"hi"}}}}' {http_origin}/api/publish
"""
        else:
            ops += f'  HTTP API:   no key: add [api] keys = ["..."] to {path}\n'
    else:
        ops = "  demo page, status, metrics and HTTP API: disabled (server.http_listen is empty)\n"
    return f"""
trio-pubsub development broker (config: {path})
  WebSocket:  {url}
  token (user "dev-user", 24 h, may publish, subscribe and read presence everywhere):
    {token}
  try it in two more terminals, each with the export line first:
    export PUBSUB_URL={url} PUBSUB_TOKEN={token}
    .venv/bin/pubsub sub 'chat.>'
    .venv/bin/pubsub pub chat.room1 '{{"text": "hello"}}'
{ops}  the Python examples, from this directory with PUBSUB_URL and PUBSUB_TOKEN exported:
    .venv/bin/python examples/subscribe.py chat.room1
    .venv/bin/python examples/publish.py chat.room1 hello
    .venv/bin/python examples/token_refresh.py    # signs its own tokens with {path}'s secret
  history:    {config.store.path or "in memory only"}
  more tokens: .venv/bin/pubsub-broker token --config {path} --sub alice
"""


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage; here 2 means a bad configuration, so usage is 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pubsub-broker",
        description="trio-pubsub: a WebSocket publish/subscribe broker (protocol pubsub.v1).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker until SIGTERM or SIGINT; SIGHUP reloads the configuration.",
    )
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.add_argument(
        "--listen",
        help="HOST:PORT for WebSocket clients (overrides server.listen; port 0 picks a free one)",
    )
    serve.add_argument(
        "--http-listen",
        dest="http_listen",
        help='HOST:PORT of the operations listener (overrides server.http_listen; "" disables)',
    )
    serve.add_argument(
        "--workers", help='number of worker processes, or "auto" (overrides server.workers)'
    )

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and exit",
        description="Validate a configuration file as serve would read it (environment "
        "variables included) and exit: 0 and one JSON line, or 2 and the key at fault.",
    )
    check.add_argument("--config", required=True, help="TOML configuration file")

    token = sub.add_parser(
        "token",
        help="print a signed token (development and tests)",
        # What a newcomer trips on: naming one permission takes away the defaults for the others.
        description="Print an HS256 token signed with the configuration's auth.jwt_secret. "
        "Without --publish, --subscribe and --presence it may do what the configuration's "
        "default_publish, default_subscribe and default_presence allow; given any of them, "
        "it may do only what they list (with --publish alone it cannot subscribe).",
    )
    token.add_argument("--config", required=True, help="TOML configuration file")
    token.add_argument("--sub", required=True, help="the client id")
    token.add_argument(
        "--ttl",
        type=float,
        default=3600,
        help="seconds until it expires (default 3600; 0: no exp claim)",
    )
    token.add_argument(
        "--publish",
        action="append",
        metavar="PATTERN",
        help="allowed publish pattern (repeatable; '!P' denies)",
    )
    token.add_argument(
        "--subscribe",
        action="append",
        metavar="PATTERN",
        help="allowed subscribe pattern (repeatable; '!P' denies)",
    )
    token.add_argument(
        "--presence",
        action="append",
        metavar="PATTERN",
        help="topics whose presence it may read (repeatable; '!P' denies)",
    )

    dev = sub.add_parser(
        "dev",
        help="development: create .pubsub-dev/broker.toml if missing, print a token, serve",
        description="Create .pubsub-dev/broker.toml (a random secret, everything allowed) if "
        "it is missing, print a token and how to use it, and serve until SIGTERM or SIGINT. "
        "History is kept on disk in .pubsub-dev/history.db across restarts.",
    )
    dev.add_argument(
        "--listen",
        help="HOST:PORT for WebSocket clients (overrides server.listen, 127.0.0.1:8765)",
    )
    dev.add_argument(
        "--http-listen",
        dest="http_listen",
        help="HOST:PORT of the operations listener and demo page "
        '(overrides server.http_listen, 127.0.0.1:8766; "" disables)',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = _overrides(args)
        if args.command == "dev":
            return _dev(overrides)
        config = load_config(args.config, overrides=overrides)
        if args.command == "check-config":
            print(json.dumps({"ok": True, "config": args.config, "workers": config.worker_count}))
            return 0
        if args.command == "token":
            print(
                make_token(
                    config,
                    args.sub,
                    ttl=args.ttl,
                    publish=args.publish,
                    subscribe=args.subscribe,
                    presence=args.presence,
                )
            )
            return 0
        return _serve(config, overrides)
    except ConfigError as exc:
        print(f"pubsub-broker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
