"""The whole training configuration: one dataclass per concern, built from a nested dict
(flags and TOML, worker/cli/options.py) by ``TrainConfig.from_dict``, the one door user input
comes through: unknown keys are refused by name, every value's type is checked strictly by
pydantic against the field's annotation (``steps = "10"`` is refused naming ``steps`` and
``int``), then each dataclass checks its values (the allowed ones named in the message).

Dataclasses, not pydantic models: the rest of the code reads ``config.optim.lr`` and builds
sections directly in tests; pydantic validates the fields (a cached ``TypeAdapter`` per
annotation), the dataclasses stay what every module already imports."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field

from pydantic import TypeAdapter, ValidationError

from communication.codec import CODECS
from worker.data.config import DataConfig
from worker.islands.config import IslandConfig
from worker.models.config import ModelConfig
from worker.models.dtypes import PRECISIONS
from worker.models.lora import LoraSettings
from worker.train.optim import OptimConfig
from worker.train.traffic import TrafficConfig

BACKENDS = ("grpc", "torch")
DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")
DEVICES = ("cpu", "cuda", "cuda:N", "mps")


class ConfigError(ValueError):
    """A refused option; ``key`` is its dotted name in TrainConfig (``optim.lr``) when known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


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
    epochs: int | None = None  # passes over the training rows instead of steps (with_epochs)
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
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.epochs is not None and self.islands.enabled and self.islands.private_data:
            raise ValueError(f"epochs ({self.epochs}) with private_data: each site's corpus has "
                             "its own size, so the islands would disagree on the steps; give steps")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}")
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

    @property
    def rows_per_step(self) -> int:
        """Training rows one optimizer step reads from the corpus: grad_accum x
        micro_batch_rows, times the islands that share the corpus (trainer.data_share)."""
        islands = self.islands
        share = islands.count if islands.enabled and not islands.private_data else 1
        return self.grad_accum * self.micro_batch_rows * share

    def with_epochs(self, num_train_rows: int) -> TrainConfig:
        """This config with ``steps`` for ``epochs`` passes over ``num_train_rows`` rows: the
        fewest steps that read every row ``epochs`` times (the last step may run into the next
        epoch, batches straddle epochs: batching.py), rounded up to a multiple of outer_every
        with islands. Unchanged without ``epochs``."""
        if self.epochs is None:
            return self
        rows = self.rows_per_step
        if num_train_rows < rows:
            islands = rows // (self.grad_accum * self.micro_batch_rows)
            raise ConfigError(
                f"epochs ({self.epochs}): one step reads {rows} rows (grad_accum "
                f"{self.grad_accum} x micro_batch_rows {self.micro_batch_rows}"
                + (f" x {islands} islands" if islands > 1 else "")
                + f") but the training split has only {num_train_rows} rows of seq_len "
                f"{self.data.seq_len}: lower micro_batch_rows or grad_accum, or give more data",
                key="epochs")
        steps = math.ceil(self.epochs * num_train_rows / rows)
        every = self.islands.outer_every if self.islands.enabled else 1
        return dataclasses.replace(self, steps=math.ceil(steps / every) * every)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Validated from a nested dict (TOML tables are sections); ConfigError names the key."""
        return _build(cls, data, "")


@functools.cache
def _hints(kind) -> dict[str, typing.Any]:
    return typing.get_type_hints(kind)


@functools.cache
def _adapter(hint) -> TypeAdapter:
    return TypeAdapter(hint)


def _section_kind(hint):
    """The dataclass a field holds (``LoraSettings | None`` -> LoraSettings), or None."""
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint)


def _build(kind, values, section: str):
    """``kind(**values)`` after refusing unknown keys and checking each value's type (strict:
    no "10" for an int, no 1 for a bool); sub-tables become their section's dataclass."""
    where = f"[{section}] " if section else ""
    names = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) in [{section or 'train'}]: {unknown}; known: "
                          f"{sorted(names)}", key=f"{section}.{unknown[0]}".lstrip("."))
    typed = {}
    for key, value in values.items():
        path, hint = f"{section}.{key}".lstrip("."), _hints(kind)[key]
        sub = _section_kind(hint)
        if sub is not None and isinstance(value, dict):
            typed[key] = _build(sub, value, path)
            continue
        if sub is not None and not isinstance(value, (sub, type(None))):
            raise ConfigError(f"{path}: expected a table of options ([{path}]), got "
                              f"{type(value).__name__} {value!r}", key=path)
        value = tuple(value) if isinstance(value, list) else value  # TOML arrays
        try:
            typed[key] = _adapter(hint).validate_python(value, strict=True)
        except ValidationError:
            raise ConfigError(f"{path}: expected {_type_name(hint)}, got "
                              f"{type(value).__name__} {value!r}", key=path) from None
    try:
        return kind(**typed)
    except ValueError as err:  # the dataclass's own check; its message starts with the field
        first = re.match(r"\w+", str(err))
        named = first.group(0) if first and first.group(0) in names else None
        key = f"{section}.{named}".lstrip(".") if named else (section or None)
        raise ConfigError(f"{where}{err}", key=key) from None
