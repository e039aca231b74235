#!/usr/bin/env python
"""The training service end to end: a coordinator and two serving workers on this machine, a
client loop (``zerop2p.ServiceClient``) that trains on the CLI trainer's batches with its
schedule, and the CLI trainer itself; the weights must agree.

For each mode (LoRA, full fine-tuning) the loop sends every step's global batch as two
``forward_backward`` chunks (gradients accumulate across calls), then ``optim_step`` with the
cosine schedule's learning rate computed in the loop, all submitted before any result is read.
Weights (``cross_entropy`` is a sum) are 1 / the step's target tokens, so the summed gradient is
the CLI's mean. The final trainable weights are read from a saved state and compared with the
CLI run's ``weights.safetensors``; the untrained weights are the negative control.

    python scripts/service_example.py [--steps 4] [--modes lora full] [--json]

Last line: ``{"passed": ..., "max_param_diff_vs_cli": ..., "steps": ..., "modes": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-5
SIZES = ["--n-layer", "2", "--hidden-size", "32", "--num-heads", "4", "--max-positions", "64"]
# LoRA on GPT-2, full fine-tuning on Llama: GPT-2's attention key bias has a gradient that is
# zero but for rounding, and Adam makes rounding in it a full step, so one summation order
# (CLI: a mean per rank; service: a sum per call) lands 1e-5 from the other there.
BASE = {"lora": "tiny-gpt2", "full": "tiny-llama"}
DATA = ["--data", "stdlib", "--seq-len", "32", "--max-tokens", "20000"]
TOKEN = "service-example"


def start_coordinator(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m coordinator`` on a free port; its URL from the first line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", "--port", "0", "--db", str(db),
                             "--token", TOKEN], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    first = lines.get(timeout=60)
    return proc, first.strip().rsplit(" ", 1)[-1]


def start_workers(url: str, out: Path, n: int = 2) -> list[subprocess.Popen]:
    env = {**os.environ, "ZEROP2P_TOKEN": TOKEN}
    return [subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--coordinator", url,
                              "--worker-id", f"serve-{i}", "--serve", "--serve-dir",
                              str(out / "serve"), "--min-workers", str(n), "--timeout", "60",
                              *SIZES], cwd=ROOT, env=env, stdout=open(out / f"worker{i}.log", "w"),
                             stderr=subprocess.STDOUT) for i in range(n)]


def cli_run(out: Path, steps: int, rows: int, model: str, lora: list[str],
            optim: list[str]) -> Path:
    """The CLI trainer at world size 2 on the same model, data and schedule."""
    run = subprocess.run([sys.executable, "-m", "worker.cli", "train", "--world-size", "2",
                          "--model", model, *SIZES, *DATA, *lora, *optim, "--steps", str(steps),
                          "--micro-batch-rows", str(rows), "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(f"CLI trainer failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return out / "weights.safetensors"


def schedule(lr: float, warmup: int, steps: int) -> list[float]:
    """The CLI's cosine schedule (transformers' get_scheduler), one learning rate per step."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def datums(tokens) -> list:
    """Rows of token ids as Datums: next-token targets, weights 1 / all targets of the step."""
    from zerop2p import types

    total = tokens.shape[0] * (tokens.shape[1] - 1)
    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": row[1:].tolist(),
                                        "weights": [1.0 / total] * (len(row) - 1)})
            for row in tokens]


def client_loop(training, data, lrs: list[float], rows: int) -> list:
    """Every call submitted before any result is read (the futures keep the order)."""
    from zerop2p import types

    futures = []
    for step, lr in enumerate(lrs):
        batch = datums(data.global_batch(step=step, micro_batch=0, grad_accum=1,
                                         micro_batch_rows=rows))
        half = len(batch) // 2
        futures.append(training.forward_backward(batch[:half]))
        futures.append(training.forward_backward(batch[half:]))
        futures.append(training.optim_step(types.AdamParams(
            learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=1.0)))
    return [f.result(timeout=600) for f in futures]


def state_weights(path: str) -> dict:
    """The trainable weights of a saved state, reassembled from its rank files."""
    from worker.engine.sharding import FlatLayout
    from worker.state.catalog import read_manifest
    from worker.state.export import iter_unit_weights

    manifest = read_manifest(path)
    layouts = [FlatLayout.from_dict(d) for d in manifest["layouts"]]
    out = {}
    for _, weights in iter_unit_weights(Path(path), manifest, layouts, trainable_only=True):
        out.update(weights)
    return out


def max_diff(a: dict, b: dict) -> float:
    missing = set(a) ^ set(b)
    if missing:
        raise AssertionError(f"weights differ in names: {sorted(missing)[:5]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_mode(service, mode: str, out: Path, steps: int, rows: int, data) -> dict:
    from safetensors.torch import load_file

    lora = ["--lora-rank", "4"] if mode == "lora" else []
    lr, warmup = 3e-3, 1
    optim = ["--lr", str(lr), "--schedule", "cosine", "--warmup-steps", str(warmup),
             "--weight-decay", "0.01", "--max-grad-norm", "1.0"]
    t0 = time.perf_counter()
    cli = load_file(str(cli_run(out / f"cli-{mode}", steps, rows, BASE[mode], lora, optim)))
    cli_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    training = (service.create_lora_training_client(BASE[mode], rank=4) if mode == "lora"
                else service.create_full_training_client(BASE[mode]))
    initial = state_weights(training.save_state("initial").result(600).path)
    results = client_loop(training, data, schedule(lr, warmup, steps), rows)
    final = state_weights(training.save_state("final").result(600).path)
    service_s = time.perf_counter() - t0
    trained = {k: cli[k] for k in final}
    steps_done = [r for r in results if hasattr(r, "grad_norm")]
    return {"mode": mode, "model": BASE[mode], "steps": len(steps_done),
            "max_param_diff_vs_cli": max_diff(final, trained),
            "untrained_diff_vs_cli": max_diff(initial, trained),
            "last_loss_sum": results[-2].loss + results[-3].loss,
            "grad_norms": [r.grad_norm for r in steps_done],
            "trainable_params": training.model.trainable_params,
            "cli_s": cli_s, "service_s": service_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4, help="rows per global batch")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    from worker.data.config import DataConfig
    from worker.main import build_data
    from worker.train.config import TrainConfig
    from zerop2p import ServiceClient

    data = build_data(TrainConfig(data=DataConfig(source="stdlib", seq_len=32,
                                                  max_tokens=20000)))
    out = Path(tempfile.mkdtemp(prefix="zerop2p-service-"))
    coordinator, url = start_coordinator(out / "coordinator.db", out / "coordinator.log")
    workers = start_workers(url, out)
    try:
        service = ServiceClient(url, token=TOKEN)
        rows = [run_mode(service, m, out, args.steps, args.rows, data) for m in args.modes]
    finally:
        for p in [*workers, coordinator]:
            p.kill()
            p.wait(10)
    worst = max(r["max_param_diff_vs_cli"] for r in rows)
    control = min(r["untrained_diff_vs_cli"] for r in rows)
    passed = worst <= TOLERANCE and control > 100 * TOLERANCE
    if not args.json:
        print(f"{'mode':6} {'model':10} {'steps':>5} {'params':>8} {'max |service - CLI|':>20} "
              f"{'untrained vs CLI':>17} {'CLI s':>7} {'service s':>9}")
        for r in rows:
            print(f"{r['mode']:6} {r['model']:10} {r['steps']:5d} {r['trainable_params']:8d} "
                  f"{r['max_param_diff_vs_cli']:20.2e} {r['untrained_diff_vs_cli']:17.2e} "
                  f"{r['cli_s']:7.1f} {r['service_s']:9.1f}")
        print(f"tolerance {TOLERANCE:g}; the untrained weights must differ by > "
              f"{100 * TOLERANCE:g}; logs in {out}")
    print(json.dumps({"passed": passed, "max_param_diff_vs_cli": worst, "steps": args.steps,
                      "tolerance": TOLERANCE, "modes": {r["mode"]: r for r in rows}}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
