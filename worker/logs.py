"""Logging for worker processes: every line carries the rank once the process has one.

Ranks change between generations, so the rank is a process-wide value read when each record is
made (a LogRecord factory), not baked into logger names.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s rank %(rank)s %(levelname)s %(name)s: %(message)s"
_rank = "-"


def set_rank(rank: int | None) -> None:
    """The rank to print from now on (None: not in a generation)."""
    global _rank
    _rank = "-" if rank is None else str(rank)


def setup(level: str) -> None:
    """Configure the root logger on stderr with the rank in every line."""
    base = logging.getLogRecordFactory()

    def make(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.rank = _rank
        return record

    logging.setLogRecordFactory(make)
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=FORMAT)
