"""Prometheus metrics, read from the store at scrape time into a per-app registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.progress import ProgressBoard
from coordinator.progress_models import PEER_FIELD
from coordinator.service import Coordinator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CoordinatorCollector(Collector):
    """Workers by status, the default site's generation and every site's, the last decided
    outer round, heartbeats, each worker's last loss/step/throughput/learning rate/grad norm
    and its links to its peers (its latest telemetry row), and who is stalled (``board``)."""

    def __init__(self, coordinator: Coordinator, board: ProgressBoard | None = None) -> None:
        self.coordinator = coordinator
        self.board = board

    def collect(self) -> Iterator[Metric]:
        store = self.coordinator.store
        workers = GaugeMetricFamily("zerop2p_workers", "Workers by status", labels=["status"])
        for status, count in store.count_by_status().items():
            workers.add_metric([status], count)
        yield workers
        gen = store.current_generation()
        yield GaugeMetricFamily("zerop2p_generation",
                                "The active generation's number (0 when none is active)",
                                value=gen.generation if gen else 0)
        yield GaugeMetricFamily("zerop2p_generation_size", "Members of the active generation",
                                value=len(gen.members) if gen else 0)
        sites = GaugeMetricFamily("zerop2p_site_generation",
                                  "Each site's active generation (sites with none are absent)",
                                  labels=["site"])
        for site, number in sorted(store.active_numbers().items()):
            sites.add_metric([site], number)
        yield sites
        yield GaugeMetricFamily("zerop2p_outer_round", "The last decided outer round (0: none)",
                                value=store.last_round())
        yield CounterMetricFamily("zerop2p_heartbeats", "Heartbeats received since start",
                                  value=self.coordinator.heartbeats_received)
        loss = GaugeMetricFamily("zerop2p_worker_loss", "Last reported loss",
                                 labels=["worker_id"])
        step = GaugeMetricFamily("zerop2p_worker_step", "Last reported step",
                                 labels=["worker_id"])
        for w in store.workers():
            if w.loss is not None:
                loss.add_metric([w.worker_id], w.loss)
            if w.step is not None:
                step.add_metric([w.worker_id], w.step)
        yield loss
        yield step
        yield from self._training(store)
        if self.board is not None:
            yield from self._stalls(store)

    def _training(self, store) -> Iterator[Metric]:
        """Throughput, schedule and links, from each worker's row and latest telemetry."""
        tokens = GaugeMetricFamily("zerop2p_worker_tokens_per_second",
                                   "Last reported training throughput (tokens/s)",
                                   labels=["worker_id"])
        lr = GaugeMetricFamily("zerop2p_worker_learning_rate", "Last reported learning rate",
                               labels=["worker_id"])
        norm = GaugeMetricFamily("zerop2p_worker_grad_norm",
                                 "Last reported global gradient norm", labels=["worker_id"])
        rtt = GaugeMetricFamily("zerop2p_peer_rtt_seconds",
                                "Round trip of the last Ping from a worker to a peer rank",
                                labels=["worker_id", "peer_rank"])
        rate = GaugeMetricFamily("zerop2p_peer_send_bytes_per_second",
                                 "Send rate from a worker to a peer rank while pushes to it "
                                 "were in flight", labels=["worker_id", "peer_rank"])
        for w in store.workers("alive"):
            if w.tokens_per_s is not None:
                tokens.add_metric([w.worker_id], w.tokens_per_s)
            rows = store.telemetry(w.worker_id, 1)
            latest = rows[-1][2] if rows else {}
            for family, name in ((lr, "lr"), (norm, "grad_norm")):
                if isinstance(latest.get(name), int | float):
                    family.add_metric([w.worker_id], latest[name])
            for name, value in latest.items():
                if (m := PEER_FIELD.match(name)) and isinstance(value, int | float):
                    rank, kind = m.groups()
                    if kind == "rtt_ms":
                        rtt.add_metric([w.worker_id, rank], value / 1e3)
                    else:
                        rate.add_metric([w.worker_id, rank], value * 1e6)
        yield from (tokens, lr, norm, rtt, rate)

    def _stalls(self, store) -> Iterator[Metric]:
        """Who is stalled in each site's active generation (coordinator/progress.py)."""
        count = GaugeMetricFamily("zerop2p_stalled_ranks",
                                  "Ranks of the site's active generation that are stalled",
                                  labels=["site"])
        stalled = GaugeMetricFamily("zerop2p_rank_stalled", "1 if the rank is stalled, else 0",
                                    labels=["site", "rank", "worker_id"])
        silent = GaugeMetricFamily("zerop2p_rank_silent_seconds",
                                   "Seconds since the rank's trainer last reported progress",
                                   labels=["site", "rank", "worker_id"])
        for site in sorted(store.active_numbers()):
            status = self.board.status(site)
            count.add_metric([site], len(status.stalled))
            for r in status.ranks:
                labels = [site, str(r.rank), r.worker_id]
                stalled.add_metric(labels, 1 if r.stalled else 0)
                if r.silent_s is not None:
                    silent.add_metric(labels, r.silent_s)
        yield from (count, stalled, silent)


def make_registry(coordinator: Coordinator, board: ProgressBoard | None = None
                  ) -> CollectorRegistry:
    """A registry of its own, so several apps in one process never clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator, board))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
