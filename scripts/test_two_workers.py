#!/usr/bin/env python
"""Two workers and a coordinator train a small model on real text; one process trains the same
model on the same global batches; exit 0 only if the loss fell and both runs agree.

    python scripts/test_two_workers.py [--steps 30] [--backend grpc|torch] [--model tiny-gpt2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # its harness

import torch  # noqa: E402
from harness.builders import build_data_and_model  # noqa: E402
from harness.reference import train_reference  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from worker.cluster.launcher import run_local_cluster  # noqa: E402
from worker.data.config import DataConfig  # noqa: E402
from worker.models.config import ModelConfig  # noqa: E402
from worker.train.config import TrainConfig  # noqa: E402
from worker.train.optim import OptimConfig  # noqa: E402

LOSS_TOL = 1e-4
PARAM_TOL = 1e-4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backend", default="grpc", choices=["grpc", "torch"])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--micro-batch-rows", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--quiet", action="store_true", help="do not echo the workers' output")
    args = ap.parse_args()

    train = TrainConfig(
        model=ModelConfig(name=args.model), data=DataConfig(source=args.data, seq_len=args.seq_len),
        optim=OptimConfig(lr=args.lr, schedule="cosine", warmup_steps=2),
        steps=args.steps, micro_batch_rows=args.micro_batch_rows, grad_accum=args.grad_accum,
        backend=args.backend,
    )
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = ["--model", args.model, "--data", args.data, "--steps", str(args.steps),
                       "--lr", str(args.lr), "--schedule", "cosine", "--warmup-steps", "2",
                       "--micro-batch-rows", str(args.micro_batch_rows),
                       "--grad-accum", str(args.grad_accum), "--seq-len", str(args.seq_len),
                       "--backend", args.backend, "--output", tmp]
        run_local_cluster(2, worker_args, echo=not args.quiet, timeout=1200)
        result = json.loads((Path(tmp) / "result.json").read_text())
        weights = load_file(str(Path(tmp) / "weights.safetensors"))

    data, model = build_data_and_model(train)
    ref = train_reference(train, model, data)
    losses = result["losses"]
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref.losses, strict=True))
    param_diff = max(float((weights[n] - w).abs().max()) for n, w in ref.weights.items())

    print(f"{'step':>5} {'2 workers':>12} {'1 process':>12} {'|diff|':>10}")
    for i, (a, b) in enumerate(zip(losses, ref.losses, strict=True)):
        print(f"{i:>5} {a:>12.6f} {b:>12.6f} {abs(a - b):>10.2e}")
    fell = losses[-1] < losses[0]
    ok = fell and loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'fell' if fell else 'DID NOT FALL'}); "
          f"max loss diff {loss_diff:.2e} (tol {LOSS_TOL}); max param diff {param_diff:.2e} "
          f"(tol {PARAM_TOL}): {'PASS' if ok else 'FAIL'}")
    print(json.dumps({
        "world_size": result["world_size"], "steps": len(losses), "backend": args.backend,
        "loss_first": losses[0], "loss_last": losses[-1],
        "max_loss_diff_vs_single": loss_diff, "max_param_diff_vs_single": param_diff,
        "passed": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
