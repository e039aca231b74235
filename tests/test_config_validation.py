"""Configs are validated before anything starts, and the conventions of Hugging Face Trainer users.

- Types from TOML are checked strictly (``steps = "10"`` is refused naming ``steps`` and
  ``int``); bad values are refused naming the flag and the allowed values, in process in well
  under a second, and by ``zerop2p train`` before any process is started.
- Every TrainConfig field has a flag, shown in ``--help`` with its type and default; the
  default rows per micro-batch split over any ``--world-size``.
- ``--epochs N`` gives the steps that read every training row N times.
- Weight decay is off for biases and norm weights by default, element by element inside the
  flat owned slices (the sharded-vs-one-process proof is the ``decay_groups`` and ``decay_all``
  scenarios of tests/parity_scenarios.py); ``--decay-all`` decays everything.
- ``--keep-dropout`` keeps a pretrained model's dropout; evaluation runs without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness.builders import build_data_and_model

from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.cli.flags import OPTIONS, default_of
from worker.cli.options import build_train_config, default_rows, help_text, resolve_epochs
from worker.data.config import DataConfig
from worker.engine.sharding import build_layout, discover_units
from worker.islands.config import IslandConfig
from worker.main import shard_for_training
from worker.models.blocks import find_block_modules
from worker.models.config import ModelConfig
from worker.models.loading import build_model
from worker.train.config import ConfigError, TrainConfig
from worker.train.optim import (
    OptimConfig,
    build_optimizer,
    decays,
    engine_decay_ranges,
    whole_decay_ranges,
)
from worker.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "worker.cli"]
VOCAB = 257


def zerop2p(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --- types and values ----------------------------------------------------------------------

@pytest.mark.parametrize("toml, key, expected", [
    ('steps = "10"\n', "steps", "expected int, got str '10'"),
    ("resume = 1\n", "resume", "expected bool, got int 1"),
    ('[optim]\nlr = "fast"\n', "optim.lr", "expected float"),
    ("[lora]\nrank = 2.5\n", "lora.rank", "expected int, got float 2.5"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas", "expected tuple[float, float]"),
    ("optim = 3\n", "optim", "expected a table of options"),
])
def test_toml_types_are_checked_naming_the_key(tmp_path, toml, key, expected):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        build_train_config(["--config", str(path)])
    assert err.value.key == key and key in str(err.value) and expected in str(err.value)


def test_toml_numbers_widen_and_arrays_become_tuples(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('timeout = 30\n[optim]\nlr = 1\nbetas = [0.8, 0.9]\n[lora]\nrank = 2\n'
                    'target_modules = ["c_attn"]\n')
    cfg = build_train_config(["--config", str(path)])
    assert (cfg.timeout, cfg.optim.lr, cfg.optim.betas) == (30.0, 1.0, (0.8, 0.9))
    assert isinstance(cfg.optim.lr, float) and cfg.lora.target_modules == ("c_attn",)


REFUSED = [  # (flags, the flag named, the allowed values or bound named)
    (["--codec", "zstd"], "--codec", "['bf16', 'int8', 'raw']"),
    (["--grad-codec", "zstd"], "--grad-codec", "['bf16', 'int8', 'raw']"),
    (["--device", "gpu"], "--device", "('cpu', 'cuda', 'cuda:N', 'mps')"),
    (["--device", "cuda:7"], "--device", "CUDA device(s)"),  # more than this machine has
    (["--optimizer", "lamb"], "--optimizer", "('adamw', 'sgd')"),
    (["--schedule", "step"], "--schedule", "('constant', 'linear', 'cosine')"),
    (["--mixed-precision", "fp8"], "--mixed-precision", "('no', 'bf16', 'fp16')"),
    (["--backend", "mpi"], "--backend", "('grpc', 'torch')"),
    (["--task", "qa"], "--task", "('causal-lm', 'sequence-classification')"),
    (["--dtype", "int8"], "--dtype", "('float32', 'bfloat16', 'float16')"),
    (["--grad-sync", "never"], "--grad-sync", "('micro-batch', 'step')"),
    (["--frozen", "cpu"], "--frozen", "('shard', 'replicate', 'auto')"),
    (["--timeout", "0"], "--timeout", "must be > 0"),
    (["--keep-last", "0"], "--keep-last", "must be >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay", "must be >= 0"),
    (["--dropout", "1.5"], "--dropout", "in [0, 1)"),
    (["--keep-dropout", "--dropout", "0.1"], "--keep-dropout", "choose one"),
    (["--epochs", "0"], "--epochs", "must be >= 1"),
    (["--steps", "5", "--epochs", "2"], "--steps (5) and --epochs (2)", "give one"),
]


@pytest.mark.parametrize("args, flag, allowed", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_bad_values_are_refused_at_once_naming_the_flag_and_the_allowed(args, flag, allowed):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        build_train_config(args)
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(flag) and allowed in str(err.value), str(err.value)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args, named", [
    (["--codec", "zstd"], "--codec: codec 'zstd' is not one of ['bf16', 'int8', 'raw']"),
    (["--device", "cuda:7"], "--device: device 'cuda:7': this machine has"),
    (["--steps", "3", "--epochs", "1"], "--steps (3) and --epochs (1) both given"),
    (["--config", "{toml}"], "--steps: steps: expected int, got str '10'"),
    (["--epochs", "1", "--max-tokens", "200", "--seq-len", "32", "--data-cache", "{cache}"],
     "--epochs: epochs (1): one step reads 8 rows (grad_accum 1 x micro_batch_rows 8) but the "
     "training split has only 5 rows of seq_len 32"),
], ids=["codec", "device", "steps-and-epochs", "toml-type", "epochs-data-too-small"])
def test_train_refuses_before_starting_any_process(tmp_path, args, named):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = "10"\n')
    args = [a.format(toml=toml, cache=tmp_path / "cache") for a in args]
    res = zerop2p("train", "--world-size", "2", *args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert named in res.stderr, res.stderr
    assert "coordinator listening" not in res.stdout and "[w0]" not in res.stdout


# --- every option on the command line, defaults that work ----------------------------------

def _fields() -> set[str]:
    """Every TrainConfig field as a dotted target (``optim.lr``), sections expanded."""
    out = set()
    for f, hint in zip(dataclasses.fields(TrainConfig), typing.get_type_hints(TrainConfig).values()):
        kinds = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        out |= ({f"{f.name}.{g.name}" for g in dataclasses.fields(kinds[0])} if kinds
                else {f.name})
    return out


def test_every_field_has_a_flag_shown_in_help_with_its_type_and_default():
    targets = [o.target for o in OPTIONS]
    assert len(targets) == len(set(targets)), "two flags for one field"
    assert _fields() - set(targets) == set(), "fields no flag reaches"
    assert set(targets) - _fields() == set()
    text = " ".join(help_text().split())  # the listing is wrapped
    for o in OPTIONS:
        assert f"{o.flag} {o.metavar}" in text and f"[{o.target}]" in text, o.flag
    assert "(default: 30) [steps]" in text and "(default: 0.01) [optim.weight_decay]" in text
    assert "--epochs INT|none" in text and "(default: false) [optim.decay_all]" in text
    assert default_of("lora.rank") == 8 and default_of("optim.betas") == (0.9, 0.95)


def test_help_lists_the_options_with_defaults():
    out = " ".join(zerop2p("train", "--help").stdout.split())
    assert "--decay-all BOOL" in out and "--keep-dropout BOOL" in out and "--epochs" in out
    assert "[micro_batch_rows]" in out and "(default: 8)" in out


def test_default_rows_split_over_any_world_size():
    assert all(default_rows(w) % w == 0 and default_rows(w) >= 8 for w in range(1, 33))
    assert [default_rows(w) for w in (1, 2, 3, 4, 5, 8, 16)] == [8, 8, 9, 8, 10, 8, 16]


# --- epochs --------------------------------------------------------------------------------

def test_epochs_give_the_steps_that_read_every_row_that_many_times():
    cfg = TrainConfig(epochs=2, micro_batch_rows=4, grad_accum=3)
    assert cfg.rows_per_step == 12 and cfg.with_epochs(100).steps == math.ceil(200 / 12) == 17
    assert cfg.with_epochs(12).steps == 2  # exactly one step per epoch
    assert TrainConfig(steps=7).with_epochs(5).steps == 7  # without epochs: unchanged
    with pytest.raises(ConfigError, match=r"one step reads 12 rows \(grad_accum 3 x "
                       r"micro_batch_rows 4\) but the training split has only 11 rows"):
        cfg.with_epochs(11)
    # two islands on one corpus read twice the rows a step; steps end on an outer round
    islands = IslandConfig(site="a", sites=("a", "b"), outer_every=4)
    two = TrainConfig(epochs=1, micro_batch_rows=2, steps=4, islands=islands)
    assert two.rows_per_step == 4 and two.with_epochs(50).steps == 16  # 13 rounded up to 4s
    with pytest.raises(ValueError, match="private_data"):
        TrainConfig(epochs=1, steps=4, islands=dataclasses.replace(islands, private_data=True))


def test_resolve_epochs_counts_the_training_rows_of_the_data(tmp_path):
    cfg = build_train_config(["--epochs", "3", "--max-tokens", "3000", "--seq-len", "32",
                              "--micro-batch-rows", "4", "--data-cache", str(tmp_path)])
    rows = build_data_and_model(cfg)[0].num_train_rows
    assert resolve_epochs(cfg).steps == math.ceil(3 * rows / 4) and resolve_epochs(cfg).epochs == 3


@pytest.mark.timeout(400)
def test_train_at_default_rows_on_three_workers_for_one_epoch(tmp_path):
    """``zerop2p train --world-size 3`` with the default rows per micro-batch (8, rounded up to
    9) trains; ``--epochs 1`` gives the steps that read each training row once."""
    data = ["--max-tokens", "3000", "--seq-len", "32", "--data-cache", str(tmp_path / "cache")]
    res = zerop2p("train", "--world-size", "3", "--epochs", "1", *data, "--output",
                  str(tmp_path / "out"), timeout=380)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    rows = build_data_and_model(build_train_config(data))[0].num_train_rows
    assert result["world_size"] == 3 and len(result["losses"]) == math.ceil(rows / 9)


# --- weight decay by element ---------------------------------------------------------------

def test_biases_and_norms_are_not_decayed():
    gpt2 = build_model(ModelConfig(name="tiny-gpt2"), vocab_size=VOCAB)
    kept = {n for n, _ in gpt2.named_parameters() if not decays(gpt2, n)}
    assert kept == {n for n, _ in gpt2.named_parameters() if ".ln_" in n or n.endswith(".bias")}
    assert decays(gpt2, "transformer.h.0.attn.c_attn.weight") and decays(gpt2, "transformer.wte.weight")
    llama = build_model(ModelConfig(name="tiny-llama"), vocab_size=VOCAB)
    kept = {n for n, _ in llama.named_parameters() if not decays(llama, n)}
    assert kept == {n for n, _ in llama.named_parameters() if n.endswith("norm.weight")}


@pytest.mark.parametrize("decay_all", [False, True])
def test_a_zero_gradient_adamw_step_decays_only_the_decayed(decay_all):
    """With zero gradients AdamW's update is exactly the decay: biases and norms stay put,
    everything else is multiplied by 1 - lr * wd (torch's arithmetic, bit for bit)."""
    model = build_model(ModelConfig(name="tiny-gpt2"), vocab_size=VOCAB)
    named = list(model.named_parameters())
    masters = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    opt = build_optimizer(masters, OptimConfig(lr=0.1, weight_decay=0.5, decay_all=decay_all),
                          whole_decay_ranges(model, [n for n, _ in named]))
    for m in masters:
        m.grad = torch.zeros_like(m)
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.5  # what a manifest records
    for (name, p), m in zip(named, masters):
        want = p.detach().clone().mul_(1 - 0.1 * 0.5) if decay_all or decays(model, name) else p
        assert torch.equal(m.detach(), want), name


def _unit_masks(model, world_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per unit: the decay mask of the whole trainable region (from each slot), and the
    concatenated masks the ranks' ``engine_decay_ranges`` give their owned slices."""
    units = discover_units(model, find_block_modules(model))
    layouts = [build_layout(u.unit, u.module_name, u.params) for u in units]
    whole = [torch.cat([torch.full((s.numel,), decays(model, s.name)) for s in lay.slots
                        if s.trainable]) for lay in layouts]
    per_rank = []
    for rank in range(world_size):
        engine = SimpleNamespace(collectives=SimpleNamespace(rank=rank, world_size=world_size),
                                 layouts=layouts, model=model,
                                 replicated=SimpleNamespace(trainable=[], masters=[]))
        masks = []
        for layout, ranges in zip(layouts, engine_decay_ranges(engine)):
            mask = torch.zeros(layout.shard_sizes(world_size)[0], dtype=torch.bool)
            for a, b in ranges:
                mask[a:b] = True
            masks.append(mask)
        per_rank.append(masks)
    return whole, [torch.cat(ms) for ms in zip(*per_rank)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_owned_slices_decay_exactly_their_share_of_the_decayed_slots(world_size):
    model = build_model(ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5),
                        vocab_size=VOCAB)
    whole, sharded = _unit_masks(model, world_size)
    for w, s in zip(whole, sharded):
        assert torch.equal(s[: w.numel()], w) and not s[w.numel():].any()  # padding: no decay
        assert w.any() and not w.all()  # each unit mixes decayed and kept elements


def _one_step(weight_decay: float) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """One step of a one-rank engine (every unit one flat master slice) from the same start."""
    cfg = TrainConfig(model=ModelConfig(name="tiny-gpt2"), steps=1, micro_batch_rows=2,
                      data=DataConfig(seq_len=16, max_tokens=20_000),
                      optim=OptimConfig(lr=1e-2, schedule="constant", weight_decay=weight_decay))
    transport = GrpcTransport(token="t")
    coll = GrpcCollectives.bind(transport, rank=0, world_size=1, peers=[transport.address],
                                generation=1, timeout=30.0)
    try:
        data, model = build_data_and_model(cfg)
        engine = shard_for_training(cfg, model, coll, 1)
        Trainer(cfg, engine=engine, data=data, rank=0, world_size=1).train_step()
        return dict(engine.iter_full_weights(trainable_only=True)), model
    finally:
        coll.close()
        transport.close()


@pytest.mark.timeout(120)
def test_the_engine_leaves_norms_and_biases_as_without_decay():
    """The first step's gradients do not depend on the decay, so after it the kept elements of
    the flat master slices equal a run without decay, and only the decayed ones moved apart."""
    decayed, model = _one_step(0.5)
    plain, _ = _one_step(0.0)
    for name, w in decayed.items():
        if decays(model, name):
            assert not torch.equal(w, plain[name]), name
        else:
            assert torch.equal(w, plain[name]), name


# --- dropout -------------------------------------------------------------------------------

def test_keep_dropout_keeps_a_pretrained_models_dropout(tmp_path):
    saved = build_model(ModelConfig(name="tiny-gpt2", dropout=0.1), vocab_size=VOCAB)
    saved.save_pretrained(tmp_path)
    flags = build_train_config(["--model", str(tmp_path), "--keep-dropout"]).model
    assert flags.keep_dropout and flags.applied_dropout is None
    kept = build_model(flags, vocab_size=VOCAB)
    zeroed = build_model(ModelConfig(name=str(tmp_path)), vocab_size=VOCAB)
    assert kept.config.resid_pdrop == kept.config.attn_pdrop == 0.1
    assert zeroed.config.resid_pdrop == zeroed.config.attn_pdrop == 0.0
    ids = torch.randint(0, VOCAB, (2, 16))
    kept.train()
    assert not torch.equal(kept(input_ids=ids).logits, kept(input_ids=ids).logits)


@pytest.mark.timeout(120)
def test_evaluation_runs_without_the_kept_dropout():
    cfg = TrainConfig(model=ModelConfig(name="tiny-gpt2", keep_dropout=True), steps=1,
                      micro_batch_rows=2, data=DataConfig(seq_len=16, max_tokens=20_000))
    transport = GrpcTransport(token="t")
    coll = GrpcCollectives.bind(transport, rank=0, world_size=1, peers=[transport.address],
                                generation=1, timeout=30.0)
    try:
        data, model = build_data_and_model(cfg)
        assert model.config.resid_pdrop > 0  # the preset's own dropout, kept
        trainer = Trainer(cfg, engine=shard_for_training(cfg, model, coll, 1), data=data, rank=0,
                          world_size=1)
        assert trainer.evaluate() == trainer.evaluate() and model.training
    finally:
        coll.close()
        transport.close()
