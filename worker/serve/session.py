"""One session's model on this rank: built from the session's configuration (a preset or a
model directory, LoRA or full) or from a saved state, sharded as training shards it, with an
AdamW over the owned slices whose hyper-parameters each optim_step sets.

What a checkpoint holds is the trainer's ``Checkpointed`` (slices, optimizer, progress), so a
service state and a CLI checkpoint are one format: either loads as the other, and both export.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from communication.collectives import Collectives
from worker.data.tokenizer import load_tokenizer
from worker.models.lora import LoraSettings
from worker.serve.privacy import PrivacyLedger
from worker.serve.rows import Rows
from worker.state.catalog import read_manifest
from worker.state.checkpoint import Checkpointed, load_checkpoint
from worker.state.shards import ShardedState
from worker.train.assembly import build_model_for, shard_for_training
from worker.train.config import TrainConfig
from worker.train.optim import OptimConfig, build_optimizer, engine_decay_ranges
from worker.train.state import TrainState
from zerop2p.requests import ModelInfo, SessionRecord, SessionRequest

log = logging.getLogger(__name__)


class NoSchedule:
    """The service's schedule lives in the client (a learning rate per optim_step): nothing
    to save, and a CLI checkpoint's schedule is ignored on load."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def session_train_config(base: TrainConfig, request: SessionRequest) -> TrainConfig:
    """The worker's own options (device, transport, preset sizes) with the session's model,
    seed and LoRA; or a saved state's model and LoRA."""
    if request.from_state is not None:
        saved = TrainConfig.from_dict(read_manifest(request.from_state)["config"])
        return dataclasses.replace(base, model=saved.model, lora=saved.lora)
    model = dataclasses.replace(base.model, name=request.base_model, seed=request.seed)
    lora = None
    if request.lora_rank is not None:
        lora = LoraSettings(rank=request.lora_rank)
        if request.lora_alpha is not None:
            lora = dataclasses.replace(lora, alpha=request.lora_alpha)
    return dataclasses.replace(base, model=model, lora=lora)


@dataclass
class ServedSession:
    """A session's engine, optimizer and progress on this rank, and what it has applied."""

    session_id: str
    train: TrainConfig
    engine: object
    optimizer: torch.optim.Optimizer
    states: Checkpointed
    info: ModelInfo
    tokenizer: object = None  # decodes samples for stop strings
    applied: int = -1  # the last seq applied to these weights
    window: list[Rows] = field(default_factory=list)  # this rank's rows since the last step
    ledger: PrivacyLedger | None = None  # privacy accounting, from the first DP step

    def begin(self, op_id: int) -> None:
        """Name this operation's collectives after its id: sessions share the generation's
        collectives, and two engines (or two saves at one step) must never reuse a Key. The
        id is the same on every rank and runs once per generation."""
        self.engine.generation = op_id

    @property
    def progress(self) -> TrainState:
        return self.states.progress

    @property
    def dirty(self) -> bool:
        """Gradients pending (a forward_backward since the last optim_step)."""
        return bool(self.window)

    def load(self, path: str | Path, *, with_optimizer: bool) -> dict:
        """Weights (and the optimizer's state, or a fresh one) from a saved state."""
        self.optimizer.zero_grad(set_to_none=True)
        rank, world = self.engine.collectives.rank, self.engine.collectives.world_size
        manifest = load_checkpoint(path, self.states, rank=rank, world_size=world)
        if not with_optimizer:
            self.optimizer.state.clear()
        self.engine.replicated.refresh()
        self.window.clear()
        ledger = manifest.get("extra", {}).get("privacy")
        self.ledger = None
        if ledger is not None:
            self.ledger = PrivacyLedger()
            self.ledger.load_state_dict(ledger)
        return manifest


def open_session(base: TrainConfig, record: SessionRecord, collectives: Collectives, *,
                 generation: int) -> ServedSession:
    """Build ``record``'s model, shard it and make its optimizer; a from_state session (or a
    replay base, loaded by the caller) fills it from disk."""
    request = record.config
    train = session_train_config(base, request)
    source = Path(train.model.name)
    tokenizer = load_tokenizer(source if source.is_dir() else None)
    model = build_model_for(train, vocab_size=tokenizer.vocab_size, on_meta=True)
    engine = shard_for_training(train, model, collectives, generation)
    # AdamW with the CLI's decay ranges; optim_step sets lr, betas, eps and decay per call
    optim = OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=0.0, eps=1e-12,
                        schedule="constant", max_grad_norm=None)
    optimizer = build_optimizer(engine.parameters(), optim, engine_decay_ranges(engine))
    progress = TrainState(rows_per_step=1, device=torch.device(train.device))
    states = Checkpointed(shards=ShardedState(engine, optimizer, store_frozen=train.lora is None,
                                              source=train.model.name),
                          progress=progress, scheduler=NoSchedule(), config=train.to_dict())
    params = list(model.parameters())
    hf = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    info = ModelInfo(vocab_size=tokenizer.vocab_size,
                     max_positions=getattr(hf, "n_positions", None)
                     or getattr(hf, "max_position_embeddings", train.model.max_positions),
                     trainable_params=sum(p.numel() for p in params if p.requires_grad),
                     total_params=sum(p.numel() for p in params), lora=train.lora is not None)
    served = ServedSession(record.session_id, train, engine, optimizer, states, info, tokenizer)
    if request.from_state is not None:
        served.load(request.from_state, with_optimizer=request.with_optimizer)
    log.info("session %s: %s%s, %d of %d parameters train", record.session_id, train.model.name,
             f" + LoRA rank {train.lora.rank}" if train.lora else "", info.trainable_params,
             info.total_params)
    return served
