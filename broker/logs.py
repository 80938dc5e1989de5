"""Structured logging: one JSON object per line on stderr (journald and docker collect it).

Context that belongs to a task (the connection id, the worker) is bound with
``structlog.contextvars``; trio copies context variables into each new task, so what a
connection's task binds stays with that connection. Tokens and message payloads are never
passed to a logger.

Lines are written in batches inside a trio run (:class:`BatchedWriter`): the ``info`` and
``debug`` lines go out together at most :data:`HOLD` seconds after the first of them was
held, so that a reconnect storm's ``connect`` and ``disconnect`` lines (two per connection)
cost one system call per batch, not two per connection (those writes were about a tenth of a
connect's CPU). One scheduler batch alone gathers too few of them: a connection's lines come
from different batches. Warnings and errors are written at once (after the lines held before
them, so the order stays), and so is every line outside a trio run or from another thread.
At most the last :data:`HOLD` seconds of info lines are lost if the process is killed
outright; a run that ends (a graceful stop, or an exception) writes them first.

A line is rendered by one processor (:func:`render`) after structlog's
``merge_contextvars``: the level, an ISO 8601 UTC timestamp, a formatted exception when there
is one, then JSON, exactly as structlog's four processors for those did, for a third less
CPU per line. The two lines every connection writes go through :func:`info_line`, which
hands them to those two processors and the writer directly while the configuration is
:func:`configure_logging`'s: the same line, without structlog's per-call machinery.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from typing import Any, NamedTuple, TextIO

import structlog
import trio
import trio.lowlevel
from structlog.typing import EventDict

__all__ = ["HOLD", "BatchedWriter", "configure_logging", "get_logger", "info_line", "render"]

#: How long an info line may be held before it is written, in seconds.
HOLD = 0.01


class BatchedWriter:
    """A structlog logger (the output end) writing lines to ``file``, batched as the module
    says. One per process: every bound logger shares it."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._held: list[str] = []
        self._wakeup: trio.Event | None = None  # set to have the writer task write
        self._run: trio.lowlevel.TrioToken | None = None  # the run the writer task serves
        self._writing = False  # whether that task still runs (not once the run winds down)

    def write_now(self, message: str) -> None:
        """Write ``message`` (after any held lines) at once."""
        with self._lock:
            held = self._held
            if held:
                held.append(message)
                message = "\n".join(held)
                held.clear()
            self._file.write(message + "\n")
            self._file.flush()

    def hold(self, message: str) -> None:
        """Write ``message`` within :data:`HOLD` seconds when called from a trio run's
        thread, else at once."""
        if not trio.lowlevel.in_trio_run():
            self.write_now(message)
            return
        token = trio.lowlevel.current_trio_token()
        if token is not self._run:  # the first line of this run: start its writer task
            self._run = token
            self._wakeup = trio.Event()
            self._writing = True
            trio.lowlevel.spawn_system_task(self._writer, self._wakeup, name="log writer")
        elif not self._writing:  # the run is ending: nothing would write it
            self.write_now(message)
            return
        with self._lock:
            self._held.append(message)
        assert self._wakeup is not None
        self._wakeup.set()

    async def _writer(self, wakeup: trio.Event) -> None:
        """Write the held lines :data:`HOLD` seconds after the first was held; and what is
        left when the run ends (the task is cancelled then)."""
        try:
            while True:
                await wakeup.wait()
                await trio.sleep(HOLD)  # (later lines find the event set already)
                wakeup = self._wakeup = trio.Event()
                self.flush()
        finally:
            self._writing = False
            self.flush()

    def flush(self) -> None:
        """Write the held lines now."""
        with self._lock:
            if not self._held:
                return
            text = "\n".join(self._held) + "\n"
            self._held.clear()
            self._file.write(text)
            self._file.flush()

    debug = info = msg = hold
    log = warn = warning = error = err = critical = fatal = exception = failure = write_now


def _json_fallback(obj: Any) -> Any:
    """What JSON cannot hold: its ``__structlog__()``, else its ``repr`` (as structlog's
    JSONRenderer does)."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


class _Encoder:
    """``json.dumps(obj, default=_json_fallback)`` with one encoder for every line: json.dumps
    with ``default`` builds a JSONEncoder per call, and JSONEncoder.encode builds its C
    encoder per call too (about 0.6 µs of a line's 1.5 for the usual fields). Pure-Python
    builds of ``json`` get JSONEncoder.encode itself."""

    def __init__(self) -> None:
        self._make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
        self._slow = json.JSONEncoder(default=_json_fallback).encode
        self._encode = self._new() if self._make is not None else None

    def _new(self) -> Any:
        # JSONEncoder's own arguments for its defaults (ensure_ascii, check_circular,
        # allow_nan, no indent, ", " and ": ", keys unsorted and never skipped)
        return self._make(
            {},
            _json_fallback,
            json.encoder.encode_basestring_ascii,
            None,
            ": ",
            ", ",
            False,
            False,
            True,
        )

    def __call__(self, obj: Any) -> str:
        encode = self._encode
        if encode is None or not isinstance(obj, dict):
            return self._slow(obj)
        try:
            return "".join(encode(obj, 0))
        except BaseException:
            # The circular-reference markers of a call that failed may be left in it.
            self._encode = self._new()
            raise


_ENCODE = _Encoder()
_LEVELS = {"warn": "warning", "exception": "error"}  # structlog's add_log_level mapping


class _Clock:
    """ISO 8601 UTC timestamps as ``datetime.isoformat`` writes them, with the date and time
    of the current second formatted once per second rather than once per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = int((now - second) * 1_000_000)
        # isoformat leaves the fraction out when it is zero
        return f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"


_clock = _Clock()


def render(logger: Any, method_name: str, event_dict: EventDict) -> str:
    """structlog's ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)``,
    ``format_exc_info`` and ``JSONRenderer`` in one processor, with the same output: those
    four cost about a third more per line (a processor call each, the timestamp's date
    formatted every time, a JSON encoder made per line)."""
    event_dict["level"] = _LEVELS.get(method_name, method_name)
    event_dict["timestamp"] = _clock.stamp(time.time())
    if "exc_info" in event_dict:
        structlog.processors.format_exc_info(logger, method_name, event_dict)
    return _ENCODE(event_dict)


class _Installed(NamedTuple):
    """What :func:`configure_logging` gave structlog, for :func:`info_line` to recognise."""

    processors: list[Any]
    wrapper_class: type
    writer: BatchedWriter


# Set by configure_logging when info lines are on; info_line writes straight to the writer
# while structlog's configuration is still that one.
_installed: _Installed | None = None


def configure_logging(level: str = "info") -> None:
    """Send structlog events as JSON lines to stderr at ``level`` and above."""
    global _installed
    writer = BatchedWriter(sys.stderr)
    atexit.register(writer.flush)  # should a run end without its writer task's last pass
    processors: list[Any] = [structlog.contextvars.merge_contextvars, render]
    min_level = logging.getLevelNamesMapping()[level.upper()]
    wrapper_class = structlog.make_filtering_bound_logger(min_level)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper_class,
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=True,
    )
    _installed = (
        _Installed(processors, wrapper_class, writer) if min_level <= logging.INFO else None
    )


def info_line(event: str, **fields: Any) -> None:
    """``structlog.get_logger().info(event, **fields)``: the same line, for the lines written
    per connection (``connect``, ``disconnect``). While structlog is configured as
    :func:`configure_logging` left it, the line goes straight through that configuration's
    two processors to its writer, without structlog's lazy proxy, bound logger, processor
    loop and result checks: about 1.3 µs of a line's 5.7 in a loop. Under any other
    configuration (``structlog.testing.capture_logs``, or info lines off) it is that call."""
    installed = _installed
    if installed is not None:
        config = structlog.get_config()
        processors = config["processors"]
        if (
            processors is installed.processors
            # (capture_logs changes the configured list in place)
            and len(processors) == 2
            and processors[0] is structlog.contextvars.merge_contextvars
            and processors[1] is render
            and config["wrapper_class"] is installed.wrapper_class
        ):
            writer = installed.writer
            fields["event"] = event  # (structlog's order: the fields, then the event)
            writer.info(
                render(
                    writer,
                    "info",
                    structlog.contextvars.merge_contextvars(writer, "info", fields),
                )
            )
            return
    structlog.get_logger().info(event, **fields)


def get_logger(**initial: Any) -> Any:
    """A bound logger, with ``initial`` key/values on every event."""
    return structlog.get_logger().bind(**initial)
