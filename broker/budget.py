"""Token buckets: what a connection may spend per second, with some saved up for a burst.

Theory of operation
-------------------
A bucket holds at most ``burst`` tokens, starts full and refills at ``rate`` tokens per second
of trio's clock. It is refilled lazily, when it is asked (the time since the last question
times ``rate``, capped at ``burst``), so an idle bucket costs nothing and no timer runs for it.

Two ways to spend:

* :meth:`TokenBucket.take` spends one token if there is one: a cost known in advance (one
  publication).
* :meth:`TokenBucket.has_credit` then :meth:`TokenBucket.charge`: a cost known only once the
  work is done (the bytes of a ``history`` reply, which depend on what the bus still holds).
  The request is allowed while the bucket is above zero; its real cost is then charged, which
  may overdraw the bucket. A client that overdraws waits until the refill has paid the debt:
  over any period it gets no more than ``burst`` plus ``rate`` times the period, plus at most
  one request's worth.

Nothing here does I/O or reads a clock itself: the caller passes ``now``.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up, full at ``now``."""

    # Slots: one or two per connection, and a worker holds tens of thousands.
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        # Capped at the burst: a long idle time saves up no more than a full bucket.
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if one is there; False (nothing spent) if not."""
        # _refill inlined (and its min): once per publication.
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def has_credit(self, now: float) -> bool:
        """True while the bucket holds anything (a debt left by :meth:`charge` is paid off)."""
        self._refill(now)
        return self.tokens > 0.0

    def charge(self, amount: float) -> None:
        """Spend ``amount`` after the fact; the bucket may go below zero (a debt)."""
        self.tokens -= amount
