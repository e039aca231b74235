"""Resident-memory peaks per phase, measured by the process itself, and ``zerop2p worker`` with
that measurement installed (the memory benchmark's worker entry, as fault_worker.py is the
failure tests').

``RssSampler`` reads the resident size (``/proc/self/statm``) every few milliseconds in a daemon
thread, and at each phase boundary the kernel's own high-water mark ``VmHWM`` since the previous
boundary (reset by writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0), so a spike shorter
than the sampling interval is not missed. A phase's peak is the larger of the two; beside it,
the sampled peak of anonymous memory (resident minus file-backed pages such as a mapped
safetensors file). The first
phase's high-water mark counts from exec, so start-up (interpreter, imports) is part of it. This
module imports only the standard library: importing it costs nothing that is measured.

Entry: ``ZEROP2P_MEMORY_OUT=DIR python tests/harness/memory_worker.py worker ...`` runs the
CLI as users run it and writes ``DIR/<worker-id>.json``. Its phases:

    load        exec until the engine's first event (the first unit gathered): imports, join,
                data, the meta-built model filled unit by unit, shards, optimizer
    step:<s>    the first engine event of step s until the next step's, or the checkpoint
    checkpoint  Trainer.save_checkpoint, call to return (rank file, barriers, publication)
    exit        after it: collectives closed, the coordinator left
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20
HERE = Path(__file__).resolve().parent
MEMORY_WORKER = (sys.executable, str(Path(__file__).resolve()))
OUT_ENV = "ZEROP2P_MEMORY_OUT"


def rss_bytes() -> int:
    """This process's resident set size now."""
    return rss_split()[0]


def rss_split() -> tuple[int, int]:
    """(resident, of which anonymous) bytes now: statm's resident minus its file-backed and
    shared pages (a mapped safetensors file counts in the first only)."""
    with open("/proc/self/statm", "rb") as fh:
        fields = fh.read().split()
    return int(fields[1]) * PAGE, (int(fields[1]) - int(fields[2])) * PAGE


def hwm_bytes() -> int:
    """This process's peak resident set size since exec or the last reset (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_hwm() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peak resident memory per named phase; ``mark(name)`` closes the current phase."""

    def __init__(self, *, interval: float = 0.004, first: str = "load"):
        self.t0 = time.monotonic()
        self.interval = interval
        self.hwm_reset = True  # until a reset fails: then only the samples count
        self.phase = first
        self.peaks: dict[str, dict] = {}
        self._sampled = rss_bytes()
        self._anon = 0
        self._start = 0.0
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss, anon = rss_split()
            with self._lock:
                self._samples += 1
                self._sampled = max(self._sampled, rss)
                self._anon = max(self._anon, anon)

    def mark(self, phase: str | None) -> None:
        """End the current phase (its peak kept, a repeated name keeps the max), begin ``phase``."""
        with self._lock:
            now = time.monotonic() - self.t0
            rss, anon = rss_split()
            sampled = max(self._sampled, rss)
            hwm = hwm_bytes() if self.hwm_reset else 0
            entry = self.peaks.setdefault(self.phase, {"peak_mb": 0.0, "sampled_mb": 0.0,
                                                       "hwm_mb": 0.0, "anon_mb": 0.0,
                                                       "start_s": self._start, "seconds": 0.0})
            entry["sampled_mb"] = max(entry["sampled_mb"], sampled / MB)
            entry["anon_mb"] = max(entry["anon_mb"], self._anon / MB, anon / MB)
            entry["hwm_mb"] = max(entry["hwm_mb"], hwm / MB)
            entry["peak_mb"] = max(entry["sampled_mb"], entry["hwm_mb"])
            entry["end_s"] = now
            entry["seconds"] += now - self._start
            if phase is not None and self.hwm_reset:
                self.hwm_reset = reset_hwm()
            self.phase, self._start = phase, now
            self._sampled, self._anon = rss_split()

    def finish(self) -> dict:
        """Close the last phase, stop sampling; the peaks as a JSON-ready dict."""
        self.mark(None)
        self._stop.set()
        self._thread.join(timeout=1.0)
        return {"pid": os.getpid(), "phases": self.peaks, "hwm_reset": self.hwm_reset,
                "samples": self._samples, "interval_s": self.interval}


class PhaseObserver:
    """An engine observer that moves the sampler to ``step:<s>`` at the first event of step s
    (the checkpoint's own phase is set by ``around_checkpoint``)."""

    def __init__(self, sampler: RssSampler):
        self.sampler = sampler
        self.rank: int | None = None

    def __call__(self, progress) -> None:
        self.rank = progress.rank
        phase = f"step:{progress.step}"
        if self.sampler.phase not in (phase, "checkpoint"):
            self.sampler.mark(phase)


def around_checkpoint(trainer_cls, sampler: RssSampler) -> None:
    """Wrap ``trainer_cls.save_checkpoint`` so the checkpoint is a phase of its own."""
    save = trainer_cls.save_checkpoint

    def save_checkpoint(self):
        sampler.mark("checkpoint")
        try:
            return save(self)
        finally:
            sampler.mark("exit")

    trainer_cls.save_checkpoint = save_checkpoint


def imported_modules() -> list[str]:
    """The modules this process has imported, in import order: an idle process that imports
    the same ones is the baseline the benchmark subtracts (transformers imports a model's
    code lazily, ~100 MB for GPT-2, so a fixed list would miss it)."""
    return [m for m in sys.modules if m not in ("__main__", "__mp_main__")]


def _worker_id(argv: list[str]) -> str:
    return argv[argv.index("--worker-id") + 1] if "--worker-id" in argv else str(os.getpid())


if __name__ == "__main__":
    sampler = RssSampler()  # first: the imports below are part of the load phase
    sys.path.insert(0, str(HERE.parents[1]))
    from worker.cli.app import app
    from worker.train.trainer import Trainer

    observer = PhaseObserver(sampler)
    around_checkpoint(Trainer, sampler)
    out = Path(os.environ[OUT_ENV])
    try:
        app(obj={"observers": [observer]})
    finally:
        report = {"worker_id": _worker_id(sys.argv), "rank": observer.rank, **sampler.finish(),
                  "modules": imported_modules()}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{report['worker_id']}.json").write_text(json.dumps(report, indent=1))
