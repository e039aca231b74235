"""``zerop2p worker --serve``: join like a training worker, then run the service's operation
loop in each generation instead of the trainer (rejoining after a lost peer, as training does)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from worker.engine.progress import Observer
from worker.main import GenerationRunner, WorkerConfig, build_collectives, run_worker
from worker.serve.channel import ServiceChannel
from worker.serve.loop import OperationLoop, ServeConfig

log = logging.getLogger(__name__)


def serving_runner(serve: ServeConfig):
    """A ``run_worker`` runner whose generations serve operations."""
    def factory(cfg: WorkerConfig) -> GenerationRunner:
        def run(cfg, gen, transport, membership, observers, between) -> int:
            collectives = build_collectives(cfg, gen, transport)
            membership.update_status(phase="serve")
            try:
                channel = ServiceChannel(membership, generation=gen.generation)
                return OperationLoop(cfg.train, serve, collectives, channel,
                                     generation=gen.generation).run()
            finally:
                collectives.close()
        return run
    return factory


def serve_worker(cfg: WorkerConfig, serve: ServeConfig, *,
                 observers: Sequence[Observer] = ()) -> int:
    """Serve until interrupted (or idle for ``serve.idle_exit`` s); returns the exit code."""
    log.info("%s serving sessions under %s", cfg.worker_id, serve.root)
    return run_worker(cfg, observers=observers, runner=serving_runner(serve))
