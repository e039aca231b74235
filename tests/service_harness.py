"""A real training service for tests: ``python -m coordinator`` (killable, restartable on its
SQLite file) and serving workers (``zerop2p worker --serve`` processes), plus helpers that
build Datums and read a saved state's weights."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from coordinator_helpers import ROOT, TOKEN, CoordinatorProcess

from zerop2p import ServiceClient, types

MODEL = ["--model", "tiny-gpt2", "--n-layer", "2", "--hidden-size", "32", "--num-heads", "4",
         "--max-positions", "64"]


@dataclass
class ServiceCluster:
    """A coordinator and ``n`` serving workers under ``tmp``; ``client`` talks to them."""

    tmp: Path
    n: int = 2
    base_every: int = 2
    heartbeat_timeout: float = 3.0
    coordinator: CoordinatorProcess | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> ServiceCluster:
        self.coordinator = CoordinatorProcess(db=str(self.tmp / "c.db"), log=self.tmp / "c.log",
                                              heartbeat_timeout=self.heartbeat_timeout).start()
        for i in range(self.n):
            self.start_worker(i)
        return self

    def start_worker(self, i: int) -> subprocess.Popen:
        env = {**os.environ, "ZEROP2P_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "worker.cli", "worker", "--coordinator",
                self.coordinator.url, "--worker-id", f"serve-{i}", "--serve", "--serve-dir",
                str(self.tmp / "serve"), "--serve-base-every", str(self.base_every),
                "--min-workers", str(self.n), "--timeout", "30", "--heartbeat-interval", "0.5",
                "--max-recoveries", "20", *MODEL]
        log = open(self.tmp / f"worker{i}.log", "a")
        self.workers[i] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
        log.close()
        return self.workers[i]

    def restart_coordinator(self) -> None:
        """SIGKILL the coordinator and start it again on the same port and SQLite file."""
        port = self.coordinator.port
        self.coordinator.kill()
        self.coordinator = CoordinatorProcess(db=self.coordinator.db, port=port,
                                              log=self.coordinator.log,
                                              heartbeat_timeout=self.heartbeat_timeout).start()

    def client(self) -> ServiceClient:
        return ServiceClient(self.coordinator.url, token=TOKEN, retry_for=120)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in self.workers.values():
            proc.kill()
            proc.wait(10)
        if self.coordinator:
            self.coordinator.kill()


def datum(tokens: list[int], weight: float = 1.0) -> types.Datum:
    """Next-token prediction over ``tokens``, every target weighted ``weight``."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:],
                                       "weights": [weight] * (len(tokens) - 1)})


def batch(step: int, rows: int = 4, length: int = 12) -> list[types.Datum]:
    """A deterministic batch of ``rows`` datums of different lengths for ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for r in range(rows):
        n = length - (r % 3)
        out.append(datum(torch.randint(1, 250, (n,), generator=g).tolist(), 1.0 / (rows * n)))
    return out


def state_weights(path: str) -> dict[str, torch.Tensor]:
    """The trainable weights of a saved state, reassembled from its rank files."""
    from worker.engine.sharding import FlatLayout
    from worker.state.catalog import read_manifest
    from worker.state.export import iter_unit_weights

    manifest = read_manifest(path)
    layouts = [FlatLayout.from_dict(d) for d in manifest["layouts"]]
    out: dict[str, torch.Tensor] = {}
    for _, weights in iter_unit_weights(Path(path), manifest, layouts, trainable_only=True):
        out.update(weights)
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
