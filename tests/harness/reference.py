"""Single-process training of the same model on the same global batches: the parity baseline.

Nothing here is sharded: plain ``torch.optim`` on the full model, the global micro-batch of
every step (rank 0 of world size 1), the same optimizer, schedule and clipping definitions.
Under mixed precision it follows the engine's policy, so a sharded bf16 run is compared with a
bf16 run, not with float32: parameters compute in the compute dtype, gradients are accumulated
in float32 on float32 master copies (divided by the fp16 loss scale), the optimizer steps the
masters, and the model gets them back in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.models.dtypes import compute_dtype
from worker.train.config import TrainConfig
from worker.train.optim import build_optimizer, build_scheduler
from worker.train.trainer import FP16_LOSS_SCALE, rank_micro_batch


@dataclass(slots=True, kw_only=True)
class ReferenceResult:
    """Per-step losses and grad norms, the initial and final trainable weights by name."""

    losses: list[float]
    grad_norms: list[float]
    weights: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]


def train_reference(config: TrainConfig, model: nn.Module, data) -> ReferenceResult:
    """Train ``model`` (already built and LoRA-wrapped like the workers') for ``config.steps``."""
    device = torch.device(config.device)
    model.to(device)
    dtype = compute_dtype(config.mixed_precision)
    scale = FP16_LOSS_SCALE if config.mixed_precision == "fp16" else 1.0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = [nn.Parameter(p.detach().float().clone()) for _, p in named]
    for p in model.parameters():  # buffers keep their dtype, as in the engine
        p.data = p.data.to(dtype)
    optimizer = build_optimizer(masters, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    initial = {n: m.detach().cpu().clone() for (n, _), m in zip(named, masters)}
    losses, norms = [], []
    for step in range(config.steps):
        total = 0.0
        grads = [torch.zeros_like(m) for m in masters]
        for micro in range(config.grad_accum):
            batch = rank_micro_batch(data, config, step=step, micro=micro, rank=0, world_size=1,
                                     device=device)
            loss = model(**batch).loss.float()
            (loss * (scale / config.grad_accum)).backward()
            total += float(loss.detach()) / config.grad_accum
            for g, (_, p) in zip(grads, named):  # accumulated in fp32, as the engine does
                if p.grad is not None:
                    g += p.grad.float()
                    p.grad = None
        for m, g in zip(masters, grads):
            m.grad = g / scale if scale != 1.0 else g
        max_norm = config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(masters, max_norm if max_norm else float("inf"))
        if torch.isfinite(norm):  # an overflowing fp16 step is skipped, schedule included
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, (_, p) in zip(masters, named):
                p.copy_(m.to(dtype))
        losses.append(total)
        norms.append(float(norm))
    weights = {n: m.detach().cpu().clone() for (n, _), m in zip(named, masters)}
    return ReferenceResult(losses=losses, grad_norms=norms, weights=weights, initial=initial)
