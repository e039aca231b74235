"""Flat layouts of sharding units: which element of which parameter each rank owns.

[Note: sharding vocabulary]
- *unit*: a module subtree sharded as one piece. Each transformer block is a unit; every
  parameter outside the blocks (embeddings, final norm, head) belongs to the *root unit* (id 0).
- *flat buffer*: a unit's parameters flattened in a fixed order (their ``named_parameters``
  order) into 1-D regions: first the trainable parameters, then the frozen ones. Each region is
  padded with zeros to a multiple of the world size ``N``: the *padded size* ``N * S``.
- *shard*: ``S`` consecutive elements of a region. Rank ``r`` *owns* ``[r*S, (r+1)*S)`` of the
  trainable region (its fp32 master slice, gradient slice and optimizer state) and the same
  slice of the frozen region (no gradient, no optimizer state).
- *slot*: one parameter's place in a region: name, shape, offset, element count. Slots do not
  depend on ``N``; only the padding does, which is what lets a checkpoint reshard on load.
- Tied parameters (GPT-2's embedding and head) are one ``Parameter`` and get one slot.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamSlot:
    """One parameter's place inside its unit's trainable or frozen region."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    trainable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class FlatLayout:
    """Where every parameter of one unit lives; the same on every rank."""

    unit: int
    module_name: str
    slots: tuple[ParamSlot, ...]
    trainable_numel: int
    frozen_numel: int

    def shard_sizes(self, world_size: int) -> tuple[int, int]:
        """(trainable S, frozen S): per-rank shard lengths after padding to a multiple of N."""
        return _ceil_div(self.trainable_numel, world_size), _ceil_div(self.frozen_numel, world_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FlatLayout:
        slots = tuple(
            ParamSlot(**{**s, "shape": tuple(s["shape"])}) for s in data["slots"]
        )
        return cls(**{**data, "slots": slots})


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitSpec:
    """A unit found in a model: its module and its parameters in slot order."""

    unit: int
    module_name: str
    module: nn.Module
    params: tuple[tuple[str, nn.Parameter], ...]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def build_layout(unit: int, module_name: str, params) -> FlatLayout:
    """Lay out ``params`` (name, Parameter) pairs: trainable first, then frozen."""
    slots: list[ParamSlot] = []
    offsets = {True: 0, False: 0}
    for trainable in (True, False):
        for name, p in params:
            if p.requires_grad != trainable:
                continue
            slots.append(
                ParamSlot(
                    name=name,
                    shape=tuple(p.shape),
                    offset=offsets[trainable],
                    numel=p.numel(),
                    trainable=trainable,
                )
            )
            offsets[trainable] += p.numel()
    return FlatLayout(
        unit=unit,
        module_name=module_name,
        slots=tuple(slots),
        trainable_numel=offsets[True],
        frozen_numel=offsets[False],
    )


def discover_units(model: nn.Module, block_names: list[str]) -> list[UnitSpec]:
    """Split ``model`` into the root unit (id 0) and one unit per named block, in order.

    Every parameter lands in exactly one unit; a parameter shared between two units (a tie
    across blocks) is refused, since each unit must own its storage.
    """
    modules = dict(model.named_modules())
    missing = [n for n in block_names if n not in modules]
    if missing:
        raise ValueError(f"unit modules not found in the model: {missing[:5]}")
    owner: dict[int, str] = {}
    per_unit: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(block_names) + 1)]
    for name, p in model.named_parameters():  # de-duplicated: a tied parameter appears once
        unit = 0
        for i, block in enumerate(block_names, start=1):
            if name.startswith(block + "."):
                unit = i
                break
        per_unit[unit].append((name, p))
        owner[id(p)] = name
    for block in block_names:
        for name, p in modules[block].named_parameters(prefix=block):
            first = owner.get(id(p))
            if first is not None and not first.startswith(block + "."):
                raise ValueError(
                    f"parameter {name!r} of unit {block!r} is tied to {first!r} outside it; "
                    "ties must stay inside one unit"
                )
    specs = [UnitSpec(unit=0, module_name="", module=model, params=tuple(per_unit[0]))]
    for i, block in enumerate(block_names, start=1):
        specs.append(
            UnitSpec(unit=i, module_name=block, module=modules[block], params=tuple(per_unit[i]))
        )
    return specs


def check_layouts(expected: list[FlatLayout], actual: list[FlatLayout]) -> None:
    """Refuse to load shards into a model whose layout differs; names the first difference."""
    if len(expected) != len(actual):
        raise ValueError(f"unit count differs: checkpoint has {len(expected)}, model has {len(actual)}")
    for e, a in zip(expected, actual):
        if e.slots != a.slots:
            for se, sa in zip(e.slots, a.slots):
                if se != sa:
                    raise ValueError(f"unit {e.unit} ({e.module_name!r}): slot {se} != model's {sa}")
            raise ValueError(
                f"unit {e.unit} ({e.module_name!r}): {len(e.slots)} slots in checkpoint, "
                f"{len(a.slots)} in model"
            )


def owned_range(numel_padded_shard: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's shard in a padded region with shard size S."""
    return rank * numel_padded_shard, (rank + 1) * numel_padded_shard


def region_slice(layout: FlatLayout, params: dict[str, torch.Tensor], *, trainable: bool,
                 start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements [start, stop) of the padded trainable (or frozen) region, copied from the
    parameters that overlap them (zeros in the padding): a rank's shard without building the
    whole region first, so filling a unit holds its parameters and the slice, not two copies."""
    out = torch.zeros(stop - start, dtype=dtype)
    for slot in layout.slots:
        if slot.trainable != trainable:
            continue
        lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, stop)
        if lo < hi:
            flat = params[slot.name].detach().reshape(-1)
            out[lo - start:hi - start].copy_(flat[lo - slot.offset:hi - slot.offset])
    return out
