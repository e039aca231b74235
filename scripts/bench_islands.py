#!/usr/bin/env python
"""ZeRO-3 inside a site, DiLoCo across sites, against one flat ZeRO-3 group over the same WAN.

Four workers in two sites (tests/harness/netbed/islands.py: each site a namespace holding its
workers, lan inside it, the profile's link, shared by the site's workers, between sites and to
the coordinator). Each row is a real run on a fresh bed, checked before it trains:

* ``flat``: one ZeRO-3 group of all four workers (no ``--site``); every collective crosses the
  WAN. Global batch: ``--micro-batch-rows`` rows per step.
* ``islands`` H: two islands of two workers, each a ZeRO-3 group inside its site, with an outer
  DiLoCo round across sites every H inner steps (the bed's ``--site``/``--sites`` and
  ``--outer-every H``). Each island takes ``--micro-batch-rows / 2`` rows per step of its own
  share of the data, so the tokens per step, and over the run, equal the flat row's.

Every run evaluates on the same held-out rows (an island has half the rows per eval batch and
twice the batches). Read from each group's rank-0 ``result.json``: tokens/s is all tokens
trained over the slowest group's summed step time; the final eval loss is the mean over the
groups (per site in ``final_eval_by_site``). Shaped profiles need root; ``lan`` does not.

Time is each group's training span from its rank 0's log: from the start of the first step
(its log time less its seconds) to the last step or outer-round line, so the outer rounds count
(a step's own ``seconds`` leave them out: ``inner_s`` is their sum) and the final eval does not.

    python scripts/bench_islands.py [--json] [--profile wan-100m] [--steps 100]
        [--outer-every 10 50] [--model tiny-gpt2] [--modes flat islands] [-- WORKER ARGS]

Last line: ``{"rows": [{"mode": "flat"|"islands", "outer_every": null|H, ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test bed is a harness

from harness.netbed.islands import IslandBed  # noqa: E402
from harness.netbed.profiles import PROFILES  # noqa: E402

SITES = [2, 2]  # two sites of two workers: flat is one group of 4, islands two groups of 2
RANK0 = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank 0 INFO \S+: "
                   r"(?:step \d+ loss .* seconds ([\d.]+)|rank 0: outer round )")


def train_span(lines: list[str]) -> float | None:
    """Seconds from the start of rank 0's first step to its last step or outer round, from
    its log lines; None when ``lines`` hold no rank-0 step line (another rank's output)."""
    start = end = None
    for line in lines:
        if m := RANK0.match(line):
            end = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if start is None and m.group(2) is not None:
                start = end - float(m.group(2))
    return end - start if start is not None else None


def worker_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """What every row's workers share: model, data, schedule, steps, the final evaluation."""
    return ["--model", args.model, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--max-tokens", str(args.max_tokens), "--lr", str(args.lr), "--schedule", "constant",
            "--eval-every", str(args.eval_every or args.steps), "--log-every", "1", *extra]


def build_bed(mode: str, outer_every: int | None, args: argparse.Namespace, common: list[str],
              out: Path) -> tuple[IslandBed, list[Path]]:
    """The bed of one row and the output directories its groups' rank 0s write."""
    islands, rows, batches = len(SITES), args.micro_batch_rows, args.eval_batches
    profile = PROFILES[args.profile]
    if mode == "flat":
        flat = [*common, "--micro-batch-rows", str(rows), "--eval-batches", str(batches),
                "--output", str(out / "flat")]
        return IslandBed(profile, sites=SITES, worker_args=flat, flat=True), [out / "flat"]
    island = [*common, "--micro-batch-rows", str(rows // islands), "--eval-batches",
              str(batches * islands), "--outer-every", str(outer_every)]
    site_args = {k: ["--output", str(out / f"s{k}")] for k in range(islands)}
    return (IslandBed(profile, sites=SITES, worker_args=island, site_args=site_args),
            [out / f"s{k}" for k in range(islands)])


def run_row(mode: str, outer_every: int | None, args: argparse.Namespace,
            common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        bed, outputs = build_bed(mode, outer_every, args, common, Path(tmp))
        with bed:
            workers = bed.run(timeout=args.timeout)
            check, run = bed.last_check, bed.last_run
        results = [json.loads((o / "result.json").read_text()) for o in outputs]
    spans = [s for s in (train_span(w.lines) for w in workers) if s is not None]
    if len(spans) != len(results):
        raise RuntimeError(f"{mode}: {len(spans)} rank-0 step logs for {len(results)} groups")
    tokens = sum(s["tokens"] for r in results for s in r["steps"])
    train_s = max(spans)
    per_step = [sum(r["steps"][i]["tokens"] for r in results) for i in range(args.steps)]
    evals = [r["eval"][-1][1] if r["eval"] else None for r in results]
    return {"mode": mode, "outer_every": outer_every, "profile": args.profile,
            "workers": sum(SITES), "groups": len(results), "steps": args.steps,
            "tokens": tokens, "tokens_per_step": statistics.median(per_step),
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0, "train_s": train_s,
            "inner_s": max(sum(s["seconds"] for s in r["steps"]) for r in results),
            "step_s_median": statistics.median(s["seconds"] for r in results
                                               for s in r["steps"]),
            "final_eval_loss": (statistics.mean(evals) if None not in evals else None),
            "final_eval_by_site": evals if mode == "islands" else None,
            "final_loss": statistics.mean(r["losses"][-1] for r in results),
            "run_s": run.wall_s, "wall_s": time.monotonic() - t0,
            "rtt_ms": check.rtt_ms, "mbit_s": check.mbit_s,
            "proxy_cpu_share": run.proxy_cpu_share}


def _num(key: str, spec: str, scale: float = 1.0):
    """A cell: ``row[key] * scale`` formatted by ``spec``, or ``-`` when the row has none."""
    return lambda row: "-" if row[key] is None else format(
        row[key] * scale if scale != 1.0 else row[key], spec)


COLUMNS = [  # (title, width, cell); the first column is left-aligned, the rest right
    ("mode", 8, lambda row: row["mode"]), ("H", 4, _num("outer_every", "d")),
    ("tok/step", 8, _num("tokens_per_step", ".0f")), ("tok/s", 8, _num("tokens_per_s", ".0f")),
    ("step ms", 8, _num("step_s_median", ".0f", 1e3)),
    ("eval loss", 9, _num("final_eval_loss", ".4f")), ("loss", 7, _num("final_loss", ".4f")),
    ("train s", 8, _num("train_s", ".2f")), ("inner s", 8, _num("inner_s", ".2f")),
    ("run s", 7, _num("run_s", ".1f")), ("wall s", 7, _num("wall_s", ".1f")),
]


def table(rows: list[dict]) -> str:
    def line(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))

    head = line([title for title, _, _ in COLUMNS])
    return "\n".join([head, "-" * len(head),
                      *(line([cell(r) for _, _, cell in COLUMNS]) for r in rows)])


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="wan-100m")
    ap.add_argument("--modes", nargs="+", choices=["flat", "islands"], default=["flat", "islands"])
    ap.add_argument("--outer-every", nargs="+", type=int, default=[10, 50], metavar="H",
                    help="inner steps between outer rounds, one islands row each")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--model", default="tiny-gpt2", help="preset or from_pretrained directory")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch-rows", type=int, default=8,
                    help="global rows per step (flat); each island takes its share")
    ap.add_argument("--max-tokens", type=int, default=400_000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=0, help="0: only after the last step")
    ap.add_argument("--eval-batches", type=int, default=4, help="flat's; an island's is twice")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    per_worker = len(SITES) * SITES[0]
    if args.micro_batch_rows % per_worker:
        ap.error(f"--micro-batch-rows {args.micro_batch_rows} must split over {len(SITES)} "
                 f"islands x {SITES[0]} workers (a multiple of {per_worker})")
    common = worker_args(args, extra)
    plan = [("flat", None)] * ("flat" in args.modes) + [
        ("islands", h) for h in args.outer_every if "islands" in args.modes]
    rows = []
    for mode, h in plan:
        row = run_row(mode, h, args, common)
        rows.append(row)
        if not args.json:
            print(f"{mode} H={h}: {row['tokens_per_s']:.0f} tokens/s, eval loss "
                  f"{row['final_eval_loss']}, {row['wall_s']:.1f} s", flush=True)
    if not args.json:
        print(table(rows))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
