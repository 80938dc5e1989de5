"""What the broker relies on inside trio-websocket and wsproto, beyond their public API, in one
place (the versions are pinned in ``pyproject.toml``; ``tests/unit/test_wsconn.py`` fails
loudly if a new release changes any of it).

:func:`release_handshake`: wsproto's ``WSConnection`` keeps its ``H11Handshake`` for the life
of the connection: an h11 connection with its receive buffer and state machine, the upgrade
request (headers and target, token included) and an event deque, about 3 KiB per connection.
Once the connection is open wsproto only asks it for ``events()``, which stay empty, so an
empty stand-in takes its place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import trio_websocket

__all__ = ["release_handshake"]


class _Done:
    """Stands in for an open connection's finished ``H11Handshake``."""

    __slots__ = ()

    def events(self) -> Iterator[Any]:
        return iter(())


_DONE = _Done()


def release_handshake(ws: trio_websocket.WebSocketConnection) -> bool:
    """Drop the handshake state of an open connection; return whether there was any to drop
    (a connection not yet open keeps it)."""
    conn: Any = ws._wsproto  # the private part this module is about
    if conn.connection is None or conn.handshake is _DONE:
        return False
    conn.handshake = _DONE
    return True
