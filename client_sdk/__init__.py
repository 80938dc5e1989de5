"""Python client for the trio-pubsub broker.

    async with client_sdk.connect("ws://127.0.0.1:8765/ws", token=token) as client:
        async with client.subscribe("chat.room1") as sub:
            await client.publish("chat.room1", {"text": "hi"})
            async for event in sub:
                ...

``client_sdk.aio`` offers the same client on asyncio (``pip install trio-pubsub[aio]``), and
``client_sdk.sync`` a blocking one for code that runs on neither.
"""

# Imported here so that ``import client_sdk`` is enough for ``client_sdk.sync.connect(...)``.
from client_sdk import sync
from client_sdk._protocol import json_default
from client_sdk.client import Client, ConnectOptions, Subscription, TokenSource, connect
from client_sdk.errors import (
    AuthenticationFailed,
    BadRequest,
    BadTopic,
    ClientClosed,
    ConnectFailed,
    ConnectionFailed,
    ConnectionLost,
    EncodeError,
    Forbidden,
    GapError,
    InternalError,
    NotSubscribed,
    NotTracked,
    PermissionRevoked,
    PubSubError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SubscriptionClosed,
    TokenError,
    TooLarge,
    TooManySubscriptions,
    TooManyTopics,
    Unauthorized,
    Unavailable,
)
from client_sdk.models import (
    ConnectionState,
    Event,
    Gap,
    History,
    Message,
    Position,
    PresenceEvent,
    Welcome,
)

__all__ = [
    "AuthenticationFailed",
    "BadRequest",
    "BadTopic",
    "Client",
    "ClientClosed",
    "ConnectFailed",
    "ConnectOptions",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionState",
    "EncodeError",
    "Event",
    "Forbidden",
    "Gap",
    "GapError",
    "History",
    "InternalError",
    "Message",
    "NotSubscribed",
    "NotTracked",
    "PermissionRevoked",
    "Position",
    "PresenceEvent",
    "PubSubError",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "Subscription",
    "SubscriptionClosed",
    "TokenError",
    "TokenSource",
    "TooLarge",
    "TooManySubscriptions",
    "TooManyTopics",
    "Unauthorized",
    "Unavailable",
    "Welcome",
    "connect",
    "json_default",
    "sync",
]
