"""The layers of docs/architecture.md, checked on the source: every import statement, including
the lazy ones inside functions, of every module in agent/, pruning/ and deploy/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# folder -> module prefixes it must never import
FORBIDDEN = {
    "agent": ("torch", "torchvision", "ultralytics", "torch_pruning", "onnxslim", "prune_pack.pruning",
              "prune_pack.deploy", "prune_pack.config", "prune_pack.cli"),
    "pruning": ("prune_pack.deploy", "prune_pack.cli"),
    "deploy": ("prune_pack.cli",),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; relative imports resolved against its package."""
    pkg = f"prune_pack.{path.parent.name}"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{mod}" if mod else base
            out += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, mod in imports_of(path):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_arrow_goes_up(folder):
    assert violations(folder) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself: an import hidden inside a function, and a relative one, are both found.
    pkg = tmp_path / "agent"
    pkg.mkdir()
    f = pkg / "sneaky.py"
    f.write_text("def f():\n    import torch\n    from ..deploy import build\n")
    mods = [m for _, m in imports_of(f)]
    assert "torch" in mods and "prune_pack.deploy.build" in mods
