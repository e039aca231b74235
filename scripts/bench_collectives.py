"""Benchmark all-gather and reduce-scatter: our gRPC collectives against gloo, same machine.

Each backend runs as ``--world-size`` separate processes on loopback. For every size (the full
tensor: the all-gather output, the reduce-scatter input, float32) it warms up, then takes the
median of ``--runs`` timed runs, each started after a barrier. Bandwidths follow nccl-tests:
algbw = size / time, busbw = algbw * (W - 1) / W; cpu ms is the mean of rank 0's process CPU
(all its threads) over the timed runs: on a machine with few cores the transports are CPU-bound,
and this is the steadier number. ``--tls`` adds a ``grpc+tls`` row set: the same transport under
mutual TLS, with certificates from a throwaway CA (coordinator/authority.py) over keys and
CSRs made by the workers' identity code, and the ratio of its time to plain gRPC's per size.
Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from communication.collectives import Key, Phase  # noqa: E402
from worker.cluster.ports import free_port  # noqa: E402

WAIT = timedelta(seconds=120)
OPS = ("all_gather", "reduce_scatter")


def make_identities(directory: Path, world_size: int) -> None:
    """A throwaway cluster CA in ``directory`` and a certified identity per rank in
    ``directory/b<rank>`` (what a worker keeps in its identity directory)."""
    from coordinator.authority import CertificateAuthority, pem_of
    from worker.membership.identity import WorkerIdentity

    ca = CertificateAuthority.auto(directory / "ca", hosts=["127.0.0.1"])
    for r in range(world_size):
        me = WorkerIdentity(f"b{r}", ca_pem=ca.ca_pem, directory=directory / f"b{r}")
        me.adopt_certificate(pem_of(ca.sign_worker(ca.read_csr(me.csr()), f"b{r}",
                                                   lifetime=3600)))


def worker(args) -> None:
    """One rank: build the backend, time every (op, size), rank 0 prints JSON rows."""
    torch.set_num_threads(1)
    rank, w = args.rank, args.world_size
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=WAIT)
    transport = None
    if args.backend == "grpc":
        from communication.grpc_collectives import GrpcCollectives
        from communication.grpc_transport import GrpcTransport

        tls = None
        if args.tls_dir:
            from worker.membership.identity import WorkerIdentity

            ca_pem = (Path(args.tls_dir) / "ca" / "ca.pem").read_bytes()
            tls = WorkerIdentity(f"b{rank}", ca_pem=ca_pem,
                                 directory=Path(args.tls_dir) / f"b{rank}").peer_tls()
        transport = GrpcTransport(host="127.0.0.1", port=0, token="bench", tls=tls)
        store.set(f"addr/{rank}", transport.address)
        store.wait([f"addr/{r}" for r in range(w)], WAIT)
        peers = [store.get(f"addr/{r}").decode() for r in range(w)]
        coll = GrpcCollectives.bind(transport, rank=rank, world_size=w, peers=peers, generation=1,
                                     timeout=120.0, codec=args.codec,
                                     members=[f"b{r}" for r in range(w)] if tls else None)
    else:
        from communication.torch_collectives import TorchCollectives

        coll = TorchCollectives(rank=rank, world_size=w, store_addr=f"127.0.0.1:{args.gloo_port}",
                                timeout=120.0)
    store.set(f"ready/{rank}", "1")
    store.wait([f"ready/{r}" for r in range(w)], WAIT)
    counter = iter(range(10**9))

    def key(phase: Phase) -> Key:
        return Key(generation=1, step=next(counter), unit=0, micro_batch=0, phase=phase)

    rows = []
    for size_mb in args.sizes_mb:
        n = int(size_mb * (1 << 20)) // 4 // w * w
        full = torch.randn(n)
        shard = full[: n // w].clone()
        for op in OPS:
            times, cpu = [], 0.0
            for i in range(args.warmup + args.runs):
                coll.barrier(key(Phase.BARRIER)).result(timeout=120)
                t0, c0 = time.perf_counter(), time.process_time()
                if op == "all_gather":
                    coll.all_gather(key(Phase.GATHER_FORWARD), shard).result(timeout=120)
                else:
                    coll.reduce_scatter(key(Phase.REDUCE_SCATTER), full).result(timeout=120)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    cpu += time.process_time() - c0
            ms = statistics.median(times) * 1e3
            algbw = n * 4 / (ms / 1e3) / 1e9
            rows.append({"op": op, "size_mb": size_mb, "world_size": w,
                         "backend": ("gloo" if args.backend != "grpc" else
                                     "grpc+tls" if args.tls_dir else "grpc"),
                         "codec": args.codec if args.backend == "grpc" else "raw",
                         "ms": round(ms, 3), "cpu_ms": round(cpu / args.runs * 1e3, 3),
                         "algbw_gbps": round(algbw, 3),
                         "busbw_gbps": round(algbw * (w - 1) / w, 3)})
    coll.barrier(key(Phase.BARRIER)).result(timeout=120)
    coll.close()
    if transport is not None:
        transport.close()
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def run_backend(backend: str, args, tls_dir: str | None = None) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=WAIT)
    gloo_port = free_port("127.0.0.1")
    cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--store-port",
           str(store.port), "--gloo-port", str(gloo_port), "--world-size", str(args.world_size),
           "--sizes-mb", ",".join(str(s) for s in args.sizes_mb), "--codec", args.codec,
           "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if tls_dir:
        cmd += ["--tls-dir", tls_dir]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
             for r in range(args.world_size)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise SystemExit(f"{backend} rank {r} exited {p.returncode}:\n{outs[r][-3000:]}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("ROWS "))
    return json.loads(line[5:])


def table(rows: list[dict]) -> str:
    by = {(r["backend"], r["op"], r["size_mb"]): r for r in rows}
    lines = [f"{'op':<15}{'size MB':>9}{'backend':>10}{'codec':>6}{'ms':>10}{'cpu ms':>9}"
             f"{'algbw GB/s':>12}{'busbw GB/s':>12}{'grpc/gloo':>11}{'tls/plain':>11}"]
    for r in rows:
        gloo = by.get(("gloo", r["op"], r["size_mb"]))
        ratio = (f"{r['busbw_gbps'] / gloo['busbw_gbps']:.2f}x"
                 if r["backend"].startswith("grpc") and gloo else "")
        cost = f"{r['tls_ratio']:.2f}x" if "tls_ratio" in r else ""
        lines.append(f"{r['op']:<15}{r['size_mb']:>9g}{r['backend']:>10}{r['codec']:>6}"
                     f"{r['ms']:>10.2f}{r['cpu_ms']:>9.2f}{r['algbw_gbps']:>12.3f}"
                     f"{r['busbw_gbps']:>12.3f}{ratio:>11}{cost:>11}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--sizes-mb", type=lambda s: [float(x) for x in s.split(",")],
                    default=[1, 16, 64, 256])
    ap.add_argument("--codec", default="raw", choices=("raw", "bf16", "int8"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backends", default="grpc,gloo")
    ap.add_argument("--tls", action="store_true",
                    help="also run gRPC under mutual TLS (a throwaway CA); adds tls/plain")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gloo-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for backend in args.backends.split(","):
        rows += run_backend("grpc" if backend == "grpc" else "torch", args)
    if args.tls:
        with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
            make_identities(Path(tmp), args.world_size)
            secure = run_backend("grpc", args, tls_dir=tmp)
        plain = {(r["op"], r["size_mb"]): r for r in rows if r["backend"] == "grpc"}
        for r in secure:  # the TLS cost: time under TLS over plain gRPC's, same op and size
            if (ref := plain.get((r["op"], r["size_mb"]))) is not None:
                r["tls_ratio"] = round(r["ms"] / ref["ms"], 3)
        rows += secure
    order = {"grpc": 0, "grpc+tls": 1, "gloo": 2}
    rows.sort(key=lambda r: (r["op"], r["size_mb"], order[r["backend"]]))
    if not args.json:
        print(table(rows))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
