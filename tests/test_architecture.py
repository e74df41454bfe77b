"""The house rules, checked on the source: no module imports one of a higher layer (function-local imports and
``TYPE_CHECKING`` imports included), and only the nnU-Net backend imports nnunetv2."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "alseg"

#: the README's architecture table: module prefix -> layer (the longest prefix wins)
LAYERS = {
    "alseg": 1,  # __init__ (the version)
    "alseg.errors": 1,
    "alseg.durable": 1,
    "alseg.config": 1,
    "alseg.data": 1,
    "alseg.scoring": 1,
    "alseg.uncertainty": 1,
    "alseg.selection": 1,
    "alseg.evaluation": 1,
    "alseg.store": 2,
    "alseg.backends": 2,
    "alseg.backends.base": 2,
    "alseg.strategies": 3,
    "alseg.backends.nnunet": 4,
    "alseg.oracle": 4,
    "alseg.loop": 5,
    "alseg.report": 6,
    "alseg.study": 6,
    "alseg.cli": 6,
    "alseg.demo": 6,
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_no_module_imports_a_higher_layer(module: str, path: Path) -> None:
    mine = layer(module)
    upward = [
        f"{path.name}:{line} imports {name} (layer {layer(name)} > {mine})"
        for name, line in imports(path)
        if name.startswith("alseg") and layer(name) > mine
    ]
    assert not upward, upward


def test_only_the_nnunet_backend_imports_nnunetv2() -> None:
    offenders = [
        f"{module}:{line}"
        for module, path in modules()
        for name, line in imports(path)
        if name.split(".")[0] == "nnunetv2" and not module.startswith("alseg.backends.nnunet")
    ]
    assert not offenders, offenders


def test_the_runner_never_branches_on_the_oracle_kind() -> None:
    text = (SRC / "loop" / "runner.py").read_text()
    assert '"human"' not in text and "'human'" not in text and ".human" not in text
    assert len(text.splitlines()) < 400
    for name in ("base.py", "simulated.py", "human.py", "package.py", "importer.py"):
        assert len((SRC / "oracle" / name).read_text().splitlines()) < 400, name
