"""Training options on the command line: one table (flags.py) maps each flag to a TrainConfig
field; this module parses flags and TOML into one validated TrainConfig.

``zerop2p worker`` and ``zerop2p train`` share it (``train`` forwards the flags to every worker),
and a TOML file (``--config``) gives the same options, with flags taking precedence. argparse,
not typer, parses this table: typer wants one Python parameter per flag, which would spell the
~35 options out twice; the table keeps one definition.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch

from worker.cli.flags import OPTIONS, default_of, parse_bool, shown
from worker.train.config import ConfigError, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parser() -> argparse.ArgumentParser:
    """An argparse parser of the training options; unset flags are absent from the result."""
    ap = argparse.ArgumentParser(prog="zerop2p worker", add_help=False,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", type=str, help="TOML file of these options")
    for o in OPTIONS:
        if o.type is parse_bool:  # "--resume" alone means true; "--resume false" turns it off
            ap.add_argument(o.flag, type=parse_bool, nargs="?", const=True, help=o.help,
                            metavar=o.metavar)
            continue
        ap.add_argument(o.flag, type=o.type, help=o.help, metavar=o.metavar)
    return ap


def help_text() -> str:
    """The options as a listing of flag, type, help and default, for ``--help`` epilogs."""
    width = max(len(f"{o.flag} {o.metavar}") for o in OPTIONS) + 2
    lines = textwrap.wrap("Training options, also from --config FILE.toml (top-level keys and "
                          "[model] [data] [optim] [lora] [traffic] [islands] tables, keys as in "
                          "the brackets below; flags win):", 100)
    for o in OPTIONS:
        text = f"{o.help} (default: {shown(default_of(o.target))}) [{o.target}]"
        lines += textwrap.wrap(text, 100, initial_indent=f"  {o.flag + ' ' + o.metavar:<{width}}",
                               subsequent_indent=" " * (width + 2))
    return "\n".join(lines)


def overrides_from_args(args: list[str]) -> tuple[str | None, dict]:
    """Parse flags into (config path, nested dict of overrides); unknown flags are errors."""
    ns, unknown = parser().parse_known_args(args)
    if unknown:
        raise ValueError(f"unknown training option(s): {' '.join(unknown)}\n\n{help_text()}")
    values = vars(ns)
    path = values.pop("config", None)
    nested: dict = {}
    by_dest = {o.flag[2:].replace("-", "_"): o for o in OPTIONS}
    for dest, value in values.items():
        *section, name = by_dest[dest].target.split(".")
        (nested.setdefault(section[0], {}) if section else nested)[name] = value
    return path, nested


def load_toml(path: str | Path) -> dict:
    """Read a TOML file of options: top-level keys for training, tables [model] [data] [optim] [lora]."""
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def raw_options(args: list[str]) -> dict:
    """The TOML file (if any) overlaid by the flags: the nested dict before validation."""
    path, flags = overrides_from_args(args)
    base = load_toml(path) if path else {}
    for key, value in flags.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def check_device_here(device: str) -> None:
    """Refuse a device this machine does not have (the config only checks the spelling)."""
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s)"
                              + (f" (cuda:0..cuda:{count - 1})" if count else ""), key="device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps': not available on this machine", key="device")


def _named(err: ConfigError) -> ConfigError:
    """The error with the flag of its key in front (``--lr (optim.lr): ...``)."""
    flags = [o.flag for o in OPTIONS if o.target == err.key]
    return ConfigError(f"{flags[0]}: {err}", key=err.key) if flags else err


def build_train_config(args: list[str], *, check_device: bool = True) -> TrainConfig:
    """TOML file (if any) overlaid by flags, validated into a TrainConfig; a refusal is a
    ConfigError naming the flag and key (``--steps: steps: expected int, got str '10'``).
    ``check_device`` also refuses a device this machine lacks."""
    raw = raw_options(args)
    if raw.get("epochs") is not None and "steps" in raw:
        raise ConfigError(f"--steps ({raw['steps']}) and --epochs ({raw['epochs']}) both given: "
                          "the steps follow from the epochs; give one", key="epochs")
    try:
        config = TrainConfig.from_dict(raw)
        if check_device:
            check_device_here(config.device)
    except ConfigError as err:
        raise _named(err) from None
    return config


def default_rows(world_size: int) -> int:
    """Rows per global micro-batch when none is given for ``world_size`` local workers: the
    default (8) rounded up to a multiple of it, so 1, 2, 4 and 8 workers keep 8."""
    rows = default_of("micro_batch_rows")
    return -(-rows // world_size) * world_size


def resolve_epochs(config: TrainConfig) -> TrainConfig:
    """``config`` with the steps of its ``epochs`` over the training rows of its data (built
    here, as every worker builds it: the token store is cached); unchanged without epochs."""
    if config.epochs is None:
        return config
    from worker.main import build_data  # lazy: tokenizer, token store

    try:
        return config.with_epochs(build_data(config).num_train_rows)
    except ConfigError as err:
        raise _named(err) from None
