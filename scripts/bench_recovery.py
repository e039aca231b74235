#!/usr/bin/env python
"""Per injected phase: time to detect a SIGKILLed worker, time to resume training, steps lost.

A local coordinator and N workers train with a checkpoint every step; one worker is killed in
each phase in turn (ZEROP2P_FAULT) and ``zerop2p train``'s supervisor restarts it. Times are
read from the workers' log lines: kill -> first survivor's error naming the lost rank
(detect) -> every member of the next generation has loaded the checkpoint (resume).

    python scripts/bench_recovery.py [--world-size 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # its harness

from harness.fault_worker import FAULT_WORKER  # noqa: E402
from harness.faults import PHASES  # noqa: E402

from worker.cluster.launcher import run_local_cluster  # noqa: E402

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
KILL = re.compile(r"SIGKILL at (\w+), step (\d+), rank (\d+)")
LOST = re.compile(r"generation (\d+) lost a peer")
RESUMED = re.compile(r"rank \d+ resumed at step (\d+)")


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def events(lines: list[str]) -> list[tuple[float, str, re.Match]]:
    out = []
    for line in lines:
        t = stamp(line)
        for kind, rx in (("kill", KILL), ("lost", LOST), ("resumed", RESUMED)):
            if t is not None and (m := rx.search(line)):
                out.append((t, kind, m))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    n = args.world_size
    # one phase per step, with a quiet step between kills so each has survivors to detect it
    plan = [(phase, 1 + 2 * i, i % n) for i, phase in enumerate(PHASES)]
    steps = plan[-1][1] + 2
    with tempfile.TemporaryDirectory() as tmp:
        env = {"ZEROP2P_FAULT": ",".join(f"{p}:{s}:{r}" for p, s, r in plan),
               "ZEROP2P_FAULT_MARK": str(Path(tmp) / "fired")}
        worker_args = ["--model", "tiny-gpt2", "--steps", str(steps), "--micro-batch-rows",
                       str(2 * n), "--seq-len", "32", "--max-tokens", "60000",
                       "--checkpoint-dir", str(Path(tmp) / "ckpt"), "--checkpoint-every", "1"]
        workers = run_local_cluster(n, worker_args, echo=False, timeout=900,
                                    worker_entry=FAULT_WORKER,
                                    max_restarts=len(plan), worker_env=env)
    evs = sorted(e for w in workers for e in events(w.lines))
    rows = []
    for phase, step, rank in plan:
        kill = next((e for e in evs if e[1] == "kill" and e[2].group(1) == phase), None)
        if kill is None:
            raise RuntimeError(f"no worker logged the {phase} fault (step {step}, rank {rank})")
        after = [e for e in evs if e[0] >= kill[0]]
        detect = next((e for e in after if e[1] == "lost"), None)
        resumed = [e for e in after if e[1] == "resumed"][:n]
        resume_t = max(e[0] for e in resumed) if len(resumed) == n else float("nan")
        resumed_step = int(resumed[0][2].group(1)) if resumed else -1
        rows.append({"phase": phase, "step": step, "rank": rank, "world_size": n,
                     "detect_s": round(detect[0] - kill[0], 2) if detect else None,
                     "resume_s": round(resume_t - kill[0], 2),
                     "steps_lost": step - resumed_step})
    if not args.json:
        print(f"{'phase':<15}{'step':>5}{'rank':>5}{'detect s':>10}{'resume s':>10}{'lost':>6}")
        for r in rows:
            print(f"{r['phase']:<15}{r['step']:>5}{r['rank']:>5}{r['detect_s'] or float('nan'):>10.2f}"
                  f"{r['resume_s']:>10.2f}{r['steps_lost']:>6}")
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
