"""Presets built on the meta device and given their values per module (worker/models/meta.py):
no memory at build, the same values whichever units are filled in whichever order (so every
world size and unit partition starts from the same weights), LoRA adapters included, and the
engine's unit-by-unit fill equal to filling the whole model in one process."""

from __future__ import annotations

import pytest
import torch

from communication.torch_collectives import TorchCollectives
from worker.cluster.ports import free_port
from worker.data.tokenizer import ByteTokenizer
from worker.engine.config import ShardConfig
from worker.engine.shard import shard_model
from worker.engine.sharding import discover_units
from worker.models.blocks import find_block_modules
from worker.models.config import ModelConfig
from worker.models.loading import build_model
from worker.models.lora import LoraSettings, apply_lora
from worker.models.meta import MetaInit, is_on_meta, materialize_all
from worker.models.presets import PRESETS

V = ByteTokenizer.vocab_size
TASK = {"tiny-bert": "sequence-classification"}
LORA = LoraSettings(rank=4, alpha=8.0)


def on_meta(name: str, *, lora: bool = False, seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(name=name, task=TASK.get(name, "causal-lm"), n_layer=3, seed=seed)
    model = build_model(cfg, vocab_size=V, on_meta=True)
    return apply_lora(model, LORA) if lora else model


def values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def filled_by_units(model: torch.nn.Module, *, reverse: bool, lora: bool) -> dict:
    blocks = find_block_modules(model)
    init = MetaInit(model, seed=0, blocks=blocks, lora_init=True if lora else None)
    specs = discover_units(model, blocks)
    for spec in reversed(specs) if reverse else specs:
        init(spec.module_name, list(spec.params))
    assert not is_on_meta(model)
    return values(model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_unit_by_unit_in_any_order_equals_the_whole_model_at_once(name, lora):
    model = on_meta(name, lora=lora)
    assert is_on_meta(model) and all(p.is_meta for p in model.parameters())
    whole = on_meta(name, lora=lora)
    materialize_all(whole, seed=0, lora_init=True if lora else None)
    want = values(whole)
    for reverse in (False, True):
        got = filled_by_units(on_meta(name, lora=lora), reverse=reverse, lora=lora)
        assert got.keys() == want.keys()
        bad = [n for n in want if not torch.equal(got[n], want[n])]
        assert not bad, f"{name}: unit-by-unit fill differs from the whole model at {bad[:3]}"
    other = on_meta(name, lora=lora, seed=1)  # the control: another seed, other values
    materialize_all(other, seed=1, lora_init=True if lora else None)
    assert any(not torch.equal(p, want[n]) for n, p in values(other).items())
    if lora:  # peft's scheme survives: A random, B zero (a LoRA model starts as its base)
        adapters = {n: p for n, p in want.items() if "lora_" in n}
        assert adapters and all(p.abs().sum() == 0 for n, p in adapters.items() if "lora_B" in n)
        assert all(p.std() > 0 for n, p in adapters.items() if "lora_A" in n)


def test_the_init_is_transformers_own_scheme():
    """GPT-2: N(0, 0.02) weights, zero biases, unit LayerNorms, residual projections scaled by
    1/sqrt(2 n_layer), the LM head tied to the embedding."""
    model = build_model(ModelConfig(name="tiny-gpt2", n_layer=3, hidden_size=128), vocab_size=V)
    p = dict(model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(float(p["transformer.wte.weight"].std()) - 0.02) < 0.002
    assert abs(float(p["transformer.h.0.attn.c_proj.weight"].std()) - 0.02 / 6 ** 0.5) < 0.001
    assert torch.equal(p["transformer.h.1.ln_1.weight"], torch.ones(128))
    assert torch.equal(p["transformer.h.1.mlp.c_fc.bias"], torch.zeros(512))


def test_the_engine_fills_a_meta_model_unit_by_unit_with_the_same_values():
    """World size 1 through the real shard_model: gathered weights equal the one-process fill,
    and a meta model without a materializer is refused by name."""
    coll = TorchCollectives(rank=0, world_size=1, store_addr=f"127.0.0.1:{free_port()}",
                            timeout=30.0)
    try:
        whole = on_meta("tiny-gpt2")
        materialize_all(whole, seed=0)
        model = on_meta("tiny-gpt2")
        blocks = find_block_modules(model)
        config = ShardConfig(generation=0, timeout=30.0)
        with pytest.raises(ValueError, match="meta device"):
            shard_model(on_meta("tiny-gpt2"), collectives=coll, config=config, block_names=blocks)
        engine = shard_model(model, collectives=coll, config=config, block_names=blocks,
                             materialize=MetaInit(model, seed=0, blocks=blocks))
        got = dict(engine.iter_full_weights())
        want = {n: p.detach() for n, p in whole.state_dict().items()}
        shared = [n for n in want if n in got]
        assert len(shared) >= len(list(whole.parameters())) - 1  # the tied head counted once
        assert all(torch.equal(got[n], want[n]) for n in shared)
    finally:
        coll.close()
