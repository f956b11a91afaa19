"""Generate the Python messages, gRPC stubs and typed stubs from proto/.

This is the only producer of the files under clients/python/cueline/. It
writes into a scratch directory first and then replaces the tree, so a
removed .proto file leaves no stale module behind. With --check it compares
instead of writing and exits 1 when the checked-in tree is out of date.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
THIRD_PARTY = PROTO_ROOT / "third_party"
OUT = Path(__file__).resolve().parent / "cueline"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def _sources() -> list[Path]:
    return sorted(p for p in (PROTO_ROOT / "cueline").rglob("*.proto"))


def _generate(into: Path) -> None:
    bin_dir = Path(sys.executable).parent
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{WELL_KNOWN}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--mypy_out={into}",
        f"--mypy_grpc_out={into}",
        *(str(p.relative_to(PROTO_ROOT)) for p in _sources()),
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(result.returncode)
    package = into / "cueline"
    for directory in [package, *(d for d in package.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    (package / "py.typed").touch()


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if regenerating would change the tree")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        _generate(Path(scratch))
        fresh = Path(scratch) / "cueline"
        if options.check:
            if OUT.exists() and _same_tree(fresh, OUT):
                print("generated code is up to date")
                return 0
            print("generated code is stale: run `make proto`", file=sys.stderr)
            return 1
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"generated {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
