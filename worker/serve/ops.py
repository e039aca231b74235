"""What each operation does on this rank; rank 0's return value is the posted result.

Every rank runs every operation with the same collectives: forward_backward's rows are split
and padded as training splits a global batch, per-datum outputs travel back to every rank in
one all-reduce of zero-filled tensors, and saves go through the trainer's checkpoint code."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch

from worker.engine.progress import Activity
from worker.serve.privacy import PrivacyLedger, add_noise, dp_forward_backward
from worker.serve.rows import datum_losses, rank_rows, target_logprobs
from worker.serve.sampling import compute_logprobs as run_logprobs
from worker.serve.sampling import sample as run_sample
from worker.serve.session import ServedSession
from worker.state.checkpoint import save_checkpoint
from worker.state.export import export_checkpoint
from zerop2p.requests import (
    ForwardBackwardBody,
    LoadBody,
    LogprobsBody,
    OptimStepBody,
    SampleBody,
    SaveBody,
)
from zerop2p.types import StateInfo

log = logging.getLogger(__name__)


def _rank_world(served: ServedSession) -> tuple[int, int]:
    c = served.engine.collectives
    return c.rank, c.world_size


def forward_backward(served: ServedSession, body: ForwardBackwardBody, *,
                     backward: bool = True) -> dict:
    """Loss sum over datums (weights as given), backward into the accumulated gradient (or,
    for ``forward``, only the loss and logprobs)."""
    engine = served.engine
    rank, world = _rank_world(served)
    rows = rank_rows(body.data, rank=rank, world_size=world).to(engine.config.device)
    with torch.set_grad_enabled(backward):
        out = engine.forward(**rows.model_inputs())
        logprobs = target_logprobs(out.logits, rows.targets)
        losses = datum_losses(logprobs, rows.weights)
    if backward:
        engine.backward(losses.sum() * world)  # the engine averages over ranks: x W sums them
        served.window.append(rows.to(torch.device("cpu")))
    # every datum's logprobs and loss, gathered in one all-reduce (padding rows are dropped)
    n, width = len(body.data), rows.input_ids.shape[1]
    table = torch.zeros(n, width + 1)
    for row, i in enumerate(rows.index):
        if i >= 0:
            table[i, :width] = logprobs[row].detach().cpu()
            table[i, width] = losses[row].detach().cpu()
    table = engine.all_reduce_sum(table.reshape(-1)).reshape(n, width + 1)
    outputs = [{"logprobs": {"data": table[i, :d.model_input.length].tolist(),
                             "dtype": "float32", "shape": [d.model_input.length]},
                "loss": {"data": [float(table[i, width])], "dtype": "float32", "shape": [1]}}
               for i, d in enumerate(body.data)]
    tokens = sum(sum(1 for w in d.weights() if w != 0) for d in body.data)
    return {"loss_fn_output_type": body.loss_fn, "loss_fn_outputs": outputs,
            "metrics": {"loss:sum": float(table[:, width].sum()), "tokens": float(tokens),
                        "datums": float(n)}}


def _set_hyperparameters(optimizer: torch.optim.Optimizer, body: OptimStepBody) -> None:
    adam = body.adam_params
    for group in optimizer.param_groups:
        group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                     weight_decay=adam.weight_decay)


def noise_seed(salt: str | None, op) -> int:
    """The DP noise seed of operation ``op``: the session's secret salt (the coordinator's,
    never shown to clients) and the op's seq, so a replay draws the same noise."""
    material = f"{salt or ''}/{op.session_id}/{op.seq}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:6], "big")


def optim_step(served: ServedSession, body: OptimStepBody, *, noise_seed: int = 0) -> dict:
    """Finish the gradients (clip to ``grad_clip_norm``), step AdamW, zero the gradients.

    With ``dp`` the plain gradients of the window's forward_backward calls are dropped and the
    same rows run again with per-datum clipping; the noise follows the all-reduce of the
    replicated gradients (privacy.py), and the ledger counts the step."""
    engine, dp = served.engine, body.dp
    if dp is not None:
        served.optimizer.zero_grad(set_to_none=True)
        engine.replicated.take_bucket()
        _, world = _rank_world(served)
        for rows in served.window:
            dp_forward_backward(engine, rows.to(engine.config.device),
                                max_grad_norm=dp.max_grad_norm, world_size=world)
    norm, _ = engine.clip_grad_norm(body.adam_params.grad_clip_norm or None)
    metrics = None
    if dp is not None:
        add_noise(engine, noise_multiplier=dp.noise_multiplier,
                  max_grad_norm=dp.max_grad_norm, seed=noise_seed)
        served.ledger = served.ledger or PrivacyLedger()
        served.ledger.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        metrics = served.ledger.metrics(dp.delta).model_dump()
    elif served.ledger is not None:  # a public step after private ones: no bound holds now
        served.ledger.public_steps += 1
    _set_hyperparameters(served.optimizer, body)
    engine.publish(Activity.OPTIMIZER)
    served.optimizer.step()
    served.optimizer.zero_grad(set_to_none=True)
    engine.end_step()
    served.window.clear()
    served.progress.step += 1
    return {"step": served.progress.step, "learning_rate": body.adam_params.learning_rate,
            "grad_norm": norm, "dp_metrics": metrics}


def content_hash(path: Path) -> tuple[int, str]:
    """(bytes, SHA-256) of a checkpoint directory's files, in name order."""
    digest, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()


def save(served: ServedSession, root: Path) -> Path:
    """A checkpoint of the session's weights, optimizer and privacy ledger under ``root``."""
    rank, world = _rank_world(served)
    extra = {"privacy": served.ledger.state_dict()} if served.ledger is not None else None
    return save_checkpoint(root, served.states, rank=rank, world_size=world,
                           collectives=served.engine.collectives, extra=extra)


def save_state(served: ServedSession, body: SaveBody, root: Path, seq: int) -> dict:
    path = save(served, root / "states" / body.name)
    if served.engine.collectives.rank != 0:
        return {}
    size, sha = content_hash(path)
    return StateInfo(name=body.name, path=str(path.resolve()), size_bytes=size, sha256=sha,
                     step=served.progress.step, seq=seq).model_dump()


def save_for_sampler(served: ServedSession, body: SaveBody, root: Path) -> dict:
    """Save, then export on rank 0: a Hugging Face directory, or a peft adapter for LoRA."""
    path = save(served, root / "sampler" / body.name)
    if served.engine.collectives.rank != 0:
        return {}
    out = export_checkpoint(path, root / "export" / body.name)
    return {"path": str(Path(out).resolve())}


def save_base(served: ServedSession, root: Path, seq: int, *, keep: int = 2) -> Path:
    """A replay base covering operations up to ``seq``, in a directory of its own (named by
    seq, not step: a load_state may take the step back); all but the newest ``keep`` go."""
    path = save(served, root / "replay" / f"seq_{seq}")
    if served.engine.collectives.rank == 0:
        bases = sorted((int(d.name.removeprefix("seq_")), d) for d in (root / "replay").iterdir()
                       if d.name.startswith("seq_") and d.name[4:].isdigit())
        for _, old in bases[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_state(served: ServedSession, body: LoadBody) -> dict:
    manifest = served.load(body.path, with_optimizer=body.with_optimizer)
    return {"path": body.path, "step": manifest["step"]}


def sample(served: ServedSession, body: SampleBody, seq: int) -> dict:
    """Decode on the sharded model (sampling.py); an unseeded request is seeded by its seq,
    the same on every rank, so repeating one does not repeat its samples."""
    rank, world = _rank_world(served)
    params = body.sampling_params
    if params.seed is None:
        params = params.model_copy(update={"seed": seq})
    answer = run_sample(served.engine, body.prompt.to_ints(), num_samples=body.num_samples,
                        params=params, rank=rank, world_size=world, tokenizer=served.tokenizer,
                        eos_token_id=None)
    return answer.model_dump()


def compute_logprobs(served: ServedSession, body: LogprobsBody) -> dict:
    rank, world = _rank_world(served)
    return {"logprobs": run_logprobs(served.engine, body.prompt.to_ints(), rank=rank,
                                     world_size=world)}
