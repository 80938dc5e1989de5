"""Many tabs, one connection: client.js's ``shared`` option in real headless Chromium.

Tabs are pages of one browser context (one profile, as tabs of one window). On the broker's
origin they share through a SharedWorker; on another origin (the worker script would be
cross-origin) through a leader tab elected with Web Locks. Either way the broker sees one
connection per user, every tab gets every publication, and the tabs' streams stay exact when
the holder of the connection goes away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser.sites import allow_origins, start_web_broker, static_site, wait_js
from tests.http.brokerkit import http, request, ws_client
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.browser

TABS = 5
TOPIC = "feed.prices"

# Run in each tab: a shared client subscribed to one topic, recording what it sees.
TAB_SETUP = """
async ([module, url, token, options, topic]) => {
  const { PubSubClient } = await import(module);
  const seen = (window.seen = { messages: [], gaps: [], states: [], errors: [], welcomes: 0,
    refreshes: 0 });
  const client = (window.client = new PubSubClient(url, {
    token: async () => token, minDelayMs: 50, maxDelayMs: 500, ...options,
  }));
  client.on("state", (e) => seen.states.push(e.state));
  client.on("welcome", () => seen.welcomes++);
  client.on("refresh", () => seen.refreshes++);
  client.on("error", (e) => seen.errors.push(String(e.error && (e.error.code || e.error.message))));
  await client.connect();
  await client.subscribe(topic, {
    onMessage: (m) => seen.messages.push([m.epoch, m.offset, m.data]),
    onGap: (g) => seen.gaps.push(g),
  });
  return client.sharing;
}
"""

# Run in a tab after TAB_SETUP: one more subscription, recording [topic, data] and joins.
SUBSCRIBE = """
async ([topic, presence]) => {
  window.got = window.got || [];
  window.joins = window.joins || [];
  await client.subscribe(topic, {
    presence,
    onMessage: (m) => window.got.push([m.topic, m.data]),
    onJoin: (e) => window.joins.push(e.client),
  });
}
"""

FOREIGN_PAGE = '<!doctype html><meta charset="utf-8"><title>an app</title><p>an app</p>'


def metric(b: BrokerProcess, name: str) -> float:
    """One of the broker's gauges, summed over its workers."""
    status, _, body = http(b, "GET", "/metrics", key=None)
    assert status == 200
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name
    )


def connections(b: BrokerProcess) -> float:
    return metric(b, "pubsub_connections")


def wait_metric(b: BrokerProcess, name: str, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(b, name) != n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {metric(b, name)}, not {n}")
        time.sleep(0.05)


def wait_connections(b: BrokerProcess, n: int) -> None:
    wait_metric(b, "pubsub_connections", n)


def publish(b: BrokerProcess, *datas: str) -> None:
    for data in datas:
        status, _, body = http(b, "POST", "/api/publish", {"topic": TOPIC, "data": data})
        assert status == 200, body


def publish_to_all(b: BrokerProcess, pages: list[Any], *datas: str) -> None:
    """Publish ``datas`` as the first publications of the topic; every tab gets them exactly."""
    publish(b, *datas)
    for pg in pages:
        assert_exact(pg, list(datas))


def assert_exact(page: Any, datas: list[str]) -> None:
    """The tab got exactly these publications, in order, once each, with no gap."""
    n = len(datas)
    try:
        wait_js(page, f"window.seen.messages.length >= {n}")
    except AssertionError as exc:
        raise AssertionError(f"the tab saw {page.evaluate('window.seen')}") from exc
    got = page.evaluate("window.seen.messages")
    assert [(o, d) for _, o, d in got] == list(zip(range(1, n + 1), datas, strict=True))
    assert page.evaluate("window.seen.gaps") == []


@contextmanager
def tabs(chromium: Any, n: int, url: str, missing: str | None = None) -> Iterator[list[Any]]:
    """``n`` pages of one browser context (tabs of one profile) at ``url``; the WebSockets
    each one opens are counted in its ``sockets`` attribute. URLs matching ``missing`` get 404."""
    context = chromium.new_context()
    if missing:
        context.route(missing, lambda route: route.fulfill(status=404))
    try:
        pages = []
        for _ in range(n):
            pg = context.new_page()
            pg.set_default_timeout(15_000)
            pg.sockets = []
            pg.on("websocket", lambda ws, pg=pg: pg.sockets.append(ws))
            pg.js_errors = []
            pg.on("pageerror", lambda exc, pg=pg: pg.js_errors.append(str(exc)))
            pg.goto(url)
            pages.append(pg)
        yield pages
    finally:
        context.close()


def start_tabs(
    pages: list[Any],
    b: BrokerProcess,
    module: str,
    shared: bool | str,
    sub: str = "alice",
    **options: Any,
) -> None:
    """Start a shared client in each page (TAB_SETUP) with these client options."""
    for pg in pages:
        args = [module, b.url, b.token(sub), {"shared": shared, **options}, TOPIC]
        mechanism = pg.evaluate(TAB_SETUP, args)
        if isinstance(shared, str):
            assert mechanism == shared


@contextmanager
def shared_tabs(chromium: Any, b: BrokerProcess, n: int, shared: bool | str) -> Iterator[list[Any]]:
    """``n`` tabs on the broker's demo page, each with a started shared client, connected."""
    with tabs(chromium, n, f"{b.http_url}/demo/") as pages:
        start_tabs(pages, b, "/client.js", shared)
        wait_connections(b, 1)
        yield pages


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker with one worker, or as many as the test's indirect parameter says."""
    with start_web_broker(tmp_path, workers=getattr(request, "param", 1)) as b:
        yield b


@contextmanager
def foreign_site(b: BrokerProcess) -> Iterator[str]:
    """A page of an origin that is not the broker's, allowed to connect."""
    with static_site(FOREIGN_PAGE) as origin:
        allow_origins(b, b.http_url, origin)
        yield origin


@pytest.mark.parametrize("broker", [1, 2], indirect=True, ids=["1worker", "2workers"])
def test_five_tabs_on_another_origin_share_one_connection_through_a_leader_tab(
    chromium: Any, broker: BrokerProcess
) -> None:
    with foreign_site(broker) as origin, tabs(chromium, TABS, origin + "/app") as pages:
        start_tabs(pages, broker, f"{broker.http_url}/client.js", True)
        assert {pg.evaluate("client.sharing") for pg in pages} == {"leader"}
        wait_connections(broker, 1)
        holders = [pg for pg in pages if pg.sockets]
        assert len(holders) == 1, "exactly one tab holds the WebSocket"

        publish(broker, "a", "b", "c")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c"])

        # The leader goes away; publications made meanwhile reach every other tab exactly once.
        leader = holders[0]
        pages.remove(leader)
        leader.close()
        publish(broker, "d", "e")
        for pg in pages:
            wait_js(pg, "window.seen.states.includes('reconnecting')")
        publish(broker, "f")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c", "d", "e", "f"])
            assert pg.js_errors == []
        wait_connections(broker, 1)
        assert len([pg for pg in pages if pg.sockets]) == 1, "one new leader"


def test_five_tabs_on_the_brokers_origin_share_one_shared_worker(
    chromium: Any, broker: BrokerProcess
) -> None:
    with tabs(chromium, TABS, f"{broker.http_url}/demo/") as pages:
        start_tabs(pages, broker, "/client.js", True)
        assert {pg.evaluate("client.sharing") for pg in pages} == {"worker"}
        wait_connections(broker, 1)
        assert [pg for pg in pages if pg.sockets] == [], "the worker holds it, not a tab"

        publish(broker, "a", "b", "c")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c"])

        # Tabs come and go; the worker stays, and so does the connection.
        pages.pop(0).close()
        publish(broker, "d")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c", "d"])
            assert pg.js_errors == []
        assert connections(broker) == 1


@pytest.mark.parametrize("broker", [1, 2], indirect=True, ids=["1worker", "2workers"])
def test_a_killed_shared_worker_is_replaced_and_every_tab_recovers_exactly(
    chromium: Any, broker: BrokerProcess
) -> None:
    with shared_tabs(chromium, broker, 3, "worker") as pages:
        publish(broker, "a", "b")
        for pg in pages:
            assert_exact(pg, ["a", "b"])

        cdp = chromium.new_browser_cdp_session()
        targets = cdp.send("Target.getTargets")["targetInfos"]
        [worker] = [t for t in targets if t["type"] == "shared_worker"]
        cdp.send("Target.closeTarget", {"targetId": worker["targetId"]})
        publish(broker, "c", "d")
        for pg in pages:
            wait_js(pg, "window.seen.states.includes('reconnecting')")
        publish(broker, "e")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c", "d", "e"])
        wait_connections(broker, 1)
        targets = cdp.send("Target.getTargets")["targetInfos"]
        assert len([t for t in targets if t["type"] == "shared_worker"]) == 1


def test_tabs_of_different_users_never_share(chromium: Any, broker: BrokerProcess) -> None:
    with tabs(chromium, 3, f"{broker.http_url}/demo/") as pages:
        start_tabs(pages[:2], broker, "/client.js", True, sub="alice")
        # (the token in an `auth` frame rather than the URL: the hub sends it so)
        start_tabs(pages[2:], broker, "/client.js", True, sub="bob", tokenIn="frame")
        wait_connections(broker, 2)
        assert [pg.evaluate("client.clientId") for pg in pages] == ["alice", "alice", "bob"]
        publish(broker, "a")
        for pg in pages:
            assert_exact(pg, ["a"])


def test_each_tab_keeps_its_own_subscriptions_and_presence_counts_the_user_once(
    chromium: Any, broker: BrokerProcess
) -> None:
    with tabs(chromium, 2, f"{broker.http_url}/demo/") as (plain, watcher):
        start_tabs([plain, watcher], broker, "/client.js", True)
        wait_connections(broker, 1)
        plain.evaluate(SUBSCRIBE, ["room.1", False])
        # The second tab wants presence on a topic the connection holds without it.
        watcher.evaluate(SUBSCRIBE, ["room.1", True])
        with ws_client(broker, "bob") as bob:
            reply = request(bob, op="subscribe", id=1, topic="room.1", presence=True)
            assert reply["ok"], reply
            wait_js(watcher, "window.joins.includes('bob')")
            clients = watcher.evaluate("client.presence('room.1')")
            assert sorted(clients) == ["alice", "bob"]

            status, _, _ = http(broker, "POST", "/api/publish", {"topic": "room.1", "data": 1})
            assert status == 200
            for pg in (plain, watcher):
                wait_js(pg, "window.got.length === 1")
            # One tab leaves the topic; the other keeps it.
            plain.evaluate("client.unsubscribe('room.1')")
            status, _, _ = http(broker, "POST", "/api/publish", {"topic": "room.1", "data": 2})
            assert status == 200
            wait_js(watcher, "window.got.length === 2")
            assert watcher.evaluate("window.got") == [["room.1", 1], ["room.1", 2]]
            assert plain.evaluate("window.got") == [["room.1", 1]]
        assert plain.evaluate("window.seen.errors") == []


def test_a_dropped_connection_reaches_every_tab_and_each_recovers_exactly(
    chromium: Any, broker: BrokerProcess
) -> None:
    with shared_tabs(chromium, broker, 3, True) as pages:
        publish_to_all(broker, pages, "a")
        _, _, body = http(broker, "POST", "/api/disconnect", {"client": "alice"})
        assert json.loads(body) == {"client": "alice", "closed": 1}
        publish(broker, "b", "c")
        for pg in pages:
            wait_js(pg, "window.seen.welcomes >= 2")
            assert "reconnecting" in pg.evaluate("window.seen.states")
        publish(broker, "d")
        for pg in pages:
            assert_exact(pg, ["a", "b", "c", "d"])
        wait_connections(broker, 1)


def test_a_token_refreshed_by_one_tab_reaches_every_tab(
    chromium: Any, broker: BrokerProcess
) -> None:
    # Short tokens, each one 2 s longer than the last, refreshed 2 s before they expire; only
    # the first tab can refresh (the others were given a fixed token).
    tokens = [broker.token("alice", ttl=4 + 2 * i) for i in range(8)]
    with tabs(chromium, 3, f"{broker.http_url}/demo/") as pages:
        for i, pg in enumerate(pages):
            pg.evaluate(
                """async ([url, tokens, refreshes]) => {
                  const { PubSubClient } = await import("/client.js");
                  window.calls = 0;
                  const token = refreshes ? async () => tokens[window.calls++] : tokens[0];
                  window.client = new PubSubClient(url, {
                    token, refreshMarginS: 2, shared: true,
                  });
                  await window.client.connect();
                  window.firstExpiry = window.client.expiresAt;
                }""",
                [broker.url, tokens, i == 0],
            )
        wait_connections(broker, 1)
        # Well past the first expiry the one connection lives on, and every tab knows the
        # newest expiry.
        for pg in pages:
            wait_js(pg, "client.expiresAt >= window.firstExpiry + 6", timeout=20)
        for pg in pages:
            assert pg.evaluate("client.state") == "connected"
        assert connections(broker) == 1
        assert not any(e.get("code") == 4003 for e in broker.events("closed"))


def test_the_demo_page_has_a_switch_for_it(chromium: Any, broker: BrokerProcess) -> None:
    url = f"{broker.http_url}/demo/?shared=1&connect=1&token={broker.token('alice')}"
    with tabs(chromium, 3, url) as pages:
        for pg in pages:
            pg.wait_for_selector("#state[data-state=connected]")
            assert pg.is_checked("#shared")
            assert "shared (worker)" in pg.inner_text("#whoami")
        wait_connections(broker, 1)
        for pg in pages:
            pg.fill("#sub-topic", TOPIC)
            pg.click("#subscribe")
            pg.wait_for_selector(f'#subs li[data-topic="{TOPIC}"]')
        publish(broker, "a")
        for pg in pages:
            pg.wait_for_selector(f'#log tr.msg[data-topic="{TOPIC}"][data-offset="1"]')
        # Unchecked (the default), each tab has a connection of its own.
        extra = pages[0].context.new_page()
        extra.goto(f"{broker.http_url}/demo/?connect=1&token={broker.token('alice')}")
        extra.wait_for_selector("#state[data-state=connected]")
        assert not extra.is_checked("#shared")
        wait_connections(broker, 2)


def test_a_worker_that_cannot_start_gives_way_to_a_leader_tab(
    chromium: Any, broker: BrokerProcess
) -> None:
    with tabs(chromium, 3, f"{broker.http_url}/demo/", missing="**/client-worker.js") as pages:
        start_tabs(pages, broker, "/client.js", True)
        wait_connections(broker, 1)
        assert len([pg for pg in pages if pg.sockets]) == 1, "a leader tab holds it"
        assert {pg.evaluate("client.sharing") for pg in pages} == {"leader"}
        publish(broker, "a")
        for pg in pages:
            assert_exact(pg, ["a"])


def test_a_publication_reaches_only_the_tabs_whose_subscriptions_match(
    chromium: Any, broker: BrokerProcess
) -> None:
    with foreign_site(broker) as origin, tabs(chromium, 3, origin + "/app") as pages:
        start_tabs(pages, broker, f"{broker.http_url}/client.js", "leader")
        wildcard, exact, other = pages
        wildcard.evaluate(SUBSCRIBE, ["news.>", False])
        exact.evaluate(SUBSCRIBE, ["news.sport", False])
        other.evaluate("window.got = []")
        for topic in ("news.sport", "news.weather", "feed.prices"):
            status, _, body = http(broker, "POST", "/api/publish", {"topic": topic, "data": 1})
            assert status == 200, body
        wait_js(wildcard, "window.got.length === 2")
        wait_js(other, "window.seen.messages.length === 1")
        assert wildcard.evaluate("window.got") == [["news.sport", 1], ["news.weather", 1]]
        assert exact.evaluate("window.got") == [["news.sport", 1]]
        assert other.evaluate("window.got") == []
        assert connections(broker) == 1


RESUME = """
async ([module, url, token, since, topic]) => {
  const { PubSubClient } = await import(module);
  const got = [];
  (window.resumed = window.resumed || []).push(got);
  const client = new PubSubClient(url, { token, shared: true });
  await client.subscribe(topic, {
    since,
    onMessage: (m) => got.push([m.offset, m.data]),
    onGap: (g) => got.push(["gap", g.from, g.to]),
  });
}
"""


def test_a_tab_resuming_on_a_held_topic_gets_exactly_what_it_missed(
    chromium: Any, broker: BrokerProcess
) -> None:
    publish(broker, "a", "b", "c")
    with tabs(chromium, 2, f"{broker.http_url}/demo/") as (first, other):
        start_tabs([first], broker, "/client.js", True)  # the hub holds the topic from 3 on
        publish(broker, "d", "e")
        wait_js(first, "window.seen.messages.length === 2")
        epoch = first.evaluate("window.seen.messages[0][0]")
        # From 3: what the hub kept covers it. From 1: only the broker's history does.
        for offset in (3, 1):
            since = {"offset": offset, "epoch": epoch}
            other.evaluate(RESUME, ["/client.js", broker.url, broker.token("alice"), since, TOPIC])
        publish(broker, "f")
        wait_js(other, "window.resumed.every((got) => got.length && got.at(-1)[1] === 'f')")
        from_3, from_1 = other.evaluate("window.resumed")
        assert from_3 == [[4, "d"], [5, "e"], [6, "f"]]
        assert from_1 == [[2, "b"], [3, "c"], [4, "d"], [5, "e"], [6, "f"]]
        assert connections(broker) == 1


def test_a_topic_is_subscribed_once_and_left_with_the_last_tab(
    chromium: Any, broker: BrokerProcess
) -> None:
    with shared_tabs(chromium, broker, 3, True) as pages:
        assert metric(broker, "pubsub_subscriptions") == 1
        pages.pop().close()  # a closed tab is noticed through its lock
        pages[0].evaluate("(topic) => client.unsubscribe(topic)", TOPIC)
        publish(broker, "a")
        assert_exact(pages[1], ["a"])
        assert metric(broker, "pubsub_subscriptions") == 1
        pages[1].evaluate("(topic) => client.unsubscribe(topic)", TOPIC)
        wait_metric(broker, "pubsub_subscriptions", 0)
        assert connections(broker) == 1


def test_a_tab_giving_up_alone_does_not_cost_the_others_the_connection(
    chromium: Any, broker: BrokerProcess
) -> None:
    with shared_tabs(chromium, broker, 3, True) as pages:
        publish_to_all(broker, pages, "a")
        # The first tab decides its connection is dead (as when its ping went unanswered, say
        # because the tab was throttled): the hub checks with the broker and keeps it.
        pages[0].evaluate("client._dropConnection(client._ws, 'no answer to ping')")
        wait_js(pages[0], "window.seen.welcomes >= 2")
        publish(broker, "b")
        for pg in pages:
            assert_exact(pg, ["a", "b"])
        for pg in pages[1:]:
            assert "reconnecting" not in pg.evaluate("window.seen.states")
        assert broker.events("closed") == []
