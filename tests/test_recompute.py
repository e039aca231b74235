"""Activation checkpointing (worker/engine/recompute.py) on the real engine at world size 1:
the same loss and gradients as without it, every block unit replayed once per backward, and
what autograd keeps for backward (measured by a saved-tensor hook over the whole step) falls
to the root unit's share. Multi-rank parity is in test_parity (scenarios recompute*)."""

from __future__ import annotations

import dataclasses

import torch
from harness.builders import build_data_and_model
from parity_scenarios import SCENARIOS

from communication.torch_collectives import TorchCollectives
from worker.cluster.ports import free_port
from worker.main import shard_for_training
from worker.models.config import ModelConfig
from worker.train.trainer import rank_micro_batch


def one_step(checkpointing: bool) -> tuple[float, list[torch.Tensor], int, int]:
    """(loss, owned gradients, bytes autograd saved, units replayed) of one micro-batch."""
    cfg = dataclasses.replace(SCENARIOS["gpt2"], activation_checkpointing=checkpointing,
                              model=ModelConfig(name="tiny-gpt2", n_layer=4, hidden_size=128),
                              micro_batch_rows=8)
    coll = TorchCollectives(rank=0, world_size=1, store_addr=f"127.0.0.1:{free_port()}",
                            timeout=30.0)
    try:
        data, model = build_data_and_model(cfg, on_meta=True)
        engine = shard_for_training(cfg, model, coll, 0)
        batch = rank_micro_batch(data, cfg, step=0, micro=0, rank=0, world_size=1,
                                 device=torch.device("cpu"))
        saved = [0]

        def pack(t: torch.Tensor):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = engine.forward(**batch).loss
        engine.backward(loss)
        grads = [p.grad.clone() for p in engine.parameters()]
        return float(loss), grads, saved[0], engine.recomputed_units
    finally:
        coll.close()


def test_checkpointing_replays_each_block_and_keeps_less_for_backward():
    loss, grads, saved, replays = one_step(False)
    loss_ck, grads_ck, saved_ck, replays_ck = one_step(True)
    print(f"saved for backward: {saved / 1e6:.2f} MB plain, {saved_ck / 1e6:.2f} MB checkpointed")
    assert loss_ck == loss
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(grads, grads_ck))
    assert replays == 0 and replays_ck == 4  # one per block unit, the root never
    assert saved_ck < 0.5 * saved, (saved, saved_ck)
