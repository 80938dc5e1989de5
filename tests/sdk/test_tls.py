"""``wss://``: the client speaks TLS to a broker with a certificate the caller trusts."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

import client_sdk
from tests.support.broker import BrokerProcess
from tests.support.tls import self_signed


async def test_wss_with_a_trusted_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = {"server": {"tls_cert": str(cert), "tls_key": str(key)}}
    with BrokerProcess.start(tmp_path, config) as b:
        url = b.url.replace("ws://", "wss://")
        trusted = ssl.create_default_context(cafile=str(cert))
        async with (
            client_sdk.connect(url, token=b.token("alice"), ssl_context=trusted) as client,
            client.subscribe("secure") as sub,
        ):
            assert await client.publish("secure", "over tls") == 1
            event = await sub.get(5)
            assert isinstance(event, client_sdk.Message) and event.data == "over tls"
        # the system trust store does not know this certificate: refused, not retried
        with pytest.raises(client_sdk.ConnectFailed):
            async with client_sdk.connect(url, token=b.token("alice")):
                pass
