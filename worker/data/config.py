"""Where the training text comes from and how it becomes rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Where text comes from and how it becomes rows; validated with the numbers."""

    # "stdlib" | .txt file | .jsonl / .json / .parquet file | a datasets ``save_to_disk``
    # directory | a directory of .txt/.md/.py files (corpus.py)
    source: str = "stdlib"
    text_field: str = "text"
    label_field: str = "label"  # classification from .jsonl: an int label per line
    seq_len: int = 64  # tokens per row (labels = input_ids; HF models shift inside)
    eval_fraction: float = 0.05  # held-out tail
    max_tokens: int | None = None  # None: every token of the source; else the stream's cap
    # where packed token stores live (store.py); None: $ZEROP2P_DATA_CACHE, else
    # $XDG_CACHE_HOME/zerop2p/data, else ~/.cache/zerop2p/data
    cache_dir: str | None = None
    max_examples: int | None = 4_000  # classification: examples kept in all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) is below seq_len ({self.seq_len})")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"max_examples must be >= 2, got {self.max_examples}")
