"""Print every event of one or more topics, across broker restarts, until Ctrl-C.

    export PUBSUB_URL=ws://127.0.0.1:8765/ws PUBSUB_TOKEN=...   # as `make run` prints them
    .venv/bin/python examples/subscribe.py chat.room1 'news.>'

Each subscription yields messages in offset order, presence events when asked for (exact
topics only, and only where the broker tracks presence and the token may read it), and a Gap
wherever the broker could not replay what was published while this client was away (for
example after the broker restarted and lost its in-memory history).
"""

from __future__ import annotations

import os
import sys
from contextlib import AsyncExitStack, suppress

import trio

import client_sdk
from client_sdk import Forbidden, Gap, Message, NotTracked, PresenceEvent


def is_pattern(topic: str) -> bool:
    return any(segment in ("*", ">") for segment in topic.split("."))


async def follow(sub: client_sdk.Subscription) -> None:
    async for event in sub:
        match event:
            case Message(topic=topic, offset=offset, sender=sender, data=data):
                print(f"{topic} #{offset} from {sender}: {data!r}")
            case PresenceEvent(kind=kind, client=who):
                print(f"{sub.topic}: {who} {kind}s")
            case Gap():
                print(f"!! lost on {event.topic}: {event.describe()}", file=sys.stderr)


def show(state: client_sdk.ConnectionState) -> None:
    print(f"-- {state.value}", file=sys.stderr)


async def open_subscription(
    client: client_sdk.Client, stack: AsyncExitStack, topic: str
) -> client_sdk.Subscription:
    """Subscribe with presence events where the broker allows it, else without them."""
    if not is_pattern(topic):
        # Presence is opt-in on the broker: a topic that does not track it (NotTracked), or a
        # token that may not read it (Forbidden), refuses the subscription; ask again without.
        with suppress(Forbidden, NotTracked):
            return await stack.enter_async_context(client.subscribe(topic, presence=True))
    return await stack.enter_async_context(client.subscribe(topic))


async def main(topics: list[str]) -> None:
    url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
    token = os.environ.get("PUBSUB_TOKEN")
    async with (
        client_sdk.connect(url, token=token, on_state_change=show) as client,
        AsyncExitStack() as stack,
        trio.open_nursery() as nursery,
    ):
        for topic in topics:
            nursery.start_soon(follow, await open_subscription(client, stack, topic))


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        trio.run(main, sys.argv[1:] or ["chat.room1"])
