"""``shard_model``: the one function that turns a built model into a ZeRO-3 engine."""

from __future__ import annotations

from torch import nn

from communication.collectives import Collectives
from worker.engine.config import ShardConfig
from worker.engine.progress import NO_OBSERVERS, Observers
from worker.engine.sharding import build_layout, discover_units
from worker.engine.unit import ShardedUnit
from worker.engine.zero3 import Zero3Engine


def shard_model(model: nn.Module, *, collectives: Collectives, config: ShardConfig,
                block_names: list[str], observers: Observers = NO_OBSERVERS) -> Zero3Engine:
    """Shard ``model`` in place, in a fixed order: unit discovery, flat layouts, slices, hooks.

    Apply LoRA before calling this: trainable/frozen is read from ``requires_grad`` here.
    Every rank must build the same model (same seed or same weights) before sharding.
    """
    model.to(config.device)
    units = []
    for spec in discover_units(model, block_names):
        layout = build_layout(spec.unit, spec.module_name, spec.params)
        units.append(
            ShardedUnit(layout, spec.module, dict(spec.params), rank=collectives.rank,
                        world_size=collectives.world_size, compute_dtype=config.compute_dtype,
                        device=config.device)
        )
    # Buffers (position ids, rotary tables) stay replicated; only parameters are sharded.
    return Zero3Engine(model, units, collectives=collectives, config=config, observers=observers)
