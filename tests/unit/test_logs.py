"""The log writer (:class:`broker.logs.BatchedWriter`): inside a trio run the info lines held
within HOLD seconds go out in one write, warnings at once and after what was held, nothing is
left behind when the run ends, and outside a run every line is written at once. And the one
processor that renders a line (:func:`broker.logs.render`) writes what structlog's own
processors wrote."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from broker import logs
from broker.logs import _ENCODE, HOLD, BatchedWriter, _Clock, info_line, render


class Recorder(io.StringIO):
    """A file that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)


def test_outside_a_run_every_line_is_written_at_once() -> None:
    out = Recorder()
    writer = BatchedWriter(out)
    writer.info("a")
    writer.info("b")
    assert out.writes == ["a\n", "b\n"]


def test_the_lines_held_within_hold_seconds_go_out_in_one_write() -> None:
    out = Recorder()
    writer = BatchedWriter(out)

    async def main() -> None:
        async def connect(i: int) -> None:
            writer.info(f"connect {i}")

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(connect, i)
        await trio.sleep(HOLD / 2)
        writer.info("disconnect")
        assert out.writes == []  # held for now
        await trio.sleep(HOLD / 2 + 0.001)
        [batch] = out.writes  # (trio runs a batch's tasks in any order)
        assert sorted(batch.splitlines()) == ["connect 0", "connect 1", "connect 2", "disconnect"]
        writer.info("later")
        await trio.sleep(HOLD + 0.001)
        assert out.writes[1:] == ["later\n"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_warning_is_written_at_once_after_what_was_held() -> None:
    out = Recorder()
    writer = BatchedWriter(out)

    async def main() -> None:
        writer.info("connect")
        writer.warning("slow_consumer")
        assert out.writes == ["connect\nslow_consumer\n"]
        await trio.lowlevel.checkpoint()
        assert out.writes == ["connect\nslow_consumer\n"]

    trio.run(main)


def test_nothing_is_left_held_when_a_run_ends() -> None:
    out = Recorder()
    writer = BatchedWriter(out)

    async def main() -> None:
        writer.info("last words")  # the run ends before the writer's next pass

    trio.run(main)
    assert out.writes == ["last words\n"]
    writer.info("after")  # outside any run again
    trio.run(main)  # and a new run gets a writer of its own
    assert out.writes == ["last words\n", "after\n", "last words\n"]


def structlog_chain(method_name: str, event_dict: dict[str, Any]) -> str:
    """What structlog's own processors made of ``event_dict`` (the chain ``render`` replaces)."""
    for processor in (
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ):
        event_dict = processor(None, method_name, event_dict)
    rendered: str = structlog.processors.JSONRenderer(sort_keys=False)(
        None, method_name, event_dict
    )
    return rendered


def without_timestamp(line: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(line)
    assert isinstance(fields.pop("timestamp"), str)
    return fields


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


def test_render_writes_what_structlogs_processors_wrote() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    events: list[tuple[str, dict[str, Any]]] = [
        ("info", {"token_source": "query", "event": "connect", "worker": 0, "conn": 3}),
        ("warn", {"event": "slow", "reason": "é \u2028", "obj": Odd(), "n": 1.5}),
        ("exception", {"event": "connection_failed", "exc_info": exc_info}),
        ("error", {"event": "e", "exc_info": False, "none": None}),
    ]
    for method_name, fields in events:
        ours = without_timestamp(render(None, method_name, dict(fields)))
        theirs = without_timestamp(structlog_chain(method_name, dict(fields)))
        assert ours == theirs
        assert list(ours) == list(theirs)  # the same order of fields too


@pytest.mark.parametrize("now", [1764668843.0, 1764668843.25, 1764668843.5, 1767225599.75])
def test_the_timestamp_is_isoformats(now: float) -> None:
    expected = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    assert _Clock().stamp(now) == expected
    clock = _Clock()
    clock.stamp(now - 1)  # a cached second before
    assert clock.stamp(now) == expected


def test_the_shared_encoder_writes_what_json_dumps_writes() -> None:
    circular: dict[str, Any] = {"event": "loop"}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        _ENCODE(circular)
    nested = {"a": [1, {"b": None}], "c": 'é \u2028"', "d": 1.5, "e": float("inf"), "o": Odd()}
    for obj in ({}, {"event": "connect", "conn": 3}, nested, nested, ["not", "a", "dict"]):
        # (twice the same containers: a failed or finished call leaves no marker behind)
        assert _ENCODE(obj) == json.dumps(obj, default=repr)


def test_info_line_writes_the_line_log_info_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    out = Recorder()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(logs, "_installed", None)
    logs.configure_logging()
    try:

        async def main() -> None:
            structlog.contextvars.bind_contextvars(worker=1, conn=7, client="c")
            structlog.get_logger().info("connect", token_source="header", n=None)
            info_line("connect", token_source="header", n=None)
            with structlog.testing.capture_logs() as captured:  # another configuration
                info_line("disconnect", code=1006)
            assert captured == [{"event": "disconnect", "code": 1006, "log_level": "info"}]

        trio.run(main)
        theirs, ours = "".join(out.writes).splitlines()
        assert without_timestamp(ours) == without_timestamp(theirs)
        assert list(json.loads(ours)) == list(json.loads(theirs))  # the same order of fields
        assert list(json.loads(ours))[:2] == ["token_source", "n"]  # (and the right line)

        # With info lines off, it writes nothing, as log.info does.
        logs.configure_logging("warning")
        trio.run(info_line_alone)
        assert len("".join(out.writes).splitlines()) == 2
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


async def info_line_alone() -> None:
    info_line("connect", token_source="header")
