"""Build step: compile proto/v1/*.proto into the gradhub.proto.v1 Python modules.

Run ``python -m gradhub.proto.generate`` after editing a .proto file. The output
is committed; tests/unit/test_proto_drift.py regenerates it into a temporary
folder and fails when the committed files differ. Never edit the output by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/v1 into ``out_dir``; returns the files written."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        # Lay the sources out under gradhub/proto/v1 so the generated imports
        # read ``from gradhub.proto.v1 import tensor_pb2``.
        root = Path(tmp) / "src"
        pkg = root / "gradhub" / "proto" / "v1"
        pkg.mkdir(parents=True)
        for proto in sorted(SOURCES.glob("*.proto")):
            shutil.copy(proto, pkg / proto.name)
        built = Path(tmp) / "out"
        built.mkdir()
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={built}",
            f"--pyi_out={built}",
            f"--grpc_python_out={built}",
            *[str(p.relative_to(root)) for p in sorted(pkg.glob("*.proto"))],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((built / "gradhub" / "proto" / "v1").iterdir()):
            target = out_dir / path.name
            shutil.copy(path, target)
            written.append(target)
        return written


def main() -> None:
    for path in generate(SOURCES):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
