"""The ZeRO-3 engine: gathers each unit just before it runs, frees it after, reduce-scatters its
gradient after its backward, and leaves the optimizer step on owned slices to the caller.

It talks to a ``Collectives`` object and never learns which transport is behind it. Compute is
synchronous in the caller's thread; collectives run elsewhere and are awaited only when their
data is needed, so the gather of the next unit overlaps the compute of the current one. What
it does is published to ``Observers`` (progress.py) as each activity begins.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from concurrent.futures import Future

import torch
from torch import nn

from communication.collectives import Collectives, Key, Phase, result
from worker.engine.config import ShardConfig
from worker.engine.gradients import finish_gradients
from worker.engine.progress import NO_OBSERVERS, Activity, Observers, Progress
from worker.engine.replicated import ReplicatedParams
from worker.engine.sharding import FlatLayout
from worker.engine.unit import ShardedUnit, UnitState
from worker.engine.weights import iter_full_weights

log = logging.getLogger(__name__)


class EnginePhase(enum.Enum):
    """What the engine is running; the hooks read it to decide what to do."""

    IDLE = "idle"  # between passes: every unit sharded
    FORWARD = "forward"  # a training forward: units freed after use, backward hooks installed
    EVAL = "eval"  # a forward without grad: no backward follows, everything freed at its end
    BACKWARD = "backward"  # units regathered before their backward, gradients reduce-scattered


class Zero3Engine:
    """Runs forward/backward on a sharded model; owned gradients land in ``master.grad``."""

    def __init__(self, model: nn.Module, units: list[ShardedUnit], *, collectives: Collectives,
                 config: ShardConfig, observers: Observers = NO_OBSERVERS,
                 replicated: ReplicatedParams | None = None):
        self.model = model
        self.units = units
        self.replicated = replicated or ReplicatedParams([], compute_dtype=config.compute_dtype,
                                                         device=config.device)
        self.collectives = collectives
        self.config = config
        self.observers = observers
        self.generation = config.generation
        self.step_index = 0
        self.phase = EnginePhase.IDLE
        self._forward_index = 0  # forwards run in this step: the Key's micro_batch
        self._reduce_index = 0  # all-reduces run in this step: the Key's index
        self._weights_index = 0  # full-weight gathers run in this step: the Key's index
        self._pending: list[tuple[ShardedUnit, Key, Future]] = []
        self._deferred_free: list[ShardedUnit] = []  # reduced units autograd may still read
        self._sync_grads = True  # this backward reduce-scatters (False: keep grads locally)
        self.collective_counts: dict[Phase, int] = {p: 0 for p in Phase}
        self.peak_unsharded_bytes = 0  # most bytes of gathered full buffers alive at once
        self.recomputed_units = 0  # forwards replayed in backward (activation checkpointing)
        self._install_hooks()

    # --- public API -------------------------------------------------------------------------
    @property
    def layouts(self) -> list[FlatLayout]:
        return [u.layout for u in self.units]

    def parameters(self) -> list[nn.Parameter]:
        """The owned fp32 master slices and the replicated masters: what the optimizer steps."""
        return [u.master for u in self.units if u.trains] + self.replicated.masters

    def forward(self, **batch):
        """Run the model on this rank's micro-batch; returns the model's output. Without grad
        (evaluation) every unit is sharded again when it returns."""
        self.phase = EnginePhase.FORWARD if torch.is_grad_enabled() else EnginePhase.EVAL
        try:
            out = self.model(**batch)
        finally:
            self._forward_index += 1
        if self.phase is EnginePhase.EVAL:
            self._free_all()
            self.phase = EnginePhase.IDLE
        return out

    def backward(self, loss: torch.Tensor, *, sync_grads: bool = True) -> None:
        """Backward through the sharded model; owned grads accumulate the mean over ranks.

        ``sync_grads=False`` keeps each unit's full gradient on this rank (no reduce-scatter);
        the next backward with ``sync_grads=True`` reduce-scatters the sum (FSDP2's
        ``set_requires_gradient_sync``): one reduce-scatter per optimizer step."""
        if self.phase is not EnginePhase.FORWARD:
            raise RuntimeError(f"rank {self.collectives.rank}: backward in phase "
                               f"{self.phase.value}; it must follow a training forward")
        self.phase = EnginePhase.BACKWARD
        self._sync_grads = sync_grads
        for unit in self.units:
            unit.begin_backward()
        loss.backward()
        self.replicated.collect()
        for unit in self.units:  # units whose params got no grad at all
            if unit.trains and not unit.reduced:
                self._reduce(unit)
        self._free_all()
        self._drain()
        self.phase = EnginePhase.IDLE

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small fp32 tensor over all ranks (one collective)."""
        key = Key(generation=self.generation, phase=Phase.ALL_REDUCE, step=self.step_index,
                  index=self._reduce_index)
        self._reduce_index += 1
        self.collective_counts[Phase.ALL_REDUCE] += 1
        fut = self.collectives.all_reduce(key, values.to(torch.float32).reshape(-1))
        return self._result(fut, key).cpu()

    def clip_grad_norm(self, max_norm: float | None, extra: torch.Tensor | None = None, *,
                       loss_scale: float = 1.0) -> tuple[float, torch.Tensor | None]:
        """Finish the step's gradients in one exact all-reduce (gradients.py): unscale, sum
        ``extra`` and the replicated bucket over ranks, global norm, clip like torch."""
        return finish_gradients(self, max_norm, extra=extra, loss_scale=loss_scale)

    def iter_full_weights(self, *, trainable_only: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, full fp32 tensor) unit by unit, gathered from the owned master slices.

        Every rank must call it (it is collective); at most one unit is held at a time.
        """
        index, self._weights_index = self._weights_index, self._weights_index + 1
        return iter_full_weights(self, index=index, trainable_only=trainable_only)

    def end_step(self) -> None:
        """Mark the end of an optimizer step: replicated parameters take their stepped masters,
        and the next collectives carry the next step number."""
        self.replicated.refresh()
        self.step_index += 1
        self._forward_index = 0
        self._reduce_index = 0
        self._weights_index = 0
        self.phase = EnginePhase.IDLE

    def publish(self, activity: Activity, unit: int | None = None) -> None:
        """Tell the observers what begins now (the trainer and checkpointer use it too)."""
        if self.observers:
            self.observers.publish(Progress(activity=activity, rank=self.collectives.rank,
                                            step=self.step_index, unit=unit,
                                            micro_batch=self._forward_index))

    @property
    def replaying(self) -> bool:
        """Whether a unit forward now is a replay inside backward (recompute.py)."""
        return self.phase is EnginePhase.BACKWARD

    def gather_now(self, unit: ShardedUnit, phase: Phase) -> None:
        """Gather ``unit`` (if it is not) and wait for it."""
        self._gather(unit, phase)
        unit.wait_gathered(self.config.timeout)
        self._track_peak()

    # --- hooks ------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for unit in self.units:
            unit.module.register_forward_pre_hook(self._make_pre_forward(unit))
            unit.module.register_forward_hook(self._make_post_forward(unit))
            for p in unit.trainable_params:
                p.register_post_accumulate_grad_hook(self._make_post_accumulate(unit))

    def _key(self, phase: Phase, unit: ShardedUnit) -> Key:
        return Key(generation=self.generation, phase=phase, step=self.step_index,
                   unit=unit.index, micro_batch=self._forward_index)

    def _gather(self, unit: ShardedUnit, phase: Phase) -> None:
        if unit.state is UnitState.SHARDED:
            self.publish(Activity.GATHER, unit.index)
            self.collective_counts[phase] += 1
            unit.begin_gather(self.collectives, self._key(phase, unit))

    def _make_pre_forward(self, unit: ShardedUnit):
        def hook(module, args):
            if self.phase is EnginePhase.BACKWARD:  # a replay whose checkpoint wraps __call__
                self.recomputed_units += 1
                return self.gather_now(unit, Phase.GATHER_BACKWARD)
            if self.phase is EnginePhase.IDLE:
                raise RuntimeError(f"rank {self.collectives.rank}: unit {unit.index} ran forward "
                                   "outside the engine; run the model through Zero3Engine.forward")
            self.publish(Activity.FORWARD, unit.index)
            self._gather(unit, Phase.GATHER_FORWARD)
            for nxt in range(unit.index + 1, min(unit.index + 1 + self.config.depth,
                                                 len(self.units))):
                self._gather(self.units[nxt], Phase.GATHER_FORWARD)
            unit.wait_gathered(self.config.timeout)
            self._track_peak()
        return hook

    def _make_post_forward(self, unit: ShardedUnit):
        def hook(module, args, output):
            if unit.is_root or self.phase is EnginePhase.BACKWARD:
                return None  # the root is freed after backward; a replay frees nothing
            if self.config.reshard_after_forward or self.phase is EnginePhase.EVAL:
                unit.free()
            if self.phase is EnginePhase.FORWARD:
                for t in iter_tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._make_pre_backward(unit))
            return None
        return hook

    def _make_pre_backward(self, unit: ShardedUnit):
        def hook(grad):
            self.publish(Activity.BACKWARD, unit.index)
            self._free_deferred(after=unit.index)
            if unit.state is not UnitState.UNSHARDED and not unit.reduced:
                self._gather(unit, Phase.GATHER_BACKWARD)
                for prev in range(unit.index - 1, max(unit.index - 1 - self.config.depth, 0), -1):
                    if not self.units[prev].reduced:
                        self._gather(self.units[prev], Phase.GATHER_BACKWARD)
                unit.wait_gathered(self.config.timeout)
                self._track_peak()
            return None
        return hook

    def _make_post_accumulate(self, unit: ShardedUnit):
        def hook(param):
            unit.grads_seen += 1
            if unit.grads_seen == len(unit.trainable_params):
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
        flat = unit.take_flat_grad()
        unit.reduced = True
        if unit.state is UnitState.UNSHARDED:
            if unit.gathered_frozen:
                self._deferred_free.append(unit)
            else:
                unit.free()
        if not self._sync_grads:
            unit.keep_local_grad(flat)
            return
        self.publish(Activity.REDUCE_SCATTER, unit.index)
        flat = unit.take_local_grad(flat)
        self.collective_counts[Phase.REDUCE_SCATTER] += 1
        key = self._key(Phase.REDUCE_SCATTER, unit)
        fut = self.collectives.reduce_scatter(key, flat, feedback=unit.residual)
        self._pending.append((unit, key, fut))

    def _drain(self) -> None:
        """Wait for every reduce-scatter of this backward and add the mean into owned grads."""
        pending, self._pending = self._pending, []
        scale = 1.0 / self.collectives.world_size
        for unit, key, fut in pending:
            unit.add_owned_grad(self._result(fut, key), scale)

    def _result(self, fut: Future, key: Key):
        return result(fut, key=key, rank=self.collectives.rank, timeout=self.config.timeout)

    def _free_deferred(self, *, after: int) -> None:
        """Free reduced units later than unit ``after``: their backward has finished."""
        keep = []
        for unit in self._deferred_free:
            if unit.index > after and unit.state is UnitState.UNSHARDED:
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


def iter_tensors(obj):
    """Every tensor inside a module output (tensor, tuple, list, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from iter_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from iter_tensors(x)
