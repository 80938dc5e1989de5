"""Publish a few messages and print the offset the broker gave each.

    .venv/bin/python examples/publish.py chat.room1 "hello" "how are you?"

with ``PUBSUB_URL`` and ``PUBSUB_TOKEN`` exported as ``make run`` prints them.

``publish`` returns once the broker acknowledged the publication (its offset), or raises:
``Forbidden``/``BadTopic``/``TooLarge``/``RateLimited`` when the broker refuses it, and
``RequestTimeout``/``ConnectionLost`` when the outcome is unknown (the SDK never re-sends a
publication by itself, so nothing is ever published twice behind your back).
"""

from __future__ import annotations

import os
import sys

import trio

import client_sdk


async def main(topic: str, texts: list[str]) -> None:
    url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
    async with client_sdk.connect(url, token=os.environ.get("PUBSUB_TOKEN")) as client:
        for text in texts:
            try:
                offset = await client.publish(topic, {"text": text}, timeout=5)
            except client_sdk.RateLimited:
                await trio.sleep(1)  # the broker dropped it: sending it again is safe
                offset = await client.publish(topic, {"text": text}, timeout=5)
            print(f"{topic} #{offset}: {text}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "chat.room1", sys.argv[2:] or ["hello"])
