"""The prose-versus-code classification set: real stdlib text, fixed shapes, balanced labels,
held-out examples unseen in training, and world-size independent global batches."""

from __future__ import annotations

import json

import pytest
import torch

from worker.data.classification import CODE, PROSE, ClassificationData, split_source
from worker.data.config import DataConfig
from worker.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = DataConfig(seq_len=48, max_examples=400, eval_fraction=0.1, seed=1)


@pytest.fixture(scope="module")
def data() -> ClassificationData:
    return ClassificationData(CFG, TOK)


def test_split_source_separates_prose_from_code():
    src = '''"""A module docstring that explains what this module is for."""

def handler(request_object, timeout_seconds=10):
    # Retry the request until the deadline passes or it succeeds.
    value = compute_something(request_object, timeout_seconds)
    return value  # short
'''
    prose, code = split_source(src)
    assert prose == ["A module docstring that explains what this module is for.",
                     "Retry the request until the deadline passes or it succeeds."]
    assert code == ["def handler(request_object, timeout_seconds=10):",
                    "value = compute_something(request_object, timeout_seconds)"]
    # a line with a comment is not code (its words would leak), nor prose under 4 words
    assert split_source("def broken(:\n    '''x") == ([], [])


def test_examples_are_balanced_padded_and_held_out(data):
    assert data.num_train_rows + data.num_eval_rows == 400 and data.num_eval_rows == 40
    assert data.num_labels == 2
    labels = torch.cat([data._train[2], data._eval[2]])
    assert int((labels == PROSE).sum()) == int((labels == CODE).sum()) == 200
    ids, mask = data._train[0], data._train[1]
    assert ids.shape == (360, 48) and mask.shape == (360, 48)
    assert torch.equal(ids[mask == 0], torch.full_like(ids[mask == 0], TOK.pad_token_id))
    assert len(set(data.texts)) == len(data.texts)  # de-duplicated: eval texts never trained on
    first_prose = data.texts[0]
    assert not first_prose.startswith("#") and len(first_prose.split()) >= 4


def test_global_batch_is_the_same_for_any_world_size(data):
    for step in range(2):
        kw = dict(step=step, micro_batch=1, grad_accum=2, micro_batch_rows=8)
        whole = data.global_batch(**kw)
        assert whole["labels"].shape == (8,) and whole["input_ids"].shape == (8, 48)
        for ws in (1, 2, 4):
            parts = [data.rank_batch(**kw, rank=r, world_size=ws) for r in range(ws)]
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (key, ws)
    again = ClassificationData(CFG, TOK).global_batch(step=1, micro_batch=1, grad_accum=2,
                                                      micro_batch_rows=8)
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_eval_batches_have_fixed_shape(data):
    batches = list(data.eval_batches(rows=8, rank=1, world_size=2, limit=None))
    assert len(batches) == 40 // 8
    assert all(b["input_ids"].shape == (4, 48) and b["labels"].shape == (4,) for b in batches)


def test_jsonl_with_labels(tmp_path):
    src = tmp_path / "labelled.jsonl"
    rows = [{"text": f"example {i}", "label": i % 3} for i in range(30)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    data = ClassificationData(DataConfig(source=str(src), seq_len=16, eval_fraction=0.1), TOK)
    assert data.num_labels == 3 and data.num_train_rows == 27
    assert data._eval[2].tolist() == [0, 1, 2]
    src.write_text(json.dumps({"text": "x", "label": "spam"}))
    with pytest.raises(ValueError, match="example 0 has label='spam'"):
        ClassificationData(DataConfig(source=str(src), seq_len=16), TOK)


def test_plain_text_is_refused_for_classification(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("some notes")
    with pytest.raises(ValueError, match="must be 'stdlib', a .jsonl file"):
        ClassificationData(DataConfig(source=str(src), seq_len=16), TOK)
