"""The demo page and the browser client in real headless Chromium against the real broker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.browser.sites import start_web_broker, static_site, wait_js
from tests.http.brokerkit import next_op, request, ws_client
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.browser


def open_demo(page: Any, b: BrokerProcess, sub: str = "alice", **claims: Any) -> None:
    page.goto(f"{b.http_url}/demo/?token={b.token(sub, **claims)}")
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#ws-url") == b.url
    page.wait_for_selector("#state[data-state=connected]")  # it connects by itself


def subscribe(page: Any, topic: str, presence: bool = False) -> None:
    page.fill("#sub-topic", topic)
    if presence:
        page.check("#sub-presence")
    page.click("#subscribe")
    page.wait_for_selector(f'#subs li[data-topic="{topic}"]')


def publish_from_python(b: BrokerProcess, topic: str, *datas: Any, sub: str = "py") -> list[int]:
    offsets = []
    with ws_client(b, sub) as conn:
        for i, data in enumerate(datas):
            reply = request(conn, op="publish", id=i + 1, topic=topic, data=data)
            assert reply["ok"], reply
            offsets.append(reply["offset"])
    return offsets


def messages(page: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate("pubsubDemo.messages")
    return result


def test_demo_page_receives_a_publication_made_from_python(
    page: Any, web_broker: BrokerProcess
) -> None:
    open_demo(page, web_broker)
    assert "client alice" in page.inner_text("#whoami")
    subscribe(page, "chat.room1")
    publish_from_python(web_broker, "chat.room1", {"text": "hello browser"})
    row = page.wait_for_selector('#log tr.msg[data-topic="chat.room1"][data-offset="1"]')
    assert "hello browser" in row.inner_text()
    [msg] = messages(page)
    assert msg["data"] == {"text": "hello browser"}
    assert msg["from"] == "py"
    assert page.js_errors == []


def test_the_browser_publishes(page: Any, web_broker: BrokerProcess) -> None:
    open_demo(page, web_broker)
    with ws_client(web_broker, "listener") as conn:
        assert request(conn, op="subscribe", id=1, topic="chat.room1")["ok"]
        page.fill("#pub-topic", "chat.room1")
        page.fill("#pub-data", '{"text": "from chromium"}')
        page.click("#publish")
        page.wait_for_selector("#pub-result[data-offset='1']")
        push = next_op(conn, "message")
    assert push["from"] == "alice"
    assert push["data"] == {"text": "from chromium"}
    assert push["offset"] == 1
    # plain text is published as a JSON string
    page.fill("#pub-data", "just words")
    page.click("#publish")
    page.wait_for_selector("#pub-result[data-offset='2']")


def test_wildcard_subscription_and_presence(page: Any, web_broker: BrokerProcess) -> None:
    open_demo(page, web_broker)
    subscribe(page, "news.*")
    subscribe(page, "room", presence=True)
    page.wait_for_selector('#subs li[data-topic="room"] .members[data-members="alice"]')
    with ws_client(web_broker, "bob") as bob:
        assert request(bob, op="subscribe", id=1, topic="room")["ok"]
        page.wait_for_selector('#subs li[data-topic="room"] .members[data-members="alice,bob"]')
        for i, topic in enumerate(["news.sport", "news.weather", "other.x"]):
            assert request(bob, op="publish", id=10 + i, topic=topic, data=i)["ok"]
        page.wait_for_selector('#log tr.msg[data-topic="news.weather"]')
    page.wait_for_selector('#subs li[data-topic="room"] .members[data-members="alice"]')
    assert [m["topic"] for m in messages(page)] == ["news.sport", "news.weather"]


def test_a_refused_subscription_is_shown(page: Any, web_broker: BrokerProcess) -> None:
    open_demo(page, web_broker, publish=[], subscribe=["allowed.>"])
    page.fill("#sub-topic", "secret.stuff")
    page.click("#subscribe")
    page.wait_for_selector("#log tr.info >> text=refused: forbidden")


# --- the client module itself, driven from the page's console --------------------------------

CLIENT_SETUP = """
async ([url, token, opts]) => {
  const { PubSubClient } = await import("/client.js");
  const seen = (window.seen = { messages: [], gaps: [], states: [], refreshes: 0, disconnects: [] });
  const client = (window.client = new PubSubClient(url, { token, ...opts }));
  client.on("state", (e) => seen.states.push(e.state));
  client.on("refresh", () => seen.refreshes++);
  client.on("disconnect", (d) => seen.disconnects.push(d));
  await client.connect();
  window.sub = await client.subscribe("chat.room1", {
    onMessage: (m) => seen.messages.push([m.epoch, m.offset, m.data]),
    onGap: (g) => seen.gaps.push(g),
  });
  return { offset: window.sub.offset, epoch: window.sub.epoch };
}
"""


def test_client_recovers_exactly_after_a_dropped_connection(
    page: Any, web_broker: BrokerProcess
) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    start = page.evaluate(
        CLIENT_SETUP, [web_broker.url, web_broker.token("alice"), {"minDelayMs": 1500}]
    )
    assert start["offset"] == 0
    publish_from_python(web_broker, "chat.room1", 1, 2)
    wait_js(page, "seen.messages.length === 2")
    # The network drops (the socket closes under the client); publications go on meanwhile.
    page.evaluate("client._dropConnection(client._ws, 'test drop')")
    assert page.evaluate("client.state") == "reconnecting"
    publish_from_python(web_broker, "chat.room1", 3, 4, 5)
    wait_js(page, "seen.messages.length === 5")
    time.sleep(0.3)
    seen = page.evaluate("seen")
    assert [m[1:] for m in seen["messages"]] == [[o, o] for o in range(1, 6)]
    assert seen["gaps"] == []
    assert seen["states"][-2:] == ["reconnecting", "connected"]


def test_page_recovers_after_a_broker_restart_and_reports_the_gap(
    page: Any, web_broker: BrokerProcess
) -> None:
    open_demo(page, web_broker)
    subscribe(page, "chat.room1")
    publish_from_python(web_broker, "chat.room1", "before-1", "before-2")
    page.wait_for_selector('#log tr.msg[data-offset="2"]')
    old_epoch = messages(page)[0]["epoch"]

    web_broker.restart()  # SIGTERM: clients are told to come back (1001 + reconnect hint)
    # Published before the page is back: the new epoch's history holds it, and it is replayed.
    publish_from_python(web_broker, "chat.room1", "after-1")
    page.wait_for_selector("#state[data-state=connected]")
    page.wait_for_selector("#log tr.msg:has-text('after-1')")
    publish_from_python(web_broker, "chat.room1", "after-2")
    page.wait_for_selector("#log tr.msg:has-text('after-2')")

    msgs = messages(page)
    assert [m["data"] for m in msgs] == ["before-1", "before-2", "after-1", "after-2"]
    new_epoch = msgs[2]["epoch"]
    assert new_epoch != old_epoch
    assert [m["offset"] for m in msgs[2:]] == [1, 2]
    gaps = page.evaluate("pubsubDemo.gaps")
    assert len(gaps) == 1
    assert gaps[0]["epochChanged"] is True
    assert gaps[0]["reason"] == "epoch_changed"
    assert gaps[0]["previous"] == {"offset": 2, "epoch": old_epoch}
    assert gaps[0]["previousEpoch"] == old_epoch
    assert gaps[0]["epoch"] == new_epoch
    page.wait_for_selector("#log tr.gap:has-text('history reset')")
    states = page.evaluate("pubsubDemo.states")
    assert "reconnecting" in states
    assert states[-1] == "connected"


def test_token_function_is_called_per_connection_and_refreshes(
    page: Any, web_broker: BrokerProcess
) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    tokens = [web_broker.token("alice", ttl=4) for _ in range(6)]
    page.evaluate("tokens => { window.tokens = tokens; window.calls = 0; }", tokens)
    page.evaluate(
        """async (url) => {
          const { PubSubClient } = await import("/client.js");
          window.refreshed = 0;
          window.client = new PubSubClient(url, {
            token: async () => window.tokens[window.calls++],
            refreshMarginS: 2,
          });
          window.client.on("refresh", () => window.refreshed++);
          await window.client.connect();
        }""",
        web_broker.url,
    )
    # A 4 s token refreshed 2 s before it expires: still connected well after it would expire.
    wait_js(page, "window.refreshed >= 2", timeout=10)
    assert page.evaluate("client.state") == "connected"
    assert page.evaluate("calls") >= 3
    assert web_broker.events("closed") == [] or all(
        e.get("code") != 4003 for e in web_broker.events("closed")
    )


# --- origins ---------------------------------------------------------------------------------


FOREIGN_PAGE = """<!doctype html><meta charset="utf-8"><title>foreign</title>
<script type="module">
  import {{ PubSubClient }} from "{broker_http}/client.js";
  window.imported = true;
  window.startClient = (url, token) => {{
    window.events = [];
    const c = new PubSubClient(url, {{ token, maxDelayMs: 500 }});
    c.on("state", (e) => window.events.push(e.state));
    c.on("disconnect", (d) => window.events.push("close:" + d.code));
    c.connect();
  }};
</script>"""


def test_a_page_from_a_foreign_origin_is_refused(page: Any, web_broker: BrokerProcess) -> None:
    with static_site(FOREIGN_PAGE.format(broker_http=web_broker.http_url)) as origin:
        statuses: list[str] = []
        page.on("websocket", lambda ws: ws.on("socketerror", lambda err: statuses.append(str(err))))
        page.goto(origin + "/")
        wait_js(page, "window.imported === true")  # client.js is importable cross-origin (CORS)
        page.evaluate("([u, t]) => startClient(u, t)", [web_broker.url, web_broker.token("eve")])
        rejected = web_broker.wait_for("rejected", timeout=10, status=403)
        assert rejected["reason"] == "bad_origin"
        wait_js(page, "window.events.some((e) => e.startsWith('close:'))")
        events = page.evaluate("window.events")
        assert "connected" not in events
        assert any("403" in s for s in statuses) or not statuses


def test_status_page_draws_per_worker_charts(page: Any, web_broker: BrokerProcess) -> None:
    with ws_client(web_broker, "watcher"):
        page.goto(f"{web_broker.http_url}/status/")
        page.wait_for_selector("body[data-polls='2']")
        value = page.get_attribute('#worker-0 .chart[data-key="connections"]', "data-value")
        assert value == "1"
        assert page.get_attribute("#ready", "data-ready") == "true"
        publish_from_python(web_broker, "x", *range(20))
        wait_js(
            page,
            "Number(document.querySelector('#worker-all .chart[data-key=\"publications_in\"]')"
            ".dataset.value) > 0",
        )
        points = page.get_attribute('#worker-0 .chart[data-key="connections"] polyline', "points")
        assert points and len(points.split()) >= 2
        assert page.js_errors == []


def test_client_js_is_served_as_a_module(page: Any, web_broker: BrokerProcess) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    exported = page.evaluate("async () => Object.keys(await import('/client.js')).sort()")
    assert {"PubSubClient", "PubSubError", "Subscription", "topicMatches"} <= set(exported)
    checks = page.evaluate(
        """async () => {
          const { topicMatches } = await import('/client.js');
          return [topicMatches('a.*', 'a.b'), topicMatches('a.*', 'a.b.c'),
                  topicMatches('a.>', 'a.b.c'), topicMatches('a.>', 'a'),
                  topicMatches('>', 'x'), topicMatches('a.b', 'a.b')];
        }"""
    )
    assert checks == [True, False, True, False, True, True]
    assert json.dumps(checks)


CLIENT_EVENTS = """
async ([url, opts]) => {
  const { PubSubClient } = await import("/client.js");
  window.events = [];
  window.client = new PubSubClient(url, opts);
  client.on("state", (e) => events.push(e.state));
  client.on("disconnect", (d) => events.push("close:" + d.code + (d.willReconnect ? "+" : "")));
  try {
    await client.connect();
    return client.clientId;
  } catch (err) {
    return "error:" + err.code;
  }
}
"""


def test_token_in_an_auth_frame(page: Any, web_broker: BrokerProcess) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    opts = {"token": web_broker.token("frank"), "tokenIn": "frame"}
    assert page.evaluate(CLIENT_EVENTS, [web_broker.url, opts]) == "frank"
    authenticated = web_broker.wait_for("authenticated", timeout=10, client="frank")
    assert authenticated["source"] == "inband"
    assert page.evaluate("client.publish('chat.x', [1, 2])") == 1


def test_an_expired_fixed_token_ends_in_closed(page: Any, web_broker: BrokerProcess) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    opts = {"token": web_broker.token("gina", ttl=2)}
    assert page.evaluate(CLIENT_EVENTS, [web_broker.url, opts]) == "gina"
    events = wait_js(page, "window.events.includes('closed') && window.events", timeout=10)
    assert "close:4003" in events  # expired, and not retried with the same token
    assert events[-1] == "closed"
    error = page.evaluate("client.publish('chat.x', 1).then(() => 'ok', (e) => e.code)")
    assert error == "closed"


def test_refusals_and_close(page: Any, web_broker: BrokerProcess) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    token = web_broker.token("hal", publish=["mine.>"], subscribe=["mine.>"])
    assert page.evaluate(CLIENT_EVENTS, [web_broker.url, {"token": token}]) == "hal"
    codes = page.evaluate(
        """async () => {
          const code = (p) => p.then(() => "ok", (e) => e.code);
          return [
            await code(client.publish("theirs.x", 1)),
            await code(client.subscribe("theirs.>")),
            await code(client.subscribe("bad..topic")),
            await code(client.publish("mine.x", 1)),
            await code(client.subscribe("mine.x")),
            await code(client.subscribe("mine.x")),
          ];
        }"""
    )
    assert codes == ["forbidden", "forbidden", "bad_topic", "ok", "ok", "bad_request"]
    page.evaluate("client.close()")
    assert page.evaluate("client.state") == "closed"
    time.sleep(0.5)
    assert page.evaluate("events.filter((e) => e === 'connecting' || e === 'reconnecting')") == [
        "connecting"
    ]


GAP_SETUP = """
async ([url, tokens]) => {
  const { PubSubClient } = await import("/client.js");
  const seen = (window.seen = { messages: [], gaps: [], wild: [], disconnects: [] });
  // The second connection waits for the test's go-ahead: the test publishes meanwhile.
  let calls = 0;
  const token = () => calls++ === 0 ? tokens[0]
    : new Promise((resolve) => { window.release = () => resolve(tokens[1]); });
  const client = (window.client = new PubSubClient(url, { token, minDelayMs: 50 }));
  client.on("disconnect", (d) => seen.disconnects.push(d));
  await client.connect();
  await client.subscribe("small.t", {
    onMessage: (m) => seen.messages.push(m.offset),
    onGap: (g) => seen.gaps.push(g),
  });
  await client.subscribe("small.*", {
    onMessage: (m) => seen.wild.push(m.offset),
    onGap: (g) => seen.gaps.push(g),
  });
}
"""


def test_client_reports_what_cannot_be_replayed(page: Any, tmp_path: Any) -> None:
    config = {"history": [{"pattern": "small.>", "size": 2, "ttl": 600}]}
    with start_web_broker(tmp_path, config) as b:
        page.goto(f"{b.http_url}/demo/")
        page.evaluate(GAP_SETUP, [b.url, [b.token("ann"), b.token("ann")]])
        publish_from_python(b, "small.t", 1, 2)
        wait_js(page, "seen.messages.length === 2 && seen.wild.length === 2")
        page.evaluate("client._dropConnection(client._ws, 'test drop')")
        publish_from_python(b, "small.t", 3, 4, 5, 6, 7)  # only 6 and 7 are kept
        wait_js(page, "typeof window.release === 'function'")
        page.evaluate("release()")
        wait_js(page, "client.state === 'connected' && seen.messages.length === 4")
        publish_from_python(b, "small.t", 8)
        wait_js(page, "seen.messages.length === 5")
        seen = page.evaluate("seen")
    assert seen["messages"] == [1, 2, 6, 7, 8]
    exact = [g for g in seen["gaps"] if g["topic"] == "small.t"]
    wild = [g for g in seen["gaps"] if g["topic"] == "small.*"]
    epoch = exact[0]["epoch"]
    assert exact == [
        {
            "topic": "small.t",
            "from": 3,
            "to": 5,
            "epochChanged": False,
            "possible": False,
            "reason": "not_recovered",
            "previous": {"offset": 2, "epoch": epoch},
            "previousEpoch": epoch,
            "epoch": epoch,
        }
    ]
    assert wild == [
        {
            "topic": "small.*",
            "from": None,
            "to": None,
            "epochChanged": False,
            "possible": True,
            "reason": "wildcard_reconnect",
        }
    ]
    # the wildcard subscription is live again; what the exact one replayed reached it once
    assert seen["wild"] == [1, 2, 6, 7, 8]


def test_client_honours_the_reconnect_hint(page: Any, web_broker: BrokerProcess) -> None:
    page.goto(f"{web_broker.http_url}/demo/")
    page.evaluate(CLIENT_SETUP, [web_broker.url, web_broker.token("alice"), {}])
    web_broker.restart()
    disconnect = wait_js(page, "seen.disconnects[0]")
    assert disconnect["code"] == 1001
    hint = int(disconnect["reason"].rsplit("reconnect_after_ms=", 1)[1])
    assert disconnect["willReconnect"] is True
    assert disconnect["delayMs"] >= hint
    wait_js(page, "client.state === 'connected'")


def test_history_and_presence_from_the_client(page: Any, web_broker: BrokerProcess) -> None:
    publish_from_python(web_broker, "chat.room1", "a", "b", "c")
    page.goto(f"{web_broker.http_url}/demo/")
    result = page.evaluate(
        """async ([url, token]) => {
          const { PubSubClient } = await import("/client.js");
          const client = new PubSubClient(url, { token });
          const all = await client.history("chat.room1");
          const some = await client.history("chat.room1", {
            since: { offset: 1, epoch: all.epoch }, limit: 1 });
          const latest = await client.history("chat.room1", { last: 2 });
          const both = await client.history("chat.room1", { last: 2, limit: 2 }).then(
            () => "ok", (err) => err.code);
          await client.subscribe("chat.room1", { presence: true });
          const members = await client.presence("chat.room1");
          client.close();
          return { all, some, latest, both, members };
        }""",
        [web_broker.url, web_broker.token("ivy")],
    )
    assert [m["data"] for m in result["all"]["messages"]] == ["a", "b", "c"]
    assert set(result["all"]) == {"messages", "offset", "epoch"}
    assert result["all"]["offset"] == 3
    assert [m["offset"] for m in result["some"]["messages"]] == [2]
    assert result["some"]["recovered"] is True
    assert [m["data"] for m in result["latest"]["messages"]] == ["b", "c"]
    assert result["both"] == "bad_request"
    assert result["members"] == ["ivy"]


def test_presence_refusals_reach_the_page(page: Any, tmp_path: Any) -> None:
    # Presence tracked on room.* only, and readable by nobody by default.
    config = {"presence": {"topics": ["room.*"]}, "auth": {"default_presence": []}}
    with start_web_broker(tmp_path, config) as b:
        page.goto(f"{b.http_url}/demo/")
        codes = page.evaluate(
            """async ([url, plain, reader]) => {
              const { PubSubClient } = await import("/client.js");
              const code = (promise) => promise.then(() => "ok", (err) => err.code);
              const a = new PubSubClient(url, { token: plain });
              const b = new PubSubClient(url, { token: reader });
              const codes = {
                forbidden: await code(a.presence("room.1")),
                forbiddenSub: await code(a.subscribe("room.1", { presence: true })),
                untracked: await code(b.presence("lobby")),
                untrackedSub: await code(b.subscribe("lobby", { presence: true })),
                plainSub: await code(b.subscribe("lobby")),
                members: await b.presence("room.1"),
              };
              a.close();
              b.close();
              return codes;
            }""",
            [b.url, b.token("plain"), b.token("reader", subscribe=[">"], presence=[">"])],
        )
    assert codes == {
        "forbidden": "forbidden",
        "forbiddenSub": "forbidden",
        "untracked": "not_tracked",
        "untrackedSub": "not_tracked",
        "plainSub": "ok",
        "members": [],
    }
