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
    # Every dropout probability of the model is set to ``dropout``: 0 (the default) makes the
    # forward exact, so a sharded run equals one process. ``keep_dropout`` (or dropout None)
    # keeps the model's own probabilities, as fine-tuning a pretrained model usually wants;
    # each rank then draws its own masks, which breaks exact parity.
    dropout: float | None = 0.0
    keep_dropout: bool = False
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
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.keep_dropout and self.dropout:
            raise ValueError(f"keep_dropout keeps the model's own dropout, but dropout "
                             f"{self.dropout} was given too: choose one")

    @property
    def applied_dropout(self) -> float | None:
        """The probability every dropout is set to; None keeps the model's own."""
        return None if self.keep_dropout else self.dropout
