"""Which model to build: a preset's name and size, or a local directory; the task."""

from __future__ import annotations

from dataclasses import dataclass

from worker.models.dtypes import DTYPES

TASKS = ("causal-lm", "sequence-classification")


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
