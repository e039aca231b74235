"""Checkpoints at world size 1: torn writes under SIGKILL, refusals, retention and listing.

Killed writers are real child processes forked from this one after training (so they skip the
imports) and SIGKILLed at a named point of ``save_checkpoint`` or at arbitrary moments.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time

import pytest
import torch
from test_checkpoint_multirank import CFG, build_rank

from communication.torch_collectives import TorchCollectives
from worker.state import files as ck
from worker.state.catalog import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_manifest,
)
from worker.state.checkpoint import load_checkpoint, save_checkpoint

FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def data():
    from harness.builders import build_data_and_model

    torch.set_num_threads(1)  # forked children must not enter a parent's OpenMP pool
    return build_data_and_model(CFG)[0]


@pytest.fixture()
def run(data):
    """A world-size-1 engine and trainer after one real training step."""
    coll = TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")
    engine, trainer = build_rank(data, 0, 1, coll)
    trainer.train_step()
    return engine, trainer


def save(root, engine, trainer, **kw):
    return save_checkpoint(root, trainer.states, rank=0,
                           world_size=1, **kw)


def _die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_writer(root, engine, trainer, point: str) -> None:
    """Child: save at the next step, SIGKILLed at ``point`` of the write."""
    real = {"rank_file": ck.save_file, "manifest": ck.write_json_atomic}

    def then_die(*args, **kwargs):
        real[point](*args, **kwargs)
        _die()

    if point == "publish":
        ck.write_latest = _die  # the directory is renamed; `latest` still names the old one
    else:
        setattr(ck, {"rank_file": "save_file", "manifest": "write_json_atomic"}[point], then_die)
    trainer.train_step()
    save(root, engine, trainer)
    os._exit(3)  # not reached: the kill point is on every save's path


def _fork(target, *args):
    proc = FORK.Process(target=target, args=args)
    proc.start()
    return proc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["rank_file", "manifest", "publish"])
def test_sigkill_during_save_never_leaves_a_checkpoint_that_looks_complete(run, tmp_path, point):
    engine, trainer = run
    first = save(tmp_path, engine, trainer)
    proc = _fork(_killed_writer, tmp_path, engine, trainer, point)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL, f"writer ended with {proc.exitcode}, not SIGKILL"
    left = sorted(p.name for p in tmp_path.iterdir())
    if point == "publish":  # renamed, so complete, though `latest` was not updated yet
        assert (tmp_path / "latest").read_text().strip() == first.name
        assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
        read_manifest(tmp_path / "step_2")
    else:
        assert "step_2.tmp" in left and "step_2" not in left, left
        assert latest_checkpoint(tmp_path) == first
        with pytest.raises(CheckpointError, match="not a checkpoint directory|no manifest"):
            load_checkpoint(tmp_path / "step_2", trainer.states, rank=0,
                            world_size=1)
    # the survivor loads, and a new save at the torn step succeeds over the leftovers
    load_checkpoint(latest_checkpoint(tmp_path), trainer.states, rank=0,
                    world_size=1)
    trainer.step = 2
    assert save(tmp_path, engine, trainer) == tmp_path / "step_2"
    prune_checkpoints(tmp_path, keep_last=5)
    assert not list(tmp_path.glob("*.tmp")) and latest_checkpoint(tmp_path).name == "step_2"


def _looping_writer(root, engine, trainer, conn) -> None:
    """Child: train and save every step, telling the parent after each published save."""
    while True:
        trainer.train_step()
        conn.send(save(root, engine, trainer).name)


@pytest.mark.timeout(60)
def test_sigkill_at_arbitrary_moments(run, tmp_path):
    engine, trainer = run
    for trial, fraction in enumerate([0.3, 0.6, 0.7, 0.8, 0.9, 0.95]):
        root = tmp_path / f"t{trial}"
        parent, child = FORK.Pipe(duplex=False)
        proc = _fork(_looping_writer, root, engine, trainer, child)
        assert parent.poll(30), "writer published nothing within 30 s"
        parent.recv()
        t0 = time.perf_counter()
        assert parent.poll(30), "writer published one checkpoint, then nothing within 30 s"
        last = parent.recv()
        period = time.perf_counter() - t0  # one train step + one save
        time.sleep(fraction * period)  # one kill at a chosen point of the next cycle, not a poll
        proc.kill()
        proc.join(timeout=10)
        while parent.poll():
            last = parent.recv()
        found = latest_checkpoint(root)
        assert found is not None and int(found.name[5:]) >= int(last[5:])
        for d in root.glob("step_*"):
            if d.name.removeprefix("step_").isdigit():
                read_manifest(d)  # every directory named like a checkpoint is complete
        manifest = load_checkpoint(found, trainer.states, rank=0, world_size=1)
        assert trainer.step == manifest["step"]


def test_incomplete_directories_are_refused_with_the_reason(run, tmp_path):
    engine, trainer = run
    good = save(tmp_path, engine, trainer)
    no_manifest = shutil.copytree(good, tmp_path / "step_7")
    (no_manifest / "manifest.json").unlink()
    short = shutil.copytree(good, tmp_path / "step_8")
    with open(short / "rank_0.safetensors", "r+b") as fh:
        fh.truncate(100)
    missing = shutil.copytree(good, tmp_path / "step_9")
    (missing / "rank_0.safetensors").unlink()
    assert latest_checkpoint(tmp_path) == good
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [1]
    for d, reason in [(no_manifest, "no manifest.json"), (short, "has 100 bytes"),
                      (missing, "has None bytes"), (tmp_path / "nowhere", "not a checkpoint")]:
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(d, trainer.states, rank=0, world_size=1)


def test_layout_mismatch_names_unit_and_slot(run, data, tmp_path):
    import dataclasses

    from worker.main import shard_for_training
    from worker.models.loading import build_model
    from worker.train.trainer import Trainer

    engine, trainer = run
    good = save(tmp_path, engine, trainer)
    other = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, hidden_size=40))
    coll = TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1")
    eng2 = shard_for_training(other, build_model(other.model, vocab_size=257), coll, 0)
    tr2 = Trainer(other, engine=eng2, data=data, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"unit 0 \(''\): slot .*transformer\.wte\.weight"):
        load_checkpoint(good, tr2.states, rank=0, world_size=1)


def test_saving_at_world_size_two_needs_a_barrier(run, tmp_path):
    engine, trainer = run
    with pytest.raises(ValueError, match="rank 1: saving at world size 2 needs collectives"):
        save_checkpoint(tmp_path, trainer.states, rank=1,
                        world_size=2)


def test_retention_keeps_last_k_and_best_and_list_reports_them(run, tmp_path):
    engine, trainer = run
    evals = {2: 3.0, 3: 1.5, 4: 2.0, 5: 2.5, 6: 2.7}  # best is step 3
    for step in range(2, 7):
        trainer.train_step()
        trainer.eval_history.append((step, evals[step]))  # as Trainer.evaluate records it
        save(tmp_path, engine, trainer)
    (tmp_path / "step_4.tmp").mkdir()  # leftovers of a killed write
    prune_checkpoints(tmp_path, keep_last=2)
    listed = list_checkpoints(tmp_path)
    assert [c["step"] for c in listed] == [3, 5, 6]
    assert not (tmp_path / "step_4.tmp").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_6"
    last = listed[-1]
    assert last["world_size"] == 1 and last["eval_loss"] == 2.7
    assert last["loss"] == trainer.history[-1].loss
    assert last["bytes"] == sum(f.stat().st_size for f in (tmp_path / "step_6").iterdir())
    assert last["bytes"] > 4 * sum(u.master.numel() for u in engine.units)  # master + 2 moments
    prune_checkpoints(tmp_path, keep_last=1, keep_best=False)
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [6]


def test_sgd_momentum_reshards_from_one_rank_to_two(data, tmp_path):
    import dataclasses

    from test_checkpoint_multirank import LayoutOnly

    from worker.main import shard_for_training
    from worker.models.loading import build_model
    from worker.train.optim import OptimConfig
    from worker.train.trainer import Trainer

    cfg = dataclasses.replace(CFG, optim=OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9,
                                                     schedule="linear"))

    def build(coll):
        engine = shard_for_training(cfg, build_model(cfg.model, vocab_size=257), coll, 0)
        return engine, Trainer(cfg, engine=engine, data=data, rank=coll.rank,
                               world_size=coll.world_size)

    engine, trainer = build(TorchCollectives(rank=0, world_size=1, store_addr="127.0.0.1:1"))
    trainer.train_step()
    ckpt = save_checkpoint(tmp_path, trainer.states, rank=0,
                           world_size=1)
    assert read_manifest(ckpt)["optimizer"]["sliced"] == ["momentum_buffer"]
    for rank in range(2):
        eng2, tr2 = build(LayoutOnly(rank, 2))
        load_checkpoint(ckpt, tr2.states, rank=rank, world_size=2)
        for u, u2 in zip(engine.units, eng2.units):
            n = u.layout.trainable_numel
            a, b = rank * u2.trainable_shard, min((rank + 1) * u2.trainable_shard, n)
            got = tr2.optimizer.state[u2.master]["momentum_buffer"]
            want = trainer.optimizer.state[u.master]["momentum_buffer"][a:b]
            assert torch.equal(got[: b - a], want)
            assert torch.equal(got[b - a :], torch.zeros(u2.trainable_shard - (b - a)))  # padding stays zero
        assert tr2.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]


def test_format_checkpoints_prints_one_row_per_checkpoint(run, tmp_path):
    from worker.state.catalog import format_checkpoints

    engine, trainer = run
    save(tmp_path, engine, trainer)
    text = format_checkpoints(list_checkpoints(tmp_path)).splitlines()
    assert text[0].split()[:5] == ["step", "world", "loss", "eval", "loss"]
    assert text[1].split()[:3] == ["1", "1", f"{trainer.history[-1].loss:.4f}"]


def test_best_checkpoint_is_the_lowest_eval_loss_of_the_complete_ones(tmp_path):
    from worker.state.catalog import best_checkpoint

    def write(step: int, eval_loss, *, torn: bool = False) -> None:
        d = tmp_path / f"step_{step}"
        d.mkdir()
        (d / "rank0.bin").write_bytes(b"abc")
        manifest = {"world_size": 1, "files": {"rank0.bin": 2 if torn else 3}, "step": step}
        if eval_loss is not None:
            manifest["eval_loss"] = eval_loss
        (d / "manifest.json").write_text(json.dumps(manifest))

    assert best_checkpoint(tmp_path) is None
    write(1, 2.0)
    write(2, 1.5)
    write(3, 1.7)
    write(4, None)  # the latest, without an eval: never the best
    write(5, 1.0, torn=True)  # lowest, but incomplete
    assert best_checkpoint(tmp_path) == tmp_path / "step_2"
    write(6, 1.5)  # a tie goes to the newer
    assert best_checkpoint(tmp_path) == tmp_path / "step_6"
