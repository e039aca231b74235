"""Differential privacy over the sharded engine (worker/serve/privacy.py), on real gRPC over
loopback: two ranks in two threads of this process, each with its own GrpcTransport.

The reference is Opacus itself, single process: ``GradSampleModule`` (loss_reduction="sum")
and ``DPOptimizer.pre_step`` with noise 0, whose ``p.grad`` is the clipped summed gradient.
GPT-2's ``Conv1D`` has no Opacus grad sampler, so Opacus falls back to functorch for those
layers (Linear, LayerNorm, Embedding keep their hooks); the full model and a LoRA variant
(adapters are ``nn.Linear``) both work. GPT-2 builds position ids of batch 1, which Opacus'
embedding sampler would take for one sample, so the reference passes them at batch size B.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from types import SimpleNamespace

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from communication.collectives import Key, Phase, result
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.data.tokenizer import ByteTokenizer
from worker.main import build_trainable_model, shard_for_training
from worker.models.config import ModelConfig
from worker.models.lora import LoraSettings
from worker.serve.privacy import PrivacyLedger, add_noise, agree_seed, clip_factors, dp_forward_backward
from worker.serve.rows import datum_losses, rank_rows, target_logprobs
from worker.train.config import TrainConfig
from worker.train.traffic import TrafficConfig
from zerop2p.types import Datum, DPMetrics, ModelInput

TIMEOUT = 30.0
DATA = SimpleNamespace(tokenizer=ByteTokenizer())  # build_trainable_model reads the vocabulary
TINY = ModelConfig(name="tiny-gpt2", hidden_size=32, num_heads=4, n_layer=2, max_positions=32)
# small parameters (norms, biases; LoRA's A) replicated, the rest sharded: both paths are taken
CONFIGS = {
    "full": TrainConfig(model=TINY, traffic=TrafficConfig(persist_threshold=100)),
    "lora": TrainConfig(model=TINY, lora=LoraSettings(rank=4, init_lora_weights=False),
                        traffic=TrafficConfig(persist_threshold=200)),
    # hidden 35: every sharded region is odd, so rank 1's slices end in padding
    "odd": TrainConfig(model=ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5,
                                         n_layer=2, max_positions=32),
                       traffic=TrafficConfig(persist_threshold=100)),
}
_generation = count(1)


@pytest.fixture(scope="module")
def transports():
    ts = [GrpcTransport(host="127.0.0.1", port=0, token="dp") for _ in range(2)]
    yield ts
    for t in ts:
        t.close()


def engines(transports, name: str, world_size: int):
    """One engine per rank on a fresh generation; models are built here, one after the other
    (the builders seed torch's global generator, which threads would share)."""
    cfg, gen = CONFIGS[name], next(_generation)
    peers = [f"127.0.0.1:{t.port}" for t in transports[:world_size]]
    out = []
    for rank in range(world_size):
        coll = GrpcCollectives.bind(transports[rank], rank=rank, world_size=world_size,
                                    peers=peers, generation=gen, timeout=TIMEOUT)
        out.append(shard_for_training(cfg, build_trainable_model(cfg, DATA), coll, gen))
    return out


def on_ranks(fn, engs):
    """``fn(rank, engine)`` on every rank at once, one thread each; the results by rank."""
    with ThreadPoolExecutor(len(engs)) as pool:
        futures = [pool.submit(fn, r, e) for r, e in enumerate(engs)]
        return [f.result(timeout=4 * TIMEOUT) for f in futures]


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient, gathered from the owned ``master.grad`` slices
    (a collective: every rank calls it); replicated masters' grads are whole everywhere."""
    out = {}
    for unit in engine.units:
        if not unit.trains:
            continue
        key = Key(generation=engine.generation, phase=Phase.GATHER_WEIGHTS,
                  step=engine.step_index, unit=unit.index, index=900)
        grad = unit.master.grad if unit.master.grad is not None else torch.zeros_like(unit.master)
        flat = result(engine.collectives.all_gather(key, grad.detach()), key=key,
                      rank=engine.collectives.rank, timeout=TIMEOUT).reshape(-1).cpu()
        for slot in unit.layout.slots:
            if slot.trainable:
                out[slot.name] = flat[slot.offset:slot.offset + slot.numel].view(slot.shape)
    for (name, _), m in zip(engine.replicated.trainable, engine.replicated.masters):
        out[name] = m.grad.detach().cpu().clone()
    return out


def make_datums(n: int = 7) -> list[Datum]:
    """``n`` rows of different lengths and weight scales (some positions weight 0), so that
    their gradient norms spread; an odd ``n`` pads the last rank at world size 2."""
    g = torch.Generator().manual_seed(5)
    datums = []
    for i in range(n):
        length = 4 + (5 * i) % 13
        tokens = torch.randint(0, 256, (length + 1,), generator=g).tolist()
        w = torch.rand(length, generator=g) * (0.2 + 0.6 * i) / 40
        w[torch.rand(length, generator=g) < 0.2] = 0.0
        datums.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": w.tolist()}))
    return datums


def opacus_reference(name: str, datums: list[Datum]) -> tuple[torch.Tensor, dict, float]:
    """(per-datum norms, clipped summed gradient by name, C) from Opacus in one process; C
    lies between the 3rd and 4th smallest norm, so some datums are clipped and some not."""
    model = build_trainable_model(CONFIGS[name], DATA)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    rows = rank_rows(datums, rank=0, world_size=1)
    b, t = rows.input_ids.shape
    out = gsm(**rows.model_inputs(), position_ids=torch.arange(t).expand(b, t))
    datum_losses(target_logprobs(out.logits, rows.targets), rows.weights).sum().backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(b, -1).norm(dim=1) for _, p in named]).norm(dim=0)
    low = norms.sort().values
    c = float(low[2] + low[3]) / 2
    opt = DPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=c, expected_batch_size=b, loss_reduction="sum")
    opt.pre_step()  # clip_and_accumulate, add_noise (none), scale_grad (none with "sum")
    return norms, {n: p.grad.detach().clone() for n, p in named}, c


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reset(engine) -> None:
    """Drop every gradient and start a new step (no optimizer ran: the weights are the same)."""
    for unit in engine.units:
        unit.master.grad = None
    for m in engine.replicated.masters:
        m.grad = None
    engine.end_step()


@pytest.mark.timeout(90)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus on the embedding
@pytest.mark.parametrize("name, world_size", [("full", 2), ("lora", 2), ("full", 1)])
def test_clipped_gradient_equals_opacus(transports, name, world_size):
    """Two forward_backward requests (4 datums, then 3: rank 1 gets a padding row) accumulate
    the same clipped sum as Opacus over all 7 in one batch."""
    datums = make_datums()
    requests = [datums[:4], datums[4:]]
    norms, want, c = opacus_reference(name, datums)
    assert (norms > c).sum() >= 2 and (norms < c).sum() >= 2, (norms, c)
    engs = engines(transports, name, world_size)
    assert engs[0].replicated.trainable and any(u.trains for u in engs[0].units)

    def dp(rank, engine):
        done = [dp_forward_backward(engine, rank_rows(req, rank=rank, world_size=world_size),
                                    max_grad_norm=c, world_size=world_size) for req in requests]
        engine.clip_grad_norm(None)  # reduces the replicated gradients
        return done, full_grads(engine)

    def plain(rank, engine):
        reset(engine)
        for req in requests:
            rows = rank_rows(req, rank=rank, world_size=world_size)
            out = engine.forward(**rows.model_inputs())
            losses = datum_losses(target_logprobs(out.logits, rows.targets), rows.weights)
            engine.backward(losses.sum() * world_size)
        engine.clip_grad_norm(None)
        return full_grads(engine)

    ran = on_ranks(dp, engs)
    seen, padded = {}, 0
    for rank, (done, _) in enumerate(ran):
        offset = 0
        for req, part in zip(requests, done):
            for i, index in enumerate(rank_rows(req, rank=rank, world_size=world_size).index):
                if index < 0:
                    padded += 1
                    assert part.grad_norms[i] == 0 and part.clip_factors[i] == 1
                else:
                    seen[offset + index] = float(part.grad_norms[i])
            offset += len(req)
    assert padded == (world_size == 2)
    got_norms = torch.tensor([seen[i] for i in range(len(datums))])
    assert torch.allclose(got_norms, norms, rtol=1e-4), (got_norms, norms)
    for rank in range(1, world_size):
        assert max_diff(ran[rank][1], ran[0][1]) == 0.0, "ranks gathered different gradients"
    diff = max_diff(ran[0][1], want)
    print(f"{name} world {world_size}: C={c:.4g}, clipped {int((norms > c).sum())}/"
          f"{len(datums)}, max |engine - opacus| = {diff:.3g}")
    assert diff < 1e-5
    unclipped = max_diff(on_ranks(plain, engs)[0], want)  # negative control: no clipping
    print(f"  without clipping: max diff {unclipped:.3g}")
    assert unclipped > 1e-3
    assert torch.equal(clip_factors(torch.tensor([0.0, c / 2, 4 * c]), c)[:2], torch.ones(2))


@pytest.mark.timeout(60)
def test_noise_has_the_std_once_per_coordinate_and_replicas_agree(transports):
    sigma, c = 0.7, 1.5
    std = sigma * c
    engs = engines(transports, "odd", 2)

    def noised(rank, engine):
        engine.clip_grad_norm(None)  # no backward ran: every gradient is zero
        seed = agree_seed(engine)
        add_noise(engine, noise_multiplier=sigma, max_grad_norm=c, seed=seed)
        owned = [u.master.grad.clone() for u in engine.units]
        replicated = [m.grad.clone() for m in engine.replicated.masters]
        return seed, owned, replicated, [u.owned_real for u in engine.units]

    (seed0, own0, rep0, real0), (seed1, own1, rep1, real1) = on_ranks(noised, engs)
    assert seed0 == seed1 and seed0 > 0
    assert rep0 and all(torch.equal(a, b) for a, b in zip(rep0, rep1)), "replicated noise differs"
    pads = [(g, r) for g, r in zip(own1, real1) if r < g.numel()]
    assert pads, "the odd model should pad rank 1's slices"
    assert all(torch.count_nonzero(g[r:]) == 0 for g, r in pads), "noise landed in padding"
    for a, b, ra in zip(own0, own1, real0):
        assert not torch.equal(a[:ra][:100], b[:100]), "two ranks drew the same sharded noise"
    noise = torch.cat([g[:r] for g, r in zip(own0 + own1, real0 + real1)]
                      + [m.reshape(-1) for m in rep0])
    measured = float(noise.std())
    print(f"noise: {noise.numel()} coordinates, std {measured:.4f} for sigma*C {std:.4f} "
          f"(ratio {measured / std:.4f}), mean {float(noise.mean()):.2e}")
    assert abs(measured / std - 1) < 0.05
    assert abs(float(noise.mean())) < 0.02 * std
    assert not abs(measured / (2 * std) - 1) < 0.05  # negative control: the check can fail
    assert noise.numel() == sum(p.numel() for p in build_trainable_model(CONFIGS["odd"],
                                                                         DATA).parameters())


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # sigma 0's epsilon
def test_ledger_epsilon_is_opacus_rdp_and_survives_a_json_round_trip():
    sigma, q, delta = 1.0, 0.02, 1e-5
    ledger, fresh = PrivacyLedger(), RDPAccountant()
    assert ledger.epsilon(delta) == 0
    for _ in range(50):
        ledger.step(noise_multiplier=sigma, sample_rate=q)
        fresh.step(noise_multiplier=sigma, sample_rate=q)
    eps50 = ledger.epsilon(delta)
    assert eps50 == fresh.get_epsilon(delta=delta) and eps50 > 0
    restored = PrivacyLedger()
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.epsilon(delta) == eps50 and restored.steps == 50
    for _ in range(50):
        restored.step(noise_multiplier=sigma, sample_rate=q)
    eps100 = restored.epsilon(delta)
    assert eps100 > eps50
    metrics = restored.metrics(delta)
    assert metrics == DPMetrics(epsilon_spent=eps100, delta=delta, steps=100)
    print(f"epsilon at delta {delta}: {eps50:.4f} after 50 steps, {eps100:.4f} after 100 "
          f"(sigma {sigma}, q {q})")
    noiseless = PrivacyLedger()
    noiseless.step(noise_multiplier=0.0, sample_rate=q)
    assert math.isinf(noiseless.epsilon(delta))  # no noise: no privacy
    with pytest.raises(ValueError, match="expected 'rdp'"):
        PrivacyLedger().load_state_dict({"mechanism": "prv", "history": []})

