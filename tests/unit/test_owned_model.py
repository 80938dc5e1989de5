"""Topics owned by workers, as a property: any sequence of publish, watch, unwatch and an
owner's kill and restart, run on three in-process workers (each a
:class:`~broker.owner.TopicOwner` and a :class:`~broker.bus.sharded.ShardedBus`, linked by
memory streams, on trio's autojump clock), against a model of what must happen:

- each topic has one offset sequence: 1, 2, 3... in an epoch, whoever publishes, and a new
  epoch from 1 once its owner restarted (history in memory);
- every worker gets each publication of a topic it watches exactly once, in offset order,
  and nothing it does not watch (a restarted owner is told the watches again);
- recovery is exact: history after any position names what follows it, or says that the
  position's epoch is gone.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.bus.base import BusHandlers, Publication, StreamPosition
from broker.bus.sharded import ShardedBus
from broker.config import DEFAULT_HISTORY
from broker.owner import TopicOwner, owner_index
from broker.topics import pattern_matches

WORKERS = 3
# Few topics, one owned by each worker (and a pattern over two): short sequences then often
# watch a topic, restart its owner and publish to it again.
TOPICS = ["a.x", "a.y", "b.y"]
PATTERNS = [*TOPICS, "a.*", ">"]
assert sorted(owner_index(t, WORKERS) for t in TOPICS) == list(range(WORKERS))


@attrs.define
class Worker:
    """One worker of the model: its owner, its bus, and what its router was handed."""

    index: int
    owner: TopicOwner
    bus: ShardedBus
    got: list[Publication] = attrs.Factory(list)
    watching: set[str] = attrs.Factory(set)
    nursery: trio.Nursery | None = None
    scope: trio.CancelScope | None = None


class Machine:
    """Three workers whose owners are reached through memory streams."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.workers: list[Worker | None] = [None] * WORKERS

    async def connect(self, index: int) -> trio.abc.Stream:
        worker = self.workers[index]
        if worker is None or worker.nursery is None:
            raise OSError("not listening")
        ours, theirs = trio.testing.memory_stream_pair()
        worker.nursery.start_soon(worker.owner.handle, theirs)
        return ours

    async def start(self, index: int) -> None:
        owner = TopicOwner(lambda topic: DEFAULT_HISTORY)
        got: list[Publication] = []
        bus = ShardedBus(
            BusHandlers(got.append, lambda event: None),
            paths=[str(i) for i in range(WORKERS)],
            index=index,
            node="model",
            owner=owner,
            wait_for_peers=False,
            connect=self.connect,
        )
        worker = Worker(index, owner, bus, got)

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                worker.scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(bus.run)
                    worker.nursery = nursery
                    task_status.started()

        await self.nursery.start(run)
        self.workers[index] = worker

    def kill(self, index: int) -> None:
        worker = self.workers[index]
        assert worker is not None and worker.scope is not None
        worker.nursery = None  # refuses connections from now on
        worker.scope.cancel()
        self.workers[index] = None

    async def settle(self) -> None:
        """Until every link is up and nothing moves (the clock jumps over the backoffs)."""
        for _ in range(1000):  # a few backoffs of the clock's time, at most
            if all(w is not None and w.bus.is_up for w in self.workers):
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("a link never came back")
        await trio.sleep(1)

    def worker(self, index: int) -> Worker:
        worker = self.workers[index]
        assert worker is not None
        return worker


worker = st.integers(0, WORKERS - 1)
step = st.one_of(
    st.tuples(st.just("publish"), worker, st.sampled_from(TOPICS)),
    st.tuples(st.just("watch"), worker, st.sampled_from(PATTERNS)),
    st.tuples(st.just("unwatch"), worker, st.sampled_from(PATTERNS)),
    st.tuples(st.just("kill"), worker),
    st.tuples(st.just("burst"), worker, st.lists(st.sampled_from(TOPICS), min_size=2, max_size=6)),
)


async def play(steps: list[tuple[Any, ...]]) -> None:
    # The model: per topic, its epochs' publications in order; per worker, what it must get.
    published: dict[str, list[Publication]] = {t: [] for t in TOPICS}
    # The epoch a topic's next publication continues (None: it starts one, at offset 1).
    live: dict[str, str | None] = dict.fromkeys(TOPICS)
    expected: list[list[Publication]] = [[] for _ in range(WORKERS)]
    async with trio.open_nursery() as nursery:
        machine = Machine(nursery)
        for i in range(WORKERS):
            await machine.start(i)
        await machine.settle()

        def record(pub: Publication | BaseException) -> None:
            """Check a publication's offset against the model, and who must get it."""
            assert isinstance(pub, Publication), pub
            topic = pub.topic
            before = published[topic]
            if live[topic] is not None:
                assert (pub.epoch, pub.offset) == (live[topic], before[-1].offset + 1)
            else:  # a topic's first, or the first after its owner restarted
                assert pub.offset == 1, pub
                assert all(p.epoch != pub.epoch for p in before)
            live[topic] = pub.epoch
            before.append(pub)
            for w in machine.workers:
                assert w is not None
                if any(pattern_matches(p, topic) for p in w.watching):
                    expected[w.index].append(pub)

        def answered(
            answers: list[tuple[int, Publication | BaseException]],
            k: int,
            result: Publication | BaseException,
        ) -> None:
            answers.append((k, result))

        for n, (kind, index, *rest) in enumerate(steps):
            worker = machine.worker(index)
            if kind == "burst":  # published without waiting: answered in the order made
                answers: list[tuple[int, Publication | BaseException]] = []
                for k, topic in enumerate(rest[0]):
                    worker.bus.publish_nowait(
                        topic, f'"{n}.{k}"', None, functools.partial(answered, answers, k)
                    )
                await machine.settle()
                assert [k for k, _ in answers] == list(range(len(rest[0])))
                for _, pub in answers:
                    record(pub)
            elif kind == "publish":
                record(await worker.bus.publish(rest[0], f'"{n}"', f"w{index}"))
            elif kind == "watch" and rest[0] not in worker.watching:
                await worker.bus.watch(rest[0])
                worker.watching.add(rest[0])
            elif kind == "unwatch" and rest[0] in worker.watching:
                await worker.bus.unwatch(rest[0])
                worker.watching.discard(rest[0])
            elif kind == "kill":
                machine.kill(index)
                await machine.start(index)
                expected[index] = []
                # Its topics start a new epoch; its own watches went with it.
                for topic in TOPICS:
                    if owner_index(topic, WORKERS) == index:
                        live[topic] = None
            await machine.settle()
            for w in machine.workers:
                assert w is not None
                # Per topic, in offset order (topics have no order among themselves).
                for topic in TOPICS:
                    got = [p for p in w.got if p.topic == topic]
                    assert got == [p for p in expected[w.index] if p.topic == topic], (w.index, n)
        # Recovery from every position ever published: exact in the current epoch, and
        # "gone" from an epoch an owner's restart ended.
        reader = machine.worker(0).bus
        for topic, pubs in published.items():
            current = [p for p in pubs if p.epoch == live[topic]]
            for p in pubs:
                since = StreamPosition(p.offset - 1, p.epoch)
                result = await reader.history(topic, since, None)
                if p.epoch == live[topic]:
                    assert result.recovered and result.missed is None
                    assert list(result.publications) == [q for q in current if q.offset >= p.offset]
                else:
                    assert not result.recovered and result.missed == (1, 0)
                    assert list(result.publications) == current
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
# A watch, its topic's owner restarted, a publication from elsewhere and from the watcher.
@example([("watch", 1, "a.x"), ("kill", 0), ("publish", 2, "a.x"), ("publish", 1, "a.x")])
@example([("watch", 2, ">"), ("publish", 0, "a.y"), ("kill", 2), ("watch", 2, "a.*"), ("kill", 1)])
def test_owned_topics_behave_like_the_model(steps: list[tuple[Any, ...]]) -> None:
    trio.run(play, steps, clock=trio.testing.MockClock(autojump_threshold=0))
