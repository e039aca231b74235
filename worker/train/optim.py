"""Optimizer and LR schedule over owned slices, built exactly as for a plain model.

Element-wise optimizers (AdamW, SGD) give the same update on a flat slice as on the parameters
it was cut from, so ``torch.optim`` is used as is and the single-process reference shares this
code: one definition of the hyper-parameters, no re-implemented update rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Optimizer, LR schedule and clipping; validated with the offending value in the message."""

    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def build_optimizer(params, config: OptimConfig) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer with single-tensor kernels (same arithmetic on every rank)."""
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, foreach=False)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """Constant, linear or cosine decay after a linear warm-up (transformers' definitions)."""
    from transformers import get_scheduler  # lazy: transformers

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=max(total_steps, 1))
