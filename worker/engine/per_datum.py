"""A measuring backward: the squared L2 norm of this rank's whole local gradient, every unit
and every replicated parameter, with nothing kept, reduce-scattered or all-reduced.

Before its reduce-scatter a unit's gradient is whole on the rank that computed it, so the
gradient of a micro-batch of one datum can be measured without communicating: differential
privacy's per-datum clipping needs exactly this norm (worker/serve/privacy.py). Each unit's
flat gradient is squared and summed the moment it is taken, then dropped, so the measuring
backward holds no more than a normal one; units are still gathered as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from worker.engine.replicated import ReplicatedParams
from worker.engine.unit import ShardedUnit

log = logging.getLogger(__name__)


class MeasuredModel(Protocol):
    """What this module reads of the engine (which never imports it: no import back)."""

    units: list[ShardedUnit]
    replicated: ReplicatedParams

    def backward(self, loss: torch.Tensor, *, sync_grads: bool = True) -> None: ...


class SquaredNorm:
    """Running sum of squares of every gradient handed to it (fp32, on the gradient's device)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def __call__(self, grad: torch.Tensor) -> None:
        sq = grad.detach().float().pow(2).sum()
        self.total = sq if self.total is None else self.total + sq.to(self.total.device)

    @property
    def value(self) -> float:
        return 0.0 if self.total is None else float(self.total)


@contextmanager
def measuring(engine: MeasuredModel) -> Iterator[SquaredNorm]:
    """While inside, every local gradient goes to the yielded meter instead of being kept."""
    meter = SquaredNorm()
    sinks = [*engine.units, engine.replicated]
    busy = [s for s in sinks if s.grad_sink is not None]
    if busy:
        raise RuntimeError(f"a measuring backward is already active on {len(busy)} units; "
                           "measurements do not nest")
    for s in sinks:
        s.grad_sink = meter
    try:
        yield meter
    finally:
        for s in sinks:
            s.grad_sink = None


def grad_sq_norm(engine: MeasuredModel, loss: torch.Tensor) -> float:
    """Backward of ``loss`` (after a training forward) that returns the squared norm of its
    gradient over every trainable parameter on this rank and discards the gradient. Owned
    gradients, locally kept ones and the replicated bucket are left exactly as they were."""
    with measuring(engine) as meter:
        engine.backward(loss, sync_grads=False)
    return meter.value
