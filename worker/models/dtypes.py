"""The one table of dtypes: names in configs and manifests, and the mixed-precision flags."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
# ``--mixed-precision`` value -> the compute dtype's name in DTYPES (master shards stay fp32).
PRECISIONS: dict[str, str] = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a ``--mixed-precision`` value; ValueError naming the allowed ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"mixed_precision {precision!r} is not one of {tuple(PRECISIONS)}")
    return DTYPES[PRECISIONS[precision]]
