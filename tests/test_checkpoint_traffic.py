"""What the traffic options add to saved state survives a checkpoint: error-feedback residuals
(their own at the same world size; summed onto rank 0 when resharded, so the owed correction is
sent exactly once) and parameters replicated below the persistence threshold (masters and
optimizer state, at any world size, and exported with the rest)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_checkpoint_multirank import CFG, LayoutOnly

from communication.torch_collectives import TorchCollectives
from worker.main import shard_for_training
from worker.models.loading import build_model
from worker.state.checkpoint import load_checkpoint, save_checkpoint
from worker.state.export import export_checkpoint
from worker.train.traffic import TrafficConfig
from worker.train.trainer import Trainer

REPLICATED = dataclasses.replace(CFG, traffic=TrafficConfig(persist_threshold=200))


@pytest.fixture(scope="module")
def data():
    from harness.builders import build_data_and_model

    return build_data_and_model(CFG)[0]


def build(cfg, data, coll, *, feedback: bool = False):
    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size)
    engine = shard_for_training(cfg, model, coll, 0)
    if feedback:  # as a lossy grad codec with error feedback would leave them
        for unit in engine.units:
            unit.residual = torch.zeros(unit.trainable_shard * coll.world_size)
    return engine, Trainer(cfg, engine=engine, data=data, rank=coll.rank,
                           world_size=coll.world_size)


def one_rank():
    return TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")


def test_residuals_round_trip_and_reshard_onto_rank_zero(data, tmp_path):
    engine, trainer = build(CFG, data, one_rank(), feedback=True)
    trainer.train_step()
    torch.manual_seed(1)
    owed = [torch.randn_like(u.residual) for u in engine.units]
    for unit, r in zip(engine.units, owed):
        unit.residual.copy_(r)
    ckpt = save_checkpoint(tmp_path, trainer.states, rank=0, world_size=1)
    same, same_tr = build(CFG, data, one_rank(), feedback=True)
    load_checkpoint(ckpt, same_tr.states, rank=0, world_size=1)
    assert all(torch.equal(u.residual, r) for u, r in zip(same.units, owed))
    for rank in range(2):
        eng2, tr2 = build(CFG, data, LayoutOnly(rank, 2), feedback=True)
        load_checkpoint(ckpt, tr2.states, rank=rank, world_size=2)
        for u, u2, r in zip(engine.units, eng2.units, owed):
            n = u.layout.trainable_numel
            want = r[:n] if rank == 0 else torch.zeros(n)
            assert torch.equal(u2.residual[:n], want), (rank, u.index)
            assert not u2.residual[n:].any()  # padding owes nothing


def test_replicated_parameters_reshard_and_export(data, tmp_path):
    engine, trainer = build(REPLICATED, data, one_rank())
    rep = engine.replicated
    assert rep.trainable and all(p.numel() < 200 for _, p in rep.named), "nothing replicated"
    trainer.train_step()
    trainer.train_step()
    ckpt = save_checkpoint(tmp_path / "ckpt", trainer.states, rank=0, world_size=1)
    for rank in range(2):
        eng2, tr2 = build(REPLICATED, data, LayoutOnly(rank, 2))
        load_checkpoint(ckpt, tr2.states, rank=rank, world_size=2)
        for m, m2 in zip(rep.masters, eng2.replicated.masters):
            assert torch.equal(m, m2)
            for key, value in trainer.optimizer.state[m].items():
                assert torch.equal(tr2.optimizer.state[m2][key], value), key
        for (_, p), (_, p2) in zip(rep.trainable, eng2.replicated.trainable):
            assert torch.equal(p, p2)  # the module computes with the loaded masters
    with pytest.raises(Exception, match="replicated parameters differ"):
        _, plain = build(CFG, data, one_rank())
        load_checkpoint(ckpt, plain.states, rank=0, world_size=1)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    loaded = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    full = dict(engine.iter_full_weights())
    assert set(full) <= set(loaded)
    for name, value in full.items():
        assert torch.equal(loaded[name].detach(), value), name
