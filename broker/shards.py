"""Where topic owners keep their sockets and store files, and moving history between layouts.

Theory of operation
-------------------
With ``[server] topic_owner = "workers"`` and ``N`` workers, owner ``i`` (a worker,
:mod:`broker.owner`) serves its shard on the socket :func:`shard_sockets` names beside the
hub's, and keeps its history, with ``[store] path = P``, in its own file: ``P`` with
``.shard<i>of<N>`` put before its suffix (``history.db`` -> ``history.shard0of2.db``). The
hub, or a broker of one worker, keeps ``P`` itself. A file never holds topics of another
owner, so a restarted owner reads only its own.

A start whose layout differs from the files it finds (``P`` from the hub mode or one worker,
or shard files of another ``N``) *reshards* before anything serves (:func:`reshard`, called
by the supervisor): it reads every file it finds into memory, writes each topic, with its
epoch, offsets, gap and held publications, into the file of its new owner, and only then
removes the files it read. Every step leaves the files whole: the new files are written
under a temporary name and renamed into place, and a start interrupted anywhere finds the
old files still there (with, at most, some new ones), so it reshards again to the same
result; a topic found in two files is taken from the one with its latest offset. History is
never dropped for the move: the budgets apply when the owners read their files, as at any
start. Blocking: it runs before the broker's loop, and is logged (``store_resharded``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

import attrs
import structlog

from broker.config import Config, StoreConfig
from broker.history import TopicStore
from broker.journal import PersistedState
from broker.owner import owner_index
from broker.store import DiskJournal

__all__ = ["reshard", "shard_file", "shard_sockets", "shard_store", "store_files"]

log = structlog.get_logger()

_SQLITE_SUFFIXES = ("", "-wal", "-shm")


def shard_file(path: str, index: int, count: int) -> str:
    """The store file of owner ``index`` of ``count`` for ``[store] path``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.shard{index}of{count}{p.suffix}"))


def store_files(path: str, count: int) -> list[str]:
    """The store files of a broker with ``count`` topic owners (0: the hub or one worker)."""
    if count < 2:
        return [path]
    return [shard_file(path, i, count) for i in range(count)]


def shard_store(store: StoreConfig, index: int, count: int) -> StoreConfig:
    """``[store]`` as owner ``index`` of ``count`` uses it (its own file)."""
    if not store.path:
        return store
    return attrs.evolve(store, path=shard_file(store.path, index, count))


def shard_sockets(hub: Path, count: int) -> list[str]:
    """The sockets of ``count`` owners, beside the hub's socket ``hub``."""
    return [str(hub.with_suffix(f".shard{i}.sock")) for i in range(count)]


def _found(path: str) -> list[str]:
    """Every store file of any layout for ``[store] path`` that exists."""
    p = Path(path)
    shard = re.compile(re.escape(p.stem) + r"\.shard\d+of\d+" + re.escape(p.suffix) + "$")
    found = [path] if p.is_file() else []
    if p.parent.is_dir():
        found += sorted(str(f) for f in p.parent.iterdir() if shard.match(f.name))
    return found


def _unlimited(config: Config) -> TopicStore:
    """A store that drops nothing for a budget (the owners apply theirs when they read)."""
    return TopicStore(
        config.history_rule, time.monotonic, max_bytes=sys.maxsize, max_topics=sys.maxsize
    )


def _read(config: Config, path: str) -> list[PersistedState]:
    """Every topic of the store file ``path``, leaving the file as it was (marked clean)."""
    store = _unlimited(config)
    journal = DiskJournal(attrs.evolve(config.store, path=path))
    journal.start(store)
    try:
        return store.persisted_states(store.known_topics(), {}, 0.0)
    finally:
        journal.close(store)


def _write(config: Config, path: str, states: list[PersistedState]) -> None:
    """A new store file ``path`` holding ``states`` (written aside, then renamed)."""
    aside = path + ".resharding"
    _remove(aside)
    store = _unlimited(config)
    for topic, epoch, offset, gap, entries in states:
        store.restore(topic, epoch, offset, gap, [(at, o, s, d) for o, at, s, d in entries])
    journal = DiskJournal(attrs.evolve(config.store, path=aside))
    journal.start(store)  # restored() and the first batch
    for topic in store.known_topics():
        journal.touched(topic)
    journal.close(store)  # everything, marked clean
    for suffix in _SQLITE_SUFFIXES:
        if os.path.exists(aside + suffix):
            os.replace(aside + suffix, path + suffix)


def _remove(path: str) -> None:
    for suffix in _SQLITE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def reshard(config: Config) -> None:
    """Move the history of ``[store] path`` into the files of this start's layout
    (:func:`store_files` of :attr:`Config.owner_count`) when files of another layout exist;
    see the module docstring. Raises :class:`~broker.store.StoreError` when a file cannot be
    read or written (the files then stay as they were)."""
    path = config.store.path
    if not path or config.bus.url:
        return
    count = config.owner_count
    target = store_files(path, count)
    found = _found(path)
    if all(f in target for f in found):
        return
    began = time.monotonic()
    topics: dict[str, PersistedState] = {}
    for source in found:
        for state in _read(config, source):
            old = topics.get(state[0])
            if old is None or state[2] > old[2]:
                topics[state[0]] = state
    shares: list[list[PersistedState]] = [[] for _ in target]
    for state in topics.values():
        shares[owner_index(state[0], len(target)) if count else 0].append(state)
    for file, share in zip(target, shares, strict=True):
        _write(config, file, share)
    for source in found:
        if source not in target:
            _remove(source)
    log.info(
        "store_resharded",
        read=found,
        written=target,
        topics=len(topics),
        entries=sum(len(s[4]) for s in topics.values()),
        seconds=round(time.monotonic() - began, 3),
    )
