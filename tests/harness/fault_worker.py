"""``zerop2p`` with fault injection: the CLI as users run it, plus the FaultInjector observer
armed from ``ZEROP2P_FAULT`` (see faults.py). The failure tests start workers with
``FAULT_WORKER`` as their entry instead of ``python -m worker.cli``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAULT_WORKER = (sys.executable, str(Path(__file__).resolve()))

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from faults import FaultInjector

    from worker.cli.app import app

    injector = FaultInjector.from_env(dict(os.environ))
    app(obj={"observers": [injector] if injector else []})
