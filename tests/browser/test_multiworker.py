"""A page that is not the demo (its own origin, its own script) uses /client.js against a broker
with several workers: clients spread over the workers all see every publication, and the
operations endpoints show every worker."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser.sites import start_web_broker, static_site
from tests.http.brokerkit import http
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

pytestmark = pytest.mark.browser

CLIENTS = 12  # over 2 workers: all on one worker with probability 2**-11

PAGE = """<!doctype html><meta charset="utf-8"><title>an app</title>
<script type="module">
  import { PubSubClient } from "%(ops)s/client.js";
  window.received = [];
  window.start = async (tokens) => {
    window.clients = await Promise.all(tokens.map(async (token, i) => {
      // no URL: the client asks the broker that served client.js where its WebSocket is
      const c = new PubSubClient({ token });
      await c.subscribe("app.feed", (m) => received.push([i, m.offset, m.data]));
      return c;
    }));
    return clients.map((c) => [c.worker, c.url]);
  };
</script>"""


def wait(page: Any, expr: str, timeout: float = 15) -> Any:
    page.wait_for_function(expr, timeout=timeout * 1000)
    return page.evaluate(expr)


def test_a_foreign_app_on_a_multi_worker_broker(page: Any, tmp_path: Path) -> None:
    # The app page imports client.js from the broker, whose port is known only once it runs:
    # the page's HTML is built then, and served from an origin the broker allows.
    html = {"body": ""}
    with static_site(lambda: html["body"]) as origin:
        config = {"server": {"allowed_origins": [origin]}, **PRESENCE_EVERYWHERE}
        with BrokerProcess.start(tmp_path, config=config, workers=2) as b:
            assert b.http_port, "the broker did not report an http_port"
            html["body"] = PAGE % {"ops": b.http_url}
            page.goto(origin + "/app.html")
            wait(page, "typeof window.start === 'function'")
            tokens = [b.token(f"user{i}") for i in range(CLIENTS)]
            started = page.evaluate("(t) => start(t)", tokens)
            assert {url for _, url in started} == {b.url}
            workers = [worker for worker, _ in started]
            assert len(set(workers)) == 2, f"all clients on one worker: {workers}"

            status, _, body = http(b, "POST", "/api/publish", {"topic": "app.feed", "data": "api"})
            assert status == 200, body
            page.evaluate("clients[0].publish('app.feed', 'browser')")
            wait(page, f"received.length === {2 * CLIENTS}")
            received = page.evaluate("received")
            for i in range(CLIENTS):
                mine = [(o, d) for c, o, d in received if c == i]
                assert mine == [(1, "api"), (2, "browser")], (i, mine)

            status, _, body = http(b, "GET", "/metrics", key=None)
            connections: dict[str, float] = {}
            for family in text_string_to_metric_families(body.decode()):
                for s in family.samples:
                    if s.name == "pubsub_connections":
                        connections[s.labels["worker"]] = s.value
            assert set(connections) == {"0", "1"}
            assert sum(connections.values()) == CLIENTS

            status, _, body = http(b, "GET", "/status/data", key=None)
            data = json.loads(body)
            assert len(data["workers"]) == 2
            assert sum(w["connections"] for w in data["workers"]) == CLIENTS

            status, _, body = http(b, "GET", "/api/presence?topic=app.feed")
            assert json.loads(body)["clients"] == sorted(f"user{i}" for i in range(CLIENTS))
            status, _, body = http(b, "POST", "/api/disconnect", {"client": "user3"})
            assert json.loads(body) == {"client": "user3", "closed": 1}
            time.sleep(0.2)


def test_a_killed_worker_costs_the_page_nothing(page: Any, tmp_path: Path) -> None:
    # With several workers the history lives in the supervisor's hub, so a page whose worker
    # dies reconnects (to another worker, or the restarted one) and recovers exactly.
    with start_web_broker(tmp_path, workers=2) as b:
        page.goto(f"{b.http_url}/demo/?token={b.token('alice')}")
        page.wait_for_selector("#state[data-state=connected]")  # it connects by itself
        page.fill("#sub-topic", "chat.room1")
        page.click("#subscribe")
        page.wait_for_selector('#subs li[data-topic="chat.room1"]')
        publish(b, "one", "two")
        page.wait_for_selector('#log tr.msg[data-offset="2"]')

        worker = page.evaluate("pubsubDemo.client.worker")
        pids = {e["worker"]: e["pid"] for e in b.events("worker_started")}
        os.kill(pids[worker], signal.SIGKILL)
        publish(b, "three", "four", "five")  # while the page is away
        page.wait_for_selector('#log tr.msg[data-offset="5"]')
        publish(b, "six")
        page.wait_for_selector('#log tr.msg[data-offset="6"]')

        msgs = page.evaluate("pubsubDemo.messages")
        assert [m["offset"] for m in msgs] == [1, 2, 3, 4, 5, 6]
        assert [m["data"] for m in msgs] == ["one", "two", "three", "four", "five", "six"]
        assert len({m["epoch"] for m in msgs}) == 1
        assert page.evaluate("pubsubDemo.gaps") == []
        assert "reconnecting" in page.evaluate("pubsubDemo.states")


def publish(b: BrokerProcess, topic_data: str, *more: str) -> None:
    for data in (topic_data, *more):
        status, _, body = http(b, "POST", "/api/publish", {"topic": "chat.room1", "data": data})
        assert status == 200, body
