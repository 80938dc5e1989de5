"""A FastAPI application on the broker: it publishes from a request handler and relays the
rooms to its own browser clients as server-sent events.

    .venv/bin/pip install -e '.[aio]' fastapi uvicorn     # in the repository
    export PUBSUB_URL=ws://127.0.0.1:8765/ws PUBSUB_TOKEN=...   # see `pubsub-broker token`
    .venv/bin/python examples/fastapi_app.py --port 8000   # or: .venv/bin/uvicorn examples.fastapi_app:app

    curl -N localhost:8000/rooms/lobby/events                   # one SSE stream per browser tab
    curl localhost:8000/rooms/lobby/messages -H 'content-type: application/json' \\
         -d '{"text": "hi"}'                                    # -> {"offset": 1}

One broker client per process (``client_sdk.aio``, opened in the lifespan) holds one
subscription to ``chat.>`` with callbacks; a :class:`Relay` fans each message out to the SSE
streams of its room, however many there are. Publications carry a datetime, encoded by the
``json_default`` hook. When the broker restarts or the connection drops, the client reconnects
by itself and the streams get an ``event: gap`` saying publications may be missing (a pattern
subscription cannot be replayed: reload the room's history with ``client.history``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import client_sdk
from client_sdk import BadTopic, Forbidden, Gap, Message, PubSubError, aio

URL = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")
TOKEN = os.environ.get("PUBSUB_TOKEN")  # in production: a callable that fetches a fresh one


class Relay:
    """Fans broker events out to this process's SSE streams, each with a bounded queue: a
    stream that does not keep up is ended (its browser reconnects) rather than holding memory."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[asyncio.Queue[str | None]]] = {}

    def listen(self, room: str) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1000)
        self.rooms.setdefault(room, set()).add(queue)
        return queue

    def leave(self, room: str, queue: asyncio.Queue[str | None]) -> None:
        self.rooms.get(room, set()).discard(queue)

    def send(self, queues: set[asyncio.Queue[str | None]], frame: str) -> None:
        for queue in list(queues):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)  # ends that stream

    def on_message(self, msg: Message) -> None:
        room = msg.topic.removeprefix("chat.")
        body = json.dumps({"room": room, "from": msg.sender, **msg.data})
        self.send(self.rooms.get(room, set()), f"id: {msg.offset}\ndata: {body}\n\n")

    def on_gap(self, gap: Gap) -> None:
        for queues in self.rooms.values():
            body = {"topic": gap.topic, "reason": gap.reason, "detail": gap.describe()}
            self.send(queues, f"event: gap\ndata: {json.dumps(body)}\n\n")


relay = Relay()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with (
        aio.connect(
            URL,
            token=TOKEN,
            dumps=functools.partial(json.dumps, default=client_sdk.json_default),
        ) as client,
        client.subscribe("chat.>", on_message=relay.on_message, on_gap=relay.on_gap),
    ):
        app.state.pubsub = client
        yield


app = FastAPI(lifespan=lifespan)


class Post(BaseModel):
    text: str


@app.post("/rooms/{room}/messages")
async def post_message(room: str, post: Post, request: Request) -> dict[str, Any]:
    client: aio.Client = request.app.state.pubsub
    data = {"text": post.text, "at": datetime.datetime.now(datetime.UTC)}
    try:
        offset = await client.publish(f"chat.{room}", data, timeout=5)
    except (BadTopic, Forbidden) as exc:
        raise HTTPException(400, str(exc)) from None
    except PubSubError as exc:
        # Outcome unknown (timeout, connection lost) or the broker is unavailable: the
        # caller may retry; the SDK never re-sends a publication by itself.
        raise HTTPException(503, str(exc)) from None
    return {"offset": offset}


@app.get("/rooms/{room}/events")
async def room_events(room: str) -> StreamingResponse:
    queue = relay.listen(room)

    async def stream() -> AsyncIterator[str]:
        try:
            yield ": listening\n\n"  # tells the browser (and the tests) the stream is live
            while (frame := await queue.get()) is not None:
                yield frame
        finally:
            relay.leave(room, queue)

    return StreamingResponse(stream(), media_type="text/event-stream")


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
