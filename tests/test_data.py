"""Language-model data: sources, packing, train/eval split, and global batches that do not
depend on the world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.data.batching import RowSchedule
from worker.data.config import DataConfig
from worker.data.corpus import iter_documents, stdlib_files
from worker.data.packing import PackedText
from worker.data.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """Token stores go to a fresh directory, not the user's cache (store.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEROP2P_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        yield


@pytest.fixture(scope="module")
def stdlib_data(data_cache) -> PackedText:
    return PackedText(DataConfig(seq_len=32, max_tokens=100_000, seed=3), TOK)


def numbered_text(n: int) -> str:
    """Lines that are all different, so no two packed rows can be equal."""
    return "".join(f"line {i:06d} of the numbered test text\n" for i in range(n))


def test_byte_tokenizer_round_trip():
    text = "héllo, wörld ✓\n"
    ids = TOK.encode(text)
    assert max(ids) < 256 and TOK.vocab_size == 257 and TOK.eos_token_id == 256
    assert TOK.decode(ids + [TOK.eos_token_id]) == text


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_global_batch_is_the_same_for_any_world_size(stdlib_data, grad_accum):
    rows = 8
    for step in range(3):
        for micro in range(grad_accum):
            kw = dict(step=step, micro_batch=micro, grad_accum=grad_accum, micro_batch_rows=rows)
            expected = stdlib_data.global_batch(**kw)
            assert expected.shape == (rows, 32)
            for ws in (1, 2, 4):
                parts = [stdlib_data.rank_batch(**kw, rank=r, world_size=ws) for r in range(ws)]
                for p in parts:
                    assert set(p) == {"input_ids", "labels", "attention_mask"}
                    assert torch.equal(p["labels"], p["input_ids"])
                    assert bool(p["attention_mask"].all())
                got = torch.cat([p["input_ids"] for p in parts])
                assert torch.equal(got, expected), (step, micro, ws)


def test_micro_batches_follow_one_row_cursor(stdlib_data):
    """Step 1 of grad_accum 2 continues where step 0's last micro-batch stopped."""
    idx = [stdlib_data.global_indices(step=s, micro_batch=m, grad_accum=2, micro_batch_rows=4)
           for s in range(2) for m in range(2)]
    flat = torch.cat(idx)
    assert torch.equal(flat, stdlib_data.schedule.permutation(0)[:16])


def test_same_seed_same_batches_other_seed_differs():
    cfg = DataConfig(seq_len=32, max_tokens=50_000, seed=7)
    a, b = PackedText(cfg, TOK), PackedText(cfg, TOK)
    c = PackedText(DataConfig(seq_len=32, max_tokens=50_000, seed=8), TOK)
    kw = dict(step=5, micro_batch=0, grad_accum=1, micro_batch_rows=6)
    assert torch.equal(a.global_batch(**kw), b.global_batch(**kw))
    assert not torch.equal(a.global_batch(**kw), c.global_batch(**kw))
    assert a.fingerprint == c.fingerprint  # the seed orders rows; the rows are the same


def test_epochs_are_permutations_and_batches_straddle_them(tmp_path):
    src = tmp_path / "small.txt"
    src.write_text(numbered_text(30))
    data = PackedText(DataConfig(source=str(src), seq_len=64, eval_fraction=0.0), TOK)
    n = data.num_train_rows
    assert n >= 10
    rows = 3 if n % 3 else 4
    assert n % rows  # some batch straddles an epoch boundary
    last = -(-2 * n // rows)  # the first step that starts in the third epoch
    steps = last + 1
    seen = torch.cat([data.global_indices(step=s, micro_batch=0, grad_accum=1,
                                          micro_batch_rows=rows) for s in range(steps)])
    for epoch in range(2):
        assert sorted(seen[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(data.schedule.permutation(0), data.schedule.permutation(1))
    assert data.epoch_of(0, 1, rows) == 0
    assert data.epoch_of(n // rows + 1, 1, rows) == 1
    assert data.epoch_of(last - 1, 1, rows) == 1 and data.epoch_of(last, 1, rows) == 2


def test_train_and_eval_rows_are_disjoint_tail_split(tmp_path):
    src = tmp_path / "numbered.txt"
    src.write_text(numbered_text(400))
    data = PackedText(DataConfig(source=str(src), seq_len=40, eval_fraction=0.1), TOK)
    assert data.num_eval_rows >= 1 and data.num_train_rows >= 9 * data.num_eval_rows
    train = {tuple(r) for r in data.train_rows.tolist()}
    evals = {tuple(r) for r in data.eval_rows.tolist()}
    assert len(train) == data.num_train_rows and not train & evals
    stream = torch.cat([data.train_rows, data.eval_rows]).reshape(-1)
    expected = torch.tensor(list(src.read_bytes()) + [TOK.eos_token_id])[: stream.numel()]
    assert torch.equal(stream, expected)  # eval is the tail of the token stream


def test_eval_batches_split_over_ranks(tmp_path):
    src = tmp_path / "numbered.txt"
    src.write_text(numbered_text(400))
    data = PackedText(DataConfig(source=str(src), seq_len=16, eval_fraction=0.2), TOK)
    rows = 4
    whole = list(data.eval_batches(rows=rows, rank=0, world_size=1, limit=None))
    assert len(whole) == data.num_eval_rows // rows
    for ws in (2, 4):
        per_rank = [list(data.eval_batches(rows=rows, rank=r, world_size=ws, limit=3))
                    for r in range(ws)]
        assert all(len(p) == 3 for p in per_rank)
        for i in range(3):
            got = torch.cat([per_rank[r][i]["input_ids"] for r in range(ws)])
            assert torch.equal(got, whole[i]["input_ids"])


def test_uneven_split_is_refused_with_the_numbers(stdlib_data):
    with pytest.raises(ValueError, match=r"6 rows .* world size 4"):
        stdlib_data.rank_batch(step=0, micro_batch=0, grad_accum=1, micro_batch_rows=6, rank=0,
                               world_size=4)
    with pytest.raises(ValueError, match="micro_batch 2"):
        stdlib_data.global_batch(step=0, micro_batch=2, grad_accum=2, micro_batch_rows=4)


def test_jsonl_source_reads_the_text_field(tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = [f"document number {i} says something" for i in range(50)]
    src.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert list(iter_documents(str(src), text_field="body")) == docs
    data = PackedText(DataConfig(source=str(src), text_field="body", seq_len=16), TOK)
    stream = torch.cat([data.train_rows, data.eval_rows]).reshape(-1)
    packed = b"".join(d.encode() + b"\x00" for d in docs)  # \x00 stands for eos here
    expected = torch.tensor([TOK.eos_token_id if b == 0 else b for b in packed])
    assert torch.equal(stream, expected[: stream.numel()])
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no 'text' field \(has \['body', 'id'\]\)"):
        PackedText(DataConfig(source=str(src), seq_len=16), TOK)


def test_directory_source_reads_sorted_text_files(tmp_path):
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("third")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert list(iter_documents(str(tmp_path))) == ["first", "second", "third"]


def test_missing_source_and_too_little_text_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        PackedText(DataConfig(source=str(tmp_path / "nope.txt")), TOK)
    src = tmp_path / "tiny.txt"
    src.write_text("too short")
    with pytest.raises(ValueError, match=r"10 tokens = 0 rows of 64"):
        PackedText(DataConfig(source=str(src)), TOK)


def test_stdlib_corpus_is_capped_and_real(stdlib_data):
    files = stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert sum(f.stat().st_size for f in files[:-1]) < 4_000_000
    assert stdlib_data.num_train_rows + stdlib_data.num_eval_rows == 100_000 // 32
    assert "import" in TOK.decode(stdlib_data.train_rows[:200].reshape(-1))


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"optional test text {SHAKESPEARE} absent")
def test_tinyshakespeare_txt_source():
    data = PackedText(DataConfig(source=str(SHAKESPEARE), seq_len=128, max_tokens=300_000), TOK)
    assert data.num_train_rows + data.num_eval_rows == 300_000 // 128
    assert "First Citizen" in TOK.decode(data.train_rows[0])


def test_row_schedule_refuses_empty():
    with pytest.raises(ValueError, match="at least one row"):
        RowSchedule(0, seed=0)
