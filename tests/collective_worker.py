"""One rank of the shared collectives suite, run as a real process by test_collectives.py.

Both backends run the same cases: every case's inputs are a pure function of (case, rank), so
the test process rebuilds them and computes the one-process reference itself. All cases are
launched before any is awaited, so many collectives with different keys are in flight at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from communication.collectives import CollectiveError, Key, Phase  # noqa: E402

WAIT = timedelta(seconds=60)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One collective: op, logical length per rank (not always divisible), dtype."""

    index: int
    op: str  # all_gather | reduce_scatter | all_reduce | shift | barrier
    numel: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.index}-{self.op}-{self.numel}-{self.dtype}"


def cases() -> list[Case]:
    """The matrix every backend and world size runs: odd sizes, multi-chunk sizes, 3 dtypes."""
    out: list[Case] = []
    for dtype in DTYPES:
        for op, sizes in (("all_gather", (1, 7, 1000, 300_001)),
                          ("reduce_scatter", (1, 13, 4099, 700_003)),
                          ("all_reduce", (1, 5)),
                          ("shift", (1, 9, 300_001))):
            for n in sizes:
                out.append(Case(index=len(out), op=op, numel=n, dtype=dtype))
    out.append(Case(index=len(out), op="barrier", numel=0, dtype="float32"))
    return out


def padded(n: int, world_size: int) -> int:
    return -(-n // world_size) * world_size


def make_input(case: Case, rank: int, world_size: int) -> torch.Tensor:
    """The tensor `rank` contributes: a reduce-scatter input is padded with zeros to W*S."""
    gen = torch.Generator().manual_seed(1000 * case.index + rank)
    n = case.numel
    if case.op == "reduce_scatter":
        full = torch.zeros(padded(n, world_size))
        full[:n] = torch.randn(n, generator=gen)
        return full.to(DTYPES[case.dtype])
    return torch.randn(n, generator=gen).to(DTYPES[case.dtype])


def key_of(case: Case, generation: int) -> Key:
    phase = {"all_gather": Phase.GATHER_FORWARD, "reduce_scatter": Phase.REDUCE_SCATTER,
             "all_reduce": Phase.ALL_REDUCE, "shift": Phase.BUDDY_SHIFT,
             "barrier": Phase.BARRIER}[case.op]
    return Key(generation=generation, step=0, unit=case.index, micro_batch=0, phase=phase)


def launch_case(coll, case: Case, generation: int, device: str = "cpu"):
    key = key_of(case, generation)
    if case.op == "barrier":
        return coll.barrier(key)
    x = make_input(case, coll.rank, coll.world_size).to(device)
    return getattr(coll, case.op)(key, x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(backend: str, rank: int, n: int, store, timeout: float, codec: str):
    """The Collectives object for this rank, rendezvousing through the test's store."""
    if backend == "grpc":
        from communication.grpc_collectives import GrpcCollectives
        from communication.grpc_transport import GrpcTransport

        transport = GrpcTransport(host="127.0.0.1", port=0, token="suite")
        store.set(f"addr/{rank}", transport.address)
        store.wait([f"addr/{r}" for r in range(n)], WAIT)
        peers = [store.get(f"addr/{r}").decode() for r in range(n)]
        coll = GrpcCollectives.bind(transport, rank=rank, world_size=n, peers=peers, generation=1,
                                     timeout=timeout, codec=codec)
        return coll, transport, peers[rank]
    from communication.torch_collectives import TorchCollectives

    if rank == 0:
        store.set("torch_store", f"127.0.0.1:{free_port()}")
    store.wait(["torch_store"], WAIT)
    coll = TorchCollectives(rank=rank, world_size=n, store_addr=store.get("torch_store").decode(),
                            timeout=timeout)
    return coll, None, None


def run_cases(coll, out: Path, device: str) -> None:
    futures = {c.name: launch_case(coll, c, 1, device) for c in cases()}
    results = {}
    for name, fut in futures.items():
        value = fut.result(timeout=60)
        if value is not None:
            if value.device.type != torch.device(device).type:
                raise AssertionError(f"{name}: result on {value.device}, input on {device}")
            results[name] = value.cpu()
    torch.save(results, out / f"rank{coll.rank}.pt")


def run_kill(coll, out: Path, victim: int, op: str) -> None:
    """The victim starts a big collective and SIGKILLs itself; survivors record their error."""
    big = Case(index=10_000, op=op, numel=8_000_000, dtype="float32")
    warm = Case(index=10_001, op="all_reduce", numel=1, dtype="float32")
    launch_case(coll, warm, 1).result(timeout=60)
    start = time.monotonic()
    fut = launch_case(coll, big, 1)
    if coll.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        fut.result(timeout=120)
        report = {"error": None}
    except CollectiveError as exc:
        report = {"error": str(exc), "rank": exc.rank, "address": exc.address}
    report["seconds"] = time.monotonic() - start
    (out / f"rank{coll.rank}.json").write_text(json.dumps(report))
    os._exit(0)  # peers are dead: skip teardown that would talk to them


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--backend", choices=("grpc", "torch"), required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--device", default="cpu", help="where inputs live (cuda: via the wire)")
    ap.add_argument("--kill", type=int, default=None, help="rank that SIGKILLs itself")
    ap.add_argument("--kill-op", default="reduce_scatter", help="the collective it dies in")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, n = args.rank, args.world_size
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=WAIT)
    coll, transport, address = build(args.backend, rank, n, store, args.timeout, args.codec)
    if address is not None:
        store.set(f"published/{rank}", address)
    store.set(f"ready/{rank}", "1")
    store.wait([f"ready/{r}" for r in range(n)], WAIT)
    out = Path(args.out)
    try:
        if args.kill is None:
            run_cases(coll, out, args.device)
        else:
            run_kill(coll, out, args.kill, args.kill_op)
    finally:
        if args.kill is None:
            coll.close()
            if transport is not None:
                transport.close()


if __name__ == "__main__":
    main()
