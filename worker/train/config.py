"""The whole training configuration: one dataclass per concern, built from a nested dict
(flags and TOML, worker/cli/options.py) with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from communication.codec import CODECS
from worker.data.config import DataConfig
from worker.islands.config import IslandConfig
from worker.models.config import ModelConfig
from worker.models.dtypes import PRECISIONS
from worker.models.lora import LoraSettings
from worker.train.optim import OptimConfig
from worker.train.traffic import TrafficConfig

BACKENDS = ("grpc", "torch")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """What to train and how; validated with the numbers in the message."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    islands: IslandConfig = field(default_factory=IslandConfig)
    steps: int = 30
    grad_accum: int = 1
    micro_batch_rows: int = 8  # rows per GLOBAL micro-batch; each rank takes rows / world_size
    mixed_precision: str = "no"
    device: str = "cpu"
    backend: str = "grpc"
    codec: str = "raw"
    eval_every: int = 0
    eval_batches: int = 2
    log_every: int = 1
    unit_pattern: str | None = None
    timeout: float = 120.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: bool = True  # load the latest complete checkpoint in checkpoint_dir, if any
    buddy: bool = False  # replicate owned state on rank r+1 after every step (state/buddy.py)
    prefetch: bool = True  # gather the next unit while this one computes (two units alive)
    # keep only each unit's inputs in forward and replay it in backward (engine/recompute.py)
    activation_checkpointing: bool = False
    log_dir: str | None = None  # rank 0 writes steps.jsonl and TensorBoard events here

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {self.micro_batch_rows}")
        if not self.timeout > 0:
            raise ValueError(f"timeout (each collective's deadline, seconds) must be > 0, got "
                             f"{self.timeout}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of "
                             f"{tuple(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {sorted(CODECS)}")
        lossy = [c for c in self.traffic.codecs(self.codec) if c != "raw"]
        if lossy and self.backend != "grpc":
            raise ValueError(f"codec {lossy[0]!r} needs backend 'grpc' (torch.distributed sends "
                             f"raw tensors), got backend {self.backend!r}")
        if self.islands.enabled:
            if self.backend != "grpc":
                raise ValueError(f"islands ({len(self.islands.sites)} sites) need backend 'grpc' "
                                 f"for the outer exchange, got {self.backend!r}")
            if self.steps % self.islands.outer_every:
                raise ValueError(f"steps ({self.steps}) must be a multiple of outer_every "
                                 f"({self.islands.outer_every}): the run ends on an outer round, "
                                 "so every island ends with the same global weights")
        if self.buddy and not (self.checkpoint_dir and self.resume):
            raise ValueError(f"buddy needs checkpoint_dir (got {self.checkpoint_dir!r}) and resume "
                             f"(got {self.resume}): a rescue is published and resumed there")

    @property
    def checkpoint_root(self) -> str | None:
        """Where this worker's checkpoints go: ``checkpoint_dir``, or its ``site-<name>``
        subdirectory when there are several islands (each island saves its own shards)."""
        if self.checkpoint_dir is None or not self.islands.enabled:
            return self.checkpoint_dir
        return f"{self.checkpoint_dir.rstrip('/')}/site-{self.islands.site}"

    def check_world_size(self, world_size: int) -> None:
        """Every rank must get the same number of rows of every global micro-batch."""
        if self.micro_batch_rows % world_size:
            raise ValueError(
                f"micro_batch_rows ({self.micro_batch_rows}) is not divisible by the world size "
                f"({world_size}): every rank must read the same number of rows; set "
                f"--micro-batch-rows to a multiple of {world_size}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                    "lora": LoraSettings, "traffic": TrafficConfig, "islands": IslandConfig}
        for name, kind in sections.items():
            if isinstance(data.get(name), dict):
                data[name] = _build(kind, data[name], name)
        return _build(cls, data, "train")


def _build(kind, values: dict, section: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) in [{section}]: {unknown}; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**values)
