"""The ``pubsub`` command: subscribe, publish, read history and presence from a terminal.

Output is made for pipes: ``sub`` and ``history`` print one JSON object per line on stdout,
everything meant for a human (gaps, reconnects, errors) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, NoReturn

import trio

from client_sdk._protocol import parse_url
from client_sdk._recovery import is_pattern
from client_sdk.client import Client, Subscription, connect
from client_sdk.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    PubSubError,
    RateLimited,
    RequestTimeout,
    ServerError,
    TokenError,
)
from client_sdk.models import ConnectionState, Gap, Message, Position, PresenceEvent

__all__ = ["main"]

DEFAULT_URL = "ws://127.0.0.1:8765/ws"

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_CONNECTION = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130

EPILOG = """\
examples:
  export PUBSUB_URL=ws://127.0.0.1:8765/ws PUBSUB_TOKEN=$(pubsub-broker token --config .pubsub-dev/broker.toml --sub alice)
  pubsub sub chat.room1                      # print each message as one JSON line, until Ctrl-C
  pubsub sub 'chat.>' news.today --count 10  # several topics or patterns; stop after 10 messages
  pubsub sub chat.room1 --since 41           # first replay what came after offset 41, then live
  pubsub sub chat.room1 --presence           # also print joins and leaves
  pubsub sub chat.room1 --retry              # wait for a broker that is not up yet
  pubsub pub chat.room1 '{"text": "hi"}'     # DATA is JSON...
  pubsub pub chat.room1 hello                # ...or else a plain string
  tail -f app.log | pubsub pub logs.app      # one publication per line of stdin
  pubsub history chat.room1 --limit 20 | jq .data
  pubsub history chat.room1 --last 5         # the newest 5 messages, oldest first
  pubsub presence chat.room1                 # one client id per line

output of sub and history (one line each):
  {"topic": "chat.room1", "offset": 42, "epoch": "9f1c...", "from": "alice", "data": {...}}
  with --presence also {"presence": "join", "topic": "chat.room1", "client": "bob"}
  lost publications (history gone after a broker restart, ...) are reported on stderr as
  {"gap": {"topic": ..., "from_offset": ..., "to_offset": ..., "epoch_changed": ..., ...}}

exit codes:
  0    success (sub: stopped by --count, Ctrl-C or SIGTERM)
  1    usage error
  2    cannot connect, or the token was refused (also: connection lost for good)
  3    the broker refused the request (forbidden, bad_topic, too_large, ...)
  4    no reply in time (--timeout)
  130  interrupted (Ctrl-C) during pub, history or presence
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits with 2 on usage errors; 2 means "connection failed" here.
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Usage(Exception):
    """A usage error found after parsing (exit 1)."""


def _ws_url(text: str) -> str:
    """``--url`` (or ``PUBSUB_URL``) checked when the command line is read: a usage error
    (exit 1) that says what is expected, rather than a traceback from inside the client."""
    try:
        parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}: give the broker's WebSocket URL (--url or PUBSUB_URL), such as {DEFAULT_URL}"
        ) from None
    return text


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On the subcommands, SUPPRESS keeps an option given before the subcommand from being
    # overwritten by the subcommand's default.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--url",
        type=_ws_url,
        default=default(os.environ.get("PUBSUB_URL", DEFAULT_URL)),
        help=f"broker URL (env PUBSUB_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("PUBSUB_TOKEN")),
        help="JWT to authenticate with (env PUBSUB_TOKEN; none: anonymous, if the broker allows)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(10.0),
        metavar="SECONDS",
        help="for connecting and for each reply (default 10)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="log the client's internals"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pubsub`` (exposed for documentation and tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="pubsub",
        description="Publish and subscribe on a trio-pubsub broker.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser(
        "sub",
        help="print messages as JSON lines",
        description="Subscribe and print one JSON line per message, reconnecting as needed.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    sub.add_argument("topics", nargs="+", metavar="TOPIC", help="topic or pattern (* and >)")
    sub.add_argument(
        "--since",
        metavar="OFFSET[:EPOCH]",
        help="replay what came after OFFSET first (0: all the history held); exact topics only",
    )
    sub.add_argument(
        "--presence", action="store_true", help="also print joins and leaves (exact topics)"
    )
    sub.add_argument("-n", "--count", type=int, metavar="N", help="exit after N messages")
    sub.add_argument("--data-only", action="store_true", help="print only each message's data")
    sub.add_argument(
        "--retry",
        action="store_true",
        help="keep trying while the broker is down, also for the first connection (default: "
        "exit 2 when it cannot be reached); a refused token still exits 2",
    )
    _common(sub, suppress=True)

    pub = commands.add_parser(
        "pub",
        help="publish DATA, or each line of stdin",
        description="Publish DATA (JSON, or a plain string when it is not JSON); without DATA, "
        "publish each non-empty line of stdin, in order.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("data", nargs="?", metavar="DATA")
    pub.add_argument("--string", action="store_true", help="publish DATA/lines as strings as-is")
    pub.add_argument(
        "-v", "--verbose", action="store_true", help="print each publication's offset as JSON"
    )
    _common(pub, suppress=True)

    hist = commands.add_parser(
        "history",
        help="print the messages the broker still holds",
        description="Print the messages the broker still holds for TOPIC, one JSON line each.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    hist.add_argument("topic", metavar="TOPIC")
    count = hist.add_mutually_exclusive_group()
    count.add_argument(
        "--limit", type=int, metavar="N", help="the first N (oldest) messages (1..1000)"
    )
    count.add_argument(
        "--last", type=int, metavar="N", help="the last N (newest) messages (1..1000)"
    )
    hist.add_argument("--since", metavar="OFFSET[:EPOCH]", help="only those after OFFSET")
    _common(hist, suppress=True)

    pres = commands.add_parser(
        "presence",
        help="print the client ids subscribed to a topic",
        description="Print the client ids subscribed to TOPIC, one per line.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    pres.add_argument("topic", metavar="TOPIC")
    _common(pres, suppress=True)
    return parser


def parse_since(text: str | None) -> Position | None:
    """``OFFSET`` or ``OFFSET:EPOCH`` to a Position; raises _Usage when malformed."""
    if text is None:
        return None
    offset, _, epoch = text.partition(":")
    try:
        value = int(offset)
    except ValueError:
        raise _Usage(f"--since wants OFFSET or OFFSET:EPOCH, not {text!r}") from None
    if value < 0:
        raise _Usage("--since OFFSET must be >= 0")
    return Position(value, epoch or None)


def parse_data(text: str, *, as_string: bool) -> Any:
    """DATA as JSON when it parses (``42``, ``{"a": 1}``, ``"quoted"``), else the string."""
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def message_line(msg: Message) -> dict[str, Any]:
    """The JSON object printed for one message."""
    return {
        "topic": msg.topic,
        "offset": msg.offset,
        "epoch": msg.epoch,
        "from": msg.sender,
        "data": msg.data,
    }


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _gap_line(gap: Gap) -> str:
    body = {
        "topic": gap.topic,
        "from_offset": gap.from_offset,
        "to_offset": gap.to_offset,
        "epoch": gap.epoch,
        "epoch_changed": gap.epoch_changed,
        "reason": gap.reason,
        "previous_offset": gap.previous.offset if gap.previous else None,
    }
    return _dumps({"gap": body})


def _connect(
    args: argparse.Namespace, *, reconnect: bool, retry: bool = False
) -> AbstractAsyncContextManager[Client]:
    """The client for a command; reconnects are reported on stderr. ``retry``: keep trying
    the first connection too."""
    lost = False

    def on_state(state: ConnectionState) -> None:
        nonlocal lost
        if state is ConnectionState.RECONNECTING:
            lost = True
            _err("pubsub: connection lost, reconnecting")
        elif state is ConnectionState.CONNECTED and lost:
            lost = False
            _err("pubsub: reconnected")

    return connect(
        args.url,
        args.token,
        reconnect=reconnect,
        retry_first_connect=retry,
        # No token means anonymous here (see --token): the broker says whether it allows it.
        anonymous=not args.token,
        connect_timeout=args.timeout,
        request_timeout=args.timeout,
        on_state_change=on_state,
    )


async def _cmd_sub(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    for topic in args.topics:
        if since is not None and is_pattern(topic):
            raise _Usage(f"--since needs exact topics; {topic!r} is a pattern")
        if args.presence and is_pattern(topic):
            # Not an error: `sub 'chat.>' room.1 --presence` still gets presence where it can.
            _err(f"pubsub: note: presence events exist for exact topics only, not {topic!r}")
    if args.retry:
        _err(f"pubsub: connecting to {args.url} (--retry: until it answers)")
    cm = _connect(args, reconnect=True, retry=args.retry)
    seen = 0
    # A message matched by two of the TOPIC arguments reaches both subscriptions; print it once.
    printed: dict[tuple[str, str, int], None] = {}
    async with cm as client, AsyncExitStack() as stack, trio.open_nursery() as nursery:
        subs: list[Subscription] = []
        for topic in dict.fromkeys(args.topics):  # a topic named twice is subscribed once
            subs.append(
                await stack.enter_async_context(
                    client.subscribe(
                        topic, since=since, presence=args.presence and not is_pattern(topic)
                    )
                )
            )

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        async def pump(sub: Subscription) -> None:
            nonlocal seen
            async for event in sub:
                if isinstance(event, Message):
                    key = (event.topic, event.epoch, event.offset)
                    if key in printed:
                        continue
                    printed[key] = None
                    if len(printed) > 10_000:
                        del printed[next(iter(printed))]
                    _out(_dumps(event.data if args.data_only else message_line(event)))
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        nursery.cancel_scope.cancel()
                        return
                elif isinstance(event, PresenceEvent):
                    line = {"presence": event.kind, "topic": event.topic, "client": event.client}
                    _out(_dumps(line))
                else:
                    _err(_gap_line(event))
            # iteration ended without an error: the client was closed under us
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        for s in subs:
            nursery.start_soon(pump, s)
    return EXIT_OK


async def _publish_retrying(client: Client, topic: str, data: Any, ack_timeout: float) -> int:
    # A rate_limited publication was dropped by the broker, so sending it again cannot make a
    # duplicate: a pipe of many lines slows down to the allowed rate instead of failing.
    delay = 0.05
    with trio.move_on_after(ack_timeout * 6):
        while True:
            try:
                return await client.publish(topic, data, timeout=ack_timeout)
            except RateLimited:
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
    raise RequestTimeout(f"still rate limited after {ack_timeout * 6:.0f}s")


async def _cmd_pub(args: argparse.Namespace) -> int:
    cm = _connect(args, reconnect=True)
    async with cm as client:

        async def one(text: str) -> None:
            data = parse_data(text, as_string=args.string)
            offset = await _publish_retrying(client, args.topic, data, args.timeout)
            if args.verbose:
                _out(_dumps({"topic": args.topic, "offset": offset}))

        if args.data is not None:
            await one(args.data)
            return EXIT_OK
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return EXIT_OK
            text = line.rstrip("\r\n")
            if text.strip():
                await one(text)


async def _cmd_history(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    cm = _connect(args, reconnect=False)
    async with cm as client:
        history = await client.history(args.topic, since=since, limit=args.limit, last=args.last)
        if history.recovered is False:
            # Same shape as sub's gap lines: what after --since is gone for good.
            lost = (
                history.missed
                if history.missed and history.missed[1] >= history.missed[0]
                else None
            )
            asked = since.epoch if since is not None else None
            changed = asked is not None and asked != history.epoch
            gap = Gap(
                args.topic,
                lost[0] if lost else None,
                lost[1] if lost else None,
                history.epoch,
                changed,
                "epoch_changed" if changed else "not_recovered",
                since if changed else None,
            )
            _err(_gap_line(gap))
        for msg in history.messages:
            _out(_dumps(message_line(msg)))
    return EXIT_OK


async def _cmd_presence(args: argparse.Namespace) -> int:
    cm = _connect(args, reconnect=False)
    async with cm as client:
        for name in await client.presence(args.topic):
            _out(name)
    return EXIT_OK


_COMMANDS = {
    "sub": _cmd_sub,
    "pub": _cmd_pub,
    "history": _cmd_history,
    "presence": _cmd_presence,
}


def exit_code(error: BaseException) -> int:
    """The documented exit code for an exception that ended a command."""
    if isinstance(error, _Usage):
        return EXIT_USAGE
    if isinstance(error, ConnectionFailed | TokenError):
        return EXIT_CONNECTION
    if isinstance(error, ServerError):
        return EXIT_REFUSED
    if isinstance(error, RequestTimeout):
        return EXIT_TIMEOUT
    return EXIT_CONNECTION


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pubsub`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.CRITICAL,
        format="pubsub: %(levelname)s %(name)s: %(message)s",
    )
    try:
        return trio.run(_COMMANDS[args.command], args)
    except BaseException as error:
        leaf = _leaf(error)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if isinstance(leaf, BrokenPipeError):
            # The reader went away (``| head``): stop quietly, and keep Python from complaining
            # again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        if isinstance(leaf, PubSubError | _Usage):
            _err(f"pubsub: error: {leaf}")
            if isinstance(leaf, AuthenticationFailed) and not args.token:
                _err("pubsub: hint: give a token with --token or PUBSUB_TOKEN")
            return exit_code(leaf)
        raise


def _leaf(error: BaseException) -> BaseException:
    """The exception that matters inside the groups trio's nurseries wrap errors in."""
    while isinstance(error, BaseExceptionGroup):
        inner = [e for e in error.exceptions if not isinstance(e, trio.Cancelled)]
        error = (inner or list(error.exceptions))[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
