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
                 store_frozen: bool, source: str | None = None) -> None:
        self.engine = engine
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
            for key, value in self.optimizer.state.get(unit.master, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"unit {i}: optimizer state {key!r} is a "
                                          f"{type(value).__name__}, not a tensor")
                out[f"u{i}.opt.{key}"] = value.detach().cpu().contiguous()
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
        }

    def load(self, files: RankFiles, manifest: dict, *, rank: int) -> None:
        """Fill this rank's slices and optimizer state from rank files of any world size."""
        check_layouts([FlatLayout.from_dict(d) for d in manifest["layouts"]],
                      self.engine.layouts)
        opt = manifest["optimizer"]
        if opt["class"] != type(self.optimizer).__name__:
            raise CheckpointError(f"{files.dir}: optimizer is {opt['class']} in the checkpoint, "
                                  f"{type(self.optimizer).__name__} in this run")
        for unit in self.engine.units:
            self._load_unit(unit, files, opt, saved_n=manifest["world_size"], rank=rank,
                            frozen_stored=manifest["frozen_stored"])
        for group, saved in zip(self.optimizer.param_groups, opt["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        self.engine.step_index = manifest["step"]  # collectives go on with the saved step

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
        if not unit.trains or not (opt["sliced"] or opt["scalars"]):
            return
        state = {}
        for key in opt["sliced"]:
            state[key] = files.read(f"u{i}.opt.{key}", trainable_n, a, b, layout.trainable_numel,
                                    torch.float32).to(unit.master.device)
        for key in opt["scalars"]:
            state[key] = files.scalar(f"u{i}.opt.{key}")
        self.optimizer.state[unit.master] = state


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
