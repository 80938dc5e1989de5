"""The asyncio client, for FastAPI, Starlette, aiohttp and other asyncio code.

    .venv/bin/pip install -e '.[aio]'     # in the repository: adds the websockets library
    export PUBSUB_URL=ws://127.0.0.1:8765/ws PUBSUB_TOKEN=...   # see `pubsub-broker token`
    .venv/bin/python examples/asyncio_usage.py

The same client as on trio (``client_sdk.connect``), over the ``websockets`` library: one
subscription read with ``async for``, one served by an ``async`` callback, then history and
presence. See examples/fastapi_app.py for a web application built on it.
"""

from __future__ import annotations

import asyncio
import os

from client_sdk import Forbidden, Message, NotTracked, aio

URL = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")


async def token() -> str:
    # A callable (plain or async) is asked for every connection and again before the token
    # expires; a real application would fetch a fresh token from its auth service here.
    return os.environ["PUBSUB_TOKEN"]


async def main() -> None:
    async with aio.connect(URL, token=token) as client:
        print("connected as", client.client_id)
        async with client.subscribe("demo.aio") as sub:
            for i in range(3):
                await client.publish("demo.aio", {"i": i})
            async for event in sub:
                if isinstance(event, Message):
                    print(f"#{event.offset}: {event.data}")
                    if event.data == {"i": 2}:
                        break
            try:
                print("here now:", await client.presence("demo.aio"))  # subscribers of the topic
            except (Forbidden, NotTracked) as exc:  # presence is opt-in on the broker
                print("presence not available:", exc)

        done = asyncio.Event()

        async def on_message(msg: Message) -> None:
            print(f"callback #{msg.offset}: {msg.data}")
            if msg.data == "last":
                done.set()

        async with client.subscribe("demo.aio.callbacks", on_message=on_message):
            for text in ("first", "last"):
                await client.publish("demo.aio.callbacks", text)
            await asyncio.wait_for(done.wait(), 5)

        history = await client.history("demo.aio", limit=10)
        print("history:", [m.data for m in history.messages])


asyncio.run(main())
