"""Single-process DiLoCo: the islands trained one after another in one process, the baseline of
the islands parity test (worker/islands/outer.py is what it checks).

Each island is a ``SingleProcess`` on its share of every step's rows (island i reads rank i of
I, as the distributed islands' workers together do), with its own inner optimizer that lives
across rounds. Every ``outer_every`` steps the pseudo-gradients ``global - local`` of the
islands in the round are summed in site order and averaged, ``torch.optim.SGD`` (the outer
optimizer) steps the global copy, and every island in the round restarts from it. A round may
name the islands present and which of them join (a re-formed island: it trained nothing, takes
the global copy and starts a fresh inner optimizer), so a run with a lost worker can be
replayed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from harness.reference import SingleProcess
from worker.islands.lora_merge import merge_adapter_states
from worker.train.config import TrainConfig


@dataclass(slots=True, kw_only=True)
class DilocoResult:
    """Per-island inner losses by step, and the final global weights by name."""

    losses: dict[str, dict[int, float]]
    weights: dict[str, torch.Tensor]


def train_reference_diloco(config: TrainConfig,
                           build: Callable[[], tuple] | dict[str, Callable[[], tuple]],
                           quorums: Sequence[Sequence[tuple[str, bool]]] | None = None,
                           ) -> DilocoResult:
    """DiLoCo over ``config.islands.sites`` for ``config.steps`` inner steps. ``build()`` gives
    (data, model) for one island, identical every call (or one per site: private data, read
    whole by its site, and the mean weighs sites by tokens). ``quorums[k-1]``: the (site,
    joining) pairs of round k (default: every site, none joining)."""
    islands = config.islands
    sites, every = list(islands.sites), islands.outer_every
    count = len(sites)
    runs = {}
    for i, site in enumerate(sites):
        if isinstance(build, dict):
            data, model = build[site]()
            runs[site] = SingleProcess(config, model, data)
        else:
            data, model = build()
            runs[site] = SingleProcess(config, model, data, rank=i, world_size=count,
                                       rows=count * config.micro_batch_rows)
    tokens = float(every * config.micro_batch_rows * config.data.seq_len)
    first = runs[sites[0]]
    globals_ = [torch.nn.Parameter(m.detach().clone()) for m in first.masters]
    outer = torch.optim.SGD(globals_, lr=islands.outer_lr, momentum=islands.outer_momentum,
                            nesterov=islands.outer_nesterov and islands.outer_momentum > 0,
                            foreach=False)
    losses: dict[str, dict[int, float]] = {s: {} for s in sites}
    for k in range(1, config.steps // every + 1):
        quorum = sorted(quorums[k - 1] if quorums is not None else [(s, False) for s in sites])
        contributors = [s for s, joining in quorum if not joining]
        for site in contributors:
            for step in range((k - 1) * every, k * every):
                losses[site][step] = runs[site].step(step)[0]
        if contributors:
            weight = tokens if islands.private_data else 1.0
            with torch.no_grad():
                total = None
                for site in contributors:  # summed in site order, as the group's rank order
                    pseudo = torch.cat([(g - m).reshape(-1) for g, m in
                                        zip(globals_, runs[site].masters)])
                    pseudo = pseudo * weight if weight != 1.0 else pseudo
                    total = pseudo if total is None else total + pseudo
                mean = total / (weight * len(contributors))
                offset = 0
                for g in globals_:
                    g.grad = mean[offset:offset + g.numel()].view_as(g).clone()
                    offset += g.numel()
            outer.step()
            outer.zero_grad(set_to_none=True)
        for site, joining in quorum:
            runs[site].load_masters([g.detach() for g in globals_])
            if joining:
                runs[site].restart_optimizer(at_step=k * every)
    names = [n for n, _ in first.named]
    return DilocoResult(losses=losses,
                        weights={n: g.detach().cpu().clone() for n, g in zip(names, globals_)})


def train_reference_federated(configs: dict[str, TrainConfig],
                              builds: dict[str, Callable[[], tuple]]) -> dict[str, dict]:
    """Federated LoRA with a rank per site: each site trains its own data (all of its rows),
    and every ``outer_every`` steps the token-weighted mean of the sites' products s B A is
    handed back to each site at its own rank (lora_merge.py). Final trainable weights by site."""
    sites = sorted(configs)
    runs = {}
    for site in sites:
        data, model = builds[site]()
        runs[site] = SingleProcess(configs[site], model, data)
    first = configs[sites[0]]
    every = first.islands.outer_every
    for k in range(1, first.steps // every + 1):
        tokens = {}
        for site in sites:
            run = runs[site]
            for step in range((k - 1) * every, k * every):
                run.step(step)
            tokens[site] = float(every * run.config.micro_batch_rows * run.config.data.seq_len)
        states = [runs[s].weights() for s in sites]
        ranks = [configs[s].lora.rank for s in sites]
        scales = [configs[s].lora.alpha / configs[s].lora.rank for s in sites]
        merged = merge_adapter_states(states, scales=scales, weights=[tokens[s] for s in sites],
                                      ranks_out=ranks, scales_out=scales)
        for site, state in zip(sites, merged):
            run = runs[site]
            run.load_masters([state[n] for n, _ in run.named])
    return {site: runs[site].weights() for site in sites}
