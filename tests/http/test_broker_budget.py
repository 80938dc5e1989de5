"""The real broker's operations listener (a subprocess, one worker and two: with two it runs in
the supervisor) under the attacks of issue "every client on a budget": bodies sent without a
key, requests framed two ways, and more idle connections than it has slots. Also what the
broker says of itself: the host name only when ``[server] node_id`` says so."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.http.brokerkit import http, ws_welcomed
from tests.http.httpkit import HEALTHZ, open_idle, send_and_read
from tests.http.test_broker_http import metrics
from tests.support.broker import API_KEY, BrokerProcess

# The listener's default budget is 512 connections: hold more than that.
IDLE_API = 560
SLOW_HEADS = 100


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    workdir = tmp_path_factory.mktemp(f"budget{request.param}")
    with BrokerProcess.start(workdir, workers=request.param) as b:
        assert b.http_port
        yield b


async def test_health_answers_while_idle_api_connections_fill_the_listener(
    broker: BrokerProcess,
) -> None:
    assert broker.http_port
    port = broker.http_port
    presence = (
        b"GET /api/presence?topic=a HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
    )
    held: list[trio.SocketStream] = []
    try:
        for _ in range(IDLE_API):
            held.append(await open_idle(port, presence))
        for _ in range(SLOW_HEADS):
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            held.append(slow)
            await slow.send_all(b"GET /api/presence?topic=a HTTP/1.1\r\nHost: x\r\n")
        for path in ("/healthz", "/readyz"):
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            data = await send_and_read(port, request.encode())
            assert data.startswith(b"HTTP/1.1 200 "), (path, data[:200])
        snapshot = await trio.to_thread.run_sync(metrics, broker)
        evicted = snapshot["pubsub_http_evicted_total"][()]
        assert evicted >= IDLE_API + SLOW_HEADS - 512
        assert snapshot.get("pubsub_http_refused_total", {}) == {}
    finally:
        for s in held:
            await s.aclose()


async def test_no_body_is_read_before_the_api_key(broker: BrokerProcess) -> None:
    assert broker.http_port
    data = await send_and_read(
        broker.http_port,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 401 "), data
    assert b"connection: close" in data.lower()


async def test_content_length_with_transfer_encoding_closes(broker: BrokerProcess) -> None:
    assert broker.http_port
    body = json.dumps({"topic": "smuggled", "data": 1}).encode()
    data = await send_and_read(
        broker.http_port,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        + HEALTHZ,
    )
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert data.count(b"HTTP/1.1 ") == 1
    status, _, reply = http(broker, "GET", "/api/history?topic=smuggled")
    assert (status, json.loads(reply)["offset"]) == (200, 0)


def welcome_nodes(b: BrokerProcess) -> set[str]:
    """The ``node`` of welcome frames, from connections until every worker was met."""
    nodes: set[str] = set()
    workers: set[int] = set()
    for _ in range(50):
        with ws_welcomed(b, "alice") as (_, welcome):
            nodes.add(welcome["node"])
            workers.add(welcome["worker"])
        if len(workers) == b.workers:
            return nodes
    raise AssertionError(f"only workers {workers} answered")


def client_config_node(b: BrokerProcess) -> str:
    status, _, body = http(b, "GET", "/client/config", key=None)
    assert status == 200
    node: str = json.loads(body)["node"]
    return node


@pytest.mark.parametrize("workers", [1, 2])
def test_the_host_name_is_not_revealed_by_default(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(tmp_path, workers=workers) as b:
        node = client_config_node(b)
        assert re.fullmatch(r"[0-9a-f]{12}", node), node
        assert node != socket.gethostname()
        # every worker and the pages say the same
        assert welcome_nodes(b) == {node}
        _, _, body = http(b, "GET", "/status/data", key=None)
        assert json.loads(body)["node"] == node


@pytest.mark.parametrize("workers", [1, 2])
def test_node_id_names_the_broker_when_set(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(tmp_path, {"server": {"node_id": "edge-7"}}, workers=workers) as b:
        assert client_config_node(b) == "edge-7"
        assert welcome_nodes(b) == {"edge-7"}
