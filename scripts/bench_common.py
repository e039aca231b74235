"""What the training benchmarks share: the GPT-2-shaped model and its seeded random batches."""

from __future__ import annotations

from datetime import timedelta

import torch

from worker.data.batching import per_rank_rows

WAIT = timedelta(seconds=120)  # rendezvous deadline of every benchmark process


def build_gpt2(*, layers: int, hidden: int, seq_len: int):
    """A GPT-2 with a byte vocabulary, no dropout, seeded weights (same on every rank)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=257, n_positions=seq_len, n_embd=hidden, n_layer=layers,
                     n_head=max(hidden // 64, 1), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def random_rows(*, step: int, rows: int, seq_len: int, rank: int, world: int) -> dict:
    """This rank's share of step ``step``'s global batch of seeded random tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 257, (rows, seq_len), generator=g)
    b = per_rank_rows(rows, world)
    ids = ids[rank * b : (rank + 1) * b]
    return {"input_ids": ids, "labels": ids}


def grpc_rendezvous(store, *, rank: int, world: int, timeout: float = 120.0):
    """Our gRPC transport on a free port, peers' addresses swapped through the TCPStore, and a
    ready barrier so nobody sends before every rank has bound generation 1."""
    from communication.grpc_collectives import GrpcCollectives
    from communication.grpc_transport import GrpcTransport

    transport = GrpcTransport(host="127.0.0.1", port=0, token="bench")
    store.set(f"addr/{rank}", f"127.0.0.1:{transport.port}")
    store.wait([f"addr/{r}" for r in range(world)], WAIT)
    peers = [store.get(f"addr/{r}").decode() for r in range(world)]
    coll = GrpcCollectives.bind(transport, rank=rank, world_size=world, peers=peers, generation=1,
                                 timeout=timeout)
    store.set(f"ready/{rank}", "1")
    store.wait([f"ready/{r}" for r in range(world)], WAIT)
    return transport, coll


def run_ranks(argv: list[str], world: int, *, timeout: float) -> list[list[str]]:
    """Run ``argv --rank r`` for every rank under one deadline; each rank's output lines. A rank
    that fails, or the deadline, stops every rank and names the failing one (launcher.supervise)."""
    from worker.cluster.launcher import spawn, supervise

    children = [spawn(f"rank{r}", [*argv, "--rank", str(r)], echo=False)[0] for r in range(world)]
    supervise(children, timeout=timeout)
    return [child.lines for child in children]
