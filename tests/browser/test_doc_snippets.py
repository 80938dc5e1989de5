"""The browser snippets of README.md and docs/browser.md run as written in headless Chromium.

Each ```html or ```js block is served as a page of an origin of its own (as a developer's
application would be; that origin is allowed, as the documents tell them to do), with the
development broker's addresses replaced by the test broker's. What a snippet leaves to the
reader is given to it from outside, never by editing it: ``fetchToken``/``getToken`` as
globals, the ``/my-app/pubsub-token`` endpoint as a routed response, and to a ```js line the
import of the page it belongs in. One line is added at
the end of its module, ``window.snippetDone = true``, so the test knows that every ``await`` in
it resolved. Each block has an entry in ``EXPECTED`` (the console lines it must print), so a new
snippet cannot go untested.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.sites import allow_origins, static_site
from tests.browser.test_browser import wait_js
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(html|js)\n(.*?)^```", re.MULTILINE | re.DOTALL)
DEV_HTTP, DEV_WS = "http://127.0.0.1:8766", "ws://127.0.0.1:8765/ws"
DONE = "window.snippetDone = true;\n"

#: For each block, in order: the beginnings of the console lines it must print.
EXPECTED: dict[str, list[list[str]]] = {
    "README.md": [["chat.room1 1 "]],
    "docs/browser.md": [
        ["connecting", "connected", "alice joined", "chat.room1 1 alice "],
        [],  # shared: true, one line: it only makes the client (which must not throw)
    ],
}
CASES = [
    pytest.param(doc, i, lines, id=f"{doc}-{i + 1}")
    for doc, entries in EXPECTED.items()
    for i, lines in enumerate(entries)
]


def snippets(doc: str) -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", list(EXPECTED))
def test_every_browser_snippet_has_an_expectation(doc: str) -> None:
    assert len(snippets(doc)) == len(EXPECTED[doc]), f"{doc}: add the new snippet to EXPECTED"


def as_page(lang: str, code: str, b: BrokerProcess) -> str:
    code = code.replace(DEV_HTTP, b.http_url).replace(DEV_WS, b.url)
    if lang == "js":  # a line of a page like the one above: with its import
        imports = f'import {{ PubSubClient }} from "{b.http_url}/client.js";\n'
        return f'<script type="module">\n{imports}{code}{DONE}</script>\n'
    head, tail = code.rsplit("</script>", 1)
    return f"{head}{DONE}</script>{tail}"


@pytest.mark.parametrize(("doc", "index", "expected"), CASES)
def test_browser_snippet_runs_as_written(
    page: Any, web_broker: BrokerProcess, doc: str, index: int, expected: list[str]
) -> None:
    lang, code = snippets(doc)[index]
    assert DEV_WS in code, "a snippet names the development broker"
    token = web_broker.token("alice")
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    page.add_init_script(
        f"window.fetchToken = window.getToken = async () => {token!r};"  # what the reader has
    )
    page.route(
        "**/my-app/pubsub-token", lambda route: route.fulfill(body=token, content_type="text/plain")
    )
    with static_site(as_page(lang, code, web_broker)) as origin:
        allow_origins(web_broker, web_broker.http_url, origin)
        page.goto(f"{origin}/app/")
        wait_js(page, "window.snippetDone === true")
        deadline = time.monotonic() + 10
        while missing := [e for e in expected if not any(c.startswith(e) for c in console)]:
            assert time.monotonic() < deadline, f"never printed {missing}: {console}"
            time.sleep(0.05)
    assert page.js_errors == []


def test_the_documented_options_are_the_clients() -> None:
    """docs/browser.md's table of options lists exactly the defaults the client starts from."""
    source = (ROOT / "client_sdk" / "js" / "pubsub.js").read_text(encoding="utf-8")
    defaults = source.split("this.options = {", 1)[1].split("...options", 1)[0]
    in_code = set(re.findall(r"^\s*(\w+):", defaults, re.MULTILINE))
    doc = (ROOT / "docs" / "browser.md").read_text(encoding="utf-8")
    table = doc.split("Options of `new PubSubClient(url, options)`:", 1)[1].split("\n\n", 2)[1]
    documented = {
        name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert documented == in_code
