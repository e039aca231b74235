"""What the training benchmarks share: the GPT-2-shaped model and its seeded random batches."""

from __future__ import annotations

from datetime import timedelta

import torch

WAIT = timedelta(seconds=120)  # rendezvous deadline of every benchmark process


def build_gpt2(*, layers: int, hidden: int, seq_len: int):
    """A GPT-2 with a byte vocabulary, no dropout, seeded weights (same on every rank)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=257, n_positions=seq_len, n_embd=hidden, n_layer=layers,
                     n_head=max(hidden // 64, 1), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def random_rows(*, step: int, rows: int, seq_len: int, rank: int, world: int) -> dict:
    """This rank's share of step ``step``'s global batch of seeded random tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 257, (rows, seq_len), generator=g)
    b = rows // world
    ids = ids[rank * b : (rank + 1) * b]
    return {"input_ids": ids, "labels": ids}
