"""Export a sharded checkpoint as a Hugging Face model directory, or a peft adapter directory.

Offline and in one process, at any saved world size: the model skeleton is rebuilt on the meta
device from the manifest's configs (no weights), then every unit's full parameters are
reassembled from the rank files and written out one unit at a time, so at most one unit's
weights are held beyond the process itself. A full run becomes one safetensors shard per unit
plus ``model.safetensors.index.json`` (HF's sharded format) and ``config.json``; a LoRA run
becomes ``adapter_config.json`` + ``adapter_model.safetensors`` under peft's key names.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.engine.sharding import FlatLayout
from worker.models.lora import LoraSettings, apply_lora
from worker.state.catalog import CheckpointError, read_manifest
from worker.state.rank_files import RankFiles

log = logging.getLogger(__name__)

# Files a model directory may carry for its tokenizer; copied when the run trained from one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja")
INDEX = "model.safetensors.index.json"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` as a directory ``from_pretrained`` loads; returns ``out_dir``."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    manifest = read_manifest(checkpoint)
    if not manifest["model"].get("hf_config"):
        raise CheckpointError(f"{checkpoint}: the manifest has no Hugging Face config; only "
                              "transformers models can be exported")
    out.mkdir(parents=True, exist_ok=True)
    layouts = [FlatLayout.from_dict(d) for d in manifest["layouts"]]
    if manifest["model"].get("lora"):
        _export_adapter(checkpoint, manifest, layouts, out)
    else:
        _export_full(checkpoint, manifest, layouts, out)
    _copy_tokenizer(manifest["model"].get("source"), out)
    log.info("exported %s (step %d, saved at world size %d) to %s", checkpoint,
             manifest["step"], manifest["world_size"], out)
    return out


def iter_unit_weights(checkpoint: Path, manifest: dict, layouts: list[FlatLayout], *,
                      trainable_only: bool = False):
    """Yield (unit index, {name: full tensor}) one unit at a time, reassembled from the rank
    files; the replicated parameters come last, as one more unit."""
    n = manifest["world_size"]
    frozen_stored = manifest["frozen_stored"]
    dtype = getattr(torch, manifest["compute_dtype"])
    with RankFiles(checkpoint, n) as rank_files:
        for layout in layouts:
            trainable_n, frozen_n = layout.shard_sizes(n)
            i = layout.unit
            train = rank_files.read(f"u{i}.master", trainable_n, 0, layout.trainable_numel,
                               layout.trainable_numel, torch.float32)
            frozen = None
            if not trainable_only and layout.frozen_numel:
                if not frozen_stored:
                    raise CheckpointError(f"{checkpoint}: unit {i} has frozen parameters that "
                                          "this (LoRA) checkpoint does not store")
                frozen = rank_files.read(f"u{i}.frozen", frozen_n, 0, layout.frozen_numel,
                                    layout.frozen_numel, dtype)
            weights = {}
            for slot in layout.slots:
                if slot.trainable:
                    region = train
                elif frozen is not None:
                    region = frozen
                else:
                    continue
                weights[slot.name] = region[slot.offset : slot.offset + slot.numel].view(slot.shape)
            yield layout.unit, weights
        replicated = [r for r in manifest.get("replicated", [])
                      if r["trainable"] or (not trainable_only and frozen_stored)]
        if replicated:  # whole in saved rank 0's file (engine/replicated.py)
            weights = {}
            for r in replicated:
                value = rank_files.whole(0, f"rep.{r['name']}")
                if value is None:
                    raise CheckpointError(f"{checkpoint}: replicated parameter {r['name']!r} "
                                          "is not in rank 0's file")
                weights[r["name"]] = value.float() if r["trainable"] else value
            yield len(layouts), weights


def _skeleton(manifest: dict):
    """The model rebuilt on the meta device from the manifest's HF config (and LoRA settings)."""
    import transformers  # lazy: costs seconds, and the class is named by the manifest

    meta = manifest["model"]
    hf = dict(meta["hf_config"])
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.architectures = [meta["class"]]
    with torch.device("meta"):
        model = getattr(transformers, meta["class"])(config)
        if meta.get("lora"):
            model = apply_lora(model, LoraSettings.from_dict(manifest["config"]["lora"]))
    return config, model


def _check_names(model, names: set[str], what: str) -> None:
    """Every parameter the skeleton has must come from the checkpoint, and nothing else."""
    expected = {n for n, _ in model.named_parameters()}
    if expected != names:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise CheckpointError(f"{what}: checkpoint and model parameters differ; missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")


def _export_full(checkpoint: Path, manifest: dict, layouts: list[FlatLayout], out: Path) -> None:
    config, model = _skeleton(manifest)
    replicated = [r["name"] for r in manifest.get("replicated", [])]
    _check_names(model, {s.name for lay in layouts for s in lay.slots} | set(replicated),
                 str(checkpoint))
    del model
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    count = len(layouts) + (1 if replicated else 0)
    weight_map: dict[str, str] = {}
    total = 0
    for index, weights in iter_unit_weights(checkpoint, manifest, layouts):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in weights.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(out))


def _export_adapter(checkpoint: Path, manifest: dict, layouts: list[FlatLayout],
                    out: Path) -> None:
    _, model = _skeleton(manifest)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ours = {s.name for lay in layouts for s in lay.slots if s.trainable}
    ours |= {r["name"] for r in manifest.get("replicated", []) if r["trainable"]}
    if trainable != ours:
        raise CheckpointError(f"{checkpoint}: trainable parameters differ from the rebuilt LoRA "
                              f"model: missing {sorted(trainable - ours)[:5]}, unexpected "
                              f"{sorted(ours - trainable)[:5]}")
    state: dict[str, torch.Tensor] = {}  # adapters only: a small fraction of the model
    for _, weights in iter_unit_weights(checkpoint, manifest, layouts, trainable_only=True):
        state.update({k: v.clone() for k, v in weights.items()})
    source = manifest["model"].get("source")
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = source
    # No embedding resize here, and no hub lookup (base names may be presets, not repo ids).
    model.save_pretrained(str(out), state_dict=state, save_embedding_layers=False)


def _copy_tokenizer(source: str | None, out: Path) -> None:
    if not source or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        f = Path(source) / name
        if f.is_file():
            shutil.copy2(f, out / name)
