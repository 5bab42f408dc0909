"""Regenerate the stubs: `python -m services.protos.build [--out DIR]` (what `make proto` runs).

protoc run with `-Iproto` names the modules after the proto package (`headwise.v1`), which
would collide with the engine package `headwise`; the generated imports are rewritten to
`services.protos.headwise.v1` so the stubs import each other from where they are committed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "services" / "protos"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT = re.compile(r"^from headwise\.v1 import ", re.M)
_MODULE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'headwise\.v1\.")


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "headwise" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the stubs under out/headwise/v1/ and return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / "headwise" / "v1").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
            f"--pyi_out={out}", *(str(p.relative_to(PROTO_DIR)) for p in proto_files())]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(str(p) for p in proto_files())}")
    files = sorted(p for p in (out / "headwise" / "v1").iterdir() if p.name.endswith(GENERATED))
    for p in files:
        text = _IMPORT.sub("from services.protos.headwise.v1 import ", p.read_text())
        # message classes take __module__ from this name; it must be importable so they pickle (Ray)
        p.write_text(_MODULE.sub(r"\1'services.protos.headwise.v1.", text))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    files = generate(ap.parse_args(argv).out)
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
