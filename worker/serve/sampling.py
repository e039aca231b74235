"""Sampling and prompt logprobs on the sharded model, run by every rank of the worker group.

Every rank gets the same prompt and parameters. ``sample`` splits the requested rows over the
ranks as training splits a batch (rows.py), and each rank decodes its share with a KV cache:
one ``engine.forward`` per token, which gathers every unit as any forward does, so all ranks
run the same number of steps (a one-number all-reduce of the unfinished rows after each step
decides whether anyone goes on). One last all-reduce of zero-filled tensors hands every rank
all rows. Each row draws from its own generator, seeded from the request's seed and the row's
place in the request, so what is sampled does not depend on the world size.

Neither call touches gradients or advances the engine's step: their forwards and all-reduces
only count on in the current step's keys, the same on every rank (the service must not call
``engine.end_step`` for them).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.zero3 import Zero3Engine
from worker.serve.rows import rank_share, target_logprobs
from zerop2p.types import SampledSequence, SampleResponse, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_SEED = 0  # a request without a seed: every rank must draw the same numbers
EXACT_IDS = 1 << 24  # float32 holds every integer below this exactly (the results all-reduce)
_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class _Row:
    """One row this rank decodes: ``index`` is its place in the request (-1: padding)."""

    index: int
    generator: torch.Generator | None
    done: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"


@dataclass(frozen=True, slots=True)
class _Stops:
    """What ends a sequence: token ids (``stop`` ids and eos), or strings in the decoded text."""

    ids: frozenset[int]
    strings: tuple[str, ...]
    tokenizer: Any
    window: int  # generated tokens decoded to look for a stop string that just completed

    @classmethod
    def of(cls, params: SamplingParams, tokenizer: Any, eos_token_id: int | None, *,
           rank: int) -> _Stops:
        """Checked before any collective, so a bad request fails on every rank at once."""
        stop = list(params.stop or [])
        strings = tuple(s for s in stop if isinstance(s, str))
        ids = {int(s) for s in stop if not isinstance(s, str)}
        if eos_token_id is not None:
            ids.add(int(eos_token_id))
        if strings and tokenizer is None:
            raise ValueError(f"rank {rank}: stop strings {list(strings)!r} need a tokenizer, "
                             "got None")
        if any(not s for s in strings):
            raise ValueError(f"rank {rank}: an empty stop string would end every sequence at "
                             "its first token")
        # A stop string of n characters spans at most n tokens unless tokens decode to nothing
        # (partial characters, special ids): 4n + 16 leaves room for those.
        window = 4 * max((len(s) for s in strings), default=0) + 16
        return cls(frozenset(ids), strings, tokenizer, window)

    def hit(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.ids:
            return True
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens[-self.window:])
        return any(s in text for s in self.strings)


def sample(engine: Zero3Engine, prompt: list[int], *, num_samples: int, params: SamplingParams,
           rank: int, world_size: int, tokenizer: Any = None,
           eos_token_id: int | None = None) -> SampleResponse:
    """``num_samples`` continuations of ``prompt``; every rank must call it with the same
    arguments, and every rank returns all sequences in order."""
    if not prompt:
        raise ValueError(f"rank {rank}: sampling needs a prompt of at least 1 token, got 0")
    if num_samples < 1:
        raise ValueError(f"rank {rank}: num_samples must be >= 1, got {num_samples}")
    stops = _Stops.of(params, tokenizer, eos_token_id, rank=rank)
    _check_positions(engine, len(prompt) + params.max_tokens, rank=rank)
    seed = DEFAULT_SEED if params.seed is None else params.seed
    rows = [_Row(i, None if i < 0 else _row_generator(seed, i), done=i < 0)
            for i in rank_share(num_samples, rank=rank, world_size=world_size)]
    t0 = time.perf_counter()
    steps, cache_kwarg = 0, _cache_kwarg(engine.model)
    with _evaluating(engine):
        logits, cache = _prefill(engine, prompt, len(rows), rank=rank)
        while True:
            _pick(logits, rows, params.temperature, stops)
            steps += 1
            if steps == params.max_tokens:
                break
            left = int(engine.all_reduce_sum(torch.tensor([sum(not r.done for r in rows)]))[0])
            if left == 0:
                break
            feed = torch.tensor([[r.tokens[-1] if r.tokens else 0] for r in rows],
                                device=engine.config.device)
            out = engine.forward(input_ids=feed, use_cache=True, **{cache_kwarg: cache})
            cache = _cache_of(out)
            logits = out.logits[:, -1]
    sequences = _gather(engine, rows, num_samples, steps)
    log.debug("rank %d sampled %d of %d rows, %d steps, in %.2fs", rank,
              sum(r.index >= 0 for r in rows), num_samples, steps, time.perf_counter() - t0)
    return SampleResponse(sequences=sequences)


def compute_logprobs(engine: Zero3Engine, prompt: list[int], *, rank: int,
                     world_size: int) -> list[float | None]:
    """Tinker's compute_logprobs: each prompt token's log-probability given those before it
    (None for the first). Every rank runs the same one forward and returns the same list."""
    if not prompt:
        raise ValueError(f"rank {rank}: compute_logprobs needs at least 1 token, got 0")
    if len(prompt) == 1:  # nothing to predict; every rank skips the forward alike
        return [None]
    _check_positions(engine, len(prompt), rank=rank)
    ids = torch.tensor([prompt], device=engine.config.device)
    with _evaluating(engine):
        out = engine.forward(input_ids=ids, use_cache=False)
    values = target_logprobs(out.logits[:, :-1], ids[:, 1:])[0].cpu().tolist()
    log.debug("rank %d of %d: logprobs of %d prompt tokens", rank, world_size, len(prompt))
    return [None, *values]


# --- decoding -------------------------------------------------------------------------------
@contextmanager
def _evaluating(engine: Zero3Engine) -> Iterator[None]:
    """No grad and eval mode (dropout off) for the call; the model's mode is restored after."""
    training = engine.model.training
    engine.model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.model.train(training)


def _prefill(engine: Zero3Engine, prompt: list[int], rows: int, *,
             rank: int) -> tuple[torch.Tensor, Any]:
    """The prompt once (every row shares it), its cache repeated for ``rows``: the last
    position's logits [rows, V] and the cache."""
    ids = torch.tensor([prompt], device=engine.config.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(engine.model) else {}
    out = engine.forward(input_ids=ids, use_cache=True, **extra)
    logits = out.logits[:, -1]
    if logits.shape[-1] > EXACT_IDS:
        raise ValueError(f"rank {rank}: vocabulary of {logits.shape[-1]} ids; token ids travel "
                         f"as float32, exact below {EXACT_IDS}")
    return logits.expand(rows, -1), _repeat_cache(_cache_of(out), rows, rank=rank)


def _pick(logits: torch.Tensor, rows: list[_Row], temperature: float, stops: _Stops) -> None:
    """Each unfinished row's next token: argmax at temperature 0, otherwise drawn from
    softmax(logits / T) by its own generator (inverse CDF of one uniform, in float64, so a
    last-bit difference in logits almost never changes the draw); its logprob under that
    distribution (the unscaled one at temperature 0)."""
    logits = logits.float().cpu()
    logp = torch.log_softmax(logits if temperature == 0 else logits / temperature, dim=-1)
    greedy = logits.argmax(dim=-1).tolist() if temperature == 0 else None
    for i, row in enumerate(rows):
        if row.done:
            continue
        if greedy is not None:
            token = greedy[i]
        else:
            cdf = logp[i].double().exp().cumsum(0)
            u = torch.rand(1, generator=row.generator, dtype=torch.float64)
            token = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), cdf.numel() - 1)
        row.tokens.append(token)
        row.logprobs.append(float(logp[i, token]))
        if stops.hit(row.tokens):
            row.done, row.stop_reason = True, "stop"


def _gather(engine: Zero3Engine, rows: list[_Row], count: int,
            width: int) -> list[SampledSequence]:
    """Every rank's rows, in request order, from one all-reduce of zero-filled tensors (each
    cell is written by one rank only, so the sum is exact)."""
    cells = count * width
    flat = torch.zeros(2 * cells + 2 * count, dtype=torch.float32)
    tokens = flat[:cells].view(count, width)
    logprobs = flat[cells:2 * cells].view(count, width)
    lengths, stopped = flat[2 * cells:2 * cells + count], flat[2 * cells + count:]
    for row in rows:
        if row.index < 0:
            continue
        n = len(row.tokens)
        tokens[row.index, :n] = torch.tensor(row.tokens, dtype=torch.float32)
        logprobs[row.index, :n] = torch.tensor(row.logprobs, dtype=torch.float32)
        lengths[row.index] = n
        stopped[row.index] = float(row.stop_reason == "stop")
    total = engine.all_reduce_sum(flat)
    tokens, logprobs = total[:cells].view(count, width), total[cells:2 * cells].view(count, width)
    lengths, stopped = total[2 * cells:2 * cells + count], total[2 * cells + count:]
    out = []
    for i in range(count):
        n = int(lengths[i])
        out.append(SampledSequence(stop_reason="stop" if stopped[i] > 0.5 else "length",
                                   tokens=[int(t) for t in tokens[i, :n].tolist()],
                                   logprobs=logprobs[i, :n].tolist()))
    return out


def _row_generator(seed: int, index: int) -> torch.Generator:
    """Row ``index``'s generator: splitmix64 of (seed, index), the same on any rank."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(z ^ (z >> 31))


# --- what differs between transformers versions and peft ------------------------------------
def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(_base(model).forward).parameters)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x names the KV cache ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache


def _repeat_cache(cache: Any, rows: int, *, rank: int) -> Any:
    """A batch-1 cache repeated to ``rows`` rows (a Cache object in place, or legacy tuples)."""
    if rows == 1:
        return cache
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(rows)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.repeat_interleave(rows, dim=0) for t in layer) for layer in cache)
    raise TypeError(f"rank {rank}: cannot repeat a KV cache of type {type(cache).__name__} to "
                    f"{rows} rows; expected a transformers Cache or a tuple of layers")


def _check_positions(engine: Zero3Engine, needed: int, *, rank: int) -> None:
    """Refuse (on every rank alike, before any collective) a sequence past the position table."""
    config = getattr(_base(engine.model), "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise ValueError(f"rank {rank}: prompt plus max_tokens is {needed} positions; the model "
                         f"has {limit}")
