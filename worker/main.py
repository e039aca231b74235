"""The worker entry point: transport, membership, model, sharding, training, final report."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from communication.collectives import CollectiveError, Collectives
from worker.config import TrainConfig
from worker.logs import set_rank
from worker.zero3 import ShardConfig, Zero3Engine, shard_model

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """How this worker joins the cluster, plus what the cluster trains."""

    coordinator: str
    token: str | None = None
    worker_id: str = field(default_factory=lambda: f"worker-{uuid.uuid4().hex[:8]}")
    host: str = "127.0.0.1"  # the address peers use to reach this worker
    bind_host: str = "127.0.0.1"
    port: int = 0
    min_workers: int = 2
    join_timeout: float = 120.0
    heartbeat_interval: float = 2.0
    output: str | None = None  # rank 0 writes final weights and a result JSON here
    max_recoveries: int = 3  # generations this worker may rejoin after losing a peer
    train: TrainConfig = field(default_factory=TrainConfig)


def build_collectives(cfg: WorkerConfig, generation, transport) -> Collectives:
    """The transport for this generation: our gRPC collectives or torch.distributed."""
    peers = [f"{p.ip_address}:{p.port}" for p in generation.peers]
    if cfg.train.backend == "grpc":
        return transport.collectives(rank=generation.rank, world_size=generation.world_size,
                                     peers=peers, generation=generation.generation,
                                     timeout=cfg.train.timeout, codec=cfg.train.codec)
    from communication.torch_collectives import TorchCollectives

    backend = "nccl" if cfg.train.device.startswith("cuda") else "gloo"
    return TorchCollectives(rank=generation.rank, world_size=generation.world_size,
                            store_addr=peers[0], backend=backend, timeout=cfg.train.timeout,
                            device=torch.device(cfg.train.device))


def build_data(train: TrainConfig):
    """Tokenizer and dataset (packed text, or classification examples), the same on every rank."""
    from worker.data import PackedText, load_tokenizer

    tokenizer = load_tokenizer(train.model.name if Path(train.model.name).is_dir() else None)
    if train.model.task == "sequence-classification":
        from worker.data import ClassificationData

        return ClassificationData(train.data, tokenizer)
    return PackedText(train.data, tokenizer)


def build_model(train: TrainConfig, data):
    """The (LoRA-wrapped) model for ``data``'s vocabulary, identical on every rank for one seed."""
    from worker.models import apply_lora
    from worker.models import build_model as from_config

    model = from_config(train.model, vocab_size=data.tokenizer.vocab_size)
    return apply_lora(model, train.lora) if train.lora is not None else model


def build_data_and_model(train: TrainConfig):
    """Both, for a single process (the reference run, tests)."""
    data = build_data(train)
    return data, build_model(train, data)


def shard(train: TrainConfig, model, collectives: Collectives, generation: int) -> Zero3Engine:
    """Shard ``model`` into units (found automatically, or by ``unit_pattern``)."""
    from worker.models import find_block_modules

    blocks = find_block_modules(model, pattern=train.unit_pattern)
    device = torch.device(train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return shard_model(model, collectives=collectives,
                       config=ShardConfig(generation=generation, timeout=train.timeout,
                                          compute_dtype=DTYPES[train.mixed_precision],
                                          device=device, prefetch=train.prefetch),
                       block_names=blocks)


def write_output(out_dir: str, engine: Zero3Engine, trainer, generation) -> None:
    """Rank 0 saves the full trained weights (safetensors) and a result JSON; all ranks gather."""
    from safetensors.torch import save_file

    weights = dict(engine.iter_full_weights())
    if generation.rank != 0:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "weights.safetensors"))
    result = {
        "world_size": generation.world_size,
        "generation": generation.generation,
        "losses": [s.loss for s in trainer.history],
        "grad_norms": [s.grad_norm for s in trainer.history],
        "eval": trainer.eval_history,
        "steps": [s.to_dict() for s in trainer.history],
        "collectives_per_step": {
            p.value: n / max(len(trainer.history), 1) for p, n in engine.collective_counts.items()
        },
    }
    (path / "result.json").write_text(json.dumps(result, indent=1))


def free_port(host: str) -> int:
    """A port the OS says is free now (for torch.distributed's store on rank 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def train_generation(cfg: WorkerConfig, gen, transport, membership, data) -> int:
    """Train in one generation: fresh collectives, model and shards, resume from the newest
    checkpoint (resharded to this world size), run to the end. Raises CollectiveError when a
    peer is lost; the caller rejoins."""
    from worker.trainer import Trainer

    cfg.train.check_world_size(gen.world_size)
    collectives = build_collectives(cfg, gen, transport)
    trainer = None
    try:
        if cfg.train.buddy:  # survivors of a lost generation left their buddy copies: publish
            from worker.rescue import publish_rescue

            publish_rescue(cfg.train.checkpoint_dir, collectives, generation=gen.generation,
                           rank=gen.rank, timeout=cfg.train.timeout)
        model = build_model(cfg.train, data)
        engine = shard(cfg.train, model, collectives, gen.generation)

        def on_step(st) -> None:
            # Telemetry also moves the coordinator's step/loss/throughput columns; heartbeats
            # carry only the phase (they used to repeat these three every step).
            membership.report(**st.to_dict(), rank=gen.rank, generation=gen.generation)

        membership.update_status(phase="train")

        trainer = Trainer(cfg.train, engine=engine, data=data, rank=gen.rank,
                          world_size=gen.world_size, on_step=on_step)
        if trainer.resume():
            log.info("rank %d resumed at step %d", gen.rank, trainer.step)
        trainer.run(progress=gen.rank == 0 and os.isatty(2))
        if cfg.output:
            write_output(cfg.output, engine, trainer, gen)
        if trainer.history:
            log.info("rank %d done: loss %.4f -> %.4f", gen.rank, trainer.history[0].loss,
                     trainer.history[-1].loss)
        return 0
    except (CollectiveError, TimeoutError):
        if trainer is not None and trainer.buddy is not None:
            from worker.rescue import write_rescue

            write_rescue(trainer.buddy, cfg.train.checkpoint_dir)
        raise
    finally:
        collectives.close()


def run_worker(cfg: WorkerConfig) -> int:
    """Join, train, report, leave; after a lost peer, rejoin and resume. Returns the exit code."""
    from worker.membership import Membership

    transport = None
    if cfg.train.backend == "grpc":
        from communication.grpc_collectives import GrpcTransport

        transport = GrpcTransport(host=cfg.bind_host, port=cfg.port, token=cfg.token)
        port = transport.port
    else:
        port = cfg.port or free_port(cfg.bind_host)
    membership = Membership(cfg.coordinator, token=cfg.token, worker_id=cfg.worker_id,
                            ip_address=cfg.host, port=port, device=cfg.train.device,
                            heartbeat_interval=cfg.heartbeat_interval,
                            cpu_cores=os.cpu_count() or 1)
    try:
        data = build_data(cfg.train)
        gen = membership.join(cfg.min_workers, timeout=cfg.join_timeout)
        for attempt in range(cfg.max_recoveries + 1):
            set_rank(gen.rank)
            log.info("%s in generation %d as rank %d of %d", cfg.worker_id, gen.generation,
                     gen.rank, gen.world_size)
            try:
                code = train_generation(cfg, gen, transport, membership, data)
                break
            except (CollectiveError, TimeoutError) as err:
                if attempt == cfg.max_recoveries:
                    raise
                log.error("generation %d lost a peer: %s; rejoining", gen.generation, err)
                membership.update_status(phase="recovering")
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
        if transport is not None:
            transport.close()
