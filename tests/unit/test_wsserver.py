"""The WebSocket layer (:mod:`broker.wsserver`) frame by frame, over a real socket pair: the
worker runs in trio, a raw client sends what it likes from a thread. Fragments, pings between
fragments, pipelined and byte-by-byte frames, both directions of the close handshake, and the
violations that close a connection with 1002, 1007 and 1009. Then a property over memory
streams: however messages are fragmented and the bytes split, the messages come out whole and
in order, and every ping is answered in order."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest
import structlog
import structlog.testing
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.sendqueue import Flusher, SendQueue
from broker.worker import Worker, tune_listener
from broker.wsserver import MAX_REQUEST_HEAD, VIOLATION_DRAIN, FrameLimits, ServerWebSocket
from tests.support.inmemory import make_worker, running, token
from tests.support.rawws import FrameReader, encode_frame, http_request, read_response

T = TypeVar("T")


class Client:
    """The client end of a socket pair, upgraded; used from a worker thread (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.sendall(http_request(f"/ws?token={token()}", port=0))
        status, _, rest = read_response(sock)
        assert status == 101
        self.reader = FrameReader(sock, rest)
        assert self.reader.json()["op"] == "welcome"

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def op(self, **frame: Any) -> bytes:
        return encode_frame(json.dumps(frame).encode())

    def eof(self) -> bool:
        """Whether the server closed the TCP connection (after everything already read)."""
        return self.reader.buf == b"" and self.sock.recv(1) == b""


@asynccontextmanager
async def client(worker: Worker) -> AsyncIterator[Callable[[Callable[[Client], T]], Any]]:
    """Serve one connection of ``worker`` over a socket pair; yields ``run(fn)``, which runs
    ``fn(client)`` in a thread and returns its result."""
    server_sock, client_sock = socket.socketpair()
    client_sock.settimeout(10)
    async with running(worker) as nursery:
        server_sock.setblocking(False)  # handed over as the worker's accept loop does
        nursery.start_soon(worker._handle, server_sock)
        box: list[Client] = []

        async def run(fn: Callable[[Client], T]) -> T:
            if not box:
                box.append(await trio.to_thread.run_sync(Client, client_sock))
            return await trio.to_thread.run_sync(fn, box[0])

        try:
            yield run
        finally:
            client_sock.close()


async def test_fragments_with_a_ping_between_them_make_one_message() -> None:
    async with client(make_worker()) as run:
        body = json.dumps({"op": "ping", "id": 1}).encode()

        def talk(c: Client) -> list[tuple[int, bytes]]:
            c.send(
                encode_frame(body[:5], 0x1, fin=False),
                encode_frame(b"are you there", 0x9),  # control frames may come between
                encode_frame(body[5:9], 0x0, fin=False),
                encode_frame(body[9:], 0x0),
            )
            return [c.reader.frame(), c.reader.frame()]

        pong, reply = await run(talk)
        assert pong == (0xA, b"are you there")
        assert reply[0] == 0x1 and json.loads(reply[1]) == {"id": 1, "ok": True}


async def test_pipelined_and_byte_by_byte_frames_are_all_served_in_order() -> None:
    async with client(make_worker()) as run:

        def talk(c: Client) -> list[Any]:
            c.send(*(c.op(op="ping", id=i) for i in range(50)))  # one write, 50 frames
            got = [c.reader.json()["id"] for _ in range(50)]
            for byte in c.op(op="ping", id="slow"):  # one frame, one byte at a time
                c.send(bytes([byte]))
            got.append(c.reader.json()["id"])
            return got

        assert await run(talk) == [*range(50), "slow"]


def test_accepted_sockets_inherit_the_tcp_options_set_on_the_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        tune_listener(listener)
        with (
            socket.create_connection(listener.getsockname()) as _,
            listener.accept()[0] as conn,
        ):
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 2**14


async def test_a_fragmented_message_over_the_limit_is_closed_with_1009() -> None:
    worker = make_worker(limits={"max_message_size": 1000})
    async with client(worker) as run:

        def talk(c: Client) -> int:
            # every fragment is under the limit; together they are not
            c.send(*(encode_frame(b"x" * 400, 0x0 if i else 0x1, fin=False) for i in range(3)))
            return c.reader.close_code()

        assert await run(talk) == 1009
    assert worker.closes[1009] == 1


async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007() -> None:
    async with client(make_worker()) as run:
        assert (
            await run(lambda c: (c.send(encode_frame(b'"\xff\xfe"')), c.reader.close_code())[1])
            == 1007
        )


async def test_an_unmasked_client_frame_is_closed_with_1002() -> None:
    async with client(make_worker()) as run:
        frame = encode_frame(b'{"op":"ping"}', masked=False)
        assert await run(lambda c: (c.send(frame), c.reader.close_code())[1]) == 1002


async def test_a_client_close_is_answered_with_its_code_then_the_socket_closes() -> None:
    worker = make_worker()
    async with client(worker) as run:

        def talk(c: Client) -> tuple[int, bool]:
            c.send(encode_frame(struct.pack("!H", 4321) + b"bye", 0x8))
            return c.reader.close_code(), c.eof()

        assert await run(talk) == (4321, True)
        await trio.testing.wait_all_tasks_blocked()
        assert not worker.sessions


async def test_a_server_close_waits_for_the_answer_then_closes_the_socket() -> None:
    worker = make_worker()
    async with client(worker) as run:
        await run(lambda c: None)  # upgraded
        assert worker.disconnect("alice") == 1

        def talk(c: Client) -> tuple[int, bool]:
            code = c.reader.close_code()
            c.send(encode_frame(struct.pack("!H", code), 0x8))
            # At once, not after the 2 s the server would give a client that never answers.
            c.sock.settimeout(1.5)
            return code, c.eof()

        assert await run(talk) == (1008, True)


async def test_a_request_that_is_not_an_upgrade_gets_400_and_no_session() -> None:
    worker = make_worker()
    server_sock, client_sock = socket.socketpair()
    client_sock.settimeout(10)
    async with running(worker) as nursery:
        nursery.start_soon(
            worker._handle, trio.SocketStream(trio.socket.from_stdlib_socket(server_sock))
        )

        def talk() -> tuple[int, bytes]:
            client_sock.sendall(http_request("/ws", port=0, upgrade=False))
            status, _, _ = read_response(client_sock)
            return status, client_sock.recv(1)

        with structlog.testing.capture_logs() as logs:
            assert await trio.to_thread.run_sync(talk) == (400, b"")
        client_sock.close()
    assert not worker.sessions and worker.handshaking == 0
    [rejected] = [e for e in logs if e["event"] == "rejected"]
    assert rejected["status"] == 400 and "Upgrade" in rejected["reason"]


def next_frame(data: bytes, pos: int = 0) -> tuple[int, bytes, int] | None:
    """The (opcode, payload, end) of the unmasked frame at ``pos`` in ``data``, if complete."""
    if pos + 2 > len(data):
        return None
    n = data[pos + 1] & 0x7F
    head = 2
    if n == 126:
        n, head = struct.unpack("!H", data[pos + 2 : pos + 4])[0], 4
    elif n == 127:
        n, head = struct.unpack("!Q", data[pos + 2 : pos + 10])[0], 10
    if pos + head + n > len(data):
        return None
    return data[pos] & 0x0F, data[pos + head : pos + head + n], pos + head + n


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of every complete unmasked frame in ``data``."""
    frames = []
    pos = 0
    while (frame := next_frame(data, pos)) is not None:
        opcode, payload, pos = frame
        frames.append((opcode, payload))
    return frames


messages = st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(messages=messages, data=st.data())
def test_any_fragmenting_and_splitting_gives_the_messages_whole_and_in_order(
    messages: list[str | bytes], data: st.DataObject
) -> None:
    wire: list[bytes] = []
    pings: list[bytes] = []
    for i, message in enumerate(messages):
        payload = message.encode() if isinstance(message, str) else message
        opcode = 0x1 if isinstance(message, str) else 0x2
        # Cuts anywhere, even inside a UTF-8 sequence (the decoder carries it over), and
        # empty fragments too.
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            wire.append(encode_frame(piece, 0x0 if j else opcode, fin=last))
            if data.draw(st.booleans()):
                ping = b"%d.%d:" % (i, j) + data.draw(st.binary(max_size=100))
                wire.append(encode_frame(ping, 0x9))  # between fragments, or after a message
                pings.append(ping)
    stream = b"".join(wire)
    splits = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *splits], [*splits, len(stream)], strict=True)]

    async def main() -> tuple[list[str | bytes], bytes]:
        client, server = trio.testing.memory_stream_pair()
        flusher = Flusher()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.run)
            queue = SendQueue(flusher, nursery, max_bytes=1 << 20, write_timeout=5)
            ws = ServerWebSocket(server, queue, FrameLimits(1 << 16))
            await client.send_all(http_request("/ws", port=0))
            assert await ws.receive_request() is not None
            ws.accept(None)
            for chunk in chunks:
                if chunk:
                    await client.send_all(chunk)
            got: list[str | bytes] = []
            for _ in messages:
                message = await ws.next_message()
                assert message is not None
                got.append(message)
            # As the session does: ask for the next message, which answers the pings that
            # came after the last one, then waits.
            nursery.start_soon(ws.next_message)
            received = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in received or len(pongs(received)) < len(pings):
                    received += await client.receive_some(65536)
            nursery.cancel_scope.cancel()
        return got, received

    def pongs(received: bytes) -> list[tuple[int, bytes]]:
        return server_frames(received.partition(b"\r\n\r\n")[2])

    got, received = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == messages
    assert received.startswith(b"HTTP/1.1 101 ")
    assert pongs(received) == [(0xA, ping) for ping in pings]


# --- limits and closing, over memory streams with the autojump clock --------------------------


class MemoryClient:
    """A raw client on the far end of a memory stream pair served by ``worker._handle``;
    ``done_at`` is when the worker let go of the connection."""

    def __init__(self, stream: trio.testing.StapledStream[Any, Any]) -> None:
        self.stream = stream
        self.buf = b""
        self.done_at: float | None = None

    async def send(self, *chunks: bytes) -> None:
        await self.stream.send_all(b"".join(chunks))

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def response(self) -> tuple[int, bytes]:
        """The status and body of the HTTP response (the body up to Content-Length)."""
        while b"\r\n\r\n" not in self.buf:
            assert await self._more(), self.buf
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buf) < length:
            assert await self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), body

    async def frame(self) -> tuple[int, bytes]:
        while (frame := next_frame(self.buf)) is None:
            assert await self._more(), "closed before a whole frame"
        opcode, payload, end = frame
        self.buf = self.buf[end:]
        return opcode, payload

    async def json(self) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]
            assert opcode != 0x8, payload

    async def close_frame(self) -> tuple[int, str]:
        """Read until the close frame: its code and reason."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    async def at_eof(self) -> bool:
        """Whether the server shut its side after what was already read."""
        return self.buf == b"" and not await self._more()


@asynccontextmanager
async def memory_client(worker: Worker) -> AsyncIterator[MemoryClient]:
    """A connection to ``worker`` (running) over memory streams, not yet upgraded."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    c = MemoryClient(client_stream)

    async def serve() -> None:
        await worker._handle(server_stream)
        c.done_at = trio.current_time()

    async with running(worker) as nursery:
        nursery.start_soon(serve)
        yield c


def upgrade_request(**headers: str) -> bytes:
    return http_request(f"/ws?token={token()}", headers, port=0)


@asynccontextmanager
async def upgraded_client(worker: Worker) -> AsyncIterator[MemoryClient]:
    """:func:`memory_client`, upgraded and welcomed."""
    async with memory_client(worker) as c:
        await c.send(upgrade_request())
        assert (await c.response())[0] == 101
        assert (await c.json())["op"] == "welcome"
        yield c


def ping_op(i: int) -> bytes:
    return encode_frame(json.dumps({"op": "ping", "id": i}).encode())


async def test_a_message_must_be_whole_within_message_timeout_whatever_comes_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(timeouts={"message_timeout": 10.0})
    async with upgraded_client(worker) as c:
        start = trio.current_time()
        await c.send(encode_frame(b'{"op":', 0x1, fin=False))
        pongs = 0
        with trio.fail_after(60):
            while True:
                await trio.sleep(1)
                # Pings and more fragments: each answered or taken, none moves the deadline.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await c.send(
                        encode_frame(b"%d" % pongs, 0x9), encode_frame(b" ", 0x0, fin=False)
                    )
                opcode, payload = await c.frame()
                if opcode == 0x8:
                    break
                assert (opcode, payload) == (0xA, b"%d" % pongs)
                pongs += 1
        assert struct.unpack("!H", payload[:2])[0] == 1008
        assert payload[2:] == b"message not completed within 10 s"
        assert 10 <= trio.current_time() - start < 11
        assert pongs == 9
    assert worker.closes[1008] == 1
    assert worker.frame_limits.refused == {"message_timeout": 1}


async def test_a_frame_trickling_in_is_held_to_the_same_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with upgraded_client(make_worker(timeouts={"message_timeout": 5.0})) as c:
        start = trio.current_time()

        async def trickle() -> None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for byte in ping_op(1) * 10:
                    await c.send(bytes([byte]))
                    await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await c.close_frame() == (1008, "message not completed within 5 s")
            assert 5 <= trio.current_time() - start < 6
            nursery.cancel_scope.cancel()


async def test_slow_messages_inside_the_deadline_and_long_pauses_between_them_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(timeouts={"message_timeout": 10.0, "idle_timeout": 60.0})
    async with upgraded_client(worker) as c:
        for i in range(3):
            body = ping_op(i)
            await c.send(body[:5])
            await trio.sleep(9.9)  # the rest just before the deadline
            await c.send(body[5:])
            assert await c.json() == {"id": i, "ok": True}
            await trio.sleep(50)  # between messages only the idle timer runs
    assert not worker.closes


async def test_after_a_violation_the_server_shuts_its_side_first_and_drains_only_briefly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with upgraded_client(worker) as c:
        await c.send(encode_frame(b'{"op":"ping"}', masked=False))
        assert (await c.close_frame())[0] == 1002
        violated = trio.current_time()
        assert await c.at_eof()  # right behind the close frame, while we still send
        assert trio.current_time() - violated < 0.01
        # A client that neither closes nor stops sending is cut off after the drain.
        while c.done_at is None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await c.send(b"garbage")
            await trio.sleep(0.01)
        assert VIOLATION_DRAIN <= c.done_at - violated < VIOLATION_DRAIN + 0.05


async def test_frames_pipelined_behind_the_upgrade_request_are_served() -> None:
    worker = make_worker()
    async with memory_client(worker) as c:
        frames = b"".join(ping_op(i) for i in range(3))
        big = encode_frame(json.dumps({"op": "ping", "id": "big", "pad": "x" * 60_000}).encode())
        with trio.fail_after(5):
            await c.send(upgrade_request() + frames + big)  # one write, one read
            assert (await c.response())[0] == 101
            assert (await c.json())["op"] == "welcome"
            assert [(await c.json())["id"] for _ in range(4)] == [0, 1, 2, "big"]


def request_of_size(size: int) -> bytes:
    """An upgrade request whose head is exactly ``size`` bytes long."""
    base = len(upgrade_request(Pad=""))
    request = upgrade_request(Pad="p" * (size - base))
    assert len(request) == size
    return request


@pytest.mark.parametrize("step", [1, 1000, 65536])
async def test_the_request_head_limit_holds_however_the_bytes_are_split(step: int) -> None:
    for size, status in ((MAX_REQUEST_HEAD, 101), (MAX_REQUEST_HEAD + 1, 431)):
        worker = make_worker()
        async with memory_client(worker) as c:
            request = request_of_size(size)
            with trio.fail_after(10):
                for i in range(0, len(request), step):
                    await c.send(request[i : i + step])
                    await trio.testing.wait_all_tasks_blocked()  # one read per piece
                got, body = await c.response()
            assert got == status
            if status == 431:
                assert json.loads(body)["error"]["code"] == "bad_request"
                assert await c.at_eof()
        assert worker.frame_limits.refused == ({"request_head": 1} if status == 431 else {})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Host", "h\u00e9llo.example"),
        ("Host", "\u4f8b\u3048.jp"),
        ("Connection", "Upgrade, ke\u00e9p-alive"),
        ("Sec-WebSocket-Protocol", "pubsub.v1, \u00fc"),
    ],
)
async def test_a_header_that_must_be_ascii_and_is_not_gets_400_not_a_traceback(
    name: str, value: str
) -> None:
    worker = make_worker()
    request = upgrade_request()
    if name in ("Host", "Connection"):  # replace the header rawws writes
        head, _, rest = request.partition(f"\r\n{name}: ".encode())
        request = head + f"\r\n{name}: {value}".encode() + b"\r\n" + rest.partition(b"\r\n")[2]
    else:
        request = upgrade_request(**{name: value})
    with structlog.testing.capture_logs() as logs:
        async with memory_client(worker) as c:
            await c.send(request)
            with trio.fail_after(5):
                status, body = await c.response()
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert worker.frame_limits.refused == {"header_encoding": 1}


class FlakyListener(trio.abc.Listener[trio.abc.Stream]):
    """Fails ``accept`` with each of ``errors`` in turn, then hands out ``streams``."""

    def __init__(self, errors: list[int], streams: list[trio.abc.Stream]) -> None:
        self.errors = errors
        self.streams = streams
        self.closed = False

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, "refused")
        if self.streams:
            return self.streams.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        self.closed = True


async def test_accept_goes_on_after_running_out_of_descriptors(autojump_clock: Any) -> None:
    import errno

    worker = make_worker()
    server_stream, client_stream = trio.testing.memory_stream_pair()
    listener = FlakyListener([errno.EMFILE, errno.ENFILE], [server_stream])
    async with running(worker) as nursery:
        with structlog.testing.capture_logs() as logs:
            nursery.start_soon(worker._accept_from, listener, nursery)
            await client_stream.send_all(http_request(f"/ws?token={token()}", port=0))
            response = await client_stream.receive_some()
        assert response.startswith(b"HTTP/1.1 101")  # served after two failed accepts
        assert [e["event"] for e in logs if e["event"] == "accept_failed"] == ["accept_failed"] * 2
        nursery.cancel_scope.cancel()
    assert listener.closed


async def test_another_accept_failure_is_raised() -> None:
    import errno

    worker = make_worker()
    listener = FlakyListener([errno.EBADF], [])
    async with running(worker) as nursery:
        with pytest.raises(OSError):
            await worker._accept_from(listener, nursery)
        nursery.cancel_scope.cancel()
    assert listener.closed


class FlakySocket(socket.socket):
    """A listening socket whose ``accept`` fails with each of ``errors`` in turn first."""

    errors: list[int]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.errors:
            raise OSError(self.errors.pop(0), "refused")
        return super().accept()


def flaky_listener(errors: list[int]) -> FlakySocket:
    sock = FlakySocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.errors = errors
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_a_plain_socket_serves_every_waiting_connection_and_goes_on_after_failures() -> None:
    import errno

    # (no autojump clock: the clients run in threads, and the handshake timeout would jump)

    worker = make_worker()
    # out of descriptors twice, then a connection that went away: logged, retried, skipped
    sock = flaky_listener([errno.EMFILE, errno.ECONNABORTED, errno.ENFILE])
    port = sock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        async with running(worker) as nursery:
            with structlog.testing.capture_logs() as logs:
                nursery.start_soon(worker._accept_plain, sock, nursery)

                def talk(c: socket.socket) -> int:
                    c.settimeout(10)
                    c.sendall(http_request(f"/ws?token={token()}", port=port))
                    return read_response(c)[0]

                for c in clients:  # all three waited in the backlog before the loop started
                    assert await trio.to_thread.run_sync(talk, c) == 101
            assert [e["event"] for e in logs if e["event"] == "accept_failed"] == [
                "accept_failed"
            ] * 2
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
    assert sock.fileno() == -1  # closed with the loop


async def test_another_accept_failure_of_a_plain_socket_is_raised() -> None:
    import errno

    worker = make_worker()
    sock = flaky_listener([errno.EBADF])
    async with running(worker) as nursery:
        socket.create_connection(sock.getsockname()).close()  # something to accept
        with pytest.raises(OSError):
            await worker._accept_plain(sock, nursery)
        nursery.cancel_scope.cancel()
    assert sock.fileno() == -1
