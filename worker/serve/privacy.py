"""Differential privacy for the training service: Opacus' DP-SGD (per-datum clipping, Gaussian
noise on the summed gradient, RDP accounting) over the sharded ZeRO-3 engine.

Clipping, exactly as Opacus' ``clip_and_accumulate`` with ``loss_reduction="sum"``: the owned
gradient accumulates ``sum_i c_i * g_i`` with ``g_i`` the gradient of datum i's loss over every
trainable parameter (all units, all shards, the replicated ones) and
``c_i = min(1, C / (||g_i|| + 1e-6))``. Before its reduce-scatter a rank holds each unit's
whole gradient of its own rows, so ``||g_i||`` is measured locally, with no collective:

1. each of this rank's rows runs alone (``rows.select(i)``): a forward and a *measuring*
   backward (worker/engine/per_datum.py) that sums the squares of the unit gradients as they
   appear and drops them: nothing is reduce-scattered or kept;
2. the rows run batched with loss ``sum_i c_i * loss_i * world_size`` (``c_i`` constants) and
   the normal backward: one reduce-scatter per unit, accumulated like any forward_backward.

Every rank has the same (padded) row count, so all run the same collectives; a padding row has
weight 0, hence a zero gradient and c = 1. The cost is about two passes over the rows, the first
at batch size 1. Cheaper exact schemes were set aside: keeping ``sum_i c_i g_i`` locally during
pass 1 skips pass 2 but holds the whole unsharded gradient twice (what ZeRO-3 exists to avoid);
ghost norms (per-layer activation x output-grad products) would mean hooks on every layer type.

Noise, at the optimizer step, N(0, (sigma * C)^2) once per coordinate (Opacus' std): the owner of
each sharded slice adds it to its ``master.grad`` (real elements only, the padding stays 0) from
a generator seeded by (seed, rank, unit), so ranks differ; replicated parameters, whose gradient
is the same on every rank, get the same noise on every rank from (seed, "replicated"), drawn on
CPU so that ranks on different devices still agree. The seed is agreed in one all-reduce
(``agree_seed``). torch's generator is not a CSPRNG and Opacus' ``secure_mode`` (noise robust
to floating-point attacks) is not reproduced.

The service's order, per optimizer step::

    for each forward_backward:  dp_forward_backward(engine, rows, max_grad_norm=C, world_size=W)
    norm, extra = engine.clip_grad_norm(None, extra=...)  # reduces the replicated bucket
    add_noise(engine, noise_multiplier=sigma, max_grad_norm=C, seed=agree_seed(engine))
    optimizer.step(); optimizer.zero_grad(set_to_none=True); engine.end_step()
    ledger.step(noise_multiplier=sigma, sample_rate=q); ledger.metrics(delta)

``clip_grad_norm`` must come first (it all-reduces the replicated gradients); a global clip
there is harmless (projecting onto a ball is 1-Lipschitz: the sensitivity stays C), but the norm
it returns is of the noiseless sum. ``PrivacyLedger`` wraps Opacus' ``RDPAccountant``; its
state is JSON for checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass

import torch
from opacus.accountants import RDPAccountant

from worker.engine.per_datum import grad_sq_norm
from worker.engine.zero3 import Zero3Engine
from worker.serve.rows import Rows, datum_losses, target_logprobs
from zerop2p.types import DPMetrics

log = logging.getLogger(__name__)

CLIP_EPS = 1e-6  # Opacus' clip_and_accumulate: C / (norm + 1e-6)
SEED_BITS = 24  # float32 all-reduces are exact below 2^24: the seed travels as two such halves


@dataclass(frozen=True, slots=True)
class DPBackward:
    """One DP forward_backward on this rank's rows; row i is ``rows.index[i]`` (-1: padding)."""

    losses: torch.Tensor  # [B] each row's loss (unclipped), float32 on CPU
    logprobs: torch.Tensor  # [B, T] target log-probabilities of the batched pass, on CPU
    grad_norms: torch.Tensor  # [B] ||g_i|| over all trainable parameters, before clipping
    clip_factors: torch.Tensor  # [B] c_i = min(1, C / (||g_i|| + 1e-6))

    @property
    def clipped(self) -> int:
        """Rows whose gradient was scaled down."""
        return int((self.clip_factors < 1.0).sum())


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clipping factor: ``(C / (norm + 1e-6)).clamp(max=1)``."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def _check_world(engine: Zero3Engine, world_size: int) -> None:
    """The caller's world size (used to scale the loss) must be the collectives'."""
    actual = engine.collectives.world_size
    if world_size != actual:
        raise ValueError(f"rank {engine.collectives.rank}: DP forward_backward for world size "
                         f"{world_size}, but the engine's collectives have {actual} ranks")


def datum_grad_norms(engine: Zero3Engine, rows: Rows) -> torch.Tensor:
    """[B] the gradient norm of each row's loss alone (pass 1): a forward and a measuring
    backward per row, nothing kept; every rank must call it with the same row count."""
    norms = torch.zeros(len(rows.index), dtype=torch.float32)
    for i in range(len(rows.index)):
        one = rows.select(i)
        out = engine.forward(**one.model_inputs())
        loss = datum_losses(target_logprobs(out.logits, one.targets), one.weights).sum()
        norms[i] = math.sqrt(grad_sq_norm(engine, loss))
    return norms


def dp_forward_backward(engine: Zero3Engine, rows: Rows, *, max_grad_norm: float,
                        world_size: int, sync_grads: bool = True) -> DPBackward:
    """Forward/backward of ``rows`` (on the engine's device) whose owned gradients accumulate
    the global sum over datums of each datum's gradient clipped to ``max_grad_norm``."""
    if not max_grad_norm > 0:
        raise ValueError(f"rank {engine.collectives.rank}: max_grad_norm must be > 0, "
                         f"got {max_grad_norm}")
    _check_world(engine, world_size)
    norms = datum_grad_norms(engine, rows)
    factors = clip_factors(norms, max_grad_norm)
    out = engine.forward(**rows.model_inputs())
    logprobs = target_logprobs(out.logits, rows.targets)
    losses = datum_losses(logprobs, rows.weights)
    # x world_size: the engine averages owned grads over ranks; this makes them the global sum
    weighted = (losses * factors.to(losses.device)).sum() * world_size
    engine.backward(weighted, sync_grads=sync_grads)
    done = DPBackward(losses=losses.detach().float().cpu(), logprobs=logprobs.detach().cpu(),
                      grad_norms=norms, clip_factors=factors)
    log.debug("rank %d: DP forward_backward of %d rows, %d clipped to %.4g",
              engine.collectives.rank, len(rows.index), done.clipped, max_grad_norm)
    return done


# --- noise ---------------------------------------------------------------------------------
def agree_seed(engine: Zero3Engine) -> int:
    """A fresh 48-bit seed every rank agrees on, in one all-reduce: rank 0 draws it from
    ``os.urandom`` and sends it as two 24-bit halves (exact in float32), the others send 0."""
    halves = torch.zeros(2, dtype=torch.float32)
    if engine.collectives.rank == 0:
        drawn = int.from_bytes(os.urandom(6), "big")
        halves[0], halves[1] = float(drawn >> SEED_BITS), float(drawn & ((1 << SEED_BITS) - 1))
    hi, lo = (int(v) for v in engine.all_reduce_sum(halves).tolist())
    return (hi << SEED_BITS) | lo


def noise_generator(seed: int, *parts: object, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by a hash of ``seed`` and ``parts`` (rank, unit)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return gen


def _gaussian(numel: int, std: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``numel`` fp32 draws of N(0, std^2) from ``gen``."""
    return torch.randn(numel, generator=gen, device=device, dtype=torch.float32).mul_(std)


def add_noise(engine: Zero3Engine, *, noise_multiplier: float, max_grad_norm: float,
              seed: int) -> None:
    """Add N(0, (noise_multiplier * max_grad_norm)^2) to every trainable coordinate's gradient
    once: owned slices by their owner, replicated masters identically on every rank. Call it
    after ``engine.clip_grad_norm`` (which reduces the replicated gradients) and before the
    optimizer step, with the same ``seed`` on every rank. It runs no collective."""
    rank = engine.collectives.rank
    if noise_multiplier < 0 or not max_grad_norm > 0:
        raise ValueError(f"rank {rank}: noise needs noise_multiplier >= 0 and max_grad_norm > 0,"
                         f" got {noise_multiplier} and {max_grad_norm}")
    if engine.replicated.pending:
        raise RuntimeError(f"rank {rank}: replicated gradients are still local (expected them "
                           "all-reduced); call engine.clip_grad_norm before add_noise")
    std = noise_multiplier * max_grad_norm
    if std == 0:
        return
    for unit in engine.units:
        if not unit.trains or unit.owned_real == 0:
            continue
        master = unit.master
        if master.grad is None:
            master.grad = torch.zeros_like(master)
        gen = noise_generator(seed, "rank", rank, "unit", unit.index, device=master.device)
        master.grad[: unit.owned_real] += _gaussian(unit.owned_real, std, gen, master.device)
    # drawn on CPU: the same numbers on every rank whatever its device (they are small)
    gen = noise_generator(seed, "replicated", device=torch.device("cpu"))
    for m in engine.replicated.masters:
        if m.grad is None:
            m.grad = torch.zeros_like(m)
        m.grad += _gaussian(m.numel(), std, gen, torch.device("cpu")).view(m.shape).to(m.device)


# --- accounting ----------------------------------------------------------------------------
class PrivacyLedger:
    """The privacy spent so far: Opacus' RDP accountant, one entry per noised optimizer step."""

    def __init__(self) -> None:
        self.accountant = RDPAccountant()
        self.public_steps = 0  # steps without DP after the first private one

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one optimizer step with this noise and sampling rate. The RDP bound assumes
        each datum joined the step's batch independently with probability ``sample_rate``
        (Poisson sampling), which is the client's to honour."""
        if not 0 < sample_rate <= 1 or noise_multiplier < 0:
            raise ValueError(f"a DP step needs sample_rate in (0, 1] and noise_multiplier >= 0, "
                             f"got {sample_rate} and {noise_multiplier}")
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        """Optimizer steps recorded."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent at ``delta``; 0 before any step, inf after a step without noise."""
        return float(self.accountant.get_epsilon(delta=delta))

    def metrics(self, delta: float) -> DPMetrics:
        """What the optimizer step reports; unbounded (None) once a step without DP ran."""
        eps = self.epsilon(delta) if not self.public_steps else math.inf
        return DPMetrics(epsilon_spent=eps if math.isfinite(eps) else None, delta=delta,
                         steps=self.steps)

    def state_dict(self) -> dict:
        """JSON-ready: the accountant's history as [noise_multiplier, sample_rate, steps]."""
        return {"mechanism": self.accountant.mechanism(), "public_steps": self.public_steps,
                "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (after a checkpoint's JSON round trip)."""
        mechanism = state.get("mechanism")
        if mechanism != self.accountant.mechanism():
            raise ValueError(f"privacy ledger state is for accountant {mechanism!r}, expected "
                             f"{self.accountant.mechanism()!r}")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.public_steps = int(state.get("public_steps", 0))
