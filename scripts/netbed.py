#!/usr/bin/env python
"""Train on a network test bed: every connection crosses a link of a chosen bandwidth and RTT.

Checks the link first (RTT by TCP echo, throughput by a 16 MB upload; refused when more than
20% off the profile), then runs a coordinator and N workers on it and prints the check, the
per-step times from rank 0's output and the proxies' CPU share. The last line is JSON.
Shaped profiles need root (network namespaces, tbf); ``lan`` runs on plain loopback.

    python scripts/netbed.py --profile wan-100m --world-size 2 -- --model tiny-gpt2 --steps 5
    python scripts/netbed.py --bandwidth 50 --rtt 20 --check-only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # its harness

from harness.netbed.bed import NetBed  # noqa: E402
from harness.netbed.profiles import PROFILES, resolve  # noqa: E402
from harness.netbed.selfcheck import LinkCheckError  # noqa: E402
from harness.netbed.steps import median_seconds, rank0_step_times  # noqa: E402

DEFAULT_TRAINING = ["--model", "tiny-gpt2", "--steps", "5", "--micro-batch-rows", "4",
                    "--seq-len", "32", "--max-tokens", "60000"]


def main() -> int:
    argv = sys.argv[1:]
    worker_args = None
    if "--" in argv:
        cut = argv.index("--")
        argv, worker_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default=None,
                    help="named link (default lan, or custom when --bandwidth/--rtt are given)")
    ap.add_argument("--bandwidth", type=float, help="Mbit/s per direction of every access link")
    ap.add_argument("--rtt", type=float, help="round-trip time added to every connection, ms")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--check-only", action="store_true", help="build the bed, check it, stop")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds the training may take")
    ap.add_argument("--echo", action="store_true", help="copy every process's output here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    name = args.profile or ("lan" if args.bandwidth is None and args.rtt is None else None)
    profile = resolve(name, bandwidth_mbit=args.bandwidth, rtt_ms=args.rtt)
    report: dict = {"profile": asdict(profile), "world_size": args.world_size}
    try:
        with NetBed(profile, world_size=args.world_size, echo=args.echo,
                    worker_args=worker_args or DEFAULT_TRAINING) as bed:
            check = bed.check(strict=False)
            print(check.summary())
            report["check"] = check.to_dict()
            if not check.ok:
                raise LinkCheckError(check)
            if not args.check_only:
                workers = bed.run(timeout=args.timeout)
                times = rank0_step_times(w.lines for w in workers)
                for t in times:
                    print(f"step {t.step}: {t.seconds * 1000:.0f} ms")
                run = bed.last_run
                print(f"median step {median_seconds(times) * 1000:.0f} ms; run {run.wall_s:.1f} s,"
                      f" proxies {run.proxy_cpu_s:.2f} s CPU = {run.proxy_cpu_share:.1%} of a core")
                report["step_seconds"] = [t.seconds for t in times]
                report["run"] = {**asdict(run), "proxy_cpu_share": run.proxy_cpu_share}
    except LinkCheckError as err:
        print(f"refused: {err}", file=sys.stderr)
        report["error"] = str(err)
        print(json.dumps(report))
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: the bed has already torn down
        print(f"interrupted ({err or 'SIGINT'}); every process and namespace removed",
              file=sys.stderr)
        return 130
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
