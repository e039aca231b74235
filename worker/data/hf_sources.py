"""Sources read through Hugging Face ``datasets``: parquet and JSON files, ``save_to_disk`` dirs.

Each yields the strings of one text column, in row order, a batch of rows at a time, so memory
stays at one batch whatever the file's size. Files are read with ``streaming=True``: rows
come straight from the file, with no Arrow copy written to the ``datasets`` cache. A
``save_to_disk`` directory is already Arrow and is memory-mapped by ``load_from_disk``. Only
local paths are read; nothing here reaches the Hub. ``datasets`` is imported on first use, so
a run on plain text never pays for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_ROWS = 1024
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes at the top
TRAIN_SPLIT = "train"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset(Dict).save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS)


def _texts(batches: Iterable[Mapping[str, list]], field: str, where: str) -> Iterator[str]:
    """The ``field`` strings of column batches; errors name ``where``, the field and the row."""
    row = 0
    for batch in batches:
        if field not in batch:
            raise ValueError(f"{where}: no {field!r} column (has {sorted(batch)})")
        for text in batch[field]:
            if not isinstance(text, str):
                raise ValueError(f"{where}: row {row} field {field!r} holds "
                                 f"{type(text).__name__}, expected a string")
            yield text
            row += 1


def _streamed(builder: str, path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of one local file through ``datasets``' streaming ``builder``."""
    import datasets  # lazy: pyarrow and pandas come with it

    ds = datasets.load_dataset(builder, data_files=[str(path)], split=TRAIN_SPLIT,
                               streaming=True)
    yield from _texts(ds.iter(batch_size=BATCH_ROWS), field, str(path))


def parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of a parquet file, row by row."""
    return _streamed("parquet", path, field)


def json_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of each object of a .json file (a JSON array, or JSON lines)."""
    return _streamed("json", path, field)


def saved_dataset_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of a ``save_to_disk`` directory (a DatasetDict's train split)."""
    import datasets  # lazy: datasets (pyarrow, pandas) only for these sources

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if TRAIN_SPLIT not in ds:
            raise ValueError(f"{path}: a DatasetDict without a {TRAIN_SPLIT!r} split "
                             f"(has {sorted(ds)}); save the split to read on its own")
        ds = ds[TRAIN_SPLIT]
    if field not in ds.column_names:
        raise ValueError(f"{path}: no {field!r} column (has {sorted(ds.column_names)})")
    log.info("%s: %d rows memory-mapped from %d Arrow file(s)", path, ds.num_rows,
             len(ds.cache_files))
    yield from _texts(ds.select_columns([field]).iter(batch_size=BATCH_ROWS), field, str(path))
