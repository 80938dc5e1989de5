"""When the client acts on its own: reconnect delays and token renewal; sans-I/O.

The connection loop (``_connection.py``) owns the clock and sleeps; these functions only say
for how long, so the policy is tested with plain calls.
"""

from __future__ import annotations

import random
import re

_HINT = re.compile(r"reconnect_after_ms=(\d+)")


def backoff(attempt: int, base: float, ceiling: float) -> float:
    """The delay before reconnect ``attempt`` (0, 1, ...): uniform in
    [0, min(ceiling, base * 2**attempt)]. Full jitter (AWS architecture blog, "Exponential
    Backoff And Jitter") spreads a crowd of clients that lost the same broker over the window."""
    return random.uniform(0, min(ceiling, base * 2 ** min(attempt, 64)))


def reconnect_delay(
    code: int, reason: str | None, attempt: int, base: float, ceiling: float
) -> float:
    """The delay before reconnecting after a connection closed with ``code``/``reason``:
    none after 4003 (the token expired; a fresh one is fetched), the delay a 1001 close asks
    for plus a :func:`backoff` (so the clients a broker sent away do not all return at once),
    else a :func:`backoff`."""
    if code == 4003:
        return 0.0
    hint = reconnect_hint(reason) if code == 1001 else None
    return backoff(attempt, base, ceiling) + (hint or 0.0)


def refresh_delay(remaining: float) -> float:
    """How long to wait before renewing a token that expires in ``remaining`` seconds: until
    20% of it is left (at least 1 s, at most 30 s ahead), and never less than a second, so
    that skewed clocks cannot make the client renew in a busy loop."""
    return max(1.0, remaining - min(30.0, max(1.0, remaining * 0.2)))


def reconnect_hint(reason: str | None) -> float | None:
    """The delay in seconds a 1001 close reason asks for (``reconnect_after_ms=N``), if any."""
    if not reason:
        return None
    match = _HINT.search(reason)
    return int(match.group(1)) / 1000.0 if match else None
