"""Import direction: lower layers never import higher ones (see CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "shieldtune"

# subpackage -> subpackages it must never import
FORBIDDEN = {
    "errors": {
        "models",
        "adapters",
        "crypto",
        "tee",
        "data",
        "training",
        "recipes",
        "cli",
        "report",
    },
    "registry": {"models", "adapters", "crypto", "tee", "data", "training", "recipes", "cli"},
    "models": {"adapters", "crypto", "tee", "data", "training", "recipes", "cli", "report"},
    "adapters": {"crypto", "tee", "data", "training", "recipes", "cli", "report"},
    "crypto": {"models", "adapters", "tee", "data", "training", "recipes", "cli", "report"},
    "tee": {"models", "adapters", "data", "training", "recipes", "cli", "report"},
    "data": {"models", "adapters", "crypto", "tee", "training", "recipes", "cli", "report"},
    "training": {"crypto", "tee", "recipes", "cli"},
    "recipes": {"cli"},
    "transport": {"models", "adapters", "data", "training", "recipes", "cli", "split", "federated"},
    "split": {"recipes", "cli", "federated"},
    "federated": {"recipes", "cli", "split", "transport"},
    "attacks": {"recipes", "cli", "report"},
    "shielded": {"recipes", "cli", "report", "split", "federated", "transport"},
    # experiments run the recipes and write tables through report.tables; only the CLI is above
    "experiments": {"cli"},
    # the report reads the files runs, experiments and attacks write, never their code
    "report": {
        "recipes",
        "cli",
        "experiments",
        "attacks",
        "training",
        "federated",
        "split",
        "shielded",
        "transport",
        "tee",
    },
}
# nothing below the attacks imports them (they read what the modes expose, never the reverse)
for _lower in (
    "errors",
    "registry",
    "models",
    "adapters",
    "crypto",
    "tee",
    "data",
    "training",
    "transport",
    "split",
    "federated",
):
    FORBIDDEN[_lower] = FORBIDDEN[_lower] | {"attacks"}
# nothing but the CLI imports the experiment runner (it sits on top of the recipes)
for _layer in set(FORBIDDEN) - {"experiments"}:
    FORBIDDEN[_layer] = FORBIDDEN[_layer] | {"experiments"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "shieldtune" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_upwards(layer):
    target = PKG / layer
    files = sorted(target.rglob("*.py")) if target.is_dir() else [PKG / f"{layer}.py"]
    bad = {
        f"{f.relative_to(PKG)} imports shieldtune.{m}"
        for f in files
        if f.exists()
        for m in _imports(f) & FORBIDDEN[layer]
    }
    assert not bad, sorted(bad)
