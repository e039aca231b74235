"""What tests assemble by hand from the worker's parts: data and model in one process."""

from __future__ import annotations

from worker.main import build_data, build_trainable_model
from worker.train.config import TrainConfig


def build_data_and_model(train: TrainConfig, *, on_meta: bool = False):
    """Both, for a single process (the reference run, tests); ``on_meta`` leaves the model's
    parameters on the meta device for the engine to fill unit by unit, as a worker does."""
    data = build_data(train)
    return data, build_trainable_model(train, data, on_meta=on_meta)
