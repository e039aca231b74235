"""Which checkpoints exist: completeness checks, the newest, a listing, and retention.

A ``step_<n>`` directory counts only when its ``manifest.json`` parses and every rank file it
names exists with the recorded byte size; anything else (a ``.tmp`` directory left by a kill,
a directory missing its manifest or a file) is torn and never returned or loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from worker.state.files import remove_dir

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d+)")
LEFTOVER = re.compile(r"step_(\d+)\.(tmp|replaced|deleting)")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, inconsistent, or does not fit the model it is loaded into."""


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete checkpoint; CheckpointError naming what is missing if not."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no manifest.json; the checkpoint is incomplete (torn)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest: {exc}") from exc
    files = manifest.get("files") or {}
    n = manifest.get("world_size")
    if len(files) != n:
        raise CheckpointError(f"{mpath}: names {len(files)} rank files, world size is {n}")
    for name, size in files.items():
        f = path / name
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            raise CheckpointError(f"{path}: rank file {name} has {actual} bytes, manifest "
                                  f"expects {size}; the checkpoint is incomplete")
    return manifest


# --- listing and retention ----------------------------------------------------------------
def _complete(root: Path) -> list[tuple[int, Path, dict]]:
    """(step, dir, manifest) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.fullmatch(d.name)
        if not m:
            continue
        try:
            found.append((int(m.group(1)), d, read_manifest(d)))
        except CheckpointError as exc:
            log.warning("skipping torn checkpoint: %s", exc)
    return sorted(found, key=lambda t: t[0])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None; a torn one is never returned."""
    found = _complete(Path(root))
    return found[-1][1] if found else None


def best_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the lowest eval loss (the newest on a tie), or None when
    no checkpoint under ``root`` recorded one."""
    scored = _scored(_complete(Path(root)))
    return min(scored)[2] if scored else None


def _scored(found: list[tuple[int, Path, dict]]) -> list[tuple[float, int, Path]]:
    """(eval loss, -step, dir) of the checkpoints that recorded an eval loss."""
    return [(m["eval_loss"], -step, d) for step, d, m in found if m.get("eval_loss") is not None]


def list_checkpoints(root: str | Path) -> list[dict]:
    """Step, world size, last loss, eval loss and bytes on disk of each complete checkpoint."""
    out = []
    for step, d, m in _complete(Path(root)):
        out.append({"path": str(d), "step": step, "world_size": m["world_size"],
                    "loss": m.get("loss"), "eval_loss": m.get("eval_loss"),
                    "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file())})
    return out


def format_checkpoints(rows: list[dict]) -> str:
    """``list_checkpoints`` as a text table (what ``zerop2p checkpoints list`` prints)."""
    lines = [f"{'step':>8} {'world':>5} {'loss':>10} {'eval loss':>10} {'size':>10}  path"]
    for c in rows:
        loss = "-" if c["loss"] is None else f"{c['loss']:.4f}"
        ev = "-" if c["eval_loss"] is None else f"{c['eval_loss']:.4f}"
        lines.append(f"{c['step']:>8} {c['world_size']:>5} {loss:>10} {ev:>10} "
                     f"{c['bytes'] / 2**20:>8.2f}MB  {c['path']}")
    return "\n".join(lines)


def prune_checkpoints(root: str | Path, *, keep_last: int, keep_best: bool = True) -> None:
    """Delete all but the last ``keep_last`` complete checkpoints and the best by eval loss,
    plus leftovers of interrupted writes older than the newest complete one."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    found = _complete(root)
    keep = {step for step, _, _ in found[-keep_last:]}
    scored = _scored(found)
    if keep_best and scored:
        keep.add(-min(scored)[1])
    for step, d, _ in found:
        if step not in keep:
            remove_dir(d, root / f"step_{step}.deleting")
            log.info("pruned checkpoint %s", d)
    newest = found[-1][0] if found else -1
    for d in root.iterdir() if root.is_dir() else ():
        m = LEFTOVER.fullmatch(d.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(d, ignore_errors=True)
