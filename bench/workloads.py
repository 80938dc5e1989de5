"""The benchmark workloads, each against one running server with the same load generator.

Every function takes a started :class:`~bench.servers.Server` and the name of its protocol
adapter, and returns a plain dict of figures (JSON-ready). CPU figures are utime + stime of the
server's whole process tree over the measured window, divided by what was delivered.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.loadgen import Generator, machine_busy_seconds
from bench.servers import Server, make_tokens

__all__ = [
    "connect_rate",
    "fanout",
    "idle_connections",
    "latency",
    "many_topics",
    "meminfo_kib",
    "publish_only",
    "tokens_for",
    "wildcard_topics",
]

HOST = "127.0.0.1"


def tokens_for(server: Server, count: int) -> list[str]:
    if server.tokens:
        return server.tokens
    if server.secret:
        return make_tokens(server.secret, count)
    return [""]


def _connect(
    gen: Generator,
    server: Server,
    count: int,
    topics: list[list[str]] | None,
    publishers: int = 1,
) -> None:
    tokens = tokens_for(server, count + publishers)
    for i in range(publishers):  # a peer with one shared token gets it for each
        gen.connect_publisher(tokens[(count + i) % len(tokens)])
    _subscribe(gen, count, tokens, topics)


def _subscribe(
    gen: Generator,
    count: int,
    tokens: list[str],
    topics: list[list[str]] | None,
    agents: list[int] | None = None,
) -> None:
    """Open ``count`` subscribers (on ``agents``, by default all); raise unless all are in."""
    r = gen.connect_subscribers(count, tokens, topics, agents=agents)
    if r["ok"] != count:
        raise RuntimeError(f"{r['ok']} of {count} subscribers connected: {r['errors']}")


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def latency_ms(sorted_us: list[int]) -> dict[str, float | None]:
    """p50, p99 and max of latencies in microseconds (sorted), in milliseconds."""
    return {
        "p50_ms": round(_percentile(sorted_us, 0.50) / 1000, 3),
        "p99_ms": round(_percentile(sorted_us, 0.99) / 1000, 3),
        "max_ms": round(sorted_us[-1] / 1000, 3) if sorted_us else None,
    }


def _measure(
    gen: Generator, server: Server, job: dict[str, Any], expected_per_pub: int
) -> dict[str, Any]:
    """Run one publisher job on agent 0 and measure deliveries and CPU over it."""
    pids = server.pids()
    c0, g0, r0 = server.cpu_seconds(pids), gen.cpu_seconds(), gen.received()
    io0 = server.syscalls(pids)
    m0 = machine_busy_seconds()
    t0 = time.monotonic()
    reply = gen.call(0, timeout=job["duration"] + 60, **job)
    # let what is still in flight arrive, so the CPU it cost is matched by its deliveries
    deadline = time.monotonic() + 2.0
    target = r0 + reply["published"] * expected_per_pub
    t_pub = time.monotonic()
    while gen.received() < target and time.monotonic() < deadline:
        time.sleep(0.005)
    t1 = time.monotonic()
    c1, g1, r1 = server.cpu_seconds(pids), gen.cpu_seconds(), gen.received()
    io1 = server.syscalls(pids)
    m1 = machine_busy_seconds()
    writes = io1["syscw"] - io0["syscw"]
    delivered = r1 - r0
    elapsed = t1 - t0
    return {
        "published": reply["published"],
        "delivered": delivered,
        "expected": reply["published"] * expected_per_pub,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(delivered / elapsed),
        "server_cpu_s": round(c1 - c0, 3),
        "server_cpu_pct": round(100 * (c1 - c0) / elapsed, 1),
        "cpu_us_per_delivery": round(1e6 * (c1 - c0) / delivered, 3) if delivered else None,
        "loadgen_cpu_us_per_delivery": round(1e6 * (g1 - g0) / delivered, 3) if delivered else None,
        "loadgen_cpu_pct": round(100 * (g1 - g0) / elapsed, 1),
        "server_processes": len(pids),
        # CPU used by anything else on the machine meanwhile: other than 0 means noise
        "other_cpu_pct": round(100 * ((m1 - m0) - (c1 - c0) - (g1 - g0)) / elapsed, 1),
        "drain_s": round(t1 - t_pub, 3),
        # the coalescing the send path achieves: deliveries per write system call
        "deliveries_per_write": round(delivered / writes, 2) if writes else None,
    }


def _burst_job(
    topics: list[str], burst: int, fanout: int, window: int, size: int, own: bool = False
) -> dict[str, Any]:
    return {
        "kind": "burst",
        "topics": topics,
        "burst": burst,
        "fanout": fanout,
        "window": window,
        "size": size,
        "own": own,
    }


def _closed_loop(
    gen: Generator,
    server: Server,
    job: dict[str, Any],
    pace: float,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Pace the subscriber agents, warm up, then measure one closed-loop publisher run."""
    gen.call_all(gen.subscriber_agents, kind="pace", seconds=pace)
    gen.call(0, timeout=warmup + 60, duration=warmup, **job)
    return _measure(gen, server, {**job, "duration": duration}, job["fanout"])


PROMPT_KEYS = (
    "deliveries_per_s",
    "cpu_us_per_delivery",
    "deliveries_per_write",
    "loadgen_cpu_us_per_delivery",
)


def fanout(
    server: Server,
    adapter: str,
    subscribers: int = 1000,
    burst: int = 20,
    duration: float = 6.0,
    warmup: float = 1.5,
    size: int = 64,
    sub_procs: int = 1,
    pace: float = 0.005,
    prompt: bool = True,
) -> dict[str, Any]:
    """1 publisher -> ``subscribers`` on one topic: closed-loop bursts of ``burst``
    publications, the next burst once at most four bursts' deliveries are outstanding.

    Measured twice: with subscribers that read every ``pace`` seconds (the main figures), then
    with subscribers that read as soon as anything arrives (``prompt_*``). On loopback a
    writer's system call also pays for waking its reader, so prompt readers make servers that
    write one frame at a time look costlier; the generator costs more then too."""
    topic = "bench.fanout"
    with Generator(adapter, HOST, server.port, sub_procs) as gen:
        _connect(gen, server, subscribers, [[topic]] * subscribers)
        job = _burst_job([topic], burst, subscribers, 4 * burst * subscribers, size)
        result = _closed_loop(gen, server, job, pace, warmup, duration)
        if prompt:
            again = _closed_loop(gen, server, job, 0.0, warmup / 3, duration / 2)
            for key in PROMPT_KEYS:
                result[f"prompt_{key}"] = again[key]
        stats = gen.stats()
    result.update(subscribers=subscribers, burst=burst, payload_bytes=size, read_pace_s=pace)
    result["errors"] = stats["errors"]
    result["closes"] = stats["closes"]
    return result


def latency(
    server: Server,
    adapter: str,
    subscribers: int = 1000,
    topics: int = 1,
    rate: float = 2000.0,
    duration: float = 6.0,
    warmup: float = 1.5,
    size: int = 64,
    sub_procs: int = 1,
) -> dict[str, Any]:
    """Open loop: ``rate`` publications per second spread over ``topics`` topics that share
    ``subscribers`` subscribers evenly; publication-to-delivery latency at every subscriber."""
    names = [f"bench.lat.{i}" for i in range(topics)]
    with Generator(adapter, HOST, server.port, sub_procs) as gen:
        _connect(gen, server, subscribers, [[names[k % topics]] for k in range(subscribers)])
        job = {"kind": "rate", "topics": names, "rate": rate, "size": size}
        gen.call(0, timeout=warmup + 60, duration=warmup, **job)
        time.sleep(0.5)
        gen.call_all(gen.subscriber_agents, kind="latency", every=1)
        result = _measure(gen, server, {**job, "duration": duration}, subscribers // topics)
        stats = gen.stats(latency=True)
        gen.call_all(gen.subscriber_agents, kind="latency", every=0)
    lat = sorted(stats["latency"])
    result.update(
        subscribers=subscribers,
        topics=topics,
        rate=rate,
        achieved_rate=round(result["published"] / duration),
        samples=len(lat),
        **latency_ms(lat),
        errors=stats["errors"],
        closes=stats["closes"],
    )
    return result


def slow_subscribers(
    server: Server,
    adapter: str,
    slow: int = 1000,
    fast: int = 50,
    rate: float = 200.0,
    size: int = 512,
    duration: float = 6.0,
    warmup: float = 2.0,
) -> dict[str, Any]:
    """``slow`` subscribers that stop reading beside ``fast`` ones that read, all on one
    topic, at a steady ``rate``: the readers' publication-to-delivery latency, whether each
    of them got every publication, and the server's memory growth meanwhile."""
    topic = "bench.slow"
    tokens = tokens_for(server, slow + fast + 1)
    time.sleep(0.3)
    base = server.memory_kib()
    with Generator(adapter, HOST, server.port, sub_procs=2) as gen:
        gen.connect_publisher(tokens[-1])
        for agent, count in ((1, fast), (2, slow)):
            _subscribe(gen, count, tokens, [[topic]] * count, agents=[agent])
        gen.call(2, kind="stall")
        job = {"kind": "rate", "topics": [topic], "rate": rate, "size": size}
        # the warm-up fills the stalled connections' socket buffers
        gen.call(0, timeout=warmup + 60, duration=warmup, **job)
        time.sleep(0.5)
        gen.call(1, kind="latency", every=1)
        r0 = gen.shared[1]
        c0, t0 = server.cpu_seconds(), time.monotonic()
        reply = gen.call(0, timeout=duration + 60, **{**job, "duration": duration})
        deadline = time.monotonic() + 3.0
        while gen.shared[1] < r0 + reply["published"] * fast and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        cpu = server.cpu_seconds() - c0
        received = gen.shared[1] - r0
        lat = sorted(gen.call(1, kind="stats", latency=True)["latency"] or [])
        mem = server.memory_kib()
        stats = gen.stats()
    return {
        "slow": slow,
        "fast": fast,
        "rate": rate,
        "published": reply["published"],
        "fast_received": received,
        "fast_complete": received == reply["published"] * fast,
        **latency_ms(lat),
        "server_cpu_pct": round(100 * cpu / elapsed, 1),
        "rss_growth_mib": round((mem["rss"] - base["rss"]) / 1024, 1),
        "errors": stats["errors"],
        "closes": stats["closes"],
    }


def meminfo_kib(key: str) -> int:
    """One figure of ``/proc/meminfo`` (``Slab``: the kernel's objects, sockets among them;
    ``MemAvailable``), machine-wide, in KiB; 0 where there is none."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _broadcasts(
    gen: Generator, server: Server, topic: str, expected: int, count: int, timeout: float
) -> dict[str, Any]:
    """Publish once to ``topic`` ``count`` times; each time, how long until all ``expected``
    deliveries arrived, and the CPU the server, the generator and the rest of the machine
    spent meanwhile (those of the median broadcast)."""
    pids = server.pids()
    runs = []
    for _ in range(count):
        r0, c0, g0 = gen.received(), server.cpu_seconds(pids), gen.cpu_seconds()
        m0 = machine_busy_seconds()
        reply = gen.call(0, kind="publish_once", topic=topic, size=64)
        deadline = time.monotonic() + timeout
        while gen.received() < r0 + expected and time.monotonic() < deadline:
            time.sleep(0.0005)
        elapsed = time.monotonic() - reply["t"]
        server_cpu, gen_cpu = server.cpu_seconds(pids) - c0, gen.cpu_seconds() - g0
        other = machine_busy_seconds() - m0 - server_cpu - gen_cpu
        runs.append((elapsed, gen.received() - r0, server_cpu, gen_cpu, other))
        time.sleep(0.2)
    middle = sorted(runs)[len(runs) // 2]  # the median broadcast (the upper one of two)
    return {
        "broadcast_ms": [round(t * 1000, 1) for t, *_ in runs],
        "broadcast_median_ms": round(statistics.median(t for t, *_ in runs) * 1000, 1),
        "broadcast_reached": min(g for _, g, *_ in runs),
        "broadcast_server_cpu_s": round(middle[2], 3),
        "broadcast_loadgen_cpu_s": round(middle[3], 3),
        "broadcast_other_cpu_pct": round(100 * middle[4] / middle[0], 1),
    }


def idle_connections(
    server: Server,
    adapter: str,
    connections: int = 20000,
    sub_procs: int = 2,
    broadcasts: int = 3,
    sources: list[str] | None = None,
    timeout: float = 120.0,
    paced: float = 0.0,
) -> dict[str, Any]:
    """``connections`` authenticated, subscribed, idle connections: the server's memory per
    connection (over its baseline with no clients; ``kernel_kib_per_connection`` is the
    machine's slab growth, both ends of each loopback connection), how long they took to
    connect, and how long one publication takes to reach every one of them, with the CPU the
    server and the generator spent meanwhile. ``sources`` are the generator's local addresses
    (see :class:`~bench.loadgen.Generator`); ``timeout`` bounds connecting (each broadcast
    has 30 s).
    With ``paced`` (seconds), the broadcasts are repeated with subscribers that read every
    ``paced`` seconds (``paced_*`` figures): woken by every delivery, as they are otherwise,
    the generator's processes charge their wake-ups to the server's writes on loopback."""
    topic = "bench.idle"
    time.sleep(0.3)
    base, slab = server.memory_kib(), meminfo_kib("Slab")
    tokens = tokens_for(server, connections + 1)
    with Generator(adapter, HOST, server.port, sub_procs, sources) as gen:
        gen.connect_publisher(tokens[connections % len(tokens)])
        up = gen.connect_subscribers(
            connections, tokens, [[topic]] * connections, concurrency=400, timeout=timeout
        )
        if up["ok"] != connections:
            raise RuntimeError(f"{up['ok']} of {connections} subscribers connected: {up['errors']}")
        time.sleep(1.0)
        mem, slab = server.memory_kib(), meminfo_kib("Slab") - slab
        result = _broadcasts(gen, server, topic, connections, broadcasts, 30.0)
        if paced:
            gen.call_all(gen.subscriber_agents, kind="pace", seconds=paced)
            again = _broadcasts(gen, server, topic, connections, broadcasts, 30.0)
            result.update({f"paced_{k}": v for k, v in again.items()}, read_pace_s=paced)
        stats = gen.stats()
    return {
        "connections": connections,
        "generator_processes": 1 + sub_procs,
        "connect_s": round(up["elapsed"], 1),
        "connects_per_s": round(connections / up["elapsed"]),
        "baseline_kib": base,
        "loaded_kib": mem,
        "rss_kib_per_connection": round((mem["rss"] - base["rss"]) / connections, 2),
        "pss_kib_per_connection": round((mem["pss"] - base["pss"]) / connections, 2),
        "kernel_kib_per_connection": round(slab / connections, 2),
        **result,
        "errors": stats["errors"],
        "closes": stats["closes"],
    }


def connect_rate(
    server: Server,
    adapter: str,
    connections: int = 6000,
    concurrency: int = 200,
    sub_procs: int = 1,
    clients: int | None = None,
) -> dict[str, Any]:
    """Fresh connections, each a TCP connect, the WebSocket upgrade and the server's token
    check, until the server says the client is authenticated; then closed. Each presents its
    own token where the server verifies JWTs; with ``clients``, that many clients reconnect
    in turn, each with its own token every time (a restart's reconnect storm)."""
    tokens = tokens_for(server, clients or connections)
    with Generator(adapter, HOST, server.port, sub_procs) as gen:
        gen.call(
            1,
            kind="churn",
            count=min(200, connections),
            concurrency=50,
            tokens=tokens,
            topics=None,
            timeout=60,
        )
        pids = server.pids()
        c0, g0, m0 = server.cpu_seconds(pids), gen.cpu_seconds(), machine_busy_seconds()
        replies = gen.call_all(
            gen.subscriber_agents,
            kind="churn",
            count=connections // len(gen.subscriber_agents),
            concurrency=max(1, concurrency // len(gen.subscriber_agents)),
            tokens=tokens,
            topics=None,
            timeout=120,
        )
        c1, g1, m1 = server.cpu_seconds(pids), gen.cpu_seconds(), machine_busy_seconds()
    ok = sum(r["ok"] for r in replies)
    elapsed = max(r["elapsed"] for r in replies)
    return {
        "connections": connections,
        "clients": clients or connections,
        "concurrency": concurrency,
        "ok": ok,
        "failed": sum(r["failed"] for r in replies),
        "seconds": round(elapsed, 3),
        "connects_per_s": round(ok / elapsed),
        "server_cpu_us_per_connect": round(1e6 * (c1 - c0) / ok, 1) if ok else None,
        "loadgen_cpu_us_per_connect": round(1e6 * (g1 - g0) / ok, 1) if ok else None,
        "other_cpu_pct": round(100 * ((m1 - m0) - (c1 - c0) - (g1 - g0)) / elapsed, 1),
        "errors": {k: v for r in replies for k, v in r["errors"].items()},
    }


def many_topics(
    server: Server,
    adapter: str,
    topics: int = 10000,
    per_topic: int = 5,
    connections: int = 1000,
    burst: int = 20,
    duration: float = 6.0,
    warmup: float = 1.5,
    sub_procs: int = 1,
    pace: float = 0.005,
    publishers: int = 1,
    size: int = 64,
    own: bool = False,
    monitors: int = 0,
) -> dict[str, Any]:
    """``topics`` topics with ``per_topic`` subscribers each, held by ``connections``
    connections (topics * per_topic / connections subscriptions each); closed-loop publisher
    bursts of ``size``-byte payloads spread round-robin over all topics, taking turns over
    ``publishers`` connections (the kernel spreads those over a broker's workers: with 8,
    every one of 2 workers holds some but once in 128 runs). With ``own``, publisher k
    publishes only to topic k (set ``topics`` to ``publishers``). With ``monitors``, that many more
    connections subscribe to ``>`` and get every publication too."""
    names = [f"bench.many.{i}" for i in range(topics)]
    subs_each = topics * per_topic // connections
    # connection k holds topics k*subs_each/per_topic...: each topic lands on per_topic
    # distinct connections because the slots of one topic are spread over the ring
    plan: list[list[str]] = [[] for _ in range(connections)]
    for slot in range(topics * per_topic):
        t, j = divmod(slot, per_topic)
        plan[(t + j * (connections // per_topic)) % connections].append(names[t])
    plan += [[">"]] * monitors
    fanout = per_topic + monitors
    # A monitor may lag by the whole window: keep it under the broker's default send queue
    # (1 MiB), or the run measures a slow consumer's close instead of the fan-out.
    window = (20 if monitors else 200) * burst * fanout
    job = _burst_job(names, burst, fanout, window, size, own)
    result = _spread_run(server, adapter, plan, job, publishers, sub_procs, pace, warmup, duration)
    result.update(
        topics=topics,
        publishers=publishers,
        payload_bytes=size,
        per_topic=per_topic,
        subscriptions_per_connection=subs_each,
        monitors=monitors,
    )
    return result


def _spread_run(
    server: Server,
    adapter: str,
    plan: list[list[str]],
    job: dict[str, Any],
    publishers: int,
    sub_procs: int,
    pace: float,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Connect ``publishers`` and one subscriber per entry of ``plan`` (its topics or
    patterns), then measure one closed-loop run of ``job``."""
    with Generator(adapter, HOST, server.port, sub_procs) as gen:
        _connect(gen, server, len(plan), plan, publishers)
        result = _closed_loop(gen, server, job, pace, warmup, duration)
        stats = gen.stats()
    result.update(connections=len(plan), errors=stats["errors"], closes=stats["closes"])
    return result


def wildcard_topics(
    server: Server,
    adapter: str,
    topics: int = 2000,
    groups: int = 20,
    connections: int = 100,
    burst: int = 20,
    duration: float = 6.0,
    warmup: float = 1.5,
    pace: float = 0.005,
) -> dict[str, Any]:
    """Many topics reached only through wildcards: ``topics`` topics ``bench.wild.G.I`` in
    ``groups`` groups, each of ``connections`` connections subscribed to one group's pattern
    (``bench.wild.G.*`` for even connections, ``bench.wild.G.>`` for odd ones), so every topic
    has ``connections / groups`` subscribers and no exact subscription; closed-loop bursts
    spread round-robin over all topics."""
    names = [f"bench.wild.{i % groups}.{i}" for i in range(topics)]
    plan = [[f"bench.wild.{k % groups}.{'*>'[k // groups % 2]}"] for k in range(connections)]
    per_topic = connections // groups
    job = _burst_job(names, burst, per_topic, 200 * burst * per_topic, 64)
    result = _spread_run(server, adapter, plan, job, 1, 1, pace, warmup, duration)
    result.update(topics=topics, groups=groups, per_topic=per_topic)
    return result


def publish_only(
    server: Server,
    adapter: str,
    rate: float = 20000.0,
    topics: int = 100,
    size: int = 64,
    duration: float = 6.0,
    warmup: float = 1.5,
) -> dict[str, Any]:
    """A publisher nobody listens to: ``rate`` publications per second (open loop) over
    ``topics`` topics without subscribers; the server's CPU per publication."""
    names = [f"bench.nobody.{i}" for i in range(topics)]
    with Generator(adapter, HOST, server.port, 1) as gen:
        _connect(gen, server, 0, None)
        job = {"kind": "rate", "topics": names, "rate": rate, "size": size}
        gen.call(0, timeout=warmup + 60, duration=warmup, **job)
        time.sleep(0.3)
        result = _measure(gen, server, {**job, "duration": duration}, 0)
        stats = gen.stats()
    published = result["published"]
    result.update(
        topics=topics,
        rate=rate,
        payload_bytes=size,
        achieved_rate=round(published / duration),
        cpu_us_per_publication=round(1e6 * result["server_cpu_s"] / published, 3)
        if published
        else None,
        errors=stats["errors"],
        closes=stats["closes"],
    )
    return result
