"""Assembling a model for training: tokenizer and data, the (LoRA) model on the meta device,
and its shards with the engine options the config names. The trainer, the service and the
single-process reference all build through here, so they build the same model."""

from __future__ import annotations

from pathlib import Path

import torch

from communication.collectives import Collectives
from worker.data.classification import ClassificationData
from worker.data.packing import PackedText
from worker.data.tokenizer import load_tokenizer
from worker.engine.config import ShardConfig
from worker.engine.progress import NO_OBSERVERS, Observers
from worker.engine.recompute import checkpoint_units
from worker.engine.shard import shard_model
from worker.engine.zero3 import Zero3Engine
from worker.models.blocks import find_block_modules
from worker.models.dtypes import compute_dtype
from worker.models.loading import build_model, local_weights
from worker.models.lora import apply_lora
from worker.models.meta import MetaInit, is_on_meta, materialize_all
from worker.train.config import TrainConfig
from worker.train.traffic import replicate_frozen


def build_data(train: TrainConfig) -> PackedText | ClassificationData:
    """Tokenizer and dataset (packed text, or classification examples), the same on every rank."""
    tokenizer = load_tokenizer(train.model.name if Path(train.model.name).is_dir() else None)
    if train.model.task == "sequence-classification":
        return ClassificationData(train.data, tokenizer)
    return PackedText(train.data, tokenizer)


def build_trainable_model(train: TrainConfig, data, *, on_meta: bool = False) -> torch.nn.Module:
    """The (LoRA-wrapped) model for ``data``'s vocabulary, identical on every rank for one seed.

    A preset is built on the meta device and LoRA applied there; ``on_meta`` leaves it so for
    ``shard_for_training`` to fill unit by unit, otherwise it is filled here, with the same
    values (meta.py)."""
    return build_model_for(train, vocab_size=data.tokenizer.vocab_size, on_meta=on_meta)


def build_model_for(train: TrainConfig, *, vocab_size: int, on_meta: bool = False
                    ) -> torch.nn.Module:
    """``build_trainable_model`` for a vocabulary size rather than a dataset (the service)."""
    model = build_model(train.model, vocab_size=vocab_size, on_meta=True)
    if train.lora is not None:
        model = apply_lora(model, train.lora)
    if not on_meta and is_on_meta(model):
        materialize_all(model, **_init_seeds(train))
    return model


def _init_seeds(train: TrainConfig) -> dict:
    """How meta.py fills ``train``'s model: per-module init seeds, adapters, a directory's files."""
    lora = train.lora
    return {"seed": train.model.seed, "lora_init": None if lora is None else lora.init_lora_weights,
            "lora_seed": 0 if lora is None else lora.seed, "weights": local_weights(train.model)}


def shard_for_training(train: TrainConfig, model, collectives: Collectives, generation: int,
                       observers: Observers = NO_OBSERVERS) -> Zero3Engine:
    """Shard ``model`` into units (found automatically, or by ``unit_pattern``) as ``train``
    says: device, compute dtype, deadline, and the traffic options."""
    blocks = find_block_modules(model, pattern=train.unit_pattern)
    device = torch.device(train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    traffic, dtype = train.traffic, compute_dtype(train.mixed_precision)
    frozen_bytes = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    replicate = replicate_frozen(traffic.frozen, frozen_bytes=frozen_bytes * dtype.itemsize,
                                 device=device)
    lossy_grads = traffic.codecs(train.codec)[1] != "raw"
    config = ShardConfig(generation=generation, timeout=train.timeout, compute_dtype=dtype,
                         device=device, prefetch=train.prefetch,
                         prefetch_depth=traffic.prefetch_depth,
                         reshard_after_forward=traffic.reshard_after_forward,
                         replicate_frozen=replicate,
                         error_feedback=traffic.error_feedback and lossy_grads,
                         persist_threshold=traffic.persist_threshold)
    fill = MetaInit(model, blocks=blocks, **_init_seeds(train)) if is_on_meta(model) else None
    engine = shard_model(model, collectives=collectives, config=config, block_names=blocks,
                         observers=observers, materialize=fill)
    if train.activation_checkpointing:
        checkpoint_units(engine)
    return engine
