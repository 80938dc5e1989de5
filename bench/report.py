"""Turn the suite's figures into ratios, target verdicts, a Markdown page and a chart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["chart", "headline", "markdown", "ratios", "targets"]

BROKERS = ("broker-1w", "broker-2w")
#: Two workers with topics owned by the workers ([server] topic_owner = "workers"): run in the
#: throughput workloads only, beside the hub's two workers.
OWNED = "broker-2w-owned"
PEERS = ("nats", "socketio")

NAMES = {"broker-1w": "1 worker", "broker-2w": "2 workers", "nats": "NATS", "socketio": "Socket.IO"}
LABELS = {
    "broker-1w": "trio-pubsub\n1 worker",
    "broker-2w": "trio-pubsub\n2 workers",
    "nats": "nats-server 2.9\n(WebSocket)",
    "socketio": "Socket.IO 4\n(Node 20)",
}

# per workload: (key, label, True when higher is better)
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "fanout": [
        ("deliveries_per_s", "deliveries/s", True),
        ("cpu_us_per_delivery", "server CPU µs/delivery", False),
        ("deliveries_per_write", "deliveries/write", True),
        ("server_cpu_pct", "server CPU %", False),
        ("loadgen_cpu_us_per_delivery", "loadgen CPU µs/delivery", False),
        ("prompt_cpu_us_per_delivery", "prompt readers: server CPU µs/delivery", False),
        ("prompt_deliveries_per_s", "prompt readers: deliveries/s", True),
        ("prompt_loadgen_cpu_us_per_delivery", "prompt readers: loadgen CPU µs/delivery", False),
        ("other_cpu_pct", "other CPU %", False),
    ],
    "latency": [
        ("p50_ms", "p50 ms", False),
        ("p99_ms", "p99 ms", False),
        ("max_ms", "max ms", False),
        ("deliveries_per_s", "deliveries/s", True),
        ("cpu_us_per_delivery", "server CPU µs/delivery", False),
        ("loadgen_cpu_pct", "loadgen CPU %", False),
        ("other_cpu_pct", "other CPU %", False),
    ],
    "slow": [
        ("p50_ms", "readers' p50 ms", False),
        ("p99_ms", "readers' p99 ms", False),
        ("max_ms", "readers' max ms", False),
        ("fast_complete", "every reader got every publication", True),
        ("server_cpu_pct", "server CPU %", False),
        ("rss_growth_mib", "server memory growth MiB", False),
    ],
    "idle": [
        ("connections", "connections", True),
        ("pss_kib_per_connection", "PSS KiB/conn", False),
        ("rss_kib_per_connection", "RSS KiB/conn", False),
        ("broadcast_median_ms", "broadcast to all, ms", False),
        ("broadcast_reached", "reached", True),
    ],
    "idle100k": [
        ("connections", "connections", True),
        ("broadcast_median_ms", "broadcast to all, ms", False),
        ("pss_kib_per_connection", "PSS KiB/conn", False),
        ("connect_s", "all connected in, s", False),
        ("broadcast_server_cpu_s", "broadcast: server CPU s", False),
        ("broadcast_loadgen_cpu_s", "broadcast: loadgen CPU s", False),
        ("broadcast_other_cpu_pct", "broadcast: other CPU %", False),
        ("paced_broadcast_median_ms", "readers every 5 ms: broadcast ms", False),
        ("paced_broadcast_server_cpu_s", "readers every 5 ms: server CPU s", False),
        ("kernel_kib_per_connection", "kernel KiB/conn (both ends)", False),
        ("broadcast_reached", "reached", True),
    ],
    "connect": [
        ("connects_per_s", "connects/s", True),
        ("server_cpu_us_per_connect", "server CPU µs/connect", False),
        ("loadgen_cpu_us_per_connect", "loadgen CPU µs/connect", False),
        ("failed", "failed", False),
        ("other_cpu_pct", "other CPU %", False),
    ],
    "topics": [
        ("deliveries_per_s", "deliveries/s", True),
        ("cpu_us_per_delivery", "server CPU µs/delivery", False),
        ("deliveries_per_write", "deliveries/write", True),
        ("loadgen_cpu_us_per_delivery", "loadgen CPU µs/delivery", False),
        ("other_cpu_pct", "other CPU %", False),
    ],
    "abuse": [
        ("p50_ms", "bystander p50 ms", False),
        ("p99_ms", "bystander p99 ms", False),
        ("max_ms", "bystander max ms", False),
        ("p99_ratio", "p99 attacked / alone", False),
        ("baseline_p99_ms", "bystander p99 ms alone", False),
        ("history_served", "history replies served", False),
        ("history_rate_limited", "history refused (rate_limited)", False),
        ("history_connections", "history attacker connections", False),
        ("fragment_mib_sent", "fragments MiB sent", False),
        ("server_cpu_pct", "server CPU %", False),
        ("rss_growth_mib", "server memory growth MiB", False),
    ],
    "storm": [
        ("all_back_s", "s until all back", False),
        ("median_back_s", "s until the median client is back", False),
        ("clients", "clients", True),
        ("not_back", "not back at the timeout", False),
        ("retries", "retries (refused or failed)", False),
        ("server_cpu_us_per_client", "server CPU µs per client back", False),
        ("loadgen_cpu_us_per_client", "loadgen CPU µs per client", False),
        ("other_cpu_pct", "other CPU %", False),
    ],
    "store": [
        ("committed_per_s", "publications/s committed", True),
        ("commit_ms_per_batch", "ms per commit", False),
        ("rows_per_batch", "publications per commit", True),
        ("process_cpu_pct", "CPU % (loop and writer)", False),
        ("file_mib", "file MiB", False),
    ],
    "replay": [
        ("p50_ms", "p50 ms beside the replays", False),
        ("p99_ms", "p99 ms beside the replays", False),
        ("baseline_p99_ms", "p99 ms alone", False),
        ("p99_ratio", "p99 with replays / alone", False),
        ("max_ms", "max ms beside the replays", False),
        ("history_mb", "history replayed MB", False),
        ("replays", "replays completed", True),
        ("replay_mb_per_s", "replay MB/s", True),
        ("seconds_per_replay", "s per replay", False),
        ("delivered_ratio", "live delivered / expected", True),
        ("rss_growth_mib", "server memory growth MiB", False),
    ],
}
# figures that describe the run rather than the server: no ratio
NO_RATIO = {
    "fast_complete",
    "other_cpu_pct",
    "loadgen_cpu_us_per_delivery",
    "loadgen_cpu_pct",
    "connections",
    "prompt_loadgen_cpu_us_per_delivery",
}
METRICS["latency_one_topic"] = METRICS["latency"]
METRICS["topics_spread"] = METRICS["topics"]
METRICS["connect_again"] = METRICS["connect"]

TITLES = {
    "fanout": "1. Fan-out: 1 publisher -> 1,000 subscribers, one topic, 64-byte payloads, "
    "closed-loop bursts of 20 (subscribers read every 5 ms; then, prompt readers)",
    "latency": "2. Latency: 2,000 publications/s over 20 topics x 50 subscribers "
    "(1,000 subscribers, 100,000 deliveries/s)",
    "latency_one_topic": "2b. Latency: 2,000 publications/s on one topic to 1,000 subscribers "
    "(2,000,000 deliveries/s asked: a saturation test)",
    "slow": "2c. Slow subscribers: 50 that read beside 1,000 that stopped reading, one "
    "topic, 200 publications/s of 512 bytes",
    "idle": "3. Idle connections: authenticated, subscribed, idle",
    "idle100k": "3b. 100,000 idle connections over 8 workers (or as many as fit; bench.scale)",
    "connect": "4. Connect rate: TCP + WebSocket upgrade + token check, 200 in flight, "
    "each a fresh token",
    "connect_again": "4b. Reconnects: as 4, but 1,000 clients reconnecting in turn, each with "
    "its own token every time",
    "topics": "5. Many topics: 10,000 topics x 5 subscribers on 1,000 connections, "
    "publications spread round-robin",
    "topics_spread": "5b. Many topics, as 5 but from 8 publisher connections taking turns "
    "(spread over the broker's workers)",
    "abuse": "6. Abuse: a bystander's ping round trips on a worker where one client pipelines "
    "history requests (1,000 per write, 100 x 1 KiB held) and another streams 1-byte "
    "fragments with pings in between; default limits",
    "storm": "9. Reconnect storm: a restarted broker's clients (20,000, or as many as one "
    "process may hold) come back at random within 5 s, each with a token it has not seen, "
    "retrying with exponential backoff when refused (bench.storm)",
    "store": "7. History on disk: publications per second the store commits, 1,000 topics, "
    "64-byte payloads, one event loop publishing as fast as it can (bench.store)",
    "replay": "8. Replay: the latency workload (2,000 publications/s, 20 topics x 50 "
    "subscribers) while one more client replays 50 MB of history (60 kB publications, "
    "`subscribe` with `since`) again and again, against the same run without it",
}

# which figure of a workload is its headline (and the one the ratio table leads with)
PRIMARY = {
    "fanout": "cpu_us_per_delivery",
    "latency": "p99_ms",
    "latency_one_topic": "p99_ms",
    "slow": "p99_ms",
    "idle": "pss_kib_per_connection",
    "idle100k": "broadcast_median_ms",
    "connect": "connects_per_s",
    "connect_again": "connects_per_s",
    "topics": "cpu_us_per_delivery",
    "topics_spread": "cpu_us_per_delivery",
    "abuse": "p99_ms",
    "replay": "p99_ratio",
    "storm": "all_back_s",
}


def _ok(figures: dict[str, Any] | None) -> bool:
    return bool(figures) and "not_run" not in figures and "error" not in figures  # type: ignore[operator]


def headline(workload: str, figures: dict[str, Any]) -> str:
    return "  ".join(
        f"{label}={figures.get(key)}" for key, label, _ in METRICS.get(workload, [])[:4]
    )


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """broker figure / peer figure, for every figure of every workload both ran."""
    out: dict[str, Any] = {}
    for workload, runs in results.items():
        for b in BROKERS:
            if not _ok(runs.get(b)):
                continue
            for p in PEERS:
                if not _ok(runs.get(p)):
                    continue
                pair = {}
                for key, _label, _hib in METRICS.get(workload, []):
                    if key in NO_RATIO:
                        continue
                    bv, pv = runs[b].get(key), runs[p].get(key)
                    if isinstance(bv, int | float) and isinstance(pv, int | float) and pv:
                        pair[key] = round(bv / pv, 3)
                out.setdefault(workload, {})[f"{b}/{p}"] = pair
    return out


def _get(results: dict[str, Any], workload: str, name: str, key: str) -> float | None:
    figures = results.get(workload, {}).get(name)
    if not _ok(figures):
        return None
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(text: str, value: float | None, limit: float | None, below: bool) -> None:
        if value is None or limit is None:
            out.append({"target": text, "met": None, "note": "not measured in this run"})
            return
        met = value < limit if below else value >= limit
        factor = value / limit if limit else None
        out.append(
            {
                "target": text,
                "value": round(value, 3),
                "limit": round(limit, 3),
                "met": met,
                "factor": round(factor, 2) if factor is not None else None,
            }
        )

    for b in BROKERS:
        cpu = _get(results, "fanout", b, "cpu_us_per_delivery")
        add(
            f"fan-out CPU/delivery {b} below nats-server's",
            cpu,
            _get(results, "fanout", "nats", "cpu_us_per_delivery"),
            True,
        )
        sio = _get(results, "fanout", "socketio", "cpu_us_per_delivery")
        add(
            f"fan-out CPU/delivery {b} at least 5x below Socket.IO's",
            cpu,
            sio / 5 if sio else None,
            True,
        )
    for b in BROKERS:
        add(f"p99 latency {b} under 10 ms", _get(results, "latency", b, "p99_ms"), 10.0, True)
    for b in BROKERS:
        add(
            f"readers' p99 latency {b} beside 1,000 stalled subscribers under 100 ms",
            _get(results, "slow", b, "p99_ms"),
            100.0,
            True,
        )
    for b in BROKERS:
        add(
            f"memory per idle connection {b} at most 12 KiB (PSS)",
            _get(results, "idle", b, "pss_kib_per_connection"),
            12.0001,
            True,
        )
    for b in BROKERS:
        add(
            f"bystander p99 {b} beside a history pipeliner and a fragment streamer under 50 ms",
            _get(results, "abuse", b, "p99_ms"),
            50.0,
            True,
        )
    # judged only at the full size: a quick run, or a machine that fits fewer, says nothing
    held = _get(results, "idle100k", "broker-8w", "connections") or 0
    add(
        "one broadcast to 100,000 idle connections (8 workers) reaches all in under 1 s",
        _get(results, "idle100k", "broker-8w", "broadcast_median_ms") if held >= 1e5 else None,
        1000.0,
        True,
    )
    add(
        "at least 3,000 authenticated connects/s with 2 workers",
        _get(results, "connect", "broker-2w", "connects_per_s"),
        3000.0,
        False,
    )
    add(
        "history on disk: at least 100,000 publications/s committed (batched)",
        _get(results, "store", "store-ack-memory", "committed_per_s"),
        100_000.0,
        False,
    )
    for workload in ("fanout", "topics"):
        for b in BROKERS:
            off = _get(results, workload, b, "cpu_us_per_delivery")
            add(
                f"{workload}: CPU/delivery {b} with history on disk within 10 % of memory-only",
                _get(results, workload, f"{b}-store", "cpu_us_per_delivery"),
                1.1 * off if off else None,
                True,
            )
    # issue 17, target 2: a second worker costs at most 1.2x the first, per delivery, with
    # topics ordered by the hub and owned by the workers
    for workload in ("fanout", "topics", "topics_spread"):
        one = _get(results, workload, "broker-1w", "cpu_us_per_delivery")
        for b in ("broker-2w", OWNED):
            add(
                f"{workload}: CPU/delivery {b} at most 1.2x broker-1w's",
                _get(results, workload, b, "cpu_us_per_delivery"),
                1.2 * one if one else None,
                True,
            )
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


SUMMARY = [
    ("fanout", "cpu_us_per_delivery", "fan-out: server CPU µs per delivery"),
    ("fanout", "deliveries_per_s", "fan-out: deliveries/s"),
    ("latency", "p99_ms", "latency p99 ms (100,000 deliveries/s)"),
    ("slow", "p99_ms", "readers' p99 ms beside 1,000 stalled subscribers"),
    ("idle", "pss_kib_per_connection", "idle: KiB per connection (PSS)"),
    ("idle", "broadcast_median_ms", "idle: one broadcast to all, ms"),
    ("connect", "connects_per_s", "connects/s with token check"),
    ("connect_again", "server_cpu_us_per_connect", "reconnects: server CPU µs per connect"),
    ("topics", "cpu_us_per_delivery", "many topics: server CPU µs per delivery"),
    ("topics", "deliveries_per_s", "many topics: deliveries/s"),
    ("topics_spread", "cpu_us_per_delivery", "many topics, 8 publishers: CPU µs per delivery"),
    ("abuse", "p99_ms", "bystander p99 ms beside two abusive clients"),
    ("replay", "p99_ratio", "live p99 beside 50 MB replays / alone"),
]


def summary(results: dict[str, Any]) -> list[str]:
    """One line per headline figure: every server, then the broker / peer ratios."""
    pairs = [(b, p) for b in BROKERS for p in PEERS]
    head = "| figure | " + " | ".join(NAMES[n] for n in (*BROKERS, *PEERS))
    head += " | " + " | ".join(f"{NAMES[b]} / {NAMES[p]}" for b, p in pairs) + " |"
    lines = [head, "|---|" + "---|" * (len(BROKERS) + len(PEERS) + len(pairs))]
    for workload, key, label in SUMMARY:
        if workload not in results:
            continue
        values = {n: _get(results, workload, n, key) for n in (*BROKERS, *PEERS)}
        cells = [_fmt(values[n]) for n in (*BROKERS, *PEERS)]
        for b, p in pairs:
            bv, pv = values[b], values[p]
            cells.append(f"{bv / pv:.2f}x" if bv is not None and pv else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    results = doc["workloads"]
    m = doc.get("machine", {})
    lines = [
        "# Benchmark results",
        "",
        f"Run {doc.get('started', '')}{' (quick)' if doc.get('quick') else ''}, "
        f"{doc.get('seconds', '?')} s; {m.get('cpus')} CPUs ({m.get('cpu_model', '')}), "
        f"Python {m.get('python')}, broker modules {m.get('broker_modules', 'not recorded')}, "
        f"{m.get('nats_server')}, node {m.get('node')}; "
        f"`{doc.get('command', 'python -m bench.run')}`.",
        "Every server ran alone on 127.0.0.1 against the same raw-socket load generator. "
        "CPU is utime + stime of the server's whole process tree; ratios are "
        "broker / peer (below 1 is better for times and CPU, above 1 for rates). "
        '"other CPU %" is what the rest of the machine used meanwhile (noise when not 0); '
        f"before the run it was {m.get('background_cpu_pct', '?')}%.",
        "",
    ]
    lines += ["## Summary", "", *summary(results), ""]
    for workload, runs in results.items():
        metrics = METRICS.get(workload, [])
        lines += [f"## {TITLES.get(workload, workload)}", ""]
        lines.append("| server | " + " | ".join(label for _, label, _ in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        notes = []
        for name, figures in runs.items():
            if not _ok(figures):
                reason = figures.get("not_run") or figures.get("error")
                lines.append(f"| {name} | " + " | ".join("-" for _ in metrics) + " |")
                notes.append(f"- {name}: {reason}")
                continue
            cells = [_fmt(figures.get(key)) for key, _, _ in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            trouble = {k: v for k in ("errors", "closes") if (v := figures.get(k))}
            if trouble:
                notes.append(f"- {name}: {trouble}")
        ratio_rows = doc.get("ratios", {}).get(workload, {})
        if ratio_rows:
            lines += ["", "| ratio | " + " | ".join(label for _, label, _ in metrics) + " |"]
            lines.append("|---|" + "---|" * len(metrics))
            for pair, values in ratio_rows.items():
                cells = [f"{values[key]:.2f}x" if key in values else "-" for key, _, _ in metrics]
                lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        if notes:
            lines += ["", *notes]
        lines.append("")
    lines += ["## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in doc.get("targets", []):
        if t["met"] is None:
            lines.append(f"| {t['target']} | - | - | not measured |")
        else:
            verdict = "yes" if t["met"] else f"no ({t['factor']}x the limit)"
            lines.append(f"| {t['target']} | {_fmt(t['value'])} | {_fmt(t['limit'])} | {verdict} |")
    lines.append("")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    """Bar charts of fan-out CPU per delivery and deliveries per second; False without
    matplotlib or figures."""
    try:
        import matplotlib
    except ImportError:
        # the suite's one Python dependency beyond the broker's: install it into this venv
        pip = [sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"]
        try:
            subprocess.run(pip, check=True, timeout=300)
            import matplotlib
        except (OSError, subprocess.SubprocessError, ImportError) as exc:
            print(f"no chart: matplotlib is not available ({exc})", file=sys.stderr)
            return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {n: f for n, f in results.get("fanout", {}).items() if _ok(f)}
    if not runs:
        return False
    names = [LABELS.get(n, n) for n in runs]
    colors = ["#2b6cb0" if n.startswith("broker") else "#a0aec0" for n in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    cpu = [f["cpu_us_per_delivery"] or 0 for f in runs.values()]
    rate = [f["deliveries_per_s"] / 1e6 for f in runs.values()]
    ax1.bar(names, cpu, color=colors)
    ax1.set_title("server CPU per delivery (µs, lower is better)")
    ax2.bar(names, rate, color=colors)
    ax2.set_title("deliveries per second (millions)")
    for ax, values in ((ax1, cpu), (ax2, rate)):
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=9)
    fig.suptitle("Fan-out: 1 publisher -> 1,000 subscribers, 64-byte payloads, bursts of 20")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
