"""Language-model data: documents tokenised once, packed into fixed-length rows, split train/eval.

The token stream is every document followed by the end-of-text id, capped at ``max_tokens``
when set; it is cut into rows of ``seq_len`` tokens, and the last ``eval_fraction`` of the rows
(at least one when the fraction is positive) is the held-out split. The rows live in a token
store on disk (store.py), written once and memory-mapped, so a rank holds only the rows its
batches touch. ``tokenize_stream`` is the same stream built in memory: the reference the store
is tested against. Which training rows form each global batch, and each rank's share, is in
``batching.py``.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from worker.data.batching import Batch, RowDataset, RowSchedule
from worker.data.config import DataConfig
from worker.data.corpus import iter_documents
from worker.data.store import open_store
from worker.data.tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger(__name__)


def tokenize_stream(config: DataConfig, tokenizer: Tokenizer) -> torch.Tensor:
    """Every document's tokens then eos, concatenated and capped: LongTensor [n], in memory.

    The reference definition of the stream (the store must equal it); fine for small corpora,
    it holds 8 bytes a token."""
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
    """Fixed-length token rows for causal-LM training; train and eval rows are disjoint.

    Batches are read from the store row by row (int64, a fresh copy each time); ``train_rows``
    and ``eval_rows`` are views of the store's memory map in its dtype (int16/int32), for
    looking at small data whole: nothing is read until they are touched."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = tokenizer
        self.store = open_store(config, tokenizer)
        total_rows = self.store.num_rows
        eval_rows = math.ceil(total_rows * config.eval_fraction) if config.eval_fraction else 0
        if total_rows - eval_rows < 1:
            raise ValueError(
                f"source {config.source!r} gives {self.store.stream_tokens} tokens = "
                f"{total_rows} rows of {config.seq_len}; {eval_rows} held out leaves no "
                "training row"
            )
        rows = torch.from_numpy(self.store.rows())  # shares the mapping: nothing is read
        self.train_rows = rows[: total_rows - eval_rows]
        self.eval_rows = rows[total_rows - eval_rows :]
        self.num_train_rows = self.train_rows.shape[0]
        self.num_eval_rows = self.eval_rows.shape[0]
        self.schedule = RowSchedule(self.num_train_rows, config.seed)
        self.fingerprint = self.store.fingerprint
        log.info("%s: %d tokens -> %d train + %d eval rows of %d (fingerprint %s, store %s %s, "
                 "%.2fs)", config.source, self.store.stream_tokens, self.num_train_rows,
                 self.num_eval_rows, config.seq_len, self.fingerprint, self.store.path,
                 "built" if self.store.built else "found", time.perf_counter() - t0)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def _read(self, index: torch.Tensor) -> torch.Tensor:
        """Training rows ``index`` as int64 ``[len(index), seq_len]``, read from the store."""
        return torch.from_numpy(self.store.read_rows(index.numpy()).astype("int64"))

    @staticmethod
    def _as_batch(ids: torch.Tensor) -> Batch:
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def _train_rows(self, index: torch.Tensor) -> Batch:
        return self._as_batch(self._read(index))

    def _eval_rows(self, start: int, stop: int) -> Batch:
        if not 0 <= start <= stop <= self.num_eval_rows:
            raise IndexError(f"eval rows {start}..{stop} asked of {self.num_eval_rows}")
        offset = self.num_train_rows  # the eval split is the store's tail
        return self._as_batch(torch.from_numpy(
            self.store.read_range(offset + start, offset + stop).astype("int64")))

    def global_batch(self, *, step: int, micro_batch: int, grad_accum: int,
                     micro_batch_rows: int) -> torch.Tensor:
        """Token ids [micro_batch_rows, seq_len] of one global micro-batch, for any world size."""
        index = self.global_indices(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                                    micro_batch_rows=micro_batch_rows)
        return self._read(index)

