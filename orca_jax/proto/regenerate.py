"""Regenerate the committed gRPC stubs from generation.proto (needs `grpcio-tools`).

    python -m orca_jax.proto.regenerate          # rewrite generation_pb2{,_grpc}.py{,i}
    python -m orca_jax.proto.regenerate --check  # exit 1 if the committed stubs are stale

Run from anywhere: protoc is pointed at the folder that holds the `orca_jax` package, so the
generated module imports `orca_jax.proto.generation_pb2` (a package-absolute import).
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent           # the folder holding orca_jax/
PROTO = "orca_jax/proto/generation.proto"
OUTPUTS = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (bundled with grpcio-tools) into `out_dir`; returns the generated files."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                      f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    return [out_dir / "orca_jax" / "proto" / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for f in generate(Path(tmp)):
            target = HERE / f.name
            if not target.exists() or not filecmp.cmp(f, target, shallow=False):
                stale.append(f.name)
                if not args.check:
                    target.write_bytes(f.read_bytes())
    if args.check and stale:
        print(f"stale stubs: {', '.join(stale)}; run python -m orca_jax.proto.regenerate", file=sys.stderr)
        return 1
    print("up to date" if not stale else f"regenerated {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
