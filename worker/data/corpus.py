"""Where training text comes from: a text file, a .jsonl/.json/.parquet file, a ``datasets``
``save_to_disk`` directory, a directory of text files, or the stdlib corpus.

Every source yields documents (strings) in a fixed order, so every rank that reads the same
source sees the same stream. ``iter_pieces`` yields them in pieces of bounded size (a text file
is one document, however large), so a corpus larger than RAM can be tokenised; ``iter_documents``
joins the pieces. The built-in corpus is the Python standard library's own ``.py`` files: real
text present on every machine with no download. It depends on the Python version, so ranks on
different machines should compare ``PackedText.fingerprint`` before training.
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from worker.data import hf_sources

log = logging.getLogger(__name__)

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".py")
PIECE_CHARS = 1_000_000  # characters of a text file read at a time (4 MB as UCS-4 at most)
STDLIB_MAX_BYTES = 4_000_000  # enough for every test and demo; read in a fraction of a second
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__",
                       "idle_test", "lib2to3"})


def stdlib_dir() -> Path:
    """The standard library's source directory of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The stdlib's ``.py`` files, top-level modules first then packages, each level sorted
    (tests and site-packages left out), up to ``max_bytes`` of source in total."""
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library sources are not at {root}; name a text "
                                "source instead of 'stdlib'")
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):  # pruned: never scans site-packages
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            size = path.stat().st_size if name.endswith(".py") else 0
            if size == 0:
                continue
            files.append(path)
            total += size
            if total >= max_bytes:
                return files
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return files


def read_text(path: Path) -> str:
    """A file's text as UTF-8; undecodable bytes become U+FFFD, the same on every machine."""
    return path.read_text(encoding="utf-8", errors="replace")


def iter_jsonl(path: Path, field: str) -> Iterator[dict]:
    """The objects of a JSON-lines file (blank lines skipped); each must have ``field``."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no {field!r} field (has {keys})")
            yield obj


def directory_files(root: Path) -> list[Path]:
    """The text files (``.txt``, ``.md``, ``.py``) under ``root``, sorted by relative path."""
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {root}")
    return files


def file_pieces(path: Path, piece_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """A text file as ``(piece, is_last)`` pieces whose concatenation is ``read_text(path)``.

    Text mode decodes incrementally and translates newlines across piece boundaries exactly
    as one whole read does, so a file of any size needs two pieces of memory (default
    ``PIECE_CHARS`` characters each)."""
    piece_chars = piece_chars or PIECE_CHARS
    with path.open(encoding="utf-8", errors="replace") as fh:
        piece = fh.read(piece_chars)
        while True:
            following = fh.read(piece_chars) if piece else ""
            yield piece, not following
            if not following:
                return
            piece = following


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` strings of a JSON-lines file."""
    for obj in iter_jsonl(path, field):
        text = obj[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: field {field!r} holds {type(text).__name__}, "
                             "expected a string")
        yield text


def _whole(texts: Iterator[str]) -> Iterator[tuple[str, bool]]:
    return ((text, True) for text in texts)


def iter_pieces(source: str, *, text_field: str = "text",
                piece_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """The documents of ``source`` as ``(piece, ends_document)`` pairs, in the fixed order.

    'stdlib'; a directory from ``save_to_disk`` (one document per row of ``text_field``); a
    directory of text files (one per file); a .jsonl, .json or .parquet file (one per row, from
    ``text_field``); any other file is one text document, read ``piece_chars`` at a time."""
    if source == STDLIB:
        yield from _whole(read_text(path) for path in stdlib_files())
        return
    path = Path(source)
    if hf_sources.is_saved_dataset(path):
        yield from _whole(hf_sources.saved_dataset_texts(path, text_field))
    elif path.is_dir():
        for file in directory_files(path):
            yield from file_pieces(file, piece_chars)
    elif path.is_file() and path.suffix == ".jsonl":
        yield from _whole(_jsonl_texts(path, text_field))
    elif path.is_file() and path.suffix == ".json":
        yield from _whole(hf_sources.json_texts(path, text_field))
    elif path.is_file() and path.suffix == ".parquet":
        yield from _whole(hf_sources.parquet_texts(path, text_field))
    elif path.is_file():
        yield from file_pieces(path, piece_chars)
    else:
        raise FileNotFoundError(f"data source {source!r} is neither 'stdlib' nor an existing "
                                "file or directory")


def iter_documents(source: str, *, text_field: str = "text") -> Iterator[str]:
    """The documents of ``source`` (see ``iter_pieces``), each one whole string."""
    parts: list[str] = []
    for piece, last in iter_pieces(source, text_field=text_field):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []


def source_files(source: str) -> list[Path]:
    """Every file whose bytes make up ``source``, in a fixed order: what a cache key stats."""
    if source == STDLIB:
        return stdlib_files()
    path = Path(source)
    if hf_sources.is_saved_dataset(path):
        return sorted((p for p in path.rglob("*") if p.is_file()),
                      key=lambda p: p.relative_to(path).as_posix())
    if path.is_dir():
        return directory_files(path)
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"data source {source!r} is neither 'stdlib' nor an existing "
                            "file or directory")
