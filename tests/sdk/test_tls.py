"""``wss://``: the client speaks TLS to a broker with a certificate the caller trusts."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import client_sdk
from tests.support.broker import BrokerProcess


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


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
