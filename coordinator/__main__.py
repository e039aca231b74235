"""``python -m coordinator``: the coordinator without the zerop2p CLI."""

from __future__ import annotations

import argparse

from coordinator.server import run_coordinator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator",
                                     description="Run the zerop2p coordinator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--db", default="zerop2p.db", help="SQLite file, or :memory:")
    parser.add_argument("--token", default=None, help="bearer token (default $ZEROP2P_TOKEN)")
    parser.add_argument("--heartbeat-timeout", type=float, default=30.0,
                        help="seconds without a heartbeat before a worker is dead")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    run_coordinator(host=args.host, port=args.port, db=args.db, token=args.token,
                    heartbeat_timeout=args.heartbeat_timeout, log_level=args.log_level)


if __name__ == "__main__":
    main()
