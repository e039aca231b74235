"""``zerop2p doctor``: a few steps of the user's model and data on N local workers and in one
process, compared (parity.py), the sharding units audited (units.py), the usual cluster
breakers checked (checks.py); a report and a verdict, exit code 0 only when all hold."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import tempfile
from pathlib import Path

import torch
import typer

from worker.cli.doctor.checks import coordinator_checks, port_check, remote_peer_checks
from worker.cli.doctor.parity import compare, tolerance_for
from worker.cli.doctor.report import Findings, render
from worker.cli.doctor.units import audit_units
from worker.cli.options import build_train_config, default_rows, raw_options
from worker.logs import setup as setup_logging

log = logging.getLogger(__name__)

# Options a doctor run cannot honour: it trains from scratch for --steps, in one island.
REFUSED = {"epochs": "--epochs (the doctor runs --steps)",
           "checkpoint_dir": "--checkpoint-dir (the doctor trains from scratch and keeps nothing)",
           "buddy": "--buddy (needs --checkpoint-dir)"}


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _say(message: str) -> None:
    typer.echo(f"doctor: {message}", err=True)


def _config(args: list[str], world_size: int):
    """The training config every worker and the one process will use; refused before start."""
    raw = raw_options(args)
    for key, why in REFUSED.items():
        if raw.get(key) not in (None, False):
            raise ValueError(f"not a doctor option: {why}")
    if raw.get("islands", {}).get("sites"):
        raise ValueError("not a doctor option: --sites (the one-process run has no outer steps)")
    if "micro_batch_rows" not in raw:
        args += ["--micro-batch-rows", str(default_rows(world_size))]
    config = build_train_config(args)
    config.check_world_size(world_size)
    return config, args


def _one_process(config):
    """Audit the units on the first global micro-batch, then train in one process; returns
    (audit, result or None, training's error or None). Building data or model may raise."""
    from worker.main import build_data, build_trainable_model  # lazy: transformers
    from worker.train.single import train_single_process  # lazy: torch, transformers
    from worker.train.trainer import rank_micro_batch  # lazy: the trainer's imports

    data = build_data(config)
    model = build_trainable_model(config, data).to(torch.device(config.device))
    batch = rank_micro_batch(data, config, step=0, micro=0, rank=0, world_size=1,
                             device=torch.device(config.device))
    audit = audit_units(model, batch, pattern=config.unit_pattern,
                        persist_threshold=config.traffic.persist_threshold,
                        frozen_replicated=config.traffic.frozen == "replicate")
    try:
        return audit, train_single_process(config, model, data), None
    except Exception as err:  # noqa: BLE001 - the user's model failing is a finding
        return audit, None, f"{type(err).__name__}: {err}"


def _title(config, world_size: int, steps: int) -> str:
    lora = f" + LoRA rank {config.lora.rank}" if config.lora is not None else ""
    return (f"zerop2p doctor: {config.model.name}{lora} ({config.model.task}), {world_size} "
            f"workers, backend {config.backend}, codec {config.codec}, precision "
            f"{config.mixed_precision}, {steps} steps of {config.grad_accum} x "
            f"{config.micro_batch_rows} rows")


def doctor(
    ctx: typer.Context,
    world_size: int = typer.Option(2, help="local workers of the sharded run"),
    steps: int = typer.Option(3, help="optimizer steps of each run"),
    json_out: bool = typer.Option(False, "--json", help="print the verdict as JSON, last line"),
    run_timeout: float = typer.Option(600.0, help="seconds before the sharded run is stopped"),
    coordinator: str = typer.Option(None, help="also check this running coordinator: token, "
                                    "clock, a Ping to each alive worker"),
    token: str = typer.Option(None, envvar="ZEROP2P_TOKEN", help="--coordinator's token"),
    token_file: str = typer.Option(None, help="file whose first line is the token"),
    ca: str = typer.Option(None, envvar="ZEROP2P_CA", help="an https --coordinator's CA"),
    host: str = typer.Option("127.0.0.1", help="peer port check: the address to bind"),
    port: int = typer.Option(0, help="peer port check: the port to bind (0: a free one)"),
    verbose: bool = typer.Option(False, help="show the workers' and coordinator's output"),
    log_level: str = typer.Option("warning", help="debug, info, warning"),
) -> None:
    """Check that N workers compute what one process computes on your model and data, and
    what usually breaks a cluster (training options below, as for ``zerop2p train``).

    Exit code 0 only when parity holds and no check failed; 1 otherwise, 2 for bad options."""
    setup_logging(log_level)
    if world_size < 1 or steps < 1:
        _fail(f"--world-size ({world_size}) and --steps ({steps}) must be >= 1")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as err:
            _fail(f"--token-file {token_file}: {err}")
    try:
        config, args = _config([*ctx.args, "--steps", str(steps)], world_size)
    except (ValueError, TypeError, OSError) as err:
        _fail(str(err))
    checks = [port_check(host, port, token or "doctor-port-check")]
    if coordinator:
        remote = coordinator_checks(coordinator.rstrip("/"), token, ca=ca)
        remote += remote_peer_checks(coordinator.rstrip("/"), token, ca=ca)
        checks += [dataclasses.replace(c, name=f"remote {c.name}") for c in remote]
    _say(f"one process: {steps} steps on whole global micro-batches")
    try:
        audit, single, single_error = _one_process(config)
    except (ValueError, OSError, RuntimeError) as err:  # data or model that cannot be built
        _fail(f"{type(err).__name__}: {err}")
    gc.collect()
    sharded = not_started = None
    if audit.error:
        not_started = "the engine refuses the units"
    else:
        _say(f"sharded: {steps} steps on {world_size} local workers")
        with tempfile.TemporaryDirectory(prefix="zerop2p-doctor-") as out:
            sharded = _sharded(world_size, args, Path(out), run_timeout, verbose)
    parity = compare(
        steps=steps, sharded_losses=sharded and sharded.losses,
        sharded_weights=sharded and sharded.weights, single_losses=single and single.losses,
        single_weights=single and single.weights, initial=single and single.initial,
        tolerance=tolerance_for(config))
    findings = Findings(title=_title(config, world_size, steps), world_size=world_size,
                        steps=steps, parity=parity, units=audit,
                        checks=[*(sharded.checks if sharded else []), *checks],
                        sharded_error=sharded and sharded.error, single_error=single_error,
                        not_started=not_started)
    typer.echo(render(findings))
    if json_out:
        typer.echo(json.dumps(findings.to_json()))
    raise typer.Exit(0 if findings.passed else 1)


def _sharded(world_size: int, args: list[str], out: Path, timeout: float, echo: bool):
    """The sharded run (cluster.py), imported when it runs."""
    from worker.cli.doctor.cluster import run_sharded  # lazy: safetensors, torch

    return run_sharded(world_size, args, out_dir=out, timeout=timeout, echo=echo)

