"""Heterogeneous-rank LoRA merging (worker/islands/lora_merge.py) against an independent
one-process computation: numpy's float64 SVD of the token-weighted mean of the products.

Products s_j B_j A_j are compared, never factors (SVD signs are arbitrary). Each check is
shown rejecting a wrong answer (a plain mean, a dropped scale, a rank too low)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.islands.lora_merge import SiteAdapter, merge_adapter_states, merge_lora_products

OUT, IN = 48, 40


def factors(rank: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = (torch.randn(OUT, rank, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    a = (torch.randn(rank, IN, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    return b, a


def product(b, a, scale) -> np.ndarray:
    return scale * (b.double().numpy() @ a.double().numpy())


def reference(sites: list[SiteAdapter], rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, best rank-``rank`` approximation of M, M's singular values), by numpy alone."""
    total = sum(s.weight for s in sites)
    m = sum(s.weight * product(s.B, s.A, s.scale) for s in sites) / total
    u, sv, vt = np.linalg.svd(m)
    return m, (u[:, :rank] * sv[:rank]) @ vt[:rank], sv


def err(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x - y).max())


def hetero_sites() -> list[SiteAdapter]:
    (b4, a4), (b16, a16) = factors(4, 1), factors(16, 2)
    return [SiteAdapter(b4, a4, 16 / 4, 1200.0), SiteAdapter(b16, a16, 32 / 16, 3400.0)]


@pytest.mark.timeout(60)
def test_ranks_4_and_16_match_numpy_svd_of_the_weighted_mean():
    sites = hetero_sites()
    merged = merge_lora_products(sites, [4, 16], [4.0, 2.0])
    for (b, a), rank, scale, site in zip(merged, (4, 16), (4.0, 2.0), sites):
        assert b.shape == (OUT, rank) and a.shape == (rank, IN) and b.dtype == site.B.dtype
        _, best, _ = reference(sites, rank)
        assert err(product(b, a, scale), best) < 1e-5
        _, worse, _ = reference(sites, rank - 1)
        assert err(product(b, a, scale), worse) > 1e-3  # the check bites: rank - 1 is rejected


@pytest.mark.timeout(60)
def test_exact_when_the_mean_has_rank_at_most_r_and_eckart_young_tail_otherwise():
    b, a = factors(8, 3, torch.float64)
    same = [SiteAdapter(b, a, 2.0, w) for w in (5.0, 1.0, 2.0)]  # identical adapters everywhere
    for (bj, aj), scale in zip(merge_lora_products(same, [8, 16, 12], [2.0, 0.5, 1.0]),
                               (2.0, 0.5, 1.0)):
        assert err(product(bj, aj, scale), product(b, a, 2.0)) < 1e-6
    shared_b = factors(4, 4, torch.float64)[0]  # equal ranks, one B: M = B (Σ c_i A_i), rank 4
    sites = [SiteAdapter(shared_b, factors(4, seed, torch.float64)[1], 2.0, w)
             for seed, w in ((5, 1.0), (6, 2.0))]
    m, _, _ = reference(sites, 4)
    for bj, aj in merge_lora_products(sites, [4, 4], [2.0, 2.0]):
        assert err(product(bj, aj, 2.0), m) < 1e-6
    b16, a16 = factors(16, 7, torch.float64)  # negative control: rank 16 truncated to 4
    full = [SiteAdapter(b16, a16, 1.0, 1.0)]
    (bj, aj), = merge_lora_products(full, [4], [1.0])
    m, _, sv = reference(full, 4)
    lost = float(np.linalg.norm(product(bj, aj, 1.0) - m))
    assert lost > 1e-3
    assert abs(lost - float(np.sqrt((sv[4:] ** 2).sum()))) < 1e-6


@pytest.mark.timeout(60)
def test_token_weights_1_and_3_give_a_quarter_and_three_quarters_not_the_plain_mean():
    (b1, a1), (b2, a2) = factors(4, 8, torch.float64), factors(4, 9, torch.float64)
    sites = [SiteAdapter(b1, a1, 1.0, 1.0), SiteAdapter(b2, a2, 1.0, 3.0)]
    (bj, aj), _ = merge_lora_products(sites, [8, 8], [1.0, 1.0])  # rank 8 holds M exactly
    got = product(bj, aj, 1.0)
    p1, p2 = product(b1, a1, 1.0), product(b2, a2, 1.0)
    assert err(got, 0.25 * p1 + 0.75 * p2) < 1e-6
    assert err(got, 0.5 * p1 + 0.5 * p2) > 1e-3  # the plain mean is rejected by the same check


@pytest.mark.timeout(60)
def test_the_scaled_product_matches_with_different_alphas_and_ranks_including_rslora():
    (b4, a4), (b8, a8) = factors(4, 10, torch.float64), factors(8, 11, torch.float64)
    for s4, s8 in ((8 / 4, 32 / 8), (8 / 4 ** 0.5, 32 / 8 ** 0.5)):  # lora_alpha / r, rslora
        sites = [SiteAdapter(b4, a4, s4, 1.0), SiteAdapter(b8, a8, s8, 1.0)]
        m = (product(b4, a4, s4) + product(b8, a8, s8)) / 2
        for (bj, aj), scale in zip(merge_lora_products(sites, [12, 12], [s4, s8]), (s4, s8)):
            assert err(product(bj, aj, scale), m) < 1e-6  # s_j B_j A_j is M ...
            assert err(product(bj, aj, 1.0), m) > 1e-3  # ... and B_j A_j alone is not
        plain = (product(b4, a4, 1.0) + product(b8, a8, 1.0)) / 2
        assert err(m, plain) > 1e-3  # the input scales matter too


@pytest.mark.timeout(60)
def test_the_split_is_symmetric_neither_factor_dominates():
    sites = hetero_sites()
    _, _, sv = reference(sites, 16)
    for (b, a), rank, scale in zip(merge_lora_products(sites, [4, 16], [1.0, 2.5]), (4, 16),
                                   (1.0, 2.5)):
        b, a = b.double(), a.double()
        gram = torch.from_numpy(sv[:rank] / scale).diag()
        assert torch.allclose(b.T @ b, gram, atol=1e-6)  # B^T B = A A^T = diag(S_r / s_j)
        assert torch.allclose(a @ a.T, gram, atol=1e-6)
        if scale == 1.0:
            assert abs(b.norm() - a.norm()) < 1e-6 * a.norm()


@pytest.mark.timeout(60)
def test_a_zero_mean_keeps_a_trainable_and_outputs_keep_each_sites_dtype():
    zero = [SiteAdapter(torch.zeros(OUT, 4), factors(4, 12)[1], 2.0, 1.0),
            SiteAdapter(torch.zeros(OUT, 8, dtype=torch.bfloat16),
                        factors(8, 13, torch.bfloat16)[1], 1.0, 1.0)]
    for (b, a), rank, site in zip(merge_lora_products(zero, [4, 8], [2.0, 1.0]), (4, 8), zero):
        assert b.dtype == a.dtype == site.B.dtype
        assert not b.any()  # the product stays zero ...
        assert torch.allclose(a.double() @ a.double().T, torch.eye(rank, dtype=torch.float64),
                              atol=1e-2)  # ... but A is orthonormal, not a dead zero
    b4, a4 = factors(4, 18, torch.float64)  # rank 16 from one rank-4 site: 12 extra directions
    (b, a), = merge_lora_products([SiteAdapter(b4, a4, 1.0, 1.0)], [16], [1.0])
    assert err(product(b, a, 1.0), product(b4, a4, 1.0)) < 1e-12
    assert not b[:, 4:].any()
    assert torch.allclose(a[4:] @ a[4:].T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a[4:] @ a[:4].T, torch.zeros(12, 4, dtype=torch.float64), atol=1e-12)


def gpt2_lora(rank: int, seed: int):
    from peft import LoraConfig, get_peft_model  # lazy: transformers and peft take seconds
    from transformers import GPT2Config, GPT2LMHeadModel  # lazy: as above

    torch.manual_seed(0)  # the same base at every site
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                      bos_token_id=0, eos_token_id=0))
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules=["c_attn"],
                                           init_lora_weights=False))


def merged_weights(model, state) -> dict[str, torch.Tensor]:
    from peft import set_peft_model_state_dict  # lazy: as above

    set_peft_model_state_dict(model, state)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items() if "c_attn" in k}


@pytest.mark.timeout(60)
def test_peft_gpt2_r4_and_r8_states_merge_to_the_same_model_when_m_has_rank_4():
    from peft import get_peft_model_state_dict  # lazy: as above

    models = [gpt2_lora(4, 1), gpt2_lora(8, 2)]
    states = [{k: v.detach().clone() for k, v in get_peft_model_state_dict(m).items()}
              for m in models]  # clones: the state dict shares storage with the model
    for key in states[1]:  # site 2's r=8 product shares site 1's column space: M has rank 4
        if ".lora_B." in key:
            states[1][key][:, :4] = states[0][key]
            states[1][key][:, 4:] = 0.0
    scales, weights = [8 / 4, 8 / 8], [100.0, 300.0]
    merged = merge_adapter_states(states, scales=scales, weights=weights)
    for state, out in zip(states, merged):
        assert list(out) == list(state)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in state.items()}
    before = merged_weights(gpt2_lora(4, 1), states[0])
    after = [merged_weights(gpt2_lora(r, 9), out) for r, out in zip((4, 8), merged)]
    for key in after[0]:
        assert (after[0][key] - after[1][key]).abs().max() < 1e-5, key
    for layer in (0, 1):  # and both are W + M^T (GPT-2's Conv1D stores W as (in, out))
        pre = f"base_model.model.transformer.h.{layer}.attn.c_attn."
        m = sum(w / sum(weights) * product(st[pre + "lora_B.weight"], st[pre + "lora_A.weight"], s)
                for st, s, w in zip(states, scales, weights))
        base = models[0].state_dict()[pre + "base_layer.weight"].double().numpy()
        assert err(after[0][f"transformer.h.{layer}.attn.c_attn.weight"].double().numpy(),
                   base + m.T) < 1e-5
    assert any((after[0][k] - before[k]).abs().max() > 1e-3 for k in before)  # it did change
    general = merge_adapter_states([get_peft_model_state_dict(m) for m in models], scales=scales,
                                   weights=weights)  # M of rank 12: r=8 is closer, they differ
    apart = [merged_weights(gpt2_lora(r, 9), out) for r, out in zip((4, 8), general)]
    assert max((apart[0][k] - apart[1][k]).abs().max() for k in apart[0]) > 1e-4


@pytest.mark.timeout(60)
def test_other_keys_are_averaged_and_embedding_lora_merges_as_a_product():
    (b1, a1), (b2, a2) = factors(2, 14), factors(6, 15)
    head = [torch.full((3, 8), 1.0), torch.full((3, 8), 5.0)]
    states = [{"m.wte.lora_embedding_A": a1, "m.wte.lora_embedding_B": b1, "m.score.weight": head[0]},
              {"m.wte.lora_embedding_A.default": a2, "m.wte.lora_embedding_B.default": b2,
               "m.score.weight": head[1]}]
    with pytest.raises(ValueError, match=r"site 1 lacks LoRA module m\.wte \(embedding\)"):
        merge_adapter_states(states, scales=[1.0, 1.0], weights=[1.0, 3.0])  # naming differs
    states[1] = {"m.wte.lora_embedding_A": a2, "m.wte.lora_embedding_B": b2,
                 "m.score.weight": head[1]}
    out = merge_adapter_states(states, scales=[1.0, 2.0], weights=[1.0, 3.0], ranks_out=[8, 8])
    m = 0.25 * product(b1, a1, 1.0) + 0.75 * product(b2, a2, 2.0)
    got = product(out[0]["m.wte.lora_embedding_B"], out[0]["m.wte.lora_embedding_A"], 1.0)
    assert err(got, m) < 1e-5
    assert torch.equal(out[1]["m.score.weight"], torch.full((3, 8), 4.0))


@pytest.mark.timeout(60)
def test_errors_name_the_site_the_key_and_the_shapes():
    (b4, a4), (b8, a8) = factors(4, 16), factors(8, 17)
    ok = {"x.lora_A.weight": a4, "x.lora_B.weight": b4}
    with pytest.raises(ValueError, match=r"site 1 lacks LoRA module x that site 0 has"):
        merge_adapter_states([ok, {"y.lora_A.weight": a8, "y.lora_B.weight": b8}],
                             scales=[1.0, 1.0], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"site 1 has key 'head.weight' that site 0 lacks"):
        merge_adapter_states([ok, {**ok, "head.weight": torch.zeros(2)}], scales=[1.0, 1.0],
                             weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"site 0: LoRA module 'x' has 'x.lora_A.weight' but no "
                                         r"lora_B"):
        merge_adapter_states([{"x.lora_A.weight": a4}], scales=[1.0], weights=[1.0])
    wide = {"x.lora_A.weight": a8, "x.lora_B.weight": torch.zeros(OUT + 1, 8)}
    with pytest.raises(ValueError, match=r"x\.lora_A\.weight.*site 1: B has shape \(49, 8\), "
                                         r"expected \(48, 8\)"):
        merge_adapter_states([ok, wide], scales=[1.0, 1.0], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"site 1: B has shape \(48, 4\), expected \(48, 8\)"):
        merge_lora_products([SiteAdapter(b4, a4, 1.0, 1.0), SiteAdapter(b4, a8, 1.0, 1.0)],
                            [4, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"site 1: A has shape \(8, 41\), expected \(8, 40\)"):
        merge_lora_products([SiteAdapter(b4, a4, 1.0, 1.0),
                             SiteAdapter(b8, torch.zeros(8, IN + 1), 1.0, 1.0)], [4, 4], [1, 1])
    with pytest.raises(ValueError, match=r"site 1: output rank 41 must be in .* = \[1, 40\]"):
        merge_lora_products([SiteAdapter(b4, a4, 1.0, 1.0)] * 2, [4, 41], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights sum to 0"):
        merge_lora_products([SiteAdapter(b4, a4, 1.0, 0.0)], [4], [1.0])
    with pytest.raises(ValueError, match=r"site 0: weight must be finite"):
        merge_lora_products([SiteAdapter(b4, a4, 1.0, float("nan"))], [4], [1.0])
    with pytest.raises(ValueError, match=r"at least one site"):
        merge_lora_products([], [], [])
