"""The metrics registry: snapshots, merging several workers, and the Prometheus text format
(read back with prometheus_client's own parser)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.brokermetrics import (
    HANDSHAKE_BUCKETS,
    broker_metrics,
    snapshot_from_stats,
    stats_from_snapshot,
)
from broker.metrics import Registry, merge, render


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels -> value}, for every sample, through the reference parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_counter_gauge_histogram_render_and_parse() -> None:
    reg = Registry(const_labels={"worker": "0"})
    c = reg.counter("pubsub_things_total", "Things.", ["reason"])
    g = reg.gauge("pubsub_level", "Level.")
    h = reg.histogram("pubsub_latency_seconds", "Latency.", [0.1, 1.0])
    c.inc(reason="expired")
    c.inc(2, reason="expired")
    c.inc(reason='we"ird\\na\nme')
    g.set(7)
    g.dec(2)
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    text = reg.render()
    assert "# HELP pubsub_things_total Things.\n# TYPE pubsub_things_total counter\n" in text
    samples = parse(text)
    w = ("worker", "0")
    assert samples["pubsub_things_total"][(("reason", "expired"), w)] == 3
    assert samples["pubsub_things_total"][(("reason", 'we"ird\\na\nme'), w)] == 1
    assert samples["pubsub_level"][(w,)] == 5
    buckets = samples["pubsub_latency_seconds_bucket"]
    assert buckets[(("le", "0.1"), w)] == 2  # le is inclusive
    assert buckets[(("le", "1.0"), w)] == 3
    assert buckets[(("le", "+Inf"), w)] == 4
    assert samples["pubsub_latency_seconds_count"][(w,)] == 4
    assert samples["pubsub_latency_seconds_sum"][(w,)] == pytest.approx(3.65)


def test_snapshot_is_plain_data_and_merges_across_workers() -> None:
    workers = [broker_metrics(i) for i in range(3)]
    for i, m in enumerate(workers):
        m.connections.set(i + 1)
        m.auth_failures.inc(reason="expired")
        m.publications_in.inc(10 * (i + 1))
        m.handshake_seconds.observe(0.003)
    snaps = [m.registry.snapshot() for m in workers]
    # crosses a pipe as JSON or pickle unchanged
    snaps = [json.loads(json.dumps(s)) for s in snaps]
    assert pickle.loads(pickle.dumps(snaps)) == snaps
    merged = merge(snaps)
    samples = parse(render(merged))
    assert {k: v for k, v in samples["pubsub_connections"].items()} == {
        (("worker", "0"),): 1,
        (("worker", "1"),): 2,
        (("worker", "2"),): 3,
    }
    assert samples["pubsub_handshake_seconds_count"][(("worker", "2"),)] == 1
    assert len(samples["pubsub_handshake_seconds_bucket"]) == 3 * (len(HANDSHAKE_BUCKETS) + 1)
    # same labels are added up
    twice = merge([snaps[0], snaps[0]])
    again = parse(render(twice))
    assert again["pubsub_publications_in_total"][(("worker", "0"),)] == 20
    assert again["pubsub_handshake_seconds_count"][(("worker", "0"),)] == 2


def test_merge_skips_a_family_that_disagrees() -> None:
    a = Registry()
    a.counter("x_total", "X.").inc()
    b = Registry()
    b.gauge("x_total", "X as a gauge.").set(5)
    merged = merge([a.snapshot(), b.snapshot()])
    assert merged["x_total"]["type"] == "counter"
    assert merged["x_total"]["samples"] == [[{}, 1.0]]


def test_broker_metrics_cover_the_issue() -> None:
    text = render(broker_metrics(0).registry.snapshot())
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in [
        "pubsub_connections",
        "pubsub_subscriptions",
        "pubsub_topics",
        "pubsub_publications_in",  # the parser drops _total from counter family names
        "pubsub_deliveries_out",
        "pubsub_bytes_in",
        "pubsub_bytes_out",
        "pubsub_closes",
        "pubsub_auth_failures",
        "pubsub_handshake_seconds",
        "pubsub_bus_up",
    ]:
        assert name in names


def test_gauge_function_and_labelled_gauges() -> None:
    reg = Registry()
    g = reg.gauge("q", "Q.")
    g.set_function(lambda: 42)
    lg = reg.gauge("per_kind", "Per kind.", ["kind"])
    lg.set_function(lambda: {("a",): 1, ("b",): 2})
    assert g.value() == 42
    assert lg.value(kind="b") == 2
    samples = parse(reg.render())
    assert samples["q"][()] == 42
    assert samples["per_kind"][(("kind", "a"),)] == 1


def test_values_render_as_prometheus_numbers() -> None:
    reg = Registry()
    g = reg.gauge("g", "G.", ["k"])
    g.set(math.inf, k="inf")
    g.set(math.nan, k="nan")
    g.set(0.25, k="frac")
    g.set(2**60, k="big")
    text = reg.render()
    assert 'g{k="inf"} +Inf' in text
    assert 'g{k="nan"} NaN' in text
    assert 'g{k="frac"} 0.25' in text
    parse(text)


@pytest.mark.parametrize(
    "bad",
    [
        lambda r: r.counter("1abc", "x"),
        lambda r: r.counter("a-b", "x"),
        lambda r: r.counter("ok", "x", ["__reserved"]),
        lambda r: r.counter("ok", "x", ["a", "a"]),
        lambda r: r.histogram("h", "x", [1.0], ["le"]),
        lambda r: r.histogram("h", "x", [2.0, 1.0]),
        lambda r: r.histogram("h", "x", []),
    ],
)
def test_invalid_declarations(bad: object) -> None:
    with pytest.raises(ValueError):
        bad(Registry())  # type: ignore[operator]


def test_misuse_is_refused() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.", ["reason"])
    with pytest.raises(ValueError):
        c.inc(-1, reason="x")
    with pytest.raises(ValueError):
        c.inc(other="x")
    with pytest.raises(ValueError):
        reg.counter("c_total", "again")


def test_stats_from_snapshot() -> None:
    a, b = broker_metrics(0), broker_metrics(10)
    a.connections.set(2)
    b.connections.set(5)
    a.publications_in.inc(3)
    a.publications_in.inc(4)
    stats = stats_from_snapshot(merge([b.registry.snapshot(), a.registry.snapshot()]))
    assert [w["worker"] for w in stats["workers"]] == ["0", "10"]
    assert stats["workers"][0]["publications_in"] == 7
    assert stats["workers"][1]["connections"] == 5


def test_snapshot_from_worker_stats() -> None:
    stats = {
        "worker": 1,
        "connections": 4,
        "subscriptions": 6,
        "topics": 2,
        "publications_in": 10,
        "deliveries_out": 30,
        "bytes_out": 999,
        "closes": {"4008": 2, "4009": 1, "4321": 1},
        "auth_failures": {"expired": 3},
        "bus_up": False,
    }
    hist = Registry().histogram("h", "Handshakes.", HANDSHAKE_BUCKETS)
    hist.observe(0.01)
    hist.observe(0.2)
    stats["handshake"] = hist.sample()
    extra = Registry(const_labels={"worker": "1"})
    extra.counter("pubsub_extra_total", "More.").inc(5)
    samples = parse(render(snapshot_from_stats(stats, [extra.snapshot()])))
    w = ("worker", "1")
    assert samples["pubsub_connections"][(w,)] == 4
    assert samples["pubsub_deliveries_out_total"][(w,)] == 30
    assert samples["pubsub_closes_total"][(("reason", "slow_consumer"), w)] == 2
    assert samples["pubsub_closes_total"][(("reason", "idle"), w)] == 1
    assert samples["pubsub_closes_total"][(("reason", "4321"), w)] == 1
    assert samples["pubsub_auth_failures_total"][(("reason", "expired"), w)] == 3
    assert samples["pubsub_bus_up"][(w,)] == 0
    assert samples["pubsub_handshake_seconds_count"][(w,)] == 2
    assert samples["pubsub_handshake_seconds_bucket"][(("le", "0.01"), w)] == 1
    assert samples["pubsub_extra_total"][(w,)] == 5
