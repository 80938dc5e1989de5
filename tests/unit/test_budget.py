"""The token bucket of :mod:`broker.budget`, on trio's autojump clock: hours of refill in no
time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.budget import TokenBucket
from broker.config import DEFAULT_HISTORY, parse_config
from broker.errors import ConfigError

# A message push's envelope around its data: op, topic (up to 255 bytes), offset, epoch, from.
ENVELOPE = 400


async def test_starts_full_and_take_spends_one_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=1.0, burst=3, now=trio.current_time())
    assert [bucket.take(trio.current_time()) for _ in range(4)] == [True, True, True, False]
    await trio.sleep(1.0)
    assert bucket.take(trio.current_time())
    assert not bucket.take(trio.current_time())


async def test_refill_is_capped_at_the_burst_after_a_long_idle_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=1000.0, burst=5000, now=trio.current_time())
    bucket.charge(5000)
    await trio.sleep(24 * 3600)  # a day idle would be 86 million bytes uncapped
    assert bucket.has_credit(trio.current_time())
    assert bucket.tokens == 5000
    bucket.charge(5000)
    assert not bucket.has_credit(trio.current_time())


async def test_a_charge_may_overdraw_and_the_debt_is_paid_by_the_refill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=100.0, burst=1000, now=trio.current_time())
    assert bucket.has_credit(trio.current_time())
    bucket.charge(3000)  # one large reply: allowed, then charged in full
    assert not bucket.has_credit(trio.current_time())
    await trio.sleep(19.9)  # 1990 of the 2000 owed
    assert not bucket.has_credit(trio.current_time())
    await trio.sleep(0.2)
    assert bucket.has_credit(trio.current_time())


def test_read_budget_keys_are_checked_and_the_default_burst_holds_a_history_window() -> None:
    secret = {"auth": {"jwt_secret": "k" * 40}}
    for key in ("read_rate_bytes", "read_burst_bytes"):
        for bad in (0, -1, 1.5, "1"):
            with pytest.raises(ConfigError) as info:
                parse_config({**secret, "limits": {key: bad}}, env={})
            assert info.value.key == f"limits.{key}"
    cfg = parse_config(secret, env={})
    window = DEFAULT_HISTORY.size * (cfg.limits.max_data_size + ENVELOPE)
    assert cfg.limits.read_burst_bytes >= window
