"""Prometheus metrics, read from the store at scrape time into a per-app registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.service import Coordinator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CoordinatorCollector(Collector):
    """Workers by status, the default site's generation and every site's, the last decided
    outer round, heartbeats, each worker's last loss/step."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

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


def make_registry(coordinator: Coordinator) -> CollectorRegistry:
    """A registry of its own, so several apps in one process never clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
