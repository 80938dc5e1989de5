"""The broker's own metric families, and the snapshots built from the figures it keeps.

Theory of operation
-------------------
:class:`BrokerMetrics` declares the broker's metric families once (on a
:class:`~broker.metrics.Registry`), so that every worker exposes the same names with the same
help texts. Workers keep plain figures (their ``stats()``) rather than live families; whoever
serves ``/metrics`` turns them into snapshots here: :func:`snapshot_from_stats` for a worker,
:func:`history_snapshot` for the one in-memory history store and the history store on disk
beside it, :func:`hub_presence_snapshot` for the hub's presence entries. Those are merged and
rendered by :mod:`broker.metrics`. :func:`stats_from_snapshot` reads a merged snapshot back into
the per-worker figures the status page charts. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from broker.metrics import Gauge, Registry, Snapshot, merge

__all__ = [
    "CLOSE_REASONS",
    "HANDSHAKE_BUCKETS",
    "BrokerMetrics",
    "broker_metrics",
    "history_snapshot",
    "hub_presence_snapshot",
    "snapshot_from_stats",
    "stats_from_snapshot",
]


#: Buckets (seconds) for the WebSocket handshake latency histogram: from accept to welcome.
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The per-worker figures the status page charts, and the metric family each one is read from.
STATS_FAMILIES = {
    "connections": "pubsub_connections",
    "subscriptions": "pubsub_subscriptions",
    "topics": "pubsub_topics",
    "publications_in": "pubsub_publications_in_total",
    "deliveries_out": "pubsub_deliveries_out_total",
    "bytes_out": "pubsub_bytes_out_total",
}


def stats_from_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """The per-worker figures of a merged snapshot, as the status page wants them::

        {"workers": [{"worker": "0", "connections": 3, "publications_in": 120, ...}, ...]}

    Counters stay cumulative (the page derives rates from two polls); samples of one worker
    with other labels (``source="http"``) are added up."""
    workers: dict[str, dict[str, Any]] = {}
    for key, name in STATS_FAMILIES.items():
        family = snapshot.get(name)
        if family is None or family.get("type") == "histogram":
            continue
        for labels, value in family.get("samples", []):
            worker = str(labels.get("worker", "0"))
            row = workers.setdefault(worker, {"worker": worker})
            row[key] = row.get(key, 0) + value
    for row in workers.values():
        for key in STATS_FAMILIES:
            row.setdefault(key, 0)
    ordered = sorted(workers.values(), key=lambda r: (len(r["worker"]), r["worker"]))
    return {"workers": ordered}


class BrokerMetrics:
    """The broker's metric families, declared once so every worker exposes the same names.

    A worker creates ``BrokerMetrics(Registry(const_labels={"worker": str(index)}))`` and
    updates the attributes as things happen; see each attribute's help text for when.
    """

    def __init__(self, registry: Registry) -> None:
        r = self.registry = registry
        self.connections = r.gauge("pubsub_connections", "Open WebSocket connections.")
        self.connections_total = r.counter(
            "pubsub_connections_total", "WebSocket connections accepted (authenticated)."
        )
        self.subscriptions = r.gauge(
            "pubsub_subscriptions", "Subscriptions held by open connections (exact and wildcard)."
        )
        self.topics = r.gauge(
            "pubsub_topics", "Exact topics with at least one subscriber on this worker."
        )
        self.publications_in = r.counter(
            "pubsub_publications_in_total",
            "Publications this worker received from the bus (WebSocket and HTTP publishers).",
        )
        self.deliveries_out = r.counter(
            "pubsub_deliveries_out_total", "Message pushes queued to subscribers."
        )
        self.bytes_in = r.counter(
            "pubsub_bytes_in_total", "Bytes of WebSocket message payloads received."
        )
        self.bytes_out = r.counter(
            "pubsub_bytes_out_total", "Bytes written to WebSocket connections."
        )
        self.closes = r.counter(
            "pubsub_closes_total",
            "Connections closed by the server, by reason (slow_consumer, idle, expired, "
            "policy, too_big, violations, shutdown, auth_timeout, internal).",
            ["reason"],
        )
        self.auth_failures = r.counter(
            "pubsub_auth_failures_total",
            "Refused authentications, by reason (expired, bad_signature, malformed, origin, ...).",
            ["reason"],
        )
        self.errors = r.counter(
            "pubsub_frame_errors_total", "Error replies sent to clients, by code.", ["code"]
        )
        self.handshake_seconds = r.histogram(
            "pubsub_handshake_seconds",
            "Time from TCP accept to the welcome frame for authenticated connections.",
            HANDSHAKE_BUCKETS,
        )
        self.bus_up = r.gauge("pubsub_bus_up", "1 when the bus is connected, else 0.")
        self.connections_pending = r.gauge(
            "pubsub_connections_pending",
            "Connections not authenticated yet (upgrade being read, or waiting for an auth op).",
        )
        self.connections_refused = r.counter(
            "pubsub_connections_refused_total",
            "Connections refused or dropped for want of a slot, by reason: pending (the oldest "
            "unauthenticated connection dropped to make room), capacity (max_connections), "
            "per_client (max_connections_per_client).",
            ["reason"],
        )
        self.read_refusals = r.counter(
            "pubsub_read_refusals_total",
            "history and subscribe-with-since requests refused with rate_limited: the "
            "connection had spent its read budget (read_rate_bytes, read_burst_bytes), by op.",
            ["op"],
        )
        self.replays = r.counter(
            "pubsub_replays_total",
            "Replays of subscribe with since, by outcome: complete; overtaken (history moved "
            "on past a client reading too slowly: 4008); cut_off (the connection became a slow "
            "consumer or closed meanwhile); failed (the bus failed: 1011).",
            ["outcome"],
        )
        self.replay_refills = r.counter(
            "pubsub_replay_refills_total",
            "Times the live publications held for a subscription while its replay went out "
            "passed send_queue_max_bytes: dropped, then read from history instead.",
        )
        self.ws_violations = r.counter(
            "pubsub_ws_violations_total",
            "Connections the WebSocket layer closed or refused, by what they broke: protocol "
            "(1002), invalid_data (1007), message_size and fragments (1009), message_timeout "
            "(1008), request_head (HTTP 431), header_encoding (HTTP 400).",
            ["kind"],
        )
        self.presence_members = _presence_members_gauge(r)
        self.presence_refused = r.counter(
            "pubsub_presence_refused_total",
            "Presence reads (the presence op, subscribe with presence) refused, by code "
            "(forbidden: no presence permission; not_tracked: the topic does not track it).",
            ["code"],
        )
        self.skipped = r.counter(
            "pubsub_skipped_total",
            "Publications of latest topics ([[delivery]] policy) not sent to a subscriber that "
            "was behind, because a newer one replaced them (it is told with a skipped push).",
        )
        self.send_queue_bytes = r.gauge(
            "pubsub_send_queue_bytes",
            "Bytes waiting to be written to open connections: queued frames and the newest "
            "frames held for latest topics.",
        )
        self.token_cache = r.counter(
            "pubsub_token_cache_total",
            "Token checks answered by the verified-token cache ([auth] token_cache_size), by "
            "result: hit (no signature check), miss (checked, then remembered), evicted (the "
            "least recently used entry dropped to make room).",
            ["result"],
        )


def _presence_members_gauge(r: Registry) -> Gauge:
    return r.gauge(
        "pubsub_presence_members",
        "Presence entries (topic, client id) held in memory by this worker, or by the hub "
        '(worker="hub"); with Redis, this worker\'s own entries.',
    )


def hub_presence_snapshot(members: int) -> Snapshot:
    """The hub's presence entries as a snapshot labelled ``worker="hub"``, to merge with the
    workers' (the hub is no worker, so it has none of their other families)."""
    gauge = _presence_members_gauge(Registry(const_labels={"worker": "hub"}))
    gauge.set(members)
    return {gauge.name: gauge.snapshot()}


#: Reason labels of ``pubsub_closes_total`` for the close codes the server uses.
CLOSE_REASONS = {
    1000: "normal",
    1001: "shutdown",
    1006: "abnormal",
    1008: "policy",
    1009: "too_big",
    1011: "internal",
    1013: "try_again_later",
    4001: "auth_timeout",
    4003: "expired",
    4008: "slow_consumer",
    4009: "idle",
    4029: "violations",
}


def snapshot_from_stats(stats: Mapping[str, Any], extra: Iterable[Snapshot] = ()) -> Snapshot:
    """One worker's metrics snapshot built from the plain figures it keeps (its ``stats()``
    dict: ``worker``, ``connections``, ``subscriptions``, ``topics``, ``publications_in``,
    ``deliveries_out``, ``bytes_in``, ``bytes_out``, ``closes`` {code: n},
    ``auth_failures`` {reason: n}, ``errors`` {code: n}, ``read_refusals`` {op: n},
    ``replays`` {outcome: n}, ``replay_refills``, ``bus_up``, ``pending``, ``refused``
    {reason: n}, ``ws_violations`` {kind: n}, ``presence_members``, ``presence_refused``
    {code: n}, ``skipped``, ``send_queue_bytes``, ``token_cache`` {result: n}, ``handshake``
    (a :class:`Histogram` over :data:`HANDSHAKE_BUCKETS`'s ``sample()``); missing ones count 0),
    merged with ``extra`` snapshots (a registry holding the handshake histogram, say)."""
    m = broker_metrics(stats.get("worker", 0))
    m.connections.set(stats.get("connections", 0))
    m.connections_total.inc(stats.get("connections_total", 0))
    m.subscriptions.set(stats.get("subscriptions", 0))
    m.topics.set(stats.get("topics", 0))
    m.publications_in.inc(stats.get("publications_in", 0))
    m.deliveries_out.inc(stats.get("deliveries_out", 0))
    m.bytes_in.inc(stats.get("bytes_in", 0))
    m.bytes_out.inc(stats.get("bytes_out", 0))
    for code, n in dict(stats.get("closes", {})).items():
        reason = CLOSE_REASONS.get(int(code), str(code)) if str(code).isdigit() else str(code)
        m.closes.inc(n, reason=reason)
    for reason, n in dict(stats.get("auth_failures", {})).items():
        m.auth_failures.inc(n, reason=str(reason))
    for code, n in dict(stats.get("errors", {})).items():
        m.errors.inc(n, code=str(code))
    for op, n in dict(stats.get("read_refusals", {})).items():
        m.read_refusals.inc(n, op=str(op))
    for outcome, n in dict(stats.get("replays", {})).items():
        m.replays.inc(n, outcome=str(outcome))
    m.replay_refills.inc(stats.get("replay_refills", 0))
    m.bus_up.set(1 if stats.get("bus_up", True) else 0)
    for kind, n in dict(stats.get("ws_violations", {})).items():
        m.ws_violations.inc(n, kind=str(kind))
    m.presence_members.set(stats.get("presence_members", 0))
    for code, n in dict(stats.get("presence_refused", {})).items():
        m.presence_refused.inc(n, code=str(code))
    m.connections_pending.set(stats.get("pending", 0))
    for reason, n in dict(stats.get("refused", {})).items():
        m.connections_refused.inc(n, reason=str(reason))
    m.skipped.inc(stats.get("skipped", 0))
    m.send_queue_bytes.set(stats.get("send_queue_bytes", 0))
    for result, n in dict(stats.get("token_cache", {})).items():
        m.token_cache.inc(n, result=str(result))
    snap = m.registry.snapshot()
    handshake = stats.get("handshake")
    if handshake is not None and len(handshake.get("counts", ())) == len(HANDSHAKE_BUCKETS) + 1:
        family = snap["pubsub_handshake_seconds"]
        family["samples"] = [[{"worker": str(stats.get("worker", 0))}, dict(handshake)]]
    extras = list(extra)
    if extras:
        # The extra snapshot's families replace the empty ones declared here.
        own = {k: v for k, v in snap.items() if not any(k in e for e in extras)}
        return merge([own, *extras])
    return snap


def broker_metrics(worker: int | str) -> BrokerMetrics:
    """A fresh registry for one worker, labelled ``worker="N"``, with the broker's families."""
    return BrokerMetrics(Registry(const_labels={"worker": str(worker)}))


def history_snapshot(stats: Mapping[str, Any]) -> Snapshot:
    """The metrics of the broker's one in-memory history store (in the worker of a
    one-process broker, in the supervisor's hub with workers), from its
    :meth:`broker.history.TopicStore.stats`; no ``worker`` label, as there is one store. An
    empty ``stats`` (history in Redis) gives no families."""
    if not stats:
        return {}
    r = Registry()
    r.gauge(
        "pubsub_history_bytes", "Bytes of history held (data, sender, per-entry overhead)."
    ).set(stats.get("history_bytes", 0))
    r.gauge("pubsub_history_entries", "Publications held in history.").set(
        stats.get("history_entries", 0)
    )
    r.gauge("pubsub_history_topics", "Topics holding history (capped by max_topics).").set(
        stats.get("history_topics", 0)
    )
    evicted = r.counter(
        "pubsub_history_evicted_total",
        "Publications evicted from history, by reason (budget: history_max_bytes, "
        "topic_cap: the topic's max_bytes, ttl, size).",
        ["reason"],
    )
    evicted_bytes = r.counter(
        "pubsub_history_evicted_bytes_total",
        "Bytes of publications evicted from history, by reason (as pubsub_history_evicted_total).",
        ["reason"],
    )
    for reason, n in dict(stats.get("history_evicted", {})).items():
        evicted.inc(n, reason=str(reason))
    for reason, n in dict(stats.get("history_evicted_bytes", {})).items():
        evicted_bytes.inc(n, reason=str(reason))
    r.counter(
        "pubsub_topics_refused_total",
        "Publications refused with too_many_topics (the topic table was at max_topics).",
    ).inc(stats.get("topics_refused", 0))
    _store_metrics(r, stats.get("store"))
    return r.snapshot()


def _store_metrics(r: Registry, store: Mapping[str, Any] | None) -> None:
    """The history store's figures (:meth:`broker.store.DiskJournal.stats`), when it is on."""
    if not store:
        return
    for name, help_text, key in (
        (
            "pubsub_store_queued_topics",
            "Topics and publications waiting for the next commit.",
            "queued_topics",
        ),
        ("pubsub_store_waiting", "Publishes waiting for a commit (ack = disk).", "waiting"),
        ("pubsub_store_bytes", "Bytes the history store takes on disk (file and WAL).", "bytes"),
        (
            "pubsub_store_journal_entries",
            "Publications the history store's file holds, evicted ones included until "
            "compaction deletes them (at most about twice what history holds, plus 10,000).",
            "journal_entries",
        ),
    ):
        r.gauge(name, help_text).set(store.get(key, 0))
    for name, help_text, key in (
        ("pubsub_store_batches_total", "Batches committed to the history store.", "batches"),
        ("pubsub_store_rows_total", "Publications written to the history store.", "rows"),
        (
            "pubsub_store_compacted_total",
            "Publications written again by compaction: still held, in a chunk it deleted.",
            "compacted",
        ),
        (
            "pubsub_store_commit_seconds_total",
            "Seconds spent committing batches (in a worker thread, off the event loop).",
            "commit_seconds",
        ),
        ("pubsub_store_failures_total", "Commits that failed (retried next batch).", "failures"),
        (
            "pubsub_store_refused_total",
            "Publications refused with unavailable: past the offsets reserved on disk.",
            "refused",
        ),
    ):
        r.counter(name, help_text).inc(store.get(key, 0))
