"""The ``zerop2p`` command: coordinator, worker, local cluster, checkpoints and export."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from worker.cli.doctor.command import doctor
from worker.cli.options import (
    build_train_config,
    default_rows,
    help_text,
    raw_options,
    resolve_epochs,
)
from worker.cluster.launcher import run_local_cluster
from worker.logs import setup as setup_logging

log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Peer-to-peer ZeRO-3 training over gRPC with a FastAPI coordinator.")
checkpoints_app = typer.Typer(no_args_is_help=True, help="Inspect sharded checkpoints.")
app.add_typer(checkpoints_app, name="checkpoints")

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command(context_settings={**PASS_THROUGH, "help_option_names": []},
             add_help_option=False)
def coordinator(ctx: typer.Context) -> None:
    """Run the coordinator: registration, heartbeats, the training barrier, telemetry.

    Its options are ``python -m coordinator``'s (see ``zerop2p coordinator --help``): one
    definition, with defaults from the coordinator's Settings."""
    from coordinator.__main__ import main  # lazy: fastapi, uvicorn

    main(ctx.args, prog="zerop2p coordinator")


def _token(ctx: typer.Context, token: str | None, token_file: str | None) -> str | None:
    """The token from --token-file, or --token/$ZEROP2P_TOKEN (warning when it is on argv)."""
    source = ctx.get_parameter_source("token")  # typer's click enum: compared by name
    on_argv = token is not None and getattr(source, "name", "") == "COMMANDLINE"
    if token_file:
        if on_argv:
            _fail("give the token by --token or --token-file, not both")
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            _fail(f"--token-file {token_file}: {err.strerror or err}")
        if not lines or not lines[0].strip():
            _fail(f"--token-file {token_file}: the file is empty")
        return lines[0].strip()
    if on_argv:
        log.warning("--token on the command line is visible to every local user (ps); use "
                    "$ZEROP2P_TOKEN or --token-file")
    return token


@app.command(context_settings=PASS_THROUGH, epilog="\b\n" + help_text())
def worker(
    ctx: typer.Context,
    coordinator: str = typer.Option(..., envvar="ZEROP2P_COORDINATOR",
                                    help="coordinator URL, e.g. http://10.0.0.1:8000"),
    token: str = typer.Option(None, envvar="ZEROP2P_TOKEN", help="cluster token; prefer "
                              "$ZEROP2P_TOKEN or --token-file (argv is visible to local users)"),
    token_file: str = typer.Option(None, help="file whose first line is the cluster token"),
    worker_id: str = typer.Option(None, help="stable id (default: random)"),
    host: str = typer.Option("127.0.0.1", help="address peers use to reach this worker"),
    bind_host: str = typer.Option(None, help="address to bind the peer server (default: --host)"),
    port: int = typer.Option(0, help="peer port (0: a free one)"),
    advertise: str = typer.Option(None, help="HOST:PORT peers should dial instead of --host "
                                  "and the bound port (NAT, port forwarding, a proxy)"),
    outer_port: int = typer.Option(0, help="port of the outer (between-islands) gRPC server, "
                                   "with --sites (0: a free one)"),
    outer_advertise: str = typer.Option(None, help="HOST:PORT other islands should dial for "
                                        "the outer server"),
    min_workers: int = typer.Option(2, help="workers the barrier waits for (in this site)"),
    join_timeout: float = typer.Option(300.0, help="seconds to wait at the barrier"),
    output: str = typer.Option(None, help="rank 0 writes final weights and result.json here"),
    max_recoveries: int = typer.Option(None, help="times to rejoin and resume after a lost "
                                       "peer (default: 3; with --serve, 1000: every re-form "
                                       "counts, growing back included)"),
    heartbeat_interval: float = typer.Option(2.0, help="seconds between heartbeats"),
    log_level: str = typer.Option("info", help="debug, info, warning"),
    ca: str = typer.Option(None, envvar="ZEROP2P_CA", help="an https:// coordinator's CA "
                           "certificate (its --tls-dir's ca.pem)"),
    ca_fingerprint: str = typer.Option(None, envvar="ZEROP2P_CA_FINGERPRINT", help="instead "
                                       "of --ca: fetch the CA from the coordinator, accepted "
                                       "only with this SHA-256 (the coordinator prints it)"),
    identity_dir: str = typer.Option(None, help="where this worker keeps its key, certificate "
                                     "and credential (default: ~/.local/state/zerop2p/...)"),
    serve: bool = typer.Option(False, "--serve", help="serve the training service's sessions "
                               "(zerop2p.ServiceClient) instead of training from --data"),
    serve_dir: str = typer.Option("zerop2p-service", help="with --serve: where sessions keep "
                                  "their saved states, exports and replay bases (shared by "
                                  "the group's workers)"),
    serve_base_every: int = typer.Option(10, help="with --serve: optim steps between replay "
                                         "bases (a lost worker replays at most this many)"),
    serve_idle_exit: float = typer.Option(None, help="with --serve: leave after this many "
                                          "seconds without an operation (default: never)"),
) -> None:
    """Join a coordinator and train with the other workers (training options below).

    A test harness may hand engine observers in as ``ctx.obj["observers"]`` (click's slot for
    objects passed to a command); a user's run has none."""
    from worker.main import WorkerConfig, run_worker  # lazy: torch, transformers

    setup_logging(log_level)
    token = _token(ctx, token, token_file)
    if max_recoveries is None:
        max_recoveries = 1000 if serve else 3
    try:
        train = resolve_epochs(build_train_config(list(ctx.args)))
    except (ValueError, TypeError, OSError) as err:
        _fail(str(err))
    try:
        cfg = WorkerConfig(coordinator=coordinator, token=token, host=host,
                           bind_host=bind_host or host, port=port, advertise=advertise,
                           outer_port=outer_port, outer_advertise=outer_advertise,
                           min_workers=min_workers, join_timeout=join_timeout, output=output,
                           train=train, max_recoveries=max_recoveries,
                           heartbeat_interval=heartbeat_interval, ca=ca,
                           ca_fingerprint=ca_fingerprint, identity_dir=identity_dir,
                           **({"worker_id": worker_id} if worker_id else {}))
    except ValueError as err:
        _fail(str(err))
    observers = (ctx.obj or {}).get("observers", ()) if isinstance(ctx.obj, dict) else ()
    from worker.membership.identity import IdentityError  # lazy: cryptography

    try:
        if serve:
            from worker.serve.loop import ServeConfig  # lazy: torch
            from worker.serve.run import serve_worker  # lazy: torch

            if serve_base_every < 1:
                _fail(f"--serve-base-every must be >= 1, got {serve_base_every}")
            code = serve_worker(cfg, ServeConfig(root=serve_dir, base_every=serve_base_every,
                                                 idle_exit=serve_idle_exit), observers=observers)
        else:
            code = run_worker(cfg, observers=observers)
    except IdentityError as err:
        _fail(str(err))
    raise typer.Exit(code)


@app.command(context_settings=PASS_THROUGH, epilog="\b\n" + help_text())
def train(
    ctx: typer.Context,
    world_size: int = typer.Option(2, help="worker processes to start on this machine"),
    max_restarts: int = typer.Option(3, help="times a crashed worker is restarted"),
    run_timeout: float = typer.Option(3600.0, help="seconds before the whole run is stopped "
                                      "(--timeout is forwarded: each collective's deadline)"),
    output: str = typer.Option(None, help="final weights and result.json are written here"),
) -> None:
    """Start a local coordinator and N workers and train (every worker option is forwarded).

    Without --micro-batch-rows the workers get the default rounded up to a multiple of
    --world-size (9 rows for 3 workers), so the defaults work for any world size."""

    if world_size < 1:
        _fail(f"--world-size must be >= 1, got {world_size}")
    args = list(ctx.args)
    try:  # fail here, once, before any process starts (not in every worker after it joined)
        if "micro_batch_rows" not in raw_options(args):
            args += ["--micro-batch-rows", str(default_rows(world_size))]
        config = build_train_config(args)
        config.check_world_size(world_size)
        config = resolve_epochs(config)  # a dataset too small for one step is refused here
    except (ValueError, TypeError, OSError) as err:
        _fail(str(err))
    try:
        args += ["--output", output] if output else []
        run_local_cluster(world_size, args, timeout=run_timeout, max_restarts=max_restarts,
                          progress_steps=config.steps)
    except (RuntimeError, TimeoutError) as err:
        _fail(str(err))


# ``zerop2p doctor``: sharded vs one process on the user's model, and the cluster checks
app.command("doctor", context_settings=PASS_THROUGH, epilog="\b\n" + help_text())(doctor)


@app.command()
def export(checkpoint: str = typer.Argument(..., help="a step_<n> directory (or its root)"),
           out: str = typer.Argument(..., help="output directory for from_pretrained"),
           best: bool = typer.Option(False, "--best", help="from a root: the checkpoint with "
                                     "the lowest eval loss instead of the latest")) -> None:
    """Write a Hugging Face model directory (or a peft adapter for LoRA runs)."""
    from worker.state.catalog import (  # lazy: torch
        CheckpointError,
        best_checkpoint,
        latest_checkpoint,
    )
    from worker.state.export import export_checkpoint  # lazy: torch

    try:
        if best:
            path = best_checkpoint(checkpoint)
            if path is None:
                _fail(f"--best: no checkpoint under {checkpoint} recorded an eval loss (train "
                      "with --eval-every)")
        else:
            path = latest_checkpoint(checkpoint) or checkpoint
        typer.echo(f"exported {path} to {export_checkpoint(path, out)}")
    except (CheckpointError, ValueError, OSError) as err:
        _fail(str(err))


@checkpoints_app.command("list")
def checkpoints_list(root: str = typer.Argument(..., help="checkpoint directory")) -> None:
    """Step, world size, losses and size on disk of every complete checkpoint."""
    from worker.state.catalog import format_checkpoints, list_checkpoints  # lazy: torch

    typer.echo(format_checkpoints(list_checkpoints(root)))
