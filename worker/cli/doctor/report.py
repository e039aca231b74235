"""The doctor's findings as text tables and a verdict, and as one JSON line (``--json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from worker.cli.doctor.checks import Check
from worker.cli.doctor.parity import Parity
from worker.cli.doctor.units import UnitAudit

UNIT_ROWS = 8  # units listed in full; past that only the flagged ones and a count


@dataclass(slots=True, kw_only=True)
class Findings:
    """Everything one doctor run found."""

    title: str
    world_size: int
    steps: int
    parity: Parity
    units: UnitAudit
    checks: list[Check] = field(default_factory=list)
    sharded_error: str | None = None  # None: ran to the end (or was not started: not_started)
    single_error: str | None = None
    not_started: str | None = None  # why the sharded run was skipped

    def failures(self) -> list[str]:
        """Each reason the verdict fails, in one line each; [] when it passes."""
        out = []
        if self.units.error:
            out.append(f"units: the engine refuses them: {self.units.error}")
        for row in self.units.flagged:
            out.append(f"unit {row.unit} ({row.module or 'root'}): {row.outside[0]} outside the "
                       "unit's forward, where its parameters are freed in the sharded run")
        if self.not_started:
            out.append(f"sharded run: not started ({self.not_started})")
        if self.sharded_error:
            out.append(f"sharded run: {self.sharded_error}")
        if self.single_error:
            out.append(f"one-process run: {self.single_error}")
        if not (self.sharded_error or self.single_error or self.not_started):
            out += self._parity_reasons()
        out += [f"{c.name}: {c.detail}" for c in self.checks if c.status == "fail"]
        return out

    def _parity_reasons(self) -> list[str]:
        """Why the comparison of two finished runs fails, naming the step and the weight."""
        p, out = self.parity, []
        if p.passed:
            return out
        bad = p.first_bad_step
        if bad is not None:
            row = p.rows[bad]
            out.append(f"parity: losses differ from step {bad} ({_num(row.sharded)} sharded vs "
                       f"{_num(row.single)} one process)")
        if p.missing:
            out.append(f"parity: the sharded run returned no {p.missing[:3]}")
        elif p.tolerance.kind == "exact" and (p.max_param_diff or 0) > p.tolerance.param:
            out.append(f"parity: {p.worst_param} differs by {p.max_param_diff:.3g} "
                       f"(tolerance {p.tolerance.param:g})")
        elif p.update_error is not None and p.update_error > p.tolerance.param:
            out.append(f"parity: update error {p.update_error:.4f} > {p.tolerance.param:g} "
                       f"(largest element diff in {p.worst_param})")
        return out or ["parity: outside the tolerance"]

    @property
    def passed(self) -> bool:
        return self.parity.passed and not self.failures()

    def to_json(self) -> dict:
        p = self.parity
        return {"passed": self.passed, "world_size": self.world_size, "steps": self.steps,
                "max_loss_diff": _finite(p.max_loss_diff), "max_param_diff": _finite(p.max_param_diff),
                "worst_param": p.worst_param, "update_error": _finite(p.update_error),
                "tolerance": {"kind": p.tolerance.kind, "loss": p.tolerance.loss,
                              "param": p.tolerance.param, "why": p.tolerance.why},
                "losses_sharded": [r.sharded for r in p.rows],
                "losses_one_process": [r.single for r in p.rows],
                "first_bad_step": p.first_bad_step,
                "units_flagged": [{"unit": r.unit, "module": r.module, "reads": r.outside}
                                  for r in self.units.flagged],
                "units_error": self.units.error, "sharded_error": self.sharded_error,
                "checks": [c.to_dict() for c in self.checks], "failures": self.failures()}


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _num(x: float | None, spec: str = ".6f") -> str:
    return "-" if x is None else format(x, spec)


def parity_table(f: Findings) -> list[str]:
    p = f.parity
    lines = [f"parity, tolerance {p.tolerance.describe()}",
             f"  {'step':>4}  {'loss sharded':>14}  {'loss one process':>16}  {'diff':>9}"]
    bad = p.first_bad_step
    for row in p.rows:
        mark = "  <- first difference" if row.step == bad and row.diff is not None else ""
        if row.step == bad and row.sharded is None:
            mark = "  <- the sharded run has no loss here"
        lines.append(f"  {row.step:>4}  {_num(row.sharded):>14}  {_num(row.single):>16}  "
                     f"{_num(row.diff, '.2e'):>9}{mark}")
    if p.max_param_diff is not None:
        lines.append(f"  max param diff {p.max_param_diff:.2e} in {p.worst_param}")
    if p.update_error is not None:
        lines.append(f"  update error {p.update_error:.4f}")
    return lines


def units_table(f: Findings) -> list[str]:
    u = f.units
    how = "automatic" if u.pattern is None else f"--unit-pattern {u.pattern}"
    if u.error:
        return [f"units ({how}): refused: {u.error}"]
    lines = [f"units ({how}): {len(u.rows)}",
             f"  {'unit':>4}  {'module':<36}  {'elements':>10}  read outside its forward"]
    shown = [r for i, r in enumerate(u.rows) if i < UNIT_ROWS or r.outside]
    for row in shown:
        reads = "; ".join(row.outside) + "  <- FAIL" if row.outside else "-"
        lines.append(f"  {row.unit:>4}  {row.module or '(root)':<36}  {row.elements:>10}  {reads}")
    if len(shown) < len(u.rows):
        lines.append(f"  ... {len(u.rows) - len(shown)} more units, none read outside")
    return lines


def render(f: Findings) -> str:
    """The report: title, parity table, units, checks, verdict and its reasons."""
    lines = [f.title, *parity_table(f), *units_table(f), "checks"]
    lines += [f"  {c.status:<5} {c.name:<14} {c.detail}" for c in f.checks] or ["  (none)"]
    reasons = f.failures()
    lines.append("verdict: " + ("PASSED: the sharded run computes what one process computes"
                                if f.passed else "FAILED"))
    lines += [f"  - {r}" for r in reasons]
    return "\n".join(lines)
