"""Sampling and prompt logprobs on the sharded model (worker/serve/sampling.py), against
``generate`` and plain forwards of an unsharded copy of the same weights.

World size 2 is two ranks in this process, each on its own GrpcTransport over loopback, run in
two threads; world size 1 is one rank. The tiny GPT-2's random init is perturbed with seeded
noise so its greedy continuation is not one repeated token (checked)."""

from __future__ import annotations

import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.data.tokenizer import ByteTokenizer
from worker.engine.unit import UnitState
from worker.engine.zero3 import EnginePhase, Zero3Engine
from worker.main import build_trainable_model, shard_for_training
from worker.models.config import ModelConfig
from worker.models.lora import LoraSettings
from worker.serve.sampling import compute_logprobs, sample
from worker.train.config import TrainConfig
from zerop2p.types import SampleResponse, SamplingParams

TIMEOUT = 20.0
TOKENIZER = ByteTokenizer()
CFG = TrainConfig(model=ModelConfig(name="tiny-gpt2", max_positions=64), timeout=TIMEOUT)
LORA = TrainConfig(model=ModelConfig(name="tiny-gpt2", max_positions=64), timeout=TIMEOUT,
                   lora=LoraSettings(rank=4, init_lora_weights=False))
PROMPT = list(b"hello world")
NEW = 12


def build(cfg: TrainConfig, noise: int = 1) -> torch.nn.Module:
    """The model of ``cfg`` plus seeded N(0, 0.2) noise on every parameter: the same on
    every call for one ``noise``."""
    model = build_trainable_model(cfg, types.SimpleNamespace(tokenizer=TOKENIZER))
    g = torch.Generator().manual_seed(noise)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


class Group:
    """``world_size`` ranks of one sharded model, each on its own transport."""

    def __init__(self, cfg: TrainConfig, world_size: int, noise: int = 1):
        self.transports = [GrpcTransport(token="sampling") for _ in range(world_size)]
        peers = [t.address for t in self.transports]
        self.colls = [GrpcCollectives.bind(t, rank=r, world_size=world_size, peers=peers,
                                           generation=1, timeout=TIMEOUT)
                      for r, t in enumerate(self.transports)]
        self.engines: list[Zero3Engine] = [shard_for_training(cfg, build(cfg, noise), c, 1)
                                           for c in self.colls]
        self.world_size = world_size

    def run(self, fn) -> list:
        """``fn(engine, rank)`` on every rank at once; each rank's result."""
        with ThreadPoolExecutor(self.world_size) as pool:
            futures = [pool.submit(fn, e, r) for r, e in enumerate(self.engines)]
            return [f.result(timeout=3 * TIMEOUT) for f in futures]

    def sample(self, num_samples: int, params: SamplingParams, **kw) -> SampleResponse:
        """Every rank's answer, checked to be the same; returns it."""
        answers = self.run(lambda e, r: sample(e, PROMPT, num_samples=num_samples, params=params,
                                               rank=r, world_size=self.world_size, **kw))
        for r, a in enumerate(answers[1:], 1):
            assert a == answers[0], f"rank {r}'s answer differs from rank 0's"
        return answers[0]

    def close(self) -> None:
        for c, t in zip(self.colls, self.transports):
            c.close()
            t.close()


@pytest.fixture(scope="module")
def groups():
    """Groups by (config name, world size), built on first use, closed at the end."""
    made: dict[tuple[str, int], Group] = {}

    def get(name: str, world_size: int) -> Group:
        if (name, world_size) not in made:
            made[name, world_size] = Group({"base": CFG, "lora": LORA}[name], world_size)
        return made[name, world_size]

    yield get
    for g in made.values():
        g.close()


@pytest.fixture(scope="module")
def references():
    """The unsharded model of each config, in eval mode."""
    return {"base": build(CFG).eval(), "lora": build(LORA).eval()}


def greedy(model: torch.nn.Module, n: int = NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=n,
                             pad_token_id=TOKENIZER.pad_token_id, attention_mask=None)
    return out[0, len(PROMPT):].tolist()


def reference_logprobs(model: torch.nn.Module, tokens: list[int], temperature: float = 0.0
                       ) -> torch.Tensor:
    """log_softmax (of logits / T when T > 0) of the whole sequence, without a cache, at
    ``tokens``."""
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature if temperature else logits, dim=-1)
    return logp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


# --- 1. greedy equals generate ------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, world_size", [("base", 1), ("base", 2), ("lora", 2)])
def test_greedy_equals_unsharded_generate_with_its_logprobs(groups, references, name,
                                                            world_size):
    ref, group = references[name], groups(name, world_size)
    want = greedy(ref)
    assert len(set(want)) >= 2, f"greedy continuation is constant ({want}): a weak test"
    got = group.sample(2, SamplingParams(max_tokens=NEW, temperature=0.0))
    assert len(got.sequences) == 2
    for seq in got.sequences:
        assert seq.tokens == want and seq.stop_reason == "length"
        torch.testing.assert_close(torch.tensor(seq.logprobs), reference_logprobs(ref, want),
                                   rtol=0, atol=1e-5)
    for e in group.engines:  # nothing left gathered, no step taken, training mode restored
        assert e.phase is EnginePhase.IDLE and e.step_index == 0 and e.model.training
        assert all(u.state is UnitState.SHARDED for u in e.units if u.needs_gather)


def test_a_differently_seeded_model_is_greedy_elsewhere(references):
    assert greedy(build(CFG, noise=2).eval()) != greedy(references["base"])


# --- 2. what ends a sequence -----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [1, 2])
def test_stop_tokens_strings_and_eos_end_sequences(groups, references, world_size):
    want, group = greedy(references["base"]), groups("base", world_size)
    cut = next(i for i, t in enumerate(want) if i > 0 and t not in want[:i])
    forwards = [e._forward_index for e in group.engines]
    got = group.sample(1, SamplingParams(max_tokens=NEW, temperature=0.0, stop=[want[cut]]))
    assert got.sequences[0].tokens == want[:cut + 1] and got.sequences[0].stop_reason == "stop"
    # every rank stopped decoding with the last row: a prefill and one forward per later token
    assert [e._forward_index - f for e, f in zip(group.engines, forwards)] == \
        [cut + 1] * world_size

    j = next(i for i, t in enumerate(want) if 32 <= t < 127 and chr(t) not in
             TOKENIZER.decode(want[:i]))
    got = group.sample(1, SamplingParams(max_tokens=NEW, temperature=0.0, stop=[chr(want[j])]),
                       tokenizer=TOKENIZER)
    assert got.sequences[0].tokens == want[:j + 1] and got.sequences[0].stop_reason == "stop"

    got = group.sample(1, SamplingParams(max_tokens=NEW, temperature=0.0), eos_token_id=want[cut])
    assert got.sequences[0].tokens == want[:cut + 1] and got.sequences[0].stop_reason == "stop"

    got = group.sample(1, SamplingParams(max_tokens=3, temperature=0.0, stop=[999]))
    assert got.sequences[0].tokens == want[:3] and got.sequences[0].stop_reason == "length"


def test_stop_strings_without_a_tokenizer_are_refused_before_any_collective(groups):
    engine = groups("base", 1).engines[0]
    before = engine._forward_index
    with pytest.raises(ValueError, match="rank 0: stop strings"):
        sample(engine, PROMPT, num_samples=1, params=SamplingParams(stop=["x"]), rank=0,
               world_size=1)
    with pytest.raises(ValueError, match="64"):
        sample(engine, PROMPT, num_samples=1, params=SamplingParams(max_tokens=60), rank=0,
               world_size=1)
    assert engine._forward_index == before


# --- 3. temperature -------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_seeded_sampling_does_not_depend_on_world_size(groups, references):
    params = SamplingParams(max_tokens=NEW, temperature=1.0, seed=7)
    one = groups("base", 1).sample(3, params)
    two = groups("base", 2).sample(3, params)  # 2 rows on rank 0, 1 and a padding row on rank 1
    assert len(one.sequences) == len(two.sequences) == 3
    assert [s.tokens for s in one.sequences] == [s.tokens for s in two.sequences]
    for a, b in zip(one.sequences, two.sequences):
        assert len(a.tokens) == NEW and a.stop_reason == "length"
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(a.logprobs),
                                   reference_logprobs(references["base"], a.tokens, 1.0),
                                   rtol=0, atol=1e-5)
    assert len({tuple(s.tokens) for s in one.sequences}) == 3, "rows drew the same numbers"
    other = groups("base", 2).sample(3, params.model_copy(update={"seed": 8}))
    assert [s.tokens for s in other.sequences] != [s.tokens for s in two.sequences]


@pytest.mark.timeout(60)
def test_logprobs_are_under_the_tempered_distribution(groups, references):
    got = groups("lora", 2).sample(1, SamplingParams(max_tokens=NEW, temperature=0.5, seed=3))
    seq = got.sequences[0]
    torch.testing.assert_close(torch.tensor(seq.logprobs),
                               reference_logprobs(references["lora"], seq.tokens, 0.5),
                               rtol=0, atol=1e-5)


# --- 4. compute_logprobs ----------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, world_size", [("base", 1), ("base", 2), ("lora", 2)])
def test_compute_logprobs_equals_unsharded_log_softmax(groups, references, name, world_size):
    group = groups(name, world_size)
    answers = group.run(lambda e, r: compute_logprobs(e, PROMPT, rank=r, world_size=world_size))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logp = torch.log_softmax(references[name](input_ids=ids).logits[0, :-1].float(), dim=-1)
    want = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    for got in answers:
        assert got[0] is None and len(got) == len(PROMPT)
        torch.testing.assert_close(torch.tensor(got[1:]), want, rtol=0, atol=1e-5)
    if world_size == 1:  # a one-token prompt: nothing to predict, and no forward run
        before = group.engines[0]._forward_index
        assert compute_logprobs(group.engines[0], PROMPT[:1], rank=0, world_size=1) == [None]
        assert group.engines[0]._forward_index == before


# --- engine bookkeeping -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sampling_between_accumulated_backwards_leaves_the_gradients_alone(groups):
    """forward_backward (kept local), sample, forward_backward (reduce-scattered): the same
    gradients as without the sample, and no step taken."""
    group = groups("lora", 2)
    batches = [torch.tensor([PROMPT]), torch.tensor([list(b"other words")])]

    def accumulate(engine: Zero3Engine, rank: int, with_sample: bool) -> list[torch.Tensor]:
        for i, ids in enumerate(batches):
            out = engine.forward(input_ids=ids, labels=ids)
            engine.backward(out.loss, sync_grads=i == len(batches) - 1)
            if with_sample and i == 0:
                sample(engine, PROMPT, num_samples=2, params=SamplingParams(max_tokens=4, seed=1),
                       rank=rank, world_size=2)
        grads = [p.grad.clone() for p in engine.parameters() if p.grad is not None]
        bucket = engine.replicated.take_bucket()
        for p in engine.parameters():
            p.grad = None
        return grads + [bucket]

    with_sample = group.run(lambda e, r: accumulate(e, r, True))
    without = group.run(lambda e, r: accumulate(e, r, False))
    for r in range(2):
        assert len(with_sample[r]) == len(without[r]) > 1
        for a, b in zip(with_sample[r], without[r]):
            assert torch.equal(a, b), f"rank {r}: a sample between backwards changed a gradient"
    assert all(e.step_index == 0 for e in group.engines)
