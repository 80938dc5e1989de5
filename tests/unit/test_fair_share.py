"""Fair share inside one worker, over in-memory streams: a connection's pipelined requests are
served in bounded turns, a condemned connection's buffered requests are not served at all, and
history is charged to the connection's read budget.

The clients here write raw frames, so that a whole pipeline reaches the server in one piece,
as one read."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from broker.worker import Worker
from tests.support.inmemory import make_worker, running, token
from tests.support.rawws import close_code, encode_frame, http_request


class RawClient:
    """One connection over a memory stream: raw masked frames out, server frames in."""

    def __init__(self, stream: trio.testing.MemoryStreamPair | Any) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, worker: Worker, nursery: trio.Nursery, sub: str) -> RawClient:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(worker._handle, server_stream)
        self = cls(client_stream)
        await client_stream.send_all(http_request(f"/ws?token={token(sub)}", port=80))
        while b"\r\n\r\n" not in self.buf:
            self.buf += await client_stream.receive_some()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (await self.json())["op"] == "welcome"
        return self

    async def send(self, *frames: dict[str, Any]) -> None:
        """Every frame in one write."""
        await self.stream.send_all(b"".join(encode_frame(json.dumps(f).encode()) for f in frames))

    async def frame(self) -> tuple[int, bytes]:
        while True:
            buf = self.buf
            if len(buf) >= 10 or (len(buf) >= 2 and buf[1] < 126):
                n, pos = buf[1], 2
                if n == 126:
                    n, pos = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127:
                    n, pos = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) >= pos + n:
                    self.buf = buf[pos + n :]
                    return buf[0] & 0x0F, buf[pos : pos + n]
            data = await self.stream.receive_some()
            if not data:
                raise EOFError("closed without a close frame")
            self.buf += data

    async def json(self) -> dict[str, Any]:
        """The next text frame; raises ConnectionError(code) at the close frame."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]
            if opcode == 0x8:
                raise ConnectionError(close_code(payload))


def history_requests(n: int, topic: str = "t") -> list[dict[str, Any]]:
    return [{"op": "history", "id": i, "topic": topic} for i in range(n)]


async def fill(client: RawClient, topic: str, count: int, data: Any) -> None:
    """Publish ``count`` publications and wait for their replies."""
    await client.send(
        *({"op": "publish", "id": i, "topic": topic, "data": data} for i in range(count))
    )
    for _ in range(count):
        assert (await client.json())["ok"]


async def replies_until_close(client: RawClient) -> tuple[list[dict[str, Any]], int]:
    replies = []
    try:
        while True:
            replies.append(await client.json())
    except ConnectionError as exc:
        return replies, exc.args[0]


async def test_a_pipeline_in_one_read_is_served_in_turns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        attacker = await RawClient.open(worker, nursery, "attacker")
        bystander = await RawClient.open(worker, nursery, "bystander")
        await fill(bystander, "t", 3, {"text": "x" * 200})
        n = 1000
        pipeline = history_requests(n)
        assert len(b"".join(encode_frame(json.dumps(f).encode()) for f in pipeline)) < 65536
        await attacker.send(*pipeline)  # one write, one read on the server's side
        first = await attacker.json()
        assert first["ok"] and first["offset"] == 3
        # The attacker is being served; the bystander's ping and publication get their turn
        # before the attacker's pipeline is through.
        await bystander.send(
            {"op": "ping", "id": "p"}, {"op": "publish", "id": "q", "topic": "t", "data": 4}
        )
        assert await bystander.json() == {"id": "p", "ok": True}
        assert (await bystander.json())["offset"] == 4
        offsets = [first["offset"]] + [(await attacker.json())["offset"] for _ in range(n - 1)]
        assert offsets[-1] == 4, "the bystander waited for the attacker's whole pipeline"
        assert offsets == sorted(offsets)


async def test_requests_past_the_read_budget_are_refused_and_a_condemned_connection_is_not_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(
        limits={"read_burst_bytes": 1000, "read_rate_bytes": 1, "max_violations": 5}
    )
    async with running(worker) as nursery:
        attacker = await RawClient.open(worker, nursery, "attacker")
        await fill(attacker, "t", 3, "x" * 500)  # every history reply is over 1000 bytes
        await attacker.send(*history_requests(200))
        replies, code = await replies_until_close(attacker)
        # The first reply overdraws the budget; the next six are refused, the sixth of them
        # is one violation too many (4029), and the 193 requests behind it are not served.
        assert [r["ok"] for r in replies] == [True] + [False] * 6
        assert {r["error"]["code"] for r in replies[1:]} == {"rate_limited"}
        assert code == 4029
        assert worker.read_refusals == {"history": 6}
        assert worker.stats()["read_refusals"] == {"history": 6}


async def test_a_slow_consumer_s_buffered_requests_are_not_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(limits={"send_queue_max_bytes": 4096})
    calls = 0
    history = worker.bus.history

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await history(*args, **kwargs)

    worker.bus.history = counted  # type: ignore[method-assign]
    async with running(worker) as nursery:
        attacker = await RawClient.open(worker, nursery, "attacker")
        await fill(attacker, "t", 3, "x" * 500)
        # Not read until the verdict: three replies of 1.7 KB overflow the 4 KiB queue.
        await attacker.send(*history_requests(200))
        replies, code = await replies_until_close(attacker)
        assert code == 4008
        assert not replies  # dropped with the rest of the queue
        assert calls == 3


async def test_subscribe_with_since_over_the_read_budget_subscribes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(limits={"read_burst_bytes": 1000, "read_rate_bytes": 100})
    async with running(worker) as nursery:
        client = await RawClient.open(worker, nursery, "alice")
        await fill(client, "t", 3, "x" * 500)
        await client.send({"op": "history", "id": 1, "topic": "t"})
        assert (await client.json())["ok"]  # about 1700 bytes: in debt now
        since = {"offset": 0, "epoch": (await client_position(client))["epoch"]}
        await client.send({"op": "subscribe", "id": 2, "topic": "t", "since": since})
        refused = await client.json()
        assert refused["error"]["code"] == "rate_limited"
        assert not worker.router.index.exact.get("t")
        assert worker.read_refusals == {"subscribe": 1}
        await trio.sleep(30)  # the debt (under 2000 bytes) is paid
        await client.send({"op": "subscribe", "id": 3, "topic": "t", "since": since})
        reply = await client.json()
        assert reply["ok"] and reply["recovered"], reply
        assert [(await client.json())["offset"] for _ in range(3)] == [1, 2, 3]


async def client_position(client: RawClient) -> dict[str, Any]:
    """The topic's position, from a subscribe without ``since`` (not charged) undone at once."""
    await client.send(
        {"op": "subscribe", "id": "s", "topic": "t"}, {"op": "unsubscribe", "id": "u", "topic": "t"}
    )
    reply = await client.json()
    assert (await client.json())["ok"]
    return reply


async def test_a_read_full_of_pings_is_parsed_in_slices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        streamer = await RawClient.open(worker, nursery, "streamer")
        bystander = await RawClient.open(worker, nursery, "bystander")
        pings = 10_000  # 60 KB: one read, some 30 ms of parsing in one go
        publish = {"op": "publish", "id": "s", "topic": "t", "data": "streamer"}
        await streamer.stream.send_all(
            encode_frame(b"", 0x9) * pings + encode_frame(json.dumps(publish).encode())
        )
        await bystander.send({"op": "publish", "id": "b", "topic": "t", "data": "bystander"})
        # The bystander's publication got in while the streamer's pings were being parsed.
        assert (await bystander.json())["offset"] == 1
        replies = [await streamer.frame() for _ in range(pings + 1)]
        assert replies[:pings] == [(0xA, b"")] * pings
        assert json.loads(replies[-1][1])["offset"] == 2


async def test_a_pipeline_of_large_replies_is_served_as_fast_as_the_client_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 50 replies of 100 KB: 5 MB asked in one write, five times the queue's limit. The
    # reader waits for each turn's replies to be written before the next turn, so a client
    # that reads is never taken for a slow consumer.
    worker = make_worker()
    async with running(worker) as nursery:
        client = await RawClient.open(worker, nursery, "reader")
        await fill(client, "t", 100, "x" * 1000)
        await client.send(*history_requests(50))
        replies = [await client.json() for _ in range(50)]
        assert all(r["ok"] and len(r["messages"]) == 100 for r in replies)
        await client.send({"op": "ping", "id": "p"})
        assert await client.json() == {"id": "p", "ok": True}
