"""The demo page as `make run`'s link opens it, the status page's counts, and the browser
client's rule for a publication that matches several subscriptions, in real headless Chromium
against the real broker."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.test_browser import open_demo, publish_from_python, subscribe, wait_js
from tests.http.brokerkit import request, ws_client
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.browser


def test_the_demo_connects_by_itself_and_takes_the_token_out_of_the_address_bar(
    page: Any, web_broker: BrokerProcess
) -> None:
    token = web_broker.token("alice")
    page.goto(f"{web_broker.http_url}/demo/?token={token}&ws={web_broker.url}#log")
    page.wait_for_selector("#state[data-state=connected]")  # nobody clicked Connect
    assert "client alice" in page.inner_text("#whoami")
    # Gone from the address bar (and so from the history and bookmarks), the rest kept.
    assert "token" not in page.url and token not in page.url
    kept = page.evaluate("[...new URLSearchParams(location.search)]")
    assert kept == [["ws", web_broker.url]]
    assert page.evaluate("location.hash") == "#log"
    assert page.input_value("#token") == token  # still there for Connect after a Disconnect
    # Without a token the page waits for one.
    page.goto(f"{web_broker.http_url}/demo/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_attribute("#state", "data-state") == "disconnected"
    assert page.evaluate("pubsubDemo.client") is None
    assert page.js_errors == []


def test_the_demo_shows_a_publication_that_two_subscriptions_match_once(
    page: Any, web_broker: BrokerProcess
) -> None:
    open_demo(page, web_broker)
    subscribe(page, "chat.room1")
    subscribe(page, "chat.*")
    publish_from_python(web_broker, "chat.room1", "both")
    publish_from_python(web_broker, "chat.lobby", "pattern only")
    page.wait_for_selector('#log tr.msg[data-topic="chat.lobby"]')
    rows = page.query_selector_all('#log tr.msg[data-topic="chat.room1"]')
    assert len(rows) == 1
    # It says through which subscriptions it came, in the order they were made.
    assert rows[0].get_attribute("data-via") == "chat.room1 chat.*"
    assert rows[0].inner_text().rstrip().endswith("chat.room1, chat.*")
    lobby = page.get_attribute('#log tr.msg[data-topic="chat.lobby"]', "data-via")
    assert lobby == "chat.*"
    demo_messages = page.evaluate("pubsubDemo.messages.map((m) => [m.topic, m.data])")
    assert demo_messages == [["chat.room1", "both"], ["chat.lobby", "pattern only"]]
    assert page.js_errors == []


def test_the_status_page_says_what_its_topics_count(page: Any, web_broker: BrokerProcess) -> None:
    with ws_client(web_broker, "watcher") as conn:
        for i, topic in enumerate(["chat.room1", "chat.*", "news.>"]):
            assert request(conn, op="subscribe", id=i + 1, topic=topic)["ok"]
        page.goto(f"{web_broker.http_url}/status/")
        page.wait_for_selector("body[data-polls='2']")
        card = '#worker-0 .chart[data-key="topics"]'
        assert page.get_attribute(card, "data-value") == "1"  # the patterns are not topics
        assert page.inner_text(f"{card} .title") == "subscribed topics"
        assert "patterns (chat.*) not counted" in page.inner_text(f"{card} .hint")
        total = page.inner_text('#worker-all .chart[data-key="topics"] .hint')
        assert "summed over workers" in total
    assert page.js_errors == []


DISPATCH = """
async ([url, token]) => {
  const { PubSubClient } = await import("/client.js");
  const calls = (window.calls = []);
  const client = (window.client = new PubSubClient(url, { token }));
  client.on("message", (m) => calls.push(["message event", m.topic, m.offset]));
  client.on("error", ({ error }) => calls.push(["error event", error.message]));
  await client.connect();
  const record = (name) => (m, sub) => {
    calls.push([name, m.topic, m.offset, sub.topic]);
    (window.objects ||= []).push(m);
  };
  // Made in this order: the pattern first, the exact topic after it.
  await client.subscribe("chat.*", { onMessage: record("star") });
  await client.subscribe("chat.room1", { onMessage: record("exact") });
  await client.subscribe("chat.>", {
    onMessage: (m, sub) => {
      record("rest")(m, sub);
      throw new Error("a failing callback");
    },
  });
  await client.subscribe("other.x", { onMessage: record("unrelated") });
  await client.publish("chat.room1", "one");
}
"""


def test_client_js_calls_every_matching_subscription_once(
    page: Any, web_broker: BrokerProcess
) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    page.evaluate(DISPATCH, [web_broker.url, web_broker.token("alice")])
    wait_js(page, "calls.length >= 5")
    assert page.evaluate("calls") == [
        ["message event", "chat.room1", 1],
        ["star", "chat.room1", 1, "chat.*"],
        ["exact", "chat.room1", 1, "chat.room1"],
        ["rest", "chat.room1", 1, "chat.>"],
        ["error event", "a failing callback"],  # and the others were still called
    ]
    # One message object, shared by the callbacks.
    assert page.evaluate("objects.every((m) => m === objects[0])")

    # A replay that overlaps what a pattern already delivered reaches only the subscription
    # that asked for it: each subscription still sees each offset once.
    page.evaluate("client.unsubscribe('chat.room1')")
    publish_from_python(web_broker, "chat.room1", "two")
    wait_js(page, "calls.some((c) => c[0] === 'star' && c[2] === 2)")
    page.evaluate(
        """async () => {
          calls.length = 0;
          const epoch = client.subscriptions.get("chat.*")._seen.get("chat.room1").epoch;
          await client.subscribe("chat.room1", {
            since: { offset: 1, epoch },
            onMessage: (m, sub) => calls.push(["exact", m.topic, m.offset, sub.topic]),
          });
        }"""
    )
    publish_from_python(web_broker, "chat.room1", "three")
    wait_js(page, "calls.some((c) => c[0] === 'rest' && c[2] === 3)")
    delivered = [c for c in page.evaluate("calls") if c[0] in ("star", "exact", "rest")]
    assert delivered == [
        ["exact", "chat.room1", 2, "chat.room1"],  # the replay: the patterns had it already
        ["star", "chat.room1", 3, "chat.*"],
        ["rest", "chat.room1", 3, "chat.>"],
        ["exact", "chat.room1", 3, "chat.room1"],
    ]
