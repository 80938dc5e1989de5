"""Store files of topic owners (broker.shards): each owner's file holds its topics only, and a
start with another layout moves every topic, with its epoch, offsets, gap and history, into
the files of the new one, also when a previous move was interrupted."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import attrs

from broker.config import Config, parse_config
from broker.history import TopicStore
from broker.owner import owner_index
from broker.shards import reshard, shard_file, store_files
from broker.store import DiskJournal

SECRET = {"auth": {"jwt_secret": "k" * 40}}
TOPICS = [f"t.{i}" for i in range(20)]


def config(path: Path, workers: int, owner: str) -> Config:
    raw: dict[str, Any] = {
        **SECRET,
        "server": {"workers": workers, "topic_owner": owner},
        "store": {"path": str(path)},
    }
    return parse_config(raw, env={})


def store_for(cfg: Config) -> TopicStore:
    return TopicStore(cfg.history_rule, time.monotonic)


def write(cfg: Config, file: str, topics: list[str], count: int) -> None:
    """``count`` publications to each of ``topics``, in ``file``, closed cleanly."""
    store = store_for(cfg)
    journal = DiskJournal(attrs.evolve(cfg.store, path=file))
    journal.start(store)
    for topic in topics:
        for k in range(count):
            store.publish(topic, f'"{topic}/{k}"', "p")
    journal.close(store)


def read(cfg: Config, file: str) -> dict[str, tuple[str, int, list[str]]]:
    """Every topic of ``file``: its epoch, offset and held data."""
    store = store_for(cfg)
    journal = DiskJournal(attrs.evolve(cfg.store, path=file))
    journal.start(store)
    try:
        return {
            topic: (epoch, offset, [e[3] for e in entries])
            for topic, epoch, offset, _, entries in store.persisted_states(
                store.known_topics(), {}, 0.0
            )
        }
    finally:
        journal.close(store)


def test_shard_files_are_named_beside_the_path() -> None:
    assert shard_file("/var/lib/b/history.db", 1, 4) == "/var/lib/b/history.shard1of4.db"
    assert store_files("/x/h.db", 0) == ["/x/h.db"]
    assert store_files("/x/h.db", 2) == ["/x/h.shard0of2.db", "/x/h.shard1of2.db"]


def test_history_moves_to_the_owners_files_and_back(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    hub = config(path, 2, "hub")
    write(hub, str(path), TOPICS, 3)
    before = read(hub, str(path))
    owned = config(path, 2, "workers")
    reshard(owned)
    assert sorted(tmp_path.glob("history*.db")) == [Path(f) for f in store_files(str(path), 2)]
    for i, file in enumerate(store_files(str(path), 2)):
        held = read(owned, file)
        assert set(held) == {t for t in TOPICS if owner_index(t, 2) == i}
        assert held == {t: before[t] for t in held}
    # Three owners, then the hub again: nothing lost, nothing left behind.
    reshard(config(path, 3, "workers"))
    assert len(list(tmp_path.glob("history*.db"))) == 3
    reshard(hub)
    assert [f.name for f in tmp_path.glob("history*.db")] == ["history.db"]
    assert read(hub, str(path)) == before


def test_an_interrupted_move_is_done_again_to_the_same_result(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    hub = config(path, 2, "hub")
    write(hub, str(path), TOPICS, 2)
    before = read(hub, str(path))
    kept = tmp_path / "kept.db"
    shutil.copy(path, kept)
    owned = config(path, 2, "workers")
    reshard(owned)
    # As if the start had stopped before removing the old file: both layouts are there.
    shutil.copy(kept, path)
    reshard(owned)
    assert not path.exists()
    merged: dict[str, tuple[str, int, list[str]]] = {}
    for file in store_files(str(path), 2):
        merged.update(read(owned, file))
    assert merged == before


def test_a_topic_in_two_files_is_taken_from_the_one_that_went_further(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    hub = config(path, 2, "hub")
    write(hub, str(path), ["x"], 2)
    owned = config(path, 2, "workers")
    write(owned, shard_file(str(path), owner_index("x", 2), 2), ["x"], 5)
    reshard(owned)
    found = [read(owned, f) for f in store_files(str(path), 2)]
    (held,) = [topics["x"] for topics in found if "x" in topics]
    assert held[1] == 5 and len(held[2]) == 5
