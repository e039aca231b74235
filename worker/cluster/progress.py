"""The live progress of a local run, from the coordinator's view of its workers.

``zerop2p train`` pipes every worker's output, so the progress a user sees comes from the
coordinator instead: ``GET /workers`` holds each worker's last reported step, loss and tokens/s
(telemetry moves those columns). On a terminal one tqdm bar (step, loss, tokens/s, ETA);
otherwise a plain line each ``every`` seconds, and only when the step moved. It redraws on a
timer: there is no event to wait for, and a display may lag by a second.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The slowest worker's steps done, the mean loss, the summed tokens/s."""

    steps_done: int
    loss: float | None
    tokens_per_s: float


def snapshot(workers: list[dict]) -> Snapshot | None:
    """From ``GET /workers`` rows; None until every alive worker has reported a step."""
    alive = [w for w in workers if w.get("status") == "alive"]
    steps = [w.get("step") for w in alive]
    if not alive or any(s is None for s in steps):
        return None
    losses = [w["loss"] for w in alive if w.get("loss") is not None]
    return Snapshot(steps_done=min(steps) + 1, loss=sum(losses) / len(losses) if losses else None,
                    tokens_per_s=sum(w.get("tokens_per_s") or 0.0 for w in alive))


def describe(snap: Snapshot, total: int, eta_s: float | None) -> str:
    """``step 40/100 loss 3.2141 tokens/s 5120 ETA 1m12s``."""
    loss = "-" if snap.loss is None else f"{snap.loss:.4f}"
    eta = "-" if eta_s is None else f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return (f"step {snap.steps_done}/{total} loss {loss} tokens/s {snap.tokens_per_s:.0f} "
            f"ETA {eta}")


class ProgressLine:
    """A thread that shows the run's progress until ``close``; never fails the run."""

    def __init__(self, url: str, *, token: str | None, total_steps: int, every: float = 1.0,
                 terminal: bool | None = None) -> None:
        self.url, self.token, self.total, self.every = url, token, total_steps, every
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._stop = threading.Event()
        self._bar = (tqdm(total=total_steps, desc="train", dynamic_ncols=True)
                     if self.terminal else None)
        self._started = time.monotonic()
        self._last_printed = -1
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _workers(self) -> list[dict]:
        request = urllib.request.Request(f"{self.url}/workers")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            return json.loads(reply.read())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                snap = snapshot(self._workers())
            except Exception as exc:  # noqa: BLE001 - a display must not stop the run
                log.debug("progress: coordinator not readable: %s", exc)
                continue
            if snap is not None:
                self.show(snap)

    def show(self, snap: Snapshot) -> None:
        elapsed = time.monotonic() - self._started
        rate = snap.steps_done / elapsed if elapsed > 0 and snap.steps_done else None
        eta = (self.total - snap.steps_done) / rate if rate else None
        if self._bar is not None:
            self._bar.n = snap.steps_done
            self._bar.set_postfix_str(describe(snap, self.total, eta).split(" ", 2)[2])
            return
        if snap.steps_done != self._last_printed:
            self._last_printed = snap.steps_done
            print(describe(snap, self.total, eta), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S + self.every)
        if self._bar is not None:
            self._bar.close()
