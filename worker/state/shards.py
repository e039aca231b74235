"""The state each rank owns, saving itself: its slices of every unit and their optimizer state.

``ShardedState`` stands for the engine's units and the optimizer that steps them: it hands out
this rank's tensors under the rank-file names (see the note in checkpoint.py), describes them
(layouts, optimizer class and state keys), and fills them back from rank files saved at any
world size. Checkpoints, buddy snapshots and rescues all go through it.
"""

from __future__ import annotations

import logging

import torch

from worker.engine.sharding import FlatLayout, check_layouts, owned_range
from worker.engine.zero3 import Zero3Engine
from worker.state.catalog import CheckpointError
from worker.state.rank_files import RankFiles

log = logging.getLogger(__name__)


class ShardedState:
    """This rank's owned slices (``engine``) and their optimizer state (``optimizer``)."""

    def __init__(self, engine: Zero3Engine, optimizer: torch.optim.Optimizer, *,
                 store_frozen: bool, source: str | None = None, outer=None) -> None:
        self.engine = engine
        self.outer = outer  # islands: the global copy and outer momentum (islands/outer.py)
        self.optimizer = optimizer
        self.store_frozen = store_frozen  # False for LoRA: the frozen base is rebuilt instead
        self.source = source  # the model's preset name or directory, for export

    def rank_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's slices and optimizer state, as named CPU tensors."""
        out: dict[str, torch.Tensor] = {}
        for unit in self.engine.units:
            i = unit.index
            out[f"u{i}.master"] = unit.master.detach().cpu().contiguous()
            if self.store_frozen:
                out[f"u{i}.frozen"] = unit.frozen.detach().cpu().contiguous()
            if unit.residual is not None:  # error feedback still owed to the next gradient
                out[f"u{i}.residual"] = unit.residual.clone()
            for key, value in self.optimizer.state.get(unit.master, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"unit {i}: optimizer state {key!r} is a "
                                          f"{type(value).__name__}, not a tensor")
                out[f"u{i}.opt.{key}"] = value.detach().cpu().contiguous()
            out.update(self._outer_tensors(unit.master, f"u{i}"))
        if self.engine.collectives.rank == 0:  # replicated: the same on every rank, saved once
            out.update(self._replicated_tensors())
        return out

    def _outer_tensors(self, master: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """``<prefix>.outer.global`` and ``.outer.momentum`` of one master (islands only)."""
        pair = None if self.outer is None else self.outer.state_of(master)
        if pair is None:
            return {}
        out = {f"{prefix}.outer.global": pair[0].detach().cpu().contiguous()}
        if pair[1] is not None:
            out[f"{prefix}.outer.momentum"] = pair[1].detach().cpu().contiguous()
        return out

    def _replicated_tensors(self) -> dict[str, torch.Tensor]:
        """``rep.<name>`` (fp32 master, or the frozen value unless LoRA) and its optimizer
        state ``rep.<name>.opt.<key>`` for every replicated parameter."""
        rep = self.engine.replicated
        out: dict[str, torch.Tensor] = {}
        for (name, _), master in zip(rep.trainable, rep.masters):
            out[f"rep.{name}"] = master.detach().cpu().contiguous()
            out.update(self._outer_tensors(master, f"rep.{name}"))
            for key, value in self.optimizer.state.get(master, {}).items():
                out[f"rep.{name}.opt.{key}"] = value.detach().cpu().contiguous()
        if self.store_frozen:
            for name, p in rep.frozen:
                out[f"rep.{name}"] = p.detach().cpu().contiguous()
        return out

    def optimizer_meta(self) -> dict:
        """Optimizer class, hyper-parameters, and which state keys are slices or scalars."""
        sliced, scalars = [], []
        for unit in self.engine.units:
            state = self.optimizer.state.get(unit.master, {})
            if state:
                for key, value in state.items():
                    is_slice = value.dim() == 1 and value.numel() == unit.trainable_shard
                    (sliced if is_slice else scalars).append(key)
                break
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self.optimizer.param_groups]
        return {"class": type(self.optimizer).__name__, "param_groups": groups,
                "sliced": sliced, "scalars": scalars}

    def meta(self) -> dict:
        """What a manifest records of the shards: layouts, dtype, optimizer, model."""
        engine = self.engine
        return {
            "generation": engine.generation,
            "layouts": [layout.to_dict() for layout in engine.layouts],
            "frozen_stored": self.store_frozen,
            "compute_dtype": str(engine.config.compute_dtype).removeprefix("torch."),
            "optimizer": self.optimizer_meta(),
            "model": _model_meta(engine.model, self.source),
            "replicated": [{"name": n, "shape": list(p.shape), "trainable": p.requires_grad}
                           for n, p in engine.replicated.named],
            "outer": None if self.outer is None else {"round": self.outer.round},
        }

    def load(self, files: RankFiles, manifest: dict, *, rank: int) -> None:
        """Fill this rank's slices and optimizer state from rank files of any world size."""
        saved = [(r["name"], tuple(r["shape"])) for r in manifest.get("replicated", [])]
        ours = [(n, tuple(p.shape)) for n, p in self.engine.replicated.named]
        if saved != ours:
            raise CheckpointError(f"{files.dir}: replicated parameters differ (is the persistence "
                                  f"threshold the same?): checkpoint has {len(saved)} "
                                  f"{saved[:2]}, this run {len(ours)} {ours[:2]}")
        check_layouts([FlatLayout.from_dict(d) for d in manifest["layouts"]],
                      self.engine.layouts)
        opt = manifest["optimizer"]
        if opt["class"] != type(self.optimizer).__name__:
            raise CheckpointError(f"{files.dir}: optimizer is {opt['class']} in the checkpoint, "
                                  f"{type(self.optimizer).__name__} in this run")
        for unit in self.engine.units:
            self._load_unit(unit, files, opt, saved_n=manifest["world_size"], rank=rank,
                            frozen_stored=manifest["frozen_stored"])
        self._load_replicated(files, manifest)
        for group, saved in zip(self.optimizer.param_groups, opt["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        self.engine.step_index = manifest["step"]  # collectives go on with the saved step
        if self.outer is not None:
            self._load_outer(files, manifest, rank=rank)

    def _load_outer(self, files: RankFiles, manifest: dict, *, rank: int) -> None:
        """The global copy and outer momentum; a checkpoint without them (not an islands run)
        starts the outer loop from the loaded weights."""
        outer, saved = self.outer, manifest.get("outer")
        by_master = {id(p): g for p, g in zip(outer.params, outer.globals)}
        units = {id(u.master): u for u in self.engine.units if u.trains}
        rep = {id(m): name for (name, _), m in zip(self.engine.replicated.trainable,
                                                   self.engine.replicated.masters)}
        saved_n = manifest["world_size"]
        with torch.no_grad():
            for p in outer.params:
                g = by_master[id(p)]
                if saved is None:
                    g.copy_(p)
                    continue
                values = {}
                for what in ("global", "momentum"):
                    unit = units.get(id(p))
                    if unit is not None:
                        name = f"u{unit.index}.outer.{what}"
                        if what == "momentum" and name not in files.names(0):
                            continue
                        trainable_n, _ = unit.layout.shard_sizes(saved_n)
                        a, b = owned_range(unit.trainable_shard, rank)
                        values[what] = files.read(name, trainable_n, a, b,
                                                  unit.layout.trainable_numel, torch.float32)
                    else:
                        value = files.whole(0, f"rep.{rep[id(p)]}.outer.{what}")
                        if value is not None:
                            values[what] = value
                g.copy_(values["global"])
                if "momentum" in values:
                    outer.optimizer.state.setdefault(g, {})["momentum_buffer"] = \
                        values["momentum"].to(g.device).clone()
        outer.round = saved["round"] if saved else 0

    def _load_unit(self, unit, files: RankFiles, opt: dict, *, saved_n: int, rank: int,
                   frozen_stored: bool) -> None:
        """Copy this rank's range of every region of ``unit`` out of the saved rank files."""
        layout = unit.layout
        i = unit.index
        trainable_n, frozen_n = layout.shard_sizes(saved_n)
        a, b = owned_range(unit.trainable_shard, rank)
        with torch.no_grad():
            unit.master.copy_(files.read(f"u{i}.master", trainable_n, a, b,
                                         layout.trainable_numel, torch.float32))
            if frozen_stored and unit.frozen_shard:
                fa, fb = owned_range(unit.frozen_shard, rank)
                unit.frozen.copy_(files.read(f"u{i}.frozen", frozen_n, fa, fb,
                                             layout.frozen_numel, unit.frozen.dtype))
        if unit.residual is not None:
            self._load_residual(unit, files, saved_n=saved_n, rank=rank)
        if not unit.trains or not (opt["sliced"] or opt["scalars"]):
            return
        state = {}
        for key in opt["sliced"]:
            state[key] = files.read(f"u{i}.opt.{key}", trainable_n, a, b, layout.trainable_numel,
                                    torch.float32).to(unit.master.device)
        for key in opt["scalars"]:
            state[key] = files.scalar(f"u{i}.opt.{key}")
        self.optimizer.state[unit.master] = state


    def _load_replicated(self, files: RankFiles, manifest: dict) -> None:
        """Replicated parameters and their optimizer state, from saved rank 0's file."""
        rep = self.engine.replicated
        with torch.no_grad():
            for (name, _), master in zip(rep.trainable, rep.masters):
                master.copy_(_needed(files, name))
                prefix = f"rep.{name}.opt."
                state = {k.removeprefix(prefix): files.whole(0, k).to(master.device)
                         for k in files.names(0) if k.startswith(prefix)}
                if state:
                    self.optimizer.state[master] = state
            if manifest["frozen_stored"]:
                for name, p in rep.frozen:
                    p.copy_(_needed(files, name))
        rep.refresh()

    def _load_residual(self, unit, files: RankFiles, *, saved_n: int, rank: int) -> None:
        """Error feedback owed by this rank: its own at the same world size; otherwise the sum
        of every saved rank's (what all still owe to each element) goes to rank 0, so the
        next step's reduced gradient carries it exactly once."""
        name, numel = f"u{unit.index}.residual", unit.layout.trainable_numel
        unit.residual.zero_()
        if saved_n == self.engine.collectives.world_size:
            saved = files.whole(rank, name)
            if saved is not None:
                unit.residual.copy_(saved)
            return
        if rank != 0:
            return
        for saved_rank in range(saved_n):
            saved = files.whole(saved_rank, name)
            if saved is not None:
                unit.residual[:numel] += saved[:numel]


def _needed(files: RankFiles, name: str) -> torch.Tensor:
    value = files.whole(0, f"rep.{name}")
    if value is None:
        raise CheckpointError(f"{files.path(0)}: no replicated parameter {name!r}")
    return value


def _model_meta(model, source: str | None) -> dict:
    """What export needs to rebuild the model: class, HF config, LoRA config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    meta = {"class": type(base).__name__, "hf_config": None, "lora": None, "source": source}
    if hasattr(base, "config") and hasattr(base.config, "to_dict"):
        meta["hf_config"] = base.config.to_dict()
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        meta["lora"] = {name: c.to_dict() for name, c in peft_config.items()}
    return meta
