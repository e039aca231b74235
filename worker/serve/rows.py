"""A request's rows on this rank: split as training splits a global batch (contiguous equal
blocks in rank order), right-padded into tensors, and the cross_entropy loss over them.

A batch whose row count does not divide by the world size is padded with weight-0 rows (one
token each), so every rank runs the same collectives and the padding adds nothing to any
gradient. The loss is Tinker's: sum over positions of ``-weight * logprob(target)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zerop2p.types import Datum


@dataclass(frozen=True, slots=True)
class Rows:
    """This rank's share of a batch: ``index[i]`` is row i's place in the request (-1: padding)."""

    input_ids: torch.Tensor  # [B, T] int64, right-padded with 0
    attention_mask: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    weights: torch.Tensor  # [B, T] float32, 0 on padding
    lengths: list[int]
    index: list[int]

    def to(self, device: torch.device) -> Rows:
        return Rows(self.input_ids.to(device), self.attention_mask.to(device),
                    self.targets.to(device), self.weights.to(device), self.lengths, self.index)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def select(self, i: int) -> Rows:
        """Row ``i`` alone (a micro-batch of one, for per-datum gradients)."""
        n = self.lengths[i]
        return Rows(self.input_ids[i:i + 1, :n], self.attention_mask[i:i + 1, :n],
                    self.targets[i:i + 1, :n], self.weights[i:i + 1, :n], [n], [self.index[i]])


def rank_share(count: int, *, rank: int, world_size: int) -> list[int]:
    """Which of ``count`` rows rank ``rank`` takes: a contiguous block of ceil(count / world);
    indices past ``count`` are padding (-1)."""
    per = -(-count // world_size)
    return [i if i < count else -1 for i in range(rank * per, (rank + 1) * per)]


def rank_rows(datums: list[Datum], *, rank: int, world_size: int) -> Rows:
    """This rank's rows of ``datums``, padded to the longest row of the whole request (so every
    rank's tensors have one shape)."""
    index = rank_share(len(datums), rank=rank, world_size=world_size)
    width = max(d.model_input.length for d in datums)
    ids = torch.zeros(len(index), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    targets = torch.zeros_like(ids)
    weights = torch.zeros(len(index), width, dtype=torch.float32)
    lengths = []
    for row, i in enumerate(index):
        if i < 0:
            mask[row, 0] = 1
            lengths.append(1)
            continue
        d = datums[i]
        n = d.model_input.length
        ids[row, :n] = torch.tensor(d.model_input.to_ints())
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(d.targets())
        weights[row, :n] = torch.tensor(d.weights())
        lengths.append(n)
    return Rows(ids, mask, targets, weights, lengths, index)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T] log-probabilities (float32) of ``targets`` under ``logits`` [B, T, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def datum_losses(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] per-row cross_entropy: sum over positions of -weight * logprob."""
    return -(weights * logprobs).sum(dim=-1)
