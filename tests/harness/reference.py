"""Single-process training of the same model on the same global batches: the parity baseline.

The runner is production code (worker/train/single.py, which ``zerop2p doctor`` uses too): one
definition of the arithmetic a sharded run must reproduce. The names here are the tests'.
"""

from __future__ import annotations

from worker.train.single import SingleProcess
from worker.train.single import SingleResult as ReferenceResult
from worker.train.single import train_single_process as train_reference

__all__ = ["ReferenceResult", "SingleProcess", "train_reference"]
