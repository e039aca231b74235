"""Activation checkpointing for sharded units: a unit's forward keeps only its inputs, and its
backward runs the forward again (``torch.utils.checkpoint``, non-reentrant) before its own.

The checkpoint wraps the unit module's ``forward``, not its ``__call__``, so the engine's
module hooks stay outside it (FSDP2 and transformers' ``GradientCheckpointingLayer`` do the
same): the pre-backward hook on the unit's output has gathered the unit by the time autograd
replays its forward. The replay itself checks that, gathers if a caller got there first, and
counts itself in ``engine.recomputed_units``; the engine's own hooks treat a forward seen
in the BACKWARD phase as a replay (no prefetch, no free). Wrapping here rather than through
transformers' ``gradient_checkpointing_enable`` is what lets replays be seen and counted, and
any unit module be checkpointed.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from communication.collectives import Phase
from worker.engine.unit import ShardedUnit, UnitState

log = logging.getLogger(__name__)


def checkpoint_units(engine) -> int:
    """Checkpoint every unit but the root (which wraps the whole model); returns how many."""
    config = getattr(engine.model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # a KV cache written in forward would be written again
    wrapped = 0
    for unit in engine.units:
        if unit.is_root or getattr(unit.module, "_zerop2p_checkpointed", False):
            continue
        unit.module.forward = _checkpointed(engine, unit, unit.module.forward)
        unit.module._zerop2p_checkpointed = True
        wrapped += 1
    log.info("activation checkpointing on %d unit(s)", wrapped)
    return wrapped


def _checkpointed(engine, unit: ShardedUnit, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not (unit.module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)  # evaluation: nothing to replay

        def body(*a, **k):
            if engine.replaying:
                engine.recomputed_units += 1
                if unit.state is not UnitState.UNSHARDED:
                    engine.gather_now(unit, Phase.GATHER_BACKWARD)
            return forward(*a, **k)

        return checkpoint(body, *args, use_reentrant=False, **kwargs)
    return run
