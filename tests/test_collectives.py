"""The one suite both Collectives backends must pass, with real processes on loopback.

One launch of N processes per (backend, world size) runs every case of collective_worker.cases()
at once (all in flight, distinct keys); results are compared here with a one-process reference:
bit-exact for the gRPC backend (rank-order fp32 sums), and for gloo where order cannot matter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from collective_worker import DTYPES, Case, cases, make_input

HERE = Path(__file__).resolve().parent
BACKENDS = ("grpc", "torch")
WORLD_SIZES = (1, 2, 3, 4)


def launch(backend: str, world_size: int, out: Path, *extra: str, timeout: float = 90):
    """Run one collective_worker per rank; returns (return codes, outputs, store values)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "collective_worker.py"), "--rank", str(r),
             "--world-size", str(world_size), "--backend", backend, "--store-port",
             str(store.port), "--out", str(out), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    published = {r: store.get(f"published/{r}").decode()
                 for r in range(world_size) if store.check([f"published/{r}"])}
    return [p.returncode for p in procs], outputs, published


def reference(case: Case, rank: int, world_size: int) -> torch.Tensor:
    """What rank `rank` must receive, computed in one process (fp32 sums in rank order)."""
    xs = [make_input(case, r, world_size) for r in range(world_size)]
    if case.op == "all_gather":
        return torch.cat(xs)
    if case.op == "shift":
        return xs[(rank - 1) % world_size]
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    if case.op == "reduce_scatter":
        s = acc.numel() // world_size
        acc = acc[rank * s:(rank + 1) * s]
    return acc.to(DTYPES[case.dtype])


@pytest.fixture(scope="module", params=[(b, n) for b in BACKENDS for n in WORLD_SIZES],
                ids=[f"{b}-ws{n}" for b in BACKENDS for n in WORLD_SIZES])
def group_results(request, tmp_path_factory):
    backend, n = request.param
    out = tmp_path_factory.mktemp(f"{backend}{n}")
    codes, outputs, _ = launch(backend, n, out)
    for r, (code, text) in enumerate(zip(codes, outputs)):
        assert code == 0, f"rank {r} ({backend}, world size {n}) exited {code}:\n{text[-4000:]}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]
    return backend, n, results


def test_every_case_matches_one_process_reference(group_results):
    backend, n, results = group_results
    exact = backend == "grpc" or n <= 2
    checked = 0
    for case in cases():
        for r in range(n):
            if case.op == "barrier":
                assert case.name not in results[r]
                continue
            got, want = results[r][case.name], reference(case, r, n)
            assert got.dtype == want.dtype and got.shape == want.shape, (case.name, r)
            if exact or case.op in ("all_gather", "shift"):
                assert torch.equal(got, want), f"{case.name} rank {r}: not bit-exact"
            else:
                torch.testing.assert_close(got, want, msg=f"{case.name} rank {r}")
            checked += 1
    assert checked == n * (len(cases()) - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_inputs_travel_and_come_back_on_their_device(backend, tmp_path):
    n = 2
    codes, outputs, _ = launch(backend, n, tmp_path, "--device", "cuda")
    for r in range(n):
        assert codes[r] == 0, f"rank {r} exited {codes[r]}:\n{outputs[r][-3000:]}"
    for r in range(n):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for case in cases():
            if case.op != "barrier":
                assert torch.equal(got[case.name], reference(case, r, n)), (case.name, r)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("op", ["reduce_scatter", "shift"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_peer_fails_every_survivor_naming_it(backend, op, tmp_path):
    """In a shift, rank 0 waits for the victim's send and rank 1 pushes to it: both name it."""
    n, victim, deadline = 3, 2, 10.0
    start = time.monotonic()
    codes, outputs, published = launch(backend, n, tmp_path, "--kill", str(victim),
                                       "--kill-op", op, "--timeout", str(deadline), timeout=60)
    elapsed = time.monotonic() - start
    assert codes[victim] == -9, outputs[victim][-2000:]
    for r in range(n):
        if r == victim:
            continue
        assert codes[r] == 0, f"survivor {r} exited {codes[r]}:\n{outputs[r][-3000:]}"
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert report["error"] is not None, f"survivor {r} finished a collective with a dead peer"
        assert report["rank"] == victim, report
        assert report["seconds"] <= deadline + 1.0, report
        assert report["address"] and report["address"] in report["error"], report
        assert f"rank {victim}" in report["error"], report
        if victim in published:
            assert report["address"] == published[victim]
    # Startup of three interpreters dominates; the failure itself must come within the deadline.
    assert elapsed < deadline + 30, elapsed


def test_result_past_its_deadline_names_the_key_and_rank():
    from concurrent.futures import Future

    from communication.collectives import CollectiveError, Key, Phase, result

    key = Key(generation=3, step=7, unit=2, micro_batch=0, phase=Phase.REDUCE_SCATTER)
    with pytest.raises(CollectiveError, match=r"g3/s7/u2/m0/reduce_scatter on rank 1: no result"):
        result(Future(), key=key, rank=1, timeout=0.05)
    done: Future = Future()
    done.set_result(5)
    assert result(done, key=key, rank=1, timeout=0.05) == 5
