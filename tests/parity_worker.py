"""One rank of a parity run: trains each named scenario sharded and writes losses and weights.

Run by tests/test_parity.py as a real process per rank. Peers find each other through a
TCPStore hosted by the test process (blocking waits with a deadline, no polling).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from harness.builders import build_data_and_model  # noqa: E402
from parity_scenarios import SCENARIOS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from worker.cluster.ports import free_port  # noqa: E402
from worker.main import shard_for_training  # noqa: E402
from worker.train.trainer import Trainer  # noqa: E402

WAIT = timedelta(seconds=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--backend", choices=["grpc", "torch"], required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--scenarios", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, n = args.rank, args.world_size
    store = dist.TCPStore("127.0.0.1", args.store_port, is_master=False, timeout=WAIT)
    transport, torch_coll = None, None
    if args.backend == "grpc":
        from communication.grpc_collectives import GrpcCollectives
        from communication.grpc_transport import GrpcTransport

        transport = GrpcTransport(host="127.0.0.1", port=0, token="parity")
        store.set(f"addr/{rank}", f"127.0.0.1:{transport.port}")
        store.wait([f"addr/{r}" for r in range(n)], WAIT)
        peers = [store.get(f"addr/{r}").decode() for r in range(n)]
    else:
        from communication.torch_collectives import TorchCollectives

        if rank == 0:
            store.set("torch_store", f"127.0.0.1:{free_port('127.0.0.1')}")
        store.wait(["torch_store"], WAIT)
        torch_coll = TorchCollectives(rank=rank, world_size=n,
                                      store_addr=store.get("torch_store").decode(), timeout=60.0)
    for gen, name in enumerate(args.scenarios.split(","), start=1):
        cfg = SCENARIOS[name]
        if transport is not None:
            param_codec, grad_codec = cfg.traffic.codecs(cfg.codec)
            coll = GrpcCollectives.bind(transport, rank=rank, world_size=n, peers=peers,
                                        generation=gen, timeout=60.0, param_codec=param_codec,
                                        grad_codec=grad_codec)
        else:
            coll = torch_coll
        # Nobody sends for generation `gen` before every rank has created it.
        store.set(f"ready/{gen}/{rank}", "1")
        store.wait([f"ready/{gen}/{r}" for r in range(n)], WAIT)
        data, model = build_data_and_model(cfg, on_meta=True)  # filled unit by unit
        engine = shard_for_training(cfg, model, coll, gen)
        trainer = Trainer(cfg, engine=engine, data=data, rank=rank, world_size=n)
        trainer.run()
        weights = dict(engine.iter_full_weights(trainable_only=True))
        if rank == 0:
            out = Path(args.out) / name
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
            counts = {p.value: c for p, c in engine.collective_counts.items()}
            layouts = [(u.layout.trainable_numel, u.layout.frozen_numel) for u in engine.units]
            (out / "result.json").write_text(json.dumps({
                "losses": [s.loss for s in trainer.history],
                "grad_norms": [s.grad_norm for s in trainer.history],
                "collective_counts": counts, "layouts": layouts,
                "params_per_unit": [len(u.layout.slots) for u in engine.units],
                "recomputed_units": engine.recomputed_units,
                "bytes_sent": sum(getattr(coll, "bytes_sent", {}).values()),
                "bytes_by_phase": {p.value: b for p, b in getattr(coll, "bytes_sent", {}).items()},
            }))
        store.set(f"done/{gen}/{rank}", "1")
        store.wait([f"done/{gen}/{r}" for r in range(n)], WAIT)
        if transport is not None:
            coll.close()
    if torch_coll is not None:
        torch_coll.close()
    if transport is not None:
        transport.close()


if __name__ == "__main__":
    main()
