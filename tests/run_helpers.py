"""What the multi-process training tests read back from a run's output directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def result(out: Path) -> tuple[dict, dict]:
    """The run's result.json and its final weights."""
    return (json.loads((out / "result.json").read_text()),
            load_file(str(out / "weights.safetensors")))


def assert_same_weights(weights: dict, ref: dict) -> None:
    """The same tensor names and bit-identical values as the reference run, naming any that
    differs."""
    assert weights.keys() == ref.keys()
    for name, w in ref.items():
        assert torch.equal(weights[name], w), f"{name} differs from the uninterrupted run"
