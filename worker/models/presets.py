"""Tiny transformer presets built from ``transformers`` configs: nothing is downloaded.

Every dropout probability is set to the config's ``dropout`` (0 by default) so a sharded run
and a single-process run compute exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.models.config import TASKS, ModelConfig

# Config attributes that hold a dropout probability, across the architectures we load.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                "attention_dropout", "hidden_dropout", "dropout", "activation_dropout")


def _gpt2(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
    from transformers import GPT2Config  # lazy: transformers

    return GPT2Config(vocab_size=v, n_positions=pos, n_embd=hidden, n_layer=layers, n_head=heads,
                      bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)


def _decoder(kind: str) -> Callable:
    def make(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
        import transformers  # lazy: transformers

        cls = getattr(transformers, kind)
        return cls(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=max(heads // 2, 1), max_position_embeddings=pos,
                   bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)

    return make


def _bert(v: int, pad: int, layers: int, hidden: int, heads: int, pos: int):
    from transformers import BertConfig  # lazy: transformers

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


def set_dropout(hf_config, p: float | None) -> None:
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
    set_dropout(hf_config, config.applied_dropout)
    return hf_config
