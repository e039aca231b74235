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
    parser.add_argument("--stall-after", type=float,
                        help="seconds a member's trainer may stay silent, while others report, "
                             "before GET /training/status names it stalled "
                             f"(default {setting_default('stall_after')})")
    parser.add_argument("--log-level", help=f"(default {setting_default('log_level')})")
    tls = parser.add_argument_group("TLS", "HTTPS, the cluster CA and roles (README, Security)")
    tls.add_argument("--tls", choices=("off", "auto"), help="auto: make a CA and a server "
                     "certificate on first start (kept in --tls-dir) and serve HTTPS "
                     f"(default {setting_default('tls')})")
    tls.add_argument("--tls-dir", help="where --tls auto keeps its files (default: DB.tls "
                     "beside the database)")
    tls.add_argument("--tls-cert", help="your own server certificate (PEM; with --tls-key, "
                     "--tls-ca and --tls-ca-key)")
    tls.add_argument("--tls-key", help="its private key")
    tls.add_argument("--tls-ca", help="your own CA certificate, which workers trust")
    tls.add_argument("--tls-ca-key", help="the CA's private key: it signs worker certificates")
    tls.add_argument("--tls-name", action="append", dest="tls_names", help="another host name "
                     "or address the server certificate must hold (repeatable)")
    tls.add_argument("--admin-token-file", help="file whose first line is the admin token "
                     "(default $ZEROP2P_ADMIN_TOKEN): deletes any worker, reads everything")
    tls.add_argument("--cert-lifetime", type=float, help="seconds a worker certificate is "
                     f"valid (default {setting_default('cert_lifetime')})")
    args = vars(parser.parse_args(argv))
    token_file = args.pop("token_file")
    admin_file = args.pop("admin_token_file")
    if admin_file:
        args["admin_token"] = _first_line(parser, "--admin-token-file", admin_file)
    if token_file:
        if args["token"]:
            parser.error("give the token by --token or --token-file, not both")
        args["token"] = _first_line(parser, "--token-file", token_file)
    elif args["token"]:
        print("warning: --token on the command line is visible to every local user (ps); use "
              "$ZEROP2P_TOKEN or --token-file", file=sys.stderr)
    run_coordinator(**args)


def _first_line(parser: argparse.ArgumentParser, option: str, path: str) -> str:
    """A secret file's first line; a parser error naming the option and file otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        parser.error(f"{option} {path}: {err.strerror or err}")
    if not lines or not lines[0].strip():
        parser.error(f"{option} {path}: the file is empty")
    return lines[0].strip()


if __name__ == "__main__":
    main()
