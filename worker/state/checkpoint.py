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
Because slots do not depend on the world size, rank ``r`` of any ``M`` finds its range
``[r*S_M, (r+1)*S_M)`` of each region in whichever saved files cover it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from communication.collectives import Key, Phase, result
from worker.checkpoint_files import (
    CheckpointError,
    RankFiles,
    format_checkpoints,
    fsync_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_manifest,
    write_json_atomic,
)
from worker.faults import Fault, maybe_die
from worker.sharding import FlatLayout, check_layouts, owned_range

log = logging.getLogger(__name__)

FORMAT = 1

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints", "format_checkpoints", "prune_checkpoints", "read_manifest",
           "rank_tensors", "write_rank_file", "build_manifest", "optimizer_meta", "write_latest",
           "publish", "TrainerState",
           "barrier"]


def save_checkpoint(root: str | Path, *, engine, trainer, config, rank: int, world_size: int,
                    collectives=None, extra: dict | None = None) -> Path:
    """Write this rank's slices; rank 0 publishes ``step_<n>`` once every rank's file exists.

    Every rank must call it at the same step. Returns the final directory on every rank, after
    it has been published (a second barrier), so a caller may prune or report right away.
    """
    if world_size > 1 and collectives is None:
        raise ValueError(f"rank {rank}: saving at world size {world_size} needs collectives for "
                         "the barrier that publishes the checkpoint")
    root = Path(root)
    step = trainer.step
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    store_frozen = getattr(config, "lora", None) is None
    t0 = time.perf_counter()
    write_rank_file(tmp / f"rank_{rank}.safetensors",
                     rank_tensors(engine, trainer.optimizer, store_frozen=store_frozen))
    maybe_die(Fault.CHECKPOINT, step=step, rank=rank)
    barrier(collectives, generation=engine.generation, step=step, which=0,
            timeout=engine.config.timeout)
    if rank == 0:
        for stale in tmp.glob("rank_*.safetensors"):  # from an earlier try at another size
            if int(stale.stem.split("_")[1]) >= world_size:
                stale.unlink()
        files = {}
        for r in range(world_size):
            f = tmp / f"rank_{r}.safetensors"
            if not f.is_file():
                raise CheckpointError(f"rank 0: {f} is missing although rank {r} passed the "
                                      "barrier; the checkpoint directory must be shared by all "
                                      "ranks")
            files[f.name] = f.stat().st_size
        manifest = build_manifest(engine, TrainerState.of(trainer, engine), config,
                                  world_size=world_size, files=files, store_frozen=store_frozen,
                                  extra=extra)
        write_json_atomic(tmp / "manifest.json", manifest)
        publish(root, tmp, final)
        log.info("checkpoint %s: %d ranks, %.1f MB, %.2fs", final, world_size,
                 sum(files.values()) / 2**20, time.perf_counter() - t0)
    barrier(collectives, generation=engine.generation, step=step, which=1,
            timeout=engine.config.timeout)
    return final


def load_checkpoint(path: str | Path, *, engine, trainer, rank: int, world_size: int) -> dict:
    """Fill this rank's slices and optimizer state from a checkpoint saved at any world size;
    restore step, schedule, history and RNG. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    check_layouts([FlatLayout.from_dict(d) for d in manifest["layouts"]], engine.layouts)
    opt = manifest["optimizer"]
    if opt["class"] != type(trainer.optimizer).__name__:
        raise CheckpointError(f"{path}: optimizer is {opt['class']} in the checkpoint, "
                              f"{type(trainer.optimizer).__name__} in this run")
    saved_n = manifest["world_size"]
    with RankFiles(path, saved_n) as files:
        for unit in engine.units:
            _load_unit(unit, files, trainer.optimizer, opt, saved_n=saved_n, rank=rank,
                       frozen_stored=manifest["frozen_stored"])
        _restore_rng(files, rank, saved_n, engine.config.device)
    for group, saved in zip(trainer.optimizer.param_groups, opt["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    trainer.scheduler.load_state_dict(manifest["scheduler"])
    trainer.step = manifest["step"]
    engine.step_index = manifest["step"]
    from worker.trainer import StepStats

    trainer.history = [StepStats(**s) for s in manifest["history"]]
    trainer.eval_history = [tuple(e) for e in manifest["eval_history"]]
    log.info("rank %d/%d: loaded %s (saved at world size %d, step %d)", rank, world_size, path,
             saved_n, manifest["step"])
    return manifest


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (tmp file, fsync, replace, fsync dir)."""
    tmp = root / "latest.tmp"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / "latest")
    fsync_dir(root)


# --- saving -------------------------------------------------------------------------------
def rank_tensors(engine, optimizer, *, store_frozen: bool) -> dict[str, torch.Tensor]:
    """This rank's slices, optimizer state and RNG, as named CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for unit in engine.units:
        i = unit.layout.unit
        out[f"u{i}.master"] = unit.master.detach().cpu().contiguous()
        if store_frozen:
            out[f"u{i}.frozen"] = unit.frozen.detach().cpu().contiguous()
        for key, value in optimizer.state.get(unit.master, {}).items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"unit {i}: optimizer state {key!r} is a "
                                      f"{type(value).__name__}, not a tensor")
            out[f"u{i}.opt.{key}"] = value.detach().cpu().contiguous()
    out["rng.torch"] = torch.get_rng_state()
    device = engine.config.device
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def write_rank_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors to ``<path>.part``, fsync, rename: a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    save_file(tensors, str(part), metadata={"format": "pt"})
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, path)


def barrier(collectives, *, generation: int, step: int, which: int, timeout: float,
            phase: Phase = Phase.BARRIER) -> None:
    """Every rank reaches this point (``which`` tells the barriers of one step apart)."""
    if collectives is None or collectives.world_size == 1:
        return
    key = Key(generation=generation, step=step, unit=0, micro_batch=which, phase=phase)
    result(collectives.barrier(key), key=key, rank=collectives.rank, timeout=timeout)


def optimizer_meta(engine, optimizer) -> dict:
    """Optimizer class, hyper-parameters, and which state keys are slices or scalars."""
    sliced, scalars = [], []
    for unit in engine.units:
        state = optimizer.state.get(unit.master, {})
        if state:
            for key, value in state.items():
                (sliced if value.dim() == 1 and value.numel() == unit.st else scalars).append(key)
            break
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"class": type(optimizer).__name__, "param_groups": groups, "sliced": sliced,
            "scalars": scalars}


def _model_meta(model, config) -> dict:
    """What export needs to rebuild the model: class, HF config, LoRA config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    meta = {"class": type(base).__name__, "hf_config": None, "lora": None,
            "source": getattr(getattr(config, "model", None), "name", None)}
    if hasattr(base, "config") and hasattr(base.config, "to_dict"):
        meta["hf_config"] = base.config.to_dict()
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        meta["lora"] = {name: c.to_dict() for name, c in peft_config.items()}
    return meta


@dataclass(frozen=True, slots=True)
class TrainerState:
    """What a manifest records of the trainer at ``step``: its histories, data, scheduler
    position and optimizer meta (a rescue builds it from a buddy snapshot's mark)."""

    step: int
    history: list
    eval_history: list
    data: object
    scheduler: dict  # the scheduler's state_dict
    optimizer: dict  # optimizer_meta

    @classmethod
    def of(cls, trainer, engine) -> TrainerState:
        """The trainer's state now."""
        return cls(step=trainer.step, history=list(trainer.history),
                   eval_history=list(trainer.eval_history), data=trainer.data,
                   scheduler=trainer.scheduler.state_dict(),
                   optimizer=optimizer_meta(engine, trainer.optimizer))


def build_manifest(engine, state: TrainerState, config, *, world_size: int, files: dict,
                   store_frozen: bool, extra: dict | None) -> dict:
    """The manifest.json of a checkpoint of ``engine`` at ``state.step``."""
    step = state.step
    history = [s.to_dict() for s in state.history]
    last_eval = state.eval_history[-1] if state.eval_history else None
    rows_per_step = config.grad_accum * config.micro_batch_rows
    num_rows = getattr(state.data, "num_train_rows", None)
    return {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "generation": engine.generation,
        "epoch": step * rows_per_step / num_rows if num_rows else None,
        "data_position": {"step": step, "row_cursor": step * rows_per_step,
                          "fingerprint": getattr(state.data, "fingerprint", None)},
        "layouts": [layout.to_dict() for layout in engine.layouts],
        "frozen_stored": store_frozen,
        "compute_dtype": str(engine.config.compute_dtype).removeprefix("torch."),
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "config": config.to_dict(),
        "model": _model_meta(engine.model, config),
        "history": history,
        "eval_history": [list(e) for e in state.eval_history],
        "loss": history[-1]["loss"] if history else None,
        # Only an eval of exactly these weights ranks this checkpoint for keep-best.
        "eval_loss": last_eval[1] if last_eval and last_eval[0] == step else None,
        "files": files,
        "extra": extra or {},
        "created": time.time(),
    }


def publish(root: Path, tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` the checkpoint ``final``: fsync it, move an older
    ``final`` aside, rename, fsync the root, point ``latest`` at it, then delete the old one.
    A crash leaves a complete checkpoint under the final name or none there (for an instant
    while an older one of the same step is swapped out; earlier steps stay), never a torn one."""
    fsync_dir(tmp)
    old = root / f"{final.name}.replaced"
    if final.exists():  # a step written again (after a resume, or a torn rescue target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    write_latest(root, final.name)
    shutil.rmtree(old, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------
def _load_unit(unit, files: RankFiles, optimizer, opt: dict, *, saved_n: int, rank: int,
               frozen_stored: bool) -> None:
    """Copy this rank's range of every region of ``unit`` out of the saved rank files."""
    layout = unit.layout
    i = layout.unit
    st_n, sf_n = layout.shard_sizes(saved_n)
    a, b = owned_range(unit.st, rank)
    with torch.no_grad():
        unit.master.copy_(files.read(f"u{i}.master", st_n, a, b, layout.trainable_numel,
                                     torch.float32))
        if frozen_stored and unit.sf:
            fa, fb = owned_range(unit.sf, rank)
            unit.frozen.copy_(files.read(f"u{i}.frozen", sf_n, fa, fb, layout.frozen_numel,
                                         unit.frozen.dtype))
    if unit.st == 0 or not (opt["sliced"] or opt["scalars"]):
        return
    state = {}
    for key in opt["sliced"]:
        state[key] = files.read(f"u{i}.opt.{key}", st_n, a, b, layout.trainable_numel,
                                torch.float32).to(unit.master.device)
    for key in opt["scalars"]:
        state[key] = files.scalar(f"u{i}.opt.{key}")
    optimizer.state[unit.master] = state


def _restore_rng(files: RankFiles, rank: int, saved_n: int, device: torch.device) -> None:
    """This rank's saved RNG; a rank new to the run takes rank 0's (dropout streams differ)."""
    src = rank if rank < saved_n else 0
    with safe_open(files.path(src), framework="pt") as fh:
        torch.set_rng_state(fh.get_tensor("rng.torch"))
        if device.type == "cuda" and "rng.cuda" in fh.keys():
            torch.cuda.set_rng_state(fh.get_tensor("rng.cuda"), device)
