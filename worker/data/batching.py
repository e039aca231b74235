"""Which rows make each global micro-batch, and which of them each rank reads.

[Note: global batches]
The training set is ``num_rows`` fixed-shape rows. Rows are consumed in the order of a
per-epoch permutation (a ``torch.Generator`` seeded from ``(seed, epoch)``), through one global
row cursor: micro-batch ``m`` of step ``s`` is the ``micro_batch_rows`` rows starting at
``(s * grad_accum + m) * micro_batch_rows``; a batch may straddle two epochs. Rank ``r`` of
``N`` reads rows ``[r*b, (r+1)*b)`` of it with ``b = micro_batch_rows // N``. Nothing depends
on the world size, so concatenating every rank's rows gives the same global batch for any N.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

Batch = dict[str, torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from ``(seed, epoch)``, equal on every machine."""
    digest = hashlib.sha256(f"zerop2p-rows:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def per_rank_rows(rows: int, world_size: int, *, rank: int | None = None) -> int:
    """Rows each rank takes from a global batch of ``rows``; refuses uneven splits."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if rows < 1 or rows % world_size:
        raise ValueError(f"global batch of {rows} rows does not split evenly over world size "
                         f"{world_size} (rank {rank}): rows must be a positive multiple of it")
    return rows // world_size


class RowSchedule:
    """The row indices of every global micro-batch (see the note above)."""

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows < 1:
            raise ValueError(f"a schedule needs at least one row, got {num_rows}")
        self.num_rows = num_rows
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order rows are read in during ``epoch``.

        The two latest epochs are cached (a batch straddles at most two), as int32 when the
        rows fit: this is the one per-rank cost that grows with the corpus (4 bytes a row)."""
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.num_rows, generator=gen)
            if self.num_rows <= torch.iinfo(torch.int32).max:
                perm = perm.to(torch.int32)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    @staticmethod
    def cursor(*, step: int, micro_batch: int, grad_accum: int, micro_batch_rows: int) -> int:
        """Global row position where micro-batch ``micro_batch`` of ``step`` starts."""
        if step < 0 or grad_accum < 1 or micro_batch_rows < 1:
            raise ValueError(f"need step >= 0, grad_accum >= 1, micro_batch_rows >= 1; got "
                             f"step={step}, grad_accum={grad_accum}, rows={micro_batch_rows}")
        if not 0 <= micro_batch < grad_accum:
            raise ValueError(f"micro_batch {micro_batch} is outside [0, grad_accum={grad_accum})")
        return (step * grad_accum + micro_batch) * micro_batch_rows

    def indices(self, *, step: int, micro_batch: int, grad_accum: int,
                micro_batch_rows: int) -> torch.Tensor:
        """Row indices (LongTensor [micro_batch_rows]) of one global micro-batch."""
        start = self.cursor(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                            micro_batch_rows=micro_batch_rows)
        out = torch.empty(micro_batch_rows, dtype=torch.long)
        pos = 0
        while pos < micro_batch_rows:
            epoch, offset = divmod(start + pos, self.num_rows)
            take = min(micro_batch_rows - pos, self.num_rows - offset)
            out[pos : pos + take] = self.permutation(epoch)[offset : offset + take]
            pos += take
        return out

    def epoch_of(self, step: int, grad_accum: int, micro_batch_rows: int) -> int:
        """The epoch in which ``step``'s first row is read."""
        start = self.cursor(step=step, micro_batch=0, grad_accum=grad_accum,
                            micro_batch_rows=micro_batch_rows)
        return start // self.num_rows


class RowDataset:
    """Global and per-rank batches over fixed-shape rows; subclasses say what a row holds."""

    schedule: RowSchedule
    num_train_rows: int
    num_eval_rows: int

    def _train_rows(self, index: torch.Tensor) -> Batch:
        raise NotImplementedError

    def _eval_rows(self, start: int, stop: int) -> Batch:
        raise NotImplementedError

    def global_indices(self, *, step: int, micro_batch: int, grad_accum: int,
                       micro_batch_rows: int) -> torch.Tensor:
        """Training-row indices of one global micro-batch."""
        return self.schedule.indices(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                                     micro_batch_rows=micro_batch_rows)

    def global_dict(self, *, step: int, micro_batch: int, grad_accum: int,
                    micro_batch_rows: int) -> Batch:
        """Every tensor of one global micro-batch (all ranks' rows)."""
        return self._train_rows(self.global_indices(step=step, micro_batch=micro_batch,
                                                    grad_accum=grad_accum,
                                                    micro_batch_rows=micro_batch_rows))

    def rank_batch(self, *, step: int, micro_batch: int, grad_accum: int, micro_batch_rows: int,
                   rank: int, world_size: int) -> Batch:
        """This rank's disjoint share of the global micro-batch ``micro_batch`` of ``step``."""
        b = per_rank_rows(micro_batch_rows, world_size, rank=rank)
        index = self.global_indices(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                                    micro_batch_rows=micro_batch_rows)
        return self._train_rows(index[rank * b : (rank + 1) * b])

    def eval_batches(self, *, rows: int, rank: int, world_size: int,
                     limit: int | None = None) -> Iterator[Batch]:
        """This rank's share of consecutive global eval batches of ``rows`` rows, in order.

        Only whole global batches are used, so every rank yields the same number of batches
        (possibly none, when the held-out split has fewer than ``rows`` rows)."""
        b = per_rank_rows(rows, world_size, rank=rank)
        count = self.num_eval_rows // rows
        if limit is not None:
            count = min(count, max(limit, 0))
        for i in range(count):
            start = i * rows + rank * b
            yield self._eval_rows(start, start + b)

    def epoch_of(self, step: int, grad_accum: int, micro_batch_rows: int) -> int:
        """The epoch in which ``step``'s first training row is read."""
        return self.schedule.epoch_of(step, grad_accum, micro_batch_rows)
