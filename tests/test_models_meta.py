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


def saved(tmp_path, name: str, *, shard: str | None) -> str:
    """A preset written as a from_pretrained directory (several shards and an index if
    ``shard`` is a size like "60KB")."""
    model = build_model(ModelConfig(name=name, task=TASK.get(name, "causal-lm"), n_layer=3),
                        vocab_size=V)
    path = tmp_path / f"{name}-{shard}"
    model.save_pretrained(str(path), max_shard_size=shard or "10GB")
    return str(path)


def from_directory(path: str, *, lora: bool = False, units: bool = False, seed: int = 0):
    from worker.models.loading import local_weights

    cfg = ModelConfig(name=path, task="causal-lm", seed=seed)
    model = build_model(cfg, vocab_size=V, on_meta=True)
    assert is_on_meta(model)
    if lora:
        model = apply_lora(model, LORA)
    weights = local_weights(cfg)
    if units:
        blocks = find_block_modules(model)
        init = MetaInit(model, seed=seed, blocks=blocks, lora_init=True if lora else None,
                        weights=weights)
        for spec in reversed(discover_units(model, blocks)):
            init(spec.module_name, list(spec.params))
    else:
        materialize_all(model, seed=seed, lora_init=True if lora else None, weights=weights)
    return model


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["one-file", "sharded-index"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_directory_read_tensor_by_tensor_equals_from_pretrained(tmp_path, name, shard):
    path = saved(tmp_path, name, shard=shard)
    if shard:
        assert (tmp_path / f"{name}-{shard}" / "model.safetensors.index.json").is_file()
    want = build_model(ModelConfig(name=path), vocab_size=V).state_dict()  # from_pretrained
    for units in (False, True):
        got = from_directory(path, units=units).state_dict()
        assert got.keys() == want.keys()
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"differs from from_pretrained at {bad[:3]}"
    # LoRA on the meta-built base: the base is the directory's, the adapters start at zero delta
    wrapped = from_directory(path, lora=True, units=True)
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
            for k, v in wrapped.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], want[k]) for k in want if k in base)
    assert len([k for k in want if k in base]) == len(want)


def test_a_directory_that_does_not_fit_the_model_is_refused_by_name(tmp_path):
    path = saved(tmp_path, "tiny-gpt2", shard="60KB")
    index = tmp_path / "tiny-gpt2-60KB" / "model.safetensors.index.json"
    import json

    data = json.loads(index.read_text())
    renamed = {k.replace("transformer.h.1.", "transformer.h.9."): v
               for k, v in data["weight_map"].items()}
    index.write_text(json.dumps({**data, "weight_map": renamed}))
    with pytest.raises(ValueError, match="none of unit 'transformer.h.1'"):
        from_directory(path, units=True)
    files = sorted(set(data["weight_map"].values()))
    (tmp_path / "tiny-gpt2-60KB" / files[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="absent"):
        from_directory(path)
