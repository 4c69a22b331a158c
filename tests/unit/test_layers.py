"""The package graph has no upward edge: the shared contract (``gradhub.proto.contract``)
imports nothing else of gradhub's; the protocol sits above it, the worker above the protocol,
the server above the worker, and the client, CLI and demo on top. Every import counts, those
inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"proto": "gradhub.proto", "worker": "gradhub.worker", "server": "gradhub.server",
            "client": "gradhub.client"}
LAYERS = ("gradhub.proto.contract", "gradhub.proto", "gradhub.worker", "gradhub.server", "gradhub.client")


def layer(module: str) -> int:
    """The index in LAYERS of the most specific layer that holds ``module``."""
    for i in reversed(range(len(LAYERS))):
        name = LAYERS[i]
        if module == name or module.startswith(name + "."):
            # the contract is inside gradhub.proto's folder but below it
            return 0 if module.startswith(LAYERS[0]) else i
    raise AssertionError(f"{module} is in no layer")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gradhub")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradhub"):
            found.add(node.module)
    return found


def test_every_import_goes_down_the_layers() -> None:
    found = modules()
    assert "gradhub.proto.contract.spec" in found and "gradhub.client.cli" in found
    upward = sorted(f"{src} -> {dst}" for src, path in found.items() for dst in imports(path)
                    if layer(dst) > layer(src))
    assert upward == [], "imports that go up the layers:\n" + "\n".join(upward)


def test_the_contract_imports_only_itself() -> None:
    for src, path in modules().items():
        if src.startswith("gradhub.proto.contract"):
            assert {d for d in imports(path) if not d.startswith("gradhub.proto.contract")} == set(), src


def test_the_check_sees_an_upward_edge() -> None:
    assert layer("gradhub.worker.loop") > layer("gradhub.proto.codec") > layer("gradhub.proto.contract.spec")
    assert layer("gradhub.server.optim") > layer("gradhub.worker.data")
