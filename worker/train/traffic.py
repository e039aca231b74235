"""What travels each step, as options: the wire codecs, error feedback, when gradients are
reduce-scattered, whether frozen weights move at all, and how far gathers run ahead.

Every default is the engine's original behaviour; each option is a flag and a ``[traffic]``
TOML key (worker/cli/options.py), and each has a parity or convergence test.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from communication.codec import CODECS

log = logging.getLogger(__name__)

GRAD_SYNC = ("micro-batch", "step")
FROZEN = ("shard", "replicate", "auto")
AUTO_FROZEN_SHARE = 0.25  # auto replicates a frozen base that takes at most this share of memory


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficConfig:
    """Traffic options; ``None`` codecs fall back to the run's ``codec``."""

    param_codec: str | None = None  # all-gathers of parameters
    grad_codec: str | None = None  # reduce-scatters of gradients
    error_feedback: bool = True  # with a lossy grad codec: resend what the wire lost
    grad_sync: str = "micro-batch"  # or "step": one reduce-scatter per optimizer step
    frozen: str = "shard"  # or "replicate" (never sent) or "auto" (replicate if it fits)
    prefetch_depth: int = 1  # units gathered ahead of the one that runs
    reshard_after_forward: bool = True  # False: keep units gathered until their backward
    persist_threshold: int = 0  # parameters with fewer elements stay whole on every rank

    def __post_init__(self) -> None:
        for name in ("param_codec", "grad_codec"):
            value = getattr(self, name)
            if value is not None and value not in CODECS:
                raise ValueError(f"{name} {value!r} is not one of {sorted(CODECS)}")
        if self.grad_sync not in GRAD_SYNC:
            raise ValueError(f"grad_sync {self.grad_sync!r} is not one of {GRAD_SYNC}")
        if self.frozen not in FROZEN:
            raise ValueError(f"frozen {self.frozen!r} is not one of {FROZEN}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.persist_threshold < 0:
            raise ValueError(f"persist_threshold must be >= 0, got {self.persist_threshold}")

    def codecs(self, default: str) -> tuple[str, str]:
        """(parameter codec, gradient codec) with ``default`` for those left unset."""
        return self.param_codec or default, self.grad_codec or default


def available_memory(device: torch.device) -> int:
    """Bytes free now: the GPU's for a CUDA device, else the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def replicate_frozen(choice: str, *, frozen_bytes: int, device: torch.device) -> bool:
    """Whether frozen weights are replicated: as chosen, or for ``auto`` when the whole frozen
    set takes at most a quarter of the memory available now."""
    if choice != "auto":
        return choice == "replicate"
    free = available_memory(device)
    decision = frozen_bytes <= AUTO_FROZEN_SHARE * free
    log.info("frozen=auto: %.1f MB of frozen weights, %.1f MB available: %s", frozen_bytes / 2**20,
             free / 2**20, "replicate" if decision else "shard")
    return decision
