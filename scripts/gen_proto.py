"""Regenerate communication/proto/zerop2p_pb2.py from zerop2p.proto (grpcio-tools).

Only the message module: the peer server registers generic handlers and the client builds its
calls from the channel, so no generated service stubs are needed. ``--check`` regenerates into
a temporary folder and exits 1 if the committed file differs (stale).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parents[1] / "communication" / "proto"
NAME = "zerop2p"
OUTPUTS = (f"{NAME}_pb2.py",)


def generate(out_dir: Path) -> None:
    """Run protoc on the proto file into out_dir."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                      f"--python_out={out_dir}",
                      str(PROTO_DIR / f"{NAME}.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [name for name in OUTPUTS
                if not (PROTO_DIR / name).exists()
                or (Path(tmp) / name).read_text() != (PROTO_DIR / name).read_text()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if generated code is stale")
    args = ap.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run scripts/gen_proto.py")
            return 1
        print("generated code is up to date")
        return 0
    generate(PROTO_DIR)
    print(f"wrote {', '.join(OUTPUTS)} in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
