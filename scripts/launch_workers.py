#!/usr/bin/env python
"""Launch one worker per visible GPU (CUDA_VISIBLE_DEVICES), or N CPU workers, and stream their
output with rank prefixes. Without --coordinator a local coordinator is started too.

    python scripts/launch_workers.py --num-workers 2 -- --model tiny-gpt2 --steps 20
    python scripts/launch_workers.py --coordinator http://10.0.0.1:8000 --gpus -- --steps 100

Everything after ``--`` is passed to every ``zerop2p worker`` (see ``zerop2p worker --help``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.cluster.launcher import (  # noqa: E402
    kill_all,
    new_token,
    spawn,
    start_coordinator,
    stop_all,
    supervise,
    token_env,
    worker_argv,
)


def visible_gpus() -> list[str]:
    """Device indices this process may use: CUDA_VISIBLE_DEVICES, else every CUDA device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-workers", type=int, default=None,
                    help="CPU workers to start (default: one per visible GPU, else 2)")
    ap.add_argument("--gpus", action="store_true", help="one worker per visible GPU")
    ap.add_argument("--coordinator", default=None, help="URL of a running coordinator")
    ap.add_argument("--token", default=os.environ.get("ZEROP2P_TOKEN") or new_token(),
                    help="cluster token (default $ZEROP2P_TOKEN, else a random one per run)")
    ap.add_argument("--min-workers", type=int, default=None,
                    help="barrier size (default: the workers started here)")
    ap.add_argument("--max-restarts", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args, rest = ap.parse_known_args()
    worker_args = rest[1:] if rest[:1] == ["--"] else rest

    gpus = visible_gpus() if args.gpus or args.num_workers is None else []
    n = len(gpus) if gpus else (args.num_workers or 2)
    children, coordinator = [], None
    try:
        url = args.coordinator
        if url is None:
            coordinator, url = start_coordinator(token=args.token)
        for i in range(n):
            extra, env = list(worker_args), token_env(args.token)
            if gpus:  # each worker sees one GPU as cuda:0
                env["CUDA_VISIBLE_DEVICES"] = gpus[i]
                extra = ["--device", "cuda:0", *extra]
            argv = worker_argv(url, worker_id=f"w{i}", min_workers=args.min_workers or n,
                               extra=extra)
            children.append(spawn(f"w{i}", argv, env=env)[0])
        supervise(children, timeout=args.timeout, max_restarts=args.max_restarts)
        return 0
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)  # SIGINT first: workers leave the coordinator
        kill_all([coordinator] if coordinator else [])


if __name__ == "__main__":
    sys.exit(main())
