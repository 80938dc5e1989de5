"""History on disk, from outside: a broker stopped (SIGTERM) or killed (SIGKILL of the
process that holds history) under a steady stream of publications, started again on the same
store, and subscribers that count every offset and resume with ``since``.

After a graceful stop they get every offset exactly once, in the same epoch, with no gap. After
a kill they get every offset or are told exactly which are gone (``missed``); never silence,
and never one offset with two contents."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import WebSocketException

from tests.support.broker import DEFAULT_CONFIG, BrokerProcess, merge, to_toml
from tests.support.clients import call, open_client

TOPIC = "stream"


def store_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "history": [{"pattern": ">", "size": 100000, "ttl": 600}],
        "store": {"path": str(tmp_path / "history.db"), "flush_interval": 0.1},
    }


class Subscriber:
    """Follows the topic across restarts: every (epoch, offset) it got, with its data, and
    every ``missed`` range it was told about."""

    def __init__(self, b: BrokerProcess, name: str) -> None:
        self.b = b
        self.name = name
        self.got: dict[tuple[str, int], Any] = {}
        self.twice: list[tuple[str, int]] = []
        self.missed: list[tuple[str, int, int]] = []
        self.epochs: list[str] = []
        self.first: int | None = None
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        position: dict[str, Any] | None = None
        while True:
            try:
                ws, _ = await open_client(self.b, self.name)
                frame: dict[str, Any] = {"op": "subscribe", "topic": TOPIC, "id": "s"}
                if position is not None:
                    frame["since"] = position
                reply = await call(ws, **frame)
                if not reply["ok"]:  # unavailable: the topic's owner is restarting
                    await ws.close()
                    await asyncio.sleep(0.1)
                    continue
                epoch = reply["epoch"]
                self.epochs.append(epoch)
                if position is None:
                    self.first = reply["offset"] + 1
                    self.subscribed.set()
                elif not reply["recovered"]:
                    self.missed.append((epoch, reply["missed"]["from"], reply["missed"]["to"]))
                position = {
                    "offset": position["offset"] if position else reply["offset"],
                    "epoch": epoch,
                }
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("op") != "message":
                        continue
                    key = (msg["epoch"], msg["offset"])
                    if key in self.got:
                        self.twice.append(key)
                    self.got[key] = msg["data"]
                    position = {"offset": msg["offset"], "epoch": msg["epoch"]}
                    if msg["data"] == "end":
                        await ws.close()
                        return
            except (WebSocketException, OSError):
                await asyncio.sleep(0.1)


class Publisher:
    """Publishes ``0, 1, 2, ...`` at a steady pace; remembers what each acknowledged offset
    carries."""

    def __init__(self, b: BrokerProcess) -> None:
        self.b = b
        self.acked: dict[tuple[str, int], Any] = {}
        self.k = 0

    async def publish(self, count: int, data: Any = None) -> None:
        sent = 0
        while sent < count:
            try:
                ws, _ = await open_client(self.b, "publisher")
                while sent < count:
                    value = self.k if data is None else data
                    reply = await call(ws, op="publish", topic=TOPIC, data=value, id=self.k)
                    self.k += 1
                    if reply["ok"]:
                        self.acked[(reply["epoch"], reply["offset"])] = value
                        sent += 1
                    await asyncio.sleep(0.003)
                await ws.close()
            except (WebSocketException, OSError):
                await asyncio.sleep(0.1)


def run_stream(b: BrokerProcess, *, kill: bool) -> tuple[list[Subscriber], Publisher]:
    """Stream, restart (or kill and start) the broker mid-stream, stream on, end."""

    async def main() -> tuple[list[Subscriber], Publisher]:
        subs = [Subscriber(b, f"s{i}") for i in range(3)]
        pub = Publisher(b)
        async with asyncio.timeout(120):
            tasks = [asyncio.create_task(s.run()) for s in subs]
            for s in subs:
                await s.subscribed.wait()
            await pub.publish(200)
            await asyncio.to_thread(b.restart, kill=kill)
            await pub.publish(200)
            await pub.publish(1, data="end")
            await asyncio.gather(*tasks)
        return subs, pub

    return asyncio.run(main())


def check_no_offset_has_two_contents(subs: list[Subscriber], pub: Publisher) -> None:
    for s in subs:
        assert not s.twice, f"{s.name} got {s.twice[:5]} twice"
        for key, data in s.got.items():
            if key in pub.acked:
                assert pub.acked[key] == data, (s.name, key)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_graceful_restart_keeps_epoch_and_history_exactly(tmp_path: Path, workers: int) -> None:
    with BrokerProcess.start(tmp_path, store_config(tmp_path), workers=workers) as b:
        subs, pub = run_stream(b, kill=False)
        assert b.events("store_closed") and b.events("store_loaded")[-1]["clean"] is True
    check_no_offset_has_two_contents(subs, pub)
    epochs = {e for e, _ in pub.acked}
    assert len(epochs) == 1
    (epoch,) = epochs
    last = max(o for _, o in pub.acked)
    for s in subs:
        assert set(s.epochs) == {epoch} and not s.missed, (s.name, s.epochs, s.missed)
        assert s.first is not None
        assert sorted(o for _, o in s.got) == list(range(s.first, last + 1)), s.name


@pytest.mark.parametrize("workers", [1, 2])
def test_a_kill_loses_at_most_what_was_not_flushed_and_says_which(
    tmp_path: Path, workers: int
) -> None:
    with BrokerProcess.start(tmp_path, store_config(tmp_path), workers=workers) as b:
        subs, pub = run_stream(b, kill=True)
        assert b.events("store_loaded")[-1]["clean"] is False
    check_no_offset_has_two_contents(subs, pub)
    epochs = {e for e, _ in pub.acked}
    assert len(epochs) == 1, "the topic was on disk: it keeps its epoch"
    (epoch,) = epochs
    last = max(o for _, o in pub.acked)
    for s in subs:
        assert s.first is not None
        told = {o for e, lo, hi in s.missed if e == epoch for o in range(lo, hi + 1)}
        got = {o for e, o in s.got if e == epoch}
        silent = set(range(s.first, last + 1)) - got - told
        assert not silent, f"{s.name} lost {sorted(silent)[:10]} silently"
        # What the kill lost is the last flush interval's (at 3 ms a publication, a few
        # dozen), plus offsets reserved and never used; what was delivered and saved stays.
        assert len(got) >= 350, (s.name, len(got))


def test_a_damaged_store_is_replaced_once_and_the_broker_serves(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    (tmp_path / "history.db").write_bytes(b"not a database at all" * 200)
    with BrokerProcess.start(tmp_path, config) as b:

        async def main() -> None:
            ws, _ = await open_client(b, "p")
            assert (await call(ws, op="publish", topic=TOPIC, data=1, id=1))["ok"]
            await ws.close()

        asyncio.run(main())
        assert len(b.events("store_corrupt")) == 1
    assert list(tmp_path.glob("history.db.corrupt-*"))


def test_a_store_another_broker_holds_is_a_start_error(tmp_path: Path) -> None:
    config = store_config(tmp_path)
    with BrokerProcess.start(tmp_path, config):
        second = tmp_path / "second"
        second.mkdir()
        path = second / "broker.toml"
        path.write_text(to_toml(merge(DEFAULT_CONFIG, config)))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(path),
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "store_unusable" in proc.stderr and "history.db" in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_with_ack_on_disk_what_was_acknowledged_survives_a_kill(
    tmp_path: Path, workers: int
) -> None:
    # A long flush interval: acknowledged in memory, these would all be lost to the kill.
    config = merge(store_config(tmp_path), {"store": {"ack": "disk", "flush_interval": 0.5}})
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:

        async def publish() -> list[tuple[str, int]]:
            ws, _ = await open_client(b, "p")
            for k in range(30):
                await ws.send(json.dumps({"op": "publish", "topic": TOPIC, "data": k, "id": k}))
            acked = []
            while len(acked) < 30:
                reply = json.loads(await ws.recv())
                assert reply.get("ok"), reply
                acked.append((reply["epoch"], reply["offset"]))
            b.kill()  # at once: nothing more is written
            return acked

        async def read(**how: Any) -> tuple[str, list[tuple[int, Any]]]:
            ws, _ = await open_client(b, "r")
            reply = await call(ws, op="history", topic=TOPIC, id="h", **how)
            held = [(m["offset"], m["data"]) for m in reply["messages"]]
            await ws.close()
            return reply["epoch"], held

        acked = asyncio.run(publish())
        b.restart(kill=True)
        # The newest 30 in one read, and the oldest first: read in pages, the reply runs up
        # to the gap the kill's reserved offsets leave, and holds every acknowledged one.
        newest = asyncio.run(read(last=30))
        oldest = asyncio.run(read())
    expected = [(o, k) for k, (_, o) in enumerate(acked)]
    assert newest == oldest == (acked[0][0], expected)
