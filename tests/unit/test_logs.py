"""The log writer (:class:`broker.logs.BatchedWriter`): inside a trio run the info lines held
within HOLD seconds go out in one write, warnings at once and after what was held, nothing is
left behind when the run ends, and outside a run every line is written at once."""

from __future__ import annotations

import io

import trio
import trio.testing

from broker.logs import HOLD, BatchedWriter


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
