"""The trainer's own state: step, losses, evaluations, data position and RNG, saving itself.

``TrainState.state_dict()`` is what a checkpoint manifest (and a buddy snapshot's mark) records
of training progress; ``load_state_dict`` restores it. The RNG is per rank, so it travels
separately (``rng_state``/``load_rng_state``) into each rank's file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(slots=True, kw_only=True)
class StepStats:
    """What one optimizer step did, as logged and sent to the coordinator."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_mem_mb: float
    skipped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True, kw_only=True)
class TrainState:
    """Progress of one run; the same on every rank except the RNG.

    ``rows_per_step`` (grad_accum x micro_batch_rows), ``num_train_rows`` and
    ``data_fingerprint`` place the data cursor: step ``n`` starts at row ``n * rows_per_step``
    of the epoch-ordered stream (worker/data/batching.py)."""

    rows_per_step: int
    num_train_rows: int | None = None
    data_fingerprint: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    history: list[StepStats] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)

    def state_dict(self) -> dict:
        """JSON-ready progress: step, epoch, data position, histories, last losses."""
        history = [s.to_dict() for s in self.history]
        last_eval = self.eval_history[-1] if self.eval_history else None
        return {
            "step": self.step,
            "epoch": (self.step * self.rows_per_step / self.num_train_rows
                      if self.num_train_rows else None),
            "data_position": {"step": self.step, "row_cursor": self.step * self.rows_per_step,
                              "fingerprint": self.data_fingerprint},
            "history": history,
            "eval_history": [list(e) for e in self.eval_history],
            "loss": history[-1]["loss"] if history else None,
            # Only an eval of exactly these weights ranks a checkpoint for keep-best.
            "eval_loss": last_eval[1] if last_eval and last_eval[0] == self.step else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.history = [StepStats(**s) for s in state["history"]]
        self.eval_history = [tuple(e) for e in state["eval_history"]]

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's generators now (torch, and the device's when it is CUDA)."""
        out = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
