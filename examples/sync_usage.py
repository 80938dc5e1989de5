"""The blocking client, for scripts and non-async code (Flask, Django, threads).

    .venv/bin/python examples/sync_usage.py

with ``PUBSUB_URL`` and ``PUBSUB_TOKEN`` exported as ``make run`` prints them.

It runs the same trio client on one background thread; any thread may call it. ``close()``
(or leaving the ``with`` block) ends that thread.
"""

from __future__ import annotations

import os
import threading

import client_sdk.sync
from client_sdk import Forbidden, Message, NotTracked

url = os.environ.get("PUBSUB_URL", "ws://127.0.0.1:8765/ws")

with client_sdk.sync.connect(url, token=os.environ.get("PUBSUB_TOKEN")) as client:
    print("connected as", client.client_id)
    with client.subscribe("demo.sync") as sub:

        def produce() -> None:
            for i in range(5):
                client.publish("demo.sync", {"i": i})

        threading.Thread(target=produce).start()
        received = 0
        for event in sub:  # blocks; also try sub.get(timeout=1.0)
            if isinstance(event, Message):
                print(f"#{event.offset}: {event.data}")
                received += 1
                if received == 5:
                    break
        try:
            print("here now:", client.presence("demo.sync"))  # subscribers of the topic
        except (Forbidden, NotTracked) as exc:  # presence is opt-in on the broker
            print("presence not available:", exc)
    print("history:", [m.data for m in client.history("demo.sync", limit=10).messages])

# The same without a thread of its own: callbacks run in the client's background thread, while
# this one publishes.
with client_sdk.sync.connect(url, token=os.environ.get("PUBSUB_TOKEN")) as client:
    last = threading.Event()

    def on_message(msg: Message) -> None:
        print(f"callback #{msg.offset}: {msg.data}")
        if msg.data == "last":
            last.set()

    client.subscribe("demo.callbacks", on_message=on_message)
    for text in ("first", "last"):
        client.publish("demo.callbacks", text)
    last.wait(5)
