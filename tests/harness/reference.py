"""Single-process training of the same model on the same global batches: the parity baseline.

Nothing here is sharded: plain ``torch.optim`` on the full model, the global micro-batch of
every step (rank 0 of world size 1), the same optimizer, schedule and clipping definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.train.config import TrainConfig
from worker.train.optim import build_optimizer, build_scheduler
from worker.train.trainer import rank_micro_batch


@dataclass(slots=True, kw_only=True)
class ReferenceResult:
    """Per-step losses and grad norms, and the final trainable weights by parameter name."""

    losses: list[float]
    grad_norms: list[float]
    weights: dict[str, torch.Tensor]


def train_reference(config: TrainConfig, model: nn.Module, data) -> ReferenceResult:
    """Train ``model`` (already built and LoRA-wrapped like the workers') for ``config.steps``."""
    device = torch.device(config.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    losses, norms = [], []
    for step in range(config.steps):
        total = 0.0
        for micro in range(config.grad_accum):
            batch = rank_micro_batch(data, config, step=step, micro=micro, rank=0, world_size=1,
                                     device=device)
            loss = model(**batch).loss.float()
            (loss / config.grad_accum).backward()
            total += float(loss.detach()) / config.grad_accum
        max_norm = config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(float(norm))
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return ReferenceResult(losses=losses, grad_norms=norms, weights=weights)
