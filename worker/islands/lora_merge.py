"""Heterogeneous-rank LoRA aggregation for federated rounds across sites (FlexLoRA-style).

Each site i trained a peft adapter of its own rank r_i; for one adapted module its update is
ΔW_i = s_i · B_i A_i (``lora_B`` weight (out, r_i), ``lora_A`` weight (r_i, in), s_i the
scaling: lora_alpha / r_i, or lora_alpha / sqrt(r_i) with rslora). Factors of different ranks
cannot be averaged, so we average the *products*, M = Σ w_i ΔW_i / Σ w_i (w_i: tokens the site
trained on since the last round), and hand site j the best rank-r_j approximation of M, which by
Eckart–Young is the truncated SVD U_r S_r V_r^T (FlexLoRA, Bai et al. 2024, arXiv:2402.11505).

[Note: the factors]
    The returned factors satisfy s_j · B_j A_j = U_r S_r V_r^T with the split made symmetric,
    B_j = U_r sqrt(S_r / s_j) and A_j = sqrt(S_r / s_j) V_r^T (so B_j^T B_j = A_j A_j^T), so
    that neither factor dominates the next round's gradients. A direction whose singular value
    is zero (M of rank < r_j, e.g. a round where nobody trained) gets a zero column in B_j and a
    unit row of A_j orthogonal to the others: the product is unchanged, and the direction can
    still learn (both factors zero would be a saddle with zero gradient, dead for good).

The SVD never forms M: M = (Σ c_i B_i)(A_i stacked) with c_i = w_i s_i / Σ w, so two thin QRs
and an SVD of an R×R core (R = Σ r_i) give it in O((out + in) R²), in float64. Results come
back in each site's own dtype and device.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# peft state-dict names: ``<prefix>.lora_A[.<adapter>].weight`` (Linear, GPT-2 Conv1D) and
# ``<prefix>.lora_embedding_A[.<adapter>]`` (Embedding; same (out, r) @ (r, in) product shape).
_LORA_KEY = re.compile(
    r"^(?P<prefix>.+)\.(?:lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|lora_embedding_(?P<ekind>[AB])(?:\.(?P<eadapter>[^.]+))?)$")


@dataclass(frozen=True, slots=True)
class SiteAdapter:
    """One site's LoRA factors for one module: B (out, r), A (r, in), its scaling s (so that
    ΔW = s · B A) and its weight in the average (tokens trained on since the last round)."""

    B: Tensor
    A: Tensor
    scale: float
    weight: float


def _check_sites(sites: Sequence[SiteAdapter]) -> tuple[int, int]:
    if not sites:
        raise ValueError("merge_lora_products needs at least one site")
    out_f, in_f = None, None
    for i, site in enumerate(sites):
        if site.B.ndim != 2 or site.A.ndim != 2:
            raise ValueError(f"site {i}: B and A must be 2-D, got B {tuple(site.B.shape)} and "
                             f"A {tuple(site.A.shape)}")
        if not (site.B.is_floating_point() and site.A.is_floating_point()):
            raise ValueError(f"site {i}: B and A must be floating point, got {site.B.dtype}, "
                             f"{site.A.dtype}")
        if out_f is None:
            out_f, in_f = site.B.shape[0], site.A.shape[1]
        expected_b = (out_f, site.A.shape[0])
        if tuple(site.B.shape) != expected_b:
            raise ValueError(f"site {i}: B has shape {tuple(site.B.shape)}, expected {expected_b} "
                             f"(out={out_f} as site 0, columns = A's {site.A.shape[0]} rows)")
        if site.A.shape[1] != in_f:
            raise ValueError(f"site {i}: A has shape {tuple(site.A.shape)}, expected "
                             f"({site.A.shape[0]}, {in_f}) (in={in_f} as site 0)")
        if not math.isfinite(site.scale):
            raise ValueError(f"site {i}: scale must be finite, got {site.scale}")
        if not (math.isfinite(site.weight) and site.weight >= 0):
            raise ValueError(f"site {i}: weight must be finite and >= 0, got {site.weight}")
    total = sum(site.weight for site in sites)
    if not total > 0:
        raise ValueError(f"the site weights sum to {total}; at least one site must have trained "
                         f"(weights {[s.weight for s in sites]})")
    return out_f, in_f


def _mean_svd(sites: Sequence[SiteAdapter]) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, V^T of M = Σ w_i s_i B_i A_i / Σ w_i, thin, in float64, without forming M."""
    device = sites[0].B.device
    total = sum(site.weight for site in sites)
    live = [s for s in sites if s.weight > 0]
    b_cat = torch.cat([s.B.to(device, torch.float64) * (s.weight * s.scale / total) for s in live],
                      dim=1)
    a_cat = torch.cat([s.A.to(device, torch.float64) for s in live], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, kb), (kb, R)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, ka), (ka, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def _complete_rows(vh: Tensor, rows: int) -> Tensor:
    """``rows`` unit rows orthogonal to the (orthonormal) rows of ``vh`` and to each other."""
    gen = torch.Generator().manual_seed(0)  # fixed: the same call gives the same factors
    filler = torch.randn(vh.shape[1], rows, generator=gen, dtype=torch.float64).to(vh.device)
    q, _ = torch.linalg.qr(torch.cat([vh.T, filler], dim=1))
    return q[:, vh.shape[0]:].T


def merge_lora_products(sites: Sequence[SiteAdapter], ranks_out: Sequence[int],
                        scales_out: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
    """One module: the token-weighted mean of the sites' products s_i B_i A_i, truncated for each
    site j to its best rank-``ranks_out[j]`` approximation (Eckart–Young), as (B_j, A_j) with
    ``scales_out[j] · B_j A_j`` equal to it, split symmetrically (see the module's note).

    One output per site (a site joining late can be passed with weight 0); output j is in site
    j's dtype and on its device. Correct for equal ranks too, where it equals FedAvg of products
    whenever M's rank is <= r_j."""
    out_f, in_f = _check_sites(sites)
    if len(ranks_out) != len(sites) or len(scales_out) != len(sites):
        raise ValueError(f"one output rank and scale per site: {len(sites)} sites, "
                         f"{len(ranks_out)} ranks_out, {len(scales_out)} scales_out")
    for j, (rank, scale) in enumerate(zip(ranks_out, scales_out)):
        if not 1 <= rank <= min(out_f, in_f):
            raise ValueError(f"site {j}: output rank {rank} must be in [1, min(out, in)] = "
                             f"[1, {min(out_f, in_f)}] for a ({out_f}, {in_f}) module")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"site {j}: output scale must be finite and > 0, got {scale}")
    u, s, vh = _mean_svd(sites)
    tol = (s[0].item() if s.numel() else 0.0) * max(out_f, in_f) * torch.finfo(torch.float64).eps
    results = []
    for j, (rank, scale) in enumerate(zip(ranks_out, scales_out)):
        k = min(rank, s.numel())
        root = torch.sqrt(s[:k] / scale)
        b = u[:, :k] * root
        a = root[:, None] * vh[:k]
        dead = s[:k] <= tol
        b[:, dead] = 0.0  # a zero direction: B column 0, A row unit (see [Note: the factors])
        a[dead] = vh[:k][dead]
        if k < rank:
            b = torch.cat([b, b.new_zeros(out_f, rank - k)], dim=1)
            a = torch.cat([a, _complete_rows(vh[:k], rank - k)], dim=0)
        kept = float(s[:k].square().sum()) / max(float(s.square().sum()), 1e-300)
        log.debug("site %d: rank %d keeps %.6f of the merged update's energy", j, rank, kept)
        like = sites[j].B
        results.append((b.to(like.device, like.dtype), a.to(sites[j].A.device, sites[j].A.dtype)))
    return results


def _split_keys(state: Mapping[str, Tensor], site: int) -> tuple[dict, list[str]]:
    """{(prefix, adapter, style): {"A": key, "B": key}} and the other keys, in state order."""
    modules: dict[tuple, dict[str, str]] = {}
    others = []
    for key in state:
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        style = "embedding" if match["ekind"] else "linear"
        kind = match["kind"] or match["ekind"]
        adapter = match["adapter"] if style == "linear" else match["eadapter"]
        modules.setdefault((match["prefix"], adapter, style), {})[kind] = key
    for (prefix, _, _), pair in modules.items():
        if len(pair) != 2:
            have = next(iter(pair.values()))
            raise ValueError(f"site {site}: LoRA module {prefix!r} has {have!r} but no "
                             f"lora_{'B' if 'A' in pair else 'A'} partner")
    return modules, others


def _name(module: tuple) -> str:
    prefix, adapter, style = module
    return prefix + (f" (adapter {adapter!r})" if adapter else "") + (
        " (embedding)" if style == "embedding" else "")


def _check_same_set(found: list, what: str) -> None:
    ref = found[0]
    for i, keys in enumerate(found[1:], start=1):
        missing = [k for k in ref if k not in keys]
        if missing:
            name = _name(missing[0]) if what == "LoRA module" else repr(missing[0])
            raise ValueError(f"site {i} lacks {what} {name} that site 0 has "
                             f"({len(missing)} missing)")
        extra = [k for k in keys if k not in ref]
        if extra:
            name = _name(extra[0]) if what == "LoRA module" else repr(extra[0])
            raise ValueError(f"site {i} has {what} {name} that site 0 lacks ({len(extra)} extra)")


def _average(states: Sequence[Mapping[str, Tensor]], key: str, weights: Sequence[float]) -> Tensor:
    ref = states[0][key]
    for i, state in enumerate(states):
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"site {i}: {key!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(ref.shape)} (as site 0) to average it element-wise")
        if not t.is_floating_point():
            raise ValueError(f"site {i}: {key!r} is {t.dtype}; only floating tensors are averaged")
    total = sum(weights)
    return sum(state[key].to(ref.device, torch.float64) * (w / total)
               for state, w in zip(states, weights) if w > 0)


def merge_adapter_states(states: Sequence[Mapping[str, Tensor]], *, scales: Sequence[float],
                         weights: Sequence[float], ranks_out: Sequence[int] | None = None,
                         scales_out: Sequence[float] | None = None) -> list[dict[str, Tensor]]:
    """Merge the sites' peft adapter state dicts (``get_peft_model_state_dict``): one new state
    per site, with the same keys (and, by default, ranks) as that site's own, ready for
    ``set_peft_model_state_dict``.

    ``lora_A``/``lora_B`` pairs (with or without the adapter-name segment; ``lora_embedding_A/B``
    alike) are merged as products by :func:`merge_lora_products`; every other key (a classifier
    head from ``modules_to_save``, a bias, a DoRA magnitude) is the weighted element-wise mean.
    ``scales[i]`` is site i's scaling s_i for all its modules; ``weights[i]`` its tokens.
    ``ranks_out`` defaults to each site's own rank per module and ``scales_out`` to ``scales``;
    if you change a site's rank, pass its matching scale (alpha / r) too. Every state must hold
    the same modules and other keys."""
    n = len(states)
    if n == 0:
        raise ValueError("merge_adapter_states needs at least one state")
    for label, values in (("scales", scales), ("weights", weights), ("ranks_out", ranks_out),
                          ("scales_out", scales_out)):
        if values is not None and len(values) != n:
            raise ValueError(f"{label} has {len(values)} entries for {n} states")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be finite, >= 0 and sum to > 0, got {list(weights)}")
    scales_out = scales if scales_out is None else scales_out
    split = [_split_keys(state, i) for i, state in enumerate(states)]
    _check_same_set([modules for modules, _ in split], "LoRA module")
    _check_same_set([others for _, others in split], "key")
    if not split[0][0]:
        log.warning("no LoRA A/B pairs in the adapter states; only averaging %d other keys",
                    len(split[0][1]))
    merged: list[dict[str, Tensor]] = [{} for _ in states]
    for module in split[0][0]:
        keys = [modules[module] for modules, _ in split]
        sites = [SiteAdapter(state[k["B"]], state[k["A"]], float(scale), float(weight))
                 for state, k, scale, weight in zip(states, keys, scales, weights)]
        ranks = [site.A.shape[0] for site in sites] if ranks_out is None else ranks_out
        try:
            pairs = merge_lora_products(sites, ranks, scales_out)
        except ValueError as err:
            raise ValueError(f"LoRA module {_name(module)} (keys {keys[0]['A']!r}, "
                             f"{keys[0]['B']!r}): {err}") from err
        for j, (b, a) in enumerate(pairs):
            merged[j][keys[j]["B"]], merged[j][keys[j]["A"]] = b, a
    for key in split[0][1]:
        mean = _average(states, key, weights)
        for j, state in enumerate(states):
            merged[j][key] = mean.to(state[key].device, state[key].dtype)
    return [{key: out[key] for key in state} for out, state in zip(merged, states)]
