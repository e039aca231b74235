"""Tensor codecs: how a tensor becomes the bytes that travel, and back.

Compression applies only to what travels, never to a master copy. ``raw`` is zero-copy both
ways (a uint8 view of the tensor's own storage); ``bf16`` halves float32; ``int8`` stores one
float32 scale per block of ``BLOCK`` elements followed by the int8 values, so float32 shrinks to
(4 + BLOCK) / (4 * BLOCK) of its size: 0.254x for BLOCK = 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

BLOCK = 256

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a wire name; ValueError naming it when unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's storage (no copy)."""
    return t.reshape(-1).view(torch.uint8)


class Codec(Protocol):
    """Turns a 1-D CPU tensor into wire bytes and back."""

    name: str

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int: ...

    def encode(self, t: torch.Tensor) -> torch.Tensor: ...

    def decode(self, wire: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class RawCodec:
    """The tensor's own bytes, little-endian as torch stores them on every supported host."""

    name: str = "raw"

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * dtype.itemsize

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        return as_bytes(t.contiguous())

    def decode(self, wire: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return wire.view(dtype)[:numel]


@dataclass(frozen=True, slots=True)
class Bf16Codec:
    """bfloat16 on the wire for floating tensors (fp32 keeps 8 exponent bits, ~3 digits)."""

    name: str = "bf16"

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * (2 if dtype.is_floating_point else dtype.itemsize)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        if not t.dtype.is_floating_point:
            return RawCodec().encode(t)
        return as_bytes(t.contiguous().to(torch.bfloat16))

    def decode(self, wire: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not dtype.is_floating_point:
            return RawCodec().decode(wire, numel, dtype)
        return wire.view(torch.bfloat16)[:numel].to(dtype)


@dataclass(frozen=True, slots=True)
class Int8BlockCodec:
    """Symmetric int8 per block of ``block`` elements with one float32 scale (absmax / 127)."""

    name: str = "int8"
    block: int = BLOCK

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        if not dtype.is_floating_point:
            return numel * dtype.itemsize
        return self._blocks(numel) * (4 + self.block)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        if not t.dtype.is_floating_point:
            return RawCodec().encode(t)
        n, nb = t.numel(), self._blocks(t.numel())
        x = torch.zeros(nb * self.block, dtype=torch.float32)
        x[:n] = t.reshape(-1)
        x = x.view(nb, self.block)
        scale = x.abs().amax(dim=1).div_(127.0)
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        q = torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        out = torch.empty(nb * (4 + self.block), dtype=torch.uint8)
        out[: nb * 4] = as_bytes(scale)
        out[nb * 4:] = as_bytes(q)
        return out

    def decode(self, wire: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not dtype.is_floating_point:
            return RawCodec().decode(wire, numel, dtype)
        nb = self._blocks(numel)
        if wire.numel() != nb * (4 + self.block):
            raise ValueError(f"int8 codec: {wire.numel()} bytes for {numel} elements, expected "
                             f"{nb * (4 + self.block)}")
        scale = wire[: nb * 4].view(torch.float32)
        q = wire[nb * 4:].view(torch.int8).view(nb, self.block)
        return (q.to(torch.float32) * scale[:, None]).reshape(-1)[:numel].to(dtype)


CODECS: dict[str, Codec] = {"raw": RawCodec(), "bf16": Bf16Codec(), "int8": Int8BlockCodec()}


def get_codec(name: str) -> Codec:
    """The codec registered under name; ValueError naming the choices when unknown."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}") from None
