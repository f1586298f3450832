"""Provenance of an experiment: machine, package versions, seeds, and the data's attribution."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from shieldtune.data.builtin import BUILTIN_DATASETS, builtin_info, resolve_data_dir
from shieldtune.errors import DataError
from shieldtune.experiments.config import ExperimentPlan

__all__ = [
    "PACKAGES",
    "PROVENANCE_JSON",
    "cpu_name",
    "cpu_kernels",
    "package_versions",
    "source_revision",
    "provenance",
]

PROVENANCE_JSON = "provenance.json"
PACKAGES = ("shieldtune", "torch", "transformers", "peft", "flwr", "cryptography")
"""Packages whose versions every experiment records."""


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kernels() -> str:
    """The CPU kernel set torch dispatches to here (``AVX512``, ``AVX2``, ``DEFAULT``...): the same
    CPU model name can come with different instruction sets, and times follow the kernels."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_revision(root: Path | None = None) -> str | None:
    """The git commit of the shieldtune source that runs (``+dirty`` with local changes).

    Args:
        root: The checkout (default: the one this module runs from).

    Returns:
        The commit, or None when the source is not a git checkout (an installed wheel) or git
        fails.
    """
    root = Path(__file__).resolve().parents[3] if root is None else root
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def _accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (×{torch.cuda.device_count()})"
    return f"none (CPU only; torch threads {torch.get_num_threads()})"


def _readme_table(folder: Path, files: set[str]) -> tuple[str | None, list[str]]:
    """The header and the rows naming one of ``files`` of the data folder README's table."""
    try:
        lines = (folder / "README.md").read_text().splitlines()
    except OSError:
        return None, []
    table = [ln for ln in lines if ln.startswith("|")]
    rows = [ln for ln in table if any(f in ln for f in files)]
    return (table[0] if table and rows else None), rows


def _attribution(plan: ExperimentPlan) -> list[dict[str, Any]]:
    """Source and licence of each dataset of the grid, with the data README's own rows."""
    out, seen = [], set()
    for cell in plan.cells:
        d = cell.config.data
        if (cell.dataset, d.dataset) in seen:
            continue
        seen.add((cell.dataset, d.dataset))
        entry: dict[str, Any] = {"dataset": cell.dataset, "name": d.dataset}
        if d.dataset in BUILTIN_DATASETS:
            info = builtin_info(d.dataset)
            entry.update(source=info.source, licence=info.licence, files=list(info.files))
            if info.files:
                try:
                    folder = resolve_data_dir(d.data_dir)
                except DataError:
                    entry["data_dir"] = None
                else:
                    header, rows = _readme_table(folder, set(info.files))
                    entry.update(data_dir=str(folder), readme_header=header, readme_rows=rows)
        else:
            entry.update(source=f"table {d.path}", licence="as the table's owner states")
        out.append(entry)
    return out


def provenance(plan: ExperimentPlan, argv: list[str] | None = None) -> dict[str, Any]:
    """What ``provenance.json`` records for an experiment.

    Args:
        plan: The experiment.
        argv: The command line (default: ``sys.argv``).

    Returns:
        Machine, Python and package versions, seeds, the experiment file, the command, and the
        attribution of every dataset.
    """
    return {
        "experiment": plan.config.name,
        "source": str(plan.source) if plan.source else None,
        "command": " ".join(argv if argv is not None else sys.argv),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seeds": list(plan.config.seeds),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_kernels": cpu_kernels(),
        "accelerator": _accelerator(),
        "packages": package_versions(),
        "source_revision": source_revision(),
        "data": _attribution(plan),
    }
