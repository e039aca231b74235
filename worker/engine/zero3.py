"""The ZeRO-3 engine: gathers each unit just before it runs, frees it after, reduce-scatters its
gradient after its backward, and steps the optimizer on owned slices only.

It talks to a ``Collectives`` object and never learns which transport is behind it. Compute is
synchronous in the caller's thread; collectives run elsewhere and are awaited only when their
data is needed, so the gather of the next unit overlaps the compute of the current one.
"""

from __future__ import annotations

import enum
import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from communication.collectives import Collectives, Key, Phase, result
from worker.faults import Fault, maybe_die
from worker.sharding import FlatLayout, build_layout, discover_units
from worker.unit import ShardedUnit, UnitState

log = logging.getLogger(__name__)


class EnginePhase(enum.Enum):
    """What the engine is doing; hooks behave differently in each."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardConfig:
    """How to shard: transport deadline, compute dtype, device, prefetching."""

    generation: int = 0
    timeout: float = 120.0
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    prefetch: bool = True


def shard_model(model: nn.Module, *, collectives: Collectives, config: ShardConfig,
                block_names: list[str]) -> Zero3Engine:
    """Shard ``model`` in place, in a fixed order: unit discovery, flat layouts, slices, hooks.

    Apply LoRA before calling this: trainable/frozen is read from ``requires_grad`` here.
    Every rank must build the same model (same seed or same weights) before sharding.
    """
    model.to(config.device)
    specs = discover_units(model, block_names)
    units = []
    for spec in specs:
        layout = build_layout(spec.unit, spec.module_name, spec.params)
        units.append(
            ShardedUnit(layout, spec.module, dict(spec.params), rank=collectives.rank,
                        world_size=collectives.world_size, compute_dtype=config.compute_dtype,
                        device=config.device)
        )
    # Buffers (position ids, rotary tables) stay replicated; only parameters are sharded.
    return Zero3Engine(model, units, collectives=collectives, config=config)


class Zero3Engine:
    """Runs forward/backward on a sharded model and steps its owned slices."""

    def __init__(self, model: nn.Module, units: list[ShardedUnit], *, collectives: Collectives,
                 config: ShardConfig):
        self.model = model
        self.units = units
        self.coll = collectives
        self.config = config
        self.generation = config.generation
        self.step_index = 0
        self.phase = EnginePhase.IDLE
        self._forward_index = 0  # forwards run in this step: the Key's micro_batch
        self._reduce_index = 0  # all-reduces run in this step: the Key's unit
        self._pending: list[tuple[ShardedUnit, Key, Future]] = []
        self._grads_seen = [0] * len(units)
        self._reduced = [False] * len(units)
        self._deferred_free: list[ShardedUnit] = []  # reduced units autograd may still read
        self.collective_counts: dict[Phase, int] = {p: 0 for p in Phase}
        self.peak_unsharded_bytes = 0  # most bytes of gathered full buffers alive at once
        self._install_hooks()

    # --- public API -------------------------------------------------------------------------
    @property
    def layouts(self) -> list[FlatLayout]:
        return [u.layout for u in self.units]

    def parameters(self) -> list[nn.Parameter]:
        """The owned fp32 master slices: what the optimizer steps."""
        return [u.master for u in self.units if u.st > 0]

    def forward(self, **batch):
        """Run the model on this rank's micro-batch; returns the model's output."""
        self.phase = EnginePhase.FORWARD
        try:
            out = self.model(**batch)
        finally:
            self._forward_index += 1
        if not torch.is_grad_enabled():
            self._free_all()
            self.phase = EnginePhase.IDLE
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the sharded model; owned grads accumulate the mean over ranks."""
        self.phase = EnginePhase.BACKWARD
        self._grads_seen = [0] * len(self.units)
        self._reduced = [False] * len(self.units)
        loss.backward()
        for unit in self.units:  # units whose params got no grad at all, or frozen-only units
            if unit.st > 0 and not self._reduced[unit.layout.unit]:
                self._reduce(unit)
        self._free_all()
        self._drain()
        self.phase = EnginePhase.IDLE

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small fp32 tensor over all ranks (one collective)."""
        key = Key(generation=self.generation, step=self.step_index, unit=self._reduce_index,
                  micro_batch=0, phase=Phase.ALL_REDUCE)
        self._reduce_index += 1
        self.collective_counts[Phase.ALL_REDUCE] += 1
        fut = self.coll.all_reduce(key, values.to(torch.float32).reshape(-1))
        return self._result(fut, key).cpu()

    def clip_grad_norm(self, max_norm: float | None,
                       extra: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """Global gradient norm over all ranks' owned slices, clipped like torch when max_norm is
        set; ``extra`` (e.g. the step's loss) is summed over ranks in the same all-reduce."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = torch.zeros(1, dtype=torch.float32, device=self.config.device)
        for g in grads:
            local += g.float().pow(2).sum()
        if extra is not None:
            local = torch.cat([local, extra.detach().to(local).reshape(-1)])
        total = self.all_reduce_sum(local)
        norm = math.sqrt(float(total[0]))
        if max_norm is not None and max_norm > 0:
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm, (total[1:] if extra is not None else None)

    def iter_full_weights(self, *, trainable_only: bool = False):
        """Yield (name, full fp32 tensor) unit by unit, gathered from the owned master slices.

        Every rank must call it (it is collective); at most one unit is held at a time.
        """
        for unit in self.units:
            if trainable_only and unit.st == 0:
                continue
            shard = torch.cat([unit.master.detach().float(), unit.frozen.float()])
            key = self._key(Phase.GATHER_FORWARD, unit.layout.unit)
            self.collective_counts[Phase.GATHER_FORWARD] += 1
            rows = self._result(self.coll.all_gather(key, shard), key)
            rows = rows.view(self.coll.world_size, unit.st + unit.sf).cpu()
            train = rows[:, : unit.st].reshape(-1)
            frozen = rows[:, unit.st :].reshape(-1)
            for slot in unit.layout.slots:
                if trainable_only and not slot.trainable:
                    continue
                region = train if slot.trainable else frozen
                yield slot.name, region[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
        self._forward_index += 1

    def end_step(self) -> None:
        """Mark the end of an optimizer step: the next collectives carry the next step number."""
        self.step_index += 1
        self._forward_index = 0
        self._reduce_index = 0
        self.phase = EnginePhase.IDLE

    def state_bytes(self) -> int:
        """Bytes of model state (params, grads, optimizer state not included) this rank holds."""
        return sum(u.state_bytes() for u in self.units)

    # --- hooks ------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for unit in self.units:
            unit.module.register_forward_pre_hook(self._make_pre_forward(unit))
            unit.module.register_forward_hook(self._make_post_forward(unit))
            for p in unit.trainable_params:
                p.register_post_accumulate_grad_hook(self._make_post_accumulate(unit))

    def _key(self, phase: Phase, unit: int) -> Key:
        return Key(generation=self.generation, step=self.step_index, unit=unit,
                   micro_batch=self._forward_index, phase=phase)

    def _gather(self, unit: ShardedUnit, phase: Phase) -> None:
        maybe_die(Fault.GATHER, step=self.step_index, rank=self.coll.rank)
        if unit.state is UnitState.SHARDED:
            self.collective_counts[phase] += 1
            unit.begin_gather(self.coll, self._key(phase, unit.layout.unit))

    def _make_pre_forward(self, unit: ShardedUnit):
        def hook(module, args):
            maybe_die(Fault.FORWARD, step=self.step_index, rank=self.coll.rank)
            self._gather(unit, Phase.GATHER_FORWARD)
            nxt = unit.layout.unit + 1
            if self.config.prefetch and nxt < len(self.units):
                self._gather(self.units[nxt], Phase.GATHER_FORWARD)
            unit.wait_gathered(self.config.timeout)
            self._track_peak()
        return hook

    def _make_post_forward(self, unit: ShardedUnit):
        def hook(module, args, output):
            if unit.layout.unit == 0:
                return None  # the root unit wraps the whole model: freed after backward
            unit.free()
            if torch.is_grad_enabled():
                for t in _tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._make_pre_backward(unit))
            return None
        return hook

    def _make_pre_backward(self, unit: ShardedUnit):
        def hook(grad):
            maybe_die(Fault.BACKWARD, step=self.step_index, rank=self.coll.rank)
            self._free_deferred(after=unit.layout.unit)
            if unit.state is not UnitState.UNSHARDED and not self._reduced[unit.layout.unit]:
                self._gather(unit, Phase.GATHER_BACKWARD)
                prev = unit.layout.unit - 1
                if self.config.prefetch and prev >= 1 and not self._reduced[prev]:
                    self._gather(self.units[prev], Phase.GATHER_BACKWARD)
                unit.wait_gathered(self.config.timeout)
                self._track_peak()
            return None
        return hook

    def _make_post_accumulate(self, unit: ShardedUnit):
        n_trainable = len(unit.trainable_params)

        def hook(param):
            i = unit.layout.unit
            self._grads_seen[i] += 1
            if self._grads_seen[i] == n_trainable:
                self._reduce(unit)
        return hook

    # --- internals --------------------------------------------------------------------------
    def _track_peak(self) -> None:
        live = sum(u.full_bytes for u in self.units if u.state is not UnitState.SHARDED)
        self.peak_unsharded_bytes = max(self.peak_unsharded_bytes, live)

    def _reduce(self, unit: ShardedUnit) -> None:
        """Flatten the unit's grads, free its params, reduce-scatter.

        Once every trainable grad has arrived, autograd no longer reads trainable weights; it may
        still read frozen ones (a LoRA base layer's input grad), so a unit holding any is freed
        later: when the previous unit's output grad is ready, which needs this unit's backward.
        """
        maybe_die(Fault.REDUCE_SCATTER, step=self.step_index, rank=self.coll.rank)
        flat = unit.take_flat_grad()
        self._reduced[unit.layout.unit] = True
        if unit.state is UnitState.UNSHARDED:
            if unit.layout.frozen_numel:
                self._deferred_free.append(unit)
            else:
                unit.free()
        self.collective_counts[Phase.REDUCE_SCATTER] += 1
        key = self._key(Phase.REDUCE_SCATTER, unit.layout.unit)
        self._pending.append((unit, key, self.coll.reduce_scatter(key, flat)))

    def _drain(self) -> None:
        """Wait for every reduce-scatter of this backward and add the mean into owned grads."""
        pending, self._pending = self._pending, []
        scale = 1.0 / self.coll.world_size
        for unit, key, fut in pending:
            unit.add_owned_grad(self._result(fut, key), scale)

    def _result(self, fut: Future, key: Key):
        return result(fut, key=key, rank=self.coll.rank, timeout=self.config.timeout)

    def _free_deferred(self, *, after: int) -> None:
        """Free reduced units later than unit ``after``: their backward has finished."""
        keep = []
        for unit in self._deferred_free:
            if unit.layout.unit > after and unit.state is UnitState.UNSHARDED:
                unit.free()
            elif unit.state is UnitState.UNSHARDED:
                keep.append(unit)
        self._deferred_free = keep

    def _free_all(self) -> None:
        self._deferred_free = []
        for unit in self.units:
            if unit.state is UnitState.GATHERING:
                unit.wait_gathered(self.config.timeout)  # a prefetch nobody used: finish, then free
            if unit.state is UnitState.UNSHARDED:
                unit.free()


def _tensors(obj):
    """Every tensor inside a module output (tensor, tuple, list, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
