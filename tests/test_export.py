"""Export: a full run becomes a sharded HF directory, a LoRA run a peft adapter directory; both
load with ``from_pretrained`` and give the logits of the trained, sharded model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from test_checkpoint_multirank import CFG, LayoutOnly

from communication.torch_collectives import TorchCollectives
from worker.main import shard_for_training
from worker.models.loading import build_model
from worker.models.lora import LoraSettings
from worker.state.checkpoint import load_checkpoint, save_checkpoint
from worker.state.export import export_checkpoint
from worker.train.trainer import Trainer

LORA_CFG = dataclasses.replace(CFG, lora=LoraSettings(rank=4, alpha=8.0, init_lora_weights=False))


@pytest.fixture(scope="module")
def data():
    from harness.builders import build_data_and_model

    return build_data_and_model(CFG)[0]


def engine_for(cfg, data, coll):
    from worker.models.lora import apply_lora

    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    engine = shard_for_training(cfg, model, coll, 0)
    return engine, Trainer(cfg, engine=engine, data=data, rank=0,
                           world_size=coll.world_size)


def sharded_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.forward(input_ids=ids).logits


def test_full_export_loads_and_gives_the_trained_logits(data, tmp_path):
    from transformers import AutoModelForCausalLM

    coll = TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")
    engine, trainer = engine_for(CFG, data, coll)
    for _ in range(2):
        trainer.train_step()
    ckpt = save_checkpoint(tmp_path / "ckpt", trainer.states, rank=0,
                           world_size=1)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    for name, value in engine.iter_full_weights():
        assert torch.equal(params[name].detach(), value), name
    ids = data.global_batch(step=0, micro_batch=0, grad_accum=1, micro_batch_rows=4)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, sharded_logits(engine, ids), rtol=0, atol=1e-6)


def test_lora_checkpoint_holds_adapters_only_and_exports_for_peft(data, tmp_path):
    from peft import PeftModel

    coll = TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")
    engine, trainer = engine_for(LORA_CFG, data, coll)
    # One real AdamW step on the adapters with given gradients (no backward pass needed).
    gen = torch.Generator().manual_seed(1)
    for p in engine.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    ckpt = save_checkpoint(tmp_path / "ckpt", trainer.states,
                           rank=0, world_size=1)
    with safe_open(str(ckpt / "rank_0.safetensors"), "pt") as fh:
        names = list(fh.keys())
        stored = sum(fh.get_slice(n).get_shape()[0] for n in names if n.endswith(".master"))
    assert not [n for n in names if n.endswith(".frozen")]
    n_adapter = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    assert stored == n_adapter  # world size 1: no padding

    out = export_checkpoint(ckpt, tmp_path / "adapter")
    written = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= written
    assert not [n for n in written if n.startswith("model")]  # no base weights
    base = build_model(LORA_CFG.model, vocab_size=data.tokenizer.vocab_size)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = data.global_batch(step=0, micro_batch=0, grad_accum=1, micro_batch_rows=4)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    want = sharded_logits(engine, ids)
    plain = build_model(LORA_CFG.model, vocab_size=data.tokenizer.vocab_size)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - want).abs().max() > 1e-3  # adapters matter
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # The adapters-only checkpoint reloads into a world of 3 (frozen base from the config).
    for rank in range(3):
        eng3, tr3 = engine_for(LORA_CFG, data, LayoutOnly(rank, 3))
        load_checkpoint(ckpt, tr3.states, rank=rank, world_size=3)
        for u, u3 in zip(engine.units, eng3.units):
            n = u.layout.trainable_numel
            a, b = rank * u3.trainable_shard, min((rank + 1) * u3.trainable_shard, n)
            if b > a:
                assert torch.equal(u3.master.detach()[: b - a], u.master.detach()[a:b])
            want = ["exp_avg", "exp_avg_sq", "step"] if n else []  # the root unit: no adapter
            assert sorted(tr3.optimizer.state[u3.master]) == want
