"""The gradient accumulator: rank-order sums, idempotent retries, validation at the door."""

from __future__ import annotations

import asyncio

import pytest
import torch

from communication.accumulator import Accumulator
from communication.slot import ContributionError, Expectation, MissingContributions, Mode


def expect(key="g1/s0/u0/m0/reduce_scatter", *, n=5, w=3, dtype=torch.float32, mode=Mode.SUM):
    return Expectation(key=key, generation=1, world_size=w, shape=(n,), dtype=dtype, mode=mode)


def tricky(w: int, n: int) -> list[torch.Tensor]:
    """Values whose float32 sum depends on the order they are added in."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=gen) * 10.0 ** torch.randint(-4, 5, (n,), generator=gen)
            for _ in range(w)]


def rank_order_sum(xs):
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return acc


async def test_sum_is_rank_order_whatever_the_arrival_order():
    acc = Accumulator(asyncio.get_running_loop())
    xs = tricky(4, 10)
    assert not torch.equal(rank_order_sum(xs), xs[3] + xs[1] + xs[0] + xs[2])  # order matters
    for order in ([3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]):
        key = f"k{order}"
        slot = acc.open(expect(key, n=10, w=4))
        for r in order:
            slot.put(r, xs[r])
        await slot.wait(1.0)
        assert torch.equal(slot.result(), rank_order_sum(xs)), order
        acc.close(key, finished=True)
    assert len(acc) == 0


async def test_retry_is_counted_once():
    acc = Accumulator(asyncio.get_running_loop())
    slot = acc.open(expect(w=2))
    ones = torch.ones(5)
    assert slot.put(0, ones) is True
    assert slot.put(0, ones * 100) is False
    buf = slot.buffer(1)
    buf.fill_(2.0)
    assert slot.commit(1) is True and slot.commit(1) is False
    await slot.wait(1.0)
    assert torch.equal(slot.result(), torch.full((5,), 3.0))


async def test_low_precision_sums_in_float32():
    acc = Accumulator(asyncio.get_running_loop())
    slot = acc.open(expect(w=3, dtype=torch.bfloat16))
    xs = [torch.tensor([256.0, 1.0, 1.0, 0.5, -256.0]).bfloat16() for _ in range(3)]
    for r in (2, 0, 1):
        slot.put(r, xs[r])
    await slot.wait(1.0)
    out = slot.result()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rank_order_sum(xs).bfloat16())


async def test_concat_writes_rows_in_rank_order():
    acc = Accumulator(asyncio.get_running_loop())
    slot = acc.open(expect(n=2, w=3, mode=Mode.CONCAT, dtype=torch.bfloat16))
    for r in (1, 2, 0):
        slot.put(r, torch.full((2,), float(r), dtype=torch.bfloat16))
    await slot.wait(1.0)
    assert slot.result().tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("bad, words", [
    (dict(shape=(6,)), ["shape", "[5]", "[6]"]),
    (dict(dtype=torch.float16), ["dtype", "float32", "float16"]),
    (dict(generation=2), ["generation", "expected 1", "actual 2"]),
    (dict(sender=7), ["sender 7", "size 3"]),
])
async def test_mismatch_is_rejected_naming_everything_and_changes_nothing(bad, words):
    acc = Accumulator(asyncio.get_running_loop())
    slot = acc.open(expect())
    slot.put(0, torch.ones(5))
    args = dict(sender=1, generation=1, shape=(5,), dtype=torch.float32) | bad
    with pytest.raises(ContributionError) as info:
        slot.check(**args)
    for w in ["g1/s0/u0/m0/reduce_scatter", f"sender {args['sender']}", *words]:
        assert w in str(info.value), (w, str(info.value))
    assert slot.missing() == [1, 2]
    with pytest.raises(ContributionError):
        slot.put(1, torch.ones(6))
    assert slot.missing() == [1, 2]


async def test_timeout_names_missing_ranks():
    acc = Accumulator(asyncio.get_running_loop())
    slot = acc.open(expect())
    slot.put(1, torch.ones(5))
    with pytest.raises(MissingContributions) as info:
        await slot.wait(0.05)
    assert info.value.missing == [0, 2] and "[0, 2]" in str(info.value)


async def test_server_side_waits_for_local_open_and_remembers_finished_keys():
    acc = Accumulator(asyncio.get_running_loop())
    waiter = asyncio.ensure_future(acc.slot("k", 1.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    slot = acc.open(expect("k", w=1))
    assert await waiter is slot
    slot.put(0, torch.ones(5))
    await slot.wait(1.0)
    acc.close("k", finished=True)
    assert await acc.slot("k", 1.0) is None and acc.finished("k")
    with pytest.raises(asyncio.TimeoutError):
        await acc.slot("never", 0.01)


async def test_duplicate_open_is_refused():
    acc = Accumulator(asyncio.get_running_loop())
    acc.open(expect("k"))
    with pytest.raises(ValueError, match="already in flight"):
        acc.open(expect("k"))
