"""Where training text comes from: a .txt file, a .jsonl file, a directory, or the stdlib corpus.

Every source yields documents (strings) in a fixed order, so every rank that reads the same
source sees the same stream. The built-in corpus is the Python standard library's own ``.py``
files: real text present on every machine with no download. It depends on the Python version,
so ranks on different machines should compare ``PackedText.fingerprint`` before training.
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".py")
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


def iter_documents(source: str, *, text_field: str = "text") -> Iterator[str]:
    """The documents of ``source``: 'stdlib', a .txt file (one document), a .jsonl file (one
    per line, from ``text_field``), or a directory of text files (one per file)."""
    if source == STDLIB:
        for path in stdlib_files():
            yield read_text(path)
        return
    path = Path(source)
    if path.is_dir():
        for file in directory_files(path):
            yield read_text(file)
    elif path.is_file() and path.suffix == ".jsonl":
        for obj in iter_jsonl(path, text_field):
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}: field {text_field!r} holds {type(text).__name__}, "
                                 "expected a string")
            yield text
    elif path.is_file():
        yield read_text(path)
    else:
        raise FileNotFoundError(f"data source {source!r} is neither 'stdlib' nor an existing "
                                "file or directory")
