"""The doctor's sharded run: a coordinator and N workers on this machine, as ``zerop2p train``
starts them (worker/cluster/launcher.py's parts), except that the doctor holds the coordinator
for the whole run: it checks the token and clock against it before the workers start, and reads
the links every rank measured from its telemetry after they finish."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from worker.cli.doctor.checks import Check, coordinator_checks, get_json, links_from_telemetry
from worker.cluster.launcher import (
    kill_all,
    local_worker_env,
    new_token,
    spawn,
    start_coordinator,
    stop_all,
    supervise,
    token_env,
    worker_argv,
)

EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Interrupt)\b.*")
NOT_A_CONTINUATION = re.compile(r"^\s*$|^\d{4}-\d\d-\d\d |^[\u2500-\u257f]")  # blank, log, box
TELEMETRY_ROWS = 10_000


@dataclass(slots=True, kw_only=True)
class ShardedRun:
    """What rank 0 left in ``--output`` (losses, full weights), or why there is nothing."""

    losses: list[float] | None = None
    weights: dict[str, torch.Tensor] | None = None
    error: str | None = None  # the failing worker and its exception, in one line
    checks: list[Check] = field(default_factory=list)  # token, clock, links


def last_exception(lines: list[str]) -> str | None:
    """The last exception a worker printed (a rich traceback wraps it over lines: joined)."""
    for i in range(len(lines) - 1, -1, -1):
        if EXCEPTION_LINE.match(lines[i].strip()):
            tail = [lines[i].strip()]
            for more in lines[i + 1:]:
                if NOT_A_CONTINUATION.match(more):
                    break
                tail.append(more.strip())
            return " ".join(tail)[:600]
    return None


def _links(url: str, token: str, world_size: int) -> list[Check]:
    try:
        rows = get_json(f"{url}/telemetry?limit={TELEMETRY_ROWS}", token)
    except (RuntimeError, OSError, ValueError) as err:
        return [Check(name="links", status="warn", detail=f"telemetry not read: {err}")]
    return links_from_telemetry(rows, world_size)


def run_sharded(world_size: int, worker_args: list[str], *, out_dir: Path, timeout: float,
                echo: bool = False) -> ShardedRun:
    """Train with ``worker_args`` on ``world_size`` local workers; rank 0 writes ``out_dir``."""
    token = new_token()
    coordinator, url = start_coordinator(token=token, echo=echo)
    run, workers = ShardedRun(), []
    try:
        run.checks = coordinator_checks(url, token)
        env = {**local_worker_env(world_size), **token_env(token)}
        args = [*worker_args, "--output", str(out_dir), "--max-recoveries", "0"]
        for i in range(world_size):
            argv = worker_argv(url, worker_id=f"w{i}", min_workers=world_size, extra=args)
            workers.append(spawn(f"w{i}", argv, env=env, echo=echo)[0])
        supervise(workers, timeout=timeout)
        result = json.loads((out_dir / "result.json").read_text())
        run.losses = [float(x) for x in result["losses"]]
        run.weights = load_file(str(out_dir / "weights.safetensors"))
        run.checks += _links(url, token, world_size)
    except TimeoutError as err:
        run.error = f"the sharded run did not finish: {err}"
    except OSError as err:  # after TimeoutError, which is one
        run.error = f"rank 0 left no result in {out_dir}: {err}"
    except RuntimeError as err:
        name = str(err).split(" ", 1)[0]
        failed = next((w for w in workers if w.name == name), None)
        cause = last_exception(failed.lines) if failed is not None else None
        run.error = f"{name} failed: {cause}" if cause else str(err).splitlines()[0]
    finally:
        stop_all(workers)
        kill_all([coordinator])
    return run
