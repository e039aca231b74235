#!/usr/bin/env python
"""Cost per step of buddy replicas (--buddy true): step time with and without, bytes sent, memory.

    python scripts/bench_buddy.py [--layers 4 --hidden 256 --seq-len 128 --rows 8] [--json]

Two real worker processes over gRPC on loopback run the real Trainer on a GPT-2-shaped model
(AdamW). In the same run, blocks of --block steps with the buddy on and off alternate for
--rounds rounds, so noise on this shared machine hits both alike; each reports the median step.
"Exposed" is the time the training thread spent on the buddy: packing the snapshot and issuing
the shift after the step, and waiting for the shift to land before the next update. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_common import WAIT, build_gpt2, grpc_rendezvous, random_rows, run_ranks  # noqa: E402


def build(args):
    return build_gpt2(layers=args.layers, hidden=args.hidden, seq_len=args.seq_len)


class RandomTokens:
    """Seeded random token rows: the Trainer's data interface, nothing else."""

    def __init__(self, args):
        self.args = args

    def rank_batch(self, *, step, micro_batch, grad_accum, micro_batch_rows, rank, world_size):
        return random_rows(step=step, rows=micro_batch_rows, seq_len=self.args.seq_len,
                           rank=rank, world=world_size)


class Timed:
    """Wraps a method and adds its wall time to a counter."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0


def worker(args) -> None:
    from worker.engine.config import ShardConfig
    from worker.engine.shard import shard_model
    from worker.train.config import TrainConfig
    from worker.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    rank, world = args.rank, args.world_size
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=WAIT)
    transport, coll = grpc_rendezvous(store, rank=rank, world=world)
    model = build(args)
    engine = shard_model(model, collectives=coll, config=ShardConfig(generation=1),
                         block_names=[f"transformer.h.{i}" for i in range(args.layers)])
    total = args.warmup + 2 * args.rounds * args.block
    ckpt = tempfile.TemporaryDirectory()  # lives until the end: the trainer may write there
    config = TrainConfig(steps=total, micro_batch_rows=args.rows, buddy=True,
                         checkpoint_dir=ckpt.name)
    trainer = Trainer(config, engine=engine, data=RandomTokens(args), rank=rank,
                      world_size=world)
    buddy = trainer.buddy
    buddy.settle = settle = Timed(buddy.settle)
    buddy.after_step = after = Timed(buddy.after_step)
    times = {True: [], False: []}
    peak_held = 0
    schedule = [False] * args.warmup + [on for _ in range(args.rounds)
                                        for on in (True, False) for _ in range(args.block)]
    for i, on in enumerate(schedule):
        # The first step after an on-block still settles that block's last shift, as the next
        # step of a real run would; its wait is charged to the on-block, not to this step.
        trainer.buddy = buddy if on or (i and schedule[i - 1]) else None
        t0, settled = time.perf_counter(), settle.seconds
        trainer.train_step()
        if on:
            buddy.after_step()
            peak_held = max(peak_held, buddy.held_bytes())
        elapsed, waited = time.perf_counter() - t0, settle.seconds - settled
        if i >= args.warmup:
            if not on and waited:
                times[True][-1] += waited
                elapsed -= waited
            times[on].append(elapsed)
    ckpt.cleanup()  # the schedule ends with an off block, whose first step settled the last shift
    owned = sum(u.trainable_shard for u in engine.units)
    result = {"rank": rank, "world_size": world, "n_params": sum(u.layout.trainable_numel
                                                                  for u in engine.units),
              "step_ms_off": 1e3 * statistics.median(times[False]),
              "step_ms_on": 1e3 * statistics.median(times[True]),
              "exposed_ms_per_step": 1e3 * (settle.seconds + after.seconds) / len(times[True]),
              "pack_issue_ms_per_step": 1e3 * after.seconds / len(times[True]),
              "settle_wait_ms_per_step": 1e3 * settle.seconds / len(times[True]),
              "snapshot_bytes": buddy.own[-1].flat.numel(),
              "bytes_sent_per_step": buddy.bytes_sent / len(times[True]),
              "peak_held_bytes": peak_held,
              "state_bytes": owned * 16}  # fp32 master + grad + two Adam moments
    store.set(f"result/{rank}", json.dumps(result))
    store.set(f"done/{rank}", "1")
    store.wait([f"done/{r}" for r in range(world)], WAIT)
    coll.close()
    transport.close()


def launch(args) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=WAIT)
    argv = [sys.executable, __file__, "--role", "worker", "--world-size", str(args.world_size),
            "--store-port", str(store.port), "--layers", str(args.layers), "--hidden",
            str(args.hidden), "--seq-len", str(args.seq_len), "--rows", str(args.rows),
            "--rounds", str(args.rounds), "--block", str(args.block), "--warmup",
            str(args.warmup), "--threads", str(args.threads)]
    run_ranks(argv, args.world_size, timeout=args.timeout)
    return [json.loads(store.get(f"result/{r}").decode()) for r in range(args.world_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", default="main", choices=["main", "worker"], help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8, help="rows per global batch")
    ap.add_argument("--rounds", type=int, default=5, help="on/off rounds, interleaved")
    ap.add_argument("--block", type=int, default=4, help="steps per on or off block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    if args.role == "worker":
        worker(args)
        return
    ranks = launch(args)
    r0 = ranks[0]
    summary = {
        "world_size": args.world_size, "transport": "grpc", "n_params": r0["n_params"],
        "model": f"gpt2 {args.layers}x{args.hidden}, batch {args.rows}x{args.seq_len}",
        "step_ms_off": statistics.median(r["step_ms_off"] for r in ranks),
        "step_ms_on": statistics.median(r["step_ms_on"] for r in ranks),
        "exposed_ms_per_step": max(r["exposed_ms_per_step"] for r in ranks),
        "pack_issue_ms_per_step": max(r["pack_issue_ms_per_step"] for r in ranks),
        "settle_wait_ms_per_step": max(r["settle_wait_ms_per_step"] for r in ranks),
        "bytes_sent_per_step_per_rank": r0["bytes_sent_per_step"],
        "snapshot_bytes_per_rank": r0["snapshot_bytes"],
        "extra_bytes_steady_per_rank": 2 * r0["snapshot_bytes"],
        "extra_bytes_peak_per_rank": max(r["peak_held_bytes"] for r in ranks),
        "state_bytes_per_rank": r0["state_bytes"],
    }
    summary["overhead_pct"] = 100 * (summary["step_ms_on"] / summary["step_ms_off"] - 1)
    if not args.json:
        mb = 2**20
        print(f"model: {summary['model']}, {summary['n_params']:,} params, "
              f"{args.world_size} workers over gRPC, {args.rounds} interleaved rounds of "
              f"{args.block} steps each way")
        print(f"{'':<34}{'off':>10}{'on':>10}")
        print(f"{'step ms (median)':<34}{summary['step_ms_off']:>10.1f}"
              f"{summary['step_ms_on']:>10.1f}   ({summary['overhead_pct']:+.1f}%)")
        print(f"{'training thread on buddy ms/step':<34}{'':>10}"
              f"{summary['exposed_ms_per_step']:>10.2f}   (pack+issue "
              f"{summary['pack_issue_ms_per_step']:.2f}, settle wait "
              f"{summary['settle_wait_ms_per_step']:.2f})")
        print(f"{'bytes sent per step per rank':<34}{0:>10}"
              f"{summary['bytes_sent_per_step_per_rank'] / mb:>9.2f}M")
        print(f"{'extra memory per rank, steady':<34}{0:>10}"
              f"{summary['extra_bytes_steady_per_rank'] / mb:>9.2f}M   "
              f"(model state {summary['state_bytes_per_rank'] / mb:.2f}M: params, grads, Adam)")
        print(f"{'extra memory per rank, peak':<34}{0:>10}"
              f"{summary['extra_bytes_peak_per_rank'] / mb:>9.2f}M")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
