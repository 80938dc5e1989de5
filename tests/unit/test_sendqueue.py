"""The send path over a real socket pair: one writev per flush, bounded queues, slow-consumer
verdicts, control frames in order, and at most one drainer per socket."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.lowlevel
import trio.testing

from broker.sendqueue import Flusher, SendQueue


async def pair(
    nursery: trio.Nursery, flusher: Flusher, **kw: object
) -> tuple[SendQueue, socket.socket, list[str]]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(False)
    verdicts: list[str] = []
    queue = SendQueue(
        flusher,
        nursery,
        max_bytes=kw.get("max_bytes", 1 << 20),
        write_timeout=kw.get("write_timeout", 10.0),  # type: ignore[arg-type]
        on_slow=verdicts.append,
    )
    queue.attach(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    return queue, b, verdicts


async def test_frames_coalesce_into_one_write_in_order() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, _ = await pair(nursery, flusher)
        for i in range(50):
            queue.send(b"%03d;" % i)
        await trio.sleep(0.05)
        assert flusher.writes == 1
        peer.setblocking(False)
        assert peer.recv(65536) == b"".join(b"%03d;" % i for i in range(50))
        nursery.cancel_scope.cancel()


async def test_queue_over_its_limit_is_a_slow_consumer_and_memory_is_released() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher, max_bytes=100_000)
        frame = b"x" * 1000
        sent = 0
        while queue.send(frame):
            sent += 1
            if sent % 20 == 0:
                await trio.sleep(0.01)
        assert verdicts == ["send_queue_max_bytes"]
        assert queue.overflowed and queue.queued < len(frame)
        assert not queue.send(frame)  # nothing more is accepted
        peer.close()
        nursery.cancel_scope.cancel()


async def test_write_timeout_is_a_slow_consumer(autojump_clock: trio.testing.MockClock) -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher, write_timeout=5.0)
        for _ in range(200):
            queue.send(b"y" * 1000)  # far more than both socket buffers; nobody reads
        await trio.sleep(6)
        assert verdicts == ["write_timeout"]
        peer.close()
        nursery.cancel_scope.cancel()


async def test_control_frames_wait_for_their_turn_and_arrive_whole() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, _ = await pair(nursery, flusher)
        big = b"d" * 200_000  # blocks: the drainer takes over
        queue.send(big)
        received = bytearray()
        peer.setblocking(False)

        async def reader() -> None:
            while len(received) < len(big) + 5:
                await trio.lowlevel.wait_readable(peer)
                received.extend(peer.recv(65536))

        nursery.start_soon(reader)
        with trio.fail_after(5):
            queue.send_control(b"CLOSE")  # as a close frame is sent
            await queue.wait_drained()
        await trio.sleep(0.05)
        assert bytes(received) == big + b"CLOSE"
        nursery.cancel_scope.cancel()


async def test_overflow_while_blocked_keeps_one_drainer_and_a_whole_frame() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher, max_bytes=150_000)
        frame = b"F" * 50_000
        queue.send(frame)
        await trio.sleep(0.05)  # partly written, then blocked
        for _ in range(5):
            queue.send(frame)
        assert verdicts == ["send_queue_max_bytes"]
        got = bytearray()
        peer.setblocking(False)
        with trio.fail_after(5):
            queue.send_control(b"END")
            while not got.endswith(b"END"):
                await trio.lowlevel.wait_readable(peer)
                got.extend(peer.recv(65536))
        # Whatever was dropped, the stream stayed well-formed: whole frames, then END.
        assert bytes(got[:-3]).strip(b"F") == b"" and (len(got) - 3) % len(frame) == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("passes", [(0, 1), (3, 64)])
async def test_flusher_passes_setting(passes: tuple[int, int]) -> None:
    flusher = Flusher(min_passes=passes[0], max_passes=passes[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, _ = await pair(nursery, flusher)
        queue.send(b"hello")
        await trio.sleep(0.05)
        peer.setblocking(False)
        assert peer.recv(100) == b"hello"
        nursery.cancel_scope.cancel()


# --- second-level failures: what happens once the connection is already in trouble ----------


class Reports(list[str]):
    """A queue callback that records its reasons; ``event`` is set by the first."""

    def __init__(self) -> None:
        super().__init__()
        self.event = trio.Event()

    def __call__(self, reason: str) -> None:
        self.append(reason)
        self.event.set()


async def test_a_write_timeout_after_the_slow_verdict_gives_the_socket_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher, max_bytes=100_000, write_timeout=5.0)
        queue.on_broken = broken = Reports()
        sent = 0
        while queue.send(b"z" * 1000):  # nobody reads: the socket fills, then the queue
            sent += 1
            if sent % 20 == 0:
                await trio.sleep(0.01)
        assert verdicts == ["send_queue_max_bytes"] and not broken
        queue.send_control(b"CLOSE")  # the close frame that would tell the client why
        drained = trio.Event()

        async def wait_drained() -> None:
            await queue.wait_drained()
            drained.set()

        nursery.start_soon(wait_drained)
        await trio.sleep(4.9)
        assert not broken and not queue.closed  # still given its write_timeout
        await trio.sleep(0.2)
        # Even the close frame cannot go out: the socket is given up, nothing more is queued,
        # and whoever waited for the queue to drain is let go.
        assert verdicts == ["send_queue_max_bytes"] and broken == ["write_timeout"]
        assert queue.closed and queue.queued == 0 and not queue.send(b"x")
        await trio.lowlevel.checkpoint()
        assert drained.is_set()
        peer.close()
        nursery.cancel_scope.cancel()


async def test_a_second_write_timeout_while_the_close_frame_waits_gives_the_socket_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher, write_timeout=5.0)
        queue.on_broken = broken = Reports()
        for _ in range(200):
            queue.send(b"y" * 1000)
        await trio.sleep(5.1)
        assert verdicts == ["write_timeout"] and not broken and not queue.closed
        queue.send_control(b"CLOSE")
        await trio.sleep(5.1)
        assert verdicts == ["write_timeout"] and broken == ["write_timeout"]
        assert queue.closed
        peer.close()
        nursery.cancel_scope.cancel()


async def test_a_failed_socket_is_reported_broken_once_and_the_queue_closes() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher)
        queue.on_broken = broken = Reports()
        peer.close()  # the client is gone: the next write fails (EPIPE / ECONNRESET)
        queue.send(b"hello")
        with trio.fail_after(5):
            await broken.event.wait()
        queue.send(b"more")
        await trio.sleep(0.05)
        assert len(broken) == 1 and broken[0] and not verdicts
        assert queue.closed and queue.queued == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("overflowed", [False, True], ids=["blocked", "already-slow"])
async def test_a_stream_that_breaks_under_the_drainer_is_reported_broken(
    overflowed: bool,
) -> None:
    """Not a plain socket (TLS, here an in-memory stream): the drainer writes with send_all,
    and a stream that breaks under it is reported broken, whatever state the queue was in."""
    flusher = Flusher()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        verdicts: list[str] = []
        broken = Reports()
        queue = SendQueue(
            flusher,
            nursery,
            max_bytes=10,
            write_timeout=10.0,
            on_slow=verdicts.append,
            on_broken=broken,
        )
        queue.attach(server)
        await client.aclose()
        if overflowed:
            queue.send(b"x" * 11)
            queue.send_control(b"CLOSE")
        else:
            queue.send(b"hello")
        with trio.fail_after(5):
            await broken.event.wait()
        assert verdicts == (["send_queue_max_bytes"] if overflowed else [])
        assert len(broken) == 1 and queue.closed
        nursery.cancel_scope.cancel()


async def test_a_queue_holds_exactly_max_bytes() -> None:
    flusher = Flusher()  # not running: nothing is written
    async with trio.open_nursery() as nursery:
        queue, peer, verdicts = await pair(nursery, flusher, max_bytes=10)
        assert queue.send(b"0123456789") and queue.queued == 10 and not verdicts
        assert not queue.send(b"!")
        assert verdicts == ["send_queue_max_bytes"]
        peer.close()
        nursery.cancel_scope.cancel()


async def test_partial_writes_across_many_frames_keep_the_stream_whole() -> None:
    """Small frames behind a slow reader: each write ends inside some frame, after many whole
    ones; the bytes must come out exactly once and in order."""
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, _ = await pair(nursery, flusher)
        frames = [b"<%05d>" % i + b"." * (i % 37) for i in range(5000)]
        expected = b"".join(frames)
        for frame in frames:
            queue.send(frame)
        peer.setblocking(False)
        got = bytearray()
        with trio.fail_after(10):
            while len(got) < len(expected):
                await trio.lowlevel.wait_readable(peer)
                got.extend(peer.recv(1500))  # less than a write: the writer keeps blocking
        assert bytes(got) == expected
        nursery.cancel_scope.cancel()


async def test_a_socket_already_full_at_flush_time_is_handed_to_the_drainer() -> None:
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher)
        sock = queue._socket
        assert sock is not None
        filler = 0
        with pytest.raises(BlockingIOError):
            while True:  # fill the socket behind the queue's back
                filler += os.write(sock.fileno(), b"f" * 4096)
        queue.send(b"FRAME")
        await trio.sleep(0.05)  # the flusher finds the socket full: it must not spin
        peer.setblocking(False)
        got = bytearray()
        with trio.fail_after(5):
            while not got.endswith(b"FRAME"):
                await trio.lowlevel.wait_readable(peer)
                got.extend(peer.recv(65536))
        assert len(got) == filler + 5 and not verdicts
        nursery.cancel_scope.cancel()


async def test_waiting_for_a_low_water_mark_wakes_as_the_peer_reads() -> None:
    # A replay waits until the queue is down to a mark; a later waiter with a lower target
    # (everything written) wakes only after an earlier one with a higher one.
    flusher = Flusher()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        queue, peer, verdicts = await pair(nursery, flusher)
        for _ in range(100):
            queue.send(b"z" * 1000)  # far more than both socket buffers
        await trio.sleep(0.05)
        assert queue.queued > 50_000
        woke: list[tuple[str, int]] = []

        async def wait(name: str, below: int) -> None:
            await queue.wait_drained(below)
            woke.append((name, queue.queued))

        nursery.start_soon(wait, "all", 0)
        nursery.start_soon(wait, "half", 50_000)
        await trio.sleep(0.05)
        assert woke == []  # nobody read yet
        peer.setblocking(False)
        received = 0
        while received < 100_000:
            try:
                received += len(peer.recv(65536))
            except BlockingIOError:
                await trio.sleep(0.001)
        await trio.sleep(0.05)
        assert [name for name, _ in woke] == ["half", "all"]
        assert woke[0][1] <= 50_000 and woke[1][1] == 0
        assert verdicts == []
        peer.close()
        nursery.cancel_scope.cancel()


# --- how many scheduler passes the flusher waits: few for a lone frame, many for a burst -----


class Arrivals:
    """The flusher's ``progress`` counter, scripted per pass: the flusher reads it once when it
    wakes and once after each pass, and each read first sends that read's arrivals (the next
    number of ``script``, none once it is used up) to every queue, as publications delivered
    between two passes would be. ``reads`` counts the reads: the wake-up and the passes."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.queues: list[SendQueue] = []
        self.count = 0
        self.reads = 0

    def __call__(self) -> int:
        arriving = self.script[self.reads] if self.reads < len(self.script) else 0
        self.reads += 1
        for _ in range(arriving):
            self.count += 1
            for queue in self.queues:
                queue.send(b"%03d;" % self.count)
        return self.count


async def run_script(
    script: list[int], connections: int = 1, **kw: int
) -> tuple[Flusher, Arrivals, list[bytes]]:
    """Send one publication to ``connections`` queues, let the flusher write with ``script``'s
    arrivals (:class:`Arrivals`), and return what each peer received."""
    arrivals = Arrivals(script)
    flusher = Flusher(arrivals, **kw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        peers = []
        for _ in range(connections):
            queue, peer, _ = await pair(nursery, flusher)
            arrivals.queues.append(queue)
            peers.append(peer)
        await trio.testing.wait_all_tasks_blocked()
        arrivals.count = 1
        for queue in arrivals.queues:
            queue.send(b"001;")
        await trio.testing.wait_all_tasks_blocked()
        got = []
        for peer in peers:
            peer.setblocking(False)
            got.append(peer.recv(65536))
        nursery.cancel_scope.cancel()
    return flusher, arrivals, got


async def test_a_lone_publication_is_written_after_one_pass() -> None:
    flusher, arrivals, got = await run_script([])
    assert got == [b"001;"] and flusher.writes == 1
    assert arrivals.reads == 2  # the wake-up and one pass, not the three of a burst


async def test_a_lone_publication_to_many_connections_waits_for_more() -> None:
    # Past lone_queues the writes cost enough that the passes are worth it.
    flusher, arrivals, got = await run_script([], connections=3, lone_queues=2)
    assert got == [b"001;"] * 3 and flusher.writes == 3
    assert arrivals.reads == 4  # the wake-up and min_passes


async def test_a_burst_with_quiet_passes_between_its_publications_still_coalesces() -> None:
    # A publication every other pass: a quiet pass alone must not end a burst.
    flusher, arrivals, got = await run_script([0, 1, 0, 1, 0, 1, 0, 1])
    assert got == [b"".join(b"%03d;" % i for i in range(1, 6))]
    assert flusher.writes == 1
    assert arrivals.reads == 10  # the last arrival, then two quiet passes
