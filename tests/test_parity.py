"""Parity: N workers produce the losses and final weights of one process on the same global
batches, for every scenario in parity_scenarios.py, world sizes 1-3, both backends.

One launch of N real processes per (backend, world size) runs every scenario in sequence; the
single-process reference runs here, once per scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness.builders import build_data_and_model
from harness.reference import train_reference
from parity_scenarios import GRPC_ONLY, LOSS_TOL, MIXED, SCENARIOS, TOLERANCE, UPDATE_TOL
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
CASES = [(b, n) for b in ("grpc", "torch") for n in (1, 2, 3)]


@cache
def reference(name: str):
    torch.set_num_threads(1)
    cfg = SCENARIOS[name]
    data, model = build_data_and_model(cfg)
    return train_reference(cfg, model, data)


def launch(backend: str, world_size: int, out: Path, scenarios: list[str]) -> None:
    """Run one parity_worker process per rank; fail naming the rank whose process failed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "parity_worker.py"), "--rank", str(r), "--world-size",
             str(world_size), "--backend", backend, "--store-port", str(store.port),
             "--scenarios", ",".join(scenarios), "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} ({backend}, world size {world_size}) failed:\n{text[-4000:]}"


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-ws{n}" for b, n in CASES])
def run(request, tmp_path_factory):
    backend, world_size = request.param
    out = tmp_path_factory.mktemp(f"parity-{backend}-{world_size}")
    launch(backend, world_size, out,
           [n for n in SCENARIOS if backend == "grpc" or n not in GRPC_ONLY])
    return backend, world_size, out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parity(run, name):
    backend, world_size, out = run
    if name in GRPC_ONLY:
        pytest.skip(f"{name} is a negative control (see test_mixed_precision_check_...)")
    result = json.loads((out / name / "result.json").read_text())
    weights = load_file(str(out / name / "weights.safetensors"))
    ref = reference(name)
    assert len(result["losses"]) == len(ref.losses)
    if name in MIXED:
        check_mixed(name, result, weights, ref)
        return
    tol = TOLERANCE[name]
    for step, (a, b) in enumerate(zip(result["losses"], ref.losses)):
        assert abs(a - b) <= tol, f"{name}: step {step} loss {a} vs single-process {b}"
    assert set(weights) == set(ref.weights), "trainable parameter names differ"
    for pname, w in ref.weights.items():
        diff = float((weights[pname] - w).abs().max())
        assert diff <= tol, f"{name}: {pname} differs by {diff} (tolerance {tol})"
    assert ref.losses[-1] < ref.losses[0] or name == "sgd", "the reference run did not learn"
    # Collectives are per unit, never per parameter: gathers <= 2 per unit per forward.
    units = len(result["layouts"])
    steps, accum = len(ref.losses), SCENARIOS[name].grad_accum
    counts = result["collective_counts"]
    if world_size > 1 or backend == "grpc":
        assert counts["reduce_scatter"] <= units * steps * accum
        assert counts["gather_fwd"] + counts["gather_bwd"] <= 2 * units * steps * accum + units
    assert sum(result["params_per_unit"]) > units, "units should hold several parameters each"
    replays = (units - 1) * steps * accum if SCENARIOS[name].activation_checkpointing else 0
    assert result["recomputed_units"] == replays, "every block unit replays once per backward"


def update_error(weights: dict, ref) -> float:
    """||w - w_ref|| / ||w_ref - w_init|| over all trainable weights: 0 for the same run, 1 for
    a model that never trained."""
    diff = torch.cat([(weights[n] - w).reshape(-1) for n, w in ref.weights.items()])
    update = torch.cat([(w - ref.initial[n]).reshape(-1) for n, w in ref.weights.items()])
    return float(diff.norm() / update.norm())


def check_mixed(name: str, result: dict, weights: dict, ref) -> None:
    for step, (a, b) in enumerate(zip(result["losses"], ref.losses)):
        assert abs(a - b) <= LOSS_TOL, f"{name}: step {step} loss {a} vs {MIXED[name]} run {b}"
    assert set(weights) == set(ref.weights), "trainable parameter names differ"
    err = update_error(weights, ref)
    assert err <= UPDATE_TOL, f"{name}: update differs from the {MIXED[name]} reference's by {err:.4f}"


def test_mixed_precision_check_rejects_an_untrained_model_and_a_wrong_codec(run):
    """The mixed-precision check can fail: the initial weights score 1.0, and a bf16 run whose
    parameters travelled as int8 differs from the bf16 reference by more than the tolerance."""
    backend, world_size, out = run
    ref = reference("bf16")
    assert update_error(ref.initial, ref) > UPDATE_TOL
    if backend != "grpc" or world_size == 1:
        return  # nothing is encoded at world size 1; torch.distributed sends raw tensors
    wrong = load_file(str(out / "bf16_int8" / "weights.safetensors"))
    right = load_file(str(out / "bf16" / "weights.safetensors"))
    print(f"update error vs bf16 reference at ws{world_size}: bf16 "
          f"{update_error(right, ref):.4f}, bf16 with int8 params {update_error(wrong, ref):.4f}")
    assert update_error(wrong, ref) > UPDATE_TOL


def test_traffic_options_move_fewer_collectives_and_bytes(run):
    """The exact traffic options cut what they promise (their parity is checked above):
    one reduce-scatter per unit per step instead of per micro-batch, no backward all-gather,
    and a LoRA step that never moves the replicated frozen base."""
    backend, world_size, out = run
    if world_size == 1:
        pytest.skip("nothing travels at world size 1")

    def counts(name):
        return json.loads((out / name / "result.json").read_text())

    accum, step_sync = counts("accum")["collective_counts"], counts("accum_step")["collective_counts"]
    assert step_sync["reduce_scatter"] * 2 == accum["reduce_scatter"], (accum, step_sync)
    assert counts("keep_gathered")["collective_counts"]["gather_bwd"] == 0
    assert counts("gpt2")["collective_counts"]["gather_bwd"] > 0
    small = counts("small_replicated")["collective_counts"]
    assert small["all_reduce"] == counts("gpt2")["collective_counts"]["all_reduce"]  # one a step
    local = counts("lora_local")["collective_counts"]
    assert local["gather_fwd"] == local["gather_bwd"] == local["reduce_scatter"] == 0, local
    lora, replicated = counts("lora"), counts("lora_replicated")
    assert (replicated["collective_counts"]["gather_fwd"]
            < lora["collective_counts"]["gather_fwd"]), "units without adapters still gathered"
    if backend == "grpc":  # gloo's bytes are not counted

        def step_bytes(r):
            return sum(b for phase, b in r["bytes_by_phase"].items() if phase != "gather_weights")

        assert step_bytes(replicated) * 20 < step_bytes(lora), (replicated, lora)


def test_uneven_shapes_exercise_padding(run):
    """In "uneven" no unit's size divides by 2 and some not by 3, so slices are padded."""
    layouts = json.loads((run[2] / "uneven" / "result.json").read_text())["layouts"]
    assert all(t % 2 for t, _ in layouts) and any(t % 3 for t, _ in layouts), layouts


def test_same_seed_gives_bit_identical_weights(run):
    _, _, out = run
    a = load_file(str(out / "gpt2" / "weights.safetensors"))
    b = load_file(str(out / "again" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "two runs with one seed differ"
