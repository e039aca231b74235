"""Packed token rows on disk: tokenised once per key, then read by every rank on the machine.

[Note: token store]
A *store* is the packed rows of one (source, text field, tokenizer, max_tokens, seq_len) as a
flat little-endian int16/int32 file, ``<key>.tokens`` (rows * seq_len ids, nothing else), and
``<key>.json`` beside it: the row count, dtype and fingerprint. The *key* hashes those inputs
with every source file's path, size and mtime, so an edited corpus or another tokenizer gets a
new store and an old one is never read by mistake.

Building writes ``<key>.tokens.tmp-<host>-<pid>``, fsyncs it and renames it into place, then
does the same for the JSON: the JSON exists only once its tokens are whole, so a reader that
finds it can trust the file, and a builder killed half-way leaves only a temporary that the
next builder on its host removes. Builders of one key take ``flock`` on ``<key>.lock``:
several workers on one machine build once, the others wait, then all read the same file
through one shared page cache.
Ranks on other machines build their own, bit-identical copy (the stream is deterministic); on
a shared network disk where flock is not honoured the renames still leave a whole store, at
worst built twice.

A rank reads the rows of its batches and nothing else (``TokenStore.read_rows``), so its
memory for data is its batches (and the epoch's row permutation, 4 bytes a row), not the corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from worker.data.config import DataConfig
from worker.data.corpus import STDLIB, source_files
from worker.data.stream import RowWriter, token_blocks, token_dtype
from worker.data.tokenizer import Tokenizer, tokenizer_identity

log = logging.getLogger(__name__)

STORE_VERSION = 1  # bump when the file layout or the stream's definition changes
CACHE_ENV = "ZEROP2P_DATA_CACHE"


class TokenStore:
    """An opened store: rows read by ``pread`` on demand, or viewed through a memory map.

    ``read_rows`` copies just the asked rows into a fresh array, one ``pread`` per run of
    consecutive rows, so the process holds the batch and nothing more however long it trains
    (the kernel's page cache, shared by every process on the machine, serves repeats). A
    memory map would instead keep every page a batch ever touched in the process's resident
    set, growing towards the whole corpus over an epoch; ``rows()`` gives one anyway, for
    whole-table views of small data."""

    def __init__(self, path: Path, meta: dict, *, built: bool) -> None:
        self.path = path
        self.meta = meta
        self.built = built  # whether this process built it (False: found on disk)
        self.dtype = np.dtype(meta["dtype"])
        self.seq_len = int(meta["seq_len"])
        self.num_rows = int(meta["rows"])
        self.stream_tokens = int(meta["stream_tokens"])  # the tail that fills no row included
        self.fingerprint = str(meta["fingerprint"])
        self._row_bytes = self.seq_len * self.dtype.itemsize
        self._file = path.open("rb", buffering=0)
        self._map: np.ndarray | None = None

    def rows(self) -> np.ndarray:
        """All rows ``[num_rows, seq_len]`` as a copy-on-write memory map (nothing read yet)."""
        if self._map is None:
            shape = (self.num_rows, self.seq_len)
            self._map = (np.memmap(self.path, dtype=self.dtype, mode="c", shape=shape)
                         if self.num_rows else np.empty(shape, dtype=self.dtype))
        return self._map

    def read_rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) as a new ``[len(index), seq_len]`` array."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            raise IndexError(f"{self.path}: rows {index.min()}..{index.max()} asked of "
                             f"{self.num_rows}")
        out = np.empty((index.size, self.seq_len), dtype=self.dtype)
        breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
        for start, stop in zip([0, *breaks], [*breaks, index.size]):
            self._pread(out[start:stop], int(index[start]))
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start .. stop-1``, one read."""
        return self.read_rows(np.arange(start, stop))

    def _pread(self, dest: np.ndarray, row: int) -> None:
        view = memoryview(dest).cast("B")
        offset, done = row * self._row_bytes, 0
        while done < view.nbytes:
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise EOFError(f"{self.path}: ends before row {row} + {done} bytes; the store "
                               "was truncated after it was opened")
            done += got


def default_cache_dir() -> Path:
    """``$ZEROP2P_DATA_CACHE``, else ``$XDG_CACHE_HOME/zerop2p/data`` (``~/.cache`` default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zerop2p" / "data"


def store_key(config: DataConfig, tokenizer: Tokenizer) -> str:
    """``<name>-L<seq_len>-<hash>``: the hash covers everything that shapes the rows."""
    files = []
    for path in source_files(config.source):
        stat = path.stat()
        files.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    payload = json.dumps({"version": STORE_VERSION, "source": config.source, "files": files,
                          "text_field": config.text_field,
                          "tokenizer": tokenizer_identity(tokenizer),
                          "max_tokens": config.max_tokens, "seq_len": config.seq_len})
    name = STDLIB if config.source == STDLIB else Path(config.source).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "source"
    return f"{name}-L{config.seq_len}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def _paths(root: Path, key: str) -> tuple[Path, Path]:
    return root / f"{key}.tokens", root / f"{key}.json"


def _try_open(root: Path, key: str, *, built: bool = False) -> TokenStore | None:
    """The store ``key`` under ``root`` if it is whole; None if absent or not to be trusted."""
    tokens_path, meta_path = _paths(root, key)
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        expected = int(meta["rows"]) * int(meta["seq_len"]) * dtype.itemsize
        size = tokens_path.stat().st_size
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("store %s: unreadable %s (%s); rebuilding", key, meta_path.name, exc)
        return None
    if meta.get("version") != STORE_VERSION or meta.get("key") != key or size != expected:
        log.warning("store %s: %s holds %d bytes, its JSON says %d (version %s); rebuilding",
                    key, tokens_path, size, expected, meta.get("version"))
        return None
    return TokenStore(tokens_path, meta, built=built)


@contextlib.contextmanager
def _locked(path: Path, key: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting, and saying so, if another holds it)."""
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("store %s is being built by another process; waiting for it", key)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(final: Path, write) -> None:
    """Call ``write(fh)`` on a temporary beside ``final``, fsync it, and rename it into place."""
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _left_by_dead_builder(tmp: Path) -> bool:
    """Whether ``tmp`` (``*.tmp-<host>-<pid>``) was written by a process of this host that is
    gone: another host's temporary may still be growing on a shared disk."""
    host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _build(root: Path, key: str, config: DataConfig, tokenizer: Tokenizer) -> None:
    """Tokenise ``config``'s source into the store ``key`` (the caller holds its lock)."""
    t0 = time.perf_counter()
    tokens_path, meta_path = _paths(root, key)
    for stale in filter(_left_by_dead_builder, root.glob(f"{key}.*.tmp-*")):
        log.warning("removing %s, left by a build that did not finish", stale)
        stale.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    result: dict = {}

    def write_tokens(fh) -> None:
        writer = RowWriter(fh, seq_len=config.seq_len, dtype=dtype)
        for block in token_blocks(config, tokenizer, dtype):
            writer.add(block)
        result.update(fingerprint=writer.close(), stream_tokens=writer.stream_tokens,
                      rows=writer.row_tokens // config.seq_len)

    _write_atomic(tokens_path, write_tokens)
    seconds = time.perf_counter() - t0
    meta = {"version": STORE_VERSION, "key": key, "source": config.source,
            "text_field": config.text_field, "tokenizer": tokenizer_identity(tokenizer),
            "max_tokens": config.max_tokens, "seq_len": config.seq_len, "dtype": dtype.str,
            **result, "build_seconds": round(seconds, 3)}
    _write_atomic(meta_path, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    log.info("built store %s: %d tokens -> %d rows of %d in %.1fs (%.1f M tokens/s), %s",
             key, result["stream_tokens"], result["rows"], config.seq_len, seconds,
             result["stream_tokens"] / max(seconds, 1e-9) / 1e6, tokens_path)


def open_store(config: DataConfig, tokenizer: Tokenizer) -> TokenStore:
    """The store of ``config`` and ``tokenizer``, built first if no process has built it."""
    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    key = store_key(config, tokenizer)  # names a missing source before anything is created
    store = _try_open(root, key)
    if store is not None:
        return store
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the data cache directory {root} ({exc.strerror}); set "
                      f"DataConfig.cache_dir or ${CACHE_ENV}") from exc
    with _locked(root / f"{key}.lock", key):
        store = _try_open(root, key)  # another process may have built it while we waited
        if store is None:
            _build(root, key, config, tokenizer)
            store = _try_open(root, key, built=True)
    if store is None:
        raise RuntimeError(f"store {key} under {root} was built but cannot be opened")
    return store
