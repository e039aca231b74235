"""``--log-dir``: every optimizer step of rank 0 as one JSON line (``steps.jsonl``) and as
TensorBoard scalars (``torch.utils.tensorboard``, event files beside it), so a run can be read
by a script and watched in TensorBoard. Bytes are what this rank's transport pushed during the
step, by phase (gRPC only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from worker.train.state import StepStats

log = logging.getLogger(__name__)

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "seconds", "peak_mem_mb")


class StepLog:
    """Appends one record per step; a resumed run (a later generation) appends to the same."""

    def __init__(self, directory: str | Path, *, generation: int):
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard

        self.path = Path(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lines = (self.path / "steps.jsonl").open("a", encoding="utf-8")
        self._board = SummaryWriter(log_dir=str(self.path))
        self._generation = generation
        self._sent: dict[str, int] = {}

    def write(self, stats: StepStats, bytes_sent: dict | None = None) -> None:
        """One step: ``bytes_sent`` is the transport's running count by phase."""
        totals = {getattr(k, "value", str(k)): int(v) for k, v in (bytes_sent or {}).items()}
        step_bytes = {k: v - self._sent.get(k, 0) for k, v in totals.items()
                      if v - self._sent.get(k, 0)}
        self._sent = totals
        record = {**stats.to_dict(), "generation": self._generation, "bytes_sent": step_bytes}
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()
        for name in SCALARS:
            self._board.add_scalar(f"train/{name}", getattr(stats, name), stats.step)
        self._board.add_scalar("train/bytes_sent", sum(step_bytes.values()), stats.step)

    def close(self) -> None:
        self._lines.close()
        self._board.close()
