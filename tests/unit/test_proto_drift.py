"""The committed gradhub.proto.v1 modules must be exactly what the build step generates."""

from __future__ import annotations

from pathlib import Path

import gradhub.proto
from gradhub.proto.generate import generate


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    committed = Path(gradhub.proto.__file__).parent / "v1"
    written = generate(tmp_path)
    assert written, "the generator wrote nothing"
    for fresh in written:
        old = committed / fresh.name
        assert old.exists(), f"{fresh.name} is generated but not committed: run python -m gradhub.proto.generate"
        assert old.read_bytes() == fresh.read_bytes(), (
            f"proto/v1/{fresh.name} drifted from the .proto files: run python -m gradhub.proto.generate"
        )
    generated = {p.name for p in written}
    stale = {p.name for p in committed.glob("*_pb2*.py*")} - generated
    assert not stale, f"committed generated files with no .proto: {sorted(stale)}"
