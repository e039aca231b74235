"""Optimizer, LR schedule and weight decay over owned slices, built exactly as for a plain model.

Element-wise optimizers (AdamW, SGD) give the same update on a flat slice as on the parameters
it was cut from, so ``torch.optim`` is used as is and the single-process reference shares this
code: one definition of the hyper-parameters, no re-implemented update rule.

[Note: weight decay by element]
Biases and normalisation weights (LayerNorm, RMSNorm) are not decayed, every other trainable
parameter is: the Hugging Face Trainer's convention (``decay_all`` decays everything). An owned
master slice holds a whole unit's parameters end to end, a bias next to a matrix, so decay
cannot be a per-tensor param group. Each optimizer tensor instead carries its *decay ranges*:
the element ranges ``[a, b)`` of it that decay, cut from the unit's layout slots by the rank's
owned range (``engine_decay_ranges``), or one range or none for a whole parameter
(``whole_decay_ranges``, the reference's). torch.optim steps with ``weight_decay`` 0 and a step
pre-hook applies the decay to those ranges with torch's own arithmetic: AdamW's decoupled
``p *= 1 - lr * wd`` and SGD's coupled ``g += wd * p``. Decaying every range is therefore
torch's weight decay bit for bit, and sharded and single-process runs decay the same elements.
Outside a step ``param_groups[i]["weight_decay"]`` holds the configured value (manifests record
it, a checkpoint restores it); the hooks set it to 0 only while torch steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.sharding import owned_range

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
# transformers.Trainer.get_decay_parameter_names' name patterns, on the lower-cased name.
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

Ranges = list[tuple[int, int]]


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Optimizer, LR schedule and clipping; validated with the offending value in the message."""

    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    decay_all: bool = False  # True: decay biases and norm weights too (see the note above)
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
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, batch norms, and any class named like one (LlamaRMSNorm)."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, kinds) or "norm" in type(module).__name__.lower()


def decays(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` is decayed: not a bias, not in a norm module."""
    owner = name.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    return not (is_norm(module) or NO_DECAY_NAMES.search(name.lower()))


def whole_decay_ranges(model: nn.Module, names: Sequence[str]) -> list[Ranges]:
    """Decay ranges of whole parameters ``names`` (an optimizer over them, in that order)."""
    params = dict(model.named_parameters())
    return [[(0, params[n].numel())] if decays(model, n) else [] for n in names]


def engine_decay_ranges(engine) -> list[Ranges]:
    """Decay ranges of a Zero3Engine's ``parameters()``: each training unit's owned master
    slice (its slots' overlaps with this rank's owned range), then the replicated masters."""
    rank, world = engine.collectives.rank, engine.collectives.world_size
    out: list[Ranges] = []
    for layout in engine.layouts:
        shard = layout.shard_sizes(world)[0]
        if shard == 0:  # a unit without trainable elements has no master in parameters()
            continue
        a, b = owned_range(shard, rank)
        ranges: Ranges = []
        for slot in layout.slots:
            lo, hi = max(a, slot.offset), min(b, slot.offset + slot.numel)
            if not slot.trainable or lo >= hi or not decays(engine.model, slot.name):
                continue
            if ranges and ranges[-1][1] == lo - a:  # adjacent decayed slots: one range
                ranges[-1] = (ranges[-1][0], hi - a)
            else:
                ranges.append((lo - a, hi - a))
        out.append(ranges)
    replicated = engine.replicated  # whole on every rank: all of a master or none of it
    out += [[(0, m.numel())] if decays(engine.model, n) else []
            for (n, _), m in zip(replicated.trainable, replicated.masters)]
    return out


class _RangedDecay:
    """Step hooks: decay only ``ranges`` of each parameter, with weight_decay 0 inside torch."""

    def __init__(self, optimizer: torch.optim.Optimizer, ranges: list[Ranges], *,
                 decoupled: bool) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if len(ranges) != len(params):
            raise ValueError(f"decay ranges for {len(ranges)} tensors, optimizer has {len(params)}")
        for p, rs in zip(params, ranges):
            if any(not 0 <= a < b <= p.numel() for a, b in rs):
                raise ValueError(f"decay ranges {rs[:3]} fall outside a tensor of {p.numel()}")
        self.ranges = {id(p): rs for p, rs in zip(params, ranges)}
        self.decoupled = decoupled
        self.saved: list[float] = []
        optimizer.register_step_pre_hook(self.before)
        optimizer.register_step_post_hook(self.after)

    @torch.no_grad()
    def before(self, optimizer, args, kwargs) -> None:
        self.saved = [g["weight_decay"] for g in optimizer.param_groups]
        for group, wd in zip(optimizer.param_groups, self.saved):
            group["weight_decay"] = 0.0
            if wd == 0:
                continue
            factor = 1 - group["lr"] * wd  # torch's AdamW: param.mul_(1 - lr * weight_decay)
            for p in group["params"]:
                if p.grad is None:  # torch skips a parameter without a gradient, decay included
                    continue
                flat, grad = p.view(-1), p.grad.view(-1)
                for a, b in self.ranges[id(p)]:
                    if self.decoupled:
                        flat[a:b].mul_(factor)
                    else:  # torch's SGD: grad = grad.add(param, alpha=weight_decay)
                        grad[a:b].add_(flat[a:b], alpha=wd)

    def after(self, optimizer, args, kwargs) -> None:
        for group, wd in zip(optimizer.param_groups, self.saved):
            group["weight_decay"] = wd


def build_optimizer(params, config: OptimConfig,
                    decay: list[Ranges] | None = None) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer with single-tensor kernels (same arithmetic on every rank).

    ``decay`` gives each tensor's decayed element ranges (``engine_decay_ranges``,
    ``whole_decay_ranges``); None, or ``config.decay_all``, decays every element."""
    params = list(params)
    if decay is None or config.decay_all:
        decay = [[(0, p.numel())] if p.numel() else [] for p in params]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, foreach=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                      weight_decay=config.weight_decay, foreach=False)
    _RangedDecay(optimizer, decay, decoupled=config.optimizer == "adamw")
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """Constant, linear or cosine decay after a linear warm-up (transformers' definitions)."""
    from transformers import get_scheduler  # lazy: transformers

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=max(total_steps, 1))
