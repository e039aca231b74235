"""Trainer behaviour that parity runs do not reach: an fp16 step whose scaled gradients overflow
is skipped (weights, optimizer state untouched) and training goes on; checkpoint cadence."""

from __future__ import annotations

import pytest
import torch
from harness.builders import build_data_and_model

from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.data.config import DataConfig
from worker.main import shard_for_training
from worker.models.config import ModelConfig
from worker.train.config import TrainConfig
from worker.train.optim import OptimConfig
from worker.train.state import TrainState
from worker.train.trainer import Trainer

CFG = TrainConfig(model=ModelConfig(name="tiny-gpt2"), steps=3, micro_batch_rows=2,
                  data=DataConfig(seq_len=16, max_tokens=20_000), mixed_precision="fp16",
                  optim=OptimConfig(lr=1e-3, schedule="constant"))


@pytest.fixture
def trainer():
    transport = GrpcTransport(token="t")
    coll = GrpcCollectives.bind(transport, rank=0, world_size=1, peers=[transport.address], generation=1,
                                 timeout=30.0)
    data, model = build_data_and_model(CFG)
    engine = shard_for_training(CFG, model, coll, 1)
    yield Trainer(CFG, engine=engine, data=data, rank=0, world_size=1)
    coll.close()
    transport.close()


@pytest.mark.timeout(60)
def test_fp16_overflow_skips_the_update_and_training_goes_on(trainer):
    before = [p.detach().clone() for p in trainer.engine.parameters()]
    trainer.loss_scale = 1e38  # scaled fp16 gradients overflow to inf
    st = trainer.train_step()
    assert st.skipped and not torch.isfinite(torch.tensor(st.grad_norm))
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.engine.parameters()))
    assert not trainer.optimizer.state, "a skipped step must not create optimizer state"
    assert trainer.scheduler.last_epoch == 0, "a skipped step must not advance the schedule"
    trainer.loss_scale = 1024.0
    st = trainer.train_step()
    assert not st.skipped and torch.isfinite(torch.tensor(st.loss))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.engine.parameters()))
    assert [s.step for s in trainer.history] == [0, 1]


def test_checkpoint_cadence(tmp_path):
    cfg = TrainConfig(steps=10, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    due = []
    for step in range(1, 11):
        t = Trainer.__new__(Trainer)
        t.config, t.state = cfg, TrainState(rows_per_step=cfg.micro_batch_rows, step=step)
        if t._checkpoint_due():
            due.append(step)
    assert due == [4, 8, 10]
