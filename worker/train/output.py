"""What rank 0 leaves in ``--output``: the full trained weights and a result JSON."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from worker.engine.zero3 import Zero3Engine
from worker.membership.client import Generation
from worker.train.trainer import Trainer


def write_output(out_dir: str, engine: Zero3Engine, trainer: Trainer,
                 generation: Generation) -> None:
    """Rank 0 saves the full trained weights (safetensors) and a result JSON; all ranks gather."""
    weights = dict(engine.iter_full_weights())
    if generation.rank != 0:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "weights.safetensors"))
    result = {
        "world_size": generation.world_size,
        "generation": generation.generation,
        "losses": [s.loss for s in trainer.history],
        "grad_norms": [s.grad_norm for s in trainer.history],
        "eval": trainer.eval_history,
        "steps": [s.to_dict() for s in trainer.history],
        "collectives_per_step": {
            p.value: n / max(len(trainer.history), 1) for p, n in engine.collective_counts.items()
        },
        # rank 0's pushed payload and header bytes by phase (gRPC only), final gather included
        "bytes_sent": {p.value: n for p, n in getattr(engine.collectives, "bytes_sent",
                                                       {}).items()},
        "island": island_report(trainer),
    }
    (path / "result.json").write_text(json.dumps(result, indent=1))


def island_report(trainer: Trainer) -> dict | None:
    """Per site: its name, the tokens it trained on, its peak memory and its outer rounds."""
    outer = trainer.outer
    if outer is None:
        return None
    return {"site": outer.config.site, "tokens": sum(s.tokens for s in trainer.history),
            "peak_mem_mb": max((s.peak_mem_mb for s in trainer.history), default=0.0),
            "rounds": [r.to_dict() for r in outer.history]}
