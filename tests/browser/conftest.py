"""Headless Chromium (Debian's, driven by Playwright) against the real broker.

The broker's operations listener serves the pages, so the page's origin is
``http://127.0.0.1:HTTP_PORT``; that port is only known once the broker runs, so the fixture
adds it to ``[server] allowed_origins`` and reloads the configuration (SIGHUP), as an operator
would."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerProcess, to_toml

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context()
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.js_errors = errors
    try:
        yield pg
    finally:
        context.close()


def allow_origins(b: BrokerProcess, *origins: str) -> None:
    """Rewrite the broker's configuration with these allowed origins and reload it."""
    b.config["server"] = {**b.config.get("server", {}), "allowed_origins": list(origins)}
    b.config_path.write_text(to_toml(b.config))
    b.signal(signal.SIGHUP)
    b.wait_for("reloaded", timeout=10)


@pytest.fixture
def web_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker whose own pages may open WebSockets to it."""
    with BrokerProcess.start(tmp_path, config={"server": {"shutdown_timeout": 1.0}}) as b:
        assert b.http_port, "the broker did not report an http_port"
        allow_origins(b, b.http_url)
        yield b
