"""Sharded checkpoints: each rank writes its owned slices, rank 0 the manifest; load reshards.

[Note: checkpoint layout]
``root/step_<n>/`` holds ``rank_<r>.safetensors`` per saving rank and ``manifest.json``.
A rank file holds, per unit ``i``: ``u<i>.master`` (the owned fp32 trainable slice, length
``S`` of the saving world size), ``u<i>.frozen`` (the owned frozen slice; left out for LoRA
runs, whose frozen base is rebuilt from the config), ``u<i>.opt.<key>`` (optimizer state:
slices like ``exp_avg`` and scalars like ``step``), and ``rng.torch`` / ``rng.cuda``. The
manifest carries everything else (layouts, step, schedule, config, losses) and the byte size
of every rank file. A checkpoint is written under ``step_<n>.tmp``, fsynced and renamed only
after every rank's file exists (a barrier), so a directory named ``step_<n>`` with a manifest
whose files all have their recorded sizes is complete; ``latest`` names it, updated last.

What is saved comes from objects that save themselves (``Checkpointed``, as torchtitan's
``CheckpointManager(states=...)``): the shards, the training progress and the schedule. This
module never reaches into a trainer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from communication.collectives import Collectives, Key, Phase, result
from worker.engine.progress import NO_OBSERVERS, Activity, Observers, Progress
from worker.state import files
from worker.state.catalog import CheckpointError, read_manifest
from worker.state.rank_files import RankFiles
from worker.state.shards import ShardedState

log = logging.getLogger(__name__)

FORMAT = 1


class Stateful(Protocol):
    """An object that hands over and takes back its own state (a JSON-ready dict)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ProgressState(Stateful, Protocol):
    """Training progress: a Stateful that also carries this rank's RNG."""

    def rng_state(self) -> dict[str, torch.Tensor]: ...

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpointed:
    """Everything a checkpoint holds, each part saving itself."""

    shards: ShardedState  # this rank's slices and optimizer state
    progress: ProgressState  # step, histories, data position, RNG (worker/train/state.py)
    scheduler: Stateful  # the learning-rate schedule
    config: dict  # the run's configuration, recorded for export and inspection


def sync_ranks(collectives: Collectives | None, key: Key, *, timeout: float) -> None:
    """Every rank reaches this point (nothing to wait for alone)."""
    if collectives is None or collectives.world_size == 1:
        return
    result(collectives.barrier(key), key=key, rank=collectives.rank, timeout=timeout)


def rank_tensors(states: Checkpointed) -> dict[str, torch.Tensor]:
    """What this rank's file holds: its shards' tensors and its RNG (``rng.<name>``)."""
    tensors = states.shards.rank_tensors()
    tensors.update({f"rng.{k}": v for k, v in states.progress.rng_state().items()})
    return tensors


def build_manifest(*, progress: dict, scheduler: dict, shards: dict, config: dict,
                   world_size: int, rank_files: dict, extra: dict | None) -> dict:
    """The manifest.json of a checkpoint, from the parts' own state dicts (a rescue passes
    the ones a buddy snapshot recorded)."""
    return {"format": FORMAT, **progress, "world_size": world_size, **shards,
            "scheduler": scheduler, "config": config, "files": rank_files,
            "extra": extra or {}, "created": time.time()}


def save_checkpoint(root: str | Path, states: Checkpointed, *, rank: int, world_size: int,
                    collectives: Collectives | None = None, observers: Observers = NO_OBSERVERS,
                    extra: dict | None = None) -> Path:
    """Write this rank's slices; rank 0 publishes ``step_<n>`` once every rank's file exists.

    Every rank must call it at the same step. Returns the final directory on every rank, after
    it has been published (a second barrier), so a caller may prune or report right away.
    """
    if world_size > 1 and collectives is None:
        raise ValueError(f"rank {rank}: saving at world size {world_size} needs collectives for "
                         "the barrier that publishes the checkpoint")
    root = Path(root)
    progress = states.progress.state_dict()
    step = progress["step"]
    engine = states.shards.engine
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files.write_rank_file(tmp / f"rank_{rank}.safetensors", rank_tensors(states))
    if observers:
        observers.publish(Progress(activity=Activity.CHECKPOINT, rank=rank, step=step))

    def barrier(index: int) -> None:
        key = Key(generation=engine.generation, phase=Phase.CHECKPOINT_BARRIER, step=step,
                  index=index)
        sync_ranks(collectives, key, timeout=engine.config.timeout)

    barrier(0)
    if rank == 0:
        sizes = _rank_file_sizes(tmp, world_size)
        manifest = build_manifest(progress=progress, scheduler=states.scheduler.state_dict(),
                                  shards=states.shards.meta(), config=states.config,
                                  world_size=world_size, rank_files=sizes, extra=extra)
        files.write_json_atomic(tmp / "manifest.json", manifest)
        files.publish(root, tmp, final)
        log.info("checkpoint %s: %d ranks, %.1f MB, %.2fs", final, world_size,
                 sum(sizes.values()) / 2**20, time.perf_counter() - t0)
    barrier(1)
    return final


def _rank_file_sizes(tmp: Path, world_size: int) -> dict[str, int]:
    """Byte size of every rank's file (rank 0, after the barrier); stale extra ranks removed."""
    for stale in tmp.glob("rank_*.safetensors"):  # from an earlier try at another size
        if int(stale.stem.split("_")[1]) >= world_size:
            stale.unlink()
    sizes = {}
    for r in range(world_size):
        f = tmp / f"rank_{r}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"rank 0: {f} is missing although rank {r} passed the "
                                  "barrier; the checkpoint directory must be shared by all ranks")
        sizes[f.name] = f.stat().st_size
    return sizes


def load_checkpoint(path: str | Path, states: Checkpointed, *, rank: int,
                    world_size: int) -> dict:
    """Fill this rank's slices and optimizer state from a checkpoint saved at any world size;
    restore progress, schedule and RNG. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    saved_n = manifest["world_size"]
    with RankFiles(path, saved_n) as rank_files:
        states.shards.load(rank_files, manifest, rank=rank)
        # A rank new to the run takes rank 0's RNG (its dropout stream differs then).
        with safe_open(rank_files.path(rank if rank < saved_n else 0), framework="pt") as fh:
            states.progress.load_rng_state({name.removeprefix("rng."): fh.get_tensor(name)
                                            for name in fh.keys() if name.startswith("rng.")})
    states.scheduler.load_state_dict(manifest["scheduler"])
    states.progress.load_state_dict(manifest)
    log.info("rank %d/%d: loaded %s (saved at world size %d, step %d)", rank, world_size, path,
             saved_n, manifest["step"])
    return manifest
