"""The operations listener of the real broker (a subprocess), read with independent clients:
urllib for HTTP, the `websockets` library for WebSocket, prometheus_client's parser for
/metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.http.brokerkit import http, next_op, request, ws_client
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess


def metrics(b: BrokerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, headers, body = http(b, "GET", "/metrics", key=None)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = {"limits": {"max_data_size": 2000}, **PRESENCE_EVERYWHERE}
    with BrokerProcess.start(tmp_path, config=config) as b:
        assert b.http_port, "the broker did not report an http_port"
        yield b


def test_health_readiness_and_client_js(broker: BrokerProcess) -> None:
    status, _, body = http(broker, "GET", "/healthz", key=None)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = http(broker, "GET", "/readyz", key=None)
    assert status == 200
    assert json.loads(body)["ready"] is True
    status, headers, body = http(broker, "GET", "/client.js", key=None)
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert b"export class PubSubClient" in body
    for page in ("/demo/", "/status/"):
        status, headers, _ = http(broker, "GET", page, key=None)
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    status, _, body = http(broker, "GET", "/demo/config", key=None)
    assert json.loads(body)["ws_port"] == broker.port


def test_api_publish_reaches_a_websocket_subscriber(broker: BrokerProcess) -> None:
    with ws_client(broker, "alice") as alice:
        reply = request(alice, op="subscribe", id=1, topic="chat.room1", presence=True)
        assert reply["ok"] is True
        epoch = reply["epoch"]

        status, _, body = http(
            broker, "POST", "/api/publish", {"topic": "chat.room1", "data": {"t": "hi"}}
        )
        assert status == 200, body
        published = json.loads(body)
        assert published == {"topic": "chat.room1", "offset": 1, "epoch": epoch}

        push = next_op(alice, "message")
        assert push == {
            "op": "message",
            "topic": "chat.room1",
            "offset": 1,
            "epoch": epoch,
            "from": None,
            "data": {"t": "hi"},
        }

        status, _, body = http(broker, "GET", "/api/history?topic=chat.room1")
        history = json.loads(body)
        assert history["messages"] == [push]
        assert (history["offset"], history["epoch"]) == (1, epoch)

        status, _, body = http(
            broker, "GET", f"/api/history?topic=chat.room1&since=0&epoch={epoch}"
        )
        assert json.loads(body)["recovered"] is True

        status, _, body = http(broker, "GET", "/api/presence?topic=chat.room1")
        assert json.loads(body) == {"topic": "chat.room1", "clients": ["alice"]}
        assert metrics(broker)["pubsub_presence_members"][(("worker", "0"),)] == 1

        snapshot = metrics(broker)
        assert snapshot["pubsub_connections"][(("worker", "0"),)] == 1
        assert snapshot["pubsub_deliveries_out_total"][(("worker", "0"),)] >= 1
        assert snapshot["pubsub_subscriptions"][(("worker", "0"),)] == 1

        status, _, body = http(broker, "POST", "/api/disconnect", {"client": "alice"})
        assert json.loads(body) == {"client": "alice", "closed": 1}
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                alice.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008


def test_api_errors_use_protocol_codes(broker: BrokerProcess) -> None:
    status, _, body = http(
        broker, "POST", "/api/publish", {"topic": "a", "data": 1}, key="nope-nope-nope-nope"
    )
    assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized")
    status, _, body = http(broker, "POST", "/api/publish", {"topic": "a.>", "data": 1})
    assert (status, json.loads(body)["error"]["code"]) == (400, "bad_topic")
    status, _, body = http(broker, "POST", "/api/publish", {"topic": "a", "data": "x" * 5000})
    assert (status, json.loads(body)["error"]["code"]) == (413, "too_large")
    status, _, body = http(broker, "GET", "/api/history?topic=a&limit=5000")
    assert (status, json.loads(body)["error"]["code"]) == (400, "bad_request")
    status, _, body = http(broker, "GET", "/nowhere", key=None)
    assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")


def test_metrics_cover_auth_failures_and_handshakes(broker: BrokerProcess) -> None:
    with pytest.raises(InvalidStatus):
        connect(
            broker.url,
            additional_headers={"Authorization": "Bearer not-a-jwt"},
            open_timeout=10,
        )
    with ws_client(broker, "bob"):
        pass
    http(broker, "GET", "/healthz", key=None)
    snapshot = metrics(broker)
    failures = snapshot["pubsub_auth_failures_total"]
    assert sum(failures.values()) >= 1
    assert {dict(k)["worker"] for k in failures} == {"0"}
    assert snapshot["pubsub_bus_up"][(("worker", "0"),)] == 1
    assert snapshot["pubsub_http_requests_total"][(("route", "/healthz"), ("status", "200"))] == 1


def test_status_data_follows_the_workers(broker: BrokerProcess) -> None:
    with ws_client(broker, "carol"):
        status, _, body = http(broker, "GET", "/status/data", key=None)
        data = json.loads(body)
    assert status == 200
    assert data["ready"] is True
    assert data["workers"][0]["connections"] == 1
