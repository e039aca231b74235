"""The worker's wiring: transport, membership, data, model, sharding, training, final report.

Each part lives in its own sub-package; this module only builds them in order and runs the
generations (rejoining after a lost peer). Observers passed to ``run_worker`` see every
activity of the engine, trainer and checkpoints (worker/engine/progress.py).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from communication.collectives import CollectiveError, Collectives
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from communication.torch_collectives import TorchCollectives
from worker.cluster.ports import free_port, parse_address
from worker.engine.progress import NO_OBSERVERS, Observer, Observers
from worker.islands.wiring import build_outer, island_max, start_outer_transport
from worker.logs import set_rank
from worker.membership.client import Generation
from worker.membership.facade import Membership
from worker.membership.identity import open_identity
from worker.state.rescue import publish_rescue, write_rescue
from worker.train.assembly import (  # re-exported: tests and tools build through main
    build_data,
    build_model_for,
    build_trainable_model,
    shard_for_training,
)
from worker.train.config import TrainConfig
from worker.train.output import write_output
from worker.train.reporting import ProgressReporter, peer_links
from worker.train.step_log import StepLog
from worker.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["WorkerConfig", "build_collectives", "build_data", "build_model_for",
           "build_trainable_model", "recovering_phase", "run_worker", "shard_for_training",
           "train_generation"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """How this worker joins the cluster, plus what the cluster trains."""

    coordinator: str
    token: str | None = None
    worker_id: str = field(default_factory=lambda: f"worker-{uuid.uuid4().hex[:8]}")
    host: str = "127.0.0.1"  # the address peers use to reach this worker
    bind_host: str = "127.0.0.1"
    port: int = 0
    # HOST:PORT peers should dial instead of host and the bound port (NAT, port forwarding,
    # a proxy in front of the peer server)
    advertise: str | None = None
    outer_port: int = 0  # islands: the outer gRPC server's port (0: a free one)
    outer_advertise: str | None = None  # HOST:PORT other islands dial for it
    min_workers: int = 2
    join_timeout: float = 120.0
    heartbeat_interval: float = 2.0
    output: str | None = None  # rank 0 writes final weights and a result JSON here
    max_recoveries: int = 3  # generations this worker may rejoin after losing a peer
    # an https:// coordinator: its CA (a file, or the SHA-256 to pin when fetching it), and
    # where key, certificate and credential are kept (membership/identity.py)
    ca: str | None = None
    ca_fingerprint: str | None = None
    identity_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for address in (self.advertise, self.outer_advertise):
            if address is not None:
                parse_address(address)
        if self.outer_advertise is not None:
            outer_host = parse_address(self.outer_advertise)[0]
            own = parse_address(self.advertise)[0] if self.advertise else self.host
            if outer_host != own:
                raise ValueError(f"outer advertise host {outer_host!r} differs from the host "
                                 f"peers dial, {own!r}: the coordinator keeps one address")


def build_collectives(cfg: WorkerConfig, generation: Generation,
                      transport: GrpcTransport | None) -> Collectives:
    """The transport for this generation: our gRPC collectives or torch.distributed."""
    peers = [f"{p.ip_address}:{p.port}" for p in generation.peers]
    if cfg.train.backend == "grpc":
        param_codec, grad_codec = cfg.train.traffic.codecs(cfg.train.codec)
        return GrpcCollectives.bind(transport, rank=generation.rank,
                                    world_size=generation.world_size, peers=peers,
                                    generation=generation.generation, timeout=cfg.train.timeout,
                                    param_codec=param_codec, grad_codec=grad_codec,
                                    members=[p.worker_id for p in generation.peers])
    backend = "nccl" if cfg.train.device.startswith("cuda") else "gloo"
    return TorchCollectives(rank=generation.rank, world_size=generation.world_size,
                            store_addr=peers[0], backend=backend, timeout=cfg.train.timeout,
                            device=torch.device(cfg.train.device))


def train_generation(cfg: WorkerConfig, gen: Generation, transport: GrpcTransport | None,
                     membership: Membership, data, observers: Observers = NO_OBSERVERS,
                     between: GrpcTransport | None = None) -> int:
    """Train in one generation: fresh collectives, model and shards, resume from the newest
    checkpoint (resharded to this world size), run to the end. Raises CollectiveError when a
    peer is lost; the caller rejoins."""
    cfg.train.check_world_size(gen.world_size)
    collectives = build_collectives(cfg, gen, transport)
    # "who is stuck": the trainer reports its position, and what it waits for while blocked
    reporter = ProgressReporter(membership.report_progress, rank=gen.rank,
                                generation=gen.generation,
                                waiting=getattr(collectives, "waiting", None))
    observers, unwatch = observers.adding(reporter), reporter.install()
    reporter.report()
    trainer = step_log = None
    try:
        if cfg.train.buddy:  # survivors of a lost generation left their buddy copies: publish
            publish_rescue(cfg.train.checkpoint_root, collectives, generation=gen.generation,
                           rank=gen.rank, timeout=cfg.train.timeout)
        model = build_trainable_model(cfg.train, data, on_meta=True)
        engine = shard_for_training(cfg.train, model, collectives, gen.generation, observers)

        if cfg.train.log_dir and gen.rank == 0:
            step_log = StepLog(cfg.train.log_dir, generation=gen.generation)

        def on_step(done) -> None:
            # Telemetry also moves the coordinator's step/loss/throughput columns; heartbeats
            # carry only the phase (they used to repeat these three every step).
            membership.report(**done.to_dict(), rank=gen.rank, generation=gen.generation,
                              links=peer_links(collectives))
            if step_log is not None:
                step_log.write(done, getattr(collectives, "bytes_sent", None))

        membership.update_status(phase="train")

        outer = build_outer(cfg.train.islands, engine, between, membership,
                            generation=gen.generation, rank=gen.rank, world_size=gen.world_size,
                            timeout=cfg.train.timeout, lora=cfg.train.lora)
        trainer = Trainer(cfg.train, engine=engine, data=data, rank=gen.rank,
                          world_size=gen.world_size, on_step=on_step, outer=outer)
        trainer.on_eval = lambda step, loss: membership.report(  # the dashboard's eval curve
            step=step, eval_loss=loss, rank=gen.rank, generation=gen.generation)
        if trainer.resume():
            log.info("rank %d resumed at step %d", gen.rank, trainer.step)
        if outer is not None:
            outer.rejoin_if_behind(lambda value: island_max(engine, value))
        trainer.run(progress=gen.rank == 0 and os.isatty(2))
        if cfg.output:
            write_output(cfg.output, engine, trainer, gen)
        if trainer.history:
            log.info("rank %d done: loss %.4f -> %.4f", gen.rank, trainer.history[0].loss,
                     trainer.history[-1].loss)
        return 0
    except (CollectiveError, TimeoutError):
        if trainer is not None and trainer.buddy is not None:
            write_rescue(trainer.buddy, cfg.train.checkpoint_root)
        raise
    finally:
        unwatch()
        collectives.close()
        if step_log is not None:
            step_log.close()


# What a worker does in one generation (train_generation's signature, less the data): the
# trainer by default, the service's operation loop for ``zerop2p worker --serve``.
GenerationRunner = Callable[[WorkerConfig, Generation, "GrpcTransport | None", Membership,
                             Observers, "GrpcTransport | None"], int]


def training_runner(cfg: WorkerConfig) -> GenerationRunner:
    """train_generation over ``cfg``'s data, built once for every generation."""
    data = build_data(cfg.train)

    def run(cfg, gen, transport, membership, observers, between) -> int:
        return train_generation(cfg, gen, transport, membership, data, observers, between)
    return run


def recovering_phase(generation: int) -> str:
    """The heartbeat phase of a worker that gave up ``generation`` and waits for a newer one.
    Peers idle in the service's loop read it (worker/serve/channel.py): they would otherwise
    never ask for a newer generation, and the coordinator ends one only when every live
    member has."""
    return f"recovering from generation {generation}"


def run_worker(cfg: WorkerConfig, *, observers: Sequence[Observer] = (),
               runner: Callable[[WorkerConfig], GenerationRunner] = training_runner) -> int:
    """Join, train, report, leave; after a lost peer, rejoin and resume. Returns the exit code.

    ``observers`` see every activity of the engine, trainer and checkpoints as it begins;
    ``runner`` makes what runs in each generation (the trainer, or the service's loop)."""
    bus = Observers(observers)
    identity = open_identity(cfg.coordinator, cfg.worker_id, ca=cfg.ca,
                             ca_fingerprint=cfg.ca_fingerprint, directory=cfg.identity_dir)
    transport = None
    if cfg.train.backend == "grpc":
        transport = GrpcTransport(host=cfg.bind_host, port=cfg.port, token=cfg.token,
                                  tls=identity and identity.peer_tls())
        port = transport.port
    else:
        port = cfg.port or free_port(cfg.bind_host)
    host = cfg.host
    if cfg.advertise is not None:
        host, port = parse_address(cfg.advertise)
        log.info("%s serves on %s:%d and advertises %s:%d", cfg.worker_id, cfg.bind_host,
                 transport.port if transport else cfg.port, host, port)
    outer = start_outer_transport(cfg.train.islands, bind_host=cfg.bind_host, port=cfg.outer_port,
                                  token=cfg.token, tls=identity and identity.peer_tls())
    outer_port = None if outer is None else outer.port
    if cfg.outer_advertise is not None:
        outer_port = parse_address(cfg.outer_advertise)[1]  # the host is the worker's own
    membership = Membership(cfg.coordinator, token=cfg.token, worker_id=cfg.worker_id,
                            ip_address=host, port=port, device=cfg.train.device,
                            heartbeat_interval=cfg.heartbeat_interval,
                            cpu_cores=os.cpu_count() or 1, site=cfg.train.islands.site,
                            outer_port=outer_port, identity=identity)
    try:
        run_generation = runner(cfg)
        gen = membership.join(cfg.min_workers, timeout=cfg.join_timeout)
        for attempt in range(cfg.max_recoveries + 1):
            set_rank(gen.rank)
            log.info("%s in generation %d as rank %d of %d", cfg.worker_id, gen.generation,
                     gen.rank, gen.world_size)
            try:
                code = run_generation(cfg, gen, transport, membership, bus, outer)
                break
            except (CollectiveError, TimeoutError) as err:
                if attempt == cfg.max_recoveries:
                    raise
                log.error("generation %d lost a peer: %s; rejoining", gen.generation, err)
                membership.update_status(phase=recovering_phase(gen.generation))
                gen = membership.rejoin(1, timeout=cfg.join_timeout)
        membership.update_status(phase="done")
        membership.leave()
        return code
    except KeyboardInterrupt:  # Ctrl-C: leave at once, so the others' generation ends cleanly
        log.warning("%s interrupted; leaving", cfg.worker_id)
        try:
            membership.leave()
        except Exception as exc:  # best effort: the heartbeat timeout covers it otherwise
            log.warning("%s: could not leave: %s", cfg.worker_id, exc)
        return 130
    finally:
        membership.close()
        for server in (transport, outer):
            if server is not None:
                server.close()
