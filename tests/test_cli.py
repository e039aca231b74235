"""The zerop2p command end to end: a local cluster trains, checkpoints are listed and exported to a
directory that from_pretrained loads; bad options fail with a message naming them; the
two-worker integration script passes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worker.cli.options import build_train_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "worker.cli"]
SMALL = ["--model", "tiny-gpt2", "--micro-batch-rows", "4", "--seq-len", "32",
         "--max-tokens", "60000"]


def zerop2p(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_toml_options_with_flags_winning(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 9\nbackend = "torch"\n[optim]\nlr = 0.5\nschedule = "linear"\n'
                    '[model]\nname = "tiny-llama"\n')
    cfg = build_train_config(["--config", str(toml), "--lr", "0.25", "--lora-rank", "4",
                              "--lora-targets", "q_proj, v_proj", "--max-grad-norm", "none"])
    assert (cfg.steps, cfg.backend, cfg.model.name) == (9, "torch", "tiny-llama")
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.max_grad_norm) == (0.25, "linear", None)
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ("q_proj", "v_proj")
    flags = build_train_config(["--buddy", "--checkpoint-dir", str(tmp_path), "--prefetch", "off"])
    assert flags.buddy is True and flags.prefetch is False and flags.resume is True


@pytest.mark.parametrize("args, named", [
    (["--bogus", "1"], "--bogus"),
    (["--lr", "fast"], "--lr"),
    (["--mixed-precision", "fp8"], "mixed_precision"),
    (["--steps", "0"], "steps"),
    (["--timeout", "0"], "timeout"),
    (["--keep-last", "0"], "keep_last"),
])
def test_bad_training_options_are_named(args, named):
    res = zerop2p("worker", "--coordinator", "http://127.0.0.1:9", *args, timeout=60)
    assert res.returncode == 2, res.stderr
    assert named in res.stderr, res.stderr


def test_train_refuses_rows_that_do_not_split_before_starting_anything():
    """``zerop2p train --world-size 3`` with 8 rows per micro-batch used to start three workers
    that each failed after joining (and were restarted three times); now it stops at once."""
    start = time.monotonic()
    res = zerop2p("train", "--world-size", "3", "--micro-batch-rows", "8", timeout=60)
    assert res.returncode == 2, res.stderr
    assert "micro_batch_rows (8) is not divisible by the world size (3)" in res.stderr
    assert "--micro-batch-rows" in res.stderr and "coordinator listening" not in res.stdout
    assert time.monotonic() - start < 30
    ok = zerop2p("train", "--world-size", "3", "--micro-batch-rows", "9", "--steps", "0",
                 timeout=60)  # the control: divisible rows pass this check (steps=0 stops later)
    assert "not divisible" not in ok.stderr and "steps" in ok.stderr


def test_train_forwards_timeout_as_the_collective_deadline():
    """``--timeout`` is the workers' collective deadline, ``--run-timeout`` the run's limit:
    a forwarded bad deadline is named, not swallowed by the run's option of the same name."""
    res = zerop2p("train", "--timeout", "-1", timeout=60)
    assert res.returncode == 2 and "timeout" in res.stderr, res.stderr
    assert "--run-timeout" in zerop2p("train", "--help", timeout=60).stdout


def test_unknown_toml_key_is_named(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match=r"learning_rate.*\[optim\]|\[optim\].*learning_rate"):
        build_train_config(["--config", str(toml)])


@pytest.mark.timeout(300)
def test_train_checkpoints_list_and_export(tmp_path):
    ckpt, out, hf = tmp_path / "ckpt", tmp_path / "out", tmp_path / "hf"
    res = zerop2p("train", "--world-size", "2", "--output", str(out), *SMALL, "--steps", "4",
                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--eval-every", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["losses"]) == 4
    assert [s for s, _ in result["eval"]] == [2, 4]

    listing = zerop2p("checkpoints", "list", str(ckpt), timeout=60)
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("2", "2"), ("4", "2")], listing.stdout

    best_step = min(rows, key=lambda r: (float(r[3]), -int(r[0])))[0]  # lowest eval loss
    best = zerop2p("export", "--best", str(ckpt), str(tmp_path / "best"), timeout=120)
    assert best.returncode == 0, best.stderr
    assert f"step_{best_step} " in best.stdout, (best.stdout, listing.stdout)
    none = zerop2p("export", "--best", str(tmp_path / "empty"), str(tmp_path / "x"), timeout=60)
    assert none.returncode == 2 and "recorded an eval loss" in none.stderr, none.stderr

    exported = zerop2p("export", str(ckpt), str(hf), timeout=120)
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    final = load_file(str(out / "weights.safetensors"))
    state = model.state_dict()
    for name, w in final.items():
        assert torch.equal(state[name], w), f"{name}: exported weights differ from the final ones"


def test_export_of_a_missing_checkpoint_names_it(tmp_path):
    res = zerop2p("export", str(tmp_path / "nope"), str(tmp_path / "out"), timeout=60)
    assert res.returncode == 2 and "nope" in res.stderr, res.stderr


@pytest.mark.timeout(300)
def test_two_workers_script_trains_and_matches_one_process():
    res = subprocess.run([sys.executable, "scripts/test_two_workers.py", "--steps", "6", "--quiet",
                          "--micro-batch-rows", "4", "--seq-len", "32"],
                         capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["max_param_diff_vs_single"] <= 1e-4


@pytest.mark.timeout(240)
def test_launch_workers_streams_rank_prefixed_output(tmp_path):
    res = subprocess.run([sys.executable, "scripts/launch_workers.py", "--num-workers", "2", "--",
                          *SMALL, "--steps", "2", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("coordinator", "w0", "w1"):
        assert f"[{name}] " in res.stdout, f"no output prefixed [{name}]"
    assert len(json.loads((tmp_path / "result.json").read_text())["losses"]) == 2


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:99999"])
def test_bad_advertise_address_is_named(address):
    res = zerop2p("worker", "--coordinator", "http://127.0.0.1:9", "--advertise", address,
                  timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"advertise address {address!r}" in res.stderr, res.stderr


@pytest.mark.timeout(120)
def test_worker_registers_the_advertised_address_not_the_bound_one(url):
    """Behind a proxy or NAT peers must dial the advertised HOST:PORT; the coordinator (and so
    every generation) carries that address."""
    import httpx
    from coordinator_helpers import TOKEN

    from worker.cluster.launcher import kill_all, spawn, token_env, worker_argv

    argv = worker_argv(url, worker_id="adv", min_workers=2,
                       extra=["--advertise", "127.0.0.9:41234", *SMALL])
    child, _ = spawn("adv", argv, env=token_env(TOKEN), echo=False)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(headers=headers, timeout=10) as http:
            ready = http.get(f"{url}/training/ready",
                             params={"min_workers": 1, "worker_id": "adv", "wait": 60}).json()
        assert ready["ready"], ready
        assert [(w["worker_id"], w["ip_address"], w["port"]) for w in ready["workers"]] == [
            ("adv", "127.0.0.9", 41234)]
    finally:
        kill_all([child])
