"""Does the sharded run compute what one process computes? Per-step losses and final weights
compared under a tolerance that fits the run's arithmetic.

[Note: doctor tolerances]
- *exact*: float32 compute and raw wire codecs. Sharding changes only the order of float32
  sums, so every loss and every weight element must agree within EXACT_TOL (the parity tests'
  1e-5).
- *update*: mixed precision (bf16/fp16 compute) or a lossy wire codec (bf16/int8). Elements
  then differ by rounding, so the losses must agree within LOSS_TOL and the *update error*
  ``||w - w_one|| / ||w_one - w_init||`` over all trainable weights must stay within a share
  of the update: 0 for the same run, 1 for a model that never trained (tests/parity_scenarios.py's
  UPDATE_TOL idea). The one-process run follows the engine's precision policy but sends
  nothing, so a lossy codec is measured against exact traffic and gets more room.
  Measured on tiny-llama at the default options, 3 steps, 2 workers: bf16 compute 0.010, a
  bf16 codec 0.050, an int8 codec 0.13; training on one rank's rows only (the other's gradient
  lost) scores 0.63, which both tolerances refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXACT_TOL = 1e-5
LOSS_TOL = 5e-3
UPDATE_TOL = 0.05  # mixed precision, raw codecs
CODEC_UPDATE_TOL = 0.25  # a lossy wire codec


@dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """How closely the runs must agree (see the note above)."""

    kind: str  # "exact" or "update"
    loss: float
    param: float  # exact: max |diff| of an element; update: the update error
    why: str  # what in the config chose it

    def describe(self) -> str:
        if self.kind == "exact":
            return f"exact ({self.why}): |loss diff| and |param diff| <= {self.param:g}"
        return (f"update ({self.why}): |loss diff| <= {self.loss:g}, update error "
                f"||w - w_one|| / ||w_one - w_init|| <= {self.param:g}")


def tolerance_for(config) -> Tolerance:
    """Exact for float32 with raw codecs, else the relative update tolerance."""
    lossy = [c for c in config.traffic.codecs(config.codec) if c != "raw"]
    reasons = []
    if config.mixed_precision != "no":
        reasons.append(f"{config.mixed_precision} compute")
    if lossy and config.backend == "grpc":
        reasons.append(f"{lossy[0]} codec")
    if reasons:
        share = CODEC_UPDATE_TOL if lossy and config.backend == "grpc" else UPDATE_TOL
        return Tolerance(kind="update", loss=LOSS_TOL, param=share, why=", ".join(reasons))
    return Tolerance(kind="exact", loss=EXACT_TOL, param=EXACT_TOL, why="fp32, raw codec")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRow:
    step: int
    sharded: float | None  # None: the sharded run did not reach this step
    single: float | None  # None: the one-process run did not reach it

    @property
    def diff(self) -> float | None:
        if self.sharded is None or self.single is None:
            return None
        return abs(self.sharded - self.single)


@dataclass(frozen=True, slots=True, kw_only=True)
class Parity:
    """The comparison: rows per step, the largest differences, where they are, the verdict."""

    rows: list[StepRow]
    tolerance: Tolerance
    max_loss_diff: float | None  # None: nothing to compare
    max_param_diff: float | None  # largest |element diff| over the trainable weights
    worst_param: str | None  # the weight holding it
    update_error: float | None
    missing: list[str]  # trainable weights the sharded run did not return
    passed: bool

    @property
    def first_bad_step(self) -> int | None:
        """The first step whose losses differ by more than the tolerance, or are missing."""
        for row in self.rows:
            if row.diff is None or row.diff > self.tolerance.loss:
                return row.step
        return None


def update_error(weights: dict[str, torch.Tensor], single: dict[str, torch.Tensor],
                 initial: dict[str, torch.Tensor]) -> float:
    """||w - w_one|| / ||w_one - w_init|| over the trainable weights (inf if nothing moved)."""
    diff = torch.cat([(weights[n].float() - w).reshape(-1) for n, w in single.items()])
    moved = torch.cat([(w - initial[n]).reshape(-1) for n, w in single.items()])
    norm = float(moved.norm())
    return float(diff.norm()) / norm if norm > 0 else float("inf")


def compare(*, steps: int, sharded_losses: list[float] | None,
            sharded_weights: dict[str, torch.Tensor] | None, single_losses: list[float] | None,
            single_weights: dict[str, torch.Tensor] | None,
            initial: dict[str, torch.Tensor] | None, tolerance: Tolerance) -> Parity:
    """Compare whatever both runs produced; a run that failed leaves its column empty and
    the verdict failed."""
    sharded_losses, single_losses = sharded_losses or [], single_losses or []
    rows = [StepRow(step=s, sharded=sharded_losses[s] if s < len(sharded_losses) else None,
                    single=single_losses[s] if s < len(single_losses) else None)
            for s in range(steps)]
    diffs = [r.diff for r in rows if r.diff is not None]
    max_loss = (float("nan") if any(math.isnan(d) for d in diffs) else max(diffs)) if diffs else None
    max_param = worst = err = None
    missing: list[str] = []
    if sharded_weights is not None and single_weights is not None:
        missing = sorted(set(single_weights) - set(sharded_weights))
        for name, w in single_weights.items():
            if name in missing:
                continue
            other = sharded_weights[name].float()
            d = float((other - w).abs().max()) if other.shape == w.shape else float("inf")
            if max_param is None or d > max_param:
                max_param, worst = d, name
        if not missing and initial is not None and tolerance.kind == "update":
            err = update_error(sharded_weights, single_weights, initial)
    complete = len(diffs) == steps and max_param is not None and not missing
    if tolerance.kind == "exact":
        within = complete and max_loss <= tolerance.loss and max_param <= tolerance.param
    else:
        within = complete and err is not None and max_loss <= tolerance.loss \
            and err <= tolerance.param
    return Parity(rows=rows, tolerance=tolerance, max_loss_diff=max_loss,
                  max_param_diff=max_param, worst_param=worst, update_error=err,
                  missing=missing, passed=bool(within))
