"""The browser client against a broker whose read budget refuses part of a reconnect's
recovery: the refused re-subscription is asked again later, and nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.browser.sites import start_web_broker
from tests.browser.test_browser import publish_from_python, wait_js
from tests.support.metrics import metric

pytestmark = pytest.mark.browser

# Two subscriptions; the client's reconnects wait for ``window.go`` (so that what is published
# meanwhile is certainly replayed, not delivered live).
SETUP = """
async ([url, token]) => {
  const { PubSubClient } = await import("/client.js");
  const seen = (window.seen = { messages: [], gaps: [], errors: [] });
  const client = (window.client = new PubSubClient(url, { token, minDelayMs: 50, maxDelayMs: 200 }));
  const open = client._open.bind(client);
  window.go = true;
  client._open = () => (window.go ? open() : client._later(() => client._open(), 20));
  client.on("error", (e) => seen.errors.push(e.error.code));
  for (const topic of ["a", "b"]) {
    await client.subscribe(topic, {
      onMessage: (m) => seen.messages.push([m.topic, m.offset]),
      onGap: (g) => seen.gaps.push(g),
    });
  }
}
"""


def test_a_refused_resubscription_is_retried(page: Any, tmp_path: Path) -> None:
    # Each replay is about 12 KB: the first one overdraws the 2 KB burst, the second is
    # refused until the refill (20 KB/s) has paid the debt.
    limits = {"read_burst_bytes": 2000, "read_rate_bytes": 20000}
    with start_web_broker(tmp_path, {"limits": limits}) as b:
        page.goto(f"{b.http_url}/demo/")
        page.evaluate(SETUP, [b.url, b.token("alice")])
        page.evaluate("window.go = false; client._dropConnection(client._ws, 'test drop')")
        for topic in ("a", "b"):
            publish_from_python(b, topic, *({"pad": "x" * 500} for _ in range(20)))
        page.evaluate("window.go = true")
        wait_js(page, "seen.messages.length === 40")
        seen = page.evaluate("seen")
        for topic in ("a", "b"):
            assert [o for t, o in seen["messages"] if t == topic] == list(range(1, 21))
        assert seen["gaps"] == [] and seen["errors"] == []
        assert metric(b, "pubsub_read_refusals_total", op="subscribe") >= 1
