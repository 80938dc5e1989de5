"""A consumer that accounts for every message, even across its own restarts.

    .venv/bin/python examples/resume.py orders   # stop it, publish more, start it again

with ``PUBSUB_URL`` and ``PUBSUB_TOKEN`` exported as ``make run`` prints them.

It saves the position of the last message it handled (offset and epoch) in a file and passes
it back as ``since`` when it starts: the broker replays what came after it, and any message it
can no longer replay is reported as a ``Gap`` naming the lost offsets. With ``strict=True`` a
gap raises ``GapError`` instead, for applications that must stop rather than skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import trio

import client_sdk
from client_sdk import Gap, Message, Position


async def main(topic: str) -> None:
    url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
    state = trio.Path(f".position-{topic}.json")
    since = Position(**json.loads(await state.read_text())) if await state.exists() else None
    async with (
        client_sdk.connect(url, token=os.environ.get("PUBSUB_TOKEN")) as client,
        client.subscribe(topic, since=since) as sub,
    ):
        print(f"resuming {topic} after {since}" if since else f"starting {topic} from now")
        async for event in sub:
            if isinstance(event, Gap):
                print(f"LOST: {event.describe()}")  # alert, or fetch from your own store
            elif isinstance(event, Message):
                print(f"handled #{event.offset}: {event.data!r}")
                await state.write_text(json.dumps({"offset": event.offset, "epoch": event.epoch}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "orders")
