"""Training across slow links: step time, tokens/s and bytes per step on the network test bed
(tests/harness/netbed) for profiles x world sizes x modes (full fine-tuning, LoRA r=8) x
traffic options, on GPT-2-shaped models of 3.3 M and 25 M parameters.

Every row is a real run: a coordinator and N workers, each in its own namespace behind a
shaped, delayed link (lan: plain loopback). Step time is the median of the steps after the
warm-up, from rank 0's own step timings; bytes are what rank 0's transport pushed (payload and
headers), beside what the unit layouts predict. The bound is what the link alone allows:

    bound = bytes this rank sends per step / bandwidth
            + sequential waits per step x one-way delay (RTT / 2)

with one sequential wait per group of ``prefetch_depth + 1`` all-gathers in forward and in
backward (a gather issued ahead overlaps the ones before it), one for draining the
reduce-scatters, one for the step's all-reduce. ``ratio_to_lan`` is step time over the same
row on ``lan``; ``floor_ms`` is max(lan step, bound), what perfect overlap of compute and link
could reach. Needs root (namespaces) for every profile but lan.

    python scripts/bench_links.py [--quick] [--json]

Last line: ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test bed is a harness

from harness.netbed.bed import NetBed  # noqa: E402
from harness.netbed.profiles import PROFILES  # noqa: E402

from communication.codec import get_codec  # noqa: E402

MODELS = {"3.3M": ["--n-layer", "4", "--hidden-size", "256", "--num-heads", "4"],
          "25M": ["--n-layer", "8", "--hidden-size", "512", "--num-heads", "8"]}
MODES = {"full": [], "lora": ["--lora-rank", "8"], "memory": []}
# Traffic options per mode: the original step, and the cuts that apply to it.
OPTIONS = {
    "full": {"default": [],
             "bf16p+int8g": ["--param-codec", "bf16", "--grad-codec", "int8"],
             "bf16p+int8g+small": ["--param-codec", "bf16", "--grad-codec", "int8",
                                   "--persist-threshold", "1000", "--prefetch-depth", "2"]},
    # what the memory rows compare (``--memory``): time and peak resident memory per rank
    "memory": {"accum4": ["--grad-accum", "4"],
               "accum4+step-sync": ["--grad-accum", "4", "--grad-sync", "step"],
               "keep-gathered": ["--reshard-after-forward", "false"]},
    "lora": {"default": [],
             "frozen-replicated": ["--frozen", "replicate"],
             "all-local": ["--frozen", "replicate", "--persist-threshold", "100000"]},
}
BATCH = ["--micro-batch-rows", "8", "--seq-len", "128", "--max-tokens", "400000",
         "--schedule", "constant", "--lr", "1e-3", "--log-every", "1"]


@dataclass(frozen=True, slots=True)
class Case:
    profile: str
    world_size: int
    model: str
    mode: str
    options: str


def matrix(quick: bool, memory: bool = False) -> list[Case]:
    """The rows to run: the full matrix, or (``--quick``) world size 2 and the 3.3 M model
    plus the 25 M model's full fine-tuning on lan and wan-1g; ``--memory``: the options that
    trade memory for traffic, on the 25 M model over lan and wan-100m."""
    if memory:
        return [Case(p, 2, "25M", m, o) for p in ("lan", "wan-100m")
                for m, o in [("full", "default"), *(("memory", o) for o in OPTIONS["memory"])]]
    cases = []
    for model in MODELS:
        for world in (2, 4):
            for profile in ("lan", "wan-1g", "wan-100m"):
                for mode, options in OPTIONS.items():
                    if mode == "memory":
                        continue
                    for name in options:
                        cases.append(Case(profile, world, model, mode, name))
    if not quick:
        return cases
    return [c for c in cases if c.world_size == 2 and (
        c.model == "3.3M" or (c.mode == "full" and c.profile in ("lan", "wan-1g")
                              and c.options != "bf16p+int8g+small"))]


def predicted_bytes(case: Case, *, world: int) -> int:
    """Payload bytes one rank pushes per step, from the unit layouts the run will use."""
    from harness.builders import build_data_and_model  # lazy: torch, transformers

    from worker.cli.options import build_train_config
    from worker.models.blocks import find_block_modules

    cfg = build_train_config(worker_args(case, steps=1))
    _, model = build_data_and_model(cfg)
    threshold = cfg.traffic.persist_threshold
    blocks = find_block_modules(model)
    param_codec, grad_codec = (get_codec(c) for c in cfg.traffic.codecs(cfg.codec))
    replicate = cfg.traffic.frozen == "replicate"
    units: list[tuple[int, int]] = [(0, 0) for _ in range(len(blocks) + 1)]
    small = 0
    for name, p in model.named_parameters():
        unit = next((i + 1 for i, b in enumerate(blocks) if name.startswith(b + ".")), 0)
        if p.numel() < threshold:
            small += p.numel() if p.requires_grad else 0
            continue
        t, f = units[unit]
        units[unit] = (t + p.numel(), f) if p.requires_grad else (t, f + p.numel())
    import torch  # lazy: with the model above

    accum = cfg.grad_accum
    syncs = accum if cfg.traffic.grad_sync == "micro-batch" else 1
    per_block = 2 if cfg.traffic.reshard_after_forward else 1
    sent = 0
    for i, (t, f) in enumerate(units):
        shard_t, shard_f = -(-t // world), -(-f // world)
        row = shard_t + (0 if replicate else shard_f)
        gathers = 0 if row == 0 else accum * (1 if i == 0 else per_block)  # root: kept
        sent += gathers * (world - 1) * param_codec.wire_bytes(row, torch.float32)
        if t:
            sent += syncs * (world - 1) * grad_codec.wire_bytes(shard_t, torch.float32)
    return sent + (world - 1) * 4 * (3 + small)  # the all-reduce: norm, loss, tokens, bucket


def worker_args(case: Case, *, steps: int) -> list[str]:
    return (["--model", "tiny-gpt2", *MODELS[case.model], *BATCH, "--steps", str(steps),
             *MODES[case.mode], *OPTIONS[case.mode][case.options]])


def bound_ms(case: Case, bytes_per_step: float, *, units: int) -> float:
    link = PROFILES[case.profile]
    if not link.shaped:
        return 0.0
    depth = 2 if "--prefetch-depth" in OPTIONS[case.mode][case.options] else 1
    gathered = 0 if case.options == "all-local" else units
    waits = 2 * math.ceil(gathered / (depth + 1)) + 2
    transfer = bytes_per_step * 8 / (link.bandwidth_mbit * 1e6) if link.bandwidth_mbit else 0.0
    return 1e3 * (transfer + waits * link.one_way_delay_s)


def run_case(case: Case, *, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = worker_args(case, steps=steps) + ["--output", str(out)]
        t0 = time.monotonic()
        with NetBed(PROFILES[case.profile], world_size=case.world_size, worker_args=args) as bed:
            bed.run(timeout=1800)
            check = bed.last_check
            cpu_share = bed.last_run.proxy_cpu_share if bed.last_run else 0.0
        result = json.loads((out / "result.json").read_text())
    timed = result["steps"][warmup:]
    step_s = statistics.median(s["seconds"] for s in timed)
    tokens = statistics.median(s["tokens"] for s in timed)
    training = {k: v for k, v in result["bytes_sent"].items() if k != "gather_weights"}
    per_step = sum(training.values()) / len(result["steps"])
    n_units = {"3.3M": 5, "25M": 9}[case.model]
    predicted = predicted_bytes(case, world=case.world_size)
    return {**asdict(case), "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
            "bytes_per_rank_per_step": per_step, "predicted_bytes": predicted,
            "bytes_vs_predicted": per_step / predicted if predicted else None,
            "bound_ms": bound_ms(case, per_step, units=n_units),
            "rtt_ms": check.rtt_ms if check else None,
            "mbit_s": check.mbit_s if check else None,
            "peak_rss_mb": max(s["peak_mem_mb"] for s in result["steps"]),
            "proxy_cpu_share": cpu_share, "wall_s": time.monotonic() - t0}


def table(rows: list[dict]) -> str:
    head = (f"{'profile':<9} {'N':>2} {'model':>5} {'mode':<5} {'options':<18} {'step ms':>9} "
            f"{'tok/s':>7} {'MB/step':>8} {'vs pred':>7} {'vs lan':>7} {'bound ms':>9} "
            f"{'vs bound':>8} {'vs floor':>8} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_bound = r["step_ms"] / r["bound_ms"] if r["bound_ms"] else float("nan")
        vs_floor = r["step_ms"] / r["floor_ms"] if r["floor_ms"] else float("nan")
        lines.append(
            f"{r['profile']:<9} {r['world_size']:>2} {r['model']:>5} {r['mode']:<5} "
            f"{r['options']:<18} {r['step_ms']:>9.1f} {r['tokens_per_s']:>7.0f} "
            f"{r['bytes_per_rank_per_step'] / 1e6:>8.3f} {r['bytes_vs_predicted']:>7.3f} "
            f"{r['ratio_to_lan']:>7.2f} {r['bound_ms']:>9.1f} {vs_bound:>8.2f} {vs_floor:>8.2f} "
            f"{r['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="world size 2, fewer 25 M rows")
    ap.add_argument("--memory", action="store_true", help="only the memory-for-traffic rows")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated profiles to run")
    ap.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 4")
    ap.add_argument("--models", default=None, help="comma-separated: 3.3M, 25M")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    cases = matrix(args.quick, args.memory)
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.profile in keep or c.profile == "lan"]
    if args.world_sizes:
        cases = [c for c in cases if str(c.world_size) in args.world_sizes.split(",")]
    if args.models:
        cases = [c for c in cases if c.model in args.models.split(",")]
    rows = []
    for case in cases:
        row = run_case(case, steps=args.steps, warmup=args.warmup)
        rows.append(row)
        if not args.json:
            print(f"{case}: {row['step_ms']:.1f} ms/step, "
                  f"{row['bytes_per_rank_per_step'] / 1e6:.3f} MB/step", flush=True)
    lan = {(r["world_size"], r["model"], r["mode"], r["options"]): r["step_ms"]
           for r in rows if r["profile"] == "lan"}
    for r in rows:
        base = lan.get((r["world_size"], r["model"], r["mode"], r["options"]))
        r["ratio_to_lan"] = r["step_ms"] / base if base else float("nan")
        # What a perfect overlap of compute (the lan step) and the link could reach.
        r["floor_ms"] = max(base or 0.0, r["bound_ms"])
    if not args.json:
        print(table(rows))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
