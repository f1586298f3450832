"""The federated package stays in its layer, and what runs in the enclave stays light."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "shieldtune" / "federated"


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_federated_never_imports_recipes_cli_or_report():
    for path in PKG.glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("shieldtune.recipes", "shieldtune.cli"))}
        assert not bad, f"{path.name} imports {bad}"


def test_enclave_side_modules_import_only_torch_and_measured_code():
    allowed = {"__future__", "math", "os", "collections", "collections.abc", "torch"}
    allowed |= {"shieldtune.errors", "shieldtune.crypto.framing", "shieldtune.tee.program"}
    allowed |= {"shieldtune.federated.aggregate", "shieldtune.federated.dp"}
    allowed |= {"shieldtune.federated.enclave_program"}
    # (the sparse functions import SPF lazily: only the fedavg-sparse program loads it, and its
    # measurement lists those modules)
    for name in ("aggregate.py", "dp.py", "enclave_program.py", "sparse_program.py", "__init__.py"):
        assert _imports(PKG / name, top_level_only=True) <= allowed, name
