"""A tiny experiment (tiny-llama × the keyword table) shared by the experiment and report tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROWS: list[dict[str, Any]] = [
    {"name": "local LoRA", "overrides": {"mode": "local"}},
    {
        "name": "plain-split LoRA",
        "overrides": {"mode": "plain-split", "split": {"cut": 1}},
        "baseline": "local LoRA",
    },
]


def experiment_data(table: Path, out: Path, *, rows=None, seeds=(0, 1)) -> dict[str, Any]:
    """A 1-dataset grid on tiny-llama: 2 optimisation steps per cell, 16 test rows."""
    return {
        "name": "tiny-kw",
        "output_dir": str(out),
        "seeds": list(seeds),
        "datasets": [
            {
                "name": "kw",
                "overrides": {
                    "data": {
                        "dataset": "table",
                        "path": str(table),
                        "text": "text",
                        "label": "label",
                    }
                },
            }
        ],
        "base": {
            "model": {"name": "tiny-llama", "task": "seq-cls"},
            "data": {"max_length": 24, "max_test_examples": 16},
            "adapter": {"method": "lora", "rank": 4, "alpha": 8},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "lr": 0.003, "log_every": 1},
        },
        "rows": copy.deepcopy(ROWS if rows is None else rows),
    }


def write_experiment(path: Path, data: dict[str, Any]) -> Path:
    """Write an experiment config as YAML."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(frozen=True)
class RanExperiment:
    """An experiment run once through the CLI."""

    config: Path
    folder: Path
    exit_code: int
    output: str


def run_cli(*args: str):
    """``shieldtune ARGS`` in-process; returns click's result."""
    from typer.testing import CliRunner

    from shieldtune.cli.app import app

    return CliRunner().invoke(app, list(args))


def run_tiny_experiment(root: Path, table: Path) -> RanExperiment:
    """Write and run the 2-row × 2-seed grid under ``root``."""
    out = root / "out"
    config = write_experiment(root / "experiment.yaml", experiment_data(table, out))
    result = run_cli("experiment", str(config))
    return RanExperiment(config, out, result.exit_code, result.output)
