"""Rescue: turn the buddy snapshots the survivors of a lost generation hold into a checkpoint.

[Note: rescue layout]
A survivor of generation g (old rank r) writes, before it rejoins, every snapshot it holds to
``root/rescue/g<g>/r<r>/step_<n>/rank_<k>.safetensors``: its own (k = r, with a manifest
candidate: trainer state as of step n) and its buddy copy (k = r-1). The files are the rank
files a checkpoint of the old world size would hold, so nothing new is needed to load them.
Each survivor writes its own folder, so no two processes write one file.

The next generation's members enter a barrier first (every survivor has written by then, as
it writes before rejoining); rank 0 then looks for the newest step n, newer than the latest
checkpoint, for which some old generation has a copy of every old rank's file and a manifest;
it moves them into ``step_<n>`` and publishes it as ``save_checkpoint`` does (manifest with
file sizes, fsync, rename, ``latest``), and removes the rescue folder; a second barrier, and
every member resumes from the latest checkpoint as usual, resharded to the new world size.
Nothing complete: the rescue is dropped and the run falls back to the last regular checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from communication.collectives import Collectives, Key, Phase
from worker.state.buddy import Buddy
from worker.state.catalog import STEP_DIR, CheckpointError, latest_checkpoint
from worker.state.checkpoint import build_manifest, sync_ranks
from worker.state.files import publish, write_json_atomic, write_rank_file

log = logging.getLogger(__name__)

RESCUE = "rescue"


def write_rescue(buddy: Buddy, root: str | Path) -> list[Path]:
    """On a survivor: write every snapshot this rank holds; returns the files. Never raises:
    a rescue that cannot be written leaves the run to its last checkpoint."""
    own, held = buddy.rescuable()
    base = Path(root) / RESCUE / f"g{buddy.generation}" / f"r{buddy.rank}"
    written = []
    try:
        for snap in own + held:
            d = base / f"step_{snap.step}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"rank_{snap.rank}.safetensors"
            write_rank_file(path, buddy.unpack(snap))
            written.append(path)
        for snap in own:
            mark = buddy.marks[snap.step]
            shards = {**buddy.states.shards.meta(), "optimizer": mark.optimizer}
            manifest = build_manifest(progress=mark.progress, scheduler=mark.scheduler,
                                      shards=shards, config=buddy.states.config,
                                      world_size=buddy.world_size, rank_files={},
                                      extra={"rescued": {"generation": buddy.generation}})
            write_json_atomic(base / f"step_{snap.step}" / "manifest.json", manifest)
    except (OSError, ValueError, CheckpointError) as exc:
        log.error("rank %d: could not write the rescue under %s: %s", buddy.rank, base, exc)
        return written
    log.warning("rank %d of generation %d: rescue written: own step(s) %s, buddy copy of rank "
                "%d at step(s) %s", buddy.rank, buddy.generation, [s.step for s in own],
                buddy.source, [s.step for s in held])
    return written


def publish_rescue(root: str | Path, collectives: Collectives, *, generation: int, rank: int,
                   timeout: float) -> Path | None:
    """Every member of a new generation calls this before resuming; rank 0 publishes the
    newest complete rescue (see the note). Returns the published checkpoint on rank 0."""
    def barrier(index: int) -> None:
        key = Key(generation=generation, phase=Phase.RESCUE_BARRIER, index=index)
        sync_ranks(collectives, key, timeout=timeout)

    barrier(0)
    published = None
    if rank == 0:
        try:
            published = _assemble(Path(root))
        except (OSError, ValueError, KeyError, CheckpointError) as exc:
            log.error("rescue under %s not published: %s", root, exc)
    barrier(1)
    return published


def _candidates(rescue: Path) -> dict[tuple[int, int], dict]:
    """(step, generation) -> rank files by old rank, and a manifest path, over all survivors."""
    found: dict[tuple[int, int], dict] = {}
    for gdir in rescue.glob("g*"):
        for sdir in gdir.glob("r*/step_*"):
            m = STEP_DIR.fullmatch(sdir.name)
            if not m:
                continue
            c = found.setdefault((int(m.group(1)), int(gdir.name[1:])),
                                 {"files": {}, "manifest": None})
            for f in sdir.glob("rank_*.safetensors"):
                c["files"].setdefault(int(f.stem.split("_")[1]), f)
            if (sdir / "manifest.json").is_file():
                c["manifest"] = sdir / "manifest.json"
    return found


def _assemble(root: Path) -> Path | None:
    rescue = root / RESCUE
    if not rescue.is_dir():
        return None
    latest = latest_checkpoint(root)
    floor = int(latest.name.split("_")[1]) if latest is not None else -1
    chosen = None
    for (step, gen), c in sorted(_candidates(rescue).items(), reverse=True):
        if step <= floor:
            log.info("rescue: step %d is not newer than checkpoint %s; not needed", step, latest)
            break
        if c["manifest"] is None:
            log.warning("rescue: generation %d step %d has no manifest", gen, step)
            continue
        manifest = json.loads(c["manifest"].read_text())
        missing = sorted(set(range(manifest["world_size"])) - set(c["files"]))
        if missing:
            log.warning("rescue: generation %d step %d has no copy of old rank(s) %s", gen, step,
                        missing)
            continue
        chosen = (step, manifest, c["files"])
        break
    final = _publish(root, *chosen) if chosen else None
    shutil.rmtree(rescue, ignore_errors=True)
    return final


def _publish(root: Path, step: int, manifest: dict, files: dict[int, Path]) -> Path:
    """Move the rank files into step_<n>.tmp, write the manifest, publish it as step_<n>."""
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = {}
    for r in range(manifest["world_size"]):
        dst = tmp / f"rank_{r}.safetensors"
        os.replace(files[r], dst)
        sizes[dst.name] = dst.stat().st_size
    manifest["files"] = sizes
    write_json_atomic(tmp / "manifest.json", manifest)
    publish(root, tmp, final)  # a step_<n> there is torn: a complete one would not be older
    log.warning("rescue: published %s from buddy copies (world size %d)", final,
                manifest["world_size"])
    return final
