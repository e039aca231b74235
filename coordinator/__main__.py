"""``python -m coordinator``: the coordinator without the zerop2p CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument("--token", help="bearer token (default $ZEROP2P_TOKEN); prefer the "
                        "variable or --token-file: argv is visible to every local user")
    parser.add_argument("--token-file", help="file whose first line is the bearer token")
    parser.add_argument("--heartbeat-timeout", type=float,
                        help="seconds without a heartbeat before a worker is dead "
                             f"(default {setting_default('heartbeat_timeout')})")
    parser.add_argument("--log-level", help=f"(default {setting_default('log_level')})")
    args = vars(parser.parse_args(argv))
    token_file = args.pop("token_file")
    if token_file:
        if args["token"]:
            parser.error("give the token by --token or --token-file, not both")
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            parser.error(f"--token-file {token_file}: {err.strerror or err}")
        if not lines or not lines[0].strip():
            parser.error(f"--token-file {token_file}: the file is empty")
        args["token"] = lines[0].strip()
    elif args["token"]:
        print("warning: --token on the command line is visible to every local user (ps); use "
              "$ZEROP2P_TOKEN or --token-file", file=sys.stderr)
    run_coordinator(**args)


if __name__ == "__main__":
    main()
