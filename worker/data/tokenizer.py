"""Tokenizers behind one small interface: a byte-level default, or a model directory's own.

Both expose ``vocab_size`` (every id the model must embed), ``eos_token_id`` (the separator
packed between documents), ``pad_token_id``, ``encode`` (no special tokens: for packing),
``encode_example`` (with the model's special tokens, truncated: for classification) and
``decode``. Nothing here touches the network: a directory is read with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Files whose presence means a directory carries its own Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_example(self, text: str, *, max_length: int) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus an end-of-text id 256 (also used for padding)."""

    vocab_size = 257
    eos_token_id = 256
    pad_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """The ids of ``encode`` as one bytes object: the fast path for packing megabytes."""
        return text.encode("utf-8")

    def encode_example(self, text: str, *, max_length: int) -> list[int]:
        return list(text.encode("utf-8")[:max_length])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class HFTokenizer:
    """A Hugging Face tokenizer adapted to the interface above (separator: eos, else sep)."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = len(hf)  # includes added tokens, unlike hf.vocab_size
        eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {hf.name_or_path!r} has neither an eos nor a sep token "
                             "to separate packed documents")
        self.eos_token_id = int(eos)
        self.pad_token_id = int(hf.pad_token_id if hf.pad_token_id is not None else eos)

    def encode(self, text: str) -> list[int]:
        # verbose=False: a whole document is longer than model_max_length, and that is fine here
        return self.hf(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call (a fast tokenizer spreads it over threads)."""
        return self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_example(self, text: str, *, max_length: int) -> list[int]:
        return self.hf(text, truncation=True, max_length=max_length)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.hf.name_or_path!r}, vocab_size={self.vocab_size})"


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """A string that changes whenever ``tokenizer`` would give other ids: part of a store key.

    A Hugging Face tokenizer is identified by its whole serialised vocabulary and rules (the
    fast backend's JSON, else the sorted vocabulary), not by its directory's name."""
    if isinstance(tokenizer, ByteTokenizer):
        return "bytes-257"
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        return repr(tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    return f"hf:{type(hf).__name__}:{tokenizer.vocab_size}:{tokenizer.eos_token_id}:{digest}"


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds tokenizer files of its own."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """The model directory's tokenizer (offline) when it has one, else the byte tokenizer."""
    if model_dir is None:
        return ByteTokenizer()
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not has_tokenizer(path):
        log.info("no tokenizer files in %s (looked for %s); using the byte tokenizer", path,
                 ", ".join(TOKENIZER_FILES))
        return ByteTokenizer()
    from transformers import AutoTokenizer  # lazy: transformers

    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    log.info("loaded %r from %s", tok, path)
    return tok
