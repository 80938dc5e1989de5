"""A small Prometheus metrics registry: counters, gauges and histograms, and the text format.

Theory of operation
-------------------
Every worker process keeps its own :class:`Registry` and updates it with plain method calls
(no locks: a worker is one trio thread). Nothing here does I/O. To show one view over every
worker, each worker hands :meth:`Registry.snapshot` to whoever serves ``/metrics``; a snapshot is
a plain, JSON- and pickle-friendly ``dict``, so it crosses a pipe or a Unix socket as it is.
:func:`merge` folds several snapshots into one (samples with the same labels are added up,
samples with different labels are kept side by side) and :func:`render` writes the result in
the Prometheus text exposition format 0.0.4.

A worker labels its samples with ``worker="N"`` by creating its registry with
``Registry(const_labels={"worker": "0"})``; Prometheus then sums across workers with
``sum without (worker) (...)``.

:mod:`broker.brokermetrics` declares the broker's own metric families on a registry, and
builds its snapshots; this module knows nothing of them.

Snapshot layout (stable: the supervisor may receive snapshots from workers of the same build)::

    {"pubsub_connections": {"type": "gauge", "help": "...", "samples": [[{"worker": "0"}, 12.0]]},
     "pubsub_handshake_seconds": {"type": "histogram", "help": "...",
        "buckets": [0.001, ...],
        "samples": [[{"worker": "0"}, {"counts": [...], "sum": 0.42, "count": 17}]]}}

Histogram ``counts`` are per bucket (not cumulative), with a last entry for ``+Inf``.
"""

from __future__ import annotations

import abc
import bisect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "Snapshot",
    "merge",
    "render",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelKey = tuple[tuple[str, str], ...]
Snapshot = dict[str, dict[str, Any]]


def _check_name(name: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.match(name) or name.startswith("__"):
        raise ValueError(f"invalid metric {what}: {name!r}")


class _Family(abc.ABC):
    """What every metric family shares: a name, a help text, label names and children."""

    kind = ""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str], const: Mapping[str, str] | None
    ) -> None:
        const = const or {}
        _check_name(name, _NAME_RE, "name")
        for label in (*labelnames, *const):
            _check_name(label, _LABEL_RE, "label name")
        if len(set(labelnames) | set(const)) != len(labelnames) + len(const):
            raise ValueError(f"{name}: repeated label name")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._const = tuple(sorted(const.items()))

    def _key(self, labels: Mapping[str, str]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} given, {sorted(self.labelnames)} expected"
            )
        return tuple(sorted((*self._const, *((k, str(v)) for k, v in labels.items()))))

    @abc.abstractmethod
    def _sample_items(self) -> list[list[Any]]:
        """The family's samples as ``[labels, value]`` pairs, for :meth:`snapshot`."""

    def snapshot(self) -> dict[str, Any]:
        return {"type": self.kind, "help": self.help, "samples": self._sample_items()}


class Counter(_Family):
    """A value that only goes up. ``inc(amount, **labels)``."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        const: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames, const)
        self._values: dict[LabelKey, float] = {}
        if not labelnames:
            self._values[self._key({})] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def _sample_items(self) -> list[list[Any]]:
        return [[dict(k), v] for k, v in self._values.items()]


class Gauge(_Family):
    """A value that goes up and down: ``set``, ``inc``, ``dec``; or ``set_function(fn)`` to read
    it when a snapshot is taken (``fn`` returns a number, or for a labelled gauge a mapping from
    a label-value tuple to a number)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        const: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames, const)
        self._values: dict[LabelKey, float] = {}
        self._fn: Callable[[], Any] | None = None
        if not labelnames:
            self._values[self._key({})] = 0.0

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], Any]) -> None:
        self._fn = fn

    def value(self, **labels: str) -> float:
        if self._fn is not None:
            for key, v in self._read_fn():
                if key == self._key(labels):
                    return v
            return 0.0
        return self._values.get(self._key(labels), 0.0)

    def _read_fn(self) -> list[tuple[LabelKey, float]]:
        assert self._fn is not None
        result = self._fn()
        if not self.labelnames:
            return [(self._key({}), float(result))]
        return [
            (self._key(dict(zip(self.labelnames, values, strict=True))), float(v))
            for values, v in result.items()
        ]

    def _sample_items(self) -> list[list[Any]]:
        items = self._read_fn() if self._fn is not None else list(self._values.items())
        return [[dict(k), v] for k, v in items]


class Histogram(_Family):
    """Observations counted into buckets: ``observe(value, **labels)``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        const: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames, const)
        if "le" in self.labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing and not empty")
        self.buckets = tuple(bounds)
        # Per label set: counts per bucket (the last one is +Inf), sum, count.
        self._values: dict[LabelKey, tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._child(self._key({}))

    def _child(self, key: LabelKey) -> tuple[list[int], list[float]]:
        child = self._values.get(key)
        if child is None:
            child = self._values[key] = ([0] * (len(self.buckets) + 1), [0.0])
        return child

    def observe(self, value: float, **labels: str) -> None:
        counts, total = self._child(self._key(labels))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def count(self, **labels: str) -> int:
        child = self._values.get(self._key(labels))
        return sum(child[0]) if child else 0

    def sample(self, **labels: str) -> dict[str, Any]:
        """One label set's observations as plain data: ``{"counts", "sum", "count"}``."""
        counts, total = self._child(self._key(labels))
        return {"counts": list(counts), "sum": total[0], "count": sum(counts)}

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        snap["buckets"] = list(self.buckets)
        return snap

    def _sample_items(self) -> list[list[Any]]:
        return [
            [dict(k), {"counts": list(counts), "sum": total[0], "count": sum(counts)}]
            for k, (counts, total) in self._values.items()
        ]


class Registry:
    """One process's metric families. ``const_labels`` are added to every sample
    (``{"worker": "0"}``)."""

    def __init__(self, const_labels: Mapping[str, str] | None = None) -> None:
        self.const_labels = dict(const_labels or {})
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> Any:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} declared twice")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        family: Counter = self._add(Counter(name, help, labelnames, self.const_labels))
        return family

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        family: Gauge = self._add(Gauge(name, help, labelnames, self.const_labels))
        return family

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        family: Histogram = self._add(Histogram(name, help, buckets, labelnames, self.const_labels))
        return family

    def snapshot(self) -> Snapshot:
        """The current values as a plain dict (see the module docstring for its layout)."""
        return {name: family.snapshot() for name, family in self._families.items()}

    def render(self) -> str:
        return render(self.snapshot())


def _label_key(labels: Mapping[str, Any]) -> LabelKey:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Fold several snapshots into one. Samples of the same family with the same labels are
    added up (counters, gauges, histogram buckets, sums and counts); a family's type, help and
    buckets come from its first appearance, and a later snapshot that disagrees on the type or
    buckets has that family skipped rather than mixed into nonsense."""
    merged: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[LabelKey, Any]] = {}
    for snap in snapshots:
        for name, family in snap.items():
            kind = family.get("type")
            head = merged.get(name)
            if head is None:
                head = merged[name] = {"type": kind, "help": family.get("help", "")}
                if kind == "histogram":
                    head["buckets"] = list(family.get("buckets", []))
                values[name] = {}
            elif head["type"] != kind or (
                kind == "histogram" and head["buckets"] != list(family.get("buckets", []))
            ):
                continue
            acc = values[name]
            for labels, value in family.get("samples", []):
                key = _label_key(labels)
                if kind == "histogram":
                    old = acc.get(key)
                    if old is None:
                        acc[key] = {
                            "counts": list(value["counts"]),
                            "sum": value["sum"],
                            "count": value["count"],
                        }
                    else:
                        old["counts"] = [
                            a + b for a, b in zip(old["counts"], value["counts"], strict=True)
                        ]
                        old["sum"] += value["sum"]
                        old["count"] += value["count"]
                else:
                    acc[key] = acc.get(key, 0.0) + float(value)
    for name, head in merged.items():
        head["samples"] = [[dict(k), v] for k, v in values[name].items()]
    return merged


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _fmt_labels(labels: Mapping[str, Any], extra: tuple[str, str] | None = None) -> str:
    items = sorted((str(k), str(v)) for k, v in labels.items())
    if extra is not None:
        items.append(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in items) + "}"


def render(snapshot: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4) of a (merged) snapshot: a HELP and
    a TYPE line per family, then its samples sorted by labels; histograms as cumulative
    ``_bucket{le=...}`` samples plus ``_sum`` and ``_count``."""
    lines: list[str] = []
    for name in sorted(snapshot):
        family = snapshot[name]
        kind = family.get("type", "untyped")
        lines.append(f"# HELP {name} {_escape_help(str(family.get('help', '')))}")
        lines.append(f"# TYPE {name} {kind}")
        samples = sorted(family.get("samples", []), key=lambda s: _label_key(s[0]))
        for labels, value in samples:
            if kind == "histogram":
                cumulative = 0
                bounds = [*family.get("buckets", []), math.inf]
                for bound, count in zip(bounds, value["counts"], strict=True):
                    cumulative += count
                    le = _fmt_value(bound) if math.isinf(bound) else repr(float(bound))
                    lines.append(f"{name}_bucket{_fmt_labels(labels, ('le', le))} {cumulative}")
                lines.append(f"{name}_sum{_fmt_labels(labels)} {_fmt_value(value['sum'])}")
                lines.append(f"{name}_count{_fmt_labels(labels)} {_fmt_value(value['count'])}")
            else:
                lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(value)}")
    return "\n".join(lines) + "\n"
