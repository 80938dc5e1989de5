"""Mutated requests thrown at the listener: whatever arrives, it answers with a well-formed
response or closes the connection, and keeps serving others."""

from __future__ import annotations

import json
import random

import trio

from broker.http import HttpLimits
from tests.http.httpkit import API_KEY, Listener, running_listener

SEEDS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/history?topic=a.b&since=1&epoch=e&limit=5 HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 30\r\n\r\n"
    b'{"topic":"a.b","data":[1,{}]} ',
    b"POST /api/disconnect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n10\r\n"
    b'{"client":"bob"}\r\n0\r\n\r\n',
]
TOKENS = [
    b"\r\n",
    b"\r\n\r\n",
    b"\x00",
    b"\xff",
    b":",
    b" ",
    b"?",
    b"%",
    b"{",
    b'"',
    b"9" * 20,
    b"Content-Length: 99999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"HTTP/1.0",
    b"\t",
    b"\\u0000",
    b"[" * 50,
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(out) + 1)
        if op < 0.3 and out:
            del out[pos : pos + rng.randint(1, 8)]
        elif op < 0.6:
            out[pos:pos] = rng.choice(TOKENS)
        elif op < 0.8 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        else:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def check_answer(data: bytes) -> None:
    """Nothing, or responses that each start with a status line; error bodies are JSON."""
    if not data:
        return
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head[9:12])
    assert 100 <= status < 600
    if status >= 400 and body and b"HTTP/1.1 " not in body:
        assert "error" in json.loads(body)


async def test_mutated_requests_never_break_the_listener() -> None:
    rng = random.Random(7)
    limits = HttpLimits(header_timeout=0.5, keepalive_timeout=0.5, body_timeout=0.5)
    async with running_listener(limits=limits) as lst:
        cases = [mutate(rng, rng.choice(SEEDS)) for _ in range(400)]

        async def one(data: bytes) -> None:
            check_answer(await lst.raw(data))

        for start in range(0, len(cases), 50):
            async with trio.open_nursery() as nursery:
                for case in cases[start : start + 50]:
                    nursery.start_soon(one, case)
        await still_serving(lst)


async def still_serving(lst: Listener) -> None:
    reply = await lst.request("GET", "/healthz", key=None)
    assert reply.status == 200
    reply = await lst.request("POST", "/api/publish", {"topic": "after.fuzz", "data": 1})
    assert reply.status == 200
