"""A checkpoint saved by two real worker processes, loaded back at world sizes 1, 2 and 3.

The two ranks (torch.distributed gloo, this file run as a script) train two steps, save, dump
their in-memory slices with ``torch.save`` (independent of the checkpoint format), train a third
step, then load the checkpoint in place and train the third step again. This process then
builds one engine per rank of each world size, loads, and compares every slice with the one cut
directly from the concatenated dumps; it also resumes at world size 1 and exports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.data.config import DataConfig  # noqa: E402
from worker.models.config import ModelConfig  # noqa: E402
from worker.train.config import TrainConfig  # noqa: E402
from worker.train.optim import OptimConfig  # noqa: E402

WAIT = timedelta(seconds=60)
# Hidden 35 (5 heads), 32 positions, 257 ids: the root unit (10185 elements) and each block
# (15155) are odd, so both the saving (2) and the loading (3) world sizes pad.
CFG = TrainConfig(
    model=ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5, n_layer=2, max_positions=32),
    data=DataConfig(source="stdlib", seq_len=16, max_tokens=20_000),
    optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=1, max_grad_norm=1.0),
    steps=4, micro_batch_rows=6, eval_batches=1, backend="torch")
SAVED_STEP = 2


class LayoutOnly:
    """Rank and world size to build one rank's engine here; loading must move no tensor."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _refuse(self, *args):
        raise AssertionError("load_checkpoint must not communicate")

    all_gather = reduce_scatter = all_reduce = barrier = _refuse

    def close(self) -> None:
        pass


# --- the worker process -------------------------------------------------------------------
def worker_main() -> None:
    import torch.distributed as dist
    from harness.builders import build_data_and_model
    from safetensors.torch import save_file

    from communication.torch_collectives import TorchCollectives
    from worker.cluster.ports import free_port
    from worker.main import shard_for_training
    from worker.state.checkpoint import load_checkpoint, save_checkpoint
    from worker.train.trainer import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, n, out = args.rank, 2, Path(args.out)
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=WAIT)
    if rank == 0:
        store.set("torch_store", f"127.0.0.1:{free_port('127.0.0.1')}")
    store.wait(["torch_store"], WAIT)
    coll = TorchCollectives(rank=rank, world_size=n, store_addr=store.get("torch_store").decode())
    data, model = build_data_and_model(CFG)
    engine = shard_for_training(CFG, model, coll, 1)
    trainer = Trainer(CFG, engine=engine, data=data, rank=rank, world_size=n)
    for _ in range(SAVED_STEP):
        trainer.train_step()
    trainer.evaluate()
    ckpt = save_checkpoint(out / "ckpt", trainer.states, rank=rank,
                           world_size=n, collectives=coll)
    raw = {}
    for u in engine.units:
        raw[f"u{u.layout.unit}.master"] = u.master.detach().clone()
        for key, value in trainer.optimizer.state[u.master].items():
            raw[f"u{u.layout.unit}.{key}"] = value.clone()
    torch.save(raw, out / f"raw_rank{rank}.pt")
    full2 = dict(engine.iter_full_weights())
    loss3 = trainer.train_step().loss
    full3 = dict(engine.iter_full_weights())
    load_checkpoint(ckpt, trainer.states, rank=rank, world_size=n)
    loss3b = trainer.train_step().loss
    full3b = dict(engine.iter_full_weights())
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full2.items()}, str(out / "full2.safetensors"))
        save_file({k: v.contiguous() for k, v in full3.items()}, str(out / "full3.safetensors"))
        same = all(torch.equal(full3[k], full3b[k]) for k in full3)
        (out / "result.json").write_text(json.dumps({"loss3": loss3, "loss3b": loss3b,
                                                     "same": same, "ckpt": str(ckpt)}))
    coll.close()


# --- the tests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch.distributed as dist

    out = tmp_path_factory.mktemp("ckpt2")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=WAIT)
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--store-port",
                               str(store.port), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-4000:]}"
    return out


@pytest.fixture(scope="module")
def data():
    from harness.builders import build_data_and_model

    return build_data_and_model(CFG)[0]


def build_rank(data, rank: int, world_size: int, coll=None):
    from worker.main import shard_for_training
    from worker.models.loading import build_model
    from worker.train.trainer import Trainer

    model = build_model(CFG.model, vocab_size=data.tokenizer.vocab_size)
    engine = shard_for_training(CFG, model, coll or LayoutOnly(rank, world_size), 0)
    return engine, Trainer(CFG, engine=engine, data=data, rank=rank, world_size=world_size)


def expected_slice(raw: list[dict], key: str, numel: int, rank: int, world_size: int):
    """Rank's slice at ``world_size``, cut from the saving ranks' slices concatenated."""
    full = torch.cat([r[key] for r in raw])[:numel]
    shard = -(-numel // world_size)
    padded = torch.zeros(shard * world_size, dtype=full.dtype)
    padded[:numel] = full
    return padded[rank * shard : (rank + 1) * shard]


@pytest.mark.timeout(120)
def test_same_world_size_resume_is_bit_identical(saved):
    result = json.loads((saved / "result.json").read_text())
    assert result["same"], "weights after resuming at world size 2 differ from uninterrupted"
    assert result["loss3"] == result["loss3b"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_load_reshards_every_slice_exactly(saved, data, world_size):
    from worker.state.catalog import latest_checkpoint
    from worker.state.checkpoint import load_checkpoint

    raw = [torch.load(saved / f"raw_rank{r}.pt") for r in range(2)]
    ckpt = latest_checkpoint(saved / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{SAVED_STEP}"
    for rank in range(world_size):
        engine, trainer = build_rank(data, rank, world_size)
        manifest = load_checkpoint(ckpt, trainer.states, rank=rank,
                                   world_size=world_size)
        assert manifest["world_size"] == 2 and trainer.step == SAVED_STEP
        assert engine.step_index == SAVED_STEP
        assert len(trainer.history) == SAVED_STEP and len(trainer.eval_history) == 1
        for u in engine.units:
            i, numel = u.layout.unit, u.layout.trainable_numel
            want = expected_slice(raw, f"u{i}.master", numel, rank, world_size)
            assert torch.equal(u.master.detach(), want), f"unit {i} rank {rank}/{world_size}"
            state = trainer.optimizer.state[u.master]
            assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
            for key in ("exp_avg", "exp_avg_sq"):
                want = expected_slice(raw, f"u{i}.{key}", numel, rank, world_size)
                assert torch.equal(state[key], want), f"unit {i} {key} rank {rank}/{world_size}"
            assert torch.equal(state["step"], raw[0][f"u{i}.step"])
        lr = trainer.optimizer.param_groups[0]["lr"]
        assert lr == trainer.scheduler.get_last_lr()[0] == manifest["scheduler"]["_last_lr"][0]


@pytest.mark.timeout(120)
def test_resume_at_world_size_one_matches_uninterrupted_run(saved, data):
    from safetensors.torch import load_file

    from communication.torch_collectives import TorchCollectives
    from worker.state.catalog import latest_checkpoint
    from worker.state.checkpoint import load_checkpoint

    coll = TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")
    engine, trainer = build_rank(data, 0, 1, coll)
    load_checkpoint(latest_checkpoint(saved / "ckpt"), trainer.states, rank=0,
                    world_size=1)
    st = trainer.train_step()
    result = json.loads((saved / "result.json").read_text())
    assert abs(st.loss - result["loss3"]) < 1e-5
    want = load_file(str(saved / "full3.safetensors"))
    for name, got in engine.iter_full_weights():
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.timeout(120)
def test_export_of_two_rank_checkpoint_loads_with_same_weights(saved, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from worker.state.export import export_checkpoint

    out = export_checkpoint(saved / "ckpt" / f"step_{SAVED_STEP}", tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard file per unit
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = load_file(str(saved / "full2.safetensors"))
    got = dict(model.named_parameters())
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name].detach(), value), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


if __name__ == "__main__":
    worker_main()
