"""When a collective is done: every contribution is in this rank's slot and every send has
handed its bytes to gRPC. The peers' acknowledgements are not awaited: they travel back in the
background, so a collective costs one one-way delay instead of a round trip (on a 50 ms link,
25 ms less per collective, and a step has one per unit group). An acknowledgement that brings a
refusal marks the peer (peer_loss.py), which fails every collective in flight and every later
one of the generation with the peer, its address and the refused key: the asynchronous error
model of NCCL. The transport holds unacknowledged sends and lets them finish before closing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from communication.peer_loss import PeerLoss


async def complete(slot, sends: list[Callable], *, timeout: float, loss: PeerLoss,
                   hold: Callable[[asyncio.Task], None]) -> torch.Tensor:
    """Run ``sends`` (callables taking a ``handed`` event) and the slot's wait; return the
    slot's result once it is full and every send is handed over. Until then the first failure
    of a send or of the wait, or a peer marked lost, fails it and cancels the sends; after it,
    sends still unacknowledged are passed to ``hold`` and a failure among them marks ``loss``."""
    loop = asyncio.get_running_loop()
    handed = [asyncio.Event() for _ in sends]
    tasks = [loop.create_task(send(handed=event)) for send, event in zip(sends, handed)]
    ready = asyncio.gather(slot.wait(timeout), *(e.wait() for e in handed))
    ready.add_done_callback(_retrieved)
    lost = loop.create_task(loss.raise_when_lost(slot.expectation.key))
    pending: set = {ready, lost, *tasks}
    try:
        while not ready.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not ready:
                    task.result()  # a send that failed, or the peer loss, raises here
        ready.result()  # the slot's own failure (missing contributions), if any
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    finally:
        ready.cancel()
        lost.cancel()
    for task in tasks:
        if not task.done():
            hold(task)
            task.add_done_callback(lambda t: _acknowledged(t, loss))
    return slot.result()


def _acknowledged(task: asyncio.Task, loss: PeerLoss) -> None:
    """A late acknowledgement: a refusal marks the peer it names (CollectiveError.rank)."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    rank = getattr(exc, "rank", None)
    if rank is None or not 0 <= rank < len(loss.peers):
        rank = loss.rank
    loss.mark(rank, str(exc))


async def set_when_all(events: list[asyncio.Event], handed: asyncio.Event) -> None:
    """Set ``handed`` once every one of ``events`` is set (a push cut into byte ranges)."""
    for event in events:
        await event.wait()
    handed.set()


async def handed_or_failed(push: asyncio.Task, handed: asyncio.Event) -> None:
    """Return once ``push`` has handed its bytes to gRPC; raise its failure if it failed first."""
    waiter = asyncio.get_running_loop().create_task(handed.wait())
    try:
        await asyncio.wait([push, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if push.done() and not handed.is_set():
        push.result()


def _retrieved(future: asyncio.Future) -> None:
    """Mark a future's outcome seen (no "exception was never retrieved" for one we cancelled)."""
    if not future.cancelled():
        future.exception()
