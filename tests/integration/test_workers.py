"""Several worker processes on one machine: connections spread over workers, publications
cross them with global offsets, a killed or hung worker is replaced and its clients recover
exactly, SIGTERM drains with a reconnect hint, SIGHUP reloads without dropping anyone."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess, to_toml
from tests.support.clients import call, open_client


def worker_pids(b: BrokerProcess) -> dict[int, int]:
    pids: dict[int, int] = {}
    for e in b.events("worker_started"):
        pids[e["worker"]] = e["pid"]
    return pids


def test_connections_spread_and_publications_cross_workers(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE, workers=2) as b:

        async def main() -> None:
            clients = [await open_client(b, f"c{i}") for i in range(40)]
            by_worker: dict[int, list[ClientConnection]] = {}
            for ws, welcome in clients:
                by_worker.setdefault(welcome["worker"], []).append(ws)
            assert set(by_worker) == {0, 1}, {k: len(v) for k, v in by_worker.items()}
            for ws, _ in clients:
                assert (await call(ws, op="subscribe", topic="room.*", presence=False, id=1))["ok"]
            # Publish from each worker in turn (from connections that are not subscribed, so
            # waiting for a reply drops no message): offsets are global, everyone sees all.
            publishers: dict[int, ClientConnection] = {}
            while len(publishers) < 2:
                ws, welcome = await open_client(b, "publisher")
                if welcome["worker"] in publishers:
                    await ws.close()
                else:
                    publishers[welcome["worker"]] = ws
            for k in range(10):
                reply = await call(
                    publishers[k % 2], op="publish", topic="room.a", data=k, id=f"p{k}"
                )
                assert reply["offset"] == k + 1
            for ws, _ in clients:
                got = []
                while len(got) < 10:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                    if msg.get("op") == "message":
                        got.append(msg["offset"])
                assert got == list(range(1, 11))
            # Presence across workers.
            a, _ = clients[0]
            b0 = by_worker[0][1]
            b1 = by_worker[1][1]
            assert (await call(b0, op="subscribe", topic="lobby", id=2))["ok"]
            assert (await call(b1, op="subscribe", topic="lobby", id=3))["ok"]
            members = (await call(a, op="presence", topic="lobby", id=4))["clients"]
            assert len(members) == 2
            for ws, _ in clients:
                await ws.close()

        asyncio.run(main())


def test_killed_worker_is_replaced_and_clients_recover_every_offset(tmp_path: Path) -> None:
    # History large enough to cover the restart: inside the window nothing may be lost.
    config = {"history": [{"pattern": ">", "size": 10000, "ttl": 600}]}
    with BrokerProcess.start(tmp_path, config, workers=2) as b:
        total = 300
        victim = worker_pids(b)[0]

        async def main() -> tuple[list[int], list[dict[str, Any]]]:
            seen: list[int] = []
            gaps: list[dict[str, Any]] = []

            async def publisher() -> None:
                for k in range(total):
                    while True:
                        try:
                            ws, _ = (
                                await open_client(b, "pub")
                                if k == 0 or pub_ws[0] is None
                                else (pub_ws[0], {})
                            )
                            pub_ws[0] = ws
                            await call(ws, op="publish", topic="stream", data=k, id=k)
                            break
                        except (ConnectionClosed, OSError):
                            pub_ws[0] = None
                            await asyncio.sleep(0.05)
                    if k == total // 3:
                        os.kill(victim, signal.SIGKILL)
                    await asyncio.sleep(0.002)

            pub_ws: list[ClientConnection | None] = [None]

            async def subscriber(name: str) -> None:
                position: dict[str, Any] | None = None
                while True:
                    try:
                        ws, _ = await open_client(b, name)
                        frame: dict[str, Any] = {"op": "subscribe", "topic": "stream", "id": "s"}
                        if position:
                            frame["since"] = position
                        reply = await call(ws, **frame)
                        if position and not reply.get("recovered"):
                            gaps.append(reply)
                        epoch = reply["epoch"]
                        if position is None:
                            position = {"offset": reply["offset"], "epoch": epoch}
                        while True:
                            msg = json.loads(await ws.recv())
                            if msg.get("op") != "message":
                                continue
                            seen.append(msg["offset"])
                            position = {"offset": msg["offset"], "epoch": epoch}
                            if msg["offset"] == total:
                                await ws.close()
                                return
                    except (ConnectionClosed, OSError):
                        await asyncio.sleep(0.05)

            async with asyncio.timeout(60):
                subs = [asyncio.create_task(subscriber(f"s{i}")) for i in range(6)]
                await asyncio.sleep(0.3)
                await publisher()
                await asyncio.gather(*subs)
            return seen, gaps

        seen, gaps = asyncio.run(main())
        assert not gaps
        by_offset: dict[int, int] = {}
        for o in seen:
            by_offset[o] = by_offset.get(o, 0) + 1
        assert set(by_offset) == set(range(1, total + 1))
        assert set(by_offset.values()) == {6}, "each subscriber saw each offset exactly once"
        exited = b.wait_for("worker_exited", timeout=10, worker=0)
        assert exited["pid"] == victim
        assert worker_pids(b)[0] != victim


def test_dead_workers_presence_is_forgotten_at_once(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE, workers=2) as b:

        async def main() -> None:
            watchers = []
            victims = []
            tries = 0
            while not watchers or not victims:
                tries += 1
                name = f"w{tries}"
                ws, welcome = await open_client(b, name)
                if welcome["worker"] == 1 and not watchers:
                    watchers.append(ws)
                elif welcome["worker"] == 0 and not victims:
                    victims.append((ws, name))
                else:
                    await ws.close()
            watcher, (victim, victim_name) = watchers[0], victims[0]
            assert (await call(watcher, op="subscribe", topic="room", presence=True, id=1))["ok"]
            assert (await call(victim, op="subscribe", topic="room", id=1))["ok"]
            # the victim is listed just after its reply (protocol.md section 9): its join says when
            async with asyncio.timeout(5):
                while True:
                    push = json.loads(await watcher.recv())
                    if push.get("op") == "join" and push.get("client") == victim_name:
                        break
            assert len((await call(watcher, op="presence", topic="room", id=2))["clients"]) == 2
            os.kill(worker_pids(b)[0], signal.SIGKILL)
            async with asyncio.timeout(5):
                while True:
                    msg = json.loads(await watcher.recv())
                    if msg.get("op") == "leave":
                        break
            assert len((await call(watcher, op="presence", topic="room", id=3))["clients"]) == 1
            await watcher.close()

        asyncio.run(main())


def test_hung_worker_is_detected_and_replaced(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, {"server": {"worker_hang_timeout": 2.0}}, workers=2) as b:
        victim = worker_pids(b)[1]
        os.kill(victim, signal.SIGSTOP)  # its loop stops: no heartbeat
        hung = b.wait_for("worker_hung", timeout=15, worker=1)
        assert hung["pid"] == victim
        b.wait_for("worker_started", timeout=15, worker=1)
        assert worker_pids(b)[1] != victim


def test_sigterm_drains_with_a_jittered_reconnect_hint(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, {"server": {"shutdown_timeout": 4.0}}, workers=2) as b:

        async def main() -> list[tuple[int, str]]:
            clients = [(await open_client(b, f"c{i}"))[0] for i in range(10)]
            b.signal(signal.SIGTERM)
            closes = []
            for ws in clients:
                try:
                    async with asyncio.timeout(10):
                        while True:
                            await ws.recv()
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    closes.append((exc.rcvd.code, exc.rcvd.reason))
            return closes

        start = time.monotonic()
        closes = asyncio.run(main())
        assert all(code == 1001 for code, _ in closes)
        hints = [
            int(re.search(r"reconnect_after_ms=(\d+)", reason).group(1)) for _, reason in closes
        ]  # type: ignore[union-attr]
        assert len(set(hints)) > 1, "hints are jittered"
        assert b.proc is not None
        assert b.proc.wait(10) == 0
        assert time.monotonic() - start < 4 + 3


def test_sighup_reloads_without_dropping_connections(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, workers=2) as b:

        async def main() -> None:
            ws, _ = await open_client(b, "alice")
            assert (await call(ws, op="subscribe", topic="a", id=1))["ok"]
            # A broken file is refused with a clear log line; the old one stays in force.
            broken = dict(b.config)
            broken["limits"] = {**broken.get("limits", {}), "max_subscriptionz": 1}
            b.config_path.write_text(to_toml(broken))
            b.signal(signal.SIGHUP)
            refused = b.wait_for("reload_refused", timeout=10)
            assert refused["key"] == "limits.max_subscriptionz"
            assert (await call(ws, op="subscribe", topic="b", id=2))["ok"]
            # A good new file applies in every worker, to live connections' next operations.
            config = dict(b.config)
            config["limits"] = {**config.get("limits", {}), "max_subscriptions": 2}
            b.config_path.write_text(to_toml(config))
            b.signal(signal.SIGHUP)
            b.wait_for("reloaded", timeout=10)
            await asyncio.sleep(0.5)
            reply = await call(ws, op="subscribe", topic="c", id=3)
            assert reply["error"]["code"] == "too_many_subscriptions"
            assert (await call(ws, op="ping", id=4))["ok"]
            await ws.close()

        asyncio.run(main())


def test_sighup_replaces_the_http_api_keys(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from tests.support.broker import API_KEY

    def publish(b: BrokerProcess, key: str) -> int:
        req = urllib.request.Request(
            f"{b.http_url}/api/publish",
            data=json.dumps({"topic": "t", "data": 1}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    new_key = "rotated-api-key-0123456789"
    for workers in (1, 2):
        (tmp_path / f"w{workers}").mkdir()
        with BrokerProcess.start(tmp_path / f"w{workers}", workers=workers) as b:
            assert publish(b, API_KEY) == 200
            config = {**b.config, "api": {"keys": [new_key]}}
            b.config_path.write_text(to_toml(config))
            b.signal(signal.SIGHUP)
            b.wait_for("reloaded", timeout=10)
            assert publish(b, API_KEY) == 401
            assert publish(b, new_key) == 200


def test_api_disconnect_reaches_every_worker(tmp_path: Path) -> None:
    import urllib.request

    from tests.support.broker import API_KEY

    with BrokerProcess.start(tmp_path, workers=2) as b:

        async def main() -> list[int]:
            mine: dict[int, ClientConnection] = {}
            others = []
            while len(mine) < 2:
                ws, welcome = await open_client(b, "mallory")
                if welcome["worker"] in mine:
                    others.append(ws)
                else:
                    mine[welcome["worker"]] = ws
            bystander, _ = await open_client(b, "alice")
            req = urllib.request.Request(
                f"{b.http_url}/api/disconnect",
                data=json.dumps({"client": "mallory"}).encode(),
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )

            def post() -> dict[str, Any]:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return json.loads(resp.read())  # type: ignore[no-any-return]

            closed = await asyncio.to_thread(post)
            assert closed["closed"] == 2 + len(others), closed
            codes = []
            for ws in [*mine.values(), *others]:
                try:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    codes.append(exc.rcvd.code)
            assert (await call(bystander, op="ping", id=1))["ok"]
            await bystander.close()
            return codes

        assert set(asyncio.run(main())) == {1008}


def test_replies_keep_request_order_with_pipelined_publishes(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, workers=2) as b:

        async def main() -> list[Any]:
            ws, _ = await open_client(b, "orderly")
            frames: list[dict[str, Any]] = []
            for i in range(200):
                frames.append({"op": "publish", "topic": "t", "data": i, "id": i})
                if i % 7 == 0:
                    frames.append({"op": "ping", "id": f"p{i}"})
                if i % 11 == 0:
                    frames.append(
                        {"op": "publish", "topic": "bad..topic", "data": i, "id": f"e{i}"}
                    )
            for frame in frames:
                await ws.send(json.dumps(frame))
            ids = []
            while len(ids) < len(frames):
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if "ok" in msg:
                    ids.append(msg["id"])
            await ws.close()
            return [ids, [f["id"] for f in frames]]

        got, sent = asyncio.run(main())
        assert got == sent


def test_a_second_broker_on_the_same_port_is_refused(tmp_path: Path) -> None:
    # Workers share their port with SO_REUSEPORT, which would also let a second
    # multi-worker broker join the group silently and take half the connections.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with BrokerProcess.start(tmp_path / "a", workers=2) as first:
        second = BrokerProcess(tmp_path / "b", first.config, 2, None)
        try:
            with pytest.raises(RuntimeError, match="exited with 3"):
                second._spawn(port=first.port)
            [failed] = second.events("listen_failed")
            assert "in use" in failed["problem"] and failed["key"] == "server.listen"
        finally:
            second.stop()
        assert first.proc is not None and first.proc.poll() is None
