"""Generate the Python protobuf/gRPC code for protos/dlora/v1 into a package folder.

Usage: python protos/generate.py OUT_DIR   (the committed copy lives in common/pb)

The generated modules import each other package-relative, so `common.pb` needs no sys.path tricks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = ("dlora/v1/dlora.proto", "dlora/v1/edge_control.proto")


def generate(out_dir: Path) -> list[Path]:
    """Write NAME_pb2.py, NAME_pb2.pyi and NAME_pb2_grpc.py for every proto under out_dir/dlora/v1.

    Raises:
        RuntimeError: protoc failed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {', '.join(PROTOS)}")
    pkg = out_dir / "dlora" / "v1"
    for init in (out_dir / "__init__.py", out_dir / "dlora" / "__init__.py", pkg / "__init__.py"):
        init.touch()
    for grpc_file in pkg.glob("*_pb2_grpc.py"):
        text = re.sub(r"^from dlora\.v1 import", "from . import", grpc_file.read_text(), flags=re.M)
        grpc_file.write_text(text)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python protos/generate.py OUT_DIR")
    for path in generate(Path(sys.argv[1])):
        print(path)
