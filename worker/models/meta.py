"""Models built without memory: parameters on the meta device, given values one unit at a time.

A preset is built under ``accelerate.init_empty_weights`` (parameters on ``meta``, buffers such
as rotary tables computed for real), so building costs no memory whatever its size. Its random
init is then defined **per module**: each module's own ``_init_weights`` (transformers' scheme,
GPT-2's scaled residual projections included) runs under a generator seeded from the model seed
and the module's qualified name, children before parents as ``nn.Module.apply`` does, and a
peft LoRA layer then resets its adapters (A uniform, B zero) the same way. The values therefore
depend neither on the world size nor on which modules form a unit, nor on the order units are
materialised in; ``materialize_all`` (one process: the reference, export, tests) and the
engine's unit-by-unit ``MetaInit`` (a rank keeps its slices and frees the rest) give the same
weights by construction. A module's init may write only parameters of its own unit (true of
every transformers model: an init touches its module's subtree, and units are whole blocks).

A local directory is built the same way from its config, and each parameter found in its
safetensors files (``weights``) is then read over the init, one tensor at a time, under its
checkpoint name (peft's ``base_model.model.`` prefix and ``.base_layer`` dropped; a tied weight
under any of its names). Parameters it lacks (LoRA adapters, a new head) keep the init.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from worker.models.safetensors_weights import SafetensorsWeights

log = logging.getLogger(__name__)


def build_on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with every parameter on the meta device (buffers stay real), ties restored
    (accelerate's patched ``register_parameter`` gives a tied weight a parameter of its own)."""
    from accelerate import init_empty_weights  # lazy: accelerate

    with init_empty_weights(include_buffers=False):
        model = make()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def module_seed(seed: int, name: str) -> int:
    """The init seed of the module called ``name`` ("" is the root) in a model seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def _unit_of(name: str, blocks: list[str]) -> str:
    """The unit module a module named ``name`` belongs to: the longest block prefix, else root."""
    best = ""
    for block in blocks:
        if (name == block or name.startswith(block + ".")) and len(block) > len(best):
            best = block
    return best


class MetaInit:
    """Gives a meta-built model's parameters their values, one unit at a time.

    ``blocks`` are the unit module names (the engine's); ``lora_init`` is peft's
    ``init_lora_weights`` for adapters (None without LoRA), reset under ``lora_seed``."""

    def __init__(self, model: nn.Module, *, seed: int, blocks: list[str],
                 lora_init: bool | str | None = None, lora_seed: int = 0,
                 weights: SafetensorsWeights | None = None):
        self.model = model
        self.weights = weights
        self._names: dict[int, list[str]] = {}
        for qualified, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(qualified)
        self.seed = seed
        self.blocks = list(blocks)
        self.lora_init = lora_init
        self.lora_seed = lora_seed
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._init_weights = base._init_weights
        self._prefix = getattr(base, "base_model_prefix", "") or ""
        self._holders: dict[int, list[tuple[nn.Module, str]]] = {}  # a tied parameter: several
        for _, m in model.named_modules(remove_duplicate=False):
            for attr, p in m._parameters.items():
                if p is not None:
                    self._holders.setdefault(id(p), []).append((m, attr))

    def __call__(self, unit_name: str, params: list[tuple[str, nn.Parameter]]
                 ) -> dict[str, nn.Parameter]:
        """Allocate the unit ``unit_name``'s meta parameters on CPU and initialise its modules;
        returns the new parameter of every name in ``params`` (now in the model too)."""
        fresh: dict[str, nn.Parameter] = {}
        names: dict[str, list[str]] = {}
        for name, p in params:
            if not p.is_meta:
                fresh[name] = p
                continue
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            for module, attr in self._holders.pop(id(p), ()):
                module._parameters[attr] = new
            fresh[name] = new
            names[name] = self._names.get(id(p), [name])
        for name, module in _post_order(self.model):
            if _unit_of(name, self.blocks) == unit_name:
                self._init_module(name, module)
        if self.weights is not None:
            self._read(unit_name, {n: fresh[n] for n in names}, names)
        return fresh

    @torch.no_grad()
    def _read(self, unit_name: str, fresh: dict[str, nn.Parameter],
              names: dict[str, list[str]]) -> None:
        """Each parameter the directory holds, read over its init (shapes checked)."""
        kept, read = [], 0
        for name, p in fresh.items():
            found = next((c for c in self._candidates(names[name]) if c in self.weights), None)
            if found is None:
                kept.append(name)
                continue
            read += 1
            value = self.weights.read(found)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{self.weights.path}: tensor {found!r} has shape "
                                 f"{tuple(value.shape)}, the model's {name!r} expects "
                                 f"{tuple(p.shape)}")
            p.copy_(value.to(p.dtype))
        base = [n for n in kept if "lora_" not in n and "modules_to_save" not in n]
        if base and not read:
            raise ValueError(f"{self.weights.path}: none of unit {unit_name or 'root'!r}'s "
                             f"parameters are in its files (first: {base[0]!r}, looked up as "
                             f"{list(self._candidates(names[base[0]]))}); wrong directory?")
        if kept:
            log.info("unit %r: %d parameter(s) not in %s keep their init: %s", unit_name or "root",
                     len(kept), self.weights.path, kept[:3])

    def _candidates(self, qualified: list[str]):
        """Checkpoint names to try: as the model calls it, without or with the base prefix
        (a ``BertModel`` checkpoint has no ``bert.``, a head model's has)."""
        for name in map(checkpoint_name, qualified):
            yield name
            if self._prefix:
                if name.startswith(self._prefix + "."):
                    yield name.removeprefix(self._prefix + ".")
                else:
                    yield f"{self._prefix}.{name}"

    @torch.no_grad()
    def _init_module(self, name: str, module: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(self.seed, name))
            self._init_weights(module)
            if self.lora_init is not None and hasattr(module, "reset_lora_parameters"):
                torch.manual_seed(module_seed(self.lora_seed, name))
                for adapter in getattr(module, "active_adapters", ["default"]):
                    module.reset_lora_parameters(adapter, self.lora_init)


def checkpoint_name(qualified: str) -> str:
    """The name a parameter has in its base model's checkpoint (peft's wrappers dropped)."""
    name = qualified.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def is_on_meta(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` still waits for its value."""
    return any(p.is_meta for p in model.parameters())


def materialize_all(model: nn.Module, *, seed: int, lora_init: bool | str | None = None,
                    lora_seed: int = 0, weights: SafetensorsWeights | None = None) -> None:
    """Every meta parameter of ``model`` given its value in this process (as one unit)."""
    init = MetaInit(model, seed=seed, blocks=[], lora_init=lora_init, lora_seed=lora_seed,
                    weights=weights)
    init("", list(model.named_parameters()))
