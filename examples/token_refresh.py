"""Short-lived tokens, renewed on the same connection before they expire.

    .venv/bin/python examples/token_refresh.py [SECONDS]

It signs its tokens with the development broker's secret, which it reads from
``.pubsub-dev/broker.toml`` (``[auth] jwt_secret``; written by ``make run`` in the directory
it ran in: run this from there too), or from ``PUBSUB_BROKER_JWT_SECRET`` when set (for any
other broker: its ``jwt_secret``). ``PUBSUB_URL`` as for the other examples.

Pass a callable (plain or async) as ``token``: the client calls it for every connection and
again shortly before the current token expires (it learns the expiry from the broker's
``welcome``), then sends the fresh token with the ``auth`` op, so the connection and its
subscriptions stay up. In a real application the callable asks your auth service; here it
signs a 5-second token with the broker's development secret, and runs for SECONDS (default 20)
publishing the time every second.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path

import jwt
import trio

import client_sdk

DEV_CONFIG = Path(".pubsub-dev/broker.toml")  # what `make run` (pubsub-broker dev) writes


def signing_secret() -> str:
    """``PUBSUB_BROKER_JWT_SECRET``, else the development broker's ``[auth] jwt_secret``;
    exits with a message saying where to find it when there is neither."""
    secret = os.environ.get("PUBSUB_BROKER_JWT_SECRET")
    if secret:
        return secret
    try:
        with DEV_CONFIG.open("rb") as f:
            secret = tomllib.load(f).get("auth", {}).get("jwt_secret")
    except FileNotFoundError:
        secret = None
    if not secret:
        sys.exit(
            f"no signing secret: PUBSUB_BROKER_JWT_SECRET is not set and {DEV_CONFIG.resolve()} "
            "has no [auth] jwt_secret (`make run` writes it in the directory it runs in: run "
            "this from there, or set PUBSUB_BROKER_JWT_SECRET to the broker's jwt_secret)"
        )
    return str(secret)


def fresh_token(secret: str) -> str:
    print(f"{time.strftime('%X')} minting a new 5 s token", flush=True)
    claims = {"sub": "refresher", "exp": int(time.time()) + 5}
    return jwt.encode(claims, secret, algorithm="HS256")


async def main(seconds: float) -> None:
    url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
    secret = signing_secret()
    async with (
        client_sdk.connect(url, token=lambda: fresh_token(secret)) as client,
        client.subscribe("demo.clock") as sub,
    ):
        for _ in range(int(seconds)):
            await client.publish("demo.clock", time.strftime("%X"))
            event = await sub.get(timeout=5)
            expires = client.welcome.expires_at if client.welcome else None
            left = f"{expires - time.time():.0f} s" if expires else "never"
            print(f"got {getattr(event, 'data', event)}; token expires in {left}", flush=True)
            await trio.sleep(1)
        print("reconnects:", client.reconnects)  # 0: the tokens were renewed in place


if __name__ == "__main__":
    trio.run(main, float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
