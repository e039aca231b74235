"""Training options on the command line: one table maps each flag to a TrainConfig field.

``zerop2p worker`` and ``zerop2p train`` share it (``train`` forwards the flags to every worker),
and a TOML file (``--config``) gives the same options, with flags taking precedence. argparse,
not typer, parses this table: typer wants one Python parameter per flag, which would spell the
~35 options out twice; the table keeps one definition.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from worker.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True, slots=True)
class Opt:
    """One flag: where its value goes in TrainConfig (``section.field`` or ``field``)."""

    flag: str
    target: str
    type: type
    help: str


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _opt_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


OPTIONS: list[Opt] = [
    Opt("--model", "model.name", str, "preset (tiny-gpt2, tiny-llama, tiny-qwen2, tiny-bert) or a "
        "local from_pretrained directory"),
    Opt("--task", "model.task", str, "causal-lm or sequence-classification"),
    Opt("--num-labels", "model.num_labels", int, "classes, for sequence-classification"),
    Opt("--n-layer", "model.n_layer", int, "blocks in a preset model"),
    Opt("--hidden-size", "model.hidden_size", int, "hidden size of a preset model"),
    Opt("--num-heads", "model.num_heads", int, "attention heads of a preset model"),
    Opt("--seed", "model.seed", int, "seed of the model's initial weights"),
    Opt("--data", "data.source", str, "stdlib (the Python standard library's source), a .txt, "
        ".jsonl, .json or .parquet file, a datasets save_to_disk directory, or a directory of "
        "text files"),
    Opt("--text-field", "data.text_field", str, "jsonl field holding the text"),
    Opt("--seq-len", "data.seq_len", int, "tokens per row"),
    Opt("--max-tokens", "data.max_tokens", int, "cap on the tokens read (default: none, every "
        "token)"),
    Opt("--data-cache", "data.cache_dir", str, "directory of tokenised data stores (default: "
        "$ZEROP2P_DATA_CACHE or ~/.cache/zerop2p/data)"),
    Opt("--data-seed", "data.seed", int, "seed of the batch order"),
    Opt("--optimizer", "optim.optimizer", str, "adamw or sgd"),
    Opt("--lr", "optim.lr", float, "peak learning rate"),
    Opt("--adam-eps", "optim.eps", float, "AdamW's epsilon (1e-6 keeps near-zero gradients' "
        "updates proportional to them)"),
    Opt("--weight-decay", "optim.weight_decay", float, "decoupled weight decay"),
    Opt("--momentum", "optim.momentum", float, "SGD momentum"),
    Opt("--schedule", "optim.schedule", str, "constant, linear or cosine"),
    Opt("--warmup-steps", "optim.warmup_steps", int, "linear warm-up steps"),
    Opt("--max-grad-norm", "optim.max_grad_norm", _opt_float, "global gradient-norm clip "
        "(none: off)"),
    Opt("--lora-rank", "lora.rank", int, "train LoRA adapters of this rank (base frozen)"),
    Opt("--lora-alpha", "lora.alpha", float, "LoRA alpha"),
    Opt("--lora-dropout", "lora.dropout", float, "LoRA dropout (nonzero breaks exact parity)"),
    Opt("--lora-targets", "lora.target_modules", str, "comma-separated module names "
        "(default: peft's for the architecture)"),
    Opt("--steps", "steps", int, "optimizer steps"),
    Opt("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    Opt("--micro-batch-rows", "micro_batch_rows", int, "rows per global micro-batch "
        "(divided among the workers)"),
    Opt("--mixed-precision", "mixed_precision", str, "no, bf16 or fp16 (fp32 master shards)"),
    Opt("--device", "device", str, "cpu or cuda:N"),
    Opt("--backend", "backend", str, "grpc (peer-to-peer) or torch (gloo/NCCL)"),
    Opt("--codec", "codec", str, "gRPC wire codec of parameters and gradients: raw, bf16 or "
        "int8 (all-reduces of norms and losses are always exact)"),
    Opt("--param-codec", "traffic.param_codec", str, "wire codec of parameter all-gathers "
        "(default: --codec); every rank computes with the same decoded weights"),
    Opt("--grad-codec", "traffic.grad_codec", str, "wire codec of gradient reduce-scatters "
        "(default: --codec)"),
    Opt("--error-feedback", "traffic.error_feedback", _bool, "with a lossy grad codec, send "
        "what the wire lost with the next gradient (memory: one fp32 copy of the trainable "
        "parameters per rank, on CPU; default true)"),
    Opt("--grad-sync", "traffic.grad_sync", str, "micro-batch (default) or step: with "
        "--grad-accum K, reduce-scatter once per optimizer step instead of K times (memory: "
        "each rank keeps the full fp32 gradient of every unit until the step)"),
    Opt("--frozen", "traffic.frozen", str, "shard (default), replicate (frozen weights, a LoRA "
        "base, live whole on every rank and never travel) or auto (replicate when they take "
        "at most a quarter of free memory)"),
    Opt("--prefetch-depth", "traffic.prefetch_depth", int, "units gathered ahead of the one "
        "that runs (default 1; each holds one more unit's parameters)"),
    Opt("--persist-threshold", "traffic.persist_threshold", int, "parameters with fewer "
        "elements (norms, biases, LoRA adapters) stay whole on every rank; their gradients ride "
        "in the step's one all-reduce (default 0: everything sharded)"),
    Opt("--reshard-after-forward", "traffic.reshard_after_forward", _bool, "false: keep units "
        "gathered from forward to backward (no backward all-gather; every unit is alive at "
        "the end of forward)"),
    Opt("--site", "islands.site", str, "this worker's site: workers of one site form an island "
        "(ZeRO-3 inside; DiLoCo outer steps between islands)"),
    Opt("--sites", "islands.sites", str, "comma-separated names of every island of the run, "
        "in data order (a shared corpus is split among them); needs --outer-every"),
    Opt("--outer-every", "islands.outer_every", int, "inner steps between outer syncs (H)"),
    Opt("--outer-lr", "islands.outer_lr", float, "outer SGD learning rate (default 0.7)"),
    Opt("--outer-momentum", "islands.outer_momentum", float, "outer SGD momentum (default 0.9)"),
    Opt("--outer-nesterov", "islands.outer_nesterov", _bool, "Nesterov outer momentum (default "
        "true)"),
    Opt("--outer-codec", "islands.outer_codec", str, "wire codec of pseudo-gradients between "
        "islands: raw, bf16 or int8 (with error feedback)"),
    Opt("--quorum-timeout", "islands.quorum_timeout", float, "seconds an outer round waits for "
        "missing islands before going on without them"),
    Opt("--private-data", "islands.private_data", _bool, "this site's --data is its own: split "
        "over the island only, and the outer average weighs islands by tokens"),
    Opt("--eval-every", "eval_every", int, "evaluate every K steps (0: only at the end)"),
    Opt("--eval-batches", "eval_batches", int, "held-out batches per evaluation"),
    Opt("--log-every", "log_every", int, "log every K steps"),
    Opt("--unit-pattern", "unit_pattern", str, "regex of module names that form sharding units"),
    Opt("--timeout", "timeout", float, "deadline in seconds for every collective"),
    Opt("--checkpoint-dir", "checkpoint_dir", str, "directory shared by all workers"),
    Opt("--checkpoint-every", "checkpoint_every", int, "checkpoint every K steps (and at the end)"),
    Opt("--keep-last", "keep_last", int, "checkpoints kept (plus the best by eval loss)"),
    Opt("--resume", "resume", _bool, "resume from the latest checkpoint when there is one"),
    Opt("--prefetch", "prefetch", _bool, "gather the next unit during this one's compute "
        "(false: less memory)"),
    Opt("--activation-checkpointing", "activation_checkpointing", _bool, "keep only each "
        "unit's inputs in forward and recompute the unit in backward: activation memory of one "
        "unit instead of all, for one more forward per step"),
    Opt("--log-dir", "log_dir", str, "rank 0 writes every step to DIR/steps.jsonl and as "
        "TensorBoard scalars (loss, lr, grad norm, tokens/s, bytes sent)"),
    Opt("--buddy", "buddy", _bool, "true: keep a replica of each rank's shard on the next rank, "
        "so a lost worker loses no step"),
]


def parser() -> argparse.ArgumentParser:
    """An argparse parser of the training options; unset flags stay None."""
    ap = argparse.ArgumentParser(prog="zerop2p worker", add_help=False,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", type=str, help="TOML file of these options")
    for o in OPTIONS:
        if o.type is _bool:  # "--resume" alone means true; "--resume false" turns it off
            ap.add_argument(o.flag, type=_bool, nargs="?", const=True, help=o.help,
                            metavar="BOOL")
            continue
        ap.add_argument(o.flag, type=o.type, help=o.help, metavar=o.type.__name__.upper()
                        if o.type in (int, float, str) else "VALUE")
    return ap


def help_text() -> str:
    """The options as a two-column listing, for ``--help`` epilogs."""
    width = max(len(o.flag) for o in OPTIONS) + 2
    lines = ["Training options (also from --config FILE.toml; flags win):"]
    lines += [f"  {o.flag:<{width}}{o.help}" for o in OPTIONS]
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
        opt = by_dest[dest]
        if opt.target in ("lora.target_modules", "islands.sites"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        *section, name = opt.target.split(".")
        (nested.setdefault(section[0], {}) if section else nested)[name] = value
    return path, nested


def load_toml(path: str | Path) -> dict:
    """Read a TOML file of options: top-level keys for training, tables [model] [data] [optim] [lora]."""
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def build_train_config(args: list[str]) -> TrainConfig:
    """TOML file (if any) overlaid by flags, validated into a TrainConfig."""
    path, flags = overrides_from_args(args)
    base = load_toml(path) if path else {}
    for key, value in flags.items():
        if isinstance(value, dict):
            base[key] = {**(base.get(key) or {}), **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base)
