"""The table of training flags: each maps to a TrainConfig field (``section.field`` or
``field``), with the parser of its value; ``--help`` shows the field's type and default.

``worker/cli/options.py`` builds the argparse parser and the validated TrainConfig from it. A
test checks that every TrainConfig field has a flag here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from worker.models.lora import LoraSettings
from worker.train.config import TrainConfig


@dataclass(frozen=True, slots=True)
class Opt:
    """One flag: where its value goes in TrainConfig (``section.field`` or ``field``); its
    default, shown in ``--help``, is that field's."""

    flag: str
    target: str
    type: type
    help: str

    @property
    def metavar(self) -> str:
        return METAVARS.get(self.type) or self.type.__name__.upper()


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _opt_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in _names(text)]


def _bool_or_str(text: str) -> bool | str:
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        return text


METAVARS = {parse_bool: "BOOL", _opt_float: "FLOAT|none", _opt_int: "INT|none", _names: "A,B,...",
            _floats: "FLOAT,FLOAT", _bool_or_str: "BOOL|NAME"}


OPTIONS: list[Opt] = [
    Opt("--model", "model.name", str, "preset (tiny-gpt2, tiny-llama, tiny-qwen2, tiny-bert) or a "
        "local from_pretrained directory"),
    Opt("--task", "model.task", str, "causal-lm or sequence-classification"),
    Opt("--num-labels", "model.num_labels", int, "classes, for sequence-classification"),
    Opt("--n-layer", "model.n_layer", int, "blocks in a preset model"),
    Opt("--hidden-size", "model.hidden_size", int, "hidden size of a preset model"),
    Opt("--num-heads", "model.num_heads", int, "attention heads of a preset model"),
    Opt("--seed", "model.seed", int, "seed of the model's initial weights"),
    Opt("--dtype", "model.dtype", str, "dtype the model is built in: float32, bfloat16 or "
        "float16 (compute precision is --mixed-precision)"),
    Opt("--max-positions", "model.max_positions", int, "positions of a preset model"),
    Opt("--dropout", "model.dropout", float, "every dropout probability of the model (nonzero "
        "breaks exact parity)"),
    Opt("--keep-dropout", "model.keep_dropout", parse_bool, "keep a pretrained model's own dropout "
        "instead of 0 (each rank draws its own masks: breaks exact parity; eval runs without)"),
    Opt("--data", "data.source", str, "stdlib (the Python standard library's source), a .txt, "
        ".jsonl, .json or .parquet file, a datasets save_to_disk directory, or a directory of "
        "text files"),
    Opt("--text-field", "data.text_field", str, "jsonl field holding the text"),
    Opt("--label-field", "data.label_field", str, "jsonl field holding the label, for "
        "sequence-classification"),
    Opt("--eval-fraction", "data.eval_fraction", float, "share of the rows held out, in [0, 1)"),
    Opt("--max-examples", "data.max_examples", _opt_int, "sequence-classification: examples "
        "kept in all (none: every one)"),
    Opt("--seq-len", "data.seq_len", int, "tokens per row"),
    Opt("--max-tokens", "data.max_tokens", _opt_int, "cap on the tokens read (none: every "
        "token)"),
    Opt("--data-cache", "data.cache_dir", str, "directory of tokenised data stores (none: "
        "$ZEROP2P_DATA_CACHE or ~/.cache/zerop2p/data)"),
    Opt("--data-seed", "data.seed", int, "seed of the batch order"),
    Opt("--optimizer", "optim.optimizer", str, "adamw or sgd"),
    Opt("--lr", "optim.lr", float, "peak learning rate"),
    Opt("--adam-betas", "optim.betas", _floats, "AdamW's beta1,beta2"),
    Opt("--adam-eps", "optim.eps", float, "AdamW's epsilon (1e-6 keeps near-zero gradients' "
        "updates proportional to them)"),
    Opt("--weight-decay", "optim.weight_decay", float, "weight decay (AdamW: decoupled; SGD: "
        "L2), not applied to biases and norm weights"),
    Opt("--decay-all", "optim.decay_all", parse_bool, "decay biases and LayerNorm/RMSNorm weights "
        "too"),
    Opt("--momentum", "optim.momentum", float, "SGD momentum"),
    Opt("--schedule", "optim.schedule", str, "constant, linear or cosine"),
    Opt("--warmup-steps", "optim.warmup_steps", int, "linear warm-up steps"),
    Opt("--max-grad-norm", "optim.max_grad_norm", _opt_float, "global gradient-norm clip "
        "(none: off)"),
    Opt("--lora-rank", "lora.rank", int, "train LoRA adapters of this rank (base frozen)"),
    Opt("--lora-alpha", "lora.alpha", float, "LoRA alpha"),
    Opt("--lora-dropout", "lora.dropout", float, "LoRA dropout (nonzero breaks exact parity)"),
    Opt("--lora-targets", "lora.target_modules", _names, "comma-separated module names "
        "(none: peft's for the architecture)"),
    Opt("--lora-seed", "lora.seed", int, "seed of the adapters' initial weights"),
    Opt("--lora-init", "lora.init_lora_weights", _bool_or_str, "peft's init_lora_weights: true "
        "(B = 0), false (random B) or a method name such as gaussian"),
    Opt("--steps", "steps", int, "optimizer steps (or --epochs)"),
    Opt("--epochs", "epochs", _opt_int, "passes over the training rows instead of --steps (the "
        "steps follow from the data's size and the rows per step)"),
    Opt("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    Opt("--micro-batch-rows", "micro_batch_rows", int, "rows per global micro-batch, divided "
        "among the workers (zerop2p train rounds the default up to a multiple of "
        "--world-size)"),
    Opt("--mixed-precision", "mixed_precision", str, "no, bf16 or fp16 (fp32 master shards)"),
    Opt("--device", "device", str, "cpu, cuda, cuda:N or mps (checked on this machine)"),
    Opt("--backend", "backend", str, "grpc (peer-to-peer) or torch (gloo/NCCL)"),
    Opt("--codec", "codec", str, "gRPC wire codec of parameters and gradients: raw, bf16 or "
        "int8 (all-reduces of norms and losses are always exact)"),
    Opt("--param-codec", "traffic.param_codec", str, "wire codec of parameter all-gathers "
        "(none: --codec); every rank computes with the same decoded weights"),
    Opt("--grad-codec", "traffic.grad_codec", str, "wire codec of gradient reduce-scatters "
        "(none: --codec)"),
    Opt("--error-feedback", "traffic.error_feedback", parse_bool, "with a lossy grad codec, send "
        "what the wire lost with the next gradient (memory: one fp32 copy of the trainable "
        "parameters per rank, on CPU)"),
    Opt("--grad-sync", "traffic.grad_sync", str, "micro-batch or step: with "
        "--grad-accum K, reduce-scatter once per optimizer step instead of K times (memory: "
        "each rank keeps the full fp32 gradient of every unit until the step)"),
    Opt("--frozen", "traffic.frozen", str, "shard, replicate (frozen weights, a LoRA "
        "base, live whole on every rank and never travel) or auto (replicate when they take "
        "at most a quarter of free memory)"),
    Opt("--prefetch-depth", "traffic.prefetch_depth", int, "units gathered ahead of the one "
        "that runs (each holds one more unit's parameters)"),
    Opt("--persist-threshold", "traffic.persist_threshold", int, "parameters with fewer "
        "elements (norms, biases, LoRA adapters) stay whole on every rank; their gradients ride "
        "in the step's one all-reduce (0: everything sharded)"),
    Opt("--reshard-after-forward", "traffic.reshard_after_forward", parse_bool, "false: keep units "
        "gathered from forward to backward (no backward all-gather; every unit is alive at "
        "the end of forward)"),
    Opt("--site", "islands.site", str, "this worker's site: workers of one site form an island "
        "(ZeRO-3 inside; DiLoCo outer steps between islands)"),
    Opt("--sites", "islands.sites", _names, "comma-separated names of every island of the run, "
        "in data order (a shared corpus is split among them); needs --outer-every"),
    Opt("--outer-every", "islands.outer_every", int, "inner steps between outer syncs (H)"),
    Opt("--outer-lr", "islands.outer_lr", float, "outer SGD learning rate"),
    Opt("--outer-momentum", "islands.outer_momentum", float, "outer SGD momentum"),
    Opt("--outer-nesterov", "islands.outer_nesterov", parse_bool, "Nesterov outer momentum"),
    Opt("--outer-codec", "islands.outer_codec", str, "wire codec of pseudo-gradients between "
        "islands: raw, bf16 or int8"),
    Opt("--outer-error-feedback", "islands.outer_error_feedback", parse_bool, "with a lossy outer "
        "codec, send what the wire lost with the next round"),
    Opt("--quorum-timeout", "islands.quorum_timeout", float, "seconds an outer round waits for "
        "missing islands before going on without them"),
    Opt("--private-data", "islands.private_data", parse_bool, "this site's --data is its own: split "
        "over the island only, and the outer average weighs islands by tokens"),
    Opt("--eval-every", "eval_every", int, "evaluate every K steps (0: only at the end)"),
    Opt("--eval-batches", "eval_batches", int, "held-out batches per evaluation"),
    Opt("--log-every", "log_every", int, "log every K steps"),
    Opt("--unit-pattern", "unit_pattern", str, "regex of module names that form sharding units"),
    Opt("--timeout", "timeout", float, "deadline in seconds for every collective"),
    Opt("--checkpoint-dir", "checkpoint_dir", str, "directory shared by all workers"),
    Opt("--checkpoint-every", "checkpoint_every", int, "checkpoint every K steps (and at the end)"),
    Opt("--keep-last", "keep_last", int, "checkpoints kept (plus the best by eval loss)"),
    Opt("--resume", "resume", parse_bool, "resume from the latest checkpoint when there is one"),
    Opt("--prefetch", "prefetch", parse_bool, "gather the next unit during this one's compute "
        "(false: less memory)"),
    Opt("--activation-checkpointing", "activation_checkpointing", parse_bool, "keep only each "
        "unit's inputs in forward and recompute the unit in backward: activation memory of one "
        "unit instead of all, for one more forward per step"),
    Opt("--log-dir", "log_dir", str, "rank 0 writes every step to DIR/steps.jsonl and as "
        "TensorBoard scalars (loss, lr, grad norm, tokens/s, bytes sent)"),
    Opt("--buddy", "buddy", parse_bool, "true: keep a replica of each rank's shard on the next rank, "
        "so a lost worker loses no step"),
]


def default_of(target: str):
    """The TrainConfig default of ``section.field`` or ``field`` (a LoRA field: LoraSettings')."""
    *section, name = target.split(".")
    kind = TrainConfig
    if section:
        hint = {f.name: f for f in dataclasses.fields(TrainConfig)}[section[0]]
        kind = LoraSettings if hint.default is None else type(hint.default_factory())
    spec = {f.name: f for f in dataclasses.fields(kind)}[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def shown(value) -> str:
    """A default as a flag would spell it."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
