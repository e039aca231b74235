"""Where the model reads each sharding unit's parameters, found in one process.

A block unit's full parameters exist only while its own module runs: the engine gathers them
in the module's forward pre-hook and frees them in its forward hook (worker/engine/zero3.py).
A parameter read anywhere else (a head reusing an embedding that ``--unit-pattern`` made a unit
of its own, a module reaching into a sibling's weight) reads freed memory in the sharded run:
it fails or computes something else. One forward of the model under a TorchFunctionMode sees
every function that receives a parameter, and which modules are running at that moment.
Parameters below the persistence threshold stay whole on every rank (never freed), as do
frozen ones under ``--frozen replicate``; the root unit is gathered for the whole pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from worker.engine.sharding import discover_units
from worker.engine.zero3 import iter_tensors
from worker.models.blocks import find_block_modules

# Functions that read a tensor's metadata only: harmless on a freed parameter.
METADATA = frozenset({"__get__", "size", "dim", "numel", "stride", "element_size",
                      "is_floating_point", "is_complex", "get_device", "is_contiguous", "__len__"})


@dataclass(slots=True, kw_only=True)
class UnitRow:
    """One unit: its module ("" for the root), sharded elements, and the reads outside it
    (``"<param> read by <module> (<function>)"``, the first few)."""

    unit: int
    module: str
    elements: int
    outside: list[str] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class UnitAudit:
    rows: list[UnitRow]
    pattern: str | None
    error: str | None = None  # the engine refused the units (no match, a tie across units)

    @property
    def passed(self) -> bool:
        return self.error is None and not any(r.outside for r in self.rows)

    @property
    def flagged(self) -> list[UnitRow]:
        return [r for r in self.rows if r.outside]


class _Reads(TorchFunctionMode):
    """Records each function that receives a unit's parameter while that unit's module is not
    running. ``running`` is the stack of module names in forward now."""

    def __init__(self, owner: dict[int, tuple[int, str]], unit_module: dict[int, str],
                 running: list[str], rows: dict[int, UnitRow], keep: int = 3) -> None:
        super().__init__()
        self.owner, self.unit_module, self.running = owner, unit_module, running
        self.rows, self.keep = rows, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in METADATA:
            for t in iter_tensors((args, kwargs)):
                hit = self.owner.get(id(t))
                if hit is None or self.unit_module[hit[0]] in self.running:
                    continue
                row = self.rows[hit[0]]
                where = self.running[-1] if self.running else "(outside any module)"
                note = f"{hit[1]} read by {where or '(root)'} ({getattr(func, '__name__', func)})"
                if note not in row.outside and len(row.outside) < self.keep:
                    row.outside.append(note)
        return func(*args, **kwargs)


def audit_units(model: nn.Module, batch: dict[str, torch.Tensor], *, pattern: str | None,
                persist_threshold: int = 0, frozen_replicated: bool = False) -> UnitAudit:
    """The units ``pattern`` (None: automatic) makes of ``model``, and which of their
    parameters one forward on ``batch`` reads outside the unit's own module."""
    try:
        blocks = find_block_modules(model, pattern=pattern)
        specs = discover_units(model, blocks)
    except ValueError as err:
        return UnitAudit(rows=[], pattern=pattern, error=str(err))
    rows, owner, unit_module = {}, {}, {}
    for spec in specs:
        sharded = [(n, p) for n, p in spec.params if p.numel() >= persist_threshold
                   and not (frozen_replicated and not p.requires_grad)]
        rows[spec.unit] = UnitRow(unit=spec.unit, module=spec.module_name,
                                  elements=sum(p.numel() for _, p in sharded))
        if spec.unit == 0:
            continue  # the root is gathered from the start of forward to the end of backward
        unit_module[spec.unit] = spec.module_name
        owner.update({id(p): (spec.unit, n) for n, p in sharded})
    running: list[str] = []

    def enter(name: str):
        def hook(module, args) -> None:
            running.append(name)
        return hook

    def leave(module, args, output) -> None:  # returns None: the output stays the module's
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    was_training = model.training
    model.eval()  # no dropout masks drawn: the training runs' random streams are untouched
    try:
        with torch.no_grad(), _Reads(owner, unit_module, running, rows):
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return UnitAudit(rows=[rows[u] for u in sorted(rows)], pattern=pattern)
