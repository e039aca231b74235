"""The packed token stream, produced a bounded block at a time and written as whole rows.

The stream is every document's tokens followed by the end-of-text id, cut at ``max_tokens``
when there is a cap; rows are its first ``len // seq_len * seq_len`` tokens. This module makes
exactly that stream without ever holding it: ``token_blocks`` yields it as small numpy arrays,
and ``RowWriter`` writes them out whole rows at a time while hashing the rows the way
``PackedText.fingerprint`` always has (sha256 of the int64 rows), so a store's fingerprint is
known without reading the store back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from worker.data.config import DataConfig
from worker.data.corpus import iter_pieces
from worker.data.tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger(__name__)

BATCH_CHARS = 4_000_000  # text handed to a Hugging Face tokenizer per batched call
BATCH_DOCS = 1024
FLUSH_TOKENS = 1 << 21  # tokens buffered before a write: 4-8 MiB
HASH_TOKENS = 1 << 20  # tokens widened to int64 at a time for the fingerprint


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest signed integer dtype torch can index that holds every id."""
    if vocab_size <= np.iinfo(np.int16).max + 1:
        return np.dtype("<i2")
    if vocab_size <= np.iinfo(np.int32).max + 1:
        return np.dtype("<i4")
    raise ValueError(f"vocab_size {vocab_size} does not fit a 32-bit token id")


def _unbounded_blocks(config: DataConfig, tokenizer: Tokenizer,
                      dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each document's tokens and its eos, as arrays (a large document in several)."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    pieces = iter_pieces(config.source, text_field=config.text_field)
    if isinstance(tokenizer, ByteTokenizer):  # bytes are ids: encode piece by piece
        for piece, last in pieces:
            yield np.frombuffer(tokenizer.encode_bytes(piece), dtype=np.uint8).astype(dtype)
            if last:
                yield eos
        return
    encode_batch = getattr(tokenizer, "encode_batch", None)
    docs: list[str] = []
    parts: list[str] = []
    size = 0

    def encoded(batch: list[str]) -> Iterator[np.ndarray]:
        ids = encode_batch(batch) if encode_batch else [tokenizer.encode(d) for d in batch]
        for doc_ids in ids:
            yield np.asarray(doc_ids, dtype=dtype)
            yield eos

    for piece, last in pieces:  # a document is tokenised whole: splitting it changes its ids
        parts.append(piece)
        size += len(piece)
        if last:
            docs.append("".join(parts))
            parts = []
            if size >= BATCH_CHARS or len(docs) >= BATCH_DOCS:
                yield from encoded(docs)
                docs, size = [], 0
    if docs:
        yield from encoded(docs)


def token_blocks(config: DataConfig, tokenizer: Tokenizer,
                 dtype: np.dtype) -> Iterator[np.ndarray]:
    """The packed stream of ``config``'s source as arrays of ``dtype``, cut at the cap."""
    cap = config.max_tokens
    total = 0
    for block in _unbounded_blocks(config, tokenizer, dtype):
        if cap is not None and total + block.size >= cap:
            yield block[: cap - total]
            return
        total += block.size
        yield block


class RowWriter:
    """Writes a token stream to ``fh`` in whole rows of ``seq_len``, hashing them as int64.

    The tail of fewer than ``seq_len`` tokens is held back, so what remains at ``close`` is
    exactly what the rows leave out and never reaches the file."""

    def __init__(self, fh: BinaryIO, *, seq_len: int, dtype: np.dtype) -> None:
        self.fh = fh
        self.seq_len = seq_len
        self.dtype = dtype
        self.stream_tokens = 0  # every token seen, rows or tail
        self.row_tokens = 0  # tokens written: a multiple of seq_len
        self._blocks: list[np.ndarray] = []
        self._buffered = 0
        self._hash = hashlib.sha256()

    def add(self, block: np.ndarray) -> None:
        """Append ``block`` to the stream (written once enough is buffered)."""
        if block.size:
            self._blocks.append(block)
            self._buffered += block.size
            self.stream_tokens += block.size
        if self._buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        data = np.concatenate(self._blocks) if len(self._blocks) > 1 else self._blocks[0]
        whole = data.size // self.seq_len * self.seq_len
        rows, tail = data[:whole], data[whole:]
        for start in range(0, rows.size, HASH_TOKENS):
            self._hash.update(rows[start : start + HASH_TOKENS].astype("<i8").tobytes())
        self.fh.write(np.ascontiguousarray(rows, dtype=self.dtype).data)
        self.row_tokens += rows.size
        self._blocks = [tail.copy()] if tail.size else []
        self._buffered = tail.size

    def close(self) -> str:
        """Write what whole rows remain; the fingerprint (16 hex digits) of all the rows."""
        if self._blocks:
            self._flush()
        self._blocks, self._buffered = [], 0
        return self._hash.hexdigest()[:16]
