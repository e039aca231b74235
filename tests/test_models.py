"""Model presets, local directories, block discovery and LoRA: deterministic and exact."""

from __future__ import annotations

import pytest
import torch

from worker.data.tokenizer import ByteTokenizer, load_tokenizer
from worker.models.blocks import find_block_modules
from worker.models.config import ModelConfig
from worker.models.loading import build_model
from worker.models.lora import LoraSettings, apply_lora
from worker.models.presets import PRESETS

V = ByteTokenizer.vocab_size
TASK = {"tiny-bert": "sequence-classification"}
BLOCKS = {"tiny-gpt2": "transformer.h", "tiny-llama": "model.layers", "tiny-qwen2": "model.layers",
          "tiny-bert": "bert.encoder.layer"}


def build(name: str, **kw) -> torch.nn.Module:
    return build_model(ModelConfig(name=name, task=TASK.get(name, "causal-lm"), **kw), vocab_size=V)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def batch_for(name: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1]) if name in TASK else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_are_bit_identical_and_exact(name):
    a, b = build(name), build(name)
    assert same_weights(a, b)
    assert not same_weights(a, build(name, seed=1))
    assert a.training  # train mode, yet forward is exact: every dropout is 0
    batch = batch_for(name)
    l1, l2 = a(**batch).loss, a(**batch).loss
    assert torch.isfinite(l1) and torch.equal(l1, l2)
    assert a.get_input_embeddings().num_embeddings == V


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_blocks_found_in_order_and_through_peft(name):
    model = build(name, n_layer=3)
    blocks = find_block_modules(model)
    assert blocks == [f"{BLOCKS[name]}.{i}" for i in range(3)]
    wrapped = apply_lora(model, LoraSettings(rank=2))
    assert find_block_modules(wrapped) == [f"base_model.model.{b}" for b in blocks]


def test_block_pattern_override_and_errors():
    model = build("tiny-gpt2")
    assert find_block_modules(model, pattern=r"transformer\.h\.\d+\.mlp") == [
        "transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert find_block_modules(model, pattern=r"transformer\.h\.\d+(\..*)?") == [
        "transformer.h.0", "transformer.h.1"]  # outermost only
    with pytest.raises(ValueError, match="fully matches the block pattern .*transformer.h.0"):
        find_block_modules(model, pattern=r"layers\.\d+")
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        find_block_modules(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_lora_trains_only_adapters_with_seeded_init(name):
    model = apply_lora(build(name), LoraSettings(rank=4, alpha=8.0, init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    for n in trainable:
        assert "lora_" in n or (name in TASK and "classifier.modules_to_save" in n), n
    assert all("lora_" not in n for n in frozen)
    again = apply_lora(build(name), LoraSettings(rank=4, alpha=8.0, init_lora_weights=False))
    assert same_weights(model, again)
    loss = model(**batch_for(name)).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lora_refuses_unknown_architecture_without_targets():
    with pytest.raises(ValueError, match="no default LoRA targets for model type None"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraSettings())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"neither a preset \(\['tiny-bert', 'tiny-gpt2'"):
        build_model(ModelConfig(name="tiny-nothing"), vocab_size=V)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_model(ModelConfig(name=str(tmp_path)), vocab_size=V)
    with pytest.raises(ValueError, match="serves tasks"):
        build_model(ModelConfig(name="tiny-bert"), vocab_size=V)
    with pytest.raises(ValueError, match="task 'mlm' is not one of"):
        ModelConfig(task="mlm")


def test_local_directory_round_trip_offline(tmp_path):
    model = build("tiny-llama")
    model.save_pretrained(tmp_path)
    loaded = build_model(ModelConfig(name=str(tmp_path)), vocab_size=V)
    assert same_weights(model, loaded)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # no tokenizer files there
    with pytest.raises(ValueError, match="tokenizer has 300 ids but .* embeds only 257"):
        build_model(ModelConfig(name=str(tmp_path)), vocab_size=300)


def test_dtype_and_size_overrides():
    model = build("tiny-qwen2", dtype="bfloat16", hidden_size=32, num_heads=2, n_layer=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.hidden_size == 32 and len(find_block_modules(model)) == 1
