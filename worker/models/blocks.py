"""Which modules of a model are its transformer blocks: the sharding units after the root."""

from __future__ import annotations

import re

from torch import nn


def find_block_modules(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Qualified names of the transformer blocks, in forward order (also through peft).

    Automatic: the children of the ``nn.ModuleList`` of same-type modules holding the most
    parameters (GPT-2 ``transformer.h.N``, Llama/Qwen2 ``model.layers.N``, BERT
    ``encoder.layer.N``). With ``pattern``: every module whose name fully matches the regex,
    outermost only, in model order."""
    if pattern is not None:
        rx = re.compile(pattern)
        names: list[str] = []
        for name, _ in model.named_modules():
            if rx.fullmatch(name) and not any(name.startswith(n + ".") for n in names):
                names.append(name)
        if not names:
            sample = [n for n, _ in model.named_modules()][1:8]
            raise ValueError(f"no module name fully matches the block pattern {pattern!r} "
                             f"(names look like {sample})")
        return names
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise ValueError(f"no list of transformer blocks found in {type(model).__name__}; "
                         "pass a block pattern (a regex over module names)")
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]
