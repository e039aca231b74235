"""LoRA through ``peft``: only adapter weights (and a classifier head) train; the base is frozen.

The frozen base stays in the model, so the engine shards it like any other parameter, just
without gradients or optimizer state. A nonzero LoRA dropout draws random numbers in forward,
so it breaks exact parity with a single process; the default is 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules=None`` takes peft's default for the architecture."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int = 0
    init_lora_weights: bool | str = True  # peft's option; False makes B random (nonzero delta)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: dict) -> LoraSettings:
        """From a manifest's or TOML's dict (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def default_targets(model: nn.Module) -> list[str]:
    """peft's default LoRA target modules for ``model``'s architecture."""
    from peft.utils.constants import (  # lazy: peft
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGETS:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}; set "
                         "target_modules (module names such as 'q_proj')")
    return list(TARGETS[model_type])


def _task_type(model: nn.Module):
    from peft import TaskType  # lazy: peft

    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS  # peft also trains the classifier head ("classifier"/"score")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return TaskType.CAUSAL_LM
    return None


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model``; adapters initialised from ``settings.seed``."""
    from peft import LoraConfig, get_peft_model  # lazy: peft

    targets = list(settings.target_modules) if settings.target_modules else default_targets(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lora_config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=targets,
                             task_type=_task_type(model),
                             init_lora_weights=settings.init_lora_weights,
                             fan_in_fan_out=model_type == "gpt2")  # GPT-2 uses Conv1D
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, lora_config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if "lora_" not in n and "modules_to_save" not in n]
    if stray:
        raise RuntimeError(f"LoRA left non-adapter parameters trainable: {stray[:5]}")
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters train", settings.rank, settings.alpha,
             targets, n_train, n_all)
    return peft_model
