#!/usr/bin/env python
"""Models larger than one worker: the peak resident memory of every rank while a model is
loaded, stepped and checkpointed, our workers beside PyTorch FSDP2, against the ideal.

The benchmark writes its own model: a GPT-2 (byte vocabulary, 257 ids) of ~150 M parameters
(``--quick``: ~43 M) built from a config and saved with ``save_pretrained(max_shard_size=...)``
as a sharded from_pretrained directory (``model.safetensors.index.json``) in a temp dir. Then,
for N in {1, 2, 4} (``--quick``: {1, 2}):

- zerop2p: a real coordinator and N ``zerop2p worker`` processes (run_local_cluster) with
  ``--model DIR``: each builds the model on the meta device and fills only its own shards, unit
  by unit, from the files; trains 2 steps and writes a checkpoint at the end. The workers run
  tests/harness/memory_worker.py, the CLI plus a sampler and an engine observer.
- fsdp2: N processes over gloo: the model built on meta, ``fully_shard`` per block and root,
  ``to_empty(device="cpu")``, the same directory read by DCP's HuggingFaceStorageReader (every
  rank reads only the slices it owns), one check that a weight arrived, 2 AdamW steps, a DCP save
  of model and optimizer state.

Memory is measured, never computed: every rank samples its own resident size from process start
(statm every 4 ms and the kernel's VmHWM reset at each boundary; memory_worker.RssSampler).
Phases: load (exec until the first forward's first all-gather: imports, rendezvous, model,
weights, optimizer), step (the first step), steady (the later steps), checkpoint (the save).

    ideal       = idle + (16 B x params) / N + largest unit + activations  (the one formula)
    live ideal  = idle + what lives in the phase / N + largest unit (+ activations in steps):
                  load 4 B/param (weights), step and steady 16 (+ grads and two Adam moments),
                  checkpoint 12 (the gradients were freed at the end of the step)

idle is measured: the resident size of a process that imports what a rank of the system's
first run had imported (its sys.modules, in order: transformers loads GPT-2's code lazily, ~100
MB) and does nothing else. activations are measured too: the bytes autograd saves for one row of
``--seq-len`` tokens (a 1- and a 2-block model of the same width, extrapolated), times the rows
each rank runs. Goal: load and steady at most 1.1x the live ideal for N = 2 and 4.

Every row set runs twice by default (``--malloc glibc,131072``): with glibc's allocator as it
is, and with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``). glibc raises its threshold to
each freed mapped block's size (up to 32 MB), so gathered units and gradients of a few MB to
32 MB end up on the heap and stay resident after they are freed: measured, that retention is
most of the gap between the two columns' peaks, in both systems alike.

    python scripts/bench_memory.py [--quick] [--json]

Last line: ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the sampler is a harness

from harness.memory_worker import (  # noqa: E402
    MB,
    MEMORY_WORKER,
    OUT_ENV,
    RssSampler,
    imported_modules,
)

SIZES = {"150M": {"n_layer": 12, "n_embd": 1024, "n_head": 16},
         "43M": {"n_layer": 6, "n_embd": 768, "n_head": 12},
         "1M": {"n_layer": 2, "n_embd": 128, "n_head": 4}}  # a smoke test of the script
IMPORTS = {"zerop2p": ["torch", "transformers", "worker.main"],
           "fsdp2": ["torch", "transformers", "torch.distributed.fsdp",
                     "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict"]}
LIVE_BYTES = {"load": 4, "step": 16, "steady": 16, "checkpoint": 12}  # per parameter, fp32
GOAL = 1.1
CORES = len(os.sched_getaffinity(0))


# ---- one-off processes: the model directory, the idle size --------------------------------


def prepare(args) -> dict:
    """Save the model as a sharded directory; its parameter count, units and activations."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from worker.models.blocks import find_block_modules

    def config(n_layer: int):
        return GPT2Config(vocab_size=257, n_positions=1024, bos_token_id=256, eos_token_id=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          **{**SIZES[args.size], "n_layer": n_layer})

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config(SIZES[args.size]["n_layer"]))
    model.save_pretrained(args.model_dir, max_shard_size=args.shard_size)
    index = json.loads((Path(args.model_dir) / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    params = {id(p): p for p in model.parameters()}  # the tied head counted once
    n_params = sum(p.numel() for p in params.values())
    blocks = find_block_modules(model)
    in_block = {id(p) for b in blocks for p in model.get_submodule(b).parameters()}
    units = [sum(p.numel() for p in model.get_submodule(b).parameters()) for b in blocks]
    units.append(sum(p.numel() for i, p in params.items() if i not in in_block))
    del model
    saved = [_saved_bytes(GPT2LMHeadModel(config(k)), args.seq_len) for k in (1, 2)]
    per_row = saved[0] + (SIZES[args.size]["n_layer"] - 1) * (saved[1] - saved[0])
    return {"n_params": n_params, "shard_files": len(files), "units": len(units),
            "largest_unit_bytes": 4 * max(units), "activation_bytes_per_row": per_row}


def _saved_bytes(model, seq_len: int) -> int:
    """Bytes autograd saves for backward in one forward of one row (parameters excluded)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, 257, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(saved.values())


def idle(system: str, modules_file: str) -> dict:
    """Resident size of this process after ``system``'s imports alone: the base list, then
    every module a rank of the first run had imported, in its order."""
    import importlib

    from harness.memory_worker import hwm_bytes, rss_bytes

    names = IMPORTS[system] + json.loads(Path(modules_file).read_text())
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a private or platform module: skipped, counted)
            failed.append(name)
    return {"rss_mb": rss_bytes() / MB, "hwm_mb": hwm_bytes() / MB, "modules": len(names),
            "failed": len(failed)}


def run_role(role: str, extra: list[str], timeout: float) -> dict:
    argv = [sys.executable, __file__, "--role", role, *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{role} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# ---- FSDP2: one rank ---------------------------------------------------------------------


def fsdp2_rank(args, sampler: RssSampler) -> None:
    """Meta build, fully_shard, DCP load from the HF directory, steps, DCP save; peaks to JSON."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(max(1, CORES // args.world_size))
    rank, world = args.rank, args.world_size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=args.timeout))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to transformer.wte.weight; not in the files
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(args.model_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    sampler.mark("verify")  # not a reported phase: one small tensor gathered and compared
    with safe_open(str(Path(args.model_dir) / _file_of(args.model_dir, "transformer.wpe.weight")),
                   "pt") as fh:
        expected = fh.get_tensor("transformer.wpe.weight")
    loaded = bool(torch.equal(state["transformer.wpe.weight"].full_tensor(), expected))
    del expected
    for step in range(args.steps):
        sampler.mark(f"step:{step}")
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, 257, (args.rows_per_rank, args.seq_len), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sampler.mark("checkpoint")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state},
             checkpoint_id=str(Path(args.checkpoint_dir) / "fsdp2"))
    del model_state, optim_state
    sampler.mark("exit")
    dist.barrier()
    dist.destroy_process_group()
    report = {"rank": rank, "loaded": loaded, "load_method": "dcp.HuggingFaceStorageReader",
              **sampler.finish(), "modules": imported_modules()}
    (Path(args.out) / f"rank_{rank}.json").write_text(json.dumps(report, indent=1))


def _file_of(model_dir: str, name: str) -> str:
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    return index["weight_map"][name]


# ---- the runs ----------------------------------------------------------------------------


def run_zerop2p(args, world: int, tmp: Path, env: dict) -> list[dict]:
    from worker.cluster.launcher import run_local_cluster

    tag = f"zerop2p-{world}-{len(list(tmp.glob('zerop2p-*')))}"
    out, ckpt = tmp / tag, tmp / f"ckpt-{tag}"
    worker_args = ["--model", args.model_dir, "--data", "stdlib", "--max-tokens", "100000",
                   "--data-cache", str(tmp / "data"), "--seq-len", str(args.seq_len),
                   "--micro-batch-rows", str(args.rows_per_rank * world), "--steps",
                   str(args.steps), "--checkpoint-dir", str(ckpt), "--schedule", "constant",
                   "--lr", "1e-4", "--prefetch", "true", "--timeout", str(args.timeout)]
    run_local_cluster(world, worker_args, timeout=args.timeout, echo=False,
                      worker_env={OUT_ENV: str(out), **env},
                      worker_entry=MEMORY_WORKER)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    _remove(ckpt)
    return sorted(reports, key=lambda r: (r["rank"] is None, r["rank"]))


def run_fsdp2(args, world: int, tmp: Path, env: dict) -> list[dict]:
    from worker.cluster.launcher import local_worker_env, spawn, supervise
    from worker.cluster.ports import free_port

    tag = f"fsdp2-{world}-{len(list(tmp.glob('fsdp2-*')))}"
    out, ckpt = tmp / tag, tmp / f"ckpt-{tag}"
    out.mkdir()
    argv = [sys.executable, __file__, "--role", "fsdp2", "--world-size", str(world),
            "--port", str(free_port()), "--model-dir", args.model_dir, "--out", str(out),
            "--checkpoint-dir", str(ckpt), "--seq-len", str(args.seq_len), "--rows-per-rank",
            str(args.rows_per_rank), "--steps", str(args.steps), "--timeout", str(args.timeout)]
    children = [spawn(f"fsdp2-r{r}", [*argv, "--rank", str(r)], echo=False,
                      env=local_worker_env(world, env))[0] for r in range(world)]
    supervise(children, timeout=args.timeout)
    _remove(ckpt)
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]


def malloc_env(setting: str) -> dict:
    """The ranks' allocator: ``glibc`` as it is, or a fixed mmap threshold in bytes. By default
    glibc raises its threshold to the size of each freed mapped block (up to 32 MB), after which
    gathered units and their gradients come from the heap and stay resident once freed; a fixed
    threshold keeps every large block mapped, so freeing it gives the memory back."""
    return {} if setting == "glibc" else {"MALLOC_MMAP_THRESHOLD_": str(int(setting))}


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def phase_peaks(report: dict) -> dict[str, tuple[float, float, float]]:
    """(peak MB, anonymous peak MB, seconds) of load, step (the first), steady (the later
    steps), checkpoint."""
    phases = report["phases"]
    steps = sorted((k for k in phases if k.startswith("step:")), key=lambda k: int(k[5:]))
    picked = {"load": ["load"], "step": steps[:1], "steady": steps[1:],
              "checkpoint": ["checkpoint"]}
    return {name: (max(phases[k]["peak_mb"] for k in keys),
                   max(phases[k]["anon_mb"] for k in keys),
                   sum(phases[k]["seconds"] for k in keys))
            for name, keys in picked.items() if keys and all(k in phases for k in keys)}


def rows_of(system: str, world: int, reports: list[dict], info: dict, idle_mb: float,
            rows_per_rank: int) -> list[dict]:
    act = info["activation_bytes_per_row"] * rows_per_rank
    unit, n = info["largest_unit_bytes"], info["n_params"]
    peaks = [phase_peaks(r) for r in reports]
    rows = []
    for phase in LIVE_BYTES:
        if not all(phase in p for p in peaks):
            continue
        per_rank = [p[phase][0] for p in peaks]
        ideal = idle_mb + (16 * n / world + unit + act) / MB
        live = idle_mb + (LIVE_BYTES[phase] * n / world + unit
                          + (act if phase in ("step", "steady") else 0)) / MB
        rows.append({"system": system, "world_size": world, "phase": phase,
                     "peak_rss_mb": max(per_rank), "per_rank_mb": per_rank, "ideal_mb": ideal,
                     "ratio_to_ideal": max(per_rank) / ideal, "live_ideal_mb": live,
                     "ratio_to_live": max(per_rank) / live,
                     "anon_mb": max(p[phase][1] for p in peaks),
                     "seconds": max(p[phase][2] for p in peaks),
                     "goal": (max(per_rank) <= GOAL * live
                              if world > 1 and phase in ("load", "steady") else None),
                     "hwm_reset": all(r["hwm_reset"] for r in reports),
                     **({"loaded": all(r["loaded"] for r in reports)} if system == "fsdp2"
                        else {})})
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'malloc':<7} {'system':<8} {'N':>2} {'phase':<10} {'peak MB':>8} {'per rank MB':<24} "
            f"{'anon MB':>8} {'ideal MB':>8} {'x ideal':>7} {'live MB':>8} {'x live':>6} {'goal':>5} "
            f"{'s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = "-" if r["goal"] is None else ("ok" if r["goal"] else "MISS")
        ranks = "/".join(f"{m:.0f}" for m in r["per_rank_mb"])
        lines.append(f"{r['malloc']:<7} {r['system']:<8} {r['world_size']:>2} {r['phase']:<10} "
                     f"{r['peak_rss_mb']:>8.0f} {ranks:<24} {r['anon_mb']:>8.0f} "
                     f"{r['ideal_mb']:>8.0f} "
                     f"{r['ratio_to_ideal']:>7.2f} {r['live_ideal_mb']:>8.0f} "
                     f"{r['ratio_to_live']:>6.2f} {goal:>5} {r['seconds']:>6.1f}")
    return "\n".join(lines)


def main_role(args) -> int:
    worlds = [int(w) for w in args.world_sizes.split(",")] if args.world_sizes else (
        [1, 2] if args.quick else [1, 2, 4])
    systems = args.systems.split(",")
    args.size = args.size or ("43M" if args.quick else "150M")
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        args.model_dir = str(tmp / "model")
        t0 = time.monotonic()
        info = run_role("prepare", ["--size", args.size, "--model-dir", args.model_dir,
                                    "--seq-len", str(args.seq_len), "--shard-size",
                                    args.shard_size], timeout=600)
        say(f"model: GPT-2 {SIZES[args.size]}, vocab 257, {info['n_params']:,} parameters in "
            f"{info['shard_files']} safetensors shards ({info['units']} units, largest "
            f"{info['largest_unit_bytes'] / MB:.0f} MB); {args.rows_per_rank} row(s) x "
            f"{args.seq_len} tokens per rank: activations {info['activation_bytes_per_row'] / MB:.0f}"
            f" MB per row ({time.monotonic() - t0:.0f} s)")
        rows, idle_mb = [], {}
        for malloc, world, system in [(m, w, s) for m in args.malloc.split(",")
                                      for w in worlds for s in systems]:
                if f"{system}:{world}" in (args.skip or "").split(","):
                    say(f"{system} N={world}: skipped (--skip)")
                    continue
                t1 = time.monotonic()
                run = run_zerop2p if system == "zerop2p" else run_fsdp2
                reports = run(args, world, tmp, malloc_env(malloc))
                if system not in idle_mb:  # the baseline: this system's imports, measured
                    modules = tmp / f"modules-{system}.json"
                    modules.write_text(json.dumps(reports[0]["modules"]))
                    probe = run_role("idle", ["--system", system, "--modules", str(modules)],
                                     timeout=300)
                    idle_mb[system] = probe["rss_mb"]
                    say(f"idle {system} process ({probe['modules']} modules imported, "
                        f"{probe['failed']} failed): {probe['rss_mb']:.0f} MB")
                new = rows_of(system, world, reports, info, idle_mb[system], args.rows_per_rank)
                for r in new:
                    r["malloc"] = malloc
                rows += new
                say(f"{system} N={world} malloc {malloc}: " + ", ".join(
                    f"{r['phase']} {r['peak_rss_mb']:.0f} MB" for r in new)
                    + f" ({time.monotonic() - t1:.0f} s)")
    for r in rows:
        r.update(model=args.size, n_params=info["n_params"], idle_mb=idle_mb[r["system"]],
                 unit_mb=info["largest_unit_bytes"] / MB,
                 activations_mb=info["activation_bytes_per_row"] * args.rows_per_rank / MB)
    if not args.json:
        print(table(rows))
        missed = [f"{r['system']} N={r['world_size']} {r['phase']} ({r['malloc']})" for r in rows
                  if r["goal"] is False]
        print(f"goal (load and steady <= {GOAL}x the live ideal, N > 1): "
              + ("met" if not missed else "missed by " + ", ".join(missed)))
    print(json.dumps({"rows": rows}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 43 M model, N in {1, 2}")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--size", choices=sorted(SIZES), default=None)
    ap.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 2,4")
    ap.add_argument("--systems", default="zerop2p,fsdp2")
    ap.add_argument("--skip", default=None, help="comma-separated system:N, e.g. fsdp2:1")
    ap.add_argument("--steps", type=int, default=2, help="steps: the first, then steady ones")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows-per-rank", type=int, default=1)
    ap.add_argument("--shard-size", default="100MB", help="save_pretrained's max_shard_size")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--malloc", default="glibc,131072",
                    help="comma-separated allocator settings of the ranks: glibc (as it is) "
                    "or BYTES (MALLOC_MMAP_THRESHOLD_=BYTES); every one is a row set")
    ap.add_argument("--tmp", default=None, help="where the temp directory goes")
    ap.add_argument("--role", default="main", choices=["main", "prepare", "idle", "fsdp2"],
                    help=argparse.SUPPRESS)
    for flag, kind in [("--rank", int), ("--world-size", int), ("--port", int),
                       ("--model-dir", str), ("--out", str), ("--checkpoint-dir", str),
                       ("--system", str), ("--modules", str)]:
        ap.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "fsdp2":
        fsdp2_rank(args, RssSampler())
    elif args.role in ("prepare", "idle"):
        result = prepare(args) if args.role == "prepare" else idle(args.system, args.modules)
        print("RESULT " + json.dumps(result), flush=True)
    else:
        return main_role(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
