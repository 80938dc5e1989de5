"""The operations listener's backend for the one-process broker: its workers run in the
listener's own trio loop, so it reads their figures directly and uses the first one's bus.
(With several worker processes the supervisor's backend asks them over the hub instead.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from broker.brokermetrics import snapshot_from_stats
from broker.bus.base import HistoryResult, Publication, StreamPosition
from broker.metrics import merge, render
from broker.protocol import check_data_size
from broker.topics import validate_pattern, validate_topic

if TYPE_CHECKING:
    from broker.worker import Worker

__all__ = ["WorkerBackend"]


class WorkerBackend:
    """The :class:`~broker.http.routes.OpsBackend` of workers that run in the listener's own trio loop (the
    one-process broker): it reads their figures directly and uses the first one's bus.

    ``ws_port`` is the WebSocket listener's port, for the pages. ``extra_metrics`` returns
    snapshots to add to ``/metrics`` (a registry with the handshake histogram, say)."""

    def __init__(
        self,
        workers: Sequence[Worker],
        *,
        ws_port: int,
        extra_metrics: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ) -> None:
        if not workers:
            raise ValueError("at least one worker")
        self.workers = list(workers)
        self.ws_port = ws_port
        self.extra_metrics = extra_metrics

    def ready(self) -> tuple[bool, dict[str, object]]:
        up = {str(w.index): bool(w.accepting) for w in self.workers}
        bus = all(w.bus.is_up for w in self.workers)
        return all(up.values()) and bus, {"workers": up, "bus": bus}

    async def metrics_text(self) -> str:
        extra = list(self.extra_metrics()) if self.extra_metrics else []
        snaps = [snapshot_from_stats(w.stats()) for w in self.workers]
        return render(merge([*snaps, *extra]))

    async def stats(self) -> dict[str, Any]:
        return {"workers": [w.stats() for w in self.workers]}

    async def publish(self, topic: str, data_json: str) -> Publication:
        worker = self.workers[0]
        check_data_size(data_json, worker.config.limits.max_data_size)
        return await worker.bus.publish(topic, data_json, None)

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int, *, newest: bool = False
    ) -> HistoryResult:
        return await self.workers[0].bus.history(topic, since, limit, newest=newest)

    async def presence(self, topic: str) -> list[str]:
        self.workers[0].config.presence.check(topic)
        return await self.workers[0].bus.presence(topic)

    async def disconnect(self, client_id: str) -> int:
        closed = 0
        for worker in self.workers:
            for session in list(worker.sessions.values()):
                if session.identity is not None and session.identity.client == client_id:
                    session.close(1008, "disconnected by the operator")
                    closed += 1
        return closed

    def validate_topic(self, topic: str, wildcard: bool = False) -> None:
        if wildcard:
            validate_pattern(topic)
        else:
            validate_topic(topic)

    def info(self) -> dict[str, object]:
        worker = self.workers[0]
        tls = getattr(worker, "ssl_context", None) is not None
        return {
            "ws_port": self.ws_port,
            "ws_scheme": "wss" if tls else "ws",
            "node": worker.node,
            "workers": len(self.workers),
        }
