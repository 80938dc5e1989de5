"""Short-lived tokens, renewed on the same connection before they expire.

    PUBSUB_BROKER_JWT_SECRET=... python examples/token_refresh.py [SECONDS]

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

import jwt
import trio

import client_sdk

SECRET = os.environ.get("PUBSUB_BROKER_JWT_SECRET", "change-me")


def fresh_token() -> str:
    print(f"{time.strftime('%X')} minting a new 5 s token", flush=True)
    claims = {"sub": "refresher", "exp": int(time.time()) + 5}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def main(seconds: float) -> None:
    url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
    async with (
        client_sdk.connect(url, token=fresh_token) as client,
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
