"""``shard_model``: the one function that turns a built model into a ZeRO-3 engine."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from communication.collectives import Collectives
from worker.engine.config import ShardConfig
from worker.engine.progress import NO_OBSERVERS, Observers
from worker.engine.replicated import ReplicatedParams
from worker.engine.sharding import build_layout, discover_units
from worker.engine.unit import ShardedUnit
from worker.engine.zero3 import Zero3Engine

Materialize = Callable[[str, list[tuple[str, nn.Parameter]]], dict[str, nn.Parameter]]


def shard_model(model: nn.Module, *, collectives: Collectives, config: ShardConfig,
                block_names: list[str], observers: Observers = NO_OBSERVERS,
                materialize: Materialize | None = None) -> Zero3Engine:
    """Shard ``model`` in place, in a fixed order: unit discovery, flat layouts, slices, hooks.

    Apply LoRA before calling this: trainable/frozen is read from ``requires_grad`` here.
    Parameters with fewer than ``config.persist_threshold`` elements stay whole on every rank
    (replicated.py); the rest are laid out and sharded by unit.
    Every rank must build the same model (same seed or same weights) before sharding.
    A model on the meta device is given its values unit by unit by ``materialize(unit module
    name, its parameters) -> {name: parameter}``: the unit is allocated, filled, sliced and its
    full copy freed before the next, so a rank never holds more than its shards and one unit.
    """
    lazy = any(p.is_meta for p in model.parameters())
    if lazy and materialize is None:
        raise ValueError("the model has parameters on the meta device but no materialize= was "
                         "given to fill them")
    if lazy:  # parameters arrive unit by unit; buffers move now
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(config.device)
    else:
        model.to(config.device)
    units, small = [], []
    for spec in discover_units(model, block_names):
        found = list(spec.params)
        if lazy:
            fresh = materialize(spec.module_name, found)
            found = [(n, fresh[n]) for n, _ in found]
        params = [(n, p) for n, p in found if p.numel() >= config.persist_threshold]
        small += [(n, p) for n, p in found if p.numel() < config.persist_threshold]
        layout = build_layout(spec.unit, spec.module_name, params)
        units.append(
            ShardedUnit(layout, spec.module, dict(params), rank=collectives.rank,
                        world_size=collectives.world_size, compute_dtype=config.compute_dtype,
                        device=config.device, replicate_frozen=config.replicate_frozen,
                        error_feedback=config.error_feedback)
        )
    # Buffers (position ids, rotary tables) stay replicated; only parameters are sharded.
    replicated = ReplicatedParams(small, compute_dtype=config.compute_dtype, device=config.device)
    return Zero3Engine(model, units, collectives=collectives, config=config, observers=observers,
                       replicated=replicated)
