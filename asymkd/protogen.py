"""Generate the Python gRPC stubs from protos/asymkd/v1/teacher.proto into asymkd/v1/.

Run: python -m asymkd.protogen            (rewrites the committed stubs)
     python -m asymkd.protogen --check    (exit 1 when the committed stubs are stale)
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "asymkd/v1/teacher.proto"
OUTPUTS = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


def stale_files() -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "asymkd" / "v1"
        here = ROOT / "asymkd" / "v1"
        return [
            n
            for n in OUTPUTS
            if not (here / n).exists() or not filecmp.cmp(fresh / n, here / n, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {stale}; run `python -m asymkd.protogen`", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
