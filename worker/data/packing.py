"""Language-model data: documents tokenised once, packed into fixed-length rows, split train/eval.

The token stream is every document followed by the end-of-text id, capped at ``max_tokens``;
it is cut into rows of ``seq_len`` tokens, and the last ``eval_fraction`` of the rows (at
least one when the fraction is positive) is the held-out split. Which training rows form each
global batch, and each rank's share, is in ``batching.py``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import torch

from worker.data.batching import Batch, RowDataset, RowSchedule
from worker.data.config import DataConfig
from worker.data.corpus import iter_documents
from worker.data.tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger(__name__)

def tokenize_stream(config: DataConfig, tokenizer: Tokenizer) -> torch.Tensor:
    """Every document's tokens then eos, concatenated and capped: LongTensor [n]."""
    cap = config.max_tokens
    pieces: list[torch.Tensor] = []
    total = 0
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)
    for doc in iter_documents(config.source, text_field=config.text_field):
        if isinstance(tokenizer, ByteTokenizer):  # bytes are ids: no Python list per byte
            raw = tokenizer.encode_bytes(doc)
            ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else eos[:0]
        else:
            ids = torch.tensor(tokenizer.encode(doc), dtype=torch.long)
        pieces += [ids, eos]
        total += ids.numel() + 1
        if cap is not None and total >= cap:
            break
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream[:cap] if cap is not None else stream


class PackedText(RowDataset):
    """Fixed-length token rows for causal-LM training; train and eval rows are disjoint."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = tokenizer
        stream = tokenize_stream(config, tokenizer)
        total_rows = stream.numel() // config.seq_len
        eval_rows = math.ceil(total_rows * config.eval_fraction) if config.eval_fraction else 0
        if total_rows - eval_rows < 1:
            raise ValueError(
                f"source {config.source!r} gives {stream.numel()} tokens = {total_rows} rows of "
                f"{config.seq_len}; {eval_rows} held out leaves no training row"
            )
        rows = stream[: total_rows * config.seq_len].view(total_rows, config.seq_len)
        self.train_rows = rows[: total_rows - eval_rows]
        self.eval_rows = rows[total_rows - eval_rows :]
        self.num_train_rows = self.train_rows.shape[0]
        self.num_eval_rows = self.eval_rows.shape[0]
        self.schedule = RowSchedule(self.num_train_rows, config.seed)
        self.fingerprint = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
        log.info("%s: %d tokens -> %d train + %d eval rows of %d (fingerprint %s, %.2fs)",
                 config.source, stream.numel(), self.num_train_rows, self.num_eval_rows,
                 config.seq_len, self.fingerprint, time.perf_counter() - t0)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @staticmethod
    def _as_batch(ids: torch.Tensor) -> Batch:
        ids = ids.clone()
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def _train_rows(self, index: torch.Tensor) -> Batch:
        return self._as_batch(self.train_rows[index])

    def _eval_rows(self, start: int, stop: int) -> Batch:
        return self._as_batch(self.eval_rows[start:stop])

    def global_batch(self, *, step: int, micro_batch: int, grad_accum: int,
                     micro_batch_rows: int) -> torch.Tensor:
        """Token ids [micro_batch_rows, seq_len] of one global micro-batch, for any world size."""
        index = self.global_indices(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                                    micro_batch_rows=micro_batch_rows)
        return self.train_rows[index].clone()

