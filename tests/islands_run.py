"""Run islands for a test: a real coordinator and real worker processes per site, and what the
coordinator decided at every outer round."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from safetensors.torch import load_file

from worker.cluster.launcher import (
    WORKER_ENTRY,
    Child,
    kill_all,
    local_worker_env,
    new_token,
    spawn,
    start_coordinator,
    stop_all,
    supervise,
    token_env,
    worker_argv,
)


@dataclass(slots=True)
class IslandRun:
    """The decided rounds (as ``GET /islands/rounds`` lists them) and every worker's output."""

    rounds: list[dict]
    workers: list[Child]
    out: Path

    def result(self, site: str) -> dict:
        return json.loads((self.out / site / "result.json").read_text())

    def weights(self, site: str) -> dict:
        return load_file(str(self.out / site / "weights.safetensors"))

    def losses(self, site: str) -> dict[int, float]:
        """Inner loss by step of ``site`` (steps a joining island skipped are absent)."""
        return {s["step"]: s["loss"] for s in self.result(site)["steps"]}

    def quorums(self) -> list[list[tuple[str, bool]]]:
        """(site, joining) of every decided round, in round order."""
        return [[(i["site"], bool(i["joining"])) for i in r["islands"]]
                for r in sorted(self.rounds, key=lambda r: r["round"])]

    def output(self, name: str) -> str:
        return "\n".join(next(w for w in self.workers if w.name == name).lines)


def run_islands(out: Path, *, sites: dict[str, int], args: list[str],
                site_args: dict[str, list[str]] | None = None, timeout: float = 240.0,
                max_restarts: int = 0, heartbeat_timeout: float = 10.0,
                site_env: dict[str, dict[str, str]] | None = None,
                site_entry: dict[str, Sequence[str]] | None = None,
                tls_dir: Path | None = None) -> IslandRun:
    """Coordinator plus ``sites[name]`` workers per site, each with ``--site name --sites
    ...`` and ``--output out/name``; returns once every worker exits 0 (a failed one is
    restarted up to ``max_restarts`` times). ``site_env`` and ``site_entry`` start one site's
    workers differently (a fault injector)."""
    token = new_token()
    coordinator, url = start_coordinator(token=token, echo=False,
                                         heartbeat_timeout=heartbeat_timeout,
                                         tls_dir=None if tls_dir is None else str(tls_dir))
    workers: list[Child] = []
    try:
        env = {**local_worker_env(sum(sites.values())), **token_env(token)}
        for site, n in sites.items():
            extra = ["--site", site, "--sites", ",".join(sites), "--output", str(out / site),
                     *args, *(site_args or {}).get(site, [])]
            entry = (site_entry or {}).get(site, WORKER_ENTRY)
            for i in range(n):
                tls = [] if tls_dir is None else ["--ca", str(tls_dir / "ca.pem"),
                                                  "--identity-dir", str(tls_dir / f"{site}{i}")]
                argv = worker_argv(url, worker_id=f"{site}{i}", min_workers=n,
                                   extra=[*tls, *extra], entry=entry)
                workers.append(spawn(f"{site}{i}", argv, env={**env, **(site_env or {}).get(
                    site, {})}, echo=False)[0])
        supervise(workers, timeout=timeout, max_restarts=max_restarts)
        if tls_dir is not None:  # reading every round takes the admin token there
            return IslandRun(rounds=[], workers=workers, out=out)
        reply = httpx.get(f"{url}/islands/rounds", timeout=10.0,
                          headers={"Authorization": f"Bearer {token}"})
        reply.raise_for_status()
        return IslandRun(rounds=reply.json(), workers=workers, out=out)
    finally:
        stop_all(workers)
        kill_all([coordinator])
