"""Parameters kept whole on every rank: those below the persistence threshold (DeepSpeed's
``stage3_param_persistence_threshold``: norms, biases, LoRA adapters).

They are never gathered and never reduce-scattered. Each backward moves their gradients into
one fp32 bucket; once per optimizer step the bucket rides in the step's one exact all-reduce
(with the grad norm, loss and token count), so a step whose trainable parameters are all small
pays one round trip. Every rank then steps identical fp32 masters with identical gradients, and
``refresh`` copies them back into the module in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ReplicatedParams:
    """The replicated parameters of a model, by name, with fp32 masters for the trainable."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, compute_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.named = named
        self.trainable = [(n, p) for n, p in named if p.requires_grad]
        self.frozen = [(n, p) for n, p in named if not p.requires_grad]
        self.masters = [nn.Parameter(p.detach().to(device=device, dtype=torch.float32).clone())
                        for _, p in self.trainable]
        with torch.no_grad():
            for _, p in named:
                p.data = p.data.to(device=device, dtype=compute_dtype)
        self.numel = sum(p.numel() for _, p in self.trainable)
        self._bucket: torch.Tensor | None = None  # this step's local gradients, fp32
        # set by a measuring backward (per_datum.py): takes each gradient instead of the bucket
        self.grad_sink: Callable[[torch.Tensor], None] | None = None

    def __bool__(self) -> bool:
        return bool(self.named)

    def collect(self) -> None:
        """After a backward: add each trainable parameter's gradient into the bucket (or hand
        it to ``grad_sink`` and keep nothing)."""
        if not self.trainable:
            return
        if self.grad_sink is not None:
            for _, p in self.trainable:
                if p.grad is not None:
                    self.grad_sink(p.grad)
                    p.grad = None
            return
        if self._bucket is None:
            self._bucket = torch.zeros(self.numel, dtype=torch.float32,
                                       device=self.masters[0].device)
        offset = 0
        for _, p in self.trainable:
            if p.grad is not None:
                self._bucket[offset : offset + p.numel()] += p.grad.reshape(-1).float()
                p.grad = None
            offset += p.numel()

    @property
    def pending(self) -> bool:
        """Whether gradients wait in the bucket for the step's all-reduce (clip_grad_norm)."""
        return self._bucket is not None

    def take_bucket(self) -> torch.Tensor:
        """This step's local gradients (zeros if none arrived), leaving the bucket empty."""
        bucket, self._bucket = self._bucket, None
        if bucket is None:
            bucket = torch.zeros(self.numel, dtype=torch.float32)
        return bucket

    def set_grads(self, summed: torch.Tensor, scale: float) -> None:
        """Give every master its slice of the all-reduced bucket, times ``scale``."""
        offset = 0
        for m in self.masters:
            m.grad = summed[offset : offset + m.numel()].view(m.shape).to(m.device) * scale
            offset += m.numel()

    def refresh(self) -> None:
        """Copy the (stepped) masters back into the module's compute-dtype parameters."""
        with torch.no_grad():
            for m, (_, p) in zip(self.masters, self.trainable):
                p.copy_(m)
