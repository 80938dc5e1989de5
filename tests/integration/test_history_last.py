"""``history`` with ``last`` against the real broker, with one worker and with two (where the
supervisor's hub holds the history): the newest N after ``since``, what ``missed`` names of
them, refused values, and the same through the HTTP API and both Python clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client_sdk
import client_sdk.sync
from client_sdk import BadRequest, Position
from tests.http.brokerkit import http, request, ws_client
from tests.integration.test_history_budget import publish_all
from tests.support.broker import BrokerProcess

#: Eight publications on "t" with a window of five: offsets 4..8 are held, 1..3 are gone.
CONFIG = {"history": [{"pattern": ">", "size": 5, "ttl": 600}]}


@pytest.fixture
def held(tmp_path: Path, workers: int) -> Iterator[tuple[BrokerProcess, str]]:
    """A broker whose topic ``t`` holds offsets 4..8 of its epoch, and that epoch."""
    with BrokerProcess.start(tmp_path, CONFIG, workers=workers) as b, ws_client(b, "pub") as pub:
        replies = publish_all(pub, [{"topic": "t", "data": i} for i in range(1, 9)])
        yield b, replies[0]["epoch"]


def offsets(reply: dict[str, Any]) -> list[int]:
    return [m["offset"] for m in reply["messages"]]


def test_last_reads_the_newest_and_misses_only_what_it_asked_for(
    held: tuple[BrokerProcess, str],
) -> None:
    b, epoch = held
    with ws_client(b, "reader") as c:
        latest = request(c, op="history", id=1, topic="t", last=3)
        assert latest["ok"] and offsets(latest) == [6, 7, 8]
        assert (latest["offset"], latest["epoch"]) == (8, epoch)
        assert "recovered" not in latest and "missed" not in latest
        # Offsets 2 and 3 are gone but older than the newest five: skipped by choice.
        chosen = request(
            c, op="history", id=2, topic="t", last=5, since={"offset": 1, "epoch": epoch}
        )
        assert offsets(chosen) == [4, 5, 6, 7, 8] and chosen["recovered"] is True
        assert "missed" not in chosen
        lost = request(
            c, op="history", id=3, topic="t", last=6, since={"offset": 1, "epoch": epoch}
        )
        assert offsets(lost) == [4, 5, 6, 7, 8]
        assert lost["recovered"] is False and lost["missed"] == {"from": 3, "to": 3}
        after = request(
            c, op="history", id=4, topic="t", last=10, since={"offset": 6, "epoch": epoch}
        )
        assert offsets(after) == [7, 8] and after["recovered"] is True
        other = request(c, op="history", id=5, topic="t", last=2, since={"offset": 0, "epoch": "x"})
        assert offsets(other) == [7, 8] and other["recovered"] is False
        assert other["missed"] == {"from": 7, "to": 6}  # nothing asked for is gone
        nothing = request(c, op="history", id=6, topic="never.published", last=3)
        assert nothing["ok"] and nothing["messages"] == [] and nothing["offset"] == 0


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"last": 0}, "'last' must be 1 to 1000"),
        ({"last": -1}, "'last' must be 1 to 1000"),
        ({"last": 1001}, "'last' must be 1 to 1000"),
        ({"last": "3"}, "'last' must be an integer"),
        ({"last": 1.5}, "'last' must be an integer"),
        ({"last": 3, "limit": 3}, "exclude each other"),
    ],
)
def test_bad_last_is_a_clear_error_and_the_connection_lives_on(
    any_broker: BrokerProcess, fields: dict[str, Any], fragment: str
) -> None:
    with ws_client(any_broker, "reader") as c:
        reply = request(c, op="history", id=7, topic="t", **fields)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        assert fragment in reply["error"]["message"]
        assert request(c, op="ping", id=8)["ok"]


def test_the_http_api_reads_the_newest(held: tuple[BrokerProcess, str]) -> None:
    b, epoch = held
    status, _, body = http(b, "GET", f"/api/history?topic=t&last=2&since=5&epoch={epoch}")
    reply = json.loads(body)
    assert status == 200 and offsets(reply) == [7, 8] and reply["recovered"] is True
    status, _, body = http(b, "GET", "/api/history?topic=t&last=2&limit=2")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"


async def test_the_async_client_reads_the_newest(held: tuple[BrokerProcess, str]) -> None:
    b, epoch = held
    async with client_sdk.connect(b.url, token=b.token("alice")) as client:
        latest = await client.history("t", last=2)
        assert [m.data for m in latest.messages] == [7, 8] and latest.recovered is None
        lost = await client.history("t", since=Position(1), last=6)  # the current epoch
        assert [m.offset for m in lost.messages] == [4, 5, 6, 7, 8]
        assert (lost.recovered, lost.missed, lost.epoch) == (False, (3, 3), epoch)
        with pytest.raises(ValueError, match="not both"):
            await client.history("t", limit=2, last=2)


def test_the_blocking_client_reads_the_newest(held: tuple[BrokerProcess, str]) -> None:
    b, _ = held
    with client_sdk.sync.connect(b.url, token=b.token("alice")) as client:
        assert [m.offset for m in client.history("t", last=1).messages] == [8]
        with pytest.raises(BadRequest):
            client.history("t", last=1001)
