"""``python -m coordinator``: the coordinator without the zerop2p CLI."""

from __future__ import annotations

import argparse

from coordinator.config import setting_default
from coordinator.server import run_coordinator


def main(argv: list[str] | None = None, prog: str = "python -m coordinator") -> None:
    """Parse the coordinator's options (also ``zerop2p coordinator``'s) and serve."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Run the zerop2p coordinator.")
    # No defaults here: an option left out comes from $ZEROP2P_<NAME> or Settings.
    parser.add_argument("--host", help=f"address to bind (default {setting_default('host')})")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one "
                                                 f"(default {setting_default('port')})")
    parser.add_argument("--db",
                        help=f"SQLite file, or :memory: (default {setting_default('db')})")
    parser.add_argument("--token", help="bearer token (default $ZEROP2P_TOKEN)")
    parser.add_argument("--heartbeat-timeout", type=float,
                        help="seconds without a heartbeat before a worker is dead "
                             f"(default {setting_default('heartbeat_timeout')})")
    parser.add_argument("--log-level", help=f"(default {setting_default('log_level')})")
    run_coordinator(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
