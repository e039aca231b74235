"""Finishing a step's gradients: one exact all-reduce carries the owned slices' squared norm,
the caller's extra numbers (loss, tokens) and the replicated parameters' gradient bucket; then
the global norm and torch's clipping, on owned slices and replicated masters alike."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from communication.collectives import Collectives
from worker.engine.config import ShardConfig
from worker.engine.replicated import ReplicatedParams
from worker.engine.unit import ShardedUnit


class GradientOwner(Protocol):
    """What this module reads of the engine (which calls it: no import back)."""

    units: list[ShardedUnit]
    replicated: ReplicatedParams
    collectives: Collectives
    config: ShardConfig

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...


def finish_gradients(engine: GradientOwner, max_norm: float | None, *,
                     extra: torch.Tensor | None = None, loss_scale: float = 1.0
                     ) -> tuple[float, torch.Tensor | None]:
    """Unscale by ``loss_scale``, reduce, take the global norm, clip; (norm, summed extra)."""
    grads = [u.master.grad for u in engine.units if u.trains and u.master.grad is not None]
    if loss_scale != 1.0:
        for g in grads:
            g.div_(loss_scale)
    local = torch.zeros(1, dtype=torch.float32, device=engine.config.device)
    for g in grads:
        local += g.float().pow(2).sum()
    n_extra = 0 if extra is None else extra.numel()
    parts = [local] + ([extra.detach().to(local).reshape(-1)] if extra is not None else [])
    if engine.replicated.trainable:
        parts.append(engine.replicated.take_bucket().to(local))
    total = engine.all_reduce_sum(torch.cat(parts))
    sq = float(total[0])
    if engine.replicated.trainable:
        scale = 1.0 / (engine.collectives.world_size * loss_scale)
        bucket = total[1 + n_extra :]
        engine.replicated.set_grads(bucket, scale)
        sq += float(bucket.pow(2).sum()) * scale * scale  # one reduction, not one per parameter
        grads += [m.grad for m in engine.replicated.masters]
    norm = math.sqrt(sq)
    if max_norm is not None and max_norm > 0:
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm, (total[1 : 1 + n_extra] if extra is not None else None)
