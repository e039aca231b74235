"""One process training the whole model on whole global micro-batches: what a sharded run
must reproduce (``zerop2p doctor``'s baseline, and the parity tests' reference).

Nothing is sharded: plain ``torch.optim`` on the full model, the global micro-batch of every
step (rank 0 of world size 1), the optimizer, schedule, weight decay and clipping of
optim.py, the micro-batches of trainer.py. Under mixed precision it follows the engine's
policy, so a bf16 sharded run is compared with a bf16 run, not with float32: parameters compute
in the compute dtype, gradients accumulate in float32 on float32 master copies (divided by the
fp16 loss scale), the optimizer steps the masters, and the model gets them back in the compute
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.models.dtypes import compute_dtype
from worker.train.config import TrainConfig
from worker.train.optim import build_optimizer, build_scheduler, whole_decay_ranges
from worker.train.trainer import FP16_LOSS_SCALE, rank_micro_batch


@dataclass(slots=True, kw_only=True)
class SingleResult:
    """Per-step losses and grad norms, the initial and final trainable weights by name."""

    losses: list[float]
    grad_norms: list[float]
    weights: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]


class SingleProcess:
    """One process training the whole model on whole global micro-batches (or, for an island
    of a DiLoCo reference, on the island's share: ``rank`` of ``world_size`` with ``rows``)."""

    def __init__(self, config: TrainConfig, model: nn.Module, data, *, rank: int = 0,
                 world_size: int = 1, rows: int | None = None) -> None:
        self.config, self.model, self.data = config, model, data
        self.rank, self.world_size, self.rows = rank, world_size, rows
        self.device = torch.device(config.device)
        model.to(self.device)
        self.dtype = compute_dtype(config.mixed_precision)
        self.scale = FP16_LOSS_SCALE if config.mixed_precision == "fp16" else 1.0
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.masters = [nn.Parameter(p.detach().float().clone()) for _, p in self.named]
        for p in model.parameters():  # buffers keep their dtype, as in the engine
            p.data = p.data.to(self.dtype)
        self.restart_optimizer()

    def restart_optimizer(self, *, at_step: int = 0) -> None:
        """A fresh optimizer and schedule, the schedule advanced to ``at_step``."""
        self.optimizer = build_optimizer(  # no decay for biases and norms, as the workers
            self.masters, self.config.optim,
            whole_decay_ranges(self.model, [n for n, _ in self.named]))
        self.scheduler = build_scheduler(self.optimizer, self.config.optim, self.config.steps)
        for _ in range(at_step):
            self.scheduler.step()

    def weights(self) -> dict[str, torch.Tensor]:
        """The fp32 masters by parameter name, on the CPU."""
        return {n: m.detach().cpu().clone() for (n, _), m in zip(self.named, self.masters)}

    def load_masters(self, values: list[torch.Tensor]) -> None:
        """Set the masters (and the model's compute copies) to ``values``."""
        with torch.no_grad():
            for m, v, (_, p) in zip(self.masters, values, self.named):
                m.copy_(v)
                p.copy_(m.to(self.dtype))

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step on ``step``'s rows; (loss, grad norm)."""
        config, total = self.config, 0.0
        grads = [torch.zeros_like(m) for m in self.masters]
        for micro in range(config.grad_accum):
            batch = rank_micro_batch(self.data, config, step=step, micro=micro, rank=self.rank,
                                     world_size=self.world_size, device=self.device,
                                     rows=self.rows)
            loss = self.model(**batch).loss.float()
            (loss * (self.scale / config.grad_accum)).backward()
            total += float(loss.detach()) / config.grad_accum
            for g, (_, p) in zip(grads, self.named):  # accumulated in fp32, as the engine does
                if p.grad is not None:
                    g += p.grad.float()
                    p.grad = None
        for m, g in zip(self.masters, grads):
            m.grad = g / self.scale if self.scale != 1.0 else g
        max_norm = config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.masters,
                                              max_norm if max_norm else float("inf"))
        if torch.isfinite(norm):  # an overflowing fp16 step is skipped, schedule included
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, (_, p) in zip(self.masters, self.named):
                p.copy_(m.to(self.dtype))
        return total, float(norm)


def train_single_process(config: TrainConfig, model: nn.Module, data,
                         steps: int | None = None) -> SingleResult:
    """Train ``model`` (built and LoRA-wrapped like the workers') for ``steps`` steps
    (default ``config.steps``) on whole global micro-batches."""
    run = SingleProcess(config, model, data)
    initial = run.weights()
    losses, norms = [], []
    for step in range(config.steps if steps is None else steps):
        loss, norm = run.step(step)
        losses.append(loss)
        norms.append(norm)
    return SingleResult(losses=losses, grad_norms=norms, weights=run.weights(), initial=initial)
