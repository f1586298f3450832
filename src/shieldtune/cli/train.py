"""``shieldtune train CONFIG``: run one recipe from a YAML config (+ overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from shieldtune.cli._common import console, progress_bar, quiet_libraries
from shieldtune.config import RunConfig, load_config

__all__ = ["train_command", "run_and_report", "EPILOG"]

EPILOG = """Example:

  shieldtune train configs/local/lora_minilm.yaml --set train.epochs=1
"""


def run_and_report(cfg: RunConfig) -> Path:
    """Run the config's recipe with a progress bar; print the final metrics table."""
    from shieldtune.recipes import RECIPES

    label = f"{cfg.mode} · {cfg.model.name} · {cfg.adapter['method']}"
    with progress_bar(label) as update:
        run_dir = RECIPES[cfg.mode](cfg, on_progress=update)
    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"{cfg.mode} on {summary['dataset']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "accuracy",
        "macro_f1",
        "loss",
        "perplexity",
        "steps",
        "train_time_s",
        "samples_per_s",
    ):
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"run folder: [bold]{run_dir}[/]")
    return run_dir


def train_command(config: Path | None, overrides: list[str]) -> int:
    """Validate the config, then run it.

    Args:
        config: YAML file (None = built-in defaults).
        overrides: ``key.path=value`` strings applied after the file.

    Returns:
        Exit code 0.
    """
    cfg = load_config(config, overrides)  # validated once, at the edge
    quiet_libraries()
    run_and_report(cfg)
    return 0
