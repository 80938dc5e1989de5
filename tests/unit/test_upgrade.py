"""The upgrade request's fast path (:mod:`broker.upgrade`) against wsproto and h11, which judge
every request it does not take: whatever it takes, wsproto accepts and reads the same way, and
the 101 and the refusals it writes are the bytes h11 writes. Then the same through a
connection: a request split anyhow is answered once whole, and one that h11 refuses on its
first byte is refused at once, as before."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError

from broker.upgrade import UpgradeRequest, accept_response, parse_request, reject_response
from tests.support.inmemory import make_worker, token
from tests.unit.test_wsserver import memory_client, upgrade_request

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BASE = [
    ("Host", "127.0.0.1:8080"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def head(
    headers: list[tuple[str, str]], line: str = "GET /ws?token=t HTTP/1.1", eol: str = "\r\n"
) -> bytes:
    return (eol.join([line, *(f"{k}: {v}" for k, v in headers)]) + eol + eol).encode("utf-8")


def replaced(name: str, value: str | None) -> list[tuple[str, str]]:
    """BASE with header ``name`` set to ``value`` (dropped when None)."""
    out = [(k, v) for k, v in BASE if k != name]
    return out if value is None else [*out, (name, value)]


def wsproto_request(data: bytes) -> tuple[WSConnection, Request | None]:
    """What wsproto makes of ``data``: its connection and the request (None if refused)."""
    conn = WSConnection(ConnectionType.SERVER)
    try:
        conn.receive_data(data)
    except (RemoteProtocolError, UnicodeError):
        return conn, None
    events = [e for e in conn.events() if isinstance(e, Request)]
    return conn, events[0] if events else None


def assert_same_as_wsproto(data: bytes) -> UpgradeRequest | None:
    """parse_request takes ``data`` only if wsproto accepts it, reads it as wsproto does, and
    answers it with wsproto's bytes."""
    ours = parse_request(data)
    conn, theirs = wsproto_request(data)
    if ours is None:
        return None
    assert theirs is not None, data
    assert ours.target == theirs.target
    assert ours.extra_headers == theirs.extra_headers
    assert list(ours.subprotocols) == theirs.subprotocols
    assert ours.key is not None
    offered = "pubsub.v1" if "pubsub.v1" in ours.subprotocols else None
    assert accept_response(ours.key, offered) == conn.send(AcceptConnection(subprotocol=offered))
    body = json.dumps({"error": {"code": "unauthorized", "message": "no"}}).encode()
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]
    conn, _ = wsproto_request(data)
    refusal = conn.send(RejectConnection(status_code=401, headers=headers, has_body=True))
    refusal += conn.send(RejectData(data=body))
    assert reject_response(401, headers, body) == refusal
    return ours


def test_a_browser_request_takes_the_fast_path_and_reads_as_wsproto_reads_it() -> None:
    firefox = [
        *replaced("Connection", "keep-alive, Upgrade"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
        ("Origin", "  http://app.example  "),
        ("Sec-WebSocket-Protocol", "x, pubsub.v1,,y "),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Authorization", "Bearer abc.def.ghi"),
        ("X-Empty", ""),
    ]
    request = assert_same_as_wsproto(head(firefox))
    assert request is not None
    assert request.subprotocols == ("x", "pubsub.v1", "", "y")
    assert (b"origin", b"http://app.example") in request.extra_headers
    assert all(
        name not in dict(request.extra_headers) for name in (b"host", b"sec-websocket-protocol")
    )


def test_the_101_is_rfc_6455s_example() -> None:
    # RFC 6455 1.3: this key is answered with this accept value
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accept_response(
        KEY.encode(), None
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(head(replaced("Sec-WebSocket-Key", None)), id="missing key"),
        pytest.param(head(replaced("Sec-WebSocket-Version", "8")), id="bad version"),
        pytest.param(head(replaced("Sec-WebSocket-Version", None)), id="no version"),
        pytest.param(head(replaced("Upgrade", "h2c")), id="upgrade to something else"),
        pytest.param(head(replaced("Connection", "keep-alive")), id="no upgrade token"),
        pytest.param(head(replaced("Host", None)), id="no host"),
        pytest.param(head(BASE, "POST /ws HTTP/1.1"), id="not GET"),
        pytest.param(head(BASE, "GET /ws HTTP/1.0"), id="HTTP/1.0"),
        pytest.param(head(BASE, "GET  /ws HTTP/1.1"), id="two spaces"),
        pytest.param(head(BASE, "GET /ws"), id="no version in the request line"),
        pytest.param(head(BASE, eol="\n"), id="bare LF"),
        pytest.param(head([*BASE, ("X", "a\rb")]), id="bare CR in a value"),
        pytest.param(head([*BASE, ("Bad Name", "x")]), id="space in a name"),
        pytest.param(head([*BASE, ("X", "a"), (" folded", "b")]), id="obsolete folding"),
        pytest.param(head([*BASE, ("Origin", "http://h\u00e9.example")]), id="non-ASCII"),
        pytest.param(head(replaced("Host", "h\u00e9llo.example")), id="non-ASCII host"),
        pytest.param(head(replaced("Host", "xn--zz.example")), id="IDNA host"),
        pytest.param(head([*BASE, ("Content-Length", "5")]), id="a body"),
        pytest.param(
            head([*BASE, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
            id="both Content-Length and Transfer-Encoding",
        ),
        pytest.param(head([*BASE, ("Transfer-Encoding", "gzip")]), id="Transfer-Encoding"),
        pytest.param(head([*BASE, ("Host", "other")]), id="two hosts"),
        pytest.param(head([*BASE, ("Sec-WebSocket-Key", "x")]), id="two keys"),
        pytest.param(head(replaced("Connection", "Upgrade, close")), id="Connection: close"),
        pytest.param(b"\r\n" + head(BASE), id="a blank line first"),
        pytest.param(head(BASE)[:-2], id="no blank line"),
        pytest.param(b"garbage\r\n\r\n", id="garbage"),
    ],
)
def test_anything_not_plainly_valid_is_left_to_wsproto(data: bytes) -> None:
    assert parse_request(data) is None


header_names = st.sampled_from(
    [
        "Host",
        "host",
        "Upgrade",
        "Connection",
        "CONNECTION",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Origin",
        "Authorization",
        "Content-Length",
        "X-Any",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            "websocket",
            "WebSocket",
            "Upgrade",
            "keep-alive, upgrade",
            "close, Upgrade",
            "13",
            "8",
            KEY,
            "pubsub.v1",
            " a , b ",
            "",
            "\t",
            "xn--a",
            "5",
        ]
    ),
    st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=12),
)


@settings(max_examples=500, deadline=None)
@given(
    changes=st.lists(st.tuples(header_names, header_values, st.booleans()), max_size=6),
    target=st.sampled_from(["/ws", "/ws?token=a%20b", "/x", "*", "/\u00e9"]),
)
def test_whatever_the_fast_path_takes_wsproto_takes_and_answers_the_same(
    changes: list[tuple[str, str, bool]], target: str
) -> None:
    """A valid request with headers replaced (the flag) or added."""
    headers = list(BASE)
    for name, value, replace in changes:
        if replace:
            headers = [(k, v) for k, v in headers if k.lower() != name.lower()]
        headers.append((name, value))
    assert_same_as_wsproto(head(headers, f"GET {target} HTTP/1.1"))


async def test_a_request_split_at_every_byte_is_answered_once_whole() -> None:
    async with memory_client(make_worker()) as c:
        request = upgrade_request(Pad="x" * 100)
        with trio.fail_after(10):
            for i in range(len(request)):
                await c.send(request[i : i + 1])
                await trio.testing.wait_all_tasks_blocked()  # one read per byte
            assert (await c.response())[0] == 101
            assert (await c.json())["op"] == "welcome"


@pytest.mark.parametrize("first", [b"\r\n", b" ", b"\x00"])
async def test_a_request_that_cannot_start_is_refused_before_its_end(first: bytes) -> None:
    async with memory_client(make_worker()) as c:
        with trio.fail_after(10):
            await c.send(first + b"GET /ws?token=" + token().encode())  # no blank line yet
            assert (await c.response())[0] == 400
            assert await c.at_eof()


async def test_a_valid_request_off_the_fast_path_is_still_accepted() -> None:
    async with memory_client(make_worker()) as c:
        request = upgrade_request().replace(b"\r\n", b"\n")  # bare LF: h11 takes it
        with trio.fail_after(10):
            await c.send(request)
            assert (await c.response())[0] == 101
            assert (await c.json())["op"] == "welcome"
