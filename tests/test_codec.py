"""Codec round trips: raw is exact and zero-copy, bf16 and int8 stay within their error bounds."""

from __future__ import annotations

import pytest
import torch

from communication.codec import BLOCK, dtype_from_name, get_codec

SIZES = (1, 255, 256, 257, 100_003)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("n", SIZES)
def test_raw_is_exact_and_zero_copy(dtype, n):
    codec = get_codec("raw")
    x = (torch.randn(n) * 100).to(dtype)
    wire = codec.encode(x)
    assert wire.dtype == torch.uint8 and wire.numel() == codec.wire_bytes(n, dtype)
    assert wire.data_ptr() == x.data_ptr(), "raw encode copied"
    back = codec.decode(wire, n, dtype)
    assert back.data_ptr() == x.data_ptr(), "raw decode copied"
    assert torch.equal(back, x)


@pytest.mark.parametrize("n", SIZES)
def test_bf16_relative_error_bound(n):
    codec = get_codec("bf16")
    x = torch.randn(n) * 10
    wire = codec.encode(x)
    assert wire.numel() == 2 * n == codec.wire_bytes(n, torch.float32)
    back = codec.decode(wire, n, torch.float32)
    assert back.dtype == torch.float32
    assert ((back - x).abs() <= x.abs() * 2**-8).all()


@pytest.mark.parametrize("n", SIZES)
def test_int8_blockwise_error_bound_and_size(n):
    codec = get_codec("int8")
    x = torch.randn(n) * torch.logspace(-3, 3, n)  # blocks of very different magnitudes
    wire = codec.encode(x)
    assert wire.numel() == codec.wire_bytes(n, torch.float32)
    back = codec.decode(wire, n, torch.float32)
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = x
    absmax = padded.view(blocks, BLOCK).abs().amax(dim=1)
    bound = (absmax / 127 / 2 * 1.001).repeat_interleave(BLOCK)[:n]
    assert ((back - x).abs() <= bound).all(), (back - x).abs().max()
    if n >= 10_000:
        assert wire.numel() <= 0.27 * 4 * n


def test_int8_zero_block_and_bf16_input():
    codec = get_codec("int8")
    x = torch.zeros(300, dtype=torch.bfloat16)
    x[280] = 3.0
    back = codec.decode(codec.encode(x), 300, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match="zstd"):
        get_codec("zstd")
    with pytest.raises(ValueError, match="complex32"):
        dtype_from_name("complex32")
