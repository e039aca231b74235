"""Federated LoRA across islands: each site its own data and its own adapter rank.

Two real islands (coordinator, worker processes) with LoRA ranks 4 and 8 on different text
files; every outer round merges the token-weighted mean of the products s*B*A back into each
site's rank (FlexLoRA). The single-process reference trains the sites one after another and
merges with the same function.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from harness.builders import build_data_and_model
from harness.reference_diloco import train_reference_diloco, train_reference_federated
from islands_run import run_islands

from worker.cli.options import build_train_config
from worker.islands.lora_merge import SiteAdapter, merge_lora_products

TOL = 1e-5
BASE = ["--model", "tiny-gpt2", "--seq-len", "32", "--micro-batch-rows", "4", "--lr", "1e-2",
        "--adam-eps", "1e-6", "--schedule", "constant", "--max-grad-norm", "none",
        "--timeout", "60", "--steps", "4", "--outer-every", "2", "--private-data",
        "--lora-alpha", "8"]
RANKS = {"a": 4, "b": 8}
SOURCES = {"a": ("json", "decoder.py", "encoder.py", "scanner.py"),
           "b": ("email", "message.py", "header.py", "utils.py")}


def private_text(tmp: Path, site: str) -> Path:
    """A site's own corpus: a few standard-library modules of one package."""
    package, *files = SOURCES[site]
    stdlib = Path(dataclasses.__file__).parent
    text = "\n".join((stdlib / package / f).read_text() for f in files)
    path = tmp / f"{site}.txt"
    path.write_text(text)
    return path


def site_args(tmp: Path) -> dict[str, list[str]]:
    return {s: ["--data", str(private_text(tmp, s)), "--lora-rank", str(r)]
            for s, r in RANKS.items()}


def config(site: str, extra: list[str]):
    return build_train_config([*BASE, *extra, "--site", site, "--sites", "a,b"])


@pytest.mark.timeout(300)
def test_heterogeneous_rank_rounds_equal_the_one_process_merge(tmp_path):
    extra = site_args(tmp_path)
    run = run_islands(tmp_path / "out", sites={"a": 2, "b": 2}, args=BASE, site_args=extra)
    configs = {s: config(s, extra[s]) for s in RANKS}
    builds = {s: functools.partial(build_data_and_model, c) for s, c in configs.items()}
    ref = train_reference_federated(configs, builds)
    for site, rank in RANKS.items():
        got = run.weights(site)
        assert got[next(n for n in ref[site] if ".lora_A." in n)].shape[0] == rank
        diff = max(float((got[n] - w).abs().max()) for n, w in ref[site].items())
        print(f"site {site} (rank {rank}): max adapter diff vs one-process merge {diff:.2e}")
        assert diff <= TOL, f"site {site}: adapters differ from the one-process merge by {diff}"
        b_norm = sum(float(w.norm()) for n, w in got.items() if ".lora_B." in n)
        assert b_norm > 1e-3, f"site {site}: lora_B is still zero: nothing was trained or merged"
    report = run.result("a")["island"]
    assert report["site"] == "a" and report["tokens"] == 4 * 4 * 32
    assert report["peak_mem_mb"] > 0 and len(report["rounds"]) == 2
    print("per-site report:", {s: {k: run.result(s)["island"][k] for k in ("tokens",
                                                                          "peak_mem_mb")}
                                for s in RANKS})


def test_zero_padded_average_is_not_what_islands_compute():
    """Negative control for the merge: averaging zero-padded factors (the naive FedAvg of
    different ranks) dilutes the rank-4 site's update; the product merge does not."""
    torch.manual_seed(0)
    b4, a4 = torch.randn(16, 4), torch.randn(4, 12)
    b8, a8 = torch.randn(16, 8), torch.randn(8, 12)
    mean = 0.5 * (b4 @ a4 + b8 @ a8)
    _, (bm, am) = merge_lora_products([SiteAdapter(b4, a4, 1.0, 1.0),
                                       SiteAdapter(b8, a8, 1.0, 1.0)], [4, 8], [1.0, 1.0])
    padded_b = 0.5 * (torch.nn.functional.pad(b4, (0, 4)) + b8)
    padded_a = 0.5 * (torch.nn.functional.pad(a4, (0, 0, 0, 4)) + a8)
    merged_err = float((bm @ am - mean).norm())
    naive_err = float((padded_b @ padded_a - mean).norm())
    assert merged_err < 0.5 * naive_err, (merged_err, naive_err)


@pytest.mark.timeout(300)
def test_equal_ranks_average_the_adapters(tmp_path):
    """Equal ranks: the element-wise round (outer lr 1, no momentum: FedAvg of the adapters,
    weighted by tokens) on private data equals the one-process DiLoCo on the same files."""
    extra = {s: ["--data", str(private_text(tmp_path, s)), "--lora-rank", "4"] for s in RANKS}
    args = [*BASE, "--outer-lr", "1", "--outer-momentum", "0"]
    run = run_islands(tmp_path / "out", sites={"a": 1, "b": 1}, args=args, site_args=extra)
    outer = ["--outer-lr", "1", "--outer-momentum", "0"]
    configs = {s: config(s, [*extra[s], *outer]) for s in RANKS}
    ref = train_reference_diloco(configs["a"], {s: functools.partial(build_data_and_model, c)
                                                for s, c in configs.items()})
    wa, wb = run.weights("a"), run.weights("b")
    assert all(torch.equal(wa[n], wb[n]) for n in ref.weights), "sites ended apart"
    diff = max(float((wa[n] - w).abs().max()) for n, w in ref.weights.items())
    print(f"equal ranks, FedAvg: max adapter diff vs one process {diff:.2e}")
    assert diff <= TOL
